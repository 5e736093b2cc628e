"""Fixtures of the tests against a real PACS: Orthanc with its DICOMweb plugin, started once per test module."""

import pytest

from medtl.clinical.orthanc import OrthancServer, find_orthanc


@pytest.fixture(scope="module")
def orthanc_server_class() -> type[OrthancServer]:
    """The server :func:`orthanc` starts; a test module overrides this fixture for another configuration
    (tests/clinical/test_dimse.py: Orthanc with its DICOM port open)."""
    return OrthancServer


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, orthanc_server_class):
    """A running Orthanc, one per test module (the test is skipped where Orthanc is not installed)."""
    if find_orthanc() is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    with orthanc_server_class(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture
def env(orthanc, monkeypatch):
    """:func:`orthanc`, with its credentials in the environment (where ``medtl pacs`` reads them)."""
    monkeypatch.setenv("MEDTL_PACS_USER", orthanc.credentials.user)
    monkeypatch.setenv("MEDTL_PACS_PASSWORD", orthanc.credentials.password)
    return orthanc
