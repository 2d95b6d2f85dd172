"""The sample interface shared by every dense-task dataset (real readers and the synthetic benchmark)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor

IGNORE_INDEX = 255


class DenseSample(NamedTuple):
    """One image with its dense ground truth."""

    image: Tensor            # uint8 (3, H, W), RGB
    label: Tensor | None     # int64 (H, W) class ids; IGNORE_INDEX = ignore; None if the dataset has no labels
    depth: Tensor | None     # float32 (H, W) metric depth in metres; 0 = invalid; None if no depth
    name: str                # a stable identifier (file stem or generated id)


class DenseDataset(Sequence):
    """Base class: a finite, indexable set of ``DenseSample``; subclasses fill the attributes and ``_load``."""

    name: str = "dataset"
    split: str = "val"
    class_names: list[str] = []      # one entry per class id 0..num_classes-1 (segmentation datasets)
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int) -> DenseSample:
        raise NotImplementedError

    def __getitem__(self, index: int) -> DenseSample:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}/{self.split}: index {index} out of range ({len(self)} samples)")
        return self._load(index % len(self))
