"""``medtl deid``, ``medtl dicom-results`` and ``medtl pacs query|run|serve``: DICOM in and out of a hospital.

The handlers import the DICOM and prediction code when they run, not at the top of the module, so that
``medtl --help`` stays light: the command line's one exception to "imports at the top of the module".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medtl.cli.common import EXIT_CODES, add_choice, add_decision, add_device, each_file, exit_status
from medtl.errors import MedtlError
from medtl.options import SALIENCY_METHODS

CREDENTIALS = "credentials.json"  # `pacs serve`: the new password's file in Orthanc's storage folder


def add_parser(sub) -> None:
    """``deid``, ``dicom-results`` and ``pacs`` on ``sub`` (the ``medtl`` parser's sub-commands)."""
    s = sub.add_parser(
        "deid",
        help="de-identify DICOM files (PS3.15 Annex E basic profile: UIDs remapped "
        "consistently, dates shifted, private tags removed)",
        epilog=EXIT_CODES,
    )
    s.add_argument("inputs", nargs="+", type=Path, help="DICOM files or folders (searched recursively)")
    s.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder: out/study-KEY/series-KEY/KEY.dcm; existing files are never overwritten",
    )
    add_choice(
        s,
        "--dates",
        ("shift", "remove"),
        "dates action",
        default="shift",
        help="shift (default: back by a per-patient number of days, "
        "times kept) or remove (the basic profile's actions on dates and times)",
    )
    _add_deid_options(s)
    s.set_defaults(fn=cmd_deid)

    s = sub.add_parser(
        "dicom-results",
        help="write DICOM results (Structured Report + Secondary Capture of the "
        "saliency overlay) for DICOM files or series folders",
        epilog=EXIT_CODES,
    )
    s.add_argument("run", type=Path)
    s.add_argument("images", nargs="+", type=Path)
    s.add_argument("--out", required=True, help="folder: one sub-folder per input, named by a key")
    _add_overlay_method(s)
    s.add_argument("--force", action="store_true", help="replace existing results")
    s.add_argument(
        "--identified",
        action="store_true",
        help="keep the source's patient, dates and UIDs (for "
        "storing back to its PACS by hand); by default the results are de-identified (PS3.15 basic "
        "profile, see medtl deid)",
    )
    _add_deid_options(s)
    s.add_argument("--fhir", action="store_true", help="also write fhir.json (FHIR R4 DiagnosticReport, Observations)")
    _add_fhir_options(s)
    add_decision(s)
    add_device(s)
    s.set_defaults(fn=cmd_dicom_results)

    s = sub.add_parser(
        "pacs",
        help="a PACS over DICOMweb: query studies, run a model on them and store the "
        "results (SR + Secondary Capture) back; or start a local Orthanc",
    )
    _add_pacs_commands(s.add_subparsers(dest="pacs_command", required=True))


def _add_pacs_commands(pacs) -> None:
    s = pacs.add_parser("query", help="list matching studies by key (QIDO-RS)")
    _add_pacs_options(s)
    s.add_argument("--show-identifiers", action="store_true", help="add each study's UID and date")
    s.set_defaults(fn=cmd_pacs_query)

    s = pacs.add_parser(
        "run",
        help="retrieve studies (WADO-RS), predict, store an SR and a Secondary Capture "
        "in each (STOW-RS; results already there are not stored again)",
        epilog=EXIT_CODES,
    )
    s.add_argument("run", type=Path)
    _add_pacs_options(s)
    s.add_argument("--study", action="append", help="a StudyInstanceUID (repeatable; with or instead of filters)")
    s.add_argument("--csv", type=Path, help="append one row per study; studies already in it are skipped")
    s.add_argument("--no-store", action="store_true", help="do not store the results back")
    _add_answer_options(s)
    s.set_defaults(fn=cmd_pacs_run)

    s = pacs.add_parser("serve", help="start Orthanc with DICOMweb on loopback (Debian orthanc, orthanc-dicomweb)")
    s.add_argument("--storage", type=Path, required=True, help="Orthanc's database folder")
    s.add_argument("--port", type=int, default=8042)
    s.add_argument(
        "--credentials",
        type=Path,
        help=f"the users' credentials file (default: STORAGE/{CREDENTIALS}, a random password made at the first "
        "start and kept across restarts)",
    )
    s.add_argument(
        "--new-password", action="store_true", help=f"replace the password kept in STORAGE/{CREDENTIALS} by a new one"
    )
    s.set_defaults(fn=cmd_pacs_serve)
    _add_pacs_watch(pacs)
    _add_pacs_listen(pacs)


