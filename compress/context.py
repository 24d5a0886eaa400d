"""What a run holds (``RunContext``) and the helpers every part of the runner shares: which process writes,
the log line, the data loaders, the evaluation device and evaluation itself."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from compress.interrupts import StopSignals
from compress.recipe import Recipe


def is_global_zero() -> bool:
    """True in the process that writes files: rank 0, or a process no launcher started as another rank.

    Lightning's own rank (``rank_zero_only.rank``: RANK, LOCAL_RANK, SLURM_PROCID or JSM_NAMESPACE_RANK at import,
    then the rank a strategy set up), and the LOCAL_RANK/NODE_RANK its subprocess launcher gives ranks > 0 (the
    rank 0 process of a second node has LOCAL_RANK 0 but NODE_RANK 1)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return (getattr(rank_zero_only, "rank", 0) == 0 and os.environ.get("LOCAL_RANK", "0") == "0"
            and os.environ.get("NODE_RANK", "0") == "0")


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


def log(msg: str) -> None:
    print(f"[compress] {msg}", flush=True)


def fmt_metrics(metrics: Dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


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


def eval_device(recipe: Recipe) -> str:
    acc = recipe.trainer.accelerator
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def evaluate_model(ctx: RunContext, model: nn.Module, label: str = "evaluate") -> Dict[str, Any]:
    ds = ctx.source.dataset(ctx.recipe.evaluate.split, model, train=False)
    return ctx.task.evaluate(model, make_loader(ctx.recipe, ds, train=False), eval_device(ctx.recipe), label)
