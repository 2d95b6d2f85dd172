"""One training step of :func:`~ph_reg.method.train.distill` and the run state it reads (:class:`Run`).

The step never waits for the device, except where a decision needs a value: its non-finite check is a device flag,
its loss totals and counters are summed on the device (:class:`~ph_reg.method.checkpoint.DeviceStats`), and the
host reads them every ``training.sync_every`` steps and at the epoch's end (:func:`_read_stats`). Between reads a
non-finite batch is masked on the device (:func:`_masked_optimizer_step`): the weights, the optimizer state and
every count come out as when the host reads the flag and skips the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ph_reg.method.checkpoint import DeviceStats, EpochProgress, TrainState
from ph_reg.method.config import DistillConfig
from ph_reg.method.data import EpochTaggedSampler, TrainItem
from ph_reg.method.loss import distillation_loss, lr_after_step
from ph_reg.runtime import normalize, to_device

if TYPE_CHECKING:
    from lightning_fabric import Fabric

    from ph_reg.method.student import StudentSnapshots
    from ph_reg.method.targets import OnlineTargets

log = logging.getLogger(__name__)
WeightsFn = Callable[[nn.Module], dict[str, torch.Tensor]]


class NonFiniteBatchesError(FloatingPointError):
    """More batches than ``max_nonfinite_batches`` had a non-finite student output, target or loss."""


# --- the state of a run ------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What every part of the loop reads: built once in each process by :func:`_train`."""

    fabric: Fabric
    config: DistillConfig
    student: nn.Module           # the caller's module (its state is what checkpoints save)
    model: nn.Module             # the same module set up by Fabric
    optimizer: torch.optim.Optimizer
    loader: Any                  # Fabric's DataLoader over ``sampler``
    sampler: EpochTaggedSampler
    loader_generator: torch.Generator
    seed: int
    checkpoint: Path | None
    state_fn: WeightsFn
    recorded: dict[str, Any]     # run_settings of this run, saved in every checkpoint
    online_targets: OnlineTargets | None
    progress: bool
    snapshots: StudentSnapshots | None
    on_epoch_end: Callable[[int, dict[str, float]], None] | None
    # (mean, std) on the device when the dataset yields raw uint8 images (``dataset.raw``), else None
    normalization: tuple[torch.Tensor, torch.Tensor] | None = None
    stats: DeviceStats | None = None  # the epoch's running numbers on the device
    since_read: int = 0               # micro-batches since the host last read them

    @property
    def world(self) -> int:
        return self.fabric.world_size

    @property
    def deferred(self) -> bool:
        """Whether a step may leave its non-finite check on the device (a masked update, read every
        ``sync_every`` steps); gradient accumulation decides its steps from the finite micro-batches, so it reads
        every micro-batch."""
        return self.config.sync_every > 1 and self.config.accumulate_grad_batches == 1

    def read_due(self) -> bool:
        return self.since_read >= self.config.sync_every

    def agreed(self, flag: bool) -> bool:
        """``flag`` on any rank."""
        if self.world == 1:
            return flag
        return bool(self.fabric.all_reduce(torch.tensor(float(flag), device=self.fabric.device), reduce_op="sum") > 0)

    def barrier_after(self, on_rank_zero: Callable[[], Any]) -> None:
        if self.fabric.is_global_zero:
            on_rank_zero()
        self.fabric.barrier()


def _set_lr(optimizer: torch.optim.Optimizer, config: DistillConfig, last_step_epoch: int | None) -> None:
    """The release's schedule: set after every optimizer step, so the rate of the next step follows from the epoch
    of the last one (``config.lr`` before the first step of the run)."""
    value = (config.lr if last_step_epoch is None
             else lr_after_step(last_step_epoch, config.lr, config.lr_end, config.epochs))
    for group in optimizer.param_groups:
        group["lr"] = value


def _train_batch(run: Run, state: TrainState, progress: EpochProgress, batch: TrainItem, batch_index: int,
                 last: bool) -> bool:
    """Forward, loss and backward of one micro-batch, and the optimizer step when it completes the accumulation
    or the epoch; True when the host read the device's numbers after it (:func:`_read_stats`).

    The non-finite check is a device flag. Until the epoch's first optimizer step, and with gradient accumulation,
    the host reads it before the backward and skips the batch (no backward, no step); after it, a deferred run
    (``sync_every > 1``) takes a masked step that leaves weights and optimizer state as they were when the flag is
    down (:func:`_masked_optimizer_step`) and reads the flags and totals every ``sync_every`` steps."""
    config, world = run.config, run.world
    if batch.substituted is not None:  # online crops report images replaced by their prepared crop
        progress.flagged = True
        progress.totals.substituted += float(sum(batch.substituted))
    image, targets = _inputs(run, batch, progress.epoch)
    output = run.model(image).patch
    loss, parts = distillation_loss(output, targets, config.mse_weight)
    ok = _finite(run, output.detach(), targets, loss.detach())
    images = image.shape[0] * world
    assert run.stats is not None
    run.since_read += 1
    if run.deferred and progress.steps > 0:  # an optimizer step of this epoch has set its rate and AdamW state
        run.fabric.backward(loss)
        _masked_optimizer_step(run, progress.epoch, ok)
        run.stats.record(ok, loss, parts, batch_index, images, stepped=1)
        return _read_stats(run, state, progress) if run.read_due() or last else False
    if not bool(ok):  # read before the backward: the batch is skipped as it always was
        run.stats.record(ok, loss, parts, batch_index, images, stepped=0)
        _read_stats(run, state, progress)
        return False
    progress.pending += 1
    sync = progress.pending == config.accumulate_grad_batches or last
    with run.fabric.no_backward_sync(run.model, enabled=not sync) if world > 1 else nullcontext():
        run.fabric.backward(loss / config.accumulate_grad_batches)
    if sync:
        _optimizer_step(run, progress.epoch)
        progress.pending = 0
    run.stats.record(ok, loss, parts, batch_index, images, stepped=int(sync))
    return _read_stats(run, state, progress)


