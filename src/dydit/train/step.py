"""One training iteration: the loss composition and the guarded optimizer step (docs/METHOD.md §5, §6.3).

The objective of docs/METHOD.md §5.5, spelled out in :func:`compute_loss`:

    L = L_diff(DyDiT, masked)                      §5.1, every iteration
      + L_diff(complete DiT, same weights)         §5.2, while step < complete_steps
      + w · (ρ − λ_t)²                             §5.3, ρ the batch-mean FLOPs ratio
      + w_d · ‖f_θ(x_t) − f_teacher(x_t)‖²         distillation from a frozen dense teacher
                                                   (a project option, off by default)

For a static DiT only the first term exists. :func:`guarded_step` then takes at most one
optimizer step (the reference stage-1 script takes two, §6.2): with ``clip`` the gradients are
scaled by min(1, threshold / norm), with ``skip`` the update is dropped unless norm < threshold,
exactly as the released stage-2 fine-tuning script (``train_without_completemodel.py``) does.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dydit.conditioning import ClassLabels, Condition, network_input
from dydit.constants import NUM_TIMESTEPS
from dydit.diffusion import GaussianDiffusion
from dydit.flops.analytic import flops_loss, flops_ratio
from dydit.flow import Transport
from dydit.models.dydit import RoutingStats, execution
from dydit.models.lora import recompute_context

# Router statistics are summarised per noise-level quarter (DDPM: t in [k·T/4, (k+1)·T/4), k = 0..3).
ROUTER_BUCKETS = 4
_ROUTER_FIELDS = ("count", "heads", "groups", "tokens")


class TrainForward(nn.Module):
    """The module DDP wraps: one call is one network pass in a named execution.

    ``forward(x, t, y, mode)`` returns ``(output, routing)``: for a DyDiT in ``"masked"`` mode the
    routing statistics of :meth:`DyDiT.forward_with_routing`; ``"dense"`` is the complete model
    (routers bypassed); a static DiT always returns ``routing=None``. DDP must see every network
    pass through its own ``forward``, hence this wrapper instead of calling the model's methods.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.dynamic = bool(model.config.dynamic)

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor, mode: str = "masked"
    ) -> tuple[Tensor, RoutingStats | None]:
        if not self.dynamic:
            return self.model(x, t, y), None
        if mode == "dense":
            with execution(self.model, "dense"):
                return self.model(x, t, y), None
        return self.model.forward_with_routing(x, t, y)


