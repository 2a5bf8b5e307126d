"""Benchmark (not a test): is DyDiT better than taking fewer sampler steps? The equal-compute frontier.

The free alternative to a DyDiT is the dense DiT with fewer sampler steps. This script samples the
same seeds and labels from

- the dense base DiT at every step count of ``--dense-steps`` (the *frontier*),
- DyDiT fine-tunes (sliced engine) at every step count of ``--dydit-steps``: one per λ of
  ``--lambdas`` fine-tuned here with the ``--recipe`` (the demo's settings unless changed), and any
  existing DyDiT exports given with ``--checkpoint LABEL=PATH`` (e.g. the shipped one),
- the static control (the base fine-tuned with the same recipe, no routers) at ``--control-steps``,
- with ``--caches`` (e.g. ``teacache:0.1,teacache:0.2,fbcache:0.1``), step caching (docs/METHOD.md
  §19) on the dense base (kind ``dense+cache``) and on every DyDiT (kind ``dydit+cache``) at
  ``--cache-steps``. TeaCache's polynomial is per model by default (``--cache-coefficients auto``):
  each model (the base, every DyDiT) is fitted on its own trajectories, with the run's sampler,
  guidance and every step count of ``--cache-steps``, through ``dydit cache-calibrate``'s fit, and
  kept as ``OUT_DIR/teacache-<label>.json`` (reused on a rerun); ``--cache-coefficients FILE``
  gives one file to every model, ``LABEL=FILE`` one model its own. Each cache point records the
  file it used (path, sha256, coefficients). The MACs are those the cached run really performed,

and records for each point the attention+MLP multiply-accumulates per image that the layers really
performed over the whole sampling run, the sampling seconds per image, the FID (offline Inception)
and the Fréchet distance in a Fashion-MNIST classifier's features. Every DyDiT point is compared
with the dense frontier at equal compute (FID of the dense curve interpolated at the same MACs per
image, and the dense DiT at round(ρ·N) steps when measured) and the verdict says which wins.

Results accumulate in ``frontier.json`` (a point already measured with the same settings is not
measured again, so an interrupted run loses nothing; ``--include`` adds another run's points, so
that only the new ones are sampled); ``--render`` redraws ``frontier.md``,
``frontier_macs.png`` (FID against MACs per image), ``frontier_time.png`` (FID against s/image) and
``frontier_budgets.png`` (each side's best FID within a budget) from that file alone (no sampling,
no Inception). ``frontier.md`` ends with a verdict per compute
budget of ``--budgets``: the best dense-based point (dense, dense + cache) within the budget against
the best DyDiT-based one (DyDiT, DyDiT + cache); the plots draw each kind's lower envelope.

Usage::

    python benchmarks/frontier.py                                   # the whole grid (hours on a CPU)
    python benchmarks/frontier.py --lambdas 0.5 \
        --checkpoint shipped=src/dydit/assets/dydit-ti4-fmnist-0.5.safetensors
    python benchmarks/frontier.py --render runs/frontier/frontier.json
    python benchmarks/frontier.py --render docs/img/cache/frontier.json --out-dir /tmp/f --budgets 0.5,1,1.5
    python benchmarks/frontier.py --lambdas "" --no-control --caches teacache:0.1,fbcache:0.1 \
        --checkpoint shipped=src/dydit/assets/dydit-ti4-fmnist-0.5.safetensors   # + cache points
    python benchmarks/frontier.py --caches teacache:0.05 --cache-coefficients teacache-dit.json \
        --cache-coefficients "shipped=teacache-shipped.json" --checkpoint shipped=...   # given fits
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from dydit.apps.demo import (
    BASE_CHECKPOINT,
    SHIPPED_RECIPE,
    DemoConfig,
    finetune,
    load_dit,
    load_sliced_dydit,
    measure,
    sample_timed,
    sampling_settings,
)
from dydit.checkpoint import read_checkpoint
from dydit.checkpoint.files import file_sha256
from dydit.errors import DyditError
from dydit.flow import create_process
from dydit.io import save_text
from dydit.log import format_number as _fmt
from dydit.log import machine_description
from dydit.sample import calibrate_teacache

_log = logging.getLogger("frontier")


def family_name(config) -> str:
    """What a frontier row calls the dense model: its family (U-ViT, FLUX), else DiT or SiT."""
    family = getattr(config, "family", None)
    if isinstance(family, str):
        return family
    return "SiT" if getattr(config, "objective", "ddpm") == "flow" else "DiT"


def _ints(text: str) -> list[int]:
    values = sorted({int(v) for v in text.split(",") if v.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive step counts, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"lambda values must be in (0, 1], got {text!r}")
    return values


def _budgets(text: str) -> list[float]:
    values = sorted({float(v) for v in text.split(",") if v.strip()})
    if not values or values[0] <= 0:
        raise argparse.ArgumentTypeError(f"expected positive GMACs per image, got {text!r}")
    return values


def _caches(text: str) -> list[str]:
    from dydit.models.cache import CacheSettings

    specs = [v.strip() for v in text.split(",") if v.strip()]
    for spec in specs:
        try:
            CacheSettings.parse(spec)
        except Exception as e:  # noqa: BLE001 - argparse reports it
            raise argparse.ArgumentTypeError(str(e)) from None
    return specs


def _labelled(text: str) -> tuple[str, str]:
    label, sep, path = text.rpartition("=")
    if not sep or not label or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH to an existing DyDiT export, got {text!r}")
    return label, path


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=None, help="runs, samples and frontier.json go here (runs/frontier)")
    p.add_argument("--base", default=str(BASE_CHECKPOINT), help="the dense base DiT (.safetensors export)")
    p.add_argument("--dense-steps", type=_ints, default=_ints("3,4,5,6,8,10,14,20"),
                   help="sampler step counts of the dense frontier")  # fmt: skip
    p.add_argument("--dydit-steps", type=_ints, default=_ints("5,6,8,10,14,20"),
                   help="sampler step counts of every DyDiT")  # fmt: skip
    p.add_argument("--control-steps", type=_ints, default=_ints("5,10,20"),
                   help="sampler step counts of the static fine-tune control")  # fmt: skip
    p.add_argument("--lambdas", type=_floats, default=_floats("0.3,0.5,0.7,0.9"),
                   help="FLOPs targets to fine-tune with --recipe (empty string: none)")  # fmt: skip
    p.add_argument("--checkpoint", type=_labelled, action="append", default=[], metavar="LABEL=PATH",
                   help="an existing DyDiT export to put on the frontier (repeatable)")  # fmt: skip
    p.add_argument("--recipe", type=json.loads, default=SHIPPED_RECIPE, metavar="JSON",
                   help="DemoConfig fields of the fine-tunes (default: the shipped DyDiT's recipe, "
                   f"{json.dumps(SHIPPED_RECIPE)}; {{}}: the demo's live fine-tune)")  # fmt: skip
    p.add_argument("--no-control", action="store_true", help="skip the static fine-tune control")
    p.add_argument("--caches", type=_caches, default=[], metavar="SPEC,...",
                   help="step caches (METHOD:THRESHOLD, docs/METHOD.md §19) on the dense base and every "
                   "DyDiT: points of kinds dense+cache and dydit+cache")  # fmt: skip
    p.add_argument("--cache-steps", type=_ints, default=_ints("10,20"),
                   help="sampler step counts of the cache points")  # fmt: skip
    add_coefficient_options(p)
    p.add_argument("--num-samples", type=int, default=DemoConfig.num_samples, help="images per point")
    p.add_argument("--sampler", default=None, help=f"default: the base's own, else {DemoConfig.sampler}")
    p.add_argument("--seed", type=int, default=DemoConfig.seed,
                   help="seed set of every point: image i uses seed SEED·1000003 + i (fine-tunes: seed "
                   "SEED); one seed per run directory (the FID spread: a directory per seed)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--ref-limit", type=int, default=None,
                   help="reference images of the metrics (default: all; few: a path check)")  # fmt: skip
    p.add_argument("--no-inception", action="store_true",
                   help="no Inception FID, the classifier distance only (path checks)")  # fmt: skip
    p.add_argument(
        "--retime",
        action="store_true",
        help="only re-time every stored point (sampling, no FID) in one process, models "
        "interleaved, so the time plot compares points first measured under other loads",
    )
    p.add_argument("--budgets", type=_budgets, default=list(BUDGETS), metavar="GMACS,...",
                   help="compute budgets (GMACs / image) of the dense- vs DyDiT-based verdicts")  # fmt: skip
    p.add_argument("--include", action="append", default=[], metavar="JSON",
                   help="points of another frontier.json (same base, sampler, seed set and images per "
                   "point) to add to this run's, not sampled again; a point already here wins "
                   "(repeatable; e.g. docs/img/frontier.json: only the new points are sampled)")  # fmt: skip
    p.add_argument("--render", metavar="JSON",
                   help="only redraw the tables and plots of a frontier.json (no sampling), into its "
                   "folder unless --out-dir is given")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.render and args.include:
        raise DyditError("--include adds points to a run's frontier.json; --render draws one file")
    if args.render:
        path = Path(args.render)
        if not path.is_file():
            raise DyditError(f"no frontier.json at {path}")
        out = Path(args.out_dir) if args.out_dir is not None else path.parent
        out.mkdir(parents=True, exist_ok=True)
        render(json.loads(path.read_text()), out, args.budgets)
        return
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out_dir or "runs/frontier")
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.base)
    sampler = args.sampler or getattr(read_checkpoint(base)[1], "default_sampler", DemoConfig.sampler)
    cfg = DemoConfig(
        num_samples=args.num_samples, sampler=sampler, device=args.device, progress=False,
        ref_limit=args.ref_limit, inception=not args.no_inception, seed=args.seed,
    )  # fmt: skip
    recipe = replace(cfg, **args.recipe)
    tag = "-".join(f"{k}{v}" for k, v in sorted(args.recipe.items()))

    store = out / "frontier.json"
    result = json.loads(store.read_text()) if store.exists() else {"points": [], "seed": args.seed}
    if result.get("seed", DemoConfig.seed) != args.seed:  # stored points are matched without it
        raise DyditError(f"{store} holds points of seed {result.get('seed', DemoConfig.seed)}, not "
                         f"{args.seed}: give another --out-dir")  # fmt: skip
    for path in args.include:
        include_points(result, Path(path), base, args.seed)
    result.update(seed=args.seed, machine=machine_description(), torch=torch.__version__, base=str(base))
    if args.retime:
        retime(result, cfg, base, store)
        render(result, out, args.budgets)
        return

    dense_name = f"{family_name(read_checkpoint(base)[1])} (dense)"
    # Named by what it is, not by being shipped: points stored under "(shipped recipe)" are the 1200-step
    # recipe shipped until 2026-12-07, and a label must not change its meaning with a later recipe.
    recipe_name = (
        f"{recipe.finetune_steps}-step recipe" if args.recipe == SHIPPED_RECIPE else tag or "demo recipe"
    )
    lambda_labels = {lam: f"DyDiT λ={lam:g} ({recipe_name})" for lam in args.lambdas}
    labels = [dense_name, *lambda_labels.values(), *(label for label, _ in args.checkpoint)]
    coefficients = TeaCacheCoefficients.from_args(args, labels, out)  # checked before any work
    (out / "samples").mkdir(exist_ok=True)

    def teacache(name: str, model: torch.nn.Module, weights: Path) -> dict:
        """The polynomial record of ``name``'s TeaCache points (fitted first under ``auto``)."""
        mc, process = model.config, create_process(model.config)
        runs = [sampling_settings(replace(cfg, steps=n), process) for n in args.cache_steps]
        shape = (mc.in_channels, mc.input_size, mc.input_size)
        fit = partial(calibrate_teacache, model, process, shape=shape, num_classes=mc.num_classes,
                      device=args.device)  # fmt: skip
        return coefficients.resolve(name, runs, fit, weights=str(weights.resolve()))

    def run(label: str, kind: str, load, steps: list[int], cache: str | None = None, weights: Path = base,
            **extra) -> None:  # fmt: skip
        model, name, polynomial = None, label, {}
        if cache is not None:  # step caching around the model (docs/METHOD.md §19)
            label, kind, steps = f"{label} + {cache}", f"{kind}+cache", args.cache_steps
            extra = dict(extra, cache=cache)
        for n in steps:
            key = dict(zip(POINT_KEY, (label, n, cfg.num_samples, cfg.sampler)))
            stored = next((p for p in result["points"] if point_key(p) == tuple(key.values())), None)
            if stored is not None:
                if "recipe" in extra and stored.get("recipe", extra["recipe"]) != extra["recipe"]:
                    raise DyditError(  # the same label, fine-tuned otherwise: not this run's point
                        f"{store}: {label} at {n} steps was fine-tuned with the recipe "
                        f"{json.dumps(stored['recipe'])}, not this run's {json.dumps(extra['recipe'])}: "
                        "give another --out-dir"
                    )
                if cache is not None and is_teacache(cache) and "cache_polynomial" in stored:
                    model = model or load()  # a stored point of another polynomial is not this one
                    polynomial = polynomial or teacache(name, model, weights)
                    if stored["cache_polynomial"] != polynomial["cache_polynomial"]:
                        raise DyditError(
                            f"{store}: {label} at {n} steps was measured with the TeaCache polynomial of "
                            f"{stored.get('cache_coefficients')}, not this run's "
                            f"{polynomial['cache_coefficients']}: give that --cache-coefficients or another "
                            "--out-dir"
                        )
                continue
            model = model or load()
            if cache is not None and is_teacache(cache) and not polynomial:
                polynomial = teacache(name, model, weights)
            _log.info("%s at %d steps", label, n)
            point_cfg = replace(cfg, steps=n)
            fn = model
            if cache is not None:  # with the polynomial the point records (fbcache: none)
                fn = cached_model(model, cache, point_cfg, polynomial.get("cache_polynomial"))
            r = measure(label, fn, point_cfg, out / "samples" / f"{_slug(label)}-{n}.npz")
            stats = {} if cache is None else {
                "evaluations_computed": fn.stats.computed, "evaluations_reused": fn.stats.reused,
            }  # warm-up batch included  # fmt: skip
            result["points"].append(dict(
                **key, kind=kind, macs_per_image=r.macs_attn_mlp / r.images,
                seconds_per_image=r.seconds_per_image, date=time.strftime("%Y-%m-%d"), **extra, **polynomial,
                **stats, **r.metrics,
            ))  # fmt: skip
            save_text(store, json.dumps(result, indent=2) + "\n")  # after every point: nothing lost

    run(dense_name, "dense", lambda: load_dit(base, args.device), args.dense_steps)
    for spec in args.caches:
        run(dense_name, "dense", lambda: load_dit(base, args.device), args.dense_steps, cache=spec)
    if not args.no_control:
        ckpt = finetune(recipe, base, out / f"static{'-' + tag if tag else ''}", dynamic=False)
        run(f"control ({recipe.finetune_steps} steps)", "control", lambda: load_dit(ckpt, args.device),
            args.control_steps, recipe=args.recipe, checkpoint=str(ckpt))  # fmt: skip
    for lam in args.lambdas:
        ckpt = finetune(replace(recipe, target=lam), base, out / f"dydit-{lam:g}{'-' + tag if tag else ''}")
        for spec in [None, *args.caches]:
            run(lambda_labels[lam], "dydit", lambda c=ckpt: load_sliced_dydit(c, args.device),
                args.dydit_steps, cache=spec, weights=ckpt, target=lam, recipe=args.recipe,
                checkpoint=str(ckpt))  # fmt: skip
    for label, path in args.checkpoint:
        for spec in [None, *args.caches]:
            run(label, "dydit", lambda p=path: load_sliced_dydit(Path(p), args.device), args.dydit_steps,
                cache=spec, weights=Path(path), checkpoint=path)  # fmt: skip
    result["config"] = asdict(cfg)
    save_text(store, json.dumps(result, indent=2) + "\n")
    render(result, out, args.budgets)


