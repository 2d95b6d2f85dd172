"""The planted-artifact benchmark and the component ablation on ground truth (docs/method.md section 7).

A teacher with planted artifacts (``ph_reg.models.implant``) is distilled into students: no registers vs ``--registers``
registers, plain teacher targets (1 view, the identity) vs TTA-denoised targets (``--views`` views). Every student
is a copy of the implanted teacher (it carries the same implant) with the student head. All sources are then
measured on the held-out crops against the planted mask and the TTA-denoised clean model
(``ph_reg.evaluation.planted``), and optionally with the synthetic linear probes (``--probes``).

    python benchmarks/artifact_ablation.py --quick       # tiny model, about a minute
    python benchmarks/artifact_ablation.py               # the embedded default: ViT-B-16 at 224, 8 epochs (~1 h)
    python benchmarks/artifact_ablation.py --img-size 160 --epochs 4    # reduced (~15 min on 2 cores)

Data: the sample photos of ``ph_reg.data.sources.SAMPLE_PHOTOS`` cut into fixed crops, split into train / held-out as
the data-preparation stage does (``val_fraction`` hash split).
"""

from __future__ import annotations

import _bench  # noqa: F401  (offline environment, src on the path, quiet logs)

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ph_reg.evaluation.planted import (SourceFeatures, add_probe_results, artifact_benchmark, benchmark_features,
                                       check_targets, tta_tokens)
from ph_reg.reporting.figures import benchmark_figure
from ph_reg.reporting.tables import benchmark_markdown
from ph_reg.data.prepare import DataPreparationConfig, prepared_records
from ph_reg.method.tta import TTAConfig
from ph_reg.method.data import TargetPairs
from ph_reg.method.train import distill
from ph_reg.method.config import DistillConfig
from ph_reg.models import DEFAULT_TRAINABLE, BackboneConfig, build_backbone, clean_copy
from ph_reg.runtime import normalize

