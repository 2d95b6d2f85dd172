"""(f) Peak memory of the TTA denoiser with the chunk budget on (max_images_per_forward=16) and off (= B*n).

Each variant runs in a fresh subprocess that builds the NACLIP teacher, makes B random images, calls the
denoiser once (n views) and reports its own peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and its RSS
just before the call. Printed: both peaks, the growth during the call, and the ratios off / on.

Run time: a no-grad forward holds the activations of one block at a time, so the peak does not depend on the
depth. To stay under ~3 min on 2 cores the tower runs ``--depth`` blocks (default 2: one standard block, then the
NACLIP head block), while the weights of the skipped blocks stay referenced in memory, so the weights' share of
the RSS is the full model's. ``--depth 12`` runs the whole ViT-B/16 (about 3 min per variant on 2 cores).

    python benchmarks/tta_memory.py [--quick]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import _bench

GIB = 1024 ** 3


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def child(args) -> None:
    import torch
    from torch import nn

    from ph_reg.method.tta import TTAConfig, TTADenoiser
    from ph_reg.models import BackboneConfig, build_backbone

    teacher = build_backbone(BackboneConfig(arch=args.arch, img_size=args.img_size, head="naclip")).eval()
    blocks = teacher.vit.transformer.resblocks
    if not 2 <= args.depth <= len(blocks):
        raise ValueError(f"--depth must be in [2, {len(blocks)}], got {args.depth}")
    all_blocks = blocks  # keeps the skipped blocks' weights resident
    teacher.vit.transformer.resblocks = nn.ModuleList([*blocks[:args.depth - 1], blocks[-1]])
    denoiser = TTADenoiser(lambda x: teacher(x).patch, teacher.patch_size, teacher.fill_value(),
                           TTAConfig(n_views=args.views), max_images_per_forward=args.max_images)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    before = rss_bytes()
    start = time.perf_counter()
    out = denoiser(images, torch.Generator().manual_seed(1))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak": peak, "before": before, "seconds": seconds, "out": list(out.shape),
                      "blocks_kept": len(teacher.vit.transformer.resblocks), "blocks_total": len(all_blocks)}))


def measure(args, max_images: int) -> dict:
    command = [sys.executable, __file__, "--child", "--arch", args.arch, "--img-size", str(args.img_size),
               "--batch", str(args.batch), "--views", str(args.views), "--depth", str(args.depth),
               "--max-images", str(max_images)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"child {' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0], repeats=1, warmup=0)
    p.add_argument("--arch", default="open_clip:ViT-B-16")
    p.add_argument("--img-size", type=int, default=448)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--chunk", type=int, default=16, help="max_images_per_forward with the budget on")
    p.add_argument("--depth", type=int, default=2, help="transformer blocks run (the last one is the NACLIP head)")
    p.add_argument("--child", action="store_true", help=__import__("argparse").SUPPRESS)
    p.add_argument("--max-images", type=int, default=0, help=__import__("argparse").SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.arch, args.img_size, args.batch, args.views, args.chunk, args.depth = (
            "open_clip:ph-reg-tiny-ViT-16", 64, 4, 4, 4, 2)
    started = time.perf_counter()
    total = args.batch * args.views
    _bench.header("TTA denoiser peak memory (fresh subprocess per variant)", {
        "teacher": f"{args.arch} head=naclip at {args.img_size} px (random weights), {args.depth} blocks run, "
                   "all blocks' weights resident",
        "call": f"B={args.batch} images x n={args.views} views = {total} images",
        "variants": f"chunk budget on (max_images_per_forward={args.chunk}) / off (= {total})",
    })
    results = {}
    for name, max_images in (("budget on", args.chunk), ("budget off", total)):
        for r in range(args.repeats):
            res = measure(args, max_images)
            results.setdefault(name, []).append(res)
            print(f"   {name:>10} (max_images_per_forward={max_images:4d}): peak RSS {res['peak'] / GIB:7.3f} GiB, "
                  f"RSS before the call {res['before'] / GIB:6.3f} GiB, growth {(res['peak'] - res['before']) / GIB:7.3f}"
                  f" GiB, call {res['seconds']:.1f} s", flush=True)
    on, off = (max(r["peak"] for r in results[k]) for k in ("budget on", "budget off"))
    on_growth = max(r["peak"] - r["before"] for r in results["budget on"])
    off_growth = max(r["peak"] - r["before"] for r in results["budget off"])
    print(f"RATIO tta_memory peak RSS (off / on) = {off / on:.3f}  ({off / GIB:.2f} GiB / {on / GIB:.2f} GiB)")
    print(f"      growth during the call (off / on) = {off_growth / max(on_growth, 1):.3f}  "
          f"({off_growth / GIB:.2f} GiB / {on_growth / GIB:.2f} GiB)", flush=True)
    _bench.footer(started)


if __name__ == "__main__":
    main()