# What makes two points the same measurement (a rerun or --include skips a point already stored).
POINT_KEY = ("label", "steps", "num_samples", "sampler")


def point_key(point: dict) -> tuple:
    return tuple(point.get(k) for k in POINT_KEY)


def include_points(result: dict, path: Path, base: Path, seed: int) -> None:
    """Add the points of the frontier.json at ``path`` (``--include``) that ``result`` lacks, each
    marked ``included_from`` (its first source, if it was included there too)."""
    if not path.is_file():
        raise DyditError(f"--include {path}: no such file")
    try:
        other = json.loads(path.read_text())
        points = other["points"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DyditError(f"--include {path}: not a frontier.json ({e})") from None
    if (theirs := other.get("seed", DemoConfig.seed)) != seed:
        raise DyditError(f"--include {path}: its points are of seed {theirs}, not {seed}")
    if Path(other.get("base", base)).name != base.name:
        raise DyditError(f"--include {path}: its points are of the base {other['base']}, not {base}")
    have = {point_key(p) for p in result["points"]}
    for p in points:
        if point_key(p) not in have:
            result["points"].append({**p, "included_from": p.get("included_from", str(path))})


def cached_model(
    model: torch.nn.Module, spec: str, cfg: DemoConfig, coefficients: str | Sequence[float] | None
):
    """``model`` with the step cache ``spec``, told the evaluation times of one sampling run (the demo's
    sampling wraps the model in a counter, so ``generate`` cannot start the cache's runs itself).
    ``coefficients``: TeaCache's polynomial or its file (None: the identity; fbcache ignores it)."""
    from dydit.models.cache import CacheSettings, cached

    settings = CacheSettings.parse(spec)
    process = create_process(model.config)
    sampling = sampling_settings(cfg, process)
    times = sampling.function.times(process, cfg.steps, **sampling.sampler_options())
    coeffs = coefficients if settings.method == "teacache" else None
    return cached(model, settings.method, settings.threshold, coeffs, times=times)


# TeaCache's polynomial per model ------------------------------------------------------------------
AUTO = "auto"


def is_teacache(spec: str) -> bool:
    """Whether the cache ``spec`` (METHOD:THRESHOLD) reads a polynomial (fbcache needs none)."""
    from dydit.models.cache import CacheSettings

    return CacheSettings.parse(spec).method == "teacache"


def add_coefficient_options(p: argparse.ArgumentParser) -> None:
    """``--cache-coefficients`` and ``--cache-calibration-samples`` (this script and t2i_frontier.py)."""
    from dydit.models.cache_settings import CALIBRATION_IMAGES

    p.add_argument("--cache-coefficients", action="append", default=None, metavar="auto|FILE|LABEL=FILE",
                   help="TeaCache's polynomial (docs/METHOD.md §19): auto (the default) fits each model on "
                   "its own trajectories with the run's sampling, kept as OUT_DIR/teacache-<label>.json and "
                   "reused on a rerun; FILE (dydit cache-calibrate) serves every model; LABEL=FILE one "
                   "model (a row's label without its cache), others the default (repeatable)")  # fmt: skip
    p.add_argument("--cache-calibration-samples", type=int, default=CALIBRATION_IMAGES, metavar="N",
                   help="images per step count of each auto fit (default %(default)s, as dydit "
                   "cache-calibrate)")  # fmt: skip


class TeaCacheCoefficients:
    """Which TeaCache polynomial each model of a run uses (``--cache-coefficients``).

    A model's trajectories set how far its first block's input moves per step, so one polynomial
    fitted on the dense DiT misjudges a DyDiT's; ``auto`` fits each model on its own. The values:
    at most one default for every model (``auto``, else a FILE), and ``LABEL=FILE`` for one model
    (a label of the run; a path that exists is a FILE even with an ``=`` in it). Given files are
    read at once, so a bad one fails before any sampling. Under ``auto`` a model's file is
    ``out/teacache-<slug>.json``: fitted once (:func:`~dydit.sample.calibrate_teacache`, the
    code of ``dydit cache-calibrate``), then reused while it records the same fit (sampling, images,
    weights); a file of another fit is an error, not silently reused nor overwritten.
    """

    def __init__(self, values: Sequence[str] | None, labels: Sequence[str], out: Path, samples: int):
        from dydit.models.cache import load_coefficients

        if samples < 1:
            raise DyditError(f"--cache-calibration-samples must be positive, got {samples}")
        self.out, self.samples = out, samples
        self.default: str | Path = AUTO
        self.files: dict[str, Path] = {}
        defaults = []
        for value in values or []:
            if value == AUTO or Path(value).is_file():
                defaults.append(value)
                self.default = value if value == AUTO else Path(value)
                continue
            label, sep, path = value.rpartition("=")
            if not sep or not label:
                raise DyditError(
                    f"--cache-coefficients {value!r}: no such file (give auto, FILE or LABEL=FILE)"
                )
            if label not in labels:
                known = ", ".join(repr(v) for v in labels)
                raise DyditError(f"--cache-coefficients {value!r}: no model {label!r} in this run ({known})")
            if not Path(path).is_file():
                raise DyditError(f"--cache-coefficients {value!r}: no such file {path}")
            self.files[label] = Path(path)
        if len(defaults) > 1:
            raise DyditError(
                f"--cache-coefficients takes one default (auto or FILE), got {', '.join(defaults)}"
            )
        for path in {*self.files.values(), *([self.default] if self.default != AUTO else [])}:
            load_coefficients(path)  # a bad file fails now, not after hours of sampling

    @classmethod
    def from_args(cls, args: argparse.Namespace, labels: Sequence[str], out: Path) -> TeaCacheCoefficients:
        """The run's choice; ``--cache-coefficients`` without a teacache in ``--caches`` is an error
        (fbcache reads no polynomial, and a recorded file would claim otherwise)."""
        if args.cache_coefficients and not any(is_teacache(spec) for spec in args.caches):
            raise DyditError("--cache-coefficients applies to teacache caches only; --caches has none")
        return cls(args.cache_coefficients, labels, out, args.cache_calibration_samples)

    def path(self, label: str) -> Path:
        """The polynomial file of model ``label`` (under ``auto``: where its fit is kept)."""
        chosen = self.files.get(label, self.default)
        return self.out / f"teacache-{_slug(label)}.json" if chosen == AUTO else Path(chosen)

    def resolve(self, label: str, runs: Sequence, calibrate: Callable[..., object], **meta) -> dict:
        """What a TeaCache point of model ``label`` records about its polynomial: ``cache_coefficients``
        (the file), ``cache_coefficients_sha256`` and ``cache_polynomial`` (the coefficients, highest
        power first). Under ``auto`` without a stored fit, ``calibrate(runs=..., out=..., seeds=...,
        **meta)`` fits it first on ``runs`` (the run's sampling at each cache step count)."""
        from dydit.models.cache import load_coefficients
        from dydit.sample import calibration_meta

        path = self.path(label)
        if label not in self.files and self.default == AUTO:
            want = {**calibration_meta(runs, self.samples), "label": label, **meta}
            if path.is_file():
                load_coefficients(path)  # a damaged file: a one-line error
                stored = json.loads(path.read_text())
                differ = [k for k, v in want.items() if stored.get(k) != v]
                if differ:
                    raise DyditError(
                        f"{path} holds a fit of other settings ({', '.join(differ)}): delete it to fit "
                        "again, or give it with --cache-coefficients FILE"
                    )
            else:
                _log.info("%s: fitting TeaCache's polynomial (%d images) into %s", label, self.samples, path)
                calibrate(runs=runs, out=path, seeds=list(range(self.samples)), label=label, **meta)
        return dict(
            cache_coefficients=str(path), cache_coefficients_sha256=file_sha256(path),
            cache_polynomial=list(load_coefficients(path)),
        )  # fmt: skip


def coefficient_notes(points: list[dict]) -> list[str]:
    """Lines naming the TeaCache polynomial of each teacache row (none recorded: the identity)."""
    used: dict[str, set[str]] = {}
    for p in points:
        if p.get("cache") and is_teacache(p["cache"]):
            path, sha = p.get("cache_coefficients"), p.get("cache_coefficients_sha256")
            source = (
                "the identity" if path is None else f"`{path}`" + (f" (sha256 {sha[:12]})" if sha else "")
            )
            used.setdefault(p["label"], set()).add(source)
    if not used:
        return []
    return ["", "TeaCache polynomials (docs/METHOD.md §19):", "",
            *(f"- {label}: {', '.join(sorted(s))}" for label, s in sorted(used.items()))]  # fmt: skip


def retime(result: dict, cfg: DemoConfig, base: Path, store: Path) -> None:
    """Re-measure ``seconds_per_image`` of every point: one process, step counts interleaved over models."""

    def load(p: dict) -> torch.nn.Module:
        if p["kind"] == "dense":
            return load_dit(base, cfg.device)
        if p["kind"] == "dydit":
            return load_sliced_dydit(Path(p["checkpoint"]), cfg.device)
        return load_dit(Path(p["checkpoint"]), cfg.device)

    models: dict[str, torch.nn.Module] = {}
    for p in result["points"]:
        if p["label"] not in models:
            models[p["label"]] = load({**p, "kind": p["kind"].removesuffix("+cache")})
    for p in sorted(result["points"], key=lambda p: (p["steps"], p["label"])):
        model = models[p["label"]]
        if p.get("cache"):  # the polynomial it recorded, else its file (points of before)
            coeffs = p.get("cache_polynomial", p.get("cache_coefficients"))
            model = cached_model(model, p["cache"], replace(cfg, steps=p["steps"]), coeffs)
        mc = model.config
        _log.info("re-timing %s at %d steps", p["label"], p["steps"])
        with torch.inference_mode():
            point_cfg = replace(cfg, steps=p["steps"], num_samples=p["num_samples"])
            shape = (mc.in_channels, mc.input_size, mc.input_size)
            _, _, r = sample_timed(p["label"], model, point_cfg, shape, mc.num_classes)
        p.update(
            seconds_per_image=r.seconds_per_image, timing=f"re-timed together {time.strftime('%Y-%m-%d')}"
        )
    result["retimed"] = machine_description(cfg.device)
    save_text(store, json.dumps(result, indent=2) + "\n")


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in label).strip("_")


