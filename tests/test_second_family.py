"""A second, test-only model family proves the backbone seam (docs/ARCHITECTURE.md §7).

A tiny MMDiT-like network, written here and nowhere else: an image stream and a text stream with
their own separate q/k/v projections, joint attention over both, an MLP per stream, and text
conditioning given as a tensor of token embeddings (B, L, D_text), pooled into c. It implements the
backbone contract of ``dydit.models.backbone`` (heads span both streams' q/k/v rows and both
projections' columns; the image MLP has 3 groups, not one per head; the token router reads the
image stream and the text MLP is not routed), and the unchanged DyDiT method then gives: all units
on == the dense network, masked == sliced, analytic FLOPs == counted FLOPs, function-preserving
reordering, and fine-tuning steps with the FLOPs loss that move ρ toward λ.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dydit.constants import TIMESTEP_FREQ_DIM
from dydit.flops import count_flops, formulas, record
from dydit.flops.analytic import flops_loss, flops_ratio, per_sample_macs
from dydit.models.backbone import UnitPart, Units, Weights, full_weights
from dydit.models.dydit import DyDiT, execution
from dydit.models.layers import TimestepEmbedder, mlp, modulate
from dydit.models.reorder import reorder_by_importance
from dydit.models.sliced import SlicedDyDiT

DIM, HEADS, GROUPS, HIDDEN, DEPTH = 32, 4, 3, 96, 2
PATCH, SIZE, CHANNELS, TEXT_LEN, TEXT_DIM = 2, 8, 4, 5, 24
TOKENS = (SIZE // PATCH) ** 2
EPS = 1e-6


class JointBlock(nn.Module):
    """One MMDiT-like block: per-stream adaLN (12 vectors), joint attention, per-stream MLPs."""

    def __init__(self) -> None:
        super().__init__()
        for stream in ("img", "txt"):
            for name in ("q", "k", "v", "proj"):
                setattr(self, f"{stream}_{name}", nn.Linear(DIM, DIM))
            setattr(self, f"{stream}_fc1", nn.Linear(DIM, HIDDEN))
            setattr(self, f"{stream}_fc2", nn.Linear(HIDDEN, DIM))
        self.adaLN = nn.Linear(DIM, 12 * DIM)

    # The backbone contract ----------------------------------------------------------------------
    head_units = Units(
        HEADS,
        DIM // HEADS,
        (
            *(UnitPart(f"{s}_{n}", 0) for s in ("img", "txt") for n in "qkv"),
            UnitPart("img_proj", 1),
            UnitPart("txt_proj", 1),
        ),
    )
    group_units = Units(GROUPS, HIDDEN // GROUPS, (UnitPart("img_fc1", 0), UnitPart("img_fc2", 1)))
    static = (EPS,)
    routed_dim = DIM

    @property
    def modulation_linear(self) -> nn.Linear:
        return self.adaLN

    @staticmethod
    def split_modulation(raw: Tensor) -> tuple[Tensor, ...]:
        return raw.chunk(12, dim=-1)

    def modulation(self, c: Tensor) -> tuple[Tensor, ...]:
        record("adaLN", c.shape[0] * formulas.linear_macs(1, DIM, 12 * DIM))
        return self.split_modulation(self.adaLN(F.silu(c)))

    @staticmethod
    def attention_half(state, mod: Sequence[Tensor], w: Weights, count: int, static, head_mask=None):
        img, txt = state
        (eps,) = static
        hi = modulate(F.layer_norm(img, (DIM,), eps=eps), mod[0], mod[1])
        ht = modulate(F.layer_norm(txt, (DIM,), eps=eps), mod[6], mod[7])
        if w["img_q"][0] is None:  # no head: each stream's branch is its projection's bias
            ai, at = w["img_proj"][1].expand_as(img), w["txt_proj"][1].expand_as(txt)
        else:
            b, n, m = img.shape[0], img.shape[1], txt.shape[1]

            def split(name: str) -> Tensor:  # the joint sequence, per head: (B, count, n + m, d)
                y = torch.cat([F.linear(hi, *w[f"img_{name}"]), F.linear(ht, *w[f"txt_{name}"])], 1)
                return y.view(b, n + m, count, -1).transpose(1, 2)

            o = F.scaled_dot_product_attention(split("q"), split("k"), split("v"))
            if head_mask is not None:
                o = o * head_mask.to(o.dtype)[:, :, None, None]
            o = o.transpose(1, 2).reshape(b, n + m, -1)
            ai, at = F.linear(o[:, :n], *w["img_proj"]), F.linear(o[:, n:], *w["txt_proj"])
        img = torch.addcmul(img, mod[2].unsqueeze(1), ai)
        txt = torch.addcmul(txt, mod[8].unsqueeze(1), at)
        return (img, txt), img, modulate(F.layer_norm(img, (DIM,), eps=eps), mod[3], mod[4])

    @staticmethod
    def mlp_half(h: Tensor, w: Weights, group_mask: Tensor | None = None) -> Tensor:
        return mlp(h, *w["img_fc1"], *w["img_fc2"], group_mask)

    @staticmethod
    def mlp_gate(mod: Sequence[Tensor]) -> Tensor:
        return mod[5]

    def finish(self, state, x: Tensor, mod: Sequence[Tensor]):
        """The image stream x after its token skip; the text MLP (never routed) runs here."""
        txt = state[1]
        record("mlp_text", formulas.mlp_macs(txt.shape[0] * txt.shape[1], DIM, HIDDEN))
        ht = modulate(F.layer_norm(txt, (DIM,), eps=EPS), mod[9], mod[10])
        a, b = self.txt_fc1, self.txt_fc2
        return x, torch.addcmul(txt, mod[11].unsqueeze(1), mlp(ht, a.weight, a.bias, b.weight, b.bias))

    def attention_macs(self, state, count: int) -> int:
        img, txt = state
        return img.shape[0] * formulas.attention_macs(img.shape[1] + txt.shape[1], DIM, count, HEADS)

    def mlp_macs(self, rows: int, count: int) -> int:
        return formulas.mlp_macs(rows, DIM, HIDDEN, count, GROUPS)

    def forward(self, state, c: Tensor):
        """The dense block: every head, group and token."""
        mod = self.modulation(c)
        record("attention", self.attention_macs(state, HEADS))
        state, x, h = self.attention_half(state, mod, full_weights(self, self.head_units), HEADS, self.static)
        record("mlp", self.mlp_macs(h.shape[0] * h.shape[1], GROUPS))
        x = x + mod[5].unsqueeze(1) * self.mlp_half(h, full_weights(self, self.group_units))
        return self.finish(state, x, mod)


class TinyMMDiT(nn.Module):
    """``model(x, t, text)``: x (B, C, H, W), t (B,), text (B, L, D_text) token embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.x_embedder = nn.Linear(CHANNELS * PATCH * PATCH, DIM)
        self.pos_embed = nn.Parameter(torch.zeros(1, TOKENS, DIM))
        self.t_embedder = TimestepEmbedder(DIM)
        self.text_embedder = nn.Linear(TEXT_DIM, DIM)
        self.pooled_embedder = nn.Linear(TEXT_DIM, DIM)
        self.blocks = nn.ModuleList(JointBlock() for _ in range(DEPTH))
        self.final_modulation = nn.Linear(DIM, 2 * DIM)
        self.final = nn.Linear(DIM, PATCH * PATCH * CHANNELS)

    def embed(self, x: Tensor, t: Tensor, text):
        text = getattr(text, "embeddings", text)  # a tensor, or a condition object that holds one
        b, g = x.shape[0], SIZE // PATCH
        patches = x.view(b, CHANNELS, g, PATCH, g, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, TOKENS, -1)
        record("patch_embed", b * formulas.linear_macs(TOKENS, patches.shape[-1], DIM))
        record("text_embed", b * formulas.linear_macs(text.shape[1] + 1, TEXT_DIM, DIM))
        e = self.t_embedder(t)
        c = e + self.pooled_embedder(text.mean(1))  # pooled text joins the conditioning vector
        return (self.x_embedder(patches) + self.pos_embed, self.text_embedder(text)), c, e

    def head(self, state, c: Tensor) -> Tensor:
        img = state[0]
        b, g = img.shape[0], SIZE // PATCH
        record(
            "final_layer", b * (DIM * 2 * DIM + formulas.linear_macs(TOKENS, DIM, self.final.out_features))
        )
        shift, scale = self.final_modulation(F.silu(c)).chunk(2, dim=1)
        out = self.final(modulate(F.layer_norm(img, (DIM,), eps=EPS), shift, scale))
        out = out.view(b, g, g, CHANNELS, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, CHANNELS, SIZE, SIZE)

    def forward(self, x: Tensor, t: Tensor, text: Tensor) -> Tensor:
        state, c, _ = self.embed(x, t, text)
        for block in self.blocks:
            state = block(state, c)
        return self.head(state, c)

    def width_embedding(self, t: Tensor) -> Tensor:
        return self.t_embedder(t)

    width_dim = DIM
    routed_tokens = TOKENS

    def layer_costs(self) -> tuple[int, int]:
        return formulas.attention_macs(TOKENS + TEXT_LEN, DIM), formulas.mlp_macs(TOKENS, DIM, HIDDEN)

    def macs_table(self) -> dict[str, int]:
        a, m = self.layer_costs()
        return {
            "patch_embed": formulas.linear_macs(TOKENS, CHANNELS * PATCH * PATCH, DIM),
            "text_embed": formulas.linear_macs(TEXT_LEN + 1, TEXT_DIM, DIM),
            "t_embedder": formulas.linear_macs(1, TIMESTEP_FREQ_DIM, DIM) + DIM * DIM,
            "adaLN": DEPTH * formulas.linear_macs(1, DIM, 12 * DIM),
            "attention": DEPTH * a,
            "mlp": DEPTH * m,
            "mlp_text": DEPTH * formulas.mlp_macs(TEXT_LEN, DIM, HIDDEN),
            "final_layer": DIM * 2 * DIM + formulas.linear_macs(TOKENS, DIM, PATCH * PATCH * CHANNELS),
        }


