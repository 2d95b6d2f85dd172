"""What a researcher reads: the headline summary (data/08_reporting/summary.json) against the reports it copies,
the zero-shot and planted-artifact figures (legend, ground truth, title, colour bars), the explanation of the depth
probe curve's step, and the DVC plots page that works offline (scripts/plots_offline.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colorbar import Colorbar

from conftest import PROJECT_ROOT, TINY_OPEN_CLIP, make_project
from ph_reg.evaluation.planted import SourceFeatures, artifact_benchmark
from ph_reg.evaluation.benchmarks.base import IGNORE_INDEX
from ph_reg.evaluation.artifacts import artifact_report
from ph_reg.reporting.summary import summarize_evaluation
from ph_reg.evaluation.probes.depth import DepthProbeConfig
from ph_reg.evaluation.probes.depth_recipe import depth_loss
from ph_reg.reporting.figures import benchmark_figure, class_palette, zero_shot_figure
from ph_reg.reporting.tables import table1
from test_viz import browser, browser_binaries  # noqa: F401  (the headless Chromium fixture)

REPORTS = {"evaluation_metrics": "evaluation.json", "zero_shot_metrics": "zero_shot.json",
           "probe_metrics": "probes.json", "planted_artifact_metrics": "planted_artifacts.json"}


# --------------------------------------------------------------------------------------------- the summary file
def _reports(seed: int = 0) -> dict[str, dict]:
    """The four reports as the evaluation nodes write them, made by the same library functions on small tensors."""
    gen = torch.Generator().manual_seed(seed)
    feats = {name: torch.randn(2, 4, 4, 8, generator=gen) for name in ("teacher", "target", "student")}
    artifacts = {**artifact_report(feats), "random_weights": True}
    planted = torch.zeros(2, 4, 4, dtype=torch.bool)
    planted[:, 1, 2] = True
    reference = torch.randn(2, 4, 4, 8, generator=gen)
    sources = {name: SourceFeatures(output=reference + 0.5 * i * torch.randn(2, 4, 4, 8, generator=gen),
                                    pre_norm=torch.randn(2, 4, 4, 8, generator=gen))
               for i, name in enumerate(("clean", "teacher", "target", "student"))}
    planted_report = artifact_benchmark(sources, reference, planted)
    results = {"naclip": {"synthetic": 12.345678}, "maskclip": {"synthetic": 10.0}, "ph_reg": {"synthetic": 20.5}}
    zero_shot = {"results": results, "table": table1(results)[0], "random_weights": True}
    probes = {"results": {model: {"synthetic/mIoU": 10.0 + i, "synthetic/mAcc": 20.0 + i, "synthetic/RMSE": 1.5 - i / 7,
                                  "synthetic/AbsRel": 0.4, "synthetic/delta1": 30.0,
                                  "synthetic/RMSE_best_on_test": 1.2}
                          for i, model in enumerate(("clean", "teacher", "student"))},
              "table": {}, "random_weights": True}
    return {"evaluation_metrics": artifacts, "zero_shot_metrics": zero_shot, "probe_metrics": probes,
            "planted_artifact_metrics": json.loads(json.dumps(planted_report))}


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_summary_copies_the_headline_numbers_of_the_reports():
    reports = _reports()
    summary = summarize_evaluation(*reports.values())
    artifacts, zero_shot, probes, planted = reports.values()
    expected = {"random_weights": True}
    for name in ("teacher", "student"):
        expected[f"artifacts.{name}.cosine_to_target"] = artifacts["cosine_to_target"][name]["mean"]
    for name in ("teacher", "target", "student"):
        expected[f"planted.{name}.cosine_to_clean"] = planted["sources"][name]["cosine"]["all"]
        expected[f"planted.{name}.outlier_rate"] = planted["sources"][name]["direction"]["rate"]
    for head, row in zero_shot["table"]["rows"].items():
        expected[f"zero_shot_avg_miou.{head}"] = row["ours"]["avg"]
    for model, row in probes["results"].items():
        for metric in ("mIoU", "RMSE"):
            expected[f"probes.{model}.synthetic/{metric}"] = row[f"synthetic/{metric}"]
    got = dict(_leaves(summary))
    assert set(got) == set(expected)   # a dozen and a half headline numbers, nothing else
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=5e-5), key
    assert got["zero_shot_avg_miou.naclip"] == 12.35   # (table1 rounds to 2 decimals)
    assert len(json.dumps(summary)) < 1500   # small enough for `dvc metrics show` to print as one table row
    # each source has its own numbers (the sources' outputs are the reference plus noise of different sizes)
    assert len({got[f"planted.{n}.cosine_to_clean"] for n in ("teacher", "target", "student")}) == 3


def test_summary_names_a_skipped_report_instead_of_numbers():
    reports = _reports()
    reports["zero_shot_metrics"] = {"skipped": "zero-shot segmentation needs an open_clip backbone"}
    reports["planted_artifact_metrics"] = {"skipped": "the backbone has no implant"}
    summary = summarize_evaluation(*reports.values())
    assert summary["zero_shot_avg_miou"] == {"skipped": "zero-shot segmentation needs an open_clip backbone"}
    assert summary["planted"] == {"skipped": "the backbone has no implant"}
    assert set(summary["probes"]) == {"clean", "teacher", "student"}


def test_summary_node_writes_the_catalog_file_from_the_reports_on_disk(tmp_path):
    """`kedro run --pipelines evaluation --nodes summarize_evaluation` (the DVC stage evaluation_summary) reads the
    four reports through the catalog and writes data/08_reporting/summary.json, a metric of that stage."""
    project = make_project(tmp_path / "project", TINY_OPEN_CLIP)
    reporting = project / "data/08_reporting"
    reporting.mkdir(parents=True)
    reports = _reports(seed=1)
    for dataset, name in REPORTS.items():
        (reporting / name).write_text(json.dumps(reports[dataset]))
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    stage = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]["evaluation_summary"]
    command = stage["cmd"].replace("${kedro_env}", "tiny").split()
    assert command[:2] == ["kedro", "run"]
    result = subprocess.run([sys.executable, "-m", "kedro", *command[1:]], cwd=project, env=env,
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = json.loads((reporting / "summary.json").read_text())
    assert written == json.loads(json.dumps(summarize_evaluation(*reports.values())))
    assert stage["metrics"] == [{"data/08_reporting/summary.json": {"cache": False}}]
    assert {f"data/08_reporting/{name}" for name in REPORTS.values()} <= set(stage["deps"])


# ------------------------------------------------------------------------------------------------------ figures
def _drawn(figure):
    FigureCanvasAgg(figure).draw()
    return figure


def test_zero_shot_figure_shows_the_ground_truth_and_a_colour_legend():
    colours = class_palette(4)
    names = ["floor", "wall", "ball", "box"]
    image = torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8)
    label = torch.zeros(16, 24, dtype=torch.long)
    label[:, 12:] = 2
    label[0, 0] = IGNORE_INDEX
    pred_a = torch.full((16, 24), 1)
    pred_b = label.where(label != IGNORE_INDEX, 0)   # a prediction has a class everywhere
    heads = {"naclip": (pred_a, torch.rand(16, 24), torch.randn(2, 3, 8)),
             "ph_reg": (pred_b, torch.rand(16, 24), torch.randn(2, 3, 8))}
    figure = _drawn(zero_shot_figure(image, heads, colours, query_name="ball", class_names=names, label=label,
                                     title="Zero-shot segmentation, synthetic image 0"))
    assert figure.get_suptitle() == "Zero-shot segmentation, synthetic image 0"
    by_title = {ax.get_title(): ax for ax in figure.axes}
    assert {"image", "ground truth", "naclip: prediction", "ph_reg: prediction", "naclip: P('ball')",
            "ph_reg: PCA of features"} <= set(by_title)
    truth = by_title["ground truth"].images[0].get_array()
    assert tuple(truth[5, 3]) == tuple(colours[0]) and tuple(truth[5, 20]) == tuple(colours[2])
    assert tuple(truth[0, 0]) == (255, 255, 255)   # not scored: white, unlike every class colour
    legends = [ax.get_legend() for ax in figure.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    entries = [text.get_text() for text in legends[0].get_texts()]
    # every class in the ground truth or a prediction, by name, in the colour it is drawn with; and the ignore colour
    assert entries == ["0: floor", "1: wall", "2: ball", "not scored (ignore)"]
    patches = legends[0].get_patches()
    for patch, colour in zip(patches, [colours[0], colours[1], colours[2], (255, 255, 255)], strict=True):
        assert np.allclose(patch.get_facecolor()[:3], np.asarray(colour) / 255.0)
    # the probability maps share one labelled scale
    colourbars = [ax for ax in figure.axes if "probability" in ax.get_xlabel()]
    assert len(colourbars) == 1

    no_truth = _drawn(zero_shot_figure(image, heads, colours, class_names=names))
    panel = next(ax for ax in no_truth.axes if ax.get_title() == "ground truth")
    assert not panel.images and "no ground truth" in panel.texts[0].get_text()
    with pytest.raises(ValueError, match="label must be"):
        zero_shot_figure(image, heads, colours, label=label[:8])


def test_zero_shot_figures_draw_the_benchmark_ground_truth():
    """Through zeroshot.run with the tiny CLIP on the synthetic benchmark: the ground-truth panel is the dataset's
    label in the class palette, the legend names the dataset's classes."""
    from ph_reg.evaluation.benchmarks import build_dataset
    from ph_reg.evaluation.zeroshot.run import zero_shot_figures
    from ph_reg.models import BackboneConfig

    spec = {"type": "synthetic", "num_images": 1, "image_size": 64, "seed": 1, "split": "val"}
    benchmark = {"dataset": spec, "classes": "dataset",
                 "settings": {"short_side": 64, "crop": 48, "stride": 16, "batch_size": 4}}
    base = BackboneConfig(arch="open_clip:ph-reg-tiny-ViT-16", img_size=64)
    figures = zero_shot_figures(None, base, ["naclip"], benchmark, images=1, query="ball", name="synthetic")
    (name, figure), = figures.items()
    assert name == "zero_shot_00.png"
    _drawn(figure)
    dataset = build_dataset(spec)
    sample = dataset[0]
    assert figure.get_suptitle().startswith("Zero-shot segmentation, synthetic image 0")
    truth = next(ax for ax in figure.axes if ax.get_title() == "ground truth").images[0].get_array()
    palette = class_palette(len(dataset.class_names))
    expected = palette[sample.label.clamp(max=len(palette) - 1).numpy()]
    scored = (sample.label != IGNORE_INDEX).numpy()
    assert np.array_equal(np.asarray(truth)[scored], expected[scored])
    entries = {text.get_text() for ax in figure.axes if ax.get_legend() for text in ax.get_legend().get_texts()}
    for c in torch.unique(sample.label).tolist():
        if c != IGNORE_INDEX:
            assert f"{c}: {dataset.class_names[c]}" in entries


