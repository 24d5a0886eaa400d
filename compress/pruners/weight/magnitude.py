"""Magnitude pruning, the baseline users expect: zero the smallest |w|, per layer or globally.

``one_shot`` prunes at attach time (e.g. a pretrained model, then fine-tune with the mask fixed).
``cubic`` is the gradual schedule of Zhu & Gupta (2017): at optimizer step t in [start_step, end_step],
every ``frequency`` steps, the sparsity is s_f + (s_i - s_f) * (1 - (t - start_step) / (end_step - start_step))^3
and the mask is re-chosen from the current |w| (already pruned weights are zero, so they stay pruned).
The step count runs over all stages the pruner is attached through, so a schedule may span stages.
Masks are re-applied after every optimizer step; selections are made on rank 0 and broadcast.
"""
from __future__ import annotations

from typing import Any, Dict, Literal, Optional

from pydantic import Field, model_validator

from compress.pruners.weight import WeightPruner
from compress.pruners.weight import masks as M
from compress.registry import register_pruner


def cubic_sparsity(step: int, start: int, end: int, initial: float, final: float) -> float:
    """Zhu & Gupta's s_t, clamped to [initial, final] outside [start, end]."""
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1 - (step - start) / (end - start)) ** 3


class MagnitudeConfig(M.WeightPrunerConfig):
    scope: Literal["layer", "global"] = Field("layer", description="rank |w| within each layer or over all of them")
    schedule: Literal["one_shot", "cubic"] = Field("one_shot", description="prune once at attach, or gradually")
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="cubic: sparsity at start_step")
    start_step: int = Field(0, ge=0, description="cubic: first optimizer step of the ramp")
    end_step: Optional[int] = Field(None, gt=0, description="cubic: step where the final sparsity is reached (required)")
    frequency: int = Field(100, gt=0, description="cubic: re-choose the mask every this many optimizer steps")

    @model_validator(mode="after")
    def _schedule(self):
        if self.schedule == "cubic":
            if self.end_step is None:
                raise ValueError("end_step: required for schedule 'cubic'")
            if self.end_step <= self.start_step:
                raise ValueError(f"end_step: must be after start_step ({self.start_step})")
            if self.initial_sparsity > self.sparsity:
                raise ValueError("initial_sparsity: must not exceed sparsity")
            if self.n_m is not None:
                raise ValueError("n_m: an N:M pattern is one fixed sparsity; use schedule 'one_shot'")
        if self.scope == "global" and self.n_m is not None:
            raise ValueError("n_m: N:M patterns are per layer; use scope 'layer'")
        return self


@register_pruner("magnitude")
class Magnitude(WeightPruner):
    """Magnitude pruning: smallest |w| per layer or global, one-shot or with Zhu & Gupta's cubic schedule."""

    name = "magnitude"
    Config = MagnitudeConfig

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.current = 0.0  # sparsity of the masks in force

    def select(self, sparsity: float) -> M.Masks:
        if self.config.scope == "global":
            return M.decide(M.global_masks, self.layers, sparsity, self.config.cap)
        return super().select(sparsity)

    def update(self, sparsity: float) -> None:
        self.masks = self.select(sparsity) if sparsity > 0 else {}
        self.current = sparsity
        self.enforce()

    def attach(self, model) -> None:
        super().attach(model)
        if self.config.schedule == "one_shot":
            self.update(self.config.sparsity)

    def on_stage_start(self, stage) -> None:
        if self.current > 0 and not self.masks:  # resumed: re-derive the masks from the zeros in the weights
            self.masks = self.select(self.current)
        super().on_stage_start(stage)

    def after_optimizer_step(self, run=None) -> None:
        self.step += 1
        cfg = self.config
        if cfg.schedule == "cubic" and cfg.start_step <= self.step <= cfg.end_step and (
                (self.step - cfg.start_step) % cfg.frequency == 0 or self.step == cfg.end_step):
            self.update(cubic_sparsity(self.step, cfg.start_step, cfg.end_step, cfg.initial_sparsity, cfg.sparsity))
        else:
            self.enforce()

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "sparsity": self.current}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        self.current = float(state.get("sparsity", 0.0))
        self.masks = {}