def _add_pacs_watch(pacs) -> None:
    s = pacs.add_parser(
        "watch",
        help="an unattended service: follow Orthanc's change feed and run each new stable study once (as pacs "
        "run: SR + Secondary Capture stored); SIGTERM stops it",
        epilog=EXIT_CODES,
    )
    s.add_argument("run", type=Path)
    s.add_argument("url", help="the DICOMweb service, e.g. http://127.0.0.1:8042/dicom-web")
    s.add_argument(
        "--orthanc", help="Orthanc's REST root, whose /changes is followed (default: URL without its /dicom-web)"
    )
    s.add_argument(
        "--credentials",
        type=Path,
        help="a file: JSON {\"user\": ..., \"password\": ...} or one user:password line (default: "
        "$MEDTL_PACS_USER and $MEDTL_PACS_PASSWORD)",
    )
    s.add_argument(
        "--state",
        type=Path,
        required=True,
        help="a private folder: the last change handled, studies.csv (a row per study; a final one is never "
        "run again), audit.jsonl (a line per study)",
    )
    s.add_argument("--poll-seconds", type=float, default=10, help="seconds between readings of the feed (default 10)")
    s.add_argument("--health-port", type=int, help="answer GET http://127.0.0.1:PORT/health (0: any free port)")
    s.add_argument(
        "--backlog", action="store_true", help="at the first start, also run the studies already in the PACS"
    )
    s.add_argument("--timeout", type=float, default=30, help="seconds to wait for the PACS (default 30)")
    s.add_argument("--retries", type=int, default=3, help="retries of a request within a study (default 3)")
    s.add_argument("--no-store", action="store_true", help="do not store the results back")
    _add_answer_options(s)
    s.set_defaults(fn=cmd_pacs_watch)


def _add_pacs_listen(pacs) -> None:
    s = pacs.add_parser(
        "listen",
        help="a DICOM listener (C-STORE SCP) for modalities and routers: each study, once no instance of it has "
        "come for --quiet-seconds, is answered (SR + Secondary Capture in OUT) and its images deleted",
        epilog=EXIT_CODES,
    )
    s.add_argument("run", type=Path)
    s.add_argument("--port", type=int, required=True, help="the DICOM port to listen on (e.g. 11112)")
    s.add_argument("--host", default="", help="the address to listen on (default: every interface)")
    s.add_argument("--ae-title", default="MEDTL", help="the listener's AE title (default MEDTL)")
    s.add_argument("--allow", required=True, help="the AE titles that may send, comma-separated; others are rejected")
    s.add_argument(
        "--out",
        type=Path,
        required=True,
        help="a private folder: OUT/study-KEY/sr.dcm, sc.dcm per study (identified: to be filed with the "
        "images), OUT/studies.csv (a row per study)",
    )
    s.add_argument(
        "--quiet-seconds", type=float, default=10, help="a study is complete after this long without a new instance"
    )
    s.add_argument(
        "--spool", type=Path, help="the folder in which the private spool of received images is made (default: $TMPDIR)"
    )
    s.add_argument(
        "--store", metavar="URL", help="also store the results in this PACS (DICOMweb or dimse://AE@host:port)"
    )
    s.add_argument(
        "--credentials", type=Path, help="the --store PACS's credentials file (default: $MEDTL_PACS_USER/PASSWORD)"
    )
    _add_answer_options(s, fhir=False)
    s.set_defaults(fn=cmd_pacs_listen)


