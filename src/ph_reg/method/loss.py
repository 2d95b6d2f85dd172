"""The distillation objective and the optimiser's set-up: the loss, the release's exponential learning-rate
schedule, and the AdamW parameter groups.

The student sees the original image and is trained on its patch tokens only to match the teacher's TTA-denoised
target with ``(1 - cosine) + mse_weight * MSE`` (docs/method.md section 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def distillation_loss(student: torch.Tensor, target: torch.Tensor,
                      mse_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean(1 - cos) + mse_weight * mean((student - target)^2)`` over patch tokens, computed in fp32.

    ``student`` and ``target`` are (B, h, w, C); the cosine is taken over C. The parts (``cosine``, ``mse``) are
    detached 0-dim tensors on the device: reading them is left to the caller (a read makes the host wait).
    """
    if student.shape != target.shape:
        raise ValueError(f"student features {tuple(student.shape)} and target {tuple(target.shape)} differ in shape")
    s, t = student.float(), target.float()
    cosine_term = (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    mse_term = F.mse_loss(s, t)
    loss = cosine_term + mse_weight * mse_term
    return loss, {"cosine": cosine_term.detach(), "mse": mse_term.detach()}


def lr_after_step(epoch: int, lr: float, lr_end: float, epochs: int) -> float:
    """The learning rate the release sets after every optimizer step of ``epoch`` (0-based, of ``epochs``):
    ``max(lr * (lr_end / lr) ** ((epoch + 1) / epochs), lr_end)`` (0raiser0/PH-Reg ``DINOv2_full/distill_main.py``).

    The very first optimizer step of a run uses ``lr``; every later step uses the value set after the step before
    it. So all but the first step of epoch ``e`` run at ``lr_after_step(e)``, the first step of an epoch ``e > 0``
    at ``lr_after_step(e - 1)``, and the last epoch at ``lr_end`` (after its first step).
    """
    if epochs < 1 or lr <= 0 or lr_end <= 0:
        raise ValueError(f"need epochs >= 1 and positive lr, lr_end; got {epochs}, {lr}, {lr_end}")
    return max(lr * (lr_end / lr) ** ((epoch + 1) / epochs), lr_end)


NO_DECAY_KEYWORDS = ("registers", "positional_embedding", "pos_embed", "class_embedding", "cls_token")
#: ``training.weight_decay_exempt``: ``none`` decays every trainable parameter (the release: registers, positional
#: embedding, patch-embedding weight and bias, the whole last block); ``tokens_biases_norms`` exempts tokens, biases,
#: norms and LayerScale gammas (every parameter with fewer than 2 dimensions, and ``NO_DECAY_KEYWORDS``).
WEIGHT_DECAY_EXEMPTIONS = ("none", "tokens_biases_norms")


# not timm.optim.param_groups_weight_decay: it puts the no-decay group first, drops empty groups, matches names whole
# (not by keyword) and has no one-group "none", so the AdamW state and its checkpoints would be laid out differently
def parameter_groups(model: nn.Module, weight_decay: float, exempt: str = "none",
                     no_decay_keywords: Sequence[str] = NO_DECAY_KEYWORDS) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters (see ``WEIGHT_DECAY_EXEMPTIONS`` for ``exempt``).

    ``exempt="none"``: one group, every trainable parameter decays with ``weight_decay`` (the release). Otherwise
    two groups: matrices decay; biases, norms, LayerScale gammas and the tokens named by ``no_decay_keywords`` do
    not (weight decay 0).
    """
    if exempt not in WEIGHT_DECAY_EXEMPTIONS:
        raise ValueError(f"exempt must be one of {list(WEIGHT_DECAY_EXEMPTIONS)}, got {exempt!r}")
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if exempt != "none" and (param.ndim < 2 or any(key in name for key in no_decay_keywords)):
            no_decay.append(param)
        else:
            decay.append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters: check distillation.trainable")
    if exempt == "none":
        return [{"params": decay, "weight_decay": weight_decay}]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