def test_planted_figure_has_a_title_and_a_labelled_colour_bar_under_each_map_column():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    planted = torch.zeros(3, 4, 4, dtype=torch.bool)
    planted[:, 1, 1] = True
    features = {name: SourceFeatures(output=torch.randn(3, 4, 4, 8, generator=gen),
                                     pre_norm=torch.randn(3, 4, 4, 8, generator=gen))
                for name in ("teacher", "target", "student")}
    figure = _drawn(benchmark_figure(images, features, planted, reference=torch.randn(3, 4, 4, 8, generator=gen),
                                     max_images=2))
    assert figure.get_suptitle().startswith("Planted-artifact benchmark: teacher, target, student")
    maps = [ax for ax in figure.axes if ax.images and not hasattr(ax, "_colorbar")]
    colourbars = [ax for ax in figure.axes if isinstance(getattr(ax, "_colorbar", None), Colorbar)]
    assert len(colourbars) == 6   # one per map column: norm and cosine of each source
    labels = sorted(ax.get_xlabel() for ax in colourbars)
    assert labels == sorted(f"{s}: {what}" for s in features for what in ("token norm", "cosine to clean"))
    for bar in colourbars:
        box = bar.get_position()
        source, what = bar.get_xlabel().split(": ")
        heading = f"{source}\n{'pre-norm token norm' if what == 'token norm' else 'cosine to clean'}"
        column_top = next(ax for ax in maps if ax.get_title() == heading)
        column = [ax for ax in maps if abs(ax.get_position().x0 - column_top.get_position().x0) < 1e-6]
        assert len(column) == 2   # both image rows
        lowest = min(ax.get_position().y0 for ax in column)
        # horizontal, under its own column, within its width: not floating between columns
        assert box.width > box.height
        assert box.y1 <= lowest + 1e-6
        left, right = column_top.get_position().x0, column_top.get_position().x1
        assert left - 0.02 <= box.x0 and box.x1 <= right + 0.02, (bar.get_xlabel(), box, left, right)


