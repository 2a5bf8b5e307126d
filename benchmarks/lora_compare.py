"""Benchmark (not a test): TD-LoRA DyDiT fine-tuning against full DyDiT fine-tuning at equal steps.

Issue 27, evidence item 3, on the embedded DiT (``src/dydit/assets/dit-ti4-fmnist.safetensors``)
and, with ``--t2i``, on the text-to-image FLUX (``src/dydit/assets/flux-t2i-fmnist.safetensors``;
``--base`` names another export, e.g. a checkpoint of its unfinished training). Both fine-tunes run
at FLOPs target λ (0.5) for ``--steps`` steps:

- **full**: every weight of the DyDiT trains (``dydit finetune``);
- **TD-LoRA**: the base frozen, rank ``--lora-rank`` adapters in ``--lora-groups`` timestep-gated
  groups and the routers train (``dydit finetune --lora R --lora-groups G``; docs/METHOD.md §18).

The embedded DiT's fine-tunes follow the shipped DyDiT's recipe (``dydit.apps.demo.SHIPPED_RECIPE``
on the demo's settings, as ``benchmarks/frontier.py``). The text-to-image ones are the DyFLUX-t2i
fine-tune of issue 25 (checkpoints/README.md): ``dydit finetune --model DyFLUX-t2i --init-from BASE
--data fmnist-compose --target λ --distill-weight 1``, parsed by the CLI's own parser, with
``--finetune-args`` appended to both (e.g. ``"--batch-size 32 --lr 3e-4"``) and the exact command of
each run in the report.

Each run has its own directory under ``--out-dir`` and resumes when rerun. Then each is sampled
through the sliced engine (the TD-LoRA model merges its adapter into each step's weights) and
reported:

- trainable-parameter fraction (parameters with gradients / all parameters of the fine-tuned model);
- ρ reached: attention+MLP multiply-accumulates the sliced engine really performed while sampling,
  over the dense base's for the same evaluations; also the training batch's ρ from the run's last
  log record. The embedded DiT: the dense DiT's MACs of one evaluation (``count_flops``) times the
  evaluations made. The text-to-image model: the dense base sampled on the same prompts and seeds;
- quality. The embedded DiT: ``--num-samples`` images (the demo's sampler and seeds) through the
  frontier's ``measure()`` path, FID (offline Inception; ``--no-inception`` skips it) and
  FD-FMNIST-classifier. The text-to-image model: the text-to-image frontier's measuring path
  (``benchmarks/t2i_frontier.py``'s ``Bench.measure``) on each prompt set of ``--splits`` with
  ``--per-category`` prompts per category and the model's own recipe (sampler, steps, guidance)
  unless ``--sample-steps`` / ``--cfg-scale`` say otherwise: the GenEval-style overall and
  per-category accuracy, FD-cells and (unless ``--no-inception``) the Inception FID against real
  compositions of the same prompts; the dense base gets the same row for reference;
- wall seconds per training step: the run's ``stats.jsonl`` windows (checkpoint writes excluded);
- peak memory per step: on CPU the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the first step and after each checkpoint write) above its
  resident set just before the first step: gradients, optimizer state and activations of a step
  (weights, EMA and data are resident before it); on CUDA ``torch.cuda.max_memory_allocated`` above
  the allocation before the first step. Measured in the invocation that trained (the maximum over
  invocations of an interrupted run); the training state's size (weights + EMA copy, gradients,
  AdamW's two moments) is given beside it.

With ``--frontier FILE`` (a ``frontier.json`` of ``benchmarks/frontier.py`` with the same sampler and
sample count, or with ``--t2i`` of ``benchmarks/t2i_frontier.py`` with the same sampling settings),
each point also gets the frontier's equal-compute verdict.

Writes ``lora_compare.json`` and ``lora_compare.md`` (table, command, machine, date) in ``--out-dir``.

Usage::

    python benchmarks/lora_compare.py                                  # 1200 steps each, 1000 images
    python benchmarks/lora_compare.py --steps 300 --num-samples 500 --lora-rank 16 --lora-groups 4
    python benchmarks/lora_compare.py --t2i --base checkpoints/flux-t2i-fmnist-step7000.safetensors \
        --finetune-args "--batch-size 32" --per-category 10
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dydit.apps.demo import (
    BASE_CHECKPOINT,
    SHIPPED_RECIPE,
    DemoConfig,
    finetune_config,
    load_dit,
    measure,
    run_cadence,
)
from dydit.apps.demo_t2i import SPLITS, T2I_CHECKPOINT, T2IDemoConfig
from dydit.checkpoint.lora import load_with_lora
from dydit.errors import DyditError
from dydit.flops.counter import count_flops
from dydit.io import save_text
from dydit.log import format_number as _fmt
from dydit.log import machine_description
from dydit.train import TrainConfig, train

_log = logging.getLogger("lora_compare")
MiB = 2**20
MEMORY_FILE = "step_memory.json"
# The DyFLUX-t2i fine-tune of issue 25 (checkpoints/README.md) beyond its --model, --init-from and
# --target: the captioned compositions, distilled from the frozen dense base.
T2I_RECIPE = ["--data", "fmnist-compose", "--distill-weight", "1"]
# Options of one comparison only (their defaults are None so that a stray one is caught).
DIT_ONLY = ("recipe", "num_samples", "sampler", "ref_limit")
T2I_ONLY = ("model", "finetune_args", "splits", "per_category", "cfg_scale", "sample_batch")


def _splits(text: str) -> list[str]:
    import t2i_frontier  # benchmarks/t2i_frontier.py, a sibling of this script

    return t2i_frontier._splits(text)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--t2i", action="store_true",
                   help="compare on the text-to-image FLUX instead of the embedded DiT")  # fmt: skip
    p.add_argument("--out-dir", default=None,
                   help="runs, samples and results go here (default runs/lora_compare[_t2i])")  # fmt: skip
    p.add_argument("--base", default=None,
                   help=f"the dense base export (default {BASE_CHECKPOINT.name}, with --t2i "
                   f"{T2I_CHECKPOINT.name}, in src/dydit/assets)")  # fmt: skip
    p.add_argument("--target", type=float, default=0.5, help="FLOPs target λ of both fine-tunes")
    p.add_argument(
        "--steps",
        type=int,
        default=SHIPPED_RECIPE["finetune_steps"],
        help="fine-tune steps of each run (default: the shipped recipe's, %(default)s)",
    )
    p.add_argument(
        "--recipe",
        type=json.loads,
        default=None,
        metavar="JSON",
        help=f"embedded DiT: DemoConfig fields of both fine-tunes (default {json.dumps(SHIPPED_RECIPE)}); "
        "--steps replaces its finetune_steps and caps its complete_steps",
    )
    p.add_argument("--model", default=None,
                   help="--t2i: the DyDiT preset of both fine-tunes (default DyFLUX-t2i)")  # fmt: skip
    p.add_argument("--finetune-args", default=None, metavar="OPTIONS",
                   help="--t2i: further `dydit finetune` options of both fine-tunes, one string (e.g. "
                   "\"--batch-size 32 --lr 3e-4\"; a lone option as --finetune-args=--bf16)")  # fmt: skip
    p.add_argument("--lora-rank", type=int, default=16, help="TD-LoRA rank r (default %(default)s)")
    p.add_argument("--lora-groups", type=int, default=4, help="TD-LoRA groups G (default %(default)s)")
    p.add_argument(
        "--lora-lr",
        type=float,
        default=None,
        help="learning rate of the adapters (default: the recipe's, as the full run)",
    )
    p.add_argument("--num-samples", type=int, default=None,
                   help=f"embedded DiT: images per model (default {DemoConfig.num_samples})")  # fmt: skip
    p.add_argument("--sampler", default=None,
                   help=f"embedded DiT: sampler (default {DemoConfig.sampler})")  # fmt: skip
    p.add_argument("--sample-steps", type=int, default=None,
                   help=f"sampler steps (default {DemoConfig.steps}; --t2i: the model's recipe)")  # fmt: skip
    p.add_argument("--splits", type=_splits, default=None,
                   help="--t2i: prompt sets, train (held-in) and/or held-out (default both)")  # fmt: skip
    p.add_argument("--per-category", type=int, default=None,
                   help=f"--t2i: prompts per GenEval category and prompt set "
                   f"(default {T2IDemoConfig.per_category})")  # fmt: skip
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="--t2i: classifier-free guidance scale (default: the model's recipe)")  # fmt: skip
    p.add_argument("--sample-batch", type=int, default=None, help="--t2i: prompts per sampling batch "
                   f"(default {T2IDemoConfig.sample_batch})")  # fmt: skip
    p.add_argument(
        "--no-inception", action="store_true", help="no Inception FID, the classifier distances only"
    )
    p.add_argument(
        "--ref-limit", type=int, default=None, help="embedded DiT: reference images of the metrics"
    )
    p.add_argument(
        "--frontier",
        default=None,
        metavar="JSON",
        help="a frontier.json (benchmarks/frontier.py, --t2i: t2i_frontier.py): add its equal-compute "
        "verdicts",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--progress", action="store_true", help="progress bars while training and sampling")
    args = p.parse_args(argv)
    stray = [n for n in (DIT_ONLY if args.t2i else T2I_ONLY) if getattr(args, n) is not None]
    if stray:
        names = ", ".join("--" + n.replace("_", "-") for n in stray)
        raise DyditError(f"{names}: not an option of the {'text-to-image' if args.t2i else 'embedded DiT'} "
                         "comparison")  # fmt: skip
    return args


# Memory of a training step ----------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


class StepMemory:
    """Peak memory of the training steps of the ``train()`` calls inside the context (see the module
    docstring): wraps ``dydit.train.loop``'s ``compute_loss`` (the first call marks the start of the
    steps) and ``save`` (checkpoint writes are left out of the peak)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.baseline: int | None = None
        self.peak = 0
        self.method = (
            "torch.cuda.max_memory_allocated above the allocation before the first step"
            if self.cuda
            else "peak RSS (VmHWM, reset via /proc/self/clear_refs) above the RSS before the first step"
        )

    def _now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else _status_kib("VmRSS") * 1024

    def _high(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else _status_kib("VmHWM") * 1024

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # not allowed here: the peak is then the process's since it started
            self.method = "peak RSS since the process started (VmHWM; /proc/self/clear_refs not writable)"

    def __enter__(self) -> StepMemory:
        from dydit.train import loop

        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory of earlier runs back to the OS
        self._loop, self._saved = loop, (loop.compute_loss, loop.save)
        compute_loss, save = self._saved

        def first_step(*args: Any, **kwargs: Any) -> Any:
            if self.baseline is None:
                self.baseline = self._now()
                self._reset()
            return compute_loss(*args, **kwargs)

        def saving(*args: Any, **kwargs: Any) -> Any:
            self.peak = max(self.peak, self._high())
            try:
                return save(*args, **kwargs)
            finally:
                self._reset()

        loop.compute_loss, loop.save = first_step, saving
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.compute_loss, self._loop.save = self._saved
        if self.baseline is not None:
            self.peak = max(self.peak, self._high())

    def result(self) -> dict[str, Any] | None:
        """None when no step ran (the run was already complete)."""
        if self.baseline is None:
            return None
        return {"peak_step_mib": (self.peak - self.baseline) / MiB, "before_steps_mib": self.baseline / MiB}


# One variant ---------------------------------------------------------------------------------------------
def seconds_per_step(run_dir: Path) -> tuple[float | None, int, float | None]:
    """(wall seconds per step, steps timed, training-batch ρ of the last record) from ``stats.jsonl``."""
    stats = run_dir / "stats.jsonl"
    records = [json.loads(line) for line in stats.read_text().splitlines() if line.strip()]
    records = sorted((r for r in records if "steps_per_s" in r), key=lambda r: r["step"])
    seconds, steps, previous = 0.0, 0, 0
    for r in records:
        n = r["step"] - previous
        seconds, steps, previous = seconds + n / r["steps_per_s"], steps + n, r["step"]
    rho = records[-1].get("flops_ratio") if records else None
    return (seconds / steps if steps else None), steps, rho


def train_variant(name: str, config: TrainConfig, device: str) -> dict:
    """Fine-tune (or resume) one variant; its parameters, training speed and step memory."""
    run_dir = Path(config.out_dir)
    with StepMemory(device) as memory:
        res = train(config)
    stored = run_dir / MEMORY_FILE
    previous = json.loads(stored.read_text()) if stored.exists() else None
    mem = memory.result()
    if mem is not None:
        mem["method"] = memory.method
        if previous is not None and previous["peak_step_mib"] > mem["peak_step_mib"]:
            mem = previous  # an interrupted run: the largest step of all its invocations
        save_text(stored, json.dumps(mem, indent=2) + "\n")
    mem = mem or previous
    params = list(res.model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for m in (res.model, res.ema) for t in [*m.parameters(), *m.buffers()]}  # fmt: skip
    size = params[0].element_size()
    per_step, timed, train_rho = seconds_per_step(run_dir)
    return {
        "label": name,
        "run_dir": str(run_dir),
        "export": str(res.export),
        "steps_done": res.step,
        "total_params": total,
        "trainable_params": trainable,
        "trainable_fraction": trainable / total,
        "seconds_per_step": per_step,
        "timed_steps": timed,
        "train_flops_ratio": train_rho,
        "memory": mem,
        "state_mib": {
            "weights_and_ema": sum(held.values()) / MiB,
            "gradients": trainable * size / MiB,
            "adamw_moments": 2 * trainable * size / MiB,
        },
    }


def dense_macs_per_evaluation(base: Path, device: str) -> int:
    """Attention+MLP multiply-accumulates of one dense DiT evaluation of one image."""
    dit = load_dit(base, device)
    mc = dit.config
    x = torch.zeros(1, mc.in_channels, mc.input_size, mc.input_size, device=device)
    t = torch.tensor([0.5 if mc.objective == "flow" else 500], device=device)
    y = torch.tensor([0], device=device)
    with torch.inference_mode(), count_flops() as fc:
        dit(x, t, y)
    return fc.by_component.get("attention", 0) + fc.by_component.get("mlp", 0)


def sample_variant(run: dict, lora: bool, cfg: DemoConfig, dense: int, out: Path) -> dict:
    """Sample one fine-tune through the sliced engine (``measure``); ρ, quality and speed."""
    from dydit.apps.demo import load_sliced_dydit

    if lora:  # adapters and routers onto the base; the sliced engine merges them per step (§18)
        model = load_with_lora(run["export"]).to(cfg.device).eval()
        model.execution = "sliced"
    else:
        model = load_sliced_dydit(Path(run["export"]), cfg.device)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    npz = out / "samples" / f"{Path(run['run_dir']).name}.npz"
    r = measure(run["label"], model, cfg, npz)
    return {
        "rho": r.macs_attn_mlp / max(1, r.forwards * dense),
        "macs_per_image": r.macs_attn_mlp / r.images,
        "seconds_per_image": r.seconds_per_image,
        **r.metrics,
    }


def _frontier_verdict(point: dict, path: Path, cfg: DemoConfig) -> dict:
    """The equal-compute comparison of ``benchmarks/frontier.py`` against that file's dense points."""
    import frontier  # benchmarks/frontier.py, the sibling of this script (its folder is on sys.path)

    points = [
        p for p in json.loads(path.read_text())["points"]
        if p.get("sampler") == cfg.sampler and p.get("num_samples") == cfg.num_samples
    ]  # fmt: skip
    return frontier.equal_compute({**point, "kind": "dydit", "steps": cfg.steps}, points)


# The text-to-image model ---------------------------------------------------------------------------------
def t2i_finetune_argv(args: argparse.Namespace, base: Path, run_dir: Path, lora: bool) -> list[str]:
    """The ``dydit finetune`` arguments of one text-to-image fine-tune (issue 25's, ``T2I_RECIPE``;
    the run cadence of the embedded DiT's; then ``--finetune-args``; TD-LoRA's own last)."""
    argv = ["finetune", "--model", args.model or "DyFLUX-t2i", "--init-from", str(base),
            "--target", str(args.target), *T2I_RECIPE, "--steps", str(args.steps)]  # fmt: skip
    for name, value in run_cadence(args.steps).items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    argv += ["--device", args.device, *([] if args.progress else ["--no-progress"])]
    argv += shlex.split(args.finetune_args or "")
    if lora:
        argv += ["--lora", str(args.lora_rank), "--lora-groups", str(args.lora_groups)]
        if args.lora_lr is not None:
            argv += ["--lr", str(args.lora_lr)]
    return [*argv, "--out-dir", str(run_dir)]


def cli_config(argv: list[str]) -> TrainConfig:
    """The TrainConfig ``dydit ARGV`` runs: the CLI's own parser and ``config_from_args``."""
    from dydit.cli import build_parser
    from dydit.cli.train import config_from_args

    args = build_parser().parse_args(argv)
    return config_from_args(args, finetune=args.command == "finetune")


def t2i_points(bench: Any, model: torch.nn.Module, label: str, kind: str, tag: str) -> dict[str, dict]:
    """``model`` sampled and scored on every prompt set of ``bench`` (``t2i_frontier.Bench.measure``:
    the MACs really performed, seconds, GenEval-style accuracy, FD-cells and the optional FID)."""
    return {
        split: bench.measure(model, label, kind, split, bench.settings.steps, None,
                             bench.out / "samples" / split / f"{tag}.npz", {})
        for split in bench.args.splits
    }  # fmt: skip


def t2i_summary(points: dict[str, dict], dense: dict[str, dict]) -> dict:
    """ρ over every evaluation of every prompt set (the dense base's points: the same prompts, seeds
    and steps), the cost per image, and the points themselves."""

    def total(pts: dict[str, dict], key: str) -> float:
        return sum(pts[s][key] * pts[s]["prompts"] for s in points)

    images = sum(p["prompts"] for p in points.values())
    return {
        "rho": total(points, "macs_per_image") / total(dense, "macs_per_image"),
        "macs_per_image": total(points, "macs_per_image") / images,
        "seconds_per_image": total(points, "seconds_per_image") / images,
        "splits": points,
    }


# The two comparisons -------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """What the embedded DiT's and the text-to-image comparison do differently."""

    family: str  # "dit" or "t2i"
    variants: dict[str, tuple[str, TrainConfig]]  # key: (label, the run's config)
    recipe: dict
    sampling: dict  # what a measurement depends on (with the run's steps: reuse it or not)
    sample: Callable[[dict, bool, dict], dict]  # (run, TD-LoRA?, result) -> the run's measurement
    verdict: Callable[[dict], dict]  # a measurement -> its equal-compute verdict (--frontier)
    commands: dict[str, str]  # key: the run's command line, where it has one


def _variant_dirs(args: argparse.Namespace, out: Path) -> dict[str, tuple[str, Path]]:
    lr_tag = "" if args.lora_lr is None else f"-lr{args.lora_lr:g}"
    return {
        "full": ("full DyDiT fine-tune", out / f"full-{args.target:g}"),
        "lora": (f"TD-LoRA r={args.lora_rank}, G={args.lora_groups}",
                 out / f"lora-r{args.lora_rank}-g{args.lora_groups}{lr_tag}-{args.target:g}"),
    }  # fmt: skip


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def dit_comparison(args: argparse.Namespace, out: Path, base: Path) -> Comparison:
    cfg = DemoConfig(
        num_samples=_given(args.num_samples, DemoConfig.num_samples),
        sampler=_given(args.sampler, DemoConfig.sampler), steps=_given(args.sample_steps, DemoConfig.steps),
        device=args.device, progress=args.progress, ref_limit=args.ref_limit, inception=not args.no_inception,
    )  # fmt: skip
    fields = {**_given(args.recipe, SHIPPED_RECIPE), "finetune_steps": args.steps, "target": args.target}
    recipe = replace(cfg, **fields)
    recipe = replace(recipe, complete_steps=min(recipe.complete_steps, args.steps))
    lora: dict[str, Any] = dict(lora_rank=args.lora_rank, lora_groups=args.lora_groups)
    if args.lora_lr is not None:
        lora["lr"] = args.lora_lr
    variants = {
        key: (label, finetune_config(recipe, base, run_dir, dynamic=True, **(lora if key == "lora" else {})))
        for key, (label, run_dir) in _variant_dirs(args, out).items()
    }
    dense: list[int] = []  # the dense DiT's MACs of one evaluation, counted once when first needed

    def sample(run: dict, is_lora: bool, result: dict) -> dict:
        if not dense:
            dense.append(dense_macs_per_evaluation(base, args.device))
        return sample_variant(run, is_lora, cfg, dense[0], out)

    sampling = {"num_samples": cfg.num_samples, "sampler": cfg.sampler, "steps": cfg.steps,
                "inception": cfg.inception, "ref_limit": cfg.ref_limit}  # fmt: skip

    def verdict(point: dict) -> dict:
        return _frontier_verdict(point, Path(args.frontier), cfg)

    return Comparison("dit", variants, asdict(recipe), sampling, sample, verdict, {})


def t2i_comparison(args: argparse.Namespace, out: Path, base: Path) -> Comparison:
    import frontier  # benchmarks/frontier.py and t2i_frontier.py, siblings of this script
    import t2i_frontier

    from dydit.apps.demo_t2i import check_dense_t2i, load_t2i_dydit, recipe
    from dydit.checkpoint import load_model

    if not base.is_file():
        raise DyditError(
            f"no text-to-image model at {base}: give --base (a `dydit train --model FLUX-t2i` export)"
        )
    dense_model = check_dense_t2i(load_model(base).eval(), str(base))
    splits = _given(args.splits, list(SPLITS))
    cfg = T2IDemoConfig(
        out_dir=str(out), per_category=_given(args.per_category, T2IDemoConfig.per_category),
        steps=args.sample_steps, cfg_scale=args.cfg_scale,
        sample_batch=_given(args.sample_batch, T2IDemoConfig.sample_batch), fid=not args.no_inception,
        device=args.device, progress=args.progress,
    )  # fmt: skip
    settings = recipe(cfg, dense_model.config)
    bench = t2i_frontier.Bench(argparse.Namespace(splits=splits), cfg, settings, out)
    argvs = {key: t2i_finetune_argv(args, base, run_dir, key == "lora")
             for key, (_, run_dir) in _variant_dirs(args, out).items()}  # fmt: skip
    variants = {key: (label, cli_config(argvs[key])) for key, (label, _) in _variant_dirs(args, out).items()}
    sampling = dict(
        splits=splits, per_category=cfg.per_category, sampler=settings.sampler, steps=settings.steps,
        cfg_scale=settings.cfg_scale, seed=cfg.seed, sample_batch=cfg.sample_batch, fid=cfg.fid,
    )  # fmt: skip

    def dense_points(result: dict) -> dict[str, dict]:
        """The dense base on the same prompts, seeds and steps (measured once per sampling setting)."""
        key = {**sampling, "base": str(base)}
        if result.get("dense", {}).get("sample_key") != key:
            label = f"{frontier.family_name(dense_model.config)} (dense base)"
            _log.info("%s: sampling %d prompts per set", label, len(bench.prompts[splits[0]]))
            points = t2i_points(bench, dense_model.to(args.device), label, "dense", "dense")
            result["dense"] = {"label": label, "sample_key": key, "sample": t2i_summary(points, points)}
        return result["dense"]["sample"]["splits"]

    def sample(run: dict, is_lora: bool, result: dict) -> dict:
        dense = dense_points(result)
        # TD-LoRA: adapters and routers onto the base; the sliced engine merges them per step (§18).
        model = load_with_lora(run["export"]).eval() if is_lora else load_t2i_dydit(run["export"])
        model.execution = "sliced"
        tag = Path(run["run_dir"]).name
        return t2i_summary(t2i_points(bench, model.to(args.device), run["label"], "dydit", tag), dense)

    def verdict(measured: dict) -> dict:
        """Per prompt set, the equal-compute verdict against a t2i_frontier.py frontier.json."""
        data = json.loads(Path(args.frontier).read_text())
        theirs = data.get("settings", {})
        mine = dict(sampler=settings.sampler, cfg_scale=settings.cfg_scale, per_category=cfg.per_category,
                    seed=cfg.seed)  # fmt: skip
        diff = [k for k, v in mine.items() if theirs.get(k) != v]
        if Path(theirs.get("base", "")).resolve() != base.resolve():
            diff.append("base")
        if diff:
            raise DyditError(f"{args.frontier} was measured with other settings ({', '.join(diff)})")
        return {s: t2i_frontier.equal_compute(p, data["points"]) for s, p in measured["splits"].items()}

    recipe_fields = variants["full"][1].resolved().to_dict()
    for name in ("out_dir", "progress", "device"):
        recipe_fields.pop(name)
    commands = {key: shlex.join(["dydit", *argv]) for key, argv in argvs.items()}
    return Comparison("t2i", variants, recipe_fields, sampling, sample, verdict, commands)


# Main -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(_given(args.out_dir, "runs/lora_compare_t2i" if args.t2i else "runs/lora_compare"))
    base = Path(_given(args.base, T2I_CHECKPOINT if args.t2i else BASE_CHECKPOINT))
    comparison = (t2i_comparison if args.t2i else dit_comparison)(args, out, base)
    (out / "samples").mkdir(parents=True, exist_ok=True)

    store = out / "lora_compare.json"
    result = json.loads(store.read_text()) if store.exists() else {"runs": {}, "family": comparison.family}
    if result.get("family", "dit") != comparison.family:  # a file of before --t2i: the embedded DiT's
        raise DyditError(f"{store} holds the other comparison's results; use another --out-dir")
    result.update(
        command=shlex.join(["python", "benchmarks/lora_compare.py", *argv]),
        machine=machine_description(args.device), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
        family=comparison.family, base=str(base), target=args.target, steps=args.steps,
        recipe=comparison.recipe, sampling=comparison.sampling,
        lora={"rank": args.lora_rank, "groups": args.lora_groups, "lr": comparison.variants["lora"][1].lr},
    )  # fmt: skip
    for key, (label, config) in comparison.variants.items():
        _log.info("%s: fine-tuning %d steps in %s", label, args.steps, config.out_dir)
        run = train_variant(label, config, args.device)
        if key in comparison.commands:
            run["command"] = comparison.commands[key]
        sample_key = {**result["sampling"], "steps_done": run["steps_done"]}
        old = result["runs"].get(key, {})
        if old.get("sample_key") == sample_key and old.get("export") == run["export"]:
            run["sample"], run["sample_key"] = old["sample"], sample_key  # measured already
        else:
            _log.info("%s: sampling", label)
            run["sample"], run["sample_key"] = comparison.sample(run, key == "lora", result), sample_key
        if args.frontier:
            run["sample"]["frontier"] = comparison.verdict(run["sample"])
        result["runs"][key] = run
        save_text(store, json.dumps(result, indent=2) + "\n")  # after every variant: nothing lost
    text = (markdown_t2i if args.t2i else markdown)(result)
    save_text(out / "lora_compare.md", text)
    print(text)
    return result


def _memory_note(result: dict) -> str:
    methods = {
        run["memory"]["method"] for run in result["runs"].values() if (run["memory"] or {}).get("method")
    }
    return f"Peak memory per step: {'; '.join(sorted(methods)) or 'not measured'}."


def _training_cells(run: dict) -> str:
    """The training columns of a fine-tune's row: s / step, peak MiB / step, the training state."""
    mem, st = run["memory"] or {}, run["state_mib"]
    state = f"{st['weights_and_ema']:.1f}, {st['gradients']:.1f}, {st['adamw_moments']:.1f}"
    return f"{_fmt(run['seconds_per_step'], '.3f')} | {_fmt(mem.get('peak_step_mib'), '.1f')} | {state}"


def markdown(result: dict) -> str:
    s, rec = result["sampling"], result["recipe"]
    lines = [
        f"TD-LoRA against full DyDiT fine-tuning at λ = {result['target']:g}, {result['steps']} steps each "
        f"(batch {rec['finetune_batch']}, lr {rec['lr']:g}, router lr {rec['router_lr']:g}, complete-model "
        f"loss {rec['complete_steps']} steps, distillation weight {rec['distill_weight']:g}), base "
        f"`{result['base']}`; sampling {s['num_samples']} images, {s['sampler']} {s['steps']} steps, "
        "sliced engine.",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}, torch {result['torch']}; date {result['date']}.",
        "",
        "| fine-tune | trainable params | trainable fraction | ρ sampling (training batch) | FID | "
        "FD-FMNIST-classifier | s / step | peak MiB / step | weights+EMA, grads, AdamW MiB | ms / image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for run in result["runs"].values():
        smp = run["sample"]
        lines.append(
            _run_row(run, f"{_fmt(smp.get('FID'), '.1f')} | {_fmt(smp.get('FD-FMNIST-classifier'), '.1f')}")
        )
    lines += ["", _memory_note(result)]
    for run in result["runs"].values():
        eq = run["sample"].get("frontier")
        if eq is not None:
            verdict = eq.get("verdict", "no dense point to compare")
            delta, steps = _fmt(eq.get("delta_fid"), "+.1f"), eq.get("dense_steps", "–")
            lines.append(f"Frontier, {run['label']}: {verdict} (ΔFID {delta}, dense steps {steps}).")
    return "\n".join(lines) + "\n"


def _run_row(run: dict, quality: str) -> str:
    """A fine-tune's row of either comparison's table: its trainable parameters, ρ, the ``quality``
    cells (the variant's metrics, already joined by " | "), the training cells and ms / image."""
    smp = run["sample"]
    return (
        f"| {run['label']} | {run['trainable_params']:,} | {100 * run['trainable_fraction']:.2f}% | "
        f"{smp['rho']:.3f} ({_fmt(run['train_flops_ratio'], '.3f')}) | {quality} | "
        f"{_training_cells(run)} | {1e3 * smp['seconds_per_image']:.1f} |"
    )


def markdown_t2i(result: dict) -> str:
    """The text-to-image comparison: the main table (a column per prompt set for each quality
    metric), the fine-tunes' commands, and the GenEval-style accuracy per category."""
    from dydit.data.compose_grammar import CATEGORIES

    s, rec = result["sampling"], result["recipe"]
    splits = s["splits"]
    sets = " / ".join(splits)
    router_lr = _given(rec["router_lr"], rec["lr"])

    def per_set(sample: dict, key: str, spec: str) -> str:
        return " / ".join(_fmt(sample["splits"][sp].get(key), spec) for sp in splits)

    def quality(sample: dict) -> str:
        return " | ".join(
            per_set(sample, k, f) for k, f in (("overall", ".3f"), ("FD-cells", ".1f"), ("FID", ".1f"))
        )

    dense = result["dense"]
    lines = [
        f"TD-LoRA against full DyDiT fine-tuning of the text-to-image FLUX at λ = {result['target']:g}, "
        f"{result['steps']} steps each (`dydit finetune`: batch {rec['batch_size']}, lr {rec['lr']:g}, "
        f"router lr {router_lr:g}, complete-model loss {rec['complete_steps']} steps, distillation weight "
        f"{rec['distill_weight']:g}, EMA decay {rec['ema_decay']:g}), base `{result['base']}`. Sampling: "
        f"prompt sets {sets}, {s['per_category']} prompts per category, {s['sampler']} {s['steps']} steps, "
        f"classifier-free guidance {s['cfg_scale']:g}, the same prompts and seeds for every model, DyDiTs "
        "in the sliced engine; ρ: attention + MLP MACs really performed over the dense base's on the same "
        "evaluations (both guidance passes).",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}, torch {result['torch']}; date {result['date']}.",
        "",
        "Fine-tunes:",
        "",
        *[f"    {run['command']}" for run in result["runs"].values()],
        "",
        f"| model | trainable params | trainable fraction | ρ sampling (training batch) | GenEval overall "
        f"({sets}) | FD-cells ({sets}) | FID ({sets}) | s / step | peak MiB / step | weights+EMA, grads, "
        "AdamW MiB | ms / image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        f"| {dense['label']} | – | – | {dense['sample']['rho']:.3f} | {quality(dense['sample'])} | – | – "
        f"| – | {1e3 * dense['sample']['seconds_per_image']:.1f} |",
    ]
    lines += [_run_row(run, quality(run["sample"])) for run in result["runs"].values()]
    lines += ["", _memory_note(result), "", "GenEval-style accuracy per category:", ""]
    lines += [
        "| model | prompt set | " + " | ".join(CATEGORIES) + " | overall |",
        "|---|---|" + "---:|" * (len(CATEGORIES) + 1),
    ]
    for label, smp in [
        (dense["label"], dense["sample"]),
        *((r["label"], r["sample"]) for r in result["runs"].values()),
    ]:
        for sp in splits:
            p = smp["splits"][sp]
            acc = " | ".join(_fmt(p["accuracy"].get(c), ".2f") for c in CATEGORIES)
            lines.append(f"| {label} | {sp} | {acc} | {p['overall']:.3f} |")
    for run in result["runs"].values():
        for sp, eq in (run["sample"].get("frontier") or {}).items():
            verdict = eq.get("verdict", "no dense point to compare")
            deltas = (
                f"Δoverall {_fmt(eq.get('delta_overall'), '+.3f')}, ΔFID {_fmt(eq.get('delta_fid'), '+.1f')}"
            )
            lines.append(
                f"Frontier, {run['label']} ({sp}): {verdict} ({deltas}, dense steps "
                f"{eq.get('dense_steps', '–')})."
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        main()
    except DyditError as e:
        sys.exit(f"error: {e}")
