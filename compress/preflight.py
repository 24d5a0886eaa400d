"""Preflight: everything a recipe can get wrong is found before the run directory exists (the model, the
data splits, the trainer settings, every pruner attached to a throw-away copy, named teachers, export.dir)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List

import torch.nn as nn

from compress.context import RunContext, build_source
from compress.errors import CompressError
from compress.recipe import Recipe


def quiet_lightning() -> None:
    """Silence Lightning messages that are expected in this runner (tips, few workers)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def prepare(recipe: Recipe, run_dir: Path) -> RunContext:
    """Everything that can fail on bad input, before anything is written."""
    import lightning.pytorch as pl

    from compress.models import build_model
    from compress.recipe import check_trainer
    from compress.strategies import check_deepspeed
    from compress.tasks.base import Task

    quiet_lightning()
    check_trainer(recipe.trainer)
    check_deepspeed(recipe)
    pl.seed_everything(recipe.seed, workers=True, verbose=False)
    source = build_source(recipe)
    task = Task.for_source(source)
    model = build_model(recipe.model)
    task.check_model(model, f"model.kwargs.num_classes: {recipe.model.name} with data.kind {recipe.data.kind!r}")
    for i, s in enumerate(recipe.stages):
        if s.distill is not None and s.distill.block_weight and not task.block_distill:
            raise CompressError(f"stages[{i}].distill.block_weight: the {task.name} task has no block outputs to "
                                "match (diffusion UNets have); leave it at 0")
    for where, split in check_pruners(recipe, model):
        try:
            source.dataset(split, model, train=False)
        except CompressError as e:
            raise CompressError(f"{where}: calibration images: {e}") from None
    teachers = build_teachers(recipe)
    check_export_dir(recipe)
    # Touch the datasets now so a missing root or split fails before the run directory exists.
    if any(s.trains for s in recipe.stages):
        source.dataset("train", model, train=True)
    if recipe.evaluate.enabled:
        source.dataset(recipe.evaluate.split, model, train=False)
    return RunContext(recipe, run_dir, model, source, tuple(source.input_size(model)), task=task, teachers=teachers)


def build_teachers(recipe: Recipe) -> Dict[int, nn.Module]:
    """The named teachers of distill stages, built (and their checkpoints read) before the first stage, so
    a bad teacher fails now and not after the earlier stages trained."""
    from compress.models import build_model
    from compress.recipe import ModelConfig

    teachers = {}
    for i, stage in enumerate(recipe.stages):
        cfg = stage.distill
        if cfg is None or cfg.teacher == "dense":
            continue
        try:
            teachers[i] = build_model(ModelConfig(name=cfg.teacher, pretrained=cfg.checkpoint is None,
                                                  checkpoint=cfg.checkpoint)).eval()
        except CompressError as e:
            msg = str(e).replace("model.checkpoint", "checkpoint").replace("model.name", "teacher")
            raise CompressError(f"stages[{i}].distill.{msg}") from None
    return teachers


def check_export_dir(recipe: Recipe) -> None:
    """``export.dir`` must be new, empty, or an earlier compress export (which is replaced): never a user's folder."""
    from compress.manifest import check_export_target

    if recipe.export.enabled and recipe.export.dir is not None:
        check_export_target(Path(recipe.export.dir), "export.dir")


def check_pruners(recipe: Recipe, model: nn.Module) -> List[tuple]:
    """Attach every prune stage's pruner to a throw-away copy of the model, in order, so errors that
    depend on the model (e.g. a schedule past its depth) fail now, not after the earlier stages trained.
    Returns (where, split) for every pruner that will ask for calibration images."""
    stages = [(i, s) for i, s in enumerate(recipe.stages) if s.pruner is not None]
    if not stages:
        return []
    trial, wanted = copy.deepcopy(model), []
    for i, stage in stages:
        where = f"stages[{i}].pruner"
        try:
            pruner = stage.pruner.build(where)
            pruner.attach(trial)
        except (CompressError, ValueError) as e:
            msg = str(e)
            raise CompressError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        asked = pruner.calibration()
        if asked is not None:
            wanted.append((where, asked[0]))
    return wanted
