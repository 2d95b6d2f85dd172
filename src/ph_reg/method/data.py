"""What the training loop reads: the cached (image, target) pairs, the online random crops, the epoch-tagged
sampler and the loader over it, and :class:`TrainItem`, the one shape of an item and of a batch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate
from torch.utils.data.distributed import DistributedSampler

from ph_reg.data.prepare import random_square_crops, to_tensor
from ph_reg.data.sources import DEFAULT_MAX_IMAGE_PIXELS, UnusableImage, image_problem
from ph_reg.data.transforms import resize_pil_short_side
from ph_reg.runtime import derive_seed, generator, normalize

if TYPE_CHECKING:
    from ph_reg.method.config import DistillConfig

log = logging.getLogger(__name__)


class TrainItem(NamedTuple):
    """One training item, or (collated by :func:`collate_items`) one batch of them.

    Cached mode fills ``target`` (the teacher's denoised tokens); online mode fills ``index`` (the training image
    the teacher denoises during training) and, when the dataset has fallbacks, ``substituted`` (the image was
    replaced by its prepared crop). The fields a dataset does not fill are None in every item and in the batch.
    In a batch, ``index`` and ``substituted`` are Python lists: host data that never travels to the device.
    """

    image: torch.Tensor
    target: torch.Tensor | None = None
    index: int | list[int] | None = None
    substituted: bool | list[bool] | None = None


#: The fields of a batch kept as Python lists (read by the host, never sent to the device).
HOST_FIELDS = ("index", "substituted")


def collate_items(items: Sequence[TrainItem]) -> TrainItem:
    """The batch of ``items``: the tensors collated by torch's ``default_collate``, :data:`HOST_FIELDS` as
    lists, the fields the items do not fill None."""
    return TrainItem(*(None if values[0] is None else list(values) if name in HOST_FIELDS
                       else default_collate(list(values)) for name, values in zip(TrainItem._fields, zip(*items))))


class TargetPairs(Dataset):
    """Cached mode: (normalised image, denoised target) pairs from the prepared-image and teacher-target stores.

    ``crops[i]`` lists the store records of training image ``i``: its ``data_preparation.crops_per_image`` = K
    fixed crops, each denoised with its own draw of views (a single record index stands for K = 1). Like the online
    mode, an epoch shows every image once: item ``(epoch, i)`` is crop ``epoch % K`` of image ``i``, so K = 1
    repeats one crop and one view draw every epoch, and a larger K comes closer to the fresh crop and views of every
    step, with the same epochs, optimizer steps and schedule.

    ``raw=True`` yields the stored uint8 image and the target in its stored dtype (4x and, for float16 targets,
    2x fewer bytes through the loader); :func:`~ph_reg.method.train.distill` then normalises on the device with
    ``mean``/``std`` and the loss reads the target in float32, the same numbers as ``raw=False``.
    """

    def __init__(self, images: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]],
                 crops: Sequence[int | Sequence[int]], mean: Sequence[float], std: Sequence[float],
                 raw: bool = False):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} prepared images but {len(targets)} teacher targets: rerun teacher_denoising "
                             f"(with student_distillation.targets: cached)")
        self.images, self.targets = images, targets
        self.crops = [list(c) if isinstance(c, Sequence) else [int(c)] for c in crops]
        if not all(self.crops):
            raise ValueError("TargetPairs: every training image needs at least one cached crop")
        self.mean, self.std, self.raw = tuple(mean), tuple(std), raw

    def __len__(self) -> int:
        return len(self.crops)

    def record(self, epoch: int, i: int) -> int:
        """The store record that image ``i`` trains on in ``epoch``: its crops in turn."""
        crops = self.crops[i]
        return crops[epoch % len(crops)]

    def __getitem__(self, item: tuple[int, int]) -> TrainItem:
        index = self.record(*item)
        image, target = self.images[index]["image"], self.targets[index]["target"]
        if self.raw:
            return TrainItem(image, target=target)
        return TrainItem(normalize(image[None], self.mean, self.std)[0], target=target.float())


class RandomCrops(Dataset):
    """Online mode: item ``(epoch, i)`` is a fresh square crop of image ``i`` (short side resized to ``image_size``,
    bicubic), drawn from ``(seed, epoch, i)``, normalised; returned with ``index=i``. An image that is already
    ``image_size`` square has exactly one crop, so its crop is fixed.

    Images are read during training, so a file may have gone bad since it was prepared. With ``fallbacks`` (one
    loader per image, e.g. its prepared crop) such an image is logged and replaced by its fallback, and items carry
    ``substituted`` so the training loop can count replacements; without, the error names the file. ``raw=True``
    yields the uint8 crop (normalised on the device by the training loop, as :class:`TargetPairs`).
    """

    def __init__(self, loaders: Sequence[Callable[[], Image.Image]], image_size: int, mean: Sequence[float],
                 std: Sequence[float], seed: int, fallbacks: Sequence[Callable[[], Image.Image]] | None = None,
                 min_side: int = 1, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, raw: bool = False):
        if not loaders:
            raise ValueError("RandomCrops got no images: check the source and data_preparation.val_fraction")
        if fallbacks is not None and len(fallbacks) != len(loaders):
            raise ValueError(f"RandomCrops got {len(fallbacks)} fallbacks for {len(loaders)} images")
        self.loaders, self.image_size, self.seed = list(loaders), image_size, seed
        self.fallbacks = list(fallbacks) if fallbacks is not None else None
        self.min_side, self.max_pixels = min_side, max_pixels
        self.mean, self.std, self.raw = tuple(mean), tuple(std), raw

    def __len__(self) -> int:
        return len(self.loaders)

    def _image(self, i: int) -> tuple[Image.Image, bool]:
        load = self.loaders[i]
        try:
            image = load()
            problem = image_problem(image, self.min_side, self.image_size, self.max_pixels)
            if problem is not None:
                raise UnusableImage(problem)
            return image, False
        except Exception as error:
            what = getattr(load, "path", None) or getattr(load, "name", f"image {i}")
            if self.fallbacks is None:
                raise ValueError(f"online crops: cannot use {what}: {error}") from error
            log.warning("online crops: cannot use %s (%s); training on its prepared crop instead", what, error)
            return self.fallbacks[i](), True

    def __getitem__(self, item: tuple[int, int]) -> TrainItem:
        epoch, i = item
        source, substituted = self._image(i)
        image = resize_pil_short_side(source, self.image_size)
        (top, left), = random_square_crops(image, self.image_size, 1, generator(self.seed, "online-crop", epoch, i))
        pixels = to_tensor(image)[:, top : top + self.image_size, left : left + self.image_size]
        crop = pixels.contiguous() if self.raw else normalize(pixels[None], self.mean, self.std)[0]
        return TrainItem(crop, index=i, substituted=None if self.fallbacks is None else substituted)


def image_crops(images, indices: Sequence[int]) -> dict[str, list[int]]:
    """The prepared records of each image among ``indices`` of a prepared-image store (records with ``meta(i)``:
    ``name``, ``crop``), by image name (in store order), each list ordered by crop number:
    ``data_preparation.crops_per_image`` records per image (the ``crops`` of :class:`TargetPairs`)."""
    crops: dict[str, list[tuple[int, int]]] = {}
    for i in indices:
        meta = images.meta(i)
        crops.setdefault(meta["name"], []).append((meta.get("crop", 0), i))
    return {name: [i for _, i in sorted(records)] for name, records in crops.items()}


class StoredImageLoader:
    """Picklable loader of record ``index`` of a prepared-image store, as a PIL image."""

    def __init__(self, store: Sequence[dict[str, torch.Tensor]], index: int):
        self.store, self.index = store, index

    def __call__(self) -> Image.Image:
        return Image.fromarray(self.store[self.index]["image"].permute(1, 2, 0).numpy())


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

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, int(i)) for n, i in enumerate(self.sampler) if n >= self.skip)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


def training_loader(dataset: Dataset[TrainItem], config: DistillConfig, seed: int, world: int,
                    rank: int, pin_memory: bool = False) -> tuple[DataLoader, EpochTaggedSampler, torch.Generator]:
    """The training loader of rank ``rank`` over the epoch-tagged sampler, and the generator its worker seeds come
    from (reseeded every epoch by the loop). ``pin_memory`` (on CUDA): batches in page-locked memory, so their copy
    to the device does not make the host wait."""
    # drop_last: the sampler gives every rank floor(N / world) images (no padding with repeated ones) and the loader
    # leaves out each rank's last incomplete batch, so every rank runs the same number of full batches
    sampler = EpochTaggedSampler(DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                    seed=derive_seed(seed, "shuffle") % (1 << 31),
                                                    drop_last=config.drop_last))
    workers = config.num_workers
    # the loader draws its worker seed from its own generator, reseeded per epoch: the global RNG (saved in
    # checkpoints) is left to the model, so a resumed run continues the same random stream
    loader_generator = torch.Generator()
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, multiprocessing_context="spawn" if workers > 0 else None,
                        generator=loader_generator, drop_last=config.drop_last, collate_fn=collate_items,
                        pin_memory=pin_memory)
    if config.drop_last and len(sampler.sampler) < config.batch_size:
        raise ValueError(f"student_distillation.training.drop_last is true, but the {len(dataset)} training images "
                         f"fill no batch of {config.batch_size} x {world} device(s): every batch would be dropped "
                         f"(lower batch_size, or set drop_last: false)")
    return loader, sampler, loader_generator
