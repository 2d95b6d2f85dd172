"""Atomic file writes and sharded safetensors stores.

A *shard store* is a folder of ``shard-00000.safetensors`` files plus an ``index.json`` that lists, for every
record, its shard, its row and its metadata. Records are streamed in and out, so a store can hold Flickr30k's
31,783 images without ever holding them all in memory. Every file is written to a temporary name and renamed,
and the index is written last: a store with an index is complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
STORE_FORMAT = "ph-reg-shards/2"  # 2: tensors stored per record ("<row>/<key>")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically, with sorted keys so equal data gives equal bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Save a flat dict of tensors as safetensors, atomically."""
    clean = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=dict(metadata) if metadata else None)


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


class ShardWriter:
    """Stream records (dicts of tensors; shapes may differ between records) into a shard store.

    Record ``r`` of a shard stores its tensors under the keys ``"<r>/<name>"``. Use as a context manager; the
    index is written only when the block exits without error.
    """

    def __init__(self, folder: str | os.PathLike, records_per_shard: int = 256, attrs: Mapping[str, Any] | None = None):
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.folder = Path(folder)
        self.records_per_shard = records_per_shard
        self.attrs = dict(attrs or {})
        self._pending: dict[str, torch.Tensor] = {}
        self._rows = 0
        self._entries: list[dict[str, Any]] = []
        self._shards: list[str] = []
        self._keys: tuple[str, ...] | None = None

    def __enter__(self) -> "ShardWriter":
        self.folder.mkdir(parents=True, exist_ok=True)
        index = self.folder / INDEX_NAME
        if index.exists():
            index.unlink()  # an incomplete rewrite must not look complete
        for old in self.folder.glob("shard-*.safetensors"):
            old.unlink()
        return self

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> None:
        keys = tuple(sorted(tensors))
        if self._keys is None:
            self._keys = keys
        elif keys != self._keys:
            raise ValueError(f"every record of {self.folder} must have the keys {self._keys}, got {keys}")
        for key, value in tensors.items():
            self._pending[f"{self._rows}/{key}"] = value.detach().cpu()
        self._entries.append({"shard": len(self._shards), "row": self._rows, **dict(meta or {})})
        self._rows += 1
        if self._rows == self.records_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        name = SHARD_PATTERN.format(len(self._shards))
        save_tensors(self.folder / name, self._pending)
        self._shards.append(name)
        self._pending, self._rows = {}, 0

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return
        self._flush()
        write_json(
            self.folder / INDEX_NAME,
            {"format": STORE_FORMAT, "attrs": self.attrs, "keys": list(self._keys or ()), "shards": self._shards,
             "records": self._entries},
        )


def write_shards(folder: str | os.PathLike, records: Iterable[tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]],
                 records_per_shard: int = 256, attrs: Mapping[str, Any] | None = None) -> int:
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
    """Records to be streamed into a shard store by whoever saves it (a Kedro dataset or ``write_shards``)."""

    def __init__(self, records: Iterable[tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]],
                 attrs: Mapping[str, Any] | None = None, records_per_shard: int | None = None):
        self.records = records
        self.attrs = dict(attrs or {})
        self.records_per_shard = records_per_shard
