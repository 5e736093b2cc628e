"""Datasets over data-set records: decoded once (in memory, or on disk with MONAI's
``PersistentDataset``), prepared once into a compact store of model inputs, read in whole batches."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset, PersistentDataset
from monai.transforms import Compose
from torch.utils.data import DataLoader

from medtl.data.manifest import Problem
from medtl.errors import ConfigError, find_input_error, look_up_option
from medtl.progress import Steps
from medtl.threads import fit_threads
from medtl.transforms.chain import split_final
from medtl.transforms.read import split_slices

log = logging.getLogger("medtl.data")

KEEP = (
    "image",
    "label",
    "patient_id",
    "path",
    "original_shape",
    "slice_index",
    "n_inputs",
    "study_id",
    "site",
    "modality",
    "scan_ndim",
    "scan_modality",
    "scan_colour",
    "scan_min_side",
)


def decode_records(
    records: Sequence[dict], deterministic: Compose, cache_dir: str | None = None, workers: int = 0
) -> tuple[list[dict], list[Problem]]:
    """Apply the deterministic (read + scale + shrink) chain once to every record, in ``workers``
    processes when more than 0 (the files are read in parallel; results come back in order).

    With ``cache_dir``, results are also stored on disk by MONAI's ``PersistentDataset`` (keyed
    by a hash of the record and reused by later runs). A file that cannot be read is reported
    (logged, returned as a :class:`Problem`) and skipped; the others are kept.
    """
    source = _Decoded(records, deterministic, cache_dir)
    if workers > 0 and len(records) > 1:
        source = DataLoader(
            source, batch_size=None, shuffle=False, num_workers=min(workers, len(records)), collate_fn=_as_is
        )
    samples, problems = [], []
    for out in Steps("decoding", len(records), log, unit="files").wrap(source):  # a line every 10 s, time left
        if isinstance(out, Problem):
            problems.append(out)
            log.warning("skipped %s", out)
        else:
            samples.append(out)
    return samples, problems


class _Decoded(torch.utils.data.Dataset):
    """Each record through the deterministic chain: the sample's kept fields, or the :class:`Problem` that
    stopped it (an error that is not about the input is raised)."""

    def __init__(self, records: Sequence[dict], deterministic: Compose, cache_dir: str | None):
        self.records = list(records)
        self.chain = PersistentDataset(self.records, deterministic, cache_dir=cache_dir) if cache_dir else None
        self.deterministic = deterministic

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict | Problem:
        rec = self.records[i]
        try:
            out = self.chain[i] if self.chain is not None else self.deterministic(rec)
        except Exception as e:  # MONAI wraps transform errors; find ours underneath
            cause = find_input_error(e)
            if cause is None:
                raise
            return Problem(str(rec.get("path") or rec["image"]), f"{type(cause).__name__}: {cause.problem}")
        return {k: out[k] for k in KEEP if k in out}


def _as_is(item):
    return item


def decode_workers(setting: int | str, n_files: int) -> int:
    """Processes reading a data set's files (``train.workers``). "auto": one per free core (the compute threads'
    count, :func:`medtl.threads.fit_threads`: the main process waits meanwhile), up to 8, for 200 files or more
    (fewer are read faster than the processes start); none on a single core. Measured on 2 cores, 400 generated
    DICOM files: 296 files/s in 2 processes, 215 in the main process alone."""
    if setting != "auto":
        return int(setting)
    cores = fit_threads().threads
    return min(8, cores) if n_files >= 200 and cores > 1 else 0


def expand_inputs(studies: Sequence[dict]) -> list[dict]:
    """One sample per model input; each keeps ``study`` (its index in ``studies``) for aggregation."""
    out = []
    for i, s in enumerate(studies):
        for part in split_slices(s):
            part["study"] = i
            out.append(part)
    return out


MEMORY_CACHE_BYTES = 2 << 30  # a data set's stored inputs stay in memory up to this; larger ones are memory-mapped
STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class InputDataset(Dataset):
    """Model inputs of studies (MONAI ``Dataset``), and how a study's score is made from its inputs'.

    ``dataset[i]`` runs the whole ``final`` chain on one input, as prediction does for a file. For
    training and evaluation, :func:`iterate_batches` reads whole batches from :meth:`store`: every
    input prepared once, before the chain's last step (the channel repeat and normalisation of
    :class:`medtl.transforms.EncoderInputd`), kept as one compact tensor at the model's input size
    (float16 by default: half of float32, and a third again for grey inputs of a 3-channel encoder);
    that last step then runs on whole batches on the model's device.
    """

    def __init__(
        self,
        data: Sequence[dict],
        transform: Compose,
        aggregation: tuple[str, int] = ("mean", 3),
        store_dtype: str = "float16",
        memory_bytes: int = MEMORY_CACHE_BYTES,
        spill_dir: str | Path | None = None,
    ):
        super().__init__(data, transform)
        self.aggregation = aggregation  # (rule, k): "mean", "max" or "topk" over a study's slice scores
        self.store_dtype = STORE_DTYPES[look_up_option(store_dtype, STORE_DTYPES, "input store dtype")]
        self.memory_bytes, self.spill_dir = memory_bytes, spill_dir
        self._store: InputStore | None = None

    def store(self, workers: int = 0) -> InputStore:
        """The data set's inputs as an :class:`InputStore`, prepared at the first call (in ``workers``
        processes when more than 0) and kept."""
        if self._store is None:
            self._store = InputStore.build(self, workers)
        return self._store


class InputStore:
    """Every input of an :class:`InputDataset` as one (N, c, size, size[, size]) tensor, the labels, and
    the step that turns a batch of them into model inputs. In memory when it fits the data set's
    ``memory_bytes``, else in a memory-mapped file (removed from the folder as soon as it is open)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, finish, where: str):
        self.images, self.labels, self.finish, self.where = images, labels, finish, where
        self._mapped: np.ndarray | None = None  # the memory-mapped array behind ``images``, if any

    @property
    def nbytes(self) -> int:
        return int(self.images.element_size() * self.images.nelement())

    @staticmethod
    def _allocate(dataset: InputDataset, shape: tuple[int, ...]) -> tuple[torch.Tensor, str, np.ndarray | None]:
        """(an empty store of ``shape``, where it lives, its memory map or None)."""
        dtype = dataset.store_dtype
        if int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size() <= dataset.memory_bytes:
            return torch.empty(shape, dtype=dtype), "memory", None
        mapped, where = _mapped_array(dataset.spill_dir, shape, dtype)
        return torch.from_numpy(mapped), where, mapped

    @classmethod
    def build(cls, dataset: InputDataset, workers: int = 0) -> InputStore:
        shape_chain, finish = split_final(dataset.transform)
        n, dtype = len(dataset), dataset.store_dtype
        first = _as_tensor(shape_chain(dict(dataset.data[0]))["image"])
        full = finish.channels if finish is not None else first.shape[0]  # grey and colour inputs mixed: all repeated
        images, where, mapped = cls._allocate(dataset, (n, *first.shape))
        labels = torch.empty(
            (n, *label_tensor(dataset.data[0]["label"]).shape), dtype=torch.long
        )  # multi-label: (n, L)
        source = _Prepared(dataset.data, shape_chain)
        loader = (
            DataLoader(source, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=False)
            if workers > 0
            else source
        )
        for i, (image, label) in enumerate(loader):
            image = _as_tensor(image)
            if (
                image.shape[1:] == images.shape[2:]
                and image.shape[0] != images.shape[1]
                and {image.shape[0], images.shape[1]} == {1, full}
            ):
                if images.shape[1] == 1:  # the first of several channels: from now on every input has them
                    wider, where, mapped = cls._allocate(dataset, (n, full, *images.shape[2:]))
                    wider[:i] = images[:i].expand(-1, full, *images.shape[2:])
                    images = wider
                else:
                    image = image.expand(full, *image.shape[1:])
            if tuple(image.shape) != tuple(images.shape[1:]):
                raise ConfigError(
                    None,
                    f"input {i} of the data set has shape {tuple(image.shape)}, the others {tuple(images.shape[1:])}",
                    "a final chain that gives every input one shape",
                )
            images[i] = image
            labels[i] = label
        need = images.element_size() * images.nelement()
        log.debug("%d inputs stored in %s as %s (%.1f MiB)", n, where, dtype, need / 2**20)
        store = cls(images, labels, finish, where)
        store._mapped = mapped
        return store

    def to(self, device: torch.device) -> InputStore:
        """The store on ``device`` (the same object when already there; a memory-mapped store stays on disk)."""
        if self.images.device == device or self._mapped is not None:
            return self
        return InputStore(self.images.to(device), self.labels.to(device), self.finish, str(device))

    def batch(self, idx: torch.Tensor, device: torch.device) -> dict:
        """``{"image", "label"}`` of the inputs at ``idx``, as model inputs (float32, normalised) on ``device``."""
        idx = idx.to(self.images.device)
        if self._mapped is not None:  # read in file order, then put back in the asked order
            order = torch.argsort(idx)
            x = torch.empty((len(idx), *self.images.shape[1:]), dtype=self.images.dtype)
            x[order] = torch.from_numpy(np.ascontiguousarray(self._mapped[idx[order].numpy()]))
        else:
            x = self.images.index_select(0, idx)
        x = _moved(x, device, pin=True)
        x = x.float()
        labels = self.labels.index_select(0, idx.to(self.labels.device))
        return {"image": self.finish.batch(x) if self.finish is not None else x, "label": _moved(labels, device)}


