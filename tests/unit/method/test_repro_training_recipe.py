"""Issue 12, points 2-4: the distillation recipe of the public release (0raiser0/PH-Reg ``DINOv2_full/``).

- Learning rate: ``distill_main.py`` sets ``lr = max(lr0 * (lr_end / lr0) ** ((e + 1) / E), lr_end)`` after every
  optimizer step of epoch ``e``; the rate of every optimizer step of a run must equal that rule, also with gradient
  accumulation, skipped batches and a resume from a mid-epoch checkpoint.
- Weight decay: ``distill_main.py`` gives ``weight_decay=1e-2`` to every unlocked parameter; under ``conf/paper`` and
  ``conf/paper_dinov2`` every trainable parameter of the student must be in a decayed group.
- Views: ``datasets/flickr30k_dataset.py`` draws the TTA offsets and flips per image (in ``__getitem__``); ours draws
  per image too, from ``(seed, epoch, image index)``, with one batched teacher forward over all views of all images.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from kedro.config import OmegaConfigLoader
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch import Tensor, nn

from ph_reg.params import meta_backbone, student_distillation_params
from ph_reg.method.tta import (TTAConfig, TTADenoiser, TTAViews, augment_images, image_generators, max_shift, patch_index_grids,
                            sample_views, unshift_average)
from ph_reg.method.loss import WEIGHT_DECAY_EXEMPTIONS, parameter_groups
from ph_reg.method.train import TrainingInterrupted, distill
from ph_reg.config import from_mapping
from training_support import SignalAt
from ph_reg.method.config import TRAINING_PREFIX, DistillConfig
from ph_reg.models import DenseOutput

from conftest import PROJECT_ROOT

PATCH = 4
WHITE = torch.tensor([1.9, 2.0, 2.1])  # any per-channel fill value that the test images never contain


# --------------------------------------------------------------------------------------------- helpers
def official_lr(epoch: int, lr0: float, lr_end: float, epochs: int) -> float:
    """``DINOv2_full/distill_main.py``, written out: the rate set after an optimizer step of ``epoch``."""
    new_lr = lr0 * ((lr_end / lr0) ** ((epoch + 1) / epochs))
    return lr_end if new_lr <= lr_end else new_lr


class Tiny(nn.Module):
    """A stand-in student with a matrix, a bias and a token, returning a DenseOutput like DenseViT."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.registers = nn.Parameter(torch.zeros(2, 4))

    def forward(self, x):
        patch = self.proj(x.permute(0, 2, 3, 1)) + self.registers.sum(0)
        return DenseOutput(patch, patch.mean((1, 2)))


