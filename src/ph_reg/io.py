"""Atomic file writes, resumable sharded safetensors stores and graceful stops on SIGINT/SIGTERM.

A *shard store* is a folder of ``shard-00000.safetensors`` files plus an ``index.json`` that lists, for every
record, its shard, its row and its metadata. Records are streamed in and out, so a store can hold Flickr30k's
31,783 images without ever holding them all in memory. Every file is written to a temporary name and renamed,
and the index is written last: a store with an index is complete.

A new version of a store is written into a hidden sibling folder (``.<name>.partial``) and swapped in for the store
only once it is complete, so a failed or interrupted write leaves the previous store, and the reports written with
it, exactly as they were (:func:`replace_folder`).

Each shard also carries, in its safetensors header, its own records and a fingerprint of the store's attributes.
An interrupted write (SIGTERM, ``kill -9``, a full disk) therefore leaves whole shards in the sibling folder that a
later resuming write with the same fingerprint keeps: it resumes at the first missing shard (:func:`write_stream`).
"""

from __future__ import annotations

import errno as errno_codes
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
STORE_FORMAT = "ph-reg-shards/2"  # 2: tensors stored per record ("<row>/<key>")
STAGING_NAME = ".{}.partial"   # the hidden sibling a new version of a store folder is written into
REPLACED_NAME = ".{}.replaced"  # the previous version, between the two renames that swap a new version in
SHARD_HEADER_KEY = "ph_reg_shard"  # safetensors metadata: {"fingerprint", "keys", "records"} of that shard
DEFAULT_RECORDS_PER_SHARD = 256
Record = tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]  # (tensors, metadata) of one store record
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEFAULT_FILE_MODE = 0o666  # what open() would create, before the umask
log = logging.getLogger(__name__)


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


@contextmanager
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


