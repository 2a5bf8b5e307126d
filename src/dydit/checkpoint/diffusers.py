"""diffusers' ``DiTTransformer2DModel`` layout, both ways (no diffusers import needed for either).

A diffusers DiT folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or a
sharded index, or ``.bin``); a pipeline folder (``facebook/DiT-XL-2-256``) keeps them in
``transformer/``. The network is the official DiT; the differences are of layout and numerics:

- layout: every block holds its own copy of the timestep and label embedders
  (``transformer_blocks.i.norm1.emb``; the final layer uses block 0's), q/k/v are three linears
  (``attn1.to_q/k/v``) where DiT has one ``qkv``, the final adaLN and linear are ``proj_out_1/2``,
  and the position table is not stored (diffusers recomputes the same sin-cos table). The adaLN
  chunk order (shift, scale, gate for attention, then for the MLP) is DiT's.
- numerics: diffusers' timestep features use ``downscale_freq_shift=1`` (official DiT: 0), and its
  LayerNorm before the MLP uses the config's ``norm_eps`` (default 1e-5; official DiT: 1e-6). A
  folder is read with diffusers' values (:class:`~dydit.presets.ModelConfig` fields
  ``timestep_freq_shift`` and ``mlp_norm_eps``), so it reproduces diffusers' outputs.

A DyDiT exports its complete (dense) network for diffusers plus ``dydit_routers.safetensors``
(router tensors under dydit's key names), which diffusers ignores and :func:`read_diffusers` reads
back: dydit rebuilds the DyDiT, diffusers runs the dense model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dydit.checkpoint.files import read_file, read_json
from dydit.errors import CheckpointError, DyditError
from dydit.models.fitting import ROUTER_KEY_MARKERS, size_mismatches
from dydit.models.layers import sincos_pos_embed_2d
from dydit.presets import ModelConfig, check_size, shown

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS_BIN = "diffusion_pytorch_model.bin"
ROUTERS_FILE = "dydit_routers.safetensors"
PIPELINE_SUBFOLDER = "transformer"
CLASS_NAME = "DiTTransformer2DModel"
_CLASS_NAMES = (CLASS_NAME, "Transformer2DModel")  # the second: folders converted before diffusers 0.28
DIFFUSERS_FREQ_SHIFT = 1
# DiTTransformer2DModel's constructor defaults (diffusers 0.42), used where config.json omits a key.
_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None,
    "num_layers": 28, "attention_bias": True, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False, "norm_eps": 1e-5,
}  # fmt: skip
# What DiT's architecture fixes; a config asking for anything else is another network.
_REQUIRED = {
    "norm_type": "ada_norm_zero",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
}
# The integer sizes of a config.json and the ModelConfig field whose limit bounds each.
_SIZES = {
    "num_layers": "depth", "num_attention_heads": "num_heads", "attention_head_dim": "head_dim",
    "patch_size": "patch_size", "sample_size": "input_size", "in_channels": "in_channels",
    "num_embeds_ada_norm": "num_classes",
}  # fmt: skip
# What a config.json calls the ModelConfig fields (for errors about the config.json).
_NAMES = {
    "depth": "num_layers", "hidden_size": "num_attention_heads x attention_head_dim",
    "input_size": "sample_size", "num_classes": "num_embeds_ada_norm", "learn_sigma": "out_channels",
}  # fmt: skip
MODEL_INDEX = "model_index.json"

# (dydit name, diffusers name) of each weight; ".weight"/".bias" are appended.
_TOP = (("x_embedder.proj", "pos_embed.proj"), ("final_layer.adaLN_modulation.1", "proj_out_1"),
        ("final_layer.linear", "proj_out_2"))  # fmt: skip
_BLOCK = (("adaLN_modulation.1", "norm1.linear"), ("attn.proj", "attn1.to_out.0"),
          ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2"))  # fmt: skip
_QKV = ("attn.qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v"))
# Embedders: one in dydit, a copy in every diffusers block under norm1.emb.
_EMBEDDERS = (
    ("t_embedder.mlp.0", "timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "timestep_embedder.linear_2"),
    ("y_embedder.embedding_table", "class_embedder.embedding_table"),
)
_SUFFIXES = (".weight", ".bias")


# Folders and configs ----------------------------------------------------------------------------
def _is_dit_config(path: Path) -> bool:
    try:
        config = read_json(path)
    except CheckpointError:
        return False
    return isinstance(config, dict) and config.get("_class_name") in _CLASS_NAMES


def find_diffusers_dir(path: str | os.PathLike) -> Path | None:
    """The folder holding a diffusers DiT's ``config.json`` (``path`` or its ``transformer/``), if any."""
    path = Path(path)
    for folder in (path, path / PIPELINE_SUBFOLDER):
        if (folder / CONFIG_FILE).is_file() and _is_dit_config(folder / CONFIG_FILE):
            return folder
    return None


