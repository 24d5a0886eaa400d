"""What ``compress eval / bench / export / pruners / recipes`` do (the CLI only parses arguments)."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from compress import files
from compress.errors import CompressError
from compress.report import compare
from compress.tables import table


def _input_size(model, manifest: Optional[Dict[str, Any]] = None) -> tuple:
    if manifest and manifest.get("input_size"):
        return tuple(manifest["input_size"])
    from timm.data import resolve_data_config

    return tuple(resolve_data_config({}, model=model)["input_size"])


def _data_source(data: str, limit: Optional[int] = None):
    """``--data KIND:ROOT`` -> (kind, the dataset kind's ``DataSource``)."""
    from compress.registry import DATASETS

    if ":" not in data:
        raise CompressError(f"--data: expected KIND:ROOT (e.g. imagenet:/data/imagenet), got {data!r}")
    kind, root = data.split(":", 1)
    try:
        cls = DATASETS.get(kind)
    except CompressError as e:
        raise CompressError(f"--data: {e}") from None
    return kind, cls(Path(root) if root else None, cls.Config(), limit)


def evaluate_export(checkpoint: Path, data: str, split: str, limit: Optional[int], batch_size: int, workers: int,
                    device: str) -> Dict[str, Any]:
    from compress import measure
    from compress.data.base import report_unreadable
    from compress.export import load
    from compress.tasks.base import Task

    kind, source = _data_source(data, limit)
    model = load(checkpoint)
    manifest = model._compress_manifest
    made_for = manifest.get("task", "classification")
    if source.task != made_for:
        raise CompressError(f"--data: {kind} is a {source.task} dataset but the export is a {made_for} model")
    task = Task.for_source(source)
    task.check_model(model, f"--data: {checkpoint} on {kind}")
    ds = source.dataset(split, model, train=False)
    from compress.context import data_workers

    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=data_workers(workers))
    results = task.evaluate(model, loader, device)
    results.update(report_unreadable(ds))
    size = _input_size(model, manifest)
    # a task that measured these on the real images (segmentation: GMACs per image, speed) keeps its own
    if "gmacs" not in results:
        results["gmacs"] = measure.count_gmacs(model, task.example(size, 1, device))
    results["params"] = measure.count_params(model)
    if "images_per_s" not in results:
        results.update(measure.throughput(model, task.example(size, min(batch_size, 32), device)))
    results.update(checkpoint=str(checkpoint), data=data, split=split, task=task.name)
    return results


def eval_table(r: Dict[str, Any]) -> str:
    from compress.registry import TASKS

    task = TASKS.get(r.get("task", "classification"))
    cols = [*task.columns, ("images", "images", "d"), ("gmacs", "GMACs", ".4f"),
            ("params", "params", ",d"), ("images_per_s", "images/s", ".1f"), *getattr(task, "eval_columns", ())]
    return table({Path(r["checkpoint"]).name: r}, cols)


def _recipe_models(recipe_path: Path, overrides: List[str]):
    """Dense and zero-shot-pruned models from a recipe's model and prune stages (no training): every pruner is
    attached and finalized, so structured and weight pruners apply their decision at once (from the weights as
    they are) and the benchmark sees the final structure. Also returns the input shape, the pruners and the task."""
    import copy

    from compress.models import build_model
    from compress.recipe import load_recipe
    from compress.context import build_source
    from compress.tasks.base import Task

    recipe = load_recipe(recipe_path, overrides)
    source = build_source(recipe)
    dense = build_model(recipe.model).eval()
    pruned = copy.deepcopy(dense)
    pruners = []
    for i, stage in enumerate(recipe.stages):
        if stage.pruner is not None:
            where = f"stages[{i}].pruner"
            pruner = stage.pruner.build(where)
            try:
                pruner.attach(pruned)
            except (CompressError, ValueError) as e:
                raise CompressError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
            pruner.finalize(pruned)
            pruners.append(pruner)
    return dense, pruned, tuple(source.input_size(dense)), pruners, Task.for_source(source)


