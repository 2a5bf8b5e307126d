"""``dydit demo t2i``: text-to-image on captioned compositions, dense FLUX vs its DyDiT (docs/METHOD.md §17).

:func:`run_t2i_demo`:

1. loads the shipped text-to-image FLUX (``assets/flux-t2i-fmnist.safetensors``, trained here by
   ``dydit train --model FLUX-t2i --data fmnist-compose``; ``assets/README.md``) and its DyDiT
   (``assets/dyflux-t2i-fmnist-0.5.safetensors``, width + token routing at λ = 0.5);
2. for the held-in and the held-out prompt sets (:func:`~dydit.data.compose_grammar.evaluation_prompts`)
   samples the same prompts and seeds from the dense model, the DyDiT (sliced engine) and the dense
   model at the DyDiT's measured compute (fewer Euler steps), counting the multiply-accumulates
   really performed; the default recipe (sampler, steps, guidance) is the model's own (its config);
3. scores every set with the GenEval-style scorer (:mod:`dydit.evaluate.geneval`: per category and
   overall), the per-cell Fréchet distance to real compositions of the same prompts and (``fid``)
   the whole-canvas Inception FID against those real compositions;
4. draws the sample grids and the DyDiT's token-skip overlay, and writes ``report.md`` and
   ``results.json`` (:mod:`dydit.apps.demo_t2i_report`).

``fast=True`` (``--fast``) runs the same path on tiny counts; without shipped weights it uses an
untrained ``FLUX-t2i-tiny`` and a DyDiT of it with random routers (a smoke run: scores near zero).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dydit.checkpoint import load_model
from dydit.errors import DyditError
from dydit.flops.counter import count_flops
from dydit.flow import create_process
from dydit.io import locked_dir, save_text
from dydit.models.dydit import DyDiT, execution
from dydit.sample import SamplingSettings, sample_images

_log = logging.getLogger("dydit.apps.demo_t2i")

ASSETS = Path(__file__).resolve().parents[1] / "assets"
T2I_CHECKPOINT = ASSETS / "flux-t2i-fmnist.safetensors"
T2I_DYDIT = ASSETS / "dyflux-t2i-fmnist-0.5.safetensors"
SPLITS = ("train", "held-out")  # held-in prompts (training captions may contain them) and held-out ones


@dataclass(frozen=True)
class T2IDemoConfig:
    """Settings of one text-to-image demo run; ``steps`` / ``cfg_scale`` None: the model's recipe."""

    out_dir: str = "runs/demo-t2i"
    checkpoint: str | None = None  # None: the shipped dense model
    dydit_checkpoint: str | None = None  # None: the shipped DyDiT
    per_category: int = 10
    steps: int | None = None
    cfg_scale: float | None = None
    sample_batch: int = 60
    seed: int = 0
    fd_cells: bool = True
    fid: bool = True  # Inception FID against real compositions of the same prompts
    device: str = "cpu"
    progress: bool = True
    fast: bool = False

    def __post_init__(self) -> None:
        for name in ("per_category", "sample_batch"):
            if getattr(self, name) <= 0:
                raise DyditError(f"{name} must be positive, got {getattr(self, name)}")
        if self.steps is not None and self.steps <= 0:
            raise DyditError(f"steps must be positive, got {self.steps}")
        if self.cfg_scale is not None and self.cfg_scale < 0:
            raise DyditError(f"guidance scale must be >= 0, got {self.cfg_scale}")

    @classmethod
    def smoke(cls, **overrides: Any) -> T2IDemoConfig:
        """The ``--fast`` settings: one prompt per category and split, three steps."""
        return cls(**{**dict(per_category=1, steps=3, sample_batch=12, fid=False, fast=True), **overrides})


