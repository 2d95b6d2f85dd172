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


def normalize(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) or float in [0, 1] -> float32 normalised with the model's mean and std.

    ``mean``/``std`` are sequences, or float32 tensors already on the images' device (built once by
    :func:`normalization_constants`, so a training step copies nothing from the host)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean_t) / std_t


def normalization_constants(mean: Sequence[float], std: Sequence[float],
                            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as float32 tensors on ``device``, for :func:`normalize` in a hot loop."""
    return (torch.tensor(mean, dtype=torch.float32, device=device),
            torch.tensor(std, dtype=torch.float32, device=device))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without making the host wait: a CPU tensor bound for CUDA is pinned and copied
    with ``non_blocking=True`` (a pageable copy waits for every queued kernel); elsewhere a plain ``.to``."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)
    return tensor.to(device)


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


# --- host syncs --------------------------------------------------------------------------------------------------

#: Tensor reads that make the host wait for the device (on CUDA): values copied to Python, to the CPU, or shapes
#: that depend on values (``nonzero``, boolean indexing).
_SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero",
                 "argwhere", "masked_select", "unique")


class HostSyncCounter:
    """Counts the tensor reads that would make the host wait for a CUDA device (:data:`_SYNC_METHODS`, boolean
    indexing), on any device (a CPU run counts what a GPU run would wait for), with the ``file:line function`` of the
    innermost ``ph_reg`` frame of each: ``with HostSyncCounter() as syncs: ...; syncs.sites``.

    On the CPU every tensor lives on the host, so the counter cannot tell a device tensor from one that stays on the
    host on every device: ``host_side`` names the functions whose reads are of such tensors (TTA views and index
    grids drawn on the host; PyTorch's own AdamW step counters, CPU tensors unless ``capturable``); their reads are
    kept apart in ``host_sites``. On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` is the ground truth
    (``benchmarks/gpu_check.py``)."""

    HOST_SIDE = ("sample_views", "farthest_point_sample", "_shift_flip", "patch_index_grids", "unshift_average")

    def __init__(self) -> None:
        from torch.overrides import TorchFunctionMode

        counter = self

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                name = getattr(func, "__name__", "")
                if name in _SYNC_METHODS or (name == "__getitem__" and _bool_index(args)):
                    counter._record(name)
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self.sites: list[str] = []
        self.host_sites: list[str] = []

    def _record(self, name: str) -> None:
        import sys

        frame, innermost_torch = sys._getframe(2), False
        while frame is not None and "/ph_reg/" not in frame.f_code.co_filename.replace("\\", "/"):
            innermost_torch = innermost_torch or "/torch/optim/" in frame.f_code.co_filename.replace("\\", "/")
            frame = frame.f_back
        where = "(outside ph_reg)" if frame is None else (
            f"{frame.f_code.co_filename.rsplit('/ph_reg/', 1)[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
        host = innermost_torch or (frame is not None and frame.f_code.co_name in self.HOST_SIDE)
        (self.host_sites if host else self.sites).append(f"{name} at {where}")

    def __enter__(self) -> HostSyncCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


def _bool_index(args: Sequence[Any]) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)
