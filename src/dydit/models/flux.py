"""FLUX (Black Forest Labs' MMDiT) as a dydit backbone (docs/METHOD.md §15, docs/ARCHITECTURE.md §7.2).

State-dict compatible with diffusers' ``FluxTransformer2DModel`` (same key names and shapes; strict
loading both ways) and equal to it in fp32. ``num_layers`` double-stream blocks (per-stream
adaLN-zero, q/k RMSNorm, joint attention with 3-axis RoPE, per-stream FFNs) are followed by
``num_single_layers`` single-stream blocks (one adaLN, parallel attention and MLP over the joint
sequence, one fused output projection ``proj_out`` over [attention, MLP]).

Two call signatures (:meth:`Flux.forward`):

- the project's seam ``model(x, t, y) -> Tensor``: x (B, C, H, W) latents (C = in_channels / 4),
  packed 2x2 into tokens inside with ids made here, t (B,) FLUX's own flow time in [0, 1] (1 is
  noise: the pipeline's ``timestep / 1000``), y a :class:`~dydit.conditioning.TextCondition`
  (embeddings = T5 (B, L, joint_attention_dim), pooled = CLIP (B, pooled_projection_dim)); the
  output is FLUX's velocity (noise - data) as (B, C, H, W). A guidance-embedding model reads its
  guidance scale from ``model.guidance`` (default 3.5, FluxPipeline's default);
- diffusers' keywords (``hidden_states, encoder_hidden_states, pooled_projections, timestep,
  img_ids, txt_ids, guidance, joint_attention_kwargs, return_dict``) on packed tokens, returning a
  1-tuple or an object with ``.sample``, so that the model drops into ``diffusers.FluxPipeline``.

The backbone contract (models/backbone.py): ``blocks`` is every block, double then single (not a
registered module: the keys stay diffusers'); each declares its heads and MLP groups (G = number of
heads in both types); the token router reads the image stream (DyFLUX's rule, §15.2).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dydit.conditioning import TextCondition
from dydit.errors import DyditError
from dydit.flops import formulas
from dydit.flops.counter import record
from dydit.models.flux_blocks import FluxDoubleBlock, FluxSingleBlock
from dydit.models.flux_layers import (
    AdaNorm,
    FluxInputs,
    FluxState,
    TimeTextEmbed,
    check_ids,
    image_ids,
    layer_norm,
    pack_latents,
    rope_table,
    unpack_latents,
)
from dydit.models.text_encoder import TextEncoder, TextEncoderConfig
from dydit.presets_flux import FluxConfig
from dydit.text import TokenIds

DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale


def flux_macs_table(c: FluxConfig) -> dict[str, int]:
    """:func:`dydit.flops.formulas.flux_macs_table` of a config, at ``sample_size`` with
    ``max_text_length`` text tokens."""
    return formulas.flux_macs_table(
        num_layers=c.num_layers,
        num_single_layers=c.num_single_layers,
        width=c.inner_dim,
        image_tokens=c.num_tokens,
        text_tokens=c.max_text_length,
        in_channels=c.in_channels,
        out_features=c.patch_size**2 * c.output_channels,
        text_dim=c.joint_attention_dim,
        pooled_dim=c.pooled_projection_dim,
        guidance=c.guidance_embeds,
    )


def text_encoder_config(c: FluxConfig) -> TextEncoderConfig:
    """The :class:`TextEncoderConfig` of ``c.text_encoder``: its width is the text stream's
    (``joint_attention_dim``), its pooled vector ``pooled_projection_dim`` wide."""
    fields = dict(c.text_encoder or {})
    if "vocab" not in fields:
        raise DyditError("the FLUX text encoder config has no vocabulary (text_encoder['vocab'])")
    fields.update(width=c.joint_attention_dim, pooled_dim=c.pooled_projection_dim)
    fields.setdefault("max_length", c.max_text_length)
    return TextEncoderConfig.from_dict(fields)


@dataclass
class FluxOutput:
    """diffusers' ``Transformer2DModelOutput`` shape: the prediction as ``.sample``."""

    sample: Tensor

    def __getitem__(self, index: int) -> Tensor:  # ``out[0]``, as diffusers' BaseOutput allows
        return (self.sample,)[index]


