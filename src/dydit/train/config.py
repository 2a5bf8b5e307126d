"""The typed configuration of one training run (docs/METHOD.md §1.6, §6; docs/ARCHITECTURE.md §6.6).

One frozen dataclass covers DiT pre-training and DyDiT fine-tuning: they differ by the model
preset (``DyDiT-*`` routes), ``init_from`` and the FLOPs target λ. The resolved config is saved as
``config.json`` in the run directory and inside every training state and export.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from dydit.constants import (
    AUTO_HOLD_FRACTION,
    AUTO_WARMUP_FRACTION,
    FLOPS_LOSS_WEIGHT,
    TARGET_HOLD_STEPS,
    TARGET_WARMUP_STEPS,
)
from dydit.errors import DyditError
from dydit.flops.analytic import check_target
from dydit.presets import (
    ModelConfig,
    dydit_name,
    get_model_config,
    get_uvit_config,
    is_flux_name,
    is_sit_name,
)

GradGuard = Literal["clip", "skip", "none"]
GRAD_GUARDS: tuple[str, ...] = ("clip", "skip", "none")
FITS: tuple[str, ...] = ("pad", "resize")
FSDP_PRECISIONS: tuple[str, ...] = ("none", "bf16")

# Fields that may change between an interrupted run and its resumption without changing results
# (or that only say how far to go); all other fields must match the stored config.
RESUMABLE_CHANGES: frozenset[str] = frozenset(
    {"out_dir", "steps", "ckpt_every", "keep_checkpoints", "log_every", "num_workers", "device", "progress"}
)
# Fields whose None means "scaled to the run" (:meth:`TrainConfig.resolved`); a run stores the values
# it resolved at its start, and a resumed run keeps them whatever ``steps`` says now.
AUTO_FIELDS: tuple[str, ...] = ("target_hold_steps", "target_warmup_steps", "ema_warmup")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Durations are in optimisation steps.

    Model:
        model: preset name (``DiT-Ti/2``, ``DyDiT-S/2``, ...); ``model_overrides`` replace fields
            of its :class:`~dydit.presets.ModelConfig` (``input_size``, ``in_channels`` and
            ``num_classes`` are taken from the data unless overridden).
        init_from: checkpoint to start from (a DiT for fine-tuning, or weights to continue).
    Data:
        data: dataset spec (``fashion-mnist``, ``digits``, ``folder:PATH``, ``latents:PATH``).
        image_size, fit: pixel size and how small images reach it (``pad`` or ``resize``).
        flip: horizontal flips (None: the dataset's default, off for digits).
    Optimisation (docs/METHOD.md §1.6, §6.1): AdamW with ``lr``, ``weight_decay``; ``router_lr`` (None:
        ``lr``) is the learning rate of DyDiT's routers alone, a project option for short fine-tunes
        (the paper uses one rate for all parameters); global ``batch_size``
        split over the processes; ``grad_guard`` "clip" (default) scales gradients by
        min(1, ``grad_threshold`` / norm), "skip" drops the update unless norm < ``grad_threshold``
        (the released stage-2 fine-tuning); one optimizer step per iteration at most (the released
        stage-1 script takes two, docs/METHOD.md §6.2; docs/TRAINING.md says why "clip" is the default).
    EMA: ``ema_decay`` per step, initialised from the model; ``ema_warmup`` (None: on) uses
        min(decay, (1 + step) / (10 + step)), so that the average follows the weights of any run
        length (without it, 1000 steps at decay 0.9999 leave 90 % of the initial weights in the EMA).
    DyDiT (docs/METHOD.md §5): ``target`` λ, ``target_warmup_steps`` / ``target_hold_steps`` of the λ_t
        schedule (None: the paper's 1000 / 100 for runs of 2000 steps or more, else scaled to the run,
        half of it to reach λ and a twentieth held at 1; :meth:`resolved`), ``complete_steps``
        iterations with the complete-model loss, ``flops_weight``,
        ``stratified_t`` (None: on for DyDiT, off for DiT); ``reorder`` sorts every block's heads
        and MLP groups by weight-norm importance before fine-tuning starts (function-preserving, so
        the forced-on index 0 is the most important unit; ``dydit.models.reorder``).
    Distillation (a project option, not in the paper; docs/TRAINING.md, "Distillation"):
        ``distill_weight`` w_d of the loss w_d · mean((f_θ(x_t, t, y) − f_teacher(x_t, t, y))²)
        over every output channel (ε and variance), against a frozen teacher loaded from
        ``distill_from`` (None: ``init_from``, the dense base a fine-tune starts from); 0: off.
    Checkpoints: every ``ckpt_every`` steps; ``keep_checkpoints`` numbered copies are kept (0: all).
    Runtime: ``bf16`` autocast, ``grad_checkpointing``, ``device``, ``num_workers``, ``progress``.
    TD-LoRA (docs/METHOD.md §18, ours): ``lora_rank`` r > 0 freezes the base weights and trains
        low-rank adapters (rank split into ``lora_groups`` gated by a timestep router) with the
        DyDiT routers; the run exports ``lora.safetensors`` (adapters and routers) beside the base.
    Sharding (docs/TRAINING.md, "FSDP"): ``fsdp`` shards parameters, gradients and optimizer state
        over the processes with FSDP2 (``fully_shard``), ``fsdp_mixed_precision`` "bf16" computes
        in bfloat16 with float32 gradients reduced and stored; checkpoints are distributed
        checkpoints (``torch.distributed.checkpoint``).
    """

    out_dir: str = "runs/train"
    model: str = "DiT-Ti/2"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    data: str = "fashion-mnist"
    image_size: int | None = None
    fit: str = "pad"
    flip: bool | None = None
    batch_size: int = 64
    lr: float = 1e-4
    router_lr: float | None = None
    weight_decay: float = 0.0
    steps: int = 1000
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 50
    seed: int = 0
    ema_decay: float = 0.9999
    ema_warmup: bool | None = None
    grad_guard: GradGuard = "clip"
    grad_threshold: float = 200.0
    target: float | None = None
    target_warmup_steps: int | None = None
    target_hold_steps: int | None = None
    complete_steps: int = 0
    flops_weight: float = FLOPS_LOSS_WEIGHT
    stratified_t: bool | None = None
    reorder: bool = False
    distill_weight: float = 0.0
    distill_from: str | None = None
    bf16: bool = False
    grad_checkpointing: bool = False
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True
    lora_rank: int = 0
    lora_groups: int = 1
    fsdp: bool = False
    fsdp_mixed_precision: str = "none"

    def __post_init__(self) -> None:
        positive = ("batch_size", "steps", "ckpt_every", "log_every")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise DyditError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        non_negative = (
            "target_warmup_steps", "target_hold_steps", "complete_steps", "num_workers", "seed",
            "keep_checkpoints",
        )  # fmt: skip
        for name in non_negative:
            value = getattr(self, name)
            if name in AUTO_FIELDS and value is None:
                continue
            if not isinstance(value, int) or value < 0:
                raise DyditError(f"{name} must be an integer >= 0, got {value!r}")
        if not self.lr > 0:
            raise DyditError(f"learning rate must be positive, got {self.lr}")
        if self.router_lr is not None and not self.router_lr > 0:
            raise DyditError(f"router learning rate must be positive, got {self.router_lr}")
        if not self.weight_decay >= 0:
            raise DyditError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise DyditError(f"EMA decay must be in [0, 1), got {self.ema_decay}")
        if self.grad_guard not in GRAD_GUARDS:
            raise DyditError(f"grad_guard must be one of {GRAD_GUARDS}, got {self.grad_guard!r}")
        if self.grad_guard != "none" and not self.grad_threshold > 0:
            raise DyditError(f"grad_threshold must be positive, got {self.grad_threshold}")
        if self.fit not in FITS:
            raise DyditError(f"fit must be one of {FITS}, got {self.fit!r}")
        if not self.flops_weight >= 0:
            raise DyditError(f"FLOPs loss weight must be >= 0, got {self.flops_weight}")
        if not self.distill_weight >= 0:
            raise DyditError(f"distillation weight must be >= 0, got {self.distill_weight}")
        if self.distill_weight > 0 and self.teacher_path is None:
            raise DyditError("distillation needs a teacher: set --distill-from or --init-from")
        if self.target is not None:
            check_target(self.target)
        if self.lora_rank:
            from dydit.models.lora import LoraConfig

            LoraConfig(self.lora_rank, self.lora_groups)  # one-line errors for bad values
        if self.fsdp_mixed_precision not in FSDP_PRECISIONS:
            raise DyditError(
                f"fsdp_mixed_precision must be one of {FSDP_PRECISIONS}, got {self.fsdp_mixed_precision!r}"
            )
        if self.fsdp_mixed_precision != "none" and not self.fsdp:
            raise DyditError("--fsdp-mixed-precision needs --fsdp (without it, use --bf16 autocast)")
        dynamic = self.model_config().dynamic
        if dynamic and self.target is None:
            raise DyditError(f"{self.model} is a DyDiT: set the FLOPs target lambda in (0, 1] (--target)")
        if self.lora_rank and not dynamic:
            raise DyditError("TD-LoRA (--lora) fine-tunes a DyDiT: use dydit finetune")
        if not dynamic and (self.target is not None or self.complete_steps or self.reorder):
            raise DyditError(
                f"{self.model} is a static DiT: a FLOPs target, complete-model steps and reordering "
                "need DyDiT"
            )

    # Derived --------------------------------------------------------------------------------
    def model_config(self, **data_defaults: Any) -> ModelConfig:
        """The model's config: preset, then ``data_defaults`` (channels/size/classes), then overrides."""
        return get_model_config(self.model, **{**data_defaults, **self.model_overrides})

    @property
    def dynamic(self) -> bool:
        return self.model_config().dynamic

    @property
    def teacher_path(self) -> str | None:
        """The frozen teacher of the distillation loss (``distill_from``, else ``init_from``)."""
        return self.distill_from or self.init_from

    def resolved(self, stored: dict[str, Any] | None = None) -> TrainConfig:
        """This config with every automatic field (None) made concrete: from ``stored`` (the train
        config of the run being resumed) where it has the field, else scaled to ``steps``."""
        auto = {**auto_target_schedule(self.steps), "ema_warmup": True}
        values = {}
        for name in AUTO_FIELDS:
            if getattr(self, name) is None:
                kept = None if stored is None else stored.get(name, _PRE_AUTO_DEFAULTS[name])
                values[name] = kept if kept is not None else auto[name]
        return self.replace(**values) if values else self

    @property
    def use_stratified_t(self) -> bool:
        return self.dynamic if self.stratified_t is None else self.stratified_t

    # Serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DyditError(f"unknown training config fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def resume_conflicts(self, stored: dict[str, Any]) -> list[str]:
        """Fields whose values differ from a stored run's config in a way that changes results.

        A field the stored config lacks (a run recorded before the field existed) counts as its
        default, which is what that run used. An automatic field left None here takes the stored
        value (:meth:`resolved`), so it is no conflict.
        """
        mine = self.to_dict()
        defaults = {
            f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING
        }
        old = {k: stored.get(k, defaults.get(k)) for k in mine}
        # stratified_t None means "on for a DyDiT, off for a DiT" (the Python API's default, where the
        # CLI says True or False): compare what the two runs do, not how each said it.
        if None in (old["stratified_t"], mine["stratified_t"]):
            old["stratified_t"], mine["stratified_t"] = (
                self.dynamic if v is None else v for v in (old["stratified_t"], mine["stratified_t"])
            )
        return [
            f"{k}: {old[k]!r} -> {mine[k]!r}"
            for k in mine
            if k not in RESUMABLE_CHANGES and not (k in AUTO_FIELDS and mine[k] is None) and old[k] != mine[k]
        ]


