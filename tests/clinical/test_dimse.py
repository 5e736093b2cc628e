"""DIMSE: `medtl pacs listen` (a C-STORE SCP) receiving from dcmtk's storescu, and `pacs query`/`pacs run` over
C-FIND and C-GET/C-MOVE against a real Orthanc's DICOM port (cross-checked with dcmtk's findscu). Received
images are private and gone once a study is answered or the listener stops; AE titles not allowed are
rejected; canaries planted in the sources reach no log."""

import csv
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pydicom
import pytest

from medtl.cli import main
from medtl.clinical.dimse import DimseAddress, DimsePacs, check_ae_title
from medtl.clinical.orthanc import OrthancServer
from medtl.clinical.pacs import Pacs, study_key
from medtl.errors import ConfigError

CLI = "import sys; from medtl.cli import main; sys.exit(main(sys.argv[1:]))"
CANARIES = ("CANARYDIMSEPID", "CANARYDIMSE^NAME", "CANARYDIMSEACC")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dcmtk(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"dcmtk's {program} is not installed (apt-get install dcmtk)")
    return path


def _study(sample_dir, folder, accession: str = CANARIES[2] + "1") -> tuple[str, list]:
    """One patient's two CT slices as a new study (its UIDs new, canaries planted: ``accession`` is one), the
    second compressed with JPEG 2000 (lossless) as a modality may send it; (its StudyInstanceUID, its files)."""
    sources = sorted((sample_dir / "dicom").glob("*.dcm"))[:2]
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    folder.mkdir(parents=True)
    files = []
    for k, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.PatientID, ds.PatientName, ds.AccessionNumber = CANARIES[0], CANARIES[1], accession
        if k == 1:
            ds.compress(pydicom.uid.JPEG2000Lossless)
        files.append(folder / f"{k}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    return study_uid, files


def _storescu(port: int, calling: str, files, called: str = "MEDTL") -> subprocess.CompletedProcess:
    return subprocess.run(
        [_dcmtk("storescu"), "-xv", "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _private(path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def _poll(condition, what: str, process=None):
    for _ in range(1200):  # a bound on the loop (a hung listener fails the test), not a timing check
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the listener stopped: {process.stderr.read()}")
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within the loop's bound")


def test_addresses_and_ae_titles_are_checked():
    address = DimseAddress.parse("dimse://ORTHANC@pacs.example:4242")
    assert (address.ae_title, address.host, address.port) == ("ORTHANC", "pacs.example", 4242)
    assert str(address) == "dimse://ORTHANC@pacs.example:4242"
    for bad in ("dimse://pacs.example:4242", "dimse://AE@pacs.example", "http://AE@h:1", "dimse://A:pw@h:1"):
        with pytest.raises(ConfigError, match="dimse://AE@host:port"):
            DimseAddress.parse(bad)
    with pytest.raises(ConfigError, match="1 to 16 characters"):
        check_ae_title("A_TITLE_LONGER_THAN_16")
    from medtl.clinical.dimse_listen import StudyListener

    with pytest.raises(ConfigError, match="--allow"):
        StudyListener(0, [])


@pytest.mark.pacs
def test_listener_spools_privately_rejects_unknown_ae_titles_and_removes_everything(sample_dir, tmp_path, caplog):
    from medtl.clinical.dimse_listen import StudyListener

    caplog.set_level(logging.DEBUG)
    study_uid, files = _study(sample_dir, tmp_path / "study")
    key = study_key(study_uid)
    listener = StudyListener(0, ["MODALITY"], host="127.0.0.1", spool_parent=tmp_path).start()
    try:
        rejected = _storescu(listener.port, "INTRUDER", files)
        assert rejected.returncode != 0 and "Rejected" in rejected.stdout + rejected.stderr
        assert listener.complete(0) == [] and not any(listener.spool.iterdir())
        sent = _storescu(listener.port, "MODALITY", files)
        assert sent.returncode == 0, sent.stderr
        assert listener.complete(3600) == []  # not quiet long enough
        ((got_key, folder),) = listener.complete(0)
        assert got_key == key and folder.name == key
        received = sorted((folder / "images").iterdir())
        assert len(received) == 2 and all(_private(p) for p in [folder, folder / "images", *received])
        syntaxes = {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in received}
        assert pydicom.uid.JPEG2000Lossless in syntaxes  # kept as sent: the reader decodes it
        # the same study again after its batch was taken: a new batch, in its own folder
        assert _storescu(listener.port, "MODALITY", files[:1]).returncode == 0
        spool = listener.spool
    finally:
        listener.stop()
    assert not spool.exists() and not list(tmp_path.glob("medtl-listen-*"))
    assert "INTRUDER" in caplog.text and not any(c in caplog.text for c in CANARIES)
    assert study_uid not in caplog.text


@pytest.mark.pacs
def test_pacs_listen_answers_a_study_once_quiet_and_stops_on_sigterm(orthanc, tiny_run, sample_dir, tmp_path):
    study_uid, files = _study(sample_dir, tmp_path / "study")
    key, port, out, spool = study_key(study_uid), _free_port(), tmp_path / "out", tmp_path / "spool"
    spool.mkdir()
    listen = subprocess.Popen(
        [sys.executable, "-u", "-c", CLI, "-v", "pacs", "listen", str(tiny_run), "--port", str(port)]
        + ["--host", "127.0.0.1", "--allow", "MODALITY,ROUTER", "--out", str(out), "--quiet-seconds", "1"]
        + ["--spool", str(spool), "--answer-unfamiliar", "--store", orthanc.dimse_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in listen.stderr:
            if "listening as AE MEDTL" in line:
                break
        else:
            raise AssertionError("the listener did not start")
        assert _storescu(port, "INTRUDER", files).returncode != 0
        sent = _storescu(port, "ROUTER", files)
        assert sent.returncode == 0, sent.stderr
        _poll(lambda: (out / "studies.csv").is_file(), "the study answered", listen)
        with open(out / "studies.csv", newline="") as f:
            (row,) = list(csv.DictReader(f))
        assert row["study"] == key and row["status"] == "answered", row
        results = sorted((out / key).iterdir())
        assert [p.name for p in results] == ["sc.dcm", "sr.dcm"] and all(_private(p) for p in [out, *results])
        assert pydicom.dcmread(out / key / "sr.dcm").StudyInstanceUID == study_uid  # filed with its study
        (folder,) = spool.glob("medtl-listen-*")
        assert not [p for p in folder.rglob("*") if p.is_file()]  # the received images: deleted
        web = Pacs(orthanc.url, orthanc.credentials)  # and the results stored in the PACS by C-STORE
        stored = [pydicom.Dataset.from_json(s).Modality for s in web.client.search_for_series(study_uid)]
        assert sorted(stored) == ["OT", "SR"]
        # a slice of the study sent again later: a new batch, answered on its own, the first results kept
        assert _storescu(port, "MODALITY", files[:1]).returncode == 0
        _poll(lambda: len((out / "studies.csv").read_text().splitlines()) == 3, "the second batch", listen)
        assert sorted(p.name for p in (out / f"{key}-2").iterdir()) == ["sc.dcm", "sr.dcm"]
        assert sorted(p.name for p in (out / key).iterdir()) == ["sc.dcm", "sr.dcm"]
        assert not [p for p in folder.rglob("*") if p.is_file()]
        listen.send_signal(signal.SIGTERM)
        assert listen.wait(timeout=120) == 0
    finally:
        listen.kill()
        listen.wait()
    said = listen.stdout.read() + listen.stderr.read()
    assert "2 studies answered" in said
    assert not list(spool.iterdir())  # stopped: no spool left
    assert not any(c in said for c in CANARIES) and study_uid not in said


class DicomOrthanc(OrthancServer):
    """Orthanc with its DICOM port on, knowing medtl's AE (MEDTL at ``move_port``, for C-MOVE)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dicom_port, self.move_port = _free_port(), _free_port()

    @property
    def dimse_url(self) -> str:
        return f"dimse://ORTHANC@127.0.0.1:{self.dicom_port}"

    def config(self) -> dict:
        config = super().config()
        config.update(
            DicomServerEnabled=True,
            DicomAet="ORTHANC",
            DicomPort=self.dicom_port,
            DicomModalities={"medtl": ["MEDTL", "127.0.0.1", self.move_port]},
        )
        return config


@pytest.fixture(scope="module")
def orthanc_server_class() -> type[OrthancServer]:
    """The ``orthanc`` fixture (tests/clinical/conftest.py) starts a :class:`DicomOrthanc`."""
    return DicomOrthanc


def _findscu(orthanc, accession: str) -> str:
    found = subprocess.run(
        [_dcmtk("findscu"), "-S", "-aet", "MEDTL", "-aec", "ORTHANC", "-k", "QueryRetrieveLevel=STUDY"]
        + ["-k", f"AccessionNumber={accession}", "-k", "StudyInstanceUID", "127.0.0.1", str(orthanc.dicom_port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.returncode == 0, found.stderr
    return found.stdout + found.stderr


@pytest.mark.pacs
def test_query_and_run_over_dimse_against_orthanc(orthanc, tiny_run, sample_dir, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    accession = CANARIES[2] + "2"
    study_uid, files = _study(sample_dir, tmp_path / "study", accession)
    assert orthanc.upload(files) == 2
    key, url = study_key(study_uid), orthanc.dimse_url
    assert study_uid in _findscu(orthanc, accession)  # dcmtk sees the study medtl's C-FIND finds

    assert main(["pacs", "query", url, "--accession", accession]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert listed == [f"{key}\tCT\t2 instances"]
    # C-GET: the instances as Orthanc holds them (the JPEG 2000 one not transcoded)
    got = DimsePacs(url).retrieve(study_uid, tmp_path / "got")
    assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in got} >= {pydicom.uid.JPEG2000Lossless}
    assert all(_private(p) for p in [tmp_path / "got", *got])

    args = ["pacs", "run", str(tiny_run), url, "--accession", accession, "--answer-unfamiliar"]
    assert main([*args, "--csv", str(tmp_path / "studies.csv")]) == 0
    assert f"{key}\tANSWERED" in capsys.readouterr().out
    web = Pacs(orthanc.url, orthanc.credentials)
    series = [pydicom.Dataset.from_json(s) for s in web.client.search_for_series(study_uid)]
    assert sorted(s.Modality for s in series) == ["CT", "OT", "SR"]  # the results, stored by C-STORE
    # again, by C-MOVE to medtl's own AE: the results are already there, nothing is stored twice
    assert main([*args, "--move-port", str(orthanc.move_port)]) == 0
    assert "0 stored, 2 already there" in capsys.readouterr().out
    assert len(web.client.search_for_series(study_uid)) == 3

    # an AE title the PACS does not know, a PACS that is not there: one clear line each
    assert main(["pacs", "query", url, "--ae-title", "STRANGER", "--retries", "0"]) == 2
    assert "STRANGER" in capsys.readouterr().err
    assert main(["pacs", "query", "dimse://ORTHANC@127.0.0.1:9", "--retries", "0", "--timeout", "5"]) == 2
    assert "cannot be reached" in capsys.readouterr().err
    said = capsys.readouterr()
    text = said.out + said.err + caplog.text
    assert not any(c in text for c in CANARIES) and study_uid not in text
    assert not list(tmp_path.glob("medtl-pacs-*")) and os.path.isdir(tmp_path)