class Pairs(torch.utils.data.Dataset):
    """(epoch, i)-indexed (image, target) pairs (wrap in ``training_support.SignalAt`` to send SIGTERM)."""

    def __init__(self, n: int, poison: int | None = None):
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, 2, 2, generator=gen)
        self.y = torch.randn(n, 2, 2, 4, generator=gen)
        if poison is not None:
            self.y[poison] = float("nan")

    def __len__(self):
        return len(self.x)

    def __getitem__(self, item):
        _, i = item
        return self.x[i], self.y[i]


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _load(model: nn.Module, state: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for k, v in model.named_parameters():
            if k in state:
                v.copy_(state[k])


class StepRecorder:
    """Records the learning rate of every group at every optimizer step (a global step pre-hook, so the optimizer
    that ``distill`` builds and Fabric wraps is seen as it runs), and the number of steps at each epoch end."""

    def __init__(self):
        self.lrs: list[list[float]] = []
        self.steps_at_epoch_end: list[int] = []

    def __enter__(self) -> "StepRecorder":
        self.handle = register_optimizer_step_pre_hook(
            lambda optimizer, args, kwargs: self.lrs.append([g["lr"] for g in optimizer.param_groups]))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        self.steps_at_epoch_end.append(len(self.lrs))


def _expected_lrs(step_epochs: list[int], lr0: float, lr_end: float, epochs: int) -> list[float]:
    """The release's rate at each optimizer step: lr0 for the first, then the value set after the step before."""
    return [lr0 if k == 0 else official_lr(step_epochs[k - 1], lr0, lr_end, epochs) for k in range(len(step_epochs))]


def _step_epochs(steps_at_epoch_end: list[int], first_epoch: int = 0, steps_before: int = 0) -> list[int]:
    out, previous = [], steps_before
    for epoch, total in enumerate(steps_at_epoch_end, start=first_epoch):
        out += [epoch] * (total - previous)
        previous = total
    return out


# ------------------------------------------------------------------------------------------ learning rate
LR0, LR_END, EPOCHS = 1e-2, 1e-4, 3


@pytest.mark.parametrize(("n", "batch_size", "accumulate", "poison"), [(6, 2, 1, None), (10, 2, 2, 3)])
def test_lr_of_every_optimizer_step_follows_the_release(n, batch_size, accumulate, poison):
    config = DistillConfig(epochs=EPOCHS, batch_size=batch_size, accumulate_grad_batches=accumulate, lr=LR0,
                           lr_end=LR_END, checkpoint_every=EPOCHS)
    torch.manual_seed(0)
    model = Tiny()
    with StepRecorder() as rec:
        history = distill(model, Pairs(n, poison), config, seed=0, state_fn=_weights, progress=False,
                          on_epoch_end=rec.on_epoch_end)
    step_epochs = _step_epochs(rec.steps_at_epoch_end)
    assert [row["steps"] for row in history] == [step_epochs.count(e) for e in range(EPOCHS)]
    assert all(count >= 2 for count in (step_epochs.count(e) for e in range(EPOCHS)))  # a first and a later step
    used = [lrs[0] for lrs in rec.lrs]
    assert all(len(set(lrs)) == 1 for lrs in rec.lrs)  # every group at the same rate
    assert used == pytest.approx(_expected_lrs(step_epochs, LR0, LR_END, EPOCHS), rel=1e-12, abs=0)
    # the rule spelled out: epoch 0 at lr0 (only its first step) then the epoch-0 value, an epoch's first step at
    # the previous epoch's value, and the last epoch at lr_end after its first step
    first_of = [step_epochs.index(e) for e in range(EPOCHS)]
    assert used[0] == LR0 and used[1] == pytest.approx(official_lr(0, LR0, LR_END, EPOCHS))
    assert used[first_of[1]] == pytest.approx(official_lr(0, LR0, LR_END, EPOCHS))
    assert used[first_of[2]] == pytest.approx(official_lr(1, LR0, LR_END, EPOCHS))
    assert used[first_of[2] + 1:] == pytest.approx([LR_END] * (len(used) - first_of[2] - 1))
    assert history[-1]["lr"] == pytest.approx(LR_END)


def test_lr_across_a_mid_epoch_resume_follows_the_release(tmp_path):
    """SIGTERM in the middle of epoch 2 (with accumulation and a skipped batch), then resume: the steps of both
    runs together have the rates of an uninterrupted run, whatever lr the checkpoint's optimizer state holds."""
    config = DistillConfig(epochs=EPOCHS, batch_size=2, accumulate_grad_batches=2, lr=LR0, lr_end=LR_END,
                           checkpoint_every=EPOCHS)
    torch.manual_seed(0)
    init = _weights(Tiny())

    def fresh() -> Tiny:
        model = Tiny()
        _load(model, init)
        return model

    with StepRecorder() as full:
        expected_history = distill(fresh(), Pairs(12, poison=5), config, seed=1, state_fn=_weights, progress=False,
                                   on_epoch_end=full.on_epoch_end)
    with StepRecorder() as first, pytest.raises(TrainingInterrupted, match="at epoch 2 after batch"):
        distill(fresh(), SignalAt(Pairs(12, poison=5), (1, 3)), config, seed=1, checkpoint_dir=tmp_path,
                state_fn=_weights, progress=False, on_epoch_end=first.on_epoch_end)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["position"]["epoch"] == 1 and saved["position"]["steps"] >= 1  # stopped after a step of epoch 2
    for group in saved["optimizer"]["param_groups"]:  # e.g. a checkpoint of the older per-epoch schedule
        group["lr"] = 123.0
    torch.save(saved, tmp_path / "last.ckpt")
    with StepRecorder() as second:
        history = distill(fresh(), Pairs(12, poison=5), DistillConfig(**{**config.__dict__, "resume": True}), seed=1,
                          checkpoint_dir=tmp_path, state_fn=_weights, load_state_fn=_load, progress=False,
                          on_epoch_end=second.on_epoch_end)
    assert history == expected_history
    step_epochs = _step_epochs(full.steps_at_epoch_end)
    resumed = [lrs[0] for lrs in first.lrs + second.lrs]
    assert resumed == [lrs[0] for lrs in full.lrs]
    assert resumed == pytest.approx(_expected_lrs(step_epochs, LR0, LR_END, EPOCHS), rel=1e-12, abs=0)
    assert 0 < len(first.lrs) - first.steps_at_epoch_end[0] < step_epochs.count(1)  # really stopped mid-epoch


# ------------------------------------------------------------------------------------------- weight decay
def _paper_params(env: str) -> dict[str, Any]:
    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), base_env="base", default_run_env=env,
                               merge_strategy={"parameters": "soft", "globals": "soft"})
    return copy.deepcopy(loader["parameters"])


