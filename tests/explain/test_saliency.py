"""Saliency methods: Grad-CAM finds a known blob, IG is complete and exact where it can be computed by hand,
randomisation tests flag a blind method."""

import numpy as np
import pytest
import torch

from medtl.eval.sanity import run_sanity_checks
from medtl.explain.saliency import METHODS, compute_saliency, integrated_gradients, integrated_gradients_with_delta
from medtl.models import create_encoder
from medtl.runtime import Runtime, inference_precision

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
    runtime = Runtime(precision=inference_precision(None))  # MEDTL_PRECISION=bf16 runs every method under autocast
    for method in METHODS:
        m = compute_saliency(blob_model, x[1:2], 1, method, runtime=runtime)
        assert m.shape == (SIZE, SIZE) and m.min() == 0 and m.max() == pytest.approx(1), method


def test_integrated_gradients_are_complete(blob_model):
    x, _, _ = _blob_images(2, np.random.default_rng(3))
    x = x[1:2]
    attr, delta = integrated_gradients_with_delta(blob_model, x, 1, steps=64, batch_size=32)
    with torch.no_grad():
        gap = float(blob_model(x)[0, 1] - blob_model(torch.zeros_like(x))[0, 1])
    assert float(attr.sum()) == pytest.approx(gap, rel=0.1, abs=0.05)
    assert float(attr.sum()) - gap == pytest.approx(delta, abs=1e-4)  # Captum's delta is that very gap


class _Polynomial(torch.nn.Module):
    """Two logits whose IG is known in closed form: class 0 = sum(w0 * x) (IG = w0 * x for any path sum),
    class 1 = sum(w1 * x**3) (the midpoint sum over n points gives w1 * x**3 * (1 - 1 / (4 n**2)))."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return torch.stack([(self.w[0] * x).flatten(1).sum(1), (self.w[1] * x**3).flatten(1).sum(1)], dim=1)


@pytest.mark.parametrize("steps, batch_size", [(24, 24), (7, 3)])
def test_integrated_gradients_equal_the_closed_form(steps, batch_size):
    model = _Polynomial()
    x = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    w = model.w.detach()
    linear = integrated_gradients(model, x, 0, steps, batch_size)
    torch.testing.assert_close(linear, w[0] * x, rtol=1e-5, atol=1e-6)
    cubic, delta = integrated_gradients_with_delta(model, x, 1, steps, batch_size)
    torch.testing.assert_close(cubic, w[1] * x**3 * (1 - 1 / (4 * steps**2)), rtol=1e-5, atol=1e-6)
    # the midpoint rule's whole error is the delta: sum(w x^3) / (4 n^2) short of f(x) - f(0)
    assert delta == pytest.approx(-float((w[1] * x**3).sum()) / (4 * steps**2), rel=1e-3, abs=1e-6)


class _TinyConv(torch.nn.Module):
    num_classes = 2

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_integrated_gradients_run_in_float32_under_a_bf16_runtime():
    model, x = _TinyConv().eval(), torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    fp32 = compute_saliency(model, x, 1, "integrated_gradients", runtime=Runtime(precision="fp32"))
    bf16 = compute_saliency(model, x, 1, "integrated_gradients", runtime=Runtime(precision="bf16"))
    np.testing.assert_allclose(bf16, fp32, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the model itself gives there: not float32
        assert model(x).dtype == torch.bfloat16


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
