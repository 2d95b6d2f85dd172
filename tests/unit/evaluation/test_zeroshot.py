"""Zero-shot harness: sliding window, text side, decision rule, class files, evaluation, report and figure."""

from __future__ import annotations

import json

import huggingface_hub.constants
import matplotlib
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from ph_reg.method.tta import TTAConfig
from ph_reg.evaluation.benchmarks.base import DenseDataset, DenseSample
from ph_reg.models import BackboneConfig, build_backbone
from ph_reg.models.open_clip import build_open_clip_model
from ph_reg.evaluation.zeroshot import (
    BENCHMARKS,
    OPENAI_IMAGENET_TEMPLATES,
    ZERO_SHOT_HEADS,
    ZeroShotConfig,
    backbone_head,
    build_text_encoder,
    classify,
    evaluate_zero_shot,
    load_class_file,
    make_dense_fn,
    model_dense_fn,
    parse_class_lines,
    segment_image,
    sliding_window_logits,
    sliding_windows,
    text_embeddings,
    tta_dense_fn,
    zero_shot_maps,
)
from ph_reg.config import ConfigError, from_mapping
from ph_reg.evaluation.published import PUBLISHED_TABLE1
from ph_reg.reporting.figures import class_palette, zero_shot_figure
from ph_reg.reporting.tables import table1

matplotlib.use("Agg")

TINY_CLIP = "open_clip:ph-reg-tiny-ViT-16"
IMG = 64
BACKGROUND_26 = ("sky, wall, tree, wood, grass, road, sea, river, mountain, sands, desk, bed, building, cloud, lamp, "
                 "door, window, wardrobe, ceiling, shelf, curtain, stair, floor, hill, rail, fence")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def clip_cfg(**kw) -> BackboneConfig:
    return BackboneConfig(**{"arch": TINY_CLIP, "img_size": IMG, "num_registers": 4, **kw})


def pixels_as_features(images: torch.Tensor) -> torch.Tensor:
    """A 'patch size 1' dense function: every pixel's normalised colour is its feature."""
    return images.permute(0, 2, 3, 1)


