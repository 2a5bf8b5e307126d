"""Inference-speed benchmark: dense DiT, masked DyDiT and sliced DyDiT side by side (docs/METHOD.md §7.4, §8).

One run builds every model from the same weights, feeds them the same inputs and times them
interleaved (repeat r of every mode before repeat r+1 of any), so load changes hit all modes alike.
Each measurement is a :class:`BenchRow`: milliseconds per network forward (the mean over a few
timesteps, whose width plans differ) and, optionally, full-sampler seconds per image (DDIM with
classifier-free guidance, both halves in one pass). ρ is the realised attention+MLP FLOPs ratio
(§5.3) counted on the sliced path; speed-up is against the dense DiT with the same compile setting,
and efficiency = speed-up·ρ (1.0 would be the ideal of §8). The sliced modes are
:func:`dydit.models.sliced.engine` with the configured options; their sampler rows give
``pack_memory_ratio`` (the packs that run built over the blocks' attention+MLP weight bytes).
Routers come from a DyDiT checkpoint or, without trained routers, from
:func:`dydit.models.calibrate.calibrate_routers` at a target ρ. A FLUX preset (``--model
FLUX-bench``; docs/METHOD.md §15.5) is timed the same way on the backbone's example inputs, at the
flow times t/1000 of the configured timesteps, without CFG rows and without sampler rows.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dydit.checkpoint import has_routers, load_model, open_checkpoint
from dydit.diffusion import create_diffusion, guided, sample_ddim
from dydit.errors import DyditError
from dydit.factory import build_model, create_model
from dydit.flops.counter import count_flops
from dydit.log import device_name
from dydit.models.calibrate import Calibration, calibrate_routers, fractions_for_rho
from dydit.models.dit import DiT
from dydit.models.dydit import DyDiT
from dydit.models.sliced import DEFAULT_PACK_BUDGET, SlicedDyDiT, engine
from dydit.presets import DYFLUX_NAMES, ModelConfig, dit_name, is_flux_name, preset_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("dense", "dense-compiled", "masked", "sliced", "sliced-compiled")
DEFAULT_MODES = ("dense", "masked", "sliced")
DEFAULT_MODEL = "DiT-S/2"  # the preset of random weights when none is named


@dataclass(frozen=True)
class BenchConfig:
    """What to time. ``batches`` count images; with ``cfg_scale`` != 1 the network sees 2x rows."""

    model: str | None = None  # preset of random weights (default DEFAULT_MODEL), or of a checkpoint
    checkpoint: str | None = None  # that cannot say; rows are labelled with the model actually loaded
    batches: tuple[int, ...] = (16,)
    dtype: str = "float32"
    device: str = "cpu"
    modes: tuple[str, ...] = DEFAULT_MODES
    rho: float = 0.5  # calibration target when the routers are not trained
    token_keep: float = 0.75  # fraction of tokens the calibrated token routers keep
    timesteps: tuple[int, ...] = (999, 749, 499, 249)  # the forward timing cycles through these
    repeats: int = 5
    warmup: int = 1
    sampler_steps: int = 0  # 0: no full-sampler timing
    cfg_scale: float = 1.5
    seed: int = 0
    compile_mode: str | None = None
    token_bucket: int | None = None
    pack_budget: float | None = DEFAULT_PACK_BUDGET  # held packs <= this x attention+MLP weight bytes
    input_size: int | None = None  # latent size override (default: the preset's)
    overrides: dict = field(default_factory=dict)  # other ModelConfig fields (tiny models in tests)
    stat: str = "median"  # statistic of the repeats behind ms_per_forward: "median" or "min"

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise DyditError(f"unknown bench mode(s) {bad}; valid: {', '.join(MODES)}")
        if self.dtype not in DTYPES:
            raise DyditError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.batches or min(self.batches) < 1:
            raise DyditError("batch sizes must be positive")
        if not self.timesteps or not all(0 <= t < 1000 for t in self.timesteps):
            raise DyditError("bench timesteps must lie in [0, 1000)")
        if self.stat not in ("median", "min"):
            raise DyditError(f"stat must be 'median' or 'min', got {self.stat!r}")
        if self.pack_budget is not None and not self.pack_budget >= 0:
            raise DyditError(f"pack budget must be >= 0, got {self.pack_budget}")
        if self.repeats < 1 or self.warmup < 0 or self.sampler_steps < 0:
            raise DyditError("repeats must be >= 1, warmup and sampler steps >= 0")


@dataclass
class BenchRow:
    """One measurement; ``to_dict`` is what ``--json`` writes."""

    mode: str
    model: str
    batch: int  # images
    rows: int  # network batch (2x batch with CFG)
    dtype: str
    device: str
    measurement: str  # "forward" or "sampler"
    ms_per_forward: float  # median or min of the repeats (BenchConfig.stat); sampler rows: time / steps
    flops_ratio: float  # ρ, attention+MLP MACs relative to dense (1.0 for dense)
    ms_min: float | None = None  # fastest repeat
    ms_median: float | None = None
    s_per_image: float | None = None
    steps: int | None = None
    speedup: float | None = None  # vs the dense DiT with the same compile setting
    speedup_vs_eager_dense: float | None = None
    efficiency: float | None = None  # speedup·ρ
    max_rel_err: float | None = None  # sliced vs masked output (sanity check), when both ran
    pack_memory_ratio: float | None = None  # sliced sampler rows: pack bytes / attention+MLP weight bytes
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(d.pop("extra"))
        return d


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _fill_zero_init(model: nn.Module, seed: int) -> None:
    """Random weights for the adaLN-Zero / final layers of an untrained model, so that blocks do work."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen, device="cpu") * 0.02)


