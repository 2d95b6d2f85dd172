import math

import pytest
import torch

from ph_reg.method.tta import TTAConfig
from ph_reg.method.loss import distillation_loss, lr_after_step, parameter_groups
from ph_reg.method.train import distill
from ph_reg.method.config import DistillConfig
from training_support import TinyDense, _copies, _dataset, _load, _state


def test_loss_matches_formula():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 8, generator=gen), torch.randn(2, 3, 4, 8, generator=gen)
    loss, parts = distillation_loss(s, t, mse_weight=0.5)
    cos = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    expected = (1 - cos).mean() + 0.5 * ((s - t) ** 2).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert parts["cosine"] == pytest.approx((1 - cos).mean().item(), abs=1e-6)
    assert distillation_loss(t, t)[0].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_loss(s, t[:, :2])


def test_schedule_matches_formula():
    lr, lr_end, epochs = 3e-4, 1e-5, 100
    for e in (0, 9, 50, 99):
        assert lr_after_step(e, lr, lr_end, epochs) == pytest.approx(lr * (lr_end / lr) ** ((e + 1) / epochs))
    assert lr_after_step(99, lr, lr_end, epochs) == pytest.approx(lr_end)
    assert lr_after_step(150, lr, lr_end, epochs) == pytest.approx(lr_end)  # floored
    with pytest.raises(ValueError):
        lr_after_step(0, lr, 0.0, epochs)


def test_param_groups_split_decay():
    groups = parameter_groups(TinyDense(), 0.01, exempt="tokens_biases_norms")
    assert [len(g["params"]) for g in groups] == [1, 2]  # proj.weight | proj.bias, registers
    assert groups[1]["weight_decay"] == 0.0
    groups = parameter_groups(TinyDense(), 0.01)  # the release: every trainable parameter decays
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(3, 0.01)]
    frozen = TinyDense().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        parameter_groups(frozen, 0.01)


