"""Student distillation: :func:`distill`, its Lightning Fabric and the training loop in small steps (restore, run
an epoch, end an epoch, checkpoint); one training step (and the run state it reads) is in :mod:`ph_reg.method.step`.

The configuration is :class:`~ph_reg.method.config.DistillConfig`; the loss, the schedule and the parameter
groups are in :mod:`ph_reg.method.loss`, the datasets and the batch item :class:`~ph_reg.method.data.TrainItem` in
:mod:`ph_reg.method.data`, the checkpoint with the training state it saves and the resume check in
:mod:`ph_reg.method.checkpoint`.

Nothing is lost to trouble: SIGINT/SIGTERM stop training at the next optimizer step with a checkpoint of the exact
position (epoch and batch) and :class:`TrainingInterrupted`; ``resume`` then replays the remaining batches as an
uninterrupted run would. Checkpoints are written to a temporary file and renamed, so ``kill -9`` leaves the last
one intact. Non-finite batches are skipped and counted; more than ``max_nonfinite_batches`` abort the run.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ph_reg.config import from_mapping
from ph_reg.method.checkpoint import (CHECKPOINT_NAME, DeviceStats, EpochProgress, EpochTotals, TrainState,
                                      check_resume, last_step_epoch, rng_state, run_settings, save_checkpoint,
                                      set_rng_state)
from ph_reg.method.config import TRAINING_PREFIX, DistillConfig
from ph_reg.method.data import TrainItem, training_loader
from ph_reg.method.loss import parameter_groups
from ph_reg.method.step import (NonFiniteBatchesError, Run, WeightsFn, _optimizer_step, _read_stats, _set_lr,
                                _train_batch)
from ph_reg.runtime import Interrupted, StopRequest, derive_seed, normalization_constants, stop_on_signals

if TYPE_CHECKING:
    from lightning_fabric import Fabric

    from ph_reg.method.student import StudentSnapshots
    from ph_reg.method.targets import OnlineTargets

__all__ = ["FUSED_ON_CPU", "NonFiniteBatchesError", "TrainingInterrupted", "distill", "make_fabric",
           "unused_trainable"]
log = logging.getLogger(__name__)
#: A deferred run (``sync_every > 1``) on CUDA uses the fused AdamW, whose kernel skips the whole update (weights,
#: moments, step counters) when its ``found_inf`` flag is set, all on the device; on the CPU the update is masked
#: with ``torch.where`` so that the numbers stay those of the default AdamW. Tests set this to run the fused path.
FUSED_ON_CPU = False


class TrainingInterrupted(Interrupted):
    """Training stopped on SIGINT/SIGTERM; the checkpoint holds the exact position (see ``resume``)."""


def _launched_externally() -> bool:
    """True under torchrun (or any launcher that sets LOCAL_RANK) or a multi-task SLURM job."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def make_fabric(config: DistillConfig, find_unused_parameters: bool = True) -> Fabric:
    """Lightning Fabric for the run: one device, or DDP spawned from inside the Kedro node, or DDP under
    torchrun/SLURM. DDP looks for unused trainable parameters only when ``find_unused_parameters``
    (:func:`unused_trainable` found some): the search costs a graph walk every step. The parameters a head never
    reads (the MLP of a MaskCLIP last block) are frozen by ``DenseViT.set_trainable``, so the default groups need
    no search; only a trainable pattern the dense output does not reach (a custom ``trainable`` entry, a model
    that is not a DenseViT) still turns it on."""
    from lightning_fabric import Fabric
    from lightning_fabric.strategies import DDPStrategy

    strategy: Any = config.strategy
    if strategy == "auto" and (config.world_size > 1 or _launched_externally()):
        strategy = DDPStrategy(find_unused_parameters=find_unused_parameters,
                               **({} if _launched_externally() else {"start_method": "spawn"}))
    return Fabric(accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
                  strategy=strategy, precision=config.resolved_precision())