# The defaults of these fields before they became automatic: what a run that did not record them used.
_PRE_AUTO_DEFAULTS: dict[str, Any] = {
    "target_hold_steps": TARGET_HOLD_STEPS,
    "target_warmup_steps": TARGET_WARMUP_STEPS,
    "ema_warmup": False,
}


def auto_target_schedule(steps: int) -> dict[str, int]:
    """The λ_t schedule of a run of ``steps`` steps when none is given (docs/METHOD.md §5.4).

    The paper's hold (100) and warm-up (1000) from 2000 steps on; a shorter run holds λ_t = 1 for
    a twentieth of its steps and reaches λ at mid-run, so that its second half trains at the target
    (with the paper's 1000-step warm-up, a 200-step fine-tune would end at λ_t = 0.91).
    """
    return {
        "target_hold_steps": min(TARGET_HOLD_STEPS, int(steps * AUTO_HOLD_FRACTION)),
        "target_warmup_steps": min(TARGET_WARMUP_STEPS, int(steps * AUTO_WARMUP_FRACTION)),
    }


def model_spec(config: ModelConfig, dynamic: bool | None = None) -> tuple[str, dict[str, Any]]:
    """A (preset name, overrides) pair that reproduces ``config`` (as ``DyDiT-*`` when ``dynamic``).

    Used to fine-tune from a checkpoint whose stored config need not match a preset exactly.
    """
    from dydit.presets import DIT_NAMES, UVIT_NAMES, UViTConfig, dydit_name, preset_name
    from dydit.presets_flux import FLUX_PRESETS, FluxConfig, flux_preset_name, get_flux_config

    dynamic = config.dynamic if dynamic is None else dynamic
    target = config.replace(dynamic=dynamic)
    # a FLUX (docs/METHOD.md §15): its preset (its DyFLUX twin when dynamic), else the first
    if isinstance(config, FluxConfig):
        name = flux_preset_name(target) or next(iter(FLUX_PRESETS))
        return name, _changed_fields(get_flux_config(name), target)
    if isinstance(config, UViTConfig):  # a U-ViT (docs/METHOD.md §16): its preset, else the first
        name = preset_name(config.replace(dynamic=False)) or UVIT_NAMES[0]
        return (dydit_name(name) if dynamic else name), _changed_fields(get_uvit_config(name), target)
    name = preset_name(config.replace(dynamic=False)) or DIT_NAMES[0]
    if dynamic and name in DIT_NAMES:
        name = dydit_name(name)
    return name, _changed_fields(get_model_config(name), target)


