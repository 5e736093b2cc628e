"""Colour stays colour: a label carried by hue alone is learnt in RGB and not in grey; colour
pictures and arrays keep their RGB; overlays, the viewer and the UI's refusal follow the model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medtl.config import DataConfig, load_config
from medtl.explain import create_overlay
from medtl.io import read_image
from medtl.models.encoders import Preprocessing
from medtl.transforms.augment import BatchAugment
from medtl.transforms.read import LoadScan2Dd, display_image, scan_from_array

YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def hue_only_images(n: int, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, 3) uint8 images and labels: the same kind of grey texture in both classes, tinted
    towards orange (label 0) or blue-green (label 1) along YIQ's I axis, so luminance carries no label."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    texture = rng.uniform(70, 185, size=(n, size, size))
    texture += 25 * np.sin(np.linspace(0, rng.uniform(2, 6), size))[None, None, :]
    i_axis = np.where(labels == 1, -30.0, 30.0)[:, None, None]
    yiq = np.stack([texture, np.broadcast_to(i_axis, texture.shape), np.zeros_like(texture)], axis=-1)
    rgb = np.clip(yiq @ np.linalg.inv(YIQ).T, 0, 255).round().astype(np.uint8)
    return rgb, labels


def write_colour_medmnist(path, n=(64, 24, 48), seed=0):
    arrays = {}
    for k, (split, count) in enumerate(zip(("train", "val", "test"), n)):
        images, labels = hue_only_images(count, seed=seed + k)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(path, **arrays)
    return path


def test_hue_only_images_have_the_same_luminance_in_both_classes():
    images, labels = hue_only_images(400)
    grey = images.astype(np.float64) @ YIQ[0]
    means = [grey[labels == k].mean() for k in (0, 1)]
    assert abs(means[0] - means[1]) < 1.0 and images[labels == 0, ..., 0].mean() > images[labels == 1, ..., 0].mean()


@pytest.mark.parametrize("color, low, high", [("auto", 0.95, 1.0), ("grey", 0.0, 0.8)])
def test_a_label_carried_by_colour_is_learnt_in_rgb_only(tmp_path, color, low, high):
    from medtl.train import run_experiment

    data = write_colour_medmnist(tmp_path / "hue.npz")
    cfg = load_config(
        data={"path": str(data), "augment": False, "color": color},
        encoder={"input_size": 64},
        train={"strategy": "linear_probe", "epochs": 0, "frozen_epochs": 8, "batch_size": 16, "lr": 3e-3},
        explain={"n_overlays": 0},
    )
    run = run_experiment(cfg, tmp_path / f"run-{color}")
    metrics = json.loads((run / "metrics.json").read_text())
    assert low <= metrics["test"]["auc"] <= high, metrics["test"]
    record = (run / "config.yaml").read_text()
    assert ("colour_inputs: 64" in record) == (color == "auto")


def test_colour_sources_keep_rgb_and_grey_ones_stay_grey(tmp_path):
    images, _ = hue_only_images(2)
    Image.fromarray(images[0]).save(tmp_path / "c.png")
    Image.fromarray(np.repeat(images[0][..., :1], 3, axis=-1)).save(tmp_path / "g.png")  # grey stored as RGB
    colour, grey = read_image(tmp_path / "c.png"), read_image(tmp_path / "g.png")
    assert colour.is_colour and np.array_equal(colour.rgb, images[0].astype(np.float32))
    np.testing.assert_allclose(colour.array, images[0].astype(np.float32) @ YIQ[0].astype(np.float32), atol=1e-3)
    assert not grey.is_colour and grey.summary()["colour"] == "grey"
    assert scan_from_array(images[1], "x").is_colour

    pre = Preprocessing(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, in_chans=3)
    for color, channels_differ in (("auto", True), ("grey", False)):
        load = LoadScan2Dd("image", DataConfig(color=color), max_size=pre.input_size)
        out = load({"image": str(tmp_path / "c.png"), "label": 0})
        x = np.asarray(out["image"])
        assert x.shape[0] == (3 if color == "auto" else 1) and out["scan_colour"] == channels_differ
        if color == "auto":
            assert not np.allclose(x[0], x[2]) and x.max() <= 1 and x.min() >= 0
            assert display_image(out).shape[-1] == 3
    with pytest.raises(Exception, match="g.png.*grey image where data.color is 'rgb'"):
        LoadScan2Dd("image", DataConfig(color="rgb"))({"image": str(tmp_path / "g.png"), "label": 0})


def test_overlay_keeps_the_colour_image_where_saliency_is_zero():
    images, _ = hue_only_images(1)
    image = images[0].astype(np.float32) / 255
    saliency = np.zeros(image.shape[:2], np.float32)
    saliency[:5, :5] = 1.0
    overlay = create_overlay(image, saliency, alpha=0.5)
    assert overlay.shape == image.shape
    np.testing.assert_allclose(overlay[10:, 10:] / 255, image[10:, 10:], atol=1 / 255 + 1e-6)
    assert not np.allclose(overlay[:5, :5] / 255, image[:5, :5], atol=0.05)


def test_colour_jitter_is_seeded_changes_colour_and_stays_in_range():
    pre = Preprocessing(input_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, in_chans=3)
    images, _ = hue_only_images(8, size=16)
    x = (torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5

    def run(jitter, seed=3):
        aug = BatchAugment(pre, flip=False, rotate_deg=0, zoom=0, shift=0, color_jitter=jitter).set_random_state(seed)
        return aug(x.clone())

    a, b, plain = run(0.2), run(0.2), run(0.0)
    assert torch.equal(a, b) and not torch.allclose(a, plain)
    assert a.min() >= -1 - 1e-5 and a.max() <= 1 + 1e-5
    ratio = (a * 0.5 + 0.5).mean(dim=(2, 3)) / (plain * 0.5 + 0.5).mean(dim=(2, 3))
    assert ratio.std() > 0.01  # channels scaled differently: a colour change, not only brightness


def test_the_ui_refuses_colour_for_a_grey_model_and_accepts_it_for_a_colour_one(tmp_path):
    from medtl.predict.refusal import input_refusal
    from medtl_ui.view import window_slice

    images, _ = hue_only_images(1, size=64)
    vivid = images[0].copy()
    vivid[..., 0] = 230  # strongly coloured
    Image.fromarray(vivid).save(tmp_path / "photo.png")
    scan = read_image(tmp_path / "photo.png")
    grey_model = {"modalities": [], "dimensions": [2], "colour_inputs": 0}
    colour_model = {"modalities": [], "dimensions": [2], "colour_inputs": 120}
    assert "grey images only" in input_refusal(grey_model, scan)
    assert input_refusal(colour_model, scan) is None
    view = window_slice(scan, 0, -600, 1500)  # windows do not apply to colour
    assert view.shape == (64, 64, 3) and np.array_equal(view, vivid)


def test_the_final_chain_never_changes_the_decoded_sample(tmp_path):
    """A square colour input at the model's size passes resize and pad untouched: the normalisation
    must not write into the cached sample (it did, once: inputs drifted every epoch)."""
    from medtl.transforms.chain import create_transforms
    from medtl.transforms.read import prepare_inputs

    images, _ = hue_only_images(1, size=32)
    Image.fromarray(images[0]).save(tmp_path / "square.png")
    pre = Preprocessing(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, in_chans=3)
    deterministic, final = create_transforms(DataConfig(), pre, train=False)
    sample = deterministic({"image": str(tmp_path / "square.png"), "label": 0})
    before = np.array(sample["image"], copy=True)
    first, parts = prepare_inputs(sample, final)
    again, _ = prepare_inputs(sample, final)
    assert np.array_equal(np.asarray(sample["image"]), before) and torch.equal(first, again)
    assert display_image(parts[0]).min() >= 0 and display_image(parts[0]).max() <= 1
