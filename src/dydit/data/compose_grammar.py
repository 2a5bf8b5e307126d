"""The captions of the compositions: grammar, held-out split, prompt sets (docs/METHOD.md §17.1, §17.2).

A :class:`Prompt` is what a caption asks for: one or two :class:`Thing` s (an item, an optional
colour, a count) and optionally a spatial relation between the two. :func:`caption` writes it as
text, :func:`parse_caption` reads text back (the scorer reads prompt files with it). The six
categories follow GenEval's:

==================  ==========================================  =================================
category            example                                     what it asks
==================  ==========================================  =================================
single_object       "a bag"                                     one item
two_object          "a coat and a sandal"                       two different items
counting            "three dresses"                             2-4 of one item
colors              "a red sneaker"                             one item in a named colour
position            "a bag left of a sneaker"                   two items in a grid relation
color_attr          "a blue shirt and a yellow trouser"         two items, each in its colour
==================  ==========================================  =================================

A position caption may name colours too ("a red sneaker left of a bag"); its category stays
position. The held-out split (:data:`HELD_OUT_COLOUR_ITEMS`, :data:`HELD_OUT_RELATION_PAIRS`) names
(colour, item) pairs and item pairs of a relation that no training caption contains.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dydit.errors import DyditError
from dydit.text import WordTokenizer

ITEMS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
PLURALS = (
    "t-shirts", "trousers", "pullovers", "dresses", "coats",
    "sandals", "shirts", "sneakers", "bags", "ankle boots",
)  # fmt: skip
COLOURS = ("white", "red", "green", "blue", "yellow", "magenta")
# Pure RGB of each colour (white = (1, 1, 1)); an item's grey level is multiplied by it.
COLOUR_RGB = ((1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1))
DEFAULT_COLOUR = "white"  # the colour of an item whose caption names none
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

# The held-out split (docs/METHOD.md §17.2). No training caption names one of these (colour, item)
# pairs: one pair per non-white colour, each a different item (white is every unnamed item's colour,
# so no white pair can be held out).
HELD_OUT_COLOUR_ITEMS: tuple[tuple[str, str], ...] = (
    ("red", "sneaker"),
    ("green", "bag"),
    ("blue", "dress"),
    ("yellow", "coat"),
    ("magenta", "sandal"),
)
# No training position caption relates these two items, in either order and any relation (they
# may still appear together in "a X and a Y").
HELD_OUT_RELATION_PAIRS: tuple[tuple[str, str], ...] = (
    ("t-shirt", "sandal"),
    ("trouser", "bag"),
    ("coat", "sneaker"),
    ("dress", "ankle boot"),
    ("pullover", "shirt"),
)
SPLITS = ("train", "held-out")
# The tokenizer's length: BOS plus the longest caption ("a magenta ankle boot right of a yellow
# ankle boot", 11 words) fits with room to spare.
MAX_TOKENS = 16


def vocabulary() -> tuple[str, ...]:
    """Every word the grammar uses, in a fixed order (the text encoder's vocabulary)."""
    words = ["a", "an", "and", *COUNT_WORDS.values(), *COLOURS]
    for phrase in (*ITEMS, *PLURALS, *RELATIONS):
        words += [w for w in phrase.split() if w not in words]
    return tuple(dict.fromkeys(words))


VOCAB = vocabulary()


def tokenizer() -> WordTokenizer:
    """The word tokenizer over :data:`VOCAB` with :data:`MAX_TOKENS` ids per caption."""
    return WordTokenizer(VOCAB, MAX_TOKENS)


@dataclass(frozen=True)
class Thing:
    """``count`` of ``item`` (an index into :data:`ITEMS`), in ``colour`` (index into :data:`COLOURS`)
    or None when the caption names no colour (then it is drawn white)."""

    item: int
    colour: int | None = None
    count: int = 1

    @property
    def drawn_colour(self) -> int:
        return COLOURS.index(DEFAULT_COLOUR) if self.colour is None else self.colour


@dataclass(frozen=True)
class Prompt:
    """What a caption asks for: ``things`` (one or two) and, for position, ``relation`` (index into
    :data:`RELATIONS`) of ``things[0]`` to ``things[1]``."""

    things: tuple[Thing, ...]
    relation: int | None = None

    @property
    def category(self) -> str:
        if self.relation is not None:
            return "position"
        if len(self.things) == 1:
            t = self.things[0]
            return "counting" if t.count > 1 else ("colors" if t.colour is not None else "single_object")
        return "color_attr" if all(t.colour is not None for t in self.things) else "two_object"

    @property
    def text(self) -> str:
        return caption(self)


def _phrase(t: Thing) -> str:
    if t.count > 1:
        words = [COUNT_WORDS[t.count]] + ([COLOURS[t.colour]] if t.colour is not None else [])
        return " ".join([*words, PLURALS[t.item]])
    words = ([COLOURS[t.colour]] if t.colour is not None else []) + [ITEMS[t.item]]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def caption(prompt: Prompt) -> str:
    """The caption of ``prompt``, e.g. "a red sneaker left of a bag"."""
    parts = [_phrase(t) for t in prompt.things]
    if prompt.relation is not None:
        return f"{parts[0]} {RELATIONS[prompt.relation]} {parts[1]}"
    return " and ".join(parts)


def _parse_thing(words: list[str], text: str) -> Thing:
    if not words:
        raise DyditError(f"prompt {text!r} does not follow the caption grammar (an empty phrase)")
    head, rest = words[0], words[1:]
    plural = head in COUNT_WORDS.values()
    if head not in ("a", "an") and not plural:
        raise DyditError(
            f"prompt {text!r} does not follow the caption grammar (a phrase starts with {head!r})"
        )
    colour = None
    if rest and rest[0] in COLOURS:
        colour, rest = COLOURS.index(rest[0]), rest[1:]
    name = " ".join(rest)
    names = PLURALS if plural else ITEMS
    if name not in names:
        kind = "a plural item" if plural else "an item"
        raise DyditError(f"prompt {text!r} does not follow the caption grammar ({name!r} is not {kind})")
    count = next(n for n, w in COUNT_WORDS.items() if w == head) if plural else 1
    return Thing(names.index(name), colour, count)


def parse_caption(text: str) -> Prompt:
    """The :class:`Prompt` a caption asks for; a one-line DyditError if it is not in the grammar."""
    words = tokenizer().check(text)
    joined = " ".join(words)
    for r, rel in enumerate(RELATIONS):
        left, sep, right = joined.partition(f" {rel} ")
        if sep:
            a, b = _parse_thing(left.split(), text), _parse_thing(right.split(), text)
            if a.count > 1 or b.count > 1:
                raise DyditError(f"prompt {text!r}: a position caption relates single items")
            return _checked(Prompt((a, b), r), text)
    parts = joined.split(" and ")
    if len(parts) > 2:
        raise DyditError(f"prompt {text!r} names more than two kinds of item")
    things = tuple(_parse_thing(p.split(), text) for p in parts)
    if len(things) == 2 and any(t.count > 1 for t in things):
        raise DyditError(f"prompt {text!r}: counting captions name one kind of item")
    return _checked(Prompt(things), text)


def _checked(prompt: Prompt, text: str) -> Prompt:
    if len(prompt.things) == 2:
        a, b = prompt.things
        if a.item == b.item:
            raise DyditError(f"prompt {text!r} names the same item twice")
        if a.colour is not None and a.colour == b.colour:
            raise DyditError(f"prompt {text!r} gives both items the same colour")
    return prompt


def is_held_out(prompt: Prompt) -> bool:
    """Whether ``prompt`` contains a held-out (colour, item) pair or a held-out relation pair."""
    for t in prompt.things:
        if t.colour is not None and (COLOURS[t.colour], ITEMS[t.item]) in HELD_OUT_COLOUR_ITEMS:
            return True
    if prompt.relation is not None:
        pair = {ITEMS[t.item] for t in prompt.things}
        return any(pair == set(p) for p in HELD_OUT_RELATION_PAIRS)
    return False


def _draw(category: str, rng: np.random.Generator) -> Prompt:
    n_items, n_colours = len(ITEMS), len(COLOURS)
    if category == "single_object":
        return Prompt((Thing(int(rng.integers(n_items))),))
    if category == "colors":
        return Prompt((Thing(int(rng.integers(n_items)), int(rng.integers(n_colours))),))
    if category == "counting":
        return Prompt((Thing(int(rng.integers(n_items)), None, int(rng.integers(2, 5))),))
    a, b = (int(i) for i in rng.choice(n_items, size=2, replace=False))
    if category == "two_object":
        return Prompt((Thing(a), Thing(b)))
    if category == "color_attr":
        ca, cb = (int(c) for c in rng.choice(n_colours, size=2, replace=False))
        return Prompt((Thing(a, ca), Thing(b, cb)))
    # position: each item named in a colour half of the time ("a red sneaker left of a bag")
    ca, cb = (int(c) for c in rng.choice(n_colours, size=2, replace=False))
    named = rng.random(2) < 0.5
    return Prompt(
        (Thing(a, ca if named[0] else None), Thing(b, cb if named[1] else None)), int(rng.integers(4))
    )


def sample_prompt(rng: np.random.Generator, split: str = "train") -> Prompt:
    """A random prompt: a uniform category, then its words; ``split="train"`` never gives a held-out
    prompt, ``"held-out"`` always gives one (of the categories that have held-out pairs)."""
    if split not in SPLITS:
        raise DyditError(f"unknown prompt split {split!r}; use one of {', '.join(SPLITS)}")
    categories = CATEGORIES if split == "train" else ("colors", "position", "color_attr")
    category = categories[int(rng.integers(len(categories)))]
    while True:  # rejection: held-out prompts are a small part of each category
        prompt = _draw(category, rng)
        if is_held_out(prompt) == (split == "held-out"):
            return prompt


def all_prompts(category: str) -> list[Prompt]:
    """Every prompt of a category, in a fixed order (position: uncoloured, as GenEval's)."""
    n, items = len(COLOURS), range(len(ITEMS))
    pairs = [(a, b) for a in items for b in items if a != b]
    if category == "single_object":
        return [Prompt((Thing(i),)) for i in items]
    if category == "colors":
        return [Prompt((Thing(i, c),)) for i in items for c in range(n)]
    if category == "counting":
        return [Prompt((Thing(i, None, k),)) for i in items for k in COUNT_WORDS]
    if category == "two_object":
        return [Prompt((Thing(a), Thing(b))) for a, b in pairs if a < b]
    if category == "position":
        return [Prompt((Thing(a), Thing(b)), r) for a, b in pairs for r in range(len(RELATIONS))]
    if category == "color_attr":
        colours = [(x, y) for x in range(n) for y in range(n) if x != y]
        return [Prompt((Thing(a, x), Thing(b, y))) for a, b in pairs if a < b for x, y in colours]
    raise DyditError(f"unknown category {category!r}; use one of {', '.join(CATEGORIES)}")


def evaluation_prompts(split: str = "held-out", per_category: int = 20, seed: int = 0) -> list[Prompt]:
    """A fixed prompt set for scoring, ``per_category`` of each category (fewer where fewer exist).

    ``"held-out"``: colours, position and colour binding prompts that contain a held-out pair; single
    object, two objects and counting have no held-out pairs, so both splits share those prompts.
    ``"train"`` (held-in): prompts that training captions can contain."""
    if split not in SPLITS:
        raise DyditError(f"unknown prompt split {split!r}; use one of {', '.join(SPLITS)}")
    rng = np.random.default_rng(seed)
    out: list[Prompt] = []
    for category in CATEGORIES:
        pool = all_prompts(category)
        if category in ("colors", "position", "color_attr"):
            pool = [p for p in pool if is_held_out(p) == (split == "held-out")]
        pick = rng.permutation(len(pool))[:per_category]
        out += [pool[i] for i in sorted(pick)]
    return out


def read_prompts(path: str | os.PathLike, tokenizer: WordTokenizer | None = None) -> list[str]:
    """The prompts of a text file, one a line (blank lines and lines starting with ``#`` skipped).

    Each is checked against the caption grammar (:func:`parse_caption`), or, given a ``tokenizer``
    (e.g. a model's own text encoder's), only against its vocabulary and length: a one-line error
    names the first bad line and its unknown words."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DyditError(f"cannot read prompts file {path}: {e}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            parse_caption(text) if tokenizer is None else tokenizer.check(text)
        except DyditError as e:
            raise DyditError(f"{path}, line {number}: {e}") from None
        prompts.append(text)
    if not prompts:
        raise DyditError(f"prompts file {path} holds no prompt")
    return prompts
