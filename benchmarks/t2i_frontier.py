"""Benchmark (not a test): the text-to-image equal-compute frontier of the tiny FLUX-t2i (issue 25).

The class-conditional frontier (``benchmarks/frontier.py``) asks whether a DyDiT beats the dense
model with fewer sampler steps; this script asks the same of the text-to-image FLUX trained on the
captioned Fashion-MNIST compositions (docs/METHOD.md §17). For each prompt set of ``--splits``
(``train``: held-in prompts, ``held-out``: prompts with held-out colour-item and relation pairs,
:func:`dydit.data.compose_grammar.evaluation_prompts`) it samples the same prompts and seeds from

- the dense model ``--base`` at every Euler step count of ``--dense-steps`` (the *frontier*),
- every DyDiT export of ``--checkpoint LABEL=PATH`` (e.g. width + token routing and the token-only
  control; default: the shipped DyDiT when it exists) in the sliced engine at ``--dydit-steps``,
- with ``--caches`` (e.g. ``teacache:0.1,fbcache:0.1``), step caching (docs/METHOD.md §19) on the
  dense model (kind ``dense+cache``) and on every DyDiT (kind ``dydit+cache``) at ``--cache-steps``;
  TeaCache's polynomial as in ``benchmarks/frontier.py`` (``--cache-coefficients``: ``auto`` by
  default, each model fitted on its own trajectories, here of the held-in prompts cycled over
  ``--cache-calibration-samples`` seeds, with the run's recipe at every cache step count, kept as
  ``OUT_DIR/teacache-<label>.json``; a FILE for every model; ``LABEL=FILE`` for one),

with the model's own recipe (sampler and guidance stored in its config, ``dydit demo t2i``'s
:func:`~dydit.apps.demo_t2i.recipe`) unless ``--cfg-scale`` is given. Every point records the
attention + MLP multiply-accumulates per image that the layers really performed over the whole
sampling run (both passes of classifier-free guidance; a cached run counts only the work that ran),
the sampling seconds per image, the GenEval-style overall and per-category accuracy
(:mod:`dydit.evaluate.geneval`), the per-cell Fréchet distance (FD-cells) and, unless
``--no-inception``, the whole-canvas Inception FID against real compositions of the same prompts.
Every non-dense point is compared with the dense step curve at equal compute: its GenEval overall
interpolated in MACs per image, and a verdict ("DyDiT wins" / "fewer dense steps win"; higher
GenEval is better).

Results accumulate in ``OUT_DIR/frontier.json``, saved after every point; a point already there is
not measured again (a later run without ``--no-inception`` adds the FID of points measured without
it, from their saved samples). ``frontier.md`` (a table per prompt set), ``frontier_geneval.png``
(GenEval overall against GMACs per image) and, when FIDs exist, ``frontier_fid.png`` are redrawn at
the end of every run, or alone with ``--render``.

Usage::

    python benchmarks/t2i_frontier.py                                # dense + the shipped DyDiT
    python benchmarks/t2i_frontier.py \
        --checkpoint "DyDiT λ=0.5=runs/dyflux-t2i-0.5/ema.safetensors" \
        --checkpoint "token-only=runs/dyflux-t2i-tokens/ema.safetensors"
    python benchmarks/t2i_frontier.py --no-inception --per-category 4 --dense-steps 4,8,14,28
    python benchmarks/t2i_frontier.py --caches teacache:0.1,fbcache:0.1 --cache-steps 14,28
    python benchmarks/t2i_frontier.py --render runs/t2i-frontier/frontier.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from itertools import zip_longest
from pathlib import Path

# benchmarks/frontier.py (the class-conditional frontier), for its shared helpers; a script's own
# folder is on sys.path, so its sibling imports by name.
import frontier
import numpy as np
import torch

from dydit.apps.demo_t2i import (
    SPLITS,
    T2I_CHECKPOINT,
    T2I_DYDIT,
    T2IDemoConfig,
    check_dense_t2i,
    inception_fid,
    load_t2i_dydit,
    recipe,
    sample_prompts,
    score_images,
)
from dydit.checkpoint import load_model
from dydit.data.compose_grammar import CATEGORIES
from dydit.errors import DyditError
from dydit.flow import create_process
from dydit.io import save_text
from dydit.log import format_number as _fmt
from dydit.log import machine_description
from dydit.sample import calibrate_teacache

_log = logging.getLogger("t2i_frontier")
SPLIT_NAMES = {"train": "held-in prompts", "held-out": "held-out prompts"}


def _splits(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in SPLITS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"prompt sets are {', '.join(SPLITS)}; got {text!r}")
    return list(dict.fromkeys(values))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="runs/t2i-frontier", help="frontier.json, samples and plots go here")
    p.add_argument("--base", default=str(T2I_CHECKPOINT),
                   help="the dense text-to-image FLUX export (default: %(default)s)")  # fmt: skip
    p.add_argument("--checkpoint", type=frontier._labelled, action="append", default=None,
                   metavar="LABEL=PATH", help="a DyDiT export to put on the frontier, run in the sliced "
                   "engine (repeatable; default: the shipped DyDiT when it exists)")  # fmt: skip
    p.add_argument("--dense-steps", type=frontier._ints, default=frontier._ints("4,6,8,10,14,20,28"),
                   help="Euler step counts of the dense frontier (default 4,6,8,10,14,20,28)")  # fmt: skip
    p.add_argument("--dydit-steps", type=frontier._ints, default=frontier._ints("14,28"),
                   help="step counts of every DyDiT (default 14,28)")  # fmt: skip
    p.add_argument("--caches", type=frontier._caches, default=[], metavar="SPEC,...",
                   help="step caches (METHOD:THRESHOLD, docs/METHOD.md §19) on the dense model and every "
                   "DyDiT: points of kinds dense+cache and dydit+cache")  # fmt: skip
    p.add_argument("--cache-steps", type=frontier._ints, default=frontier._ints("14,28"),
                   help="step counts of the cache points (default 14,28)")  # fmt: skip
    frontier.add_coefficient_options(p)
    p.add_argument("--splits", type=_splits, default=list(SPLITS),
                   help="prompt sets: train (held-in) and/or held-out (default: both)")  # fmt: skip
    p.add_argument("--per-category", type=int, default=T2IDemoConfig.per_category,
                   help="prompts per GenEval category and prompt set (default %(default)s)")  # fmt: skip
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's own recipe)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt sets and the sampling noise")
    p.add_argument("--sample-batch", type=int, default=T2IDemoConfig.sample_batch,
                   help="prompts per sampling batch (caches decide per batch; %(default)s)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-inception", action="store_true",
                   help="no Inception FID (quick runs): GenEval-style scores and FD-cells only")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--render", metavar="JSON", help="only redraw the tables and plots of a frontier.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.render:
        path = Path(args.render)
        if not path.is_file():
            raise DyditError(f"no frontier.json at {path}")
        render(json.loads(path.read_text()), path.parent)
        return
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    base = Path(args.base)
    if not base.is_file():
        raise DyditError(f"no text-to-image model at {base}: give --base (a `dydit train` FLUX-t2i export)")
    checkpoints = args.checkpoint
    if checkpoints is None:
        checkpoints = [("DyDiT (shipped)", str(T2I_DYDIT))] if T2I_DYDIT.is_file() else []
    cfg = T2IDemoConfig(
        out_dir=args.out_dir, per_category=args.per_category, cfg_scale=args.cfg_scale,
        sample_batch=args.sample_batch, seed=args.seed, fid=not args.no_inception, device=args.device,
        progress=not args.no_progress,
    )  # fmt: skip
    dense = check_dense_t2i(load_model(base).eval(), str(base)).to(args.device)
    settings = recipe(cfg, dense.config)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "frontier.json"
    result = json.loads(store.read_text()) if store.exists() else {"points": []}
    run_settings = dict(
        base=str(base), sampler=settings.sampler, cfg_scale=settings.cfg_scale,
        per_category=args.per_category, seed=args.seed, sample_batch=args.sample_batch,
    )  # fmt: skip
    if result.get("settings", run_settings) != run_settings:
        old = result["settings"]
        diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in run_settings.items() if old.get(k) != v)
        raise DyditError(f"{store} holds points of other settings ({diff}); use another --out-dir")
    command = shlex.join(["python", "benchmarks/t2i_frontier.py", *(sys.argv[1:] if argv is None else argv)])
    result.update(settings=run_settings, machine=machine_description(args.device), torch=torch.__version__)
    result["commands"] = [*(c for c in result.get("commands", []) if c != command), command]
    name = f"{frontier.family_name(dense.config)} (dense)"
    labels = [name, *(label for label, _ in checkpoints)]
    coefficients = frontier.TeaCacheCoefficients.from_args(args, labels, out)  # checked before any work
    bench = Bench(args, cfg, settings, out, result, store, coefficients)
    for spec in [None, *args.caches]:
        bench.run(name, "dense", lambda: dense, args.dense_steps, cache=spec, weights=base)
    for label, path in checkpoints:
        for spec in [None, *args.caches]:
            load = partial(_load_dydit, path, args.device)
            bench.run(label, "dydit", load, args.dydit_steps, cache=spec, weights=Path(path), checkpoint=path)
    bench.save()
    render(result, out)


def _load_dydit(path: str, device: str):
    return load_t2i_dydit(path).to(device)


def calibration_prompts(per_category: int, seed: int, n: int) -> list[str]:
    """The ``n`` held-in prompts a TeaCache fit samples: round-robin over the categories (the
    evaluation list is grouped by category), so that even a few calibration images see every kind
    of prompt, not only the first category's; cycled when ``n`` exceeds the list."""
    from dydit.data.compose_grammar import evaluation_prompts

    by_category: dict[str, list[str]] = {}
    for p in evaluation_prompts("train", per_category, seed):
        by_category.setdefault(p.category, []).append(p.text)
    prompts = [text for group in zip_longest(*by_category.values()) for text in group if text is not None]
    return [prompts[i % len(prompts)] for i in range(n)]