def patch_mean_features(images: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """A 'patch size 16' dense function: the mean colour of each patch."""
    return F.avg_pool2d(images, patch).permute(0, 2, 3, 1)


# ---------------------------------------------------------------- sliding window


@pytest.mark.parametrize("length,crop,stride,expected", [
    (448, 336, 112, [(0, 336), (112, 448)]),
    (500, 336, 112, [(0, 336), (112, 448), (164, 500)]),
    (449, 336, 112, [(0, 336), (112, 448), (113, 449)]),
    (336, 336, 112, [(0, 336)]),
    (200, 336, 112, [(0, 200)]),
    (1120, 224, 112, [(i * 112, i * 112 + 224) for i in range(9)]),
    (10, 4, 3, [(0, 4), (3, 7), (6, 10)]),
    (11, 4, 3, [(0, 4), (3, 7), (6, 10), (7, 11)]),
])
def test_sliding_windows_follow_the_formula(length, crop, stride, expected):
    assert sliding_windows(length, crop, stride) == expected


@pytest.mark.parametrize("crop,stride", [(64, 48), (336, 112), (5, 5), (7, 2)])
def test_sliding_windows_cover_every_pixel(crop, stride):
    for length in range(1, 700, 13):
        windows = sliding_windows(length, crop, stride)
        covered = torch.zeros(length, dtype=torch.int64)
        for start, end in windows:
            assert 0 <= start < end <= length and end - start == min(crop, length)
            covered[start:end] += 1
        assert bool((covered > 0).all())
        assert len(windows) == max(length - crop + stride - 1, 0) // stride + 1
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(100, 5, 7)


def test_constant_features_give_constant_logits():
    feature = torch.randn(8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))

    def dense_fn(images):  # every crop: the same vector everywhere (B, h, w, 8) at patch size 16
        b, _, h, w = images.shape
        return feature.expand(b, h // 16, w // 16, -1) * 3.0

    image = torch.randn(1, 3, 208, 288)
    logits = sliding_window_logits(dense_fn, image, text, crop=64, stride=48, batch_size=5)
    expected = F.normalize(text, dim=-1) @ F.normalize(feature, dim=0)
    assert logits.shape == (5, 208, 288)
    torch.testing.assert_close(logits, expected.view(5, 1, 1).expand_as(logits), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size,crop,stride,pad",
                         [((50, 77), 32, 20, 1), ((40, 50), 64, 64, 16), ((70, 33), 48, 16, 16)])
def test_overlapping_windows_are_placed_and_averaged_exactly(size, crop, stride, pad):
    """With per-pixel features the averaged window logits equal the logits of the whole image; padding of crops
    smaller than a multiple of ``pad`` is cut off again (the ``small_window="pad"`` option)."""
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    text = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    logits = sliding_window_logits(pixels_as_features, image, text, crop=crop, stride=stride, batch_size=3,
                                   patch_size=pad, small_window="pad")
    expected = torch.einsum("qc,chw->qhw", F.normalize(text, dim=-1), F.normalize(image[0], dim=0))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_logits_are_upsampled_bilinearly_per_crop():
    """One window covering the image: the result is the patch logits upsampled bilinearly (align_corners False)."""
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    logits = sliding_window_logits(patch_mean_features, image, text, crop=96, stride=96)
    coarse = torch.einsum("qc,bhwc->bqhw", F.normalize(text, dim=-1), F.normalize(patch_mean_features(image), dim=-1))
    expected = F.interpolate(coarse, size=(64, 96), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- text side


def test_openai_templates():
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 and len(set(OPENAI_IMAGENET_TEMPLATES)) == 80
    assert OPENAI_IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert OPENAI_IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert all(t.count("{}") == 1 for t in OPENAI_IMAGENET_TEMPLATES)


class StubText:
    """Tokenizer + encoder: each distinct prompt gets a random vector with a random norm (0.1 .. 10)."""

    def __init__(self, dim: int = 6):
        self.dim, self.vocab, self.seen = dim, {}, []
        self.gen = torch.Generator().manual_seed(0)
        self.table = []

    def tokenizer(self, prompts):
        ids = []
        for prompt in prompts:
            self.seen.append(prompt)
            if prompt not in self.vocab:
                self.vocab[prompt] = len(self.table)
                scale = 10 ** (torch.rand(1, generator=self.gen) * 2 - 1)
                self.table.append(torch.randn(self.dim, generator=self.gen) * scale)
            ids.append(self.vocab[prompt])
        return torch.tensor(ids).view(-1, 1)

    def encode(self, tokens):
        return torch.stack([self.table[i] for i in tokens[:, 0].tolist()])


def test_text_embeddings_average_normalised_templates():
    stub = StubText()
    templates = ["a {}.", "the {} here", "{}!"]
    names = ["cat", "dog", "tv monitor"]
    emb = text_embeddings(stub.encode, stub.tokenizer, names, templates, batch_size=2)
    assert emb.shape == (3, 6) and emb.dtype == torch.float32
    assert stub.seen == [t.format(n) for n in names for t in templates]
    for i, name in enumerate(names):
        raw = torch.stack([stub.table[stub.vocab[t.format(name)]] for t in templates])
        expected = F.normalize(F.normalize(raw, dim=-1).mean(0), dim=0)
        torch.testing.assert_close(emb[i], expected)
        unnormalised_mean = F.normalize(raw.mean(0), dim=0)  # what skipping the per-template normalisation gives
        assert (emb[i] - unnormalised_mean).abs().max() > 1e-3
    again = text_embeddings(stub.encode, stub.tokenizer, names, templates, batch_size=100)
    torch.testing.assert_close(again, emb)
    with pytest.raises(ValueError, match="templates"):
        text_embeddings(stub.encode, stub.tokenizer, names, ["no slot"])


def test_text_encoder_is_the_backbones_seeded_model():
    cfg = clip_cfg()
    with torch.random.fork_rng(devices=[]):  # an independent seeded creation of the full model
        torch.manual_seed(cfg.init_seed)
        reference = open_clip.create_model("ph-reg-tiny-ViT-16")
    vit = build_backbone(cfg).vit.state_dict()
    assert vit.keys() == reference.visual.state_dict().keys()
    for key, value in reference.visual.state_dict().items():
        assert torch.equal(vit[key], value), key
    shared = build_open_clip_model(cfg).visual.state_dict()
    assert all(torch.equal(shared[k], v) for k, v in vit.items())

    encoder, tokenizer = build_text_encoder(cfg)
    text_state = encoder.model.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith("visual."):
            assert torch.equal(text_state[key], value), key
    tokens = tokenizer(["a photo of a cat.", "a tattoo of the dog."])
    with torch.no_grad():
        torch.testing.assert_close(encoder(tokens), reference.eval().encode_text(tokens))
        other, _ = build_text_encoder(clip_cfg(init_seed=1))
        assert not torch.allclose(other(tokens), encoder(tokens))
    emb = text_embeddings(encoder, tokenizer, ["cat", "dog"])
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="open_clip"):
        build_text_encoder(BackboneConfig(arch="timm:test_vit", img_size=IMG))


# ---------------------------------------------------------------- decision and class files


def test_classify_max_over_synonyms_and_threshold():
    # 3 queries -> 2 classes; probabilities (as softmax of log p) at 3 pixels
    probs = torch.tensor([[0.40, 0.20, 0.45], [0.35, 0.10, 0.50], [0.25, 0.70, 0.05]])
    logits = probs.log()  # softmax(1 * log p) = p
    pred, class_probs = classify(logits, [0, 1, 1], 2, logit_scale=1.0)
    torch.testing.assert_close(class_probs, torch.tensor([[0.40, 0.20, 0.45], [0.35, 0.70, 0.50]]))
    assert pred.tolist() == [0, 1, 1]  # pixel 0: max (0.35) not sum (0.60) of the synonyms
    pred, _ = classify(logits, [0, 1, 1], 2, logit_scale=1.0, prob_thd=0.6)
    assert pred.tolist() == [0, 1, 0]  # pixel 2: best 0.50 < 0.6 -> background
    pred, _ = classify(torch.stack([logits[0], logits[2], logits[1]]), [1, 0, 0], 2, logit_scale=1.0)
    assert pred.tolist() == [1, 0, 0]
    # logit scale sharpens the softmax
    cos = torch.tensor([[0.30], [0.25]])
    _, sharp = classify(cos, [0, 1], 2, logit_scale=40.0)
    torch.testing.assert_close(sharp[:, 0], torch.softmax(40 * cos[:, 0], 0))
    with pytest.raises(ValueError, match="query_to_class"):
        classify(cos, [0, 2], 2)
    with pytest.raises(ValueError, match="classes \\[1\\]"):
        classify(cos, [0, 0], 2)


def test_parse_class_lines():
    queries, owners = parse_class_lines(["sky, wall", "cat", "person, person in shirt , body", ""])
    assert queries == ["sky", "wall", "cat", "person", "person in shirt", "body"]
    assert owners == [0, 0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="empty name"):
        parse_class_lines(["a", "b,,c"])
    with pytest.raises(ValueError, match="empty name"):
        parse_class_lines(["a", "", "c"])


@pytest.mark.parametrize("key,lines,queries", [
    ("voc21", 21, 56), ("voc20", 20, 30), ("context60", 60, 60), ("context59", 59, 59),
    ("coco_object", 81, 113), ("coco_stuff", 171, 171), ("cityscapes", 19, 19), ("ade20k", 150, 150),
])
def test_class_file_counts(key, lines, queries):
    class_lines = load_class_file(key)
    names, owners = parse_class_lines(class_lines)
    assert len(class_lines) == lines == BENCHMARKS[key][1]
    assert len(names) == queries and max(owners) == lines - 1 and sorted(set(owners)) == list(range(lines))


def test_class_file_conventions():
    voc21, voc20 = load_class_file("voc21"), load_class_file("voc20")
    assert voc21[0] == BACKGROUND_26 and len(voc21[0].split(", ")) == 26 and voc21[1:] == voc20
    assert voc20[0] == "aeroplane" and voc20[-1] == "television monitor, tv monitor, monitor, television, screen"
    assert voc20[14].split(", ") == ["person", "person in shirt", "person in jeans", "person in dress",
                                     "person in sweater", "person in skirt", "person in jacket"]
    coco = load_class_file("coco_object")
    assert coco[0] == BACKGROUND_26 and coco[1].split(", ")[-1] == "body" and len(coco[1].split(", ")) == 8
    assert coco[-1] == "toothbrush"
    assert load_class_file("context60") == ["background", *load_class_file("context59")]
    assert load_class_file("cityscapes")[:3] == ["road", "sidewalk", "building"]
    assert load_class_file("ade20k")[0] == "wall" and load_class_file("ade20k")[-1] == "flag"
    with pytest.raises(ValueError, match="benchmark"):
        load_class_file("voc")


# ---------------------------------------------------------------- whole images and datasets


class HalvesDataset(DenseDataset):
    """Left half red (class 0), right half blue (class 1); a 16-pixel ignore band on each side of the boundary."""

    name = "halves"

    def __init__(self, sizes):
        self.sizes = sizes
        self.class_names = ["red", "blue"]

    def __len__(self):
        return len(self.sizes)

    def _load(self, index):
        h, w = self.sizes[index]
        image = torch.zeros(3, h, w, dtype=torch.uint8)
        image[0, :, : w // 2] = 220
        image[2, :, w // 2:] = 220
        label = torch.zeros(h, w, dtype=torch.int64)
        label[:, w // 2:] = 1
        label[:, w // 2 - 16: w // 2 + 16] = 255
        return DenseSample(image=image, label=label, depth=None, name=f"halves{index}")


def _colour_queries(mean, std):
    red = (torch.tensor([220 / 255, 0, 0]) - torch.tensor(mean)) / torch.tensor(std)
    blue = (torch.tensor([0, 0, 220 / 255]) - torch.tensor(mean)) / torch.tensor(std)
    return torch.stack([red, blue, 0.9 * blue + 0.1 * red])  # two queries for blue


def test_evaluate_zero_shot_oracle_and_threshold():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    dataset = HalvesDataset([(64, 96), (96, 160), (80, 64)])
    text = _colour_queries(mean, std)
    settings = ZeroShotConfig(short_side=128, crop=64, stride=32, batch_size=4)
    result = evaluate_zero_shot(patch_mean_features, text, [0, 1, 1], 2, dataset, settings, mean, std)
    assert result == {"mIoU": pytest.approx(100.0), "num_images": 3}
    swapped = evaluate_zero_shot(patch_mean_features, text[[1, 0, 0]], [0, 1, 1], 2, dataset, settings, mean, std)
    assert swapped["mIoU"] == pytest.approx(0.0)
    # every max probability is < 1 with logit_scale 1: a threshold of 1 sends every pixel to class 0
    all_background = ZeroShotConfig(short_side=None, crop=64, stride=32, logit_scale=1.0, prob_thd=1.0)
    result = evaluate_zero_shot(patch_mean_features, text, [0, 1, 1], 2, dataset, all_background, mean, std,
                                max_samples=1)
    assert result["num_images"] == 1 and result["mIoU"] == pytest.approx(25.0)  # IoU 0.5 (class 0), 0 (class 1)
    with pytest.raises(ValueError, match="num_classes"):
        evaluate_zero_shot(patch_mean_features, text, [0, 1, 1], 3, dataset, settings, mean, std)


def test_segment_image_returns_original_size():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    image = HalvesDataset([(50, 70)])[0].image
    out = segment_image(patch_mean_features, image, _colour_queries(mean, std), [0, 1, 1], 2,
                        ZeroShotConfig(short_side=64, crop=64, stride=32), mean, std)
    assert out.pred.shape == (50, 70) and out.class_probs.shape == (2, 50, 70) and out.logits.shape == (3, 50, 70)
    assert out.pred[:, :20].eq(0).all() and out.pred[:, -20:].eq(1).all()


def test_settings_validation():
    with pytest.raises(ValueError, match="crop"):
        ZeroShotConfig(short_side=448, crop=0)
    with pytest.raises(ValueError, match="stride"):
        ZeroShotConfig(short_side=448, crop=64)
    with pytest.raises(ValueError, match="prob_thd"):
        ZeroShotConfig(short_side=448, crop=336, prob_thd=1.5)
    with pytest.raises(ConfigError, match=r"settings\.strides: did you mean 'stride'"):
        from_mapping(ZeroShotConfig, {"short_side": 448, "crop": 336, "strides": 1}, "settings")


def test_maskclip_tta_head():
    model = build_backbone(clip_cfg(head="maskclip")).eval()
    x = torch.randn(3, 3, 96, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model_dense_fn(model)(x)
        torch.testing.assert_close(tta_dense_fn(model, TTAConfig(n_views=1))(x), plain)  # identity view only
        tta = make_dense_fn(model, "maskclip_tta", TTAConfig(n_views=4), seed=3)
        first = tta(x)
        assert first.shape == plain.shape and not torch.allclose(first, plain)
        torch.testing.assert_close(tta(x), first)  # re-seeded on every call
        torch.testing.assert_close(torch.cat([tta(x[:1]), tta(x[1:])]), first)  # independent of batching
    with pytest.raises(ValueError, match="head='naclip'"):
        make_dense_fn(model, "naclip")
    with pytest.raises(ValueError, match="head must be one of"):
        backbone_head("maskclip-tta")


def test_every_head_runs_end_to_end_on_the_tiny_model():
    cfg = clip_cfg()
    encoder, tokenizer = build_text_encoder(cfg)
    queries, owners = parse_class_lines(["sky, wall", "red thing", "blue thing"])
    text = text_embeddings(encoder, tokenizer, queries, OPENAI_IMAGENET_TEMPLATES[:4])
    dataset = HalvesDataset([(64, 100)])
    dataset.class_names = ["background", "red", "blue"]
    settings = ZeroShotConfig(short_side=64, crop=64, stride=32, prob_thd=0.1)
    for head in ZERO_SHOT_HEADS:
        model = build_backbone(clip_cfg(head=backbone_head(head))).eval()
        result = evaluate_zero_shot(make_dense_fn(model, head, TTAConfig(n_views=2)), text, owners, 3, dataset, settings)
        assert 0.0 <= result["mIoU"] <= 100.0 and result["num_images"] == 1, head


# ---------------------------------------------------------------- report and figure


def test_table1_against_published_numbers():
    published = PUBLISHED_TABLE1["MaskCLIP"]
    results = {
        "maskclip": {k: v for k, v in published.items() if k != "avg"},
        "naclip": {"voc21": 60.0, "cityscapes": 35.0},
        "vanilla": {"voc21": 10.0},
        "maskclip_tta": {k: 35.0 for k in BENCHMARKS},
    }
    report, markdown = table1(results)
    json.dumps(report)
    assert report["columns"] == ["voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff",
                                 "cityscapes", "ade20k", "avg"]
    maskclip = report["rows"]["maskclip"]
    assert maskclip["ours"]["avg"] == 32.21 and maskclip["published"]["avg"] == 32.21
    assert all(v == 0 for v in maskclip["diff"].values())
    naclip = report["rows"]["naclip"]
    assert naclip["diff"] == {"voc21": 1.12, "cityscapes": -0.48, "avg": pytest.approx(0.32)}
    assert naclip["published"]["avg"] == pytest.approx((58.88 + 35.48) / 2, abs=0.01)
    assert report["rows"]["vanilla"]["published"] == {"voc21": None, "avg": None}
    assert report["rows"]["maskclip_tta"]["published"]["avg"] == 34.55
    assert report["rows"]["maskclip_tta"]["diff"]["avg"] == pytest.approx(0.45)
    lines = markdown.strip().splitlines()
    assert lines[2] == "| head | VOC21 | PC60 | Object | VOC20 | PC59 | Stuff | City | ADE | Avg |"
    assert len(lines) == 4 + len(results)
    assert "| naclip (NACLIP) | 60.00 / 58.88 (+1.12) |" in markdown
    assert "| vanilla | 10.00 |" in markdown


def test_zero_shot_figure():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    image = HalvesDataset([(64, 96)])[0].image
    settings = ZeroShotConfig(short_side=None, crop=64, stride=32)
    pred, heat, feats = zero_shot_maps(patch_mean_features, image, _colour_queries(mean, std), [0, 1, 1], 2,
                                       settings, query=0, mean=mean, std=std)
    assert pred.shape == heat.shape == (64, 96) and feats.shape == (4, 6, 3)
    assert heat[:, :20].min() > 0.99 and heat[:, -20:].max() < 0.01  # query 0 ("red") on the left half
    figure = zero_shot_figure(image, {"a": (pred, heat, feats), "b": (pred, heat, torch.randn(1, 4, 6, 8))},
                              class_palette(2), query_name="red", class_names=["red", "blue"])
    # image, ground truth, legend; prediction, query map, PCA per head; the query map's colour bar
    assert isinstance(figure, Figure) and len(figure.axes) == 3 + 2 * 3 + 1
    shown = figure.axes[3].images[0].get_array()
    assert tuple(shown[0, 0]) == tuple(class_palette(2)[0]) and tuple(shown[0, -1]) == tuple(class_palette(2)[1])
    assert figure.axes[4].get_title() == "a: P('red')"
    with pytest.raises(ValueError, match="class_colours"):
        zero_shot_figure(image, {"a": (pred, heat, feats)}, np.zeros((2, 4)))


def test_class_palette():
    palette = class_palette(21)
    assert palette.shape == (21, 3) and palette.dtype == np.uint8
    assert palette[0].tolist() == [0, 0, 0] and palette[1].tolist() == [128, 0, 0]
    assert palette[15].tolist() == [192, 128, 128]
    assert len({tuple(c) for c in palette}) == 21
