"""Gradio app: one case at a time. Upload a DICOM (file, several files of one series, or a zip of a
study), NIfTI or PNG/JPEG; read it in a viewer (window/level drag, zoom, pan, wheel through slices,
the saliency map on the slice); see the model's answer in plain words, or why it refuses to answer;
export a one-page report (PDF and PNG) under a case key that is not a patient identifier.

Safe defaults: bound to 127.0.0.1, no share link, no analytics, bounded upload size, uploads moved to
random names in a private folder (removed on exit, SIGTERM and SIGINT), failed logins locked out with a
growing delay, every file parsed in a bounded child process, and no patient identifier or stack trace
ever reaches the page or the log. The app calls only the ``medtl`` API.

The package, from the bottom: :mod:`~medtl_ui.case` (a case and its stored upload),
:mod:`~medtl_ui.words` (results in words), :mod:`~medtl_ui.analysis` (a case read, judged, explained),
:mod:`~medtl_ui.view` (what the viewer draws), :mod:`~medtl_ui.report` (the case report),
:mod:`~medtl_ui.handlers` (the events' handlers, each returning a :class:`~medtl_ui.handlers.PageUpdate`),
and this module: the page's layout, its wiring, and :func:`launch`.
"""

from __future__ import annotations

import functools
import inspect
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medtl.errors import MedtlError
from medtl.options import SALIENCY_METHODS, DecisionSource
from medtl.predict.predictor import Predictor
from medtl.predict.refusal import input_refusal
from medtl.run import RunDir
from medtl_ui.analysis import explain_case, open_case
from medtl_ui.audit import USER, AuditLog
from medtl_ui.case import Case
from medtl_ui.handlers import KEEP, START, Change, Page, PageUpdate
from medtl_ui.report import export_report
from medtl_ui.retention import RETENTION_S, remove_upload, start_sweeper
from medtl_ui.safety import LoginThrottle, client_middleware, install_cleanup
from medtl_ui.view import MODEL_WINDOW, header_summary, run_case
from medtl_ui.viewer import VIEWER_HEAD, VIEWER_HELP
from medtl_ui.words import answer_bars, decision_text, method_name, model_summary, trust_panel

# launch and create_app, and (for the scripts and tests that import them from here) a case's main calls
__all__ = [
    "launch",
    "create_app",
    "find_runs",
    "open_case",
    "explain_case",
    "decision_text",
    "run_case",
    "header_summary",
    "export_report",
]

NOTICE = (
    "**Research software — not for diagnostic use.** The model answers only for images like those it "
    "was trained on, and says so when an image is not; read its model card before trusting any answer."
)
MAX_FILE_SIZE = "200mb"

# The components each kind of event changes, in the order Gradio gets them (PageUpdate's field names). The
# page's API (gradio_client) returns them in this order, less the case state.
CASE_OUTPUTS = (
    "viewer",
    "probabilities",
    "overlay",
    "message",
    "case",
    "slice",
    "header",
    "profile",
    "jump",
    "sanity",
    "preset",
    "level",
    "width",
    "case_info",
    "series",
    "report",
    "caption",
    "upload",
    "export",
    "finding",
    "show_map",
)
MODEL_OUTPUTS = ("model_info", "model_card", *CASE_OUTPUTS)
MAP_OUTPUTS = ("overlay", "case", "sanity", "viewer", "caption")


def find_runs(path: str | Path) -> list[Path]:
    """A run folder itself, or the run folders (holding config.yaml + model.safetensors) inside it."""
    path = Path(path)
    if (path / RunDir.CONFIG).is_file():
        return [path]
    runs = sorted(p.parent for p in path.glob(f"*/{RunDir.MODEL}") if (p.parent / RunDir.CONFIG).is_file())
    if not runs:
        raise MedtlError(f"{path}: no medtl run found (a run folder holds {RunDir.CONFIG} and {RunDir.MODEL})")
    return runs


def gradio_outputs(update: PageUpdate, names: tuple[str, ...]):
    """Gradio's return value for an event whose outputs are the components ``names``: their values in that
    order (one value for one output); a :class:`~medtl_ui.handlers.Change` becomes ``gr.update(...)``, and
    :data:`~medtl_ui.handlers.KEEP` an empty one."""
    import gradio as gr  # heavy optional dependency: imported only once the page is built

    stray = update.changed() - set(names)
    if stray:
        raise ValueError(f"the handler changed {sorted(stray)}, which are not outputs of its event {names}")
    values = [getattr(update, name) for name in names]
    values = [gr.update() if v is KEEP else gr.update(**v.settings) if isinstance(v, Change) else v for v in values]
    return values[0] if len(values) == 1 else tuple(values)