# The models ----------------------------------------------------------------------------------------
def untrained_t2i(seed: int = 0) -> torch.nn.Module:
    """``FLUX-t2i-tiny`` with the grammar's vocabulary and random weights (no block is the identity)."""
    from dydit.data.compose_grammar import tokenizer
    from dydit.factory import build_model
    from dydit.presets import get_model_config

    cfg = get_model_config("FLUX-t2i-tiny")
    tok = tokenizer()
    cfg = cfg.replace(
        text_encoder={**cfg.text_encoder, "vocab": list(tok.words), "max_length": tok.max_length}
    )
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def random_routers(model: DyDiT, seed: int = 0) -> DyDiT:
    """Random width and token routers (zero biases: about half of every kind switched off)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            routers = [block.attn_rate.router, block.mlp_rate.router] if model.width_routing else []
            for lin in (*routers, block.token_selection.linear_t, block.token_selection.router):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5)
                lin.bias.zero_()
    return model


def check_dense_t2i(model: torch.nn.Module, source: str) -> torch.nn.Module:
    """``model`` when it is a dense text-to-image model with its own text encoder, else a DyditError."""
    if getattr(model.config, "text_encoder", None) is None or model.config.dynamic:
        raise DyditError(f"{source} is not a dense text-to-image model with its own text encoder")
    return model


def load_t2i_dydit(path: str | Path) -> DyDiT:
    """The DyDiT of a text-to-image export, in eval mode and sliced execution."""
    model = load_model(path).eval()
    if not isinstance(model, DyDiT):
        raise DyditError(f"{path} is not a DyDiT")
    model.execution = "sliced"
    return model


def load_models(cfg: T2IDemoConfig) -> tuple[torch.nn.Module, DyDiT, dict[str, str]]:
    """(dense model, DyDiT in sliced execution, where each came from)."""
    dense_path = Path(cfg.checkpoint) if cfg.checkpoint else T2I_CHECKPOINT
    dydit_path = Path(cfg.dydit_checkpoint) if cfg.dydit_checkpoint else T2I_DYDIT
    for given, path in ((cfg.checkpoint, dense_path), (cfg.dydit_checkpoint, dydit_path)):
        if given and not path.is_file():
            raise DyditError(f"checkpoint not found: {path}")
    if dense_path.is_file():
        dense, dense_src = load_model(dense_path).eval(), str(dense_path)
    elif cfg.fast:
        dense, dense_src = untrained_t2i(cfg.seed), "untrained FLUX-t2i-tiny (smoke run)"
    else:
        raise DyditError(
            f"no text-to-image model at {dense_path}: give --checkpoint (a `dydit train --model FLUX-t2i` "
            "export), or --fast for a smoke run"
        )
    check_dense_t2i(dense, dense_src)
    if dydit_path.is_file():
        dydit, dydit_src = load_t2i_dydit(dydit_path), str(dydit_path)
    elif cfg.fast or cfg.checkpoint:
        dydit = random_routers(DyDiT.from_dit(dense), cfg.seed).eval()
        dydit_src = "the dense model with random routers (no fine-tuned DyDiT given)"
    else:
        raise DyditError(f"no DyDiT at {dydit_path}: give --dydit-checkpoint")
    dydit.execution = "sliced"
    return dense.to(cfg.device), dydit.to(cfg.device), {"dense": dense_src, "dydit": dydit_src}


# Sampling and scoring -------------------------------------------------------------------------------
def recipe(cfg: T2IDemoConfig, mc: Any) -> SamplingSettings:
    """The model's own sampler, steps and guidance, unless the demo's settings name others."""
    steps = cfg.steps if cfg.steps is not None else mc.recipe_steps
    scale = cfg.cfg_scale if cfg.cfg_scale is not None else mc.recipe_guidance
    return SamplingSettings(sampler=mc.recipe_sampler, steps=steps, cfg_scale=scale)


def sample_prompts(
    model: torch.nn.Module, prompts: list[str], settings: SamplingSettings, cfg: T2IDemoConfig
) -> tuple[np.ndarray, dict[str, float]]:
    """uint8 images (N, 64, 64, 3) of ``prompts`` (seeds ``seed·1000003 + i``) and what they cost:
    seconds, attention+MLP MACs per image and all MACs per image, timed and counted after an
    untimed warm-up pass over the first batch (as the DiT demo's ``sample_timed``). ``model`` may
    be a step cache (:func:`dydit.models.cache.cached`) around the model; its ``stats`` then count
    the timed run only."""
    from dydit.data.codec import PixelCodec
    from dydit.models.cache import StepCache

    mc = model.config
    net = model.model if isinstance(model, StepCache) else model
    condition = net.text_encoder.tokenizer(prompts)
    seeds = [cfg.seed * 1_000_003 + i for i in range(len(prompts))]

    def run(count: int, progress: bool) -> np.ndarray:
        images, _ = sample_images(
            model, create_process(mc), settings, PixelCodec(), seeds=seeds[:count],
            shape=(mc.latent_channels, mc.sample_size, mc.sample_size),
            condition=condition.select(list(range(count))), batch_size=cfg.sample_batch,
            device=cfg.device, progress=progress,
        )  # fmt: skip
        return images

    # Warm-up, untimed, uncounted and outside a cache's stats: the first batch once through the whole
    # sampling path at the timed run's batch size and steps (first-call allocations, kernel selection,
    # the sliced engine's per-step plans). Without it the first model timed paid these. Every image
    # draws its noise from its own seed's generator, so the timed run's images are unchanged.
    stats = replace(model.stats) if isinstance(model, StepCache) else None
    with torch.inference_mode():
        run(min(cfg.sample_batch, len(prompts)), progress=False)
    if stats is not None:
        model.stats = stats
    with count_flops() as fc, torch.inference_mode():
        start = time.perf_counter()
        images = run(len(prompts), progress=cfg.progress)
        seconds = time.perf_counter() - start
    core = fc.by_component.get("attention", 0) + fc.by_component.get("mlp", 0)
    n = len(prompts)
    return images, {"seconds": seconds, "macs_attn_mlp": core / n, "macs_total": fc.total / n}


def score_images(images: np.ndarray, prompts: list[str], classifier: Any, cfg: T2IDemoConfig) -> dict:
    """GenEval-style accuracy per category and overall, and FD-cells against real compositions."""
    from dydit.data.compose import load_item_pool, real_compositions
    from dydit.data.compose_grammar import parse_caption
    from dydit.evaluate.geneval import cell_frechet_distance, read_cells, score

    readout = read_cells(images, classifier)
    report = score(prompts, readout)
    out = {"overall": report.overall, "accuracy": report.accuracy}
    if cfg.fd_cells:
        real, _ = real_compositions([parse_caption(p) for p in prompts], *load_item_pool(split="test"))
        try:
            out["FD-cells"] = cell_frechet_distance(readout, read_cells(real, classifier))
        except DyditError:  # too few occupied cells (black images): no distance
            out["FD-cells"] = None
    return out


def inception_fid(images: np.ndarray, real: Path, work: Path, cfg: T2IDemoConfig) -> float:
    """Whole-canvas Inception FID of ``images`` against the real compositions in ``real`` (.npz)."""
    from dydit.evaluate.images import write_npz
    from dydit.evaluate.run import evaluate

    write_npz(work, images, np.zeros(len(images), dtype=np.int64))
    report = evaluate(
        work, real, metrics=("fid",), classifier="none", cache_refs=False, device=cfg.device,
        progress=cfg.progress,
    )  # fmt: skip
    return float(report.metrics["FID"])


def token_overlay(
    model: DyDiT, images: np.ndarray, prompts: list[str], settings: SamplingSettings, path: Path
):
    """The DyDiT's token decisions on its own samples noised to the middle step of its grid."""
    from dydit.viz import token_keep_overlay

    mc = model.config
    process = create_process(mc)
    times = settings.network_times(process)
    sigma = float(times[len(times) // 2])  # the network's time (FLUX: sigma, 1 = noise)
    n = min(16, len(images))
    x0 = torch.from_numpy(images[:n]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(model.device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(x0.device)
    t = torch.full((n,), 1.0 - sigma, device=x0.device)  # dydit's flow time
    with execution(model, "masked"), torch.no_grad():
        _, stats = model.forward_with_routing(
            process.q_sample(x0, t, noise),
            process.original_timesteps(t),
            model.text_encoder.tokenizer(prompts[:n]),
        )
    token_keep_overlay(
        images[:n], stats.tokens.float().cpu(), title=f"tokens kept at sigma={sigma:.2f}", path=path
    )
    return float(stats.tokens.float().mean())


# The run --------------------------------------------------------------------------------------------
def run_t2i_demo(cfg: T2IDemoConfig) -> Path:
    """Run the demo; returns the path of ``report.md`` (``cfg.out_dir`` is locked while it runs)."""
    dense, dydit, sources = load_models(cfg)
    with locked_dir(cfg.out_dir) as out:
        return _run(cfg, dense, dydit, sources, out)


def _run(cfg: T2IDemoConfig, dense, dydit: DyDiT, sources: dict[str, str], out: Path) -> Path:
    from dydit.apps.demo_t2i_report import report_markdown
    from dydit.data.compose_grammar import evaluation_prompts
    from dydit.evaluate.classifier import load_classifier
    from dydit.evaluate.extract import default_cache_dir
    from dydit.log import machine_description
    from dydit.sample_io import save_grid

    t_start = time.perf_counter()
    settings = recipe(cfg, dense.config)
    classifier = load_classifier(default_cache_dir(), cfg.device, cfg.progress)
    rows: list[dict[str, Any]] = []
    n_eq = None
    for split in SPLITS:
        prompts = [p.text for p in evaluation_prompts(split, cfg.per_category, cfg.seed)]
        real = out / f"real_{split}.npz"
        if cfg.fid:
            from dydit.data.compose import load_item_pool, real_compositions
            from dydit.data.compose_grammar import parse_caption
            from dydit.evaluate.images import write_npz

            images, _ = real_compositions([parse_caption(p) for p in prompts], *load_item_pool(split="test"))
            write_npz(real, images, np.zeros(len(images), dtype=np.int64))
        _log.info(
            "[%s] sampling %d prompts: dense, DyDiT (sliced), dense at equal compute", split, len(prompts)
        )
        img_dense, cost_dense = sample_prompts(dense, prompts, settings, cfg)
        img_dy, cost_dy = sample_prompts(dydit, prompts, settings, cfg)
        rho = cost_dy["macs_attn_mlp"] / max(1.0, cost_dense["macs_attn_mlp"])
        n_eq = max(1, round(rho * settings.steps))
        eq_settings = replace(settings, steps=n_eq)
        img_eq, cost_eq = sample_prompts(dense, prompts, eq_settings, cfg)
        runs = (
            ("dense", f"FLUX (dense), {settings.steps} steps", settings, img_dense, cost_dense),
            ("dydit", f"DyDiT (sliced), {settings.steps} steps", settings, img_dy, cost_dy),
            ("dense_equal", f"FLUX (dense), {n_eq} steps: equal compute", eq_settings, img_eq, cost_eq),
        )
        for role, name, s, images, cost in runs:
            scores = score_images(images, prompts, classifier, cfg)
            if cfg.fid:
                scores["FID"] = inception_fid(images, real, out / f"samples_{split}_{role}.npz", cfg)
            rows.append({"split": split, "role": role, "name": name, "steps": s.steps, **cost, **scores})
            if split == SPLITS[0]:
                save_grid(out / f"grid_{role}.png", images[:24])
        if split == SPLITS[0]:
            kept = token_overlay(dydit, img_dy, prompts, settings, out / "token_keep.png")
    results = {
        "sources": sources,
        "recipe": settings.to_dict(),
        "cfg_scale": settings.cfg_scale,
        "equal_compute_steps": n_eq,
        "token_keep_mid": kept,
        "rows": rows,
        "seconds": time.perf_counter() - t_start,
        "machine": machine_description(cfg.device),
        "fast": cfg.fast,
    }
    save_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    report = out / "report.md"
    save_text(report, report_markdown(results))
    return report