def _add_answer_options(s: argparse.ArgumentParser, fhir: bool = True) -> None:
    """How the studies are answered (``pacs run``, ``watch``, ``listen``): the overlay's method, unfamiliar
    studies, the FHIR results (with ``fhir``), the decision, the device."""
    _add_overlay_method(s)
    s.add_argument(
        "--answer-unfamiliar",
        action="store_true",
        help="answer studies unlike the training images too (default: refused, with an SR that says so)",
    )
    if fhir:
        _add_fhir_options(s)
    add_decision(s)
    add_device(s)


def _add_overlay_method(s: argparse.ArgumentParser) -> None:
    add_choice(
        s, "--method", SALIENCY_METHODS, "saliency method", help="saliency method of the overlay (default: the run's)"
    )


def _add_fhir_options(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--fhir-url",
        help="POST each study's FHIR R4 DiagnosticReport + Observations (a transaction Bundle) to this FHIR server's "
        "base URL (bearer token: $MEDTL_FHIR_TOKEN)",
    )
    s.add_argument(
        "--fhir-subject-system",
        metavar="URI",
        help="name the patient in FHIR results: a reference by identifier, the DICOM PatientID under this identifier "
        "system (default: no subject; the study identifies the report)",
    )


def _fhir_options(args: argparse.Namespace, write: bool = False):
    """The FHIR results asked for (None: none)."""
    from medtl.clinical.fhir import FhirOptions

    if not (write or args.fhir_url):
        return None
    return FhirOptions(url=args.fhir_url, subject_system=args.fhir_subject_system)


def _add_deid_options(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--key-file",
        type=Path,
        help="a secret key (16+ bytes; or $MEDTL_DEID_KEY): the same key "
        "gives the same UIDs, pseudonyms and date shifts in every run; without one a random key",
    )
    s.add_argument(
        "--accept-burned-in",
        action="store_true",
        help="de-identify images marked BurnedInAnnotation "
        "YES (their headers only: the text in the pixels stays); refused by default",
    )


def _add_pacs_options(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "url",
        help="the DICOMweb service, e.g. http://127.0.0.1:8042/dicom-web, or a PACS's DICOM port: "
        "dimse://AE@host:port (C-FIND, C-GET or C-MOVE, C-STORE)",
    )
    s.add_argument(
        "--credentials",
        type=Path,
        help="a file: JSON {\"user\": ..., \"password\": ...} or one "
        "user:password line (default: $MEDTL_PACS_USER and $MEDTL_PACS_PASSWORD; never on the command line)",
    )
    s.add_argument("--ae-title", default="MEDTL", help="dimse://: medtl's AE title, known to the PACS (default MEDTL)")
    s.add_argument(
        "--move-port",
        type=int,
        help="dimse://: retrieve by C-MOVE to medtl's AE on this port (the PACS must know it at this host and port); "
        "default: C-GET",
    )
    s.add_argument("--timeout", type=float, default=30, help="seconds to wait for the PACS (default 30)")
    s.add_argument(
        "--retries",
        type=int,
        default=3,
        help="times a temporary failure (PACS unreachable, no answer in time, HTTP 5xx) is retried, after 2, 4, "
        "8... s (default 3)",
    )
    s.add_argument("--patient-id", help="studies of this patient")
    s.add_argument("--date", help="study date YYYYMMDD or range YYYYMMDD-YYYYMMDD")
    s.add_argument("--modality", help="studies with this modality (CT, MR, CR, ...)")
    s.add_argument("--accession", help="the study with this accession number")
    s.add_argument("--limit", type=int, help="at most this many studies")


def cmd_deid(args: argparse.Namespace) -> int:
    from medtl.clinical.deid import Deidentifier, deidentify_files, dicom_files, read_key

    deid = Deidentifier(read_key(args.key_file), dates=args.dates, accept_burned_in=args.accept_burned_in)
    result = deidentify_files(dicom_files(args.inputs), args.out, deid)
    for error in result.errors:
        print(f"error: {error}", file=sys.stderr)
    print(
        f"{args.out}: {len(result.written)} de-identified, {len(result.skipped)} already there, "
        f"{len(result.errors)} skipped (reported above)"
    )
    return exit_status(len(result.errors), 0)


