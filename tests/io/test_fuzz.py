"""The reader fuzz harness (tools/fuzz): a seeded run on generated seeds, and checks of the harness.

The seeded run reads 300 mutants of generated files (no ../shared/data needed) and fails, with the
table and every failure's type and medtl file:line, when any ends other than read or typed, or goes
over the memory budget. The harness checks feed its child processes the readers defined below
(resolved there as ``tests.io.test_fuzz:fake_reader``).
"""

import io
import json
import os
import random
import signal
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from medtl.errors import CorruptImageError, did_you_mean
from medtl.io import read_image
from tools.fuzz.cli import main as fuzz_main
from tools.fuzz.dicom_file import TAGS, DicomFile
from tools.fuzz.mutators import MUTATORS
from tools.fuzz.mutators.bomb import crc_zeros, deflated_then_zeros
from tools.fuzz.mutators.dicom import nested_sequence
from tools.fuzz.recipes import make_mutant, plan
from tools.fuzz.registry import plain
from tools.fuzz.report import format_report
from tools.fuzz.runner import run
from tools.fuzz.seeds import generated_seeds
from tools.fuzz.server import Server

FAKE = "tests.io.test_fuzz:fake_reader"


def fake_reader(path):
    """A reader whose behaviour is the file's content (runs in the harness's child process)."""
    what = Path(path).read_bytes().decode()
    if what == "untyped":
        raise KeyError("no such key")
    if what == "untyped_in_medtl":
        did_you_mean("x", None)  # iterates None: a TypeError raised inside medtl/errors.py
    if what == "typed":
        raise CorruptImageError(path, "damaged on purpose")
    if what == "sleep":
        time.sleep(60)
    if what == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if what == "exit":
        os._exit(3)
    if what == "allocate_16g":  # past the child's address-space limit
        return SimpleNamespace(array=bytearray(16 << 30))
    if what == "touch_96m":  # 96 MiB really used: past the 64 MiB cap
        return SimpleNamespace(array=np.ones(96 << 20, np.uint8)[:4])
    if what == "touch_40m":  # 40 MiB really used: within it
        return SimpleNamespace(array=np.ones(40 << 20, np.uint8)[:4])
    return read_image(path)


def _failures(report) -> str:
    return "\n".join(
        f"{s['count']} x {s['outcome']} {s['error']} at {s['location'] or s['where']}: "
        f"{s['message'][:120]} (e.g. mutant {s['example']['index']}: {s['example']['mutator']} on "
        f"{s['example']['seed']})"
        for s in report["signatures"]
    )


