"""Seeds, devices, precision (autocast) and graceful stops on SIGINT/SIGTERM: the run-time helpers shared by the
library."""

from __future__ import annotations

import contextlib
import hashlib
import random
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

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


#: Stored tensor dtypes by config name (``teacher_denoising.target_dtype``, ``evaluation.probes.feature_dtype``).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

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


# --- graceful stops ----------------------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(RuntimeError):
    """A run stopped cleanly on SIGINT/SIGTERM after saving what it had finished; rerunning continues from there."""


class StopRequest:
    """Set by :func:`stop_on_signals` when SIGINT or SIGTERM arrives; loops poll it at safe points."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "no signal"


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Turn the first SIGINT/SIGTERM into a stop request instead of killing the process.

    The caller finishes its current step, saves, and stops. The handler is removed at the first signal, so a second
    one acts at once (SIGINT raises KeyboardInterrupt, SIGTERM kills). Outside the main thread signals cannot be
    caught and the request is never set.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def request_stop(signum: int, frame: Any) -> None:  # no logging here: it is not reentrant
        stop.signum = signum
        restore()

    for sig in signals:
        signal.signal(sig, request_stop)
    try:
        yield stop
    finally:
        restore()
