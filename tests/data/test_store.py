"""Data sets' input stores: every input prepared once into one compact tensor, read back in batches that
equal the per-sample chain's inputs; memory-mapped when large; the channel repeat and normalisation per batch."""

import numpy as np
import pytest
import torch
from monai.transforms import Compose, Lambda

from medtl.config import DataConfig
from medtl.data import create_dataset, iterate_batches
from medtl.models import Preprocessing
from medtl.transforms.chain import EncoderInputd, create_transforms


def _studies(n=10, size=12, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"image": rng.random((1, size, size + 4)).astype(np.float32), "label": i % 2, "slice_index": np.array([-1])}
        for i in range(n)
    ]


def _final(size=16):
    pre = Preprocessing(input_size=size, in_chans=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return create_transforms(DataConfig(), pre, train=False)[1]


@pytest.mark.parametrize("memory_bytes", [1 << 30, 100])  # in memory; memory-mapped (over 100 bytes)
def test_batches_equal_the_per_sample_chain_in_any_order(memory_bytes, tmp_path):
    ds = create_dataset(_studies(), _final(), store_dtype="float32", memory_bytes=memory_bytes, spill_dir=tmp_path)
    order = [7, 2, 9, 0, 5, 1, 3, 8, 6, 4]
    batches = list(iterate_batches(ds, 4, "cpu", order))
    assert [len(b["label"]) for b in batches] == [4, 4, 2]
    x, y = torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])
    expected = torch.stack([ds[i]["image"] for i in order])
    assert x.shape == (10, 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x, expected)  # the same arithmetic, per batch or per sample
    assert y.tolist() == [i % 2 for i in order]
    store = ds.store()
    assert store.images.shape == (10, 1, 16, 16)  # grey inputs kept with one channel, repeated per batch
    assert store.where == ("memory" if memory_bytes > 100 else f"a memory-mapped file in {tmp_path}")
    assert list(tmp_path.iterdir()) == []  # the mapped file's name is gone at once: nothing is left behind
    assert len(list(iterate_batches(ds, 4, "cpu", order, drop_last=True))) == 2


def test_float16_store_is_a_quarter_of_the_float32_inputs_and_close_to_them():
    ds16 = create_dataset(_studies(), _final())
    ds32 = create_dataset(_studies(), _final(), store_dtype="float32")
    x16 = next(iterate_batches(ds16, 10))["image"]
    x32 = next(iterate_batches(ds32, 10))["image"]
    assert ds16.store().images.dtype == torch.float16
    assert ds16.store().nbytes * 6 == 10 * 3 * 16 * 16 * 4  # 1 channel of 2 bytes vs 3 channels of 4
    # float16 keeps 11 significant bits of the [0, 1] intensities: at most 2^-12 of the range, / std
    assert (x16 - x32).abs().max() <= 2**-12 / 0.224 + 1e-6


def test_each_input_is_prepared_once_and_a_bad_shape_is_refused():
    calls = []
    final = Compose([Lambda(lambda d: (calls.append(1), {**d, "image": torch.zeros(3, 8, 8)})[1])])
    ds = create_dataset(_studies(6), final)
    for _ in range(3):
        list(iterate_batches(ds, 4))
    assert len(calls) == 6 + 1  # once each, plus the first input's shape
    odd = Compose([Lambda(lambda d: {**d, "image": torch.zeros(3, 8, 8 + int(d["label"]))})])
    with pytest.raises(Exception, match="has shape"):
        list(iterate_batches(create_dataset(_studies(4), odd), 4))


def test_store_is_prepared_by_worker_processes_the_same():
    ds0, ds2 = create_dataset(_studies(), _final()), create_dataset(_studies(), _final())
    assert torch.equal(ds0.store().images, ds2.store(workers=2).images)


def test_encoder_input_batch_repeats_grey_and_refuses_two_channels():
    step = EncoderInputd("image", Preprocessing(in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3))
    x = torch.rand(2, 1, 4, 4)
    out = step.batch(x)
    assert out.shape == (2, 3, 4, 4) and torch.equal(out[:, 0], (x[:, 0] - 0.5) / 0.25)
    assert torch.equal(step({"image": x[0]})["image"], out[0])
    with pytest.raises(Exception, match="2-channel inputs"):
        step.batch(torch.rand(1, 2, 4, 4))


def test_grey_and_three_channel_inputs_mixed_are_stored_together():
    """2D images (1 channel) next to 2.5D volume inputs (3 slices as channels): the store widens to 3
    channels at the first 3-channel input, and every batch still equals the per-sample chain."""
    rng = np.random.default_rng(1)
    studies = (
        _studies(4)
        + [{"image": rng.random((3, 12, 16)).astype(np.float32), "label": 1, "slice_index": np.array([-1])}]
        + _studies(3, seed=2)
    )
    ds = create_dataset(studies, _final(), store_dtype="float32")
    x = next(iterate_batches(ds, 8))["image"]
    assert ds.store().images.shape[1] == 3
    assert torch.equal(x, torch.stack([ds[i]["image"] for i in range(8)]))


def test_files_decoded_by_worker_processes_are_the_same_and_bad_ones_reported(sample_dir, tmp_path):
    """Reading a data set's files in 2 processes gives the samples, in order, and the problems of 1."""
    from medtl.data import decode_records, read_manifest
    from medtl.data.dataset import decode_workers

    records = read_manifest(sample_dir / "manifest.csv").records[:12]
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"DICM" + b"\0" * 200)
    records = records[:5] + [{**records[5], "image": str(bad), "path": "bad.dcm"}] + records[6:]
    det, _ = create_transforms(DataConfig(), Preprocessing(input_size=32), train=False)
    one, problems1 = decode_records(records, det)
    two, problems2 = decode_records(records, det, workers=2)
    assert [p.where for p in problems1] == [p.where for p in problems2] == ["bad.dcm"]
    assert [s["path"] for s in one] == [s["path"] for s in two] and len(one) == 11
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(one, two))
    assert decode_workers(3, 10) == 3 and decode_workers("auto", 10) == 0


def test_empty_sets_give_no_batches_and_inputs_are_plain_tensors():
    assert list(iterate_batches(create_dataset([], _final()), 4)) == []
    ds = create_dataset(_studies(2), _final())
    assert type(ds[0]["image"]) is torch.Tensor  # not a MONAI MetaTensor: no metadata work per input


def test_a_store_without_room_on_disk_is_a_clear_error(monkeypatch, tmp_path):
    import errno
    import os

    from medtl.errors import ConfigError

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    ds = create_dataset(_studies(), _final(), memory_bytes=100, spill_dir=tmp_path)
    with pytest.raises(ConfigError, match=f"no room for the .* input store in {tmp_path}"):
        list(iterate_batches(ds, 4))
    assert list(tmp_path.iterdir()) == []
