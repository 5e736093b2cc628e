"""`medtl pacs watch` (issue 32, item 4) against a real Orthanc: studies loaded before and after it starts
(one JPEG 2000) are each answered exactly once, through an outage of Orthanc in the middle of a study (Orthanc
stopped while the study's results are on their way, restarted on the same storage); /health answers on
loopback; SIGTERM stops it leaving nothing in its TMPDIR, and a restart goes on from the change it had reached.
Without Orthanc: one watcher per state folder, /health's answers."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pydicom
import pytest
import requests

from medtl.cli import main
from medtl.clinical.orthanc import OrthancServer, find_orthanc
from medtl.clinical.pacs import Credentials, study_key
from medtl.clinical.watch import HealthServer, OrthancChanges, WatchConfig, watch
from medtl.errors import MedtlError
from tests.clinical.pacs_proxy import PacsProxy
from tests.clinical.test_pacs_robust import _study

CLI = "import sys; from medtl.cli import main; sys.exit(main(sys.argv[1:]))"
FINAL = ("answered", "refused", "error")


def _health(port: int) -> dict:
    try:
        return requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
    except requests.RequestException:
        return {}


def _until(what: str, ok, watcher: subprocess.Popen) -> None:
    """Wait until ``ok()`` (bounded by a number of checks, not by time); the watcher must stay up meanwhile."""
    for _ in range(1500):
        if ok():
            return
        assert watcher.poll() is None, f"the watcher exited ({watcher.returncode}) waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"never: {what}")


def _results(server, study_uid: str) -> Counter:
    """How many instances of each modality the study holds in Orthanc (SR: reports, OT: the Secondary Captures)."""
    rest, auth = f"http://127.0.0.1:{server.port}", (server.credentials.user, server.credentials.password)
    (found,) = requests.post(f"{rest}/tools/lookup", data=study_uid, auth=auth, timeout=10).json()
    series = requests.get(f"{rest}/studies/{found['ID']}/series", auth=auth, timeout=10).json()
    return Counter({s["MainDicomTags"]["Modality"]: len(s["Instances"]) for s in series})


def _rows(path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        return [(r["study"], r["status"]) for r in csv.DictReader(f)]


def _start(tiny_run, url, state, tmp, port, *extra) -> subprocess.Popen:
    args = ["-v", "pacs", "watch", str(tiny_run), url, "--state", str(state), "--poll-seconds", "0.5"]
    args += ["--health-port", str(port), "--retries", "0", "--answer-unfamiliar", *extra]
    out, err = open(tmp.parent / "out.txt", "ab"), open(tmp.parent / "err.txt", "ab")
    with out, err:
        return subprocess.Popen(
            [sys.executable, "-c", CLI, *args], env=dict(os.environ, TMPDIR=str(tmp)), stdout=out, stderr=err
        )


def _stop(watcher: subprocess.Popen, tmp, code: int = 0, signalled: bool = False) -> None:
    """SIGTERM (unless ``signalled`` already): exit status ``code``, and nothing left in the watcher's TMPDIR."""
    if not signalled:
        watcher.send_signal(signal.SIGTERM)
    assert watcher.wait(timeout=120) == code
    assert list(tmp.rglob("*")) == []  # the studies' images, results, folders: gone