def build_models(cfg: BenchConfig) -> tuple[DiT, DyDiT, Calibration | None]:
    """(dense DiT, DyDiT with the same backbone weights, calibration or None), in eval mode."""
    dtype, overrides = DTYPES[cfg.dtype], dict(cfg.overrides)
    if cfg.input_size is not None:
        overrides["input_size"] = cfg.input_size
    base = dit_name(cfg.model or DEFAULT_MODEL)
    if is_flux_name(base):  # FLUX: the dense preset of a DyFLUX name; the latent side is sample_size
        base = DYFLUX_NAMES.get(base, base)
        if "input_size" in overrides:
            overrides["sample_size"] = overrides.pop("input_size")
    dev = torch.device(cfg.device)
    with dev:  # build (and initialise) directly on the target device
        if cfg.checkpoint:
            ckpt = open_checkpoint(cfg.checkpoint)
            dy, trained = load_model(ckpt, cfg.model, dynamic=True), has_routers(ckpt.state_dict)
            dit = build_model(dy.config.replace(dynamic=False))  # a DiT, or a U-ViT
            own = dit.state_dict()
            dit.load_state_dict({k: v for k, v in dy.state_dict().items() if k in own})
        else:
            torch.manual_seed(cfg.seed)
            dit = create_model(base, **overrides)
            _fill_zero_init(dit, cfg.seed)
            dy, trained = DyDiT.from_dit(dit), False
    dit, dy = dit.to(dev, dtype).eval(), dy.to(dev, dtype).eval()
    calibration = None
    if not trained:
        heads, groups, tokens = fractions_for_rho(cfg.rho, keep=cfg.token_keep, costs=dy.layer_costs())
        calibration = calibrate_routers(dy, heads=heads, groups=groups, tokens=tokens, seed=cfg.seed)
    return dit, dy, calibration


def model_label(cfg: BenchConfig, config: ModelConfig, trained: bool) -> str:
    """What the rows say was timed: ``--model`` for random weights; for a checkpoint, the preset its
    weights are (``DyDiT-S/2`` with trained routers), else its sizes."""
    if not cfg.checkpoint:
        return cfg.model or DEFAULT_MODEL
    d = config.replace(dynamic=False)
    sizes = f"depth {d.depth}, width {d.hidden_size}, {d.num_heads} heads, patch {d.patch_size}"
    base = preset_name(d) or f"custom DiT ({sizes})"
    return (preset_name(config) or f"{base} with trained routers") if trained else base


def make_runners(
    cfg: BenchConfig, dit: DiT, dy: DyDiT
) -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """The callables ``(x, t, y) -> Tensor`` of every requested mode."""

    def masked(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return dy(x, t, y)

    options = dict(token_bucket=cfg.token_bucket, pack_budget=cfg.pack_budget)
    factories: dict[str, Callable[[], Callable]] = {
        "dense": lambda: dit,
        "dense-compiled": lambda: torch.compile(dit, mode=cfg.compile_mode),
        "masked": lambda: masked,
        "sliced": lambda: engine(dy, plan_timesteps=cfg.timesteps, **options),
        "sliced-compiled": lambda: engine(
            dy, plan_timesteps=cfg.timesteps, compile=True, compile_mode=cfg.compile_mode, **options
        ),
    }
    return {m: factories[m]() for m in cfg.modes}


def _inputs(cfg: BenchConfig, model: DiT, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """(x rows, y rows, noise of the images): CFG doubles the rows as [x; x] with labels [y; null]."""
    c = model.config
    gen = torch.Generator().manual_seed(cfg.seed + batch)
    dev, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    if hasattr(model, "example_inputs"):  # a text family (FLUX): its own inputs, no CFG rows
        x, y = model.example_inputs(batch, gen)
        return x.to(dev, dtype), y.to(dev), x.to(dev, dtype)
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=gen)
    y = torch.randint(0, max(c.num_classes, 1), (batch,), generator=gen)  # an unconditional U-ViT: 0
    noise = x.to(dev, dtype)
    if cfg.cfg_scale != 1.0:
        x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, c.num_classes)])
    return x.to(dev, dtype), y.to(dev), noise


