"""Tests of the planted-artifact implant (ph_reg.models.implant) and its benchmark metrics (ph_reg.evaluation.planted)."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from matplotlib.figure import Figure

from ph_reg.method.tta import TTAConfig
from ph_reg.evaluation.planted import (SourceFeatures, add_probe_results, adjacent_mask, artifact_benchmark,
                                       benchmark_features, check_targets, detection_scores, per_image_outliers)
from ph_reg.evaluation.features import dense_features
from ph_reg.reporting.figures import benchmark_figure
from ph_reg.reporting.tables import benchmark_markdown
from ph_reg.evaluation.benchmarks import SyntheticScenes
from ph_reg.method.data import TargetPairs
from ph_reg.method.train import distill
from ph_reg.method.config import DistillConfig
from ph_reg.models.implant import ImplantConfig, patch_pixel_std
from ph_reg.models import DEFAULT_TRAINABLE, BackboneConfig, build_backbone, clean_copy, trainable_state_dict
from ph_reg.method.student import build_student_from_config, student_config
from ph_reg.runtime import normalize

TINY_CLIP = "open_clip:ph-reg-tiny-ViT-16"  # width 64, 3 blocks: the implant writes after block 1
TINY_TIMM = "timm:test_vit"  # width 64, 6 blocks: the implant writes after block 3
IMG = 128  # an 8 x 8 grid: round(0.04 * 64) = 3 planted tokens per image


def config(arch: str = TINY_CLIP, implant: dict | None = None, **kw) -> BackboneConfig:
    head = "naclip" if arch == TINY_CLIP else "final_norm"
    return BackboneConfig(**{"arch": arch, "img_size": IMG, "head": head, "implant": implant, **kw})


@pytest.fixture(scope="module")
def scenes() -> torch.Tensor:
    """uint8 (6, 3, IMG, IMG) synthetic rooms (walls and floors give low-information patches)."""
    dataset = SyntheticScenes(6, image_size=IMG, seed=3, split="train")
    return torch.stack([dataset[i].image for i in range(len(dataset))])


def inputs(model, pixels: torch.Tensor) -> torch.Tensor:
    return normalize(pixels, model.mean, model.std)


def half_uniform(n: int = 2, size: int = IMG) -> torch.Tensor:
    """Normalised-scale images whose left half is one flat colour and right half is noise."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=gen)
    images[..., : size // 2] = torch.tensor([0.3, -0.2, 0.5]).view(1, 3, 1, 1)
    return images


# ---------------------------------------------------------------- configuration


def test_config_round_trip_and_validation():
    cfg = config(implant={"strength": 4, "seed": 2}, num_registers=2)
    assert cfg.implant["strength"] == 4.0 and cfg.implant["fraction"] == ImplantConfig().fraction  # defaults filled
    again = BackboneConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.implant == cfg.implant
    clean = BackboneConfig(arch=TINY_CLIP)
    assert clean.implant is None and clean.to_dict()["implant"] is None
    with pytest.raises(ValueError, match="strenght"):
        config(implant={"strenght": 3})
    with pytest.raises(ValueError, match="fraction"):
        config(implant={"fraction": 0.0})
    with pytest.raises(ValueError, match="implant.block"):
        build_backbone(config(implant={"block": 2}))  # 3 blocks: block 2 is the last one, nothing reads it
    with pytest.raises(ValueError, match="no implant"):
        build_backbone(config()).planted_mask(torch.zeros(1, 3, IMG, IMG))


def test_student_config_rebuilds_the_implant():
    student = build_backbone(config(implant={"seed": 5}, head="maskclip", num_registers=2))
    names = student.set_trainable(DEFAULT_TRAINABLE)
    saved = json.loads(json.dumps(student_config(student.config, DEFAULT_TRAINABLE, names)))
    rebuilt = build_student_from_config(saved)
    assert rebuilt.config.implant == student.config.implant
    x = half_uniform(1)
    assert torch.equal(rebuilt.planted_mask(x), student.planted_mask(x))
    assert torch.equal(rebuilt.eval()(x).patch, student.eval()(x).patch)


# ---------------------------------------------------------------- the clean model is untouched


@pytest.mark.parametrize("arch", [TINY_CLIP, TINY_TIMM])
def test_clean_model_untouched(arch):
    clean, implanted = build_backbone(config(arch)), build_backbone(config(arch, implant={}))
    assert clean.implant is None
    # the implant adds no weight and changes none
    clean_state, implanted_state = clean.state_dict(), implanted.state_dict()
    assert clean_state.keys() == implanted_state.keys()
    assert all(torch.equal(clean_state[k], implanted_state[k]) for k in clean_state)
    # up to the implant's block the two models compute the same tokens; afterwards they differ
    blocks = clean.vit.transformer.resblocks if arch == TINY_CLIP else clean.vit.blocks
    k = implanted.implant.block
    seen = {}
    for name, model in (("clean", clean), ("implanted", implanted)):
        blk = (model.vit.transformer.resblocks if arch == TINY_CLIP else model.vit.blocks)[k]
        handle = blk.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, o))
        x = half_uniform(2)
        with torch.no_grad():
            out = model.eval()(x)
        seen[name + "_out"] = out.patch
        handle.remove()
    assert len(blocks) > k + 1
    assert torch.equal(seen["clean"], seen["implanted"])
    assert not torch.allclose(seen["clean_out"], seen["implanted_out"])
    # clean_copy: the implanted model's weights without the implant = the clean model
    copy = clean_copy(implanted)
    assert copy.implant is None and copy.config.implant is None and implanted.implant is not None
    with torch.no_grad():
        assert torch.equal(copy(x).patch, seen["clean_out"])
    # pre_norm=False is the dense output; the clean pre-norm tokens lead to it through the final norm
    with torch.no_grad():
        assert torch.equal(clean.forward_tokens(x, pre_norm=False).patch, clean(x).patch)
        if arch == TINY_TIMM:
            assert torch.allclose(clean.vit.norm(clean.forward_tokens(x).patch), clean(x).patch, atol=1e-6)


