"""Memory plan (not a measurement): bytes per GPU of a FLUX-shaped fine-tune under ``--fsdp``.

Computed from the shapes of diffusers' ``FluxTransformer2DModel`` config (inner width
heads × head_dim, joint_attention_dim, pooled_projection_dim, in_channels, guidance embedding),
with no model built, for FLUX.1 (19 double + 38 single blocks) and FLUX-lite (8 double + 38
single), full DyDiT fine-tuning and TD-LoRA (docs/METHOD.md §18), over 1, 8 and 64 GPUs.

What dydit's FSDP run holds per GPU (train/fsdp.py; docs/TRAINING.md, "FSDP"):

- parameters: float32 shards of every tensor, P / N each (``--fsdp-mixed-precision bf16`` gathers
  bfloat16 copies for compute but keeps float32 shards);
- EMA: a float32 copy of every parameter, sharded the same way (P / N; TD-LoRA's too: its EMA
  copies the frozen base as well under FSDP);
- gradients: float32 shards of the trainable parameters T / N;
- AdamW state: two float32 moments per trainable parameter, 2 T / N;
- gathered: one block's parameters unsharded at a time in the compute dtype, twice (FSDP2
  prefetches the next block), the largest block;
- activations are not counted (they scale with batch and resolution; ``--grad-checkpointing``
  keeps one block's inside its pass).

TD-LoRA adapters (rank r on every attention and MLP linear of both streams: the linears the FLUX
family's head and group units name, models/flux_blocks.py) and routers (DyDiT's width and token
routers, counted with DiT's shapes: DyFLUX's token router differs slightly, a few M parameters
either way; TD-LoRA's group router) are counted as trainable; the DyDiT routers also in full
fine-tuning.

Usage::

    python benchmarks/memory_plan.py [--rank 64] [--groups 4] [--gpus 1 8 64] [--compute-dtype bf16]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class FluxShape:
    """The fields of a diffusers FluxTransformer2DModel config that fix its parameter count."""

    name: str
    num_layers: int  # double-stream blocks
    num_single_layers: int
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    in_channels: int = 64
    patch_size: int = 1
    guidance_embeds: bool = True
    mlp_ratio: float = 4.0

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


FLUX_1 = FluxShape("FLUX.1", 19, 38)
FLUX_LITE = FluxShape("FLUX-lite", 8, 38)


def _linear(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def double_block(s: FluxShape) -> dict[str, int]:
    """Parameters of one double-stream block, by adapted linears (attention and MLP) and the rest."""
    d, hd, hidden = s.dim, s.attention_head_dim, int(s.dim * s.mlp_ratio)
    attn = [(d, d)] * 8  # to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out
    mlp = [(d, hidden), (hidden, d)] * 2  # ff and ff_context
    other = 2 * _linear(d, 6 * d) + 4 * hd  # norm1, norm1_context (adaLN-Zero); four q/k RMSNorms
    return {"linears": [*attn, *mlp], "other": other}


def single_block(s: FluxShape) -> dict[str, int]:
    d, hd, hidden = s.dim, s.attention_head_dim, int(s.dim * s.mlp_ratio)
    linears = [(d, d)] * 3 + [(d, hidden), (d + hidden, d)]  # to_q, to_k, to_v, proj_mlp, proj_out
    return {"linears": linears, "other": _linear(d, 3 * d) + 2 * hd}


def block_params(block: dict) -> int:
    return sum(_linear(i, o) for i, o in block["linears"]) + block["other"]


def base_params(s: FluxShape) -> int:
    """Every parameter of the FluxTransformer2DModel (checked against diffusers in the tests)."""
    d = s.dim
    embed = 2 * (_linear(256, d) + _linear(d, d)) if s.guidance_embeds else _linear(256, d) + _linear(d, d)
    embed += _linear(s.pooled_projection_dim, d) + _linear(d, d)  # pooled text projection
    embed += _linear(s.joint_attention_dim, d) + _linear(s.in_channels, d)  # context and x embedders
    out = _linear(d, 2 * d) + _linear(d, s.patch_size**2 * s.in_channels)  # norm_out, proj_out
    blocks = s.num_layers * block_params(double_block(s))
    blocks += s.num_single_layers * block_params(single_block(s))
    return embed + blocks + out


def router_params(s: FluxShape) -> int:
    """DyDiT's routers per block on e (width D): heads and MLP groups (H each, "all" layout) and the
    token router D -> D/16 -> 1."""
    d, h = s.dim, s.num_attention_heads
    per_block = 2 * _linear(d, h) + _linear(d, d // 16) + _linear(d // 16, 1)
    return (s.num_layers + s.num_single_layers) * per_block


def lora_params(s: FluxShape, rank: int, groups: int) -> int:
    """TD-LoRA adapters r·(in + out) per adapted linear, and a group router Linear(D, G) per block."""
    adapters = s.num_layers * sum(rank * (i + o) for i, o in double_block(s)["linears"])
    adapters += s.num_single_layers * sum(rank * (i + o) for i, o in single_block(s)["linears"])
    return adapters + (s.num_layers + s.num_single_layers) * _linear(s.dim, groups)


def plan(s: FluxShape, gpus: int, lora: bool, rank: int, groups: int, compute_bytes: int) -> dict[str, float]:
    """Bytes per GPU (GiB) of one configuration."""
    routers = router_params(s)
    extra = lora_params(s, rank, groups) if lora else 0
    total = base_params(s) + routers + extra
    trainable = routers + extra if lora else total
    largest = max(block_params(double_block(s)), block_params(single_block(s)))
    if lora:
        per_block = max(
            sum(rank * (i + o) for i, o in double_block(s)["linears"]),
            sum(rank * (i + o) for i, o in single_block(s)["linears"]),
        )
        largest += per_block
    row = {
        "params": 4 * total / gpus,
        "ema": 4 * total / gpus,
        "grads": 4 * trainable / gpus,
        "adamw": 8 * trainable / gpus,
        "gathered": 2 * compute_bytes * largest,
    }
    row = {k: v / GiB for k, v in row.items()}
    row["total"] = sum(row.values())
    row["trainable_m"] = trainable / 1e6
    row["total_b"] = total / 1e9
    return row


def table(rank: int, groups: int, gpus: list[int], compute_bytes: int) -> str:
    lines = [
        "| model | params | fine-tune | trainable | GPUs | params | EMA | grads | AdamW | gathered block "
        "| total / GPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in (FLUX_LITE, FLUX_1):
        for lora in (False, True):
            kind = f"TD-LoRA r={rank}, G={groups}" if lora else "full"
            for n in gpus:
                r = plan(s, n, lora, rank, groups, compute_bytes)
                lines.append(
                    f"| {s.name} | {r['total_b']:.2f} B | {kind} | {r['trainable_m']:,.1f} M | {n} | "
                    f"{r['params']:.2f} | {r['ema']:.2f} | {r['grads']:.2f} | {r['adamw']:.2f} | "
                    f"{r['gathered']:.2f} | **{r['total']:.2f}** |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--compute-dtype", choices=("bf16", "fp32"), default="bf16")
    args = p.parse_args(argv)
    compute = 2 if args.compute_dtype == "bf16" else 4
    for s in (FLUX_LITE, FLUX_1):
        print(f"{s.name}: {base_params(s):,} base parameters, {router_params(s):,} DyDiT router parameters")
    print(f"GiB per GPU (activations not counted; compute dtype {args.compute_dtype}):\n")
    print(table(args.rank, args.groups, args.gpus, compute))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
