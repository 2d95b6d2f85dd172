"""The analysis notebooks: committed without outputs, and executed end to end (nbclient, the ``python3`` kernel of
this interpreter) on the outputs of the ``__default__`` pipeline of a tiny copy of the project."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

from conftest import PROJECT_ROOT, TINY_OPEN_CLIP, make_project

sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
from run_notebooks import execute_notebook, notebook_paths  # noqa: E402

NOTEBOOKS = {path.name: path for path in notebook_paths()}
ARTIFACT_NB = "01_artifact_analysis.ipynb"
CURVES_NB = "02_training_curves_and_sweep.ipynb"
RESULTS_NB = "03_results_vs_paper.ipynb"
SWEEP_PARAMS = "conf/base/parameters_student_distillation.yml"
SWEEP_VALUES = (0, 4, 16)


def outputs(notebook) -> tuple[str, int]:
    """All text a notebook displayed (streams, plain text, HTML, Markdown) and the number of figures."""
    texts, figures = [], 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                texts.append(output["text"])
            data = output.get("data", {})
            figures += "image/png" in data
            texts += [data[kind] for kind in ("text/plain", "text/html", "text/markdown") if kind in data]
    return "\n".join(texts), figures


def test_committed_notebooks_have_no_outputs_and_read_the_catalog():
    assert sorted(NOTEBOOKS) == [ARTIFACT_NB, CURVES_NB, RESULTS_NB]
    for name, path in NOTEBOOKS.items():
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code[0].source.strip() == "%load_ext kedro.ipython", name
        for cell in code:
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: commit it without outputs"
        assert notebook.metadata["kernelspec"]["name"] == "python3"
        assert 'catalog.load("' in "\n".join(cell.source for cell in code), name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny project after ``kedro run`` of ``__default__`` (through a session, as test_pipelines does)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    project = make_project(tmp_path_factory.mktemp("notebooks") / "project", TINY_OPEN_CLIP)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        bootstrap_project(project)
        with KedroSession.create(project_path=project, env="tiny") as session:
            session.run(pipeline_names=["__default__"])
    return project


def run(name: str, project: Path, tmp_path: Path, **kwargs):
    return execute_notebook(NOTEBOOKS[name], project, tmp_path / name, env="tiny", **kwargs)


def probe(notebook, marker: str = "PROBE=") -> dict:
    """The JSON an appended cell printed after ``marker``."""
    text, _ = outputs(notebook)
    line = next(line for line in text.splitlines() if line.startswith(marker))
    return json.loads(line[len(marker):])


def test_artifact_analysis_notebook(tiny_run, tmp_path):
    notebook = run(ARTIFACT_NB, tiny_run, tmp_path, append=(
        "import json\n"
        "print('PROBE=' + json.dumps({'shape': list(features['student'].shape), 'sources': SOURCES, "
        "'mean_norm': {s: float(norms[s].mean()) for s in SOURCES}, 'umap': list(embedding.shape), "
        "'maps': {m: list(v.shape) for m, v in maps.items()}}))"))
    text, figures = outputs(notebook)
    index = json.loads((tiny_run / "data/02_intermediate/prepared_images/index.json").read_text())
    val = [record for record in index["records"] if record["split"] == "val"]
    metrics = json.loads((tiny_run / "data/08_reporting/evaluation.json").read_text())
    result = probe(notebook)
    assert result["sources"] == ["teacher", "denoised target", "student"]
    assert result["shape"][:3] == [len(val), 4, 4]  # 64 px crops, 16 px patches
    # the features recomputed with the library are the ones the evaluation pipeline measured
    for source, key in zip(result["sources"], ("teacher", "target", "student")):
        assert result["mean_norm"][source] == pytest.approx(metrics["per_source"][key]["norm"]["mean"], rel=1e-4)
    tokens = 3 * min(3, len(val)) * 16  # the shown images' tokens of all three sources, in one embedding
    assert result["umap"] == [tokens, 3]
    assert result["maps"] == {"PCA": [3, min(3, len(val)), 4, 4, 3], "UMAP": [3, min(3, len(val)), 4, 4, 3]}
    assert "does not match the features recomputed here" not in text
    assert f"{len(val)} held-out images, a 4 x 4 patch grid" in text
    assert "random weights" in text
    # the tiny run inherits the base implant: section 5 shows the planted-artifact metrics and targets
    assert "The teacher carries planted artifacts" in text and "teacher planted rate" in text
    # norm histogram, norm heatmaps, PCA/UMAP maps, cosine-to-centre maps, cosine-to-target histogram,
    # cosine to clean by region (planted artifacts)
    assert figures == 6


def test_training_curves_notebook_without_a_sweep(tiny_run, tmp_path):
    notebook = run(CURVES_NB, tiny_run, tmp_path)
    text, figures = outputs(notebook)
    assert figures == 1  # the curves; nothing is drawn for a sweep that does not exist
    assert "No sweep results are present" in text
    assert "dvc exp run -S 'conf/base/parameters_student_distillation.yml:student_distillation.num_registers=0'" in text
    assert "after epoch 2" in text  # the tiny run trains 2 epochs


STAGE_SCRIPT = textwrap.dedent("""
    # stands in for distillation + evaluation: metrics that depend on the number of registers
    import json, pathlib, yaml
    m = yaml.safe_load(open("conf/base/parameters_student_distillation.yml"))["student_distillation"]["num_registers"]
    out = pathlib.Path("data/08_reporting")
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps({"cosine_to_target": {"student": {"mean": 0.5 + m / 100}},
                                                     "per_source": {"student": {"outlier_rate": 0.2 - m / 100}}}))
    (out / "zero_shot.json").write_text(json.dumps({"results": {"ph_reg": {"synthetic": 10.0 + m}}}))
    (out / "probes.json").write_text(json.dumps({"results": {"student": {"synthetic/mIoU": 30.0 + m,
                                                                         "synthetic/RMSE": 1.0}}}))
