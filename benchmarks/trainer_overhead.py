"""(b) Trainer overhead: ``distill`` (Lightning Fabric loop) per step / a bare PyTorch step, same model and data.

Both variants train the same student (``set_trainable(DEFAULT_TRAINABLE)``, train mode) on the same K batches of
(image, target) pairs held in memory, with a fresh AdamW over ``parameter_groups`` per call:

- ``distill``: ``distill(student, dataset, DistillConfig(epochs=1, batch_size=B), ...)``: Fabric setup, the
  seeded distributed sampler, the DataLoader (num_workers 0), finite checks, loss bookkeeping, one AdamW step per
  batch. The whole call is timed, set-up included, and divided by K.
- ``bare``: for each pre-stacked batch: ``.to(device)``, forward, ``distillation_loss``, ``backward``,
  ``AdamW.step``, ``zero_grad``. No Fabric. The AdamW construction is timed too.

Nothing is subtracted. Target: ratio <= 1.10.

    python benchmarks/trainer_overhead.py [--quick]
"""

from __future__ import annotations

import time

import _bench
import torch
from torch.utils.data import Dataset

from ph_reg.method.data import TrainItem
from ph_reg.method.loss import distillation_loss, parameter_groups
from ph_reg.method.train import distill
from ph_reg.method.config import DistillConfig
from ph_reg.models import DEFAULT_TRAINABLE, BackboneConfig, build_backbone

TARGET = 1.10
SEED = 0


class PreloadedPairs(Dataset):
    """Item ``(epoch, i)`` -> ``TrainItem(image, target)`` from tensors in memory (the cached-mode item)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> TrainItem:
        _, i = item
        return TrainItem(self.images[i], target=self.targets[i])


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0], repeats=5, warmup=1)
    p.add_argument("--arch", default="timm:vit_small_patch16_224")
    p.add_argument("--head", default="default")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--registers", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="K: batches (optimizer steps) per timed call")
    args = p.parse_args()
    if args.quick:
        args.arch, args.head, args.img_size, args.batch, args.steps, args.repeats = (
            "open_clip:ph-reg-tiny-ViT-16", "maskclip", 64, 2, 4, 5)
    started = time.perf_counter()
    student = build_backbone(BackboneConfig(arch=args.arch, img_size=args.img_size, head=args.head,
                                            num_registers=args.registers))
    trainable = student.set_trainable(DEFAULT_TRAINABLE)
    config = DistillConfig(epochs=1, batch_size=args.batch, checkpoint_every=1)
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(SEED)
    count = args.batch * args.steps
    images = torch.randn(count, 3, args.img_size, args.img_size, generator=gen)
    with torch.no_grad():
        out = student(images[:1]).patch
    targets = torch.randn(count, *out.shape[1:], generator=gen)
    dataset = PreloadedPairs(images, targets)
    batches = [(images[i:i + args.batch].clone(), targets[i:i + args.batch].clone())
               for i in range(0, count, args.batch)]
    _bench.header("Trainer overhead (distill vs bare PyTorch step)", {
        "student": f"{args.arch} head={args.head} at {args.img_size} px, {args.registers} registers, "
                   f"trainable {list(DEFAULT_TRAINABLE)} ({sum(student.get_parameter(n).numel() for n in trainable):,} "
                   f"parameters)",
        "call": f"K={args.steps} steps of batch {args.batch} (precision {config.precision} -> 32-true on CPU)",
        "rounds": f"{args.warmup} warm-up + {args.repeats} timed, interleaved",
    })

    def with_distill() -> None:
        distill(student, dataset, config, SEED, progress=False)

    def bare() -> None:
        student.train()
        optimizer = torch.optim.AdamW(parameter_groups(student, config.weight_decay), lr=config.lr,
                                      betas=config.betas)
        for images_b, targets_b in batches:
            images_b, targets_b = images_b.to(device), targets_b.to(device)
            loss, _ = distillation_loss(student(images_b).patch, targets_b, config.mse_weight)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    timings = _bench.time_interleaved({"bare PyTorch": bare, "distill (Fabric)": with_distill},
                                      args.repeats, args.warmup)
    _bench.print_times(timings, per={name: args.steps for name in timings.wall}, unit="step")
    _bench.print_ratio("trainer_overhead (distill step / bare step)", timings, "distill (Fabric)", "bare PyTorch",
                       TARGET)
    _bench.footer(started)


if __name__ == "__main__":
    main()
