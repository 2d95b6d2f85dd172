"""Seeds, devices and small helpers shared by the library."""

from __future__ import annotations

import contextlib
import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed derived from a base seed and any keys (a node name, an epoch, ...), stable across runs."""
    text = ":".join([str(int(seed)), *map(str, keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``derive_seed(seed, *keys)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA, none (fp32) on CPU (the ``"auto"`` precision)."""
    return torch.bfloat16 if device.type == "cuda" else None


#: Evaluation precisions (``evaluation.precision``): ``fp32`` runs without autocast; ``bf16`` and ``fp16`` run the
#: forward under ``torch.autocast`` with that dtype on every device; ``auto`` is bf16 on CUDA and fp32 on the CPU.
PRECISION_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO_PRECISION = "auto"
#: What the official evaluation code ran (PH-Reg's zero-shot student and its DINOv2 probe toolboxes: fp32).
DEFAULT_PRECISION = "fp32"
PRECISIONS: tuple[str, ...] = (*PRECISION_DTYPES, AUTO_PRECISION)


def check_precision(value: object, key: str = "evaluation.precision") -> str:
    """``value`` if it is one of :data:`PRECISIONS`, else a ValueError naming the config ``key``."""
    if not isinstance(value, str) or value not in PRECISIONS:
        raise ValueError(f"{key} must be one of {list(PRECISIONS)}, got {value!r}")
    return value


def precision_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an evaluation precision on ``device`` (None: no autocast, fp32)."""
    check_precision(precision, "precision")
    if precision == AUTO_PRECISION:
        return autocast_dtype(device)
    return PRECISION_DTYPES[precision]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The one place an evaluation precision becomes a context: ``torch.autocast`` on ``device``'s type with
    :func:`precision_dtype`, or an explicitly disabled autocast for fp32 (so fp32 holds inside an outer autocast)."""
    dtype = precision_dtype(precision, device)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's parameters (the first one's; a module of ours never spans devices)."""
    return next(module.parameters()).device


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, 3, H, W) or float in [0, 1] -> float32 normalised with the model's mean and std."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean_t) / std_t