def bench(checkpoint: Optional[Path], recipe: Optional[Path], overrides: List[str], batch_sizes: List[int],
          device: str, repeats: int, data: Optional[str] = None, onnx: bool = False,
          round_seconds: float = 0.5, compile_backend: Optional[str] = None) -> Dict[str, Any]:
    from compress.export import build_base, load
    from compress.tasks.base import Task

    if checkpoint is not None:
        pruned = load(checkpoint)
        dense = build_base(pruned._compress_manifest).eval()
        size = _input_size(pruned, pruned._compress_manifest)
        source = str(checkpoint)
        pruners = pruned._compress_manifest["pruners"]
        task = Task.for_manifest(pruned._compress_manifest)
    else:
        dense, pruned, size, pruners, task = _recipe_models(recipe, overrides)
        source = str(recipe)
    if data is not None:  # real images as the measuring input, for pruners whose cost depends on the image (dtop)
        kind, data_source = _data_source(data)
        if data_source.task != task.name:
            raise CompressError(f"--data: {kind} is a {data_source.task} dataset but the model is a {task.name} model")
        task.use_data(data_source.dataset("val", pruned, train=False))
    example = lambda bs: task.example(size, bs, device)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as tmp:
        runtimes = _onnx_runtimes({"dense": dense, "pruned": pruned}, example, Path(tmp), device) if onnx else {}
        compiled = _compiled_runtimes({"dense": dense, "pruned": pruned}, example, batch_sizes, compile_backend) if compile_backend else {}
        runtimes.update({name: c["model"] for name, c in compiled.items()})
        results = compare(dense, pruned, example, batch_sizes, device, repeats, runtimes or None, round_seconds)
    if compiled:
        results["compile"] = {name: {k: v for k, v in c.items() if k != "model"} for name, c in compiled.items()}
    results["source"] = source
    from compress.pruners.base import pruner_figures
    from compress.registry import PRUNERS

    made = [(PRUNERS.get(p["spec"]["name"]), p.get("edits")) if isinstance(p, dict) else (type(p), None) for p in pruners]
    results.update(pruner_figures(made, dense=dense, pruned=pruned, example=example, batch_sizes=batch_sizes,
                                  device=device, repeats=repeats, dense_gmacs=results["dense"]["gmacs"], export=checkpoint))
    results["input_size"] = list(size)
    return results


def _onnx_runtimes(models: Dict[str, Any], example, folder: Path, device: str) -> Dict[str, Any]:
    """Each model exported to ONNX in ``folder`` (checked against it) and opened in onnxruntime with the threads
    torch uses, as "<name> (onnxruntime)"."""
    import copy

    from compress import deploy
    from compress.measure import pin_threads

    if device != "cpu":
        raise CompressError("--onnx: onnxruntime is timed on the CPU here; use --device cpu")
    out = {}
    for name, model in models.items():
        path = folder / f"{name}.onnx"
        deploy.export_model(copy.deepcopy(model), "onnx", path, example)
        out[f"{name} (onnxruntime)"] = deploy.OnnxRuntimeModel(path, threads=pin_threads())
    return out


