"""Does a run refuse what it never saw? Its out-of-distribution detector against real foreign files.

    python pipelines/ood_check.py RUN --shared ../shared/data --out results/ood [--photos]

The in-distribution side is the run's own test split (read as training read it). The foreign side
is built from the project's real data (``../shared/data``): head and body CT from other scanners,
MR DICOM and NIfTI brains, radiographs, 16×16-pixel thumbnail series, brain-MRI slices saved as
JPEG, and (``--photos``, needs scikit-image) natural photographs. Prints and writes
``OUT/summary.md`` and ``OUT/ood.json``: the AUROC of the content score alone, the refusal rate of
each side (header checks and content together), and each foreign file's score and reason. Then
checks what ``medtl predict`` answers for a real head CT and for the sample slices.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from medtl.cli import report_errors
from medtl.data import study_index
from medtl.predict import Prediction, Predictor, extract_features, load_run
from medtl.predict.ood import foreign_check, study_scores
from medtl.train import prepare_data

FOREIGN_DICOM = [
    "ct/693_UNCI.dcm",
    "ct/CT_small.dcm",
    "ct/J2K_pixelrep_mismatch.dcm",
    "ct/eCT_Supplemental.dcm",
    "ct/explicit_VR-UN.dcm",
    "mr/MR_small.dcm",
    "mr/MR2_UNCI.dcm",
    "mr/emri_small.dcm",
    "mr/examples_overlay.dcm",
    "cr/RG1_J2KI.dcm",
    "cr/RG3_J2KR.dcm",
    "series/dicom2nifti_hitachi_mr64",
]
THUMBNAIL_SERIES = "series/pydicom_dicomdirtests"  # 16x16 series of CT, MR and CR
FOREIGN_NIFTI = ["ch2bet.nii.gz", "anatomical.nii", "S0_10slices.nii.gz", "aniso_vox.nii.gz"]


def foreign_files(shared: Path, work: Path, photos: bool) -> list[Path]:
    """The foreign set: real files as they are, plus JPEG slices of a real brain MR and photographs."""
    files = [shared / "dicom" / f for f in FOREIGN_DICOM]
    files += sorted(p for p in (shared / "dicom" / THUMBNAIL_SERIES).glob("*/*") if p.is_dir())
    files += [shared / "nifti" / f for f in FOREIGN_NIFTI]
    brain = np.asanyarray(nib.load(shared / "nifti" / "ch2bet.nii.gz").dataobj).astype(np.float32)
    for z in (60, 90, 120):  # axial slices of the T1 brain as an 8-bit JPEG (a "brain MRI" picture)
        s = np.rot90(brain[:, :, z])
        s = (255 * (s - s.min()) / max(np.ptp(s), 1e-6)).astype(np.uint8)
        Image.fromarray(s).save(work / f"brain_mri_{z}.jpg", quality=90)
        files.append(work / f"brain_mri_{z}.jpg")
    if photos:
        import skimage.data  # (an optional test dependency: imported only with --photos)

        for name in ("chelsea", "astronaut", "coffee", "rocket", "camera", "coins"):
            Image.fromarray(getattr(skimage.data, name)()).save(work / f"photo_{name}.jpg", quality=90)
            files.append(work / f"photo_{name}.jpg")
    return [f for f in files if f.exists()]


def check(args: argparse.Namespace, predictor: Predictor) -> tuple[dict, Prediction]:
    """The detector's scores on the run's test split against the foreign files (``ood.json``'s content), and the
    answer of ``medtl predict`` for the real head CT."""
    cfg = predictor.config
    prepared = prepare_data(cfg.data, predictor.preprocessing, cfg.train.seed)
    _, _, test_ds = prepared.datasets(cfg.data, predictor.preprocessing)
    features, _ = extract_features(predictor.model, test_ds, predictor.runtime)
    in_scores = study_scores(predictor.ood.score(features), study_index(test_ds))
    with tempfile.TemporaryDirectory() as work:
        files = foreign_files(Path(args.shared), Path(work), args.photos)
        result = foreign_check(predictor, in_scores, files)
    result["run"] = str(args.run)
    result["detector"] = predictor.ood.describe()
    head_ct = predictor.predict(Path(args.shared) / "dicom" / "ct" / "693_UNCI.dcm")
    samples = [p for p in prepared.sets["test"] if Path(str(p["path"])).is_file()]  # (MedMNIST: arrays, no files)
    answered = [predictor.predict(s["path"]) for s in samples]
    result["head_ct_refused"] = head_ct.refused
    result["test_files_answered"] = f"{sum(a.refused is None for a in answered)} of {len(answered)}"
    return result, head_ct


def summary_lines(args: argparse.Namespace, result: dict, head_ct: Prediction) -> list[str]:
    """``summary.md``: the AUROC, the refusal rates, the head CT's answer and each foreign file's score."""
    lines = [
        f"# Out-of-distribution refusal: {Path(args.run).name}",
        "",
        f"Detector: {result['detector']['method']} (k = {result['detector']['k']}), threshold "
        f"{result['threshold']:.4f} (set on {result['detector']['n_val']} validation studies).",
        "",
        f"- AUROC of the content score, {result['n_in']} test studies vs {result['n_foreign']} foreign files: "
        f"**{result['auroc']:.3f}**",
        f"- test studies refused by content: {result['in_refused_by_content']:.1%}",
        f"- foreign files refused (header checks and content): {result['foreign_refused']:.1%}; by content alone: "
        f"{result['foreign_refused_by_content']:.1%}",
        f"- `medtl predict` on the real head CT (693_UNCI.dcm): "
        f"{'refused: ' + head_ct.refused if head_ct.refused else 'ANSWERED ' + str(head_ct.label)}",
        f"- the run's own test files answered: {result['test_files_answered']}",
        "",
        "| foreign file | score | refused | reason |",
        "|---|---|---|---|",
    ]
    for r in result["foreign"]:
        score = "n/a" if r["score"] is None else f"{r['score']:.4f}"
        lines.append(f"| {r['file']} | {score} | {'yes' if r['refused'] else 'NO'} | {r['reason'] or ''} |")
    lines += [
        "",
        f"Command: `python pipelines/ood_check.py {args.run} --shared {args.shared} --out {args.out}"
        f"{' --photos' if args.photos else ''}`",
    ]
    return lines


def run(args: argparse.Namespace) -> int:
    predictor = load_run(args.run, device=args.device)
    if predictor.ood is None:
        print(f"{args.run}: the run has no out-of-distribution detector", file=sys.stderr)
        return 2
    result, head_ct = check(args, predictor)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ood.json").write_text(json.dumps(result, indent=2, default=str))
    lines = summary_lines(args, result, head_ct)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--shared", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("results/ood"))
    p.add_argument("--photos", action="store_true", help="add natural photographs (scikit-image's sample images)")
    p.add_argument("--device", default="auto", help="auto (a GPU where one can be reached), cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return report_errors(run, args)


if __name__ == "__main__":
    sys.exit(main())
