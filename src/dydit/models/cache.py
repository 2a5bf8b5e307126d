"""Step caching over the backbone seam: TeaCache and FirstBlockCache for every family (docs/METHOD.md §19).

A cached network is called like the model, ``cached(x, t, y) -> Tensor``, and passed to
``dydit.generate`` (which starts a new cache run for every batch). Each call is one *pass* of the
network taken apart at the seam (docs/ARCHITECTURE.md §7): the embedding, the blocks one layer at a
time, the head. The pass is the model's own computation in its execution, so a cached call that
computes every layer returns exactly what the model returns:

- a DyDiT with ``execution = "sliced"`` or a sliced engine: the engine's pass
  (:meth:`dydit.models.sliced.SlicedDyDiT.begin`);
- ``"masked"``: each block's masked layer with its evaluation width masks, as ``forward_with_routing``;
- ``"dense"`` or a plain network (DiT/SiT, U-ViT, FLUX): each block's ``forward(state, c)`` where the
  block declares ``dense_forward`` (DiT, FLUX), else the block's halves with every unit (U-ViT).

The methods decide per call (one decision for the whole batch, the guidance-doubled rows included):

- ``teacache``: the relative L1 change of the first block's modulated input (``modulated_input`` of
  the contract) since the previous call, rescaled by a polynomial, accumulates; while the sum stays
  below the threshold the call reuses the residual of all blocks (state after the last block minus
  the state after the embedding) of the last computed call, else it computes and the sum restarts.
- ``fbcache``: the first block always runs; when its residual changed by less than the threshold
  (relative L1) since the last computed call, the residual of the remaining blocks is reused.

The first and last network evaluation of a run are always computed. MACs are recorded by the work
that runs (flops.counter), so a reused call counts its embedding, head and what the decision ran.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dydit.errors import DyditError
from dydit.flops.counter import is_counting, record
from dydit.models.backbone import full_weights
from dydit.models.cache_settings import (  # noqa: F401  (public here too)
    CALIBRATION_BATCH,
    CALIBRATION_IMAGES,
    DEFAULT_DEGREE,
    IDENTITY,
    METHODS,
    CacheSettings,
    CacheStats,
    fit_coefficients,
    load_coefficients,
    save_coefficients,
)
from dydit.models.dydit import DyDiT
from dydit.models.lora import applied, has_lora
from dydit.models.sliced import SlicedDyDiT


# States: the residual of some blocks, structure by structure -------------------------------------------
@dataclass(frozen=True)
class _Delta:
    """A tensor leaf of a residual: after - before."""

    value: Tensor


_SAME = object()  # a residual leaf the blocks did not change: the current state's own value is kept


def residual(after: Any, before: Any) -> Any:
    """``after - before`` leaf by leaf: a tensor of the same shape becomes a delta; a part the blocks
    left alone (the same tensor, an equal plain value) stays the current state's; a part whose
    structure changed (U-ViT's skip stack) is kept from ``after``."""
    if isinstance(after, Tensor):
        if after is before:
            return _SAME
        if isinstance(before, Tensor) and after.shape == before.shape:
            return _Delta(after - before)
        return after
    if isinstance(after, tuple) and isinstance(before, tuple) and len(after) == len(before):
        parts = [residual(a, b) for a, b in zip(after, before)]
        return type(after)(*parts) if hasattr(after, "_fields") else tuple(parts)
    if not isinstance(before, Tensor | tuple) and after == before:
        return _SAME
    return after


def add_residual(state: Any, res: Any) -> Any:
    """``state + res``, the reverse of :func:`residual`."""
    if res is _SAME:
        return state
    if isinstance(res, _Delta):
        return state + res.value
    if isinstance(res, tuple) and isinstance(state, tuple) and len(res) == len(state):
        parts = [add_residual(s, r) for s, r in zip(state, res)]
        return type(state)(*parts) if hasattr(state, "_fields") else tuple(parts)
    return res


def _deltas(res: Any) -> list[Tensor]:
    if isinstance(res, _Delta):
        return [res.value]
    if isinstance(res, tuple):
        return [d for r in res for d in _deltas(r)]
    return []


def relative_l1(now: Sequence[Tensor], before: Sequence[Tensor]) -> float:
    """Σ|now - before| / Σ|before| over all tensors (one number for the whole batch)."""
    num = sum(float((a.float() - b.float()).abs().sum()) for a, b in zip(now, before))
    den = sum(float(b.float().abs().sum()) for b in before)
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


# Passes: one network evaluation taken apart at the seam ------------------------------------------------
class _DensePass:
    """A network's dense pass: embed, each block's dense layer, head (docs/ARCHITECTURE.md §7)."""

    def __init__(self, net: nn.Module, x: Tensor, t: Tensor, y: Any):
        self.net, self.blocks = net, net.blocks
        self.state, self.c, _ = net.embed(x, t, y)

    def modulation(self, layer: int):
        return self.blocks[layer].modulation(self.c)

    def layer(self, layer: int, state: Any) -> Any:
        block = self.blocks[layer]
        if getattr(block, "dense_forward", False):
            return block(state, self.c)
        return dense_halves(block, state, self.c)

    def head(self, state: Any) -> Tensor:
        return self.net.head(state, self.c)


class _MaskedPass(_DensePass):
    """A DyDiT's masked pass: each block's masked layer with its evaluation width masks."""

    def __init__(self, model: DyDiT, x: Tensor, t: Tensor, y: Any):
        self.net, self.blocks = model, model.blocks
        self.state, self.c, self.e = model.embed(x, t, y)

    def layer(self, layer: int, state: Any) -> Any:
        block = self.blocks[layer]
        heads, groups = block.width_masks(self.e)
        return block.forward_masked(state, self.c, heads, groups)[0]


def dense_halves(block: nn.Module, state: Any, c: Tensor) -> Any:
    """A block's dense layer from its halves with every unit (what FLUX's blocks' forward does)."""
    heads, groups = block.head_units, block.group_units
    mod = block.modulation(c)
    if is_counting():
        record("attention", block.attention_macs(state, heads.count))
    state, x, h = block.attention_half(state, mod, full_weights(block, heads), heads.count, block.static)
    if is_counting():
        record("mlp", block.mlp_macs(h.shape[0] * h.shape[1], groups.count))
    gw = full_weights(block, groups)
    x = x + block.mlp_gate(mod).unsqueeze(1) * block.mlp_half(h, gw)
    if getattr(block, "finish_uses_groups", False):
        return block.finish(state, x, mod, gw, None)
    return block.finish(state, x, mod)


def _start(model: nn.Module, x: Tensor, t: Tensor, y: Any, stack: contextlib.ExitStack):
    """The pass of one call in the model's own execution (module docstring)."""
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    if isinstance(model, SlicedDyDiT):
        return _engine_pass(model, x, t, y)
    if isinstance(model, DyDiT):
        if model.execution == "sliced":
            return _engine_pass(model.sliced_engine(), x, t, y)
        if has_lora(model):  # TD-LoRA adapters gated by the width embedding (docs/METHOD.md §18)
            stack.enter_context(applied(model, model.width_embedding(t)))
        if model.execution == "masked":
            return _MaskedPass(model, x, t, y)
        return _DensePass(model.backbone, x, t, y)
    network_blocks(model)
    return _DensePass(model, x, t, y)


def _engine_pass(engine: SlicedDyDiT, x: Tensor, t: Tensor, y: Any):
    values = t.detach().cpu()
    if not bool((values == values[0]).all()):
        raise DyditError("step caching runs one time value per call (a sampler's step); got several")
    if engine.model.training:
        raise DyditError("the sliced engine is inference-only: call model.eval() first")
    engine._follow_weights()
    return engine.begin(x, t, y, values[0])


# The cached network ------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What a cache keeps within one sampling run of one batch."""

    evaluations: int | None = None  # network evaluations the run will make (None: unknown)
    step: int = 0
    rows: int | None = None
    indicator: list[Tensor] | None = None  # TeaCache: last modulated input; FBCache: last computed residual
    accumulated: float = 0.0
    residual: Any = None
    decisions: list[bool] = field(default_factory=list)  # True: computed


def network_blocks(model: Any) -> nn.ModuleList:
    """The blocks of a network, a DyDiT or a sliced engine's model."""
    inner = model.model if isinstance(model, SlicedDyDiT) else model
    blocks = getattr(inner, "blocks", None)
    if blocks is None or not all(hasattr(inner, a) for a in ("embed", "head")):
        raise DyditError("step caching needs a network with the backbone seam (embed, blocks, head)")
    return blocks


class StepCache:
    """A network with step caching, called like the model (module docstring).

    ``generate`` calls :meth:`start_run` before each batch with the evaluation times of its sampler,
    so nothing is carried across batches, prompts or runs; a call with another batch size also
    starts a new run, and so does the call after a run's last evaluation (a caller that does not
    tell, e.g. a wrapper around the cache, gives ``times`` here: the evaluation times of every run).
    ``stats`` counts computed and reused evaluations; ``last_run`` holds the decisions of the
    current (or last) run.
    """

    def __init__(self, model: nn.Module, settings: CacheSettings, times: Sequence[float] | None = None):
        self.blocks = network_blocks(model)
        if settings.method == "teacache" and not hasattr(self.blocks[0], "modulated_input"):
            raise DyditError(
                f"teacache reads the first block's modulated input, which {type(self.blocks[0]).__name__} "
                "does not give (modulated_input); use fbcache"
            )
        self.model = model
        self.settings = settings
        self.stats = CacheStats()
        self._times = None if times is None else list(times)
        self._run = _Run(evaluations=len(self._times) if self._times else None)

    @property
    def config(self):
        """The model's config (``generate`` reads it to pair the sampler with the process)."""
        return self.model.config

    @property
    def last_run(self) -> list[bool]:
        return list(self._run.decisions)

    def start_run(self, times: Sequence[float] | None = None) -> None:
        """Forget everything: a new batch starts (``times``: the network times it will evaluate;
        default: the ones given before)."""
        self._times = self._times if times is None else list(times)
        self._run = _Run(evaluations=len(self._times) if self._times else None)
        self.stats.runs += 1

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, y: Any = None) -> Tensor:
        inner = self.model.model if isinstance(self.model, SlicedDyDiT) else self.model
        if inner.training:
            raise DyditError("step caching is for inference: call model.eval() first")
        run = self._run
        ended = run.evaluations is not None and run.step >= run.evaluations
        if ended or (run.rows is not None and run.rows != x.shape[0]):
            self.start_run()  # the run is over, or another batch: never reuse across it
            run = self._run
        run.rows = x.shape[0]
        with contextlib.ExitStack() as stack:
            p = _start(self.model, x, t, y, stack)
            edge = run.step == 0 or (run.evaluations is not None and run.step >= run.evaluations - 1)
            if self.settings.method == "teacache":
                state = self._teacache(run, p, edge)
            else:
                state = self._fbcache(run, p, edge)
            out = p.head(state)
        run.step += 1
        if run.decisions[-1]:
            self.stats.computed += 1
        else:
            self.stats.reused += 1
        return out

    def _layers(self, p: Any, state: Any, start: int) -> Any:
        for layer in range(start, len(self.blocks)):
            state = p.layer(layer, state)
        return state

    def _teacache(self, run: _Run, p: Any, edge: bool) -> Any:
        block = self.blocks[0]
        now = [block.modulated_input(p.state, p.modulation(0), block.static)]
        compute = edge or run.residual is None or run.indicator is None
        if not compute:
            run.accumulated += self.settings.rescale(relative_l1(now, run.indicator))
            compute = not run.accumulated < self.settings.threshold
        run.indicator = now
        run.decisions.append(compute)
        if not compute:
            return add_residual(p.state, run.residual)
        run.accumulated = 0.0
        state = self._layers(p, p.state, 0)
        run.residual = residual(state, p.state)
        return state

    def _fbcache(self, run: _Run, p: Any, edge: bool) -> Any:
        first = p.layer(0, p.state)
        now = _deltas(residual(first, p.state))
        compute = edge or run.residual is None or run.indicator is None
        if not compute:
            compute = not relative_l1(now, run.indicator) < self.settings.threshold
        run.decisions.append(compute)
        if not compute:
            return add_residual(first, run.residual)
        run.indicator = now
        state = self._layers(p, first, 1)
        run.residual = residual(state, first)
        return state


