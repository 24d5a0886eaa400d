"""mIoU / mAcc / aAcc with mmsegmentation's dataset-level definition, from a torchmetrics confusion matrix.

Intersections and unions are summed over the whole split (not averaged per image); the ignore label is
left out of every count; a class absent from both the predictions and the ground truth (union 0) has no
IoU and is left out of the mean, and a class absent from the ground truth has no accuracy (mAcc).
``aAcc`` is the pixel accuracy over all labelled pixels. All in percent.
"""
from __future__ import annotations

from typing import Dict

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from compress.data.segmentation import IGNORE


def confusion_metric(num_classes: int, sync: bool = True) -> MulticlassConfusionMatrix:
    """Rows: ground truth, columns: prediction; ``IGNORE`` pixels are dropped."""
    return MulticlassConfusionMatrix(num_classes=num_classes, ignore_index=IGNORE, sync_on_compute=sync)


def scores(confusion: torch.Tensor) -> Dict[str, object]:
    """mIoU, mAcc, aAcc (percent) and the per-class IoU (NaN where undefined) from a confusion matrix."""
    cm = confusion.double()
    intersect = cm.diag()
    area_label, area_pred = cm.sum(1), cm.sum(0)
    union = area_label + area_pred - intersect
    iou = torch.where(union > 0, intersect / union.clamp(min=1), torch.full_like(union, float("nan")))
    acc = torch.where(area_label > 0, intersect / area_label.clamp(min=1), torch.full_like(area_label, float("nan")))
    total = area_label.sum()
    return {
        "mIoU": float(iou.nanmean()) * 100 if bool((union > 0).any()) else float("nan"),
        "mAcc": float(acc.nanmean()) * 100 if bool((area_label > 0).any()) else float("nan"),
        "aAcc": float(intersect.sum() / total) * 100 if total > 0 else float("nan"),
        "class_iou": [None if v != v else round(float(v) * 100, 4) for v in iou.tolist()],
    }
