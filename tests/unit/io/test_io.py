import json

import pytest
import torch

from ph_reg.io.shards import ShardReader, write_shards
from ph_reg.io.files import atomic_path, load_tensors, save_tensors, write_json


def _records(n):
    for i in range(n):
        yield {"x": torch.full((2, 3), float(i)), "y": torch.tensor([i])}, {"name": f"r{i}", "split": "val" if i % 3 == 0 else "train"}


def test_shard_round_trip(tmp_path):
    assert write_shards(tmp_path / "store", _records(7), records_per_shard=3, attrs={"a": 1}) == 7
    reader = ShardReader(tmp_path / "store")
    assert len(reader) == 7 and reader.attrs == {"a": 1}
    assert reader.shards == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    for i in range(7):
        assert torch.equal(reader[i]["x"], torch.full((2, 3), float(i)))
        assert reader.meta(i)["name"] == f"r{i}"
    assert reader.indices(split="val") == [0, 3, 6]
    assert torch.equal(reader.stack("y", [1, 4]), torch.tensor([[1], [4]]))
    with pytest.raises(IndexError, match="out of range"):
        reader[7]


def test_failed_write_leaves_no_index(tmp_path):
    def broken():
        yield from _records(4)
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        write_shards(tmp_path / "store", broken(), records_per_shard=2)
    assert not (tmp_path / "store" / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        ShardReader(tmp_path / "store")


def test_inconsistent_records_rejected(tmp_path):
    records = [({"x": torch.zeros(1)}, {}), ({"z": torch.zeros(1)}, {})]
    with pytest.raises(ValueError, match="must have the keys"):
        write_shards(tmp_path / "s", records)


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(ZeroDivisionError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            1 / 0
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_tensors_round_trip_and_missing(tmp_path):
    save_tensors(tmp_path / "w.safetensors", {"a": torch.arange(4.0)})
    assert torch.equal(load_tensors(tmp_path / "w.safetensors")["a"], torch.arange(4.0))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_tensors(tmp_path / "nope.safetensors")
