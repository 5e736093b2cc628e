"""medtl_ui.safety: anonymous upload storage, upload-folder cleanup on signals, login throttling."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medtl_ui import login, safety
from medtl_ui.safety import LoginThrottle, looks_identifying, safe_extension, store_upload

REPO = Path(__file__).resolve().parents[2]

IDENTIFYING = [
    "Doe^John_MRN12345678_CT.dcm",
    "DOE^JOHN.dcm",
    "Doe_John.dcm",
    "Doe-John-CT.dcm",
    "John Doe.png",
    "DOE_JOHN_CT.dcm",
    "JohnDoe.nii.gz",
    "Smith.dcm",
    "Müller_Jürgen.dcm",
    "scan_12345.dcm",
    "19650312_ct.dcm",
    "ct_1965-03-12.dcm",
    "ct_12.03.1965.dcm",
    "ct_03-12-65.dcm",
    "12mar1965.dcm",
    "scan_march_12_1965.dcm",
    "mrn_4711.dcm",
    "MRN4711.dcm",
    "patient7.png",
    "PatientName.dcm",
    "pat_12.dcm",
    "dob_1965.png",
    "ssn-123.dcm",
    "nhs_943.dcm",
    "accession_9.zip",
    "1.2.840.113619.2.55.3.dcm",
    "j.doe@example.org.png",
]
SHOWN = [
    "img_0003.dcm",
    "img_0001.dcm",
    "vol_001.nii.gz",
    "chest.png",
    "series.zip",
    "CT_HEAD.dcm",
    "IM-0001-0001.dcm",
    "slice_12.png",
    "t1_axial.nii",
    "brain_mask.npz",
    "knee_ap.jpg",
    "Chest_Xray.jpeg",
    "IMG_0042.DCM",
    "scan",
]


@pytest.mark.parametrize("name", IDENTIFYING)
def test_identifying_names_are_caught(name):
    assert looks_identifying(name)


@pytest.mark.parametrize("name", SHOWN)
def test_ordinary_names_are_not(name):
    assert not looks_identifying(name)


def test_safe_extension():
    assert [
        safe_extension(n)
        for n in ["a.DCM", "b.nii.GZ", "c.nii", "d.jpeg", "e.exe", "f.tar.gz", "noext", "g.png.sh", "h.npz"]
    ] == [".dcm", ".nii.gz", ".nii", ".jpeg", "", "", "", "", ".npz"]


# -- store_upload ----------------------------------------------------------------------------------


def _gradio_upload(workdir: Path, name: str, data: bytes) -> Path:
    """Where Gradio puts an upload: <GRADIO_TEMP_DIR>/<sha256>/<original name>."""
    folder = workdir / os.urandom(32).hex()
    folder.mkdir()
    (folder / name).write_bytes(data)
    return folder / name


def test_store_upload_moves_renames_and_hides(tmp_path):
    workdir = tmp_path / "medtl-ui-x"
    workdir.mkdir(mode=0o700)
    secret = _gradio_upload(workdir, "Doe^John_MRN12345678_CT.dcm", b"secret scan")
    plain = _gradio_upload(workdir, "img_0003.dcm", b"plain scan")
    odd = _gradio_upload(workdir, "x<script>.PNG", b"png")
    stored = store_upload([str(secret), None, plain, odd], workdir)

    # never the name itself, harmless-looking or not (a lower-case "smith_john.png" cannot be told apart)
    assert [s.display for s in stored] == ["file 1 (.dcm)", "file 2 (.dcm)", "file 3 (.png)"]
    for src in (secret, plain, odd):
        # the original name is gone; Gradio's folder (named by a content hash) stays, empty, for another
        # session's upload of the same bytes that Gradio may be moving into it
        assert not src.exists() and not any(src.parent.iterdir())
    folder = stored[0].path.parent
    assert all(s.path.parent == folder for s in stored) and folder.parent == workdir
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert [s.path.read_bytes() for s in stored] == [b"secret scan", b"plain scan", b"png"]
    for s, ext in zip(stored, [".dcm", ".dcm", ".png"]):
        assert re.fullmatch(r"[0-9a-f]{32}" + re.escape(ext), s.path.name)
    on_disk = "\n".join(str(p) for p in workdir.rglob("*"))
    assert "Doe" not in on_disk and "MRN" not in on_disk and "12345678" not in on_disk and "img_0003" not in on_disk
    assert len({s.path.name for s in stored}) == 3


def test_store_upload_single_path_none_and_extensions(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    assert store_upload(None, workdir) == [] and store_upload([], workdir) == [] and store_upload([""], workdir) == []
    one = store_upload(str(_gradio_upload(workdir, "vol_001.NII.GZ", b"v")), workdir)
    assert len(one) == 1 and one[0].path.name.endswith(".nii.gz") and one[0].display == "file 1 (.nii.gz)"
    bare = store_upload(_gradio_upload(workdir, "Evil.exe", b"x"), workdir)
    assert re.fullmatch(r"[0-9a-f]{32}", bare[0].path.name) and bare[0].display == "file 1"


def test_store_upload_copies_files_outside_workdir_and_keeps_workdir(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    example = tmp_path / "sample_data" / "img_0001.dcm"
    example.parent.mkdir()
    example.write_bytes(b"example")
    direct = workdir / "chest.png"  # straight in workdir: moved, workdir itself is not removed
    direct.write_bytes(b"p")
    stored = store_upload([example, direct], workdir)
    assert example.read_bytes() == b"example"  # a bundled example is never deleted
    assert not direct.exists() and workdir.is_dir()
    assert [s.path.read_bytes() for s in stored] == [b"example", b"p"]


def test_store_upload_across_filesystems_copies_then_unlinks(tmp_path, monkeypatch):
    workdir = tmp_path / "w"
    workdir.mkdir()
    src = _gradio_upload(workdir, "Doe_Jane.dcm", b"data")

    def exdev(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(safety.os, "rename", exdev)
    (stored,) = store_upload([src], workdir)
    assert not src.exists() and stored.path.read_bytes() == b"data" and stored.display == "file 1 (.dcm)"
    assert stat.S_IMODE(stored.path.stat().st_mode) == 0o600


def test_store_upload_failure_leaves_no_partial_folder(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    good = _gradio_upload(workdir, "a.dcm", b"a")
    with pytest.raises(ValueError):
        store_upload([good, workdir / "missing.dcm"], workdir)
    assert not list(workdir.glob("upload-*"))


# -- install_cleanup -------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    from medtl_ui.safety import install_cleanup

    # as in an interactive start, whatever this test runner was started with
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # (a runner started under nohup passes SIGHUP on ignored)
    {setup}
    work = Path(sys.argv[1])
    work.mkdir()
    (work / "Doe^John.dcm").write_bytes(b"upload")
    install_cleanup(work)
    install_cleanup(work)  # idempotent
    {after}
    print("ready", flush=True)
    time.sleep(30)
    print("not interrupted", flush=True)
""")


