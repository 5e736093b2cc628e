import pytest

from medtl.config import load_config
from medtl.errors import ConfigError


def test_unknown_key_gets_did_you_mean(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_config(p)


def test_unknown_encoder_and_strategy_listed():
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        load_config(encoder={"name": "efficientnet_lite9"})
    with pytest.raises(ConfigError, match="linear_probe"):
        load_config(train={"strategy": "linear-probe"})


def test_yaml_round_trip(tmp_path):
    cfg = load_config(train={"epochs": 3}, data={"ct_window": "lung"})
    cfg.to_yaml(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
