"""The test-time-register rows of Table 1 (zero-shot heads ``ttr`` and ``ttr_maskclip``) and Table 2 (probe model
``ttr``): on the tiny CLIP with an implant in neuron mode and an artifact built by ``detect_register_neurons``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from scene_support import scene_images
from ph_reg.evaluation.probes.run import probe_feature_streams, probe_models, run_probes, write_probe_stores
from ph_reg.evaluation.zeroshot import TTR_HEADS, ZERO_SHOT_HEADS, backbone_head, make_dense_fn
from ph_reg.evaluation.zeroshot.run import head_model, zero_shot_evaluation, zero_shot_run
from ph_reg.models import BackboneConfig, build_backbone, clean_copy
from ph_reg.models.test_time_registers import (TestTimeRegistersConfig, attach_from_artifact,
                                               detect_register_neurons, neuron_artifact, register_neurons_from_rows)
from ph_reg.reporting.tables import table2
from ph_reg.runtime import normalize

TINY_CLIP = "open_clip:ph-reg-tiny-ViT-16"   # 3 blocks, width 64: the neuron implant writes in block 1
IMG = 128                                     # an 8 x 8 grid: 3 planted tokens per image
BASE = BackboneConfig(arch=TINY_CLIP, img_size=IMG, implant={"mode": "neurons"})
PLAIN = {"ttr": "vanilla", "ttr_maskclip": "maskclip"}


def scenes(n: int, split: str, seed: int, size: int = IMG) -> torch.Tensor:
    return scene_images(n, split, seed, size)


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    return scenes(4, "val", 4)


@pytest.fixture(scope="module")
def artifact() -> dict:
    """The register-neuron artifact as the test_time_registers pipeline writes it (JSON round trip): detection on
    the implanted base model with the vanilla head, the outliers read at the last block, neurons below it."""
    detector = head_model("vanilla", BASE, None)
    images = normalize(scenes(6, "train", 3), detector.mean, detector.std)
    with torch.no_grad():
        norms = detector.forward_tokens(images, pre_norm=True).patch.norm(dim=-1)   # the last block's output
    planted = detector.planted_mask(images)
    assert norms[planted].min() > 2 * norms[~planted].max()
    config = TestTimeRegistersConfig(norm_threshold=float(norms[planted].min() + norms[~planted].max()) / 2,
                                     outlier_layer=-1, highest_layer=1, top_k=1, batch_size=4)
    neurons = detect_register_neurons(detector, images, config)
    assert [(n.layer, n.neuron) for n in neurons] == detector.implant.planted_neurons()
    return json.loads(json.dumps(neuron_artifact(neurons, config, images=len(images), head="vanilla")))


def empty_artifact() -> dict:
    return json.loads(json.dumps(neuron_artifact([], TestTimeRegistersConfig(num_registers=0))))


def dense(model, head: str, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return make_dense_fn(model, head)(normalize(images, model.mean, model.std))


# ---------------------------------------------------------------- zero-shot heads (Table 1)


def test_the_ttr_heads_are_registered():
    assert {"ttr", "ttr_maskclip"} <= set(ZERO_SHOT_HEADS) and TTR_HEADS == PLAIN
    assert backbone_head("ttr") == "vanilla" and backbone_head("ttr_maskclip") == "maskclip"


@pytest.mark.parametrize("head", ["ttr", "ttr_maskclip"])
def test_ttr_heads_clean_exactly_the_planted_tokens(head, artifact, held_out):
    """The ttr head is its plain head's model carrying the artifact's test-time registers; its dense features move
    away from the plain head's at the planted tokens (where the register neurons fire: every one of them changes
    more than any other token) onto the clean model's there, and stay near the plain head's elsewhere."""
    model, plain = head_model(head, BASE, None, artifact), head_model(PLAIN[head], BASE, None)
    assert model.head == PLAIN[head] and plain.test_time_registers is None
    assert model.test_time_registers.neurons == register_neurons_from_rows(artifact["neurons"])
    assert model.test_time_registers.config == TestTimeRegistersConfig.from_dict(artifact["intervention"])
    with_registers, without = dense(model, head, held_out), dense(plain, PLAIN[head], held_out)
    clean = dense(clean_copy(plain), PLAIN[head], held_out)
    planted = plain.planted_mask(normalize(held_out, plain.mean, plain.std))
    change = (with_registers - without).norm(dim=-1) / without.norm(dim=-1)
    assert change[planted].min() > 4 * change[~planted].max()
    cosine = {name: F.cosine_similarity(features, clean, dim=-1)
              for name, features in (("ttr", with_registers), ("plain", without))}
    assert cosine["ttr"][planted].min() > 0.99 and cosine["plain"][planted].mean() < 0.5   # measured: 0.9999, < 0.25


@pytest.mark.parametrize("head", ["ttr", "ttr_maskclip"])
def test_ttr_heads_with_nothing_to_move_are_the_plain_heads(head, held_out):
    model = head_model(head, BASE, None, empty_artifact())
    assert model.test_time_registers is not None
    assert torch.equal(dense(model, head, held_out), dense(head_model(PLAIN[head], BASE, None), PLAIN[head], held_out))


def test_ttr_heads_need_the_artifact(artifact):
    benchmark = {"dataset": {"type": "synthetic", "num_images": 1, "image_size": 64, "seed": 1, "split": "val"},
                 "classes": "dataset", "settings": {"short_side": 64, "crop": 64, "stride": 32}}
    with pytest.raises(ValueError, match=r"evaluation\.zero_shot\.heads names \['ttr_maskclip'\].*register_neurons"):
        zero_shot_evaluation(None, BASE, ["naclip", "ttr_maskclip"], {"synthetic": benchmark})
    with pytest.raises(ValueError, match=r"evaluation\.zero_shot\.heads names \['ttr'\]"):
        head_model("ttr", BASE, None)
    last_block = {**artifact, "neurons": [[2, 0, 1.0]]}   # the maskclip head replaces block 2: nothing to act on
    with pytest.raises(ValueError, match=r"head 'ttr_maskclip' \('maskclip' with test-time registers\).*block 2"):
        head_model("ttr_maskclip", BASE, None, last_block)
    assert head_model("ttr", BASE, None, last_block).test_time_registers is not None   # vanilla runs block 2


def test_the_harness_runs_the_ttr_heads_end_to_end(artifact):
    """Every head's mIoU and the figures from the harness; with nothing to move, each ttr head scores exactly its
    plain head."""
    base = BackboneConfig(arch=TINY_CLIP, img_size=64, implant={"mode": "neurons"})
    benchmark = {"dataset": {"type": "synthetic", "num_images": 2, "image_size": 64, "seed": 1, "split": "val"},
                 "classes": "dataset", "settings": {"short_side": 64, "crop": 48, "stride": 16, "batch_size": 4}}
    heads = ["vanilla", "maskclip", "ttr", "ttr_maskclip"]
    figure = {"benchmark": "synthetic", "images": 1, "query": "ball"}
    results, figures = zero_shot_run(None, base, heads, {"synthetic": benchmark}, figure, register_neurons=artifact)
    assert list(results) == heads and all(math.isfinite(r["synthetic"]) for r in results.values())
    assert list(figures) == ["zero_shot_00.png"]
    empty = zero_shot_evaluation(None, base, heads, {"synthetic": benchmark}, register_neurons=empty_artifact())
    assert empty["ttr"] == empty["vanilla"] == results["vanilla"]
    assert empty["ttr_maskclip"] == empty["maskclip"] == results["maskclip"]


# ---------------------------------------------------------------- probe model (Table 2)


def tiny_tasks() -> dict:
    spec = {"train": {"type": "synthetic", "num_images": 2, "image_size": 64, "seed": 0, "split": "train"},
            "val": {"type": "synthetic", "num_images": 2, "image_size": 64, "seed": 0, "split": "val"},
            "crop_size": 64, "stride": 32, "probe": {"iterations": 2, "batch_size": 2}}
    return {"segmentation": {"synthetic": spec}}


def test_probe_models_add_the_ttr_row(artifact):
    student = build_backbone(BackboneConfig(arch=TINY_CLIP, img_size=IMG, head="maskclip", num_registers=2))
    models = probe_models(student, BASE, "maskclip", ttr=True, register_neurons=artifact)
    assert list(models) == ["teacher", "student", "clean", "ttr"]
    teacher, ttr = models["teacher"], models["ttr"]
    assert ttr.config == teacher.config and teacher.test_time_registers is None and not ttr.training
    assert ttr.test_time_registers.neurons == register_neurons_from_rows(artifact["neurons"])
    assert all(torch.equal(a, b) for a, b in zip(ttr.state_dict().values(), teacher.state_dict().values()))
    assert list(probe_models(student, BASE, "maskclip")) == ["teacher", "student", "clean"]   # ttr off: as before
    with pytest.raises(ValueError, match=r"evaluation\.probes\.ttr is true.*register_neurons"):
        probe_models(student, BASE, "maskclip", ttr=True)
    with pytest.raises(ValueError, match=r"evaluation\.probes\.ttr \('maskclip' head.*block 2"):
        probe_models(student, BASE, "maskclip", ttr=True, register_neurons={**artifact, "neurons": [[2, 0, 1.0]]})


@pytest.mark.parametrize("mode", ["cached", "online"])
def test_the_ttr_probe_features_are_the_attached_models(mode, artifact, tmp_path):
    """The ttr feature stores hold the features of the teacher with the artifact attached by hand, bit for bit, and
    the probes report a ttr row beside the teacher's."""
    base = BackboneConfig(arch=TINY_CLIP, img_size=64, implant={"mode": "neurons"})
    models = probe_models(build_backbone(base), base, "maskclip", ttr=True, register_neurons=artifact)
    models = {name: models[name] for name in ("teacher", "ttr")}
    stores = write_probe_stores(probe_feature_streams(models, tiny_tasks(), seed=0, batch_size=2,
                                                      feature_dtype="float32", mode=mode), tmp_path / "stores")
    by_hand = build_backbone(models["teacher"].config).eval()
    by_hand.load_state_dict(models["teacher"].state_dict())
    attach_from_artifact(by_hand, artifact)
    reference = write_probe_stores(probe_feature_streams({"ttr": by_hand}, tiny_tasks(), seed=0, batch_size=2,
                                                         feature_dtype="float32", mode=mode), tmp_path / "reference")
    assert set(reference) <= set(stores)
    for key, store in reference.items():
        for i in range(len(store)):
            assert torch.equal(stores[key][i]["patch"], store[i]["patch"])
            assert not torch.equal(stores[key.replace("ttr/", "teacher/")][i]["patch"], store[i]["patch"])
    results = run_probes(stores, tiny_tasks(), seed=0, mode=mode, models=models)
    assert list(results) == ["teacher", "ttr"] and set(results["ttr"]) == set(results["teacher"])
    table, markdown = table2(results)
    assert "ttr" in table and "| ttr |" in markdown
