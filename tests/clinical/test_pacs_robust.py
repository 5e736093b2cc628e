"""`medtl pacs` against a real Orthanc that fails (issue 32, items 1, 2, 6, 8): a temporary failure (an outage, HTTP
5xx) is retried with back-off and stays retryable in the --csv, a refusal (HTTP 4xx) is recorded for good; a JPEG
2000 study is retrieved as stored and answered; SIGTERM in the middle of a run leaves no patient image on disk;
`pacs query` imports neither torch nor MONAI. The failures are made by stopping Orthanc, or by a proxy in front
of it (tests/clinical/pacs_proxy.py)."""

import csv
import os
import signal
import subprocess
import sys

import pydicom
import pytest

from medtl.cli import main
from medtl.clinical.orthanc import OrthancServer, find_orthanc
from medtl.clinical.pacs import Pacs, PacsError, study_key
from tests.clinical.pacs_proxy import PacsProxy

pytestmark = pytest.mark.pacs


def _study(sample_dir, server, k: int, syntax=None) -> str:
    """A new study in ``server`` from the k-th sample image (compressed to ``syntax`` if given); its UID."""
    ds = pydicom.dcmread(sorted((sample_dir / "dicom").glob("*.dcm"))[k])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    if syntax is not None:
        ds.compress(syntax)
    assert Pacs(server.url, server.credentials).store([ds]) == (1, 0)
    return str(ds.StudyInstanceUID)


def _rows(path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        return [(r["study"], r["status"]) for r in csv.DictReader(f)]


def _run(run, url, uid, csv_path, *extra) -> int:
    return main(["pacs", "run", str(run), url, "--study", uid, "--csv", str(csv_path), *extra])


def test_http_5xx_is_retried_and_stays_retryable_a_4xx_is_recorded_for_good(env, tiny_run, sample_dir, tmp_path):
    uid, refused_uid = _study(sample_dir, env, 5), _study(sample_dir, env, 6)
    key, table = study_key(uid), tmp_path / "run.csv"
    with PacsProxy(env.url) as proxy:
        proxy.rule = lambda method, path: 503  # the PACS in trouble
        assert _run(tiny_run, proxy.url, uid, table, "--retries", "1") == 1
        assert len(proxy.requests) == 2  # tried, then once more after the back-off
        assert _rows(table) == [(key, "retry")]
        proxy.rule = lambda method, path: None  # back: the rerun tries the study again and answers it
        assert _run(tiny_run, proxy.url, uid, table) in (0, 3)
        assert _rows(table)[-1][0] == key and _rows(table)[-1][1] in ("answered", "refused")
        assert _run(tiny_run, proxy.url, uid, table) == 0 and len(_rows(table)) == 2  # done: skipped

        proxy.rule = lambda method, path: 403  # a refusal is not retried, now or by a rerun
        n = len(proxy.requests)
        assert _run(tiny_run, proxy.url, refused_uid, table) == 1 and len(proxy.requests) == n + 1
        assert _rows(table)[-1] == (study_key(refused_uid), "error")
        proxy.rule = lambda method, path: None
        assert _run(tiny_run, proxy.url, refused_uid, table) == 0 and len(_rows(table)) == 3

        # within one call: two failures, then an answer, after a back-off
        calls = iter(range(100))
        proxy.rule = lambda method, path: 502 if next(calls) < 2 else None
        assert Pacs(proxy.url, env.credentials, retries=2, backoff=0.01).query(study_uid=uid)[0]["key"] == key
        with pytest.raises(PacsError, match="HTTP 502") as e:
            calls = iter(range(100))
            Pacs(proxy.url, env.credentials, retries=1, backoff=0.01).query()
        assert e.value.transient


def test_an_outage_of_the_real_orthanc_is_retried_by_the_rerun(sample_dir, tiny_run, tmp_path, monkeypatch):
    if find_orthanc() is None:
        pytest.skip("Orthanc is not installed")
    server = OrthancServer(tmp_path / "orthanc").start()
    try:
        monkeypatch.setenv("MEDTL_PACS_USER", server.credentials.user)
        monkeypatch.setenv("MEDTL_PACS_PASSWORD", server.credentials.password)
        uid, table = _study(sample_dir, server, 7), tmp_path / "run.csv"
        server.stop()  # the outage
        assert _run(tiny_run, server.url, uid, table, "--retries", "0") == 1
        assert _rows(table) == [(study_key(uid), "retry")]
        server.start()  # the same storage and port: the study is still there
        assert _run(tiny_run, server.url, uid, table) in (0, 3)
        assert [s for _, s in _rows(table)][1] in ("answered", "refused")
    finally:
        server.stop()


def test_a_jpeg_2000_study_is_retrieved_as_stored_and_answered(env, tiny_run, sample_dir, tmp_path):
    uid = _study(sample_dir, env, 8, syntax=pydicom.uid.JPEG2000Lossless)
    files = Pacs(env.url, env.credentials).retrieve(uid, tmp_path / "got")
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    assert _run(tiny_run, env.url, uid, tmp_path / "run.csv", "--answer-unfamiliar") == 0
    assert _rows(tmp_path / "run.csv") == [(study_key(uid), "answered")]


CLI = "import sys; from medtl.cli import main; sys.exit(main(sys.argv[1:]))"


def test_sigterm_during_a_run_leaves_no_image_in_the_temporary_folder(env, tiny_run, sample_dir, tmp_path):
    uid = _study(sample_dir, env, 9)
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    child_env = dict(os.environ, TMPDIR=str(tmp))
    with PacsProxy(env.url) as proxy:
        proxy.hold_posts = True  # the results' STOW-RS waits: the study's images are on disk meanwhile
        args = ["pacs", "run", str(tiny_run), proxy.url, "--study", uid, "--answer-unfamiliar"]
        child = subprocess.Popen([sys.executable, "-c", CLI, *args], env=child_env, stderr=subprocess.PIPE)
        try:
            assert proxy.held.wait(600), "the run never stored its results"
            assert list(tmp.rglob("*.dcm")), "no retrieved image on disk: the test would prove nothing"
            child.send_signal(signal.SIGTERM)
            proxy.release()
            err = child.communicate(timeout=120)[1].decode()
        finally:
            child.kill()
    assert child.returncode == 128 + signal.SIGTERM, err
    assert list(tmp.rglob("*")) == []  # the images, the results, the folder: gone
    assert uid not in err


def test_pacs_query_imports_no_torch_or_monai(env):
    code = (
        "import sys; from medtl.cli import main\n"
        f"code = main(['pacs', 'query', {env.url!r}])\n"
        "import medtl.clinical.orthanc\n"
        "print(code, sorted(m for m in ('torch', 'monai', 'timm', 'highdicom') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"
