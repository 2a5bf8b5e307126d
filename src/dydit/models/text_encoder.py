"""A tiny text encoder trained with a text-to-image model (docs/METHOD.md §17.3; docs/ARCHITECTURE.md §3).

FLUX conditions on two frozen encoders: T5's per-token embeddings (the sequence the image tokens
attend to) and CLIP's pooled vector (added to the timestep embedding). Neither can be downloaded
here, and the captions of :mod:`dydit.data.compose_grammar` use 38 words, so the model learns its
own: token and learned position embeddings, ``depth`` pre-norm transformer layers (bidirectional
self-attention over the caption's tokens, padding masked), a final LayerNorm. Its outputs:

- ``embeddings`` (B, L, D): one vector per token, zero at padding (the T5 role);
- ``pooled`` (B, P): a linear map of the BOS token's output (the CLIP role);
- ``mask`` (B, L): True on BOS and the words.

:meth:`TextEncoder.encode` wraps them in a :class:`~dydit.conditioning.TextCondition` whose null
text is the encoding of the empty caption (BOS alone), as classifier-free guidance of a model
trained with caption dropout needs. The encoder is an ``nn.Module``: its state dict sits in the
model's checkpoint beside the network's, its config (vocabulary included) in the metadata.
A user with precomputed prompt embeddings (e.g. FLUX's ``encode_prompt``) builds a
:class:`~dydit.conditioning.TextCondition` from those tensors and passes it instead of token ids:
:meth:`TextEncoder.condition` lets it through unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dydit.conditioning import Condition, NullText, TextCondition
from dydit.config_checks import check_type, shown
from dydit.errors import DyditError
from dydit.text import BOS_ID, TokenIds, WordTokenizer


@dataclass(frozen=True)
class TextEncoderConfig:
    """The encoder's shape and its tokenizer: ``vocab`` (the words, without the special tokens),
    ``max_length`` ids per caption, ``width`` D, ``depth`` layers, ``heads``, ``mlp_ratio`` and
    ``pooled_dim`` P (default: ``width``)."""

    vocab: tuple[str, ...]
    max_length: int = 16
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    pooled_dim: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.vocab, (list, tuple)) or not all(isinstance(w, str) and w for w in self.vocab):
            raise DyditError(f"text encoder vocab must be a list of words, got {shown(self.vocab)}")
        if len(set(self.vocab)) != len(self.vocab) or len(self.vocab) > 1_000_000:
            raise DyditError(
                f"text encoder vocab must hold distinct words (at most 1,000,000), got {len(self.vocab)}"
            )
        object.__setattr__(self, "vocab", tuple(self.vocab))
        for name, low, top in (
            ("max_length", 1, 65_536),
            ("width", 1, 65_536),
            ("depth", 0, 256),
            ("heads", 1, 1024),
        ):
            value = getattr(self, name)
            check_type(name, value, int, "text encoder field ")
            if not low <= value <= top:
                raise DyditError(f"text encoder field {name} must be in [{low}, {top:,}], got {value}")
        if self.width % self.heads:
            raise DyditError(f"text encoder width {self.width} must be divisible by its {self.heads} heads")
        if self.pooled_dim is not None:
            check_type("pooled_dim", self.pooled_dim, int, "text encoder field ")
            if self.pooled_dim < 1:
                raise DyditError(f"text encoder pooled_dim must be positive, got {self.pooled_dim}")
        check_type("mlp_ratio", self.mlp_ratio, (int, float), "text encoder field ")
        if not 0 < self.mlp_ratio <= 64:
            raise DyditError(f"text encoder field mlp_ratio must be in (0, 64], got {self.mlp_ratio}")

    @property
    def pooled(self) -> int:
        return self.width if self.pooled_dim is None else self.pooled_dim

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vocab"] = list(self.vocab)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TextEncoderConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise DyditError(f"unknown text encoder config fields: {sorted(unknown)}")
        return cls(**d)


class _Layer(nn.Module):
    """Pre-norm self-attention and MLP, each with a residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor, attend: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])  # keys masked
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class TextEncoder(nn.Module):
    """Token ids (B, L) -> per-token embeddings (B, L, D) and a pooled vector (B, P); see the module docs."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.tokenizer = WordTokenizer(config.vocab, config.max_length)
        d = config.width
        self.token_embed = nn.Embedding(self.tokenizer.vocab_size, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.max_length, d))
        self.layers = nn.ModuleList(_Layer(d, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d)
        self.pool = nn.Linear(d, config.pooled)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``ids`` (B, L) long -> (embeddings (B, L, D), pooled (B, P)); padding embeddings are zero."""
        if ids.dim() != 2 or ids.shape[1] != self.config.max_length:
            raise DyditError(
                f"token ids must be (B, {self.config.max_length}) for this text encoder, "
                f"got {tuple(ids.shape)}"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.tokenizer.vocab_size):
            raise DyditError(f"token ids must lie in 0..{self.tokenizer.vocab_size - 1}")
        attend = ids != 0
        x = self.token_embed(ids) + self.pos_embed
        for layer in self.layers:
            x = layer(x, attend)
        x = self.norm(x) * attend.unsqueeze(-1).to(x.dtype)
        return x, self.pool(x[:, 0])

    def null_text(self) -> NullText:
        """The empty caption's encoding: the null condition of guidance and caption dropout."""
        null = self.tokenizer.null_ids().to(self.pos_embed.device)
        e, p = self(null.unsqueeze(0))
        return NullText(e[0], p[0], null != 0)

    def encode(self, tokens: TokenIds) -> TextCondition:
        """Token ids -> a :class:`~dydit.conditioning.TextCondition` with the empty caption as its null."""
        if tokens.ids.shape[1] != self.config.max_length or int(tokens.null_ids[0]) != BOS_ID:
            raise DyditError("these token ids were not made by this text encoder's tokenizer")
        e, p = self(tokens.ids.to(self.pos_embed.device))
        return TextCondition(e, p, tokens.mask.to(e.device), self.null_text())

    def encode_prompts(self, prompts: Sequence[str] | str) -> TextCondition:
        """Prompts (checked by the tokenizer: unknown words are an error naming them) -> a TextCondition."""
        return self.encode(self.tokenizer(prompts))

    def condition(self, y: Condition) -> TextCondition:
        """What a text network conditions on: token ids encoded here, a TextCondition (precomputed
        embeddings) as it is."""
        if isinstance(y, TokenIds):
            return self.encode(y)
        if isinstance(y, TextCondition):
            return y
        raise DyditError(
            f"a text-to-image model is conditioned on token ids or text embeddings, not {type(y).__name__}"
        )
