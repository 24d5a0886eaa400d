"""Image classification as a LightningModule around any timm-style model.

Cross-entropy (optional label smoothing), torchmetrics top-1/top-5; optimizer, schedule and the
frozen teacher come from ``StageModule``. With a teacher, the loss adds logit distillation:
``(1 - alpha) * CE + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics

from compress.progress import track
from compress.registry import register_task
from compress.tasks.base import Task
from compress.tasks.module import StageModule


def accuracy_metrics(num_classes: int, sync: bool = True) -> torchmetrics.MetricCollection:
    """Top-1/top-5; ``sync=False`` for a process that evaluates the whole set alone (no DDP all-gather)."""
    return torchmetrics.MetricCollection(
        {
            "top1": torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=1, sync_on_compute=sync),
            "top5": torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=min(5, num_classes),
                                          sync_on_compute=sync),
        }
    )


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="batchmean") * t * t


class ClassificationTask(StageModule):
    def __init__(self, model: nn.Module, num_classes: int, stage, teacher: Optional[nn.Module] = None):
        super().__init__(model, stage, teacher)
        self.train_metrics = accuracy_metrics(num_classes).clone(prefix="train/")

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        if isinstance(logits, tuple):  # distilled DeiT in train mode returns (cls, dist)
            logits = (logits[0] + logits[1]) / 2
        loss = F.cross_entropy(logits, y, label_smoothing=self.stage.label_smoothing)
        self.log("train/ce", loss, prog_bar=False)
        if self.teacher is not None:
            cfg = self.stage.distill
            with torch.no_grad():
                t_logits = self.teacher(x)
            kd = kd_loss(logits, t_logits, cfg.temperature)
            self.log("train/kd", kd)
            loss = (1 - cfg.alpha) * loss + cfg.alpha * kd
        loss = self.with_pruner_losses(loss)
        self.train_metrics.update(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def epoch_metrics(self) -> dict:
        if not any(m.update_count for m in self.train_metrics.values()):
            return {}
        return {k[6:]: float(v) for k, v in self.train_metrics.compute().items()}

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.train_metrics.compute(), prog_bar=True)
        self.train_metrics.reset()

    # evaluation runs outside the Trainer, in one process, through ``Classification.evaluate``


@torch.inference_mode()
def evaluate(model: nn.Module, loader, num_classes: int, device: str = "cpu", label: str = "evaluate") -> dict:
    """Top-1/top-5 (percent) of ``model`` over ``loader`` without a Trainer."""
    dev = torch.device(device)
    metrics = accuracy_metrics(num_classes, sync=False).to(dev)
    model.eval().to(dev)
    n = 0
    for x, y in track(loader, label):
        x, y = x.to(dev), y.to(dev)
        metrics.update(model(x), y)
        n += y.numel()
    out = {k: float(v) * 100 for k, v in metrics.compute().items()}
    out["images"] = n
    return out


@register_task("classification")
class Classification(Task):
    """Image classification: cross-entropy (+ logit KD), top-1/top-5."""

    name = "classification"
    columns = (("top1", "top-1 %", ".2f"), ("top5", "top-5 %", ".2f"))
    primary = "top1"

    def module(self, model: nn.Module, stage, teacher: Optional[nn.Module] = None) -> ClassificationTask:
        return ClassificationTask(model, self.num_classes, stage, teacher=teacher)

    def evaluate(self, model: nn.Module, loader, device: str = "cpu", label: str = "evaluate") -> dict:
        return evaluate(model, loader, self.num_classes, device, label)