def _attn_mlp_macs(fn: Callable, x: Tensor, ts: tuple[int, ...], y: Tensor) -> int:
    with count_flops() as fc, torch.inference_mode():
        for t in ts:
            fn(x, torch.full((x.shape[0],), t, device=x.device), y)
    return fc.by_component.get("attention", 0) + fc.by_component.get("mlp", 0)


def time_forwards(cfg: BenchConfig, runners: dict, x: Tensor, y: Tensor) -> dict[str, list[float]]:
    """Seconds per forward of each mode, one value per repeat, modes interleaved."""
    ts = [torch.full((x.shape[0],), t, device=x.device) for t in cfg.timesteps]
    times: dict[str, list[float]] = {m: [] for m in runners}
    with torch.inference_mode():
        for _ in range(cfg.warmup):
            for fn in runners.values():
                for t in ts:
                    fn(x, t, y)
        _sync(cfg.device)
        for _ in range(cfg.repeats):
            for mode, fn in runners.items():
                start = time.perf_counter()
                for t in ts:
                    fn(x, t, y)
                _sync(cfg.device)
                times[mode].append((time.perf_counter() - start) / len(ts))
    return times


def time_sampler(
    cfg: BenchConfig, fn: Callable, noise: Tensor, y: Tensor, null: int, steps: int, learn_sigma: bool = True
) -> tuple[float, Tensor]:
    """Seconds for one DDIM run of ``steps`` steps with CFG (every family: one evaluation a step);
    returns (seconds, x_0)."""
    diffusion = create_diffusion(learn_sigma=learn_sigma)
    model_fn = guided(fn, cfg.cfg_scale, null)
    _sync(cfg.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = sample_ddim(model_fn, noise, diffusion, steps, model_kwargs=dict(y=y))
    _sync(cfg.device)
    return time.perf_counter() - start, out


def _rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


class Bench:
    """Models and runners built once (compiled graphs stay warm); :meth:`run` measures,
    :meth:`recalibrate` moves to another ρ."""

    def __init__(self, cfg: BenchConfig, log: Callable[[str], None] = lambda s: None):
        if is_flux_name(cfg.model or ""):  # FLUX: flow times in [0, 1], one row per image
            if cfg.sampler_steps or cfg.checkpoint:
                raise DyditError(
                    "dydit bench times FLUX forwards of random weights: no --sampler-steps/--checkpoint"
                )
            cfg = dataclasses.replace(cfg, timesteps=tuple(t / 1000 for t in cfg.timesteps), cfg_scale=1.0)
        self.cfg, self.log = cfg, log
        self.dit, self.dy, calibration = build_models(cfg)
        self.model = model_label(cfg, self.dy.config, trained=calibration is None)
        self._log_calibration(calibration)
        self.runners = make_runners(cfg, self.dit, self.dy)

    def _log_calibration(self, c: Calibration | None) -> None:
        if c is not None:
            self.log(
                f"calibrated routers: heads {c.heads:.3f}, groups {c.groups:.3f}, tokens {c.tokens:.3f} "
                f"(expected rho {c.rho:.3f})"
            )

    def recalibrate(self, rho: float, token_keep: float) -> Calibration:
        """Calibrate the routers to another target ρ; sliced engines drop their plans and packs."""
        self.cfg = dataclasses.replace(self.cfg, rho=rho, token_keep=token_keep)
        h, g, k = fractions_for_rho(rho, keep=token_keep, costs=self.dy.layer_costs())
        calibration = calibrate_routers(self.dy, heads=h, groups=g, tokens=k, seed=self.cfg.seed)
        self._log_calibration(calibration)
        for fn in self.runners.values():
            if isinstance(fn, SlicedDyDiT):
                fn.prepare(self.cfg.timesteps)  # the engine sees the new router weights itself
        return calibration

    def run(
        self,
        batches: tuple[int, ...] | None = None,
        modes: tuple[str, ...] | None = None,
        sampler_steps: int | None = None,
    ) -> list[BenchRow]:
        """Time ``modes`` (default: all built) at ``batches``; a sampler timing when ``sampler_steps``."""
        cfg = self.cfg
        runners = {m: self.runners[m] for m in (modes or tuple(self.runners))}
        steps = cfg.sampler_steps if sampler_steps is None else sampler_steps
        rows: list[BenchRow] = []
        for batch in batches or cfg.batches:
            rows += self._run_batch(batch, runners, steps)
        return rows

    def _run_batch(self, batch: int, runners: dict, steps: int) -> list[BenchRow]:
        cfg, dit, dy = self.cfg, self.dit, self.dy
        x, y, noise = _inputs(cfg, dit, batch)
        first = y[:1] if isinstance(y, Tensor) else y.select(slice(0, 1))
        dense_macs = _attn_mlp_macs(dit, x[:1], cfg.timesteps, first) * x.shape[0]
        rho = _attn_mlp_macs(engine(dy, pack_budget=cfg.pack_budget), x, cfg.timesteps, y) / dense_macs
        err = None
        sliced_mode = next((m for m in runners if m.startswith("sliced")), None)
        if sliced_mode is not None:  # the sliced output must be the masked output
            with torch.inference_mode():
                t = torch.full((x.shape[0],), cfg.timesteps[0], device=x.device)
                err = _rel_err(runners[sliced_mode](x, t, y), dy(x, t, y))
        self.log(f"batch {batch}: rho {rho:.3f}; timing {', '.join(runners)} ...")
        meta = dict(model=self.model, batch=batch, rows=x.shape[0], dtype=cfg.dtype, device=cfg.device)
        extra = {
            "checkpoint": cfg.checkpoint,
            "device_name": device_name(cfg.device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cfg_scale": cfg.cfg_scale,
            "timesteps": list(cfg.timesteps),
            "rho_target": cfg.rho,
            "token_keep_target": cfg.token_keep,
        }
        rows = []
        for mode, ts in time_forwards(cfg, runners, x, y).items():
            dynamic = mode.startswith(("masked", "sliced"))
            rows.append(
                BenchRow(
                    mode,
                    measurement="forward",
                    ms_per_forward=1e3 * (min(ts) if cfg.stat == "min" else statistics.median(ts)),
                    ms_min=1e3 * min(ts),
                    ms_median=1e3 * statistics.median(ts),
                    flops_ratio=rho if dynamic else 1.0,
                    max_rel_err=err if mode.startswith("sliced") else None,
                    extra=dict(extra),
                    **meta,
                )
            )
        if steps:
            sampler_rho = rho
            for mode, fn in runners.items():
                packs = None
                if isinstance(fn, SlicedDyDiT):
                    fn.clear_cache()  # count the packs this sampler run builds
                with count_flops() as fc:  # the sliced path records the work it really does
                    seconds, _ = time_sampler(
                        cfg, fn, noise, y[:batch], dit.config.num_classes, steps, dit.config.learn_sigma
                    )
                if isinstance(fn, SlicedDyDiT):
                    packs = fn.memory()["ratio"]
                    done = fc.by_component.get("attention", 0) + fc.by_component.get("mlp", 0)
                    sampler_rho = done / (dense_macs / len(cfg.timesteps) * steps)
                self.log(f"  sampler {mode}: {seconds:.2f} s")
                rows.append(
                    BenchRow(
                        mode,
                        measurement="sampler",
                        ms_per_forward=1e3 * seconds / steps,
                        flops_ratio=1.0,
                        s_per_image=seconds / batch,
                        steps=steps,
                        pack_memory_ratio=packs,
                        extra=dict(extra),
                        **meta,
                    )
                )
            for r in rows:  # masked DyDiT runs the same plans as sliced: same ρ
                if r.measurement == "sampler" and r.mode.startswith(("masked", "sliced")):
                    r.flops_ratio = sampler_rho
        _add_speedups(rows)
        return rows


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> list[BenchRow]:
    """Build the models, calibrate if needed, and time every mode at every batch size."""
    return Bench(cfg, log).run()


def _add_speedups(rows: list[BenchRow]) -> None:
    for kind in ("forward", "sampler"):
        group = {r.mode: r for r in rows if r.measurement == kind}
        for r in group.values():
            base = group.get("dense-compiled" if r.mode.endswith("-compiled") else "dense")
            eager = group.get("dense")
            if base is not None:
                r.speedup = base.ms_per_forward / r.ms_per_forward
                r.efficiency = r.speedup * r.flops_ratio
            if eager is not None:
                r.speedup_vs_eager_dense = eager.ms_per_forward / r.ms_per_forward
