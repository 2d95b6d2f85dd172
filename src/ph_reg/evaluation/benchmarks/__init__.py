"""Dense-task datasets: readers for the standard on-disk layouts and the synthetic benchmark."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from ph_reg.evaluation.benchmarks.base import IGNORE_INDEX, DenseDataset, DenseSample
from ph_reg.evaluation.benchmarks.classes import CLASS_NAMES
from ph_reg.evaluation.benchmarks.readers import (
    ADE20K,
    COCOObject,
    COCOStuff,
    Cityscapes,
    NYUv2Depth,
    PascalContext,
    VOCSegmentation,
)
from ph_reg.evaluation.benchmarks.synthetic import Scene, SyntheticScenes, render_scene, sample_scene

#: ``build_dataset`` types -> dataset classes.
DATASETS: dict[str, type[DenseDataset]] = {
    "voc": VOCSegmentation,
    "ade20k": ADE20K,
    "pascal_context": PascalContext,
    "coco_stuff": COCOStuff,
    "coco_object": COCOObject,
    "cityscapes": Cityscapes,
    "nyuv2": NYUv2Depth,
    "synthetic": SyntheticScenes,
}


def dataset_keys(cls: type[DenseDataset]) -> list[str]:
    """The constructor arguments of a dataset class: the keys its spec may have besides ``type``."""
    return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]


def dataset_arguments(spec: Mapping) -> tuple[type[DenseDataset], dict]:
    """The class and constructor arguments of a dataset spec, checked without reading any data: a known ``type``,
    only keys the constructor accepts, and every argument it requires."""
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(f"dataset spec must be a mapping with a 'type' key (one of {sorted(DATASETS)}), got {spec!r}")
    kwargs = dict(spec)
    kind = kwargs.pop("type")
    if kind not in DATASETS:
        raise ValueError(f"dataset spec: unknown type {kind!r}; expected one of {sorted(DATASETS)}")
    cls = DATASETS[kind]
    accepted = dataset_keys(cls)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"dataset spec for {kind!r}: unknown keys {unknown}; accepted keys are {accepted}")
    try:
        inspect.signature(cls.__init__).bind(None, **kwargs)
    except TypeError as error:
        raise ValueError(f"dataset spec for {kind!r}: {error}; accepted keys are {accepted}") from None
    return cls, kwargs


def build_dataset(spec: Mapping) -> DenseDataset:
    """A dataset from a config mapping: ``{"type": <one of DATASETS>, **constructor arguments}``.

    Example: ``{"type": "pascal_context", "root": "data/VOCdevkit/VOC2010", "split": "val", "num_classes": 59}``.
    """
    cls, kwargs = dataset_arguments(spec)
    return cls(**kwargs)


__all__ = [
    "ADE20K",
    "CLASS_NAMES",
    "COCOObject",
    "COCOStuff",
    "Cityscapes",
    "DATASETS",
    "DenseDataset",
    "DenseSample",
    "IGNORE_INDEX",
    "NYUv2Depth",
    "PascalContext",
    "Scene",
    "SyntheticScenes",
    "VOCSegmentation",
    "build_dataset",
    "dataset_arguments",
    "dataset_keys",
    "render_scene",
    "sample_scene",
]
