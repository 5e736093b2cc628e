"""Intensity presets, multi-window CT, 3D-to-2D modes and slice aggregation."""

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from medtl.config import CT_WINDOWS, load_config
from medtl.errors import ConfigError
from medtl.io import Scan
from medtl.models import Preprocessing
from medtl.predict.post import aggregate_slices
from medtl.transforms.augment import BatchAugment
from medtl.transforms.chain import create_transforms
from medtl.transforms.intensity import intensity_preset, scale_intensity
from medtl.transforms.read import split_slices, volume_inputs


def _scan(array, modality="", source="dicom", window=None, value_max=None):
    from pathlib import Path

    return Scan(
        array=np.asarray(array, np.float32),
        spacing=(1.0,) * np.ndim(array),
        modality=modality,
        source=source,
        path=Path("x"),
        window=window,
        value_max=value_max,
    )


def test_presets_follow_the_modality():
    data = load_config().data
    assert intensity_preset(_scan([[0]]), "CT", data) == "ct_window"
    assert intensity_preset(_scan([[0]], window=(50, 100)), "CR", data) == "file_window"
    assert intensity_preset(_scan([[0]]), "DX", data) == "percentile"  # no window in the file
    assert intensity_preset(_scan([[0]]), "MR", data) == "percentile"
    assert intensity_preset(_scan([[0]], source="image", value_max=255.0), "", data) == "dtype"


def test_ct_windows_in_hounsfield_units_and_multi_window_channels():
    hu = np.array([[-1000.0, 40.0, 1000.0]])
    data = load_config(data={"ct_window": "brain"}).data
    out = scale_intensity(hu, "ct_window", data, _scan(hu))
    level, width = CT_WINDOWS["brain"]
    np.testing.assert_allclose(out[0], np.clip((hu - (level - width / 2)) / width, 0, 1))
    multi = load_config(data={"ct_window": "multi"}).data
    out = scale_intensity(hu, "ct_window", multi, _scan(hu))
    assert out.shape == (3, 1, 3)
    assert not np.allclose(out[0], out[1]) and not np.allclose(out[1], out[2])
    with pytest.raises(ConfigError, match="3 input channels"):
        load_config(data={"ct_window": "multi", "volume_mode": "2.5d"})


def test_file_window_and_dtype_scaling():
    data = load_config().data
    a = np.array([[0.0, 50.0, 100.0]])
    np.testing.assert_allclose(scale_intensity(a, "file_window", data, _scan(a, window=(50, 100)))[0], [[0, 0.5, 1]])
    np.testing.assert_allclose(scale_intensity(a, "dtype", data, _scan(a, value_max=100.0))[0], [[0, 0.5, 1]])


def test_volume_modes_keep_their_slice():
    vol = np.arange(5)[None, :, None, None] * np.ones((1, 5, 4, 4))  # slice k holds k
    x, idx = volume_inputs(vol, "middle")
    assert x.shape == (1, 1, 4, 4) and idx.tolist() == [2] and x[0, 0, 0, 0] == 2
    x, idx = volume_inputs(vol, "mip")
    assert x[0, 0, 0, 0] == 4
    x, idx = volume_inputs(vol, "2.5d")
    assert x.shape == (1, 3, 4, 4) and x[0, :, 0, 0].tolist() == [1, 2, 3]
    x, idx = volume_inputs(vol, "slices")
    assert x.shape == (5, 1, 4, 4) and idx.tolist() == [0, 1, 2, 3, 4]
    x, idx = volume_inputs(vol, "slices_2.5d")
    assert x.shape == (5, 3, 4, 4) and x[0, :, 0, 0].tolist() == [0, 0, 1] and x[4, :, 0, 0].tolist() == [3, 4, 4]


def test_slice_aggregation():
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])
    np.testing.assert_allclose(aggregate_slices(p, "mean"), p.mean(0))
    assert aggregate_slices(p, "max")[1] == pytest.approx(0.9 / 1.8)
    top = aggregate_slices(p, "topk", k=1)
    assert top[1] == pytest.approx(0.9 / 1.8)