def test_training_reduces_loss_and_skips_nonfinite(tmp_path):
    torch.manual_seed(0)
    model = TinyDense()
    config = DistillConfig(epochs=3, batch_size=1, lr=1e-2, lr_end=1e-3, checkpoint_every=1)
    history = distill(model, _dataset(poison=2), config, seed=0, checkpoint_dir=tmp_path, state_fn=_state,
                      progress=False)
    assert [row["skipped_batches"] for row in history] == [1, 1, 1]
    assert all(math.isfinite(row["loss"]) for row in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[1]["lr"] == pytest.approx(lr_after_step(1, 1e-2, 1e-3, 3))  # the rate set after its steps
    assert not model.frozen.weight.requires_grad
    assert (tmp_path / "last.ckpt").is_file()


def test_resume_is_bit_identical(tmp_path):
    config = DistillConfig(epochs=4, batch_size=2, lr=1e-2, lr_end=1e-3, checkpoint_every=2)
    fresh = _copies()

    full = fresh()
    history_full = distill(full, _dataset(), config, seed=3, checkpoint_dir=tmp_path / "a", state_fn=_state,
                           progress=False)

    class Crash(Exception):
        pass

    def crash_after_second_epoch(epoch, row):
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        distill(fresh(), _dataset(), config, seed=3, checkpoint_dir=tmp_path / "b", state_fn=_state,
                progress=False, on_epoch_end=crash_after_second_epoch)
    resumed = fresh()
    resumed_config = DistillConfig(**{**config.__dict__, "resume": True})
    history_resumed = distill(resumed, _dataset(), resumed_config, seed=3, checkpoint_dir=tmp_path / "b",
                              state_fn=_state, load_state_fn=_load, progress=False)
    assert history_resumed == history_full
    for name, value in _state(full).items():
        assert torch.equal(value, _state(resumed)[name]), name
    # a different seed shuffles differently, so the comparison above is not vacuous
    other = fresh()
    distill(other, _dataset(), config, seed=4, progress=False)
    assert not torch.equal(_state(other)["proj.weight"], _state(full)["proj.weight"])


def _train_weights(config, n=8):
    torch.manual_seed(0)
    model = TinyDense()
    distill(model, _dataset(n), config, seed=5, progress=False)
    return _state(model)


def test_gradient_accumulation_matches_large_batch():
    big = _train_weights(DistillConfig(epochs=2, batch_size=4, lr=1e-2, lr_end=1e-3))
    accumulated = _train_weights(DistillConfig(epochs=2, batch_size=2, accumulate_grad_batches=2, lr=1e-2, lr_end=1e-3))
    assert DistillConfig(batch_size=2, accumulate_grad_batches=2).global_batch_size == 4
    for name, value in big.items():
        torch.testing.assert_close(accumulated[name], value, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sync_every", [1, 3])  # 3: masked steps, flags agreed on the device
def test_two_process_ddp_matches_one_process(sync_every):
    from ph_reg.method.train import unused_trainable

    assert unused_trainable(TinyDense(), _dataset()) == []  # so DDP runs with find_unused_parameters=False
    single = _train_weights(DistillConfig(epochs=2, batch_size=4, lr=1e-2, lr_end=1e-3, accelerator="cpu"))
    ddp_config = DistillConfig(epochs=2, batch_size=2, devices=2, lr=1e-2, lr_end=1e-3, accelerator="cpu",
                               sync_every=sync_every)
    assert ddp_config.global_batch_size == 4
    ddp = _train_weights(ddp_config)
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, atol=1e-6, rtol=1e-5)
    other = _train_weights(DistillConfig(epochs=2, batch_size=2, lr=1e-2, lr_end=1e-3))  # half the global batch
    assert not torch.allclose(other["proj.weight"], single["proj.weight"], atol=1e-6)


def test_cached_and_online_targets_agree_for_fixed_crops(tmp_path):
    """Same fixed crops and the same view draw: cached targets equal online ones, and training agrees exactly."""
    from ph_reg.method.data import RandomCrops, StoredImageLoader
    from ph_reg.method.data import TargetPairs
    from ph_reg.method.targets import OnlineTargets
    from ph_reg.io.shards import ShardReader, write_shards
    from ph_reg.models import build_backbone
    from ph_reg.method.targets import denoised_target_records

    config = {"arch": "timm:test_vit", "img_size": 32, "head": "final_norm"}
    teacher = build_backbone(config)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, 3, 32, 32), generator=gen, dtype=torch.uint8)
    write_shards(tmp_path / "images", (({"image": p}, {"split": "train"}) for p in pixels))
    images = ShardReader(tmp_path / "images")
    tta = TTAConfig(n_views=4, shift_frac=0.5, flip_prob=0.5, pool_factor=10)
    write_shards(tmp_path / "targets", denoised_target_records(teacher, images, seed=7, batch_size=1, progress=False,
                                                               tta=tta))
    targets = ShardReader(tmp_path / "targets")
    online = OnlineTargets(teacher, seed=7, tta=tta)
    crops = RandomCrops([StoredImageLoader(images, i) for i in range(4)], 32, teacher.mean, teacher.std, seed=7)
    for i in range(4):
        image, index = crops[(0, i)].image, crops[(0, i)].index
        assert torch.equal(online(image[None], 0, [index])[0], targets[i]["target"])
    assert not torch.equal(online(crops[(1, 0)].image[None], 1, [0])[0], targets[0]["target"])  # fresh views later

    def trained(dataset, online_targets):
        student = build_backbone({**config, "num_registers": 2})
        student.set_trainable(["registers", "last_block"])
        distill(student, dataset, DistillConfig(epochs=1, batch_size=1, lr=1e-3, lr_end=1e-4), seed=7,
                progress=False, online_targets=online_targets)
        return _state(student)

    cached_weights = trained(TargetPairs(images, targets, range(4), teacher.mean, teacher.std), None)
    online_weights = trained(crops, online)
    for name, value in cached_weights.items():
        assert torch.equal(value, online_weights[name]), name