def test_implant_has_no_trainable_parameters_and_pickles():
    model = build_backbone(config(implant={}, head="maskclip", num_registers=2))
    clean = build_backbone(config(head="maskclip", num_registers=2))
    assert not any(name.startswith("implant") for name, _ in model.named_parameters())
    assert not any(name.startswith("implant") for name in model.state_dict())  # non-persistent buffers
    assert {name for name, _ in model.named_buffers()} >= {"implant.direction", "implant.frequencies",
                                                           "implant.phases"}
    names = model.set_trainable(DEFAULT_TRAINABLE)
    assert names == clean.set_trainable(DEFAULT_TRAINABLE)
    assert trainable_state_dict(model).keys() == trainable_state_dict(clean).keys()
    copy = pickle.loads(pickle.dumps(model))  # DDP spawn pickles the student
    x = half_uniform(1)
    assert torch.equal(copy.planted_mask(x), model.planted_mask(x))
    with torch.no_grad():
        assert torch.equal(copy.eval()(x).patch, model.eval()(x).patch)


# ---------------------------------------------------------------- the mechanism


def test_implant_is_deterministic(scenes):
    a, b = build_backbone(config(implant={})), build_backbone(config(implant={}))
    other = build_backbone(config(implant={"seed": 1}))
    x = inputs(a, scenes)
    with torch.no_grad():
        assert torch.equal(a(x).patch, b(x).patch)
        assert torch.equal(a.forward_tokens(x).patch, b.forward_tokens(x).patch)
    assert torch.equal(a.planted_mask(x), b.planted_mask(x))
    assert not torch.equal(a.planted_mask(x), other.planted_mask(x))
    assert not torch.equal(a.implant.direction, other.implant.direction)


