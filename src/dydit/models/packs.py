"""Weight packs of the sliced engine: the active units' weights, held within a memory budget.

docs/METHOD.md §3.5 items 2-3; docs/ARCHITECTURE.md §4. A :class:`Pack` is the weights of the
active heads (or MLP groups) of one layer for one mask pattern, sliced by the units the block
declares (models/backbone.py). It is one of

- *shared*: every unit is active, so the pack is the block's own tensors (0 bytes);
- *empty*: no unit is active (the branch is its output bias; 0 bytes);
- *held*: a contiguous copy of the active rows/columns, made once and reused;
- *gathered*: only the index tensors are kept and the copy is made by ``index_select`` at each use.

:class:`PackStore` keeps one Pack per (layer, pattern) and decides which are held: the patterns a
plan uses most, while the copies and the indices stay within ``budget`` × the bytes of the blocks'
attention+MLP weights (:meth:`PackStore.memory`). ``budget=None`` holds every pack.

:class:`WeightWatch` makes the engine follow its model: it records each parameter's version counter
and storage address (holding the storage, so an address cannot be reused), and the engine drops its
caches when any of them moved (an optimiser or EMA step, ``load_state_dict``, ``.to()``, ``copy_``).
Edits through ``p.data`` bypass version counters: call ``clear_cache()`` after those. Holding the
storages means that after ``.to()`` the old tensors live until the engine's next call (a DyDiT drops
its default engine on ``.to()``, so this concerns engines made with :func:`dydit.engine` only).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dydit.models.backbone import Units, Weights

# path -> (weight, bias, dim, index): index None keeps the linear whole (weight None: no unit active)
_Parts = dict[str, tuple[Tensor | None, Tensor | None, int, Tensor | None]]


def _bytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class Pack:
    """The weights of the active units of one layer (count of them, and :meth:`weights`)."""

    __slots__ = ("count", "_held", "_parts")

    def __init__(self, block: nn.Module, units: Units, active: Tensor, source: Weights | None = None):
        """``source``: the block's weights to slice instead of its own (TD-LoRA merged, §18)."""
        linears = units.linears()
        device = block.get_submodule(units.parts[0].linear).weight.device
        on = active.nonzero().flatten().to(device)  # (k,)
        self.count = int(on.numel())
        self._parts: _Parts = {}
        self._held: Weights | None = None
        for path, parts in linears.items():
            lin = block.get_submodule(path)
            weight, bias = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
            if source is not None and path in source:
                weight, bias = source[path]
            dim = parts[0].dim
            if self.count == units.count:
                self._parts[path] = (weight, bias, dim, None)
            elif self.count == 0:
                self._parts[path] = (None, None if dim == 0 else bias, dim, None)
            else:
                self._parts[path] = (weight, bias, dim, torch.cat([units.index(p, on) for p in parts]))

    @property
    def sliced(self) -> bool:
        """Whether the pack is a real subset (a copy when held), not shared or empty."""
        return any(idx is not None for *_, idx in self._parts.values())

    def gather(self) -> Weights:
        """A fresh copy of the active units' weights (biases of outputs kept whole)."""
        out: Weights = {}
        for path, (w, b, dim, idx) in self._parts.items():
            if idx is None:
                out[path] = (w, b)
            else:
                rows_bias = dim == 0 and b is not None
                out[path] = (w.index_select(dim, idx), b.index_select(0, idx) if rows_bias else b)
        return out

    @property
    def weights(self) -> Weights:
        """The held copy, else the shared tensors, else a copy gathered now."""
        if self._held is not None:
            return self._held
        return self.gather() if self.sliced else {p: (w, b) for p, (w, b, _, _) in self._parts.items()}

    def hold(self, static: bool = False) -> None:
        """Keep a copy (``static``: mark it for CUDA graphs, whose weights keep their address)."""
        if self._held is None and self.sliced:
            self._held = self.gather()
            if static:
                for pair in self._held.values():
                    for w in pair:
                        if w is not None:
                            torch._dynamo.mark_static_address(w)

    def release(self) -> None:
        """Drop the held copy (the pack is gathered at each use from now on)."""
        self._held = None

    @property
    def held(self) -> bool:
        return self._held is not None

    def copy_bytes(self) -> int:
        """Bytes a held copy takes (the sliced weights and biases; shared tensors cost 0)."""
        total = 0
        for w, b, dim, idx in self._parts.values():
            if idx is not None:
                rows = idx.numel()
                total += rows * _bytes(w) // w.shape[dim]
                total += rows * _bytes(b) // b.shape[0] if dim == 0 and b is not None else 0
        return total

    def index_bytes(self) -> int:
        return sum(_bytes(idx) for *_, idx in self._parts.values())


@dataclass(frozen=True)
class StepPacks:
    """One step of a :class:`~dydit.models.dynamic.WidthPlan` made concrete: the per-layer packs."""

    attn: tuple[Pack, ...]
    mlp: tuple[Pack, ...]
    # TD-LoRA (docs/METHOD.md §18): each layer's complete MLP with the step's adapter merged, for the
    # un-routed work of a block that runs it whole (a U-ViT's time/class tokens; None for the other
    # layers); None without adapters or without such a block.
    complete: tuple[Pack | None, ...] | None = None


