"""The word tokenizer, the TokenIds condition and the tiny text encoder (docs/METHOD.md §17.3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dydit.conditioning import ClassLabels, TextCondition, cat
from dydit.data.compose_grammar import MAX_TOKENS, VOCAB, tokenizer
from dydit.errors import DyditError
from dydit.models.text_encoder import TextEncoder, TextEncoderConfig
from dydit.text import BOS_ID, PAD_ID, TokenIds, WordTokenizer


@pytest.fixture
def encoder() -> TextEncoder:
    torch.manual_seed(0)
    enc = TextEncoder(TextEncoderConfig(VOCAB, MAX_TOKENS, width=32, depth=2, heads=4, pooled_dim=24)).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so the reference checks them too
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc


def test_tokenizer_pads_masks_and_names_unknown_words() -> None:
    tok = tokenizer()
    ids = tok(["a red sneaker", ""])
    assert ids.ids.shape == (2, MAX_TOKENS) and ids.ids.dtype == torch.long
    assert ids.ids[0, :4].tolist() == [BOS_ID, tok.ids["a"], tok.ids["red"], tok.ids["sneaker"]]
    assert ids.ids[0, 4:].eq(PAD_ID).all() and ids.mask[0].tolist() == [True] * 4 + [False] * (MAX_TOKENS - 4)
    assert ids.ids[1].tolist() == tok.null_ids().tolist() == [BOS_ID] + [PAD_ID] * (MAX_TOKENS - 1)
    with pytest.raises(
        DyditError, match=r"unknown word\(s\) 'cat', 'purple' in prompt 'A purple cat'"
    ) as err:
        tok("A purple cat")
    assert "\n" not in str(err.value)
    with pytest.raises(DyditError, match="at most 15"):
        tok(" ".join(["a"] * 16))
    for bad in (["a", "a"], ["Upper"], ["two words"], ["<pad>"]):
        with pytest.raises(DyditError):
            WordTokenizer(bad, 4)


def test_token_ids_condition_batch_operations() -> None:
    tok = tokenizer()
    c = tok(["a bag", "two coats", "a red sneaker left of a bag"])
    null = tok.null_ids()
    assert len(c) == 3 and torch.equal(c.null().ids, null.expand(3, -1))
    dropped = c.drop(torch.tensor([False, True, False]))
    assert torch.equal(dropped.ids[1], null) and torch.equal(dropped.ids[[0, 2]], c.ids[[0, 2]])
    doubled = c.with_null()
    assert len(doubled) == 6 and torch.equal(doubled.ids[3:], c.null().ids)
    assert torch.equal(c.select([2, 0]).ids, c.ids[[2, 0]]) and torch.equal(c.repeat(2).ids[3:], c.ids)
    assert torch.equal(cat([c, c.select(1)]).ids[-1], c.ids[1])
    assert c.same_null(c.select(0)) and not c.same_null(ClassLabels(torch.zeros(3, dtype=torch.long), 10))
    assert c.to("cpu").network_input() is not None and c.network_input() is c
    g = torch.Generator().manual_seed(0)
    assert c.dropout(1.0, generator=g).ids.eq(null).all() and torch.equal(c.dropout(0.0).ids, c.ids)
    with pytest.raises(DyditError, match="long tensor"):
        TokenIds(torch.zeros(2, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(DyditError, match="null token ids"):
        TokenIds(torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def _reference(enc: TextEncoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's forward written out: explicit softmax attention with -inf on padded keys."""
    keep = ids != PAD_ID
    x = enc.token_embed.weight[ids] + enc.pos_embed[0]
    for layer in enc.layers:
        b, n, d = x.shape
        h = layer.heads
        y = F.layer_norm(x, (d,), layer.norm1.weight, layer.norm1.bias)
        q, k, v = (y @ layer.qkv.weight.T + layer.qkv.bias).split(d, dim=-1)
        q, k, v = (t.view(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        x = x + a @ layer.proj.weight.T + layer.proj.bias
        y = F.layer_norm(x, (d,), layer.norm2.weight, layer.norm2.bias)
        y = F.gelu(y @ layer.fc1.weight.T + layer.fc1.bias, approximate="tanh")
        x = x + y @ layer.fc2.weight.T + layer.fc2.bias
    x = F.layer_norm(x, (x.shape[-1],), enc.norm.weight, enc.norm.bias) * keep[..., None]
    return x, x[:, 0] @ enc.pool.weight.T + enc.pool.bias


def test_encoder_matches_the_reference_and_ignores_padding(encoder: TextEncoder) -> None:
    prompts = ["a bag", "a blue shirt and a yellow trouser", "", "four ankle boots"]
    tokens = encoder.tokenizer(prompts)
    with torch.no_grad():
        emb, pooled = encoder(tokens.ids)
        ref_emb, ref_pooled = _reference(encoder, tokens.ids)
    assert emb.shape == (4, MAX_TOKENS, 32) and pooled.shape == (4, 24)
    torch.testing.assert_close(emb, ref_emb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)
    assert emb[0, 3:].eq(0).all() and emb[0, :3].ne(0).any(dim=-1).all()
    # a caption's encoding does not depend on the other rows of its batch
    with torch.no_grad():
        alone = encoder(tokens.ids[1:2])
    torch.testing.assert_close(alone[0][0], emb[1], atol=1e-6, rtol=1e-6)


def test_encode_gives_a_text_condition_with_the_empty_caption_as_null(encoder: TextEncoder) -> None:
    with torch.no_grad():
        cond = encoder.encode_prompts(["a red sneaker left of a bag", "two bags"])
        empty = encoder.encode_prompts("")
    assert isinstance(cond, TextCondition) and cond.embeddings.shape == (2, MAX_TOKENS, 32)
    assert cond.pooled.shape == (2, 24) and cond.mask[0].sum() == 8 and cond.mask[1].sum() == 3
    torch.testing.assert_close(cond.null().embeddings[0], empty.embeddings[0])
    torch.testing.assert_close(cond.null().pooled[0], empty.pooled[0])
    assert torch.equal(cond.null().mask[0], empty.mask[0])
    # guidance's doubled batch commutes with encoding: encode([c; null]) == [encode(c); null]
    tokens = encoder.tokenizer(["a coat", "three dresses"])
    with torch.no_grad():
        a, b = encoder.encode(tokens.with_null()), encoder.encode(tokens).with_null()
    torch.testing.assert_close(a.embeddings, b.embeddings, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-6, rtol=1e-6)


def test_condition_accepts_token_ids_or_precomputed_embeddings(encoder: TextEncoder) -> None:
    tokens = encoder.tokenizer("a bag")
    assert isinstance(encoder.condition(tokens), TextCondition)
    # a FLUX user's own encoder outputs: any L, D, P, built from tensors
    pre = TextCondition(torch.randn(2, 7, 48), torch.randn(2, 12), torch.ones(2, 7, dtype=torch.bool))
    assert encoder.condition(pre) is pre
    with pytest.raises(DyditError, match="token ids or text embeddings"):
        encoder.condition(ClassLabels(torch.zeros(1, dtype=torch.long), 10))
    with pytest.raises(DyditError, match=r"\(B, 16\)"):
        encoder(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(DyditError, match=r"0\.\.39"):
        encoder(torch.full((1, 16), 99, dtype=torch.long))


def test_encoder_trains_and_round_trips_through_safetensors(encoder: TextEncoder, tmp_path) -> None:
    encoder.train()
    tokens = encoder.tokenizer(["a bag", "a coat"])
    cond = encoder.encode(tokens)
    (cond.embeddings.square().sum() + cond.pooled.square().sum()).backward()
    assert all(p.grad is not None for p in encoder.parameters())
    path = tmp_path / "enc.safetensors"
    save_file(encoder.state_dict(), str(path), metadata={"config": str(encoder.config.to_dict())})
    again = TextEncoder(TextEncoderConfig.from_dict(encoder.config.to_dict())).eval()
    again.load_state_dict(load_file(str(path)))
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(tokens.ids)[0], encoder(tokens.ids)[0])
    assert again.config == encoder.config and again.tokenizer.tokens == encoder.tokenizer.tokens
    with pytest.raises(DyditError, match="unknown text encoder config"):
        TextEncoderConfig.from_dict({"vocab": ["a"], "layers": 3})
    with pytest.raises(DyditError, match="divisible"):
        TextEncoderConfig(VOCAB, width=30, heads=4)


def test_encoder_learns_what_captions_say(one_thread) -> None:
    """Trained briefly on grammar captions, the pooled vector tells the category and the first item,
    and the per-token embeddings (masked mean) the first item's colour: both outputs carry content."""
    import numpy as np

    from dydit.data.compose_grammar import CATEGORIES, COLOURS, sample_prompt

    torch.manual_seed(0)
    enc = TextEncoder(TextEncoderConfig(VOCAB, MAX_TOKENS, width=32, depth=2, heads=4))
    heads = torch.nn.ModuleDict(
        {
            "category": torch.nn.Linear(32, 6),
            "item": torch.nn.Linear(32, 10),
            "colour": torch.nn.Linear(32, 7),
        }
    )
    opt = torch.optim.Adam([*enc.parameters(), *heads.parameters()], lr=3e-3)
    rng = np.random.default_rng(0)

    def batch(n: int):
        prompts = [sample_prompt(rng) for _ in range(n)]
        first = [p.things[0] for p in prompts]
        targets = {
            "category": torch.tensor([CATEGORIES.index(p.category) for p in prompts]),
            "item": torch.tensor([t.item for t in first]),
            "colour": torch.tensor([len(COLOURS) if t.colour is None else t.colour for t in first]),
        }
        return enc.tokenizer([p.text for p in prompts]), targets

    def logits(tokens: TokenIds) -> dict[str, torch.Tensor]:
        cond = enc.encode(tokens)
        mean = cond.embeddings.sum(1) / cond.mask.sum(1, keepdim=True)
        return {
            "category": heads["category"](cond.pooled),
            "item": heads["item"](cond.pooled),
            "colour": heads["colour"](mean),
        }

    for _ in range(60):
        tokens, targets = batch(48)
        out = logits(tokens)
        loss = sum(F.cross_entropy(out[k], targets[k]) for k in targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tokens, targets = batch(400)
    with torch.no_grad():
        out = logits(tokens)
    for k in targets:
        acc = (out[k].argmax(1) == targets[k]).float().mean()
        assert acc > 0.95, k


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"vocab": "ab"}, "vocab must be a list of words"),
        ({"vocab": ["a", "a"]}, "distinct words"),
        ({"vocab": ["a", 3]}, "vocab must be a list of words"),
        ({"width": "64"}, "width must be an integer"),
        ({"depth": True}, "depth must be an integer"),
        ({"width": 10**9}, r"width must be in \[1, 65,536\], got 1000000000"),
        ({"width": 6, "heads": 4}, "width 6 must be divisible by its 4 heads"),
        ({"mlp_ratio": 0}, r"mlp_ratio must be in \(0, 64\]"),
        ({"max_length": 0}, r"max_length must be in \[1, 65,536\], got 0"),
        ({"pooled_dim": 1.5}, "pooled_dim must be an integer"),
    ],
)
def test_a_stored_text_encoder_config_of_the_wrong_kind_is_a_one_line_error(fields, message) -> None:
    stored = {"vocab": ["a", "bag"], "width": 8, "heads": 2, **fields}
    with pytest.raises(DyditError, match=message) as err:
        TextEncoderConfig.from_dict(stored)
    assert "\n" not in str(err.value)
