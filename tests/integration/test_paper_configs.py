"""The paper configurations end to end on fake benchmark folders: Table 1 (zero-shot) and Table 2 (linear probes).

``conf/paper`` and ``conf/paper_dinov2`` are loaded exactly as the project loads them; only the ``data/01_raw/``
dataset roots are pointed at tiny fake folders in the standard layouts (``tests/fake_datasets.py``), the
backbones are tiny random-weight models and a few compute knobs are shrunk (each override says why). The evaluation
node functions then run as the pipeline runs them and must fill every row and column of both tables.
"""

from __future__ import annotations

import copy
import math
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from kedro.config import OmegaConfigLoader
from matplotlib.figure import Figure

import ph_reg.evaluation.zeroshot.run as zero_shot_run
from ph_reg.evaluation.benchmarks import build_dataset
from ph_reg.io.shards import ShardReader, write_shards
from ph_reg.models import BackboneConfig, build_backbone, trainable_state_dict
from ph_reg.pipelines.evaluation.nodes import cache_probe_features, evaluate_probes, evaluate_zero_shot
from ph_reg.method.student import student_config, teacher_backbone
from ph_reg.models.test_time_registers import RegisterNeuron, TestTimeRegistersConfig, neuron_artifact
from ph_reg.evaluation.zeroshot import OPENAI_IMAGENET_TEMPLATES, text_embeddings

from conftest import PROJECT_ROOT
from fake_datasets import NYU_SIZE, make_fake_datasets

RAW_PREFIX = "data/01_raw/"
IMAGES_PER_SPLIT = 2
SEED = 0
TRAINABLE = ["registers", "pos_embed", "patch_embed", "last_block"]
NUM_REGISTERS = 4                 # the paper uses 16; a tiny student needs only a few to exercise them
CLIP_BACKBONE = {"arch": "open_clip:ph-reg-tiny-ViT-16", "img_size": 64}
TIMM_BACKBONE = {"arch": "timm:test_vit", "img_size": 64}   # patch 16; stands in for DINOv2 (patch 14)

# Test-only compute overrides (the configs are not edited):
PROBE_ITERATIONS = 2              # paper: 20k / 40k / 30k iterations; two steps prove the training loop runs
DEPTH_EVAL_INTERVAL = 1           # paper: every 500 iterations; every step here, so the best-on-test columns fill
TTA_VIEWS = 2                     # paper: 10 views of maskclip_tta; 2 still averages shifted/flipped views
# Zero-shot sliding windows: every pixel setting (short_side, crop, stride, max_long_side) divided by 7 (448 -> 64,
# 336 -> 48, 560 -> 80, 224 -> 32, 112 -> 16, 2048 -> 292): the same windows per image and the same overlap in
# patches, 49x fewer pixels.
# At full size the per-query logit canvases (171 COCO-Stuff / 150 ADE20K queries at 448 x 597 and more) make the
# zero-shot table alone take minutes on 2 CPU cores.
ZERO_SHOT_PIXEL_SCALE = 7
ZERO_SHOT_PIXEL_KEYS = ("short_side", "crop", "stride", "max_long_side")
# Text queries: the paper averages 80 prompt templates per class name; 8 benchmarks x 80 templates = 50k prompts
# through the text tower, about a minute on 2 CPU cores even for the tiny tower. The test encodes 2 templates.
TEST_TEMPLATES = OPENAI_IMAGENET_TEMPLATES[:2]
# DINOv2 has patch 14 and the paper's probe crop 518 = 37 x 14; the tiny timm stand-in has patch 16, so the crop
# becomes the nearest multiple of 16 (the probe cache requires crop_size % patch == 0). Strides stay as configured.
DINOV2_CROP = 512

