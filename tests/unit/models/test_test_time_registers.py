"""Tests of test-time registers (ph_reg.models.test_time_registers) and the implant's neuron mode (ph_reg.models.implant):
detection, the intervention on both families, and the planted benchmark's direction rule."""

from __future__ import annotations

import json

import pytest
import torch

from scene_support import scene_images
from ph_reg.config import ConfigError
from ph_reg.evaluation.planted import artifact_benchmark, benchmark_features
from ph_reg.method.tta import TTAConfig
from ph_reg.models import BackboneConfig, build_backbone, clean_copy
from ph_reg.models.implant import ImplantConfig
from ph_reg.models.test_time_registers import (RegisterNeuron, TestTimeRegistersConfig, attach_from_artifact,
                                               attach_test_time_registers, detach_test_time_registers,
                                               detect_register_neurons, neuron_artifact, register_neurons_from_rows)
from ph_reg.runtime import normalize

TINY_CLIP = "open_clip:ph-reg-tiny-ViT-16"  # width 64, 3 blocks: the implant writes in block 1
TINY_TIMM = "timm:test_vit"  # width 64, 6 blocks: the implant writes in block 3
IMG = 128  # an 8 x 8 grid: 3 planted tokens per image
#: (arch, head, outlier layer): the CLIP dense heads replace the last block, so its outliers are read one block before
FAMILIES = [(TINY_CLIP, "naclip", -2), (TINY_CLIP, "vanilla", -1), (TINY_TIMM, "final_norm", -1)]


def scenes(n: int, split: str, seed: int) -> torch.Tensor:
    return scene_images(n, split, seed, IMG)


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return scenes(6, "train", 3)


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    return scenes(4, "val", 4)


def neuron_model(arch: str, head: str, **kw) -> torch.nn.Module:
    return build_backbone(BackboneConfig(arch=arch, img_size=IMG, head=head, implant={"mode": "neurons"}, **kw)).eval()


def threshold_between(model, images: torch.Tensor, layer: int) -> float:
    """A norm threshold halfway between the planted tokens' and the others' norms at block ``layer``."""
    outputs = []
    block = model.mlp_site(layer % model._blocks_prefix()[1]).block
    handle = block.register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        model.forward_tokens(images, pre_norm=True)
    handle.remove()
    _, patches = model.token_layout(outputs[0].shape[1])
    norms = outputs[0][:, patches].norm(dim=-1).reshape(images.shape[0], *model.planted_mask(images).shape[1:])
    mask = model.planted_mask(images)
    assert norms[mask].min() > 2 * norms[~mask].max()  # the planted units write a massive activation
    return float(norms[mask].min() + norms[~mask].max()) / 2