def _moved(x: torch.Tensor, device: torch.device, pin: bool = False) -> torch.Tensor:
    """``x`` on ``device``. From the CPU to a GPU the copy does not block (through pinned memory with
    ``pin``); any other copy does (a GPU-to-CPU copy that did not block could be read before it lands)."""
    if x.device == device:
        return x
    if x.device.type == "cpu" and device.type == "cuda":
        return (x.pin_memory() if pin else x).to(device, non_blocking=True)
    return x.to(device)


def exact_device(device: torch.device | str) -> torch.device:
    """``device`` with its index: "cuda" names the current GPU, and tensors report it as "cuda:0"."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def place_store(dataset: InputDataset, device: torch.device | str, workers: int = 0) -> InputStore:
    """Prepare ``dataset``'s store (in ``workers`` processes) and, on a GPU, move it there when it takes at
    most a quarter of the free memory (batches are then gathered on the device); return it."""
    device = exact_device(device)
    store = dataset.store(workers)
    if device.type == "cuda" and store.images.device != device and store.nbytes <= _free_memory(device) // 4:
        store = dataset._store = store.to(device)
    return store


class _Prepared(torch.utils.data.Dataset):
    """(image, label) of each input through the chain before its last step (what a store keeps)."""

    def __init__(self, items: Sequence[dict], chain: Compose):
        self.items, self.chain = items, chain

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        out = self.chain(dict(self.items[i]))
        return _as_tensor(out["image"]), label_tensor(out["label"])


def label_tensor(label) -> torch.Tensor:
    """A record's label as a long tensor: a class index (0-d) or a multi-label row of 0/1 (1-d)."""
    return torch.as_tensor(np.asarray(label, dtype=np.int64))


