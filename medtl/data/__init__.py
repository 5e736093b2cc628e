"""Data: manifests, image folders and MedMNIST files, patient-level splits, datasets, sample data."""

from medtl.data.dataset import (
    MEMORY_CACHE_BYTES,
    InputDataset,
    InputStore,
    create_dataset,
    decode_records,
    expand_inputs,
    iterate_batches,
    store_options,
    study_index,
)
from medtl.data.manifest import Manifest, Problem, read_manifest
from medtl.data.sample import create_multilabel_sample, create_sample_data, create_sample_series
from medtl.data.sources import read_dataset, read_image_folder, read_medmnist, read_unlabelled
from medtl.data.split import (
    TooFewExamplesError,
    check_split_classes,
    kfold_by_patient,
    sample_per_class,
    split_by_patient,
)

__all__ = [
    "Manifest",
    "Problem",
    "read_manifest",
    "read_dataset",
    "read_image_folder",
    "read_medmnist",
    "read_unlabelled",
    "split_by_patient",
    "kfold_by_patient",
    "check_split_classes",
    "create_dataset",
    "decode_records",
    "create_sample_data",
    "create_sample_series",
    "create_multilabel_sample",
    "sample_per_class",
    "TooFewExamplesError",
    "InputDataset",
    "InputStore",
    "iterate_batches",
    "store_options",
    "expand_inputs",
    "study_index",
    "MEMORY_CACHE_BYTES",
]
