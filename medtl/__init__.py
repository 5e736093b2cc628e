"""medtl: transfer learning for medical images.

ImageNet-pretrained encoders (timm) fine-tuned on small clinical label sets, with MONAI
preprocessing, patient-level evaluation, Grad-CAM explanations and a Gradio UI.
Importing medtl does nothing else: no downloads, no seeding, no warning filters.
"""

__version__ = "0.1.0"

from medtl.config import ExperimentConfig, load_config  # noqa: E402
from medtl.errors import MedtlError, MedtlInputError  # noqa: E402
from medtl.inference import Predictor, load_run  # noqa: E402
from medtl.io import Scan, read_image  # noqa: E402
from medtl.models import create_encoder, list_encoders  # noqa: E402
from medtl.train import run_experiment  # noqa: E402

__all__ = ["ExperimentConfig", "load_config", "MedtlError", "MedtlInputError", "Predictor", "load_run", "Scan",
           "read_image", "create_encoder", "list_encoders", "run_experiment", "__version__"]
