"""The one Lightning callback through which every attached pruner acts while a stage trains.

The runner adds a single ``PrunerLifecycle`` to each training stage; it turns Lightning's hooks into the
pruner's (``Pruner.stage_setup`` ... ``stage_done``, see ``compress.pruners.base``) and counts optimizer steps
once for all of them, so no pruner brings its own callback, step counter or strategy probe. Pruner state rides
in the stage's checkpoints through the task module (``StageModule.on_save_checkpoint``), not here.
Imported only when a stage trains (``compress.load`` never imports Lightning).
"""
from __future__ import annotations

from typing import List, Optional

import lightning.pytorch as pl
from lightning.pytorch.strategies import DeepSpeedStrategy

from compress.pruners.base import Pruner, StageRun


class PrunerLifecycle(pl.Callback):
    """Drives ``pruners`` (the run's, in attach order) through stage ``index`` (its ``recipe.StageConfig``)."""

    def __init__(self, pruners: List[Pruner], index: int, stage):
        self.pruners = pruners
        self.index = index
        self.stage = stage
        self.run: Optional[StageRun] = None
        self._last_step: Optional[int] = None

    def _each(self, hook: str) -> None:
        for pruner in self.pruners:
            getattr(pruner, hook)(self.run)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self.run = StageRun(index=self.index, stage=self.stage, model=getattr(pl_module, "model", pl_module),
                            trainer=trainer, deepspeed=isinstance(trainer.strategy, DeepSpeedStrategy))
        self._each("stage_setup")

    def on_train_start(self, trainer, pl_module) -> None:
        self.run.model = getattr(pl_module, "model", pl_module)  # the module the strategy set up
        self._last_step = trainer.global_step
        self._each("stage_start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._each("before_batch")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._each("before_optimizer_step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._last_step:  # an optimizer step happened (not only an accumulation batch)
            self._last_step = trainer.global_step
            self._each("after_optimizer_step")

    def on_train_end(self, trainer, pl_module) -> None:
        self._each("stage_end")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._each("stage_done")