def _start(tmp_path, setup="", after=""):
    work = tmp_path / "medtl-ui-child"
    code = CHILD.format(setup=setup, after=after)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(work)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        pytest.fail(f"child did not start: {line!r} {proc.communicate()[1]}")
    assert (work / "Doe^John.dcm").exists()
    return proc, work


@pytest.mark.parametrize(
    "sig, expected",
    [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, -signal.SIGINT), (signal.SIGHUP, -signal.SIGHUP)],
)
def test_signal_removes_the_upload_folder(tmp_path, sig, expected):
    proc, work = _start(tmp_path)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    assert not work.exists()
    # SIGTERM/SIGHUP: killed by the signal; SIGINT: KeyboardInterrupt, which Python ends with SIGINT
    assert proc.returncode == expected, (proc.returncode, err)
    assert "not interrupted" not in out


def test_previous_handler_still_runs_and_ignored_signals_stay_ignored(tmp_path):
    setup = (
        "def previous(s, f):\n"
        "    print('previous handler', flush=True); sys.exit(7)\n"
        "signal.signal(signal.SIGTERM, previous)\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)"
    )
    after = "assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN"
    proc, work = _start(tmp_path, setup=setup, after=after)
    proc.send_signal(signal.SIGHUP)  # ignored: nothing happens, the folder stays
    time.sleep(0.2)
    assert proc.poll() is None and work.exists()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert not work.exists() and "previous handler" in out and proc.returncode == 7, (out, err)


