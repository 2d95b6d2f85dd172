"""The zero-shot evaluation shares its work: one text tower and one embedding per benchmark, one model per head,
each image read once for every head, the figures drawn from the evaluation's own predictions; and every number
and figure is what the heads give when run one by one."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F

import ph_reg.evaluation.zeroshot.run as zero_shot_run
from ph_reg.evaluation.benchmarks import build_dataset
from ph_reg.evaluation.benchmarks.base import DenseSample
from ph_reg.evaluation.zeroshot import ZeroShotConfig, evaluate_zero_shot
from ph_reg.evaluation.zeroshot.harness import ZeroShotHead, evaluate_zero_shot_heads
from ph_reg.models import BackboneConfig, build_backbone
from ph_reg.method.tta import TTAConfig

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class CountingScenes:
    """Random two-class images that count how often each one is read."""

    class_names = ("dark", "light")

    def __init__(self, count: int) -> None:
        self.reads = [0] * count

    def __len__(self) -> int:
        return len(self.reads)

    def __getitem__(self, index: int) -> DenseSample:
        self.reads[index] += 1
        generator = torch.Generator().manual_seed(index)
        image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=generator)
        label = (image.float().mean(0) > 127).long()
        return DenseSample(image=image, label=label, depth=None, name=f"scene{index}")


def _patch_means(scale: float):
    def dense_fn(images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, 16).permute(0, 2, 3, 1) * torch.tensor([1.0, scale, -scale])
    return dense_fn


def test_heads_on_one_pass_score_as_each_head_alone_and_read_each_image_once():
    text = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    settings = ZeroShotConfig(short_side=48, crop=32, stride=16, batch_size=3)
    heads = {"a": ZeroShotHead(_patch_means(0.5), MEAN, STD), "b": ZeroShotHead(_patch_means(-2.0), MEAN, (0.5,) * 3)}
    dataset = CountingScenes(4)
    scores, kept = evaluate_zero_shot_heads(heads, text, [0, 1, 1], 2, dataset, settings, keep=2)
    assert dataset.reads == [1, 1, 1, 1]
    for name, head in heads.items():
        assert scores[name] == evaluate_zero_shot(head.dense_fn, text, [0, 1, 1], 2, CountingScenes(4), settings,
                                                  head.mean, head.std)
    assert scores["a"] != scores["b"]
    assert [sample.name for sample, _ in kept] == ["scene0", "scene1"] and set(kept[0][1]) == {"a", "b"}


def _pngs(figures) -> dict[str, bytes]:
    out = {}
    for name, figure in figures.items():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        out[name] = buffer.getvalue()
    return out


def test_zero_shot_run_builds_once_and_equals_the_separate_runs(monkeypatch):
    base = BackboneConfig(arch="open_clip:ph-reg-tiny-ViT-16", img_size=32, head="naclip")
    student = build_backbone(BackboneConfig(arch="open_clip:ph-reg-tiny-ViT-16", img_size=32, head="maskclip",
                                            num_registers=2, init_seed=3)).eval()
    spec = {"type": "synthetic", "num_images": 3, "image_size": 32, "seed": 1, "split": "val"}
    benchmark = {"dataset": spec, "classes": "dataset", "settings": {"short_side": 32, "crop": 32, "stride": 16}}
    heads, tta = ["naclip", "maskclip_tta", "ph_reg"], TTAConfig(n_views=2)
    figure = {"benchmark": "synthetic", "images": 2, "query": "ball", "spec": benchmark}
    separate = zero_shot_run.zero_shot_evaluation(student, base, heads, {"synthetic": benchmark}, tta=tta)
    separate_figures = _pngs(zero_shot_run.zero_shot_figures(student, base, heads, benchmark, 2, "ball", tta=tta,
                                                             name="synthetic"))

    calls = {"text towers": 0, "models": 0, "reads": 0}

    def counted(name, function):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapped

    class CountedDataset:
        def __init__(self, dataset):
            self.dataset = dataset

        def __getattr__(self, key):
            return getattr(self.dataset, key)

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, index):
            calls["reads"] += 1
            return self.dataset[index]

    monkeypatch.setattr(zero_shot_run, "build_text_encoder", counted("text towers", zero_shot_run.build_text_encoder))
    monkeypatch.setattr(zero_shot_run, "build_backbone", counted("models", zero_shot_run.build_backbone))
    monkeypatch.setattr(zero_shot_run, "build_dataset", lambda spec: CountedDataset(build_dataset(spec)))
    results, figures = zero_shot_run.zero_shot_run(student, base, heads, {"synthetic": benchmark}, figure, tta=tta)
    assert calls == {"text towers": 1, "models": 2, "reads": 3}   # the student is not built: it is given
    assert results == separate
    assert _pngs(figures) == separate_figures
