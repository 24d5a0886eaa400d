"""The run directory: where it goes, what each completed stage leaves in it (weights, pruner specs and state,
metrics), and restoring the last completed stage for ``--resume``."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from compress import files
from compress.context import RunContext, is_global_zero, log
from compress.errors import CompressError
from compress.recipe import Recipe, recipe_from_dict

DONE = "done.json"
# Lightning's DDP launcher starts ranks > 0 by re-running the same command; they find the run directory
# rank 0 chose here instead of making their own, and leave every file to rank 0.
RUN_DIR_ENV = "COMPRESS_RUN_DIR"


def stage_folder(run_dir: Path, i: int, kind: str) -> Path:
    return run_dir / "stages" / f"{i}-{kind}"


def save_stage(ctx: RunContext, i: int, stage_dir: Path) -> None:
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
        "pruners": [{"spec": p.spec(), "stage": p.stage, "state": p.state_dict()} for p in ctx.pruners],
        "metrics": ctx.metrics,
    }
    files.write_text(stage_dir / DONE, json.dumps(info, indent=2))  # last: the stage counts as done once it exists


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


def restore(ctx: RunContext) -> int:
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
        pruner.stage = entry["stage"]
        pruner.attach(ctx.model)
        pruner.load_state_dict(entry.get("state", {}))
        ctx.pruners.append(pruner)
    weights = stage_dir / "model.safetensors"
    load_weights(ctx.model, _read_weights(weights), str(weights))
    ctx.metrics = info.get("metrics", {})
    log(f"resuming after stage {last} ({stage_dir.name})")
    return last + 1


def resume_recipe(run_dir: Path, where: str = "--resume") -> Recipe:
    from compress.recipe import read_yaml

    if not run_dir.is_dir() or not (run_dir / "recipe.yaml").is_file():
        raise CompressError(f"{where}: {run_dir} is not a run directory (no recipe.yaml)")
    path = run_dir / "recipe.yaml"
    return recipe_from_dict(read_yaml(path), str(path))
