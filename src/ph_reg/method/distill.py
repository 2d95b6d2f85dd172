"""Student distillation: loss, optimiser, exponential schedule, training loop with checkpoints.

The student sees the original image and is trained on its patch tokens only to match the teacher's TTA-denoised
target with ``(1 - cosine) + mse_weight * MSE`` (method.md section 5).

Nothing is lost to trouble: SIGINT/SIGTERM stop training at the next optimizer step with a checkpoint of the exact
position (epoch and batch) and :class:`TrainingInterrupted`; ``resume`` then replays the remaining batches as an
uninterrupted run would. Checkpoints are written to a temporary file and renamed, so ``kill -9`` leaves the last
one intact. Non-finite batches are skipped and counted; more than ``max_nonfinite_batches`` abort the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from ph_reg.io import Interrupted, WriteError, atomic_path, stop_on_signals
from ph_reg.config import ConfigError
from ph_reg.runtime import derive_seed, normalize

if TYPE_CHECKING:
    from ph_reg.method.student import StudentSnapshots
    from ph_reg.method.targets import OnlineTargets

CHECKPOINT_NAME = "last.ckpt"
TARGET_MODES = ("cached", "online")
TRAINING_PREFIX = "student_distillation.training"
#: The settings that may differ between a checkpoint and the run that resumes from it, because they change neither
#: the batches nor the numbers: ``num_workers`` only reads the data (the batches are fixed by the seed), ``resume``
#: and ``checkpoint_every`` decide whether to load and when to save, ``max_nonfinite_batches`` when to give up, and
#: the rest where and how artifacts are stored. Every other setting a checkpoint records (the training config, the
#: seed, the number of training images, the world size, the resolved precision and the ``settings`` the caller
#: passes: backbone, student, teacher, data) must be equal, or the resume is refused (``ResumeMismatchError``).
RESUME_FREE_SETTINGS = (f"{TRAINING_PREFIX}.num_workers", f"{TRAINING_PREFIX}.resume",
                        f"{TRAINING_PREFIX}.checkpoint_every", f"{TRAINING_PREFIX}.max_nonfinite_batches",
                        "student_distillation.checkpoint_dir", "teacher_denoising.resume",
                        "teacher_denoising.records_per_shard", "data_preparation.records_per_shard")
NOT_RECORDED = "(not recorded)"
log = logging.getLogger(__name__)


class TrainingInterrupted(Interrupted):
    """Training stopped on SIGINT/SIGTERM; the checkpoint holds the exact position (see ``resume``)."""


class ResumeMismatchError(ValueError):
    """``resume: true`` with a checkpoint trained under settings that differ from the run's in something that
    changes the result; the message names each key with its value in the checkpoint and now."""


class NonFiniteBatchesError(FloatingPointError):
    """More batches than ``max_nonfinite_batches`` had a non-finite student output, target or loss."""


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


def parameter_groups(model: nn.Module, weight_decay: float, exempt: str = "none",
                     no_decay_keywords: Sequence[str] = NO_DECAY_KEYWORDS) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters (see ``WEIGHT_DECAY_EXEMPTIONS`` for ``exempt``).

    ``exempt="none"``: one group, every trainable parameter decays with ``weight_decay`` (the release). Otherwise
    two groups: matrices decay; biases, norms, LayerScale gammas and the tokens named by ``no_decay_keywords`` do
    not (weight decay 0).
    """
    if exempt not in WEIGHT_DECAY_EXEMPTIONS:
        raise ValueError(f"exempt must be one of {list(WEIGHT_DECAY_EXEMPTIONS)}, got {exempt!r}")
    decay, no_decay = [], []
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
    weight_decay_exempt: str = "none"  # see WEIGHT_DECAY_EXEMPTIONS; "none" = the release
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
    max_nonfinite_batches: int | None = 100  # None: never abort (non-finite batches are still skipped)
    drop_last: bool = False  # True: each epoch leaves out the images that do not fill a last whole global batch
    snapshot_every: int | None = None     # student snapshots after every this many epochs (None: none) ...
    snapshot_epochs: tuple[int, ...] = ()  # ... and after these epochs (1-based); see ``snapshot_epoch_numbers``

    @classmethod
    def from_dict(cls, values: dict[str, Any], prefix: str = "student_distillation.training") -> "DistillConfig":
        """Build from configuration values, with errors naming ``<prefix>.<key>``, the value and what is allowed."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown parameters {[f'{prefix}.{k}' for k in unknown]}; the known keys of {prefix} "
                             f"are {sorted(known)}")
        values = dict(values)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        snapshot_epochs = values.get("snapshot_epochs", ())
        if not isinstance(snapshot_epochs, (list, tuple)) or not all(
                isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in snapshot_epochs):
            raise ConfigError(f"{prefix}.snapshot_epochs", snapshot_epochs, "a list of epoch numbers >= 1 (1-based)")
        values["snapshot_epochs"] = tuple(sorted(set(snapshot_epochs)))
        config = cls(**values)
        if not isinstance(config.drop_last, bool):
            raise ConfigError(f"{prefix}.drop_last", config.drop_last, "true or false")
        every = config.snapshot_every
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise ConfigError(f"{prefix}.snapshot_every", every, "an integer >= 1, or null for no periodic snapshots")
        for name in ("epochs", "batch_size", "checkpoint_every", "accumulate_grad_batches", "devices", "num_nodes"):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{prefix}.{name}", value, "an integer >= 1")
        limit = config.max_nonfinite_batches
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise ConfigError(f"{prefix}.max_nonfinite_batches", limit, "an integer >= 0, or null to never abort")
        for name in ("lr", "lr_end"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{prefix}.{name}", value, "a number > 0")
        if isinstance(config.weight_decay, bool) or not isinstance(config.weight_decay, (int, float)) \
                or not config.weight_decay >= 0:
            raise ConfigError(f"{prefix}.weight_decay", config.weight_decay, "a number >= 0")
        if config.weight_decay_exempt not in WEIGHT_DECAY_EXEMPTIONS:
            raise ConfigError(f"{prefix}.weight_decay_exempt", config.weight_decay_exempt,
                              f"one of {list(WEIGHT_DECAY_EXEMPTIONS)} ('none': every trainable parameter decays, "
                              f"as the release does)")
        return config

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size * self.accumulate_grad_batches

    def snapshot_epoch_numbers(self) -> list[int]:
        """The 1-based epochs after which the student is kept as a snapshot: every ``snapshot_every`` epochs and
        each of ``snapshot_epochs``, up to ``epochs`` (the release: epoch 1 and every 10)."""
        periodic = range(self.snapshot_every, self.epochs + 1, self.snapshot_every) if self.snapshot_every else ()
        return sorted({*periodic, *(e for e in self.snapshot_epochs if e <= self.epochs)})


class TargetPairs(Dataset):
    """Cached mode: (normalised image, denoised target) pairs from the prepared-image and teacher-target stores.

    ``crops[i]`` lists the store records of training image ``i``: its ``data_preparation.crops_per_image`` = K
    fixed crops, each denoised with its own draw of views (a single record index stands for K = 1). Like the online
    mode, an epoch shows every image once: item ``(epoch, i)`` is crop ``epoch % K`` of image ``i``, so K = 1
    repeats one crop and one view draw every epoch, and a larger K comes closer to the fresh crop and views of every
    step, with the same epochs, optimizer steps and schedule.
    """

    def __init__(self, images: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]],
                 crops: Sequence[int | Sequence[int]], mean: Sequence[float], std: Sequence[float]):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} prepared images but {len(targets)} teacher targets: rerun teacher_denoising "
                             f"(with student_distillation.targets: cached)")
        self.images, self.targets = images, targets
        self.crops = [list(c) if isinstance(c, Sequence) else [int(c)] for c in crops]
        if not all(self.crops):
            raise ValueError("TargetPairs: every training image needs at least one cached crop")
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.crops)

    def record(self, epoch: int, i: int) -> int:
        """The store record that image ``i`` trains on in ``epoch``: its crops in turn."""
        crops = self.crops[i]
        return crops[epoch % len(crops)]

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.record(*item)
        image = normalize(self.images[index]["image"][None], self.mean, self.std)[0]
        return image, self.targets[index]["target"].float()


class EpochTaggedSampler(Sampler):
    """Wraps a ``DistributedSampler`` and yields ``(epoch, index)`` so datasets can draw per-epoch randomness
    (fresh crops) deterministically, even inside DataLoader worker processes.

    The method is deliberately not called ``set_epoch``: Fabric's dataloader wrapper calls ``set_epoch`` with the
    number of epochs *it* has seen, which is wrong after a resume.
    """

    def __init__(self, sampler: DistributedSampler):
        self.sampler = sampler
        self.epoch = 0
        self.skip = 0

    def use_epoch(self, epoch: int, skip: int = 0) -> None:
        """Draw ``epoch``'s order; leave out its first ``skip`` indices (a resumed epoch's finished batches)."""
        self.epoch, self.skip = epoch, skip
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, int(i)) for n, i in enumerate(self.sampler) if n >= self.skip)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


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
            online_targets: "OnlineTargets | None" = None,
            snapshots: StudentSnapshots | None = None,
            settings: Mapping[str, Any] | None = None) -> list[dict[str, float]]:
    """Train the student's trainable parameters; return one history row per epoch. The student is updated in place.

    ``dataset[(epoch, i)]`` yields ``(image, target)`` (cached mode) or ``(image, i)`` with ``online_targets``
    (online mode). Shuffling is seeded per epoch from ``seed``, so a run resumed from a checkpoint replays exactly
    the batches an uninterrupted run would have seen. Batches whose student output, target or loss is not finite
    are skipped (on every rank) and counted. ``state_fn``/``load_state_fn`` (default: the model's trainable
    parameters) save and restore the weights in checkpoints; ``on_epoch_end(epoch, row)`` runs after each epoch.
    With several devices the work runs in spawned DDP processes and the student receives rank 0's weights.
    ``config.drop_last`` leaves out each epoch's last incomplete batch (resumes still replay the same batches).
    ``snapshots`` keeps ``state_fn(student)`` after each of ``config.snapshot_epoch_numbers()`` (a run that starts
    from its first epoch first removes the snapshots of an earlier run).

    Every checkpoint records the training config and :func:`run_settings` (the seed, the number of training images,
    the world size, the resolved precision and ``settings``: whatever else the result depends on, e.g. the
    backbone, student, teacher and data sections). ``config.resume`` refuses a checkpoint whose records differ from
    the run's in anything but ``RESUME_FREE_SETTINGS`` (:func:`check_resume`), naming each key.
    """
    from ph_reg.models import load_trainable_state_dict, trainable_state_dict

    state_fn = state_fn or trainable_state_dict
    load_state_fn = load_state_fn or load_trainable_state_dict
    fabric = make_fabric(config)
    # the config travels as a dict: Lightning's spawn launcher refuses frozen dataclasses among the arguments
    external = _launched_externally()
    spawn = getattr(fabric.strategy, "launcher", None) is not None and not external
    args = (student, dataset, asdict(config), seed, checkpoint_dir, state_fn, load_state_fn, progress, on_epoch_end,
            online_targets, spawn, snapshots, settings)
    if spawn:
        payload, history = fabric.launch(_train, *args)  # spawned ranks; rank 0's result comes back
        load_state_fn(student, safetensors.torch.load(payload))
        return history
    if external:
        fabric.launch()
    _, history = _train(fabric, *args)
    return history


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then rename: ``kill -9`` or a full disk never damage the last one."""
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as error:  # torch reports write failures (disk full) as RuntimeError
            raise WriteError(path, error) from error