def distill(student: nn.Module, dataset: Dataset[TrainItem], config: DistillConfig, seed: int,
            checkpoint_dir: str | os.PathLike | None = None,
            state_fn: WeightsFn | None = None,
            load_state_fn: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None,
            progress: bool = True,
            on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
            online_targets: OnlineTargets | None = None,
            snapshots: StudentSnapshots | None = None,
            settings: Mapping[str, Any] | None = None) -> list[dict[str, float]]:
    """Train the student's trainable parameters; return one history row per epoch. The student is updated in place.

    ``dataset[(epoch, i)]`` yields a :class:`TrainItem`: ``TrainItem(image, target=...)`` (cached mode) or
    ``TrainItem(image, index=i)`` with ``online_targets`` (online mode). Shuffling is seeded per epoch from
    ``seed``, so a run resumed from a checkpoint replays exactly the batches an uninterrupted run would have seen.
    Batches whose student output, target or loss is not finite are skipped (on every rank) and counted.
    ``state_fn``/``load_state_fn`` (default: the model's trainable parameters) save and restore the weights in
    checkpoints; ``on_epoch_end(epoch, row)`` runs after each epoch. With several devices the work runs in spawned
    DDP processes and the student receives rank 0's weights. ``config.drop_last`` leaves out each epoch's last
    incomplete batch (resumes still replay the same batches). ``snapshots`` keeps ``state_fn(student)`` after each
    of ``config.snapshot_epoch_numbers()`` (a run that starts from its first epoch first removes the snapshots of an
    earlier run).

    Every checkpoint records the training config and :func:`run_settings` (the seed, the number of training images,
    the world size, the resolved precision and ``settings``: whatever else the result depends on, e.g. the
    backbone, student, teacher and data sections). ``config.resume`` refuses a checkpoint whose records differ from
    the run's in anything but ``RESUME_FREE_SETTINGS`` (:func:`check_resume`), naming each key.
    """
    from ph_reg.models import load_trainable_state_dict, trainable_state_dict

    state_fn = state_fn or trainable_state_dict
    load_state_fn = load_state_fn or load_trainable_state_dict
    unused = unused_trainable(student, dataset) if config.world_size > 1 or _launched_externally() else []
    if unused:
        log.info("DDP with find_unused_parameters=True: these trainable parameters get no gradient from the "
                 "student's output (leave them out of student_distillation.trainable to skip the search): %s",
                 ", ".join(unused))
    fabric = make_fabric(config, find_unused_parameters=bool(unused))
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


def unused_trainable(student: nn.Module, dataset: Dataset[TrainItem]) -> list[str]:
    """The trainable parameters of ``student`` that get no gradient from its dense output on the first training
    image (one forward and backward on the CPU, the random state left as it was)."""
    image = dataset[(0, 0)].image[None].float()  # the values do not matter, only the graph
    with torch.random.fork_rng(devices=[]):
        student.zero_grad(set_to_none=True)
        student(image.to(next(student.parameters()).device)).patch.float().sum().backward()
    unused = [name for name, p in student.named_parameters() if p.requires_grad and p.grad is None]
    student.zero_grad(set_to_none=True)
    return unused


# --- the loop ---------------------------------------------------------------------------------------------------

def _train(fabric: Fabric, student: nn.Module, dataset: Dataset[TrainItem], config_values: dict[str, Any], seed: int,
           checkpoint_dir: str | os.PathLike | None, state_fn: WeightsFn,
           load_state_fn: Callable[[nn.Module, dict[str, torch.Tensor]], None], progress: bool,
           on_epoch_end: Callable[[int, dict[str, float]], None] | None, online_targets: OnlineTargets | None,
           spawned: bool, snapshots: StudentSnapshots | None = None,
           settings: Mapping[str, Any] | None = None) -> tuple[bytes | dict[str, torch.Tensor] | None, list[dict]]:
    """One process's training (every rank runs it); returns rank 0's weights (bytes when ``spawned``) and history."""
    config = from_mapping(DistillConfig, config_values, TRAINING_PREFIX)
    world = fabric.world_size
    recorded = run_settings(config, seed, len(dataset), world, settings)
    if fabric.is_global_zero:
        log.info("distillation: global batch size %d = %d per device x %d devices x %d accumulated micro-batches",
                 config.global_batch_size, config.batch_size, config.world_size, config.accumulate_grad_batches)
    cuda = fabric.device.type == "cuda"
    optimizer = torch.optim.AdamW(parameter_groups(student, config.weight_decay, config.weight_decay_exempt),
                                  lr=config.lr, betas=config.betas,
                                  **({"fused": True} if (cuda and config.sync_every > 1) or FUSED_ON_CPU else {}))
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    state = _restore(fabric, config, student, optimizer, checkpoint, recorded, load_state_fn)
    model, optimizer = fabric.setup(_compiled(student, config.compile), optimizer)
    if online_targets is not None:
        online_targets.to(fabric.device)
        if config.compile:
            online_targets.compile(None if config.compile == "default" else config.compile)
    loader, sampler, loader_generator = training_loader(dataset, config, seed, fabric.world_size,
                                                        fabric.global_rank, pin_memory=cuda)
    run = Run(fabric, config, student, model, optimizer, loader, sampler, loader_generator, seed, checkpoint,
              state_fn, recorded, online_targets, progress, snapshots, on_epoch_end)
    if getattr(dataset, "raw", False):  # uint8 images: normalised on the device, with constants built once
        run.normalization = normalization_constants(dataset.mean, dataset.std, fabric.device)  # type: ignore
    if snapshots is not None and state.start_epoch == 0 and state.position is None:  # a fresh run: no stale ones
        run.barrier_after(snapshots.clear)
    # the batches are moved by _inputs: images and targets without a wait, indices and flags left on the host
    run.loader = fabric.setup_dataloaders(run.loader, use_distributed_sampler=False, move_to_device=False)
    model.train()
    with stop_on_signals() as stop:
        for epoch in range(state.start_epoch, config.epochs):
            progress_ = _run_epoch(run, state, epoch, stop)
            _end_epoch(run, state, progress_, stop)
    if not fabric.is_global_zero:
        return None, state.history
    weights = {k: v.contiguous() for k, v in state_fn(student).items()}
    # bytes, not tensors: tensors sent from a spawned process that then exits cannot be received
    return (safetensors.torch.save(weights) if spawned else weights), state.history