class Bench:
    """Measures the points of one run into ``result`` (saved to ``store`` after every point).

    ``args`` needs ``splits`` (and, for :meth:`run`, the cache options, with ``coefficients`` the
    run's :class:`frontier.TeaCacheCoefficients`). ``benchmarks/lora_compare.py --t2i`` measures its
    fine-tunes with :meth:`measure` alone, without ``result`` and ``store``.
    """

    def __init__(
        self, args, cfg: T2IDemoConfig, settings, out: Path, result: dict | None = None,
        store: Path | None = None, coefficients: frontier.TeaCacheCoefficients | None = None,
    ):  # fmt: skip
        from dydit.data.compose_grammar import evaluation_prompts

        self.args, self.cfg, self.settings, self.out = args, cfg, settings, out
        self.coefficients = coefficients
        self.result, self.store = result if result is not None else {"points": []}, store
        self.prompts = {
            s: [p.text for p in evaluation_prompts(s, cfg.per_category, cfg.seed)] for s in args.splits
        }
        self._classifier = None

    def save(self) -> None:
        save_text(self.store, json.dumps(self.result, indent=2) + "\n")

    @property
    def classifier(self):
        if self._classifier is None:
            from dydit.evaluate.classifier import load_classifier
            from dydit.evaluate.extract import default_cache_dir

            self._classifier = load_classifier(default_cache_dir(), self.cfg.device, self.cfg.progress)
        return self._classifier

    def real(self, split: str) -> Path:
        """The real compositions of ``split``'s prompts (Fashion-MNIST test items): FID's reference."""
        path = self.out / f"real_{split}.npz"
        if not path.is_file():
            from dydit.data.compose import load_item_pool, real_compositions
            from dydit.data.compose_grammar import parse_caption
            from dydit.evaluate.images import write_npz

            captions = [parse_caption(p) for p in self.prompts[split]]
            images, _ = real_compositions(captions, *load_item_pool(split="test"))
            write_npz(path, images, np.zeros(len(images), dtype=np.int64))
        return path

    def run(
        self, label: str, kind: str, load, steps: list[int], cache: str | None = None,
        weights: Path | None = None, **extra,
    ) -> None:  # fmt: skip
        """Measure ``label`` at every step count and prompt set not in the results yet (``weights``:
        the model's file, recorded in its TeaCache fit)."""
        name = label
        if cache is not None:  # step caching around the model (docs/METHOD.md §19)
            label, kind, steps = f"{label} + {cache}", f"{kind}+cache", self.args.cache_steps
            extra = dict(extra, cache=cache)
        model = None
        for split in self.args.splits:
            for n in steps:
                samples = self.out / "samples" / split / f"{frontier._slug(label)}-{n}.npz"
                done = self.find(label, split, n)
                if done is not None:
                    if self.cfg.fid and done.get("FID") is None and samples.is_file():
                        _log.info("%s at %d steps (%s): adding the FID", label, n, split)
                        images = np.load(samples)["arr_0"]
                        done["FID"] = inception_fid(images, self.real(split), samples, self.cfg)
                        self.save()
                    continue
                model = model or load()
                if cache is not None and frontier.is_teacache(cache) and "cache_polynomial" not in extra:
                    extra = {**extra, **self.teacache(name, model, weights)}
                _log.info("%s at %d steps (%s)", label, n, SPLIT_NAMES[split])
                point = self.measure(model, label, kind, split, n, cache, samples, extra)
                self.result["points"].append(point)
                self.save()  # after every point: nothing lost

    def teacache(self, name: str, model: torch.nn.Module, weights: Path | None) -> dict:
        """The polynomial record of model ``name``'s TeaCache points (fitted first under ``auto``): its
        trajectories are those of the held-in prompts (:func:`calibration_prompts`) with the
        run's recipe at every cache step count."""
        if self.coefficients is None:
            raise DyditError(
                "a TeaCache point needs the run's --cache-coefficients (Bench(coefficients=...))"
            )
        mc = model.config
        runs = [replace(self.settings, steps=n) for n in self.args.cache_steps]
        rows = calibration_prompts(self.cfg.per_category, self.cfg.seed, self.coefficients.samples)
        fit = partial(
            calibrate_teacache, model, create_process(mc), shape=(mc.latent_channels, mc.sample_size,
            mc.sample_size), condition=model.text_encoder.tokenizer(rows), device=self.cfg.device,
        )  # fmt: skip
        meta = {} if weights is None else {"weights": str(Path(weights).resolve())}
        return self.coefficients.resolve(name, runs, fit, prompts="train", **meta)

    def find(self, label: str, split: str, steps: int) -> dict | None:
        """The point of ``label`` at ``steps`` on ``split`` already measured, if any."""
        for p in self.result["points"]:
            if (p["label"], p["split"], p["steps"]) == (label, split, steps):
                return p
        return None

    def measure(self, model, label, kind, split, steps, cache, samples: Path, extra: dict) -> dict:
        from dydit.evaluate.images import write_npz

        prompts = self.prompts[split]
        settings = replace(self.settings, steps=steps)
        fn = model if cache is None else cached_model(model, cache, extra.get("cache_polynomial"))
        images, cost = sample_prompts(fn, prompts, settings, self.cfg)
        scores = score_images(images, prompts, self.classifier, self.cfg)
        samples.parent.mkdir(parents=True, exist_ok=True)
        if self.cfg.fid:  # writes the samples too
            scores["FID"] = inception_fid(images, self.real(split), samples, self.cfg)
        else:
            write_npz(samples, images, np.zeros(len(images), dtype=np.int64))
        stats = {} if cache is None else {
            "evaluations_computed": fn.stats.computed, "evaluations_reused": fn.stats.reused,
        }  # fmt: skip
        return dict(
            label=label, kind=kind, split=split, steps=steps, prompts=len(prompts),
            macs_per_image=cost["macs_attn_mlp"], macs_total_per_image=cost["macs_total"],
            seconds_per_image=cost["seconds"] / len(prompts), date=time.strftime("%Y-%m-%d"),
            **extra, **stats, **scores,
        )  # fmt: skip


