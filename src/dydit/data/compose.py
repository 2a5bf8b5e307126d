"""Captioned compositions of Fashion-MNIST items, made on the fly (docs/METHOD.md §17.1).

A composition is a 64x64 RGB canvas cut into a 2x2 grid of 32x32 cells (cell 0 top left, 1 top
right, 2 bottom left, 3 bottom right). Each item a caption names is a 28x28 Fashion-MNIST image
centred in its cell (a 2-pixel margin), its grey level multiplied by its colour's RGB, on black;
cells no item takes stay black. The caption's :class:`~dydit.data.compose_grammar.Prompt` decides
the items and colours, a :class:`Layout` records where each went.

:class:`ComposeDataset` (``--data fmnist-compose``) is a map-style dataset of ``length`` such
images: item ``i`` is a function of ``(seed, i)`` alone (its prompt from the training split, its
cells, its Fashion-MNIST images), so the resumable loader's order and any restart give the same
data. A batch is ``(x, TokenIds)``: images in the model's pixel space [-1, 1] and the captions'
token ids (:mod:`dydit.text`), which the model's text encoder turns into a
:class:`~dydit.conditioning.TextCondition` (docs/ARCHITECTURE.md §3).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dydit.data.base import DataInfo, ImageDataset
from dydit.data.compose_grammar import COLOUR_RGB, RELATIONS, SPLITS, Prompt, sample_prompt, tokenizer
from dydit.data.loader import derive_seed
from dydit.errors import DyditError
from dydit.text import TokenIds

CANVAS, CELL, ITEM_SIZE = 64, 32, 28
MARGIN = (CELL - ITEM_SIZE) // 2
GRID = CANVAS // CELL  # cells per side
NUM_CELLS = GRID * GRID
DEFAULT_LENGTH = 60_000  # one "epoch" of compositions: as many as Fashion-MNIST's training images
NAME = "fmnist-compose"


@dataclass(frozen=True)
class Placement:
    """One item on the canvas: its ``cell`` (0-3, row-major), ``item`` and ``colour`` (indices into
    the grammar's ITEMS and COLOURS) and ``image``, the Fashion-MNIST image index it was drawn from."""

    cell: int
    item: int
    colour: int
    image: int = -1


@dataclass(frozen=True)
class Layout:
    """Where a composition's items went: one :class:`Placement` per item (a position prompt's two
    items in the prompt's order; a counting prompt's items in cell order)."""

    placements: tuple[Placement, ...]

    def cell_of(self, k: int) -> int:
        return self.placements[k].cell


def cell_row_col(cell: int) -> tuple[int, int]:
    return divmod(cell, GRID)


def relation_holds(relation: int, a: int, b: int) -> bool:
    """Whether cell ``a`` is ``RELATIONS[relation]`` cell ``b`` in the grid's sense (left of: a's
    column is left of b's, whatever the rows; above: a's row is above b's)."""
    (ra, ca), (rb, cb) = cell_row_col(a), cell_row_col(b)
    name = RELATIONS[relation]
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[name]


def place(prompt: Prompt, rng: np.random.Generator, by_class: list[np.ndarray] | None = None) -> Layout:
    """Random cells (and, given ``by_class``, the image indices of each class) for ``prompt``'s items."""
    if prompt.relation is not None:
        pairs = [
            (a, b)
            for a in range(NUM_CELLS)
            for b in range(NUM_CELLS)
            if relation_holds(prompt.relation, a, b)
        ]
        cells = list(pairs[int(rng.integers(len(pairs)))])
        kinds = list(prompt.things)
    else:
        kinds = [t for t in prompt.things for _ in range(t.count)]
        cells = [int(c) for c in rng.permutation(NUM_CELLS)[: len(kinds)]]
        if len(prompt.things) == 1:
            cells.sort()
    placements = []
    for cell, thing in zip(cells, kinds):
        image = (
            -1
            if by_class is None
            else int(by_class[thing.item][int(rng.integers(len(by_class[thing.item])))])
        )
        placements.append(Placement(cell, thing.item, thing.drawn_colour, image))
    return Layout(tuple(placements))


def render(layout: Layout, images: np.ndarray) -> np.ndarray:
    """The composition as uint8 (64, 64, 3): each placement's 28x28 grey image ``images[p.image]``
    times its colour's RGB, centred in its cell, on black."""
    canvas = np.zeros((CANVAS, CANVAS, 3), dtype=np.uint8)
    for p in layout.placements:
        row, col = cell_row_col(p.cell)
        top, left = row * CELL + MARGIN, col * CELL + MARGIN
        rgb = np.asarray(COLOUR_RGB[p.colour], dtype=np.uint8)
        canvas[top : top + ITEM_SIZE, left : left + ITEM_SIZE] = images[p.image][:, :, None] * rgb
    return canvas


@dataclass(frozen=True)
class Composition:
    """One sample: ``image`` (3, 64, 64) in the model's pixel space [-1, 1], its ``caption`` and the
    ``layout`` it was made from."""

    image: Tensor
    caption: str
    layout: Layout


class ComposeDataset(ImageDataset):
    """``length`` captioned compositions from Fashion-MNIST ``images`` (N, 28, 28) uint8 and ``labels``.

    Args:
        images, labels: the item pool (the training split for ``--data fmnist-compose``).
        seed: the data seed; item ``i`` depends on ``(seed, i)`` only.
        length: the number of compositions (an epoch of the loader).
        split: ``"train"`` captions (never a held-out pair) or ``"held-out"`` ones.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        seed: int = 0,
        length: int = DEFAULT_LENGTH,
        split: str = "train",
    ):
        if images.ndim != 3 or images.shape[1:] != (ITEM_SIZE, ITEM_SIZE) or images.dtype != np.uint8:
            raise DyditError(
                f"compositions need uint8 (N, 28, 28) item images, got {images.dtype} {images.shape}"
            )
        if split not in SPLITS:
            raise DyditError(f"unknown prompt split {split!r}; use one of {', '.join(SPLITS)}")
        if length < 1:
            raise DyditError(f"a composition dataset needs at least one item, got length {length}")
        self.images, self.labels = images, np.asarray(labels)
        self.by_class = [np.flatnonzero(self.labels == c) for c in range(10)]
        if any(len(ix) == 0 for ix in self.by_class):
            raise DyditError("compositions need images of all 10 Fashion-MNIST classes")
        self.seed, self.length, self.split = seed, length, split
        self.tokenizer = tokenizer()
        # No class labels (num_classes 0): the condition is the caption. No flips: a flip swaps left/right.
        self.info = DataInfo(name=NAME, channels=3, image_size=CANVAS, num_classes=0, flip=False)

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> tuple[np.ndarray, str, Layout]:
        """Composition ``index``: uint8 (64, 64, 3), its caption and its layout."""
        if not 0 <= index < self.length:
            raise IndexError(f"composition {index} outside 0..{self.length - 1}")
        rng = np.random.default_rng(derive_seed(self.seed, index))
        prompt = sample_prompt(rng, self.split)
        layout = place(prompt, rng, self.by_class)
        return render(layout, self.images), prompt.text, layout

    def composition(self, index: int) -> Composition:
        """Composition ``index`` in model space, with its caption and layout."""
        image, text, layout = self.sample(index)
        return Composition(to_model_space(image[None])[0], text, layout)

    def get(self, index: int, flip: bool = False) -> tuple[Tensor, Tensor]:
        """Image (3, 64, 64) in [-1, 1] and the caption's token ids (MAX_TOKENS,); ``flip`` is ignored."""
        image, text, _ = self.sample(index)
        return to_model_space(image[None])[0], self.tokenizer(text).ids[0]

    def get_batch(self, indices: Tensor, flips: Tensor) -> tuple[Tensor, TokenIds]:
        samples = [self.sample(int(i)) for i in indices.tolist()]
        x = to_model_space(np.stack([s[0] for s in samples]))
        return x, self.tokenizer([s[1] for s in samples])

    def batch_condition(self, y: Tensor) -> TokenIds:
        return TokenIds(y.long(), self.tokenizer.null_ids())

    @property
    def in_memory(self) -> bool:
        return True  # rendering 64 compositions takes a few milliseconds


def to_model_space(images: np.ndarray) -> Tensor:
    """uint8 (B, 64, 64, 3) -> float (B, 3, 64, 64) in [-1, 1] (the project's pixel codec)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load_item_pool(
    root: str | os.PathLike | None = None, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` as uint8 (N, 28, 28) images and (N,) labels."""
    from dydit.data.fashion_mnist import load_fashion_mnist

    ds = load_fashion_mnist(root, split=split, image_size=ITEM_SIZE)
    return ds.images[:, 0].numpy(), ds.labels.numpy()


def make_compose_dataset(
    root: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    length: int = DEFAULT_LENGTH,
    split: str = "train",
) -> ComposeDataset:
    """``--data fmnist-compose``: training-split captions over Fashion-MNIST's training images."""
    images, labels = load_item_pool(root, "train")
    return ComposeDataset(images, labels, seed=seed, length=length, split=split)


def real_compositions(
    prompts: list[Prompt], images: np.ndarray, labels: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, list[Layout]]:
    """One composition per prompt (uint8 (N, 64, 64, 3)) and its layout; prompt ``k`` uses the
    generator seeded from ``(seed, k)``."""
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    layouts = [place(p, np.random.default_rng(derive_seed(seed, k)), by_class) for k, p in enumerate(prompts)]
    return np.stack([render(lay, images) for lay in layouts]), layouts
