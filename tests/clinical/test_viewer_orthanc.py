"""A viewer for the results (issue 32, item 6): Orthanc as `medtl pacs serve` configures it, with Debian's
`orthanc-webviewer`, driven by Debian's chromium. A study answered by medtl shows its Secondary Capture's series
in Orthanc Explorer, and the web viewer draws the SC (the saliency overlay, in colour) and the source image."""

import re

import pydicom
import pytest
import requests

from medtl.clinical.orthanc import OrthancServer, find_orthanc, find_web_viewer
from medtl.clinical.pacs import Pacs
from medtl.clinical.pacs_run import run_studies
from medtl.predict.predictor import load_run
from tests.clinical.test_orthanc_serve import _modes
from tests.ui.browsing import ARGS, CHROMIUM

pytestmark = [pytest.mark.pacs, pytest.mark.browser]
OVERLAY = re.compile(r"medtl \w+ overlay")  # the SC's SeriesDescription
# the colours drawn on the viewer's canvas: (pixels, of which coloured: R, G, B not all alike)
CANVAS_COLOURS = """() => {
  const c = [...document.querySelectorAll('canvas')].sort((a, b) => b.width * b.height - a.width * a.height)[0];
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0, coloured = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i] + d[i + 1] + d[i + 2] === 0) continue;
    n++;
    if (Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 40) coloured++;
  }
  return [n, coloured];
}"""


@pytest.fixture(scope="module")
def answered(sample_dir, tiny_run, tmp_path_factory):
    """Orthanc (with its web viewer) holding a study that medtl answered: (server, Orthanc's study id)."""
    if find_orthanc() is None or find_web_viewer() is None:
        pytest.skip(
            "Orthanc, its DICOMweb plugin or its web viewer is not installed (apt-get install orthanc-webviewer)"
        )
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    source = sorted((sample_dir / "dicom").glob("*.dcm"))[0]
    uid = str(pydicom.dcmread(source).StudyInstanceUID)
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        assert server.upload([source]) == 1
        predictor = load_run(tiny_run, bounded=True)
        (outcome,) = run_studies(predictor, Pacs(server.url, server.credentials), [uid], check=False)
        assert outcome.status == "answered" and outcome.stored == 2
        rest = f"http://127.0.0.1:{server.port}"
        (found,) = requests.post(f"{rest}/tools/lookup", data=uid, auth=_auth(server), timeout=10).json()
        yield server, found["ID"]


def _auth(server) -> tuple[str, str]:
    return server.credentials.user, server.credentials.password


@pytest.fixture
def page(answered):
    sync_api = pytest.importorskip("playwright.sync_api")
    server = answered[0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        user, password = _auth(server)
        context = browser.new_context(http_credentials={"username": user, "password": password})
        yield context.new_page()
        browser.close()


def _series(server, study_id: str) -> dict[str, dict]:
    """The study's series by modality (CT: the source, SR: the report, OT: the Secondary Capture)."""
    rest = f"http://127.0.0.1:{server.port}"
    series = requests.get(f"{rest}/studies/{study_id}/series", auth=_auth(server), timeout=10).json()
    return {s["MainDicomTags"]["Modality"]: s for s in series}


def test_explorer_lists_the_overlay_and_offers_the_web_viewer(answered, page):
    server, study_id = answered
    assert server.config()["Plugins"][-1] == find_web_viewer()
    page.goto(f"{server.explorer_url}#study?uuid={study_id}")
    page.get_by_text(OVERLAY).first.wait_for(timeout=30_000)  # the SC's series, beside the CT's and the SR's
    sc = _series(server, study_id)["OT"]
    page.goto(f"{server.explorer_url}#series?uuid={sc['ID']}")
    page.get_by_text("Orthanc Web Viewer").first.wait_for(timeout=30_000)  # the plugin's button


@pytest.mark.parametrize("modality", ["OT", "CT"])
def test_the_web_viewer_draws_the_overlay_and_the_source(answered, page, modality):
    server, study_id = answered
    series = _series(server, study_id)[modality]
    (instance,) = series["Instances"]
    with page.expect_response(lambda r: "/web-viewer/instances/" in r.url and instance in r.url) as image:
        page.goto(server.viewer_url(series["ID"]))
    assert image.value.status == 200
    page.wait_for_function("(" + CANVAS_COLOURS + ")()[0] > 1000", timeout=30_000)  # drawn
    pixels, coloured = page.evaluate(CANVAS_COLOURS)
    if modality == "OT":  # the overlay: a colour map over the image, and its name
        assert coloured > pixels // 4, (pixels, coloured)
        assert OVERLAY.search(page.inner_text("body"))
        cache = server.storage / "webviewer-cache"  # the viewer's decoded images: in the private storage
        assert any(p.is_file() for p in cache.rglob("*")) and _modes(server.storage) == {}
    else:  # the CT: grey
        assert coloured == 0, (pixels, coloured)
