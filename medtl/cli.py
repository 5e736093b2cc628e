"""The ``medtl`` command line: sample-data, train, lr-find, predict, explain, info, encoders, serve.

Each command imports what it needs when it runs (the imports inside the ``cmd_*`` functions), so
``medtl --help`` and ``--version`` load no torch, MONAI or timm, and ``medtl info`` only the readers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from medtl.errors import FileMissingError, MedtlError

log = logging.getLogger("medtl")


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


def cmd_sample_data(args) -> int:
    from medtl.data import create_sample_data

    manifest = create_sample_data(args.out, n_patients=args.patients, seed=args.seed, force=args.force)
    log.info("sample data written: %s", manifest)
    return 0


def cmd_train(args) -> int:
    from medtl.train import run_experiment

    cfg = _train_config(args)
    out = run_experiment(cfg, args.out, force=args.force)
    if not (out / "metrics.json").is_file():  # a torchrun worker other than rank 0
        return 0
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    auc = "n/a" if test["auc"] is None else f"{test['auc']:.3f}"
    what = "every finding right" if metrics.get("multi_label") else "accuracy"
    print(f"{out}: test AUC {auc}, {what} {test['accuracy']:.3f} "
          f"({test['n_images']} images, {test['n_patients']} patients)")
    return 0


def _train_config(args):
    from medtl.config import load_config

    overrides: dict = {"data": {}, "encoder": {}, "train": {}}
    data = args.data or args.manifest
    if data:
        overrides["data"]["path"] = str(data)
    for key, value, part in [("name", args.encoder, "encoder"), ("weights_file", args.weights_file, "encoder"),
                             ("input_size", args.input_size, "encoder"), ("strategy", args.strategy, "train"),
                             ("epochs", args.epochs, "train"), ("frozen_epochs", args.frozen_epochs, "train"),
                             ("batch_size", args.batch_size, "train"), ("seed", args.seed, "train"),
                             ("lr", args.lr, "train"), ("volume_mode", args.volume_mode, "data"),
                             ("modality", args.modality, "data"), ("ct_window", args.ct_window, "data"),
                             ("cache_dir", args.cache_dir, "data"), ("device", args.device, "train"),
                             ("precision", args.precision, "train"), ("unlabelled", args.unlabelled, "data"),
                             ("ensemble", args.ensemble, "train"),
                             ("label_columns", args.label_columns.split(",") if args.label_columns else None, "data")]:
        if value is not None:
            overrides[part][key] = value
    if args.no_pretrained:
        overrides["encoder"]["pretrained"] = False
    return load_config(args.config, **{k: v for k, v in overrides.items() if v})


def cmd_lr_find(args) -> int:
    from medtl.train import find_lr

    cfg = _train_config(args)
    found = find_lr(cfg)
    print(f"suggested head learning rate: {found.suggestion:.2g} (steepest loss descent over "
          f"{len(found.lrs)} steps from {found.lrs[0]:.1g} to {found.lrs[-1]:.1g})")
    if args.plot:
        found.plot(args.plot)
        print(f"plot written to {args.plot}")
    return 0


EXIT_FAILED, EXIT_REFUSED = 1, 3  # predict / explain: a file could not be read; a file was refused


def _each_file(paths, fn) -> int:
    """Run ``fn`` on every file; report a bad one and go on. Exit status 1 if any file failed, else 3
    if the model refused any (``fn`` returns True for a refusal), else 0."""
    failed = refused = 0
    for path in paths:
        try:
            refused += bool(fn(path))
        except MedtlError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_REFUSED if refused else 0


def cmd_predict(args) -> int:
    from medtl.batch import find_inputs, predict_to_csv, shard_from_environment
    from medtl.inference import load_run

    rank, world, local_rank = shard_from_environment()
    if world > 1 and not args.csv:
        raise MedtlError("under torchrun, predict writes its rows with --csv (each process takes a shard)")
    device = args.device
    if world > 1 and device == "auto":  # one GPU per process where there are GPUs
        import torch

        device = f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    # read in the bounded worker: one hostile file cannot stop the batch
    predictor = load_run(args.run, device=device, bounded=True, backend=args.backend)
    with find_inputs(args.images, args.recursive) as inputs:
        if args.csv:
            counts = predict_to_csv(predictor, inputs, args.csv, args.batch_size, args.show_paths, rank=rank,
                                    world=world)
            where = f" (process {rank + 1} of {world})" if world > 1 else ""
            print(f"{args.csv}{where}: {counts['answered']} answered, {counts['refused']} refused, {counts['errors']} "
                  f"could not be read, {counts['skipped']} already in the file; {counts['seconds']} s")
            if world > 1:
                _merge_shards(args.csv, rank)
            return EXIT_FAILED if counts["errors"] else EXIT_REFUSED if counts["refused"] else 0
        failed = refused = 0
        for _, result in predictor.predict_many([i.path for i in inputs], batch_size=args.batch_size):
            if isinstance(result, MedtlError):
                failed += 1
                print(f"error: {result}", file=sys.stderr)
                continue
            print(json.dumps(vars(result)) if args.json else result)
            refused += result.refused is not None
    return EXIT_FAILED if failed else EXIT_REFUSED if refused else 0


def _merge_shards(csv_path: Path, rank: int) -> None:
    """After every process of a torchrun has written its part, the first moves them into ``csv_path``."""
    import torch.distributed as dist

    from medtl.batch import merge_parts

    import datetime

    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))  # shards may end far apart
    try:
        dist.barrier()
        if rank == 0:
            log.info("%s: %d rows from the shards", csv_path, merge_parts(csv_path))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def cmd_explain(args) -> int:
    from medtl.inference import load_run

    predictor = load_run(args.run, device=args.device, bounded=True)
    out = Path(args.out) if args.out else None

    def one(path):
        expl = predictor.explain(path, class_name=args.target, method=args.method)
        if expl.prediction.refused:
            print(expl.prediction)
            return True
        target = out if out and len(args.images) == 1 and out.suffix == ".png" else \
            (out or Path(".")) / f"{Path(path).name.split('.')[0]}_{expl.method}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not args.force:
            raise MedtlError(f"{target} exists; pass --force to replace it")
        expl.save(target)
        print(f"{expl.prediction}\t-> {target}")
        return False

    return _each_file(args.images, one)


def cmd_dicom_results(args) -> int:
    from medtl.batch import input_key
    from medtl.deid import Deidentifier, read_key
    from medtl.dicom_results import write_dicom_results
    from medtl.inference import load_run

    predictor = load_run(args.run, device=args.device, bounded=True)
    out = Path(args.out)
    # files written outside the PACS are de-identified unless asked otherwise (one key: one study stays one)
    deid = None if args.identified else Deidentifier(read_key(args.key_file), accept_burned_in=args.accept_burned_in)

    def one(path):
        target = out / input_key(Path(path))  # a key, not the file's name (it may hold a patient's name)
        if target.exists() and any(target.iterdir()) and not args.force:
            raise MedtlError(f"{target} exists; pass --force to replace it")
        written = write_dicom_results(predictor, path, target, args.method, deidentifier=deid)
        print(f"{input_key(Path(path))}\t" + "  ".join(str(w) for w in written))
        return not (target / "sc.dcm").exists()  # refused: an SR saying so, no overlay

    return _each_file(args.images, one)


def cmd_deid(args) -> int:
    from medtl.deid import Deidentifier, deidentify_files, dicom_files, read_key

    deid = Deidentifier(read_key(args.key_file), dates=args.dates, accept_burned_in=args.accept_burned_in)
    result = deidentify_files(dicom_files(args.inputs), args.out, deid)
    for error in result.errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"{args.out}: {len(result.written)} de-identified, {len(result.skipped)} already there, "
          f"{len(result.errors)} skipped (reported above)")
    return EXIT_FAILED if result.errors else 0


def _add_deid_options(s) -> None:
    s.add_argument("--key-file", type=Path, help="a secret key (16+ bytes; or $MEDTL_DEID_KEY): the same key "
                   "gives the same UIDs, pseudonyms and date shifts in every run; without one a random key")
    s.add_argument("--accept-burned-in", action="store_true", help="de-identify images marked BurnedInAnnotation "
                   "YES (their headers only: the text in the pixels stays); refused by default")


def _pacs(args):
    from medtl.pacs import Credentials, Pacs

    return Pacs(args.url, Credentials.load(args.credentials), timeout=args.timeout)


def _pacs_filters(args) -> dict:
    return {"patient_id": args.patient_id, "study_date": args.date, "modality": args.modality,
            "accession": args.accession}


def cmd_pacs_query(args) -> int:
    studies = _pacs(args).query(**_pacs_filters(args), limit=args.limit)
    for s in studies:
        extra = f"\t{s['study_uid']}\t{s['date']}" if args.show_identifiers else ""
        print(f"{s['key']}\t{s['modalities']}\t{s['instances']} instances{extra}")
    print(f"{len(studies)} studies", file=sys.stderr)
    return 0


def cmd_pacs_run(args) -> int:
    from medtl.inference import load_run
    from medtl.pacs import run_studies

    pacs = _pacs(args)
    uids = list(args.study or [])
    if not uids or any(_pacs_filters(args).values()):
        uids += [s["study_uid"] for s in pacs.query(**_pacs_filters(args), limit=args.limit)]
    if not uids:
        print("no study matches", file=sys.stderr)
        return 0
    predictor = load_run(args.run, device=args.device, bounded=True)
    outcomes = run_studies(predictor, pacs, dict.fromkeys(uids), store=not args.no_store, method=args.method,
                           check=not args.answer_unfamiliar, csv_path=args.csv)
    for o in outcomes:
        what = f"{o.label} {o.probability:.3f}" if o.status == "answered" else o.reason
        print(f"{o.key}\t{o.status.upper()}\t{what}\t{o.stored} stored, {o.already} already there")
    errors = sum(o.status == "error" for o in outcomes)
    refused = sum(o.status == "refused" for o in outcomes)
    return EXIT_FAILED if errors else EXIT_REFUSED if refused else 0


def cmd_pacs_serve(args) -> int:
    import os
    import signal

    from medtl.pacs import Credentials, OrthancServer

    credentials = Credentials.load(args.credentials)
    server = OrthancServer(args.storage, port=args.port, credentials=credentials)
    if credentials is None:  # a new password, kept in a file only its owner reads (never printed)
        args.storage.mkdir(parents=True, exist_ok=True)
        path = args.storage / "credentials.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"user": server.credentials.user, "password": server.credentials.password}, f)
        print(f"credentials (user {server.credentials.user}) in {path}: pass --credentials {path}")
    with server:
        print(f"Orthanc DICOMweb on {server.url} (loopback only, authentication on); Ctrl-C to stop")
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


def _add_pacs_options(s, filters: bool = True) -> None:
    s.add_argument("url", help="the DICOMweb service, e.g. http://127.0.0.1:8042/dicom-web")
    s.add_argument("--credentials", type=Path, help="a file: JSON {\"user\": ..., \"password\": ...} or one "
                   "user:password line (default: $MEDTL_PACS_USER and $MEDTL_PACS_PASSWORD; never on the command line)")
    s.add_argument("--timeout", type=float, default=30, help="seconds to wait for the PACS (default 30)")
    s.add_argument("--patient-id", help="studies of this patient")
    s.add_argument("--date", help="study date YYYYMMDD or range YYYYMMDD-YYYYMMDD")
    s.add_argument("--modality", help="studies with this modality (CT, MR, CR, ...)")
    s.add_argument("--accession", help="the study with this accession number")
    s.add_argument("--limit", type=int, help="at most this many studies")


def cmd_adapt(args) -> int:
    from medtl.batch import find_inputs
    from medtl.site import adapt_run

    with find_inputs(args.data, recursive=True, group_studies=False) as inputs:  # every image file
        record = adapt_run(args.run, [i.path for i in inputs], args.out, args.method, force=args.force,
                           device=args.device, epochs=args.epochs, seed=args.seed)
    for error in record["errors"]:
        print(f"error: {error}", file=sys.stderr)
    print(f"{args.out}: {record['method']} on {record['target_images']} target images "
          f"({record['skipped_files']} skipped); provenance in {Path(args.out) / 'adaptation.json'}")
    return EXIT_FAILED if record["errors"] else 0


def cmd_export(args) -> int:
    from medtl.export import export_run, verify_package

    out = export_run(args.run, args.out, args.format, force=args.force)
    record = verify_package(out)
    print(f"{out}: {record['format']} ({record['file']}), probabilities within "
          f"{record['parity_max_probability_difference']:.1e} of PyTorch; files listed in {out / 'SHA256SUMS'}")
    return 0


def cmd_info(args) -> int:
    from medtl.io import describe_path

    usable = 0
    for p in args.paths:
        report = describe_path(p, series_uid=args.series, modality=args.modality, volume_index=args.volume_index)
        usable += report["usable"]
        print(json.dumps(report, indent=2, default=str))
    return 0 if usable else 1


def cmd_evaluate(args) -> int:
    from medtl.eval.report import evaluate_run

    methods = tuple(args.methods.split(",")) if args.methods else ("gradcam", "gradcampp", "occlusion",
                                                                     "integrated_gradients")
    result = evaluate_run(args.run, data=args.data, n_boot=args.boot, operating_point=args.operating_point,
                          methods=methods, data_randomisation=not args.no_data_randomisation, device=args.device,
                          foreign=args.foreign)
    auc = result["auc"]
    ci = auc["auc_ci"]
    print(f"{args.run}: test AUC {auc['auc']:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "") +
          f"; ECE {result['calibration']['test_ece_before']:.3f} -> {result['calibration']['test_ece_after']:.3f} "
          f"(T = {result['calibration']['temperature']:.2f})")
    ood = result.get("ood", {})
    if ood.get("auroc") is not None:
        print(f"out-of-distribution: AUROC {ood['auroc']:.3f} ({ood['n_in']} test studies vs {ood['n_foreign']} foreign "
              f"files); refused {ood['foreign_refused']:.0%} of the foreign files and "
              f"{ood['in_refused_by_content']:.0%} of the test studies")
    def num(v):
        return "n/a" if v is None else f"{v:.3f}"

    for name, row in (result.get("per_label") or {}).items():  # multi-label: each finding at its own threshold
        ci = row.get("auc_ci")
        print(f"  {name}: AUC {num(row.get('auc'))}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "") +
              f", threshold {num(row['threshold'])}, sensitivity {num(row.get('sensitivity'))}, specificity "
              f"{num(row.get('specificity'))}")
    op = result.get("operating_point")
    if op:
        print(f"operating point ({op['rule']}): threshold {num(op['threshold'])}, sensitivity "
              f"{num(op.get('sensitivity'))}, specificity {num(op.get('specificity'))} on the test set")
    for s in result["saliency_sanity"]:
        print(f"  {s['method']:22s} {s['verdict']}")
    print(f"report: {Path(args.run) / 'evaluation' / 'report.html'}")
    return 0


def cmd_encoders(args) -> int:
    from medtl.models import get_encoder_spec, list_encoders

    for name in list_encoders():
        print(f"{name:18s} {get_encoder_spec(name).description}")
    return 0


def cmd_serve(args) -> int:
    from medtl_ui.app import launch

    launch(args.run, host=args.host, port=args.port, auth=args.auth, device=args.device)
    return 0


def _add_train_options(s, run_folder: bool) -> None:
    s.add_argument("--data", type=Path, help="manifest .csv (image,label,patient_id), image folder or MedMNIST .npz")
    s.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)  # the name --data had before
    s.add_argument("--config", type=Path, help="experiment YAML (fields of medtl.config.ExperimentConfig)")
    if run_folder:
        s.add_argument("--out", type=Path, required=True, help="run folder to create")
        s.add_argument("--force", action="store_true", help="replace an existing run folder")
        s.set_defaults(fn=cmd_train)
    s.add_argument("--encoder", help="encoder name (see `medtl encoders`)")
    s.add_argument("--weights-file", help="local ImageNet weight file for encoders without bundled weights")
    s.add_argument("--no-pretrained", action="store_true", help="random initialisation (from-scratch baseline)")
    s.add_argument("--strategy", help="auto (each of train.auto_candidates tried, the best on validation kept), "
                   "linear_probe, partial, fine_tune, gradual, full, logreg, ncm, bitfit, lora or lp_ft")
    s.add_argument("--unlabelled", help="images without labels for semi-supervised training (folder, manifest or .npz)")
    s.add_argument("--ensemble", type=int, help="train this many seeds and average them into one network (greedy soup)")
    s.add_argument("--label-columns", help="multi-label manifest: its 0/1 finding columns, comma-separated")
    s.add_argument("--epochs", type=int)
    s.add_argument("--frozen-epochs", type=int)
    s.add_argument("--batch-size", type=_int_or_auto, help="images per step, or auto (the largest that fits a GPU)")
    s.add_argument("--input-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--volume-mode", help="3D into 2D: middle, mip, 2.5d, slices or slices_2.5d")
    s.add_argument("--modality", help="override the files' modality: CT, MR, XR or other")
    s.add_argument("--ct-window", help="CT window name (brain, lung, mediastinum, bone, ...) or multi")
    s.add_argument("--cache-dir", help="keep decoded inputs on disk here (MONAI PersistentDataset)")
    s.add_argument("--device", help="auto (a GPU where one can be reached), cpu, cuda or cuda:N")
    s.add_argument("--precision", help="auto (measured: the fastest of fp32 and native bf16), fp32, bf16 or fp16")



def _int_or_auto(value: str):
    return value if value == "auto" else int(value)


def _add_device(s) -> None:
    s.add_argument("--device", default="auto", help="auto (a GPU where one can be reached; default), cpu, cuda or "
                   "cuda:N")


def build_parser() -> argparse.ArgumentParser:
    from medtl import __version__

    p = argparse.ArgumentParser(prog="medtl", description="Transfer learning for medical images.")
    p.add_argument("--version", action="version", version=f"medtl {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample-data", help="write the synthetic labelled CT sample set")
    s.add_argument("out", type=Path)
    s.add_argument("--patients", type=int, default=48, help="patients with 2D DICOM images (default 48)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="write over an existing sample set")
    s.set_defaults(fn=cmd_sample_data)

    for name, help_ in [("train", "fine-tune an ImageNet encoder on a data set and write a run folder"),
                        ("lr-find", "sweep the head learning rate and suggest one (fastai-style)")]:
        s = sub.add_parser(name, help=help_)
        _add_train_options(s, run_folder=name == "train")
    s.add_argument("--plot", type=Path, help="write the loss-vs-learning-rate curve to this PNG")
    s.set_defaults(fn=cmd_lr_find)

    exit_codes = ("exit status: 0 every file answered; 1 a file could not be read (reported, the others done); "
                  "2 a usage or run error; 3 the model refused a file unlike its training images (reason printed)")
    s = sub.add_parser("predict", help="print class probabilities for image files", epilog=exit_codes)
    s.add_argument("run", type=Path)
    s.add_argument("images", nargs="+", type=Path)
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.add_argument("--recursive", action="store_true", help="search folders: each folder holding DICOM files is "
                   "one input (a study), each NIfTI or picture file another")
    s.add_argument("--csv", type=Path, help="append one row per input to this CSV instead of printing; inputs "
                   "already in it are skipped (an interrupted run resumes)")
    s.add_argument("--show-paths", action="store_true", help="add each input's path to the CSV (paths may hold "
                   "patients' names; rows name inputs by a key otherwise)")
    s.add_argument("--batch-size", type=int, default=32, help="model inputs per forward pass, across files")
    s.add_argument("--backend", default="torch", help="torch (default), or for a `medtl export` package its "
                   "onnx (ONNX Runtime) or torchscript network")
    _add_device(s)
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser("dicom-results", help="write DICOM results (Structured Report + Secondary Capture of the "
                       "saliency overlay) for DICOM files or series folders", epilog=exit_codes)
    s.add_argument("run", type=Path)
    s.add_argument("images", nargs="+", type=Path)
    s.add_argument("--out", required=True, help="folder: one sub-folder per input, named by a key")
    s.add_argument("--method", help="saliency method of the overlay (default: the run's)")
    s.add_argument("--force", action="store_true", help="replace existing results")
    s.add_argument("--identified", action="store_true", help="keep the source's patient, dates and UIDs (for "
                   "storing back to its PACS by hand); by default the results are de-identified (PS3.15 basic "
                   "profile, see medtl deid)")
    _add_deid_options(s)
    _add_device(s)
    s.set_defaults(fn=cmd_dicom_results)

    s = sub.add_parser("deid", help="de-identify DICOM files (PS3.15 Annex E basic profile: UIDs remapped "
                       "consistently, dates shifted, private tags removed)", epilog=exit_codes)
    s.add_argument("inputs", nargs="+", type=Path, help="DICOM files or folders (searched recursively)")
    s.add_argument("--out", type=Path, required=True, help="folder: out/study-KEY/series-KEY/KEY.dcm; existing "
                   "files are never overwritten")
    s.add_argument("--dates", default="shift", help="shift (default: back by a per-patient number of days, "
                   "times kept) or remove (the basic profile's actions on dates and times)")
    _add_deid_options(s)
    s.set_defaults(fn=cmd_deid)

    s = sub.add_parser("pacs", help="a PACS over DICOMweb: query studies, run a model on them and store the "
                       "results (SR + Secondary Capture) back; or start a local Orthanc")
    pacs = s.add_subparsers(dest="pacs_command", required=True)
    s = pacs.add_parser("query", help="list matching studies by key (QIDO-RS)")
    _add_pacs_options(s)
    s.add_argument("--show-identifiers", action="store_true", help="add each study's UID and date")
    s.set_defaults(fn=cmd_pacs_query)
    s = pacs.add_parser("run", help="retrieve studies (WADO-RS), predict, store an SR and a Secondary Capture "
                        "in each (STOW-RS; results already there are not stored again)", epilog=exit_codes)
    s.add_argument("run", type=Path)
    _add_pacs_options(s)
    s.add_argument("--study", action="append", help="a StudyInstanceUID (repeatable; with or instead of filters)")
    s.add_argument("--csv", type=Path, help="append one row per study; studies already in it are skipped")
    s.add_argument("--no-store", action="store_true", help="do not store the results back")
    s.add_argument("--method", help="saliency method of the overlay (default: the run's)")
    s.add_argument("--answer-unfamiliar", action="store_true", help="answer studies unlike the training images "
                   "too (default: refused, with an SR that says so)")
    _add_device(s)
    s.set_defaults(fn=cmd_pacs_run)
    s = pacs.add_parser("serve", help="start Orthanc with DICOMweb on loopback (Debian orthanc, orthanc-dicomweb)")
    s.add_argument("--storage", type=Path, required=True, help="Orthanc's database folder")
    s.add_argument("--port", type=int, default=8042)
    s.add_argument("--credentials", type=Path, help="the users' credentials file (default: a new random "
                   "password, written to STORAGE/credentials.json)")
    s.set_defaults(fn=cmd_pacs_serve)

    s = sub.add_parser("adapt", help="adapt a run to a new site's unlabelled images (AdaBN, TENT): a new run")
    s.add_argument("run", type=Path)
    s.add_argument("--data", nargs="+", type=Path, required=True, help="the new site's image files or folders "
                   "(searched recursively; no labels needed)")
    s.add_argument("--out", type=Path, required=True, help="the adapted run's folder")
    s.add_argument("--method", default="adabn", help="adabn (default: BatchNorm statistics matched to the "
                   "source's), adabn_plain (the target's own statistics) or tent (entropy minimisation)")
    s.add_argument("--epochs", type=int, default=1, help="tent: passes over the target images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace an existing --out")
    _add_device(s)
    s.set_defaults(fn=cmd_adapt)

    s = sub.add_parser("export", help="write a run as a self-contained ONNX or TorchScript package")
    s.add_argument("run", type=Path)
    s.add_argument("--out", type=Path, required=True, help="the package folder (refused if it holds files)")
    s.add_argument("--format", default="onnx", help="onnx (default) or torchscript")
    s.add_argument("--force", action="store_true", help="replace the package folder's content")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("explain", help="write Grad-CAM overlays for image files", epilog=exit_codes)
    s.add_argument("run", type=Path)
    s.add_argument("images", nargs="+", type=Path)
    s.add_argument("--out", help="output .png (one image) or folder (default: current folder)")
    s.add_argument("--target", help="class to explain (default: the predicted one)")
    s.add_argument("--method", help="gradcam (default), gradcampp, occlusion or integrated_gradients")
    s.add_argument("--force", action="store_true", help="replace existing overlay files")
    _add_device(s)
    s.set_defaults(fn=cmd_explain)

    s = sub.add_parser("info", help="show what medtl reads from a file, folder or zip (no patient identifiers)")
    s.add_argument("paths", nargs="+")
    s.add_argument("--series", help="SeriesInstanceUID to use instead of the automatic choice")
    s.add_argument("--modality", help="only consider series of this modality")
    s.add_argument("--volume-index", type=int, help="volume of a 4D NIfTI")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("evaluate", help="test metrics with CIs, calibration, saliency sanity checks, report.html")
    s.add_argument("run", type=Path)
    s.add_argument("--data", help="evaluate on this data set instead of the run's own test split")
    s.add_argument("--boot", type=int, default=1000, help="bootstrap resamples (patients) for the CIs")
    s.add_argument("--operating-point", default="youden", help="youden, sensitivity:0.9 or specificity:0.9")
    s.add_argument("--methods", help="comma-separated saliency methods to check (default: all four)")
    s.add_argument("--foreign", nargs="+", metavar="FILE",
                   help="files unlike the training data (other modalities, body parts, photographs): report the "
                        "out-of-distribution detector's AUROC against the test studies")
    s.add_argument("--no-data-randomisation", action="store_true",
                   help="skip training a shuffled-label model for the data randomisation test")
    _add_device(s)
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("encoders", help="list the registered encoders")
    s.set_defaults(fn=cmd_encoders)

    s = sub.add_parser("serve", help="start the web UI for a run")
    s.add_argument("run", type=Path, help="a run folder, or a folder of runs")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--auth", help="USER:PASS required to open the page")
    _add_device(s)
    s.set_defaults(fn=cmd_serve)
    return p


def report_errors(fn, *args) -> int:
    """``fn(*args)``'s exit code; a medtl error is printed as one line (no traceback) and gives 2."""
    try:
        return fn(*args)
    except MedtlError as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, FileMissingError) and "shared" in str(e.path or ""):
            print("  the project's real data sets are in ../shared/data next to a developer's clone (see its "
                  "README); a user's clone has none: pass your own manifest, image folder or .npz", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    return report_errors(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
