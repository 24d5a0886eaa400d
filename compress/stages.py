"""One stage: attach its pruner, build its LightningModule and ``Trainer``, train, hand the weights back
(DeepSpeed), record what the pruners learned, evaluate if asked, and save the stage."""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from compress.context import RunContext, eval_device, evaluate_model, fmt_metrics, is_global_zero, log, make_loader
from compress.errors import CompressError
from compress.interrupts import sync_stop_callback
from compress.recipe import Recipe
from compress.rundir import save_stage, stage_folder


def trainer_kwargs(recipe: Recipe, stage_dir: Path, stage) -> Dict[str, Any]:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from compress.callbacks import LineProgress
    from compress.checkpoints import AtomicCheckpointIO, SaveOnInterrupt
    from compress.strategies import is_deepspeed, resolve_strategy

    t = recipe.trainer
    progress = sys.stdout.isatty() if t.enable_progress_bar is None else t.enable_progress_bar
    version = _log_version(stage_dir)
    loggers = [CSVLogger(str(stage_dir), name="logs", version=version)]
    try:
        loggers.append(TensorBoardLogger(str(stage_dir), name="tb", version=version))
    except ModuleNotFoundError:
        pass
    ckpt_dir = stage_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0,
                        every_n_train_steps=t.checkpoint_every_n_steps),
        SaveOnInterrupt(ckpt_dir),
        LearningRateMonitor(logging_interval="step"),
    ]
    if not progress:
        callbacks.append(LineProgress(f"stage {stage_dir.name}"))
    strategy = resolve_strategy(t.strategy, t.accelerator)
    return dict(
        plugins=[] if is_deepspeed(t.strategy) else [AtomicCheckpointIO()],  # DeepSpeed writes checkpoint folders
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=t.precision,
        max_epochs=stage.epochs if stage.max_steps is None else -1,
        max_steps=stage.max_steps or -1,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        enable_progress_bar=progress,
        deterministic=t.deterministic,
        default_root_dir=str(stage_dir),
        logger=loggers,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        limit_val_batches=0,
    )


def _log_version(stage_dir: Path) -> str:
    """``logs/`` for a stage's first run; ``logs/resume-<k>/`` when it is resumed, so earlier logs stay."""
    if not (stage_dir / "logs").exists():
        return ""
    k = 1
    while (stage_dir / "logs" / f"resume-{k}").exists():
        k += 1
    return f"resume-{k}"


def _teacher(ctx: RunContext, i: int, stage) -> nn.Module:
    if stage.distill.teacher != "dense":
        return ctx.teachers[i]
    if ctx.dense is None:
        raise CompressError("distill: teacher 'dense' needs a prune stage before the distill stage")
    return ctx.dense


def run_stage(ctx: RunContext, i: int, stage, ckpt_path: Optional[str] = None) -> None:
    import lightning.pytorch as pl

    stage_dir = stage_folder(ctx.run_dir, i, stage.kind)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if stage.kind == "prune":
        if ctx.dense is None:
            ctx.dense = copy.deepcopy(ctx.model).eval()
            if ctx.recipe.evaluate.enabled and is_global_zero():  # other DDP ranks would only repeat it
                ctx.metrics["dense"] = evaluate_model(ctx, ctx.dense, "evaluate dense")
                log(f"dense: {fmt_metrics(ctx.metrics['dense'])}")
        if not any(p.stage == i for p in ctx.pruners):
            pruner = stage.pruner.build(f"stages[{i}].pruner")
            pruner.stage = i
            pruner.attach(ctx.model)
            if pruner.calibration() is not None:
                calibrate(ctx, pruner, f"stages[{i}].pruner")
            ctx.pruners.append(pruner)
            log(f"stage {i} ({stage.kind}): attached {pruner!r}")
    if stage.trains:
        from compress.lifecycle import PrunerLifecycle
        from compress.strategies import is_deepspeed, zero_stage

        train = make_loader(ctx.recipe, ctx.source.dataset("train", ctx.model, train=True), train=True)
        stage = limited_steps(ctx.recipe, stage, i, len(train))
        deepspeed = is_deepspeed(ctx.recipe.trainer.strategy)
        # DeepSpeed converts, partitions and hooks the module it is given: it gets a copy, a new one per stage
        # (so a structured pruner can shrink the model between stages), and ctx.model takes the consolidated
        # fp32 weights back at the end. The run's model waits in host memory meanwhile (rank 0 evaluated it on
        # the GPU), so the accelerator holds only the engine's (partitioned) copy.
        model = copy.deepcopy(ctx.model.cpu()) if deepspeed else ctx.model
        if deepspeed and zero_stage(ctx.recipe.trainer.strategy) == 3:
            from compress.zero import register_external

            register_external(pair for p in ctx.pruners for pair in p.external_parameters(model))
        teacher = _teacher(ctx, i, stage) if stage.distill is not None else None  # a prune stage may distill too
        module = ctx.task.module(model, stage, teacher=teacher)
        module.pruners = ctx.pruners
        kwargs = trainer_kwargs(ctx.recipe, stage_dir, stage)
        kwargs["callbacks"] = kwargs["callbacks"] + [PrunerLifecycle(ctx.pruners, i, stage), sync_stop_callback(ctx.signals)]
        trainer = pl.Trainer(**kwargs)
        log(f"stage {i} ({stage.kind}): training " + (f"{stage.max_steps} steps" if stage.max_steps else f"{stage.epochs} epoch(s)"))
        model.train()
        with ctx.signals.training(trainer):
            trainer.fit(module, train_dataloaders=train, ckpt_path=ckpt_path)
        _check_ranks_agree(ctx, i, stage)  # before the heads pruner turns its masks into a smaller model
        if deepspeed:
            _take_back(ctx, model)
    for pruner in ctx.pruners:  # what this stage taught its pruner: by training or by calibration
        found = pruner.learned() if pruner.stage == i else None
        if found:
            ctx.metrics.setdefault("schedules", {})[f"stages[{i}].pruner"] = found
            log(f"stage {i} ({stage.kind}): {pruner.name} learned {json.dumps(found)}")
    ctx.model.eval()
    if stage.evaluate and ctx.recipe.evaluate.enabled and is_global_zero():
        ctx.metrics.setdefault("stages", {})[f"{i}-{stage.kind}"] = evaluate_model(ctx, ctx.model, f"evaluate after stage {i}")
    save_stage(ctx, i, stage_dir)