def cached_model(model: torch.nn.Module, spec: str, coefficients: str | Sequence[float] | None):
    """``model`` with the step cache ``spec`` (``generate`` starts a cache run for every batch);
    ``coefficients``: TeaCache's polynomial or its file (None: the identity; fbcache ignores it)."""
    from dydit.models.cache import CacheSettings, cached

    settings = CacheSettings.parse(spec)
    coeffs = coefficients if settings.method == "teacache" else None
    return cached(model, settings.method, settings.threshold, coeffs)


# Rendering -------------------------------------------------------------------------------------------
def equal_compute(point: dict, points: list[dict]) -> dict:
    """The dense curve of ``point``'s prompt set at its compute: GenEval overall (interpolated in MACs
    per image; higher is better, the verdict is on it) and, where measured, the FID difference."""
    same = [p for p in points if p["split"] == point["split"]]
    eq = frontier.equal_compute(point, same, metric="overall", higher_is_better=True)
    fid = frontier.equal_compute(point, same, metric="FID")
    if "delta_fid" in fid:
        eq["delta_fid"] = fid["delta_fid"]
    return eq


def render(result: dict, out: Path) -> None:
    """Write ``frontier.md``, ``frontier_geneval.png`` (and ``frontier_fid.png`` when FIDs exist);
    print the table."""
    table = markdown(result)
    save_text(out / "frontier.md", table)
    points = result["points"]
    _plot(points, "overall", "GenEval-style overall (higher is better)", out / "frontier_geneval.png")
    if any(p.get("FID") is not None for p in points):
        _plot(points, "FID", "Inception FID vs real compositions (lower is better)", out / "frontier_fid.png")
    print(table)