@pytest.mark.pacs
def test_watch_answers_each_study_once_through_an_outage_and_a_restart(sample_dir, tiny_run, tmp_path, monkeypatch):
    if find_orthanc() is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    server = OrthancServer(tmp_path / "orthanc").start()
    state, tmp, port = tmp_path / "state", tmp_path / "tmpdir", OrthancServer(tmp_path / "unused").port
    tmp.mkdir()
    monkeypatch.setenv("MEDTL_PACS_USER", server.credentials.user)
    monkeypatch.setenv("MEDTL_PACS_PASSWORD", server.credentials.password)
    watcher = None
    try:
        # three studies before the watcher starts (taken with --backlog), one of them JPEG 2000
        uids = [_study(sample_dir, server, 10), _study(sample_dir, server, 11, pydicom.uid.JPEG2000Lossless)]
        uids.append(_study(sample_dir, server, 12))
        with PacsProxy(server.url) as proxy:  # DICOMweb through the proxy (to hold a STOW), the feed direct
            proxy.hold_posts = True
            rest = f"http://127.0.0.1:{server.port}"
            watcher = _start(tiny_run, proxy.url, state, tmp, port, "--backlog", "--orthanc", rest)
            assert proxy.held.wait(600), "no study's results were ever sent"
            server.stop()  # the outage: Orthanc goes while the first study's results are on their way
            proxy.rule = lambda method, path: 502  # (what a reverse proxy says while its PACS is down)
            proxy.release()
            _until("the outage is seen", lambda: _health(port).get("status") == "degraded", watcher)
            down = requests.get(f"http://127.0.0.1:{port}/health", timeout=10)
            assert down.status_code == 503 and down.json()["last_error"] == "PacsError"
            server.start()  # the same storage and port: the studies and the change feed are still there
            proxy.rule = lambda method, path: None
            uids += [_study(sample_dir, server, 13), _study(sample_dir, server, 14)]  # new arrivals
            _until("5 studies answered", lambda: _health(port).get("studies_done") == 5, watcher)
        health = _health(port)
        assert health["status"] == "ok" and health["studies_failed"] == 0 and health["studies_to_retry"] == 0
        assert health["last_change"] > 0
        _stop(watcher, tmp)

        # stopped: a study arrives; the restarted watcher (no --backlog) goes on from the change it had reached,
        # is stopped in the middle of that study (its images on disk), and answers it at the next start
        uids.append(_study(sample_dir, server, 15))
        with PacsProxy(server.url) as proxy:
            proxy.hold_posts = True
            watcher = _start(tiny_run, proxy.url, state, tmp, port, "--orthanc", rest)
            assert proxy.held.wait(600), "the sixth study's results were never sent"
            assert list(tmp.rglob("*.dcm")), "no retrieved image on disk: the test would prove nothing"
            watcher.send_signal(signal.SIGTERM)
            proxy.release()
            _stop(watcher, tmp, 128 + signal.SIGTERM, signalled=True)
        assert study_key(uids[-1]) not in {key for key, _ in _rows(state / "studies.csv")}
        watcher = _start(tiny_run, server.url, state, tmp, port)
        _until("the sixth study answered", lambda: _health(port).get("studies_done") == 1, watcher)
        _stop(watcher, tmp)
        counts = {uid: _results(server, uid) for uid in uids}
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
        server.stop()
    keys = {study_key(uid): uid for uid in uids}
    rows = _rows(state / "studies.csv")
    final = Counter(key for key, status in rows if status in FINAL)
    assert final == Counter(list(keys)) and {s for _, s in rows if s in FINAL} == {"answered"}, rows
    assert "retry" in {s for _, s in rows}, "the outage hit no study: the test would prove less"
    for uid, count in counts.items():  # each study's SR and Secondary Capture stored exactly once
        assert count["SR"] == 1 and count["OT"] == 1, (study_key(uid), count)
    audit = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    assert Counter(a["study"] for a in audit if a["status"] in FINAL) == Counter(list(keys))
    assert all(set(a) == {"time", "study", "status", "seconds"} for a in audit)
    said = (tmp_path / "out.txt").read_text() + (tmp_path / "err.txt").read_text()
    assert said.count('"status": "answered"') == 6
    assert not any(uid in said for uid in uids) and server.credentials.password not in said
    assert json.loads((state / "watch.json").read_text())["pending"] == {}
    assert oct(state.stat().st_mode & 0o777) == "0o700"


@pytest.mark.pacs
def test_watch_refused_credentials_stop_it_with_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    if find_orthanc() is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    with OrthancServer(tmp_path / "orthanc") as server:
        monkeypatch.setenv("MEDTL_PACS_USER", server.credentials.user)
        monkeypatch.setenv("MEDTL_PACS_PASSWORD", "wrong")
        assert main(["pacs", "watch", str(tiny_run), server.url, "--state", str(tmp_path / "state")]) == 2
        err = capsys.readouterr().err
        assert "refused the credentials (HTTP 401)" in err and "wrong" not in err
        assert main(["pacs", "watch", str(tiny_run), "http://127.0.0.1:9/pacs", "--state", str(tmp_path / "s")]) == 2
        assert "--orthanc" in capsys.readouterr().err


def test_one_watcher_per_state_folder(tmp_path):
    import fcntl

    state = tmp_path / "state"
    state.mkdir()
    changes = OrthancChanges("http://127.0.0.1:9", Credentials("a", "b"))
    stop = threading.Event()
    stop.set()  # (stops at once: nothing is asked of the PACS)
    assert watch(None, None, changes, WatchConfig(state), stop) == 0
    with open(state / "watch.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a watcher is running on it
        with pytest.raises(MedtlError, match="another `medtl pacs watch` uses the state folder"):
            watch(None, None, changes, WatchConfig(state), stop)


def test_health_answers_json_on_loopback_only():
    state = {"status": "starting", "studies_done": 0}
    health = HealthServer(0, lambda: state)
    try:
        url = f"http://127.0.0.1:{health.port}"
        assert health.server.server_address[0] == "127.0.0.1"
        r = requests.get(f"{url}/health", timeout=10)
        assert r.status_code == 503 and r.json() == state
        state["status"] = "ok"
        r = requests.get(f"{url}/health", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert requests.get(f"{url}/studies", timeout=10).status_code == 404
    finally:
        health.close()
