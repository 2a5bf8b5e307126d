"""The FLUX family (issue 24): config <-> diffusers, presets, and the dense network against diffusers'
own ``FluxTransformer2DModel`` (fp32, tiny random configs, strict state dicts both ways)."""

from __future__ import annotations

import pytest
import torch

from dydit import create_model
from dydit.conditioning import TextCondition
from dydit.errors import DyditError
from dydit.models.flux import Flux
from dydit.models.flux_layers import image_ids, pack_latents, unpack_latents
from dydit.presets import FLUX_NAMES, FluxConfig, get_model_config

diffusers = pytest.importorskip("diffusers")

NAMES = ["FLUX-tiny", "FLUX-tiny-schnell"]


def diffusers_model(cfg: FluxConfig, seed: int = 0):
    torch.manual_seed(seed)
    ref = diffusers.FluxTransformer2DModel(**{k: v for k, v in cfg.to_diffusers().items() if k[0] != "_"})
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    return ref.eval()


def call(cfg: FluxConfig, batch: int = 2, n: int = 16, length: int = 5, seed: int = 1, ids3d: bool = False):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.randint(0, 4, (n, 3), generator=g).float()
    txt_ids = torch.zeros(length, 3)
    if ids3d:
        img_ids, txt_ids = img_ids.expand(batch, -1, -1), txt_ids.expand(batch, -1, -1)
    return dict(
        hidden_states=torch.randn(batch, n, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, length, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=torch.full((batch,), 4.0) if cfg.guidance_embeds else None,
        return_dict=False,
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_config_maps_to_and_from_a_diffusers_config():
    cfg = get_model_config("FLUX.1-lite-8B")
    assert isinstance(cfg, FluxConfig) and (cfg.num_layers, cfg.num_single_layers) == (8, 38)
    assert cfg.guidance_embeds and cfg.inner_dim == 3072
    raw = {**cfg.to_diffusers(), "_diffusers_version": "0.30.0", "_name_or_path": "x"}
    assert raw["_class_name"] == "FluxTransformer2DModel" and raw["axes_dims_rope"] == [16, 56, 56]
    assert FluxConfig.from_diffusers(raw) == cfg
    assert FluxConfig.from_diffusers({"guidance_embeds": True}) == get_model_config("FLUX.1-dev")
    assert not get_model_config("FLUX.1-schnell").guidance_embeds
    assert get_model_config("DyFLUX-lite-8B") == cfg.replace(dynamic=True)
    assert abs(get_model_config("FLUX.1-dev").num_parameters / 1e9 - 11.9) < 0.1
    with pytest.raises(DyditError, match="not a FluxTransformer2DModel"):
        FluxConfig.from_diffusers({"_class_name": "SD3Transformer2DModel"})
    with pytest.raises(DyditError, match="sum to attention_head_dim"):
        FluxConfig(axes_dims_rope=(16, 56, 48))
    assert {"FLUX.1-dev", "FLUX.1-schnell", "FLUX.1-lite-8B", "FLUX-tiny", "DyFLUX-tiny"} <= set(FLUX_NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ids3d", [False, True])
def test_outputs_equal_diffusers_flux(name, ids3d):
    cfg = get_model_config(name)
    ref = diffusers_model(cfg)
    ours = create_model(name).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    kwargs = call(cfg, ids3d=ids3d)
    with torch.no_grad():
        expected = ref(**{**kwargs, "img_ids": kwargs["img_ids"], "txt_ids": kwargs["txt_ids"]})[0]
        out = ours(**kwargs)
        sample = ours(**{**kwargs, "return_dict": True}).sample
    assert isinstance(out, tuple) and len(out) == 1
    assert expected.abs().max() > 1e-2
    assert rel_err(out[0], expected) < 1e-5
    torch.testing.assert_close(sample, out[0], rtol=0, atol=0)
    back = diffusers_model(cfg, seed=5)
    back.load_state_dict(ours.state_dict(), strict=True)  # and back into diffusers' class
    with torch.no_grad():
        assert rel_err(back(**kwargs)[0], expected) < 1e-6


def test_the_project_seam_packs_latents_and_makes_ids():
    cfg = get_model_config("FLUX-tiny")
    ref = diffusers_model(cfg)
    ours = Flux(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg.latent_channels, 8, 12, generator=g)
    text = TextCondition(
        torch.randn(2, 6, cfg.joint_attention_dim, generator=g),
        torch.randn(2, cfg.pooled_projection_dim, generator=g),
    )
    t = torch.tensor([0.25, 1.0])
    ours.guidance = 2.0
    with torch.no_grad():
        out = ours(x, t, text)
        expected = ref(
            hidden_states=pack_latents(x),
            encoder_hidden_states=text.embeddings,
            pooled_projections=text.pooled,
            timestep=t,
            img_ids=image_ids(4, 6),
            txt_ids=torch.zeros(6, 3),
            guidance=torch.full((2,), 2.0),
            return_dict=False,
        )[0]
    assert out.shape == x.shape
    assert rel_err(out, unpack_latents(expected, 8, 12)) < 1e-5
    torch.testing.assert_close(unpack_latents(pack_latents(x), 8, 12), x, rtol=0, atol=0)


def test_bad_inputs_get_one_line_errors():
    cfg = get_model_config("FLUX-tiny")
    model = Flux(cfg).eval()
    kwargs = call(cfg)
    bad_ids = [torch.zeros(15, 3), torch.zeros(16, 2), torch.zeros(2, 16, 3, 1)]
    for ids in bad_ids:
        with pytest.raises(DyditError, match=r"img_ids must be \(16, 3\)") as err:
            model(**{**kwargs, "img_ids": ids})
        assert "\n" not in str(err.value)
    with pytest.raises(DyditError, match="txt_ids must be"):
        model(**{**kwargs, "txt_ids": torch.zeros(4, 3)})
    long = cfg.max_text_length + 1
    with pytest.raises(DyditError, match=f"{long} tokens; this model supports at most {cfg.max_text_length}"):
        model(**call(cfg, length=long))
    with pytest.raises(DyditError, match=r"pooled text must be \(2, 24\)"):
        model(**{**kwargs, "pooled_projections": kwargs["pooled_projections"][:1]})
    with pytest.raises(DyditError, match="one time value per sample"):
        model(**{**kwargs, "timestep": torch.zeros(3)})
    with pytest.raises(DyditError, match="TextCondition"):
        model(torch.zeros(1, 4, 4, 4), torch.zeros(1), torch.zeros(1))


@pytest.mark.parametrize(
    "raw",
    [
        {"axes_dims_rope": 7},
        {"num_layers": "8"},
        {"num_attention_heads": 10**9},
        {"guidance_embeds": "yes"},
        {"axes_dims_rope": [16, 56, 55]},
    ],
)
def test_hostile_diffusers_configs_get_one_line_errors(raw):
    with pytest.raises(DyditError) as err:
        FluxConfig.from_diffusers({"_class_name": "FluxTransformer2DModel", **raw})
    assert "\n" not in str(err.value)
