"""`medtl pacs serve` (issue 32, items 5 and 7): Orthanc's storage, temporary folder and files are private
(0700/0600), even in a folder that was not; serve notices Orthanc dying, and Orthanc dies with a SIGKILLed
serve; the password is kept across restarts unless --new-password asks for a new one."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import requests

from medtl.clinical.orthanc import OrthancServer, find_orthanc
from medtl.clinical.pacs import Credentials

pytestmark = pytest.mark.pacs
CLI = "import sys; from medtl.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(autouse=True)
def _orthanc_installed():
    if find_orthanc() is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")


def _modes(folder) -> dict[str, str]:
    """Every path under ``folder`` (and itself) whose mode lets anyone but its owner in."""
    wrong = {}
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files, ""]:
            path = os.path.join(root, name)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & 0o077:
                wrong[path] = oct(mode)
    return wrong


def test_storage_and_temporary_files_are_private(tmp_path, sample_dir):
    storage = tmp_path / "storage"
    storage.mkdir(mode=0o755)
    storage.chmod(0o755)
    (storage / "old.txt").write_text("from before")
    os.chmod(storage / "old.txt", 0o644)
    with OrthancServer(storage) as server:
        assert server.upload(sorted((sample_dir / "dicom").glob("*.dcm"))[:2]) == 2
        assert server.config()["TemporaryDirectory"].startswith(str(storage))
        assert _modes(storage) == {}


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _serve(storage, port, *extra) -> tuple[subprocess.Popen, int]:
    """``medtl pacs serve`` started and answering; (its process, Orthanc's pid)."""
    serve = subprocess.Popen(
        [sys.executable, "-u", "-c", CLI, "pacs", "serve", "--storage", str(storage), "--port", str(port), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in serve.stdout:
        if "Orthanc DICOMweb on" in line:
            break
    else:
        raise AssertionError(serve.stderr.read())
    (orthanc,) = _children(serve.pid)
    return serve, orthanc


def _gone(pid: int) -> bool:
    for _ in range(600):  # Orthanc stops within seconds of its signal; a bound on the loop, not a timing check
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def _password(storage) -> str:
    return json.loads((storage / "credentials.json").read_text())["password"]


def test_serve_supervises_orthanc_and_keeps_its_password(tmp_path):
    storage, port = tmp_path / "storage", OrthancServer(tmp_path / "unused").port
    url = f"http://127.0.0.1:{port}/dicom-web/studies"
    serve, orthanc = _serve(storage, port)
    first = _password(storage)
    try:
        os.kill(orthanc, signal.SIGKILL)  # Orthanc dies: serve says so and stops with an error
        assert serve.wait(timeout=120) == 1
        assert "stopped on its own" in serve.stderr.read()
    finally:
        serve.kill()
        serve.wait()

    serve, orthanc = _serve(storage, port)  # restarted: the same password
    try:
        assert _password(storage) == first
        assert requests.get(url, auth=("medtl", first), timeout=10).status_code == 200
        serve.kill()  # SIGKILL: no handler runs; Orthanc must not outlive serve
        serve.wait()
        assert _gone(orthanc), "Orthanc outlived a SIGKILLed serve"
    finally:
        if not _gone(orthanc):
            os.kill(orthanc, signal.SIGKILL)

    serve, orthanc = _serve(storage, port, "--new-password")  # asked for: a new one
    try:
        assert _password(storage) != first
        assert requests.get(url, auth=("medtl", first), timeout=10).status_code == 401
        assert Credentials.load(storage / "credentials.json").password == _password(storage)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=120) == 0 and _gone(orthanc)
    finally:
        serve.kill()
        serve.wait()


def _own_address() -> str | None:
    """This machine's address on its first non-loopback interface, if it has one."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))  # no packet is sent: only the route is looked up
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def test_a_request_from_another_address_is_refused_even_with_the_password():
    """Orthanc 1.10 cannot listen on loopback only (its port is open on every interface): remote access off
    must refuse what does not come from 127.0.0.1, whatever the credentials."""
    address = _own_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to ask from")
    with OrthancServer() as server:
        auth = (server.credentials.user, server.credentials.password)
        assert requests.get(f"{server.url}/studies", auth=auth, timeout=10).status_code == 200
        remote = f"http://{address}:{server.port}/dicom-web/studies"
        assert requests.get(remote, auth=auth, timeout=10).status_code in (401, 403)