def _compiled_runtimes(models: Dict[str, Any], example, batch_sizes, backend: str) -> Dict[str, Dict[str, Any]]:
    """Each model under ``torch.compile`` as "<name> (compiled)": compiled for every batch size and checked
    against eager there (``compiled.check``), with dynamo's graph breaks."""
    from compress import compiled as comp
    from compress.progress import track

    out = {}
    for name, model in track(list(models.items()), f"torch.compile ({backend})", unit="models"):
        runner = comp.CompiledModel(model.eval(), backend=backend)
        checks = [comp.check(runner, example, bs) for bs in batch_sizes]
        args = example(batch_sizes[0])
        out[f"{name} (compiled)"] = {"model": runner, "backend": backend, "checks": checks,
                                     **comp.graph_breaks(model, *(args if isinstance(args, tuple) else (args,)))}
    return out


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
    for name, m in (r.get("runtimes") or {}).items():  # other runtimes of the same models (onnxruntime)
        rows[name] = {f"ips{bs}": s["images_per_s"] for bs, s in m["speed"].items()}
        rows[name].update({f"lat{bs}": s["latency_ms"] for bs, s in m["speed"].items()})
        rows[f"{name} / dense"] = {f"ips{bs}": v for bs, v in m["speedup_vs_dense"].items()}
    cols = [("gmacs", "GMACs", ".4f"), ("params", "params (M)", ".3f")]
    for bs in r["dense"]["speed"]:
        cols += [(f"ips{bs}", f"images/s @{bs}", ".2f"), (f"lat{bs}", f"latency ms @{bs}", ".2f")]
        if r["dense"]["speed"][bs]["peak_memory_mb"] is not None:
            cols.append((f"mem{bs}", f"peak MiB @{bs}", ".1f"))
    out = (f"{r['source']} on {r['device']} ({r['threads']} threads), input {tuple(r['input_size'])}\n"
           + table(rows, cols))
    spread = ", ".join(f"@{bs}: {min(v):.2f}x-{max(v):.2f}x" for bs, v in r["ratios"].get("speedup_rounds", {}).items())
    if spread:
        out += f"\nspeed-up in each of the interleaved rounds {spread} (the table: their median)"
    dropped = {bs: s.get("dropped_rounds", 0) for bs, s in r["dense"]["speed"].items()}
    if any(dropped.values()):
        out += ("\nretaken rounds (other processes used the CPU meanwhile): "
                + ", ".join(f"@{bs}: {n}" for bs, n in dropped.items() if n))
    if r.get("busy_cores_elsewhere") is not None and r["busy_cores_elsewhere"] > 0.5:
        out += f"\nwarning: other processes kept {r['busy_cores_elsewhere']:.1f} CPU cores busy; the speed ratios are unreliable"
    for name, c in (r.get("compile") or {}).items():
        secs = ", ".join(f"@{k['batch_size']}: {k['compile_seconds']:.0f} s" for k in c["checks"] if k.get("compile_seconds") is not None)
        worst = max(k["max_rel_diff"] for k in c["checks"])
        out += (f"\n{name}: torch.compile backend {c['backend']}, compiled in {secs}; largest difference from eager "
                f"{worst:.1e} of the largest output; {c['graphs']} graph(s), {c['breaks']} graph break(s)")
        out += "".join(f"\n  break: {b['reason']} (at {b['at']})" for b in c["reasons"][:3])
    for figures in r.values():  # the pruners' own figures (see Pruner.figures)
        if isinstance(figures, dict) and isinstance(figures.get("text"), str):
            out += "\n" + figures["text"]
    return out


def export_run(run_dir: Path, out: Path) -> Path:
    """Copy a run's export; if it has none, rebuild it from the last completed stage."""
    import json

    from compress.manifest import read_manifest
    from compress.models import build_model
    from compress.report import export_context
    from compress.context import RunContext, build_source
    from compress.rundir import check_writable_dir, restore, resume_recipe
    from compress.tasks.base import Task

    recipe = resume_recipe(run_dir, "--run")
    if out.exists():
        raise CompressError(f"--out: {out} already exists")
    existing = run_dir / "export"
    if existing.is_dir():
        read_manifest(existing)
        check_writable_dir(out.parent, "--out")
        out.parent.mkdir(parents=True, exist_ok=True)
        with files.atomic_dir(out) as tmp:
            for f in existing.iterdir():
                shutil.copy2(f, tmp / f.name)
        return out
    recipe.model.pretrained, recipe.model.checkpoint = False, None
    model = build_model(recipe.model)
    source = build_source(recipe)
    ctx = RunContext(recipe, run_dir, model, source, (), task=Task.for_source(source))
    if restore(ctx) == 0:
        raise CompressError(f"--run: {run_dir} has no completed stage to export")
    ctx.input_size = tuple(ctx.source.input_size(model))
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else ctx.metrics
    return export_context(ctx, out, metrics)


