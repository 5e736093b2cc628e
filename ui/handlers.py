"""The page's event handlers (:class:`Page`). Each returns a :class:`PageUpdate`, which names what it changes
on the page; :func:`medtl_ui.app.create_app` turns it into Gradio's outputs. Handlers never see Gradio."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from medtl.options import DecisionSource
from medtl.predict.predictor import Prediction, Predictor, load_run
from medtl_ui.analysis import explain_case, open_case
from medtl_ui.audit import AuditLog, outcome
from medtl_ui.case import Case, series_options, store_case_files
from medtl_ui.report import export_report
from medtl_ui.retention import remove_upload
from medtl_ui.view import (
    MODEL_WINDOW,
    header_summary,
    overlay_view,
    preset_window,
    render_view,
    slice_profile,
    window_presets,
)
from medtl_ui.words import answer_bars, case_heading, model_summary, sanity_text, trust_panel

log = logging.getLogger("medtl.ui")

START = "Upload a scan to start a case."


class _Keep:
    """The type of :data:`KEEP`."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()  # a component left as it is


@dataclass(frozen=True)
class Change:
    """New settings of a component (its value, visibility, choices, label, ...): Gradio's ``gr.update``."""

    settings: dict[str, Any] = field(default_factory=dict)


def change(**settings) -> Change:
    """A :class:`Change` of the components' settings named, e.g. ``change(value=None, visible=False)``."""
    return Change(settings)


@dataclass
class PageUpdate:
    """What a handler changes on the page, one field per component. Each holds the component's new value, a
    :class:`Change` of its settings, or :data:`KEEP` (left as it is)."""

    model_info: Any = KEEP  # the model's summary line
    model_card: Any = KEEP  # its model card (or what is known without one)
    viewer: Any = KEEP  # the windowed slice, with the map on it (#scan)
    probabilities: Any = KEEP  # the answer's bars, HTML (#probabilities; medtl_ui.words.answer_bars)
    overlay: Any = KEEP  # the model's view with its saliency map (#overlay)
    message: Any = KEEP  # the answer in words, or why there is none (#message)
    case: Any = KEEP  # the session's Case (state, not shown)
    slice: Any = KEEP  # the slice slider (#slice)
    header: Any = KEEP  # the de-identified header
    profile: Any = KEEP  # the score of each slice, a plot
    jump: Any = KEEP  # the "go to the slice the model judged" button
    sanity: Any = KEEP  # what the evaluation's check said of the map (#sanity)
    preset: Any = KEEP  # the window preset (#preset)
    level: Any = KEEP  # the window level (#level)
    width: Any = KEEP  # the window width (#width)
    case_info: Any = KEEP  # the case key and its files (#case)
    series: Any = KEEP  # the series picker (#series)
    report: Any = KEEP  # the exported report's files (#report)
    caption: Any = KEEP  # the viewer's caption (#view-caption)
    upload: Any = KEEP  # the upload box (#upload)
    export: Any = KEEP  # the export button (#export)
    finding: Any = KEEP  # multi-label: the finding whose map is shown (#finding)
    show_map: Any = KEEP  # the saliency map drawn on the viewer (off for each new case: the scan as it is)

    def changed(self) -> set[str]:
        """The names of the components this update changes."""
        return {f.name for f in fields(self) if getattr(self, f.name) is not KEEP}


def empty_page(predictor: Predictor, message: str) -> PageUpdate:
    """Every case output of the page with no case: nothing of the previous case survives."""
    none = change(choices=[], value=None, visible=False)
    return PageUpdate(
        viewer=None,
        probabilities=answer_bars(predictor, None),
        overlay=None,
        message=message,
        case=None,
        slice=change(visible=False, value=1),
        header=None,
        profile=change(value=None, visible=False),
        jump=change(visible=False),
        sanity="",
        preset=change(choices=[MODEL_WINDOW, "custom"], value=MODEL_WINDOW, interactive=True, info=""),
        level=40,
        width=400,
        case_info="",
        series=none,
        report=None,
        caption="",
        upload=change(value=None),
        export=change(interactive=False),
        finding=none,
        show_map=False,
    )