def _changed_fields(base: Any, target: Any) -> dict[str, Any]:
    """The fields of config ``target`` that differ from ``base``'s, compared as stored (``to_dict``:
    lists, not tuples), without the family marker."""
    stock = base.to_dict()
    return {k: v for k, v in target.to_dict().items() if k != "family" and stock.get(k) != v}


def run_model(
    init_from: str | None,
    model: str | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    finetune: bool,
) -> tuple[str, dict[str, Any]]:
    """The (preset name, overrides) of the model a run trains from ``init_from`` (``--init-from``) and
    ``model`` (``--model``); ``dydit train``, ``dydit finetune`` and :func:`dydit.train.finetune` all
    ask this.

    - A named preset starting from a file keeps the file's objective and numerics
      (:func:`~dydit.checkpoint.weight_conventions`).
    - A fine-tune without ``model`` becomes the DyDiT version of the file's own model: its stored
      config, else its training args, else the preset its shapes match (:func:`model_spec`).
    - A fine-tune of a named DiT preset becomes its ``DyDiT-*`` preset; of a SiT preset, the SiT
      with ``dynamic=True`` (a DyDiT on a flow-matching network).

    ``overrides`` (the user's ``--model-option``) win over what the file says.
    """
    overrides = dict(overrides or {})
    if init_from is not None and model is not None:
        from dydit.checkpoint import weight_conventions

        overrides = {**weight_conventions(init_from), **overrides}
    if finetune and model is None:
        from dydit.checkpoint import model_config

        model, stored = model_spec(model_config(str(init_from)), dynamic=True)
        overrides = {**stored, **overrides}
    elif finetune and (is_sit_name(model) or is_flux_name(model)):  # FLUX: METHOD §17.6
        overrides = {"dynamic": True, **overrides}
    elif finetune:
        model = dydit_name(model)
    if model is None:
        raise DyditError("no model: give --model (a preset name)")
    return model, overrides
