"""The shard store's background writer thread (issue 15): the same bytes as a synchronous write, errors raised in
the caller, nothing swapped in after a failure."""

import pytest
import torch

import ph_reg.io.shards as shards
from ph_reg.io.shards import ShardReader, ShardWriter


def _records(n):
    gen = torch.Generator().manual_seed(0)
    return [({"target": torch.randn(3, 4, generator=gen).half(), "image": torch.randint(0, 255, (3, 2, 2),
              generator=gen, dtype=torch.uint8)}, {"image_index": i}) for i in range(n)]


def _write(folder, background, n=11, per_shard=3):
    with ShardWriter(folder, per_shard, {"kind": "test"}, background=background) as writer:
        for tensors, meta in _records(n):
            writer.add(tensors, meta)
    return sorted(p.name for p in folder.iterdir())


def test_background_store_is_byte_identical_to_the_synchronous_one(tmp_path):
    names = _write(tmp_path / "sync", background=False)
    assert _write(tmp_path / "thread", background=True) == names and len(names) == 5  # 4 shards + index
    for name in names:
        assert (tmp_path / "thread" / name).read_bytes() == (tmp_path / "sync" / name).read_bytes(), name
    reader = ShardReader(tmp_path / "thread")
    assert len(reader) == 11 and torch.equal(reader[10]["target"], _records(11)[10][0]["target"])


@pytest.mark.parametrize("resume", [False, True])
def test_an_error_in_the_writer_thread_surfaces_in_the_caller(tmp_path, monkeypatch, resume):
    calls = []
    real = shards.save_tensors

    def failing(path, tensors, metadata=None):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device (injected)")
        real(path, tensors, metadata)

    _write(tmp_path / "store", background=False, n=2)  # a previous version of the store
    before = {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()}
    monkeypatch.setattr(shards, "save_tensors", failing)
    with pytest.raises(OSError, match="injected"):
        with ShardWriter(tmp_path / "store", 3, {"kind": "test"}, resume=resume) as writer:
            for tensors, meta in _records(30):
                writer.add(tensors, meta)
    assert calls[:2] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()} == before  # the old store is kept
    staging = shards.staging_folder(tmp_path / "store")
    kept = sorted(p.name for p in staging.iterdir()) if staging.exists() else []
    assert kept == (["shard-00000.safetensors"] if resume else [])  # what a synchronous write would leave


def test_an_error_in_the_caller_waits_for_the_queued_shards(tmp_path):
    with pytest.raises(RuntimeError, match="producer"):
        with ShardWriter(tmp_path / "store", 2, {"kind": "test"}, resume=True) as writer:
            for tensors, meta in _records(7):
                writer.add(tensors, meta)
            raise RuntimeError("producer failed")
    staging = shards.staging_folder(tmp_path / "store")
    assert sorted(p.name for p in staging.iterdir()) == [f"shard-0000{i}.safetensors" for i in range(3)]
    with ShardWriter(tmp_path / "store", 2, {"kind": "test"}, resume=True) as writer:  # resumes after them
        assert len(writer) == 6
        for tensors, meta in _records(9)[6:]:
            writer.add(tensors, meta)
    _write(tmp_path / "plain", background=False, n=9, per_shard=2)
    for name in sorted(p.name for p in (tmp_path / "plain").iterdir()):
        assert (tmp_path / "store" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
