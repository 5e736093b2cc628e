"""Phases of a long job: each logged as it starts, with the time so far and an estimate of the time left."""

import logging

import pytest

from medtl.progress import Phases


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_the_estimate_scales_the_expected_costs_by_the_time_taken(caplog):
    clock = Clock()
    phases = Phases([("read", 1), ("fit", 4), ("skipped", 10), ("write", 1)], logging.getLogger("t"), "job", clock)
    with caplog.at_level(logging.INFO, logger="t"):
        phases.start("read")
        assert phases.remaining() is None  # nothing has finished: no estimate yet
        clock.t += 2.0  # 2 s for a phase of weight 1
        phases.start("fit", "5 epochs")
        assert phases.remaining() == pytest.approx(2.0 * (4 + 10 + 1))
        clock.t += 4.0  # faster than expected: 1 s per weight
        phases.skip("skipped")
        assert phases.remaining() == pytest.approx(6.0 / 5 * 1)
        phases.start("write")
        clock.t += 1.0
        assert phases.finish() == pytest.approx(7.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "job [1/4] read (0 s so far)"
    assert lines[1] == "job [2/4] fit: 5 epochs (2 s so far, about 30 s left)"
    assert lines[2] == "job [4/4] write (6 s so far, about 1 s left)"
    assert lines[3] == "job done in 7 s"


def test_long_times_read_in_minutes_and_hours(caplog):
    clock = Clock()
    phases = Phases([("a", 1), ("b", 60)], logging.getLogger("t"), clock=clock)
    with caplog.at_level(logging.INFO, logger="t"):
        phases.start("a")
        clock.t += 150
        phases.start("b")
    assert caplog.records[-1].getMessage() == "[2/2] b (2.5 min so far, about 2.5 h left)"


def test_steps_log_at_most_every_so_often_with_the_time_left(caplog):
    from medtl.progress import Steps

    clock = Clock()
    steps = Steps("features", 10, logging.getLogger("t"), "inputs", every=5.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="t"):
        for _ in range(10):
            clock.t += 2.0  # 2 s a step: a line every third step, and one at the end
            steps.advance()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "features: 3/10 inputs (6 s, about 14 s left)",
        "features: 6/10 inputs (12 s, about 8 s left)",
        "features: 9/10 inputs (18 s, about 2 s left)",
        "features: 10/10 inputs (20 s)",
    ]
    quick = Steps("decoding", 10, logging.getLogger("t"), "files", every=5.0, clock=clock)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="t"):
        for _ in range(10):
            clock.t += 0.4  # 4 s in all, under one interval: no line
            quick.advance()
    assert caplog.records == []


def warning_from(text: str, filename: str) -> None:
    """A warning raised from code in ``filename``."""
    import warnings

    code = compile(f"warnings.warn({text!r}, UserWarning)", filename, "exec")
    exec(code, {"warnings": warnings})


@pytest.mark.parametrize("verbose", [False, True])
def test_the_log_file_gets_debug_lines_and_warnings_the_terminal_only_what_it_asked_for(tmp_path, verbose):
    import io
    from pathlib import Path

    import medtl
    from medtl.progress import log_to_file

    root, terminal = logging.getLogger(), io.StringIO()
    handler = logging.StreamHandler(terminal)  # the terminal, as medtl's setup_logging makes it
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        with log_to_file(tmp_path / "train.log"):
            logging.getLogger("medtl.train").info("epoch 1/2")
            logging.getLogger("medtl.data").debug("inputs stored in memory")
            warning_from("a library's deprecation notice", "/site-packages/somelib/core.py")
            warning_from("medtl's own warning", str(Path(medtl.__file__).parent / "train" / "data.py"))
        logging.getLogger("medtl.train").info("after the run")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    log = (tmp_path / "train.log").read_text()
    shown = terminal.getvalue()
    assert "INFO    medtl.train: epoch 1/2" in log and log[:4].isdigit()  # timestamped
    assert "DEBUG   medtl.data: inputs stored in memory" in log
    assert "a library's deprecation notice" in log
    assert "after the run" not in log  # (only while the block ran)
    assert "epoch 1/2" in shown and "after the run" in shown
    assert ("inputs stored in memory" in shown) == verbose
    assert ("a library's deprecation notice" in shown) == verbose
    assert "medtl's own warning" in shown and "medtl's own warning" in log
    assert handler.level == logging.NOTSET and not handler.filters  # put back as it was
