"""The command line's hygiene (issue 30, item 6): global flags on either side of the command, fixed sets as
choices with their defaults in the help, usage errors and bad configurations refused (exit 2) before torch is
imported, and no secret on the command line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from medtl.cli import build_parser, main


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of ``parser`` and every sub-command's, nested ones too."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


# -- global flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, verbose, quiet",
    [
        (["-v", "train", "--out", "r"], True, False),
        (["train", "-v", "--out", "r"], True, False),
        (["train", "--out", "r", "--verbose"], True, False),
        (["-q", "predict", "RUN", "x.dcm"], False, True),
        (["predict", "RUN", "x.dcm", "-q"], False, True),
        (["predict", "RUN", "x.dcm"], False, False),
        (["pacs", "query", "http://pacs/dicom-web", "-v"], True, False),
        (["pacs", "-q", "query", "http://pacs/dicom-web"], False, True),
        (["-v", "encoders", "-q"], True, True),  # before and after: both kept (-v wins in setup_logging)
    ],
)
def test_global_flags_are_taken_before_and_after_the_command(argv, verbose, quiet):
    args = build_parser().parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)


def test_every_command_takes_the_global_flags():
    for path, parser in _parsers(build_parser()):
        flags = {s for a in parser._actions for s in a.option_strings}
        assert {"-v", "--verbose", "-q", "--quiet"} <= flags, path


def test_a_flag_after_the_command_sets_the_log_level(tmp_path, capsys):
    import logging

    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    root.handlers.clear()  # (basicConfig does nothing where the root logger already has a handler)
    try:
        assert main(["info", str(tmp_path / "x.png"), "-v"]) == 0
        assert root.level == logging.DEBUG
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


# -- fixed sets and defaults ----------------------------------------------------------------------


def test_the_help_shows_defaults_and_never_a_meaningless_one():
    parser = build_parser()
    for path, sub in _parsers(parser):
        text = sub.format_help()
        assert "default: None" not in text and "default: False" not in text, path
    predict = dict(_parsers(parser))[("predict",)].format_help()
    assert "(default: 32)" in " ".join(predict.split())  # --batch-size: a default the help did not say before
    assert "--device {auto,cpu,cuda,cuda:N}" in predict


@pytest.mark.parametrize(
    "argv, words",
    [
        (["predict", "RUN", "x.dcm", "--device", "gpu"], "unknown device 'gpu'; did you mean 'cuda'?"),
        (["explain", "RUN", "x.dcm", "--device", "gpu:1"], "unknown device 'gpu:1'; did you mean 'cuda:1'?"),
        (
            ["evaluate", "RUN", "--device", "cuda:x"],
            "unknown device 'cuda:x'; did you mean 'cuda'? (expected 'auto', 'cpu', 'cuda'",
        ),
        (["train", "--out", "r", "--device", "gpu"], "unknown device 'gpu'; did you mean 'cuda'?"),
        (["evaluate", "RUN", "--operating-point", "sens:0.9"], "unknown operating point 'sens:0.9'"),
        (["evaluate", "RUN", "--operating-point", "specificity:1.5"], "unknown operating point 'specificity:1.5'"),
        (["evaluate", "RUN", "--methods", "gradcam,gradcm"], "unknown saliency method 'gradcm'; did you mean"),
        (["deid", "in", "--out", "out", "--dates", "keep"], "unknown dates action 'keep'"),
    ],
)
def test_a_value_outside_its_set_is_refused_before_anything_runs(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {words}") and "Traceback" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_every_device_the_configuration_takes_is_accepted(device):
    from medtl.config import load_config

    parser = build_parser()
    assert parser.parse_args(["predict", "RUN", "x.dcm", "--device", device]).device == device
    assert parser.parse_args(["train", "--out", "r", "--device", device]).device == device
    assert load_config(train={"device": device}).train.device == device  # the same forms as the configuration


@pytest.mark.parametrize(
    "value, methods",
    [("all", ("gradcam", "gradcampp", "occlusion", "integrated_gradients")), (" gradcam, gradcam,occlusion", None)],
)
def test_evaluate_methods_are_parsed_once(value, methods):
    args = build_parser().parse_args(["evaluate", "RUN", "--methods", value, "--operating-point", "sensitivity:.9"])
    assert args.methods == (methods or ("gradcam", "occlusion")) and args.operating_point == "sensitivity:.9"


# -- secrets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--auth", "user:s3cret"], ["--auth=user:s3cret"], ["--auth"]])
def test_serve_refuses_a_password_on_the_command_line(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(tmp_path), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--auth-file" in err and "MEDTL_AUTH" in err and "process list" in err and "s3cret" not in err


def test_serve_reads_credentials_from_the_environment_or_a_file(tmp_path, monkeypatch):
    from medtl.cli.runs import serve_auth

    parser = build_parser()
    monkeypatch.delenv("MEDTL_AUTH", raising=False)
    assert serve_auth(parser.parse_args(["serve", "R"])) is None
    monkeypatch.setenv("MEDTL_AUTH", " alice:env-pass\n")
    assert serve_auth(parser.parse_args(["serve", "R"])) == "alice:env-pass"
    (tmp_path / "auth").write_text("bob:file-pass\n")
    assert serve_auth(parser.parse_args(["serve", "R", "--auth-file", str(tmp_path / "auth")])) == "bob:file-pass"


def test_no_command_takes_a_password_as_a_value():
    """Secrets come from files or the environment: no option of any command named after one takes it as its value
    (--credentials, --key-file and --auth-file name files; --auth is refused)."""
    from pathlib import Path

    from medtl.cli.runs import RefuseSecret

    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            names = " ".join(action.option_strings)
            named_after_a_secret = any(w in names for w in ("pass", "auth", "token", "secret", "key", "credential"))
            if named_after_a_secret and action.nargs != 0:  # (a switch such as pacs serve --new-password holds none)
                assert action.type is Path or isinstance(action, RefuseSecret), (path, names)


# -- refused before torch is imported ---------------------------------------------------------------

_CHECK = """
import json, sys
from medtl.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    results.append([code, sorted(m for m in ('torch', 'monai', 'timm', 'gradio') if m in sys.modules)])
print(json.dumps(results))
"""


def test_usage_and_configuration_errors_exit_2_before_torch_is_imported(tmp_path):
    """Each refused in the parser or by load_config, with exit status 2, and none loads torch, MONAI, timm or
    gradio (before this, a bad key in --config was found after torch was imported: 20+ s)."""
    (tmp_path / "bad_key.yaml").write_text("data:\n  path: x.csv\n  bogus_key: 1\n")
    (tmp_path / "bad_value.yaml").write_text("train:\n  lr: -1\n")
    (tmp_path / "bad_device.yaml").write_text("train:\n  device: gpu\n")
    (tmp_path / "auth").write_text("nocolon\n")
    out = str(tmp_path / "run")
    cases = [
        ["train", "--out", out, "--config", str(tmp_path / "bad_key.yaml")],
        ["train", "-q", "--out", out, "--config", str(tmp_path / "bad_value.yaml")],
        ["lr-find", "--config", str(tmp_path / "bad_device.yaml")],
        ["train", "--out", out, "--nonsense"],
        ["train", "--out", out, "--epochs", "two"],
        ["train", "--out", out, "--strategy", "linear-probe"],
        ["train", "--out", out, "--encoder", "resnet"],  # (the encoder registry imports no torch)
        ["predict", str(tmp_path), "x.dcm", "--device", "gpu"],
        ["evaluate", str(tmp_path), "--operating-point", "best"],
        ["serve", str(tmp_path), "--auth", "user:s3cret"],
        ["serve", str(tmp_path), "--auth-file", str(tmp_path / "auth")],
        ["nocommand"],
    ]
    run = subprocess.run(
        [sys.executable, "-c", _CHECK, json.dumps(cases)], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for argv, (code, heavy) in zip(cases, results, strict=True):
        assert code == 2 and heavy == [], (argv, code, heavy)
    assert "unknown config key 'data.bogus_key'" in run.stderr and "s3cret" not in run.stderr
    assert "unknown encoder 'resnet'; did you mean" in run.stderr
    assert "does not hold USER:PASS" in run.stderr and "nocolon" not in run.stderr
    assert not (tmp_path / "run").exists()
