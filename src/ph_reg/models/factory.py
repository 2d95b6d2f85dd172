"""Building a backbone: the family registry and the functions that dispatch to a family's adapter.

A family adapter is a module (:mod:`ph_reg.models.open_clip`, :mod:`ph_reg.models.timm`) with ``build(config)``
(the DenseViT, weights loaded), ``meta_model(config)`` and ``patch_size(config)`` (on the ``meta`` device: no
weights), ``is_known(name)``, ``list_models()`` and ``pretrained_tags(name)``. It lives apart from
:mod:`ph_reg.models.backbone` because the families subclass its :class:`~ph_reg.models.backbone.DenseViT`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch

from ph_reg.models import open_clip as open_clip_family
from ph_reg.models import timm as timm_family
from ph_reg.models.backbone import HF_HUB_PREFIX, BackboneConfig, DenseViT, checked_config
from ph_reg.runtime import module_device

#: family name (the part of ``BackboneConfig.arch`` before the colon) -> its adapter module
FAMILY_ADAPTERS: dict[str, ModuleType] = {"open_clip": open_clip_family, "timm": timm_family}


def build_backbone(config: BackboneConfig | Mapping[str, Any]) -> DenseViT:
    """Build the frozen dense backbone described by ``config`` (a BackboneConfig or its dict form).

    Two builds from the same config give bit-identical weights (random init is seeded with ``init_seed``).
    """
    config = checked_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        return FAMILY_ADAPTERS[config.family].build(config)


def clean_copy(model: DenseViT) -> DenseViT:
    """The same model (same weights, head and registers) without its artifact implant: the clean ground truth of a
    planted-artifact benchmark. Eval mode, on the device of ``model``."""
    clean = build_backbone(dataclasses.replace(model.config, implant=None))
    clean.load_state_dict(model.state_dict())  # the implant has no state, so the dicts match
    return clean.to(module_device(model)).eval()


@contextmanager
def quiet_logging() -> Iterator[None]:
    """open_clip warns "initialized randomly" for every model it builds: not news for a meta-device check."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def patch_size(config: BackboneConfig) -> int | None:
    """The patch size of ``config.arch`` without building weights; None for ``hf-hub:`` names (read from the hub)."""
    if config.model_name.startswith(HF_HUB_PREFIX):
        return None
    with torch.device("meta"), quiet_logging():
        return FAMILY_ADAPTERS[config.family].patch_size(config)


def meta_backbone(config: BackboneConfig) -> DenseViT | None:
    """The architecture of ``config`` on the ``meta`` device (parameter names and shapes, no data, no download), to
    check trainable-group names; None for ``hf-hub:`` names."""
    if config.model_name.startswith(HF_HUB_PREFIX):
        return None
    shape_only = dataclasses.replace(config, pretrained=None, checkpoint=None)
    with torch.device("meta"), quiet_logging():
        return FAMILY_ADAPTERS[config.family].meta_model(shape_only)
