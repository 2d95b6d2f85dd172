"""Zero-shot windows batched across images (issue 15): the same logits as image by image, fewer forwards."""

import math

import torch

from ph_reg.evaluation.benchmarks.base import DenseSample
from ph_reg.evaluation.windows import sliding_windows
from ph_reg.evaluation.zeroshot.harness import (WindowBatcher, ZeroShotConfig, ZeroShotHead, evaluate_zero_shot_heads,
                                                make_dense_fn, segment_image)
from ph_reg.models import build_backbone

SIZES = [(48, 64), (64, 48), (48, 80), (40, 40), (56, 72)]  # mixed shapes: some batches are cut by window size


def _model(head):
    return build_backbone({"arch": "open_clip:ph-reg-tiny-ViT-16", "img_size": 32, "head": head}).eval()


def _samples():
    gen = torch.Generator().manual_seed(3)
    return [DenseSample(torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8),
                        torch.randint(0, 3, (h, w), generator=gen), None, f"s{i}") for i, (h, w) in enumerate(SIZES)]


def _counting(dense_fn, calls):
    def counted(images):
        calls.append(images.shape[0])
        return dense_fn(images)
    return counted


def test_batched_heads_equal_image_by_image_and_need_fewer_forwards():
    settings = ZeroShotConfig(short_side=None, crop=32, stride=16, batch_size=7, patch_size=16)
    text = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    models = {head: _model(head) for head in ("maskclip", "naclip")}
    samples = _samples()
    alone_calls, batched_calls = [], []
    alone = {head: [segment_image(_counting(make_dense_fn(model, head), alone_calls), s.image, text, [0, 1, 2, 2], 3,
                                  settings) for s in samples] for head, model in models.items()}
    heads = {head: ZeroShotHead(_counting(make_dense_fn(model, head), batched_calls)) for head, model in models.items()}
    scores, kept = evaluate_zero_shot_heads(heads, text, [0, 1, 2, 2], 3, samples, settings, keep=len(samples))
    assert [sample.name for sample, _ in kept] == [s.name for s in samples]
    for index, (_, predictions) in enumerate(kept):
        assert list(predictions) == list(models)
        for head in models:
            # a window's features depend on the batch it shares only through the CPU GEMM's blocking (measured: at most 2e-7)
            torch.testing.assert_close(predictions[head].logits, alone[head][index].logits, rtol=0, atol=1e-5)
    windows = [len(sliding_windows(h, 32, 16)) * len(sliding_windows(w, 32, 16)) for h, w in SIZES]
    assert sum(alone_calls) == sum(batched_calls) == 2 * sum(windows)
    assert len(alone_calls) == 2 * sum(math.ceil(n / 7) for n in windows)
    assert len(batched_calls) < len(alone_calls) and max(batched_calls) == 7
    single = evaluate_zero_shot_heads({"maskclip": heads["maskclip"]}, text, [0, 1, 2, 2], 3, samples, settings)[0]
    assert single["maskclip"] == scores["maskclip"]


def test_window_batcher_returns_images_in_order_and_counts_forwards():
    calls = []
    batcher = WindowBatcher(_counting(lambda x: x.mean(1, keepdim=True).permute(0, 2, 3, 1).expand(-1, -1, -1, 2),
                                      calls), torch.randn(3, 2), crop=4, stride=2, batch_size=5, patch_size=1)
    images = [torch.randn(1, 3, 4, 6), torch.randn(3, 4, 6), torch.randn(1, 3, 6, 3)]  # 2, 2 and 2 (4x3) windows
    finished = [key for key, _ in batcher.add("a", images[0])] + [key for key, _ in batcher.add("b", images[1])]
    assert finished == [] and calls == []
    finished += [key for key, _ in batcher.add("c", images[2])]  # a new window size: runs a and b first
    assert finished == ["a", "b"] and calls == [4]
    assert [key for key, _ in batcher.finish()] == ["c"] and calls == [4, 2] and batcher.forwards == 2
