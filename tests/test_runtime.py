"""Every precision path runs on every machine: bf16 (emulated where the CPU has no native bf16)
is forced for each strategy, feature caching, predict, explain, evaluate and a pipeline cell;
``precision: auto`` measures on a native-bf16 machine and not elsewhere (both forced here)."""

import json
import shutil

import numpy as np
import pytest
import torch
from monai.transforms import Compose, Transform

import medtl.runtime as runtime_mod
from medtl.config import load_config
from medtl.data import create_dataset, read_dataset
from medtl.errors import ConfigError
from medtl.models import create_encoder, resolve_preprocessing
from medtl.predict.forward import predict_logits
from medtl.predict.predictor import load_run
from medtl.runtime import Runtime, choose_precision, inference_precision
from medtl.train import fit, prepare_data
from medtl.transforms.chain import TrainingTransform, create_transforms
from tests.data.test_sources import write_medmnist


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return write_medmnist(tmp_path_factory.mktemp("mm") / "tiny.npz", n=(16, 8, 8))


def _setup(path, augment=False, **train):
    cfg = load_config(
        data={"path": str(path), "augment": augment},
        encoder={"input_size": 32},
        train={"epochs": 1, "frozen_epochs": 1, "batch_size": 4, **train},
    )
    torch.manual_seed(0)
    model = create_encoder("efficientnet_lite0", num_classes=2)
    pre = resolve_preprocessing(model, 32)
    return cfg, model, prepare_data(cfg.data, pre, 0, read_dataset(path)).datasets(cfg.data, pre)


class _AutocastSpy(Transform):
    """A transform (or batch augmentation) that records whether it ever ran under autocast."""

    def __init__(self, inner=None):
        self.inner, self.seen = inner, []

    def __call__(self, d):
        self.seen.append(torch.is_autocast_enabled("cpu"))
        return self.inner(d) if self.inner else d

    def set_random_state(self, seed=None, state=None):
        if self.inner is not None:
            self.inner.set_random_state(seed)
        return self


def _spied(cfg, model, path):
    """Training and validation sets whose per-sample chains and batch augmentation record autocast."""
    pre = resolve_preprocessing(model, 32)
    prepared = prepare_data(cfg.data, pre, 0, read_dataset(path))
    _, train_final = create_transforms(cfg.data, pre, train=True)
    _, eval_final = create_transforms(cfg.data, pre, train=False)
    spies = [_AutocastSpy(), _AutocastSpy(), _AutocastSpy(train_final.batch_augment)]
    train = create_dataset(prepared.sets["train"], TrainingTransform([*train_final.transforms, spies[0]], spies[2]))
    val = create_dataset(prepared.sets["val"], Compose([*eval_final.transforms, spies[1]]))
    return train, val, spies


@pytest.mark.parametrize("strategy", ["linear_probe", "partial", "fine_tune", "gradual", "full"])
def test_every_strategy_trains_in_bf16_with_augmentation_outside_autocast(npz, strategy, monkeypatch):
    """The bf16 crash of the last round: MONAI's random affine ran inside autocast. Transforms and
    the batch augmentation must never see autocast, and every strategy (feature caching included)
    must train in bf16."""
    monkeypatch.delenv("MEDTL_PRECISION", raising=False)
    cfg, model, _ = _setup(npz, augment=True, strategy=strategy, precision="bf16")
    train, val, spies = _spied(cfg, model, npz)
    before = model.classifier.weight.detach().clone()
    result = fit(model, train, val, cfg.train, num_classes=2)
    assert result.precision == "bf16" and result.precision_choice["reason"] == "set in the configuration"
    assert spies[0].seen and spies[1].seen and not any(spies[0].seen + spies[1].seen + spies[2].seen)
    assert bool(spies[2].seen) == (strategy != "linear_probe")  # (a linear probe trains on cached features)
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in result.history)
    assert not torch.equal(before, model.classifier.weight.cpu())
    assert next(model.parameters()).dtype == torch.float32  # autocast, not a bf16 copy of the weights


def test_prediction_runs_the_model_under_autocast_and_the_data_outside(npz):
    cfg, model, _ = _setup(npz)
    _, val, spies = _spied(cfg, model, npz)
    dtypes = []
    model.get_classifier().register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))  # the head's logits
    out = predict_logits(model, val, Runtime(precision="bf16", tta=True), batch_size=4)
    assert dtypes and set(dtypes) == {torch.bfloat16} and spies[1].seen and not any(spies[1].seen)
    assert out.logits.dtype == np.float32 and out.logits.shape == (len(val), 2)
    fp32 = predict_logits(model, val, Runtime(precision="fp32", tta=True), batch_size=4)
    np.testing.assert_allclose(out.logits, fp32.logits, atol=0.1)  # bf16 rounding, same answers


