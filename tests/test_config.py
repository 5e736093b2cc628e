import pytest

from medtl.config import load_config
from medtl.errors import ConfigError


def test_unknown_key_gets_did_you_mean(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_config(p)


def test_unknown_encoder_and_strategy_listed(tmp_path, capsys):
    """The encoder registry checks encoder names (medtl.models.check_encoder): `medtl train` refuses an unknown
    one at once, with the list, before it reads any data; the configuration itself refuses an unknown strategy."""
    from medtl.cli import main

    absent = tmp_path / "absent.csv"  # never read: the encoder is refused first
    assert (
        main(["train", "--data", str(absent), "--out", str(tmp_path / "run"), "--encoder", "efficientnet_lite9"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: unknown encoder 'efficientnet_lite9'; did you mean") and "'efficientnet_lite0'" in err
    assert "'resnet18'" in err and "absent.csv" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="linear_probe"):
        load_config(train={"strategy": "linear-probe"})


def test_yaml_round_trip(tmp_path):
    cfg = load_config(train={"epochs": 3}, data={"ct_window": "lung"})
    cfg.to_yaml(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def _yaml(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_numbers_written_in_exponent_form_are_numbers(tmp_path):
    """YAML 1.1 reads `1e-4` as a string; a number field takes it as the number it means."""
    cfg = load_config(_yaml(tmp_path, "train:\n  lr: 1e-4\n  weight_decay: 5e-2\n"))
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float) and cfg.train.weight_decay == 0.05


@pytest.mark.parametrize(
    "text, words",
    [
        ("train:\n  batch_size: 2.5\n", r"train.batch_size: 2.5 is not an integer"),
        ("train:\n  lr: abc\n", r"train.lr: 'abc' is not a number"),
        ("train:\n  epochs: -1\n", r"train.epochs: -1 is out of range \(expected a value >= 0\)"),
        ("train:\n  lr: 0\n", r"train.lr: 0.0 is out of range"),
        ("train:\n  freeze_bn: 'no'\n", r"train.freeze_bn: 'no' is not true or false"),
        ("data:\n  percentiles: [1]\n", r"data.percentiles: \[1\] is not a list of 2 numbers"),
        ("encoder:\n  input_size: big\n", r"encoder.input_size: 'big' is not an integer \(or null\)"),
        ("data:\n  augment: 1\n", r"data.augment: 1 is not true or false"),
        ("train:\n  strategy: 3\n", r"train.strategy: 3 is not a string"),
    ],
)
def test_a_value_of_the_wrong_type_or_range_names_file_key_value_and_expectation(tmp_path, text, words):
    p = _yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=words) as e:
        load_config(p)
    assert str(e.value).startswith(str(p))


def test_a_bad_value_gives_one_line_and_exit_2_on_the_command_line(tmp_path, capsys):
    from medtl.cli import main

    p = _yaml(tmp_path, "train:\n  batch_size: 2.5\n")
    assert main(["train", "--data", str(tmp_path / "m.csv"), "--out", str(tmp_path / "run"), "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}: train.batch_size: 2.5 is not an integer") and "Traceback" not in err


def test_a_gpu_index_is_a_device_and_a_typo_is_not():
    assert load_config(train={"device": "cuda:1"}).train.device == "cuda:1"
    with pytest.raises(ConfigError, match="unknown device 'gpu'; did you mean 'cuda'"):
        load_config(train={"device": "gpu"})
    with pytest.raises(ConfigError, match="unknown device 'gpu:1'; did you mean 'cuda:1'"):
        load_config(train={"device": "gpu:1"})
    with pytest.raises(ConfigError, match="unknown device 'cpy'; did you mean 'cpu'"):
        load_config(train={"device": "cpy"})


def _laughs(depth: int = 6) -> str:
    lines = ['data:\n  classes: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n', "train:\n"]
    for k in range(1, depth):
        lines.append(f"  x{k}: &l{k} [" + ",".join([f"*l{k - 1}"] * 9) + "]\n")
    return "".join(lines)


@pytest.mark.parametrize(
    ("name", "content", "said"),
    [
        ("list.yaml", b"- a\n- b\n", "a YAML list at the top"),
        ("number.yaml", b"42\n", "a YAML int at the top"),
        ("text.yaml", b"hello\n", "a YAML str at the top"),
        ("latin1.yaml", b'data:\n  path: "caf\xe9"\n', "not UTF-8 text"),
        ("deep.yaml", b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
        ("digits.yaml", b"train:\n  epochs: " + b"9" * 4400 + b"\n", "a value cannot be read"),
        ("laughs.yaml", _laughs().encode(), "more than 16 aliases"),
        ("huge.yaml", b"# " + b"x" * (1 << 20) + b"\n", "not a configuration"),
    ],
)
def test_any_yaml_shape_is_a_config_error_of_a_few_hundred_characters(tmp_path, name, content, said):
    """Each of these raised an untyped error (or, the billion laughs, printed ~300 MB after 7.5 s) before."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=said) as e:
        load_config(path)
    assert str(path.name) in str(e.value) and len(str(e.value)) < 600


def test_a_config_error_quoting_a_huge_value_is_cut():
    e = ConfigError(None, "data.classes: " + repr(["lol"] * 100_000))
    assert len(str(e)) < 500 and str(e).endswith("characters)")
