"""TD-LoRA: timestep-dependent low-rank adapters on the units' linears of any backbone (ours).

docs/METHOD.md §18 (the definition, and where it is ours: the DyDiT++ paper names TD-LoRA but
publishes neither its form nor code); docs/ARCHITECTURE.md §7 (written against the backbone
contract only). Per block of a DyDiT:

- every linear its head and group units name (``head_units.linears()``, ``group_units.linears()``;
  DiT: ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) gets an adapter ΔW = s · B_g A_g,
  A (r, in), B (out, r), the rank r split into G equal groups, s = alpha / r;
- one router per block, ``Linear(D_w, G)`` on the width routers' input ``e = width_embedding(t)``,
  switches the groups on and off (Gumbel-sigmoid + straight-through in training, logit > 0 at
  evaluation), so the active adapter of a sampling step depends on t alone.

State-dict keys: ``blocks.i.lora.router.{weight,bias}`` and ``blocks.i.lora.adapters.<path with
_>.{down,up}`` (A and B). B starts at zero, so a fresh adapter is the base network exactly.

Where it runs:

- masked and dense passes (training): :func:`applied` is a context around the layer loop in which
  every ``F.linear(x, W, b)`` whose W is an adapted linear's weight (looked up by identity at call
  time, so FSDP's unsharded parameters are found too), or a 2-D view of one (a fused linear applied
  in parts), gains s · ((x Aᵀ) ⊙ m_b) Bᵀ (A's columns and B's rows of the view), m_b the
  sample's gate per rank channel: the base weights are never modified and gradients reach A, B and
  the router. The halves need no change: they call ``F.linear`` with their weights.
- the sliced engine merges: for each planned t the block's weights become W + s · B_g A_g
  (:func:`merged_weights`), and the packs slice those (no extra work per step).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from dydit.constants import LORA_ROUTER_INIT_BIAS
from dydit.errors import DyditError
from dydit.models.routers import gumbel_sigmoid

LORA_ATTR = "lora"  # the block attribute (state-dict keys blocks.i.lora.*)
LORA_KEY_MARKER = ".lora."


@dataclass(frozen=True)
class LoraConfig:
    """rank r, ``groups`` G (r divisible by G) and alpha (None: r, so the scale s = alpha / r is 1)."""

    rank: int
    groups: int = 1
    alpha: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise DyditError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.groups, int) or self.groups < 1:
            raise DyditError(f"LoRA groups must be a positive integer, got {self.groups!r}")
        if self.rank % self.groups:
            raise DyditError(f"LoRA rank {self.rank} is not divisible into {self.groups} groups")
        if self.alpha is not None and not self.alpha > 0:
            raise DyditError(f"LoRA alpha must be positive, got {self.alpha}")

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "groups": self.groups, "alpha": self.alpha}


def _key(path: str) -> str:
    return path.replace(".", "_")


class Adapter(nn.Module):
    """The low-rank update of one linear: ``down`` A (r, in), ``up`` B (out, r); ΔW = s · B A."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, device=None, dtype=None):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.up = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # as nn.Linear's weight; B = 0: ΔW = 0