def copy_export(checkpoint: Path, out: Path) -> Path:
    """A copy of the export folder ``checkpoint`` at ``out`` (checked first; written atomically)."""
    from compress.manifest import read_manifest
    from compress.rundir import check_writable_dir

    read_manifest(checkpoint)
    if out.exists():
        raise CompressError(f"--out: {out} already exists")
    check_writable_dir(out.parent, "--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_dir(out) as tmp:
        for f in checkpoint.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    return out


def deploy_export(checkpoint: Path, out: Path, fmt: str, dynamic_batch: bool = True,
                  dense_tokens: bool = False) -> List[Dict[str, Any]]:
    """ONNX / .pt2 file(s) of the export ``checkpoint`` at ``out``: one file, or one per variant a pruner
    declares (``Pruner.trace_variants``: e.g. ``out.expert0.onnx``...), each checked against ``compress.load``."""
    from compress import deploy
    from compress.export import load
    from compress.registry import PRUNERS
    from compress.rundir import check_writable_dir
    from compress.tasks.base import Task

    model = load(checkpoint)
    manifest = model._compress_manifest
    task = Task.for_manifest(manifest)
    size = _input_size(model, manifest)
    variants = [("", None)]
    for entry in manifest["pruners"]:
        found = PRUNERS.get(entry["spec"]["name"]).trace_variants(model, entry.get("edits") or {})
        if found != [("", None)]:
            variants = found
    suffix = deploy.FORMATS[fmt]
    stem = out.name[: -len(suffix)] if out.name.endswith(suffix) else out.name
    targets = [out.with_name(f"{stem}{part}{suffix}") for part, _ in variants]
    for target in targets:
        if target.exists():
            raise CompressError(f"--out: {target} already exists")
    check_writable_dir(out.parent, "--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    done: List[Dict[str, Any]] = []
    try:
        for (part, setup), target in zip(variants, targets):
            if setup is not None:
                setup(model)
            result = deploy.export_model(model, fmt, target, lambda bs: task.example(size, bs), dynamic_batch,
                                         dense_tokens)
            done.append({**result, "variant": part.lstrip(".") or None})
    except BaseException:
        for result in done:  # all the files or none
            Path(result["file"]).unlink(missing_ok=True)
        raise
    return done


@contextlib.contextmanager
def _export_of(run_dir: Optional[Path], checkpoint: Optional[Path]):
    """The export folder of ``checkpoint``, or of the run (its ``export/``, else rebuilt in a temporary folder)."""
    if checkpoint is not None:
        yield checkpoint
    elif (run_dir / "export").is_dir():
        yield run_dir / "export"
    else:
        with tempfile.TemporaryDirectory(prefix="compress-export-") as tmp:
            yield export_run(run_dir, Path(tmp) / "export")


def deploy(run_dir: Optional[Path], checkpoint: Optional[Path], out: Path, fmt: str, dynamic_batch: bool = True,
           dense_tokens: bool = False) -> List[Dict[str, Any]]:
    """``compress export --format onnx|pt2``."""
    with _export_of(run_dir, checkpoint) as folder:
        return deploy_export(folder, out, fmt, dynamic_batch, dense_tokens)


def export_folder(run_dir: Optional[Path], checkpoint: Optional[Path], out: Optional[Path],
                  repo_id: Optional[str] = None, private: bool = False):
    """``compress export [--out DIR] [--push-to-hub ORG/NAME]``: (the folder written or None, the Hub URL or None)."""
    from compress import hub

    if repo_id:
        hub.parse(repo_id)  # a bad name fails before any work
    if out is None:
        with tempfile.TemporaryDirectory(prefix="compress-hub-") as tmp, _export_of(run_dir, checkpoint) as folder:
            return None, hub.push(copy_export(folder, Path(tmp) / "hub"), repo_id, private)
    written = export_run(run_dir, out) if run_dir is not None else copy_export(checkpoint, out)
    return written, (hub.push(written, repo_id, private) if repo_id else None)


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
    from compress.recipe import bundled_recipes_dir

    return bundled_recipes_dir()


def describe_recipes() -> str:
    d = recipes_dir()
    if not d.is_dir():
        raise CompressError(f"no bundled recipes found (looked in {d})")
    lines = []
    for path in sorted(d.glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.read_text() else ""
        lines.append(f"{path.name:32s} {first.lstrip('# ').strip()}")
    return f"recipes in {d}:\n" + "\n".join(lines)