def _compiled(student: nn.Module, mode: bool | str) -> nn.Module:
    """``student`` under ``torch.compile`` (``training.compile``: "default" or "reduce-overhead"), or as it is."""
    if not mode:
        return student
    return torch.compile(student, mode=None if mode == "default" else mode)  # type: ignore[return-value]


def _restore(fabric: Fabric, config: DistillConfig, student: nn.Module, optimizer: torch.optim.Optimizer,
             checkpoint: Path | None, recorded: dict[str, Any],
             load_state_fn: Callable[[nn.Module, dict[str, torch.Tensor]], None]) -> TrainState:
    """The state to start from: a fresh one, or (``config.resume``) the checkpoint's, with the student's weights,
    the optimizer, the RNG and the learning rate restored."""
    if not (config.resume and checkpoint is not None and checkpoint.is_file()):
        if config.resume and fabric.is_global_zero:
            log.info("resume requested but no checkpoint at %s: starting from the first epoch", checkpoint)
        return TrainState()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    check_resume(saved, config, recorded, checkpoint)
    position = saved.get("position")
    load_state_fn(student, saved["weights"])
    optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"])
    state = TrainState(start_epoch=saved["epoch"] + 1, history=saved["history"], position=position)
    _set_lr(optimizer, config, last_step_epoch(state.history, position))
    state.nonfinite_total = saved.get("nonfinite_batches", sum(row["skipped_batches"] for row in state.history))
    if fabric.is_global_zero:
        where = f"epoch {state.start_epoch + 1}" + (f", batch {position['batch'] + 1}" if position else "")
        log.info("resumed from %s at %s", checkpoint, where)
    return state


def _start_epoch(run: Run, state: TrainState, epoch: int) -> EpochProgress:
    """The epoch's progress: from zero, or from the checkpoint's position when the run resumes inside it."""
    resumed = state.position if state.position is not None and state.position["epoch"] == epoch else None
    offset = resumed["batch"] if resumed else 0
    run.sampler.use_epoch(epoch, skip=offset * run.config.batch_size)
    run.loader_generator.manual_seed(derive_seed(run.seed, "loader", epoch))
    progress = EpochProgress(epoch, batch=offset)
    if resumed:
        if run.fabric.is_global_zero:  # the saved totals are summed over ranks already
            progress.totals = EpochTotals(**resumed["totals"])
        progress.steps, progress.skipped, progress.images = resumed["steps"], resumed["skipped"], resumed["images"]
    progress.flagged = bool(resumed and resumed.get("flagged"))
    progress.mark_boundary(offset)
    run.stats, run.since_read = DeviceStats(progress, run.fabric.device), 0
    return progress


def _run_epoch(run: Run, state: TrainState, epoch: int, stop: StopRequest) -> EpochProgress:
    """Train on the epoch's batches; on a stop request, save the position of the last optimizer step and raise
    :class:`TrainingInterrupted`."""
    progress = _start_epoch(run, state, epoch)
    started = time.perf_counter()
    bar = tqdm(run.loader, desc=f"epoch {epoch + 1}/{run.config.epochs}",
               disable=not (run.progress and run.fabric.is_global_zero), leave=False)
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
        batch_index = progress.batch + local_index
        last = local_index == len(run.loader) - 1
        if _train_batch(run, state, progress, batch, batch_index, last):  # the host read the device's numbers
            bar.set_postfix(loss=f"{progress.last_loss:.4f}",
                            img_s=f"{progress.images / (time.perf_counter() - started):.1f}")
        if progress.pending == 0:
            progress.mark_boundary(batch_index + 1)  # deferred: numbers as of the last read (_stop_mid_epoch renews)
            if not last and (run.world == 1 or run.since_read == 0) and run.agreed(stop.requested):
                stopped = True
                break
    if stopped:
        _stop_mid_epoch(run, state, progress, stop.name)
    return progress