def cached(
    model: nn.Module,
    method: str,
    threshold: float,
    coefficients: Sequence[float] | str | Path | None = None,
    times: Sequence[float] | None = None,
) -> StepCache:
    """``model`` with step caching, to pass to ``dydit.generate`` (docs/METHOD.md §19).

    ``method`` is ``"teacache"`` or ``"fbcache"``; ``coefficients`` is TeaCache's rescaling
    polynomial (highest power first) or the JSON file ``dydit cache-calibrate`` wrote (default: the
    identity). ``model`` is any network with the backbone seam in any execution, or a sliced engine.
    ``times``: the evaluation times of one run, for callers other than ``generate`` (which says them).
    """
    if isinstance(coefficients, str | Path):
        coefficients = load_coefficients(coefficients)
    settings = CacheSettings(
        method, float(threshold), IDENTITY if coefficients is None else tuple(coefficients)
    )
    return StepCache(model, settings, times)


# Calibration: fitting TeaCache's polynomial on the model's own trajectories -----------------------------
class ChangeRecorder:
    """The model, uncached, recording per evaluation the relative L1 change of the first block's
    modulated input and of the output since the previous evaluation of the same run: the pairs
    TeaCache's polynomial is fitted to (:func:`fit_coefficients`)."""

    def __init__(self, model: nn.Module):
        self.blocks = network_blocks(model)
        if not hasattr(self.blocks[0], "modulated_input"):
            raise DyditError(f"{type(self.blocks[0]).__name__} gives no modulated_input to calibrate on")
        self.model = model
        self.pairs: list[tuple[float, float]] = []
        self._prev: tuple[Tensor, Tensor] | None = None

    @property
    def config(self):
        return self.model.config

    def start_run(self, times: Sequence[float] | None = None) -> None:
        self._prev = None

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, y: Any = None) -> Tensor:
        with contextlib.ExitStack() as stack:
            p = _start(self.model, x, t, y, stack)
            block = self.blocks[0]
            inp = block.modulated_input(p.state, p.modulation(0), block.static)
            state = p.state
            for layer in range(len(self.blocks)):
                state = p.layer(layer, state)
            out = p.head(state)
        if self._prev is not None and self._prev[0].shape == inp.shape:
            self.pairs.append((relative_l1([inp], [self._prev[0]]), relative_l1([out], [self._prev[1]])))
        self._prev = (inp, out)
        return out