""")


@pytest.fixture(scope="module")
def sweep_repo(tmp_path_factory) -> Path:
    """A git + DVC repository with a real register sweep (``dvc exp run -S``) over a stand-in stage."""
    repo = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_DAEMON": "0"}

    def sh(*args):
        result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}{result.stderr[-2000:]}"

    (repo / "conf/base").mkdir(parents=True)
    (repo / SWEEP_PARAMS).write_text("student_distillation:\n  num_registers: 16\n")
    (repo / "stage.py").write_text(STAGE_SCRIPT)
    metrics = "".join(f"      - data/08_reporting/{name}.json:\n          cache: false\n"
                      for name in ("evaluation", "zero_shot", "probes"))
    (repo / "dvc.yaml").write_text(f"stages:\n  sweep:\n    cmd: {sys.executable} stage.py\n    deps: [stage.py]\n"
                                   f"    params:\n      - {SWEEP_PARAMS}:\n    metrics:\n{metrics}")
    sh("git", "init", "-q")
    sh("git", "config", "user.name", "ph-reg tests")
    sh("git", "config", "user.email", "tests@ph-reg.invalid")
    dvc = (sys.executable, "-m", "dvc")
    sh(*dvc, "init", "-q")
    sh(*dvc, "repro", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "baseline")
    for value in SWEEP_VALUES:
        sh(*dvc, "exp", "run", "-q", "-S", f"{SWEEP_PARAMS}:student_distillation.num_registers={value}")
    return repo


def test_training_curves_notebook_reads_a_dvc_sweep(tiny_run, sweep_repo, tmp_path):
    notebook = run(CURVES_NB, tiny_run, tmp_path, inject={"parameters": f"DVC_REPO = {str(sweep_repo)!r}"},
                   append="print('PROBE=' + summary.to_json(orient='records'))")
    text, figures = outputs(notebook)
    assert "No sweep results" not in text
    assert f"{len(SWEEP_VALUES)} experiments, student_distillation.num_registers in {list(SWEEP_VALUES)}" in text
    assert figures == 2  # the curves and the sweep
    rows = sorted(probe(notebook), key=lambda row: row["student_distillation.num_registers"])
    assert [row["student_distillation.num_registers"] for row in rows] == list(SWEEP_VALUES)
    for row, m in zip(rows, SWEEP_VALUES):  # the stand-in stage's metrics, as dvc exp show reports them
        assert row["student cosine to target"] == pytest.approx(0.5 + m / 100)
        assert row["student outlier rate"] == pytest.approx(0.2 - m / 100)
        assert row["zero-shot mIoU, synthetic"] == pytest.approx(10.0 + m)
        assert row["probe mIoU, synthetic"] == pytest.approx(30.0 + m)
        assert row["probe depth RMSE, synthetic"] == pytest.approx(1.0)


RESULTS_PROBE = """
import json
paper_eight = {b: 50.0 for b in BENCHMARKS}
crafted = table1_frame({"ph_reg": {"voc21": 60.0, "synthetic": 5.0}, "naclip": paper_eight,
                        "maskclip": {"voc21": 40.0, "voc20": 60.0}})
records = lambda frame: json.loads(frame.to_json(orient="records"))  # NaN -> null
print("PROBE=" + json.dumps({"table1": records(table1), "table2": records(table2), "effects": records(effects),
                             "crafted": records(crafted)}))
