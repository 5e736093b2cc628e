"""The example configurations in configs/: each one loads, names a known encoder and fits its data's form;
the demo's trains end to end on generated data."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from medtl.config import SCHEMA_VERSION, load_config
from medtl.models import check_encoder
from medtl.train import run_experiment

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_example_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_loads_and_is_current(path):
    cfg = load_config(path)
    check_encoder(cfg.encoder)
    assert cfg.schema_version == SCHEMA_VERSION
    assert yaml.safe_load(path.read_text())["schema_version"] == SCHEMA_VERSION  # written, not defaulted
    assert cfg.data.path, "an example names its data"


def test_the_demo_config_trains_end_to_end(sample_dir, tmp_path):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "sample_ct.yaml")
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, path=str(sample_dir / "manifest.csv")),
        encoder=dataclasses.replace(cfg.encoder, input_size=64),
        train=dataclasses.replace(cfg.train, frozen_epochs=1, epochs=1),
        explain=dataclasses.replace(cfg.explain, n_overlays=1),
    )
    run = run_experiment(cfg, tmp_path / "demo")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["strategy"] == "fine_tune" and metrics["test"]["n_images"] > 0
    assert yaml.safe_load((run / "config.yaml").read_text())["schema_version"] == SCHEMA_VERSION


def test_a_config_of_a_newer_schema_is_refused(tmp_path):
    from medtl.errors import ConfigError

    p = tmp_path / "new.yaml"
    p.write_text(f"schema_version: {SCHEMA_VERSION + 1}\n")
    with pytest.raises(ConfigError, match="schema_version"):
        load_config(p)
