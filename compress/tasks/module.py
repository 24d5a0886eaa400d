"""What every task's LightningModule shares: the model, the stage's optimizer and schedule, the teacher.

The teacher is frozen, in eval mode and kept out of the module tree, so distributed strategies never
wrap or shard it. Optimizers: AdamW or SGD over two parameter groups (no weight decay on norms,
biases, what the model's and its submodules' ``no_weight_decay()`` name (timm's convention: position embeddings, class
and register tokens) and parameters flagged ``_no_weight_decay``, as Mamba marks A and D) with a per-step cosine
schedule and linear warm-up.
"""
from __future__ import annotations

import math
from typing import Optional

import lightning.pytorch as pl
import torch
import torch.nn as nn

from compress.sharing import SharedList


def no_decay_names(model: nn.Module) -> set:
    """The names every (sub)module's ``no_weight_decay()`` gives (timm's convention), as paths in ``model``."""
    names = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{n}" if prefix else n for n in listed()}
    return names


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _CastInputs:
    """Calls the (fp32) teacher with inputs cast to its dtype and hands back outputs in the inputs' dtype: under
    DeepSpeed's bf16/fp16 the batch arrives in half precision, which an fp32 teacher refuses."""

    def __init__(self, teacher: nn.Module):
        self.module = teacher

    def __call__(self, *inputs):
        dtype = next(self.module.parameters()).dtype
        given = next((x.dtype for x in inputs if torch.is_tensor(x) and x.is_floating_point()), dtype)
        out = self.module(*(x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs))
        if given == dtype:
            return out
        cast = lambda t: t.to(given) if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
        return tuple(cast(t) for t in out) if isinstance(out, tuple) else cast(out)

    def __getattr__(self, name):
        return getattr(self.module, name)


class StageModule(pl.LightningModule):
    """Base of the tasks' LightningModules; subclasses write ``training_step`` (and validation)."""

    def __init__(self, model: nn.Module, stage, teacher: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.stage = stage
        self._teacher = SharedList([teacher.eval().requires_grad_(False)] if teacher is not None else [])
        self.pruners = []  # the run's attached pruners; their state rides in mid-stage checkpoints

    @property
    def pruners(self) -> list:
        return self._pruners

    @pruners.setter
    def pruners(self, pruners) -> None:
        self._pruners = SharedList(pruners)  # shared, never copied (e.g. by an EMA's copy of this module)

    @property
    def teacher(self) -> Optional[nn.Module]:
        return _CastInputs(self._teacher[0]) if self._teacher else None

    def forward(self, *args):
        return self.model(*args)

    def on_fit_start(self) -> None:
        if self._teacher:
            self._teacher[0].to(self.device)

    def with_pruner_losses(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` plus every attached pruner's ``training_loss`` of this step (each logged)."""
        for pruner in self.pruners:
            term = pruner.training_loss()
            if term is None:
                continue
            value, logs = term
            loss = loss + value
            self.log(f"train/{pruner.name}_loss", value)
            for k, v in logs.items():
                self.log(f"train/{pruner.name}_{k}", v, prog_bar=True)
        return loss

    def pruner_loss(self, batch):
        """The first attached pruner's ``own_loss`` for ``batch`` (what the task prepared), or None: the task's own."""
        for pruner in self.pruners:
            own = pruner.own_loss(self.model, batch, self.teacher)
            if own is not None:
                return own
        return None

    def log_forward_figures(self, policy) -> None:
        """Log the mean of each per-image figure of ``policy``'s last forward (``Pruner.forward_figures``)."""
        for key, value in (policy.forward_figures() if policy is not None else {}).items():
            if value.dim() == 1:
                self.log(f"train/{key}", float(value.float().mean()), prog_bar=True)

    def epoch_metrics(self) -> dict:
        """The training metrics of the epoch so far (for progress lines); default none."""
        return {}

    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["compress_pruners"] = [p.state_dict() for p in self.pruners]

    def on_load_checkpoint(self, checkpoint) -> None:
        """Runs before Lightning loads the weights: a structured pruner that had already shrunk the model
        when the checkpoint was written shrinks it again, so the weights fit (resume mid-stage)."""
        for pruner, state in zip(self.pruners, checkpoint.get("compress_pruners", [])):
            pruner.load_state_dict(state)

    def configure_optimizers(self):
        cfg, sched = self.stage.optimizer, self.stage.schedule
        decay, no_decay = [], []
        listed = no_decay_names(self.model)
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                skip = (p.ndim <= 1 or getattr(p, "_no_weight_decay", False)
                        or any(name == n or name.startswith(n + ".") for n in listed))
                (no_decay if skip else decay).append(p)
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
