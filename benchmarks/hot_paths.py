"""Issue 15 hot paths, side by side in one run: the cached teacher pass with the shard store's background writer
thread against the synchronous writer (same records, same bytes), the zero-shot forwards of a benchmark run
image by image (as before) against windows batched across images (``WindowBatcher``), and the bytes of the implant's
attention bias on open_clip (per head as before, against the one bias broadcast over the heads).

    python benchmarks/hot_paths.py [--quick]
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import _bench
import torch

from ph_reg.evaluation.windows import sliding_windows
from ph_reg.evaluation.zeroshot.harness import WindowBatcher
from ph_reg.io.shards import ShardReader, ShardWriter, write_shards
from ph_reg.method.targets import denoised_target_records
from ph_reg.method.tta import TTAConfig
from ph_reg.models import build_backbone


def teacher_pass(images: ShardReader, teacher, background: bool, folder: Path, per_shard: int) -> float:
    started = time.perf_counter()
    with ShardWriter(folder, per_shard, {"bench": 1}, background=background) as writer:
        for tensors, meta in denoised_target_records(teacher, images, seed=0, batch_size=4, progress=False,
                                                     tta=TTAConfig(n_views=4)):
            writer.add(tensors, meta)
    return time.perf_counter() - started


def zero_shot_forwards(sizes: list[tuple[int, int]], crop: int, stride: int, batch_size: int) -> tuple[int, int]:
    """(forwards image by image, forwards batched across images) of one head over images of ``sizes``."""
    alone = sum(math.ceil(len(sliding_windows(h, crop, stride)) * len(sliding_windows(w, crop, stride)) / batch_size)
                for h, w in sizes)
    batcher = WindowBatcher(lambda x: x.new_zeros(x.shape[0], 1, 1, 8), torch.randn(3, 8), crop, stride, batch_size)
    for index, (h, w) in enumerate(sizes):
        batcher.add(index, torch.zeros(1, 3, h, w))
    batcher.finish()
    return alone, batcher.forwards


def implant_bias_bytes(arch: str, img: int, registers: int) -> tuple[int, int, int]:
    """(heads, bytes of the bias the implanted blocks get per window, tokens): measured on the mask handed to the
    first block after the implant in one forward of one window (float32 on CPU)."""
    model = build_backbone({"arch": arch, "img_size": img, "head": "vanilla", "num_registers": registers,
                            "implant": {}}).eval()
    block = model.vit.transformer.resblocks[model.implant.block + 1]
    seen = []
    block.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["attn_mask"]), with_kwargs=True)
    with torch.no_grad():
        model.forward_tokens(torch.randn(1, 3, img, img))
    mask = seen[0]
    return block.attn.num_heads, mask.numel() * mask.element_size(), mask.shape[-1]


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0], repeats=3)
    args = p.parse_args()
    quick = args.quick
    teacher = build_backbone({"arch": "open_clip:ph-reg-tiny-ViT-16" if quick else "open_clip:ViT-B-16",
                              "img_size": 224, "head": "naclip"})
    n = 8 if quick else 32
    pixels = torch.randint(0, 256, (n, 3, 224, 224), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    tmp = Path(tempfile.mkdtemp())
    write_shards(tmp / "images", (({"image": x}, {}) for x in pixels))
    images = ShardReader(tmp / "images")
    times = {True: [], False: []}
    for _ in range(args.repeats):
        for background in (False, True):
            times[background].append(teacher_pass(images, teacher, background, tmp / f"t{background}", 4))
    same = all((tmp / "tTrue" / f.name).read_bytes() == f.read_bytes() for f in (tmp / "tFalse").iterdir())
    sync, thread = min(times[False]), min(times[True])
    print(f"teacher pass, {n} images, {teacher.config.arch}: synchronous writer {sync:.2f} s, background writer "
          f"{thread:.2f} s (ratio {thread / sync:.3f}); stores byte-identical: {same}")
    # VOC-like image sizes at short side 448 (the paper's protocol: crop 336, stride 112, 16 windows per forward)
    gen = torch.Generator().manual_seed(1)
    sizes = [(448, int(448 * r)) for r in (1 + torch.rand(500 if not quick else 50, generator=gen) * 0.5).tolist()]
    for crop, batch in ((336, 16), (224, 16)):
        alone, batched = zero_shot_forwards(sizes, crop, 112, batch)
        print(f"zero-shot forwards per head, {len(sizes)} images 448 x 448..672, crop {crop}, stride 112, batch "
              f"{batch}: image by image {alone}, batched across images {batched} ({batched / alone:.2f}x)")
    # the implant's attention bias at 448 px with 16 registers, 16 windows per forward in bf16 (the paper's setting)
    arch = "open_clip:ph-reg-tiny-ViT-16" if quick else "open_clip:ViT-B-16"
    heads, per_window, tokens = implant_bias_bytes(arch, 448, 16)
    after = per_window * 16 // 2  # measured float32 bytes per window -> 16 windows in bf16
    print(f"implant attention bias, {arch} at 448 px, 16 registers ({tokens} tokens), 16 windows in bf16: per head "
          f"(before, {heads} copies) {heads * after / 2**20:.1f} MiB, broadcast over the heads {after / 2**20:.1f} "
          f"MiB ({heads}x less); both built from one float32 bias of {2 * after / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