@pytest.mark.parametrize(("env", "last_block_prefix", "patch_params"), [
    ("paper", "vit.transformer.resblocks.11.", {"vit.conv1.weight"}),  # OpenAI CLIP's conv has no bias
    ("paper_dinov2", "vit.blocks.11.", {"vit.patch_embed.proj.weight", "vit.patch_embed.proj.bias"}),
])
def test_every_unlocked_parameter_decays_under_the_paper_configs(env, last_block_prefix, patch_params):
    params = _paper_params(env)
    config, checked = student_distillation_params(params["backbone"], params["student_distillation"])
    training = checked.training
    assert training.weight_decay == 1e-2 and training.weight_decay_exempt == "none"
    student = meta_backbone(config)  # the paper architecture on the meta device: names and shapes only
    unlocked = set(student.set_trainable(list(checked.trainable)))
    # what the release unlocks: registers, positional embedding, patch conv (weight, bias), the whole last block
    every = dict(student.named_parameters())
    pos_embed = {"vit.positional_embedding", "vit.pos_embed"} & set(every)
    last_block = {name for name in every if name.startswith(last_block_prefix)}
    # ... less what the student's head never reads (CLIP's MaskCLIP head: the last block's ln_2 and MLP): they get no
    # gradient, so the release's AdamW never moves them either (torch skips parameters without a gradient)
    unread = set(student.unread_parameters())
    assert unread == ({last_block_prefix + p for p in ("ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                                                       "mlp.c_proj.weight", "mlp.c_proj.bias")}
                      if env == "paper" else set())
    assert unlocked == {"registers"} | pos_embed | patch_params | (last_block - unread) and len(pos_embed) == 1
    groups = parameter_groups(student, training.weight_decay, training.weight_decay_exempt)
    in_groups = [(id(p), g["weight_decay"]) for g in groups for p in g["params"]]
    assert sorted(i for i, _ in in_groups) == sorted(id(every[name]) for name in unlocked)  # each exactly once
    assert {decay for _, decay in in_groups} == {1e-2}
    # the named fast-path option exempts tokens, biases, norms (and LayerScale gammas): not vacuous here
    exempted = parameter_groups(student, training.weight_decay, "tokens_biases_norms")
    no_decay = {id(p) for g in exempted if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(every["registers"]) in no_decay and id(every[next(iter(pos_embed))]) in no_decay
    assert id(every[last_block_prefix + "attn.in_proj_bias" if env == "paper" else last_block_prefix + "mlp.fc1.bias"]) \
        in no_decay


def test_weight_decay_exempt_is_validated():
    assert WEIGHT_DECAY_EXEMPTIONS == ("none", "tokens_biases_norms")
    with pytest.raises(ValueError, match="student_distillation.training.weight_decay_exempt"):
        from_mapping(DistillConfig, {"weight_decay_exempt": "biases"}, TRAINING_PREFIX)
    with pytest.raises(ValueError, match="student_distillation.training.weight_decay"):
        from_mapping(DistillConfig, {"weight_decay": -1.0}, TRAINING_PREFIX)
    assert from_mapping(DistillConfig, {}, TRAINING_PREFIX).weight_decay_exempt == "none"
    with pytest.raises(ValueError, match="exempt"):
        parameter_groups(Tiny(), 0.01, "all")


# ------------------------------------------------------------------------------------------------ views
def _images(batch: int, h: int, w: int, seed: int) -> Tensor:
    """Dyadic values (exact sums in float32) that never equal the fill."""
    values = torch.randint(-64, 64, (batch, 3, h * PATCH, w * PATCH), generator=torch.Generator().manual_seed(seed))
    return values.float() / 16


def _patch_mean(images: Tensor) -> Tensor:
    """Stand-in backbone invariant to mirroring inside a patch (docs/method.md section 2): per-patch mean colour."""
    return images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).mean(dim=(-1, -2)).permute(0, 2, 3, 1)


class Recording:
    """A features_fn that records every input batch it is called with."""

    def __init__(self):
        self.calls: list[Tensor] = []

    def __call__(self, images: Tensor) -> Tensor:
        self.calls.append(images.clone())
        return _patch_mean(images)

    def views_of(self, batch: int, n_views: int) -> Tensor:
        """The augmented copies each image received: (B, n, C, H, W) from the view-major input."""
        seen = torch.cat(self.calls)
        return seen.view(n_views, batch, *seen.shape[1:]).transpose(0, 1)


def _denoise(images: Tensor, generators, n_views: int = 6, budget: int = 1000) -> tuple[Tensor, Recording]:
    recording = Recording()
    denoiser = TTADenoiser(recording, PATCH, WHITE, TTAConfig(n_views=n_views, shift_frac=0.4, flip_prob=0.5),
                           max_images_per_forward=budget)
    return denoiser(images, generators), recording


def test_two_images_of_one_batch_get_different_views_in_one_teacher_forward():
    same = _images(1, 5, 5, 0).expand(4, -1, -1, -1)  # four copies of one image
    out, rec = _denoise(same, image_generators(7, 0, [0, 1, 2, 3]))
    assert [c.shape[0] for c in rec.calls] == [6 * 4]  # one forward over all views of all images
    views = rec.views_of(4, 6)
    for a in range(4):
        assert torch.equal(views[a, 0], same[0])  # view 0 is the identity for every image
        for b in range(a + 1, 4):
            assert not torch.equal(views[a], views[b]), (a, b)
    # exact per image despite different views (the backbone is mirror-invariant inside a patch)
    assert torch.equal(out, _patch_mean(same))


def test_same_seed_same_views_other_seed_or_epoch_other_views():
    images = _images(3, 5, 6, 1)
    _, first = _denoise(images, image_generators(3, 2, [10, 11, 12]))
    _, again = _denoise(images, image_generators(3, 2, [10, 11, 12]))
    assert torch.equal(torch.cat(first.calls), torch.cat(again.calls))
    for seed, epoch in ((4, 2), (3, 3)):
        _, other = _denoise(images, image_generators(seed, epoch, [10, 11, 12]))
        assert not torch.equal(torch.cat(first.calls), torch.cat(other.calls)), (seed, epoch)


def test_views_of_an_image_do_not_depend_on_its_batch():
    images = _images(5, 5, 6, 2)
    alone_out, alone = _denoise(images[2:3], image_generators(9, 1, [2]))
    batch_out, batch = _denoise(images[[4, 2, 0]], image_generators(9, 1, [4, 2, 0]), budget=5)
    assert torch.equal(alone.views_of(1, 6)[0], batch.views_of(3, 6)[1])
    assert torch.equal(alone_out[0], batch_out[1])


def test_per_image_augmentation_and_unshift_match_per_image_references():
    """Batched per-image views equal each image processed alone with its own views; the un-shift matches a slow
    per-image loop, with a mirror-sensitive random feature map (so every token must land on its own patch)."""
    h, w, n, batch = 5, 7, 6, 3
    images = torch.randn(batch, 3, h * PATCH, w * PATCH, generator=torch.Generator().manual_seed(0))
    per_image = [sample_views(n, 2, g, flip_prob=0.5) for g in image_generators(0, 0, range(batch))]
    views = TTAViews.stack(per_image)
    assert views.per_image and len(views) == n and views.flips.any()
    augmented = augment_images(images, views, PATCH, WHITE).view(n, batch, 3, h * PATCH, w * PATCH)
    grids = patch_index_grids(views, h, w)
    assert grids.shape == (n, batch, h, w)
    for b, own in enumerate(per_image):
        assert torch.equal(augmented[:, b], augment_images(images[b:b + 1], own, PATCH, WHITE))
        assert torch.equal(grids[:, b], patch_index_grids(own, h, w))
    features = torch.randn(n * batch, h, w, 8, generator=torch.Generator().manual_seed(1))
    fast = unshift_average(features, grids)
    for b in range(batch):
        total, count = torch.zeros(h * w, 8, dtype=torch.float64), torch.zeros(h * w, dtype=torch.float64)
        for v in range(n):
            for p, src in enumerate(grids[v, b].reshape(-1).tolist()):
                if src >= 0:
                    total[src] += features[v * batch + b].reshape(-1, 8)[p].double()
                    count[src] += 1
        torch.testing.assert_close(fast[b].double(), (total / count[:, None]).view(h, w, 8), rtol=0, atol=1e-6)


def test_views_validation_names_the_problem():
    views = TTAViews.stack([sample_views(4, 1, torch.Generator().manual_seed(s)) for s in range(2)])
    with pytest.raises(ValueError, match="views were drawn for 2 images"):
        augment_images(torch.zeros(3, 3, 8, 8), views, PATCH, WHITE)
    with pytest.raises(ValueError, match="generators"):
        TTADenoiser(_patch_mean, PATCH, WHITE, TTAConfig())(torch.zeros(2, 3, 8, 8), image_generators(0, 0, [0]))


# --------------------------------------------------------- the same keys in cached and online targets
def test_cached_targets_do_not_depend_on_batch_size_and_equal_online_epoch_0(tmp_path):
    """Teacher denoising (cached) with batch sizes 1 and 3, and OnlineTargets at epoch 0 on a batch of the same
    fixed crops: one target per image, whatever the batching."""
    from ph_reg.method.targets import OnlineTargets
    from ph_reg.models import build_backbone
    from ph_reg.method.targets import denoised_target_records
    from ph_reg.runtime import normalize

    teacher = build_backbone({"arch": "timm:test_vit", "img_size": 32, "head": "final_norm"})
    pixels = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images = [{"image": p} for p in pixels]
    tta = TTAConfig(n_views=4, shift_frac=0.4, flip_prob=0.5, pool_factor=10)
    by_one = [r["target"] for r, _ in denoised_target_records(teacher, images, seed=7, batch_size=1,
                                                                progress=False, tta=tta)]
    by_three = [r["target"] for r, _ in denoised_target_records(teacher, images, seed=7, batch_size=3,
                                                                  progress=False, tta=tta)]
    online = OnlineTargets(teacher, seed=7, tta=tta)(normalize(pixels[[3, 1]], teacher.mean, teacher.std), 0, [3, 1])
    for i in range(4):
        torch.testing.assert_close(by_three[i], by_one[i], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(online[0], by_one[3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(online[1], by_one[1], rtol=1e-5, atol=1e-5)
    # the targets are not all alike: another seed draws other views (so the comparisons above can fail)
    other = [r["target"] for r, _ in denoised_target_records(teacher, images[:1], seed=8, batch_size=1,
                                                              progress=False, tta=tta)]
    assert not torch.allclose(other[0], by_one[0], rtol=1e-5, atol=1e-5)


def test_zero_shot_tta_head_is_independent_of_batching():
    """maskclip_tta (tta_dense_fn): every crop uses the views of ``seed``, so a crop's features do not depend on
    the other crops of its batch."""
    from ph_reg.models import build_backbone
    from ph_reg.evaluation.zeroshot.harness import tta_dense_fn

    model = build_backbone({"arch": "timm:test_vit", "img_size": 32, "head": "final_norm"}).eval()
    crops = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    dense = tta_dense_fn(model, TTAConfig(n_views=4, shift_frac=0.4), seed=5)
    together = dense(crops)
    for i in range(3):
        torch.testing.assert_close(dense(crops[i:i + 1])[0], together[i], rtol=1e-5, atol=1e-5)
    assert max_shift(2, 0.4) == 1  # 32 px / patch 16 = 2 patches: the views really shift
    assert not torch.allclose(tta_dense_fn(model, TTAConfig(n_views=4, shift_frac=0.4), seed=6)(crops), together,
                              rtol=1e-5, atol=1e-5)
