"""Coverage-guided fuzzing of ``medtl.io.read_image`` with atheris (libFuzzer for Python).

    pip install -e '.[fuzz]'    # atheris
    python -m tools.fuzz.coverage_guided [--kind dicom|nifti|nifti.gz|picture|zip] [--budget 512M]
        [--corpus DIR] [--data ../shared/data] [libFuzzer options, e.g. -max_total_time=600 -jobs=2]
    python -m tools.fuzz.coverage_guided --kind dicom crash-<sha1>     # re-run one saved input

(from the repository root). Where ``python -m tools.fuzz`` mutates files blindly, this lets libFuzzer steer the
mutations by the branches they reach in medtl, pydicom, nibabel and Pillow (all instrumented). Each input is
written to a file named for --kind (".dcm", ".nii", ".nii.gz", ".png", ".zip") and read with the budget as
medtl's read limit. A typed refusal (MedtlInputError) is an accepted outcome; any other exception
is a crash that libFuzzer saves as crash-<sha1> in the working folder, and a read past -timeout
seconds (default 10) or over -rss_limit_mb (default twice the budget plus 1 GiB) is one too.

The corpus folder (default results/fuzz_atheris/KIND) starts with the seeds of :mod:`tools.fuzz.seeds` of that
kind: the generated ones, and those of the data folder where it exists.
"""

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import atheris

# The readers and the libraries they call are imported inside the instrumentation, for coverage feedback from
# them all; the fuzzer's own modules are imported after it (they find these already imported, instrumented).
with atheris.instrument_imports():
    import nibabel  # noqa: F401
    import PIL.Image  # noqa: F401
    import pydicom  # noqa: F401

    import medtl.io
    from medtl.errors import MedtlInputError
    from medtl.io.limits import read_limits, set_read_limits

from tools.fuzz.runner import parse_budget
from tools.fuzz.seeds import data_seeds, default_data_dir, generated_seeds

SUFFIX = {"dicom": ".dcm", "nifti": ".nii", "nifti.gz": ".nii.gz", "picture": ".png", "zip": ".zip"}


def seed_corpus(kind: str, corpus: Path, data: Path | None) -> int:
    """Write the fuzzer's seeds of ``kind`` into an empty corpus folder; return how many it holds."""
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        seeds = generated_seeds() + (data_seeds(data) if data and data.is_dir() else [])
        want = "nifti" if kind.startswith("nifti") else kind
        for i, s in enumerate(x for x in seeds if x.kind == want):
            if (kind == "nifti" and s.gzipped) or (kind == "nifti.gz" and not s.gzipped):
                continue
            (corpus / f"seed{i:04d}").write_bytes(s.data)
    return len(list(corpus.iterdir()))


def libfuzzer_args(kind: str, corpus: Path | None, data: Path | None, budget: int, libfuzzer: list[str]) -> list[str]:
    """libFuzzer's arguments: the corpus folder (seeded) unless saved inputs are re-run, and default limits."""
    inputs = [a for a in libfuzzer if not a.startswith("-")]
    if not inputs or all(Path(a).is_dir() for a in inputs):  # fuzzing (not re-running saved inputs)
        corpus = corpus or Path("results/fuzz_atheris") / kind
        print(f"corpus {corpus}: {seed_corpus(kind, corpus, data)} files", flush=True)
        libfuzzer = [a for a in libfuzzer if a not in inputs] + [str(corpus)] + inputs
    defaults = {"-timeout": "10", "-rss_limit_mb": str(2 * budget // 2**20 + 1024), "-max_len": str(4 << 20)}
    given = {a.split("=", 1)[0] for a in libfuzzer}
    return [f"{k}={v}" for k, v in defaults.items() if k not in given] + libfuzzer


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m tools.fuzz.coverage_guided",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--kind", choices=sorted(SUFFIX), default="dicom")
    p.add_argument("--budget", default="512M", help="memory budget per read (default 512M)")
    p.add_argument("--corpus", type=Path, help="corpus folder (default results/fuzz_atheris/KIND)")
    p.add_argument("--data", type=Path, default=default_data_dir())
    args, libfuzzer = p.parse_known_args()
    budget = parse_budget(args.budget)
    set_read_limits(read_limits().replace(max_bytes=budget))
    os.environ["MEDTL_MAX_INPUT_BYTES"] = str(budget)
    path = Path(tempfile.mkdtemp(prefix="medtl-atheris-")) / f"input{SUFFIX[args.kind]}"
    libfuzzer = libfuzzer_args(args.kind, args.corpus, args.data, budget, libfuzzer)

    def test_one_input(data: bytes) -> None:
        path.write_bytes(data)
        with contextlib.suppress(MedtlInputError):  # a typed refusal is an accepted outcome
            medtl.io.read_image(path)

    atheris.Setup([sys.argv[0], *libfuzzer], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
