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
