"""The speed and load scripts run end to end on tiny data: benchmark.py --quick and ui_load_check.py."""

import json
import math
import re
import statistics

import pytest

from tests.pipelines import load_pipeline

# the figures benchmark.py's docstring promises, section by section
IO = [
    "io_2d_files",
    "io_2d_medtl_img_per_s",
    "io_2d_medtl_cached_img_per_s",
    "io_2d_plain_monai_img_per_s",
    "io_series_slices",
    "io_series_medtl_slices_per_s",
    "io_series_plain_monai_slices_per_s",
]
TRAIN = [
    "plain_train_img_per_s",
    "best_raw_train_img_per_s",
    "best_raw_train_config",
    "train_img_per_s",
    "speedup",
    "train_vs_best_raw",
    "paired_best_raw_train_img_per_s",
    "train_vs_best_raw_best_of",
    "step_read_ms",
    "step_augment_ms",
    "step_layout_ms",
    "step_outside_computation_share",
    "train_precision",
    "train_images",
    "train_vs_raw_fp32",
    "train_vs_raw_bf16",
    "contended_slowdown",
    "contended_slowdown_fixed_threads",
]
PROBE = ["probe_seconds_cached", "probe_seconds_uncached", "probe_speedup"]
EVALUATE = ["evaluate_seconds", "evaluate_all_checks_seconds", "evaluate_speedup"]
INFER = ["infer_image_predict_ms", "infer_image_explain_ms", "infer_volume100_predict_s", "infer_volume100_explain_s"]
SECTIONS = {"io": IO, "train": TRAIN, "probe": PROBE, "infer": INFER, "evaluate": EVALUATE}


def _printed(out: str) -> dict:
    """The ``name value`` lines the script prints."""
    return dict(m.groups() for m in re.finditer(r"^(\w+)\s+(\S+)$", out, re.M))


def _bench(tmp_path, capsys, sections: str) -> tuple[dict, dict, str]:
    """benchmark.py --quick for some sections: (JSON figures, printed figures, output)."""
    mod = load_pipeline("benchmark")
    result = tmp_path / "bench.json"
    assert mod.main(["--quick", "--sections", sections, "--json", str(result)]) == 0
    out = capsys.readouterr().out
    figures = json.loads(result.read_text())
    printed = _printed(out)
    assert figures["quick"] is True
    for section in sections.split(","):
        assert f"[{section}: " in out
        for key in SECTIONS[section] + ["peak_rss_mib"]:
            assert key in figures, key
            assert key in printed, f"{key} not printed"
            if isinstance(figures[key], float):
                assert math.isfinite(figures[key]) and figures[key] > 0, (key, figures[key])
                assert float(printed[key]) == pytest.approx(figures[key], abs=0.51 if key == "peak_rss_mib" else 0.006)
    return figures, printed, out


@pytest.mark.timeout(200)
def test_benchmark_quick_io_probe_infer(tmp_path, capsys):
    figures, _, out = _bench(tmp_path, capsys, "io,probe,infer")
    assert "[train: " not in out and "speedup" not in figures  # only the sections asked for
    # each ratio is against the baseline measured in the same run
    assert figures["probe_speedup"] == pytest.approx(
        figures["probe_seconds_uncached"] / figures["probe_seconds_cached"]
    )
    # --quick's small settings, reported as such
    assert figures["io_series_slices"] == 20 and figures["probe_epochs"] == 2
    assert figures["io_2d_files"] == 24
    assert figures["infer_volume100_explain_s"] > 0 and figures["infer_image_explain_ms"] > 0


