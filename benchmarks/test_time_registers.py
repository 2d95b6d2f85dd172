"""Cost of test-time registers: detection time per image, and inference with test-time registers against the plain
model and against a PH-Reg-style student (post-hoc registers), side by side at two resolutions.

Inference variants (same open_clip tower, MaskCLIP head, eval mode, no gradients, random weights): ``plain`` (no
extra token), ``ttr`` (``r`` zero test-time registers and the intervention on ``k`` register neurons spread over the
first half of the blocks: one hidden-activation copy per such block), ``student`` (``m`` post-hoc registers). Expected:
``ttr / plain`` about ``1 + r / (N + 1)`` plus the hooks' copies, ``student / plain`` about ``1 + m / (N + 1)``.
Detection: ``detect_register_neurons`` over ``--images`` images (threshold 0: every token an outlier, the heaviest
case), per image, next to one plain forward per image.

    python benchmarks/test_time_registers.py [--quick]
"""

from __future__ import annotations

import time

import _bench
import torch

from ph_reg.models import BackboneConfig, build_backbone
from ph_reg.models.test_time_registers import (TestTimeRegistersConfig, attach_test_time_registers,
                                               detect_register_neurons)


def spread_neurons(depth: int, hidden: int, k: int) -> list[tuple[int, int]]:
    """``k`` (layer, neuron) pairs over the first half of the blocks (as detected neurons sit in the middle)."""
    layers = max(1, depth // 2)
    return [(i % layers, (97 * i) % hidden) for i in range(k)]


def inference(args, size: int) -> None:
    base = dict(arch=args.arch, img_size=size, head="maskclip")
    plain = build_backbone(BackboneConfig(**base)).eval()
    ttr = build_backbone(BackboneConfig(**base)).eval()
    student = build_backbone(BackboneConfig(**base, num_registers=args.registers)).eval()
    depth = plain._blocks_prefix()[1]
    attach_test_time_registers(ttr, spread_neurons(depth, ttr.mlp_site(0).hidden, args.neurons),
                               {"num_registers": args.ttr})
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = (size // plain.patch_size) ** 2 + 1
    _bench.header(f"Inference at {size} px", {
        "model": f"{args.arch}, MaskCLIP head, batch {args.batch} (random weights)",
        "tokens": f"N + 1 = {tokens}; ttr adds r = {args.ttr} (k = {args.neurons} neurons); student m = "
                  f"{args.registers}",
        "expected": f"ttr / plain ~ {1 + args.ttr / tokens:.4f} + hooks; student / plain ~ "
                    f"{1 + args.registers / tokens:.4f}",
    })
    variants = {name: torch.no_grad()(lambda model=model: model(images))
                for name, model in (("plain", plain), ("ttr", ttr), ("student", student))}
    timings = _bench.time_interleaved(variants, args.repeats, args.warmup)
    _bench.print_times(timings)
    _bench.print_ratio(f"{size}px ttr / plain", timings, "ttr", "plain")
    _bench.print_ratio(f"{size}px student / plain", timings, "student", "plain")
    _bench.print_ratio(f"{size}px ttr / student", timings, "ttr", "student")


def detection(args, size: int) -> None:
    model = build_backbone(BackboneConfig(arch=args.arch, img_size=size, head="vanilla")).eval()
    images = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(1))
    config = TestTimeRegistersConfig(norm_threshold=0.0, num_images=args.images, batch_size=args.batch,
                                     top_k=args.neurons)
    _bench.header(f"Detection at {size} px", {"images": f"{args.images}, batch {args.batch}",
                                              "compared with": "plain forwards of the same batches"})

    @torch.no_grad()
    def forwards() -> None:
        for batch in images.split(args.batch):
            model.forward_tokens(batch, pre_norm=True)

    timings = _bench.time_interleaved({"detection": lambda: detect_register_neurons(model, images, config),
                                       "plain forwards": forwards}, args.repeats_detection, 1)
    _bench.print_times(timings, per={name: float(args.images) for name in ("detection", "plain forwards")},
                       unit="image")
    _bench.print_ratio(f"{size}px detection / plain forward", timings, "detection", "plain forwards")


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0], repeats=8, warmup=1)
    p.add_argument("--arch", default="open_clip:ViT-B-16")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ttr", type=int, default=1, help="test-time registers r")
    p.add_argument("--neurons", type=int, default=10, help="register neurons k (the public CLIP ViT-B/16 top_k)")
    p.add_argument("--registers", type=int, default=16, help="post-hoc registers m of the student")
    p.add_argument("--images", type=int, default=4, help="detection images")
    p.add_argument("--repeats-detection", type=int, default=3)
    args = p.parse_args()
    if args.quick:
        args.arch, args.sizes, args.repeats, args.images, args.repeats_detection = (
            "open_clip:ph-reg-tiny-ViT-16", [64, 128], 10, 4, 3)
    started = time.perf_counter()
    for size in args.sizes:
        inference(args, size)
    for size in args.sizes:
        detection(args, size)
    _bench.footer(started)


if __name__ == "__main__":
    main()
