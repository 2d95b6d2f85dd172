"""The training loop's parts: the typed batch item, the config built by from_mapping (and rebuilt from asdict in
spawned processes), the epoch totals, the parameter groups' order, and a resume that is bit-identical."""

import signal
from dataclasses import asdict

import pytest
import torch

from ph_reg.config import ConfigError, from_mapping
from ph_reg.method.checkpoint import EpochProgress, EpochTotals
from ph_reg.method.data import TrainItem, collate_items
from ph_reg.method.loss import parameter_groups
from ph_reg.method.train import TrainingInterrupted, distill
from ph_reg.method.config import TRAINING_PREFIX, DistillConfig
from training_support import TinyDense, _dataset, _load, _state


def test_collate_keeps_the_fields_a_dataset_fills():
    cached = collate_items([TrainItem(torch.zeros(3, 2, 2), target=torch.ones(2, 2, 4)) for _ in range(3)])
    assert cached.image.shape == (3, 3, 2, 2) and cached.target.shape == (3, 2, 2, 4)
    assert cached.index is None and cached.substituted is None
    online = collate_items([TrainItem(torch.zeros(3, 2, 2), index=i, substituted=i == 1) for i in range(3)])
    assert online.target is None and online.index == [0, 1, 2]  # host data stays Python
    assert online.substituted == [False, True, False]


def test_config_from_mapping_survives_asdict_and_names_keys():
    config = from_mapping(DistillConfig, {"betas": [0.8, 0.9], "snapshot_epochs": [10, 1, 10], "lr": 1e-3},
                          TRAINING_PREFIX)
    assert config.betas == (0.8, 0.9) and config.snapshot_epochs == (1, 10)
    assert from_mapping(DistillConfig, asdict(config), TRAINING_PREFIX) == config  # as the spawned ranks rebuild it
    assert from_mapping(DistillConfig, {}, TRAINING_PREFIX) == DistillConfig()
    cases = {"epochs": (0, "an integer >= 1"), "lr": (0, "a number > 0"), "weight_decay": (-1, "a number >= 0"),
             "drop_last": ("yes", "true or false"),
             "max_nonfinite_batches": (-1, "an integer >= 0, or null to never abort"),
             "snapshot_every": (0, "an integer >= 1, or null for no periodic snapshots")}
    for key, (value, allowed) in cases.items():
        with pytest.raises(ConfigError) as caught:
            from_mapping(DistillConfig, {key: value}, TRAINING_PREFIX)
        assert caught.value.key == f"{TRAINING_PREFIX}.{key}" and caught.value.allowed == allowed
    with pytest.raises(ConfigError, match=r"student_distillation.training.epoch: did you mean 'epochs'\?"):
        from_mapping(DistillConfig, {"epoch": 3}, TRAINING_PREFIX)
    assert DistillConfig(batch_size=2, devices=2, accumulate_grad_batches=3).global_batch_size == 12


def test_epoch_totals_add_as_float64_tensors_did():
    totals, reference = EpochTotals(), torch.zeros(4, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for loss, cosine, mse in torch.rand(50, 3, generator=gen).tolist():
        totals.add(loss, cosine, mse)
        reference += torch.tensor([loss, cosine, mse, 1.0], dtype=torch.float64)
    assert [totals.loss, totals.cosine, totals.mse, totals.micro_batches] == reference.tolist()


def test_boundary_is_a_copy():
    progress = EpochProgress(epoch=1)
    progress.totals.add(1.0, 0.5, 0.5)
    progress.mark_boundary(3)
    progress.totals.add(1.0, 0.5, 0.5)
    progress.steps = 7
    assert progress.at_boundary.totals.loss == 1.0 and progress.at_boundary.steps == 0
    assert progress.at_boundary.position()["batch"] == 3


def test_parameter_groups_keep_the_order_of_named_parameters():
    model = TinyDense()
    trainable = [p for p in model.parameters() if p.requires_grad]
    (only,) = parameter_groups(model, 0.01)
    assert [id(p) for p in only["params"]] == [id(p) for p in trainable] and only["weight_decay"] == 0.01
    decay, no_decay = parameter_groups(model, 0.01, exempt="tokens_biases_norms")
    assert [id(p) for p in decay["params"]] == [id(model.proj.weight)]
    assert [id(p) for p in no_decay["params"]] == [id(model.registers), id(model.proj.bias)]  # named_parameters order


def test_resume_after_a_stop_mid_epoch_is_bit_identical(tmp_path, monkeypatch):
    import ph_reg.method.train as train

    config = DistillConfig(epochs=3, batch_size=2, lr=1e-2, lr_end=1e-3, checkpoint_every=1,
                           accumulate_grad_batches=2)
    torch.manual_seed(0)
    model = TinyDense()
    start = _state(model)
    expected_history = distill(model, _dataset(7), config, seed=3, progress=False)
    expected = _state(model)

    calls = {"n": 0}
    real = train._train_batch

    def stop_after_five(run, *args):  # a SIGTERM is requested during the 5th micro-batch
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGTERM)
        return real(run, *args)

    torch.manual_seed(0)
    resumed = TinyDense()
    _load(resumed, start)
    monkeypatch.setattr(train, "_train_batch", stop_after_five)
    with pytest.raises(TrainingInterrupted, match="epoch 2 after batch 2"):
        distill(resumed, _dataset(7), config, seed=3, progress=False, checkpoint_dir=tmp_path)
    monkeypatch.setattr(train, "_train_batch", real)
    history = distill(resumed, _dataset(7), DistillConfig(**{**asdict(config), "resume": True}), seed=3,
                      progress=False, checkpoint_dir=tmp_path)
    assert history == expected_history
    for name, value in expected.items():
        assert torch.equal(_state(resumed)[name], value), name
