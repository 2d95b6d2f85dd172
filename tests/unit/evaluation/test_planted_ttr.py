"""The test-time-registers rows of the planted-artifact benchmark (ph_reg.evaluation.planted_ttr): ``ttr`` (the
implanted teacher with test-time registers, through the benchmark's own path) and ``both`` (a PH-Reg student
distilled from that teacher's denoised targets through the real ``distill``).

The per-model checks (detection ranks the planted units first, the intervention lowers the direction-rule rate) are
in tests/unit/models/test_test_time_registers.py; here the same claims are read off the benchmark's report."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from scene_support import scene_images
from ph_reg.config import ConfigError
from ph_reg.evaluation.planted import planted_artifact_evaluation
from ph_reg.evaluation.planted_ttr import (both_skip_reason, both_student, distill_from_ttr_teacher, neuron_summary, ttr_targets,
                                          ttr_teacher)
from ph_reg.method.config import DistillConfig, StudentDistillationConfig
from ph_reg.method.student import build_student_from_config, student_config
from ph_reg.method.targets import TeacherDenoisingConfig
from ph_reg.method.tta import TTAConfig
from ph_reg.models import BackboneConfig, build_backbone, clean_copy, trainable_state_dict
from ph_reg.models.test_time_registers import TestTimeRegistersConfig, detect_register_neurons, neuron_artifact
from ph_reg.params import validate_parameters
from ph_reg.runtime import normalize

TINY_CLIP = "open_clip:ph-reg-tiny-ViT-16"   # 3 blocks: the implant writes in block 1, NACLIP replaces block 2
IMG = 128                                    # an 8 x 8 grid: 3 planted tokens per image
OUTLIER_LAYER = -2                           # the NACLIP head replaces the last block
DENOISING = TeacherDenoisingConfig(tta=TTAConfig(n_views=2), batch_size=2, max_images_per_forward=4)


def scenes(n: int, split: str, seed: int) -> torch.Tensor:
    return scene_images(n, split, seed, IMG)


def backbone(head: str, **kw) -> BackboneConfig:
    return BackboneConfig(arch=TINY_CLIP, img_size=IMG, head=head, implant={"mode": "neurons"}, **kw)


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return build_backbone(backbone("naclip")).eval()


@pytest.fixture(scope="module")
def artifact(teacher) -> dict:
    """The register_neurons artifact of the teacher, detected on calibration crops with a norm threshold halfway
    between the planted tokens' and the others' norms at the outlier layer."""
    calib = normalize(scenes(6, "train", 3), teacher.mean, teacher.std)
    outputs = []
    block = teacher.mlp_site(OUTLIER_LAYER % 3).block
    handle = block.register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        teacher.forward_tokens(calib, pre_norm=True)
    handle.remove()
    _, patches = teacher.token_layout(outputs[0].shape[1])
    norms = outputs[0][:, patches].norm(dim=-1).reshape(calib.shape[0], IMG // 16, IMG // 16)
    mask = teacher.planted_mask(calib)
    config = TestTimeRegistersConfig(norm_threshold=float(norms[mask].min() + norms[~mask].max()) / 2,
                                     outlier_layer=OUTLIER_LAYER, top_k=2)
    neurons = detect_register_neurons(teacher, calib, config)
    return neuron_artifact(neurons, config, images=calib.shape[0], head="naclip")


def the_student_config() -> dict:
    config = backbone("maskclip", num_registers=2, student=True)
    return student_config(config, ["registers", "last_block"], [], teacher=backbone("naclip"))


def recipe(**training) -> StudentDistillationConfig:
    return StudentDistillationConfig(num_registers=2, trainable=("registers", "last_block"), training=DistillConfig(
        epochs=2, batch_size=2, accelerator="cpu", precision="32-true", **training))


def test_the_planted_benchmark_reports_the_ttr_row(teacher, artifact):
    """The planted benchmark in neuron mode: the implant's planted units are found by detection, and the teacher
    with test-time registers (the ttr row, measured as every other source) has far fewer damaged tokens (direction
    rule) on held-out crops, its planted tokens no longer massive in the residual stream."""
    ttr = ttr_teacher(teacher, artifact)
    assert teacher.test_time_registers is None and ttr.test_time_registers is not None   # the teacher stays plain
    student = build_student_from_config(the_student_config()).eval()
    details = {"test_time_registers": neuron_summary(teacher, artifact), "rows_skipped": {"both": "not today"}}
    report, markdown, figure = planted_artifact_evaluation(
        teacher, student, scenes(4, "val", 4), seed=0, tta=TTAConfig(n_views=2), batch_size=2, figure_images=2,
        extra={"ttr": ttr}, details=details)
    assert list(report["sources"]) == ["clean", "teacher", "target", "student", "ttr"]
    summary = report["test_time_registers"]
    assert summary["planted_found"] == len(summary["planted_neurons"]) == 1
    assert [summary["neurons"][0][:2]] == summary["planted_neurons"]   # ranked first
    teacher_row, ttr_row = report["sources"]["teacher"], report["sources"]["ttr"]
    assert teacher_row["direction"]["rate"] > 0.02
    assert ttr_row["direction"]["rate"] <= 0.2 * teacher_row["direction"]["rate"]
    assert ttr_row["cosine"]["planted"] > teacher_row["cosine"]["planted"] + 0.3
    assert ttr_row["norm"]["planted_norm_ratio"] < 0.5 * teacher_row["norm"]["planted_norm_ratio"]
    assert report["targets"]["ttr: fewer outlier tokens than the teacher (direction rule, share removed)"]["met"]
    assert "| ttr |" in markdown and "of which the detection found 1" in markdown
    assert "Row `both` skipped: not today." in markdown
    assert any("ttr" in ax.get_title() for ax in figure.axes)
    plain, _, _ = planted_artifact_evaluation(teacher, student, scenes(4, "val", 4), seed=0, tta=TTAConfig(n_views=2),
                                              batch_size=2, figure_images=2)
    before = {name: report["sources"][name] for name in plain["sources"]}   # the rows before, as they were
    assert json.dumps(before, sort_keys=True) == json.dumps(plain["sources"], sort_keys=True)   # (NaN precisions)


def test_the_benchmark_refuses_extra_rows_that_reuse_a_name(teacher, artifact):
    student = build_student_from_config(the_student_config()).eval()
    with pytest.raises(ValueError, match="must not reuse the names"):
        planted_artifact_evaluation(teacher, student, scenes(1, "val", 4), seed=0, tta=TTAConfig(n_views=1),
                                    extra={"target": student})


def test_both_trains_through_distill_and_is_deterministic(teacher, artifact):
    """The both row: the denoised targets of the ttr teacher over the training crops, then the real distill with the
    recipe; the same seed gives the same student bit for bit, and the targets are not the plain teacher's."""
    ttr = ttr_teacher(teacher, artifact)
    images = [{"image": image} for image in scenes(4, "train", 5)]
    crops = [[0], [1], [2], [3]]
    students = [both_student(the_student_config(), ttr, images, crops, recipe(), DENOISING, seed=0, device="cpu")
                for _ in range(2)]
    first, second = (trainable_state_dict(s) for s in students)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert not students[0].training
    fresh = trainable_state_dict(build_student_from_config(the_student_config()))
    assert any(not torch.equal(first[k], fresh[k]) for k in first)   # distill moved the weights
    # the targets are the ttr teacher's: closer to the clean model than the plain teacher's on the planted tokens
    with_ttr = torch.stack([t["target"] for t in ttr_targets(ttr, images, [0, 1, 2, 3], 0, DENOISING)])
    plain = torch.stack([t["target"] for t in ttr_targets(teacher, images, [0, 1, 2, 3], 0, DENOISING)])
    clean = torch.stack([t["target"] for t in ttr_targets(clean_copy(teacher), images, [0, 1, 2, 3], 0, DENOISING)])
    planted = teacher.planted_mask(normalize(torch.stack([i["image"] for i in images]), teacher.mean, teacher.std))
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(with_ttr, clean, dim=-1)[planted].mean() > cosine(plain, clean, dim=-1)[planted].mean()


