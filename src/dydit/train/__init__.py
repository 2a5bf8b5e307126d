"""Training: pretraining and DyDiT fine-tuning in one loop (docs/METHOD.md §5, §6).

    from dydit.train import TrainConfig, train
    result = train(TrainConfig(model="DiT-Ti/4", data="fashion-mnist", steps=2000, out_dir="runs/dit"))
    train(TrainConfig(model="DyDiT-Ti/4", init_from=str(result.export), target=0.5, out_dir="runs/dydit"))
    finetune(result.export, target=0.5, out_dir="runs/dydit")   # the same; the model from the file

Rerunning the same config resumes exactly; the same call runs data-parallel under torchrun.
"""

from dydit.train.config import TrainConfig
from dydit.train.loop import TrainResult, configure_torch, finetune, train

__all__ = ["TrainConfig", "TrainResult", "configure_torch", "finetune", "train"]