def _stop_mid_epoch(run: Run, state: TrainState, progress: EpochProgress, signal_name: str) -> None:
    """Go back to the epoch's last optimizer step, save that position and raise :class:`TrainingInterrupted`."""
    if run.deferred and run.since_read:  # the boundary was marked with the numbers of the last read: renew it
        assert progress.at_boundary is not None and progress.pending == 0
        _read_stats(run, state, progress)
        progress.mark_boundary(progress.at_boundary.batch)
    if progress.pending:  # a worker failed mid-accumulation: go back to the last optimizer step
        run.optimizer.zero_grad(set_to_none=True)
    at = progress.at_boundary
    assert at is not None
    at.flagged = progress.flagged  # whether this epoch reported substitutions, up to the stop
    if run.world > 1:
        at.totals = at.totals.summed_over_ranks(run.fabric)
    _stop(run, state, at.position(), progress.epoch - 1, signal_name)


def _stop(run: Run, state: TrainState, where: dict[str, Any] | None, last_done_epoch: int,
          signal_name: str) -> None:
    """Save the checkpoint of a stop at ``where`` (None: the end of ``last_done_epoch``) and raise."""
    if run.checkpoint is not None:
        run.barrier_after(lambda: _save(run, state, last_done_epoch, where))
    at = (f"epoch {where['epoch'] + 1} after batch {where['batch']}" if where
          else f"the end of epoch {last_done_epoch + 1}")
    saved = (f"checkpoint written to {run.checkpoint}; rerun with student_distillation.training.resume: true to "
             f"continue from there" if run.checkpoint is not None else "no checkpoint_dir, so nothing was saved")
    raise TrainingInterrupted(f"distillation stopped by {signal_name} at {at}: {saved}")


def _save(run: Run, state: TrainState, last_done_epoch: int, where: dict[str, Any] | None) -> None:
    """Write the checkpoint (rank 0): weights, optimizer, RNG, history, records and the mid-epoch position."""
    assert run.checkpoint is not None
    save_checkpoint(run.checkpoint, {
        "weights": run.state_fn(run.student), "optimizer": run.optimizer.state_dict(), "rng": rng_state(),
        "epoch": last_done_epoch, "history": state.history, "config": asdict(run.config),
        "settings": run.recorded, "position": where, "nonfinite_batches": state.nonfinite_total})


def _end_epoch(run: Run, state: TrainState, progress: EpochProgress, stop: StopRequest) -> None:
    """Finish the epoch: the step its last micro-batches wait for, its history row, the snapshot, the checkpoint,
    ``on_epoch_end``, and a stop when one was requested during it."""
    config, epoch = run.config, progress.epoch
    if run.since_read:  # an epoch that stopped early on a deferred step (a read is due at its last batch)
        _read_stats(run, state, progress)
    if progress.pending:  # the epoch ended on skipped batches after unsynchronised backward passes
        for param in (p for p in run.student.parameters() if p.requires_grad):
            if param.grad is not None and run.world > 1:
                param.grad = run.fabric.all_reduce(param.grad, reduce_op="mean")
        _optimizer_step(run, epoch)
        progress.steps += 1
    totals = progress.totals.summed_over_ranks(run.fabric) if run.world > 1 else progress.totals
    micro = totals.micro_batches
    row = {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"], "steps": progress.steps,
           "skipped_batches": progress.skipped, "images": progress.images}
    row.update({k: (getattr(totals, k) / micro if micro else math.nan) for k in ("loss", "cosine", "mse")})
    if progress.flagged:
        row["substituted_images"] = int(totals.substituted)
    state.history.append(row)
    done = epoch + 1 == config.epochs
    if run.snapshots is not None and epoch + 1 in config.snapshot_epoch_numbers():
        # before the checkpoint: a checkpoint at an epoch implies its snapshot
        snapshots = run.snapshots
        run.barrier_after(lambda: snapshots.save(epoch + 1, run.state_fn(run.student)))
    interrupt = not done and run.agreed(stop.requested)
    if run.checkpoint is not None and ((epoch + 1) % config.checkpoint_every == 0 or done) and not interrupt:
        run.barrier_after(lambda: _save(run, state, epoch, None))
    if run.on_epoch_end is not None:
        run.on_epoch_end(epoch, row)
    if interrupt:
        _stop(run, state, None, epoch, stop.name)
