"""Captions as token ids: a word tokenizer and the :class:`TokenIds` condition (docs/ARCHITECTURE.md §3).

A text-to-image model trained here learns its own text encoder (docs/METHOD.md §17.3), so a data
batch does not carry embeddings: it carries the captions' token ids, a :class:`TokenIds` condition
whose null condition is the empty caption. Caption dropout and the doubled batch of guidance work
on the ids (the empty caption's ids replace a dropped row); the model's
:class:`~dydit.models.text_encoder.TextEncoder` turns them into a
:class:`~dydit.conditioning.TextCondition` inside the network's forward (its
:meth:`~dydit.models.text_encoder.TextEncoder.condition`), so that the encoder trains with the model.

The tokenizer lowercases, splits on white space and maps each word to its index in a fixed
vocabulary; every caption starts with :data:`BOS` (so the empty caption still has one token to
attend to) and is padded with :data:`PAD` (id 0) to ``max_length``. A word outside the vocabulary is
an error that names it. This module sits in the bottom layer beside :mod:`dydit.conditioning`: the
data (which tokenizes captions) and the models (whose encoder carries its vocabulary) both use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dydit.conditioning import Condition, Device
from dydit.errors import DyditError

PAD, BOS = "<pad>", "<bos>"
PAD_ID, BOS_ID = 0, 1
SPECIAL_TOKENS = (PAD, BOS)


class WordTokenizer:
    """Words to ids over a fixed vocabulary: ``vocab`` lists the words (the special tokens come first,
    added here); every encoded caption is ``max_length`` ids: BOS, the words, PAD."""

    def __init__(self, vocab: Iterable[str], max_length: int):
        words = tuple(vocab)
        bad = [w for w in words if not w or w != w.lower() or w.split() != [w] or w in SPECIAL_TOKENS]
        if bad:
            raise DyditError(f"vocabulary words must be single lowercase words, not special tokens: {bad}")
        if len(set(words)) != len(words):
            raise DyditError("the vocabulary lists a word twice")
        if max_length < 2:
            raise DyditError(f"max_length must be at least 2 (BOS and one word), got {max_length}")
        self.words = words
        self.tokens = SPECIAL_TOKENS + words
        self.ids = {w: i for i, w in enumerate(self.tokens)}
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def split(self, text: str) -> list[str]:
        """The words of ``text``: lowercased, split on white space."""
        return text.lower().split()

    def check(self, text: str) -> list[str]:
        """The words of ``text``; a one-line DyditError names any unknown word or a too long caption."""
        words = self.split(text)
        unknown = sorted({w for w in words if w not in self.ids or w in SPECIAL_TOKENS})
        if unknown:
            raise DyditError(
                f"unknown word(s) {', '.join(repr(w) for w in unknown)} in prompt {text!r}; "
                f"the vocabulary is: {' '.join(self.words)}"
            )
        if len(words) + 1 > self.max_length:
            raise DyditError(
                f"prompt {text!r} has {len(words)} words; at most {self.max_length - 1} fit this tokenizer"
            )
        return words

    def encode_one(self, text: str) -> list[int]:
        """``max_length`` ids of one caption: BOS, its words, PAD."""
        ids = [BOS_ID] + [self.ids[w] for w in self.check(text)]
        return ids + [PAD_ID] * (self.max_length - len(ids))

    def decode_one(self, ids: Sequence[int] | Tensor) -> str:
        """The caption of one row of ids (BOS and PAD dropped)."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return " ".join(self.tokens[i] for i in values if i not in (PAD_ID, BOS_ID))

    def null_ids(self) -> Tensor:
        """The empty caption's ids (max_length,): BOS then PAD."""
        return torch.tensor(self.encode_one(""), dtype=torch.long)

    def __call__(self, texts: Sequence[str] | str) -> TokenIds:
        """The captions ``texts`` (a string is one caption) as a :class:`TokenIds` batch."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.encode_one(t) for t in texts]
        ids = torch.tensor(rows, dtype=torch.long).view(len(rows), self.max_length)
        return TokenIds(ids, self.null_ids())


@dataclass(frozen=True, eq=False)
class TokenIds(Condition):
    """Token ids (B, L) long (``PAD_ID`` pads) and the null caption's ids (L,): captions before encoding.

    The network receives the condition itself (:meth:`network_input`) and encodes it with its text
    encoder; :attr:`mask` (B, L) bool marks the tokens to attend to (every id but PAD)."""

    ids: Tensor
    null_ids: Tensor

    def __post_init__(self) -> None:
        ids, null = self.ids, self.null_ids
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            raise DyditError(f"token ids must be a long tensor (B, L), got {_describe(ids)}")
        if not isinstance(null, Tensor) or null.shape != ids.shape[1:] or null.dtype != torch.long:
            raise DyditError(
                f"the null token ids must be a long tensor ({ids.shape[1]},), got {_describe(null)}"
            )
        object.__setattr__(self, "null_ids", null.to(ids.device))

    @property
    def mask(self) -> Tensor:
        return self.ids != PAD_ID

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> TokenIds:
        return TokenIds(fn(self.ids), self.null_ids)

    def to(
        self, device: Device = None, dtype: torch.dtype | None = None, *, non_blocking: bool = False
    ) -> TokenIds:
        return TokenIds(self.ids.to(device, non_blocking=non_blocking), self.null_ids)

    def null(self) -> TokenIds:
        return TokenIds(self.null_ids.expand_as(self.ids).contiguous(), self.null_ids)

    def drop(self, mask: Tensor) -> TokenIds:
        mask = mask.to(self.device).view(-1, 1)
        return TokenIds(torch.where(mask, self.null_ids.view(1, -1), self.ids), self.null_ids)

    def network_input(self) -> TokenIds:
        return self

    def same_null(self, other: Condition) -> bool:
        return (
            isinstance(other, TokenIds)
            and other.ids.shape[1:] == self.ids.shape[1:]
            and torch.equal(other.null_ids.to(self.device), self.null_ids)
        )

    def _cat(self, parts: Sequence[TokenIds]) -> TokenIds:
        return TokenIds(torch.cat([p.ids for p in parts]), self.null_ids)


def _describe(v: object) -> str:
    return f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