def _as_tensor(x) -> torch.Tensor:
    return (
        x.as_tensor()
        if hasattr(x, "as_tensor")
        else torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    )


def _mapped_array(folder: str | Path | None, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[np.ndarray, str]:
    """A writable memory-mapped array in a new file of ``folder`` (default: the temporary folder), whose name
    is removed at once: the mapping keeps the space until it is released, and nothing is left behind."""
    folder = Path(folder or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="medtl-inputs-", suffix=".bin", dir=folder)
    try:
        np_dtype = np.float16 if dtype == torch.float16 else np.float32
        size = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        try:  # reserved now: a disk filling up later would kill the process (SIGBUS) instead of an error here
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            raise ConfigError(
                None,
                f"no room for the {size / 2**20:.0f} MiB input store in {folder} ({e.strerror})",
                "data.cache_dir on a disk with room for it",
            ) from None
        mapped = np.memmap(name, dtype=np_dtype, mode="r+", shape=shape)
    finally:
        os.close(fd)
        os.unlink(name)
    return mapped, f"a memory-mapped file in {folder}"


def store_options(data) -> dict:
    """:func:`create_dataset`'s store settings from a :class:`medtl.config.DataConfig`: ``data.input_store``,
    and ``data.cache_dir`` for a store too large for memory."""
    return {"store_dtype": data.input_store, "spill_dir": data.cache_dir}


def create_dataset(
    studies: Sequence[dict],
    final: Compose,
    aggregation: tuple[str, int] = ("mean", 3),
    store_dtype: str = "float16",
    memory_bytes: int = MEMORY_CACHE_BYTES,
    spill_dir: str | Path | None = None,
) -> InputDataset:
    """The model inputs of ``studies`` (slices of volumes in the "slices" modes) applying ``final``.

    ``aggregation`` (rule, k) tells evaluation how slice scores make a study score. ``final`` is
    deterministic (training augmentation runs on whole batches, see
    :class:`medtl.transforms.BatchAugment`), so each input is prepared once, into the data set's
    :class:`InputStore` (``store_dtype``; memory-mapped in ``spill_dir`` above ``memory_bytes``):
    epochs after the first spend no time on per-sample transforms.
    """
    keep = ("image", "label", "study", "slice_index")
    items = [{k: s[k] for k in keep if k in s} for s in expand_inputs(studies)]
    for item in items:  # multi-label rows as arrays: collated into (batch, findings), not transposed
        if isinstance(item.get("label"), (tuple, list)):
            item["label"] = np.asarray(item["label"], dtype=np.int64)
    return InputDataset(items, final, aggregation, store_dtype, memory_bytes, spill_dir)


def iterate_batches(
    dataset,
    batch_size: int,
    device: torch.device | str = "cpu",
    order: Sequence[int] | None = None,
    drop_last: bool = False,
    workers: int = 0,
) -> Iterator[dict]:
    """``{"image", "label"}`` batches of a data set on ``device``, in ``order`` (default: the data set's),
    ``batch_size`` at a time. An :class:`InputDataset` is read from its store (on a GPU, the store moves
    to the device when it takes at most a quarter of the free memory: batches are then gathered there);
    any other data set through a ``DataLoader`` with ``workers`` processes and, on a GPU, pinned memory."""
    device = exact_device(device)
    order = torch.arange(len(dataset)) if order is None else torch.as_tensor(list(order), dtype=torch.long)
    if len(order) == 0:
        return
    # (with drop_last, a set smaller than one batch still gives that one short batch, not an empty epoch)
    steps = len(order) // batch_size if drop_last and len(order) >= batch_size else -(-len(order) // batch_size)
    if isinstance(dataset, InputDataset):
        store = place_store(dataset, device, workers)
        for s in range(steps):
            yield store.batch(order[s * batch_size : (s + 1) * batch_size], device)
        return
    loader = DataLoader(
        torch.utils.data.Subset(dataset, order.tolist()),
        batch_size=batch_size,
        shuffle=False,
        drop_last=drop_last,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    for batch in loader:
        yield {
            "image": _moved(torch.as_tensor(batch["image"]), device),
            "label": _moved(torch.as_tensor(batch["label"]).long(), device),
        }


def _free_memory(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def study_index(dataset: Dataset) -> np.ndarray:
    """The study each sample of a :func:`create_dataset` dataset belongs to."""
    return np.asarray([s.get("study", i) for i, s in enumerate(dataset.data)])
