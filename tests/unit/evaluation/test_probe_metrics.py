import math

import pytest
import torch

from ph_reg.evaluation.probes import DepthMetrics, eigen_crop_mask, segmentation_metrics


def _confusion(pred, target, num_classes, ignore=255):
    keep = target != ignore
    return torch.bincount(target[keep] * num_classes + pred[keep], minlength=num_classes ** 2).view(num_classes, -1)


def test_segmentation_metrics_ignore_and_absent_class():
    # classes 0..3; class 3 is predicted only on ignored pixels -> absent from both after ignoring
    target = torch.tensor([[0, 0, 0, 1], [1, 2, 255, 255]])
    pred = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 3]])
    expected_confusion = torch.tensor([[2, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(_confusion(pred, target, 4), expected_confusion)
    # IoU: 2/3, 2/4, 0/1, class 3 left out; recall: 2/3, 2/2, 0/1
    metrics = segmentation_metrics(4)
    metrics.update(pred[None], target[None])
    out = metrics.compute()
    assert out["mIoU"].item() == pytest.approx((2 / 3 + 0.5 + 0) / 3, abs=1e-6)
    assert out["mAcc"].item() == pytest.approx((2 / 3 + 1 + 0) / 3, abs=1e-6)


def test_segmentation_metrics_predicted_only_class_and_accumulation():
    # 5 classes: class 3 predicted once but never in the target, class 4 only predicted on an ignored pixel
    target = torch.tensor([0, 0, 0, 1, 1, 2, 255, 255, 1])
    pred = torch.tensor([0, 0, 1, 1, 1, 1, 0, 4, 3])
    expected_confusion = torch.tensor([[2, 1, 0, 0, 0], [0, 2, 0, 1, 0], [0, 1, 0, 0, 0], [0] * 5, [0] * 5])
    assert torch.equal(_confusion(pred, target, 5), expected_confusion)
    metrics = segmentation_metrics(5)
    metrics.update(pred[:4], target[:4])  # accumulated over batches as one confusion matrix
    metrics.update(pred[4:], target[4:])
    out = metrics.compute()
    # IoU 2/3, 2/5, 0, 0 (class 3 counts with IoU 0), class 4 left out
    assert out["mIoU"].item() == pytest.approx((2 / 3 + 2 / 5) / 4, abs=1e-6)
    # recall 2/3, 2/3, 0; class 3 (predicted, absent from the target: 0/0) is left out, as in mmseg's nanmean
    assert out["mAcc"].item() == pytest.approx((2 / 3 + 2 / 3 + 0) / 3, abs=1e-6)


def test_segmentation_metrics_rejects_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        segmentation_metrics(1)


GT = torch.tensor([[[1.0, 2.0, 4.0]], [[0.0, 20.0, 5.0]], [[0.0, 0.0, 0.0]]])
PRED = torch.tensor([[[1.0, 2.5, 2.0]], [[3.0, 3.0, 4.0]], [[1.0, 1.0, 1.0]]])


def test_depth_metrics_per_pixel():
    metric = DepthMetrics()
    metric.update(PRED[:1], GT[:1])
    metric.update(PRED[1:], GT[1:])
    out = metric.compute()
    # valid pixels: 1, 2, 4 (image 1) and 5 (image 2); squared errors 0, .25, 4, 1; ratios 1, 1.25, 2, 1.25
    assert out["RMSE"].item() == pytest.approx(math.sqrt(5.25 / 4))
    assert out["AbsRel"].item() == pytest.approx((0 + 0.25 + 0.5 + 0.2) / 4)
    assert out["delta1"].item() == pytest.approx(1 / 4)  # 1.25 is not < 1.25
    assert out["delta2"].item() == pytest.approx(3 / 4)
    assert out["delta3"].item() == pytest.approx(3 / 4)


def test_depth_metrics_per_image():
    metric = DepthMetrics(per_image=True)
    metric.update(PRED, GT)  # image 3 has no valid pixel and does not count
    out = metric.compute()
    assert out["RMSE"].item() == pytest.approx((math.sqrt(4.25 / 3) + 1.0) / 2)
    assert out["AbsRel"].item() == pytest.approx((0.25 + 0.2) / 2)
    assert out["delta1"].item() == pytest.approx((1 / 3 + 0) / 2)
    assert out["delta2"].item() == pytest.approx((2 / 3 + 1) / 2)
    assert out["delta3"].item() == pytest.approx((2 / 3 + 1) / 2)


def test_depth_metrics_mask_clamp_and_empty():
    metric = DepthMetrics()
    mask = torch.tensor([[True, True, False]])
    # pixel 3 masked out; prediction 30 is clamped to max_depth 10 -> exact at gt 10 (10 is valid)
    metric.update(torch.tensor([[1.0, 30.0, 2.0]]), torch.tensor([[1.0, 10.0, 4.0]]), mask)
    out = metric.compute()
    assert out["RMSE"].item() == pytest.approx(0.0) and out["delta1"].item() == pytest.approx(1.0)
    empty = DepthMetrics()
    empty.update(torch.ones(2, 2), torch.zeros(2, 2))
    assert math.isnan(empty.compute()["RMSE"].item())
    with pytest.raises(ValueError, match="mask"):
        metric.update(torch.ones(2, 2), torch.ones(2, 2), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="preds and target"):
        metric.update(torch.ones(2, 2), torch.ones(2, 3))


def test_eigen_crop_mask():
    mask = eigen_crop_mask(480, 640)
    assert mask.dtype == torch.bool and mask.sum().item() == (471 - 45) * (601 - 41)
    assert mask[45, 41] and mask[470, 600] and not mask[44, 41] and not mask[45, 601]
    with pytest.raises(ValueError, match="Eigen crop"):
        eigen_crop_mask(240, 320)
