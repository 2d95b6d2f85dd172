"""A training step that leaves the device alone: no host sync except on every ``sync_every``-th step (counted by
``ph_reg.runtime.HostSyncCounter``), non-finite batches masked on the device yet skipped and counted exactly as a
step that reads its flag, uint8 inputs normalised on the device with the same numbers."""

import signal
import tempfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import ph_reg.method.train as train
from ph_reg.io.shards import ShardReader, write_shards
from ph_reg.method.config import DistillConfig
from ph_reg.method.data import RandomCrops, StoredImageLoader, TargetPairs
from ph_reg.method.targets import OnlineTargets
from ph_reg.method.tta import TTAConfig
from ph_reg.method.train import NonFiniteBatchesError, TrainingInterrupted, distill
from ph_reg.models import build_backbone, trainable_state_dict
from ph_reg.runtime import HostSyncCounter
from training_support import _copies, _dataset, _load, _state

CONFIG = {"arch": "timm:test_vit", "img_size": 32, "head": "final_norm"}
TRAIN_BATCH = train._train_batch


@pytest.fixture(scope="module")
def stores():
    """Five 32x32 prepared images and their cached 3-view targets, as the pipelines store them."""
    teacher = build_backbone(CONFIG)
    pixels = torch.randint(0, 256, (5, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    tmp = Path(tempfile.mkdtemp())
    write_shards(tmp / "images", (({"image": p}, {"split": "train"}) for p in pixels))
    images = ShardReader(tmp / "images")
    from ph_reg.method.targets import denoised_target_records

    write_shards(tmp / "targets", denoised_target_records(teacher, images, seed=7, tta=TTAConfig(n_views=3),
                                                          batch_size=2, progress=False))
    return teacher, images, ShardReader(tmp / "targets")


def _student(seed=0):
    torch.manual_seed(seed)
    student = build_backbone({**CONFIG, "num_registers": 2})
    student.set_trainable(["registers", "last_block"])
    return student


def _syncs_per_step(monkeypatch, dataset, online, **config):
    """Counted host syncs (outside the host-side index code) of every _train_batch call of a one-epoch run."""
    real, counts = TRAIN_BATCH, []

    def counted(*args):
        with HostSyncCounter() as syncs:
            result = real(*args)
        counts.append(syncs.sites)
        return result

    monkeypatch.setattr(train, "_train_batch", counted)
    distill(_student(), dataset, DistillConfig(epochs=1, batch_size=1, **config), seed=7, progress=False,
            online_targets=online)
    return counts


@pytest.mark.parametrize("mode", ["cached", "online"])
def test_a_step_syncs_only_on_every_nth_step(stores, monkeypatch, mode):
    teacher, images, targets = stores
    if mode == "cached":
        dataset, online = TargetPairs(images, targets, range(5), teacher.mean, teacher.std, raw=True), None
    else:
        dataset = RandomCrops([StoredImageLoader(images, i) for i in range(5)], 32, teacher.mean, teacher.std,
                              seed=7, raw=True)
        online = OnlineTargets(teacher, seed=7, tta=TTAConfig(n_views=3))
    sites = _syncs_per_step(monkeypatch, dataset, online, sync_every=2)
    # step 0 reads its flag before the backward (the epoch's first optimizer step sets its rate) and the totals;
    # then every 2nd step and the epoch's last read the totals once; the others never wait
    assert [len(s) for s in sites] == [2, 0, 1, 0, 1], sites
    assert all("read" in site for s in sites[1:] for site in s)
    # reading every step (the default) waits on every step, twice: the flag before the backward, then the totals
    assert [len(s) for s in _syncs_per_step(monkeypatch, dataset, online, sync_every=1)] == [2] * 5


def test_the_counter_sees_the_reads_it_names():
    x = torch.ones(4)
    with HostSyncCounter() as syncs:
        x.sum().item(), bool(x.any()), x[x > 0], x.tolist(), float(x[0]), torch.nonzero(x)
        y = x * 2  # no read
    assert len(syncs.sites) == 6 and y.shape == (4,)


def _train(dataset, sync_every, tmp, **config):
    model = _copies(3)()
    settings = dict(epochs=4, batch_size=1, lr=1e-2, lr_end=1e-3, checkpoint_every=1, sync_every=sync_every)
    history = distill(model, dataset, DistillConfig(**{**settings, **config}), seed=5, progress=False,
                      checkpoint_dir=tmp, state_fn=_state, load_state_fn=_load)
    return history, _state(model), torch.load(tmp / "last.ckpt", weights_only=False)["optimizer"]["state"]


@pytest.mark.parametrize("fused", [False, True])  # True: the fused AdamW's found_inf skip (what CUDA runs)
@pytest.mark.parametrize("poison,batch_size", [([1, 6], 1), ([0, 2, 3], 1), ([4], 2)])
def test_masked_nonfinite_batches_are_skipped_and_counted_as_when_read(tmp_path, monkeypatch, poison, batch_size,
                                                                       fused):
    monkeypatch.setattr(train, "FUSED_ON_CPU", fused)
    read_every_step = _train(_dataset(8, poison), 1, tmp_path / "a", batch_size=batch_size)
    deferred = _train(_dataset(8, poison), 3, tmp_path / "b", batch_size=batch_size)
    history, weights, optimizer = deferred
    assert history == read_every_step[0]  # losses, steps, images, skipped batches, rates: all equal
    assert all(row["skipped_batches"] == (len(poison) if batch_size == 1 else 1) for row in history)
    for name, value in read_every_step[1].items():
        assert torch.equal(weights[name], value), name
    for index, state in read_every_step[2].items():  # AdamW's moments and step counters too
        for key, value in state.items():
            assert torch.equal(optimizer[index][key], value), (index, key)


def test_deferred_checks_still_abort_past_the_limit(tmp_path):
    with pytest.raises(NonFiniteBatchesError, match="3 batches had a non-finite"):
        _train(_dataset(8, [1, 6]), 4, tmp_path, max_nonfinite_batches=2)


def test_raw_uint8_inputs_train_bit_identically(stores):
    teacher, images, targets = stores
    weights = []
    for raw in (False, True):
        student = _student()
        dataset = TargetPairs(images, targets, range(5), teacher.mean, teacher.std, raw=raw)
        history = distill(student, dataset, DistillConfig(epochs=2, batch_size=2, sync_every=2), seed=7,
                          progress=False)
        weights.append((history, trainable_state_dict(student)))
        if raw:
            assert dataset[(0, 0)].image.dtype == torch.uint8
    assert weights[0][0] == weights[1][0]
    assert all(torch.equal(weights[0][1][k], weights[1][1][k]) for k in weights[0][1])


def test_a_stop_between_reads_resumes_bit_identically(tmp_path, monkeypatch):
    config = DistillConfig(epochs=3, batch_size=1, lr=1e-2, lr_end=1e-3, checkpoint_every=1, sync_every=4)
    fresh = _copies(0)
    expected_model = fresh()
    expected_history = distill(expected_model, _dataset(7, 2), config, seed=3, progress=False)
    calls, real = {"n": 0}, TRAIN_BATCH

    def stop_at_ten(*args):  # SIGTERM during the 10th step: 3 steps after the last read of epoch 2
        calls["n"] += 1
        if calls["n"] == 10:
            signal.raise_signal(signal.SIGTERM)
        return real(*args)

    resumed = fresh()
    monkeypatch.setattr(train, "_train_batch", stop_at_ten)
    with pytest.raises(TrainingInterrupted, match="epoch 2 after batch 3"):
        distill(resumed, _dataset(7, 2), config, seed=3, progress=False, checkpoint_dir=tmp_path)
    monkeypatch.setattr(train, "_train_batch", real)
    history = distill(resumed, _dataset(7, 2), DistillConfig(**{**asdict(config), "resume": True}), seed=3,
                      progress=False, checkpoint_dir=tmp_path)
    assert history == expected_history
    for name, value in _state(expected_model).items():
        assert torch.equal(_state(resumed)[name], value), name


def test_sync_every_and_compile_are_checked():
    from ph_reg.config import ConfigError, from_mapping
    from ph_reg.method.config import TRAINING_PREFIX

    with pytest.raises(ConfigError, match="sync_every"):
        from_mapping(DistillConfig, {"sync_every": 0}, TRAINING_PREFIX)
    with pytest.raises(ConfigError, match="compile"):
        from_mapping(DistillConfig, {"compile": "max-speed"}, TRAINING_PREFIX)
    assert from_mapping(DistillConfig, {"compile": "reduce-overhead"}, TRAINING_PREFIX).compile == "reduce-overhead"

