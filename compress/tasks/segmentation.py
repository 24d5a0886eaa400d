"""Semantic segmentation as a task: training losses, evaluation, report columns.

Training: pixel cross-entropy (ignore label 255) on the decode head's map, plus ``aux_loss_weight``
(default 0.4, a segmenter kwarg) times the cross-entropy of every auxiliary head's map; with a
teacher (a ``distill`` stage, the dense segmenter) ``(1 - alpha) * CE + alpha * T^2 * KL`` per pixel.
With DToP attached the maps are the early-exit ones, so every head trains on what it outputs.

Evaluation (``evaluate``): one image at a time (images differ in size), whole or sliding window as the
dataset says, logits resized to the label map; mmseg's dataset-level mIoU/mAcc/aAcc (``seg_metrics``).
Each image's inference runs under ``FlopCounterMode``, so ``gmacs`` is the executed cost averaged
over the images (DToP's depends on the image); with a token pruner its per-image figures (``forward_figures``:
DToP's exit fractions, in all and per stage) are averaged too. Then latency at batch 1 (median over up to 8 images) and images/s at batch up to 8 of
real images; the first images are kept as the measuring input of the run's benchmark (``example``).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.data.segmentation import IGNORE
from compress.progress import track
from compress.registry import register_task
from compress.tasks.base import Task
from compress.tasks.module import StageModule
from compress.tasks.seg_infer import first_window, infer
from compress.tasks.seg_metrics import confusion_metric, scores

TIMED_IMAGES = 8


def pixel_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over pixels of T^2 * KL(softmax(t / T) || softmax(s / T)) over the class dimension (1)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="none")
    return kl.sum(1).mean() * t * t


def token_pruner(model: nn.Module):
    get = getattr(model, "token_pruner", None)
    return get() if callable(get) else None


class SegmentationModule(StageModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        model = self.model
        maps = model.forward_maps(x, aux=True)
        size = y.shape[-2:]
        final = model.upsample(maps[-1], size)
        loss = ce = F.cross_entropy(final, y, ignore_index=IGNORE)
        self.log("train/ce", ce)
        if len(maps) > 1:
            aux = sum(F.cross_entropy(model.upsample(m, size), y, ignore_index=IGNORE) for m in maps[:-1])
            self.log("train/aux_ce", aux)
            loss = loss + getattr(model, "aux_loss_weight", 0.4) * aux
        if self.teacher is not None:
            cfg = self.stage.distill
            with torch.no_grad():
                t = self.teacher.upsample(self.teacher.forward_maps(x, aux=False)[-1], size)
            kd = pixel_kd(final, t, cfg.temperature)
            self.log("train/kd", kd)
            loss = loss - cfg.alpha * ce + cfg.alpha * kd
        self.log_forward_figures(token_pruner(model))
        loss = self.with_pruner_losses(loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss


def _timing(model: nn.Module, images: List[torch.Tensor], spec: Dict) -> Dict[str, Any]:
    """Latency at batch 1 (median over ``images``) and images/s at batch len(images) when they share a size."""
    infer(model, images[0], spec)  # warm-up
    times = []
    for img in images:
        t0 = time.perf_counter()
        infer(model, img, spec)
        times.append(time.perf_counter() - t0)
    latency = statistics.median(times)
    out = {"latency_ms": latency * 1e3, "images_per_s": 1 / latency, "timing_batch": 1}
    if len(images) > 1 and len({tuple(i.shape) for i in images}) == 1:
        batch = torch.cat(images)
        reps = []
        for _ in range(3):
            t0 = time.perf_counter()
            infer(model, batch, spec)
            reps.append(time.perf_counter() - t0)
        out.update(images_per_s=len(images) / statistics.median(reps), timing_batch=len(images))
    return out


@torch.inference_mode()
def evaluate(model: nn.Module, loader, num_classes: int, device: str = "cpu", label: str = "evaluate",
             keep: Optional[list] = None) -> Dict[str, Any]:
    """mIoU/mAcc/aAcc, executed GMACs per image, exit fractions, latency and images/s (see the module doc)."""
    from torch.utils.flop_counter import FlopCounterMode

    from compress.measure import register_cpu_sdpa_formula

    register_cpu_sdpa_formula()
    dev = torch.device(device)
    model.eval().to(dev)
    ds = loader.dataset
    spec = getattr(getattr(ds, "dataset", ds), "inference", {"mode": "whole"})
    images = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=getattr(loader, "num_workers", 0))
    confusion = confusion_metric(num_classes, sync=False).to(dev)
    policy = token_pruner(model)
    figures: List[Dict[str, torch.Tensor]] = []  # the policy's per-image figures of every forward
    record = (lambda: figures.append(policy.forward_figures())) if policy is not None else None
    macs, n, first = 0.0, 0, []
    for img, target in track(images, label, total=len(ds), unit="images"):
        img, target = img[None].to(dev), target.to(dev)
        counter = FlopCounterMode(display=False)
        with counter:
            logits = infer(model, img, spec, record)
        macs += counter.get_total_flops() / 2
        if logits.shape[-2:] != target.shape:
            logits = F.interpolate(logits, size=target.shape, mode="bilinear", align_corners=False)
        confusion.update(logits.argmax(1)[0].flatten(), target.flatten())
        n += 1
        if len(first) < TIMED_IMAGES:
            first.append(img)
    out: Dict[str, Any] = scores(confusion.compute())
    out.update(images=n, gmacs=macs / max(n, 1) / 1e9)
    for key in dict.fromkeys(k for f in figures for k in f):  # mean over images: a number, or one per column
        mean = torch.cat([f[key] for f in figures if key in f]).float().mean(0)
        out[key] = float(mean) if mean.dim() == 0 else mean.tolist()
    if first:
        out.update(_timing(model, first, spec))
        if keep is not None:
            keep[:] = [first_window(i, spec).cpu() for i in first]
    return out


@register_task("segmentation")
class Segmentation(Task):
    """Semantic segmentation: CE (+ auxiliary heads, + per-pixel KD), mIoU/mAcc/aAcc, executed GMACs per image."""

    name = "segmentation"
    columns = (("mIoU", "mIoU %", ".2f"), ("mAcc", "mAcc %", ".2f"), ("aAcc", "aAcc %", ".2f"),
               ("exit_fraction", "exited %", ".1f"))
    primary = "mIoU"
    eval_columns = (("latency_ms", "latency ms @1", ".1f"),)

    def __init__(self, num_classes: Optional[int] = None):
        super().__init__(num_classes)
        self.examples: list = []  # real images seen by the last evaluation: the benchmark's input

    def module(self, model: nn.Module, stage, teacher: Optional[nn.Module] = None) -> SegmentationModule:
        return SegmentationModule(model, stage, teacher=teacher)

    def evaluate(self, model: nn.Module, loader, device: str = "cpu", label: str = "evaluate") -> dict:
        return evaluate(model, loader, self.num_classes, device, label, keep=self.examples)

    def check_model(self, model: nn.Module, where: str) -> None:
        super().check_model(model, where)
        if not hasattr(model, "forward_maps"):
            from compress.errors import CompressError

            raise CompressError(f"{where}: segmentation data needs a segmenter (model.name: segmenter), "
                                f"got {type(model).__name__}")

    def use_data(self, dataset) -> None:
        """The first images of ``dataset`` (their first sliding window in slide mode) become the measuring input."""
        spec = getattr(getattr(dataset, "dataset", dataset), "inference", {"mode": "whole"})
        self.examples[:] = [first_window(dataset[i][0][None], spec) for i in range(min(TIMED_IMAGES, len(dataset)))]

    def example(self, input_size, batch_size: int, device: str = "cpu"):
        """Real images from the last evaluation when they have ``input_size`` (so an input-dependent
        pruner is measured on what it will see), random ones otherwise."""
        same = [x for x in self.examples if tuple(x.shape[1:]) == tuple(input_size)]
        if not same:
            return super().example(input_size, batch_size, device)
        picks = [same[i % len(same)] for i in range(batch_size)]
        return torch.cat(picks).to(device)