# Equal-compute comparison -----------------------------------------------------------------------
WINNER = {
    "dydit": "DyDiT",
    "dydit+cache": "DyDiT + cache",
    "dense+cache": "dense + cache",
    "control": "control",
}
KIND_ORDER = {"dense": 0, "dense+cache": 1, "control": 2, "dydit": 3, "dydit+cache": 4}
# Issue 28's goal on the embedded DiT: the best DyDiT-based point on or below the best dense-based one
# at every budget from 0.5 to 1.9 GMACs per image.
BUDGETS = (0.5, 0.7, 0.9, 1.1, 1.3, 1.5, 1.7, 1.9)
SIDES = {"dense-based": ("dense", "dense+cache"), "DyDiT-based": ("dydit", "dydit+cache")}
ENVELOPE_COLOUR = {"dense": "0.3", "dense+cache": "tab:cyan", "control": "tab:olive", "dydit": "tab:pink",
                   "dydit+cache": "tab:brown"}  # fmt: skip


# The decimals each metric is shown with (tables, verdicts): a difference that rounds to zero there is
# "a tie", not a win for either side (e.g. a cache that reuses nothing, sampled with another thread
# count: its FID differs from the uncached one's in the fourth decimal). Other metrics: exact.
SHOWN_DECIMALS = {"FID": 1, "overall": 3}


