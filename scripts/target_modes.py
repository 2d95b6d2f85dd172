"""Cached against online teacher targets, measured on the planted-artifact benchmark of ``conf/base``.

Every arm runs the real Kedro pipelines (``data_preparation``, ``teacher_denoising``, ``student_distillation``) in
its own copy of the project, with ``conf/base`` and only the overrides below, for the same number of epochs:

- ``online``: a fresh random crop and a fresh draw of views per image at every step (the official recipe);
- ``cached K=1``: one fixed crop and one draw of views per image, denoised once;
- ``cached K=4``: four fixed crops (and view draws) per image, shown in turn (one per image per epoch).

Every arm takes the same optimizer steps: an epoch shows every training image once in each mode.

Every student is then measured on the same held-out images (the ``val`` split, by image name, of the ``K=1`` arm)
against the known planted mask and the TTA-denoised clean model (``ph_reg.evaluation.planted``), with the
evaluation settings of ``conf/base``. Wall times are those of the pipeline runs (teacher denoising + training).
Take them on an idle machine.

    python scripts/target_modes.py [--epochs N] [--out data/08_reporting/target_modes.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "online": {"student_distillation.targets": "online", "teacher_denoising.mode": "online",
               "data_preparation.crops_per_image": 1},
    "cached K=1": {"data_preparation.crops_per_image": 1},
    "cached K=4": {"data_preparation.crops_per_image": 4},
}
PIPELINES = ("data_preparation", "teacher_denoising", "student_distillation")
ENV = {"KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "DVC_DAEMON": "0",
       "HF_HUB_OFFLINE": "1"}


def project_copy(target: Path) -> Path:
    """The project in a fresh folder: its code and ``conf/base`` only (no ``conf/local`` overrides)."""
    target.mkdir(parents=True)
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy2(ROOT / name, target / name)
    shutil.copytree(ROOT / "conf" / "base", target / "conf" / "base")
    (target / "conf" / "local").mkdir()
    shutil.copytree(ROOT / "src", target / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return target


def run_arm(folder: Path, overrides: dict[str, object], epochs: int) -> dict[str, float]:
    """Run the three training pipelines in ``folder``; return the wall time of each."""
    params = dict(overrides, **{"student_distillation.training.epochs": epochs})
    text = ",".join(f"{key}={value}" for key, value in params.items())
    times = {}
    for pipeline in PIPELINES:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kedro", "run", "--pipelines", pipeline, "--params", text],
                       cwd=folder, check=True, env={**os.environ, **ENV}, stdin=subprocess.DEVNULL)
        times[pipeline] = time.perf_counter() - started
    return times


def measure(folder: Path, pixels, base_params: dict) -> dict:
    """The planted-artifact benchmark of the student in ``folder`` on ``pixels``."""
    import safetensors.torch
    import torch

    from ph_reg.evaluation.planted import planted_artifact_evaluation
    from ph_reg.config import from_mapping
    from ph_reg.method.targets import TeacherDenoisingConfig
    from ph_reg.models import BackboneConfig, build_backbone, load_trainable_state_dict
    from ph_reg.method.student import build_student_from_config

    config = json.loads((folder / "data/06_models/student/config.json").read_text())
    student = build_student_from_config(config)
    load_trainable_state_dict(student, safetensors.torch.load_file(folder / "data/06_models/student/weights.safetensors"))
    teacher = build_backbone(BackboneConfig.from_dict(config["teacher"])).eval()
    evaluation, denoising = base_params["evaluation"], base_params["teacher_denoising"]
    denoising = from_mapping(TeacherDenoisingConfig, denoising, "teacher_denoising")
    with torch.no_grad():
        report, _, _ = planted_artifact_evaluation(
            teacher, student.eval(), pixels, base_params["seed"], denoising.tta,
            reference_views=evaluation["planted"]["reference_views"], k=evaluation["outlier_k"],
            low_cosine=evaluation["planted"]["low_cosine"], batch_size=denoising.batch_size, figure_images=1,
            max_images_per_forward=denoising.max_images_per_forward)
    history = (folder / "data/07_model_output/loss_history.csv").read_text().strip().splitlines()
    header, last = history[0].split(","), history[-1].split(",")
    row = dict(zip(header, last))
    steps = sum(int(line.split(",")[header.index("steps")]) for line in history[1:])
    return {"report": report, "steps": steps, "final_loss": float(row["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every arm (default: conf/base's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    parser.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it")
    args = parser.parse_args()

    import torch
    from kedro.config import OmegaConfigLoader

    from ph_reg.io.shards import ShardReader

    loader = OmegaConfigLoader(str(ROOT / "conf"), base_env="base", default_run_env="base")
    base_params = loader["parameters"]
    epochs = args.epochs or base_params["student_distillation"]["training"]["epochs"]
    work = args.keep or Path(tempfile.mkdtemp(prefix="target_modes_"))
    results = {}
    for name, overrides in ARMS.items():
        folder = project_copy(work / name.replace(" ", "_").replace("=", ""))
        results[name] = {"times": run_arm(folder, overrides, epochs), "folder": folder}
    reference = ShardReader(results["cached K=1"]["folder"] / "data/02_intermediate/prepared_images")
    split = base_params["evaluation"]["split"]
    indices = sorted(reference.indices(split=split), key=lambda i: (reference.meta(i)["crop"], i))
    pixels = torch.stack([reference[i]["image"] for i in indices])
    lines = [f"Planted-artifact benchmark of conf/base, {epochs} epochs per arm, {len(indices)} held-out images "
             f"(split {split!r}); cosine to the TTA-denoised clean model; outlier rate = share of tokens with cosine "
             f"< {base_params['evaluation']['planted']['low_cosine']} (direction rule).", "",
             "| arm | optimizer steps | teacher denoising (s) | training (s) | denoising + training (s) | "
             "cosine, all | cosine, planted | cosine, rest | outlier rate | final loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    teacher_row = None
    for name, arm in results.items():
        measured = measure(arm["folder"], pixels, base_params)
        sources = measured["report"]["sources"]
        times = arm["times"]
        if teacher_row is None:
            t = sources["teacher"]
            teacher_row = (f"| implanted teacher (no distillation) | - | - | - | - | {t['cosine']['all']:.3f} | "
                           f"{t['cosine']['planted']:.3f} | {t['cosine']['rest']:.3f} | "
                           f"{t['direction']['rate']:.4f} | - |")
        s = sources["student"]
        lines.append(f"| {name} | {measured['steps']} | {times['teacher_denoising']:.0f} | "
                     f"{times['student_distillation']:.0f} | "
                     f"{times['teacher_denoising'] + times['student_distillation']:.0f} | {s['cosine']['all']:.3f} | "
                     f"{s['cosine']['planted']:.3f} | {s['cosine']['rest']:.3f} | {s['direction']['rate']:.4f} | "
                     f"{measured['final_loss']:.4f} |")
    lines.append(teacher_row)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
