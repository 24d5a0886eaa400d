"""The stage runner: recipe -> model, data, and one Lightning ``Trainer`` run per stage.

Stages run in order. The model as it stands before the first ``prune`` stage is the dense reference
(teacher for ``distill``, baseline in the report). After every stage the model's weights and the
pruners' specs are saved under ``stages/<i>-<kind>/``; ``--resume`` restores the last completed stage
and continues a stage interrupted mid-way from Lightning's ``last.ckpt``.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from compress import files
from compress.errors import CompressError
from compress.interrupts import Interrupted, StopSignals, sync_stop_callback
from compress.recipe import Recipe, dump_recipe, load_recipe, recipe_from_dict

DONE = "done.json"
# Lightning's DDP launcher starts ranks > 0 by re-running the same command; they find the run directory
# rank 0 chose here instead of making their own, and leave every file to rank 0.
RUN_DIR_ENV = "COMPRESS_RUN_DIR"


def is_global_zero() -> bool:
    """True in the process that writes files: rank 0, or a process Lightning has not launched as another rank."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    model: nn.Module
    source: Any  # compress.data.base.DataSource
    input_size: tuple
    task: Any = None  # compress.tasks.base.Task, from the dataset kind
    pruners: List[Any] = field(default_factory=list)
    dense: Optional[nn.Module] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    teachers: Dict[int, nn.Module] = field(default_factory=dict)  # stage index -> named teacher, built in prepare
    signals: StopSignals = field(default_factory=StopSignals)


