"""dydit: the Dynamic Diffusion Transformer (DyDiT, arXiv 2410.03456) on top of DiT and SiT.

The workflow, in the order a user meets it::

    import dydit
    dit = dydit.load_model("dit.safetensors")            # any DiT/SiT checkpoint format, or
    dit = dydit.create_model("DiT-Ti/4")                 # a preset, freshly initialised
    dy = dydit.DyDiT.from_dit(dit)                       # + routers; computes exactly the DiT
    result = dydit.finetune("dit.safetensors", target=0.5, steps=1200, out_dir="runs/dydit")
    dy = dydit.load_model(result.export)                 # the fine-tuned DyDiT (EMA weights)
    dy.execution = "sliced"                              # really skip the switched-off work, or
    fast = dydit.engine(dy, compile=True)                # the sliced engine with options (or pass
                                                         # fast to generate instead of dy)
    cheap = dydit.cached(dy, "teacache", threshold=0.15)   # step caching (pass cheap to generate)
    process = dydit.create_process(dy.config)            # DDPM diffusion or flow-matching transport
    settings = dydit.SamplingSettings(sampler="dpm++2m", steps=20, cfg_scale=1.5)
    for batch in dydit.generate(dy, process, settings, seeds=range(8), shape=(1, 32, 32), num_classes=10):
        ...                                              # batch.samples: (B, C, H, W), per-image seeds

Pre-training is ``dydit.train.train(dydit.TrainConfig(...))`` (the subpackage keeps its name, so
the function is not re-exported here). Lower layers (models, diffusion, flow, flops, data,
checkpoint, train, evaluate) are importable on their own; docs/ARCHITECTURE.md maps them.
"""

from dydit.checkpoint import checkpoint_config, fit_state_dict, load_checkpoint, load_model, read_checkpoint
from dydit.diffusion import SAMPLERS, create_diffusion, guided
from dydit.errors import CheckpointError, DyditError
from dydit.factory import build_model, create_model
from dydit.flow import FLOW_SAMPLERS, Transport, create_process
from dydit.models import DiT, DyDiT, WidthPlan, engine
from dydit.models.cache import cached
from dydit.presets import MODEL_NAMES, ModelConfig, get_model_config
from dydit.sample import SamplingSettings, generate, sample_images
from dydit.train import TrainConfig, finetune
from dydit.version import __version__

__all__ = [
    "FLOW_SAMPLERS",
    "MODEL_NAMES",
    "SAMPLERS",
    "CheckpointError",
    "DiT",
    "DyDiT",
    "DyditError",
    "ModelConfig",
    "SamplingSettings",
    "TrainConfig",
    "Transport",
    "WidthPlan",
    "__version__",
    "build_model",
    "cached",
    "checkpoint_config",
    "create_diffusion",
    "create_model",
    "create_process",
    "engine",
    "finetune",
    "fit_state_dict",
    "generate",
    "get_model_config",
    "guided",
    "load_checkpoint",
    "load_model",
    "read_checkpoint",
    "sample_images",
]
