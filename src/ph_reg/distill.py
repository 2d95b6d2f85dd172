"""Student distillation: loss, optimiser, exponential schedule, training loop with checkpoints.

The student sees the original image and is trained on its patch tokens only to match the teacher's TTA-denoised
target with ``(1 - cosine) + mse_weight * MSE`` (method.md section 5).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .io import atomic_path
from .utils import derive_seed, generator, normalize

CHECKPOINT_NAME = "last.ckpt"


def distillation_loss(student: torch.Tensor, target: torch.Tensor, mse_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """``mean(1 - cos) + mse_weight * mean((student - target)^2)`` over patch tokens, computed in fp32.

    ``student`` and ``target`` are (B, h, w, C); the cosine is taken over C.
    """
    if student.shape != target.shape:
        raise ValueError(f"student features {tuple(student.shape)} and target {tuple(target.shape)} differ in shape")
    s, t = student.float(), target.float()
    cosine_term = (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    mse_term = F.mse_loss(s, t)
    loss = cosine_term + mse_weight * mse_term
    return loss, {"cosine": cosine_term.item(), "mse": mse_term.item()}


def exponential_lr(epoch: int, lr: float, lr_end: float, epochs: int) -> float:
    """The learning rate set after ``epoch`` (0-based) ends: ``lr * (lr_end / lr) ** ((epoch + 1) / epochs)``,
    floored at ``lr_end``. Epoch 0 trains at ``lr``; epoch ``e > 0`` trains at ``exponential_lr(e - 1, ...)``."""
    if epochs < 1 or lr <= 0 or lr_end <= 0:
        raise ValueError(f"need epochs >= 1 and positive lr, lr_end; got {epochs}, {lr}, {lr_end}")
    return max(lr * (lr_end / lr) ** ((epoch + 1) / epochs), lr_end)


def lr_during_epoch(epoch: int, lr: float, lr_end: float, epochs: int) -> float:
    """The learning rate used while training ``epoch``."""
    return lr if epoch == 0 else exponential_lr(epoch - 1, lr, lr_end, epochs)


NO_DECAY_KEYWORDS = ("registers", "positional_embedding", "pos_embed", "class_embedding", "cls_token")


def parameter_groups(model: nn.Module, weight_decay: float, no_decay_keywords: Sequence[str] = NO_DECAY_KEYWORDS) -> list[dict[str, Any]]:
    """Two AdamW groups over the trainable parameters: matrices decay; biases, norms and tokens do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(key in name for key in no_decay_keywords):
            no_decay.append(param)
        else:
            decay.append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters: check distillation.trainable")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class DistillConfig:
    """Hyper-parameters of one distillation run (method.md section 5)."""

    epochs: int = 100
    batch_size: int = 16
    lr: float = 3e-4
    lr_end: float = 1e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    mse_weight: float = 1.0
    checkpoint_every: int = 10
    num_workers: int = 0
    precision: str = "auto"  # "auto": bf16-mixed on CUDA, 32-true on CPU
    accelerator: str = "auto"
    resume: bool = False
    log_every: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DistillConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown distillation parameters {unknown}; expected some of {sorted(known - {'extra'})}")
        values = dict(values)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        config = cls(**values)
        if config.epochs < 1 or config.batch_size < 1 or config.checkpoint_every < 1:
            raise ValueError(f"epochs, batch_size and checkpoint_every must be >= 1 in {config}")
        return config


class TargetPairs(Dataset):
    """(normalised image, denoised target) pairs read from the prepared-image and teacher-target stores."""

    def __init__(self, images: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]],
                 indices: Sequence[int], mean: Sequence[float], std: Sequence[float]):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} prepared images but {len(targets)} teacher targets: rerun teacher_denoising")
        self.images, self.targets, self.indices = images, targets, list(indices)
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.indices[i]
        image = normalize(self.images[index]["image"][None], self.mean, self.std)[0]
        return image, self.targets[index]["target"].float()


def _precision(config: DistillConfig) -> str:
    if config.precision != "auto":
        return config.precision
    return "bf16-mixed" if torch.cuda.is_available() and config.accelerator in ("auto", "cuda", "gpu") else "32-true"


def _all_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def distill(student: nn.Module, dataset: Dataset, config: DistillConfig, seed: int,
            checkpoint_dir: str | os.PathLike | None = None,
            state_fn: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
            load_state_fn: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None,
            progress: bool = True,
            on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train the student's trainable parameters on ``dataset``; return one history row per epoch.

    Shuffling is seeded per epoch from ``seed``, so a run resumed from a checkpoint replays exactly the batches an
    uninterrupted run would have seen. Batches whose student output, target or loss is not finite are skipped and
    counted in the history. ``state_fn``/``load_state_fn`` save and restore the trainable weights in checkpoints.
    ``on_epoch_end(epoch, row)`` is called after each epoch's checkpoint is written.
    """
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator=config.accelerator, devices=1, precision=_precision(config))
    optimizer = torch.optim.AdamW(parameter_groups(student, config.weight_decay), lr=config.lr, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_during_epoch(step, 1.0, config.lr_end / config.lr, config.epochs)
    )
    start_epoch, history = 0, []
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    if config.resume and checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if load_state_fn is None:
            raise ValueError("resume needs load_state_fn to restore the trainable weights")
        load_state_fn(student, state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
    model, optimizer = fabric.setup(student, optimizer)
    model.train()
    for epoch in range(start_epoch, config.epochs):
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, num_workers=config.num_workers,
                            generator=generator(seed, "shuffle", epoch), drop_last=False)
        loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)
        totals = {"loss": 0.0, "cosine": 0.0, "mse": 0.0}
        steps = skipped = images_seen = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for images, targets in bar:
            output = model(images).patch
            loss, parts = distillation_loss(output, targets, config.mse_weight)
            if not _all_finite(output.detach(), targets, loss.detach()):
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            optimizer.step()
            steps += 1
            images_seen += images.shape[0]
            totals["loss"] += loss.item()
            totals["cosine"] += parts["cosine"]
            totals["mse"] += parts["mse"]
            bar.set_postfix(loss=f"{loss.item():.4f}")
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "steps": steps, "skipped_batches": skipped,
               "images": images_seen}
        row.update({k: (v / steps if steps else math.nan) for k, v in totals.items()})
        history.append(row)
        scheduler.step()
        done = epoch + 1 == config.epochs
        if checkpoint is not None and state_fn is not None and ((epoch + 1) % config.checkpoint_every == 0 or done):
            with atomic_path(checkpoint) as tmp:
                torch.save({"weights": state_fn(student), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                            "config": asdict(config)}, tmp)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
    return history
