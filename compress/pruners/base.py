"""The pruner protocol: a validated config, ``attach``/``detach`` in place, training-time hooks (driven by the
runner's one Lightning callback, ``compress.lifecycle``), ``finalize`` to make the decision physical, and a
JSON-able ``spec`` that ``compress.load`` replays.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn
from pydantic import BaseModel, ConfigDict, ValidationError

from compress.errors import CompressError


class PrunerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclass
class StageRun:
    """What a pruner sees of the training stage it takes part in (handed to every training hook)."""

    index: int  # the recipe stage's index
    stage: Any  # its ``recipe.StageConfig``
    model: nn.Module  # the model being trained (under DeepSpeed: the stage's copy of the run's model)
    trainer: Any  # the stage's Lightning ``Trainer``
    deepspeed: bool  # whether the strategy is DeepSpeed (it trains a copy; the run's model takes it back after)

    @property
    def step(self) -> int:
        """Optimizer steps done in this stage (a resumed stage starts where its checkpoint was)."""
        return self.trainer.global_step

    @property
    def world_size(self) -> int:
        return self.trainer.world_size

    @property
    def optimizers(self) -> list:
        return list(self.trainer.optimizers)


@dataclass
class Measuring:
    """What the report and ``compress bench`` hand a pruner class that has figures of its own to add."""

    dense: nn.Module
    pruned: nn.Module
    example: Callable[[int], Any]  # batch size -> the model's inputs
    batch_sizes: Sequence[int]
    device: str
    repeats: int
    dense_gmacs: Optional[float]
    edits: Dict[str, Any]  # what this pruner's finalize recorded
    export: Optional[Path] = None  # the export folder, when there is one
    timing: bool = True  # False: the run's bench is off, so nothing is to be timed


class Pruner:
    """Base class. Subclasses set ``name``, ``kind`` and a nested ``Config`` (a ``PrunerConfig``)."""

    name: ClassVar[str] = "?"
    kind: ClassVar[str] = "?"  # token | weight | structured | diffusion
    replay_on_load: ClassVar[bool] = False  # re-attach from spec() when loading an export
    targets: ClassVar[str] = "any"  # the models it prunes: any | vit (timm ViT classifiers) | segmenter | vim | unet
    Config: ClassVar[type] = PrunerConfig

    def __init__(self, config: Optional[PrunerConfig] = None, **params: Any):
        self.config = config if config is not None else self.Config(**params)
        self.stage: Optional[int] = None  # index of the recipe stage that attached it (set by the runner)

    # -- lifecycle -------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Modify ``model`` in place (reversible with ``detach``)."""
        raise NotImplementedError

    def detach(self, model: nn.Module) -> None:
        raise NotImplementedError

    def calibration(self) -> Optional[Tuple[str, int, int]]:
        """(split, number of images, seed) the pruner wants to see once before it runs, or None.

        A zero-shot pruner that tunes its plan on unlabelled images (a schedule search) asks here; the
        stage runner then calls ``calibrate`` with that many eval-transformed images of the split."""
        return None

    def calibrate(self, model: nn.Module, batches: List[Any], labels: Optional[List[Any]] = None) -> Optional[Dict[str, Any]]:
        """Tune the plan on ``batches`` of images (on the model's device) with ``model`` attached; ``labels``
        are the batches' targets, for a search that scores by them (most ignore them). May return figures worth
        logging. See ``calibration``."""
        return None

    def training_loss(self) -> Optional[Tuple[Any, Dict[str, float]]]:
        """A term to add to the task's loss after each training forward (e.g. a budget penalty on what the
        pruner learns), with figures to log, or None (default)."""
        return None

    def learned(self) -> Optional[Dict[str, Any]]:
        """What a training stage settled for this pruner (e.g. a searched schedule), or None (default): the runner
        records it in metrics.json under "schedules" and the report prints it."""
        return None

    # -- training: called by the runner's one Lightning callback (``compress.lifecycle``), on every attached
    # pruner, in every training stage, in this order. Defaults: nothing to do.
    def stage_setup(self, run: StageRun) -> None:
        """A training stage begins: before its optimizer is built and a mid-stage checkpoint restored (a pruner
        whose parameters the optimizer must train adds them here)."""

    def stage_start(self, run: StageRun) -> None:
        """Training starts: after the checkpoint restore and the strategy's setup (``run.model`` is what trains)."""

    def before_batch(self, run: StageRun) -> None:
        """Before each training batch (e.g. a pruning event due at this step)."""

    def before_optimizer_step(self, run: StageRun) -> None:
        """Gradients are ready, the optimizer has not stepped (e.g. accumulate a Taylor importance)."""

    def after_optimizer_step(self, run: StageRun) -> None:
        """Once per optimizer step (not per accumulation batch), after it (e.g. re-apply masks)."""

    def stage_end(self, run: StageRun) -> None:
        """Training ended; the strategy (DeepSpeed's engine and process group) still stands."""

    def stage_done(self, run: StageRun) -> None:
        """After the strategy's teardown: ``run.model`` is unwrapped again (e.g. shrink it physically)."""

    def own_loss(self, model: nn.Module, batch: Any, teacher: Optional[nn.Module]) -> Optional[Tuple[Any, Dict[str, Any]]]:
        """The whole training loss of this batch, with figures to log, when the pruner trains through a forward
        of its own (APTP's gated, routed UNet) in place of the task's; ``batch`` is what the task prepared from
        the loader's batch (e.g. a noised latent batch). None (default): the task's own loss."""
        return None

    def forward_figures(self) -> Dict[str, Any]:
        """Per-image figures of the model's last forward (tensors of shape (B,) or (B, k), e.g. the fraction of
        tokens that exited early): tasks log their mean while training and average them over an evaluation, under
        these keys. Default: none."""
        return {}

    def external_parameters(self, model: nn.Module) -> List[Tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where ``module``'s forward uses a parameter that is not its own (ZeRO-3
        must gather it when that module runs; see ``compress.zero.register_external``). Default: none."""
        return []

    @classmethod
    def zero3_problem(cls, config: PrunerConfig) -> Optional[str]:
        """Why this configuration cannot run under DeepSpeed ZeRO-3 ("<key>: <reason>"), or None. Checked at
        recipe validation. Pruners that touch weights outside a module's forward must use ``compress.zero``."""
        return None

    def decisions(self) -> Any:
        """A JSON-able summary of what the pruner has decided (kept heads, a digest of masks, its plan): every
        rank must hold the same, which the stage runner checks after multi-process stages."""
        return self.spec()

    def rejoin(self, model: nn.Module) -> None:
        """A stage trained a copy of the model under DeepSpeed; ``model`` now holds the consolidated
        weights: point the pruner at it again (default: nothing to do)."""

    def trace_problem(self) -> Optional[str]:
        """Why a model with this pruner attached cannot be traced to a static graph (ONNX, torch.export), or
        None. ``compress export --format onnx|pt2`` refuses such a model with this reason."""
        return None

    @classmethod
    def trace_variants(cls, model: nn.Module, edits: Dict[str, Any]) -> List[Tuple[str, Any]]:
        """The separate graphs an export of ``model`` is made of, as (file-name suffix, a function that sets
        ``model`` up to run that one); default: the model itself. E.g. one file per expert of a routed model."""
        return [("", None)]

    @classmethod
    def figures(cls, m: Measuring) -> Dict[str, Dict[str, Any]]:
        """Figures beyond the dense-vs-pruned table for a model this pruner made (e.g. per-expert speed, the real
        file size of unstructured zeros): ``{key: {..., "text": lines to print}}``, added to the bench results
        under ``key``. Default: none."""
        return {}

    def finalize(self, model: nn.Module) -> Dict[str, Any]:
        """Make the decision physical; return the structural edits ``apply_edits`` can replay."""
        return {}

    @classmethod
    def apply_edits(cls, model: nn.Module, edits: Dict[str, Any]) -> None:
        """Rebuild the physical structure recorded by ``finalize`` on a fresh base model."""
        if edits:
            raise CompressError(f"pruner {cls.name!r} cannot replay structural edits")

    @classmethod
    def pack_state(cls, state: Dict[str, Any], edits: Dict[str, Any]) -> Dict[str, Any]:
        """Export hook: rewrite the state dict into a compact on-disk form (default: unchanged)."""
        return state

    @classmethod
    def unpack_state(cls, state: Dict[str, Any], edits: Dict[str, Any]) -> Dict[str, Any]:
        """Load hook, inverse of ``pack_state``: run before the strict load (default: unchanged)."""
        return state

    def state_dict(self) -> Dict[str, Any]:
        """JSON-able state outside the model (e.g. a schedule's progress), for --resume."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    # -- description -----------------------------------------------------------------------
    def spec(self) -> Dict[str, Any]:
        return {"name": self.name, **self.config.model_dump(mode="json")}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump().items())
        return f"{type(self).__name__}({params})"


def pruner_figures(made: Sequence[Tuple[type, Dict[str, Any]]], **measuring: Any) -> Dict[str, Dict[str, Any]]:
    """Every pruner class's own ``figures`` for the model they made (``made``: (class, edits) in order); the first
    class to give a key keeps it (two weight pruners report one storage)."""
    out: Dict[str, Dict[str, Any]] = {}
    for cls, edits in made:
        for key, value in cls.figures(Measuring(edits=edits or {}, **measuring)).items():
            out.setdefault(key, value)
    return out


def build_pruner(spec: Dict[str, Any], where: str = "pruner") -> Pruner:
    """``{"name": ..., **params}`` -> a configured pruner; errors name ``where`` and the key."""
    from compress.recipe import format_validation_error
    from compress.registry import PRUNERS

    spec = dict(spec)
    name = spec.pop("name", None)
    if not name:
        raise CompressError(f"{where}.name: required key is missing")
    cls = PRUNERS.get(name)
    try:
        cfg = cls.Config.model_validate(spec)
    except ValidationError as e:
        raise CompressError(format_validation_error(e, cls.Config, tuple(where.split(".")))) from None
    return cls(cfg)
