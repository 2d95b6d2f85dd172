"""The one no-grad dense forward of the evaluation: a backbone's features of images, in batches, at a precision.

:func:`dense_features` serves the artifact diagnostics and the planted benchmark (normalised or uint8 images in,
float32 CPU features out; :func:`dense_features_with_pre_norm` gives the dense output and the pre-norm tokens of
one forward); :func:`backbone_features` is one batch of the probe feature cache ([0, 255] crops in,
patch and CLS features out). Both run :func:`forward` under :func:`ph_reg.runtime.autocast`. The zero-shot harness
runs a *dense function* instead (a model, its TTA average, ...): :mod:`ph_reg.evaluation.zeroshot.harness`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ph_reg.runtime import DEFAULT_PRECISION, autocast, module_device, normalize

__all__ = ["forward_device", "forward", "dense_features", "dense_features_with_pre_norm", "center_pad", "backbone_features"]


def forward_device(model: nn.Module) -> torch.device:
    """The model's device: :func:`ph_reg.runtime.module_device`, else its buffers' device, else the CPU (the test
    stand-in backbones have no parameters)."""
    if next(model.parameters(), None) is not None:
        return module_device(model)
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def forward(model: nn.Module, images: Tensor, precision: str, pre_norm: bool = False):
    """``model(images)`` (or the pre-norm tokens, ``model.forward_tokens(images, pre_norm=True)``) under
    :func:`ph_reg.runtime.autocast` of ``precision`` on the images' device."""
    with autocast(images.device, precision):
        return model.forward_tokens(images, pre_norm=True) if pre_norm else model(images)


def _batches(model: nn.Module, images: Tensor, batch_size: int, normalise: bool):
    """``images`` ``batch_size`` at a time on the model's device (normalised on the CPU first with ``normalise``),
    the model put in eval mode."""
    device = forward_device(model)
    model.eval()
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        if normalise:
            batch = normalize(batch, model.mean, model.std)
        yield batch.to(device)


@torch.no_grad()
def dense_features(model: nn.Module, images: Tensor, *, batch_size: int = 8, precision: str = "auto",
                   pre_norm: bool = False, normalise: bool = False) -> Tensor:
    """Dense (N, h, w, C) float32 CPU features of images (N, 3, H, W), ``batch_size`` at a time, model in eval mode.

    ``normalise``: the images are uint8 (or floats in [0, 1]) and each batch is normalised with the model's mean
    and std on the CPU first (:func:`ph_reg.runtime.normalize`); else they are already normalised. ``pre_norm``:
    the pre-norm tokens instead of the dense output. ``precision``: ``evaluation.precision`` (``auto``: bf16 on
    CUDA, fp32 on the CPU)."""
    return torch.cat([forward(model, batch, precision, pre_norm).patch.float().cpu()
                      for batch in _batches(model, images, batch_size, normalise)])


@torch.no_grad()
def dense_features_with_pre_norm(model: nn.Module, images: Tensor, *, batch_size: int = 8, precision: str = "auto",
                                 normalise: bool = False) -> tuple[Tensor, Tensor]:
    """``(dense_features(...), dense_features(..., pre_norm=True))`` from one forward per batch
    (``model.forward_with_pre_norm``), bit for bit."""
    outputs, tokens = [], []
    for batch in _batches(model, images, batch_size, normalise):
        with autocast(batch.device, precision):
            output, pre_norm = model.forward_with_pre_norm(batch)
        outputs.append(output.patch.float().cpu())
        tokens.append(pre_norm.patch.float().cpu())
    return torch.cat(outputs), torch.cat(tokens)


def center_pad(images: Tensor, multiple: int) -> Tensor:
    """Zero-pad (B, C, H, W) to the next multiple of ``multiple`` on each side, split evenly with the extra pixel at
    the bottom/right (the DINOv2 depth toolbox's ``CenterPadding``, applied to normalised images)."""
    pads = []
    for size in (images.shape[-1], images.shape[-2]):
        extra = -size % multiple
        pads += [extra // 2, extra - extra // 2]
    return F.pad(images, pads) if any(pads) else images


@torch.no_grad()
def backbone_features(model: nn.Module, crops: Tensor, pad_to_patch: bool = False,
                      precision: str = DEFAULT_PRECISION, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Backbone features of one batch of float (B, 3, H, W) crops in [0, 255]: float32 (B, h, w, C) and (B, C) on
    the model's device, or, with ``dtype``, on the CPU in ``dtype``. The crops are normalised on the model's device;
    ``pad_to_patch`` centre-pads them to a multiple of the patch size (:func:`center_pad`). The forward runs at
    ``precision`` (``evaluation.precision``: :func:`ph_reg.runtime.autocast`)."""
    device = forward_device(model)
    images = normalize(crops.to(device) / 255.0, model.mean, model.std)
    if pad_to_patch:
        images = center_pad(images, model.patch_size)
    out = forward(model, images, precision)
    patch, cls = out.patch.float(), out.cls.float()
    if dtype is None:
        return patch, cls
    return patch.to("cpu", dtype), cls.to("cpu", dtype)