@pytest.mark.timeout(180)
def test_seeded_run_reads_or_refuses_every_mutant_in_budget(tmp_path):
    report = run(n=300, seed=0, jobs=2, budget="512M", timeout=10, seeds="generated", out=tmp_path, progress=None)
    message = f"\n{format_report(report)}\n\nfailures:\n{_failures(report)}"
    outcomes = report["outcomes"]
    assert sum(outcomes.values()) == 300
    assert outcomes["other"] == 0, message
    assert outcomes["timeout"] == 0, message
    assert outcomes["killed"] == 0, message
    assert report["within_budget"], message
    assert report["fallbacks"] == {}, message  # every mutator found what it edits in the generated seeds
    assert {r["rows"] for r in report["table"]} >= {"kind dicom", "kind nifti", "kind picture", "kind zip", "total"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    kinds = (tmp_path / "summary.md").read_text().count("| kind ")  # dicom, nifti, picture, zip and the new four
    assert summary["outcomes"] == outcomes and kinds == 8, kinds
    assert (tmp_path / "failures.jsonl").read_text() == ""


def test_a_mutant_regenerates_byte_identical_from_its_recipe():
    seeds = {s.id: s for s in generated_seeds()}
    again = {s.id: s for s in generated_seeds()}  # seeds are the same bytes when made again
    assert {k: s.data for k, s in seeds.items()} == {k: s.data for k, s in again.items()}
    changed = 0
    for i in range(80):
        recipe = plan(7, i, list(seeds.values()))
        data, details, name = make_mutant(recipe, seeds)
        data2, details2, name2 = make_mutant(json.loads(json.dumps(recipe)), again)
        assert (data2, details2, name2) == (data, details, name), recipe
        changed += data != seeds[recipe["seed"]].data
    assert changed >= 75
    assert plan(7, 3, list(seeds.values())) != plan(8, 3, list(seeds.values()))


def test_every_mutator_edits_every_seed_it_applies_to():
    seeds = generated_seeds()
    for m in MUTATORS.values():
        used = [s for s in seeds if s.kind in m.kinds and m.applies(s)]
        assert used, f"{m.name} applies to no generated seed"
        for s in used:  # no exception (which would make the harness fall back to bit flips)
            outputs = [m.fn(s.data, random.Random(k), s) for k in range(3)]
            assert any(data != s.data for data, _ in outputs), (m.name, s.id)  # one draw may be a no-op
            for data, details in outputs:
                assert isinstance(data, bytes)
                json.dumps(plain(details))


def test_dicom_edits_land_where_pydicom_reads_them():
    seeds = {s.id: s for s in generated_seeds()}
    for sid in ("gen:ct_slice.dcm", "gen:ct_deflated.dcm"):
        d = DicomFile.parse(seeds[sid].data)
        d.put("Rows", 65535)
        d.put("PixelSpacing", "abc\\1e400", b"DS")
        d.put_raw(TAGS["ContentSequence"], nested_sequence(20, d.explicit, d.little, undefined=True))
        ds = pydicom.dcmread(io.BytesIO(d.to_bytes()))
        depth, item = 0, ds
        while "ContentSequence" in item:
            item, depth = item.ContentSequence[0], depth + 1
        assert (ds.Rows, depth) == (65535, 20)
        assert ds.get_item("PixelSpacing").value == b"abc\\1e400 "  # written although no DS parses it
        assert ds.file_meta.TransferSyntaxUID == d.ts


def test_bombs_inflate_to_what_they_declare():
    head = b"header"
    stream = deflated_then_zeros(head, (64 << 20) * 2 + 5)
    d = zlib.decompressobj(-15)
    out = d.decompress(stream, 1 << 20)
    assert out.startswith(head) and len(stream) < 1 << 20
    total = len(out)
    while d.unconsumed_tail or not d.eof:
        total += len(d.decompress(d.unconsumed_tail, 64 << 20))
    assert total == len(head) + (64 << 20) * 2 + 5
    assert crc_zeros(zlib.crc32(head), 1000) == zlib.crc32(head + bytes(1000))


@pytest.mark.timeout(60)
def test_child_outcomes_are_classified(tmp_path):
    cases = [
        "untyped",
        "untyped_in_medtl",
        "typed",
        "sleep",
        "segfault",
        "exit",
        "allocate_16g",
        "touch_96m",
        "touch_40m",
    ]
    results = {}
    with Server(FAKE, budget=64 << 20) as server:
        for what in cases:
            path = tmp_path / f"{what}.dcm"
            path.write_text(what)
            t0 = time.monotonic()
            results[what] = {**server.read(path, timeout=1.5), "wall": time.monotonic() - t0}
    r = results["untyped"]
    assert (r["outcome"], r["error"], r["message"]) == ("other", "KeyError", "'no such key'"), r
    assert r["location"] == "" and r["where"].startswith("tests/io/test_fuzz.py:"), r
    r = results["untyped_in_medtl"]
    assert (r["outcome"], r["error"]) == ("other", "TypeError") and r["location"].startswith("medtl/errors.py:"), r
    assert (results["typed"]["outcome"], results["typed"]["error"]) == ("typed", "CorruptImageError")
    r = results["sleep"]
    assert r["outcome"] == "timeout" and r["wall"] < 8, r
    assert (results["segfault"]["outcome"], results["segfault"]["error"]) == ("killed", "SIGSEGV")
    assert (results["exit"]["outcome"], results["exit"]["error"]) == ("killed", "exit status 3")
    r = results["allocate_16g"]  # the address-space limit turned a runaway allocation into MemoryError
    assert (r["outcome"], r["error"]) == ("other", "MemoryError") and r["peak_kib"] < 64 << 10, r
    r = results["touch_96m"]  # the cap is the budget: 96 MiB really used is refused, the peak stays under it
    assert r["outcome"] == "other" and r["error"].endswith("MemoryError") and r["peak_kib"] < 64 << 10, r
    r = results["touch_40m"]  # memory really used within the budget is read and measured
    assert r["outcome"] == "read" and 36 << 10 < r["peak_kib"] < 64 << 10, r


@pytest.mark.timeout(60)
def test_cli_exits_1_and_records_failures(tmp_path, capsys):
    out = tmp_path / "fz"
    code = fuzz_main(
        [
            "--n",
            "6",
            "--seed",
            "1",
            "--jobs",
            "1",
            "--budget",
            "256M",
            "--seeds",
            "generated",
            "--out",
            str(out),
            "--keep-failures",
            "--reader",
            "tests.io.test_fuzz:always_untyped",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 1
    assert "| **total** | 6 | 0 | 0 | 6 | 0 | 0 |" in printed, printed
    assert "6  other: ValueError at tests/io/test_fuzz.py:" in printed, printed
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["index"] for f in failures] == list(range(6))
    assert {"seed", "mutator", "details", "run_seed"} <= set(failures[0])
    assert len(list((out / "failures").iterdir())) == 6
    seeds = {s.id: s for s in generated_seeds()}
    data, _, name = make_mutant(failures[0], seeds)
    assert (out / "failures" / name).read_bytes() == data  # the recorded recipe regenerates the kept file


def always_untyped(path):
    raise ValueError("untyped on purpose")
