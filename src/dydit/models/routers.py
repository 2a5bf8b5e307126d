"""DyDiT routers: TDW width routers, the SDT token router and Gumbel-sigmoid binarisation.

docs/METHOD.md §3.1 (width routers), §3.2 (Gumbel-sigmoid + straight-through), §4.1 (token router).

- A :class:`WidthRouter` is one ``nn.Linear(D, K)`` applied to the timestep embedding E_t. With the
  ``"forced_first"`` layout (current DyDiT release) it has K = H - 1 outputs and index 0 is always
  on; with ``"all"`` (Dec-2024 release) K = H and nothing is forced.
- A :class:`TokenRouter` scores every token of the post-attention residual stream with
  Linear(D, D/16) -> ReLU -> Linear(D/16, 1).
- Training: hard 0/1 decisions from a Gumbel-sigmoid at temperature ``GUMBEL_TAU`` with
  straight-through gradients. Evaluation: keep iff logit > 0, an exact boolean (no noise, no
  temperature).

Initial biases (``WIDTH_ROUTER_INIT_BIAS`` = 15, ``TOKEN_ROUTER_INIT_BIAS`` = 35) are set by
``DyDiT.initialize_weights`` so that a fresh DyDiT keeps everything and computes its DiT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dydit.constants import GUMBEL_TAU, TOKEN_ROUTER_REDUCTION
from dydit.flops import formulas
from dydit.flops.counter import record
from dydit.presets import ROUTER_LAYOUTS


def _gumbel(like: Tensor) -> Tensor:
    """Standard Gumbel(0, 1) noise with the shape of ``like``, drawn as -log(Exp(1))."""
    return -torch.empty_like(like).exponential_().log()


def gumbel_sigmoid(logits: Tensor, training: bool, tau: float = GUMBEL_TAU) -> Tensor:
    """Binary decisions as 0/1 floats of ``logits``' shape (docs/METHOD.md §3.2).

    Training: s = sigmoid((z + g1 - g2) / tau) with two independent Gumbel samples per element;
    the forward value is the hard 1[s > 0.5] exactly, the gradient is that of s (straight-through).
    Evaluation: 1[z > 0], deterministic and without gradient.
    """
    if not training:
        return (logits > 0).to(logits.dtype)
    # In float32 even under bf16 autocast: bfloat16 rounds sigmoid(7) = 0.99909 to 1, so the
    # straight-through gradient s·(1 − s) of a router started at bias 35 (τ = 5) would be exactly 0
    # and its FLOPs loss could never move it. The masks go back in the logits' dtype.
    with torch.autocast(logits.device.type, enabled=False):
        z = logits.float()
        soft = torch.sigmoid((z + _gumbel(z) - _gumbel(z)) / tau)
        hard = (soft > 0.5).to(soft.dtype)
        # hard + (soft - soft.detach()) is exactly ``hard`` in the forward pass and has soft's gradient.
        return (hard + (soft - soft.detach())).to(logits.dtype)


class WidthRouter(nn.Module):
    """TDW router: E_t (B, D) -> mask over H heads or MLP groups (B, H).

    ``router`` is the only parameterised layer (checkpoint keys ``*.router.weight``/``.bias``).
    """

    def __init__(self, hidden_size: int, num_units: int, layout: str = "forced_first"):
        super().__init__()
        if layout not in ROUTER_LAYOUTS:
            raise ValueError(f"router layout must be one of {ROUTER_LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.num_units = num_units
        self.forced = 1 if layout == "forced_first" else 0  # leading units that are always on
        self.router = nn.Linear(hidden_size, num_units - self.forced, bias=True)

    def logits(self, t_emb: Tensor) -> Tensor:
        """Router logits for the non-forced units. (B, D) -> (B, K)."""
        macs = formulas.linear_macs(1, self.router.in_features, self.router.out_features)
        record("width_router", t_emb.shape[0] * macs)
        return self.router(t_emb)

    def _with_forced(self, mask: Tensor) -> Tensor:
        if not self.forced:
            return mask
        ones = torch.ones(mask.shape[0], self.forced, dtype=mask.dtype, device=mask.device)
        return torch.cat([ones, mask], dim=1)

    def forward(self, t_emb: Tensor) -> Tensor:
        """0/1 mask (B, H), straight-through in training mode; forced units are constant 1."""
        return self._with_forced(gumbel_sigmoid(self.logits(t_emb), self.training))

    def hard_mask(self, t_emb: Tensor) -> Tensor:
        """Evaluation-semantics boolean mask (B, H) whatever the module's mode."""
        return self._with_forced(self.logits(t_emb) > 0)


def token_router_logits(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """The SDT router Linear(D, D/16) -> ReLU -> Linear(D/16, 1) on x (B, N, D) -> logits (B, N).

    A function of the weights so that :class:`TokenRouter` and the sliced engine run the same code.
    """
    return F.linear(F.relu(F.linear(x, w1, b1)), w2, b2).squeeze(-1)


class TokenRouter(nn.Module):
    """SDT router: residual stream x (B, N, D) -> per-token logits (B, N) (docs/METHOD.md §4.1).

    ``mlp_head`` = Linear(D, D/16) -> ReLU -> Linear(D/16, 1), checkpoint keys
    ``token_selection.mlp_head.0.*`` and ``token_selection.mlp_head.2.*``; read them through
    :attr:`hidden_layer` and :attr:`output_layer`.
    """

    def __init__(self, hidden_size: int, reduction: int = TOKEN_ROUTER_REDUCTION):
        super().__init__()
        hidden = max(1, hidden_size // reduction)
        self.mlp_head = nn.Sequential(nn.Linear(hidden_size, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    @property
    def hidden_layer(self) -> nn.Linear:
        """Linear(D, D/16), the first layer."""
        return self.mlp_head[0]

    @property
    def output_layer(self) -> nn.Linear:
        """Linear(D/16, 1); its bias sets how many tokens are kept."""
        return self.mlp_head[-1]

    def weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(w1, b1, w2, b2), the arguments of :func:`token_router_logits`."""
        first, last = self.hidden_layer, self.output_layer
        return first.weight, first.bias, last.weight, last.bias

    def logits(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N); a token is kept iff its logit > 0 at evaluation."""
        b, n, d = x.shape
        hidden = self.hidden_layer.out_features
        record("token_router", b * (formulas.linear_macs(n, d, hidden) + formulas.linear_macs(n, hidden, 1)))
        return token_router_logits(x, *self.weights())

    def forward(self, x: Tensor) -> Tensor:
        """0/1 token mask (B, N), straight-through in training mode."""
        return gumbel_sigmoid(self.logits(x), self.training)