def gradio_handler(handler: Callable[..., PageUpdate], outputs: tuple[str, ...]) -> Callable:
    """``handler`` as Gradio calls it: the same parameters (Gradio reads them) and Gradio's request (its signed-in
    user is the audit log's, :data:`medtl_ui.audit.USER`), Gradio's outputs returned."""
    import gradio as gr  # heavy optional dependency (see create_app)

    def handle(*args, request: gr.Request | None = None):
        token = USER.set(str(getattr(request, "username", None) or "-"))
        try:
            return gradio_outputs(handler(*args), outputs)
        finally:
            USER.reset(token)

    sig = inspect.signature(handler)
    request = inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=gr.Request)
    handle.__signature__ = sig.replace(parameters=[*sig.parameters.values(), request])  # type: ignore[attr-defined]
    handle.__annotations__ = {"request": gr.Request}  # (a class, not a string: Gradio resolves it)
    handle.__name__, handle.__doc__ = handler.__name__, handler.__doc__
    return handle


def create_app(
    run: str | Path,
    workdir: Path | None = None,
    device: str = "auto",
    decision: DecisionSource = "training",
    retention_s: float = RETENTION_S,
    audit_dir: str | Path | None = None,
):
    """Build the Gradio Blocks app for a run folder (or a folder of runs); models run on ``device`` and answer by
    the ``decision`` chosen in training (default) or by ``medtl evaluate``. A case's files are deleted when the
    case ends, or after ``retention_s`` seconds (its session state is dropped then too). Each action on a case
    is logged to ``audit.log`` in the run's folder, or in ``audit_dir``."""
    import gradio as gr  # heavy optional dependency: imported only when the page is built

    runs = find_runs(run)
    page = Page(runs, workdir or Path(tempfile.mkdtemp(prefix="medtl-ui-")), device, decision, AuditLog(audit_dir))
    first = page.predictor(runs[0].name)
    with gr.Blocks(title="medtl", analytics_enabled=False) as demo:
        ui = _top(runs, first, page, retention_s)  # the components by name, in the page's order, top to bottom
        ui.update(_case_view(first))
        ui.update(_bottom(first))
        _wire(ui, page)
        examples = _examples(first)
        if examples:
            upload = gradio_handler(
                lambda files: page.on_upload(runs[0].name, None, files, "gradcam", 0.45), CASE_OUTPUTS
            )
            gr.Examples(
                [[[str(e)]] for e in examples],
                inputs=[ui["upload"]],
                outputs=_components(ui, CASE_OUTPUTS),
                fn=upload,
                run_on_click=True,
                label="Examples from sample_data",
            )
    demo.queue(max_size=16, default_concurrency_limit=max(1, (os.cpu_count() or 2) // 2))
    return demo


def _top(runs: list[Path], first: Predictor, page: Page, retention_s: float) -> dict[str, Any]:
    """The title, the notice, the model's choice and summary, the upload, the map's settings, the case's
    heading, the series picker and the message (and the case's state)."""
    import gradio as gr  # heavy optional dependency (see create_app)

    def ended(case: Case | None) -> None:  # the session closed, or the case outlived the retention time
        if case is not None:
            remove_upload(case.path, page.workdir)

    ui: dict[str, Any] = {"case": gr.State(None, time_to_live=retention_s, delete_callback=ended)}
    gr.Markdown("# medtl — scan classification with saliency")
    gr.Markdown(NOTICE)
    with gr.Row():
        ui["model"] = gr.Dropdown(
            [r.name for r in runs], value=runs[0].name, label="Model (run)", interactive=len(runs) > 1
        )
        ui["model_info"] = gr.Markdown(model_summary(first), elem_id="model-info")
    with gr.Row():
        ui["upload"] = gr.File(
            label="New case: a DICOM file, several files of one series, a .zip of a study, a NIfTI or a PNG/JPEG",
            type="filepath",
            file_count="multiple",
            elem_id="upload",
        )
        with gr.Column():
            ui["method"] = gr.Dropdown(
                [(method_name(m), m) for m in SALIENCY_METHODS], value="gradcam", label="Saliency method"
            )
            ui["finding"] = gr.Dropdown([], label="Saliency map of the finding", visible=False, elem_id="finding")
            ui["alpha"] = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Overlay opacity")
            # off: the scan is read as it is; the map is beside it (and on the viewer when asked)
            ui["show_map"] = gr.Checkbox(value=False, label="Show the saliency map on the viewer", elem_id="show-map")
    ui["case_info"] = gr.Markdown("", elem_id="case")
    ui["series"] = gr.Dropdown([], label="Series", visible=False, elem_id="series")
    ui["message"] = gr.Markdown(START, elem_id="message")
    return ui


def _case_view(first: Predictor) -> dict[str, Any]:
    """The viewer with its slice and window controls; beside it the answer, the model's view with its map,
    the map's check and the score of each slice."""
    import gradio as gr  # heavy optional dependency (see create_app)

    ui: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown(VIEWER_HELP)
            ui["viewer"] = gr.Image(
                label="Viewer", type="numpy", elem_id="scan", interactive=False, height=480, buttons=["fullscreen"]
            )
            ui["caption"] = gr.Markdown("", elem_id="view-caption")
            # the server checks values against the maximum it was built with, not the case's: a wide one
            ui["slice"] = gr.Slider(1, 4096, value=1, step=1, label="Slice", visible=False, elem_id="slice")
            with gr.Row():
                ui["preset"] = gr.Dropdown(
                    [MODEL_WINDOW, "custom"], value=MODEL_WINDOW, label="Window", elem_id="preset"
                )
                ui["level"] = gr.Number(value=40, label="Level", elem_id="level")
                ui["width"] = gr.Number(value=400, label="Width", minimum=1e-6, elem_id="width")
        with gr.Column(scale=2):
            ui["probabilities"] = gr.HTML(answer_bars(first, None), elem_id="probabilities")
            ui["overlay"] = gr.Image(
                label="Model's view with its saliency map",
                type="numpy",
                elem_id="overlay",
                interactive=False,
                height=300,
                buttons=["fullscreen", "download"],
            )
            ui["sanity"] = gr.Markdown("", elem_id="sanity")
            ui["profile"] = gr.Image(label="Score of each slice", type="numpy", interactive=False, visible=False)
            ui["jump"] = gr.Button("Go to the slice the model judged", visible=False)
    return ui


def _bottom(first: Predictor) -> dict[str, Any]:
    """The de-identified header, the report's export and the model card."""
    import gradio as gr  # heavy optional dependency (see create_app)

    ui: dict[str, Any] = {"header": gr.JSON(label="Header (de-identified)", elem_id="header")}
    with gr.Row():
        ui["export"] = gr.Button("Export one-page report (PDF and PNG)", elem_id="export", interactive=False)
        ui["report"] = gr.File(
            label="Report (Export creates it)", interactive=False, file_count="multiple", elem_id="report"
        )
    with gr.Accordion("Model card", open=False):
        ui["model_card"] = gr.Markdown(trust_panel(first))
    return ui


def _components(ui: dict[str, Any], names: tuple[str, ...]):
    """The components named: one component for one name, else a list (as the page's events take them)."""
    return ui[names[0]] if len(names) == 1 else [ui[n] for n in names]


# an event of the page: (listener, handler, inputs, outputs, options), as _wire connects it
Event = tuple[Callable, Callable[..., PageUpdate], tuple[str, ...], tuple[str, ...], dict[str, Any]]


def _wire(ui: dict[str, Any], page: Page) -> None:
    """Every event of the page: (listener, handler, inputs, outputs, options), each output named as in
    :class:`~medtl_ui.handlers.PageUpdate`."""
    import gradio as gr  # heavy optional dependency (see create_app)

    queued = {"concurrency_limit": 2}
    events = _case_events(ui, page, queued) + _view_events(ui, page, queued)
    for listen, handler, inputs, outputs, options in events:
        listen(gradio_handler(handler, outputs), _components(ui, inputs), _components(ui, outputs), **options)
    # a window dragged or typed on the page is no preset any more
    gr.on([ui["level"].input, ui["width"].input], lambda: "custom", None, ui["preset"], api_name=False)


def _case_events(ui: dict[str, Any], page: Page, queued: dict[str, Any]) -> list[Event]:
    """The events that open a case or a model: an upload, its clearing, a series chosen, a model chosen."""
    return [
        (
            ui["upload"].upload,
            page.on_upload,
            ("model", "case", "upload", "method", "alpha"),
            CASE_OUTPUTS,
            {**queued, "api_name": "on_upload"},
        ),
        (
            ui["upload"].clear,
            page.on_upload,
            ("model", "case", "upload", "method", "alpha"),
            CASE_OUTPUTS,
            {"api_name": "on_clear"},
        ),
        (
            ui["series"].input,
            page.on_series,
            ("model", "case", "series", "method", "alpha"),
            CASE_OUTPUTS,
            {**queued, "api_name": "on_series"},
        ),
        (
            ui["model"].change,
            page.on_model,
            ("model", "case", "method", "alpha"),
            MODEL_OUTPUTS,
            {**queued, "api_name": "on_model"},
        ),
    ]


def _view_events(ui: dict[str, Any], page: Page, queued: dict[str, Any]) -> list[Event]:
    """The events that change the view of the open case: the map's method and finding, the viewer's settings,
    the window preset, the overlay's opacity, the jump to the judged slice and the report's export."""
    import gradio as gr  # heavy optional dependency (see create_app)

    view_changes = [ui[n].change for n in ("slice", "level", "width", "show_map", "alpha")]
    return [
        (
            ui["method"].change,
            page.on_method,
            ("model", "case", "method", "alpha", "slice", "level", "width", "show_map"),
            MAP_OUTPUTS,
            {**queued, "api_name": "on_method"},
        ),
        (
            ui["finding"].input,
            page.on_finding,
            ("model", "case", "finding", "method", "alpha", "slice", "level", "width", "show_map"),
            MAP_OUTPUTS,
            {**queued, "api_name": "on_finding"},
        ),
        (
            functools.partial(gr.on, view_changes),
            page.on_view,
            ("model", "case", "slice", "level", "width", "show_map", "alpha"),
            ("viewer", "caption"),
            {"show_progress": "hidden", "api_name": "on_view"},
        ),
        (
            ui["preset"].input,
            page.on_preset,
            ("model", "case", "preset"),
            ("level", "width"),
            {"api_name": "on_preset"},
        ),
        (
            ui["alpha"].change,
            page.on_alpha,
            ("case", "alpha"),
            ("overlay",),
            {"show_progress": "hidden", "api_name": "on_alpha"},
        ),
        (ui["jump"].click, page.on_jump, ("case",), ("slice",), {"api_name": "jump"}),
        (ui["export"].click, page.on_export, ("model", "case", "alpha"), ("report",), {"api_name": "export"}),
    ]


def _examples(predictor: Predictor, root: Path | None = None) -> list[Path]:
    """The sample files offered as examples, where ``sample_data/`` (``root``) is beside the package: those the
    model would not refuse from their header (a CT example is not offered by an ultrasound model)."""
    root = root or Path(__file__).resolve().parents[1] / "sample_data"
    found = [
        p
        for p in (root / "dicom" / "img_0003.dcm", root / "dicom" / "img_0001.dcm", root / "nifti" / "vol_001.nii.gz")
        if p.is_file()
    ]
    offered = []
    for p in found:
        try:
            if input_refusal(predictor.input_record or {}, predictor.read(p)) is None:
                offered.append(p)
        except MedtlError:
            continue
    return offered


def launch(
    run: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: str | LoginThrottle | None = None,
    prevent_thread_lock: bool = False,
    max_file_size: str = MAX_FILE_SIZE,
    device: str = "auto",
    decision: DecisionSource = "training",
    retention_s: float = RETENTION_S,
    audit_dir: str | Path | None = None,
):
    """Serve the app with safe defaults (loopback, no share link, bounded uploads, private upload folder
    removed on exit and on SIGTERM/SIGINT, each upload deleted when its case ends or after ``retention_s``
    seconds, failed logins locked out with a growing delay).

    ``auth`` is ``"USER:PASS"`` (default lock-out delays) or a configured :class:`LoginThrottle`."""
    throttle = auth if isinstance(auth, LoginThrottle) else None
    if isinstance(auth, str) and auth:  # checked before anything is set up
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise MedtlError("--auth must be USER:PASS")
        throttle = LoginThrottle(user, password)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    workdir = Path(tempfile.mkdtemp(prefix="medtl-ui-"))  # mode 0700: only this user reads the uploads
    os.environ["GRADIO_TEMP_DIR"] = str(workdir)
    install_cleanup(workdir)
    start_sweeper(workdir, retention_s, every_s=min(60.0, retention_s / 4))
    demo = create_app(run, workdir, device=device, decision=decision, retention_s=retention_s, audit_dir=audit_dir)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        auth=throttle,
        max_file_size=max_file_size,
        show_error=False,
        prevent_thread_lock=prevent_thread_lock,
        footer_links=[],
        ssr_mode=False,
        allowed_paths=[],
        head=VIEWER_HEAD,
        app_kwargs={"middleware": client_middleware(throttle)},
    )
