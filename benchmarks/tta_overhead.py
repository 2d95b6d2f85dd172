"""(a) TTA denoiser overhead: ``TTADenoiser(B images, n views)`` / one plain teacher forward on the same B*n inputs.

The denoiser samples the views, builds the shifted/flipped copies, runs the teacher (one forward: the chunk budget
holds all B*n images) and averages the un-shifted tokens. The baseline is the teacher forward alone on the already
augmented (B*n, 3, H, W) tensor. Both run without gradients in eval mode. Target: ratio <= 1.05.

    python benchmarks/tta_overhead.py [--quick]
"""

from __future__ import annotations

import time

import _bench
import torch

from ph_reg.method.tta import TTAConfig, TTADenoiser, augment_images, max_shift, sample_views
from ph_reg.models import BackboneConfig, build_backbone

TARGET = 1.05


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0], repeats=5, warmup=1)
    p.add_argument("--arch", default="open_clip:ViT-B-16")
    p.add_argument("--head", default="naclip", help="teacher head (PH-Reg's CLIP teacher is NACLIP)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2,
                   help="B: images per denoiser call (2 keeps the default run under 3 min on 2 cores)")
    p.add_argument("--views", type=int, default=10, help="n: TTA views per image")
    args = p.parse_args()
    if args.quick:
        args.arch, args.img_size, args.batch, args.views, args.repeats = "open_clip:ph-reg-tiny-ViT-16", 64, 2, 4, 10
    started = time.perf_counter()
    teacher = build_backbone(BackboneConfig(arch=args.arch, img_size=args.img_size, head=args.head)).eval()
    total = args.batch * args.views
    denoiser = TTADenoiser(lambda x: teacher(x).patch, teacher.patch_size, teacher.fill_value(),
                           TTAConfig(n_views=args.views), max_images_per_forward=total)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    grid = args.img_size // teacher.patch_size
    views = sample_views(args.views, max_shift(grid), torch.Generator().manual_seed(0))
    augmented = augment_images(images, views, teacher.patch_size, teacher.fill_value())
    _bench.header("TTA denoiser overhead", {
        "teacher": f"{args.arch} head={args.head} at {args.img_size} px (random weights)",
        "denoiser": f"B={args.batch} images x n={args.views} views = {total} images in one forward "
                    f"(max_images_per_forward={total})",
        "baseline": f"teacher forward on the pre-augmented ({total}, 3, {args.img_size}, {args.img_size}) tensor",
        "rounds": f"{args.warmup} warm-up + {args.repeats} timed, interleaved",
    })

    @torch.no_grad()
    def plain() -> None:
        teacher(augmented)

    def denoise() -> None:
        denoiser(images, torch.Generator().manual_seed(1))

    times = _bench.time_interleaved({"plain teacher forward": plain, "TTADenoiser": denoise},
                                    args.repeats, args.warmup)
    _bench.print_times(times)
    _bench.print_ratio("tta_overhead (TTADenoiser / plain forward)", times, "TTADenoiser", "plain teacher forward",
                       TARGET)
    _bench.footer(started)


if __name__ == "__main__":
    main()
