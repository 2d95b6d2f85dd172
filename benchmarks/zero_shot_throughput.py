"""(g) Zero-shot inference cost at 448 px: MaskCLIP : PH-Reg student : NACLIP with 10-view TTA (MaskCLIP = 1).

Each method segments the same normalised 448x448 image through the harness's ``sliding_window_logits`` (cosine
logits against Q random text embeddings, upsampled to the image):

- default ``--mode single``: crop 448, so exactly one window (the setting of the paper's FLOPs at 448:
  MaskCLIP 62.89, PH-Reg 64.16, NACLIP + 10x TTA 647.6 GFLOPs, i.e. about 1 : 1.02 : 10.3);
- ``--mode sliding``: the benchmark protocol, short side 448, crop 336, stride 112 (2x2 = 4 windows).

Methods: ``make_dense_fn`` over a MaskCLIP backbone; the student (same tower, MaskCLIP head, 16 registers);
``tta_dense_fn`` (10 views) over a NACLIP backbone. Random weights (the cost does not depend on them).

    python benchmarks/zero_shot_throughput.py [--quick]
"""

from __future__ import annotations

import statistics
import time

import _bench
import torch

from ph_reg.models import BackboneConfig, build_backbone
from ph_reg.evaluation.windows import sliding_windows
from ph_reg.method.tta import TTAConfig
from ph_reg.evaluation.zeroshot.harness import make_dense_fn, sliding_window_logits, tta_dense_fn

PAPER_GFLOPS = {"MaskCLIP": 62.89, "PH-Reg student": 64.16, "NACLIP + 10x TTA": 647.6}
NUM_QUERIES = 21  # VOC21


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0], repeats=4, warmup=1)
    p.add_argument("--arch", default="open_clip:ViT-B-16")
    p.add_argument("--size", type=int, default=448, help="image side (the short side after resizing)")
    p.add_argument("--mode", choices=("single", "sliding"), default="single")
    p.add_argument("--crop", type=int, default=336, help="crop of --mode sliding")
    p.add_argument("--stride", type=int, default=112)
    p.add_argument("--registers", type=int, default=16)
    p.add_argument("--views", type=int, default=10)
    args = p.parse_args()
    if args.quick:
        args.arch, args.size, args.crop, args.stride, args.repeats = "open_clip:ph-reg-tiny-ViT-16", 64, 48, 16, 5
    crop = args.size if args.mode == "single" else args.crop
    stride = min(args.stride, crop)
    started = time.perf_counter()
    base = dict(arch=args.arch, img_size=crop)
    maskclip = build_backbone(BackboneConfig(**base, head="maskclip")).eval()
    student = build_backbone(BackboneConfig(**base, head="maskclip", num_registers=args.registers)).eval()
    naclip = build_backbone(BackboneConfig(**base, head="naclip")).eval()
    methods = {
        "MaskCLIP": make_dense_fn(maskclip, "maskclip"),
        "PH-Reg student": make_dense_fn(student, "maskclip"),
        f"NACLIP + {args.views}x TTA": tta_dense_fn(naclip, TTAConfig(n_views=args.views)),
    }
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, args.size, args.size, generator=gen)
    text = torch.randn(NUM_QUERIES, maskclip.embed_dim, generator=gen)
    windows = len(sliding_windows(args.size, crop, stride)) ** 2
    _bench.header("Zero-shot throughput (one image, CPU)", {
        "models": f"{args.arch} (random weights); student: maskclip + {args.registers} registers",
        "harness": (f"{args.size}x{args.size} image, crop {crop}, stride {stride}"
                    + f" ({windows} window{'s' if windows > 1 else ''})") + f", {NUM_QUERIES} queries",
        "rounds": f"{args.warmup} warm-up + {args.repeats} timed, interleaved",
    })
    variants = {name: (lambda fn=fn: sliding_window_logits(fn, image, text, crop, stride))
                for name, fn in methods.items()}
    timings = _bench.time_interleaved(variants, args.repeats, args.warmup)
    _bench.print_times(timings, unit="image")
    names = list(methods)
    base_wall, base_cpu = timings.median(names[0]), timings.median(names[0], cpu=True)
    measured = " : ".join(f"{timings.median(n) / base_wall:.3f}" for n in names)
    cpu = " : ".join(f"{timings.median(n, cpu=True) / base_cpu:.3f}" for n in names)
    paper = " : ".join(f"{g / PAPER_GFLOPS['MaskCLIP']:.3f}" for g in PAPER_GFLOPS.values())
    print(f"   throughput: " + ", ".join(f"{n} {1 / timings.median(n):.3f} img/s" for n in names))
    print(f"RATIO zero_shot_throughput time {' : '.join(names)} = {measured}  (paper FLOPs {paper})")
    print(f"      CPU-time ratios {cpu}; median per-round wall ratios "
          + " : ".join(f"{statistics.median(a / b for a, b in zip(timings.wall[n], timings.wall[names[0]])):.3f}"
                       for n in names), flush=True)
    _bench.footer(started)


if __name__ == "__main__":
    main()
