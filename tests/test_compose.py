"""The captioned compositions (docs/METHOD.md §17.1, §17.2): grammar, held-out split, rendering,
determinism per (seed, index), and the batches of the resumable loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dydit.data import DataStream, dataset_image_size, make_dataset
from dydit.data import compose as C
from dydit.data import compose_grammar as G
from dydit.errors import DyditError
from dydit.text import TokenIds

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed")


@pytest.fixture(scope="module")
def pool() -> tuple[np.ndarray, np.ndarray]:
    if not FMNIST.exists():
        pytest.skip("Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist)")
    images, labels = C.load_item_pool(split="train")
    return images[:3000], labels[:3000]


@pytest.mark.parametrize("category", G.CATEGORIES)
def test_every_prompt_reads_back_and_has_its_category(category: str) -> None:
    tok = G.tokenizer()
    for prompt in G.all_prompts(category):
        assert G.parse_caption(prompt.text) == prompt
        assert prompt.category == category
        assert tok.decode_one(tok(prompt.text).ids[0]) == prompt.text


def test_caption_grammar_examples() -> None:
    bag, sneaker, coat, sandal = (G.ITEMS.index(n) for n in ("bag", "sneaker", "coat", "sandal"))
    red, blue = G.COLOURS.index("red"), G.COLOURS.index("blue")
    cases = {
        "a red sneaker": G.Prompt((G.Thing(sneaker, red),)),
        "a bag": G.Prompt((G.Thing(bag),)),
        "an ankle boot": G.Prompt((G.Thing(G.ITEMS.index("ankle boot")),)),
        "a coat and a sandal": G.Prompt((G.Thing(coat), G.Thing(sandal))),
        "three dresses": G.Prompt((G.Thing(G.ITEMS.index("dress"), None, 3),)),
        "a blue bag and a red coat": G.Prompt((G.Thing(bag, blue), G.Thing(coat, red))),
        "a bag left of a sneaker": G.Prompt((G.Thing(bag), G.Thing(sneaker)), G.RELATIONS.index("left of")),
        "a red sneaker left of a bag": G.Prompt((G.Thing(sneaker, red), G.Thing(bag)), 0),
        "a coat above a sandal": G.Prompt((G.Thing(coat), G.Thing(sandal)), G.RELATIONS.index("above")),
    }
    for text, prompt in cases.items():
        assert G.parse_caption(text) == prompt and prompt.text == text
    assert G.Prompt((G.Thing(sneaker, red),)).category == "colors"
    assert G.parse_caption("A Red  Sneaker").text == "a red sneaker"  # case and spaces


@pytest.mark.parametrize(
    "text, message",
    [
        ("a purple sneaker", "unknown word(s) 'purple'"),
        ("a sneaker near a hat", "'hat', 'near'"),
        ("a bag and a bag", "same item twice"),
        ("a red bag and a red coat", "same colour"),
        ("two bags left of a coat", "relates single items"),
        ("a bag and a coat and a dress", "more than two"),
        ("bag", "grammar"),
        ("a bags", "not an item"),
        ("", "grammar"),
    ],
)
def test_bad_captions_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(DyditError) as err:
        G.parse_caption(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_held_out_split_is_never_drawn_for_training() -> None:
    rng = np.random.default_rng(0)
    seen: set[str] = set()
    for _ in range(3000):
        prompt = G.sample_prompt(rng, "train")
        assert not G.is_held_out(prompt)
        seen.add(prompt.category)
    assert seen == set(G.CATEGORIES)
    held = [G.sample_prompt(rng, "held-out") for _ in range(200)]
    assert all(G.is_held_out(p) for p in held)
    assert {p.category for p in held} == {"colors", "position", "color_attr"}
    # every held-out pair is reachable: each (colour, item) pair and each relation pair occurs
    texts = " | ".join(p.text for p in G.evaluation_prompts("held-out", per_category=1000))
    for colour, item in G.HELD_OUT_COLOUR_ITEMS:
        assert f"{colour} {item}" in texts
    for a, b in G.HELD_OUT_RELATION_PAIRS:
        assert any(
            f"{x} {r} a{'n' if y[0] in 'aeiou' else ''} {y}" in texts
            for x, y in ((a, b), (b, a))
            for r in G.RELATIONS
        )


def test_evaluation_prompt_sets() -> None:
    held_in = G.evaluation_prompts("train", per_category=7)
    held_out = G.evaluation_prompts("held-out", per_category=7)
    assert held_in == G.evaluation_prompts("train", per_category=7)  # fixed
    for prompts in (held_in, held_out):
        counts = {c: sum(p.category == c for p in prompts) for c in G.CATEGORIES}
        assert counts == {c: 5 if (c == "colors" and prompts is held_out) else 7 for c in G.CATEGORIES}
    assert not any(G.is_held_out(p) for p in held_in)
    assert all(G.is_held_out(p) for p in held_out if p.category in ("colors", "position", "color_attr"))


def test_read_prompts(tmp_path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\na red sneaker left of a bag\n\ntwo bags\n")
    assert G.read_prompts(path) == ["a red sneaker left of a bag", "two bags"]
    path.write_text("a bag\na shiny bag\n")
    with pytest.raises(DyditError, match=r"line 2: unknown word\(s\) 'shiny'"):
        G.read_prompts(path)
    with pytest.raises(DyditError, match="cannot read"):
        G.read_prompts(tmp_path / "missing.txt")
    path.write_text("bag a sneaker\n")  # words of the vocabulary, not a caption of the grammar
    with pytest.raises(DyditError, match="line 1: .*does not follow the caption grammar"):
        G.read_prompts(path)
    assert G.read_prompts(path, G.tokenizer()) == ["bag a sneaker"]
    path.write_text("# nothing\n")
    with pytest.raises(DyditError, match="holds no prompt"):
        G.read_prompts(path)


def test_render_places_tinted_items_in_their_cells() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(4, 28, 28), dtype=np.uint8)
    layout = C.Layout((C.Placement(1, 0, G.COLOURS.index("red"), 0), C.Placement(2, 3, 0, 2)))
    canvas = C.render(layout, images)
    assert canvas.shape == (64, 64, 3) and canvas.dtype == np.uint8
    expected = np.zeros((64, 64, 3), dtype=np.uint8)
    expected[2:30, 34:62, 0] = images[0]  # cell 1 = top right, red: only the red channel
    expected[34:62, 2:30] = images[2][:, :, None]  # cell 2 = bottom left, white: grey in all channels
    assert np.array_equal(canvas, expected)


def test_relations_in_the_grid_sense() -> None:
    left, right, above, below = range(4)
    assert C.relation_holds(left, 0, 1) and C.relation_holds(left, 2, 1) and not C.relation_holds(left, 0, 2)
    assert C.relation_holds(right, 3, 0) and C.relation_holds(above, 1, 2) and C.relation_holds(below, 2, 0)
    assert not C.relation_holds(above, 0, 1)


def test_layouts_follow_their_prompts(pool) -> None:
    images, labels = pool
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    rng = np.random.default_rng(1)
    for _ in range(300):
        prompt = G.sample_prompt(rng)
        layout = C.place(prompt, rng, by_class)
        wanted = sorted((t.item, t.drawn_colour) for t in prompt.things for _ in range(t.count))
        assert sorted((p.item, p.colour) for p in layout.placements) == wanted
        assert len({p.cell for p in layout.placements}) == len(layout.placements)
        assert all(labels[p.image] == p.item for p in layout.placements)
        if prompt.relation is not None:
            assert C.relation_holds(prompt.relation, layout.cell_of(0), layout.cell_of(1))
        canvas = C.render(layout, images)
        used = {p.cell for p in layout.placements}
        for cell in set(range(4)) - used:  # items not named do not appear
            r, c = C.cell_row_col(cell)
            assert not canvas[32 * r : 32 * r + 32, 32 * c : 32 * c + 32].any()


def test_dataset_is_deterministic_per_seed_and_index(pool) -> None:
    a = C.ComposeDataset(*pool, seed=3, length=100)
    b = C.ComposeDataset(*pool, seed=3, length=100)
    other = C.ComposeDataset(*pool, seed=4, length=100)
    for i in (0, 7, 99):
        ia, ta, la = a.sample(i)
        ib, tb, lb = b.sample(i)
        assert np.array_equal(ia, ib) and ta == tb and la == lb
    assert any(a.sample(i)[1] != other.sample(i)[1] for i in range(10))
    assert a.sample(5)[1] == C.ComposeDataset(*pool, seed=3, length=10).sample(5)[1]  # not on the length
    x, ids = a.get(7)
    image, text, layout = a.sample(7)
    assert x.shape == (3, 64, 64) and torch.equal(x, C.to_model_space(image[None])[0])
    assert torch.equal(x, (torch.from_numpy(image).permute(2, 0, 1).float() / 255) * 2 - 1)
    example = a.composition(7)
    assert torch.equal(example.image, x) and example.caption == text and example.layout == layout
    assert a.tokenizer.decode_one(ids) == text
    xb, cond = a.get_batch(torch.tensor([7, 8]), torch.zeros(2, dtype=torch.bool))
    assert isinstance(cond, TokenIds) and torch.equal(xb[0], x) and torch.equal(cond.ids[0], ids)
    assert xb.min() >= -1 and xb.max() <= 1
    with pytest.raises(IndexError):
        a.sample(100)


def test_stream_batches_resume_and_workers_give_token_ids(pool) -> None:
    ds = C.ComposeDataset(*pool, seed=0, length=40)
    stream = DataStream(ds, 8, seed=5)
    it = iter(stream)
    batches = [next(it) for _ in range(3)]
    x, cond = batches[2]
    assert x.shape == (8, 3, 64, 64) and isinstance(cond, TokenIds) and cond.ids.shape == (8, G.MAX_TOKENS)
    resumed = next(iter(DataStream(ds, 8, seed=5, epoch=0, batch=2)))
    assert torch.equal(resumed[0], x) and torch.equal(resumed[1].ids, cond.ids)
    workers = next(iter(DataStream(ds, 8, seed=5, num_workers=1)))  # collated in a worker
    assert isinstance(workers[1], TokenIds) and torch.equal(workers[1].ids, batches[0][1].ids)
    assert torch.equal(workers[0], batches[0][0])
    dropped = cond.drop(torch.tensor([True] + [False] * 7))
    assert ds.tokenizer.decode_one(dropped.ids[0]) == "" and torch.equal(dropped.ids[1:], cond.ids[1:])


@needs_fmnist
def test_make_dataset_names_it() -> None:
    ds = make_dataset("fmnist-compose")
    assert isinstance(ds, C.ComposeDataset) and len(ds) == C.DEFAULT_LENGTH
    assert ds.info.name == "fmnist-compose" and ds.info.channels == 3 and ds.info.image_size == 64
    assert not ds.info.flip and ds.info.num_classes == 0
    assert dataset_image_size("fmnist-compose") == 64
    with pytest.raises(DyditError, match="64x64"):
        make_dataset("fmnist-compose", image_size=32)


def test_dataset_rejects_bad_pools() -> None:
    with pytest.raises(DyditError, match="uint8"):
        C.ComposeDataset(np.zeros((10, 32, 32), np.uint8), np.arange(10))
    with pytest.raises(DyditError, match="all 10"):
        C.ComposeDataset(np.zeros((10, 28, 28), np.uint8), np.zeros(10, int))
    with pytest.raises(DyditError, match="split"):
        C.ComposeDataset(np.zeros((10, 28, 28), np.uint8), np.arange(10), split="test")
