"""Linear-probe training with the frozen-feature cache vs without it, for the same iterations.

"With cache": ``train_segmentation_probe`` reading a feature store written once (the cache build is timed too
and reported separately). "Without": the same probe, optimiser and batches, but every batch's features come from
a backbone forward on the images, as a probe without a cache would do. Prints the time per run and the ratio
(without / with), and (without) / (cache build + with).

    python benchmarks/probe_cache.py            # open_clip ViT-B-16 at 224, 60 iterations, batch 8, 2 repeats
    python benchmarks/probe_cache.py --quick    # tiny model, seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from ph_reg.evaluation.benchmarks import SyntheticScenes
from ph_reg.io.shards import ShardReader, write_shards
from ph_reg.models import build_backbone
from ph_reg.evaluation.probes import feature_stream, train_segmentation_probe
from ph_reg.evaluation.probes.segmentation import LinearSegmentationProbe, poly_lr_lambda
from ph_reg.runtime import generator, normalize


def train_without_cache(model, images, store, iterations, batch_size, seed):
    """The cached training loop, with each batch's features recomputed by the backbone from the image crops
    (the same crops, labels, batch order and probe as the cached run)."""
    probe = LinearSegmentationProbe(model.embed_dim, store.attrs["num_classes"])
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lr_lambda(iterations, 0.9))
    gen = generator(seed, "segmentation_probe_batches")
    size = min(batch_size, len(store))
    done = 0
    while done < iterations:
        perm = torch.randperm(len(store), generator=gen).tolist()
        for first in range(0, len(perm) - size + 1, size):
            if done == iterations:
                break
            records = [store[i] for i in perm[first:first + size]]
            crops = []
            for i, record in zip(perm[first:first + size], records):
                top, left, bottom, right = record["box"].tolist()
                crops.append(images[i][:, top:bottom, left:right])
            with torch.no_grad():
                patch = model(normalize(torch.stack(crops), model.mean, model.std)).patch
            label = torch.stack([r["label"] for r in records]).long()
            loss = F.cross_entropy(probe(patch, size=label.shape[-2:]), label, ignore_index=255)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            done += 1
    return probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        arch, size, images, iterations, repeats = "open_clip:ph-reg-tiny-ViT-16", 64, 8, 20, 2
    else:
        arch, size, images, iterations, repeats = "open_clip:ViT-B-16", 224, 32, 60, args.repeats
    model = build_backbone({"arch": arch, "img_size": size, "head": "maskclip"}).eval()
    dataset = SyntheticScenes(images, image_size=size, seed=0, split="train")
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        stream = feature_stream(model, dataset, size, split_kind="train", seed=0, feature_dtype="float32")
        write_shards(folder, stream.records, attrs=stream.attrs)
        build = time.perf_counter() - started
        store = ShardReader(folder)
        # images at the size the cache cropped from (the synthetic images are already that size); rendered once,
        # outside the timings, so only the backbone forward separates the two runs
        pixels = [dataset[i].image for i in range(len(dataset))]
        config = {"iterations": iterations, "batch_size": 8}
        with_cache, without_cache = [], []
        train_segmentation_probe(store, {**config, "iterations": 2})  # warm-up
        for _ in range(repeats):  # interleaved, side by side
            started = time.perf_counter()
            train_segmentation_probe(store, config, seed=0)
            with_cache.append(time.perf_counter() - started)
            started = time.perf_counter()
            train_without_cache(model, pixels, store, iterations, 8, seed=0)
            without_cache.append(time.perf_counter() - started)
    cached, uncached = statistics.median(with_cache), statistics.median(without_cache)
    print(f"model {arch} at {size}px, {images} images, {iterations} iterations, batch 8, {repeats} repeats (medians)")
    print(f"cache build (one backbone pass over the images): {build:.2f} s")
    print(f"probe training with cache:    {cached:.2f} s")
    print(f"probe training without cache: {uncached:.2f} s")
    print(f"ratio without / with cache: {uncached / cached:.1f}x")
    print(f"ratio without / (cache build + with cache): {uncached / (build + cached):.1f}x")


if __name__ == "__main__":
    main()
