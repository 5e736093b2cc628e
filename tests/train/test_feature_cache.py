"""The on-disk feature cache: a second study with the same encoder weights and inputs reads the features; any
change of weights, inputs or precision computes them again; the head is not part of the key."""

import logging
import os
import stat

import pytest
import torch

import medtl.train.feature_cache as fc
from medtl.data import create_dataset, decode_records, read_manifest
from medtl.models import create_encoder, resolve_preprocessing
from medtl.runtime import Runtime
from medtl.transforms.chain import create_transforms
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def tiny(sample_dir):
    cfg = tiny_config(sample_dir / "manifest.csv")
    pre = resolve_preprocessing(create_encoder("efficientnet_lite0", pretrained=False), 64)
    det, final = create_transforms(cfg.data, pre, train=False)
    samples, problems = decode_records(read_manifest(cfg.data.path).records, det)
    assert not problems
    return samples[:12], final


@pytest.fixture
def counted(monkeypatch):
    """How many times the encoder really ran over a data set."""
    calls = []
    real = fc.extract_features

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fc, "extract_features", counting)
    return calls


def test_second_study_reads_the_features(tiny, tmp_path, counted, caplog):
    samples, final = tiny
    ds = create_dataset(samples, final)
    model = create_encoder("efficientnet_lite0", num_classes=2)
    first = fc.cached_features(model, ds, Runtime(), 8, root=tmp_path / "cache")
    assert len(counted) == 1
    model.reset_classifier(3)  # another head on the same encoder: the same features
    with caplog.at_level(logging.INFO, logger="medtl.train"):
        again = fc.cached_features(model, ds, Runtime(), 8, root=tmp_path / "cache")
    assert len(counted) == 1 and "read from the cache" in caplog.text
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and stat.S_IMODE(entries[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700


def test_other_weights_inputs_or_precision_compute_again(tiny, tmp_path, counted):
    samples, final = tiny
    root = tmp_path / "cache"
    model = create_encoder("efficientnet_lite0", num_classes=2)
    fc.cached_features(model, create_dataset(samples, final), Runtime(), 8, root=root)
    fc.cached_features(model, create_dataset(samples[:11], final), Runtime(), 8, root=root)  # other inputs
    assert len(counted) == 2
    fc.cached_features(model, create_dataset(samples, final), Runtime(precision="bf16"), 8, root=root)
    assert len(counted) == 3
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("conv_stem")).add_(1e-3)  # fine-tuned weights
    fc.cached_features(model, create_dataset(samples, final), Runtime(), 8, root=root)
    assert len(counted) == 4 and len(list(root.iterdir())) == 4


def test_a_damaged_entry_is_replaced_and_off_disables(tiny, tmp_path, counted, monkeypatch):
    samples, final = tiny
    ds, root = create_dataset(samples, final), tmp_path / "cache"
    model = create_encoder("efficientnet_lite0", num_classes=2)
    fc.cached_features(model, ds, Runtime(), 8, root=root)
    (entry,) = root.iterdir()
    entry.write_bytes(b"not safetensors")
    features, _ = fc.cached_features(model, ds, Runtime(), 8, root=root)
    assert len(counted) == 2 and features.shape[0] == 12 and entry.stat().st_size > 100
    monkeypatch.setenv("MEDTL_FEATURE_CACHE", "off")
    assert fc.cache_root() is None
    monkeypatch.setenv("MEDTL_FEATURE_CACHE", str(tmp_path / "x"))
    assert fc.cache_root() == tmp_path / "x"
    monkeypatch.delenv("MEDTL_FEATURE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fc.cache_root() == tmp_path / "xdg" / "medtl" / "features"
    assert os.fspath(fc.cache_root()).endswith("features")