class BlockAdapters(nn.Module):
    """One block's adapters (``adapters``, by linear path) and their timestep router (``router``)."""

    def __init__(self, block: nn.Module, width_dim: int, config: LoraConfig):
        super().__init__()
        self.config = config
        paths = [*block.head_units.linears(), *block.group_units.linears()]
        self.paths = tuple(dict.fromkeys(paths))  # the units' linears, in declaration order
        ref = block.get_submodule(self.paths[0]).weight
        self.router = nn.Linear(width_dim, config.groups, device=ref.device, dtype=ref.dtype)
        nn.init.xavier_uniform_(self.router.weight)
        nn.init.constant_(self.router.bias, LORA_ROUTER_INIT_BIAS)
        self.adapters = nn.ModuleDict()
        for path in self.paths:
            lin = block.get_submodule(path)
            self.adapters[_key(path)] = Adapter(
                lin.in_features, lin.out_features, config.rank, device=ref.device, dtype=ref.dtype
            )

    def adapter(self, path: str) -> Adapter:
        return self.adapters[_key(path)]

    def gates(self, e: Tensor) -> Tensor:
        """0/1 group gates (B, G) from the width routers' input e (B, D_w); Gumbel + STE in training."""
        return gumbel_sigmoid(self.router(e), self.training)

    def hard_gates(self, e: Tensor) -> Tensor:
        """Evaluation gates, bool (B, G), whatever the module's mode."""
        return self.router(e) > 0

    def rank_mask(self, gates: Tensor) -> Tensor:
        """Group gates (..., G) -> per rank channel (..., r)."""
        return gates.repeat_interleave(self.config.rank // self.config.groups, dim=-1)

    def delta(self, path: str, gates: Tensor) -> Tensor:
        """ΔW (out, in) of one linear for one gate pattern (G,) (bool or 0/1)."""
        a = self.adapter(path)
        m = self.rank_mask(gates.to(a.up.dtype))
        return self.config.scale * (a.up * m) @ a.down


# Adding, finding and removing adapters --------------------------------------------------------------
def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Give every block of ``model`` (a DyDiT over any backbone) its adapters and router, in place."""
    if has_lora(model):
        raise DyditError("this model already has TD-LoRA adapters")
    for block in model.blocks:
        setattr(block, LORA_ATTR, BlockAdapters(block, model.width_dim, config))
    return model


def has_lora(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return (
        blocks is not None
        and len(blocks) > 0
        and isinstance(getattr(blocks[0], LORA_ATTR, None), BlockAdapters)
    )


def lora_config(model: nn.Module) -> LoraConfig | None:
    return getattr(model.blocks[0], LORA_ATTR).config if has_lora(model) else None


def remove_lora(model: nn.Module) -> nn.Module:
    for block in model.blocks:
        if isinstance(getattr(block, LORA_ATTR, None), BlockAdapters):
            delattr(block, LORA_ATTR)
    return model


def is_lora_key(name: str) -> bool:
    return LORA_KEY_MARKER in f".{name}"


def freeze_base(model: nn.Module, router_markers: tuple[str, ...]) -> list[str]:
    """Only adapters, their routers and the DyDiT routers (keys holding ``router_markers``) train;
    returns the trainable names."""
    trainable = []
    for name, p in model.named_parameters():
        keep = is_lora_key(name) or any(m in f".{name}" for m in router_markers)
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    return trainable


# Training / masked / dense passes: the adapters in activation space ----------------------------------
_LINEARS = {F.linear, torch._C._nn.linear}


class _Adapted(TorchFunctionMode):
    """Adds each adapted linear's gated low-rank term to ``F.linear`` calls on its weight."""

    def __init__(self, model: nn.Module, e: Tensor):
        super().__init__()
        self.model, self.e = model, e
        self.gates: dict[int, Tensor] = {}  # per layer, drawn at the layer's first adapted linear
        self.owners: dict[int, tuple[Tensor, BlockAdapters, str, int]] = {}
        self.others: dict[int, Tensor] = {}  # weights of linears without adapters (alive: held here)
        self.hits: set[tuple[int, str]] = set()

    def copy(self) -> _Adapted:
        """A fresh mode on the same e, for activation checkpointing's recomputation: it draws each
        layer's gates again, inside the layer, where the checkpoint has restored the RNG state."""
        return _Adapted(self.model, self.e)

    def _gates(self, layer: int, adapters: BlockAdapters) -> Tensor:
        # Drawn inside the block's own pass, where a sharded (FSDP) block has its router gathered.
        if layer not in self.gates:
            self.gates[layer] = adapters.gates(self.e)
        return self.gates[layer]

    def _index(self) -> None:
        self.owners = {}
        for i, block in enumerate(self.model.blocks):
            adapters = getattr(block, LORA_ATTR)
            for path in adapters.paths:
                w = block.get_submodule(path).weight
                self.owners[id(w)] = (w, adapters, path, i)

    def _lookup(self, weight) -> tuple[BlockAdapters, str, int] | None:
        entry = self.owners.get(id(weight))
        if entry is None or entry[0] is not weight:
            self._index()  # the weights moved (FSDP gathers a block's per pass): look them up again
            entry = self.owners.get(id(weight))
            if entry is None or entry[0] is not weight:
                return None
        return entry[1:]

    def _owner(self, weight) -> tuple[BlockAdapters, str, int, slice, slice] | None:
        """(adapters, path, layer, rows, columns) of an adapted weight or of a 2-D view into one
        (a fused linear a half applies in parts, e.g. FLUX's single-block ``proj_out``)."""
        if self.others.get(id(weight)) is weight:
            return None  # a linear without adapter (adaLN, embedders, routers), seen before
        owner = self._lookup(weight)
        if owner is not None:
            return (*owner, slice(None), slice(None))
        base = weight._base
        if base is not None and base.ndim == 2 and weight.ndim == 2 and weight.stride() == base.stride():
            owner = self._lookup(base)
            if owner is not None:
                r0, c0 = divmod(weight.storage_offset() - base.storage_offset(), base.stride(0))
                rows, cols = slice(r0, r0 + weight.shape[0]), slice(c0, c0 + weight.shape[1])
                return (*owner, rows, cols)
        self.others[id(weight)] = weight
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in _LINEARS:
            return out
        x = args[0] if args else kwargs["input"]
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        owner = self._owner(weight)
        if owner is None:
            return out
        adapters, path, layer, rows, cols = owner
        self.hits.add((layer, path))
        gates = self._gates(layer, adapters)  # (B, G)
        m = adapters.rank_mask(gates)  # (B, r)
        if x.ndim >= 2 and x.shape[0] == m.shape[0]:
            m = m.reshape(m.shape[0], *([1] * (x.ndim - 2)), m.shape[1])
        elif bool((gates == gates[:1]).all()):
            m = m[0]
        else:
            raise DyditError(
                f"TD-LoRA: block {layer}'s {path} got rows {tuple(x.shape)} whose batch is not the "
                f"gates' ({gates.shape[0]}); its half must keep the batch first"
            )
        # The low-rank term is linear in x: a view's part uses A's columns and B's rows of the view.
        a = adapters.adapter(path)
        low = F.linear(x, a.down[:, cols])
        update = F.linear(low * m.to(low.dtype), a.up[rows])
        return out + (adapters.config.scale * update).to(out.dtype)


_ACTIVE: list[_Adapted] = []


@contextlib.contextmanager
def applied(model: nn.Module, e: Tensor) -> Iterator[None]:
    """Inside the block, the model's linears run with their adapters, gated per sample by e
    (B, D_w) (:class:`_Adapted`); a no-op without adapters. Each layer's gates are drawn (Gumbel
    in training) at its first adapted linear, so within the layer's pass. Raises DyditError if an adapted
    linear was not called through ``F.linear`` with its own weight (a family whose halves
    compute it otherwise cannot carry TD-LoRA this way)."""
    if not has_lora(model):
        yield
        return
    mode = _Adapted(model, e)
    _ACTIVE.append(mode)
    try:
        with mode:
            yield
    finally:
        _ACTIVE.pop()
    missed = [f"{i}:{p}" for i, b in enumerate(model.blocks) for p in b.lora.paths if (i, p) not in mode.hits]
    if missed:
        raise DyditError(f"TD-LoRA: adapted linears never called through F.linear: {', '.join(missed[:4])}")


def recompute_context() -> contextlib.AbstractContextManager:
    """For activation checkpointing: the adapters active now, to re-enter in the recomputation."""
    return _ACTIVE[-1].copy() if _ACTIVE else contextlib.nullcontext()


# Inference: merged weights ------------------------------------------------------------------------------
@torch.no_grad()
def gate_plan(model: nn.Module, timesteps: Tensor) -> Tensor:
    """Evaluation gates, bool (T, L, G), for time values t (T,) (from ``width_embedding(t)``)."""
    device = next(model.parameters()).device
    e = model.width_embedding(torch.as_tensor(timesteps, device=device).reshape(-1))
    return torch.stack([getattr(b, LORA_ATTR).hard_gates(e) for b in model.blocks], 1).cpu()


@torch.no_grad()
def merged_weights(block: nn.Module, gates: Tensor) -> dict[str, tuple[Tensor, Tensor | None]]:
    """The block's adapted linears with the adapter of one gate pattern (G,) merged: W + s·B_g A_g
    (detached copies; biases are the block's own)."""
    adapters = getattr(block, LORA_ATTR)
    out = {}
    for path in adapters.paths:
        lin = block.get_submodule(path)
        w = lin.weight.detach()
        delta = adapters.delta(path, gates.to(w.device))
        out[path] = ((w + delta.to(w.dtype)).contiguous(), None if lin.bias is None else lin.bias.detach())
    return out


@torch.no_grad()
def merge_lora(model: nn.Module, timesteps: Tensor) -> nn.Module:
    """Fold the adapters into the base weights (in place) and remove them; exact only when every
    block's gates are the same at all ``timesteps`` (else DyditError: the adapter then depends on t
    and belongs in the sliced engine, which merges per step)."""
    plan = gate_plan(model, timesteps)  # (T, L, G)
    varying = [i for i in range(plan.shape[1]) if not bool((plan[:, i] == plan[:1, i]).all())]
    if varying:
        raise DyditError(
            f"TD-LoRA gates change with t in {len(varying)} of {plan.shape[1]} blocks: no single set of "
            "plain weights equals the model; sample with the adapters instead (--lora)"
        )
    for i, block in enumerate(model.blocks):
        for path, (w, _) in merged_weights(block, plan[0, i]).items():
            block.get_submodule(path).weight.copy_(w)
    return remove_lora(model)
