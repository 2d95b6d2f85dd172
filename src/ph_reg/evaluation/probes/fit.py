"""The training loop shared by the linear probes: AdamW steps on a loss per iteration, the schedule stepped after."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["fit_probe"]


def fit_probe(probe: nn.Module, optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler,
              iterations: int, loss_at: Callable[[int], Tensor], history: list[float] | None = None,
              before_step: Callable[[], None] | None = None,
              after_iteration: Callable[[int], None] | None = None) -> nn.Module:
    """Train ``probe`` for ``iterations`` steps and return it in eval mode.

    Iteration ``t``: ``loss = loss_at(t)`` (draws the batch and runs the probe), zero the gradients, backward,
    ``before_step()`` (e.g. gradient clipping), optimizer step, schedule step, ``after_iteration(t)`` (e.g. an
    evaluation). ``history``, when given, receives the loss of every iteration (one device sync, after training)."""
    probe.train()
    losses = []
    for t in range(iterations):
        loss = loss_at(t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step()
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
        if after_iteration is not None:
            after_iteration(t)
    if history is not None and losses:
        history.extend(torch.stack(losses).float().cpu().tolist())
    return probe.eval()