def _plain(value: Any) -> Any:
    """``value`` as JSON has it (tuples as lists, paths as strings), so that saved and current settings compare."""
    return json.loads(json.dumps(value, default=str))


def _differences(old: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every setting that differs, leaving out ``RESUME_FREE_SETTINGS``."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(old.keys() | new.keys(), key=str)
                for d in _differences(old.get(k, NOT_RECORDED), new.get(k, NOT_RECORDED), f"{key}.{k}" if key else k)]
    return [] if old == new or key in RESUME_FREE_SETTINGS else [(key, old, new)]


def run_settings(config: DistillConfig, seed: int, images: int, world: int,
                 settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint records beside its training config, to check a resume against: the seed, the number of
    training images, the world size and the resolved precision (with ``auto``, the device decides it), and the
    caller's ``settings`` (the node passes the backbone, student, teacher and data sections)."""
    return _plain({**(settings or {}), "seed": seed, "number of training images": images, "world size": world,
                   "precision (resolved)": _precision(config)})


def check_resume(state: Mapping[str, Any], config: DistillConfig, settings: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume from ``checkpoint`` (a ``ResumeMismatchError``) when it was trained under settings that
    change the result: its training config or its recorded run settings differ from the run's (apart from
    ``RESUME_FREE_SETTINGS``)."""
    changed = _differences(_plain(state["config"]), _plain(asdict(config)), TRAINING_PREFIX)
    if state.get("settings") is None:
        log.warning("%s was written before checkpoints recorded their run settings (seed, backbone, student, teacher, "
                    "data): only %s is compared for the resume", checkpoint, TRAINING_PREFIX)
    else:
        changed += _differences(state["settings"], settings)
    if changed:
        listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in changed)
        raise ResumeMismatchError(
            f"cannot resume from {checkpoint}: it was trained with settings that differ from this run's and change "
            f"the result: {listed}. Restore them to resume, or start over: delete {checkpoint} or set "
            f"{TRAINING_PREFIX}.resume: false. (Only these may differ on resume: {', '.join(RESUME_FREE_SETTINGS)}.)")


def _last_step_epoch(history: Sequence[dict[str, Any]], position: dict[str, Any] | None) -> int | None:
    """The (0-based) epoch of a checkpoint's last optimizer step, None when it has none: the mid-epoch position
    when an optimizer step was taken in that epoch, else the last finished epoch with steps."""
    if position is not None and position.get("steps", 0) > 0:
        return position["epoch"]
    return next((row["epoch"] - 1 for row in reversed(history) if row["steps"] > 0), None)


def _train(fabric, student, dataset, config_values, seed, checkpoint_dir, state_fn, load_state_fn, progress,
           on_epoch_end, online_targets, spawned, snapshots=None, settings=None):
    config = DistillConfig.from_dict(config_values)
    world = fabric.world_size
    recorded = run_settings(config, seed, len(dataset), world, settings)
    if fabric.is_global_zero:
        log.info("distillation: global batch size %d = %d per device x %d devices x %d accumulated micro-batches",
                 config.batch_size * world * config.accumulate_grad_batches, config.batch_size, world,
                 config.accumulate_grad_batches)
    optimizer = torch.optim.AdamW(parameter_groups(student, config.weight_decay, config.weight_decay_exempt),
                                  lr=config.lr, betas=config.betas)

    def set_lr(last_step_epoch: int | None) -> None:
        """The release's schedule: set after every optimizer step, so the rate of the next step follows from the
        epoch of the last one (``config.lr`` before the first step of the run)."""
        value = (config.lr if last_step_epoch is None
                 else lr_after_step(last_step_epoch, config.lr, config.lr_end, config.epochs))
        for group in optimizer.param_groups:
            group["lr"] = value

    start_epoch, history, position, nonfinite_total = 0, [], None, 0
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    if config.resume and checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        check_resume(state, config, recorded, checkpoint)
        position = state.get("position")
        load_state_fn(student, state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        set_lr(_last_step_epoch(history, position))  # also right for checkpoints of the older per-epoch schedule
        nonfinite_total = state.get("nonfinite_batches", sum(row["skipped_batches"] for row in history))
        if fabric.is_global_zero:
            where = f"epoch {start_epoch + 1}" + (f", batch {position['batch'] + 1}" if position else "")
            log.info("resumed from %s at %s", checkpoint, where)
    elif config.resume and fabric.is_global_zero:
        log.info("resume requested but no checkpoint at %s: starting from the first epoch", checkpoint)
    model, optimizer = fabric.setup(student, optimizer)
    if online_targets is not None:
        online_targets.to(fabric.device)
    # drop_last: the sampler gives every rank floor(N / world) images (no padding with repeated ones) and the loader
    # leaves out each rank's last incomplete batch, so every rank runs the same number of full batches
    sampler = EpochTaggedSampler(DistributedSampler(dataset, num_replicas=world, rank=fabric.global_rank, shuffle=True,
                                                    seed=derive_seed(seed, "shuffle") % (1 << 31),
                                                    drop_last=config.drop_last))
    workers = config.num_workers
    # the loader draws its worker seed from its own generator, reseeded per epoch: the global RNG (saved in
    # checkpoints) is left to the model, so a resumed run continues the same random stream
    loader_generator = torch.Generator()
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, multiprocessing_context="spawn" if workers > 0 else None,
                        generator=loader_generator, drop_last=config.drop_last)
    if config.drop_last and len(sampler.sampler) < config.batch_size:
        raise ValueError(f"student_distillation.training.drop_last is true, but the {len(dataset)} training images "
                         f"fill no batch of {config.batch_size} x {world} device(s): every batch would be dropped "
                         f"(lower batch_size, or set drop_last: false)")
    snapshot_epochs = set(config.snapshot_epoch_numbers()) if snapshots is not None else set()
    if snapshots is not None and start_epoch == 0 and position is None:  # a fresh run: no stale snapshots
        if fabric.is_global_zero:
            snapshots.clear()
        fabric.barrier()
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)
    trainable = [p for p in student.parameters() if p.requires_grad]
    accumulate = config.accumulate_grad_batches

    def checkpoint_state(last_done_epoch: int, where: dict[str, Any] | None) -> dict[str, Any]:
        return {"weights": state_fn(student), "optimizer": optimizer.state_dict(),
                "rng": _rng_state(), "epoch": last_done_epoch, "history": history, "config": asdict(config),
                "settings": recorded, "position": where, "nonfinite_batches": nonfinite_total}

    def agreed(flag: bool) -> bool:
        if world == 1:
            return flag
        return bool(fabric.all_reduce(torch.tensor(float(flag), device=fabric.device), reduce_op="sum") > 0)

    def stop_now(where: dict[str, Any] | None, last_done_epoch: int, signal_name: str) -> None:
        if checkpoint is not None:
            if fabric.is_global_zero:
                _save_checkpoint(checkpoint, checkpoint_state(last_done_epoch, where))
            fabric.barrier()
        at = (f"epoch {where['epoch'] + 1} after batch {where['batch']}" if where
              else f"the end of epoch {last_done_epoch + 1}")
        saved = (f"checkpoint written to {checkpoint}; rerun with student_distillation.training.resume: true to "
                 f"continue from there" if checkpoint is not None else "no checkpoint_dir, so nothing was saved")
        raise TrainingInterrupted(f"distillation stopped by {signal_name} at {at}: {saved}")

    model.train()
    with stop_on_signals() as stop:
        for epoch in range(start_epoch, config.epochs):
            resumed = position if position is not None and position["epoch"] == epoch else None
            offset = resumed["batch"] if resumed else 0
            sampler.use_epoch(epoch, skip=offset * config.batch_size)
            loader_generator.manual_seed(derive_seed(seed, "loader", epoch))
            # loss, cosine, mse, micro-batches, substituted images (summed over ranks at the end of the epoch)
            totals = torch.zeros(5, dtype=torch.float64)
            steps = skipped = images_seen = pending = 0
            if resumed:
                if fabric.is_global_zero:
                    totals = torch.tensor(resumed["totals"], dtype=torch.float64)
                steps, skipped, images_seen = resumed["steps"], resumed["skipped"], resumed["images"]
            flagged = bool(resumed and resumed.get("flagged"))
            boundary = offset  # batches of this epoch done at the last optimizer step
            saved_counts = (totals.clone(), steps, skipped, images_seen)
            started = time.perf_counter()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}",
                       disable=not (progress and fabric.is_global_zero), leave=False)
            stopped = False
            batches = iter(bar)
            local_index = -1
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except Exception:
                    if not stop.requested:  # e.g. a DataLoader worker killed by the same Ctrl-C
                        raise
                    stopped = True
                    break
                local_index += 1
                batch_index = offset + local_index
                images, second = batch[0], batch[1]
                if len(batch) > 2:  # online crops report images replaced by their prepared crop
                    flagged = True
                    totals[4] += float(batch[2].sum())
                if online_targets is not None:
                    targets = online_targets(images, epoch, second.tolist())
                else:
                    targets = second
                output = model(images).patch
                loss, parts = distillation_loss(output, targets, config.mse_weight)
                finite = _all_finite(output.detach(), targets, loss.detach())
                if world > 1:
                    finite = bool(fabric.all_reduce(torch.tensor(float(finite), device=fabric.device),
                                                    reduce_op="sum") == world)
                if not finite:
                    skipped += 1
                    nonfinite_total += 1
                    limit = config.max_nonfinite_batches
                    if limit is not None and nonfinite_total > limit:
                        raise NonFiniteBatchesError(
                            f"aborting distillation: {nonfinite_total} batches had a non-finite (NaN or inf) student "
                            f"output, target or loss, more than student_distillation.training.max_nonfinite_batches="
                            f"{limit} (the last at epoch {epoch + 1}, batch {batch_index + 1}). Lower the learning "
                            f"rate, use 32-true precision, or check the teacher targets; the last checkpoint "
                            f"({checkpoint}) is intact")
                    log.warning("skipping non-finite batch %d of epoch %d (%d so far)", batch_index + 1, epoch + 1,
                                nonfinite_total)
                else:
                    pending += 1
                    sync = pending == accumulate or local_index == len(loader) - 1
                    with fabric.no_backward_sync(model, enabled=not sync) if world > 1 else nullcontext():
                        fabric.backward(loss / accumulate)
                    if sync:
                        optimizer.step()
                        set_lr(epoch)
                        optimizer.zero_grad(set_to_none=True)
                        steps, pending = steps + 1, 0
                    images_seen += images.shape[0] * world
                    totals[:4] += torch.tensor([loss.item(), parts["cosine"], parts["mse"], 1.0], dtype=torch.float64)
                    bar.set_postfix(loss=f"{loss.item():.4f}",
                                    img_s=f"{images_seen / (time.perf_counter() - started):.1f}")
                if pending == 0:
                    boundary = batch_index + 1
                    saved_counts = (totals.clone(), steps, skipped, images_seen)
                    if local_index < len(loader) - 1 and agreed(stop.requested):
                        stopped = True
                        break
            if stopped:
                if pending:  # a worker failed mid-accumulation: go back to the last optimizer step
                    optimizer.zero_grad(set_to_none=True)
                totals, steps, skipped, images_seen = saved_counts
                if world > 1:
                    totals = fabric.all_reduce(totals.to(fabric.device), reduce_op="sum").cpu()
                where = {"epoch": epoch, "batch": boundary, "totals": totals.tolist(), "steps": steps,
                         "skipped": skipped, "images": images_seen, "flagged": flagged}
                stop_now(where, epoch - 1, stop.name)
            if pending:  # the epoch ended on skipped batches after unsynchronised backward passes
                for param in trainable:
                    if param.grad is not None and world > 1:
                        param.grad = fabric.all_reduce(param.grad, reduce_op="mean")
                optimizer.step()
                set_lr(epoch)
                optimizer.zero_grad(set_to_none=True)
                steps += 1
            if world > 1:
                totals = fabric.all_reduce(totals.to(fabric.device), reduce_op="sum").cpu()
            micro = totals[3].item()
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "steps": steps,
                   "skipped_batches": skipped, "images": images_seen}
            row.update({k: (totals[j].item() / micro if micro else math.nan)
                        for j, k in enumerate(("loss", "cosine", "mse"))})
            if flagged:
                row["substituted_images"] = int(totals[4].item())
            history.append(row)
            done = epoch + 1 == config.epochs
            if epoch + 1 in snapshot_epochs:  # before the checkpoint: a checkpoint at an epoch implies its snapshot
                if fabric.is_global_zero:
                    snapshots.save(epoch + 1, state_fn(student))
                fabric.barrier()
            interrupt = not done and agreed(stop.requested)
            if checkpoint is not None and ((epoch + 1) % config.checkpoint_every == 0 or done) and not interrupt:
                if fabric.is_global_zero:
                    _save_checkpoint(checkpoint, checkpoint_state(epoch, None))
                fabric.barrier()
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
            if interrupt:
                stop_now(None, epoch, stop.name)
    if not fabric.is_global_zero:
        return None, history
    weights = {k: v.contiguous() for k, v in state_fn(student).items()}
    # bytes, not tensors: tensors sent from a spawned process that then exits cannot be received
    return (safetensors.torch.save(weights) if spawned else weights), history