def test_ttr_targets_fill_only_the_training_records(teacher, artifact):
    ttr = ttr_teacher(teacher, artifact)
    images = [{"image": image} for image in scenes(3, "train", 5)]
    targets = ttr_targets(ttr, images, [2, 0, 2], 0, DENOISING)
    assert targets[1] is None and targets[0]["target"].shape == targets[2]["target"].shape == (8, 8, ttr.embed_dim)
    with pytest.raises(ValueError, match="no training records"):
        ttr_targets(ttr, images, [], 0, DENOISING)


def test_both_refuses_a_plain_teacher_online_targets_and_no_crops(teacher, artifact):
    images = [{"image": image} for image in scenes(2, "train", 5)]
    student = build_student_from_config(the_student_config())
    with pytest.raises(ValueError, match="carries no test-time registers"):
        distill_from_ttr_teacher(student, teacher, images, [[0]], 0, DENOISING, recipe().training)
    ttr = ttr_teacher(teacher, artifact)
    online = StudentDistillationConfig(targets="online", num_registers=2)
    with pytest.raises(ConfigError, match="evaluation.planted.both: .*'online'"):
        both_student(the_student_config(), ttr, images, [[0]], online, DENOISING, 0, "cpu")
    with pytest.raises(ValueError, match="no prepared image has split 'train'"):
        both_student(the_student_config(), ttr, images, [], recipe(), DENOISING, 0, "cpu")