def _config_problem(path: Path) -> str:
    """What a ``config.json`` that is not a diffusers DiT's is instead."""
    try:
        config = read_json(path)
    except CheckpointError as e:
        return str(e)
    if not isinstance(config, dict):
        return f"{path} holds a JSON {type(config).__name__}, not a model config"
    name = config.get("_class_name")
    if isinstance(config.get("train"), dict) and isinstance(config.get("model"), dict):
        return (
            f"{path} is a dydit run's configuration: load the run's checkpoints/state.pt or an export "
            "(dydit export)"
        )
    if name is None:
        kind = config.get("model_type")
        what = f" (model_type {shown(kind)}: a transformers config?)" if kind is not None else ""
        return f"{path} has no _class_name, so it is no diffusers model config{what}"
    return f"{path} is the config of a {shown(name)}, not of a DiT ({CLASS_NAME})"


def folder_problem(path: str | os.PathLike) -> str:
    """Why ``path`` (a directory) is not a diffusers DiT folder, for an error message."""
    path = Path(path)
    for folder in (path, path / PIPELINE_SUBFOLDER):
        if (folder / CONFIG_FILE).is_file():
            return _config_problem(folder / CONFIG_FILE)
    if (path / MODEL_INDEX).is_file():
        sub = f"{PIPELINE_SUBFOLDER}/{CONFIG_FILE}"
        return f"a diffusers pipeline without {sub} (a DiT pipeline keeps its DiT there)"
    return f"no {CONFIG_FILE} of a diffusers DiT in it or in {PIPELINE_SUBFOLDER}/"


def _check_sizes(get: dict[str, Any], source: str) -> None:
    """Raise a one-line CheckpointError naming the first config.json size of the wrong type or too large."""
    try:
        for key, field in _SIZES.items():
            check_size(field, get[key], key)
        heads, head_dim = get["num_attention_heads"], get["attention_head_dim"]
        check_size("hidden_size", heads * head_dim, _NAMES["hidden_size"])
        if get["out_channels"] is not None:
            check_size("in_channels", get["out_channels"], "out_channels")
    except DyditError as e:
        raise CheckpointError(f"{source}: {e}") from None
    eps = get["norm_eps"]
    if not isinstance(eps, int | float) or isinstance(eps, bool):
        raise CheckpointError(f"{source}: norm_eps must be a number, got {shown(eps)}")