# The register_neurons artifact of the ttr rows: a neuron of block 0, which both tiny models (and every head) run
REGISTER_NEURONS = neuron_artifact([RegisterNeuron(0, 3, 1.0)], TestTimeRegistersConfig())
ZERO_SHOT_RUN = ["voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k"]
TABLE1_HEADER = "| head | VOC21 | PC60 | Object | VOC20 | PC59 | Stuff | City | ADE | Avg |"
PAPER_HEADS = ["vanilla", "maskclip", "sclip", "clearclip", "naclip", "maskclip_tta", "ttr", "ttr_maskclip",
               "ph_reg"]
# docs/method.md section 7 (VOC21 column and Avg of Table 1); maskclip_tta is an ablation row: only its Avg is published;
# docs/method.md publishes no numbers for the vanilla CLIP row, nor the test-time-registers paper for these benchmarks
PUBLISHED_TABLE1 = {
    "vanilla": (None, None, None), "ttr": (None, None, None), "ttr_maskclip": (None, None, None),
    "maskclip": ("MaskCLIP", 49.27, 32.21), "sclip": ("SCLIP", 59.62, 40.08),
    "clearclip": ("ClearCLIP", 59.76, 39.52), "naclip": ("NACLIP", 58.88, 39.41),
    "ph_reg": ("PH-Reg", 63.01, 41.85), "maskclip_tta": ("MaskCLIP + 10x TTA", None, 34.55),
}
TABLE2_COLUMNS = ["voc21/mIoU", "voc21/mAcc", "ade20k/mIoU", "ade20k/mAcc", "nyuv2/RMSE", "nyuv2/AbsRel",
                  "nyuv2/delta1", "nyuv2/RMSE_best_on_test", "nyuv2/AbsRel_best_on_test", "nyuv2/delta1_best_on_test"]
PUBLISHED_TABLE2 = {   # docs/method.md section 7; mAcc is not published; depth: the best evaluation on the test set
    "paper": {"teacher": {"voc21/mIoU": 73.88, "ade20k/mIoU": 35.78, "nyuv2/RMSE_best_on_test": 0.6843,
                          "nyuv2/AbsRel_best_on_test": 0.2115, "nyuv2/delta1_best_on_test": 64.93},
              "student": {"voc21/mIoU": 75.32, "ade20k/mIoU": 38.07, "nyuv2/RMSE_best_on_test": 0.6746,
                          "nyuv2/AbsRel_best_on_test": 0.1995, "nyuv2/delta1_best_on_test": 68.17}},
    "paper_dinov2": {"teacher": {"voc21/mIoU": 84.13, "ade20k/mIoU": 47.82, "nyuv2/RMSE_best_on_test": 0.4566,
                                 "nyuv2/AbsRel_best_on_test": 0.1391, "nyuv2/delta1_best_on_test": 82.92},
                     "student": {"voc21/mIoU": 84.85, "ade20k/mIoU": 48.66, "nyuv2/RMSE_best_on_test": 0.4306,
                                 "nyuv2/AbsRel_best_on_test": 0.1216, "nyuv2/delta1_best_on_test": 86.35}},
}
# (task/benchmark, fake train images, fake val images): VOC trains on train_aug.txt (train + SBD-only images)
PROBE_SPLITS = [("segmentation/voc21", 2 * IMAGES_PER_SPLIT, IMAGES_PER_SPLIT),
                ("segmentation/ade20k", IMAGES_PER_SPLIT, IMAGES_PER_SPLIT),
                ("depth/nyuv2", IMAGES_PER_SPLIT, IMAGES_PER_SPLIT)]


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------
def load_paper_evaluation(env: str) -> dict[str, Any]:
    """``params:evaluation`` of a run environment, loaded as ``ph_reg.settings`` configures Kedro."""
    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), base_env="base", default_run_env=env,
                               merge_strategy={"parameters": "soft", "globals": "soft"})
    return copy.deepcopy(loader["parameters"]["evaluation"])


