"""ISS-P (Wang et al., ICCV 2023): unstructured sparsity learned while training, by soft shrinkage.

After every optimizer step each prunable layer re-chooses its ceil(p * n) smallest |w| (at most 99.5 %
of the layer; or an N:M pattern) and multiplies exactly those by ``alpha``: nothing is zeroed, the set
can change from step to step, and a weight that stays selected for t steps has shrunk by alpha^t. The
target p is constant from step 1 (no schedule), as in the paper. After ``prune_steps`` optimizer
steps (default: the end of the training stage that attached it) the last selection is frozen as hard
zeros; from then on, e.g. through later finetune/distill stages, the mask is only re-applied after
every optimizer step. Before the first step nothing is pruned and the model equals the dense one.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from pydantic import Field

from compress.pruners.weight import WeightPruner
from compress.pruners.weight import masks as M
from compress.registry import register_pruner


class ISSPConfig(M.WeightPrunerConfig):
    alpha: float = Field(0.95, ge=0, lt=1, description="shrink factor of the selected weights per step (0 = IHT)")
    prune_steps: Optional[int] = Field(None, gt=0, description="optimizer steps of soft shrinkage before the mask is "
                                                               "frozen; default: the whole stage it is attached in")


@register_pruner("issp")
class ISSP(WeightPruner):
    """ISS-P: per-layer magnitude selection every step, soft shrinkage by alpha, then a frozen hard mask."""

    name = "issp"
    Config = ISSPConfig

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.frozen = False

    def after_optimizer_step(self, run=None) -> None:
        if self.frozen:
            self.enforce()
            return
        self.step += 1
        self.masks = self.select(self.config.sparsity)
        M.shrink(self.layers, self.masks, self.config.alpha)
        if self.config.prune_steps is not None and self.step >= self.config.prune_steps:
            self.freeze()

    def freeze(self) -> None:
        """Hard zeros at the last selection (or a fresh one if shrinking never ran); the mask is fixed from now on."""
        if not self.masks:
            self.masks = self.select(self.config.sparsity)
        self.frozen = True
        self.enforce()

    def on_stage_start(self, stage) -> None:
        if self.frozen and not self.masks:  # resumed: the zeros are in the weights; the smallest |w| are those zeros
            self.masks = self.select(self.config.sparsity)
        elif not self.frozen and self.config.prune_steps is None and stage is not None and stage.kind != "prune":
            self.freeze()  # its own stage did not train: one-shot magnitude mask, fixed for this later stage
        super().on_stage_start(stage)

    def on_stage_end(self, stage) -> None:
        if not self.frozen and self.config.prune_steps is None and self.step > 0:
            self.freeze()

    def make_final(self) -> None:
        if not self.frozen:
            self.freeze()

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "frozen": self.frozen}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        self.frozen = bool(state.get("frozen", False))
        self.masks = {}