def test_auto_measures_on_native_bf16_hardware_and_caches_the_answer(npz, monkeypatch, tmp_path):
    monkeypatch.delenv("MEDTL_PRECISION", raising=False)
    monkeypatch.setenv("MEDTL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime_mod, "native_bf16", lambda device: True)
    model = create_encoder("efficientnet_lite0", num_classes=2)
    calls = []
    real = runtime_mod.measure_training_speed

    def measured(m, shape, batch, rt, steps=3, frozen_bn=False):
        calls.append(rt.precision)
        return real(m, shape, batch, rt, steps=1, frozen_bn=frozen_bn)

    monkeypatch.setattr(runtime_mod, "measure_training_speed", measured)
    first = choose_precision("auto", model, (3, 32, 32), 4, Runtime(), "efficientnet_lite0")
    assert sorted(calls) == ["bf16", "fp32"] and first.reason == "measured"
    assert first.precision == max(first.img_per_s, key=first.img_per_s.get)
    again = choose_precision("auto", model, (3, 32, 32), 4, Runtime(), "efficientnet_lite0")
    assert len(calls) == 2 and again.reason == "cached measurement" and again.precision == first.precision
    other = choose_precision("auto", model, (3, 32, 32), 8, Runtime(), "efficientnet_lite0")  # another batch size
    assert len(calls) == 4 and other.reason == "measured"
    assert len(json.loads((tmp_path / "precision.json").read_text())) == 2
    # BatchNorm frozen (medtl's freeze_bn, the loop's default) is another computation: measured as the loop runs it
    frozen = []
    monkeypatch.setattr(runtime_mod, "measure_training_speed", lambda *a, **k: frozen.append(k["frozen_bn"]) or 1.0)
    choose_precision("auto", model, (3, 32, 32), 4, Runtime(), "efficientnet_lite0", frozen_bn=True)
    assert frozen == [True, True]


def test_auto_without_native_bf16_keeps_fp32_without_measuring(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDTL_PRECISION", raising=False)
    monkeypatch.setattr(runtime_mod, "native_bf16", lambda device: False)
    monkeypatch.setattr(runtime_mod, "measure_training_speed", lambda *a, **k: pytest.fail("measured"))
    choice = choose_precision("auto", create_encoder("efficientnet_lite0", num_classes=2), (3, 32, 32), 4, Runtime())
    assert choice.precision == "fp32" and "no bf16 natively" in choice.reason


def test_the_probe_leaves_the_model_and_the_random_streams_alone(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDTL_PRECISION", raising=False)
    monkeypatch.setenv("MEDTL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime_mod, "native_bf16", lambda device: True)
    model = create_encoder("efficientnet_lite0", num_classes=2, drop_rate=0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    choose_precision("auto", model, (3, 32, 32), 4, Runtime())
    after_probe = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(after_probe, torch.rand(3))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_medtl_precision_overrides_the_configuration(monkeypatch):
    monkeypatch.setenv("MEDTL_PRECISION", "bf16")
    model = create_encoder("efficientnet_lite0", num_classes=2)
    choice = choose_precision("fp32", model, (3, 32, 32), 4, Runtime())
    assert choice.precision == "bf16" and "MEDTL_PRECISION" in choice.reason
    assert inference_precision(None) == "bf16"
    monkeypatch.setenv("MEDTL_PRECISION", "bf8")
    with pytest.raises(ConfigError, match="MEDTL_PRECISION='bf8' is not a precision"):
        inference_precision(None)
    monkeypatch.delenv("MEDTL_PRECISION")
    assert inference_precision(None) == "fp32" and inference_precision("bf16") == "bf16"


def test_a_missing_gpu_is_a_typed_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from medtl.runtime import resolve_device

    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_predict_explain_and_evaluate_run_in_bf16(tiny_run, sample_dir, tmp_path, monkeypatch):
    from medtl.eval.evaluate import evaluate_run

    image = sample_dir / "dicom" / "img_0003.dcm"
    fp32, bf16 = load_run(tiny_run, precision="fp32"), load_run(tiny_run, precision="bf16")
    assert bf16.runtime.precision == "bf16" and bf16.runtime.device.type == "cpu"
    p32, p16 = fp32.predict(image), bf16.predict(image)
    assert p16.label == p32.label or abs(p32.probabilities[p32.label] - 0.5) < 0.05
    assert all(abs(p16.probabilities[c] - p32.probabilities[c]) < 0.05 for c in p32.probabilities)
    expl = bf16.explain(image)
    assert expl.saliency.dtype == np.float32 and np.isfinite(expl.saliency).all() and expl.saliency.max() > 0
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    monkeypatch.setenv("MEDTL_PRECISION", "bf16")
    result = evaluate_run(run, n_boot=20, methods=("gradcam",), data_randomisation=False)
    assert result["auc"]["auc"] is not None and np.isfinite(result["calibration"]["temperature"])


def test_a_label_efficiency_cell_trains_in_bf16(npz, monkeypatch):
    from tests.pipelines import load_pipeline

    monkeypatch.delenv("MEDTL_PRECISION", raising=False)
    mod = load_pipeline("label_efficiency")
    cfg = load_config(
        data={"path": str(npz), "augment": True},
        encoder={"input_size": 32},
        train={"epochs": 1, "frozen_epochs": 1, "batch_size": 4, "precision": "bf16"},
    )
    model = create_encoder("efficientnet_lite0", num_classes=2)
    pre = resolve_preprocessing(model, 32)
    prepared = prepare_data(cfg.data, pre, 0, read_dataset(npz))
    row = mod.run_cell(cfg, prepared, pre, 2, list(range(len(prepared.sets["train"]))))
    assert row["test_auc"] is not None and 0 <= row["test_auc"] <= 1


def test_run_metrics_record_the_precision_and_how_it_was_chosen(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["precision"] in ("fp32", "bf16")
    assert metrics["precision_choice"]["precision"] == metrics["precision"] and metrics["precision_choice"]["reason"]


@pytest.mark.parametrize(
    "device, native, expected",
    [
        ("cpu", True, ("fp32", "bf16")),
        ("cpu", False, ("fp32",)),
        ("cuda", True, ("fp32", "bf16")),
        ("cuda", False, ("fp32", "fp16")),
    ],
)
def test_candidates_follow_the_hardware(monkeypatch, device, native, expected):
    """Every hardware branch, forced: what the probe measures on a CPU or a GPU with or without bf16."""
    from medtl.runtime import precision_candidates

    monkeypatch.setattr(runtime_mod, "native_bf16", lambda d: native)
    assert precision_candidates(torch.device(device)) == expected


def test_the_fp32_rule_for_3d_nets_is_for_cpus_only(monkeypatch):
    monkeypatch.setenv("MEDTL_PRECISION", "bf16")
    net = create_encoder("resnet10_3d_gn", pretrained=False, num_classes=2)
    assert choose_precision("auto", net, (1, 16, 16, 16), 2, Runtime()).precision == "fp32"
    on_gpu = Runtime(device="cuda")  # (a device object only: nothing runs)
    assert choose_precision("auto", net, (1, 16, 16, 16), 2, on_gpu).precision == "bf16"


def test_fp16_trains_with_loss_scaling(npz, monkeypatch):
    """The fp16 branch (a GradScaler, as on GPUs without bf16), forced on the CPU."""
    monkeypatch.delenv("MEDTL_PRECISION", raising=False)
    cfg, model, (train, val, _) = _setup(npz, strategy="full", precision="fp16")
    before = model.conv_stem.weight.detach().clone()
    result = fit(model, train, val, cfg.train, num_classes=2)
    assert result.precision == "fp16" and all(np.isfinite(r["train_loss"]) for r in result.history)
    assert not torch.equal(before, model.conv_stem.weight.cpu())


def test_an_unknown_device_is_a_typed_error():
    from medtl.runtime import resolve_device

    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_training_matches_eager(npz, monkeypatch):
    """train.compile (torch.compile, about a minute to compile on 2 cores): the same weights as eager."""
    monkeypatch.delenv("MEDTL_PRECISION", raising=False)
    real, compiled_models = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled_models.append(m) or real(m, **kw))
    states = []
    for compiled in (False, True):
        cfg = load_config(
            data={"path": str(npz), "augment": False},
            encoder={"input_size": 32, "drop_rate": 0.0},
            train={"strategy": "full", "epochs": 1, "batch_size": 4, "precision": "fp32", "compile": compiled},
        )
        torch.manual_seed(0)
        model = create_encoder("efficientnet_lite0", num_classes=2, drop_rate=0.0)
        pre = resolve_preprocessing(model, 32)
        train, val, _ = prepare_data(cfg.data, pre, 0, read_dataset(npz)).datasets(cfg.data, pre)
        fit(model, train, val, cfg.train, num_classes=2)
        states.append(model.state_dict())
        assert len(compiled_models) == int(compiled)  # the compiled branch ran only when asked for
    for k in ("conv_stem.weight", "classifier.weight"):
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-3, atol=1e-4)


def test_adamw_is_fused_on_cpu_and_cuda_and_updates_as_the_default_does():
    """medtl's loops and its speed probe step AdamW through torch's fused kernel where the device has one; the
    update is the one the tensor-by-tensor implementation makes. Elsewhere (here: the meta device) the default."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.randn(2, 3, 8, 8))
    twin = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
    fused = runtime_mod.adamw(net.parameters(), torch.device("cpu"), lr=1e-2, weight_decay=0.05)
    plain = torch.optim.AdamW(twin, lr=1e-2, weight_decay=0.05)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in twin]
        for p, q, g in zip(net.parameters(), twin, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step(), plain.step()
    for p, q in zip(net.parameters(), twin):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert (
        runtime_mod.adamw([torch.nn.Parameter(torch.empty(2, device="meta"))], torch.device("meta")).defaults["fused"]
        is None
    )
    if torch.cuda.is_available():
        assert runtime_mod.adamw([torch.nn.Parameter(torch.ones(2, device="cuda"))], torch.device("cuda")).defaults[
            "fused"
        ]
