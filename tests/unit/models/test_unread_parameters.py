"""The parameters a head never reads: listed by DenseViT.unread_parameters, kept frozen by set_trainable, so that
DDP runs with find_unused_parameters=False (issue 15)."""

import pytest
import torch

from ph_reg.models import DEFAULT_TRAINABLE, build_backbone
from ph_reg.models.backbone import HEADS

TINY = {"open_clip": "open_clip:ph-reg-tiny-ViT-16", "timm": "timm:test_vit"}
CASES = [(family, head) for family in TINY for head in HEADS[family]]


def _model(family, head, **kw):
    return build_backbone({"arch": TINY[family], "img_size": 32, "num_registers": 2, "head": head, **kw})


def _no_gradient(model):
    """The parameters whose .grad stays None after a loss on the dense output, every parameter unlocked."""
    model.requires_grad_(True)
    model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))).patch.float().sum().backward()
    return sorted(name for name, p in model.named_parameters() if p.grad is None)


@pytest.mark.parametrize("family, head", CASES)
def test_unread_parameters_are_exactly_those_without_a_gradient(family, head):
    model = _model(family, head)
    assert model.unread_parameters() == _no_gradient(_model(family, head))
    if head in ("maskclip", "clearclip", "naclip"):  # the last block's MLP branch is skipped
        assert any(".mlp." in name for name in model.unread_parameters())


def test_unread_parameters_with_the_neuron_implant():
    model = _model("open_clip", "maskclip", implant={"mode": "neurons"})
    assert model.unread_parameters() == _no_gradient(_model("open_clip", "maskclip", implant={"mode": "neurons"}))


@pytest.mark.parametrize("family, head", CASES)
def test_set_trainable_keeps_unread_parameters_frozen(family, head):
    model = _model(family, head)
    names = model.set_trainable(DEFAULT_TRAINABLE)
    unread = set(model.unread_parameters())
    assert names and not unread & set(names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    # so nothing trainable is left without a gradient: DDP needs no search for unused parameters
    model.zero_grad(set_to_none=True)
    model(torch.randn(2, 3, 32, 32)).patch.float().sum().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_a_group_of_unread_parameters_only_is_refused():
    model = _model("open_clip", "maskclip")
    with pytest.raises(ValueError, match="never reads"):
        model.set_trainable(["vit.transformer.resblocks.2.mlp.*"])
    # a group that also matches read parameters unlocks those
    names = model.set_trainable(["vit.transformer.resblocks.2.*"])
    assert "vit.transformer.resblocks.2.attn.in_proj_weight" in names
    assert not any(".mlp." in name or ".ln_2." in name for name in names)


def test_unused_trainable_finds_none_for_the_maskclip_student():
    from ph_reg.method.data import TrainItem
    from ph_reg.method.train import unused_trainable

    student = _model("open_clip", "maskclip")
    student.set_trainable(DEFAULT_TRAINABLE)
    dataset = {(0, 0): TrainItem(torch.randn(3, 32, 32), target=torch.zeros(2, 2, 32))}
    assert unused_trainable(student, dataset) == []  # so distill runs DDP with find_unused_parameters=False
