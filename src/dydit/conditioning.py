"""What a network is conditioned on, with its null condition for guidance (docs/ARCHITECTURE.md §3).

A :class:`Condition` is a batch of B conditions of one kind that knows its own null condition, the
"no condition" of classifier-free guidance (docs/METHOD.md §1.3) and of class/caption dropout in
training (docs/METHOD.md §1.2 item 4):

- :class:`ClassLabels`: labels (B,) and the null class index (``num_classes`` for DiT);
- :class:`TextCondition`: sequence embeddings (B, L, D), optionally a pooled vector (B, P) and an
  attention mask (B, L) (True: a token to attend to), and a :class:`NullText` (the empty prompt's
  encoding, or zeros).

Every kind has the batch operations that samplers, guidance and training need: ``len``,
:meth:`~Condition.select` and :meth:`~Condition.repeat` rows, :func:`cat` (same kind and null),
:meth:`~Condition.to` a device, :meth:`~Condition.null`, :meth:`~Condition.drop` rows to the null
condition and :meth:`~Condition.dropout` with a probability, :meth:`~Condition.with_null` (the
doubled batch [c; null] of guidance).

How a condition reaches a network: samplers carry it untouched as ``model_kwargs={"y": cond}``,
:func:`dydit.diffusion.guided` doubles it, and one adapter, :func:`conditioned`, hands the network
``cond.network_input()``: the label tensor for class labels, so a DiT, SiT or DyDiT keeps its seam
``model(x, t, y)`` with y (B,) labels, and the :class:`TextCondition` itself for a text family.
A plain label tensor is still accepted wherever a condition is (:func:`as_condition`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import torch
from torch import Tensor

from dydit.errors import DyditError

Index = int | slice | Sequence[int] | Tensor  # rows: a slice, row numbers, or a bool/long tensor
Device = str | torch.device | None


class Condition(ABC):
    """A batch of B conditions of one kind, with the null condition of that kind."""

    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> Self:
        """The same kind and null with ``fn`` applied to each per-row tensor (dim 0 is the batch)."""

    @abstractmethod
    def to(
        self, device: Device = None, dtype: torch.dtype | None = None, *, non_blocking: bool = False
    ) -> Self:
        """On ``device``; ``dtype`` casts floating-point tensors only (labels and masks keep theirs)."""

    @abstractmethod
    def null(self) -> Self:
        """B rows of the null condition."""

    @abstractmethod
    def drop(self, mask: Tensor) -> Self:
        """Rows where ``mask`` (B,) bool is True replaced by the null condition."""

    @abstractmethod
    def network_input(self) -> Any:
        """What the network receives as ``y``."""

    @abstractmethod
    def same_null(self, other: Condition) -> bool:
        """Whether ``other`` is of this kind, shape and null (so that the two can be concatenated)."""

    @abstractmethod
    def _cat(self, parts: Sequence[Self]) -> Self: ...

    @property
    def batch_size(self) -> int:
        return len(self)

    def select(self, index: Index) -> Self:
        """The rows ``index`` (an int keeps its row as a batch of one)."""
        if isinstance(index, int):
            index = [index]
        if isinstance(index, Tensor):
            return self.map_rows(lambda r: r[index.to(r.device)])
        return self.map_rows(lambda r: r[index])

    def repeat(self, n: int) -> Self:
        """The batch n times over, [c; c; ...] (n·B rows), like ``torch.cat([c] * n)``."""
        return self.map_rows(lambda r: r.repeat(n, *[1] * (r.dim() - 1)))

    def dropout(self, p: float, generator: torch.Generator | None = None) -> Self:
        """Each row replaced by the null condition with probability ``p`` (class/caption dropout).

        Draws ``torch.rand(B)`` on the condition's device, as DiT's label embedder does."""
        return self.drop(torch.rand(len(self), device=self.device, generator=generator) < p)

    def with_null(self) -> Self:
        """[self; null]: the doubled batch of classifier-free guidance (2B rows)."""
        return cat([self, self.null()])


def cat(conditions: Sequence[Condition]) -> Any:
    """The rows of ``conditions`` one after another; they must share their kind and null condition."""
    if not conditions:
        raise DyditError("cat needs at least one condition")
    first = conditions[0]
    for c in conditions[1:]:
        if not first.same_null(c):
            raise DyditError(
                f"cannot concatenate {type(first).__name__} and {type(c).__name__} conditions with "
                "different shapes or null conditions"
            )
    return first._cat(conditions)


def as_condition(y: Condition | Tensor, null_class: int | None = None) -> Condition:
    """``y`` itself if it is a condition, else class labels (B,) with the null class ``null_class``."""
    if isinstance(y, Condition):
        return y
    if null_class is None:
        raise DyditError("class labels given as a tensor need their null class (null_class)")
    return ClassLabels(y, null_class)


def network_input(y: Any) -> Any:
    """What the network receives for ``y``: a condition's :meth:`~Condition.network_input`, else y."""
    return y.network_input() if isinstance(y, Condition) else y


