"""The sliced inference engine of DyDiT: the work of masked heads, groups and tokens is really skipped.

docs/METHOD.md §3.5 (per-timestep width plans, sliced weights), §4.3 (gather/scatter of kept tokens over
the flattened batch) and §8 (what makes it fast); docs/ARCHITECTURE.md §4. The released DyDiT code
multiplies full tensors by 0/1 masks and is slower than DiT; this engine computes exactly the masked
model's output while running attention on the active heads only (for DiT: their q/k/v rows and
``proj`` columns; full ``proj.bias``, which is the whole branch when no head is active) and the MLP
on the active groups only (``fc1`` rows, ``fc2`` columns, full ``fc2.bias``) and only on the tokens
the SDT router keeps: their rows of the flattened (B·N, D) activations are gathered and scattered
back with ``index_add_``; skipped tokens get no update at all (§4.2).

:func:`engine` is the entry point: ``dydit.engine(model, backend="torch", compile=False,
token_bucket=None, pack_budget=0.5)`` returns a :class:`SlicedDyDiT`, called like the model
(``engine(x, t, y)``). The per-layer computation is the backend's kernels (models/kernels.py); the
weights of the active units are packs (models/packs.py), held within ``pack_budget`` × the bytes of
the blocks' attention+MLP weights and gathered at each use beyond it. Width masks depend only on t
(§3.1): each step of the model's :meth:`~dydit.models.dydit.DyDiT.width_plan` becomes
:class:`~dydit.models.packs.StepPacks` once per distinct t value. A call costs one host sync to read
t, a check of the parameters' version counters (so edited weights are never served stale), one dict
lookup and a loop over layers (on CUDA one more sync per layer for the kept-token count). CFG halves
share a pass (same t); samples are grouped by t.

The engine is written against the backbone contract (models/backbone.py), for any family: the rows
and columns of each head and group are the ones its blocks declare as units, and each layer runs the
block's own ``attention_half`` (as the masked loop does) with the active units' weights, then the
token skip on the gathered rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dydit.errors import DyditError
from dydit.flops import formulas
from dydit.flops.counter import is_counting, record
from dydit.models.dynamic import WidthPlan
from dydit.models.kernels import RouterWeights, kept_rows, load_kernels
from dydit.models.lora import gate_plan, has_lora, merged_weights
from dydit.models.packs import Pack, PackStore, StepPacks, WeightWatch

__all__ = ["DEFAULT_PACK_BUDGET", "EnginePass", "Pack", "SlicedDyDiT", "StepPacks", "engine"]

TokenLogitsFn = Callable[[int, Tensor], Tensor]  # (layer, x (B, N, D)) -> logits (B, N); kept iff > 0
DEFAULT_PACK_BUDGET = 0.5  # held packs + indices <= this x the blocks' attention+MLP weights


def _time_values(timesteps: Iterable[float] | Tensor) -> Tensor:
    """t values as a flat CPU tensor; Python floats as float64 so that each keeps its exact value."""
    if isinstance(timesteps, Tensor):
        return timesteps.detach().flatten().cpu()
    values = list(timesteps)
    floats = any(isinstance(v, float) for v in values)
    return torch.as_tensor(values, dtype=torch.float64 if floats else None).flatten()


# The engine ---------------------------------------------------------------------------------------------
class SlicedDyDiT(nn.Module):
    """Inference-only DyDiT that skips masked work; ``engine(x, t, y) -> Tensor`` like every model.

    Args:
        model: a DyDiT over any backbone (models/backbone.py); put in eval mode.
        backend: the kernels (a name of :data:`dydit.models.kernels.BACKENDS`; ``"torch"``).
        compile: compile the two per-layer regions with ``torch.compile(dynamic=True)``.
        compile_mode: passed to ``torch.compile`` (e.g. ``"max-autotune-no-cudagraphs"``).
        token_bucket: pad the kept-token count to a multiple of this (bounded shapes for static modes).
        pack_budget: hold sliced weight copies up to this fraction of the blocks' attention+MLP
            weight bytes (indices included); the rest are gathered at each use. None: hold all.
        plan_timesteps: t values whose plan steps are packed now (others are packed on first use).
        token_logits: overrides the blocks' token routers: (layer, x (B, N, D)) -> (B, N); kept iff > 0.

    The engine follows its model: when a parameter changed (its version counter or its storage),
    the next call drops every plan and pack. Only edits through ``p.data`` go unseen: call
    :meth:`clear_cache` after those.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        backend: str = "torch",
        compile: bool = False,
        compile_mode: str | None = None,
        token_bucket: int | None = None,
        pack_budget: float | None = DEFAULT_PACK_BUDGET,
        plan_timesteps: Iterable[float] | Tensor | None = None,
        token_logits: TokenLogitsFn | None = None,
    ):
        super().__init__()
        if not hasattr(model, "width_plan"):
            raise DyditError("sliced execution needs a DyDiT (a model with width_plan and routers)")
        if token_bucket is not None and token_bucket < 1:
            raise DyditError(f"token_bucket must be positive, got {token_bucket}")
        if pack_budget is not None and not pack_budget >= 0:
            raise DyditError(f"pack_budget must be >= 0 or None, got {pack_budget}")
        self.model = model.eval()
        self.kernels = load_kernels(backend, compile=compile, compile_mode=compile_mode)
        self.token_bucket, self.pack_budget = token_bucket, pack_budget
        self._token_logits = token_logits
        blocks = list(model.blocks)
        self.num_layers = len(blocks)
        self.num_heads = blocks[0].head_units.count
        self.num_groups = blocks[0].group_units.count
        # CUDA graphs (mode "reduce-overhead") must not copy the weights into static buffers per replay.
        self._static_weights = compile and "reduce-overhead" in (compile_mode or "")
        self.clear_cache()
        if plan_timesteps is not None:
            self.prepare(plan_timesteps)

    @property
    def config(self):
        """The model's config (``generate`` reads it to pair the sampler with the process)."""
        return self.model.config

    # caches -----------------------------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Forget plan steps, weight packs and fused adaLN/router weights (rebuilt on next use).

        Never needed after ordinary weight changes, which the engine detects itself."""
        self._steps: dict[float, StepPacks] = {}
        merged = merged_weights if has_lora(self.model) else None  # TD-LoRA: merged per step (§18)
        self._store = PackStore(self.model.blocks, self.pack_budget, self._static_weights, merged)
        self._adaln: tuple[Tensor, Tensor, list[int]] | None = None
        self._routers: list[RouterWeights | None] | None = None
        self._watch = WeightWatch(self.model)

    def _follow_weights(self) -> None:
        """Drop every cache if a parameter of the model changed since they were built."""
        if self._watch.changed():
            self.clear_cache()

    def train(self, mode: bool = True) -> SlicedDyDiT:
        if mode:
            raise DyditError("the sliced engine is inference-only; train the DyDiT model itself")
        return super().train(False)

    def memory(self) -> dict[str, float]:
        """Bytes the engine holds beside the model: ``pack_bytes`` (held sliced copies and gather
        indices; views of the model's tensors cost 0), ``weight_bytes`` (the blocks' attention+MLP
        weights), ``ratio`` of the two, ``fused_bytes`` (the stacked adaLN weights), and the numbers
        of held and gathered packs."""
        self._follow_weights()
        out = self._store.memory()
        fused = [] if self._adaln is None else self._adaln[:2]
        out["fused_bytes"] = sum(t.numel() * t.element_size() for t in fused)
        return out

    def cache_info(self) -> dict[str, int]:
        """Numbers of cached plan steps and packs, and the bytes held by packs (:meth:`memory`)."""
        memory = self.memory()
        kinds = Counter(key[0] for key in self._store.packs)
        return {
            "plans": len(self._steps),
            "attn_packs": kinds["attn"],
            "mlp_packs": kinds["mlp"],
            "pack_bytes": int(memory["pack_bytes"]),
        }

    # plans --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, timesteps: Iterable[float] | Tensor) -> None:
        """Pack the plan steps of these t values (one call of ``model.width_plan`` for all of them),
        holding the packs they use most within the budget."""
        self._follow_weights()
        t = _time_values(timesteps)
        new = [i for i, v in enumerate(t.tolist()) if float(v) not in self._steps]
        if new:
            self.load_plan(self.model.width_plan(t[new]))

    def load_plan(self, plan: WidthPlan) -> None:
        """Pack every step of a width plan (steps already packed are kept)."""
        shape, groups = (self.num_layers, self.num_heads), (self.num_layers, self.num_groups)
        if plan.heads.shape[1:] != shape or plan.groups.shape[1:] != groups:
            raise DyditError(
                f"width masks must be (T, L, H) = (T, *{shape}) and (T, *{groups}), got "
                f"{tuple(plan.heads.shape)} and {tuple(plan.groups.shape)}"
            )
        uses: Counter[Pack] = Counter()
        # TD-LoRA: the adapters' gates of each step, merged into its packs (docs/METHOD.md §18).
        lora = gate_plan(self.model, plan.timesteps) if has_lora(self.model) else None
        # Only a block whose finish runs its MLP complete (a U-ViT's time/class tokens) needs that MLP
        # with the step's adapter merged; other layers get None and no such pack is made for them.
        whole = [getattr(b, "finish_uses_complete_mlp", False) for b in self.model.blocks]
        every = torch.ones(self.num_groups, dtype=torch.bool)
        layers = range(self.num_layers)
        get = self._store.get
        for i, (t, heads, groups) in enumerate(plan.steps()):
            if t not in self._steps:
                gates = [None] * self.num_layers if lora is None else lora[i]
                complete = None
                if lora is not None and any(whole):
                    complete = tuple(
                        get("mlp", j, every, False, gates[j]) if whole[j] else None for j in layers
                    )
                step = StepPacks(
                    tuple(get("attn", layer, heads[layer], False, gates[layer]) for layer in layers),
                    tuple(get("mlp", layer, groups[layer], False, gates[layer]) for layer in layers),
                    complete,
                )
                self._steps[t] = step
                uses.update([*step.attn, *step.mlp])
        self._store.hold_most_used(uses)

    def plan(self, t: float | Tensor) -> StepPacks:
        """The packs of the plan step of one t value (packed on first use)."""
        key = float(t)
        if key not in self._steps:
            self.prepare(t.reshape(1) if isinstance(t, Tensor) else [t])
        return self._steps[key]

    def _fused_adaln(self) -> tuple[Tensor, Tensor, list[int]]:
        """All layers' modulation linears stacked into one matmul, and each layer's output size."""
        if self._adaln is None:
            linears = [block.modulation_linear for block in self.model.blocks]
            weight = torch.cat([lin.weight.detach() for lin in linears]).contiguous()
            sizes = [lin.out_features for lin in linears]
            self._adaln = (weight, torch.cat([lin.bias.detach() for lin in linears]), sizes)
        return self._adaln

    def _router_weights(self) -> list[RouterWeights | None]:
        """Each block's SDT router weights (run inside the attention region); None with an override."""
        if self._routers is None:
            self._routers = []
            for block in self.model.blocks:
                router = None
                # A router that reads the block's state runs outside the kernel region (FLUX, §7.2).
                if self._token_logits is None and not getattr(block.token_selection, "reads_state", False):
                    router = tuple(w.detach() for w in block.token_selection.weights())
                    if self._static_weights:
                        for w in router:
                            torch._dynamo.mark_static_address(w)
                self._routers.append(router)
        return self._routers

    # forward ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x (B, C, H, W), t (B,) or scalar, y the backbone's condition input (labels (B,), a tensor of
        any shape with the batch first, or an object with ``len`` and ``select(rows)``) -> the
        output (B, C_out, H, W), equal to the masked DyDiT."""
        if self.model.training:
            raise DyditError("the sliced engine is inference-only: call model.eval() first")
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if t.shape[0] != x.shape[0] or (y is not None and len(y) != x.shape[0]):  # None: unconditional
            raise DyditError(f"batch sizes differ: x {x.shape[0]}, t {t.shape[0]}, y {len(y)}")
        self._follow_weights()
        values = t.detach().cpu()  # the one host sync of the call
        first = values[0]
        if bool((values == first).all()):
            return self._forward_one_t(x, t, y, first)
        # Samples with different t have different plan steps: run each group and reassemble.
        out = None
        for value in torch.unique(values):
            rows = (values == value).nonzero().flatten().to(x.device)
            y_rows = y[rows] if isinstance(y, Tensor) else None if y is None else y.select(rows)
            part = self._forward_one_t(x[rows], t[rows], y_rows, value)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out.index_copy_(0, rows, part)
        return out

    def _forward_one_t(self, x: Tensor, t: Tensor, y: Tensor, t_value: Tensor) -> Tensor:
        run = self.begin(x, t, y, t_value)
        state = run.state
        for layer in range(self.num_layers):
            state = run.layer(layer, state)
        return run.head(state)

    def begin(self, x: Tensor, t: Tensor, y, t_value: Tensor | float) -> EnginePass:
        """One pass at the single time value ``t_value`` taken apart: the embedding and the fused
        adaLN of every layer now, then :meth:`EnginePass.layer` per layer and :meth:`EnginePass.head`
        (the forward is exactly these in order; step caching, models/cache.py, stops after a layer)."""
        model = self.model
        x = x.to(next(model.parameters()).dtype)
        state, c, _ = model.embed(x, t, y)  # the blocks' state, c (B, D)
        w, bias, sizes = self._fused_adaln()
        raws = F.linear(F.silu(c), w, bias).split(sizes, dim=1)  # per layer (B, M_l)
        record("adaLN", c.shape[0] * c.shape[1] * sum(sizes))
        return EnginePass(self, self.plan(t_value), state, c, raws, self._router_weights(), is_counting())

    def _layer(self, run: EnginePass, layer: int, state):
        model, step, kernels = self.model, run.step, self.kernels
        block, c, counting = model.blocks[layer], run.c, run.counting
        ap, mp, router = step.attn[layer], step.mlp[layer], run.routers[layer]
        mod = block.split_modulation(run.raws[layer])
        if counting:
            record("attention", block.attention_macs(state, ap.count))
        state, x, h, logits = kernels.attention(
            block.attention_half, state, mod, ap.weights, ap.count, block.static, router
        )
        b, n, d = x.shape
        if logits is None:
            logits = (
                block.token_logits(x, state, c)
                if self._token_logits is None
                else self._token_logits(layer, x)
            )
        elif counting:
            r = router[0].shape[0]  # D/16
            record("token_router", b * (formulas.linear_macs(n, d, r) + formulas.linear_macs(n, r, 1)))
        idx, sample, gate, rows = kept_rows(logits, block.mlp_gate(mod), n, self.token_bucket)
        if rows:
            x = kernels.mlp(x.contiguous(), h, idx, sample, gate, block.mlp_half, mp.weights)
            if counting:
                record("mlp", block.mlp_macs(rows, mp.count))
        if getattr(block, "finish_uses_groups", False):
            return block.finish(state, x, mod, mp.weights, None)
        if step.complete is not None and step.complete[layer] is not None:
            return block.finish(state, x, mod, step.complete[layer].weights)  # TD-LoRA merged (§18)
        return block.finish(state, x, mod)


@dataclass
class EnginePass:
    """One engine pass at one time value, between its embedding and its head (:meth:`SlicedDyDiT.begin`):
    the state after the embedding, c, each layer's raw modulation and the plan step's packs."""

    engine: SlicedDyDiT
    step: StepPacks
    state: object
    c: Tensor
    raws: tuple[Tensor, ...]
    routers: list[RouterWeights | None]
    counting: bool

    def layer(self, layer: int, state):
        """The state after layer ``layer``, given the state before it."""
        return self.engine._layer(self, layer, state)

    def modulation(self, layer: int):
        """Layer ``layer``'s modulation vectors (from the fused adaLN already computed)."""
        return self.engine.model.blocks[layer].split_modulation(self.raws[layer])

    def head(self, state) -> Tensor:
        return self.engine.model.head(state, self.c)


def engine(
    model: nn.Module,
    *,
    backend: str = "torch",
    compile: bool = False,
    compile_mode: str | None = None,
    token_bucket: int | None = None,
    pack_budget: float | None = DEFAULT_PACK_BUDGET,
    plan_timesteps: Iterable[float] | Tensor | None = None,
) -> SlicedDyDiT:
    """The sliced inference engine of a DyDiT, called like the model: ``dydit.engine(dy)(x, t, y)``.

    Pass it wherever a model goes at inference (``dydit.generate(dydit.engine(dy, compile=True),
    ...)``); ``model.execution = "sliced"`` uses one with the default options. See
    :class:`SlicedDyDiT` for the options.
    """
    return SlicedDyDiT(
        model,
        backend=backend,
        compile=compile,
        compile_mode=compile_mode,
        token_bucket=token_bucket,
        pack_budget=pack_budget,
        plan_timesteps=plan_timesteps,
    )
