"""(e) Input pipeline: training steps fed by the real DataLoader / the same steps on preloaded tensors.

Set-up (untimed): K*B random crops (uint8) and their targets (float16 like the paper config, (h, w, C) of the
student's output) are written to two shard stores in a temporary folder and read back through ``ShardReader``.

- ``DataLoader``: ``TargetPairs`` over the stores, through the DataLoader that ``distill`` builds (the seeded
  ``DistributedSampler`` wrapped in ``EpochTaggedSampler``, ``num_workers`` as in the config); every batch is then
  one training step (forward, ``distillation_loss``, backward, AdamW step).
- ``preloaded``: the same K steps on batches already normalised and stacked in memory.

The stores were just written, so they sit in the page cache: this measures decoding, normalisation and
collation, not a cold disk. The loader alone (no step) is timed too. Target: ratio <= 1.05.

    python benchmarks/input_pipeline.py [--quick]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import _bench
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ph_reg.method.data import EpochTaggedSampler, TargetPairs, collate_items
from ph_reg.method.loss import distillation_loss, parameter_groups
from ph_reg.method.config import DistillConfig
from ph_reg.io.shards import ShardReader, write_shards
from ph_reg.models import DEFAULT_TRAINABLE, BackboneConfig, build_backbone
from ph_reg.method.targets import target_dtype
from ph_reg.runtime import derive_seed

TARGET = 1.05
SEED = 0
RECORDS_PER_SHARD = 256  # the paper configuration's shard size


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0], repeats=5, warmup=1)
    p.add_argument("--arch", default="open_clip:ViT-S-16",
                   help="a smaller model than the paper's ViT-B/16 makes the loader's share larger (stricter)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--registers", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="K: batches per timed call")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (DistillConfig.num_workers)")
    p.add_argument("--target-dtype", default="float16", help="storage dtype of the targets")
    args = p.parse_args()
    if args.quick:
        args.arch, args.img_size, args.batch, args.steps, args.repeats = "open_clip:ph-reg-tiny-ViT-16", 64, 2, 4, 5
    started = time.perf_counter()
    student = build_backbone(BackboneConfig(arch=args.arch, img_size=args.img_size, head="maskclip",
                                            num_registers=args.registers))
    student.set_trainable(DEFAULT_TRAINABLE)
    config = DistillConfig(epochs=1, batch_size=args.batch, num_workers=args.num_workers)
    count = args.batch * args.steps
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        feature_shape = student(torch.zeros(1, 3, args.img_size, args.img_size)).patch.shape[1:]

    with tempfile.TemporaryDirectory(prefix="ph-reg-bench-") as tmp:
        pixels = torch.randint(0, 256, (count, 3, args.img_size, args.img_size), dtype=torch.uint8, generator=gen)
        write_shards(Path(tmp) / "images", (({"image": pixels[i]}, {"split": "train"}) for i in range(count)),
                     RECORDS_PER_SHARD)
        dtype = target_dtype(args.target_dtype)
        write_shards(Path(tmp) / "targets", (({"target": torch.randn(feature_shape, generator=gen).to(dtype)},
                                              {"image_index": i}) for i in range(count)), RECORDS_PER_SHARD)
        dataset = TargetPairs(ShardReader(Path(tmp) / "images"), ShardReader(Path(tmp) / "targets"),
                              range(count), student.mean, student.std)
        sampler = EpochTaggedSampler(DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True,
                                                        seed=derive_seed(SEED, "shuffle") % (1 << 31)))
        workers = config.num_workers
        loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=workers,
                            persistent_workers=workers > 0,
                            multiprocessing_context="spawn" if workers > 0 else None, collate_fn=collate_items)
        preloaded = [collate_items([dataset[(0, j)] for j in range(i, i + args.batch)])
                     for i in range(0, count, args.batch)]
        _bench.header("Input pipeline (DataLoader over shard stores vs preloaded tensors)", {
            "student": f"{args.arch} maskclip + {args.registers} registers at {args.img_size} px, trainable "
                       f"{list(DEFAULT_TRAINABLE)} (random weights)",
            "data": f"{count} records ({args.img_size}px uint8 crops, {args.target_dtype} targets "
                    f"{tuple(feature_shape)}) in shard stores on disk (page cache warm)",
            "call": f"K={args.steps} steps of batch {args.batch}, DataLoader num_workers={workers}",
            "rounds": f"{args.warmup} warm-up + {args.repeats} timed, interleaved",
        })
        optimizer = torch.optim.AdamW(parameter_groups(student, config.weight_decay), lr=config.lr,
                                      betas=config.betas)
        student.train()
        epoch = [0]

        def step(images: torch.Tensor, targets: torch.Tensor) -> None:
            loss, _ = distillation_loss(student(images).patch, targets, config.mse_weight)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def from_loader() -> None:
            epoch[0] += 1
            sampler.use_epoch(epoch[0])
            for batch in loader:
                step(batch.image, batch.target)

        def from_memory() -> None:
            for batch in preloaded:
                step(batch.image, batch.target)

        timings = _bench.time_interleaved({"preloaded tensors": from_memory, "DataLoader (shards)": from_loader},
                                          args.repeats, args.warmup)
        loader_only = []
        for _ in range(args.repeats):
            epoch[0] += 1
            sampler.use_epoch(epoch[0])
            t0 = time.perf_counter()
            for _batch in loader:
                pass
            loader_only.append(time.perf_counter() - t0)
        _bench.print_times(timings, per={name: args.steps for name in timings.wall}, unit="step")
        print(f"   {'DataLoader alone':>30}: median {statistics.median(loader_only) / args.steps:9.4f} s/batch wall")
        _bench.print_ratio("input_pipeline (DataLoader step / preloaded step)", timings, "DataLoader (shards)",
                           "preloaded tensors", TARGET)
    _bench.footer(started)


if __name__ == "__main__":
    main()
