"""Saliency methods: Grad-CAM finds a known blob, IG is complete, randomisation tests flag a blind method."""

import numpy as np
import pytest
import torch

from medtl.eval.sanity import run_sanity_checks
from medtl.explain.saliency import METHODS, compute_saliency, integrated_gradients
from medtl.models import create_encoder

SIZE = 128  # Grad-CAM's last feature map is 4x4 at this size


def _blob_images(n, rng):
    """Class 1: a bright disc somewhere; class 0: none. Returns (images, labels, centres)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    images, labels, centres = [], [], []
    for i in range(n):
        img = rng.normal(0.3, 0.05, (SIZE, SIZE)).astype(np.float32)
        label = i % 2
        c = rng.integers(20, SIZE - 20, 2)
        if label:
            img[(yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= 12**2] = 0.9
        images.append(img)
        labels.append(label)
        centres.append(c)
    x = torch.from_numpy((np.stack(images)[:, None].repeat(3, 1) - 0.5) / 0.5)
    return x, torch.tensor(labels), np.stack(centres)


@pytest.fixture(scope="module")
def blob_model():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, y, _ = _blob_images(48, rng)
    model = create_encoder("efficientnet_lite0", num_classes=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.eval()  # trained with ImageNet BatchNorm statistics kept (as medtl's freeze_bn does), no dropout
    for _ in range(3):
        for idx in torch.randperm(len(x)).split(16):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_gradcam_peak_lies_on_the_blob(blob_model):
    x, y, centres = _blob_images(16, np.random.default_rng(1))
    with torch.no_grad():
        acc = (blob_model(x).argmax(1) == y).float().mean()
    assert acc >= 0.9
    hits = 0
    for i in np.where(y.numpy() == 1)[0]:
        cam = compute_saliency(blob_model, x[i : i + 1], 1, "gradcam")
        # the map's 4x4 cells are upsampled into plateaus: the peak is the plateau holding the blob's centre
        hits += cam[tuple(centres[i])] >= 0.8
    assert hits >= 6  # of 8 positive images


def test_every_method_gives_a_normalised_map(blob_model):
    x, _, _ = _blob_images(2, np.random.default_rng(2))
    for method in METHODS:
        m = compute_saliency(blob_model, x[1:2], 1, method)
        assert m.shape == (SIZE, SIZE) and m.min() == 0 and m.max() == pytest.approx(1), method


def test_integrated_gradients_are_complete(blob_model):
    x, _, _ = _blob_images(2, np.random.default_rng(3))
    x = x[1:2]
    attr = integrated_gradients(blob_model, x, 1, steps=64, batch_size=32)
    with torch.no_grad():
        gap = blob_model(x)[0, 1] - blob_model(torch.zeros_like(x))[0, 1]
    assert float(attr.sum()) == pytest.approx(float(gap), rel=0.1, abs=0.05)


def test_randomisation_flags_a_method_that_ignores_the_model(blob_model):
    x, _, _ = _blob_images(4, np.random.default_rng(4))
    inputs = [x[i : i + 1] for i in (1, 3)]
    before = {k: v.clone() for k, v in blob_model.state_dict().items()}
    blind = run_sanity_checks(blob_model, inputs, lambda m, xi, c: xi[0, 0].numpy(), "image itself")
    assert not blind.passed and "UNTRUSTWORTHY" in blind.verdict and blind.cascade[-1]["spearman"] == 1.0
    cam = run_sanity_checks(blob_model, inputs, lambda m, xi, c: compute_saliency(m, xi, c, "gradcam"), "gradcam")
    assert cam.passed and cam.cascade[-1]["spearman"] < 0.5
    # the checks randomise copies: the trained model itself is left untouched, bit for bit
    after = blob_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
