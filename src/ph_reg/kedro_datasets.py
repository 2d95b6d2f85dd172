"""Kedro datasets for PH-Reg artifacts; all writes are atomic (temporary file, then rename), and a failed write
names its file (:class:`ph_reg.io.files.WriteError`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kedro.io import AbstractDataset, DatasetError

# torch and ph_reg.io (which imports torch) are imported in load/save, so building the catalog is fast
if TYPE_CHECKING:
    import torch

    from ph_reg.io.shards import RecordStream, ShardReader
    from ph_reg.method.export import HubExport


class ShardStoreDataset(AbstractDataset["RecordStream", "ShardReader"]):
    """A folder of safetensors shards plus ``index.json``. Saves a streamed ``RecordStream``; loads lazily.

    The new store (with the stream's reports) replaces the old one only once it is complete: a failed save leaves
    the previous store as it was. A stream with ``records_from`` resumes an interrupted save: finished shards are
    kept and their records are not computed again (:func:`ph_reg.io.shards.write_stream`).
    """

    def __init__(self, path: str, records_per_shard: int = 256, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self._records_per_shard = records_per_shard
        self.metadata = metadata

    def load(self) -> ShardReader:
        from ph_reg.io.shards import ShardReader

        return ShardReader(self._path)

    def save(self, data: RecordStream) -> None:
        from ph_reg.io.shards import RecordStream, write_stream

        if not isinstance(data, RecordStream):
            raise DatasetError(f"{self._path}: expected a ph_reg.io.shards.RecordStream, got {type(data).__name__}")
        write_stream(self._path, data, self._records_per_shard)

    def _exists(self) -> bool:
        return (self._path / "index.json").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "records_per_shard": self._records_per_shard}


class SafetensorsDataset(AbstractDataset["dict[str, torch.Tensor]", "dict[str, torch.Tensor]"]):
    """A flat dict of tensors in one safetensors file."""

    def __init__(self, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> dict[str, torch.Tensor]:
        from ph_reg.io.files import load_tensors

        return load_tensors(self._path)

    def save(self, data: dict[str, torch.Tensor]) -> None:
        from ph_reg.io.files import save_tensors

        save_tensors(self._path, data)

    def _exists(self) -> bool:
        return self._path.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class JSONDataset(AbstractDataset[Any, Any]):
    """JSON with sorted keys, written atomically (DVC metrics and configs)."""

    def __init__(self, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> Any:
        return json.loads(self._path.read_text())

    def save(self, data: Any) -> None:
        from ph_reg.io.files import write_json

        write_json(self._path, data)

    def _exists(self) -> bool:
        return self._path.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class ShardStoreCollectionDataset(AbstractDataset["dict[str, RecordStream]", "dict[str, ShardReader]"]):
    """Named shard stores in sub-folders of one folder (e.g. ``teacher/segmentation/voc21/train``).

    Saving replaces the whole collection, and only once every store of the new one is complete: a failed save
    leaves the previous collection as it was (:func:`ph_reg.io.files.replace_folder`).
    """

    def __init__(self, path: str, records_per_shard: int = 64, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self._records_per_shard = records_per_shard
        self.metadata = metadata

    def load(self) -> dict[str, ShardReader]:
        from ph_reg.io.shards import ShardReader

        if not self._path.is_dir():
            raise DatasetError(f"no shard-store collection at {self._path}")
        return {str(index.parent.relative_to(self._path)): ShardReader(index.parent)
                for index in sorted(self._path.rglob("index.json"))}

    def save(self, data: dict[str, RecordStream]) -> None:
        from ph_reg.io.shards import RecordStream, write_shards
        from ph_reg.io.files import replace_folder

        for name, stream in data.items():
            if not isinstance(stream, RecordStream):
                raise DatasetError(f"{self._path}/{name}: expected a ph_reg.io.shards.RecordStream, got {type(stream).__name__}")
        with replace_folder(self._path) as staging:
            for name, stream in data.items():
                write_shards(staging / name, stream.records, stream.records_per_shard or self._records_per_shard,
                             stream.attrs)

    def _exists(self) -> bool:
        return self._path.is_dir() and any(self._path.rglob("index.json"))

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class AtomicFileDataset(AbstractDataset[Any, Any]):
    """Wraps any single-file kedro-datasets dataset so that saving is atomic: the inner dataset writes to a hidden
    temporary file in the same folder, which is then renamed onto ``filepath``.

    Example: ``{type: ph_reg.kedro_datasets.AtomicFileDataset, filepath: x.csv, dataset: {type: pandas.CSVDataset}}``
    """

    def __init__(self, filepath: str, dataset: dict[str, Any], metadata: dict[str, Any] | None = None):
        from kedro.io.core import parse_dataset_definition

        self._filepath = Path(filepath)
        self._class, self._config = parse_dataset_definition(dict(dataset))
        self.metadata = metadata

    def _inner(self, path: Path) -> AbstractDataset:
        return self._class(**{**self._config, "filepath": str(path)})

    def load(self) -> Any:
        return self._inner(self._filepath).load()

    def save(self, data: Any) -> None:
        from ph_reg.io.files import atomic_path

        with atomic_path(self._filepath) as tmp:
            # the temporary name keeps the real suffix, so format-sniffing writers behave as for the real file
            staged = tmp.with_name(tmp.name + self._filepath.suffix)
            try:
                self._inner(staged).save(data)
                staged.replace(tmp)
            finally:
                staged.unlink(missing_ok=True)

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "dataset": self._class.__name__}


class StudentHubDataset(AbstractDataset["HubExport", Any]):
    """A distilled student as a Hugging Face Hub folder (:func:`ph_reg.method.export.save_pretrained`): the stock
    timm form at the top, the ph-reg student under ``ph_reg/``, a model card; written atomically. Loads the
    ph-reg student (:func:`ph_reg.method.export.from_pretrained`)."""

    def __init__(self, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> Any:
        from ph_reg.method.export import from_pretrained

        return from_pretrained(self._path)

    def save(self, data: HubExport) -> None:
        data.write(self._path)

    def _exists(self) -> bool:
        return (self._path / "ph_reg" / "config.json").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
