"""The ``student_distillation`` section, typed: :class:`StudentDistillationConfig` (the student's head, register
count and trainable groups, where its targets come from, its folders) holding :class:`DistillConfig` (the training
loop, ``student_distillation.training``). Both are built from YAML by :func:`ph_reg.config.from_mapping` (errors
name ``student_distillation.<key>``); :mod:`ph_reg.params` adds the checks that need the backbone. The method's
other configs sit beside their code: :class:`~ph_reg.method.tta.TTAConfig` in ``tta.py`` and
:class:`~ph_reg.method.targets.TeacherDenoisingConfig` in ``targets.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ph_reg.config import ConfigError, at_least, boolean, one_of
from ph_reg.data.prepare import SPLITS
from ph_reg.method.loss import WEIGHT_DECAY_EXEMPTIONS
from ph_reg.method.targets import TARGET_MODES
from ph_reg.models.backbone import DEFAULT_TRAINABLE

TRAINING_PREFIX = "student_distillation.training"


def _positive(key: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(key, value, "a number > 0")
    return value


def _non_negative(key: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(key, value, "a number >= 0")
    return value


def _exemption(key: str, value: Any) -> str:
    if value not in WEIGHT_DECAY_EXEMPTIONS:
        raise ConfigError(key, value, f"one of {list(WEIGHT_DECAY_EXEMPTIONS)} ('none': every trainable parameter "
                                      f"decays, as the release does)")
    return value


def _optional_count(minimum: int, allowed: str) -> dict[str, Any]:
    def check(key: str, value: Any) -> int | None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise ConfigError(key, value, allowed)
        return value
    return {"check": check}


#: ``training.compile``: torch.compile modes (``false``: eager).
COMPILE_MODES = ("default", "reduce-overhead")


def _compile_mode(key: str, value: Any) -> bool | str:
    if value is not False and value not in COMPILE_MODES:
        raise ConfigError(key, value, f"false or one of {list(COMPILE_MODES)}")
    return value


def _epoch_numbers(key: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in value):
        raise ConfigError(key, value, "a list of epoch numbers >= 1 (1-based)")
    return tuple(sorted(set(value)))


@dataclass(frozen=True)
class DistillConfig:
    """Hyper-parameters of one distillation run (docs/method.md section 5), ``student_distillation.training``;
    built from YAML by :func:`ph_reg.config.from_mapping` (``TRAINING_PREFIX`` names its keys in errors).

    ``batch_size`` is per device and per micro-batch; the global batch size is
    ``batch_size * devices * num_nodes * accumulate_grad_batches`` (see ``global_batch_size``).
    """

    epochs: int = field(default=100, metadata=at_least(1))
    batch_size: int = field(default=16, metadata=at_least(1))
    accumulate_grad_batches: int = field(default=1, metadata=at_least(1))
    lr: float = field(default=3e-4, metadata={"check": _positive})
    lr_end: float = field(default=1e-5, metadata={"check": _positive})
    weight_decay: float = field(default=1e-2, metadata={"check": _non_negative})
    # see WEIGHT_DECAY_EXEMPTIONS; "none" = the release
    weight_decay_exempt: str = field(default="none", metadata={"check": _exemption})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"check": lambda key, value: tuple(value)})
    mse_weight: float = 1.0
    checkpoint_every: int = field(default=10, metadata=at_least(1))
    num_workers: int = 0
    precision: str = "auto"  # "auto": bf16-mixed on CUDA, 32-true on CPU
    accelerator: str = "auto"
    devices: int = field(default=1, metadata=at_least(1))
    num_nodes: int = field(default=1, metadata=at_least(1))
    strategy: str = "auto"   # "auto": single device, or DDP (spawned from the node; torchrun/SLURM when launched so)
    resume: bool = False
    # None: never abort (non-finite batches are still skipped)
    max_nonfinite_batches: int | None = field(default=100, metadata=_optional_count(
        0, "an integer >= 0, or null to never abort"))
    # True: each epoch leaves out the images that do not fill a last whole global batch
    drop_last: bool = field(default=False, metadata=boolean())
    # student snapshots after every this many epochs (None: none) and after these epochs (1-based); see
    # ``snapshot_epoch_numbers``
    snapshot_every: int | None = field(default=None, metadata=_optional_count(
        1, "an integer >= 1, or null for no periodic snapshots"))
    snapshot_epochs: tuple[int, ...] = field(default=(), metadata={"check": _epoch_numbers})
    # read the device's non-finite flags, loss totals and (DDP) stop request every this many steps (and at every
    # epoch end): 1 reads every step; more lets the host run ahead of the device (see ph_reg.method.train)
    sync_every: int = field(default=1, metadata=at_least(1))
    # torch.compile of the student and the online teacher forward: false, "default" or "reduce-overhead"
    compile: bool | str = field(default=False, metadata={"check": _compile_mode})

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size * self.accumulate_grad_batches

    def resolved_precision(self) -> str:
        """``precision``, with ``auto`` resolved: bf16-mixed on CUDA, 32-true elsewhere."""
        if self.precision != "auto":
            return self.precision
        cuda = torch.cuda.is_available() and self.accelerator in ("auto", "cuda", "gpu")
        return "bf16-mixed" if cuda else "32-true"

    def snapshot_epoch_numbers(self) -> list[int]:
        """The 1-based epochs after which the student is kept as a snapshot: every ``snapshot_every`` epochs and
        each of ``snapshot_epochs``, up to ``epochs`` (the release: epoch 1 and every 10)."""
        periodic = range(self.snapshot_every, self.epochs + 1, self.snapshot_every) if self.snapshot_every else ()
        return sorted({*periodic, *(e for e in self.snapshot_epochs if e <= self.epochs)})


def _trainable(key: str, value: Any) -> tuple[str, ...]:
    """A non-empty list of trainable-group names (a single string counts as a list of one)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not value or not all(isinstance(t, str) for t in value):
        raise ConfigError(key, value, f"a non-empty list of groups from {list(DEFAULT_TRAINABLE)}, 'block:<index>' "
                                      f"or fnmatch patterns on parameter names")
    return tuple(value)


def _folder(key: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ConfigError(key, value, "null or a folder path")
    return value


@dataclass(frozen=True)
class StudentDistillationConfig:
    """The ``student_distillation`` section. ``head`` is checked against the backbone's family and ``trainable``
    against its parameters by :func:`ph_reg.params.student_distillation_params`."""

    head: str = "maskclip"
    num_registers: int = field(default=16, metadata=at_least(0))
    trainable: tuple[str, ...] = field(default=DEFAULT_TRAINABLE, metadata={"check": _trainable})
    train_split: str = field(default="train", metadata=one_of(SPLITS))
    targets: str = field(default="cached", metadata=one_of(TARGET_MODES))
    checkpoint_dir: str | None = field(default=None, metadata={"check": _folder})
    snapshot_dir: str | None = field(default=None, metadata={"check": _folder})  # epoch snapshots (null: none)
    training: DistillConfig = field(default_factory=DistillConfig)
