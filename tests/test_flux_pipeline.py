"""A real ``diffusers.FluxPipeline`` end to end with dydit's FLUX and DyFLUX as ``transformer=``
(issue 24): every component is tiny and made here (CLIP and T5 encoders from configs, word-level
tokenizers built in code, a small ``AutoencoderKL``, the flow-matching Euler scheduler). The dense
FLUX gives diffusers' own transformer's images; the DyFLUX gives the same images sliced as masked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_dyflux import token_router_weights

import dydit
from dydit.models.dydit import DyDiT, execution
from dydit.presets import get_model_config

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["<pad>", "<unk>", "</s>", "a", "red", "blue", "cat", "dog", "and", "left", "of", "photo"]


def tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        model_max_length=max_length,
    )


def components(cfg) -> dict:
    """Tiny text encoders and VAE whose sizes fit ``cfg`` (text width, pooled width, channels)."""
    torch.manual_seed(0)
    clip = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(WORDS), hidden_size=cfg.pooled_projection_dim, intermediate_size=37,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
            projection_dim=cfg.pooled_projection_dim, pad_token_id=0, bos_token_id=0, eos_token_id=2,
        )
    ).eval()  # fmt: skip
    t5 = transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=len(WORDS), d_model=cfg.joint_attention_dim, d_kv=8, d_ff=37, num_layers=2,
            num_heads=4, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
        )
    ).eval()  # fmt: skip
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=cfg.in_channels // 4, norm_num_groups=8, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.06, scaling_factor=0.4,
    ).eval()  # fmt: skip
    return dict(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer(77),
        text_encoder_2=t5,
        tokenizer_2=tokenizer(16),
    )


def images(pipe, prompts=("a red cat left of a blue dog", "a photo of a dog")) -> np.ndarray:
    out = pipe(
        list(prompts), height=32, width=32, num_inference_steps=3, guidance_scale=3.5,
        max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="np",
    )  # fmt: skip
    return out.images


def test_flux_pipeline_runs_dydit_flux_and_dyflux_sliced_as_masked():
    cfg = get_model_config("FLUX-tiny")
    parts = components(cfg)
    torch.manual_seed(1)
    ref = diffusers.FluxTransformer2DModel(**{k: v for k, v in cfg.to_diffusers().items() if k[0] != "_"})
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    ref.eval()
    expected = images(diffusers.FluxPipeline(transformer=ref, **parts))
    assert expected.shape == (2, 32, 32, 3) and expected.std() > 0.01

    flux = dydit.load_model(ref.state_dict(), cfg)  # the dense network, diffusers' keys
    np.testing.assert_allclose(images(diffusers.FluxPipeline(transformer=flux, **parts)), expected, atol=1e-4)

    dy = DyDiT.from_dit(flux).eval()  # keeps everything: still the dense images
    np.testing.assert_allclose(images(diffusers.FluxPipeline(transformer=dy, **parts)), expected, atol=1e-4)

    # Mixed token and width routing: sliced must give the masked images, and differ from dense.
    with torch.no_grad():
        for key, value in token_router_weights(cfg, seed=3).items():
            dy.state_dict()[key].copy_(value)
        for block in dy.blocks:
            if block.has_width_routers:
                for rate in (block.attn_rate, block.mlp_rate):
                    rate.router.bias.normal_(0, 2.0, generator=torch.Generator().manual_seed(5))
    pipe = diffusers.FluxPipeline(transformer=dy, **parts)
    with execution(dy, "masked"):
        masked = images(pipe)
    with execution(dy, "sliced"):
        sliced = images(pipe)
    np.testing.assert_allclose(sliced, masked, atol=1e-4)
    assert np.abs(masked - expected).max() > 1e-3
