"""medtl and a real PACS: Orthanc with its DICOMweb plugin, started by the test with the configuration
medtl writes. Real CT files are stored to it, `medtl pacs run` answers the study, and the SR and the
Secondary Capture found in Orthanc pass dciodvfy; re-running stores nothing twice; a PACS that is down,
a wrong password and a study without images give clear errors and the others go on; canaries planted
in the source reach neither the logs nor, outside the patient and study modules a result must carry
to be filed with its images, the results."""

import csv
import logging
import shutil
import subprocess

import pydicom
import pytest

from medtl.cli import main
from medtl.clinical.pacs import Credentials, Pacs, PacsError
from tests.clinical.test_deid import Canaries
from tests.clinical.test_dicom_results import _dciodvfy_errors, _groups

pytestmark = pytest.mark.pacs

# what a result inherits from its source so the PACS files it with the patient's images
FILED_WITH = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyInstanceUID",
)


def _instances(pacs: Pacs, study_uid: str, modality: str) -> list[pydicom.Dataset]:
    series = [pydicom.Dataset.from_json(s) for s in pacs.client.search_for_series(study_uid)]
    return [
        inst
        for s in series
        if s.Modality == modality
        for inst in pacs.client.retrieve_series(study_uid, s.SeriesInstanceUID)
    ]


