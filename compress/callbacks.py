"""Lightning callbacks the stage runner adds (imported only when a stage trains)."""
from __future__ import annotations

import math
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from compress.progress import fmt_seconds, interval, line


class LineProgress(pl.Callback):
    """Training progress without a terminal (logs, CI, batch schedulers): a timestamped line at most every
    ``COMPRESS_PROGRESS_SECONDS`` with the step, the loss and an ETA, and one line per epoch with that
    epoch's training metrics."""

    def __init__(self, label: str):
        self.label = label
        self.start = self.last = 0.0
        self.first_step = 0

    def on_train_start(self, trainer, pl_module):
        self.start = self.last = time.monotonic()
        self.first_step = trainer.global_step  # a resumed stage starts later

    def _steps(self, trainer) -> str:
        total = trainer.estimated_stepping_batches
        done = trainer.global_step
        if not isinstance(total, (int, float)) or math.isinf(total) or total <= 0:
            return f"step {done}"
        text = f"step {done}/{int(total)} ({100 * done / total:.0f} %)"
        ran, elapsed = done - self.first_step, time.monotonic() - self.start
        if ran > 0:
            text += f", {fmt_seconds(elapsed)} elapsed, ETA {fmt_seconds(elapsed / ran * (total - done))}"
        return text

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.monotonic()
        if now - self.last < interval():
            return
        self.last = now
        loss = trainer.callback_metrics.get("train/loss")
        line(f"{self.label}: {self._steps(trainer)}" + (f", loss {float(loss):.4f}" if loss is not None else ""))

    def on_train_epoch_end(self, trainer, pl_module):
        metrics = {k[6:]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        metrics.update(pl_module.epoch_metrics())  # this epoch's, not the last one's (the module logs them after us)
        text = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        line(f"{self.label}: epoch {trainer.current_epoch + 1}{epochs} done, {self._steps(trainer)}: {text}")


class ModelEMA(EMAWeightAveraging):
    """Lightning's EMA of the module's weights (one update per optimizer step, its state in every checkpoint, so a
    mid-stage resume keeps it), copied into the model when training ends by parameter name where the shapes still
    agree: a pruner that restructured the model at the stage's end (APTP's slicing) keeps its new parts as they are."""

    def __init__(self, decay: float):
        super().__init__(decay=decay)

    def on_train_end(self, trainer, pl_module) -> None:
        average = dict(self._average_model.module.named_parameters())
        average.update(self._average_model.module.named_buffers())
        with torch.no_grad():
            for name, current in [*pl_module.named_parameters(), *pl_module.named_buffers()]:
                if name in average and average[name].shape == current.shape:
                    current.copy_(average[name])
