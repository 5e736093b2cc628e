"""Data: manifests, patient-level splits, datasets and the synthetic sample set."""

from medtl.data.dataset import create_dataset, decode_records
from medtl.data.manifest import Manifest, Problem, read_manifest
from medtl.data.sample import create_sample_data
from medtl.data.split import split_by_patient

__all__ = ["Manifest", "Problem", "read_manifest", "split_by_patient", "create_dataset", "decode_records",
           "create_sample_data"]
