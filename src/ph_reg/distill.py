"""Student distillation: loss, optimiser, exponential schedule, training loop with checkpoints.

The student sees the original image and is trained on its patch tokens only to match the teacher's TTA-denoised
target with ``(1 - cosine) + mse_weight * MSE`` (method.md section 5).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from .io import atomic_path
from .utils import autocast_dtype, derive_seed, generator, normalize

CHECKPOINT_NAME = "last.ckpt"
TARGET_MODES = ("cached", "online")
log = logging.getLogger(__name__)


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
    """Hyper-parameters of one distillation run (method.md section 5).

    ``batch_size`` is per device and per micro-batch; the global batch size is
    ``batch_size * devices * num_nodes * accumulate_grad_batches`` (see ``global_batch_size``).
    """

    epochs: int = 100
    batch_size: int = 16
    accumulate_grad_batches: int = 1
    lr: float = 3e-4
    lr_end: float = 1e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    mse_weight: float = 1.0
    checkpoint_every: int = 10
    num_workers: int = 0
    precision: str = "auto"  # "auto": bf16-mixed on CUDA, 32-true on CPU
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"   # "auto": single device, or DDP (spawned from the node; torchrun/SLURM when launched so)
    resume: bool = False

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DistillConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown distillation training parameters {unknown}; expected some of {sorted(known)}")
        values = dict(values)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        config = cls(**values)
        for name in ("epochs", "batch_size", "checkpoint_every", "accumulate_grad_batches", "devices", "num_nodes"):
            if getattr(config, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(config, name)}")
        return config

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size * self.accumulate_grad_batches


class TargetPairs(Dataset):
    """Cached mode: (normalised image, denoised target) pairs from the prepared-image and teacher-target stores."""

    def __init__(self, images: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]],
                 indices: Sequence[int], mean: Sequence[float], std: Sequence[float]):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} prepared images but {len(targets)} teacher targets: rerun teacher_denoising "
                             f"(with student_distillation.targets: cached)")
        self.images, self.targets, self.indices = images, targets, list(indices)
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        _, i = item
        index = self.indices[i]
        image = normalize(self.images[index]["image"][None], self.mean, self.std)[0]
        return image, self.targets[index]["target"].float()


class OnlineTargets:
    """Online mode: the frozen teacher's TTA-denoised targets, recomputed for every batch with fresh views.

    The views of a batch come from ``generator(seed, "tta", epoch, *image_indices)``; ``teacher_denoising`` uses
    the same key with epoch 0, so cached and online targets agree when the crop is fixed and the epoch is 0.
    """

    def __init__(self, teacher: nn.Module, seed: int, n_views: int = 10, shift_frac: float = 0.15,
                 flip_prob: float = 0.5, pool_factor: int = 10, max_images_per_forward: int = 64):
        self.teacher = teacher.eval().requires_grad_(False)
        self.seed = seed
        self.tta = dict(n_views=n_views, shift_frac=shift_frac, flip_prob=flip_prob, pool_factor=pool_factor,
                        max_images_per_forward=max_images_per_forward)

    def to(self, device: torch.device) -> "OnlineTargets":
        self.teacher.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, epoch: int, indices: Sequence[int]) -> torch.Tensor:
        from .denoise import TTADenoiser

        teacher = self.teacher
        denoiser = TTADenoiser(lambda x: teacher(x).patch, teacher.patch_size, teacher.fill_value().to(images.device),
                               **self.tta)
        amp = autocast_dtype(images.device)
        with torch.autocast(images.device.type, dtype=amp) if amp is not None else nullcontext():
            return denoiser(images, generator(self.seed, "tta", epoch, *indices)).float()


class EpochTaggedSampler(Sampler):
    """Wraps a ``DistributedSampler`` and yields ``(epoch, index)`` so datasets can draw per-epoch randomness
    (fresh crops) deterministically, even inside DataLoader worker processes.

    The method is deliberately not called ``set_epoch``: Fabric's dataloader wrapper calls ``set_epoch`` with the
    number of epochs *it* has seen, which is wrong after a resume.
    """

    def __init__(self, sampler: DistributedSampler):
        self.sampler = sampler
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def _precision(config: DistillConfig) -> str:
    if config.precision != "auto":
        return config.precision
    return "bf16-mixed" if torch.cuda.is_available() and config.accelerator in ("auto", "cuda", "gpu") else "32-true"


def _launched_externally() -> bool:
    """True under torchrun (or any launcher that sets LOCAL_RANK) or a multi-task SLURM job."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def make_fabric(config: DistillConfig):
    """Lightning Fabric for the run: one device, or DDP spawned from inside the Kedro node, or DDP under
    torchrun/SLURM. Unused trainable parameters (e.g. the MLP of a MaskCLIP last block) are allowed."""
    from lightning_fabric import Fabric
    from lightning_fabric.strategies import DDPStrategy

    strategy: Any = config.strategy
    if strategy == "auto" and (config.world_size > 1 or _launched_externally()):
        strategy = DDPStrategy(find_unused_parameters=True,
                               **({} if _launched_externally() else {"start_method": "spawn"}))
    return Fabric(accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
                  strategy=strategy, precision=_precision(config))