def test_volume_read_slice_by_slice_through_the_chain(tmp_path):
    import nibabel as nib

    vol = np.zeros((20, 24, 6), np.float32)
    vol[..., 3] = 100.0
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    pre = Preprocessing(input_size=32)
    data = load_config(data={"volume_mode": "slices"}).data
    det, final = create_transforms(data, pre, train=False)
    sample = det({"image": str(tmp_path / "v.nii.gz"), "label": 1})
    parts = split_slices(sample)
    assert len(parts) == 6 and [p["slice_index"] for p in parts] == list(range(6))
    assert parts[3]["image"].max() > parts[0]["image"].max()
    x = final({"image": parts[0]["image"], "label": 1})["image"]
    assert tuple(x.shape) == (3, 32, 32)


def test_monochrome1_xray_gets_its_own_window_through_the_chain(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Modality, ds.PhotometricInterpretation = "CR", "MONOCHROME1"
    ds.WindowCenter, ds.WindowWidth = 600, 400
    ds.save_as(tmp_path / "cr.dcm")
    det, _ = create_transforms(load_config().data, Preprocessing(input_size=64), train=False)
    img = det({"image": str(tmp_path / "cr.dcm"), "label": 0})["image"][0]
    raw = ds.pixel_array.astype(np.float32)
    # inverted (bright where stored values are low) and windowed to [0, 1]
    assert img[raw == raw.min()].mean() > img[raw == raw.max()].mean()
    assert img.min() >= 0 and img.max() <= 1


def _square_batch(n=8, size=32, channels=3, dims=2):
    x = torch.zeros((n, channels) + (size,) * dims)
    x[(slice(None), slice(None)) + (slice(size // 4, size // 2),) * dims] = 1.0  # a bright block off centre
    return (x - 0.5) / 0.5  # normalised as the encoder's mean = std = 0.5


def test_batch_augmentation_is_seeded_varied_and_leaves_its_input_alone():
    x = _square_batch()
    kept = x.clone()
    pre = Preprocessing(input_size=32)
    a, b, c = (BatchAugment(pre, seed=s)(x) for s in (1, 1, 2))
    assert torch.equal(x, kept) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype
    changed = [(a[i] - x[i]).abs().max() > 1e-3 for i in range(len(x))]
    assert 0 < sum(changed) <= len(x)  # each step is drawn per sample
    assert float(a.min()) >= -1.2 and float(a.max()) <= 1.2  # still normalised [0, 1] intensities (+ noise)


def test_batch_augmentation_flips_left_right_and_turns_3d_volumes_in_plane_only():
    pre = Preprocessing(input_size=16)
    x = _square_batch(n=16, size=16)
    flip_only = BatchAugment(pre, rotate_deg=0, zoom=0, shift=0, seed=0)
    flip_only._chosen = lambda n, p, device: torch.arange(n) if p == 0.5 else torch.arange(0)  # flips alone
    assert torch.allclose(flip_only(x), x.flip(-1), atol=1e-5)
    vol = _square_batch(n=4, size=16, channels=1, dims=3)
    turn = BatchAugment(
        Preprocessing(input_size=16, in_chans=1, mean=(0.5,), std=(0.5,), spatial_dims=3),
        rotate_deg=10,
        zoom=0,
        shift=0,
        flip=False,
        seed=0,
    )
    turn._chosen = lambda n, p, device: torch.arange(n) if p == 0.5 else torch.arange(0)  # the affine alone
    out = turn(vol)
    # a rotation about the slice axis moves voxels within each slice, never between slices
    assert torch.allclose(out.sum(dim=(-1, -2)), vol.sum(dim=(-1, -2)), rtol=0.1, atol=1.0)
    assert not torch.allclose(out, vol, atol=1e-3)


def test_batch_augmentation_on_normalised_values_is_its_definition_on_intensities():
    """The batch arrives normalised per channel (here ImageNet's mean and std, unequal channels); each step is
    defined on the [0, 1] intensities: the warp fills with black (intensity 0), the noise is the same in every
    channel, the cut-out is mid-grey. Steps run on the normalised values must give exactly that."""
    pre = Preprocessing(input_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    intensities = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = (intensities - mean) / std

    def only(step_p):  # the samples of every step drawn with probability step_p: all; of the others: none
        return lambda n, p, device: torch.arange(n) if p == step_p else torch.arange(0)

    warp = BatchAugment(pre, flip=False, rotate_deg=20, zoom=0.2, shift=0.1, seed=3)
    warp._chosen = only(0.5)
    twin = BatchAugment(pre, flip=False, rotate_deg=20, zoom=0.2, shift=0.1, seed=3)
    expected = twin.warp(intensities, twin.affines(6, 2, 32))
    assert (expected == 0).any()  # black came in from outside the image
    torch.testing.assert_close(warp(x) * std + mean, expected, atol=1e-5, rtol=1e-5)

    noisy = BatchAugment(pre, flip=False, gamma=(1.0, 1.0), noise=0.05, seed=4)  # (contrast with gamma 1: none)
    noisy._chosen = only(0.3)
    added = noisy(x) * std + mean - intensities
    assert added.abs().max() > 1e-3
    torch.testing.assert_close(added[:, 1:], added[:, :1].expand(-1, 2, -1, -1), atol=1e-5, rtol=0)

    cut = BatchAugment(pre, flip=False, cutout=0.5, seed=5)
    cut._chosen = only(None)
    grey = (cut(x) * std + mean - 0.5).abs() < 1e-5
    assert grey.all(1).any((1, 2)).all()  # every sample has a mid-grey square in all three channels


def test_batch_augmentation_matches_the_per_sample_monai_chain_in_distribution():
    """BatchAugment replaced MONAI's per-sample chain (RandAffined p 0.5: 10 degrees, zoom 0.1 and shift 5 % per axis;
    RandAdjustContrastd p 0.3, gamma 0.8-1.25; RandGaussianNoised p 0.3, sigma up to 0.02; RandFlipd p 0.5).
    Over 600 augmentations of one asymmetric image, statistics that each step moves (mean, spread, the
    empty border, left-right balance, pixel-to-pixel roughness) have the same distributions (two-sample
    Kolmogorov-Smirnov, p > 0.001) in both."""
    from monai.transforms import RandAdjustContrast, RandAffine, RandFlip, RandGaussianNoise
    from scipy.stats import ks_2samp

    size, n = 32, 600
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    image = (0.2 + 0.5 * yy + 0.3 * np.exp(-((xx - 0.3) ** 2 + (yy - 0.4) ** 2) / 0.02)).astype(np.float32)
    image = np.clip(image, 0, 1)[None]
    # ranges per axis: a scalar range gives MONAI's RandAffine one parameter, the first axis's (the old
    # chain passed scalars, so it zoomed and shifted rows only; BatchAugment does both axes, as meant)
    chain = [
        RandAffine(
            prob=0.5,
            rotate_range=np.deg2rad(10),
            scale_range=(0.1, 0.1),
            translate_range=(size * 0.05,) * 2,
            padding_mode="zeros",
        ),
        RandAdjustContrast(prob=0.3, gamma=(0.8, 1.25)),
        RandGaussianNoise(prob=0.3, std=0.02),
        RandFlip(prob=0.5, spatial_axis=-1),
    ]
    for k, t in enumerate(chain):
        t.set_random_state(seed=k + 1)
    per_sample = []
    for _ in range(n):
        x = torch.as_tensor(image)
        for t in chain:
            x = torch.as_tensor(t(x))
        per_sample.append(x)
    per_sample = torch.stack(per_sample)
    pre = Preprocessing(input_size=size, in_chans=1, mean=(0.5,), std=(0.5,))
    batch = BatchAugment(pre, seed=5)((torch.as_tensor(image)[None].repeat(n, 1, 1, 1) - 0.5) / 0.5) * 0.5 + 0.5

    def stats(x):
        x = x[:, 0]
        return {
            "mean": x.mean((1, 2)),
            "std": x.std((1, 2)),
            "empty": (x.abs() < 1e-6).float().mean((1, 2)),
            "left_minus_right": x[:, :, : size // 2].mean((1, 2)) - x[:, :, size // 2 :].mean((1, 2)),
            "roughness": (x[:, :, 1:] - x[:, :, :-1]).abs().mean((1, 2)),
        }

    a, b = stats(per_sample), stats(batch)
    for name in a:
        p = ks_2samp(a[name].numpy(), b[name].numpy()).pvalue
        assert p > 1e-3, f"{name}: per-sample and batch augmentation differ (KS p = {p:.2g})"
    # and the test can tell: a batch chain without its flips fails it
    no_flip = BatchAugment(pre, seed=5, flip=False)((torch.as_tensor(image)[None].repeat(n, 1, 1, 1) - 0.5) / 0.5)
    assert ks_2samp(a["left_minus_right"].numpy(), stats(no_flip * 0.5 + 0.5)["left_minus_right"].numpy()).pvalue < 1e-6
