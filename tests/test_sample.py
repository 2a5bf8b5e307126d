"""Sampling library (docs/METHOD.md §7.1): per-image seeds, rank striding, resumable output directories,
ADM-format npz, and the pixel/VAE codecs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from dydit.data.codec import PixelCodec, VAECodec, make_codec
from dydit.diffusion import create_diffusion
from dydit.errors import DyditError
from dydit.factory import build_model
from dydit.sample import (
    SamplingSettings,
    generate,
    rank_share,
    resolve_labels,
    sample_images,
    sample_to_dir,
    save_grid,
    to_uint8,
)

STEPS = 4


def _model(in_channels: int = 3, dtype=torch.float32):
    cfg = tiny_config(in_channels=in_channels)
    model = build_model(cfg).eval().to(dtype)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.2)
    torch.nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight, std=0.2)
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    return cfg, model, shape


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_generate_same_seed_same_image_at_batch_sizes_1_and_4(sampler: str) -> None:
    cfg, model, shape = _model(dtype=torch.float64)
    eta = 1.0 if sampler == "ddim" else None
    settings = SamplingSettings(sampler=sampler, steps=STEPS, cfg_scale=1.5, eta=eta)
    kw = dict(seeds=[7, 8, 9, 10, 11], shape=shape, num_classes=cfg.num_classes, dtype=torch.float64)
    d = create_diffusion()

    def run(bs: int) -> torch.Tensor:
        batches = generate(model, d, settings, batch_size=bs, progress=False, **kw)
        return torch.cat([b.samples for b in batches])

    a, b = run(1), run(4)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(a[0], a[1])
    # Producing a subset (as a resumed run or another rank does) gives the same rows.
    part = next(generate(model, d, settings, batch_size=2, indices=[3, 1], progress=False, **kw))
    assert part.indices == [3, 1] and part.seeds == [10, 8]
    torch.testing.assert_close(part.samples, a[[3, 1]], rtol=1e-9, atol=1e-9)


def test_labels_from_seeds_and_validation() -> None:
    seeds = list(range(50))
    drawn = resolve_labels(seeds, None, 4)
    assert torch.equal(drawn, resolve_labels(seeds, None, 4)) and set(drawn.tolist()) == {0, 1, 2, 3}
    assert torch.equal(resolve_labels(seeds[10:20], None, 4), drawn[10:20])
    assert resolve_labels([1, 2], [3, 0], 4).tolist() == [3, 0]
    with pytest.raises(DyditError, match="out of range"):
        resolve_labels([1, 2], [4, 0], 4)
    with pytest.raises(DyditError, match="labels for"):
        resolve_labels([1, 2], [1], 4)
    with pytest.raises(DyditError, match="non-negative"):
        resolve_labels([-1], None, 4)


def test_rank_share_strides() -> None:
    assert rank_share(10, 1, 3) == [1, 4, 7]
    assert sorted(sum((rank_share(10, r, 3) for r in range(3)), [])) == list(range(10))
    assert rank_share(5) == [0, 1, 2, 3, 4]  # uninitialised: one process does everything


def test_settings_validation() -> None:
    for bad in (
        dict(sampler="euler_a"),
        dict(sampler="euler", steps="ddim10"),
        dict(sampler="heun", clip_denoised=True),
        dict(steps=0),
        dict(cfg_scale=-1.0),
        dict(guidance_channels="x"),
        dict(sampler="ddpm", eta=0.5),
        dict(sampler="ddim", eta=-1.0),
    ):
        with pytest.raises(DyditError):
            SamplingSettings(**bad)
    with pytest.raises(DyditError):
        SamplingSettings(steps="ddim999").timesteps(1000)


def test_to_uint8_matches_dit_conversion() -> None:
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 7)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 64, 128, 255, 255, 255]
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)


class _Interrupt(Exception):
    pass


def _counting(model, calls: list[int], fail_at: int | None = None):
    def fn(x, t, y):
        calls.append(x.shape[0])
        if fail_at is not None and len(calls) == fail_at:
            raise _Interrupt
        return model(x, t, y)

    return fn


def test_interrupted_sampling_resumes_without_duplicates(tmp_path) -> None:
    cfg, model, shape = _model()
    d = create_diffusion()
    settings = SamplingSettings(sampler="ddpm", steps=STEPS)
    kw = dict(
        seeds=list(range(100, 106)),
        shape=shape,
        num_classes=cfg.num_classes,
        codec=PixelCodec(),
        batch_size=2,
        progress=False,
    )
    ref = sample_to_dir(model, d, settings, tmp_path / "ref", npz_path=tmp_path / "ref.npz", **kw)
    assert ref.generated == 6 and ref.skipped == 0

    out, npz = tmp_path / "run", tmp_path / "run.npz"
    calls: list[int] = []
    with pytest.raises(_Interrupt):  # dies in the third batch
        sample_to_dir(_counting(model, calls, fail_at=2 * STEPS + 1), d, settings, out, npz_path=npz, **kw)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "000000.png",
        "000001.png",
        "000002.png",
        "000003.png",
        "sampling.json",
    ]
    assert not npz.exists(), "no npz before every image exists"

    calls.clear()
    res = sample_to_dir(_counting(model, calls), d, settings, out, npz_path=npz, **kw)
    assert (res.generated, res.skipped) == (2, 4)
    assert sum(calls) == 2 * STEPS, "only the two missing images are sampled"
    assert not list(out.glob(".*")), "no temp files left"
    a, b = np.load(tmp_path / "ref.npz"), np.load(npz)
    assert a["arr_0"].shape == (6, cfg.input_size, cfg.input_size, 3) and a["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    np.testing.assert_array_equal(b["arr_1"], resolve_labels(kw["seeds"], None, cfg.num_classes).numpy())

    # A finished directory is left alone; other settings are refused.
    calls.clear()
    assert sample_to_dir(_counting(model, calls), d, settings, out, **kw).generated == 0 and not calls
    with pytest.raises(DyditError, match="another run"):
        sample_to_dir(model, d, SamplingSettings(sampler="ddim", steps=STEPS), out, **kw)


def test_latents_without_codec_are_saved_raw(tmp_path) -> None:
    cfg, model, shape = _model(in_channels=4)
    d = create_diffusion()
    settings = SamplingSettings(steps=2)
    kw = dict(seeds=[1, 2, 3], shape=shape, num_classes=cfg.num_classes, codec=None, progress=False)
    sample_to_dir(model, d, settings, tmp_path / "lat", **kw)
    files = sorted(p.name for p in (tmp_path / "lat").glob("0*"))
    assert files == ["000000.npy", "000001.npy", "000002.npy"]
    z = np.load(tmp_path / "lat" / "000001.npy")
    expected = next(generate(model, d, settings, seeds=[1, 2, 3], shape=shape, num_classes=4, progress=False))
    np.testing.assert_array_equal(z, expected.samples[1].numpy())
    with pytest.raises(DyditError, match="codec"):
        sample_to_dir(model, d, settings, tmp_path / "lat2", npz_path=tmp_path / "x.npz", **kw)


def test_sample_images_and_grid(tmp_path) -> None:
    cfg, model, shape = _model(in_channels=1)
    images, labels = sample_images(
        model,
        create_diffusion(),
        SamplingSettings(steps=2),
        PixelCodec(),
        seeds=[5, 6, 7],
        labels=[0, 1, 2],
        shape=shape,
        num_classes=4,
        batch_size=2,
        progress=False,
    )
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8 and labels.tolist() == [0, 1, 2]
    from PIL import Image

    path = save_grid(tmp_path / "grid.png", images, labels)
    with Image.open(path) as img:
        assert img.mode == "RGB" and img.width > 2 * 64 and img.height > 2 * 64


def _tiny_vae():
    diffusers = pytest.importorskip("diffusers", reason="optional 'latent' extra (diffusers) not installed")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    )


def test_vae_codec_owns_the_latent_scale_and_decodes_samples(tmp_path) -> None:
    vae = _tiny_vae()
    codec = VAECodec(vae)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8) and codec.downsample == 2
    mean = vae.encode(x).latent_dist.mean
    assert torch.allclose(codec.encode(x, generator=torch.Generator().manual_seed(0)), z)
    assert (z / 0.18215 - mean).abs().mean() < 1.0  # a posterior sample, scaled
    with torch.no_grad():
        expected = vae.decode(z / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(codec.decode(z), expected)

    # Latent model + VAE: PNGs at pixel resolution, raw latents alongside on request.
    cfg, model, shape = _model(in_channels=4)
    res = sample_to_dir(
        model,
        create_diffusion(),
        SamplingSettings(steps=2),
        tmp_path / "vae",
        seeds=[1, 2],
        shape=shape,
        num_classes=4,
        codec=codec,
        save_raw=True,
        npz_path=tmp_path / "v.npz",
        progress=False,
    )
    assert res.generated == 2
    arr = np.load(tmp_path / "v.npz")["arr_0"]
    assert arr.shape == (2, 16, 16, 3)
    assert (tmp_path / "vae" / "000001.npy").exists()

    # Saved and reloaded from a directory, as --vae PATH does.
    vae.save_pretrained(tmp_path / "vae_dir")
    assert isinstance(make_codec(str(tmp_path / "vae_dir")), VAECodec)


def test_make_codec() -> None:
    assert isinstance(make_codec(None), PixelCodec) and isinstance(make_codec("pixel"), PixelCodec)
    x = torch.linspace(-2, 2, 5)
    assert torch.equal(PixelCodec().decode(x), x.clamp(-1, 1))
    with pytest.raises(DyditError, match="not found"):
        make_codec("/nonexistent/vae")