def _all_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _rng_state() -> dict[str, Any]:
    import numpy as np

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def distill(student: nn.Module, dataset: Dataset, config: DistillConfig, seed: int,
            checkpoint_dir: str | os.PathLike | None = None,
            state_fn: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
            load_state_fn: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None,
            progress: bool = True,
            on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
            online_targets: OnlineTargets | None = None) -> list[dict[str, float]]:
    """Train the student's trainable parameters; return one history row per epoch. The student is updated in place.

    ``dataset[(epoch, i)]`` yields ``(image, target)`` (cached mode) or ``(image, i)`` with ``online_targets``
    (online mode). Shuffling is seeded per epoch from ``seed``, so a run resumed from a checkpoint replays exactly
    the batches an uninterrupted run would have seen. Batches whose student output, target or loss is not finite
    are skipped (on every rank) and counted. ``state_fn``/``load_state_fn`` (default: the model's trainable
    parameters) save and restore the weights in checkpoints; ``on_epoch_end(epoch, row)`` runs after each epoch.
    With several devices the work runs in spawned DDP processes and the student receives rank 0's weights.
    """
    from .models import load_trainable_state_dict, trainable_state_dict

    state_fn = state_fn or trainable_state_dict
    load_state_fn = load_state_fn or load_trainable_state_dict
    fabric = make_fabric(config)
    # the config travels as a dict: Lightning's spawn launcher refuses frozen dataclasses among the arguments
    external = _launched_externally()
    spawn = getattr(fabric.strategy, "launcher", None) is not None and not external
    args = (student, dataset, asdict(config), seed, checkpoint_dir, state_fn, load_state_fn, progress, on_epoch_end,
            online_targets, spawn)
    if spawn:
        payload, history = fabric.launch(_train, *args)  # spawned ranks; rank 0's result comes back
        load_state_fn(student, safetensors.torch.load(payload))
        return history
    if external:
        fabric.launch()
    _, history = _train(fabric, *args)
    return history


def _train(fabric, student, dataset, config_values, seed, checkpoint_dir, state_fn, load_state_fn, progress,
           on_epoch_end, online_targets, spawned):
    config = DistillConfig.from_dict(config_values)
    world = fabric.world_size
    if fabric.is_global_zero:
        log.info("distillation: global batch size %d = %d per device x %d devices x %d accumulated micro-batches",
                 config.batch_size * world * config.accumulate_grad_batches, config.batch_size, world,
                 config.accumulate_grad_batches)
    optimizer = torch.optim.AdamW(parameter_groups(student, config.weight_decay), lr=config.lr, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_during_epoch(step, 1.0, config.lr_end / config.lr, config.epochs)
    )
    start_epoch, history = 0, []
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    if config.resume and checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        load_state_fn(student, state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        if fabric.is_global_zero:
            log.info("resumed from %s after epoch %d", checkpoint, start_epoch)
    model, optimizer = fabric.setup(student, optimizer)
    if online_targets is not None:
        online_targets.to(fabric.device)
    sampler = EpochTaggedSampler(DistributedSampler(dataset, num_replicas=world, rank=fabric.global_rank, shuffle=True,
                                                    seed=derive_seed(seed, "shuffle") % (1 << 31), drop_last=False))
    workers = config.num_workers
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, multiprocessing_context="spawn" if workers > 0 else None)
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)
    trainable = [p for p in student.parameters() if p.requires_grad]
    accumulate = config.accumulate_grad_batches
    model.train()
    for epoch in range(start_epoch, config.epochs):
        sampler.use_epoch(epoch)
        totals = torch.zeros(4, dtype=torch.float64)  # loss, cosine, mse, micro-batches
        steps = skipped = images_seen = pending = 0
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (progress and fabric.is_global_zero),
                   leave=False)
        for batch_index, (images, second) in enumerate(bar):
            if online_targets is not None:
                targets = online_targets(images, epoch, second.tolist())
            else:
                targets = second
            output = model(images).patch
            loss, parts = distillation_loss(output, targets, config.mse_weight)
            finite = _all_finite(output.detach(), targets, loss.detach())
            if world > 1:
                finite = bool(fabric.all_reduce(torch.tensor(float(finite), device=fabric.device), reduce_op="sum")
                              == world)
            if not finite:
                skipped += 1
                continue
            pending += 1
            sync = pending == accumulate or batch_index == len(loader) - 1
            with fabric.no_backward_sync(model, enabled=not sync) if world > 1 else nullcontext():
                fabric.backward(loss / accumulate)
            if sync:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                steps, pending = steps + 1, 0
            images_seen += images.shape[0] * world
            totals += torch.tensor([loss.item(), parts["cosine"], parts["mse"], 1.0], dtype=torch.float64)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{images_seen / (time.perf_counter() - started):.1f}")
        if pending:  # the epoch ended on skipped batches after unsynchronised backward passes
            for param in trainable:
                if param.grad is not None and world > 1:
                    param.grad = fabric.all_reduce(param.grad, reduce_op="mean")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
        if world > 1:
            totals = fabric.all_reduce(totals.to(fabric.device), reduce_op="sum").cpu()
        micro = totals[3].item()
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "steps": steps, "skipped_batches": skipped,
               "images": images_seen}
        row.update({k: (totals[j].item() / micro if micro else math.nan) for j, k in enumerate(("loss", "cosine", "mse"))})
        history.append(row)
        scheduler.step()
        done = epoch + 1 == config.epochs
        if checkpoint is not None and ((epoch + 1) % config.checkpoint_every == 0 or done):
            if fabric.is_global_zero:
                with atomic_path(checkpoint) as tmp:
                    torch.save({"weights": state_fn(student), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "rng": _rng_state(), "epoch": epoch,
                                "history": history, "config": asdict(config)}, tmp)
            fabric.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
    if not fabric.is_global_zero:
        return None, history
    weights = {k: v.contiguous() for k, v in state_fn(student).items()}
    # bytes, not tensors: tensors sent from a spawned process that then exits cannot be received
    return (safetensors.torch.save(weights) if spawned else weights), history