def test_from_another_thread_only_atexit(tmp_path):
    code = textwrap.dedent("""
        import logging, signal, sys, threading
        from pathlib import Path
        from medtl_ui.safety import install_cleanup
        logging.basicConfig(level=logging.WARNING)
        work = Path(sys.argv[1]); work.mkdir(); (work / "f").write_text("x")
        before = signal.getsignal(signal.SIGTERM)
        t = threading.Thread(target=install_cleanup, args=(work,)); t.start(); t.join()
        assert signal.getsignal(signal.SIGTERM) is before
        print("exists", work.exists())
    """)
    work = tmp_path / "w"
    r = subprocess.run([sys.executable, "-c", code, str(work)], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "exists True" in r.stdout and "not installed" in r.stderr
    assert not work.exists()  # removed by atexit at normal exit


# -- LoginThrottle ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_locks_with_growing_delay(caplog):
    clock = FakeClock()
    t = LoginThrottle("doctor", "s3cret", clock=clock)
    with caplog.at_level(logging.WARNING, logger="medtl.ui.safety"):
        assert not any(t("doctor", f"guess{i}") for i in range(50))
    assert 4 <= t.checks <= 6  # 3 free failures, the 4th locks; the other 46 are refused unchecked
    assert t.lock_remaining("doctor") == pytest.approx(1.0)
    assert not t("doctor", "s3cret")  # the right password during a lock
    assert t.checks == 4
    assert all("doctor" not in r.getMessage() and "guess" not in r.getMessage() for r in caplog.records)
    assert any(r.getMessage() == "login refused (locked for 1 s)" for r in caplog.records)

    delays = []
    for _ in range(8):  # each further failure doubles the lock: 1, 2, 4, ... capped at 60 s
        clock.now += t.lock_remaining("doctor") + 0.001
        assert not t("doctor", "wrong")
        delays.append(round(t.lock_remaining("doctor"), 3))
    assert delays == [2, 4, 8, 16, 32, 60, 60, 60]

    clock.now += 60.001
    assert t("doctor", "s3cret")  # after the lock: accepted, and the count is reset
    checks = t.checks
    assert not any(t("doctor", "wrong") for _ in range(3)) and t.lock_remaining("doctor") == 0
    assert t.checks == checks + 3


def test_throttle_wrong_user_names_share_one_count_and_need_both_right():
    clock = FakeClock()
    t = LoginThrottle("doctor", "s3cret", clock=clock, global_free_failures=None)
    assert not t("nurse", "s3cret") and not t("doctor", "nope")
    for i in range(10):
        t(f"user{i}", "x")  # changing the user name does not reset the count
    assert t.checks <= 6 and t.lock_remaining("someone") > 0
    assert t("doctor", "s3cret")  # the real account was not locked by the other names


def test_throttle_per_client_and_the_optional_global_backstop():
    clock = FakeClock()
    t = LoginThrottle("doctor", "s3cret", clock=clock, global_free_failures=10)
    token = login._client.set("10.0.0.1")
    try:
        assert not any(t("doctor", "x") for _ in range(20))
        assert t.checks == 4
    finally:
        login._client.reset(token)
    token = login._client.set("10.0.0.2")
    try:
        assert t("doctor", "s3cret")  # another client is not locked
        for i in range(30):  # an attacker that changes address each time meets the global lock
            login._client.set(f"10.1.0.{i}")
            t("doctor", "x")
        assert t.checks <= 4 + 1 + 12
        login._client.set("10.9.9.9")
        assert not t("doctor", "s3cret") and t.lock_remaining("doctor", "10.9.9.9") > 0
    finally:
        login._client.reset(token)


# -- the real Gradio /login ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(throttle, **launch):
    import gradio as gr

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # restored by conftest
    with gr.Blocks() as demo:
        gr.Markdown("hello")
    port = _free_port()
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        auth=throttle,
        prevent_thread_lock=True,
        quiet=True,
        ssr_mode=False,
        share=False,
        **launch,
    )
    return f"http://127.0.0.1:{port}"