def store_fingerprint(attrs: Mapping[str, Any], records_per_shard: int) -> str:
    """What a finished shard must match to be kept by a resumed write: the store's attributes and shard size."""
    text = json.dumps({"format": STORE_FORMAT, "attrs": attrs, "records_per_shard": records_per_shard},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _shard_header(path: Path) -> dict[str, Any] | None:
    """The ph_reg header of a shard, or None if the file is unreadable or was not written by a ShardWriter."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(SHARD_HEADER_KEY)
        return json.loads(header) if header else None
    except Exception:  # a damaged file is simply not kept
        return None


def _real_folder(folder: str | os.PathLike) -> Path:
    """``folder``, or the folder a symbolic link at ``folder`` points to (its new version is written beside that)."""
    folder = Path(folder)
    return folder.resolve() if folder.is_symlink() else folder


def staging_folder(folder: str | os.PathLike) -> Path:
    """The hidden sibling into which a new version of ``folder`` is written before it replaces ``folder``."""
    folder = _real_folder(folder)
    return folder.with_name(STAGING_NAME.format(folder.name))


def _restore_interrupted_swap(folder: Path) -> None:
    """A process killed between the two renames of :func:`_swap_in` left ``folder`` missing and its previous
    version under the replaced name: put that back."""
    replaced = folder.with_name(REPLACED_NAME.format(folder.name))
    if replaced.is_dir() and not folder.exists():
        os.replace(replaced, folder)


def _swap_in(staging: Path, folder: Path) -> None:
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
            _restore_interrupted_swap(folder)
            raise
    except OSError as error:
        raise WriteError(folder, error) from error
    shutil.rmtree(replaced, ignore_errors=True)


def _clear(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def replace_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden sibling of ``folder`` to write a new version of it into; only if the block succeeds
    does that version replace ``folder``. A failed block leaves ``folder`` exactly as it was (or absent) and
    removes the unfinished version."""
    folder = _real_folder(folder)
    staging = staging_folder(folder)
    _restore_interrupted_swap(folder)
    if staging.exists() or staging.is_symlink():
        _clear(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, folder)


class ShardWriter:
    """Stream records (dicts of tensors; shapes may differ between records) into a shard store.

    Record ``r`` of a shard stores its tensors under the keys ``"<r>/<name>"``. Use as a context manager. The new
    store is written into the hidden sibling :attr:`staging` and replaces ``folder`` only when the block exits
    without error (the index is written last, an unfinished last shard is dropped); until then ``folder`` keeps its
    previous version, and a failed write leaves it untouched.

    With ``resume=True`` the finished shards of an earlier, interrupted write with the same attributes and
    ``records_per_shard`` are kept (in :attr:`staging`, which a failed resumable write leaves in place):
    ``len(writer)`` is then the number of records already stored, and the caller adds the records from there on.
    Otherwise the store is written from scratch and a failed write removes its unfinished shards.
    """

    def __init__(self, folder: str | os.PathLike, records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
                 attrs: Mapping[str, Any] | None = None, resume: bool = False):
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.folder = _real_folder(folder)
        self.staging = staging_folder(self.folder)
        self.records_per_shard = records_per_shard
        self.attrs = dict(attrs or {})
        self.resume = resume
        self.fingerprint = store_fingerprint(self.attrs, records_per_shard)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_entries: list[dict[str, Any]] = []
        self._rows = 0
        self._entries: list[dict[str, Any]] = []
        self._shards: list[str] = []
        self._keys: tuple[str, ...] | None = None

    def __enter__(self) -> "ShardWriter":
        _restore_interrupted_swap(self.folder)
        if self.staging.is_symlink() or (self.staging.exists() and not self.staging.is_dir()):
            _clear(self.staging)
        self.staging.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._keep_finished_shards()
        keep = set(self._shards)
        for old in self.staging.iterdir():  # everything else an earlier write left: other shards, reports, index
            if old.name not in keep:
                _clear(old)
        return self

    def _keep_finished_shards(self) -> None:
        """Adopt the consecutive shards 0, 1, ... whose header matches this store's fingerprint."""
        while True:
            name = SHARD_PATTERN.format(len(self._shards))
            header = _shard_header(self.staging / name)
            if header is None or header.get("fingerprint") != self.fingerprint:
                return
            keys = tuple(header["keys"])
            if self._keys is not None and keys != self._keys:
                return
            self._keys = keys
            self._entries.extend(header["records"])
            self._shards.append(name)

    @property
    def finished_shards(self) -> int:
        return len(self._shards)

    def __len__(self) -> int:
        return len(self._entries) + len(self._pending_entries)

    def add(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> None:
        keys = tuple(sorted(tensors))
        if self._keys is None:
            self._keys = keys
        elif keys != self._keys:
            raise ValueError(f"every record of {self.folder} must have the keys {self._keys}, got {keys}")
        for key, value in tensors.items():
            self._pending[f"{self._rows}/{key}"] = value.detach().cpu()
        self._pending_entries.append({"shard": len(self._shards), "row": self._rows, **dict(meta or {})})
        self._rows += 1
        if self._rows == self.records_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        name = SHARD_PATTERN.format(len(self._shards))
        header = {"fingerprint": self.fingerprint, "keys": list(self._keys or ()), "records": self._pending_entries}
        save_tensors(self.staging / name, self._pending, metadata={SHARD_HEADER_KEY: json.dumps(header)})
        self._shards.append(name)
        self._entries.extend(self._pending_entries)
        self._pending, self._pending_entries, self._rows = {}, [], 0

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if not self.resume:  # nothing a later write could use
                shutil.rmtree(self.staging, ignore_errors=True)
            return
        self._flush()
        write_json(
            self.staging / INDEX_NAME,
            {"format": STORE_FORMAT, "attrs": self.attrs, "keys": list(self._keys or ()), "shards": self._shards,
             "records": self._entries},
        )
        _swap_in(self.staging, self.folder)


def write_shards(folder: str | os.PathLike, records: Iterable[tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]],
                 records_per_shard: int = DEFAULT_RECORDS_PER_SHARD, attrs: Mapping[str, Any] | None = None) -> int:
    """Stream ``(tensors, meta)`` pairs into a shard store; return the number of records written."""
    with ShardWriter(folder, records_per_shard, attrs) as writer:
        for tensors, meta in records:
            writer.add(tensors, meta)
    return len(writer)


class ShardReader(Sequence):
    """Random access to a shard store: reads only the tensors of the record asked for."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if not index.is_file():
            raise FileNotFoundError(
                f"no shard store at {self.folder}: {INDEX_NAME} is missing (run the pipeline that writes it first)"
            )
        data = json.loads(index.read_text())
        if data.get("format") != STORE_FORMAT:
            raise ValueError(f"{index} is not a {STORE_FORMAT} index (format={data.get('format')!r})")
        self.attrs: dict[str, Any] = data["attrs"]
        self.keys: list[str] = data["keys"]
        self.shards: list[str] = data["shards"]
        self.records: list[dict[str, Any]] = data["records"]
        self._handles: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # open file handles do not pickle (DataLoader workers, DDP spawn)
        return {**self.__dict__, "_handles": {}}

    def __len__(self) -> int:
        return len(self.records)

    def _handle(self, number: int):
        if number not in self._handles:
            path = self.folder / self.shards[number]
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in {self.folder / INDEX_NAME} is missing")
            self._handles[number] = safe_open(str(path), framework="pt")
        return self._handles[number]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for {self.folder} ({len(self)} records)")
        entry = self.records[i]
        handle = self._handle(entry["shard"])
        return {k: handle.get_tensor(f"{entry['row']}/{k}") for k in self.keys}

    def meta(self, i: int) -> dict[str, Any]:
        return self.records[i]

    def indices(self, **where: Any) -> list[int]:
        """Indices of the records whose metadata matches every ``key=value`` given."""
        return [i for i, r in enumerate(self.records) if all(r.get(k) == v for k, v in where.items())]

    def stack(self, key: str, indices: Sequence[int]) -> torch.Tensor:
        """Stack one tensor key over the given records (which must share its shape)."""
        return torch.stack([self[i][key] for i in indices])


class RecordStream:
    """Records to be streamed into a shard store by whoever saves it (a Kedro dataset or :func:`write_stream`).

    ``records_from(start)``, when given, yields the records from index ``start`` on *without computing the earlier
    ones*: it lets a resumed write skip the shards an interrupted run finished. ``reports`` maps file names to
    functions returning JSON data; they are called once every record has been consumed and their files are
    written into the store folder, before the index (e.g. the images a preparation skipped, and why).
    """

    def __init__(self, records: Iterable[Record], attrs: Mapping[str, Any] | None = None,
                 records_per_shard: int | None = None,
                 records_from: Callable[[int], Iterable[Record]] | None = None,
                 reports: Mapping[str, Callable[[], Any]] | None = None):
        self.records = records
        self.attrs = dict(attrs or {})
        self.records_per_shard = records_per_shard
        self.records_from = records_from
        self.reports = dict(reports or {})


def write_stream(folder: str | os.PathLike, stream: RecordStream,
                 records_per_shard: int = DEFAULT_RECORDS_PER_SHARD) -> int:
    """Write a :class:`RecordStream` into a shard store; return the number of records stored.

    A stream with ``records_from`` resumes: the finished shards of an interrupted write with the same attributes
    are kept, and only the records after them are computed. The reports are written with the shards, so the store
    and its reports are replaced together, and only when the write succeeds (:class:`ShardWriter`).
    """
    folder = Path(folder)
    resume = stream.records_from is not None
    with ShardWriter(folder, stream.records_per_shard or records_per_shard, stream.attrs, resume=resume) as writer:
        done = len(writer)
        if done:
            log.info("%s: kept %d finished shards (%d records) of an interrupted run (in %s); continuing from "
                     "record %d", folder, writer.finished_shards, done, writer.staging, done)
        records = stream.records_from(done) if done else stream.records
        for tensors, meta in records:
            writer.add(tensors, meta)
        for name, make_report in stream.reports.items():
            write_json(writer.staging / name, make_report())
    return len(writer)