def _inputs(run: Run, batch: TrainItem, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's images on the device (normalised there when the dataset yields uint8) and its targets: the
    cached ones, or the teacher's denoising of its images (online mode; the indices stay on the host)."""
    device = run.fabric.device
    image = to_device(batch.image, device)
    if run.normalization is not None:
        image = normalize(image, *run.normalization)
    if run.online_targets is not None:
        if batch.index is None:
            raise ValueError("online targets need items with an index (TrainItem(image, index=i), as RandomCrops "
                             "yields)")
        return image, run.online_targets(image, epoch, [int(i) for i in batch.index])
    if batch.target is None:
        raise ValueError("the dataset yields no targets (TrainItem.target): pass online_targets for online mode")
    return image, to_device(batch.target, device)


def _finite(run: Run, *tensors: torch.Tensor) -> torch.Tensor:
    """One device flag: every value of ``tensors`` is finite (on every rank, agreed on the device)."""
    ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    if run.world > 1:
        flag = ok.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)  # no barrier, no host wait
        ok = flag.bool()
    return ok


def _read_stats(run: Run, state: TrainState, progress: EpochProgress) -> bool:
    """Copy the device's running numbers to ``progress`` (the one wait), count the batches skipped since the last
    read, and abort past ``max_nonfinite_batches``. Returns True."""
    assert run.stats is not None
    values = run.stats.read()
    run.since_read = 0
    new_skips = int(values["skipped"]) - progress.skipped
    progress.totals.loss, progress.totals.cosine, progress.totals.mse = (values["loss"], values["cosine"],
                                                                         values["mse"])
    progress.totals.micro_batches = values["micro_batches"]
    progress.steps, progress.images = int(values["steps"]), int(values["images"])
    progress.skipped, progress.last_loss = int(values["skipped"]), values["last_loss"]
    if new_skips:
        _skip_batches(run, state, progress, new_skips, int(values["last_skipped"]))
    return True


def _skip_batches(run: Run, state: TrainState, progress: EpochProgress, count: int, batch_index: int) -> None:
    """Count ``count`` non-finite batches (the last at ``batch_index``); abort the run when there are more than
    ``max_nonfinite_batches``."""
    state.nonfinite_total += count
    limit = run.config.max_nonfinite_batches
    if limit is not None and state.nonfinite_total > limit:
        raise NonFiniteBatchesError(
            f"aborting distillation: {state.nonfinite_total} batches had a non-finite (NaN or inf) student "
            f"output, target or loss, more than student_distillation.training.max_nonfinite_batches="
            f"{limit} (the last at epoch {progress.epoch + 1}, batch {batch_index + 1}). Lower the learning "
            f"rate, use 32-true precision, or check the teacher targets; the last checkpoint "
            f"({run.checkpoint}) is intact")
    log.warning("skipped %s non-finite batch %d of epoch %d (%d so far)",
                f"{count} batches up to" if count > 1 else "the", batch_index + 1, progress.epoch + 1,
                state.nonfinite_total)


def _optimizer_step(run: Run, epoch: int) -> None:
    """The optimizer step, the schedule's rate for the next one, and the gradients cleared."""
    run.optimizer.step()
    _set_lr(run.optimizer, run.config, epoch)
    run.optimizer.zero_grad(set_to_none=True)


def _masked_optimizer_step(run: Run, epoch: int, ok: torch.Tensor) -> None:
    """The optimizer step of a deferred run, taken whatever ``ok`` (a device flag) says: the weights and the
    optimizer state of a non-finite batch are put back as they were, exactly (``torch.where`` selects the saved
    tensors), so a skipped batch leaves no trace, and the host never waits. Only after an optimizer step of
    ``epoch`` (the rate :func:`_set_lr` sets is then already the epoch's, and AdamW's state exists)."""
    optimizer = run.optimizer.optimizer if hasattr(run.optimizer, "optimizer") else run.optimizer  # Fabric's wrapper
    if optimizer.defaults.get("fused"):  # the kernel skips the update when found_inf is 1
        optimizer.found_inf = (~ok).to(torch.float32)  # type: ignore[attr-defined]
        try:
            _optimizer_step(run, epoch)
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
        return
    tensors = [p for group in run.optimizer.param_groups for p in group["params"] if p.grad is not None]
    tensors += [v for p in tensors for v in run.optimizer.state[p].values() if isinstance(v, torch.Tensor)]
    saved = [t.detach().clone() for t in tensors]
    _optimizer_step(run, epoch)
    with torch.no_grad():
        for tensor, old in zip(tensors, saved):
            tensor.copy_(torch.where(ok, tensor, old))