def _quiet_lightning() -> None:
    """Silence Lightning messages that are expected in this runner (no val loader, tips)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*validation_step.*val_dataloader.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def _log(msg: str) -> None:
    print(f"[compress] {msg}", flush=True)


def build_source(recipe: Recipe):
    from compress.registry import DATASETS

    cls = DATASETS.get(recipe.data.kind)
    return cls(recipe.data.root, cls.Config.model_validate(recipe.data.params), recipe.data.limit)


def data_workers(setting) -> int:
    """``data.num_workers``: a number, or 'auto' = the CPUs this process may use, less one for the main
    process, at most 8 (0 on a single-CPU machine)."""
    if setting != "auto":
        return int(setting)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus - 1))


def make_loader(recipe: Recipe, dataset, train: bool):
    bs = recipe.data.batch_size if train else (recipe.data.eval_batch_size or recipe.data.batch_size)
    workers = data_workers(recipe.data.num_workers)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=bs,
        shuffle=train,
        drop_last=train and len(dataset) > bs,
        num_workers=workers,
        persistent_workers=workers > 0 and train,
        pin_memory=torch.cuda.is_available(),
    )


def prepare(recipe: Recipe, run_dir: Path) -> RunContext:
    """Everything that can fail on bad input, before anything is written."""
    import lightning.pytorch as pl

    from compress.models import build_model
    from compress.recipe import check_trainer
    from compress.strategies import check_deepspeed
    from compress.tasks.base import Task

    _quiet_lightning()
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
    from compress.export import check_export_target

    if recipe.export.enabled and recipe.export.dir is not None:
        check_export_target(Path(recipe.export.dir), "export.dir")


def check_pruners(recipe: Recipe, model: nn.Module) -> List[tuple]:
    """Attach every prune stage's pruner to a throw-away copy of the model, in order, so errors that
    depend on the model (e.g. a schedule past its depth) fail now, not after the earlier stages trained.
    Returns (where, split) for every pruner that will ask for calibration images."""
    from compress.pruners.base import build_pruner

    stages = [(i, s) for i, s in enumerate(recipe.stages) if s.pruner is not None]
    if not stages:
        return []
    trial, wanted = copy.deepcopy(model), []
    for i, stage in stages:
        where = f"stages[{i}].pruner"
        try:
            pruner = build_pruner(stage.pruner.model_dump(), where=where)
            pruner.attach(trial)
        except (CompressError, ValueError) as e:
            msg = str(e)
            raise CompressError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        asked = pruner.calibration()
        if asked is not None:
            wanted.append((where, asked[0]))
    return wanted


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


def _stage_dir(run_dir: Path, i: int, kind: str) -> Path:
    return run_dir / "stages" / f"{i}-{kind}"


def _save_stage(ctx: RunContext, i: int, stage_dir: Path) -> None:
    if not is_global_zero():
        return
    stage_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in ctx.model.state_dict().items()}
    files.write_with(stage_dir / "model.safetensors", lambda tmp: files.save_safetensors(state, tmp))
    dense_path = ctx.run_dir / "stages" / "dense.safetensors"
    if ctx.dense is not None and not dense_path.exists():
        dense = {k: v.detach().cpu().contiguous() for k, v in ctx.dense.state_dict().items()}
        files.write_with(dense_path, lambda tmp: files.save_safetensors(dense, tmp))
    info = {
        "stage": i,
        "pruners": [{"spec": p.spec(), "stage": p._stage, "state": p.state_dict()} for p in ctx.pruners],
        "metrics": ctx.metrics,
    }
    files.write_text(stage_dir / DONE, json.dumps(info, indent=2))  # last: the stage counts as done once it exists


def _teacher(ctx: RunContext, i: int, stage) -> nn.Module:
    if stage.distill.teacher != "dense":
        return ctx.teachers[i]
    if ctx.dense is None:
        raise CompressError("distill: teacher 'dense' needs a prune stage before the distill stage")
    return ctx.dense


def run_stage(ctx: RunContext, i: int, stage, ckpt_path: Optional[str] = None) -> None:
    import lightning.pytorch as pl

    from compress.pruners.base import build_pruner

    stage_dir = _stage_dir(ctx.run_dir, i, stage.kind)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if stage.kind == "prune":
        if ctx.dense is None:
            ctx.dense = copy.deepcopy(ctx.model).eval()
            if ctx.recipe.evaluate.enabled and is_global_zero():  # other DDP ranks would only repeat it
                ctx.metrics["dense"] = evaluate_model(ctx, ctx.dense, "evaluate dense")
                _log(f"dense: {_fmt(ctx.metrics['dense'])}")
        if not any(p._stage == i for p in ctx.pruners):
            pruner = build_pruner(stage.pruner.model_dump(), where=f"stages[{i}].pruner")
            pruner._stage = i
            pruner.attach(ctx.model)
            if pruner.calibration() is not None:
                calibrate(ctx, pruner, f"stages[{i}].pruner")
            ctx.pruners.append(pruner)
            _log(f"stage {i} ({stage.kind}): attached {pruner!r}")
    if stage.trains:
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
        teacher = _teacher(ctx, i, stage) if stage.kind == "distill" else None
        module = ctx.task.module(model, stage, teacher=teacher)
        module.pruners = ctx.pruners
        callbacks = [cb for p in ctx.pruners for cb in p.callbacks()]
        kwargs = trainer_kwargs(ctx.recipe, stage_dir, stage)
        kwargs["callbacks"] = kwargs["callbacks"] + callbacks + [sync_stop_callback(ctx.signals)]
        trainer = pl.Trainer(**kwargs)
        _log(f"stage {i} ({stage.kind}): training " + (f"{stage.max_steps} steps" if stage.max_steps else f"{stage.epochs} epoch(s)"))
        model.train()
        with ctx.signals.training(trainer):
            trainer.fit(module, train_dataloaders=train, ckpt_path=ckpt_path)
        _check_ranks_agree(ctx, i, stage)  # before the heads pruner turns its masks into a smaller model
        if deepspeed:
            _take_back(ctx, model)
        for pruner in ctx.pruners:
            found = pruner.learned() if pruner._stage == i else None
            if found:
                ctx.metrics.setdefault("schedules", {})[f"stages[{i}].pruner"] = found
                _log(f"stage {i} ({stage.kind}): {pruner.name} learned {json.dumps(found)}")
    ctx.model.eval()
    if stage.evaluate and ctx.recipe.evaluate.enabled and is_global_zero():
        ctx.metrics.setdefault("stages", {})[f"{i}-{stage.kind}"] = evaluate_model(ctx, ctx.model, f"evaluate after stage {i}")
    _save_stage(ctx, i, stage_dir)


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
    _log(f"stage {i} ({stage.kind}): data.limit {recipe.data.limit}: {cap} steps (one pass) instead of max_steps "
         f"{stage.max_steps}")
    return stage.model_copy(update={"max_steps": cap})


def calibrate(ctx: RunContext, pruner, where: str) -> None:
    """Hand ``pruner`` the unlabelled images it asked for (a seeded random subset of the split, eval
    transform, on the evaluation device) and let it tune its plan."""
    split, n, seed = pruner.calibration()
    ds = ctx.source.dataset(split, ctx.model, train=False)  # prepare() checked the split exists
    pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    dev = torch.device(_device(ctx.recipe))
    loader = make_loader(ctx.recipe, torch.utils.data.Subset(ds, pick), train=False)
    batches = [x.to(dev) for x, _ in loader]
    t0 = time.perf_counter()
    ctx.model.eval().to(dev)
    found = pruner.calibrate(ctx.model, batches) or {}
    ctx.metrics.setdefault("calibration", {})[where] = {"images": len(pick), "split": split, **found}
    _log(f"{where}: calibrated on {len(pick)} {split} images in {time.perf_counter() - t0:.0f} s"
         + (f": {_fmt(found)}" if found else ""))


def _fmt(metrics: Dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _device(recipe: Recipe) -> str:
    acc = recipe.trainer.accelerator
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def evaluate_model(ctx: RunContext, model: nn.Module, label: str = "evaluate") -> Dict[str, Any]:
    ds = ctx.source.dataset(ctx.recipe.evaluate.split, model, train=False)
    return ctx.task.evaluate(model, make_loader(ctx.recipe, ds, train=False), _device(ctx.recipe), label)


def new_run_dir(recipe: Recipe, out: Optional[Path]) -> Path:
    """``<out>/<recipe name>/<stamp>`` (``out`` defaults to ``runs``), checked writable before any work."""
    base = (Path(out) if out is not None else Path("runs")) / recipe.name
    check_writable_dir(base, "--out" if out is not None else "run directory")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = base / stamp
    n = 1
    while run_dir.exists():
        run_dir = base / f"{stamp}-{n}"
        n += 1
    return run_dir


def check_writable_dir(path: Path, where: str) -> None:
    """``path`` can be created (or is a folder) and written in: its nearest existing ancestor must be a
    writable folder, not a file."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CompressError(f"{where}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CompressError(f"{where}: cannot write in {existing} (permission denied)")


