"""Every checkpoint format in one place (docs/METHOD.md §1.5, §12): reading, converting, fitting a model.

- :func:`load_checkpoint` -> a state dict in dydit's (the official DiT's) key layout, from a raw
  state dict, an official DiT/DyDiT/SiT training dict, a dydit training state or export, a bare
  ``.safetensors`` file, or a diffusers ``DiTTransformer2DModel`` folder;
- :func:`load_model` -> the right DiT or DyDiT for any of them, loaded strictly;
- :func:`open_checkpoint` -> a :class:`Checkpoint` record (format, weights, stored config, args, step);
- :func:`write_diffusers` -> a diffusers folder from a dydit model's weights.

Only two loaders ever touch a file: ``torch.load(..., weights_only=True)`` (with
``argparse.Namespace`` allowed for the call, nothing else) and safetensors.
"""

from dydit.checkpoint.describe import describe_checkpoint
from dydit.checkpoint.diffusers import find_diffusers_dir, read_diffusers, write_diffusers
from dydit.checkpoint.files import (
    config_from_object,
    file_sha256,
    read_file,
    state_dict_from_object,
)
from dydit.checkpoint.formats import (
    FORMATS,
    Checkpoint,
    checkpoint_config,
    load_checkpoint,
    open_checkpoint,
    read_checkpoint,
)
from dydit.checkpoint.layout import check_layout, detect_router_layout, load_dydit_state_dict
from dydit.checkpoint.load import (
    build_loaded,
    fit_problem,
    load_dydit_checkpoint,
    load_model,
    model_config,
    weight_conventions,
)
from dydit.models.fitting import (
    describe_mismatch,
    fit_state_dict,
    guess_preset,
    has_routers,
    size_mismatches,
)

__all__ = [
    "FORMATS",
    "Checkpoint",
    "build_loaded",
    "check_layout",
    "checkpoint_config",
    "config_from_object",
    "describe_checkpoint",
    "describe_mismatch",
    "detect_router_layout",
    "file_sha256",
    "find_diffusers_dir",
    "fit_problem",
    "fit_state_dict",
    "guess_preset",
    "has_routers",
    "load_checkpoint",
    "load_dydit_checkpoint",
    "load_dydit_state_dict",
    "load_model",
    "model_config",
    "open_checkpoint",
    "read_checkpoint",
    "read_diffusers",
    "read_file",
    "size_mismatches",
    "state_dict_from_object",
    "weight_conventions",
    "write_diffusers",
]