def test_gradio_login_is_throttled():
    import gradio as gr
    import httpx

    throttle = LoginThrottle("u", "p", base_delay=1.0)
    try:
        base = _serve(throttle)
        with httpx.Client(base_url=base, timeout=10) as c:
            codes = [c.post("/login", data={"username": "u", "password": f"bad{i}"}).status_code for i in range(20)]
            assert set(codes) == {400}
            assert throttle.checks <= 6  # the later ones were refused during the lock, unchecked
            checks = throttle.checks
            assert throttle.lock_remaining("u") > 0
            assert c.post("/login", data={"username": "u", "password": "p"}).status_code == 400
            assert throttle.checks == checks  # the right password was refused without a check
            time.sleep(throttle.lock_remaining("u") + 0.05)
            ok = c.post("/login", data={"username": "u", "password": "p"})
            assert ok.status_code == 200 and ok.json() == {"success": True}
    finally:
        gr.close_all()


def test_gradio_login_per_client_with_middleware():
    import gradio as gr
    import httpx

    throttle = LoginThrottle("u", "p", base_delay=30.0)
    try:
        base = _serve(throttle, app_kwargs={"middleware": safety.client_middleware()})
        with httpx.Client(base_url=base, timeout=10) as c:
            a = {"X-Forwarded-For": "10.0.0.1"}  # uvicorn takes the client address from it (peer is 127.0.0.1)
            assert {
                c.post("/login", data={"username": "u", "password": "x"}, headers=a).status_code for _ in range(10)
            } == {400}
            assert throttle.checks == 4 and throttle.lock_remaining("u", "10.0.0.1") > 0
            assert c.post("/login", data={"username": "u", "password": "p"}, headers=a).status_code == 400
            b = {"X-Forwarded-For": "10.0.0.2"}
            assert c.post("/login", data={"username": "u", "password": "p"}, headers=b).status_code == 200
    finally:
        gr.close_all()


def test_two_sessions_uploading_the_same_bytes_both_get_the_file(tmp_path):
    """Gradio keeps an upload at a path named by its content's hash: the second session's path is the one the
    first session's store moved away. Both sessions must still get the file (ui_load_check found this)."""
    workdir = tmp_path / "work"
    src = workdir / "c0ffee" / "img.dcm"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"DICM same bytes")
    first = store_upload([str(src)], workdir)
    second = store_upload([str(src)], workdir)
    assert not src.exists()
    assert first[0].path != second[0].path
    assert first[0].path.read_bytes() == second[0].path.read_bytes() == b"DICM same bytes"
    with pytest.raises(ValueError):
        store_upload([str(workdir / "other" / "never.dcm")], workdir)


def test_an_upload_still_on_its_way_is_waited_for(tmp_path, monkeypatch):
    """Gradio answers an upload before its background task moves the file into place: the store waits for
    it (for UPLOAD_WAIT_S), so the next request does not find "not a regular file" (a race seen in CI)."""
    import threading

    workdir = tmp_path / "medtl-ui-w"
    workdir.mkdir(mode=0o700)
    late = workdir / "abc123" / "img.dcm"
    late.parent.mkdir()
    timer = threading.Timer(0.2, lambda: late.write_bytes(b"late scan"))
    timer.start()
    stored = store_upload([str(late)], workdir)
    timer.join()
    assert stored[0].path.read_bytes() == b"late scan" and not late.exists()
    monkeypatch.setattr(safety, "UPLOAD_WAIT_S", 0.1)
    with pytest.raises(ValueError, match="not a regular file"):
        store_upload([str(workdir / "never" / "x.dcm")], workdir)