"""


def _row(rows, **where):
    return next(r for r in rows if all(r[k] == v for k, v in where.items()))


def test_results_notebook(tiny_run, tmp_path):
    notebook = run(RESULTS_NB, tiny_run, tmp_path, append=RESULTS_PROBE)
    text, figures = outputs(notebook)
    result = probe(notebook)
    zero_shot = json.loads((tiny_run / "data/08_reporting/zero_shot.json").read_text())["results"]
    probes = json.loads((tiny_run / "data/08_reporting/probes.json").read_text())["results"]

    # Table 1: our numbers beside the paper's; no difference where the benchmarks differ
    table1 = result["table1"]
    ours = _row(table1, head="ph_reg", benchmark="synthetic")
    assert ours["ours"] == pytest.approx(zero_shot["ph_reg"]["synthetic"]) and ours["published"] is None
    paper = _row(table1, head="ph_reg", benchmark="voc21")
    assert paper["published"] == 63.01 and paper["ours"] is None and paper["difference"] is None
    avg = _row(table1, head="ph_reg", benchmark="avg")
    assert avg["published"] == 41.85 and avg["difference"] is None  # the paper's Avg is over other benchmarks
    assert all(row["difference"] is None for row in table1)

    # Table 2: the paper's CLIP rows (the backbone is open_clip) beside ours
    table2 = result["table2"]
    assert _row(table2, model="student", metric="voc21/mIoU")["published"] == 75.32
    assert _row(table2, model="teacher", metric="synthetic/mIoU")["ours"] == pytest.approx(
        probes["teacher"]["synthetic/mIoU"])

    # the effect of PH-Reg, ours next to the paper's
    effects = {row["comparison"]: row for row in result["effects"]}
    gain = effects["zero-shot mIoU avg: PH-Reg - NACLIP"]
    assert gain["ours"] == pytest.approx(zero_shot["ph_reg"]["synthetic"] - zero_shot["naclip"]["synthetic"])
    assert gain["paper"] == pytest.approx(41.85 - 39.41)
    rmse = effects["probe RMSE: student - teacher"]  # lower is better: the sign is flipped
    assert rmse["ours"] == pytest.approx(probes["teacher"]["synthetic/RMSE"] - probes["student"]["synthetic/RMSE"])

    # differences where the benchmarks are shared, on crafted results
    crafted = result["crafted"]
    assert _row(crafted, head="ph_reg", benchmark="voc21")["difference"] == pytest.approx(60.0 - 63.01)
    assert _row(crafted, head="ph_reg", benchmark="avg")["difference"] is None  # synthetic is not in the paper
    assert _row(crafted, head="naclip", benchmark="avg")["difference"] == pytest.approx(50.0 - 39.41)
    assert _row(crafted, head="maskclip", benchmark="avg")["difference"] == pytest.approx(50.0 - (49.27 + 66.56) / 2)

    assert "VOC21" in text and "PH-Reg" in text and "random weights" in text
    assert figures == 4  # Table 1, Table 2 mIoU and RMSE, the effect chart


def test_run_notebooks_script_fails_on_an_error(tiny_run, tmp_path):
    broken = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise ValueError('broken on purpose')")])
    broken.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(broken, tmp_path / "99_broken.ipynb")
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts/run_notebooks.py"),
                             str(tmp_path / "99_broken.ipynb"), "--project", str(tiny_run), "--output-dir",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "broken on purpose" in result.stderr and "1 notebook(s) failed" in result.stderr
    executed = nbformat.read(tmp_path / "out/99_broken.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["ename"] == "ValueError"  # the executed copy keeps the error


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_kedro_jupyter_lab_serves_the_notebooks(tiny_run, tmp_path):
    """``kedro jupyter lab`` starts, registers the project's kernel and offers the notebooks with their python3
    kernel (Jupyter's data, runtime and config folders are kept in tmp_path, away from the user's)."""
    shutil.copytree(PROJECT_ROOT / "notebooks", tiny_run / "notebooks", dirs_exist_ok=True)
    port, token = free_port(), "ph-reg-test"
    env = {**os.environ, "JUPYTER_DATA_DIR": str(tmp_path / "data"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "run"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
    log = tmp_path / "lab.log"
    with log.open("w") as out:
        lab = subprocess.Popen([sys.executable, "-m", "kedro", "jupyter", "lab", "--env", "tiny", "--no-browser",
                                "--allow-root", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
                                f"--IdentityProvider.token={token}"], cwd=tiny_run, env=env, stdout=out,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(path: str):
        with opener.open(f"http://127.0.0.1:{port}{path}?token={token}", timeout=5) as response:
            return json.load(response)

    try:
        deadline = time.monotonic() + 180
        while True:
            assert lab.poll() is None, f"kedro jupyter lab exited:\n{log.read_text()[-3000:]}"
            try:
                specs = get("/api/kernelspecs")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, f"kedro jupyter lab did not answer:\n{log.read_text()[-3000:]}"
                time.sleep(0.3)
        assert specs["default"] == "kedro_ph_reg"
        kedro_kernel = specs["kernelspecs"]["kedro_ph_reg"]["spec"]["argv"]
        assert kedro_kernel[0] == sys.executable and kedro_kernel[-2:] == ["--ext", "kedro.ipython"]
        assert "python3" in specs["kernelspecs"]  # the kernel the committed notebooks name
        listed = {item["name"] for item in get("/api/contents/notebooks")["content"]}
        assert set(NOTEBOOKS) <= listed
    finally:
        if lab.poll() is None:
            os.killpg(lab.pid, signal.SIGTERM)
            lab.wait(timeout=30)
