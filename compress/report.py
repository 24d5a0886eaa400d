"""The end of a run: evaluate the pruned model, measure dense vs pruned, export, print the table."""
from __future__ import annotations

import json
import statistics
from typing import Any, Dict, Optional

import torch.nn as nn

from compress import files, measure
from compress.tables import summary_table, table  # noqa: F401  (the report's tables; tools import table from here)


def compare(dense: nn.Module, pruned: nn.Module, example, batch_sizes=(32,), device: str = "cpu",
            repeats: int = 10, runtimes: Optional[Dict[str, nn.Module]] = None, round_seconds: float = 0.0) -> Dict[str, Any]:
    """Dense vs pruned in one process; ``example`` is an input shape or ``batch_size -> inputs`` (see
    ``Task.example``). ``runtimes`` are other runners of the same models (e.g. onnxruntime sessions, named
    "dense (onnxruntime)"), timed in the same interleaved rounds and reported beside them."""
    busy = measure.busy_cores_elsewhere() if device == "cpu" else None
    if busy is not None and busy > 0.5:
        import logging

        logging.getLogger("compress").warning(
            "benchmark: other processes keep %.1f CPU cores busy; speed ratios on a loaded machine vary a lot "
            "(see the spread of the rounds): rerun on an idle machine", busy)
    prof = measure.profile({"dense": dense, "pruned": pruned, **(runtimes or {})}, example, batch_sizes,
                           device=device, repeats=repeats, round_seconds=round_seconds)
    d, p = prof["dense"], prof["pruned"]
    # the speed-up of each interleaved round alone (how far one run's ratio can be trusted), and their median
    rounds = measure.round_ratios(p, d)
    ratios = {
        "gmacs": p["gmacs"] / d["gmacs"],
        "params": p["params"] / d["params"],
        "speedup": {bs: statistics.median(v) for bs, v in rounds.items()},
        "speedup_rounds": rounds,
    }
    out = {"dense": d, "pruned": p, "ratios": ratios, "device": device, "threads": measure.pin_threads(),
           "busy_cores_elsewhere": busy}
    if runtimes:  # their speed vs the eager dense model; GMACs and parameters are the eager models' own
        out["runtimes"] = {name: {"speed": prof[name]["speed"],
                                  "speedup_vs_dense": {bs: statistics.median(v) for bs, v in measure.round_ratios(prof[name], d).items()}}
                           for name in runtimes}
    return out


def finalize_pruners(ctx) -> list:
    """Make every pruner's decision physical (pending prunes, frozen masks); returns their structural edits."""
    return [p.finalize(ctx.model) for p in ctx.pruners]


def export_context(ctx, out, metrics: Dict[str, Any], edits=None):
    """Write the export folder of a run (finalizing its pruners unless their ``edits`` are given)."""
    from compress.export import save
    from compress.models.build import model_spec
    from compress.recipe import dump_recipe

    recipe = ctx.recipe
    edits = finalize_pruners(ctx) if edits is None else edits
    return save(ctx.model, out, model_spec(recipe.model.name, recipe.model.kwargs), ctx.pruners, edits,
                dump_recipe(recipe), _exportable(metrics), task=ctx.task, input_size=ctx.input_size)


def finish(ctx) -> Dict[str, Any]:
    from compress.context import eval_device, evaluate_model, is_global_zero, log

    if not is_global_zero():  # other DDP ranks: rank 0 evaluates, measures and exports
        return ctx.metrics
    recipe = ctx.recipe
    metrics = ctx.metrics
    edits = finalize_pruners(ctx)  # first, so the evaluation and the timing see the model that is exported
    model = ctx.model.eval()
    if recipe.evaluate.enabled:
        metrics["pruned"] = evaluate_model(ctx, model, "evaluate pruned")
        if ctx.dense is None:
            metrics["dense"] = metrics["pruned"]
    dense = ctx.dense if ctx.dense is not None else model
    dev = eval_device(recipe)
    example = lambda bs: ctx.task.example(ctx.input_size, bs, dev)  # noqa: E731
    sizes = (recipe.evaluate.batch_size,)
    if recipe.evaluate.bench:
        metrics["bench"] = compare(dense, model, example, sizes, dev)
    if recipe.export.enabled:
        out = recipe.export.dir or (ctx.run_dir / "export")
        export_context(ctx, out, metrics, edits)
        metrics["export"] = str(out)
        log(f"exported to {out}")
    from compress.pruners.base import pruner_figures

    metrics.update(pruner_figures(  # the pruners' own figures (per-expert speed, the storage of zeros, ...)
        [(type(p), e) for p, e in zip(ctx.pruners, edits)], dense=dense, pruned=model, example=example,
        batch_sizes=sizes, device=dev, repeats=6, dense_gmacs=(metrics.get("bench") or {}).get("dense", {}).get("gmacs"),
        export=metrics.get("export"), timing=recipe.evaluate.bench))
    files.write_text(ctx.run_dir / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
    print()
    print(f"{recipe.name}: dense vs pruned on {recipe.data.kind}:{recipe.evaluate.split}")
    print(summary_table(metrics, ctx.task.columns))
    for figures in metrics.values():
        if isinstance(figures, dict) and isinstance(figures.get("text"), str):
            print(figures["text"])
    for where, found in (metrics.get("schedules") or {}).items():
        print(f"{where} learned: " + "; ".join(f"{k} {v}" for k, v in found.items()))
    plot = write_tradeoff_plot(ctx, metrics)
    if plot is not None:
        print(f"trade-off plot: {plot}")
    return metrics


def write_tradeoff_plot(ctx, metrics: Dict[str, Any]):
    """``<run_dir>/tradeoff.png`` (the task's primary metric vs GMACs and images/s), or None when the run has no
    bench or no quality metrics to draw. Beside metrics.json, not in the export folder, whose files export.py owns."""
    from compress.plots import tradeoff_png

    task, recipe = ctx.task, ctx.recipe
    label = next((title for key, title, _ in task.columns if key == task.primary), None)
    title = f"{recipe.name}: dense vs pruned on {recipe.data.kind}:{recipe.evaluate.split}"
    return tradeoff_png(metrics, ctx.run_dir / "tradeoff.png", title=title, metric=task.primary or None, metric_label=label)


def _exportable(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in metrics.items() if k in ("dense", "pruned", "bench", "stages", "schedules")}