def conditioned(model_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``model_fn(x, t, y, **kwargs)`` that takes a :class:`Condition` as ``y`` and passes the network
    its :meth:`~Condition.network_input` (anything else as it is): the one place where a condition
    becomes the network's argument."""

    def fn(x: Tensor, t: Tensor, y: Any, **kwargs: Any) -> Tensor:
        return model_fn(x, t, network_input(y), **kwargs)

    return fn


@dataclass(frozen=True, eq=False)
class ClassLabels(Condition):
    """Class labels (B,) (any integer dtype, kept) and the label of the null class."""

    labels: Tensor
    null_class: int

    def __post_init__(self) -> None:
        lab = self.labels
        integer = isinstance(lab, Tensor) and not (lab.is_floating_point() or lab.is_complex())
        if not integer or lab.dim() != 1 or lab.dtype == torch.bool:
            raise DyditError(f"class labels must be an integer tensor (B,), got {_describe(lab)}")

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def device(self) -> torch.device:
        return self.labels.device

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> ClassLabels:
        return ClassLabels(fn(self.labels), self.null_class)

    def to(
        self, device: Device = None, dtype: torch.dtype | None = None, *, non_blocking: bool = False
    ) -> ClassLabels:
        return ClassLabels(self.labels.to(device, non_blocking=non_blocking), self.null_class)

    def null(self) -> ClassLabels:
        return ClassLabels(torch.full_like(self.labels, self.null_class), self.null_class)

    def drop(self, mask: Tensor) -> ClassLabels:
        null = torch.full_like(self.labels, self.null_class)
        return ClassLabels(torch.where(mask, null, self.labels), self.null_class)

    def network_input(self) -> Tensor:
        return self.labels

    def same_null(self, other: Condition) -> bool:
        return isinstance(other, ClassLabels) and other.null_class == self.null_class

    def _cat(self, parts: Sequence[ClassLabels]) -> ClassLabels:
        return ClassLabels(torch.cat([p.labels for p in parts]), self.null_class)


@dataclass(frozen=True, eq=False)
class NullText:
    """The null text condition of one row: embeddings (L, D), pooled (P,), mask (L,) bool.

    Give the text encoder's encoding of the empty prompt, or :meth:`zeros`."""

    embeddings: Tensor
    pooled: Tensor | None = None
    mask: Tensor | None = None

    @classmethod
    def zeros(
        cls,
        length: int,
        dim: int,
        pooled_dim: int | None = None,
        *,
        masked: bool = False,
        dtype: torch.dtype = torch.float32,
        device: Device = None,
    ) -> NullText:
        """Zero embeddings (and pooled vector); with ``masked``, a mask that attends to every token."""
        return cls(
            torch.zeros(length, dim, dtype=dtype, device=device),
            None if pooled_dim is None else torch.zeros(pooled_dim, dtype=dtype, device=device),
            torch.ones(length, dtype=torch.bool, device=device) if masked else None,
        )

    def to(
        self, device: Device = None, dtype: torch.dtype | None = None, *, non_blocking: bool = False
    ) -> NullText:
        fields = (self.embeddings, self.pooled, self.mask)
        return NullText(*(_move(v, device, dtype, non_blocking) for v in fields))

    def equals(self, other: NullText) -> bool:
        return self is other or all(
            (a is None and b is None) or (a is not None and b is not None and _equal(a, b))
            for a, b in zip(
                (self.embeddings, self.pooled, self.mask), (other.embeddings, other.pooled, other.mask)
            )
        )


@dataclass(frozen=True, eq=False)
class TextCondition(Condition):
    """Text: embeddings (B, L, D), pooled (B, P) or None, mask (B, L) bool or None (True: attend).

    ``null_text`` is the null condition of one row (:class:`NullText`, with the same fields present
    and shapes (L, D), (P,), (L,)); None means zeros (and a mask attending to every token). It is
    held on the embeddings' device and dtype. A text network receives the condition itself as ``y``.
    """

    embeddings: Tensor
    pooled: Tensor | None = None
    mask: Tensor | None = None
    null_text: NullText | None = None

    def __post_init__(self) -> None:
        e = self.embeddings
        if not isinstance(e, Tensor) or e.dim() != 3 or not e.is_floating_point():
            raise DyditError(f"text embeddings must be a float tensor (B, L, D), got {_describe(e)}")
        b, length, _ = e.shape
        p = self.pooled
        if p is not None and (p.dim() != 2 or p.shape[0] != b or not p.is_floating_point()):
            raise DyditError(f"the pooled text vector must be a float tensor ({b}, P), got {_describe(p)}")
        m = self.mask
        if m is not None and (m.shape != (b, length) or m.dtype != torch.bool):
            raise DyditError(f"the text mask must be a bool tensor ({b}, {length}), got {_describe(m)}")
        null = self.null_text
        if null is None:
            null = NullText.zeros(length, e.shape[2], None if p is None else p.shape[1], masked=m is not None)
        null = null.to(e.device, e.dtype)
        _check_null(null, e.shape[1:], None if p is None else p.shape[1:], None if m is None else m.shape[1:])
        object.__setattr__(self, "null_text", null)

    @property
    def _null(self) -> NullText:
        assert self.null_text is not None  # set in __post_init__
        return self.null_text

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def _fields(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.embeddings, self.pooled, self.mask

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> TextCondition:
        e, p, m = (None if v is None else fn(v) for v in self._fields())
        return TextCondition(e, p, m, self.null_text)

    def to(
        self, device: Device = None, dtype: torch.dtype | None = None, *, non_blocking: bool = False
    ) -> TextCondition:
        e, p, m = (_move(v, device, dtype, non_blocking) for v in self._fields())
        return TextCondition(e, p, m, self._null.to(device, dtype, non_blocking=non_blocking))

    def null(self) -> TextCondition:
        b, n = len(self), self._null
        e, p, m = (
            None if v is None else v.unsqueeze(0).expand(b, *v.shape).contiguous()
            for v in (n.embeddings, n.pooled, n.mask)
        )
        return TextCondition(e, p, m, n)

    def drop(self, mask: Tensor) -> TextCondition:
        mask = mask.to(self.device)
        e, p, m = (
            None if v is None else torch.where(mask.view(-1, *[1] * (v.dim() - 1)), nv, v)
            for v, nv in zip(self._fields(), (self._null.embeddings, self._null.pooled, self._null.mask))
        )
        return TextCondition(e, p, m, self.null_text)

    def network_input(self) -> TextCondition:
        return self

    def same_null(self, other: Condition) -> bool:
        return (
            isinstance(other, TextCondition)
            and other.embeddings.shape[1:] == self.embeddings.shape[1:]
            and other._null.equals(self._null)
        )

    def _cat(self, parts: Sequence[TextCondition]) -> TextCondition:
        columns = zip(*(part._fields() for part in parts))  # embeddings, pooled, mask of every part
        e, p, m = (None if col[0] is None else torch.cat(col) for col in columns)
        return TextCondition(e, p, m, self.null_text)


def _check_null(null: NullText, emb: torch.Size, pooled: torch.Size | None, mask: torch.Size | None) -> None:
    for name, value, want in (
        ("embeddings", null.embeddings, emb),
        ("pooled", null.pooled, pooled),
        ("mask", null.mask, mask),
    ):
        got = None if value is None else value.shape
        if got != want:
            raise DyditError(
                f"the null text {name} must have shape {None if want is None else tuple(want)} to match "
                f"the condition, got {None if got is None else tuple(got)}"
            )
    if null.mask is not None and null.mask.dtype != torch.bool:
        raise DyditError(f"the null text mask must be bool, got {null.mask.dtype}")


def _move(v: Tensor | None, device: Device, dtype: torch.dtype | None, non_blocking: bool) -> Tensor | None:
    """``v`` on ``device``; cast to ``dtype`` only if it is floating point."""
    if v is None:
        return None
    return v.to(device, dtype if v.is_floating_point() else None, non_blocking=non_blocking)


def _equal(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device)))


def _describe(v: Any) -> str:
    return f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
