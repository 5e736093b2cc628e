"""``medtl evaluate``: test metrics with confidence intervals, calibration, saliency sanity checks, a report.

The handler imports the evaluation code (torch) when it runs, not at the top of the module, so that
``medtl --help`` stays light: the command line's one exception to "imports at the top of the module".
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from medtl.cli.common import OptionError, add_device, one_of
from medtl.options import SALIENCY_METHODS

OPERATING_POINTS = "'youden', 'sensitivity:X' or 'specificity:X' with 0 < X <= 1"


def add_parser(sub) -> None:
    """``evaluate`` on ``sub`` (the ``medtl`` parser's sub-commands)."""
    s = sub.add_parser("evaluate", help="test metrics with CIs, calibration, saliency sanity checks, report.html")
    s.add_argument("run", type=Path)
    s.add_argument("--data", help="evaluate on this data set instead of the run's own test split")
    s.add_argument("--boot", type=int, default=1000, help="bootstrap resamples (patients) for the CIs")
    s.add_argument(
        "--operating-point",
        type=operating_point,
        default="youden",
        metavar="{youden,sensitivity:X,specificity:X}",
        help="the decision threshold's rule on validation data, e.g. sensitivity:0.9",
    )
    s.add_argument(
        "--methods",
        type=saliency_methods,
        help="comma-separated saliency methods whose maps are checked, or 'all' "
        f"({','.join(SALIENCY_METHODS)}); default: gradcam, gradcampp and the run's own method (occlusion and "
        "integrated_gradients take about a minute each on 2 cores)",
    )
    s.add_argument(
        "--foreign",
        nargs="+",
        metavar="FILE",
        help="files unlike the training data (other modalities, body parts, photographs): report the "
        "out-of-distribution detector's AUROC against the test studies",
    )
    s.add_argument(
        "--data-randomisation",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also retrain the model on shuffled labels for the saliency data randomisation test (minutes; "
        "default: not run, and the report says so)",
    )
    add_device(s)
    s.set_defaults(fn=cmd_evaluate)


def operating_point(value: str) -> str:
    """An argparse ``type``: an operating-point rule of :func:`medtl.metrics.choose_threshold`, checked before
    torch is imported."""
    m = re.fullmatch(r"(sensitivity|specificity):(\d*\.?\d+)", value)
    if value == "youden" or (m and 0 < float(m[2]) <= 1):
        return value
    raise OptionError(f"unknown operating point {value!r} (expected {OPERATING_POINTS})")


def saliency_methods(value: str) -> tuple[str, ...]:
    """An argparse ``type``: comma-separated saliency methods, or ``all``; each checked as ``--method`` is."""
    names = tuple(m.strip() for m in value.split(",") if m.strip())
    if names == ("all",):
        return SALIENCY_METHODS
    check = one_of(SALIENCY_METHODS, "saliency method")
    return tuple(dict.fromkeys(check(name) for name in names))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medtl.eval.evaluate import evaluate_run
    from medtl.run import RunDir

    result = evaluate_run(
        args.run,
        data=args.data,
        n_boot=args.boot,
        operating_point=args.operating_point,
        methods=args.methods or None,  # None: the default for the run (medtl.eval.evaluate.sanity_methods)
        data_randomisation=args.data_randomisation,
        device=args.device,
        foreign=args.foreign,
    )
    _print_summary(args.run, result)
    _print_per_label(result.get("per_label") or {})
    op = result.get("operating_point")
    if op:
        print(
            f"operating point ({op['rule']}): threshold {_number(op['threshold'])} on the probability of "
            f"{op.get('positive', 'the second class')}, sensitivity {_number(op.get('sensitivity'))}, specificity "
            f"{_number(op.get('specificity'))} on the test set"
        )
    for s in result["saliency_sanity"]:
        print(f"  {s['method']:22s} {s['verdict']}")
    scope = result.get("saliency_sanity_scope", {})
    if scope.get("not_checked"):
        print(f"  not checked: {', '.join(scope['not_checked'])} (medtl evaluate --methods all)")
    if scope.get("data_randomisation", "run") != "run":
        print(f"  data randomisation test {scope['data_randomisation']}")
    print(f"report: {RunDir(args.run).evaluation / RunDir.REPORT}")
    return 0


def _number(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _ci(ci: list[float] | None) -> str:
    return f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""


def _print_summary(run: Path, result: dict) -> None:
    """The test AUC, the calibration and the out-of-distribution check."""
    auc, calibration = result["auc"], result["calibration"]
    print(
        f"{run}: test AUC {auc['auc']:.3f}"
        + _ci(auc["auc_ci"])
        + f"; ECE {calibration['test_ece_before']:.3f} -> {calibration['test_ece_after']:.3f} "
        f"(T = {calibration['temperature']:.2f})"
    )
    ood = result.get("ood", {})
    if ood.get("auroc") is not None:
        print(
            f"out-of-distribution: AUROC {ood['auroc']:.3f} ({ood['n_in']} test studies vs {ood['n_foreign']} "
            f"foreign files); refused {ood['foreign_refused']:.0%} of the foreign files and "
            f"{ood['in_refused_by_content']:.0%} of the test studies"
        )


def _print_per_label(per_label: dict) -> None:
    """Multi-label: each finding at its own threshold."""
    for name, row in per_label.items():
        print(
            f"  {name}: AUC {_number(row.get('auc'))}"
            + _ci(row.get("auc_ci"))
            + f", threshold {_number(row['threshold'])}, sensitivity {_number(row.get('sensitivity'))}, specificity "
            f"{_number(row.get('specificity'))}"
        )