def redirect_raw_roots(node: Any, raw_root: Path, rewritten: list[str]) -> Any:
    """A copy of ``node`` whose dataset ``root`` values under ``data/01_raw/`` point into ``raw_root``."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "root" and isinstance(value, str) and value.startswith(RAW_PREFIX):
                out[key] = str(raw_root / value[len(RAW_PREFIX):])
                rewritten.append(value)
            else:
                out[key] = redirect_raw_roots(value, raw_root, rewritten)
        return out
    if isinstance(node, list):
        return [redirect_raw_roots(value, raw_root, rewritten) for value in node]
    return node


def paper_params(env: str, raw_root: Path) -> dict[str, Any]:
    """The paper environment's evaluation parameters on the fake folders, with the test's compute overrides."""
    rewritten: list[str] = []
    params = redirect_raw_roots(load_paper_evaluation(env), raw_root, rewritten)
    assert rewritten, f"conf/{env} names no dataset root under {RAW_PREFIX}"
    for benchmarks in params["probes"]["tasks"].values():
        for spec in benchmarks.values():
            spec.setdefault("probe", {})["iterations"] = PROBE_ITERATIONS
            if spec["probe"].get("eval_interval"):
                spec["probe"]["eval_interval"] = DEPTH_EVAL_INTERVAL
    zero_shot = params["zero_shot"]
    zero_shot["tta_views"] = TTA_VIEWS
    for spec in zero_shot["benchmarks"].values():
        for key in ZERO_SHOT_PIXEL_KEYS:
            if spec["settings"].get(key):
                spec["settings"][key] //= ZERO_SHOT_PIXEL_SCALE
    return params


def export_student(backbone: dict[str, Any], teacher_head: str, student_head: str) -> tuple[dict, dict]:
    """(weights, config) as the student_distillation pipeline exports them (random weights, no training)."""
    student = build_backbone(BackboneConfig.from_dict({**backbone, "head": student_head, "num_registers": NUM_REGISTERS,
                                                        "student": True}))
    student.set_trainable(TRAINABLE)
    weights = trainable_state_dict(student)
    config = student_config(student.config, TRAINABLE, list(weights),
                            teacher=teacher_backbone(backbone, teacher_head))
    return weights, config


def run_probe_nodes(weights: dict, config: dict, params: dict, folder: Path
                    ) -> tuple[dict[str, ShardReader], dict[str, Any], str]:
    """cache_probe_features -> shard stores on disk (as ShardStoreCollectionDataset saves and loads them) ->
    evaluate_probes. Returns (stores, metrics, markdown)."""
    streams = cache_probe_features(weights, config, REGISTER_NEURONS, params, SEED)
    for name, stream in streams.items():
        write_shards(folder / name, stream.records, stream.records_per_shard or 64, stream.attrs)
    stores = {str(index.parent.relative_to(folder)): ShardReader(index.parent)
              for index in sorted(folder.rglob("index.json"))}
    metrics, markdown, curves = evaluate_probes(stores, weights, config, REGISTER_NEURONS, params, SEED)
    # one loss curve per <task>-<benchmark>-<model>
    assert set(curves) == {"{1}-{2}-{0}".format(*key.split("/")) for key in stores}
    return stores, metrics, markdown


def markdown_rows(markdown: str) -> list[list[str]]:
    """The cells of every Markdown table row (the separator row excluded)."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith("|")]
    return [row for row in rows if not all(set(cell) <= {"-"} for cell in row)]


def check_stores(stores: dict[str, ShardReader], mode: str) -> None:
    """One store per model, probe benchmark and split (val only in the online probe mode of conf/paper*: the train
    features are recomputed under augmentation), each holding the fake split's images."""
    splits = ("train", "val") if mode == "cached" else ("val",)
    expected = {f"{model}/{bench}/{split}" for model in ("teacher", "student", "ttr") for bench, _, _ in PROBE_SPLITS
                for split in splits}
    assert set(stores) == expected
    for model in ("teacher", "student", "ttr"):
        for bench, n_train, n_val in PROBE_SPLITS:
            if "train" in splits:
                assert len(stores[f"{model}/{bench}/train"]) == n_train, bench
            assert len(stores[f"{model}/{bench}/val"]) == n_val, bench
    nyu = stores["teacher/depth/nyuv2/val"][0]
    assert tuple(nyu["depth"].shape) == NYU_SIZE and "patch_flip" in nyu       # original size; flip TTA cached
    assert stores["student/segmentation/ade20k/val"].attrs["num_classes"] == 150