def compute_loss(
    net: nn.Module,
    diffusion: GaussianDiffusion | Transport,
    x0: Tensor,
    y: Condition | Tensor,
    t: Tensor,
    noise: Tensor,
    *,
    lambda_t: float | None = None,
    complete: bool = False,
    flops_weight: float = 2.0,
    layer_costs: tuple[float, float] = (1.0, 1.0),
    bf16: bool = False,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor], RoutingStats | None]:
    """The training loss of one batch (docs/METHOD.md §5.5) and its parts for logging.

    Args:
        net: a :class:`TrainForward` (possibly DDP-wrapped).
        diffusion: the training process: the diffusion (all T steps) or a flow-matching transport.
        x0: (B, C, H, W) clean data; y: the batch's :class:`~dydit.conditioning.Condition` (or its
            labels (B,)), which reaches the network as its network input; t: (B,) step indices
            (DDPM) or flow times in [0, 1] (flow matching); noise: ε like x0.
        lambda_t: the FLOPs target of this step (DyDiT), None for a static DiT.
        complete: add the complete-model loss (§5.2).
        flops_weight: w of the FLOPs loss; layer_costs: per-layer (A, M) of §5.3.
        bf16: run the network under bfloat16 autocast (the losses stay in float32).
        teacher: a frozen network ``teacher(x, t, y)`` (in eval mode); with ``distill_weight`` > 0
            the loss gains w_d · mean((out − teacher(x_t, t, y))²) over all output channels. The
            class dropout is then drawn once here (:meth:`~dydit.conditioning.Condition.dropout`),
            so that student and teacher see the same condition.
    Returns:
        (loss, parts, routing): the scalar loss, a dict of detached scalars, the router decisions.
    """
    cast = torch.autocast(x0.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    x_t = diffusion.q_sample(x0, t, noise)
    t_model = diffusion.original_timesteps(t)
    distill = teacher is not None and distill_weight > 0
    cond = y if isinstance(y, Condition) else ClassLabels(y, _model(net).y_embedder.num_classes)
    # With a teacher the class dropout is drawn here, before the network is told not to draw it.
    y_in = _drop_labels(net, cond) if distill else cond  # otherwise the network drops labels itself
    with cast, _labels_dropped_by_caller(net) if distill else contextlib.nullcontext():
        out, routing = net(x_t, t_model, y_in.network_input(), "masked")
    terms = diffusion.loss_terms(out.float(), x0, x_t, t, noise)
    loss = terms["loss"].mean()  # §5.1: hybrid loss (DDPM) or flow-matching loss of the network
    parts = {"loss_diffusion": loss.detach()}
    parts.update({k: v.mean().detach() for k, v in terms.items() if k != "loss"})  # mse (+ vb for DDPM)
    if complete:
        with cast:
            full, _ = net(x_t, t_model, cond.network_input(), "dense")
        complete_loss = diffusion.loss_terms(full.float(), x0, x_t, t, noise)["loss"].mean()
        loss = loss + complete_loss  # §5.2: keep the complete model healthy while routers prune
        parts["loss_complete"] = complete_loss.detach()
    if distill:
        with torch.no_grad(), cast:
            target = teacher(x_t, t_model, y_in.network_input())
        loss_distill = (out.float() - target.float()).square().mean()
        loss = loss + distill_weight * loss_distill
        parts["loss_distill"] = loss_distill.detach()
    if routing is not None:
        assert lambda_t is not None, "a DyDiT step needs a FLOPs target"
        rho = flops_ratio(routing, *layer_costs)
        loss_flops = flops_loss(rho, lambda_t, flops_weight)
        loss = loss + loss_flops  # §5.3: w·(ρ − λ_t)²
        parts.update(flops_ratio=rho.detach(), loss_flops=loss_flops.detach())
    parts["loss"] = loss.detach()
    return loss, parts, routing


@torch.no_grad()
def measured_flops_ratio(
    model: nn.Module,
    diffusion: GaussianDiffusion | Transport,
    x0: Tensor,
    y: Condition | Tensor,
    t: Tensor,
    noise: Tensor,
    layer_costs: tuple[float, float],
) -> float:
    """ρ (docs/METHOD.md §5.3) that a DyDiT spends in eval mode (hard masks, as when sampling) on
    the batch x_t of ``x0`` at times ``t``: what the weights a run ends with will cost."""
    was_training = model.training
    model.eval()
    try:
        x_t = diffusion.q_sample(x0, t, noise)
        _, routing = model.forward_with_routing(x_t, diffusion.original_timesteps(t), network_input(y))
        return float(flops_ratio(routing, *layer_costs))
    finally:
        model.train(was_training)


def _model(net: nn.Module) -> nn.Module:
    """The network inside a (possibly DDP-wrapped) :class:`TrainForward`."""
    return (net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net).model


def _dropout_holder(net: nn.Module) -> tuple[Any, str]:
    """(object, attribute) of the network's condition dropout probability: DiT's label embedder, or a
    text-to-image FLUX's ``caption_dropout`` (on the backbone of a DyDiT; docs/METHOD.md §17.6)."""
    model = _model(net)
    embedder = getattr(model, "y_embedder", None)
    if embedder is not None:
        return embedder, "dropout_prob"
    return getattr(model, "backbone", model), "caption_dropout"


def _drop_labels(net: nn.Module, cond: Condition) -> Condition:
    """Class dropout (docs/METHOD.md §1.2 item 4) drawn outside the network, as the network would
    (:meth:`~dydit.conditioning.Condition.dropout`: rows replaced by the condition's null)."""
    holder, name = _dropout_holder(net)
    return cond.dropout(getattr(holder, name, 0.0))


@contextlib.contextmanager
def _labels_dropped_by_caller(net: nn.Module):
    """Inside the block the network uses its labels as given (the caller drew the class dropout)."""
    holder, name = _dropout_holder(net)
    p = getattr(holder, name, 0.0)
    setattr(holder, name, 0.0)
    try:
        yield
    finally:
        setattr(holder, name, p)


def grad_norm(params: list[Tensor]) -> Tensor:
    """Global 2-norm of the gradients of ``params`` (a 0-dim tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(g.float()) for g in grads]
    # Sharded (FSDP) gradients give partial norms: their full value is one collective each.
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms))


def guarded_step(
    optimizer: torch.optim.Optimizer, params: list[Tensor], guard: str, threshold: float
) -> tuple[float, bool]:
    """At most one optimizer step after backward (docs/METHOD.md §6.2 gradient-norm guard).

    ``clip`` (the default): scale the gradients by min(1, threshold / norm), then step.
    ``skip``: step only if norm < threshold, the released stage-2 fine-tuning's rule (a norm equal
    to the threshold skips, as there). ``none``: always step. A non-finite norm never steps.
    Returns (norm before clipping, whether the optimizer stepped).
    """
    norm = grad_norm(params)
    value = float(norm)
    if not math.isfinite(value) or (guard == "skip" and not value < threshold):
        optimizer.zero_grad(set_to_none=True)
        return value, False
    if guard == "clip" and value > threshold:
        scale = threshold / (value + 1e-6)
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], scale)
    optimizer.step()
    return value, True


def noise_level(diffusion: GaussianDiffusion | Transport, t: Tensor) -> Tensor:
    """Where t lies between data (0) and pure noise (1): t / T for DDPM, 1 − t for flow matching."""
    if isinstance(diffusion, Transport):
        return 1.0 - t.float()
    return t.float() / diffusion.num_timesteps


def route_buckets(routing: RoutingStats, t: Tensor, num_timesteps: int = NUM_TIMESTEPS) -> Tensor:
    """Sums of (count, head, group, token keep ratios) per timestep bucket: (ROUTER_BUCKETS, 4).

    ``t`` (B,) in [0, num_timesteps): DDPM steps, or a noise level in [0, 1] from :func:`noise_level`
    with ``num_timesteps=1``. Bucket k holds [k/4, (k+1)/4) of the range, from the low-noise to the
    high-noise quarter. Divide columns 1..3 by column 0 (after summing over steps and ranks) for mean
    keep ratios.
    """
    bucket = (t.float() * ROUTER_BUCKETS / num_timesteps).long().clamp(0, ROUTER_BUCKETS - 1)  # (B,)
    per_sample = torch.stack(
        [
            torch.ones(t.shape[0], device=t.device),
            routing.heads.detach().float().mean((1, 2)),
            routing.groups.detach().float().mean((1, 2)),
            routing.tokens.detach().float().mean((1, 2)),
        ],
        dim=1,
    )  # (B, 4)
    sums = torch.zeros(ROUTER_BUCKETS, len(_ROUTER_FIELDS), device=t.device)
    return sums.index_add_(0, bucket, per_sample)


def router_report(bucket_sums: Tensor) -> dict[str, float]:
    """Mean keep ratios per bucket: ``router/t{k}/{heads,groups,tokens}``."""
    out = {}
    for k, row in enumerate(bucket_sums.tolist()):
        if row[0] > 0:
            for name, value in zip(_ROUTER_FIELDS[1:], row[1:]):
                out[f"router/t{k}/{name}"] = value / row[0]
    return out


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute every block's activations in the backward pass (non-reentrant checkpointing).

    Wraps the block methods the forward passes call (``forward`` and DyDiT's ``forward_masked``)
    on the instances, so the state dict and the class are unchanged. RNG state is preserved, so the
    recomputed Gumbel noise and masks are the ones of the forward pass. Create the EMA copy before
    calling this.
    """
    for block in model.blocks:
        for name in ("forward", "forward_masked"):
            method = getattr(block, name, None)
            if method is not None:
                setattr(block, name, _checkpointed(method))


def _checkpointed(method: Any) -> Any:
    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return method(*args, **kwargs)
        # TD-LoRA's adapters (if active) are re-entered for the recomputation, same gates.
        contexts = lambda: (contextlib.nullcontext(), recompute_context())  # noqa: E731
        return checkpoint(method, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    return run