def config_from_diffusers(dc: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Our :class:`ModelConfig` for a ``DiTTransformer2DModel`` config (diffusers' numerics).

    Every size is checked (type, and dydit's limits, :data:`~dydit.presets.SIZE_LIMITS`) before
    anything is computed from it; errors name the ``config.json`` key.
    """
    # Folders converted for Transformer2DModel (facebook/DiT-XL-2-256) name everything but these two.
    defaults = _DEFAULTS if dc.get("_class_name") == CLASS_NAME else {"out_channels": None, "norm_eps": 1e-5}
    get = {**defaults, **dc}
    lacking = [k for k in (*_DEFAULTS, *_REQUIRED) if k not in get and k != "out_channels"]
    if lacking:
        raise CheckpointError(f"{source} lacks {sorted(set(lacking))}")
    other = ", ".join(f"{k}={shown(get[k])}" for k, v in _REQUIRED.items() if get[k] != v)
    if other:
        raise CheckpointError(f"{source} describes another network than DiT ({other}); dydit cannot load it")
    _check_sizes(get, source)
    in_ch, out_ch = get["in_channels"], get["out_channels"] or get["in_channels"]
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{source}: {out_ch} output channels for {in_ch} input channels is not a DiT")
    try:
        return ModelConfig(
            depth=get["num_layers"],
            hidden_size=get["num_attention_heads"] * get["attention_head_dim"],
            num_heads=get["num_attention_heads"],
            patch_size=get["patch_size"],
            input_size=get["sample_size"],
            in_channels=in_ch,
            num_classes=get["num_embeds_ada_norm"],
            learn_sigma=out_ch == 2 * in_ch,
            timestep_freq_shift=DIFFUSERS_FREQ_SHIFT,
            mlp_norm_eps=float(get["norm_eps"]),
        )
    except DyditError as e:
        raise CheckpointError(f"{source} is not a valid DiT config: {e}") from None


def config_to_diffusers(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of a ``DiTTransformer2DModel`` with ``cfg``'s architecture."""
    config: dict[str, Any] = {"_class_name": CLASS_NAME}
    try:
        from importlib.metadata import version

        config["_diffusers_version"] = version("diffusers")
    except Exception:  # noqa: BLE001 - PackageNotFoundError; the key is informational
        pass
    return config | {
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.depth,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "sample_size": cfg.input_size,
        "patch_size": cfg.patch_size,
        "num_embeds_ada_norm": cfg.num_classes,
        "upcast_attention": False,
        "norm_eps": cfg.mlp_norm_eps,
        **_REQUIRED,
    }


# Key layouts ------------------------------------------------------------------------------------
def from_diffusers(sd: dict[str, Tensor], source: str = "diffusers weights") -> dict[str, Tensor]:
    """A diffusers DiT state dict in dydit's key layout (without ``pos_embed``, which diffusers lacks).

    The per-block embedder copies must be identical (they are in converted official weights); keys
    this mapping does not know keep their names, so that strict loading names them.
    """
    rest = dict(sd)
    out: dict[str, Tensor] = {}
    # The block indices present (not range(1 + the largest): a key may name block 10**12).
    blocks = sorted({int(m[1]) for k in rest if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    for ours, theirs in _TOP:
        for s in _SUFFIXES:
            if theirs + s in rest:
                out[ours + s] = rest.pop(theirs + s)
    for i in blocks:
        b, t = f"blocks.{i}.", f"transformer_blocks.{i}."
        for ours, theirs in _BLOCK:
            for s in _SUFFIXES:
                if t + theirs + s in rest:
                    out[b + ours + s] = rest.pop(t + theirs + s)
        for s in _SUFFIXES:
            parts = [t + name + s for name in _QKV[1]]
            if all(p in rest for p in parts):
                qkv = [rest.pop(p) for p in parts]
                if len({(q.dim(), *q.shape[1:]) for q in qkv}) > 1:
                    shapes = ", ".join(str(tuple(q.shape)) for q in qkv)
                    raise CheckpointError(f"{source}: block {i}'s to_q, to_k, to_v do not stack ({shapes})")
                out[b + _QKV[0] + s] = torch.cat(qkv)  # rows [q; k; v]
        for ours, theirs in _EMBEDDERS:
            for s in _SUFFIXES:
                key = t + "norm1.emb." + theirs + s
                if key not in rest:
                    continue
                copy = rest.pop(key)
                if ours + s not in out:
                    out[ours + s] = copy
                elif not torch.equal(out[ours + s], copy):
                    raise CheckpointError(
                        f"{source}: block {i}'s copy of the {'label' if 'class' in theirs else 'timestep'} "
                        "embedder differs from block 0's; dydit's DiT has one embedder, so it cannot "
                        "represent this model (diffusers trained the copies apart)"
                    )
    return out | rest


def to_diffusers(sd: dict[str, Tensor], depth: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(diffusers state dict, DyDiT router tensors) of a dydit state dict.

    Every tensor is a fresh contiguous copy: safetensors refuses tensors that share memory.
    """
    rest = {k: v for k, v in sd.items() if k != "pos_embed"}
    routers = {k: rest.pop(k).contiguous() for k in list(rest) if any(m in k for m in ROUTER_KEY_MARKERS)}
    out: dict[str, Tensor] = {}
    for ours, theirs in _TOP:
        for s in _SUFFIXES:
            out[theirs + s] = rest.pop(ours + s).clone()
    embedders = {
        ours + s: rest.pop(ours + s) for ours, _ in _EMBEDDERS for s in _SUFFIXES if ours + s in rest
    }
    for i in range(depth):
        b, t = f"blocks.{i}.", f"transformer_blocks.{i}."
        for ours, theirs in _BLOCK:
            for s in _SUFFIXES:
                out[t + theirs + s] = rest.pop(b + ours + s).clone()
        for s in _SUFFIXES:
            for name, part in zip(_QKV[1], rest.pop(b + _QKV[0] + s).chunk(3, dim=0)):
                out[t + name + s] = part.clone()
        for ours, theirs in _EMBEDDERS:
            for s in _SUFFIXES:
                if ours + s in embedders:
                    out[t + "norm1.emb." + theirs + s] = embedders[ours + s].clone()
    if rest:
        raise CheckpointError(f"cannot export these tensors to diffusers: {sorted(rest)[:6]}")
    return out, routers


# Reading ----------------------------------------------------------------------------------------
def read_weights(folder: Path, kind: str = "DiT") -> dict[str, Tensor]:
    """The weights of a diffusers model folder: one file, an index of shards, or ``.bin``."""
    if (folder / WEIGHTS_FILE).is_file():
        return read_file(folder / WEIGHTS_FILE)[0]
    if (folder / WEIGHTS_INDEX).is_file():
        index = read_json(folder / WEIGHTS_INDEX)
        try:
            shards = sorted({Path(shard).name for shard in index["weight_map"].values()})
        except (KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{folder / WEIGHTS_INDEX} is not a valid shard index") from None
        out: dict[str, Tensor] = {}
        for shard in shards:
            out |= read_file(folder / shard)[0]
        return out
    if (folder / WEIGHTS_BIN).is_file():
        return read_file(folder / WEIGHTS_BIN)[0]
    raise CheckpointError(f"{folder} has a {kind} config.json but no {WEIGHTS_FILE} (or shards, or .bin)")


def read_diffusers(folder: str | os.PathLike) -> tuple[dict[str, Tensor], ModelConfig]:
    """(dydit state dict, config) of a diffusers DiT folder; routers from ``dydit_routers.safetensors``."""
    folder = Path(folder)
    dc = read_json(folder / CONFIG_FILE)
    if not isinstance(dc, dict):
        raise CheckpointError(_config_problem(folder / CONFIG_FILE))
    cfg = config_from_diffusers(dc, str(folder / CONFIG_FILE))
    sd = from_diffusers(read_weights(folder), str(folder))
    # The config must describe these weights before its position table is computed.
    wrong = size_mismatches(cfg, sd, _NAMES)
    if wrong:
        raise CheckpointError(f"{folder / CONFIG_FILE} does not fit its weights: {'; '.join(wrong)}")
    sd["pos_embed"] = sincos_pos_embed_2d(cfg.hidden_size, cfg.input_size // cfg.patch_size).unsqueeze(0)
    if (folder / ROUTERS_FILE).is_file():
        routers = read_file(folder / ROUTERS_FILE)[0]
        sd |= routers
        cfg = cfg.replace(dynamic=True)
    return sd, cfg


# Writing ----------------------------------------------------------------------------------------
def export_checks(cfg: ModelConfig, sd: dict[str, Tensor]) -> None:
    """Raise a one-line CheckpointError when diffusers' DiT cannot hold this model."""
    if cfg.objective != "ddpm":
        raise CheckpointError("diffusers has no flow-matching (SiT) DiT pipeline; export DDPM models only")
    if cfg.mlp_ratio != 4:
        raise CheckpointError(f"diffusers' DiT has an MLP ratio of 4; this model's is {cfg.mlp_ratio}")
    if cfg.class_dropout_prob == 0:
        raise CheckpointError("diffusers' DiT always has a null-class embedding; this model has none")
    table = sincos_pos_embed_2d(cfg.hidden_size, cfg.input_size // cfg.patch_size).unsqueeze(0)
    if not torch.allclose(sd["pos_embed"].float(), table, atol=1e-5):
        raise CheckpointError(
            "this model's position table is not DiT's fixed sin-cos table, which diffusers recomputes"
        )


def write_diffusers(out: str | os.PathLike, sd: dict[str, Tensor], cfg: ModelConfig) -> Path:
    """Write a diffusers DiT folder for (state dict, config); ``out`` must not exist or be empty.

    The folder is assembled under a hidden temporary name and renamed into place, so ``out`` is
    either complete or absent.
    """
    check_empty_target(out)
    export_checks(cfg, sd)
    weights, routers = to_diffusers(sd, cfg.depth)
    meta = {"router_layout": cfg.router_layout}
    return publish_folder(out, config_to_diffusers(cfg), weights, routers, meta)


def check_empty_target(out: str | os.PathLike) -> None:
    """A diffusers folder is written only where nothing is yet (or an empty folder)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DyditError(f"{out} already exists; choose another --out or remove it")


def publish_folder(
    out: str | os.PathLike,
    config: dict[str, Any],
    weights: dict[str, Tensor],
    routers: dict[str, Tensor],
    router_meta: dict[str, str] | None = None,
) -> Path:
    """Write ``config.json``, the weights and (if any) ``dydit_routers.safetensors`` as one folder:
    assembled under a hidden temporary name, synced and renamed into place, so ``out`` is either
    complete or absent (one-line DyditError on failure)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    out = Path(out)
    check_empty_target(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if routers:
            save_file(routers, str(tmp / ROUTERS_FILE), metadata={"format": "pt", **(router_meta or {})})
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, out)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().split("\n")[0]
        raise DyditError(f"cannot write {out}: {reason}") from None
    return out
