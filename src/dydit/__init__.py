"""dydit: the Dynamic Diffusion Transformer (DyDiT, arXiv 2410.03456) on top of DiT.

Public API::

    import dydit
    model = dydit.create_model("DiT-XL/2")
    model.load_state_dict(dydit.load_checkpoint("DiT-XL-2-256x256.pt"))
    model = dydit.load_model("DiT-XL-2-256x256.pt")   # any accepted format, the model picked for you
"""

from dydit.checkpoint import checkpoint_config, fit_state_dict, load_checkpoint, load_model, read_checkpoint
from dydit.diffusion import SAMPLERS, create_diffusion, guided
from dydit.errors import CheckpointError, DyditError
from dydit.factory import build_model, create_model
from dydit.presets import MODEL_NAMES, ModelConfig, get_model_config
from dydit.sample import SamplingSettings, generate, sample_images

__version__ = "0.1.0"

__all__ = [
    "MODEL_NAMES",
    "SAMPLERS",
    "SamplingSettings",
    "CheckpointError",
    "DyditError",
    "ModelConfig",
    "__version__",
    "build_model",
    "checkpoint_config",
    "create_diffusion",
    "create_model",
    "fit_state_dict",
    "generate",
    "get_model_config",
    "guided",
    "load_checkpoint",
    "load_model",
    "read_checkpoint",
    "sample_images",
]