LAYOUTS = ["forced_first", "all"]


def random_family(seed: int = 0) -> TinyMMDiT:
    torch.manual_seed(seed)
    net = TinyMMDiT()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


def inputs(batch: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, CHANNELS, SIZE, SIZE, generator=g), torch.randn(
        batch, TEXT_LEN, TEXT_DIM, generator=g
    )


def random_routers(model: DyDiT) -> DyDiT:
    """Random width routers (layer 0 switched fully off) and token routers keeping about half."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for router in (block.attn_rate.router, block.mlp_rate.router):
                router.weight.copy_(torch.randn(router.weight.shape, generator=g))
                router.bias.fill_(-100.0 if i == 0 else 0.0)
            for lin in (block.token_selection.hidden_layer, block.token_selection.output_layer):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
            block.token_selection.output_layer.bias.fill_(0.0)
    return model.eval()


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [False, True])
def test_dydit_with_every_unit_on_equals_the_dense_network(layout, training):
    net = random_family().train(training)
    x, text = inputs(3)
    t = torch.tensor([5, 500, 990])
    with torch.no_grad():
        ref = net(x, t, text)
        keys = set(net.state_dict())
        model = DyDiT(backbone=net, router_layout=layout).train(training)
        out, stats = model.forward_with_routing(x, t, text)
        with execution(model, "dense"):
            dense = model(x, t, text)
    assert ref.abs().max() > 1e-2
    assert bool(stats.heads.all() and stats.groups.all() and stats.tokens.all())
    assert stats.heads.shape == (3, DEPTH, HEADS) and stats.groups.shape == (3, DEPTH, GROUPS)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(dense, ref, atol=0, rtol=0)
    routers = set(model.state_dict()) - keys  # the backbone's own names, plus routers inside its blocks
    assert keys < set(model.state_dict()) and all(k.startswith("blocks.") for k in routers)
    assert {k.split(".")[2] for k in routers} == {"attn_rate", "mlp_rate", "token_selection"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_masked_equals_sliced(layout):
    model = random_routers(DyDiT(backbone=random_family(), router_layout=layout))
    engine = SlicedDyDiT(model, token_bucket=5)
    x, text = inputs(4)
    for t in (torch.full((4,), 0), torch.full((4,), 700), torch.tensor([999, 10, 500, 10])):
        assert rel_err(engine(x, t, text), model(x, t, text)) < 1e-5
    heads, groups = model.width_masks(torch.tensor([0, 700, 999]))
    assert (heads[:, 0].sum(-1) == (1 if layout == "forced_first" else 0)).all()  # layer 0: no or one unit
    assert 0 < heads[:, 1:].float().mean() < 1 and 0 < groups[:, 1:].float().mean() < 1
    assert engine.cache_info()["pack_bytes"] > 0  # real slices of the separate q/k/v and both streams


class Texts:
    """A condition object as the workflows pass one: rows selectable, the embeddings inside."""

    def __init__(self, embeddings: Tensor) -> None:
        self.embeddings = embeddings

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def select(self, rows: Tensor) -> Texts:
        return Texts(self.embeddings[rows])


def test_sliced_engine_takes_a_condition_object():
    model = random_routers(DyDiT(backbone=random_family()))
    x, text = inputs(3)
    t = torch.tensor([999, 10, 999])  # two groups of t: the engine selects the condition's rows
    assert rel_err(SlicedDyDiT(model)(x, t, Texts(text)), model(x, t, text)) < 1e-5


def test_analytic_flops_equal_counted_flops():
    model = random_routers(DyDiT(backbone=random_family()))
    x, text = inputs(3)
    t = torch.full((3,), 300)
    with count_flops() as dense, execution(model, "dense"):
        model(x, t, text)
    assert dict(dense.by_component) == {k: 3 * v for k, v in model.backbone.macs_table().items()}
    with torch.no_grad():
        _, stats = model.forward_with_routing(x, t, text)  # the evaluation decisions
    with count_flops() as fast:
        SlicedDyDiT(model)(x, t, text)
    a, m = model.layer_costs()
    assert 0 < stats.tokens.float().mean() < 1
    analytic = per_sample_macs(stats.heads, stats.groups, stats.tokens, a, m).sum()
    counted = fast.by_component["attention"] + fast.by_component["mlp"]
    assert counted < dense.by_component["attention"] + dense.by_component["mlp"]
    assert counted == pytest.approx(float(analytic), rel=1e-9)


def test_reordering_units_preserves_the_function():
    model = DyDiT(backbone=random_family(), router_layout="all").eval()
    x, text = inputs(2)
    t = torch.tensor([100, 800])
    with torch.no_grad():
        before = model(x, t, text)
        orders = reorder_by_importance(model)
        after = model(x, t, text)
    assert any(not torch.equal(o, torch.arange(len(o))) for pair in orders for o in pair)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_fine_tuning_with_the_flops_loss_moves_rho_toward_lambda():
    model = DyDiT(backbone=random_family()).train()
    with torch.no_grad():  # routers that are on but undecided enough for a few steps to matter
        for block in model.blocks:
            for lin in (block.attn_rate.router, block.mlp_rate.router, block.token_selection.output_layer):
                lin.bias.fill_(2.0)
    a, m = model.layer_costs()
    target = 0.5
    x, text = inputs(4)
    goal = torch.randn_like(x)
    t = torch.arange(4) * 240

    def mean_rho() -> float:  # over a few seeded Gumbel draws
        torch.manual_seed(11)
        with torch.no_grad():
            rhos = [flops_ratio(model.forward_with_routing(x, t, text)[1], a, m) for _ in range(4)]
        return float(torch.stack(rhos).mean())

    before = mean_rho()
    opt = torch.optim.Adam(model.parameters(), lr=0.04)
    for _ in range(8):
        out, stats = model.forward_with_routing(x, t, text)
        loss = F.mse_loss(out, goal) + flops_loss(flops_ratio(stats, a, m), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mean_rho()
    assert before > 0.65 and abs(after - target) < abs(before - target) - 0.05, (before, after)
