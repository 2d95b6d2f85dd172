"""The planted-artifact benchmark reads each source's dense output and pre-norm tokens from one forward (one TTA
pass for the target), bit for bit what two separate forwards give."""

from __future__ import annotations

import pytest
import torch

from ph_reg.evaluation.features import dense_features, dense_features_with_pre_norm
from ph_reg.evaluation.planted import benchmark_features, tta_features, tta_tokens
from ph_reg.method.tta import TTAConfig
from ph_reg.models import BackboneConfig, build_backbone, clean_copy
from ph_reg.runtime import normalize

TINY_CLIP = "open_clip:ph-reg-tiny-ViT-16"
TINY_TIMM = "timm:test_vit"
IMG = 64


def _model(arch: str, head: str, registers: int = 0):
    """A tiny model with the implant (its default settings)."""
    return build_backbone(BackboneConfig(arch=arch, img_size=IMG, head=head, implant={},
                                         num_registers=registers)).eval()


def _images(model, count: int = 3) -> torch.Tensor:
    pixels = torch.randint(0, 256, (count, 3, IMG, IMG), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return normalize(pixels, model.mean, model.std)


@pytest.mark.parametrize("arch, head, registers", [(TINY_CLIP, "naclip", 0), (TINY_CLIP, "maskclip", 2),
                                                   (TINY_CLIP, "vanilla", 0), (TINY_TIMM, "final_norm", 2)])
def test_forward_with_pre_norm_is_both_forwards_bit_for_bit(arch, head, registers):
    model = _model(arch, head, registers=registers)
    x = _images(model)
    with torch.no_grad():
        output, pre_norm = model.forward_with_pre_norm(x)
        expected_output, expected_pre = model(x), model.forward_tokens(x, pre_norm=True)
    for got, expected in ((output, expected_output), (pre_norm, expected_pre)):
        assert torch.equal(got.patch, expected.patch) and torch.equal(got.cls, expected.cls)
    assert not torch.equal(output.patch[..., :8], pre_norm.patch[..., :8])   # two different readings
    features = dense_features_with_pre_norm(model, x, batch_size=2)
    assert torch.equal(features[0], dense_features(model, x, batch_size=2))
    assert torch.equal(features[1], dense_features(model, x, batch_size=2, pre_norm=True))


def test_one_tta_pass_gives_both_denoised_readings_bit_for_bit():
    teacher = _model(TINY_CLIP, "naclip")
    x = _images(teacher, 5)
    tta = TTAConfig(n_views=4)
    both = tta_features(teacher, x, seed=3, tta=tta, batch_size=2, max_images_per_forward=5)
    assert torch.equal(both.output, tta_tokens(teacher, x, seed=3, tta=tta, batch_size=2, max_images_per_forward=5))
    assert torch.equal(both.pre_norm, tta_tokens(teacher, x, seed=3, tta=tta, pre_norm=True, batch_size=2,
                                                 max_images_per_forward=5))
    assert both.output.is_contiguous() and both.pre_norm.is_contiguous()


def test_benchmark_features_equal_the_separate_forwards():
    teacher = _model(TINY_CLIP, "naclip")
    student = _model(TINY_CLIP, "maskclip", registers=2)
    clean = clean_copy(teacher)
    x = _images(teacher, 3)
    tta = TTAConfig(n_views=3)
    features, reference = benchmark_features({"student": student}, clean, teacher, x, seed=0, tta=tta,
                                             reference_views=4)
    for name, model in (("clean", clean), ("teacher", teacher), ("student", student)):
        assert torch.equal(features[name].output, dense_features(model, x))
        assert torch.equal(features[name].pre_norm, dense_features(model, x, pre_norm=True))
    assert torch.equal(features["target"].output, tta_tokens(teacher, x, seed=0, tta=tta))
    assert torch.equal(features["target"].pre_norm, tta_tokens(teacher, x, seed=0, tta=tta, pre_norm=True))
    assert torch.equal(reference, tta_tokens(clean, x, seed=0, tta=TTAConfig(n_views=4)))