def is_tie(difference: float, metric: str = "FID") -> bool:
    """Whether ``difference`` of ``metric`` is zero at the precision the tables show it with."""
    decimals = SHOWN_DECIMALS.get(metric)
    return difference == 0 if decimals is None else round(difference, decimals) == 0


def dense_frontier(points: list[dict], metric: str = "FID") -> tuple[np.ndarray, np.ndarray]:
    """(MACs per image, ``metric``) of the dense model's step curve, sorted by compute."""
    dense = sorted(
        (p for p in points if p["kind"] == "dense" and p.get(metric) is not None),
        key=lambda p: p["macs_per_image"],
    )
    return np.array([p["macs_per_image"] for p in dense]), np.array([p[metric] for p in dense])


def equal_compute(
    point: dict, points: list[dict], metric: str = "FID", higher_is_better: bool = False
) -> dict:
    """The dense frontier at ``point``'s compute: interpolated ``metric`` and the nearest-step dense point.

    The metric of the dense curve is interpolated linearly in MACs per image between the two measured
    step counts around the point (None outside the measured range). ``dense_steps`` is round(ρ·N),
    the step count of the dense model with the same compute, with its metric when it was measured.
    Keys are named after the metric (FID: ``frontier_fid``, ``dense_fid``, ``delta_fid``); the
    verdict compares the point with the interpolated curve, else with the dense point at round(ρ·N)
    (FID: lower is better; ``higher_is_better`` for scores such as GenEval's overall); a difference
    that is zero at the shown precision (:func:`is_tie`) is "a tie".
    """
    name = metric.lower()
    macs, values = dense_frontier(points, metric)
    dense_by_steps = {p["steps"]: p for p in points if p["kind"] == "dense"}
    out: dict = {}
    if len(macs) >= 2 and macs[0] <= point["macs_per_image"] <= macs[-1]:
        out[f"frontier_{name}"] = float(np.interp(point["macs_per_image"], macs, values))
    if dense_by_steps:
        per_step = min(dense_by_steps.values(), key=lambda p: p["steps"])
        per_step = per_step["macs_per_image"] / per_step["steps"]
        n = max(1, round(point["macs_per_image"] / per_step))
        out["dense_steps"] = n
        if n in dense_by_steps and dense_by_steps[n].get(metric) is not None:
            out[f"dense_{name}"] = dense_by_steps[n][metric]
    ref = out.get(f"frontier_{name}", out.get(f"dense_{name}"))
    if ref is not None and point.get(metric) is not None:
        value = point[metric]
        out[f"delta_{name}"] = value - ref
        better = value > ref if higher_is_better else value < ref
        out["verdict"] = (
            "a tie" if is_tie(value - ref, metric)
            else f"{WINNER.get(point['kind'], 'DyDiT')} wins" if better
            else "fewer dense steps win"
        )  # fmt: skip
    return out