def _check_ranks_agree(ctx: RunContext, i: int, stage) -> None:
    """Every rank must end a stage with the same pruning decisions; record them (``metrics.json`` "ranks")
    and stop the run if they differ, before the stage is saved."""
    from compress.distributed import world_size

    if world_size() == 1 or not ctx.pruners:
        return
    import torch.distributed as dist

    mine = [p.decisions() for p in ctx.pruners]
    every = [None] * world_size()
    dist.all_gather_object(every, json.loads(json.dumps(mine, default=str)))
    ctx.metrics.setdefault("ranks", {})[f"{i}-{stage.kind}"] = every
    if any(d != every[0] for d in every):
        raise CompressError(f"stages[{i}]: the {len(every)} ranks ended the stage with different pruning decisions")


def _take_back(ctx: RunContext, trained: nn.Module) -> None:
    """After a DeepSpeed stage: ``ctx.model`` gets the trained copy's consolidated fp32 weights (gathered on
    every rank: a collective), and the pruners continue on it (a structured pruner shrinks it now)."""
    from compress.zero import consolidated_state

    state = consolidated_state(trained)
    ctx.model.load_state_dict(state)
    del trained, state
    for pruner in ctx.pruners:
        pruner.rejoin(ctx.model)


def limited_steps(recipe: Recipe, stage, i: int, batches: int):
    """With ``data.limit`` (a quick look at a recipe), a step-based stage stops after one pass over the
    limited data instead of running its full ``max_steps``."""
    if recipe.data.limit is None or stage.max_steps is None:
        return stage
    cap = max(1, batches // recipe.trainer.accumulate_grad_batches)
    if stage.max_steps <= cap:
        return stage
    log(f"stage {i} ({stage.kind}): data.limit {recipe.data.limit}: {cap} steps (one pass) instead of max_steps "
         f"{stage.max_steps}")
    return stage.model_copy(update={"max_steps": cap})


def calibrate(ctx: RunContext, pruner, where: str) -> None:
    """Hand ``pruner`` the images it asked for (a seeded random subset of the split, eval transform, on the
    evaluation device) with their labels, and let it tune its plan."""
    split, n, seed = pruner.calibration()
    ds = ctx.source.dataset(split, ctx.model, train=False)  # prepare() checked the split exists
    pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    dev = torch.device(eval_device(ctx.recipe))
    loader = make_loader(ctx.recipe, torch.utils.data.Subset(ds, pick), train=False)
    batches, labels = [], []
    for x, y in loader:
        batches.append(x.to(dev))
        labels.append(y)  # as the data module gives them (class indices, masks): the pruner moves what it reads
    t0 = time.perf_counter()
    ctx.model.eval().to(dev)
    found = pruner.calibrate(ctx.model, batches, labels) or {}
    ctx.metrics.setdefault("calibration", {})[where] = {"images": len(pick), "split": split, **found}
    log(f"{where}: calibrated on {len(pick)} {split} images in {time.perf_counter() - t0:.0f} s"
         + (f": {fmt_metrics(found)}" if found else ""))
