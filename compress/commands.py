"""What ``compress eval / bench / export / pruners / recipes`` do (the CLI only parses arguments)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from compress.errors import CompressError
from compress.report import compare, table


def _input_size(model, manifest: Optional[Dict[str, Any]] = None) -> tuple:
    if manifest and manifest.get("input_size"):
        return tuple(manifest["input_size"])
    from timm.data import resolve_data_config

    return tuple(resolve_data_config({}, model=model)["input_size"])


def evaluate_export(checkpoint: Path, data: str, split: str, limit: Optional[int], batch_size: int, workers: int,
                    device: str) -> Dict[str, Any]:
    from compress import measure
    from compress.data.base import check_classes, report_unreadable
    from compress.export import load
    from compress.registry import DATASETS
    from compress.tasks.classification import evaluate

    if ":" not in data:
        raise CompressError(f"--data: expected KIND:ROOT (e.g. imagenet:/data/imagenet), got {data!r}")
    kind, root = data.split(":", 1)
    model = load(checkpoint)
    cls = DATASETS.get(kind)
    source = cls(Path(root) if root else None, cls.Config(), limit)
    if source.task != model._compress_manifest.get("task", "classification"):
        raise CompressError(f"--data: {kind} is a {source.task} dataset but the export is a {model._compress_manifest['task']} model")
    check_classes(model, source, f"the export {checkpoint}", f"{kind}:{root}")
    ds = source.dataset(split, model, train=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
    results = evaluate(model, loader, source.num_classes, device)
    results.update(report_unreadable(ds))
    size = _input_size(model, model._compress_manifest)
    x = torch.randn(1, *size, device=device)
    results.update(gmacs=measure.count_gmacs(model, x), params=measure.count_params(model))
    results.update(measure.throughput(model, torch.randn(min(batch_size, 32), *size, device=device)))
    results.update(checkpoint=str(checkpoint), data=data, split=split)
    return results


def eval_table(r: Dict[str, Any]) -> str:
    cols = [("top1", "top-1 %", ".2f"), ("top5", "top-5 %", ".2f"), ("images", "images", "d"), ("gmacs", "GMACs", ".4f"),
            ("params", "params", ",d"), ("images_per_s", "images/s", ".1f")]
    return table({Path(r["checkpoint"]).name: r}, cols)


def _recipe_models(recipe_path: Path, overrides: List[str]):
    """Dense and zero-shot-pruned models from a recipe's model and prune stages (no training): every pruner is
    attached and finalized, so structured and weight pruners apply their decision at once (from the weights as
    they are) and the benchmark sees the final structure."""
    import copy

    from compress.models import build_model
    from compress.pruners.base import build_pruner
    from compress.recipe import load_recipe
    from compress.run import build_source

    recipe = load_recipe(recipe_path, overrides)
    dense = build_model(recipe.model).eval()
    pruned = copy.deepcopy(dense)
    pruners = []
    for i, stage in enumerate(recipe.stages):
        if stage.pruner is not None:
            pruner = build_pruner(stage.pruner.model_dump(), where=f"stages[{i}].pruner")
            pruner.attach(pruned)
            pruner.finalize(pruned)
            pruners.append(pruner)
    return dense, pruned, tuple(build_source(recipe).input_size(dense)), pruners


def bench(checkpoint: Optional[Path], recipe: Optional[Path], overrides: List[str], batch_sizes: List[int],
          device: str, repeats: int) -> Dict[str, Any]:
    from compress.export import build_base, load

    if checkpoint is not None:
        pruned = load(checkpoint)
        dense = build_base(pruned._compress_manifest).eval()
        size = _input_size(pruned, pruned._compress_manifest)
        source = str(checkpoint)
        pruners = pruned._compress_manifest["pruners"]
    else:
        dense, pruned, size, pruners = _recipe_models(recipe, overrides)
        source = str(recipe)
    results = compare(dense, pruned, size, batch_sizes, device, repeats)
    results["source"] = source
    from compress.pruners.weight import has_weight_pruner, storage_report

    if has_weight_pruner(pruners):  # unstructured zeros: nonzero params and the real file size
        results["storage"] = storage_report(dense, pruned, checkpoint)
    results["input_size"] = list(size)
    return results


def bench_table(r: Dict[str, Any]) -> str:
    rows: Dict[str, Dict[str, Any]] = {}
    for name in ("dense", "pruned"):
        m = r[name]
        row = {"gmacs": m["gmacs"], "params": m["params"] / 1e6}
        for bs, s in m["speed"].items():
            row[f"ips{bs}"] = s["images_per_s"]
            row[f"lat{bs}"] = s["latency_ms"]
            row[f"mem{bs}"] = s["peak_memory_mb"]
        rows[name] = row
    ratio = {"gmacs": r["ratios"]["gmacs"], "params": r["ratios"]["params"]}
    for bs, s in r["ratios"]["speedup"].items():
        ratio[f"ips{bs}"] = s
        ratio[f"lat{bs}"] = r["pruned"]["speed"][bs]["latency_ms"] / r["dense"]["speed"][bs]["latency_ms"]
    rows["pruned / dense"] = ratio
    cols = [("gmacs", "GMACs", ".4f"), ("params", "params (M)", ".3f")]
    for bs in r["dense"]["speed"]:
        cols += [(f"ips{bs}", f"images/s @{bs}", ".2f"), (f"lat{bs}", f"latency ms @{bs}", ".2f")]
        if r["dense"]["speed"][bs]["peak_memory_mb"] is not None:
            cols.append((f"mem{bs}", f"peak MiB @{bs}", ".1f"))
    out = (f"{r['source']} on {r['device']} ({r['threads']} threads), input {tuple(r['input_size'])}\n"
           + table(rows, cols))
    if "storage" in r:
        from compress.pruners.weight import storage_lines

        out += "\n" + storage_lines(r["storage"])
    return out


def export_run(run_dir: Path, out: Path) -> Path:
    """Copy a run's export; if it has none, rebuild it from the last completed stage."""
    import json

    import yaml

    from compress.export import read_manifest
    from compress.models import build_model
    from compress.recipe import recipe_from_dict
    from compress.report import export_context
    from compress.run import RunContext, _restore, build_source

    if not (run_dir / "recipe.yaml").is_file():
        raise CompressError(f"--run: {run_dir} is not a run directory (no recipe.yaml)")
    if out.exists():
        raise CompressError(f"--out: {out} already exists")
    existing = run_dir / "export"
    if existing.is_dir():
        read_manifest(existing)
        tmp = out.parent / f".{out.name}.tmp"
        shutil.copytree(existing, tmp)
        tmp.rename(out)
        return out
    recipe = recipe_from_dict(yaml.safe_load((run_dir / "recipe.yaml").read_text()), str(run_dir / "recipe.yaml"))
    recipe.model.pretrained, recipe.model.checkpoint = False, None
    model = build_model(recipe.model)
    ctx = RunContext(recipe, run_dir, model, build_source(recipe), ())
    if _restore(ctx) == 0:
        raise CompressError(f"--run: {run_dir} has no completed stage to export")
    ctx.input_size = tuple(ctx.source.input_size(model))
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else ctx.metrics
    return export_context(ctx, out, metrics)


def describe_pruners() -> str:
    from compress.registry import PRUNERS

    lines = []
    for name, cls in PRUNERS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines.append(f"{name}  [{cls.kind}]  {doc}")
        for field_name, field in cls.Config.model_fields.items():
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            desc = f"  {field.description}" if field.description else ""
            lines.append(f"    {field_name} = {default}{desc}")
    return "\n".join(lines)


def recipes_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "recipes"
    return here if here.is_dir() else Path.cwd() / "recipes"


def describe_recipes() -> str:
    d = recipes_dir()
    if not d.is_dir():
        raise CompressError(f"no bundled recipes found (looked in {d})")
    lines = []
    for path in sorted(d.glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.read_text() else ""
        lines.append(f"{path.name:32s} {first.lstrip('# ').strip()}")
    return f"recipes in {d}:\n" + "\n".join(lines)