def lower_envelope(points: list[dict], metric: str = "FID", key: str = "macs_per_image") -> list[dict]:
    """The points that beat every cheaper one, by ``key``: the steps of the running minimum of ``metric``.

    What the cheapest run reaching each quality is, so a method is judged by its best setting at a
    compute (more steps or a looser cache can be worse, and a user would not pick them). ``metric``
    strictly decreases along it: of two points with the same value the cheaper one is kept, as the
    dearer buys nothing. Points without ``metric`` are left out. Lower is better (FID).
    """
    envelope: list[dict] = []
    for p in sorted((p for p in points if p.get(metric) is not None), key=lambda p: (p[key], p[metric])):
        if not envelope or p[metric] < envelope[-1][metric]:
            envelope.append(p)
    return envelope


def budget_verdicts(points: list[dict], budgets=BUDGETS, metric: str = "FID") -> list[dict]:
    """Per compute budget (GMACs per image), the best dense-based point against the best DyDiT-based one.

    A user with a budget takes the best run that fits it, whatever the method's knob (steps, cache
    threshold, λ), so each side is its lower envelope read at the budget: dense-based are the kinds
    ``dense`` and ``dense+cache`` (free to use on the base), DyDiT-based ``dydit`` and ``dydit+cache``.
    The static ``control`` is neither: it is a fine-tune without routers, there to tell the
    fine-tuning's share of a DyDiT's change from the routing's, not an option offered to users; it
    is read at the budget beside them (``control``: its best point within the budget or None, and
    ``control_gap``: DyDiT-based minus it, None without both), so that a DyDiT-based win can be told
    apart from one the extra training alone would have brought.

    Each row: ``budget`` (GMACs), ``best`` (per kind of the four, its best point within the budget or
    None), ``best_kind`` (the best of the four; on equal ``metric`` the cheaper point's), the two
    sides' best points (keys ``dense-based`` and ``DyDiT-based``, None when none fits), ``gap``
    (DyDiT-based minus dense-based ``metric``: negative when DyDiT wins, None without both) and
    ``verdict`` in words. Lower ``metric`` is better.
    """
    kinds = (*SIDES["dense-based"], *SIDES["DyDiT-based"])
    groups = {**{k: (k,) for k in kinds}, **SIDES, "all": kinds, "control": ("control",)}
    envelopes = {
        g: lower_envelope([p for p in points if p["kind"] in ks], metric) for g, ks in groups.items()
    }
    rows = []
    for budget in budgets:
        if not budget > 0:
            raise DyditError(f"compute budgets are positive GMACs per image, got {budget!r}")
        at = {g: next((p for p in reversed(e) if p["macs_per_image"] <= budget * 1e9), None)
              for g, e in envelopes.items()}  # fmt: skip
        row: dict = dict(budget=budget, best={k: at[k] for k in kinds}, gap=None, control=at["control"])
        row.update(best_kind=at["all"] and at["all"]["kind"], **{side: at[side] for side in SIDES})
        dense, dydit = row["dense-based"], row["DyDiT-based"]
        row["control_gap"] = None if dydit is None or at["control"] is None else (
            dydit[metric] - at["control"][metric]
        )  # fmt: skip
        if dense is None or dydit is None:
            row["verdict"] = (
                "no point within budget" if dense is dydit
                else "no DyDiT point within budget" if dydit is None
                else "no dense point within budget"
            )  # fmt: skip
        else:
            row["gap"] = gap = dydit[metric] - dense[metric]
            row["verdict"] = (
                "a tie" if is_tie(gap, metric)
                else f"DyDiT-based wins by {-gap:.1f} {metric}" if gap < 0
                else f"dense-based wins by {gap:.1f} {metric}"
            )  # fmt: skip
        rows.append(row)
    return rows


