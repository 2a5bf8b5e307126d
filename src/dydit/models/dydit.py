"""DyDiT: DiT with timestep-wise dynamic width and spatial-wise dynamic tokens (arXiv 2410.03456).

docs/METHOD.md §2 (overview), §3 (TDW), §4 (SDT), §12 (checkpoint format). The routers, the masked
dynamic layer and its loop live in models/dynamic.py; this module holds the model: width plans and
the execution modes. ``model.execution`` is one of

- ``"dense"``: the complete backbone network (routers bypassed);
- ``"masked"`` (default): 0/1 masks multiply full tensors, static shapes (training, reference);
- ``"sliced"``: inference only, the engine of models/sliced.py skips the masked work (a default
  engine the model holds; ``dydit.engine(model, ...)`` makes one with other options).

``forward`` always returns a Tensor; the routing statistics the FLOPs loss needs come from
:meth:`DyDiT.forward_with_routing`.
"""

from __future__ import annotations

import copy
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
from dydit.models.lora import applied, has_lora
from dydit.models.sliced import SlicedDyDiT
from dydit.presets import FluxConfig, ModelConfig, UViTConfig

EXECUTION_MODES: tuple[str, ...] = ("dense", "masked", "sliced")


class DyDiTBlock(DynamicBlock, DiTBlock):
    """A DiT block with its three routers: the class :func:`add_routers` gives a DyDiT's blocks."""


register_dynamic_block(DiTBlock, DyDiTBlock)


