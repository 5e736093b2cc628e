import dataclasses
import json

import numpy as np
import pytest
import torch

from medtl.data import create_dataset, decode_records, read_manifest
from medtl.models import create_encoder, resolve_preprocessing
from medtl.models.checkpoint import load_model, save_model
from medtl.predict.forward import predict_probs
from medtl.train import fit, plan_stages
from medtl.transforms.chain import create_transforms
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def tiny_data(sample_dir):
    cfg = tiny_config(sample_dir / "manifest.csv")
    m = read_manifest(cfg.data.path)
    model = create_encoder("efficientnet_lite0", num_classes=2)
    pre = resolve_preprocessing(model, 64)
    det, final = create_transforms(cfg.data, pre, train=True)
    samples, problems = decode_records(m.records, det)
    assert not problems
    return cfg, samples[:24], samples[24:], final


@pytest.mark.parametrize("cache_features", [False, True])
def test_frozen_stage_leaves_encoder_bit_identical(tiny_data, cache_features):
    """Without the feature cache the encoder runs live, in training mode, through the freezing logic
    (requires_grad off, frozen BatchNorm kept in eval mode); with it, on features extracted once."""
    cfg, train, val, final = tiny_data
    model = create_encoder("efficientnet_lite0", num_classes=2)
    head = {k for k in model.state_dict() if k.startswith("classifier.")}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tc = dataclasses.replace(
        cfg.train, strategy="linear_probe", epochs=2, freeze_bn=False, cache_features=cache_features
    )
    fit(model, create_dataset(train, final), create_dataset(val, final), tc, num_classes=2)
    after = {k: v.cpu() for k, v in model.state_dict().items()}  # (fit leaves the model on its device)
    for k in before:  # parameters and BatchNorm running statistics alike
        if k in head:
            continue
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])


def test_partial_trains_the_top_groups_only(tiny_data):
    """``partial``: the top ``unfreeze_groups`` layer groups move; every lower group, its BatchNorm
    statistics included, stays bit-identical."""
    from medtl.models.groups import encoder_groups

    cfg, train, val, final = tiny_data
    model = create_encoder("efficientnet_lite0", num_classes=2)
    groups = encoder_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    frozen = {names[id(p)] for g in groups[:-2] for p in g}
    trained = {names[id(p)] for g in groups[-2:] for p in g}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tc = dataclasses.replace(
        cfg.train, strategy="partial", frozen_epochs=0, epochs=1, unfreeze_groups=2, freeze_bn=False, patience=5
    )
    fit(model, create_dataset(train, final), create_dataset(val, final), tc, num_classes=2)
    after = {k: v.cpu() for k, v in model.state_dict().items()}  # (fit leaves the model on its device)
    frozen_modules = {k.rsplit(".", 1)[0] for k in frozen}
    for k in before:
        if k in frozen or (k.endswith(("running_mean", "running_var")) and k.rsplit(".", 1)[0] in frozen_modules):
            assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in trained)


def test_fine_tune_stage_moves_encoder(tiny_data):
    cfg, train, val, final = tiny_data
    model = create_encoder("efficientnet_lite0", num_classes=2)
    before = model.conv_stem.weight.detach().clone()
    tc = dataclasses.replace(cfg.train, strategy="full", epochs=1, patience=5)
    result = fit(model, create_dataset(train, final), create_dataset(val, final), tc, num_classes=2)
    assert [r["stage"] for r in result.history] == ["full"]
    assert not torch.equal(before, model.conv_stem.weight.cpu())


def test_a_diverging_run_stops_with_a_typed_error(tiny_data):
    """A NaN loss stops training at once with TrainingDivergedError (epoch, stage, lr, what to do),
    not several epochs later as a metrics error about the model's own NaN outputs."""
    from medtl.errors import TrainingDivergedError

    cfg, train, val, final = tiny_data
    bad = [dict(s, image=np.full_like(np.asarray(s["image"]), np.nan)) for s in train]
    tc = dataclasses.replace(cfg.train, strategy="full", epochs=2)
    with pytest.raises(
        TrainingDivergedError, match=r"epoch 1 \(full stage\): training loss nan at step 1.*lower train.lr"
    ):
        fit(
            create_encoder("efficientnet_lite0", num_classes=2),
            create_dataset(bad, final),
            create_dataset(val, final),
            tc,
            num_classes=2,
        )


def test_strategies_are_stage_lists():
    cfg = tiny_config("x.csv").train
    assert [s.name for s in plan_stages(cfg, 8)] == ["head", "fine_tune"]
    assert [s.trainable for s in plan_stages(cfg, 8)] == [0, -1]
    assert [s.trainable for s in plan_stages(cfg, 8, "partial")] == [0, 2]
    gradual = plan_stages(dataclasses.replace(cfg, epochs=5), 4, "gradual")
    assert [s.trainable for s in gradual] == [0, 1, 2, 3, -1] and sum(s.epochs for s in gradual[1:]) == 5


