"""Reading scans: DICOM, NIfTI and PNG/JPEG into one :class:`Scan` form."""

from medtl.io.bounded import describe_path_bounded, read_image_bounded
from medtl.io.dicom import read_dicom
from medtl.io.image import read_picture
from medtl.io.info import describe_path
from medtl.io.limits import ReadLimits, read_limits, set_read_limits, using_read_limits
from medtl.io.nifti import read_nifti
from medtl.io.reader import read_image, sniff_format
from medtl.io.scan import Scan
from medtl.io.series import SERIES_RULES, choose_series, list_series, read_series

__all__ = [
    "Scan",
    "read_image",
    "read_image_bounded",
    "describe_path_bounded",
    "ReadLimits",
    "read_limits",
    "set_read_limits",
    "using_read_limits",
    "read_dicom",
    "read_nifti",
    "read_picture",
    "read_series",
    "list_series",
    "choose_series",
    "SERIES_RULES",
    "sniff_format",
    "describe_path",
]
