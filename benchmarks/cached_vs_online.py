"""(c) Online vs cached targets: one online epoch (OnlineTargets, n views) / one cached epoch (TargetPairs).

Set-up (untimed): K builtin sample photos are prepared as square crops into a shard store
(``prepared_records``), and the teacher's TTA-denoised targets are written once into a second store
(``denoised_target_records``), as the teacher_denoising pipeline does. Then, interleaved:

- ``cached``: ``distill(epochs=1)`` on ``TargetPairs(images store, targets store)``;
- ``online``: ``distill(epochs=1, online_targets=OnlineTargets(teacher, n_views))`` on ``RandomCrops`` of the same
  stored crops (already square, so the crop is fixed): the teacher runs n views per image for every batch.

Same images, same student (NACLIP teacher, MaskCLIP student with registers, DEFAULT_TRAINABLE). Target: >= 3.

    python benchmarks/cached_vs_online.py [--quick]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _bench

from ph_reg.data.prepare import DataPreparationConfig, prepared_records
from ph_reg.method.data import RandomCrops, StoredImageLoader
from ph_reg.method.data import TargetPairs
from ph_reg.method.train import distill
from ph_reg.method.config import DistillConfig
from ph_reg.method.targets import OnlineTargets
from ph_reg.method.tta import TTAConfig
from ph_reg.io.shards import ShardReader, write_shards
from ph_reg.models import DEFAULT_TRAINABLE, BackboneConfig, build_backbone
from ph_reg.method.targets import denoised_target_records

TARGET = 3.0
SEED = 0


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0], repeats=3, warmup=1)
    p.add_argument("--arch", default="open_clip:ViT-S-16",
                   help="ViT-S/16 keeps the default run under 3 min; open_clip:ViT-B-16 is the paper's model")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--images", type=int, default=8, help="K: training images (one epoch)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--registers", type=int, default=16)
    args = p.parse_args()
    if args.quick:
        args.arch, args.img_size, args.images, args.batch, args.repeats = "open_clip:ph-reg-tiny-ViT-16", 64, 4, 2, 3
    started = time.perf_counter()
    backbone = dict(arch=args.arch, img_size=args.img_size)
    teacher = build_backbone(BackboneConfig(**backbone, head="naclip")).eval()
    student = build_backbone(BackboneConfig(**backbone, head="maskclip", num_registers=args.registers))
    student.set_trainable(DEFAULT_TRAINABLE)
    config = DistillConfig(epochs=1, batch_size=args.batch, checkpoint_every=1)
    max_per_forward = args.batch * args.views

    with tempfile.TemporaryDirectory(prefix="ph-reg-bench-") as tmp:
        prep = DataPreparationConfig(image_size=args.img_size, max_images=args.images, val_fraction=0.0)
        write_shards(Path(tmp) / "images", prepared_records(prep, SEED))
        images = ShardReader(Path(tmp) / "images")
        prepare_started = time.perf_counter()
        write_shards(Path(tmp) / "targets", denoised_target_records(
            teacher, images, SEED, TTAConfig(n_views=args.views), batch_size=args.batch,
            max_images_per_forward=max_per_forward, progress=False))
        prepare_seconds = time.perf_counter() - prepare_started
        targets = ShardReader(Path(tmp) / "targets")
        indices = list(range(len(images)))
        cached = TargetPairs(images, targets, indices, student.mean, student.std)
        crops = RandomCrops([StoredImageLoader(images, i) for i in indices], args.img_size, student.mean,
                            student.std, SEED)
        online = OnlineTargets(teacher, SEED, TTAConfig(n_views=args.views), max_per_forward)
        _bench.header("Online vs cached teacher targets (one epoch each)", {
            "models": f"{args.arch} at {args.img_size} px, teacher head naclip, student head maskclip + "
                      f"{args.registers} registers (random weights)",
            "epoch": f"{len(images)} images (builtin sample photos), batch {args.batch}, {args.views} TTA views",
            "target store": f"written once in {prepare_seconds:.1f} s (not timed below)",
            "rounds": f"{args.warmup} warm-up + {args.repeats} timed, interleaved",
        })

        def run_cached() -> None:
            distill(student, cached, config, SEED, progress=False)

        def run_online() -> None:
            distill(student, crops, config, SEED, progress=False, online_targets=online)

        timings = _bench.time_interleaved({"cached epoch": run_cached, "online epoch": run_online},
                                          args.repeats, args.warmup)
        _bench.print_times(timings, unit="epoch")
        _bench.print_ratio("cached_vs_online (online epoch / cached epoch)", timings, "online epoch",
                           "cached epoch", TARGET, at_most=False)
    _bench.footer(started)


if __name__ == "__main__":
    main()