def block_output(model, images: torch.Tensor, layer: int) -> torch.Tensor:
    outputs = []
    handle = model.mlp_site(layer % model._blocks_prefix()[1]).block.register_forward_hook(
        lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        model.forward_tokens(images, pre_norm=True)
    handle.remove()
    return outputs[0]


# ---------------------------------------------------------------- configuration


def test_config_defaults_and_errors():
    config = TestTimeRegistersConfig.from_dict({})
    assert (config.norm_threshold, config.outlier_layer, config.num_images, config.top_k) == (30.0, -1, 500, 10)
    assert config.num_registers == 1 and config.patch_values == "zero"
    with pytest.raises(ConfigError, match="test_time_registers.top_kk"):
        TestTimeRegistersConfig.from_dict({"top_kk": 3})
    with pytest.raises(ConfigError, match="test_time_registers.patch_values"):
        TestTimeRegistersConfig.from_dict({"patch_values": "lowest"})
    with pytest.raises(ConfigError, match="highest_layer"):
        TestTimeRegistersConfig.from_dict({"highest_layer": 1, "lowest_layer": 2})
    first, second = register_neurons_from_rows(json.loads(json.dumps([[1, 2, 0.5], [0, 3]])))
    assert first == RegisterNeuron(1, 2, 0.5) and second[:2] == (0, 3) and second.score != second.score  # NaN
    with pytest.raises(ValueError, match="register neuron 0"):
        register_neurons_from_rows([[1.5, 2]])


def test_implant_neuron_mode_config():
    assert "mode" not in ImplantConfig().to_dict()  # the add mode serialises as before the neuron mode existed
    assert ImplantConfig.from_dict({"mode": "neurons", "neurons": 2}).to_dict()["neurons"] == 2
    with pytest.raises(ValueError, match="implant.mode"):
        ImplantConfig(mode="write")
    with pytest.raises(ValueError, match="implant.neurons"):
        ImplantConfig(neurons=2)  # add mode has no neurons


# ---------------------------------------------------------------- detection and intervention


@pytest.mark.parametrize("arch, head, layer", FAMILIES)
def test_detection_ranks_the_planted_neurons_first(arch, head, layer, calibration):
    model = neuron_model(arch, head)
    images = normalize(calibration, model.mean, model.std)
    config = TestTimeRegistersConfig(norm_threshold=threshold_between(model, images, layer), outlier_layer=layer,
                                     top_k=4, batch_size=4)
    found = detect_register_neurons(model, images, config)
    assert [(n.layer, n.neuron) for n in found[:1]] == model.implant.planted_neurons()
    assert len(found) == 4 and found[0].score > 5 * found[1].score
    assert register_neurons_from_rows(json.loads(json.dumps(found))) == found
    # the same as batches from an iterable, and the layer bounds apply
    assert detect_register_neurons(model, iter(images.split(config.batch_size)), config) == found
    bounded = detect_register_neurons(model, images, {**vars(config), "highest_layer": model.implant.block - 1})
    assert all(n.layer < model.implant.block for n in bounded)


@pytest.mark.parametrize("arch, head, layer", FAMILIES)
def test_intervention_moves_the_high_norm_token_to_the_register(arch, head, layer, calibration):
    model = neuron_model(arch, head)
    images = normalize(calibration, model.mean, model.std)
    planted = model.planted_mask(images)
    before = block_output(model, images, layer)
    _, patches = model.token_layout(before.shape[1])
    plain_norms = before[:, patches].norm(dim=-1).flatten(1)
    attach_test_time_registers(model, model.implant.planted_neurons(), {"num_registers": 1})
    after = block_output(model, images, layer)
    extra, patches = model.token_layout(after.shape[1])
    patch_norms, extra_norms = after[:, patches].norm(dim=-1), after[:, extra].norm(dim=-1)
    typical = plain_norms[~planted.flatten(1)].max()
    assert patch_norms.max() < 1.2 * typical  # the planted patches are ordinary now
    assert extra_norms.min() > 0.8 * plain_norms[planted.flatten(1)].min()  # the register holds the massive one
    pre_norm = model.forward_tokens(images, pre_norm=True).patch
    assert pre_norm.shape[1:3] == planted.shape[1:]  # the register never reaches the dense output


@pytest.mark.parametrize("arch, head", [(TINY_CLIP, "naclip"), (TINY_CLIP, "maskclip"), (TINY_CLIP, "sclip"),
                                        (TINY_TIMM, "final_norm")])
@pytest.mark.parametrize("registers", [0, 2])
def test_extra_tokens_without_neurons(arch, head, registers, calibration):
    """r = 0: the plain model bit for bit. r > 0 and no neurons: exactly the model whose token sequence carries r
    zero tokens at the same place, i.e. the same weights with r post-hoc registers set to zero; and not the plain
    model (the extra tokens take part in attention)."""
    config = BackboneConfig(arch=arch, img_size=IMG, head=head, num_registers=registers)
    model = build_backbone(config).eval()
    images = normalize(calibration[:2], model.mean, model.std)
    with torch.no_grad():
        plain = model(images)
        attach_test_time_registers(model, [], {"num_registers": 0})
        assert torch.equal(model(images).patch, plain.patch) and torch.equal(model(images).cls, plain.cls)
        detach_test_time_registers(model)
        attach_test_time_registers(model, [], {"num_registers": 3})
        with_extra = model(images)
    zeros = torch.zeros(3, model.vit.embed_dim if arch == TINY_TIMM else model.vit.transformer.width)
    # open_clip [CLS, patches, registers, extra]; timm [extra, registers, CLS, patches]
    joined = [model.registers, zeros] if registers and arch == TINY_CLIP else (
        [zeros, model.registers] if registers else [zeros])
    reference = build_backbone(BackboneConfig(arch=arch, img_size=IMG, head=head, num_registers=registers + 3)).eval()
    with torch.no_grad():
        reference.registers.copy_(torch.cat(joined))
        expected = reference(images)
    assert torch.equal(with_extra.patch, expected.patch) and torch.equal(with_extra.cls, expected.cls)
    assert not torch.equal(with_extra.patch, plain.patch)


@pytest.mark.parametrize("values", ["zero", "mean", "only_outliers", "same"])
@pytest.mark.parametrize("arch, head", [(TINY_CLIP, "maskclip"), (TINY_TIMM, "final_norm")])
def test_intervention_is_deterministic_and_leaves_the_weights(arch, head, values, calibration):
    model = build_backbone(BackboneConfig(arch=arch, img_size=IMG, head=head, num_registers=2)).eval()
    images = normalize(calibration[:2], model.mean, model.std)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(images).patch
    neurons = [(0, 5), (1, 7), (1, 9)]
    attach_test_time_registers(model, neurons, {"num_registers": 2, "patch_values": values, "max_over": "layer"})
    with pytest.raises(ValueError, match="already carries"):
        attach_test_time_registers(model, neurons)
    with torch.no_grad():
        first, second = model(images).patch, model(images).patch
    assert torch.equal(first, second) and not torch.equal(first, plain)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and state.keys() == \
        model.state_dict().keys()
    detach_test_time_registers(model)
    with torch.no_grad():
        assert torch.equal(model(images).patch, plain)


def test_intervention_values_at_the_hook():
    """The activations the output projection reads: register at the signed max per neuron, patches per mode."""
    model = build_backbone(BackboneConfig(arch=TINY_TIMM, img_size=IMG)).eval()
    seen = []
    site = model.mlp_site(2)
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    handle = site.proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        for values in ("zero", "mean", "same"):
            attach_test_time_registers(model, [(2, 4), (2, 11)], {"patch_values": values})
            model(images)
            detach_test_time_registers(model)
    handle.remove()
    for hidden, values in zip(seen, ("zero", "mean", "same")):
        extra, patches = slice(0, 1), slice(2, hidden.shape[1])  # [extra, CLS, patches]
        acts = hidden[:, :, [4, 11]]
        assert acts[:, patches].abs().max() > 0 if values != "zero" else torch.equal(acts[:, patches],
                                                                                    torch.zeros_like(acts[:, patches]))
        if values == "mean":
            assert torch.allclose(acts[:, patches], acts[:, patches].mean(dim=1, keepdim=True).expand_as(
                acts[:, patches]))
        peak = acts[:, extra].squeeze(1)  # (B, 2): the register's value is the largest-magnitude activation
        if values == "same":
            assert torch.all(peak.abs() >= acts.abs().amax(dim=1) - 1e-6)


def test_neurons_the_head_never_runs_and_layers_out_of_range():
    model = build_backbone(BackboneConfig(arch=TINY_CLIP, img_size=IMG, head="maskclip"))
    with pytest.raises(ValueError, match="replaces block 2"):
        attach_test_time_registers(model, [(2, 0)])
    with pytest.raises(ValueError, match="256 hidden units"):
        attach_test_time_registers(model, [(0, 256)])
    with pytest.raises(ValueError, match="outlier_layer -1 is block 2"):
        detect_register_neurons(model, torch.zeros(1, 3, IMG, IMG), {"norm_threshold": 0})
    with pytest.raises(ValueError, match="no calibration image"):
        detect_register_neurons(model, torch.zeros(1, 3, IMG, IMG), {"norm_threshold": 1e9, "outlier_layer": 1})
    sclip = build_backbone(BackboneConfig(arch=TINY_CLIP, img_size=IMG, head="sclip"))
    attach_test_time_registers(sclip, [(2, 0)])  # SCLIP keeps the last block's MLP


# ---------------------------------------------------------------- the implant's neuron mode


@pytest.mark.parametrize("arch, head", [(TINY_CLIP, "naclip"), (TINY_TIMM, "final_norm")])
def test_neuron_mode_keeps_the_ground_truth(arch, head, calibration):
    add = build_backbone(BackboneConfig(arch=arch, img_size=IMG, head=head, implant={})).eval()
    neurons = neuron_model(arch, head)
    images = normalize(calibration[:3], add.mean, add.std)
    assert torch.equal(add.planted_mask(images), neurons.planted_mask(images))
    clean_add, clean_neurons = clean_copy(add), clean_copy(neurons)
    with torch.no_grad():
        assert torch.equal(clean_add(images).patch, clean_neurons(images).patch)
        plain = build_backbone(BackboneConfig(arch=arch, img_size=IMG, head=head)).eval()
        assert torch.equal(clean_neurons(images).patch, plain(images).patch)
    # without an intervention the read equals the add mode's (the sink weights are the planted mask)
    mask = add.planted_mask(images)
    num_tokens, start = 1 + 64 + 2, 1
    sinks = torch.zeros(3, num_tokens)
    sinks[:, start:start + 64] = mask.flatten(1).float()
    assert torch.equal(neurons.implant.attention_bias(mask, num_tokens, start, sinks=sinks),
                       add.implant.attention_bias(mask, num_tokens, start))


def test_neuron_mode_trains_through_the_implant_block(calibration):
    model = neuron_model(TINY_TIMM, "final_norm", num_registers=2)
    model.set_trainable(["registers", "pos_embed"])
    model.vit.set_grad_checkpointing(True)
    images = normalize(calibration[:2], model.mean, model.std)
    model(images).patch.square().mean().backward()
    assert model.registers.grad is not None and model.registers.grad.abs().sum() > 0


@pytest.mark.parametrize("arch, head, layer", [FAMILIES[0], FAMILIES[2]])
def test_test_time_registers_lower_the_outlier_rate(arch, head, layer, calibration, held_out):
    """The planted benchmark in neuron mode: the neurons detected on calibration images, the direction rule (cosine
    to the TTA-denoised clean model < 0.5) on held-out crops."""
    teacher, with_registers = neuron_model(arch, head), neuron_model(arch, head)
    calib = normalize(calibration, teacher.mean, teacher.std)
    config = TestTimeRegistersConfig(norm_threshold=threshold_between(teacher, calib, layer), outlier_layer=layer,
                                     top_k=1)
    found = detect_register_neurons(teacher, calib, config)
    assert [(n.layer, n.neuron) for n in found] == teacher.implant.planted_neurons()
    attach_test_time_registers(with_registers, found, config)
    images = normalize(held_out, teacher.mean, teacher.std)
    features, reference = benchmark_features({"ttr": with_registers}, clean_copy(teacher), teacher, images, seed=0,
                                             tta=TTAConfig(n_views=2))
    report = artifact_benchmark(features, reference, teacher.planted_mask(images))
    teacher_rate = report["sources"]["teacher"]["direction"]["rate"]
    assert teacher_rate > 0.02
    assert report["sources"]["ttr"]["direction"]["rate"] <= 0.2 * teacher_rate
    assert report["sources"]["ttr"]["cosine"]["planted"] > report["sources"]["teacher"]["cosine"]["planted"] + 0.3


def test_neuron_artifact_round_trip_through_json(calibration):
    """The detection artifact carries the neurons and the whole intervention config: a model attached from its JSON
    form computes exactly what the same model attached by hand does; malformed artifacts are refused by name."""
    config = TestTimeRegistersConfig(num_registers=2, patch_values="mean", max_over="layer")
    neurons = [RegisterNeuron(1, 5, 2.5), RegisterNeuron(0, 3, 1.0)]
    artifact = json.loads(json.dumps(neuron_artifact(neurons, config, images=6, head="vanilla")))
    assert artifact["neurons"] == [[1, 5, 2.5], [0, 3, 1.0]] and artifact["detection"]["images"] == 6
    model = build_backbone(BackboneConfig(arch=TINY_TIMM, img_size=IMG, head="final_norm")).eval()
    images = normalize(calibration[:2], model.mean, model.std)
    with torch.no_grad():
        attach_test_time_registers(model, neurons, config)
        by_hand = model(images).patch
        detach_test_time_registers(model)
        attach_from_artifact(model, artifact)
        assert model.test_time_registers.config == config
        assert torch.equal(model(images).patch, by_hand)
        detach_test_time_registers(model)
    with pytest.raises(ValueError, match="my_neurons: expected a register-neuron artifact"):
        attach_from_artifact(model, {"neurons": []}, where="my_neurons")
    with pytest.raises(ValueError, match="my_neurons.*patch_values"):
        attach_from_artifact(model, {**artifact, "intervention": {"patch_values": "bogus"}}, where="my_neurons")
