"""(d) Cost of the registers at inference: student (m registers, MaskCLIP head) / MaskCLIP head without registers.

Both are the same open_clip tower at the same resolution, eval mode, no gradients; the only difference is the m
extra tokens in every block. Expected: the linear layers grow with the token count, N + 1 -> N + 1 + m, so the
target is ``1 + m / (N + 1) + 0.03`` (N patches; 784 at 448/16: 1.0504 for m = 16).

    python benchmarks/registers_inference.py [--quick]
"""

from __future__ import annotations

import time

import _bench
import torch

from ph_reg.models import BackboneConfig, build_backbone

SLACK = 0.03


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0], repeats=15, warmup=2)
    p.add_argument("--arch", default="open_clip:ViT-B-16")
    p.add_argument("--img-size", type=int, default=448)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--registers", type=int, default=16)
    args = p.parse_args()
    if args.quick:
        args.arch, args.img_size, args.repeats = "open_clip:ph-reg-tiny-ViT-16", 64, 30
    started = time.perf_counter()
    base = dict(arch=args.arch, img_size=args.img_size, head="maskclip")
    plain = build_backbone(BackboneConfig(**base)).eval()
    student = build_backbone(BackboneConfig(**base, num_registers=args.registers)).eval()
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    num_patches = (args.img_size // plain.patch_size) ** 2
    target = 1 + args.registers / (num_patches + 1) + SLACK
    _bench.header("Registers at inference (MaskCLIP head)", {
        "model": f"{args.arch} at {args.img_size} px, batch {args.batch} (random weights)",
        "tokens": f"N = {num_patches} patches + CLS = {num_patches + 1}; student adds m = {args.registers} registers",
        "target": f"1 + m/(N+1) + {SLACK} = {target:.4f}",
        "rounds": f"{args.warmup} warm-up + {args.repeats} timed, interleaved",
    })

    @torch.no_grad()
    def run_plain() -> None:
        plain(images)

    @torch.no_grad()
    def run_student() -> None:
        student(images)

    timings = _bench.time_interleaved({"MaskCLIP (no registers)": run_plain,
                                       f"student ({args.registers} registers)": run_student},
                                      args.repeats, args.warmup)
    _bench.print_times(timings)
    _bench.print_ratio("registers_inference (student / MaskCLIP)", timings, f"student ({args.registers} registers)",
                       "MaskCLIP (no registers)", target)
    _bench.footer(started)


if __name__ == "__main__":
    main()