@pytest.mark.shared_data
def test_a_real_ct_study_is_answered_and_its_results_stored_once_and_valid(
    env, tiny_run, shared_data, tmp_path, capsys, caplog
):
    caplog.set_level(logging.DEBUG)
    canaries = Canaries()
    source = pydicom.dcmread(shared_data / "dicom" / "ct" / "CT_small.dcm")
    canaries.plant(source)
    source.AccessionNumber = "CANARYACC1"
    canaries.text.append("CANARYACC1")
    uploaded = tmp_path / "up" / "ct.dcm"
    uploaded.parent.mkdir()
    source.save_as(uploaded)
    assert env.upload([uploaded]) == 1
    pacs = Pacs(env.url, env.credentials)
    studies = pacs.query(accession="CANARYACC1")
    assert len(studies) == 1 and studies[0]["modalities"] == "CT"
    key = studies[0]["key"]

    # the synthetic-trained model refuses a real CT (a "Not assessed" SR), then is made to answer it
    first = main(["-v", "pacs", "run", str(tiny_run), env.url, "--accession", "CANARYACC1"])
    assert first in (0, 3)
    args = [
        "-v",
        "pacs",
        "run",
        str(tiny_run),
        env.url,
        "--accession",
        "CANARYACC1",
        "--answer-unfamiliar",
        "--csv",
        str(tmp_path / "studies.csv"),
    ]
    assert main(args) == 0
    srs, sc = _instances(pacs, source.StudyInstanceUID, "SR"), _instances(pacs, source.StudyInstanceUID, "OT")

    def finding(ds):  # the finding's qualitative evaluation (TID 1500): Present, Absent or Not Evaluated
        [group] = _groups(ds)
        return group["Lesion"].ConceptCodeSequence[0].CodeMeaning

    # refused first, then answered: a new SR; the "Not Evaluated" one does not stand in for the answer
    assert len(srs) == (2 if first == 3 else 1) and len(sc) == 1
    sr = [ds for ds in srs if finding(ds) != "Not Evaluated"]
    assert len(sr) == 1
    for ds, name in [(sr[0], "sr.dcm"), (sc[0], "sc.dcm")] + [(d, f"sr{k}.dcm") for k, d in enumerate(srs)]:
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        assert _dciodvfy_errors(path) == [], name
        if shutil.which("dcmdump"):
            assert subprocess.run(["dcmdump", str(path)], capture_output=True).returncode == 0
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
        filed = {canary for kw in FILED_WITH for canary in canaries.found_in_text(str(source.get(kw, "")))}
        assert set(canaries.found_in_dataset(ds)) <= filed, set(canaries.found_in_dataset(ds)) - filed
    # Orthanc's own viewer can show them: it decodes the Secondary Capture into a preview
    import requests

    rest, auth = env.url.rsplit("/dicom-web", 1)[0], (env.credentials.user, env.credentials.password)
    for ds in (sr[0], sc[0]):
        found = requests.post(f"{rest}/tools/lookup", data=str(ds.SOPInstanceUID), auth=auth, timeout=10).json()
        assert found and found[0]["Type"] == "Instance"
        tags = requests.get(f"{rest}/instances/{found[0]['ID']}/simplified-tags", auth=auth, timeout=10)
        assert tags.status_code == 200 and tags.json()["SOPInstanceUID"] == ds.SOPInstanceUID
    preview = requests.get(f"{rest}/instances/{found[0]['ID']}/preview", auth=auth, timeout=30)
    assert preview.status_code == 200 and preview.content[:4] == b"\x89PNG"
    [group] = _groups(sr[0])  # and the SR references the source instance and the Secondary Capture
    assert group["Source of Measurement"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (
        group["Best illustration of finding"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sc[0].SOPInstanceUID
    )

    # run again, without the CSV's resume: nothing is stored twice
    assert main(args[:-2]) == 0
    assert len(_instances(pacs, source.StudyInstanceUID, "SR")) == len(srs)
    # and with the CSV: the study is skipped
    assert main(args) == 0
    with open(tmp_path / "studies.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["study"] for r in rows] == [key] and rows[0]["status"] == "answered"
    said = capsys.readouterr()
    text = said.out + said.err + caplog.text
    assert "2 already there" in said.out
    assert not canaries.found_in_text(text) and source.StudyInstanceUID not in text
    assert env.credentials.password not in text


def test_bad_pacs_wrong_password_and_a_study_without_images(
    env, tiny_run, sample_dir, tmp_path, capsys, caplog, monkeypatch
):
    caplog.set_level(logging.DEBUG)
    image = pydicom.dcmread(sorted((sample_dir / "dicom").glob("*.dcm"))[3])
    image.StudyInstanceUID = pydicom.uid.generate_uid()
    report_only = pydicom.dcmread(sorted((sample_dir / "dicom").glob("*.dcm"))[4])
    report_only.StudyInstanceUID = pydicom.uid.generate_uid()
    report_only.Modality = "KO"  # a study with nothing medtl can read
    assert Pacs(env.url, env.credentials).store([image, report_only]) == (2, 0)

    code = main(
        [
            "pacs",
            "run",
            str(tiny_run),
            env.url,
            "--study",
            report_only.StudyInstanceUID,
            "--study",
            image.StudyInstanceUID,
        ]
    )
    out = capsys.readouterr().out
    assert code == 1  # one study failed, the other was answered
    lines = dict(line.split("\t", 1) for line in out.strip().splitlines())
    from medtl.predict.batch import study_input_key

    assert "no image series" in lines[study_input_key(report_only.StudyInstanceUID)]
    assert lines[study_input_key(image.StudyInstanceUID)].startswith(("ANSWERED", "REFUSED"))
    assert report_only.StudyInstanceUID not in out + caplog.text

    monkeypatch.setenv("MEDTL_PACS_PASSWORD", "wrong")
    assert main(["pacs", "query", env.url]) == 2
    err = capsys.readouterr().err
    assert "refused the credentials (HTTP 401)" in err and "wrong" not in err
    with pytest.raises(PacsError, match="cannot be reached"):
        Pacs("http://127.0.0.1:9/dicom-web", Credentials("a", "b"), timeout=2).query()
    with pytest.raises(Exception, match="credentials in the PACS URL"):
        Pacs("http://user:pw@127.0.0.1:9/dicom-web")
    key = tmp_path / "creds"
    key.write_text("medtl:" + env.credentials.password)
    monkeypatch.delenv("MEDTL_PACS_PASSWORD")
    monkeypatch.delenv("MEDTL_PACS_USER")
    assert main(["pacs", "query", env.url, "--credentials", str(key)]) == 0


def test_orthanc_is_configured_for_loopback_with_authentication(orthanc):
    import requests

    config = orthanc.config()
    assert config["RemoteAccessAllowed"] is False and config["AuthenticationEnabled"] is True
    assert config["DicomServerEnabled"] is False
    assert requests.get(f"{orthanc.url}/studies", timeout=5).status_code == 401
    assert (orthanc.storage / "orthanc.json").stat().st_mode & 0o077 == 0  # holds the password
