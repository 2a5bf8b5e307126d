"""What ``dydit bench`` prints and writes: the Markdown table of :class:`~dydit.apps.bench.BenchRow`
measurements with its header and caveat, and the JSON rows."""

from __future__ import annotations

import json
import os

import torch

from dydit.apps.bench import DEFAULT_MODEL, MODES, BenchConfig, BenchRow
from dydit.io import save_text
from dydit.log import device_name


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


# What a per-forward speed-up does and does not claim (printed under every table).
PER_EVALUATION_NOTE = (
    "Speed-ups are per network evaluation, at the same number of sampler steps. A DyDiT sampling N "
    "steps at ratio rho costs about what the dense DiT costs at round(rho*N) steps; whether it is worth "
    "it depends on the quality at that equal compute (benchmarks/frontier.py measures it). packs: the "
    "weight packs the sliced sampler run built, over the blocks' attention+MLP weight bytes."
)


def markdown_table(rows: list[BenchRow]) -> str:
    """The rows as a Markdown table (forward rows first, then sampler rows)."""
    lines = [
        "| measurement | mode | batch | rows | dtype | ms/forward | s/image | ρ | speed-up "
        "| vs eager dense | efficiency | packs |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r.measurement != "forward", r.batch, MODES.index(r.mode))):
        label = r.measurement if r.steps is None else f"sampler ({r.steps} steps)"
        lines.append(
            f"| {label} | {r.mode} | {r.batch} | {r.rows} | {r.dtype} | {r.ms_per_forward:.1f} | "
            f"{_fmt(r.s_per_image, '.3f')} | {r.flops_ratio:.3f} | {_fmt(r.speedup, '.2f')}x | "
            f"{_fmt(r.speedup_vs_eager_dense, '.2f')}x | {_fmt(r.efficiency, '.2f')} | "
            f"{_fmt(r.pack_memory_ratio, '.2f')} |"
        )
    return "\n".join(lines)


def write_json(rows: list[BenchRow], path: str | os.PathLike) -> None:
    """One JSON object per measurement, in a list."""
    save_text(path, json.dumps([r.to_dict() for r in rows], indent=1) + "\n")


def bench_report(cfg: BenchConfig, rows: list[BenchRow]) -> str:
    """The header line (model, machine, settings), the table and :data:`PER_EVALUATION_NOTE`."""
    model = rows[0].model if rows else cfg.model or DEFAULT_MODEL
    source = f" from {cfg.checkpoint}" if cfg.checkpoint else " (random weights)"
    header = (
        f"{model}{source} on {device_name(cfg.device)} ({cfg.device}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}), {cfg.dtype}, CFG {cfg.cfg_scale}; ms/forward = {cfg.stat} of "
        f"{cfg.repeats} repeats"
    )
    return f"{header}\n{markdown_table(rows)}\n\n{PER_EVALUATION_NOTE}"
