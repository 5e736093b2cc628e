"""The mutators, one module per family (generic: bytes; dicom; nifti; picture; archive: zip; bomb).

Importing this package registers them all: take :data:`MUTATORS` from here, not from
:mod:`tools.fuzz.registry`, to have every one. Each family's mutators keep the order their module defines
them in, which :func:`tools.fuzz.recipes.plan` draws from."""

from tools.fuzz.mutators import archive, bomb, dicom, generic, nifti, picture
from tools.fuzz.registry import MUTATORS

__all__ = ["MUTATORS", "archive", "bomb", "dicom", "generic", "nifti", "picture"]
