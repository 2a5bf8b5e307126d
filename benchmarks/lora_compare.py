"""Benchmark (not a test): TD-LoRA DyDiT fine-tuning against full DyDiT fine-tuning at equal steps.

Issue 27, evidence item 3, on the embedded DiT (``src/dydit/assets/dit-ti4-fmnist.safetensors``).
Both fine-tunes follow the shipped DyDiT's recipe (``dydit.apps.demo.SHIPPED_RECIPE`` on the demo's
settings, as ``benchmarks/frontier.py``) at FLOPs target λ (0.5) for ``--steps`` steps:

- **full**: every weight of the DyDiT trains (``dydit finetune``);
- **TD-LoRA**: the base frozen, rank ``--lora-rank`` adapters in ``--lora-groups`` timestep-gated
  groups and the routers train (``dydit finetune --lora R --lora-groups G``; docs/METHOD.md §18).

Each run has its own directory under ``--out-dir`` and resumes when rerun. Then each is sampled
(``--num-samples`` images, the demo's sampler and seeds, the sliced engine; the TD-LoRA model merges
its adapter into each step's weights) through the frontier's ``measure()`` path, and reported:

- trainable-parameter fraction (parameters with gradients / all parameters of the fine-tuned model);
- ρ reached: attention+MLP multiply-accumulates the sliced engine really performed while sampling,
  over the dense base DiT's for the same evaluations (``count_flops``); also the training batch's
  ρ from the run's last log record;
- FID (offline Inception; ``--no-inception`` skips it) and FD-FMNIST-classifier;
- wall seconds per training step: the run's ``stats.jsonl`` windows (checkpoint writes excluded);
- peak memory per step: on CPU the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the first step and after each checkpoint write) above its
  resident set just before the first step: gradients, optimizer state and activations of a step
  (weights, EMA and data are resident before it); on CUDA ``torch.cuda.max_memory_allocated`` above
  the allocation before the first step. Measured in the invocation that trained (the maximum over
  invocations of an interrupted run); the training state's size (weights + EMA copy, gradients,
  AdamW's two moments) is given beside it.

With ``--frontier FILE`` (a ``frontier.json`` of ``benchmarks/frontier.py`` with the same sampler and
sample count), each point also gets the frontier's equal-compute verdict. ``--t2i`` (the FLUX-t2i)
is not offered: a TD-LoRA file of a FLUX stores a FLUX config that ``read_lora`` does not read back.

Writes ``lora_compare.json`` and ``lora_compare.md`` (table, command, machine, date) in ``--out-dir``.

Usage::

    python benchmarks/lora_compare.py                                  # 1200 steps each, 1000 images
    python benchmarks/lora_compare.py --steps 300 --num-samples 500 --lora-rank 16 --lora-groups 4
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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from dydit.apps.demo import BASE_CHECKPOINT, SHIPPED_RECIPE, DemoConfig, finetune_run, load_dit, measure
from dydit.checkpoint.lora import load_with_lora
from dydit.flops.counter import count_flops
from dydit.io import save_text
from dydit.log import format_number as _fmt
from dydit.log import machine_description

_log = logging.getLogger("lora_compare")
MiB = 2**20
MEMORY_FILE = "step_memory.json"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="runs/lora_compare", help="runs, samples and results go here")
    p.add_argument("--base", default=str(BASE_CHECKPOINT), help="the dense base DiT (.safetensors export)")
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
        default=SHIPPED_RECIPE,
        metavar="JSON",
        help=f"DemoConfig fields of both fine-tunes (default {json.dumps(SHIPPED_RECIPE)}); "
        "--steps replaces its finetune_steps and caps its complete_steps",
    )
    p.add_argument("--lora-rank", type=int, default=16, help="TD-LoRA rank r (default %(default)s)")
    p.add_argument("--lora-groups", type=int, default=4, help="TD-LoRA groups G (default %(default)s)")
    p.add_argument(
        "--lora-lr",
        type=float,
        default=None,
        help="learning rate of the adapters (default: the recipe's, as the full run)",
    )
    p.add_argument("--num-samples", type=int, default=DemoConfig.num_samples, help="images per model")
    p.add_argument("--sampler", default=DemoConfig.sampler, help="sampler (default %(default)s)")
    p.add_argument(
        "--sample-steps", type=int, default=DemoConfig.steps, help="sampler steps (default %(default)s)"
    )
    p.add_argument(
        "--no-inception", action="store_true", help="no Inception FID, the classifier distance only"
    )
    p.add_argument(
        "--ref-limit", type=int, default=None, help="reference images of the metrics (default: all)"
    )
    p.add_argument(
        "--frontier",
        default=None,
        metavar="JSON",
        help="a frontier.json (benchmarks/frontier.py): add its equal-compute verdicts",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--progress", action="store_true", help="progress bars while training and sampling")
    return p.parse_args(argv)


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


def train_variant(
    name: str, recipe: DemoConfig, base: Path, run_dir: Path, device: str, **options: Any
) -> dict:
    """Fine-tune (or resume) one variant; its parameters, training speed and step memory."""
    with StepMemory(device) as memory:
        res = finetune_run(recipe, base, run_dir, dynamic=True, **options)
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


# Main -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    base = Path(args.base)
    cfg = DemoConfig(
        num_samples=args.num_samples, sampler=args.sampler, steps=args.sample_steps, device=args.device,
        progress=args.progress, ref_limit=args.ref_limit, inception=not args.no_inception,
    )  # fmt: skip
    recipe = replace(cfg, **{**args.recipe, "finetune_steps": args.steps, "target": args.target})
    recipe = replace(recipe, complete_steps=min(recipe.complete_steps, args.steps))
    lora = dict(lora_rank=args.lora_rank, lora_groups=args.lora_groups)
    if args.lora_lr is not None:
        lora["lr"] = args.lora_lr
    lr_tag = "" if args.lora_lr is None else f"-lr{args.lora_lr:g}"
    variants = {
        "full": ("full DyDiT fine-tune", out / f"full-{args.target:g}", {}),
        "lora": (f"TD-LoRA r={args.lora_rank}, G={args.lora_groups}",
                 out / f"lora-r{args.lora_rank}-g{args.lora_groups}{lr_tag}-{args.target:g}", lora),
    }  # fmt: skip

    store = out / "lora_compare.json"
    result = json.loads(store.read_text()) if store.exists() else {"runs": {}}
    result.update(
        command=shlex.join(["python", "benchmarks/lora_compare.py", *argv]),
        machine=machine_description(args.device), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
        base=str(base), target=args.target, steps=args.steps, recipe=asdict(recipe),
        lora={"rank": args.lora_rank, "groups": args.lora_groups, "lr": args.lora_lr or recipe.lr},
        sampling={"num_samples": cfg.num_samples, "sampler": cfg.sampler, "steps": cfg.steps,
                  "inception": cfg.inception, "ref_limit": cfg.ref_limit},
    )  # fmt: skip
    dense = dense_macs_per_evaluation(base, args.device)
    for key, (label, run_dir, options) in variants.items():
        _log.info("%s: fine-tuning %d steps in %s", label, args.steps, run_dir)
        run = train_variant(label, recipe, base, run_dir, args.device, **options)
        sample_key = {**result["sampling"], "steps_done": run["steps_done"]}
        old = result["runs"].get(key, {})
        if old.get("sample_key") == sample_key and old.get("export") == run["export"]:
            run["sample"], run["sample_key"] = old["sample"], sample_key  # measured already
        else:
            _log.info("%s: sampling %d images", label, cfg.num_samples)
            run["sample"], run["sample_key"] = sample_variant(run, key == "lora", cfg, dense, out), sample_key
        if args.frontier:
            run["sample"]["frontier"] = _frontier_verdict(run["sample"], Path(args.frontier), cfg)
        result["runs"][key] = run
        save_text(store, json.dumps(result, indent=2) + "\n")  # after every variant: nothing lost
    save_text(out / "lora_compare.md", markdown(result))
    print(markdown(result))
    return result


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
    methods = set()
    for run in result["runs"].values():
        smp, mem, st = run["sample"], run["memory"] or {}, run["state_mib"]
        if mem.get("method"):
            methods.add(mem["method"])
        state = f"{st['weights_and_ema']:.1f}, {st['gradients']:.1f}, {st['adamw_moments']:.1f}"
        lines.append(
            f"| {run['label']} | {run['trainable_params']:,} | {100 * run['trainable_fraction']:.2f}% | "
            f"{smp['rho']:.3f} ({_fmt(run['train_flops_ratio'], '.3f')}) | {_fmt(smp.get('FID'), '.1f')} | "
            f"{_fmt(smp.get('FD-FMNIST-classifier'), '.1f')} | {_fmt(run['seconds_per_step'], '.3f')} | "
            f"{_fmt(mem.get('peak_step_mib'), '.1f')} | {state} | {1e3 * smp['seconds_per_image']:.1f} |"
        )
    lines += ["", f"Peak memory per step: {'; '.join(sorted(methods)) or 'not measured'}."]
    for run in result["runs"].values():
        eq = run["sample"].get("frontier")
        if eq is not None:
            verdict = eq.get("verdict", "no dense point to compare")
            delta, steps = _fmt(eq.get("delta_fid"), "+.1f"), eq.get("dense_steps", "–")
            lines.append(f"Frontier, {run['label']}: {verdict} (ΔFID {delta}, dense steps {steps}).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
