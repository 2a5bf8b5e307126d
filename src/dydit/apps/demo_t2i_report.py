"""``report.md`` of ``dydit demo t2i`` (:mod:`dydit.apps.demo_t2i`; docs/METHOD.md §17)."""

from __future__ import annotations

import time
from typing import Any

from dydit.data.compose_grammar import CATEGORIES

_SPLIT_NAMES = {"train": "held-in prompts", "held-out": "held-out prompts"}


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def equal_compute_verdict(rows: list[dict[str, Any]], split: str) -> str:
    """Which wins at equal compute on ``split``: the DyDiT or the dense model with fewer steps."""
    by_role = {r["role"]: r for r in rows if r["split"] == split}
    dy, eq = by_role["dydit"], by_role["dense_equal"]
    if dy["overall"] > eq["overall"]:
        who = "DyDiT wins"
    elif dy["overall"] < eq["overall"]:
        who = "fewer dense steps win"
    else:
        who = "a tie"
    return (
        f"{_SPLIT_NAMES[split]}: {who} at equal compute (GenEval-style overall {dy['overall']:.3f} for the "
        f"DyDiT at {dy['steps']} steps vs {eq['overall']:.3f} for the dense model at {eq['steps']} steps)"
    )


def report_markdown(r: dict[str, Any]) -> str:
    """``report.md`` for the results dict of :func:`dydit.apps.demo_t2i.run_t2i_demo`."""
    rec = r["recipe"]
    lines = [
        "# dydit text-to-image demo report"
        + (" (--fast smoke run: untrained or tiny counts, scores mean nothing)" if r["fast"] else ""),
        "",
        f"{time.strftime('%Y-%m-%d')}, {r['machine']}. Dense model: `{r['sources']['dense']}`; DyDiT: "
        f"`{r['sources']['dydit']}`.",
        f"Sampling: {rec['sampler']}, {rec['steps']} steps, classifier-free guidance {rec['cfg_scale']:g} "
        "(the model's own recipe unless overridden); the same prompts and seeds for every model; the DyDiT "
        "runs the sliced engine. MACs are counted by the layers as they run (both passes of guidance).",
        "",
        "| prompts | model | steps | attn+MLP GMACs / image | s | "
        + " | ".join(CATEGORIES)
        + " | overall | FD-cells | FID |",
        "|---|---|---:|---:|---:|" + "---:|" * (len(CATEGORIES) + 3),
    ]
    for row in r["rows"]:
        acc = [_fmt(row["accuracy"].get(c), ".2f") for c in CATEGORIES]
        lines.append(
            f"| {_SPLIT_NAMES[row['split']]} | {row['name']} | {row['steps']} | "
            f"{row['macs_attn_mlp'] / 1e9:.3f} | {row['seconds']:.1f} | "
            + " | ".join(acc)
            + f" | **{row['overall']:.3f}** | {_fmt(row.get('FD-cells'), '.2f')} "
            + f"| {_fmt(row.get('FID'), '.1f')} |"
        )
    splits = list(dict.fromkeys(row["split"] for row in r["rows"]))
    lines += ["", *[f"- {equal_compute_verdict(r['rows'], s)}" for s in splits]]
    lines += [
        f"- tokens the DyDiT keeps at the middle step (mean over blocks, images): {r['token_keep_mid']:.2f}",
        f"- wall time: {r['seconds']:.0f} s",
        "",
        "GenEval-style: each 32x32 cell is classified by the project's Fashion-MNIST classifier (empty when "
        "near black), its colour read from its mean tint; overall is the mean over the categories "
        "(docs/METHOD.md §17.4). FD-cells: Fréchet distance of the classifier features of the occupied "
        "cells against real compositions of the same prompts (Fashion-MNIST test images); FID: Inception "
        "FID of the whole canvases against those real compositions (few images: a rough number).",
        "",
        "| dense | DyDiT | dense, equal compute |",
        "|---|---|---|",
        "| ![dense](grid_dense.png) | ![DyDiT](grid_dydit.png) | ![equal](grid_dense_equal.png) |",
        "",
        "![token keep](token_keep.png)",
        "",
    ]
    return "\n".join(lines)
