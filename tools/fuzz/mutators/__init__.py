"""The mutators, one module per family (generic: bytes; dicom; nifti; picture; archive: zip; bomb;
inputs: config, npz, manifest and the codestream size lies of the bomb family).

Importing this package registers them all: take :data:`MUTATORS` from here, not from
:mod:`tools.fuzz.registry`, to have every one. Each family's mutators keep the order their module defines
them in, which :func:`tools.fuzz.recipes.plan` draws from."""

from tools.fuzz.mutators import archive, bomb, dicom, generic, inputs, nifti, picture
from tools.fuzz.registry import MUTATORS

__all__ = ["MUTATORS", "archive", "bomb", "dicom", "generic", "inputs", "nifti", "picture"]