@pytest.mark.slow  # 2-3 minutes on 2 busy cores: the training steps dominate, even at --quick's size
@pytest.mark.timeout(600)
def test_benchmark_quick_train_ratios(tmp_path, capsys):
    figures, _, _ = _bench(tmp_path, capsys, "train")
    assert figures["speedup"] == pytest.approx(figures["train_img_per_s"] / figures["plain_train_img_per_s"])
    # the headline ratio: per timed epoch, medtl's loop over the raw step timed either side of it, the median
    assert figures["train_vs_best_raw"] == pytest.approx(statistics.median(figures["train_vs_best_raw_epochs"]))
    assert len(figures["train_vs_best_raw_epochs"]) == figures["train_timed_epochs"]
    # the raw step beside the loop: the best configuration and channels-last in each native precision
    assert f"beside_raw_{figures['best_raw_train_config']}_img_per_s" in figures
    assert "beside_raw_fp32_channels_last_img_per_s" in figures and "train_vs_raw_same_precision" in figures
    for p in ("fp32", "bf16"):
        assert figures[f"train_vs_raw_{p}"] == pytest.approx(statistics.median(figures[f"train_vs_raw_{p}_epochs"]))
    # the best raw configuration is the fastest of those measured, and none was compiled (--quick)
    raw = {k: v for k, v in figures.items() if k.startswith("raw_") and k.endswith("_img_per_s")}
    assert raw and not any("compiled" in k for k in raw)
    assert f"raw_{figures['best_raw_train_config']}_img_per_s" in raw
    assert figures["best_raw_train_img_per_s"] >= max(raw.values()) * (1 - 1e-9)
    assert figures["train_input_px"] == 64 and figures["train_batch_size"] == 4
    assert figures["train_timed_epochs"] == 1
    # beside a competing process: the fitted threads leave it a core (on more than one usable core)
    assert figures["contended_slowdown"] == pytest.approx(
        figures["train_eager_img_per_s"] / figures["contended_fitted_img_per_s"]
    )
    if figures["contended_fixed_threads_threads"] > 1:
        assert figures["contended_fitted_threads"] < figures["contended_fixed_threads_threads"]


@pytest.mark.slow  # trains a small run, then runs `medtl evaluate` twice (once with every check)
@pytest.mark.timeout(600)
def test_benchmark_quick_evaluate(tmp_path, capsys):
    figures, _, _ = _bench(tmp_path, capsys, "evaluate")
    assert figures["evaluate_speedup"] == pytest.approx(
        figures["evaluate_all_checks_seconds"] / figures["evaluate_seconds"]
    )


def test_loop_ratios_pair_each_epoch_with_the_raw_steps_either_side():
    """Timed epoch i lies between raw measurements i and i + 1; their mean time (harmonic mean) is its baseline,
    and the headline's baseline is the fastest configuration at that moment."""
    mod = load_pipeline("benchmark")
    fp32, bf16 = [10.0, 10.0, 30.0, 12.0], [12.0, 12.0, 8.0, 24.0]
    run = mod.LoopRun(
        loop=[10.0, 20.0, 12.0], raw={"fp32_channels_last": fp32, "bf16_channels_last": bf16}, precision="fp32"
    )
    own = [10.0, 15.0, 2 / (1 / 30 + 1 / 12)]
    assert run.beside("fp32_channels_last") == pytest.approx(own)
    assert run.beside("bf16_channels_last") == pytest.approx([12.0, 2 / (1 / 12 + 1 / 8), 12.0])
    assert run.ratios("fp32_channels_last") == pytest.approx([10 / 10, 20 / 15, 12 / own[2]])
    assert run.ratios() == pytest.approx([10 / 12, 20 / 15, 12 / own[2]])  # the faster of the two at each epoch
    figures = run.figures("loop", "raw", "ratio")
    assert figures["loop"] == 12.0 and figures["raw"] == pytest.approx(15.0)  # the median of 12, 15 and 17.1
    assert figures["ratio"] == pytest.approx(statistics.median(run.ratios()))


def test_benchmark_rejects_what_it_cannot_measure(capsys):
    mod = load_pipeline("benchmark")
    with pytest.raises(SystemExit):
        mod.main(["--quick", "--epochs", "1"])  # the only epoch would be the untimed warm-up
    assert "at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mod.main(["--sections", "io,gpu"])
    assert "unknown section(s) gpu" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_ui_load_check_reports_no_errors_and_latencies(tiny_run, sample_dir, capsys):
    mod = load_pipeline("ui_load_check")
    code = mod.main([str(tiny_run), str(sample_dir / "dicom" / "img_0001.dcm"), "--users", "2", "--requests", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 users x 2 requests = 4 requests in" in out
    assert re.search(r"^errors: 0$", out, re.M), out
    m = re.search(r"latency p50 ([\d.]+) s, p95 ([\d.]+) s, max ([\d.]+) s", out)
    assert m, out
    p50, p95, worst = map(float, m.groups())
    assert 0 < p50 <= p95 <= worst < 120


@pytest.mark.timeout(300)
def test_ui_load_check_counts_refused_uploads_as_errors(tiny_run, tmp_path, capsys):
    bad = tmp_path / "broken.dcm"
    bad.write_text("not a scan")
    mod = load_pipeline("ui_load_check")
    code = mod.main([str(tiny_run), str(bad), "--users", "1", "--requests", "1"])
    out = capsys.readouterr().out
    assert code == 1
    assert re.search(r"^errors: 1 \(first: unexpected message: \*\*Cannot use this file\*\*", out, re.M), out
