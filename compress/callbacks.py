"""Lightning callbacks the stage runner adds (imported only when a stage trains)."""
from __future__ import annotations

import lightning.pytorch as pl


class EpochLog(pl.Callback):
    """One line per epoch when there is no progress bar (logs, CI, pipes)."""

    def on_train_epoch_end(self, trainer, pl_module):
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        text = ", ".join(f"{k[6:]} {v:.4f}" for k, v in sorted(m.items()))
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        steps = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        print(f"[compress]   epoch {trainer.current_epoch + 1}{epochs}, step {trainer.global_step}{steps}: {text}", flush=True)
