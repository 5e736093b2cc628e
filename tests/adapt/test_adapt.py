"""Zero-label adaptation: source-matched AdaBN undoes an intensity change of the input exactly where the
network is affine, changes nothing when the target is the source, and touches only BatchNorm
statistics; TENT trains only BatchNorm scales and shifts; `medtl adapt` writes a run with its
provenance that loads and predicts."""

import json
import shutil

import pytest
import torch
from torch import nn

from medtl.adapt.batchnorm import adabn, adapt, bn_statistics, information_loss, load_bn_statistics, save_bn_statistics
from medtl.cli import main
from medtl.predict.predictor import load_run
from medtl.run import load_saved_run
from medtl.runtime import Runtime


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    for m in net.modules():  # statistics of another domain (as ImageNet's are to a scan)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


CPU = Runtime(torch.device("cpu"), "fp32")


def _batches(x):
    return lambda: iter(x.split(16))


def test_source_matched_adabn_undoes_an_intensity_change():
    net = _net()
    source = torch.rand(96, 1, 12, 12)
    target = 2.5 * source + 0.7  # another scanner's intensity scale
    stats = bn_statistics(net, source.split(16), CPU)
    with torch.no_grad():
        want = net(source)
        before = net(target)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k}
    adapted = adapt(net, "adabn", _batches(target), stats, CPU)
    with torch.no_grad():
        got = adapted(target)
    assert (before - want).abs().max() > 0.1  # the change matters
    assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
    assert all(torch.equal(adapted.state_dict()[k], v) for k, v in weights.items())  # only statistics moved
    plain = adapt(net, "adabn_plain", _batches(target), None, CPU)
    with torch.no_grad():
        assert (plain(target) - want).abs().max() > 10 * (got - want).abs().max()


def test_matching_the_source_to_itself_changes_nothing_in_a_real_encoder(tiny_run, sample_dir):
    saved = load_saved_run(tiny_run)
    stats = load_bn_statistics(tiny_run)
    assert stats and len(stats) > 10  # written by medtl train: one entry per BatchNorm layer
    predictor = load_run(tiny_run, device="cpu")
    x = torch.cat([predictor.inputs(predictor.read(f))[0] for f in sorted((sample_dir / "dicom").glob("*.dcm"))[:24]])
    fresh = load_saved_run(tiny_run).model.eval()
    own = bn_statistics(saved.model, x.split(8), CPU)
    model = adabn(saved.model, [x], own, CPU)  # the "target" is the source itself (one batch: exact moments)
    with torch.no_grad():
        before, after = fresh(x).softmax(1), model(x).softmax(1)
    assert (after - before).abs().max() < 0.01, (after - before).abs().max()


def test_tent_trains_only_batchnorm_affine_and_lowers_the_loss():
    net = _net()
    source = torch.rand(64, 1, 12, 12)
    target = 1.8 * source + 0.3
    stats = bn_statistics(net, source.split(16), CPU)
    adapted = adapt(net, "tent", _batches(target), stats, CPU, epochs=5, lr=1e-2)
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, net.state_dict()[k])}
    assert changed and all(k.split(".")[0] in ("1", "4") for k in changed)  # BatchNorm layers only
    assert not any(torch.equal(adapted[1].weight, w) for w in [net[1].weight])
    assert all(torch.equal(adapted[i].weight, net[i].weight) for i in (0, 3, 8))
    with torch.no_grad():
        assert information_loss(adapted(target)) < information_loss(net(target))


def test_statistics_round_trip(tmp_path):
    stats = bn_statistics(_net(), torch.rand(32, 1, 12, 12).split(8), CPU)
    save_bn_statistics(stats, tmp_path)
    back = load_bn_statistics(tmp_path)
    assert set(back) == set(stats) and all(torch.equal(back[k][0], stats[k][0]) for k in stats)


def test_the_command_writes_an_adapted_run_with_its_provenance(tiny_run, sample_dir, tmp_path, capsys):
    target = tmp_path / "site"
    target.mkdir()
    for f in sorted((sample_dir / "dicom").glob("*.dcm"))[:16]:
        shutil.copy(f, target / f.name)
    (target / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM")
    out = tmp_path / "adapted"
    assert main(["adapt", str(tiny_run), "--data", str(target), "--out", str(out), "--device", "cpu"]) == 1
    said = capsys.readouterr()
    assert "broken.dcm" in said.err and "16 target images (1 skipped)" in said.out
    record = json.loads((out / "adaptation.json").read_text())
    assert record["method"] == "adabn" and record["target_images"] == 16 and record["source_weights_sha256"]
    src, new = load_run(tiny_run, device="cpu"), load_run(out, device="cpu")
    f = sorted((sample_dir / "dicom").glob("*.dcm"))[20]
    a, b = src.predict(f, check=False), new.predict(f, check=False)
    assert a.probabilities != b.probabilities and abs(sum(b.probabilities.values()) - 1) < 1e-5
    assert load_run(out, device="cpu").predict(f, check=False).probabilities == b.probabilities  # reloads the same
    with pytest.raises(SystemExit):
        main(["adapt", str(tiny_run), "--out", str(out)])  # --data is required
    assert main(["adapt", str(tiny_run), "--data", str(target), "--out", str(out)]) == 2  # not replaced


def test_adapting_a_run_into_itself_is_refused_before_anything_is_touched(tiny_run, sample_dir):
    before = sorted(p.name for p in tiny_run.iterdir())
    assert main(["adapt", str(tiny_run), "--data", str(sample_dir / "dicom"), "--out", str(tiny_run), "--force"]) == 2
    assert sorted(p.name for p in tiny_run.iterdir()) == before