def _splits_of(points: list[dict]) -> list[str]:
    present = {p["split"] for p in points}
    return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))


def markdown(result: dict) -> str:
    """``frontier.md``: the header (machine, torch, dates, commands, settings) and a table per prompt set."""
    points = result["points"]
    s = result.get("settings", {})
    dates = sorted({p["date"] for p in points if "date" in p})
    lines = [
        "# Text-to-image equal-compute frontier (FLUX-t2i, captioned Fashion-MNIST compositions)",
        "",
        f"Machine: {result.get('machine', '?')}, torch {result.get('torch', '?')}; measured "
        f"{', '.join(dates) or '–'}, rendered {time.strftime('%Y-%m-%d')}.",
        "",
        "Command" + ("s" if len(result.get("commands", [])) > 1 else "") + ":",
        "",
        *[f"    {c}" for c in result.get("commands", [])],
        "",
        f"Dense model `{s.get('base', '?')}`; sampler {s.get('sampler', '?')}, classifier-free guidance "
        f"{_fmt(s.get('cfg_scale'), 'g')} (the model's own recipe unless --cfg-scale); "
        f"{s.get('per_category', '?')} prompts per category, seed {s.get('seed', '?')}: the same prompts "
        "and seeds for every point. *GMACs / image*: the attention + MLP multiply-accumulates the layers "
        "really performed over the whole sampling run, both guidance passes included (DyDiT: the sliced "
        "engine; a cache: only the work that ran). *Dense at equal compute*: round(ρ·N) dense steps, "
        "their GenEval overall when measured, and (in brackets) the dense curve interpolated in MACs per "
        "image; the verdict compares GenEval overall (higher is better) with the interpolated curve, "
        "else with the dense point at round(ρ·N) steps. ΔFID: FID minus the dense curve's at equal "
        "compute (lower is better).",
    ]
    head = (
        "| model | kind | steps | GMACs / image | s / image | " + " | ".join(CATEGORIES)
        + " | overall | FD-cells | FID | dense at equal compute: steps, overall (interpolated) "
        "| Δoverall | ΔFID | verdict |"
    )  # fmt: skip
    for split in _splits_of(points):
        rows = [p for p in points if p["split"] == split]
        rule = "|---|---|---:|---:|---:|" + "---:|" * (len(CATEGORIES) + 3) + "---|---:|---:|---|"
        lines += ["", f"## {SPLIT_NAMES.get(split, split)} (`{split}`)", "", head, rule]
        for p in sorted(rows, key=lambda p: (frontier.KIND_ORDER.get(p["kind"], 9), p["label"], p["steps"])):
            eq = {} if p["kind"] == "dense" else equal_compute(p, points)
            at = "–"
            if p["kind"] != "dense":
                at = f"{eq.get('dense_steps', '–')}, {_fmt(eq.get('dense_overall'))} "
                at += f"({_fmt(eq.get('frontier_overall'))})"
            acc = [_fmt(p.get("accuracy", {}).get(c), ".2f") for c in CATEGORIES]
            lines.append(
                f"| {p['label']} | {p['kind']} | {p['steps']} | {p['macs_per_image'] / 1e9:.3f} | "
                f"{p['seconds_per_image']:.3f} | " + " | ".join(acc)
                + f" | **{p['overall']:.3f}** | {_fmt(p.get('FD-cells'), '.2f')} | "
                f"{_fmt(p.get('FID'), '.1f')} | {at} | {_fmt(eq.get('delta_overall'), '+.3f')} | "
                f"{_fmt(eq.get('delta_fid'), '+.1f')} | "
                f"{eq.get('verdict', '–')} |"
            )  # fmt: skip
    return "\n".join(lines + frontier.coefficient_notes(points)) + "\n"