def test_two_seeded_runs_give_identical_weights(tiny_data):
    cfg, train, val, final = tiny_data
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_encoder("efficientnet_lite0", num_classes=2)
        tc = dataclasses.replace(cfg.train, epochs=1, frozen_epochs=1)
        _, final_aug = create_transforms(
            dataclasses.replace(cfg.data, augment=True), resolve_preprocessing(model, 64), train=True
        )
        fit(model, create_dataset(train, final_aug), create_dataset(val, final), tc, num_classes=2)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_saved_and_reloaded_model_gives_identical_outputs(tmp_path, tiny_data):
    cfg, train, val, final = tiny_data
    model = create_encoder("efficientnet_lite0", num_classes=2).eval()
    torch.nn.init.normal_(model.classifier.weight)
    pre = resolve_preprocessing(model, 64)
    save_model(model, tmp_path / "m.safetensors", "efficientnet_lite0", ["a", "b"], pre)
    loaded, meta = load_model(tmp_path / "m.safetensors")
    assert meta["class_names"] == ["a", "b"] and meta["preprocessing"] == pre
    ds = create_dataset(val, final)
    _, p1 = predict_probs(model, ds)
    _, p2 = predict_probs(loaded, ds)
    np.testing.assert_array_equal(p1, p2)


def test_run_folder_contents(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"config.yaml", "model.safetensors", "metrics.json", "history.csv", "splits.csv", "overlays"} <= names
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for part in ("train", "val", "test"):
        assert metrics[part]["n_images"] > 0 and metrics[part]["n_patients"] > 0
    for key in ("auc", "accuracy", "sensitivity", "specificity"):
        assert key in metrics["test"]
    assert len(list((tiny_run / "overlays").glob("*.png"))) == 2
    exported = [*tiny_run.glob("*.csv"), tiny_run / "metrics.json", tiny_run / "config.yaml"]
    assert not any("SYN" in p.read_text() for p in exported)  # no patient identifier leaves the data


def test_no_patient_in_two_splits_of_a_run(tiny_run, sample_dir):
    import csv

    patient = {}
    with open(sample_dir / "manifest.csv") as f:
        for row in csv.DictReader(f):
            patient[str(sample_dir / row["image"])] = row["patient_id"]
    split_of = {}
    with open(tiny_run / "splits.csv") as f:
        for row in csv.DictReader(f):
            pid = patient[row["image"]]
            assert split_of.setdefault(pid, row["split"]) == row["split"]


def test_prefetching_batches_trains_the_same_weights(tiny_data, monkeypatch):
    """The GPU branch (batches prepared in a background thread), forced on the CPU: same weights."""
    import importlib

    trainer_module = importlib.import_module("medtl.train.trainer")
    cfg, train, val, final = tiny_data
    states = []
    for threaded in (False, True):
        monkeypatch.setattr(trainer_module, "use_prefetch", lambda device, t=threaded: t)
        torch.manual_seed(0)
        model = create_encoder("efficientnet_lite0", num_classes=2)
        _, final_aug = create_transforms(
            dataclasses.replace(cfg.data, augment=True), resolve_preprocessing(model, 64), train=True
        )
        tc = dataclasses.replace(cfg.train, strategy="full", epochs=2, precision="fp32")
        fit(model, create_dataset(train, final_aug), create_dataset(val, final), tc, num_classes=2)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_prefetch_keeps_order_and_raises_a_batch_error_in_place():
    from medtl.train.loop import prefetch

    assert list(prefetch(iter(range(10)), depth=2)) == list(range(10))

    def broken():
        yield 1
        raise ValueError("bad file")

    got = []
    with pytest.raises(ValueError, match="bad file"):
        for item in prefetch(broken()):
            got.append(item)
    assert got == [1]
    for _ in prefetch(iter(range(100)), depth=1):  # leaving early ends the producer thread
        break


@pytest.mark.parametrize(("device", "expected"), [("cuda", 3), ("cuda:1", 1)])
def test_prefetch_thread_gets_a_device_index_for_a_plain_cuda(monkeypatch, device, expected):
    """The GPU branch forced on any host: ``torch.cuda.set_device`` refuses "cuda" without an index (the first GPU
    run failed every training so); the thread is given the caller's current device, or the one named."""
    from medtl.train.loop import prefetch

    seen = []

    def set_device(d):
        if not isinstance(d, int):
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{d}")
        seen.append(d)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert list(prefetch(iter(range(5)), device=torch.device(device))) == list(range(5))
    assert seen == [expected]
