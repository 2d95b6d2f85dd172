"""Resumable sharded safetensors stores.

A *shard store* is a folder of ``shard-00000.safetensors`` files plus an ``index.json`` that lists, for every
record, its shard, its row and its metadata. Records are streamed in and out, so a store can hold Flickr30k's
31,783 images without ever holding them all in memory. Every file is written to a temporary name and renamed,
and the index is written last: a store with an index is complete.

A new version of a store is written into a hidden sibling folder (``.<name>.partial``) and swapped in for the store
only once it is complete, so a failed or interrupted write leaves the previous store, and the reports written with
it, exactly as they were (:func:`ph_reg.io.files.replace_folder`).

Each shard also carries, in its safetensors header, its own records and a fingerprint of the store's attributes.
An interrupted write (SIGTERM, ``kill -9``, a full disk) therefore leaves whole shards in the sibling folder that a
later resuming write with the same fingerprint keeps: it resumes at the first missing shard (:func:`write_stream`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ph_reg.io.files import (clear_path, real_folder, restore_interrupted_swap, save_tensors, staging_folder, swap_in,
                             write_json)

INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
STORE_FORMAT = "ph-reg-shards/2"  # 2: tensors stored per record ("<row>/<key>")
SHARD_HEADER_KEY = "ph_reg_shard"  # safetensors metadata: {"fingerprint", "keys", "records"} of that shard
DEFAULT_RECORDS_PER_SHARD = 256
#: Finished shards waiting for the background writer thread: a producer that gets this far ahead waits.
WRITE_QUEUE_SHARDS = 2
Record = tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]  # (tensors, metadata) of one store record
log = logging.getLogger(__name__)


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

    ``background=True``: each finished shard is written by one writer thread (at most :data:`WRITE_QUEUE_SHARDS`
    shards queued), so the producer (e.g. the teacher pass) computes the next records meanwhile; the files are the
    same bytes as a synchronous write's. A write error is raised in the caller at its next shard or at the end of
    the block; the block waits for the queued shards before it ends, so an error or an interruption in the caller
    leaves exactly the shards a synchronous write would have finished.
    """

    def __init__(self, folder: str | os.PathLike, records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
                 attrs: Mapping[str, Any] | None = None, resume: bool = False, background: bool = True):
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.folder = real_folder(folder)
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
        self.background = background
        self._queue: queue.Queue[tuple[Path, dict, dict] | None] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> "ShardWriter":
        restore_interrupted_swap(self.folder)
        if self.staging.is_symlink() or (self.staging.exists() and not self.staging.is_dir()):
            clear_path(self.staging)
        self.staging.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._keep_finished_shards()
        keep = set(self._shards)
        for old in self.staging.iterdir():  # everything else an earlier write left: other shards, reports, index
            if old.name not in keep:
                clear_path(old)
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
        job = (self.staging / name, self._pending, {SHARD_HEADER_KEY: json.dumps(header)})
        if self.background:
            self._submit(job)
        else:
            save_tensors(*job)
        self._shards.append(name)
        self._entries.extend(self._pending_entries)
        self._pending, self._pending_entries, self._rows = {}, [], 0

    def _submit(self, job: tuple[Path, dict, dict]) -> None:
        """Queue a shard for the writer thread (started on the first shard); raise its error if it failed."""
        if self._thread is None:
            self._queue = queue.Queue(maxsize=WRITE_QUEUE_SHARDS)
            self._thread = threading.Thread(target=self._write_queued, name=f"shards:{self.folder.name}",
                                            daemon=True)
            self._thread.start()
        self._raise_writer_error()
        assert self._queue is not None
        self._queue.put(job)

    def _write_queued(self) -> None:
        """The writer thread: write the queued shards in order until the end mark; after an error, drop the rest
        (the caller raises it) so that the producer never blocks on a full queue."""
        assert self._queue is not None
        while (job := self._queue.get()) is not None:
            if self._error is None:
                try:
                    save_tensors(*job)
                except BaseException as error:  # re-raised in the caller's thread
                    self._error = error

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _join_writer(self) -> None:
        """Wait until the writer thread has written every queued shard, and stop it."""
        if self._thread is not None:
            assert self._queue is not None
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def __exit__(self, exc_type, exc, tb) -> None:
        error: BaseException | None = None
        if exc_type is None:
            try:
                self._flush()
            except BaseException as flush_error:  # the writer thread's error, or the last shard's own
                error = flush_error
        self._join_writer()
        error = error or (None if exc_type is not None else self._error)
        if exc_type is not None or error is not None:
            if not self.resume:  # nothing a later write could use
                shutil.rmtree(self.staging, ignore_errors=True)
            if error is not None:
                raise error
            return
        write_json(
            self.staging / INDEX_NAME,
            {"format": STORE_FORMAT, "attrs": self.attrs, "keys": list(self._keys or ()), "shards": self._shards,
             "records": self._entries},
        )
        swap_in(self.staging, self.folder)


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