def check_table2(metrics: dict[str, Any], markdown: str, published: dict[str, dict[str, float]]) -> None:
    """Rows teacher, student and ttr, every Table 2 column filled, finite and in range, the paper's numbers beside
    (none for ttr: the PH-Reg paper has no such row)."""
    table = metrics["table"]
    assert set(table) == {"teacher", "student", "ttr"} and metrics["random_weights"] is True
    for model, row in table.items():
        assert list(row) == TABLE2_COLUMNS
        for column, cell in row.items():
            ours = cell["ours"]
            assert ours is not None and math.isfinite(ours), (model, column, cell)
            if column.endswith(("mIoU", "mAcc", "delta1")):
                assert 0.0 <= ours <= 100.0, (model, column, ours)
            else:
                assert ours > 0.0, (model, column, ours)  # RMSE, AbsRel of random depth bins
            assert cell["published"] == published.get(model, {}).get(column), (model, column)
            if cell["published"] is not None:
                assert cell["difference"] == pytest.approx(ours - cell["published"], abs=1e-3)
    header, *rows = markdown_rows(markdown)
    assert header == ["model", *TABLE2_COLUMNS]
    assert sorted(row[0] for row in rows) == ["student", "teacher", "ttr"]
    assert all(len(row) == 1 + len(TABLE2_COLUMNS) and all(cell and cell != "-" for cell in row) for row in rows)
    assert f"/ {published['teacher']['voc21/mIoU']:.4g} (" in markdown


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: the tiny models run hundreds of forwards on 3x3-patch crops, where thread
    synchronisation costs more than it saves (3x slower on a busy 2-core machine). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_datasets(tmp_path_factory.mktemp("data") / "01_raw", images_per_split=IMAGES_PER_SPLIT,
                              seed=SEED)


@pytest.mark.parametrize("env", ["paper", "paper_dinov2"])
def test_paper_datasets_resolve_to_the_standard_layouts(env: str, raw_root: Path) -> None:
    params = paper_params(env, raw_root)
    zero_shot = params["zero_shot"]
    specs = [zero_shot["benchmarks"][name]["dataset"] for name in zero_shot["run"]]
    for entry in params["probes"]["run"]:
        task, _, bench = entry.partition("/")
        specs += [params["probes"]["tasks"][task][bench][split] for split in ("train", "val")]
    assert len(specs) == (len(ZERO_SHOT_RUN) if env == "paper" else 0) + 2 * len(PROBE_SPLITS)
    for spec in specs:
        assert Path(spec["root"]).is_relative_to(raw_root), spec   # every benchmark reads data/01_raw/
        dataset = build_dataset(spec)
        sample = dataset[0]
        assert len(dataset) >= IMAGES_PER_SPLIT and sample.image.dtype == torch.uint8
        if spec["type"] == "nyuv2":
            assert tuple(sample.depth.shape) == NYU_SIZE and float(sample.depth.max()) < 10.0   # mm -> metres
        else:
            valid = sample.label[sample.label != 255]
            assert valid.numel() and int(valid.max()) < dataset.num_classes