def cmd_dicom_results(args: argparse.Namespace) -> int:
    from medtl.extras import require

    require("pacs", "highdicom", "medtl dicom-results")  # a core install is told which extra to add
    from medtl.clinical.deid import Deidentifier, read_key
    from medtl.clinical.dicom_results import write_study_results
    from medtl.predict.batch import input_key
    from medtl.predict.predictor import load_run

    predictor = load_run(args.run, device=args.device, bounded=True, decision=args.decision)
    out = Path(args.out)
    # files written outside the PACS are de-identified unless asked otherwise (one key: one study stays one)
    deid = None if args.identified else Deidentifier(read_key(args.key_file), accept_burned_in=args.accept_burned_in)
    fhir = _fhir_options(args, write=args.fhir)

    def one(path: Path) -> bool:
        target = out / input_key(Path(path))  # a key, not the file's name (it may hold a patient's name)
        if target.exists() and any(target.iterdir()) and not args.force:
            raise MedtlError(f"{target} exists; pass --force to replace it")
        results = write_study_results(predictor, path, target, args.method, deidentifier=deid, fhir=fhir)
        written = results.files + ([results.fhir] if results.fhir else [])
        print(f"{input_key(Path(path))}\t" + "  ".join(str(w) for w in written))
        return not (target / "sc.dcm").exists()  # refused: an SR saying so, no overlay

    return each_file(args.images, one)


def _pacs(args: argparse.Namespace):
    from medtl.extras import require

    if args.url.startswith("dimse:"):  # a PACS's DICOM port (DIMSE)
        require("pacs", "pynetdicom", "medtl pacs with dimse://")
        from medtl.clinical.dimse import DimsePacs

        return DimsePacs(
            args.url,
            getattr(args, "ae_title", "MEDTL"),
            timeout=args.timeout,
            retries=max(0, args.retries),
            move_port=getattr(args, "move_port", None),
        )
    require("pacs", "dicomweb_client", "medtl pacs")  # a core install is told which extra to add
    from medtl.clinical.pacs import Credentials, Pacs

    return Pacs(args.url, Credentials.load(args.credentials), timeout=args.timeout, retries=max(0, args.retries))


def _pacs_filters(args: argparse.Namespace) -> dict:
    return {
        "patient_id": args.patient_id,
        "study_date": args.date,
        "modality": args.modality,
        "accession": args.accession,
    }


def cmd_pacs_query(args: argparse.Namespace) -> int:
    studies = _pacs(args).query(**_pacs_filters(args), limit=args.limit)
    for s in studies:
        extra = f"\t{s['study_uid']}\t{s['date']}" if args.show_identifiers else ""
        print(f"{s['key']}\t{s['modalities']}\t{s['instances']} instances{extra}")
    print(f"{len(studies)} studies", file=sys.stderr)
    return 0


def cmd_pacs_run(args: argparse.Namespace) -> int:
    from medtl.extras import require

    require("pacs", "highdicom", "medtl pacs run")  # (its results are DICOM SR and SC)
    from medtl.clinical.pacs_run import run_studies
    from medtl.predict.predictor import load_run

    pacs = _pacs(args)
    uids = list(args.study or [])
    if not uids or any(_pacs_filters(args).values()):
        uids += [s["study_uid"] for s in pacs.query(**_pacs_filters(args), limit=args.limit)]
    if not uids:
        print("no study matches", file=sys.stderr)
        return 0
    predictor = load_run(args.run, device=args.device, bounded=True, decision=args.decision)
    outcomes = run_studies(
        predictor,
        pacs,
        dict.fromkeys(uids),
        store=not args.no_store,
        method=args.method,
        check=not args.answer_unfamiliar,
        csv_path=args.csv,
        fhir=_fhir_options(args),
    )
    for o in outcomes:
        what = f"{o.label} {o.probability:.3f}" if o.status == "answered" else o.reason
        print(f"{o.key}\t{o.status.upper()}\t{what}\t{o.stored} stored, {o.already} already there")
    failed = sum(o.status in ("error", "retry") for o in outcomes)  # retry: temporary, a rerun tries it again
    return exit_status(failed, sum(o.status == "refused" for o in outcomes))