def render(result: dict, out: Path, budgets=BUDGETS) -> None:
    """Write ``frontier.md`` (the points, then the verdict per compute budget) and the two plots for
    ``result`` and print the tables. Reads the stored points only: nothing is sampled or measured."""
    points = result["points"]
    for p in points:
        if p["kind"] != "dense":
            p.update(equal_compute(p, points))
    table = _markdown(points, result) + "\n" + _budget_markdown(budget_verdicts(points, budgets))
    save_text(out / "frontier.md", table)
    _plot(points, "macs_per_image", 1e-9, "attention + MLP GMACs per image (whole sampling run)",
          out / "frontier_macs.png")  # fmt: skip
    _plot(points, "seconds_per_image", 1e3, "sampling ms per image (same process, same machine)",
          out / "frontier_time.png")  # fmt: skip
    _budget_plot(points, budgets, out / "frontier_budgets.png")
    print(table)


def _markdown(points: list[dict], result: dict) -> str:
    lines = [
        f"Machine: {result.get('machine', '?')}, torch {result.get('torch', '?')}.",
        "",
        "| model | steps | evaluations computed / reused | GMACs / image | ms / image | FID "
        "| FD-FMNIST-classifier | dense at equal compute: steps, FID (interpolated) | ΔFID | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for p in sorted(points, key=lambda p: (KIND_ORDER.get(p["kind"], 9), p["label"], p["steps"])):
        eq = "–"
        if p["kind"] != "dense":
            dense_fid, frontier = (
                _fmt(p.get("dense_fid"), ".1f"),
                _fmt(p.get("frontier_fid"), ".1f"),
            )
            eq = f"{p.get('dense_steps', '–')}, {dense_fid} ({frontier})"
        lines.append(
            f"| {p['label']} | {p['steps']} | {_evaluations(p)} | {p['macs_per_image'] / 1e9:.3f} | "
            f"{1e3 * p['seconds_per_image']:.1f} | {_fmt(p.get('FID'), '.1f')} | "
            f"{_fmt(p.get('FD-FMNIST-classifier'), '.1f')} | {eq} | {_fmt(p.get('delta_fid'), '+.1f')} | "
            f"{p.get('verdict', '–') if p['kind'] not in ('dense', 'control') else '–'} |"
        )
    return "\n".join(lines + coefficient_notes(points)) + "\n"


def _evaluations(point: dict) -> str:
    """A cache point's network evaluations computed / reused over its run (warm-up batch included)."""
    if point.get("evaluations_computed") is None:
        return "–"
    return f"{point['evaluations_computed']} / {point.get('evaluations_reused', 0)}"


def _budget_markdown(rows: list[dict], metric: str = "FID") -> str:
    def cell(p: dict | None) -> str:
        if p is None:
            return "–"
        return f"{p['label']}, {p['steps']} steps, {p['macs_per_image'] / 1e9:.3f} GMACs: {p[metric]:.1f}"

    controlled = any(r["control"] is not None for r in rows)
    lines = [
        f"Best point within each compute budget ({metric}, lower is better): dense-based = dense or "
        "dense + cache, DyDiT-based = DyDiT or DyDiT + cache (the static control is neither). "
        f"Δ{metric} = DyDiT-based minus dense-based: negative when DyDiT-based wins, else what it misses by.",
        "",
        f"| budget (GMACs / image) | best dense-based | best DyDiT-based | Δ{metric} | verdict | best kind |",
        "|---:|---|---|---:|---|---|",
    ]
    if controlled:  # the static fine-tune beside them: what the extra training alone brings
        lines[0] += (
            " Δ vs control = DyDiT-based minus the static control's best point within the budget (the "
            "base fine-tuned without routers): negative where routing beats the extra training alone."
        )
        lines[2] += " best static control | Δ vs control |"
        lines[3] += "---|---:|"
    for r in rows:
        lines.append(
            f"| ≤ {r['budget']:g} | {cell(r['dense-based'])} | {cell(r['DyDiT-based'])} | "
            f"{_fmt(r['gap'], '+.1f')} | {r['verdict']} | {r['best_kind'] or '–'} |"
        )
        if controlled:
            lines[-1] += f" {cell(r['control'])} | {_fmt(r['control_gap'], '+.1f')} |"
    met = sum(r["gap"] is not None and r["gap"] <= 0 for r in rows)
    lines += ["", f"DyDiT-based on or below dense-based at {met} of {len(rows)} budgets."]
    if controlled:
        gaps = [r["control_gap"] for r in rows]
        beaten = sum(g is not None and g <= 0 for g in gaps)
        lines[-1] += (
            f" On or below the static control at {beaten} of {sum(g is not None for g in gaps)} budgets "
            "with both."
        )
    return "\n".join(lines) + "\n"


def _plot(points: list[dict], key: str, scale: float, xlabel: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    kinds = sorted({p["kind"] for p in points}, key=lambda k: KIND_ORDER.get(k, 9))
    for kind in kinds:
        envelope = lower_envelope([p for p in points if p["kind"] == kind], key=key)
        if not envelope:
            continue  # the best so far, held to the dearest point of the kind (a step line, under the rest)
        last = max(p[key] for p in points if p["kind"] == kind and "FID" in p)
        xs, ys = [p[key] * scale for p in envelope] + [last * scale], [p["FID"] for p in envelope]
        ax.step(xs, [*ys, ys[-1]], where="post", color=ENVELOPE_COLOUR.get(kind, "tab:gray"), lw=5,
                alpha=0.3, zorder=0, label=f"{kind}: lower envelope (best so far)")  # fmt: skip
    labels = sorted({p["label"] for p in points}, key=lambda s: (not s.endswith("(dense)"), s))
    for label in labels:
        curve = sorted((p for p in points if p["label"] == label and "FID" in p), key=lambda p: p[key])
        if not curve:
            continue
        dense = curve[0]["kind"] == "dense"
        xs, ys = [p[key] * scale for p in curve], [p["FID"] for p in curve]
        ax.plot(xs, ys, "k-s" if dense else "o--", lw=2 if dense else 1, ms=4,
                label=f"{label}: the frontier (fewer steps)" if dense else label)  # fmt: skip
        for p, x, y in zip(curve, xs, ys):
            ax.annotate(str(p["steps"]), (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FID (lower is better)")
    sampler = points[0].get("sampler", "") if points else ""
    ax.set_title(f"Fashion-MNIST, {sampler}: DyDiT vs fewer dense steps (numbers: sampler steps)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _budget_plot(points: list[dict], budgets, path: Path, metric: str = "FID") -> None:
    """The verdict per budget as a picture, read on a fine grid over the range of ``budgets`` (the
    table's budgets marked): above, each side's best ``metric`` within the budget (log scale); below,
    their gap (DyDiT-based minus dense-based, symmetric-log scale: small gaps stay readable beside
    large ones), shaded where DyDiT-based is on or below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = np.linspace(min(budgets), max(budgets), 400)
    rows = budget_verdicts(points, grid, metric)
    fig = Figure(figsize=(6, 5.2))
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    best = {}
    for side, colour in (("dense-based", "0.2"), ("DyDiT-based", "tab:red")):
        best[side] = np.array([r[side][metric] if r[side] is not None else np.nan for r in rows])
        kinds = " or ".join(k.replace("dydit", "DyDiT") for k in SIDES[side])
        top.plot(grid, best[side], color=colour, lw=2, drawstyle="steps-post", label=f"best {side} ({kinds})")
    gap = best["DyDiT-based"] - best["dense-based"]
    bottom.plot(grid, gap, color="tab:red", lw=2, drawstyle="steps-post", label="DyDiT-based − dense-based")
    spanned = gap  # what the ticks must cover
    if any(r["control"] is not None for r in rows):
        control = np.array([r["control"][metric] if r["control"] is not None else np.nan for r in rows])
        control_gap = np.array([np.nan if r["control_gap"] is None else r["control_gap"] for r in rows])
        top.plot(grid, control, color=ENVELOPE_COLOUR["control"], lw=1.5, ls="--", drawstyle="steps-post",
                 label="best static control (fine-tuned, no routers)")  # fmt: skip
        bottom.plot(grid, control_gap, color=ENVELOPE_COLOUR["control"], lw=1.5, ls="--",
                    drawstyle="steps-post", label="DyDiT-based − static control")  # fmt: skip
        spanned = np.concatenate([gap, control_gap])
    bottom.axhline(0, color="0.2", lw=0.8)
    bottom.fill_between(grid, 0, 1, where=gap <= 0, transform=bottom.get_xaxis_transform(), color="tab:red",
                        alpha=0.08, step="post", label="DyDiT-based on or below")  # fmt: skip
    if np.isfinite(best["dense-based"]).any() or np.isfinite(best["DyDiT-based"]).any():
        top.set_yscale("log")
    bottom.set_yscale("symlog", linthresh=3)
    finite = spanned[np.isfinite(spanned)]
    if finite.size:
        span = (min(finite.min(), -1), max(finite.max(), 1))
        ticks = [
            t
            for t in (-300, -100, -30, -10, -3, 0, 3, 10, 30, 100, 300)
            if span[0] * 1.5 <= t <= span[1] * 1.5
        ]
        bottom.set_yticks(ticks, [f"{t:+d}" if t else "0" for t in ticks])
    for ax in (top, bottom):
        for b in budgets:
            ax.axvline(b, color="0.8", lw=0.6, zorder=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    top.set_ylabel(f"best {metric} within budget")
    bottom.set_ylabel(f"Δ{metric}: DyDiT − dense")
    bottom.set_xlabel("compute budget: attention + MLP GMACs per image")
    top.set_title("The verdict per compute budget (lower is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    try:
        main()
    except DyditError as e:
        sys.exit(f"error: {e}")