class Flux(nn.Module):
    """The FLUX transformer: ``model(x, t, y)`` or diffusers' keyword call (module docstring)."""

    def __init__(self, config: FluxConfig) -> None:
        super().__init__()
        c = self.config = config
        d = c.inner_dim
        self.guidance = DEFAULT_GUIDANCE
        self.caption_dropout = c.caption_dropout  # 0 while a caller draws the dropout itself
        self.time_text_embed = TimeTextEmbed(d, c.pooled_projection_dim, c.guidance_embeds)
        self.context_embedder = nn.Linear(c.joint_attention_dim, d)
        self.x_embedder = nn.Linear(c.in_channels, d)
        heads, hd = c.num_attention_heads, c.attention_head_dim
        self.transformer_blocks = nn.ModuleList(FluxDoubleBlock(heads, hd) for _ in range(c.num_layers))
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleBlock(heads, hd) for _ in range(c.num_single_layers)
        )
        self.norm_out = AdaNorm(d, 2)
        self.proj_out = nn.Linear(d, c.patch_size**2 * c.output_channels)
        if c.text_encoder is not None:  # a text-to-image model trained here owns its encoder (§17.6)
            self.text_encoder = TextEncoder(text_encoder_config(c))
            self.initialize_weights()  # trained from scratch here: DiT's initialisation
        # Every block in order, for the method; held outside the registries (no duplicate keys).
        self.__dict__["blocks"] = nn.ModuleList([*self.transformer_blocks, *self.single_transformer_blocks])

    def initialize_weights(self) -> None:
        """diffusers' initialisation: PyTorch's default for every Linear and LayerNorm, RMSNorm
        weights one (DyDiT.initialize_weights then resets its routers to keep everything). A
        text-to-image model trained here (one that owns its text encoder) gets DiT's initialisation
        for training from scratch instead (:meth:`initialize_for_training`, docs/METHOD.md §17.6)."""
        if self.config.text_encoder is not None:
            self.initialize_for_training()
            return
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)):
                module.reset_parameters()
            elif (
                hasattr(module, "weight")
                and isinstance(module.weight, nn.Parameter)
                and module.weight.ndim == 1
            ):
                nn.init.ones_(module.weight)  # the q/k RMSNorms

    def initialize_for_training(self) -> None:
        """DiT's initialisation for training from scratch (docs/METHOD.md §17.6): Xavier-uniform
        linears with zero biases, N(0, 0.02) time/guidance MLPs, every adaLN modulation and the output
        projection zero (adaLN-zero: each block starts as the identity). The text encoder keeps its own."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith("text_encoder."):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        embed = self.time_text_embed
        for mlp in (embed.timestep_embedder, getattr(embed, "guidance_embedder", None)):
            if mlp is not None:
                nn.init.normal_(mlp.linear_1.weight, std=0.02)
                nn.init.normal_(mlp.linear_2.weight, std=0.02)
        for block in self.transformer_blocks:
            for norm in (block.norm1, block.norm1_context):
                nn.init.zeros_(norm.linear.weight)
        for block in self.single_transformer_blocks:
            nn.init.zeros_(block.norm.linear.weight)
        for lin in (self.norm_out.linear, self.proj_out):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # What diffusers' pipelines read from a transformer ------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    def cache_context(self, name: str):
        """FluxPipeline enters ``transformer.cache_context("cond")``; dydit keeps no cache there."""
        return nullcontext()

    # The forward pass -------------------------------------------------------------------------
    def condition(self, y) -> FluxInputs:
        """y as :class:`FluxInputs` (a TextCondition: its embeddings and pooled vector; token ids,
        for a model that owns a text encoder: encoded here, after caption dropout in training)."""
        if isinstance(y, FluxInputs):
            return y
        if isinstance(y, TokenIds):
            encoder = self._modules.get("text_encoder")
            if encoder is None:
                raise DyditError("this FLUX has no text encoder: pass text embeddings (a TextCondition)")
            if self.training and self.caption_dropout > 0:
                y = y.dropout(self.caption_dropout)
            y = encoder.condition(y)
        if isinstance(y, TextCondition):
            if y.pooled is None:
                raise DyditError("FLUX needs a pooled text vector (CLIP's role): TextCondition(pooled=...)")
            return FluxInputs(y.embeddings, y.pooled)
        raise DyditError(f"FLUX is conditioned on text: pass a TextCondition as y, got {type(y).__name__}")

    def embed(self, x: Tensor, t: Tensor, y) -> tuple[FluxState, Tensor, Tensor]:
        """(state, temb (B, D), e (B, D)): e is the time (+ guidance) embedding the width routers read,
        with the guidance scale ``self.guidance`` (a call's own guidance enters temb only; a diffusers
        call with one guidance value makes it ``self.guidance`` first)."""
        c, inputs = self.config, self.condition(y)
        text = inputs.embeddings
        b, length = text.shape[0], text.shape[1]
        if length > c.max_text_length:
            raise DyditError(
                f"the text sequence has {length} tokens; this model supports at most {c.max_text_length} "
                "(max_text_length)"
            )
        grid = None
        if x.ndim == 4:
            if c.patch_size != 1:
                raise DyditError("images (B, C, H, W) need patch_size 1; pass packed tokens instead")
            if x.shape[1] != c.latent_channels:
                raise DyditError(f"expected latents with {c.latent_channels} channels, got {tuple(x.shape)}")
            grid = (x.shape[2], x.shape[3])
            tokens = pack_latents(x, c.pack)
            img = image_ids(grid[0] // c.pack, grid[1] // c.pack, x.device)
        elif x.ndim == 3:
            tokens = x
            if inputs.img_ids is None:
                raise DyditError("packed FLUX tokens (B, N, C) need img_ids (N, 3)")
            img = check_ids(inputs.img_ids, x.shape[1], "img_ids")
        else:
            raise DyditError(f"FLUX takes latents (B, C, H, W) or tokens (B, N, C), got {tuple(x.shape)}")
        if tokens.shape[0] != b or tokens.shape[2] != c.in_channels:
            raise DyditError(
                f"expected tokens ({b}, N, {c.in_channels}) for {b} texts, got {tuple(tokens.shape)}"
            )
        pooled = inputs.pooled
        if pooled.ndim != 2 or pooled.shape != (b, c.pooled_projection_dim):
            raise DyditError(
                f"pooled text must be ({b}, {c.pooled_projection_dim}), got {tuple(pooled.shape)}"
            )
        if text.shape[2] != c.joint_attention_dim:
            raise DyditError(
                f"text embeddings must be (B, L, {c.joint_attention_dim}), got {tuple(text.shape)}"
            )
        t = t.expand(b) if t.ndim == 0 else t
        if t.shape != (b,):
            raise DyditError(f"expected one time value per sample ({b},), got {tuple(t.shape)}")
        txt = torch.zeros(length, 3, device=x.device) if inputs.txt_ids is None else inputs.txt_ids
        txt = check_ids(txt, length, "txt_ids")
        rope = rope_table(torch.cat([txt.to(img.device), img]), c.axes_dims_rope)
        guidance = inputs.guidance
        if c.guidance_embeds and guidance is None:
            guidance = torch.full((b,), float(self.guidance), device=x.device)
        elif guidance is not None and guidance.ndim == 0:
            guidance = guidance.expand(b)
        dtype = self.dtype
        n, d = tokens.shape[1], c.inner_dim
        record("x_embedder", b * formulas.linear_macs(n, c.in_channels, d))
        record("context_embedder", b * formulas.linear_macs(length, c.joint_attention_dim, d))
        state = FluxState(
            self.x_embedder(tokens.to(dtype)),
            self.context_embedder(text.to(dtype)),
            rope,
            None,
            grid,
        )
        temb, e = self.time_text_embed(t, guidance, inputs.pooled.to(dtype))
        if inputs.guidance is not None and c.guidance_embeds and not bool((guidance == self.guidance).all()):
            e = self.width_embedding(t)  # the width routers read model.guidance (docs/METHOD.md §15.3)
        return state, temb, e

    def head(self, state: FluxState, c: Tensor) -> Tensor:
        """norm_out (adaLN: scale, shift) and proj_out; unpacked to (B, C, H, W) on the image path."""
        img = state.img
        d, out = img.shape[-1], self.proj_out.out_features
        record(
            "final_layer",
            img.shape[0] * (formulas.linear_macs(1, d, 2 * d) + formulas.linear_macs(img.shape[1], d, out)),
        )
        scale, shift = self.norm_out.linear(F.silu(c)).chunk(2, dim=1)
        y = self.proj_out(layer_norm(img) * (1 + scale[:, None]) + shift[:, None])
        return y if state.grid is None else unpack_latents(y, *state.grid, self.config.pack)

    def run(self, x: Tensor, t: Tensor, y) -> Tensor:
        """The dense network on the project's seam."""
        state, c, _ = self.embed(x, t, y)
        for block in self.blocks:
            state = block(state, c)
        return self.head(state, c)

    def forward(self, x: Tensor | None = None, t: Tensor | None = None, y=None, **diffusers_kwargs):
        """``model(x, t, y) -> Tensor``, or diffusers' keyword signature (module docstring)."""
        if diffusers_kwargs or x is None:
            if x is not None:  # diffusers' first positional argument is hidden_states
                diffusers_kwargs["hidden_states"] = x
            return self.call_diffusers(self.run, **diffusers_kwargs)
        return self.run(x, t, y)

    def call_diffusers(
        self,
        run,
        hidden_states: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        pooled_projections: Tensor | None = None,
        timestep: Tensor | None = None,
        img_ids: Tensor | None = None,
        txt_ids: Tensor | None = None,
        guidance: Tensor | None = None,
        joint_attention_kwargs: dict | None = None,
        controlnet_block_samples=None,
        controlnet_single_block_samples=None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
        on_guidance=None,
    ):
        """diffusers' ``FluxTransformer2DModel.forward`` arguments -> ``run(x, t, FluxInputs)``.

        ``on_guidance`` is called when a call brings another guidance scale than ``self.guidance``
        (a DyDiT drops its width plans then: its width routers read the guidance embedding).
        """
        if hidden_states is None or encoder_hidden_states is None or timestep is None:
            raise DyditError(
                "a diffusers-style FLUX call needs hidden_states, encoder_hidden_states and timestep"
            )
        if pooled_projections is None:
            raise DyditError("a diffusers-style FLUX call needs pooled_projections")
        if joint_attention_kwargs:
            raise DyditError(
                f"joint_attention_kwargs are not supported by dydit's FLUX: {sorted(joint_attention_kwargs)}"
            )
        if controlnet_block_samples is not None or controlnet_single_block_samples is not None:
            raise DyditError("ControlNet residuals are not supported by dydit's FLUX")
        if img_ids is None or txt_ids is None:
            raise DyditError("a diffusers-style FLUX call needs img_ids and txt_ids")
        if guidance is not None and not self.config.guidance_embeds:
            guidance = None  # a model without a guidance embedding has nothing to read it with
        if guidance is not None:
            values = guidance.detach().float().flatten().unique()
            if values.numel() == 1 and float(values[0]) != float(self.guidance):
                self.guidance = float(values[0])
                if on_guidance is not None:
                    on_guidance()
        inputs = FluxInputs(encoder_hidden_states, pooled_projections, img_ids, txt_ids, guidance)
        out = run(hidden_states, timestep, inputs)
        return FluxOutput(out) if return_dict else (out,)

    # The backbone contract (models/backbone.py, docs/ARCHITECTURE.md §7) ------------------------
    def width_embedding(self, t: Tensor) -> Tensor:
        """What the width routers read, from t (T,) alone: E(1000·t) + E_g(1000·guidance) (§15.3)."""
        t = torch.as_tensor(t, device=self.device).reshape(-1)
        g = (
            torch.full_like(t, float(self.guidance), dtype=torch.float32)
            if self.config.guidance_embeds
            else None
        )
        return self.time_text_embed.time_guidance(t, g, self.dtype)

    @property
    def width_dim(self) -> int:
        return self.config.inner_dim

    @property
    def routed_tokens(self) -> int:
        return self.config.num_tokens

    def layer_costs(self) -> tuple[int, int]:
        """Per-layer (A, M) at ``sample_size`` with ``max_text_length`` text tokens: attention over
        the joint sequence and the image-token MLP; the same for both block types (docs/METHOD.md §15.4)."""
        c = self.config
        return formulas.flux_layer_costs(c.num_tokens, c.max_text_length, c.inner_dim)

    def macs_table(self) -> dict[str, int]:
        """Per-sample MACs of the complete forward by component, at ``sample_size`` with
        ``max_text_length`` text tokens (1 MAC = 1 FLOP; FLUX.1-lite-8B at 1024 px: 30.0 T)."""
        return flux_macs_table(self.config)

    def example_inputs(self, batch: int, generator: torch.Generator, text_length: int | None = None):
        """(x, y): standard-normal latents at ``sample_size`` and a random text condition, for
        calibration and benchmarks."""
        c = self.config
        length = text_length or c.max_text_length
        x = torch.randn(batch, c.latent_channels, c.sample_size, c.sample_size, generator=generator)
        text = torch.randn(batch, length, c.joint_attention_dim, generator=generator)
        pooled = torch.randn(batch, c.pooled_projection_dim, generator=generator)
        return x, TextCondition(text, pooled)

    def time_grid(self) -> Tensor:
        """The time values calibration spreads over: 1001 flow times in [0, 1]."""
        return torch.linspace(0, 1, 1001)
