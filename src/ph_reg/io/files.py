"""Atomic file writes: a file or a folder is written under a temporary name and renamed into place only once it is
complete, so a failed or interrupted write never leaves a partial file and a previous version stays as it was.

- :func:`atomic_path`, :func:`write_json`, :func:`save_tensors` / :func:`load_tensors` (safetensors): single files.
- :func:`replace_folder`: a new version of a folder is written into a hidden sibling (``.<name>.partial``) and
  swapped in for the folder only once it is complete (:mod:`ph_reg.io.shards` writes its stores this way).
- :class:`WriteError`: any failure to write, naming the file; nothing is left under its name.
"""

from __future__ import annotations

import errno as errno_codes
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

STAGING_NAME = ".{}.partial"   # the hidden sibling a new version of a store folder is written into
REPLACED_NAME = ".{}.replaced"  # the previous version, between the two renames that swap a new version in
DEFAULT_FILE_MODE = 0o666  # what open() would create, before the umask


class WriteError(OSError):
    """A file could not be written (disk full, permission, ...). Nothing was left under its name: a previous
    version of the file, if any, is unchanged."""

    def __init__(self, path: str | os.PathLike, error: BaseException):
        self.path = Path(path)
        super().__init__(
            getattr(error, "errno", None) or errno_codes.EIO,
            f"cannot write {self.path}: {error}. Nothing was written under that name (a previous version, if any, "
            f"is unchanged); free disk space or fix the folder's permissions and rerun",
        )
        self.filename = str(self.path)

    def __str__(self) -> str:
        return self.strerror


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries of ``path`` left by a killed writer (``kill -9`` between write and rename)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    An ``OSError`` while writing becomes a :class:`WriteError` naming ``path``; the temporary file is removed, so
    no partial file is ever left under ``path``. Temporaries left by a killed earlier writer are removed first.
    The file gets the mode ``open()`` would give it (0666 less the umask), however the block wrote it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        mode = DEFAULT_FILE_MODE & ~_umask()  # mkstemp's 0600 would hide artifacts from co-workers
        os.chmod(tmp, mode)
    except OSError as error:
        raise WriteError(path, error) from error
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)  # again: a writer may have recreated the file (safetensors' save_file leaves 0600)
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(path, error) from error
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically, with sorted keys so equal data gives equal bytes."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Save a flat dict of tensors as safetensors, atomically; any failure is a :class:`WriteError` naming ``path``."""
    clean = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(clean, str(tmp), metadata=dict(metadata) if metadata else None)
        except Exception as error:  # safetensors reports I/O failures as its own SafetensorError
            raise WriteError(path, error) from error


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file into CPU tensors, with a clear error if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors


def real_folder(folder: str | os.PathLike) -> Path:
    """``folder``, or the folder a symbolic link at ``folder`` points to (its new version is written beside that)."""
    folder = Path(folder)
    return folder.resolve() if folder.is_symlink() else folder


def staging_folder(folder: str | os.PathLike) -> Path:
    """The hidden sibling into which a new version of ``folder`` is written before it replaces ``folder``."""
    folder = real_folder(folder)
    return folder.with_name(STAGING_NAME.format(folder.name))


def restore_interrupted_swap(folder: Path) -> None:
    """A process killed between the two renames of :func:`swap_in` left ``folder`` missing and its previous
    version under the replaced name: put that back."""
    replaced = folder.with_name(REPLACED_NAME.format(folder.name))
    if replaced.is_dir() and not folder.exists():
        os.replace(replaced, folder)


def swap_in(staging: Path, folder: Path) -> None:
    """Put the complete folder ``staging`` in place of ``folder``; the previous version is deleted only after."""
    replaced = folder.with_name(REPLACED_NAME.format(folder.name))
    try:
        if replaced.exists():
            shutil.rmtree(replaced)
        if folder.exists():
            os.replace(folder, replaced)
        try:
            os.replace(staging, folder)
        except OSError:
            restore_interrupted_swap(folder)
            raise
    except OSError as error:
        raise WriteError(folder, error) from error
    shutil.rmtree(replaced, ignore_errors=True)


def clear_path(path: Path) -> None:
    """Remove a file, a link or a folder (a link's target stays)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def replace_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden sibling of ``folder`` to write a new version of it into; only if the block succeeds
    does that version replace ``folder``. A failed block leaves ``folder`` exactly as it was (or absent) and
    removes the unfinished version."""
    folder = real_folder(folder)
    staging = staging_folder(folder)
    restore_interrupted_swap(folder)
    if staging.exists() or staging.is_symlink():
        clear_path(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, folder)