def cmd_pacs_serve(args: argparse.Namespace) -> int:
    from medtl.extras import require

    require("pacs", "requests", "medtl pacs serve")  # (it talks to Orthanc over HTTP)
    from medtl.clinical.orthanc import OrthancServer, OrthancStoppedError, load_or_create_credentials
    from medtl.clinical.pacs import Credentials

    if args.credentials is not None:
        credentials = Credentials.load(args.credentials)
    else:  # the server's own password, kept in a file only its owner reads (never printed)
        path = args.storage / CREDENTIALS
        credentials, new = load_or_create_credentials(path, renew=args.new_password)
        said = "a new password" if new else "the password kept"
        print(f"credentials (user {credentials.user}, {said}) in {path}: pass --credentials {path}")
    server = OrthancServer(args.storage, port=args.port, credentials=credentials)
    with server:
        print(f"Orthanc DICOMweb on {server.url} (loopback only, authentication on); Ctrl-C to stop")
        on_series = "its Orthanc Web Viewer button" if server.web_viewer else "a preview (no orthanc-webviewer)"
        print(f"viewer: {server.explorer_url} (Orthanc Explorer; a series: {on_series})")
        try:
            server.wait()
        except OrthancStoppedError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


def cmd_pacs_watch(args: argparse.Namespace) -> int:
    from medtl.extras import require

    require("pacs", "highdicom", "medtl pacs watch")
    from medtl.clinical.pacs import Credentials
    from medtl.clinical.watch import OrthancChanges, WatchConfig, orthanc_rest_url, watch
    from medtl.errors import ConfigError
    from medtl.predict.predictor import load_run

    rest = args.orthanc or orthanc_rest_url(args.url)
    if rest is None:
        raise ConfigError(None, f"no Orthanc REST root for {args.url!r}", "--orthanc URL (e.g. http://127.0.0.1:8042)")
    pacs = _pacs(args)
    predictor = load_run(args.run, device=args.device, bounded=True, decision=args.decision)
    config = WatchConfig(
        args.state,
        poll_seconds=max(0.1, args.poll_seconds),
        health_port=args.health_port,
        backlog=args.backlog,
        store=not args.no_store,
        method=args.method,
        check=not args.answer_unfamiliar,
        fhir=_fhir_options(args),
    )
    changes = OrthancChanges(rest, Credentials.load(args.credentials), timeout=args.timeout)
    return watch(predictor, pacs, changes, config)


def cmd_pacs_listen(args: argparse.Namespace) -> int:
    from medtl.extras import require

    require("pacs", "pynetdicom", "medtl pacs listen")
    require("pacs", "highdicom", "medtl pacs listen")  # (its results are DICOM SR and SC)
    from medtl.clinical.dimse_listen import OUTCOMES_CSV, StudyListener, listen
    from medtl.predict.predictor import load_run

    allow = [a for a in args.allow.split(",") if a.strip()]
    listener = StudyListener(args.port, allow, args.ae_title, host=args.host, spool_parent=args.spool)
    store = None
    if args.store:  # the --store PACS, with the options _pacs reads
        store = _pacs(
            argparse.Namespace(
                url=args.store, credentials=args.credentials, timeout=30, retries=3, ae_title=args.ae_title
            )
        )
    predictor = load_run(args.run, device=args.device, bounded=True, decision=args.decision)
    outcomes = listen(
        predictor,
        listener,
        args.out,
        quiet=max(0.0, args.quiet_seconds),
        pacs=store,
        method=args.method,
        check=not args.answer_unfamiliar,
        on_start=lambda lis: print(
            f"listening as AE {lis.ae_title} on port {lis.port} for {', '.join(lis.allow)}; Ctrl-C or SIGTERM stops",
            file=sys.stderr,
            flush=True,
        ),
    )
    failed = sum(o.status in ("error", "retry") for o in outcomes)
    print(f"{len(outcomes)} studies answered or refused, {failed} failed: {args.out / OUTCOMES_CSV}", file=sys.stderr)
    return 0
