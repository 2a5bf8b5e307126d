"""The conditioning object (docs/ARCHITECTURE.md §3): class labels and text with their null conditions,
the batch operations, guidance with a text condition, and class-label sampling and training that
give exactly what plain label tensors give."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import nn

from dydit.conditioning import ClassLabels, NullText, TextCondition, as_condition, cat, conditioned
from dydit.data import ArrayDataset, DataInfo, DataStream
from dydit.diffusion import SAMPLERS, create_diffusion, guided
from dydit.errors import DyditError
from dydit.factory import build_model
from dydit.flow import FLOW_SAMPLERS, Transport
from dydit.models.layers import LabelEmbedder
from dydit.sample import SamplingSettings, generate
from dydit.train.step import TrainForward, compute_loss


def _text(b: int = 3, length: int = 4, dim: int = 5, pooled: int = 2, seed: int = 0, **kw) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, length, generator=g) < 0.7
    mask[:, 0] = True
    return TextCondition(
        torch.randn(b, length, dim, generator=g), torch.randn(b, pooled, generator=g), mask, **kw
    )


def _empty_prompt(length: int = 4, dim: int = 5, pooled: int = 2) -> NullText:
    mask = torch.zeros(length, dtype=torch.bool)
    mask[0] = True  # only a start token
    return NullText(torch.full((length, dim), 0.5), torch.full((pooled,), -1.0), mask)


# Class labels ---------------------------------------------------------------------------------
def test_class_labels_batch_operations():
    c = ClassLabels(torch.tensor([3, 1, 0, 2]), null_class=4)
    assert len(c) == c.batch_size == 4 and c.network_input() is c.labels
    assert c.select([2, 0]).labels.tolist() == [0, 3]
    assert c.select(torch.tensor([True, False, False, True])).labels.tolist() == [3, 2]
    assert c.select(slice(1, 3)).labels.tolist() == [1, 0] and c.select(1).labels.tolist() == [1]
    assert c.repeat(2).labels.tolist() == [3, 1, 0, 2] * 2
    assert c.null().labels.tolist() == [4] * 4 and c.null().null_class == 4
    assert c.with_null().labels.tolist() == [3, 1, 0, 2, 4, 4, 4, 4]
    both = cat([c.select([0]), c.select([3])])
    assert isinstance(both, ClassLabels) and both.labels.tolist() == [3, 2] and both.null_class == 4
    dropped = c.drop(torch.tensor([False, True, True, False]))
    assert dropped.labels.tolist() == [3, 4, 4, 2] and c.labels.tolist() == [3, 1, 0, 2]
    assert c.dropout(0.0).labels.tolist() == [3, 1, 0, 2] and c.dropout(1.0).labels.tolist() == [4] * 4
    moved = c.to("cpu", torch.float16)  # a dtype casts floating-point tensors only
    assert moved.labels.dtype == torch.int64 and moved.device == torch.device("cpu")
    assert as_condition(c) is c and as_condition(torch.tensor([1]), 9).null_class == 9


def test_class_dropout_is_the_label_embedders_draw():
    """Same generator state, same rows dropped: the caller's dropout equals the network's own."""
    labels = torch.randint(0, 10, (64,))
    embedder = LabelEmbedder(10, 8, dropout_prob=0.3)
    torch.manual_seed(5)
    expected = embedder.token_drop(labels)
    torch.manual_seed(5)
    got = ClassLabels(labels, 10).dropout(0.3).labels
    assert torch.equal(got, expected) and 0 < int((got == 10).sum()) < 64


def test_class_labels_errors():
    with pytest.raises(DyditError, match=r"integer tensor \(B,\)"):
        ClassLabels(torch.zeros(3), 4)
    with pytest.raises(DyditError, match=r"integer tensor \(B,\)"):
        ClassLabels(torch.zeros(2, 2, dtype=torch.long), 4)
    with pytest.raises(DyditError, match="different shapes or null"):
        cat([ClassLabels(torch.tensor([1]), 4), ClassLabels(torch.tensor([1]), 5)])
    with pytest.raises(DyditError, match="null class"):
        as_condition(torch.tensor([1]))
    with pytest.raises(DyditError, match="different shapes or null"):
        cat([ClassLabels(torch.tensor([1]), 4), _text()])


# Text ------------------------------------------------------------------------------------------
def test_text_batch_operations_keep_every_field_aligned():
    null = _empty_prompt()
    c = _text(null_text=null)
    assert len(c) == 3 and c.network_input() is c
    s = c.select([2, 0])
    assert torch.equal(s.embeddings, c.embeddings[[2, 0]]) and torch.equal(s.pooled, c.pooled[[2, 0]])
    assert torch.equal(s.mask, c.mask[[2, 0]]) and s.null_text.equals(null)
    r = c.repeat(2)
    assert torch.equal(r.embeddings, torch.cat([c.embeddings] * 2)) and torch.equal(
        r.mask, torch.cat([c.mask] * 2)
    )
    n = c.null()
    assert torch.equal(n.embeddings, null.embeddings.expand(3, 4, 5))
    assert torch.equal(n.pooled, null.pooled.expand(3, 2)) and torch.equal(n.mask, null.mask.expand(3, 4))
    both = c.with_null()
    assert len(both) == 6 and torch.equal(both.embeddings[:3], c.embeddings)
    assert torch.equal(both.embeddings[3:], n.embeddings) and torch.equal(both.mask[3:], n.mask)
    joined = cat([c.select([1]), _text(b=2, seed=1, null_text=null)])
    assert len(joined) == 3 and torch.equal(joined.pooled[0], c.pooled[1])


def test_text_dropout_replaces_whole_rows_by_the_null_embedding():
    null = _empty_prompt()
    c = _text(b=4, null_text=null)
    keep = torch.tensor([True, False, True, False])
    d = c.drop(~keep)
    for i in range(4):
        if keep[i]:
            assert torch.equal(d.embeddings[i], c.embeddings[i]) and torch.equal(d.pooled[i], c.pooled[i])
            assert torch.equal(d.mask[i], c.mask[i])
        else:
            assert torch.equal(d.embeddings[i], null.embeddings) and torch.equal(d.pooled[i], null.pooled)
            assert torch.equal(d.mask[i], null.mask)
    assert torch.equal(c.dropout(0.0).embeddings, c.embeddings)
    assert torch.equal(c.dropout(1.0).embeddings, c.null().embeddings)


def test_text_zeros_null_and_dtype():
    c = _text()  # no null given: zeros, with a mask that attends to every token
    assert torch.equal(c.null().embeddings, torch.zeros(3, 4, 5)) and bool(c.null().mask.all())
    assert torch.equal(c.null().pooled, torch.zeros(3, 2))
    plain = TextCondition(torch.ones(2, 3, 4))
    assert plain.null().pooled is None and plain.null().mask is None
    half = c.to("cpu", torch.bfloat16)
    assert half.embeddings.dtype == half.pooled.dtype == half.null_text.embeddings.dtype == torch.bfloat16
    assert half.mask.dtype == half.null_text.mask.dtype == torch.bool


def test_text_errors():
    with pytest.raises(DyditError, match=r"float tensor \(B, L, D\)"):
        TextCondition(torch.ones(2, 3))
    with pytest.raises(DyditError, match=r"bool tensor \(2, 3\)"):
        TextCondition(torch.ones(2, 3, 4), mask=torch.ones(2, 3))
    with pytest.raises(DyditError, match=r"pooled text vector"):
        TextCondition(torch.ones(2, 3, 4), pooled=torch.ones(3, 2))
    with pytest.raises(DyditError, match=r"null text embeddings must have shape \(3, 4\)"):
        TextCondition(torch.ones(2, 3, 4), null_text=NullText(torch.zeros(5, 4)))
    with pytest.raises(DyditError, match=r"null text mask must have shape \(3,\)"):
        TextCondition(
            torch.ones(2, 3, 4), mask=torch.ones(2, 3, dtype=torch.bool), null_text=NullText.zeros(3, 4)
        )
    with pytest.raises(DyditError, match="different shapes or null"):  # same shapes, other null
        cat([_text(null_text=_empty_prompt()), _text()])


# Guidance with text ----------------------------------------------------------------------------
class _ToyTextModel:
    """A callable text-conditioned network: records every ``y`` and answers with a function of it."""

    def __init__(self) -> None:
        self.seen: list[TextCondition] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: TextCondition) -> torch.Tensor:
        assert isinstance(y, TextCondition) and len(y) == x.shape[0]
        self.seen.append(y)
        masked = (y.embeddings * y.mask[..., None]).sum((1, 2)) + y.pooled.sum(1)  # (B,)
        return 0.1 * x + masked[:, None, None, None]


def test_guidance_gives_the_null_half_the_null_embedding():
    null = _empty_prompt()
    c, model = _text(null_text=null), _ToyTextModel()
    x, t, s = torch.randn(3, 2, 4, 4), torch.full((3,), 10), 3.0
    out = guided(conditioned(model), s)(x, t, c)
    (y,) = model.seen
    assert len(y) == 6 and torch.equal(y.embeddings[:3], c.embeddings)
    for i in range(3, 6):  # the unconditional half really is the empty prompt
        assert torch.equal(y.embeddings[i], null.embeddings) and torch.equal(y.pooled[i], null.pooled)
        assert torch.equal(y.mask[i], null.mask)
    cond, uncond = model(x, t, c), model(x, t, c.null())
    torch.testing.assert_close(out, uncond + s * (cond - uncond))
    model.seen.clear()
    assert torch.equal(guided(conditioned(model), 1.0)(x, t, c), cond) and len(model.seen[0]) == 3


def test_generate_with_a_text_condition_through_a_sampler():
    null, model = _empty_prompt(), _ToyTextModel()
    c = _text(b=5, null_text=null)
    settings = SamplingSettings(sampler="euler", steps=3, cfg_scale=2.0)
    batches = list(
        generate(model, Transport(), settings, seeds=range(5), shape=(2, 4, 4), condition=c,
                 batch_size=2, progress=False)
    )  # fmt: skip
    assert [b.indices for b in batches] == [[0, 1], [2, 3], [4]] and batches[0].labels is None
    assert torch.equal(batches[1].condition.embeddings, c.embeddings[2:4])
    assert len(model.seen) == 3 * 3 and all(
        len(y) == 2 * len(b.indices) for y, b in zip(model.seen[::3], batches)
    )
    for y in model.seen:
        half = len(y) // 2
        assert torch.equal(y.embeddings[half:], null.embeddings.expand(half, -1, -1))
    with pytest.raises(DyditError, match="not both"):
        next(generate(model, Transport(), settings, seeds=[0], shape=(2, 4, 4), condition=c.select([0]),
                      labels=[1], progress=False))  # fmt: skip
    with pytest.raises(DyditError, match="2 rows for 1 seeds"):
        next(generate(model, Transport(), settings, seeds=[0], shape=(2, 4, 4), condition=c.select([0, 1]),
                      progress=False))  # fmt: skip


# Class labels: the same outputs as plain label tensors --------------------------------------------
def _tiny_model(**overrides) -> tuple[nn.Module, tuple[int, int, int], int]:
    cfg = tiny_config(**overrides)
    model = build_model(cfg).eval()
    with torch.no_grad():  # adaLN-Zero: a fresh model ignores its labels
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, (cfg.in_channels, cfg.input_size, cfg.input_size), cfg.num_classes


def _guided_with_tensors(model, scale: float, null_class: int):
    """Classifier-free guidance on label tensors as it was written before conditions existed."""
    if scale == 1.0:
        return model

    def fn(x, t, y):
        b, k = x.shape[0], x.shape[1]
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        cond, uncond = out[:b], out[b:]
        return torch.cat([uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], dim=1)

    return fn


@pytest.mark.parametrize(
    ("sampler", "objective", "scale"), [("ddim", "ddpm", 1.5), ("ddpm", "ddpm", 1.0), ("heun", "flow", 2.0)]
)
def test_generate_with_labels_equals_the_plain_tensor_pipeline(sampler, objective, scale):
    """generate (condition objects) == the sampler called with label tensors and tensor guidance."""
    overrides = {} if objective == "ddpm" else dict(objective="flow", learn_sigma=False)
    model, shape, num_classes = _tiny_model(**overrides)
    process = create_diffusion() if objective == "ddpm" else Transport()
    settings = SamplingSettings(sampler=sampler, steps=4, cfg_scale=scale)
    seeds, labels = [3, 4, 5], [2, 0, 3]
    got = next(generate(model, process, settings, seeds=seeds, shape=shape, num_classes=num_classes,
                        labels=labels, batch_size=3, progress=False))  # fmt: skip
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
    run = FLOW_SAMPLERS[sampler] if objective == "flow" else SAMPLERS[sampler]
    fn = _guided_with_tensors(model, scale, num_classes)
    expected = run(fn, noise, process, 4, model_kwargs={"y": torch.tensor(labels)}, generators=gens)
    assert torch.equal(got.samples, expected) and got.labels.tolist() == labels
    assert isinstance(got.condition, ClassLabels) and got.condition.null_class == num_classes
    # guided() itself, given label tensors, is the same function as before.
    x, t, y = noise, torch.full((3,), 0.5 if objective == "flow" else 10), torch.tensor(labels)
    assert torch.equal(guided(model, scale, num_classes)(x, t, y), fn(x, t, y))


def test_compute_loss_with_class_labels_equals_the_label_tensor_step():
    """The training step on a ClassLabels batch == the step written out with a label tensor (the
    network draws its own class dropout); a label tensor is still accepted, with distillation too."""
    model, _, num_classes = _tiny_model(class_dropout_prob=0.5)
    model.train()
    d = create_diffusion()
    g = torch.Generator().manual_seed(2)
    x0, y = torch.randn(6, 4, 8, 8, generator=g), torch.randint(0, num_classes, (6,), generator=g)
    t, noise = torch.randint(0, 1000, (6,), generator=g), torch.randn(6, 4, 8, 8, generator=g)
    torch.manual_seed(7)
    loss, _, _ = compute_loss(TrainForward(model), d, x0, ClassLabels(y, num_classes), t, noise)
    torch.manual_seed(7)
    x_t = d.q_sample(x0, t, noise)
    assert torch.equal(loss, d.loss_terms(model(x_t, t, y), x0, x_t, t, noise)["loss"].mean())
    teacher = build_model(tiny_config(class_dropout_prob=0.5)).eval()
    for kw in ({}, dict(teacher=teacher, distill_weight=1.0)):
        losses = []
        for labels in (y, ClassLabels(y, num_classes)):
            torch.manual_seed(7)
            losses.append(compute_loss(TrainForward(model), d, x0, labels, t, noise, **kw)[0])
        assert torch.equal(losses[0], losses[1])


def test_compute_loss_hands_a_text_network_its_condition():
    class TextNet(nn.Module):  # the TrainForward seam: (x, t, y, mode) -> (output, routing)
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.seen: list[TextCondition] = []

        def forward(self, x, t, y, mode="masked"):
            self.seen.append(y)
            return self.scale * x * y.pooled.mean(), None

    net, c = TextNet(), _text(b=2, length=3, dim=4, pooled=2)
    x0 = torch.randn(2, 1, 4, 4)
    loss, _, routing = compute_loss(net, Transport(), x0, c, torch.rand(2), torch.randn_like(x0))
    assert routing is None and net.seen == [c] and loss.requires_grad


def test_stream_batches_are_class_labels_with_the_models_null_class():
    info = DataInfo(name="toy", channels=1, image_size=4, num_classes=3)
    ds = ArrayDataset(torch.randint(0, 255, (12, 1, 4, 4), dtype=torch.uint8), torch.arange(12) % 3, info)
    x, c = next(iter(DataStream(ds, 4, seed=0)))
    assert isinstance(c, ClassLabels) and c.null_class == 3
    idx, flips = DataStream(ds, 4, seed=0).epoch_plan(0)
    assert torch.equal(c.labels, ds.get_batch(idx[:4], flips[:4])[1])
    assert next(iter(DataStream(ds, 4, seed=0, null_class=10)))[1].null_class == 10