QUICK = dict(arch="open_clip:ph-reg-tiny-ViT-16", img_size=64, epochs=2, batch_size=4, max_images=8,
             probe_images=4, probe_iterations=10)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and data (smoke test)")
    p.add_argument("--arch", default="open_clip:ViT-B-16")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--teacher-head", default="naclip")
    p.add_argument("--student-head", default="maskclip")
    p.add_argument("--implant", default="{}", help="implant parameters as JSON (defaults of ImplantConfig)")
    p.add_argument("--registers", type=int, default=16, help="registers of the 'with registers' arm")
    p.add_argument("--views", type=int, default=10, help="TTA views of the 'denoised' arm (and the reference)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lr-end", type=float, default=1e-5)
    p.add_argument("--crops-per-image", type=int, default=2)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--max-images", type=int, default=None, help="use only the first N photos")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probes", action="store_true", help="also train the synthetic linear probes (slower)")
    p.add_argument("--probe-images", type=int, default=32, help="synthetic training scenes per probe")
    p.add_argument("--probe-iterations", type=int, default=200)
    p.add_argument("--out", type=Path, default=None, help="folder for report.json, report.md and figure.png")
    args = p.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def crops(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, S, S) training and held-out crops of the sample photos."""
    config = DataPreparationConfig(image_size=args.img_size, crops_per_image=args.crops_per_image,
                                   val_fraction=args.val_fraction, max_images=args.max_images)
    records = list(prepared_records(config, args.seed))
    train = torch.stack([r["image"] for r, meta in records if meta["split"] == "train"])
    val = torch.stack([r["image"] for r, meta in records if meta["split"] == "val"])
    return train, val


def probe_results(models: dict[str, torch.nn.Module], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Synthetic segmentation and depth probes on the frozen features of every model."""
    from ph_reg.evaluation.probes.run import probe_feature_streams, run_probes, write_probe_stores

    size = args.img_size
    spec = lambda split, n: {"type": "synthetic", "num_images": n, "image_size": size, "seed": 0, "split": split}
    task = {"train": spec("train", args.probe_images), "val": spec("val", max(2, args.probe_images // 4)),
            "crop_size": size, "stride": size // 2,
            "probe": {"iterations": args.probe_iterations, "batch_size": 8}}
    tasks = {"segmentation": {"synthetic": task}, "depth": {"synthetic": {**task, "flip_tta": True}}}
    streams = probe_feature_streams(models, tasks, args.seed, feature_dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        return run_probes(write_probe_stores(streams, tmp), tasks, args.seed)


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    implant = json.loads(args.implant)
    base = {"arch": args.arch, "img_size": args.img_size, "implant": implant}
    teacher = build_backbone(BackboneConfig(**base, head=args.teacher_head)).eval()
    clean = clean_copy(teacher)
    train, val = crops(args)
    print(f"== planted-artifact ablation: {args.arch} at {args.img_size} px, implant {teacher.config.implant}")
    print(f"   {len(train)} training crops, {len(val)} held-out crops; {args.epochs} epochs at batch "
          f"{args.batch_size}; teacher head {args.teacher_head}, student head {args.student_head}", flush=True)

    train_x = normalize(train, teacher.mean, teacher.std)
    targets = {}
    for views in sorted({1, args.views}):
        t0 = time.perf_counter()
        targets[views] = tta_tokens(teacher, train_x, args.seed, TTAConfig(n_views=views))
        print(f"   targets with {views} view(s): {time.perf_counter() - t0:.0f} s", flush=True)

    students, history = {}, {}
    for registers in (0, args.registers):
        for views in (1, args.views):
            name = f"student_r{registers}_v{views}"
            config = BackboneConfig(**base, head=args.student_head, num_registers=registers)
            student = build_backbone(config)
            student.set_trainable(DEFAULT_TRAINABLE)
            dataset = TargetPairs([{"image": image} for image in train], [{"target": t} for t in targets[views]],
                                  range(len(train)), student.mean, student.std)
            config = DistillConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_end=args.lr_end,
                                   checkpoint_every=args.epochs)
            t0 = time.perf_counter()
            history[name] = distill(student, dataset, config, seed=args.seed, progress=False)
            students[name] = student.eval()
            print(f"   {name}: {time.perf_counter() - t0:.0f} s, loss {history[name][0]['loss']:.4f} -> "
                  f"{history[name][-1]['loss']:.4f}", flush=True)

    val_x = normalize(val, teacher.mean, teacher.std)
    t0 = time.perf_counter()
    features, reference = benchmark_features(students, clean, teacher, val_x, seed=args.seed,
                                             tta=TTAConfig(n_views=args.views))
    planted = teacher.planted_mask(val_x)
    report = artifact_benchmark(features, reference, planted)
    print(f"   benchmark features: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.probes:
        t0 = time.perf_counter()
        probe_teacher = build_backbone(BackboneConfig(**base, head=args.student_head)).eval()
        probes = probe_results({"teacher": probe_teacher, **students}, args)
        add_probe_results(report, probes)
        print(f"   probes: {time.perf_counter() - t0:.0f} s (teacher row: the implanted base model with the "
              f"{args.student_head} head)", flush=True)
    default_student = f"student_r{args.registers}_v{args.views}"
    targets_met = check_targets(report, student=default_student)
    report["settings"] = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    report["history"] = history
    report["targets"] = targets_met
    markdown = benchmark_markdown(report, targets_met)
    print()
    print(markdown)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=2, default=float))
        (args.out / "report.md").write_text(markdown)
        step = args.crops_per_image  # one crop per photo
        shown = {k: SourceFeatures(*(t[::step] for t in features[k])) for k in ("teacher", "target", default_student)}
        figure = benchmark_figure(val[::step], shown, planted[::step], reference[::step])
        figure.savefig(args.out / "figure.png", dpi=80)


if __name__ == "__main__":
    main()