def unit_weight_bytes(blocks: Iterable[nn.Module]) -> int:
    """Bytes of the blocks' attention+MLP weights: every linear their head and group units name."""
    total = 0
    for block in blocks:
        for units in (block.head_units, block.group_units):
            for path in units.linears():
                lin = block.get_submodule(path)
                total += _bytes(lin.weight) + _bytes(lin.bias)
    return total


class PackStore:
    """Packs per (layer, pattern) for one model, copies held within ``budget`` × weight bytes."""

    def __init__(
        self,
        blocks: nn.ModuleList,
        budget: float | None,
        static: bool = False,
        merged: Callable[[nn.Module, Tensor], Weights] | None = None,
    ):
        """``merged(block, gates)``: the block's weights with its TD-LoRA adapter of one gate
        pattern merged (docs/METHOD.md §18); packs of a pattern slice those. Merged weights are kept
        once per (layer, pattern), outside the budget (``merged_bytes`` of :meth:`memory`)."""
        self.blocks, self.budget, self.static = blocks, budget, static
        self.weight_bytes = unit_weight_bytes(blocks)
        self.packs: dict[tuple[str, int, bytes, bytes], Pack] = {}
        self._merged_fn = merged
        self.merged: dict[tuple[int, bytes], Weights] = {}
        self.uses: Counter[Pack] = Counter()  # plan steps that use each pack
        self._copy_bytes = self._index_bytes = 0

    def get(
        self, kind: str, layer: int, active: Tensor, hold: bool = True, gates: Tensor | None = None
    ) -> Pack:
        """The pack of ``kind`` ("attn" or "mlp") for one layer's mask (and TD-LoRA ``gates``),
        made on first use and then held if ``hold`` and the budget allows (first come, first held)."""
        pattern = b"" if gates is None else gates.cpu().numpy().tobytes()
        key = (kind, layer, active.cpu().numpy().tobytes(), pattern)
        pack = self.packs.get(key)
        if pack is None:
            block = self.blocks[layer]
            source = None
            if gates is not None and self._merged_fn is not None:
                if (layer, pattern) not in self.merged:
                    self.merged[(layer, pattern)] = self._merged_fn(block, gates)
                source = self.merged[(layer, pattern)]
            units = block.head_units if kind == "attn" else block.group_units
            pack = Pack(block, units, active, source)
            self.packs[key] = pack
            self._index_bytes += pack.index_bytes()
            if hold:
                self._hold(pack)
                self._trim()
        return pack

    def hold_most_used(self, uses: Counter) -> None:
        """Count the steps of a plan that use each pack (``uses``) and hold the packs used most,
        within the budget (releasing the least used if new indices took their room)."""
        self.uses.update(uses)
        for pack in sorted(uses, key=lambda p: (-self.uses[p], p.copy_bytes())):
            self._hold(pack)
        self._trim()

    def _limit(self) -> float:
        return float("inf") if self.budget is None else self.budget * self.weight_bytes

    def _hold(self, pack: Pack) -> None:
        size = pack.copy_bytes()
        if not pack.held and pack.sliced and self.pack_bytes + size <= self._limit():
            pack.hold(self.static)
            self._copy_bytes += size

    def _trim(self) -> None:
        """Release the least used held packs while the total is over the budget."""
        if self.pack_bytes <= self._limit():
            return
        held = sorted(
            (p for p in self.packs.values() if p.held), key=lambda p: (self.uses[p], -p.copy_bytes())
        )
        for pack in held:
            pack.release()
            self._copy_bytes -= pack.copy_bytes()
            if self.pack_bytes <= self._limit():
                return

    @property
    def pack_bytes(self) -> int:
        return self._copy_bytes + self._index_bytes

    def memory(self) -> dict[str, float]:
        """pack_bytes (held copies and gather indices), weight_bytes (the blocks' attention+MLP
        weights) and their ratio; the numbers of held and gathered packs."""
        held = sum(1 for p in self.packs.values() if p.held)
        return {
            "pack_bytes": self.pack_bytes,
            "copy_bytes": self._copy_bytes,
            "index_bytes": self._index_bytes,
            "weight_bytes": self.weight_bytes,
            "ratio": self.pack_bytes / self.weight_bytes if self.weight_bytes else 0.0,
            "merged_bytes": sum(_bytes(w) for ws in self.merged.values() for w, _ in ws.values()),
            "held_packs": held,
            "gathered_packs": sum(1 for p in self.packs.values() if p.sliced) - held,
        }


class WeightWatch:
    """Whether a model's parameters changed since it was made (:meth:`changed`), cheaply per call."""

    def __init__(self, model: nn.Module):
        self._entries = [
            (module._parameters, name, p, p.detach(), p.data_ptr(), p._version)
            for module in model.modules()
            for name, p in module._parameters.items()
            if p is not None
        ]

    def changed(self) -> bool:
        # ``alias`` holds each storage, so a new one cannot take the address recorded in ``ptr``.
        for params, name, p, _alias, ptr, version in self._entries:
            if params.get(name) is not p or p._version != version or p.data_ptr() != ptr:
                return True
        return False