@pytest.mark.parametrize("arch", [TINY_CLIP, TINY_TIMM])
def test_planted_outliers_on_synthetic_scenes(arch, scenes):
    model = build_backbone(config(arch, implant={}, num_registers=2)).eval()
    x = inputs(model, scenes)
    planted = model.planted_mask(x)
    assert planted.shape == (len(scenes), IMG // 16, IMG // 16)
    assert (planted.sum(dim=(1, 2)) == 3).all()  # round(0.04 * 64) per image
    # low-information candidates: planted patches are flatter than the typical patch of their image
    std = patch_pixel_std(x, model.patch_size)
    assert (std[planted].view(len(scenes), -1).mean(1) < std.flatten(1).median(1).values).all()
    # the norm rule on the pre-norm tokens finds every planted token; its other detections are no more than the
    # clean model's own (a random ViT has a few natural norm outliers), and none of those is a planted token
    with torch.no_grad():
        tokens = model.forward_tokens(x).patch
        clean_tokens = build_backbone(config(arch, num_registers=2)).eval().forward_tokens(x).patch
    detected, clean_detected = per_image_outliers(tokens), per_image_outliers(clean_tokens)
    assert detection_scores(detected, planted)["recall"] == 1.0
    assert (detected & ~planted).sum() <= clean_detected.sum() < planted.sum() / 2
    assert not (clean_detected & planted).any()
    norms = tokens.norm(dim=-1)
    assert (norms[planted] > 3 * norms.flatten(1).median(1).values.repeat_interleave(3)).all()


def test_candidates_are_uniform_patches_and_position_matters():
    model = build_backbone(config(implant={}))
    x = half_uniform(2)
    planted = model.planted_mask(x)
    assert planted[..., : planted.shape[-1] // 2].all(dim=0).sum() == 3  # all winners in the flat half, both images
    # not shift-equivariant: moving the content by one patch does not move the planted tokens with it
    flat = torch.full((1, 3, IMG, IMG), 0.1)
    flat[..., :, : IMG // 2] = -0.4  # two flat halves: the position field alone decides
    shifted = torch.roll(flat, shifts=16, dims=-1)
    assert not torch.equal(torch.roll(model.planted_mask(flat), 1, dims=-1), model.planted_mask(shifted))
    # the field is defined over normalised coordinates: any grid works
    assert model.planted_mask(torch.zeros(1, 3, 2 * IMG, IMG)).shape == (1, 16, 8)


def test_later_blocks_read_the_planted_tokens():
    """Attention sinks: tokens next to a planted token are disturbed, far more than without the sink."""
    x = half_uniform(4)
    clean = build_backbone(config(TINY_TIMM)).eval()  # 6 blocks: blocks 4 and 5 read the planted tokens
    damage = {}
    with torch.no_grad():
        ref = clean.forward_tokens(x).patch
        for sink in (None, 0.0):
            model = build_backbone(config(TINY_TIMM, implant={"sink_logit": sink})).eval()
            planted = model.planted_mask(x)
            cos = torch.nn.functional.cosine_similarity(model.forward_tokens(x).patch, ref, dim=-1)
            far = ~planted & ~adjacent_mask(planted)
            damage[sink] = (1 - cos[adjacent_mask(planted)].mean(), 1 - cos[far].mean())
    # a random ViT's attention branch is small next to its residual stream, so the damage is small, but it is
    # there: the sink disturbs the neighbours far more than no sink does, and more than the far tokens
    assert damage[None][0] > 5 * damage[0.0][0]
    assert damage[None][0] > 2 * damage[None][1]


# ---------------------------------------------------------------- TTA and distillation remove the artifacts


@pytest.fixture(scope="module")
def tiny_benchmark(scenes):
    clean = build_backbone(config()).eval()
    teacher = build_backbone(config(implant={})).eval()
    x = inputs(teacher, scenes)
    features, reference = benchmark_features({}, clean, teacher, x, seed=0, tta=TTAConfig(n_views=6))
    return clean, teacher, x, features, reference, teacher.planted_mask(x)


def test_tta_reduces_the_outlier_rate(tiny_benchmark):
    _, _, _, features, reference, planted = tiny_benchmark
    report = artifact_benchmark(features, reference, planted)
    teacher, target = report["sources"]["teacher"], report["sources"]["target"]
    assert teacher["norm"]["recall"] == 1.0
    assert teacher["direction"]["rate"] > 0 and teacher["direction"]["precision"] >= 0.9  # artifacts at the output
    assert target["direction"]["rate"] < 0.5 * teacher["direction"]["rate"]
    assert target["cosine"]["planted"] > teacher["cosine"]["planted"] + 0.2
    assert target["cosine"]["all"] > teacher["cosine"]["all"]


def test_short_distillation_lowers_the_students_outlier_rate(tiny_benchmark, scenes):
    clean, teacher, x, features, reference, planted = tiny_benchmark
    student = build_backbone(config(implant={}, head="maskclip", num_registers=2))
    student.set_trainable(DEFAULT_TRAINABLE)
    before = dense_features(student, x)
    targets = features["target"].output
    dataset = TargetPairs([{"image": im} for im in scenes], [{"target": t} for t in targets], range(len(scenes)),
                          student.mean, student.std)
    distill(student, dataset, DistillConfig(epochs=30, batch_size=6, lr=3e-3, lr_end=1e-3, checkpoint_every=30),
            seed=0, progress=False)
    after = SourceFeatures(dense_features(student, x), dense_features(student, x, pre_norm=True))
    report = artifact_benchmark({**features, "untrained": SourceFeatures(before, before), "student": after},
                                reference, planted)
    s, t, u = (report["sources"][name] for name in ("student", "teacher", "untrained"))
    assert u["direction"]["rate"] >= t["direction"]["rate"]  # the copy starts with the teacher's artifacts
    assert s["direction"]["rate"] < 0.5 * t["direction"]["rate"]
    assert s["cosine"]["planted"] > t["cosine"]["planted"] + 0.2
    assert s["cosine"]["all"] > u["cosine"]["all"]


# ---------------------------------------------------------------- metrics and report


def test_detection_scores_and_adjacent_ring():
    planted = torch.zeros(1, 5, 5, dtype=torch.bool)
    planted[0, 2, 2] = True
    ring = adjacent_mask(planted)
    assert ring.sum() == 8 and not ring[0, 2, 2] and ring[0, 1, 1] and not ring[0, 0, 0]
    detected = planted.clone()
    detected[0, 0, 0] = True
    assert detection_scores(detected, planted) == {"rate": pytest.approx(2 / 25), "precision": 0.5, "recall": 1.0}
    assert math.isnan(detection_scores(torch.zeros_like(planted), planted)["precision"])


def test_report_markdown_targets_probes_and_figure(tiny_benchmark, scenes):
    _, _, _, features, reference, planted = tiny_benchmark
    report = artifact_benchmark({**features, "student": features["target"]}, reference, planted)
    json.dumps(report)
    add_probe_results(report, {"teacher": {"synthetic/mIoU": 10.0}, "student": {"synthetic/mIoU": 12.0}})
    with pytest.raises(ValueError, match="nobody"):
        add_probe_results(report, {"nobody": {"synthetic/mIoU": 1.0}})
    targets = check_targets(report)
    assert targets["teacher planted tokens detected (norm rule recall)"]["met"] is True
    assert targets["student: probe synthetic/mIoU at least the teacher's"]["met"] is True
    text = benchmark_markdown(report, targets)
    assert "| teacher |" in text and "| student |" in text and "synthetic/mIoU" in text
    figure = benchmark_figure(scenes, {k: features[k] for k in ("teacher", "target")}, planted, reference, max_images=2)
    assert isinstance(figure, Figure) and len(figure.axes) == 2 * 5 + 4  # panels + one colorbar per column
