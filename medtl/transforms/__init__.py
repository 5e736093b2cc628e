"""MONAI transform chains built from the data config and the encoder's preprocessing record.

The same function (:func:`create_transforms`) builds the training and the inference chain, so a saved
model is always fed exactly as it was trained. Samples are dicts: ``{"image": path or array, "label": int,
"modality": str}``. :mod:`~medtl.transforms.intensity` holds the intensity presets by modality,
:mod:`~medtl.transforms.read` the reading of a scan into model inputs (volumes into 2D inputs),
:mod:`~medtl.transforms.chain` the chains themselves and :mod:`~medtl.transforms.augment` the batch
augmentation training applies on its device.
"""

from medtl.transforms.augment import BatchAugment
from medtl.transforms.chain import EncoderInputd, TrainingTransform, create_transforms, input_to_original, split_final
from medtl.transforms.intensity import XRAY_MODALITIES, intensity_preset, scale_colour, scale_intensity, use_colour
from medtl.transforms.read import (
    LoadScan2Dd,
    display_image,
    prepare_inputs,
    scan_from_array,
    split_slices,
    volume_inputs,
)

__all__ = [
    "create_transforms",
    "EncoderInputd",
    "TrainingTransform",
    "split_final",
    "input_to_original",
    "BatchAugment",
    "XRAY_MODALITIES",
    "intensity_preset",
    "scale_intensity",
    "scale_colour",
    "use_colour",
    "LoadScan2Dd",
    "volume_inputs",
    "scan_from_array",
    "split_slices",
    "prepare_inputs",
    "display_image",
]