def _plot(points: list[dict], metric: str, ylabel: str, path: Path) -> None:
    """``metric`` against GMACs per image: a panel per prompt set, a line per label (numbers: steps)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    splits = _splits_of(points)
    fig = Figure(figsize=(5.5 * max(1, len(splits)), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(splits)), squeeze=False)[0]
    for ax, split in zip(axes, splits):
        rows = [p for p in points if p["split"] == split and p.get(metric) is not None]
        labels = sorted({p["label"] for p in rows}, key=lambda s: (not s.endswith("(dense)"), s))
        for label in labels:
            curve = sorted((p for p in rows if p["label"] == label), key=lambda p: p["macs_per_image"])
            dense = curve[0]["kind"] == "dense"
            style = "k-s" if dense else ("o:" if curve[0]["kind"].endswith("+cache") else "o--")
            xs, ys = [p["macs_per_image"] / 1e9 for p in curve], [p[metric] for p in curve]
            ax.plot(xs, ys, style, lw=2 if dense else 1, ms=4,
                    label=f"{label}: the frontier (fewer steps)" if dense else label)  # fmt: skip
            for p, x, y in zip(curve, xs, ys):
                ax.annotate(str(p["steps"]), (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
        title = f"{SPLIT_NAMES.get(split, split)}: DyDiT vs fewer dense steps (numbers: steps)"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("attention + MLP GMACs per image (whole sampling run)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if labels:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    try:
        main()
    except DyditError as e:
        sys.exit(f"error: {e}")
