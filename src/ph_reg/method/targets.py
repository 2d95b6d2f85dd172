"""Denoised teacher targets: the ``teacher_denoising`` section (:class:`TeacherDenoisingConfig`), the cached
targets of a store of prepared images streamed as shard records (:func:`denoised_target_records`), and the online
targets recomputed for every training batch (:class:`OnlineTargets`). Both take one :class:`TTAConfig` whole."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ph_reg.config import at_least, boolean, one_of
from ph_reg.config import device as a_device
from ph_reg.method.tta import MAX_IMAGES_PER_FORWARD, TTAConfig, TTADenoiser, image_generators
from ph_reg.models import DenseViT
from ph_reg.runtime import (AUTO_PRECISION, DTYPES, Interrupted, autocast, module_device, normalization_constants,
                            normalize, stop_on_signals, to_device)

#: Where the student's targets come from: the teacher_denoising store, or the teacher during training.
TARGET_MODES = ("cached", "online")


@dataclass(frozen=True)
class TeacherDenoisingConfig:
    """The ``teacher_denoising`` section: the target mode, the teacher's head (checked against the backbone by
    :mod:`ph_reg.params`), the TTA views, the batching and memory budget of the teacher, and the target store."""

    mode: str = field(default="cached", metadata=one_of(TARGET_MODES))
    head: str = "naclip"
    tta: TTAConfig = field(default_factory=TTAConfig)
    batch_size: int = field(default=4, metadata=at_least(1))   # images per TTA call (views are drawn per image)
    max_images_per_forward: int = field(default=MAX_IMAGES_PER_FORWARD, metadata=at_least(1))
    target_dtype: str = field(default="float32", metadata=one_of(sorted(DTYPES)))
    records_per_shard: int = field(default=64, metadata=at_least(1))
    device: str = field(default="auto", metadata=a_device())
    resume: bool = field(default=True, metadata=boolean())


def target_dtype(name: str) -> torch.dtype:
    """The storage dtype of targets by name, with a clear error for others."""
    if name not in DTYPES:
        raise ValueError(f"teacher_denoising.target_dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def denoised_target_records(teacher: DenseViT, images: Sequence[dict[str, torch.Tensor]], seed: int,
                            tta: TTAConfig, batch_size: int = TeacherDenoisingConfig.batch_size,
                            max_images_per_forward: int = MAX_IMAGES_PER_FORWARD,
                            dtype: torch.dtype = torch.float32, progress: bool = True, start: int = 0,
                            indices: Sequence[int] | None = None,
                            ) -> Iterator[tuple[dict[str, torch.Tensor], dict]]:
    """Yield ``({"target": (h, w, C)}, {"image_index": i})`` for every prepared image from ``start`` on, in order
    (or, with ``indices``, for those records only, in that order: e.g. the images an evaluation measures).

    Each image draws its own views from ``image_generators(seed, 0, [image_index])`` (``generator(seed, "tta", 0,
    image_index)``): the key online mode uses at epoch 0, so both modes give the same targets for the same fixed
    crop, and an image's views do not depend on ``batch_size``. Batches are always ``[k * batch_size, (k + 1) *
    batch_size)``, so a run resumed at ``start`` computes exactly the targets an uninterrupted run would (the batch
    holding ``start`` is recomputed, the earlier ones are not).

    SIGINT/SIGTERM stop the stream at the next batch boundary with :class:`ph_reg.runtime.Interrupted`; the shard
    writer keeps the finished shards.
    """
    if not 0 <= start <= len(images):
        raise ValueError(f"start must be in [0, {len(images)}], got {start}")
    if indices is None:
        order = list(range(start - start % batch_size, len(images)))
    else:
        order = [int(i) for i in indices]
        if start or not all(0 <= i < len(images) for i in order):
            raise ValueError(f"indices must be record indices in [0, {len(images)}) and start 0; got start {start}")
    device = module_device(teacher)
    denoiser = TTADenoiser(lambda x: teacher(x).patch, teacher.patch_size, teacher.fill_value().to(device), tta,
                           max_images_per_forward)
    teacher.eval()
    constants = normalization_constants(teacher.mean, teacher.std, device)
    with stop_on_signals() as stop:
        for first in tqdm(range(0, len(order), batch_size), desc="teacher TTA", disable=not progress):
            batch_indices = order[first : first + batch_size]
            if stop.requested:
                raise Interrupted(
                    f"teacher denoising stopped by {stop.name} before image {batch_indices[0]} of {len(images)}: "
                    f"the finished shards are kept, and the next run continues from the first missing one")
            # uint8 to the device (4x fewer bytes than float32), normalised there
            batch = normalize(to_device(torch.stack([images[i]["image"] for i in batch_indices]), device), *constants)
            with torch.no_grad(), autocast(device, AUTO_PRECISION):
                targets = denoiser(batch, image_generators(seed, 0, batch_indices))
            # cast to the storage dtype on the device (float16: half the bytes back); the store's writer thread
            # (ShardWriter) saves finished shards while the next batches run
            for index, target in zip(batch_indices, targets.to(dtype).cpu()):
                if index >= start:
                    yield {"target": target}, {"image_index": index}


class OnlineTargets:
    """Online mode: the frozen teacher's TTA-denoised targets, recomputed for every batch with fresh views.

    Each image draws its own views from ``generator(seed, "tta", epoch, image_index)`` (``image_generators``), as
    the release draws them per image; ``teacher_denoising`` uses the same key with epoch 0, so cached and online
    targets agree when the crop is fixed and the epoch is 0, whatever the batches.
    """

    def __init__(self, teacher: nn.Module, seed: int, tta: TTAConfig,
                 max_images_per_forward: int = MAX_IMAGES_PER_FORWARD):
        self.teacher = teacher.eval().requires_grad_(False)
        self.seed = seed
        self.tta, self.max_images_per_forward = tta, max_images_per_forward
        self.forward: nn.Module = self.teacher  # torch.compile'd by compile()
        self._denoiser: TTADenoiser | None = None  # built once per device (its fill value lives there)

    def to(self, device: torch.device) -> "OnlineTargets":
        self.teacher.to(device)
        self._denoiser = None
        return self

    def compile(self, mode: str | None = None) -> "OnlineTargets":
        """Run the teacher's forward under ``torch.compile`` (``mode``: None for the default, or e.g.
        "reduce-overhead"); the weights stay those of ``teacher``."""
        self.forward = torch.compile(self.teacher, mode=mode)  # type: ignore[assignment]
        self._denoiser = None
        return self

    def denoiser(self, device: torch.device) -> TTADenoiser:
        if self._denoiser is None or self._denoiser.fill.device != device:
            forward = self.forward
            self._denoiser = TTADenoiser(lambda x: forward(x).patch, self.teacher.patch_size,
                                         self.teacher.fill_value().to(device), self.tta, self.max_images_per_forward)
        return self._denoiser

    def __getstate__(self) -> dict:  # spawned DDP ranks rebuild the denoiser (and any compiled forward) themselves
        return {**self.__dict__, "forward": self.teacher, "_denoiser": None}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, epoch: int, indices: Sequence[int]) -> torch.Tensor:
        denoiser = self.denoiser(images.device)
        with autocast(images.device, AUTO_PRECISION):
            return denoiser(images, image_generators(self.seed, epoch, indices)).float()