class DyDiT(nn.Module):
    """Dynamic DiT: a backbone network that it holds, with routers in its blocks (docs/METHOD.md §2).

    ``DyDiT(config)`` builds a DiT (or SiT) backbone from a ModelConfig (``create_model("DyDiT-S/2")``,
    :meth:`from_dit`); ``DyDiT(backbone=net, router_layout=...)`` makes any network that implements
    the backbone contract (models/backbone.py, docs/ARCHITECTURE.md §7) dynamic. The state dict is
    the backbone's, with the official names, plus the router keys inside each block
    (``blocks.i.attn_rate.router.*``, ``blocks.i.mlp_rate.router.*``, ``blocks.i.token_selection.*``;
    docs/METHOD.md §12). Attributes the DyDiT lacks are read from its backbone (``config``,
    ``t_embedder``, ``unpatchify``, ...).

    ``forward(x, t, y) -> Tensor`` in the mode ``self.execution``. The ``"sliced"`` mode runs a
    default engine (:meth:`sliced_engine`, models/sliced.py) that follows the weights by itself: an
    optimiser or EMA step, ``load_state_dict``, ``.to()`` or an in-place edit is seen at the next
    call. Only edits through ``p.data`` bypass the version counters it reads; :meth:`clear_cache`
    drops the engine (harmless at any time). For engine options (``torch.compile``, token buckets,
    the pack memory budget) make one: ``dydit.engine(model, compile=True)``.
    """

    blocks: nn.ModuleList

    def __init__(
        self,
        config: ModelConfig | FluxConfig | None = None,
        *,
        backbone: nn.Module | None = None,
        router_layout: str | None = None,
        width_routing: bool | None = None,
    ):
        super().__init__()
        if (config is None) == (backbone is None):
            raise DyditError("DyDiT takes a model config or a backbone, not both and not neither")
        if isinstance(config, FluxConfig):  # FLUX family (docs/METHOD.md §15): a Flux backbone
            from dydit.models.flux import Flux

            backbone, config = Flux(config), None
        if isinstance(config, UViTConfig):  # U-ViT family (docs/METHOD.md §16): a U-ViT backbone
            from dydit.models.uvit import UViT

            router_layout = router_layout or config.router_layout
            backbone, config = UViT(config.replace(dynamic=True, router_layout=router_layout)), None
        if backbone is None:
            config = config.replace(dynamic=True, router_layout=router_layout or config.router_layout)
            layout, width = config.router_layout, config.hidden_size
            # Routers join each block as it is built, so DiT's initialisation covers them (Xavier) and
            # a seeded DyDiT draws its initial weights in the same order as ever.
            backbone = DiT(config, on_block=lambda block: add_routers(block, width, layout))
        else:
            bcfg = getattr(backbone, "config", None)
            if width_routing is None:
                width_routing = getattr(bcfg, "width_routing", True)
            layout = router_layout or getattr(bcfg, "router_layout", "forced_first")
            if hasattr(bcfg, "width_routing"):  # a config that records the routers (FluxConfig)
                backbone.config = bcfg.replace(
                    dynamic=True, width_routing=width_routing, router_layout=layout
                )
            for block in backbone.blocks:
                add_routers(block, backbone.width_dim, layout, width=width_routing)
            for lin in self._router_linears(backbone.blocks):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
        # Held, not registered: the DyDiT's parameters, buffers and submodules are its backbone's
        # (the same dictionaries), so the state-dict keys are the backbone's own names.
        self.__dict__["backbone"] = backbone
        for registry in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            self.__dict__[registry] = backbone.__dict__[registry]
        self._init_router_biases()
        self._execution = "masked"
        self.__dict__["_engine"] = None  # in __dict__, not a submodule: keys, .to() and train() skip it
        self.train(backbone.training)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            backbone = self.__dict__.get("backbone")
            if backbone is None:
                raise
            return getattr(backbone, name)

    @property
    def config(self):
        return self.backbone.config

    @property
    def router_layout(self) -> str:
        block = self.blocks[0]
        if block.has_width_routers:
            return block.attn_rate.layout
        return getattr(self.config, "router_layout", "forced_first")

    @property
    def width_routing(self) -> bool:
        """Whether the blocks have width routers (False: token routing only, the released DyFLUX)."""
        return self.blocks[0].has_width_routers

    @staticmethod
    def _router_linears(blocks: nn.ModuleList) -> list[nn.Linear]:
        out = []
        for block in blocks:
            if block.has_width_routers:
                out += [block.attn_rate.router, block.mlp_rate.router]
            out += [m for m in block.token_selection.modules() if isinstance(m, nn.Linear)]
        return out

    def _init_router_biases(self) -> None:
        """Router biases that keep everything on: sigmoid(15) and sigmoid(35) are 1 to float
        precision, so a fresh DyDiT computes its backbone. A token router with ``reset_keep_all``
        (DyFLUX's) initialises itself so."""
        for block in self.blocks:
            if block.has_width_routers:
                nn.init.constant_(block.attn_rate.router.bias, WIDTH_ROUTER_INIT_BIAS)
                nn.init.constant_(block.mlp_rate.router.bias, WIDTH_ROUTER_INIT_BIAS)
            reset = getattr(block.token_selection, "reset_keep_all", None)
            if reset is not None:
                reset(TOKEN_ROUTER_INIT_BIAS)
            else:
                nn.init.constant_(block.token_selection.output_layer.bias, TOKEN_ROUTER_INIT_BIAS)

    def initialize_weights(self) -> None:
        """The backbone's initialisation (Xavier router weights included), then the router biases."""
        self.backbone.initialize_weights()
        self._init_router_biases()

    @classmethod
    def from_dit(cls, dit: nn.Module, router_layout: str | None = None) -> DyDiT:
        """A DyDiT with ``dit``'s weights and freshly initialised routers (same device/dtype/mode).

        ``dit`` is a DiT/SiT, or a network of another family (a U-ViT): a copy of it becomes the
        backbone, so its function is kept exactly and only router tensors are added.
        """
        if not isinstance(dit, DiT):
            return cls._from_backbone(dit, router_layout)
        cfg = dit.config.replace(dynamic=True, router_layout=router_layout or dit.config.router_layout)
        return cls.from_weights(cfg, dit)

    @classmethod
    def from_weights(
        cls,
        config: ModelConfig | UViTConfig | FluxConfig,
        source: nn.Module,
        allow_missing: tuple[str, ...] = ROUTER_KEY_MARKERS,
    ) -> DyDiT:
        """A DyDiT of ``config`` with ``source``'s weights, device, dtype, training mode and guidance
        scale (a FLUX's, not in the state dict). Keys with one of ``allow_missing`` (the routers
        ``source`` lacks) keep their keep-everything initialisation, so the DyDiT computes what
        ``source`` does; any other mismatch is a CheckpointError naming it."""
        model = cls(config)
        ref = next(source.parameters())
        model.to(device=ref.device, dtype=ref.dtype)
        fit_state_dict(model, source.state_dict(), allow_missing=allow_missing)
        if hasattr(source, "guidance"):  # a DyDiT source reads its backbone's
            model.backbone.guidance = source.guidance
        return model.train(source.training)

    @classmethod
    def _from_backbone(cls, net: nn.Module, router_layout: str | None) -> DyDiT:
        layout = router_layout or getattr(net.config, "router_layout", None) or "forced_first"
        backbone = copy.deepcopy(net)
        if hasattr(backbone.config, "replace"):
            backbone.config = backbone.config.replace(dynamic=True, router_layout=layout)
        ref = next(net.parameters())
        model = cls(backbone=backbone, router_layout=layout)
        return model.to(device=ref.device, dtype=ref.dtype).train(net.training)

    @classmethod
    def with_width_routers(cls, model: DyDiT, router_layout: str | None = None) -> DyDiT:
        """A copy of a token-only DyDiT (the released DyFLUX) with width routers added, initialised
        to keep every head and group, so it computes ``model`` exactly (docs/METHOD.md §15.3)."""
        if model.width_routing:
            raise DyditError("this DyDiT has width routers already")
        cfg = model.config.replace(width_routing=True, router_layout=router_layout or model.router_layout)
        return cls.from_weights(cfg, model, allow_missing=(".attn_rate.", ".mlp_rate."))

    # The backbone's ends ---------------------------------------------------------------------
    def embed(self, x: Tensor, t: Tensor, y):
        """The backbone's (state, c, width-router input)."""
        return self.backbone.embed(x, t, y)

    def head(self, state, c: Tensor) -> Tensor:
        return self.backbone.head(state, c)

    def width_embedding(self, t: Tensor) -> Tensor:
        return self.backbone.width_embedding(t)

    # Execution modes -----------------------------------------------------------------------
    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, mode: str) -> None:
        if mode not in EXECUTION_MODES:
            raise DyditError(f"unknown execution mode {mode!r}; valid modes: {', '.join(EXECUTION_MODES)}")
        self._execution = mode

    def forward(self, x: Tensor | None = None, t: Tensor | None = None, y=None, **diffusers_kwargs):
        """x (B, C, H, W), t (B,) time values, y (B,) labels -> (B, C_out, H, W).

        A backbone with ``call_diffusers`` (FLUX) also takes diffusers' keyword call; it runs in the
        model's execution mode and a new guidance scale drops the width plans (docs/METHOD.md §15.3).
        """
        if diffusers_kwargs or x is None:
            call = getattr(self.backbone, "call_diffusers", None)
            if call is None:
                raise DyditError("this model takes model(x, t, y); keyword calls are for FLUX backbones")
            if x is not None:
                diffusers_kwargs["hidden_states"] = x
            return call(self._forward, on_guidance=self.clear_cache, **diffusers_kwargs)
        return self._forward(x, t, y)

    def _forward(self, x: Tensor, t: Tensor, y) -> Tensor:
        if self._execution == "dense":
            if not has_lora(self):
                return self.backbone(x, t, y)  # the blocks' own forward: the complete network
            t_in = t.expand(x.shape[0]) if t.ndim == 0 else t
            with applied(self, self.width_embedding(t_in)):  # TD-LoRA adapters (§18)
                return self.backbone(x, t, y)
        if self._execution == "masked":
            return self.forward_with_routing(x, t, y)[0]
        return self.sliced_engine()(x, t, y)

    def sliced_engine(self) -> SlicedDyDiT:
        """The engine behind ``execution = "sliced"`` (default options), made on first use, for inference."""
        if self.training:
            raise DyditError("execution 'sliced' is inference-only: call model.eval() first")
        if self._engine is None:
            # In __dict__, not a submodule: state_dict(), .to() and train() do not reach it.
            self.__dict__["_engine"] = SlicedDyDiT(self)
        return self._engine

    def clear_cache(self) -> None:
        """Drop the default sliced engine with its plans and weight packs (rebuilt on next use).
        Needed only after editing weights through ``p.data``; the engine sees every other change."""
        self.__dict__["_engine"] = None

    def train(self, mode: bool = True) -> DyDiT:
        self.backbone.training = mode  # its submodules are ours: super().train sets them
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # .to(), .half(), .cuda()
        # Not for correctness (the engine sees new storages itself): the default engine holds the
        # old tensors until its next call, so drop it here to free their memory now.
        self.clear_cache()
        return super()._apply(fn, recurse)

    def forward_with_routing(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, RoutingStats]:
        """Masked forward pass plus the router decisions the FLOPs loss needs (docs/METHOD.md §5.3)."""
        state, c, e = self.embed(x, t, y)  # DiT: tokens (B, N, D), c (B, D), e = E_t (B, D)
        # Width depends on e only (t alone); each layer's masks are drawn just before it runs.
        with applied(self, e):  # TD-LoRA adapters gated by e, if the model has them (§18)
            state, stats = masked_layers(self.blocks, state, c, lambda _, block: block.width_masks(e))
        return self.head(state, c), stats

    # Per-timestep width decisions (inference) ------------------------------------------------
    @torch.no_grad()
    def width_masks(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Evaluation head and group masks, bool (T, L, H) and (T, L, G), for time values t (T,)."""
        t = torch.as_tensor(t, device=next(self.parameters()).device).reshape(-1)
        e = self.width_embedding(t)  # (T, D_w)
        masks = [block.hard_width_masks(e) for block in self.blocks]
        return torch.stack([h for h, _ in masks], 1), torch.stack([g for _, g in masks], 1)

    def width_plan(self, timesteps: Sequence[float] | Tensor) -> WidthPlan:
        """Width masks for every time value a sampler will use, keyed by those values as given."""
        ts = torch.as_tensor(timesteps).reshape(-1).cpu()
        if ts.numel() == 0:
            raise DyditError("a width plan needs at least one timestep")
        heads, groups = self.width_masks(ts.to(next(self.parameters()).device))
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