def test_the_depth_probe_loss_steps_where_sigloss_warmup_ends():
    """The README and the probe-curve plot's title explain the step of the depth curve: iterations 0..99 (the CSV's
    1..100) optimise SigLoss without its variance term, iteration 100 (the CSV's 101) on with it."""
    config = DepthProbeConfig(loss_group_size=None, gradient_loss_weight=0.0)
    assert config.sigloss_warmup_iters == 100
    gen = torch.Generator().manual_seed(0)
    target = 1.0 + 4.0 * torch.rand(2, 8, 8, generator=gen)
    pred = target * torch.exp(0.3 * torch.randn(2, 8, 8, generator=gen))   # log-errors with a spread
    before, after = depth_loss(pred, target, config, 99), depth_loss(pred, target, config, 100)
    assert after > 1.5 * before
    assert depth_loss(pred, target, config, 0) == before and depth_loss(pred, target, config, 150) == after
    title = [plot for stage in yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"].values()
             for plot in stage.get("plots", []) if isinstance(plot, dict) and "data/08_reporting/probe_curves" in plot]
    assert len(title) == 1
    assert "101" in title[0]["data/08_reporting/probe_curves"]["title"]
    assert "step up at iteration 101" in (PROJECT_ROOT / "README.md").read_text()


# ------------------------------------------------------------------------------------------ DVC plots, offline
def _plots_offline():
    spec = importlib.util.spec_from_file_location("plots_offline", PROJECT_ROOT / "scripts/plots_offline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def offline_plots(tmp_path_factory) -> Path:
    """`python scripts/plots_offline.py -o <dir>` in a small DVC project whose plot is the probe curves' definition
    from dvc.yaml (title included), on a CSV with the depth curve's step."""
    project = tmp_path_factory.mktemp("plots") / "project"
    project.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_DAEMON": "0"}
    subprocess.run(["git", "init", "-q"], cwd=project, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True, env=env)
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    (props,) = [plot["data/08_reporting/probe_curves"] for plot in stages["evaluation_probes"]["plots"]]
    curves = project / "probe_curves"
    curves.mkdir()
    losses = [1.0 - 0.003 * i if i < 100 else 2.0 - 0.003 * i for i in range(200)]
    (curves / "depth-synthetic-student.csv").write_text(
        "iteration,loss\n" + "".join(f"{i + 1},{loss}\n" for i, loss in enumerate(losses)))
    (project / "dvc.yaml").write_text(yaml.safe_dump({"plots": [{"probe_curves": props}]}))
    out = project / "offline_plots"
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts/plots_offline.py"), "-o", str(out)],
                            cwd=project, env=env, capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "index.html"


def test_offline_plots_page_references_no_network_url(offline_plots):
    html = offline_plots.read_text()
    assert "vegaEmbed(" in html and "probe_curves" in html
    lowered = html.lower()
    for reference in ('src="http', "src='http", 'href="http', "href='http", "cdn.jsdelivr", "@import"):
        assert reference not in lowered, reference
    # the libraries are inline: no <script> element loads a file
    assert "<script src" not in lowered and "<script type = \"text/javascript\" src" not in lowered
    assert "steps up at" in html   # the probe curves' title (dvc.yaml) comes with the spec
    # DVC's own page, for comparison, loads them from the CDN
    template = _plots_offline().offline_template()
    assert "{plot_divs}" in template and "{scripts}" not in template


@pytest.mark.browser
def test_offline_plots_page_draws_its_curves_with_every_host_blocked(browser, offline_plots):  # noqa: F811
    """Headless Chromium (every host name but loopback unresolvable, test_viz.CHROMIUM_FLAGS) opens the page from
    disk: the Vega plot is drawn (Vega's `svg.marks` with the curve's path and the title), and nothing was fetched."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    marks = "document.querySelector('.vega-embed svg.marks')"
    browser.get(offline_plots.as_uri())
    try:
        WebDriverWait(browser, 60, poll_frequency=0.2).until(lambda d: d.execute_script(f"return !!{marks}"))
    except TimeoutException:
        pytest.fail("the offline DVC plots page drew no Vega plot: " + browser.find_element("tag name", "body").text)
    width, height, paths, text = browser.execute_script(
        f"const s = {marks}; return [s.getAttribute('width'), s.getAttribute('height'), "
        "s.querySelectorAll('path').length, s.textContent]")
    assert float(width) > 300 and float(height) > 200 and paths > 0
    assert "steps up at 101" in text and "iteration" in text   # the title and the x axis, drawn
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert not [name for name in fetched if name.startswith(("http:", "https:"))], fetched
