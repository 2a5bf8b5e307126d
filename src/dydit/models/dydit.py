"""DyDiT: DiT with timestep-wise dynamic width and spatial-wise dynamic tokens (arXiv 2410.03456).

docs/METHOD.md §2 (overview), §3 (TDW), §4 (SDT), §12 (checkpoint format). The routers, the masked
dynamic layer and its loop live in models/dynamic.py; this module holds the model: width plans and
the execution modes. ``model.execution`` is one of

- ``"dense"``: the complete DiT (routers bypassed);
- ``"masked"`` (default): 0/1 masks multiply full tensors, static shapes (training, reference);
- ``"sliced"``: inference only, the engine of models/sliced.py skips the masked work.

``forward`` always returns a Tensor; the routing statistics the FLOPs loss needs come from
:meth:`DyDiT.forward_with_routing`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from dydit.constants import TOKEN_ROUTER_INIT_BIAS, WIDTH_ROUTER_INIT_BIAS
from dydit.errors import DyditError
from dydit.models.dit import DiT, DiTBlock
from dydit.models.dynamic import (
    DynamicBlock,
    RoutingStats,
    WidthPlan,
    add_routers,
    masked_layers,
    register_dynamic_block,
)
from dydit.models.fitting import ROUTER_KEY_MARKERS, fit_state_dict
from dydit.models.sliced import SlicedDyDiT
from dydit.presets import ModelConfig

EXECUTION_MODES: tuple[str, ...] = ("dense", "masked", "sliced")


class DyDiTBlock(DynamicBlock, DiTBlock):
    """A DiT block with its three routers: the class :func:`add_routers` gives a DyDiT's blocks."""


register_dynamic_block(DiTBlock, DyDiTBlock)


class DyDiT(DiT):
    """Dynamic DiT; same official DiT key names plus router keys (docs/METHOD.md §12).

    ``forward(x, t, y) -> Tensor`` in the mode ``self.execution``; build with
    ``create_model("DyDiT-S/2")`` or :meth:`from_dit`.

    The ``"sliced"`` mode keeps an engine with weight packs sliced from the parameters. It is
    dropped by :meth:`clear_cache`, which ``load_state_dict``, ``train()``/``eval()``, ``.to()``
    and setting ``execution`` call; after editing weights in place by hand (``p.data.copy_``, an
    optimiser or EMA step in eval mode), call ``model.clear_cache()`` yourself.
    """

    blocks: nn.ModuleList

    def __init__(self, config: ModelConfig):
        if not config.dynamic:
            config = config.replace(dynamic=True)
        super().__init__(config)
        self._execution = "masked"
        self.clear_cache()

    @property
    def router_layout(self) -> str:
        return self.config.router_layout

    def make_block(self, index: int) -> nn.Module:
        block = super().make_block(index)
        add_routers(block, self.config.hidden_size, self.config.router_layout)
        return block

    def initialize_weights(self) -> None:
        """DiT init (Xavier router weights included), then router biases that keep everything on:
        sigmoid(15) and sigmoid(35) are 1 to float precision, so a fresh DyDiT computes its DiT."""
        super().initialize_weights()
        for block in self.blocks:
            nn.init.constant_(block.attn_rate.router.bias, WIDTH_ROUTER_INIT_BIAS)
            nn.init.constant_(block.mlp_rate.router.bias, WIDTH_ROUTER_INIT_BIAS)
            nn.init.constant_(block.token_selection.output_layer.bias, TOKEN_ROUTER_INIT_BIAS)

    @classmethod
    def from_dit(cls, dit: DiT, router_layout: str | None = None) -> DyDiT:
        """A DyDiT with ``dit``'s weights and freshly initialised routers (same device/dtype/mode)."""
        cfg = dit.config.replace(dynamic=True, router_layout=router_layout or dit.config.router_layout)
        model = cls(cfg)
        ref = next(dit.parameters())
        model.to(device=ref.device, dtype=ref.dtype)
        fit_state_dict(model, dit.state_dict(), allow_missing=ROUTER_KEY_MARKERS)
        return model.train(dit.training)

    # Execution modes -----------------------------------------------------------------------
    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, mode: str) -> None:
        if mode not in EXECUTION_MODES:
            raise DyditError(f"unknown execution mode {mode!r}; valid modes: {', '.join(EXECUTION_MODES)}")
        self._execution = mode
        self.clear_cache()

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x (B, C, H, W), t (B,) time values, y (B,) labels -> (B, C_out, H, W)."""
        if self._execution == "dense":
            return super().forward(x, t, y)  # DyDiTBlock.forward is the complete DiT block
        if self._execution == "masked":
            return self.forward_with_routing(x, t, y)[0]
        return self.sliced_engine()(x, t, y)

    def sliced_engine(self) -> SlicedDyDiT:
        """The engine behind ``execution = "sliced"``, built on first use (inference only)."""
        if self.training:
            raise DyditError("execution 'sliced' is inference-only: call model.eval() first")
        if self._engine is None:
            # In __dict__, not a submodule: state_dict(), .to() and train() do not reach it.
            self.__dict__["_engine"] = SlicedDyDiT(self)
        return self._engine

    def clear_cache(self) -> None:
        """Drop the sliced engine with its plans and weight packs (rebuilt on next use)."""
        self.__dict__["_engine"] = None

    def train(self, mode: bool = True) -> DyDiT:
        self.clear_cache()
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # .to(), .half(), .cuda(): the packs must follow the weights
        self.clear_cache()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # load_state_dict, also as a submodule
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def forward_with_routing(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, RoutingStats]:
        """Masked forward pass plus the router decisions the FLOPs loss needs (docs/METHOD.md §5.3)."""
        tokens, c, t_emb = self.embed(x, t, y)  # (B, N, D), (B, D), (B, D)
        # Width depends on E_t only; each layer's masks are drawn just before it runs.
        tokens, stats = masked_layers(self.blocks, tokens, c, lambda _, block: block.width_masks(t_emb))
        return self.head(tokens, c), stats

    # Per-timestep width decisions (inference) ------------------------------------------------
    @torch.no_grad()
    def width_masks(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Evaluation head and group masks, each bool (T, L, H), for time values t (T,)."""
        t = torch.as_tensor(t, device=self.pos_embed.device).reshape(-1)
        t_emb = self.t_embedder(t)  # (T, D)
        masks = [block.hard_width_masks(t_emb) for block in self.blocks]
        return torch.stack([h for h, _ in masks], 1), torch.stack([g for _, g in masks], 1)

    def width_plan(self, timesteps: Sequence[float] | Tensor) -> WidthPlan:
        """Width masks for every time value a sampler will use, keyed by those values as given."""
        ts = torch.as_tensor(timesteps).reshape(-1).cpu()
        if ts.numel() == 0:
            raise DyditError("a width plan needs at least one timestep")
        heads, groups = self.width_masks(ts.to(self.pos_embed.device))
        return WidthPlan(ts, heads.cpu(), groups.cpu())


@contextmanager
def execution(model: DyDiT, mode: str) -> Iterator[DyDiT]:
    """Run ``model`` in execution ``mode`` inside the block, restoring the previous mode after."""
    previous = model.execution
    model.execution = mode
    try:
        yield model
    finally:
        model.execution = previous