def case_page(predictor: Predictor, case: Case, message: str, alpha: float, method: str) -> PageUpdate:
    """Every case output of the page for a new case: nothing of the previous case survives, and the upload
    box is cleared (the file's name leaves the page)."""
    refused = case.refused is not None
    mapped = not refused and case.image is not None
    colour = case.scan.rgb is not None
    choices, why = window_presets(predictor, case.scan)
    level, width = (128.0, 256.0) if colour else preset_window(predictor, case.scan, MODEL_WINDOW)
    view, caption = render_view(predictor, case, case.slice_index, level, width, False, alpha)  # (show_map off)
    profile = None if refused else slice_profile(case)
    options = series_options(case.series)
    answer = answer_bars(predictor, None if refused else case.prediction["probabilities"])
    return PageUpdate(
        viewer=view,
        probabilities=answer,
        overlay=overlay_view(case, alpha),
        message=message,
        case=case,
        # numbered from 1, as the caption and the viewer's corner count them (slice_index is 0-based)
        slice=change(visible=case.n_slices > 1, minimum=1, maximum=max(case.n_slices, 2), value=case.slice_index + 1),
        header=header_summary(case.scan),
        profile=change(value=profile, visible=profile is not None),
        jump=change(visible=case.scan.is_volume and case.judged_slice and not refused),
        sanity=sanity_text(predictor, method) if mapped else "",
        preset=change(
            choices=choices or [MODEL_WINDOW, "custom"], value=MODEL_WINDOW, interactive=not colour, info=why
        ),
        level=change(value=round(level, 2), interactive=not colour),
        width=change(value=round(width, 2), interactive=not colour),
        case_info=case_heading(case),
        series=change(choices=options, value=case.series_uid, visible=len(options) > 1),
        report=None,
        caption=caption,
        upload=change(value=None),
        export=change(interactive=mapped),
        finding=finding_menu(predictor, case),
        show_map=False,
    )


def finding_menu(predictor: Predictor, case: Case) -> Change:
    """Multi-label: the menu of findings whose map can be drawn, at the one shown (hidden otherwise)."""
    answered = predictor.multi_label and case.refused is None
    target = case.target or predictor.default_target(Prediction(**case.prediction)) if answered else None
    return change(choices=predictor.class_names, visible=answered and case.image is not None, value=target)