def test_paper_clip_fills_table1_and_table2(raw_root: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    params = paper_params("paper", raw_root)
    zero_shot = params["zero_shot"]
    assert zero_shot["heads"] == PAPER_HEADS and zero_shot["run"] == ZERO_SHOT_RUN
    assert params["probes"]["published"] == "clip" and params["probes"]["teacher_head"] == "maskclip"
    monkeypatch.setattr(zero_shot_run, "text_embeddings", partial(text_embeddings, templates=TEST_TEMPLATES))
    weights, config = export_student(CLIP_BACKBONE, teacher_head="naclip", student_head="maskclip")

    metrics, markdown, figures = evaluate_zero_shot(weights, config, REGISTER_NEURONS, params, {},
                                                    seed=SEED)  # tta: defaults

    results = metrics["results"]
    assert list(results) == PAPER_HEADS and metrics["random_weights"] is True
    for head in PAPER_HEADS:
        assert list(results[head]) == ZERO_SHOT_RUN
        for bench, miou in results[head].items():
            assert math.isfinite(miou) and 0.0 <= miou <= 100.0, (head, bench, miou)
    table = metrics["table"]
    assert table["columns"] == [*ZERO_SHOT_RUN, "avg"]
    for head, (label, voc21, avg) in PUBLISHED_TABLE1.items():
        row = table["rows"][head]
        assert row["published_row"] == label
        assert row["published"]["voc21"] == voc21 and row["published"]["avg"] == avg
        assert row["ours"]["avg"] == pytest.approx(sum(results[head].values()) / len(ZERO_SHOT_RUN), abs=0.01)
    header, *rows = markdown_rows(markdown)
    assert "| " + " | ".join(header) + " |" == TABLE1_HEADER
    assert [row[0].split()[0] for row in rows] == PAPER_HEADS
    assert all(len(row) == len(header) and all(row) for row in rows)
    assert "49.27" in markdown and "41.85" in markdown and "34.55" in markdown
    assert sorted(figures) == [f"zero_shot_{i:02d}.png" for i in range(IMAGES_PER_SPLIT)]  # figure: 4 of 2 images
    assert all(isinstance(figure, Figure) for figure in figures.values())

    stores, metrics, markdown = run_probe_nodes(weights, config, params, tmp_path / "probe_features")
    assert params["probes"]["mode"] == "online"
    check_stores(stores, params["probes"]["mode"])
    assert stores["teacher/segmentation/voc21/val"].attrs["backbone"]["head"] == "maskclip"
    assert stores["student/segmentation/voc21/val"].attrs["backbone"]["num_registers"] == NUM_REGISTERS
    check_table2(metrics, markdown, PUBLISHED_TABLE2["paper"])
    assert metrics["table"]["teacher"]["voc21/mIoU"]["published"] == 73.88


def test_paper_dinov2_skips_zero_shot_and_fills_table2(raw_root: Path, tmp_path: Path) -> None:
    params = paper_params("paper_dinov2", raw_root)
    assert params["zero_shot"]["run"] == [] and params["probes"]["published"] == "dinov2"
    assert params["probes"]["teacher_head"] == "final_norm"
    for benchmarks in params["probes"]["tasks"].values():
        for name, spec in benchmarks.items():
            if name != "synthetic":   # the base config's benchmark, merged in but not run
                assert spec["crop_size"] == 518   # 37 x 14: the real DINOv2 patch grid
                spec["crop_size"] = DINOV2_CROP
    weights, config = export_student(TIMM_BACKBONE, teacher_head="final_norm", student_head="final_norm")

    metrics, markdown, figures = evaluate_zero_shot(weights, config, REGISTER_NEURONS, params, {},
                                                    seed=SEED)  # tta: defaults
    assert set(metrics) == {"skipped"} and "open_clip" in metrics["skipped"]
    assert "Skipped" in markdown and list(figures) == ["zero_shot_skipped.png"]

    stores, metrics, markdown = run_probe_nodes(weights, config, params, tmp_path / "probe_features")
    assert params["probes"]["mode"] == "online"
    check_stores(stores, params["probes"]["mode"])
    assert stores["teacher/segmentation/voc21/val"].attrs["crop_size"] == DINOV2_CROP
    assert stores["teacher/segmentation/voc21/val"].attrs["stride"] == 341   # configured stride kept (official 341)
    check_table2(metrics, markdown, PUBLISHED_TABLE2["paper_dinov2"])
    assert metrics["table"]["student"]["voc21/mIoU"]["published"] == 84.85
