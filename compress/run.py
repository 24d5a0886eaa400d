"""The stage runner: recipe -> model, data, and one Lightning ``Trainer`` run per stage.

Stages run in order. The model as it stands before the first ``prune`` stage is the dense reference
(teacher for ``distill``, baseline in the report). After every stage the model's weights and the
pruners' specs are saved under ``stages/<i>-<kind>/``; ``--resume`` restores the last completed stage
and continues a stage interrupted mid-way from Lightning's ``last.ckpt``.

The parts: ``preflight`` (bad input fails before anything is written), ``stages`` (one Lightning run per
stage), ``rundir`` (what a run leaves on disk, and resume), ``context`` (what they share).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict

from compress import files
from compress.context import RunContext, evaluate_model, is_global_zero, log  # noqa: F401  (the runner's API)
from compress.errors import CompressError
from compress.interrupts import Interrupted, StopSignals
from compress.preflight import check_pruners, prepare  # noqa: F401
from compress.recipe import dump_recipe, load_recipe
from compress.rundir import DONE, RUN_DIR_ENV, new_run_dir, restore, resume_recipe, stage_folder
from compress.stages import run_stage


def fit(recipe_path=None, overrides=None, out=None, resume=None) -> Dict[str, Any]:
    """Run a recipe end to end; returns the metrics that also go to ``metrics.json``.

    A stop signal raises ``Interrupted`` (with ``run_dir`` set) after keeping a resumable state; a failure
    before any stage completed removes the run directory, so a failed run leaves nothing behind."""
    signals = StopSignals()
    with signals.installed():
        if resume is not None:
            run_dir = Path(resume)
            recipe = resume_recipe(run_dir)
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
                log(f"run directory: {run_dir}")
            first = restore(ctx) if resume is not None else 0
            for i in range(first, len(recipe.stages)):
                stage = recipe.stages[i]
                last_ckpt = stage_folder(run_dir, i, stage.kind) / "checkpoints" / "last.ckpt"
                if resume is not None and last_ckpt.exists():
                    log(f"stage {i} ({stage.kind}): continuing from {last_ckpt}")
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