class Page:
    """The page's handlers for the runs it serves (models loaded on first use, then kept); each handler
    takes the values of its inputs and returns a :class:`PageUpdate`."""

    def __init__(
        self,
        runs: list[Path],
        workdir: Path,
        device: str = "auto",
        decision: DecisionSource = "training",
        audit: AuditLog | None = None,
    ):
        self.runs = runs  # run folders, chosen by name on the page
        self.audit = audit or AuditLog()  # one line per action on a case (medtl_ui.audit)
        self.workdir = workdir  # the private folder of uploads and reports
        self.device = device
        self.decision = decision  # which decision the runs answer by: training's (default) or the evaluation's
        self.loaded: dict[str, Predictor] = {}

    def predictor(self, run_name: str) -> Predictor:
        """The predictor of the run named ``run_name`` (loaded once, reading files in the bounded worker)."""
        if run_name not in self.loaded:
            run = next(r for r in self.runs if r.name == run_name)
            self.loaded[run_name] = load_run(run, device=self.device, bounded=True, decision=self.decision)
        return self.loaded[run_name]

    def on_upload(self, run_name: str, case: Case | None, files, method: str, alpha: float) -> PageUpdate:
        """A new upload (or the upload box cleared): a new case, or none. The previous case has ended: its
        files are deleted."""
        if case is not None:
            remove_upload(case.path, self.workdir)
        predictor = self.predictor(run_name)
        if not files:
            return empty_page(predictor, START)
        try:
            path, names, key = store_case_files(files, self.workdir)
        except (OSError, ValueError) as e:
            log.info("upload not stored: %s", type(e).__name__)
            return empty_page(predictor, "**Cannot use this upload**: it is not a regular file.")
        if path is None:  # (a list of empty entries)
            return empty_page(predictor, START)
        case, message = open_case(predictor, path, method, files=names, key=key)
        self.audit.write(predictor.run_dir, "upload", key, outcome(case, message))
        return self._show(predictor, case, message, alpha, method)

    def on_series(self, run_name: str, case: Case | None, uid: str | None, method: str, alpha: float) -> PageUpdate:
        """Another series of the upload picked: the case again, on that series."""
        if case is None or not uid or uid == case.series_uid:
            return PageUpdate()
        predictor = self.predictor(run_name)
        new, message = open_case(predictor, case.path, method, series_uid=uid, files=case.files, key=case.key)
        self.audit.write(predictor.run_dir, "series", case.key, outcome(new, message))
        if new is None:  # that series cannot be used: keep the one shown, and say why
            return case_page(predictor, case, f"{message} The series shown before is kept.", alpha, method)
        new.series = case.series
        return case_page(predictor, new, message, alpha, method)

    def on_model(self, run_name: str, case: Case | None, method: str, alpha: float) -> PageUpdate:
        """Another model chosen: its description, and the case judged again by it."""
        predictor = self.predictor(run_name)
        if case is None:
            update = empty_page(predictor, START)
        else:
            new, message = open_case(
                predictor,
                case.path,
                method,
                files=case.files,
                key=case.key,
                series_uid=case.series_uid if case.series_chosen else None,
            )
            self.audit.write(predictor.run_dir, "model", case.key, outcome(new, message))
            update = self._show(predictor, new, message, alpha, method)
        update.model_info, update.model_card = model_summary(predictor), trust_panel(predictor)
        return update

    def on_method(
        self,
        run_name: str,
        case: Case | None,
        method: str,
        alpha: float,
        number: int,
        level: float,
        width: float,
        show_map: bool,
        finding: str | None = None,
    ) -> PageUpdate:
        """Another saliency method (or finding): only the map is recomputed, the prediction is kept. ``number``:
        the slider's slice, counted from 1."""
        predictor = self.predictor(run_name)
        if case is None or case.refused or case.image is None:
            return PageUpdate(overlay=None, case=case, sanity="", caption="")
        if finding and finding in predictor.class_names:
            case.target = finding
        explain_case(predictor, case, method)
        if case.image is None:
            return PageUpdate(overlay=None, case=case, sanity="", caption="")
        view, caption = render_view(predictor, case, int(number) - 1, level, width, show_map, alpha)
        return PageUpdate(
            overlay=overlay_view(case, alpha),
            case=case,
            sanity=sanity_text(predictor, method),
            viewer=view,
            caption=caption,
        )

    def on_finding(
        self,
        run_name: str,
        case: Case | None,
        finding: str,
        method: str,
        alpha: float,
        number: int,
        level: float,
        width: float,
        show_map: bool,
    ) -> PageUpdate:
        """Multi-label: the map of another finding (the prediction is kept)."""
        return self.on_method(run_name, case, method, alpha, number, level, width, show_map, finding)

    def on_view(
        self, run_name: str, case: Case | None, number: int, level: float, width: float, show_map: bool, alpha: float
    ) -> PageUpdate:
        """The viewer at another slice (``number``, counted from 1), window, opacity, or with the map shown or
        hidden."""
        view, caption = render_view(self.predictor(run_name), case, int(number) - 1, level, width, show_map, alpha)
        return PageUpdate(viewer=view, caption=caption)

    def on_preset(self, run_name: str, case: Case | None, preset: str) -> PageUpdate:
        """A window preset chosen: its level and width ("custom" leaves them)."""
        predictor = self.predictor(run_name)
        if case is None or preset == "custom" or preset not in window_presets(predictor, case.scan)[0]:
            return PageUpdate()
        level, width = preset_window(predictor, case.scan, preset)
        return PageUpdate(level=round(level, 2), width=round(width, 2))

    def on_alpha(self, case: Case | None, alpha: float) -> PageUpdate:
        """The overlay at another opacity."""
        return PageUpdate(overlay=None if case is None else overlay_view(case, alpha))

    def on_jump(self, case: Case | None) -> PageUpdate:
        """The slider back at the slice the model judged."""
        return PageUpdate(slice=case.slice_index + 1 if case else 1)

    def on_export(self, run_name: str, case: Case | None, alpha: float) -> PageUpdate:
        """The case's one-page report (PDF and PNG); none without an answered case."""
        predictor = self.predictor(run_name)
        report = export_report(predictor, case, self.workdir, alpha) or None
        if report:
            self.audit.write(predictor.run_dir, "export", case.key, "report written")
        return PageUpdate(report=report)

    @staticmethod
    def _show(predictor: Predictor, case: Case | None, message: str, alpha: float, method: str) -> PageUpdate:
        return empty_page(predictor, message) if case is None else case_page(predictor, case, message, alpha, method)
