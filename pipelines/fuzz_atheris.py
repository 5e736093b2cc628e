"""Coverage-guided fuzzing of ``medtl.io.read_image`` with atheris (libFuzzer for Python).

    pip install atheris
    python pipelines/fuzz_atheris.py [--kind dicom|nifti|nifti.gz|picture|zip] [--budget 512M]
        [--corpus DIR] [--data ../shared/data] [libFuzzer options, e.g. -max_total_time=600 -jobs=2]
    python pipelines/fuzz_atheris.py --kind dicom crash-<sha1>     # re-run one saved input

Where pipelines/fuzz.py mutates files blindly, this lets libFuzzer steer the mutations by the
branches they reach in medtl, pydicom, nibabel and Pillow (all instrumented). Each input is written
to a file named for --kind (".dcm", ".nii", ".nii.gz", ".png", ".zip") and read with the budget as
medtl's read limit. A typed refusal (MedtlInputError) is an accepted outcome; any other exception
is a crash that libFuzzer saves as crash-<sha1> in the working folder, and a read past -timeout
seconds (default 10) or over -rss_limit_mb (default twice the budget plus 1 GiB) is one too.

The corpus folder (default results/fuzz_atheris/KIND) starts with the seeds of pipelines/fuzz.py
of that kind: the generated ones, and those of the data folder where it exists.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz as harness  # noqa: E402  (pipelines/fuzz.py: seeds and budget parsing)

with atheris.instrument_imports():  # coverage feedback from the libraries the readers call, too
    import nibabel  # noqa: F401
    import PIL.Image  # noqa: F401
    import pydicom  # noqa: F401

    import medtl.io
    from medtl.errors import MedtlInputError
    from medtl.io.limits import read_limits, set_read_limits

SUFFIX = {"dicom": ".dcm", "nifti": ".nii", "nifti.gz": ".nii.gz", "picture": ".png", "zip": ".zip"}


def seed_corpus(kind: str, corpus: Path, data: Path | None) -> int:
    """Write the harness's seeds of ``kind`` into an empty corpus folder; return how many it holds."""
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        seeds = harness.generated_seeds() + (harness.data_seeds(data) if data and data.is_dir() else [])
        want = "nifti" if kind.startswith("nifti") else kind
        for i, s in enumerate(x for x in seeds if x.kind == want):
            gz = s.suffix.lower().endswith(".gz")
            if kind == "nifti" and gz or kind == "nifti.gz" and not gz:
                continue
            (corpus / f"seed{i:04d}").write_bytes(s.data)
    return len(list(corpus.iterdir()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=sorted(SUFFIX), default="dicom")
    p.add_argument("--budget", default="512M", help="memory budget per read (default 512M)")
    p.add_argument("--corpus", type=Path, help="corpus folder (default results/fuzz_atheris/KIND)")
    p.add_argument("--data", type=Path, default=harness.default_data_dir())
    args, libfuzzer = p.parse_known_args()
    budget = harness.parse_budget(args.budget)
    set_read_limits(read_limits().replace(max_bytes=budget))
    os.environ["MEDTL_MAX_INPUT_BYTES"] = str(budget)
    path = Path(tempfile.mkdtemp(prefix="medtl-atheris-")) / f"input{SUFFIX[args.kind]}"
    inputs = [a for a in libfuzzer if not a.startswith("-")]
    if not inputs or all(Path(a).is_dir() for a in inputs):  # fuzzing (not re-running saved inputs)
        corpus = args.corpus or Path("results/fuzz_atheris") / args.kind
        print(f"corpus {corpus}: {seed_corpus(args.kind, corpus, args.data)} files", flush=True)
        libfuzzer = [a for a in libfuzzer if a not in inputs] + [str(corpus)] + inputs
    defaults = {"-timeout": "10", "-rss_limit_mb": str(2 * budget // 2 ** 20 + 1024), "-max_len": str(4 << 20)}
    given = {a.split("=", 1)[0] for a in libfuzzer}
    libfuzzer = [f"{k}={v}" for k, v in defaults.items() if k not in given] + libfuzzer

    def test_one_input(data: bytes) -> None:
        path.write_bytes(data)
        try:
            medtl.io.read_image(path)
        except MedtlInputError:
            pass

    atheris.Setup([sys.argv[0], *libfuzzer], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
