"""Image classification as a LightningModule around any timm-style model.

Cross-entropy (optional label smoothing), torchmetrics top-1/top-5, AdamW or SGD with a per-step
cosine schedule and linear warm-up. With a teacher, the loss adds logit distillation:
``(1 - alpha) * CE + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))``. The teacher is frozen, in
eval mode and kept out of the module tree, so distributed strategies never wrap or shard it.
"""
from __future__ import annotations

import math
from typing import Optional

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics


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


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ClassificationTask(pl.LightningModule):
    def __init__(self, model: nn.Module, num_classes: int, stage, teacher: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.stage = stage
        self.train_metrics = accuracy_metrics(num_classes).clone(prefix="train/")
        self.val_metrics = accuracy_metrics(num_classes).clone(prefix="val/")
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self._teacher[0] if self._teacher else None

    def forward(self, x):
        return self.model(x)

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

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
        self.train_metrics.update(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.train_metrics.compute(), prog_bar=True)
        self.train_metrics.reset()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_metrics.update(self.model(x), y)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)
        self.val_metrics.reset()

    def configure_optimizers(self):
        cfg, sched = self.stage.optimizer, self.stage.schedule
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "dist_token")) else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if cfg.name == "sgd":
            opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        else:
            opt = torch.optim.AdamW(groups, lr=cfg.lr)
        if sched.name == "constant" and not sched.warmup_steps:
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        fn = (lambda s: warmup_cosine(s, total, sched.warmup_steps, sched.min_lr_ratio)) if sched.name == "cosine" else (
            lambda s: min(1.0, (s + 1) / sched.warmup_steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, fn), "interval": "step"}}


@torch.inference_mode()
def evaluate(model: nn.Module, loader, num_classes: int, device: str = "cpu") -> dict:
    """Top-1/top-5 (percent) of ``model`` over ``loader`` without a Trainer."""
    dev = torch.device(device)
    metrics = accuracy_metrics(num_classes, sync=False).to(dev)
    model.eval().to(dev)
    n = 0
    for x, y in loader:
        x, y = x.to(dev), y.to(dev)
        metrics.update(model(x), y)
        n += y.numel()
    out = {k: float(v) * 100 for k, v in metrics.compute().items()}
    out["images"] = n
    return out