def test_the_both_key_is_checked_before_the_run(base_params):
    assert base_params["evaluation"]["planted"]["both"] is True
    params = copy.deepcopy(base_params)
    params["evaluation"]["planted"]["both"] = "yes"
    with pytest.raises(ConfigError, match="evaluation.planted.both"):
        validate_parameters(params)
    params = copy.deepcopy(base_params)
    params["student_distillation"]["targets"] = params["teacher_denoising"]["mode"] = "online"
    validate_parameters(params)   # online targets: the row is skipped with its reason in the report
    assert both_skip_reason(True, StudentDistillationConfig(targets="online")).startswith(
        "student_distillation.targets is 'online'")
    assert both_skip_reason(False, StudentDistillationConfig()).startswith("evaluation.planted.both is false")
    assert both_skip_reason(True, StudentDistillationConfig()) is None


def test_both_of_an_evaluated_snapshot_is_the_same_epochs_snapshot(teacher, artifact):
    """evaluation.student_snapshot: the both row is the snapshot after the same epoch of its own run (the snapshot
    after the last epoch is the final student, bit for bit); an epoch the recipe does not keep is refused."""
    ttr = ttr_teacher(teacher, artifact)
    images = [{"image": image} for image in scenes(4, "train", 5)]
    crops = [[0], [1], [2], [3]]
    kept = recipe(snapshot_epochs=(1, 2))
    final = both_student(the_student_config(), ttr, images, crops, kept, DENOISING, seed=0, device="cpu")
    at = {epoch: both_student({**the_student_config(), "epoch": epoch}, ttr, images, crops, kept, DENOISING, seed=0,
                              device="cpu") for epoch in (1, 2)}
    final_weights, weights = trainable_state_dict(final), {e: trainable_state_dict(s) for e, s in at.items()}
    assert all(torch.equal(final_weights[k], weights[2][k]) for k in final_weights)
    assert any(not torch.equal(final_weights[k], weights[1][k]) for k in final_weights)
    with pytest.raises(ValueError, match="snapshot after epoch 1, which student_distillation.training does not keep"):
        both_student({**the_student_config(), "epoch": 1}, ttr, images, crops, recipe(), DENOISING, 0, "cpu")