def _read_done(path: Path) -> Dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompressError(f"--resume: {path} is damaged ({type(e).__name__}); delete that stage folder to run "
                            "the stage again") from None
    if not isinstance(info, dict) or not isinstance(info.get("pruners"), list):
        raise CompressError(f"--resume: {path} is not a stage record of compress; delete that stage folder")
    return info


def _read_weights(path: Path) -> Dict[str, torch.Tensor]:
    from compress.models.build import read_safetensors

    return read_safetensors(path, "--resume", "; it is damaged: delete that stage folder to run the stage again")


def _restore(ctx: RunContext) -> int:
    """Restore the last completed stage of ``ctx.run_dir``; return the index of the next stage."""
    from compress.models.build import build_from_spec, load_weights, model_spec
    from compress.pruners.base import build_pruner

    done = sorted((int(p.parent.name.split("-")[0]), p.parent) for p in (ctx.run_dir / "stages").glob(f"*/{DONE}"))
    if not done:
        return 0
    last, stage_dir = done[-1]
    info = _read_done(stage_dir / DONE)
    dense_path = ctx.run_dir / "stages" / "dense.safetensors"
    if dense_path.exists():
        ctx.dense = build_from_spec(model_spec(ctx.recipe.model.name, ctx.recipe.model.kwargs))
        load_weights(ctx.dense, _read_weights(dense_path), str(dense_path))
        ctx.dense.eval()
    for k, entry in enumerate(info["pruners"]):
        pruner = build_pruner(entry["spec"], where=f"pruners[{k}]")
        pruner._stage = entry["stage"]
        pruner.attach(ctx.model)
        pruner.load_state_dict(entry.get("state", {}))
        ctx.pruners.append(pruner)
    weights = stage_dir / "model.safetensors"
    load_weights(ctx.model, _read_weights(weights), str(weights))
    ctx.metrics = info.get("metrics", {})
    _log(f"resuming after stage {last} ({stage_dir.name})")
    return last + 1


def _resume_recipe(run_dir: Path, where: str = "--resume") -> Recipe:
    from compress.recipe import read_yaml

    if not run_dir.is_dir() or not (run_dir / "recipe.yaml").is_file():
        raise CompressError(f"{where}: {run_dir} is not a run directory (no recipe.yaml)")
    path = run_dir / "recipe.yaml"
    return recipe_from_dict(read_yaml(path), str(path))


def fit(recipe_path=None, overrides=None, out=None, resume=None) -> Dict[str, Any]:
    """Run a recipe end to end; returns the metrics that also go to ``metrics.json``.

    A stop signal raises ``Interrupted`` (with ``run_dir`` set) after keeping a resumable state; a failure
    before any stage completed removes the run directory, so a failed run leaves nothing behind."""
    signals = StopSignals()
    with signals.installed():
        if resume is not None:
            run_dir = Path(resume)
            recipe = _resume_recipe(run_dir)
        else:
            recipe = load_recipe(recipe_path, overrides)
            joined = os.environ.get(RUN_DIR_ENV) if not is_global_zero() else None
            run_dir = Path(joined) if joined else new_run_dir(recipe, out)
        ctx = prepare(recipe, run_dir)
        ctx.signals = signals
        created = not run_dir.exists()
        try:
            if is_global_zero():
                run_dir.mkdir(parents=True, exist_ok=True)
                if resume is not None:
                    files.sweep_temporaries(run_dir)  # what a killed writer left
                else:
                    files.write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
                os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the DDP ranks Lightning launches
                _log(f"run directory: {run_dir}")
            first = _restore(ctx) if resume is not None else 0
            for i in range(first, len(recipe.stages)):
                stage = recipe.stages[i]
                last_ckpt = _stage_dir(run_dir, i, stage.kind) / "checkpoints" / "last.ckpt"
                if resume is not None and last_ckpt.exists():
                    _log(f"stage {i} ({stage.kind}): continuing from {last_ckpt}")
                run_stage(ctx, i, stage, ckpt_path=str(last_ckpt) if resume is not None and last_ckpt.exists() else None)
            from compress.report import finish

            return finish(ctx)
        except Interrupted as e:
            e.run_dir = run_dir if run_dir.is_dir() else None
            raise
        except (CompressError, OSError):
            # Remove a run that produced nothing; keep completed stages so --resume can continue.
            if created and resume is None and not any((run_dir / "stages").glob(f"*/{DONE}")):
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
