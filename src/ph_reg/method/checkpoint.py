"""The training checkpoint: its atomic write, the RNG state it carries, the run settings it records, the check that
a resume is trained under the same settings (:func:`check_resume`), and the training state it saves
(:class:`TrainState`, :class:`EpochProgress`, :class:`EpochTotals`)."""

from __future__ import annotations

import json
import math
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ph_reg.io.files import WriteError, atomic_path
from ph_reg.method.config import TRAINING_PREFIX, DistillConfig

if TYPE_CHECKING:
    from lightning_fabric import Fabric

CHECKPOINT_NAME = "last.ckpt"
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


class ResumeMismatchError(ValueError):
    """``resume: true`` with a checkpoint trained under settings that differ from the run's in something that
    changes the result; the message names each key with its value in the checkpoint and now."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then rename: ``kill -9`` or a full disk never damage the last one."""
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as error:  # torch reports write failures (disk full) as RuntimeError
            raise WriteError(path, error) from error


def rng_state() -> dict[str, Any]:
    import numpy as np

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


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
                   "precision (resolved)": config.resolved_precision()})


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


def last_step_epoch(history: Sequence[dict[str, Any]], position: dict[str, Any] | None) -> int | None:
    """The (0-based) epoch of a checkpoint's last optimizer step, None when it has none: the mid-epoch position
    when an optimizer step was taken in that epoch, else the last finished epoch with steps."""
    if position is not None and position.get("steps", 0) > 0:
        return position["epoch"]
    return next((row["epoch"] - 1 for row in reversed(history) if row["steps"] > 0), None)


@dataclass
class EpochTotals:
    """Sums over an epoch's finite micro-batches (over every rank once the epoch ends), in float64 as Python floats."""

    loss: float = 0.0
    cosine: float = 0.0
    mse: float = 0.0
    micro_batches: float = 0.0
    substituted: float = 0.0  # online images replaced by their prepared crop

    def add(self, loss: float, cosine: float, mse: float) -> None:
        self.loss += loss
        self.cosine += cosine
        self.mse += mse
        self.micro_batches += 1.0

    def summed_over_ranks(self, fabric: Fabric) -> EpochTotals:
        values = torch.tensor([self.loss, self.cosine, self.mse, self.micro_batches, self.substituted],
                              dtype=torch.float64)
        return EpochTotals(*fabric.all_reduce(values.to(fabric.device), reduce_op="sum").cpu().tolist())


@dataclass
class EpochProgress:
    """Where an epoch stands. ``at_boundary`` is a copy as of the last optimizer step (batch ``boundary``): an
    interrupted epoch is saved there, so that its resume replays the batches after it."""

    epoch: int
    batch: int = 0              # batches of the epoch done when this process started it (a resumed epoch)
    totals: EpochTotals = field(default_factory=EpochTotals)
    steps: int = 0
    skipped: int = 0
    images: int = 0
    flagged: bool = False       # the dataset reports substituted images: the row gets substituted_images
    pending: int = 0            # micro-batches whose gradients wait for the optimizer step
    last_loss: float = math.nan
    at_boundary: EpochProgress | None = None

    def mark_boundary(self, batch: int) -> None:
        self.at_boundary = replace(self, batch=batch, totals=replace(self.totals), at_boundary=None)

    def position(self) -> dict[str, Any]:
        """The checkpoint's record of this position (its ``position``)."""
        return {"epoch": self.epoch, "batch": self.batch, "totals": asdict(self.totals), "steps": self.steps,
                "skipped": self.skipped, "images": self.images, "flagged": self.flagged}


class DeviceStats:
    """An epoch's running numbers on the device, so that a training step never waits for it: the sums of
    :class:`EpochTotals` (float64, added in the order the host added them, so the values are the same), the
    optimizer steps, images and skipped batches, the index of the last skipped batch and the last finite loss.
    :meth:`read` copies them to the host in one transfer (the only wait)."""

    FIELDS = ("loss", "cosine", "mse", "micro_batches", "steps", "images", "skipped", "last_skipped", "last_loss")

    def __init__(self, progress: EpochProgress, device: torch.device):
        t = progress.totals
        start = [t.loss, t.cosine, t.mse, t.micro_batches, progress.steps, progress.images, progress.skipped, -1.0,
                 progress.last_loss]
        self.values = torch.tensor(start, dtype=torch.float64, device=device)

    def record(self, ok: torch.Tensor, loss: torch.Tensor, parts: Mapping[str, torch.Tensor], batch_index: int,
               images: int, stepped: int) -> None:
        """Count one micro-batch: its loss parts, ``stepped`` optimizer steps and ``images`` when ``ok`` (a device
        bool), else one skipped batch at ``batch_index``."""
        v, flag = self.values, ok.to(torch.float64)
        v[0:3] += torch.where(ok, torch.stack([loss.detach(), parts["cosine"], parts["mse"]]).to(torch.float64), 0.0)
        v[3] += flag
        v[4] += flag * float(stepped)
        v[5] += flag * float(images)
        v[6] += 1.0 - flag
        v[7] = torch.where(ok, v[7], float(batch_index))
        v[8] = torch.where(ok, loss.detach().to(torch.float64), v[8])

    def read(self) -> dict[str, float]:
        return dict(zip(self.FIELDS, self.values.tolist()))


@dataclass
class TrainState:
    """What a checkpoint carries from one epoch to the next: the epoch to start from, the history rows, the
    mid-epoch position of an interrupted epoch (a checkpoint's ``position``) and the run's non-finite batches."""

    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    position: dict[str, Any] | None = None
    nonfinite_total: int = 0
