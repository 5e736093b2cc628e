"""Reading scans: DICOM, NIfTI and PNG/JPEG into one :class:`Scan` form."""

from medtl.io.dicom import read_dicom
from medtl.io.image import read_picture
from medtl.io.nifti import read_nifti
from medtl.io.reader import read_image, sniff_format
from medtl.io.scan import Scan

__all__ = ["Scan", "read_image", "read_dicom", "read_nifti", "read_picture", "sniff_format"]
