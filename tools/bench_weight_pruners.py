"""Weight and structured pruning during training, on a real transfer task: DeiT-Tiny -> CIFAR-10.

    python tools/bench_weight_pruners.py [--assets ../shared/assets] [--img-size 64] [--prune-steps 150] [--tune-steps 150]

Starts from the real ImageNet DeiT-Tiny weights, transfers them to CIFAR-10 (the 10,000 test images
in ``cifar10-test``, split per class into 8,000 train / 2,000 val, disjoint) at a reduced
resolution, then gives every method the same number of optimizer steps from that transferred model:

- dense: fine-tuning continues (the reference);
- ISS-P at 50/70/90 % sparsity: soft shrinkage for ``prune`` steps, then the mask is fixed;
- gradual magnitude (cubic schedule) at the same sparsities, then the mask is fixed;
- heads + MLP pruning to ~60 % of dense GMACs (torch-pruning), then KD from the dense model.

Each run is a real ``compress fit`` of a generated recipe; every number below is measured on the
reloaded export (``compress.load``): top-1 on the val split, parameters, nonzeros, executed GMACs,
export size on disk, and images/s relative to dense, all models timed interleaved in one process.
Writes tools/results/weight_pruners_cifar10.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import compress  # noqa: F401  (torchvision guard first)
import torch
import yaml

import bench_assets

from compress import measure
from compress.report import table

HERE = Path(__file__).resolve().parent
MODEL = "deit_tiny_patch16_224"
SPARSITIES = (0.5, 0.7, 0.9)


def base_recipe(name: str, checkpoint: Path, data_root: Path, img_size: int, batch: int) -> dict:
    return {
        "name": name,
        "seed": 0,
        "model": {"name": MODEL, "checkpoint": str(checkpoint), "kwargs": {"img_size": img_size, "num_classes": 10}},
        "data": {"kind": "cifar10", "root": str(data_root), "batch_size": batch, "num_workers": 2,
                 "params": {"val_per_class": 200, "seed": 0}},
        "stages": [],
        "trainer": {"accelerator": "cpu", "devices": 1, "log_every_n_steps": 20, "enable_progress_bar": False},
        "evaluate": {"enabled": False, "bench": False},
    }


def method_stages(method: str, value, prune: int, tune: int, lr: float) -> list:
    """The stages of one method; every method gets ``prune + tune`` optimizer steps."""
    tune_stage = {"kind": "finetune", "max_steps": tune, "optimizer": {"lr": lr, "weight_decay": 0.05}}
    if method == "dense":
        return [{"kind": "finetune", "max_steps": prune + tune, "optimizer": {"lr": lr, "weight_decay": 0.05}}]
    if method == "issp":
        pruner = {"name": "issp", "sparsity": value, "alpha": 0.95}
        return [{"kind": "prune", "max_steps": prune, "pruner": pruner, "optimizer": {"lr": lr, "weight_decay": 0.05},
                 "schedule": {"name": "constant"}}, tune_stage]
    if method == "magnitude":
        pruner = {"name": "magnitude", "sparsity": value, "schedule": "cubic", "start_step": 0,
                  "end_step": max(1, int(prune * 0.8)), "frequency": max(1, prune // 15)}
        return [{"kind": "prune", "max_steps": prune, "pruner": pruner, "optimizer": {"lr": lr, "weight_decay": 0.05}},
                tune_stage]
    if method == "heads":
        pruner = {"name": "heads", "target_gmacs_ratio": value, "importance": "taylor", "steps": 5,
                  "prune_every": max(1, prune // 6)}
        return [{"kind": "prune", "max_steps": prune, "pruner": pruner, "optimizer": {"lr": lr, "weight_decay": 0.05}},
                {**tune_stage, "kind": "distill", "distill": {"teacher": "dense", "alpha": 0.7, "temperature": 2.0}}]
    raise ValueError(method)


def run_recipe(recipe: dict, work: Path, reuse: bool = False) -> Path:
    """``compress fit`` of ``recipe``; returns its export folder (kept as is with ``reuse``)."""
    from compress.run import fit

    path = work / f"{recipe['name']}.yaml"
    export = work / recipe["name"] / "export"
    if reuse and (export / "compress.json").is_file():
        return export
    recipe["export"] = {"enabled": True, "dir": str(export)}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    t0 = time.perf_counter()
    fit(path, out=work / recipe["name"] / "runs")
    print(f"[bench] {recipe['name']}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return export


def folder_bytes(path: Path) -> int:
    return (path / "model.safetensors").stat().st_size


def measure_exports(exports: dict, data_root: Path, img_size: int, batch_sizes) -> dict:
    """Reload every export and measure it; all models are timed interleaved in one process."""
    from compress.data.cifar10 import Cifar10
    from compress.export import load
    from compress.tasks.classification import evaluate

    models = {name: load(path) for name, path in exports.items()}
    first = next(iter(models.values()))
    source = Cifar10(data_root, Cifar10.Config(), None)
    loader = torch.utils.data.DataLoader(source.dataset("val", first, train=False), batch_size=200, num_workers=2)
    example = torch.randn(1, 3, img_size, img_size)
    out = {}
    for name, model in models.items():
        acc = evaluate(model, loader, 10)
        out[name] = {"top1": acc["top1"], "top5": acc["top5"], "params": measure.count_params(model),
                     "nonzeros": measure.count_nonzero_params(model), "gmacs": measure.count_gmacs(model, example),
                     "export_bytes": folder_bytes(exports[name]), "images": acc["images"]}
        print(f"[bench] {name}: top-1 {acc['top1']:.2f}", flush=True)
    prof = measure.profile(models, (3, img_size, img_size), batch_sizes, repeats=15)
    for name in models:
        out[name]["speed"] = prof[name]["speed"]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, dense = result["rows"], result["rows"]["dense"]
    bs = str(result["batch_sizes"][0])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, marker in (("issp", "o"), ("magnitude", "s")):
        pts = sorted((r["sparsity"], r["top1"]) for n, r in rows.items() if r["method"] == method)
        a.plot([100 * s for s, _ in pts], [t for _, t in pts], marker=marker, label=method)
    a.axhline(dense["top1"], color="black", ls="--", label="dense")
    a.set_xlabel("unstructured sparsity of the pruned layers (%)")
    a.set_ylabel("top-1 % (CIFAR-10 val, 2000 images)")
    a.legend()
    a.grid(alpha=0.3)
    for name, r in rows.items():
        speed = r["speed"][bs]["images_per_s"] / dense["speed"][bs]["images_per_s"]
        b.scatter([speed], [r["top1"]], label=name)
    b.set_xlabel(f"speed-up vs dense (images/s, batch {bs}, CPU)")
    b.set_ylabel("top-1 %")
    b.legend(fontsize=7)
    b.grid(alpha=0.3)
    fig.suptitle(f"DeiT-Tiny -> CIFAR-10 at {result['img_size']} px: pruning during training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict, argv, png: str) -> str:
    rows, dense = result["rows"], result["rows"]["dense"]
    bs = [str(b) for b in result["batch_sizes"]]
    trows = {}
    for name, r in rows.items():
        trows[name] = {"top1": r["top1"], "drop": r["top1"] - dense["top1"], "params": r["params"] / 1e6,
                       "nz": r["nonzeros"] / 1e6, "gmacs": r["gmacs"], "gr": r["gmacs"] / dense["gmacs"],
                       "mb": r["export_bytes"] / 2**20,
                       **{f"s{b}": r["speed"][b]["images_per_s"] / dense["speed"][b]["images_per_s"] for b in bs}}
    cols = [("top1", "top-1 %", ".2f"), ("drop", "Δ top-1", "+.2f"), ("params", "params (M)", ".3f"),
            ("nz", "nonzeros (M)", ".3f"), ("gmacs", "GMACs", ".4f"), ("gr", "GMACs ratio", ".3f"),
            ("mb", "export MiB", ".2f")] + [(f"s{b}", f"speed-up @{b}", ".2f") for b in bs]
    s = result["steps"]
    lines = [f"# Pruning during training: DeiT-Tiny -> CIFAR-10 at {result['img_size']} px (CPU, {result['threads']} threads)", "",
             f"Transfer: {s['transfer']} steps from the ImageNet weights; then every method gets {s['prune'] + s['tune']} steps "
             f"(pruning methods: {s['prune']} prune + {s['tune']} fine-tune/KD), batch {result['batch']}. "
             f"Train 8000 / val 2000 images (disjoint, from the CIFAR-10 test set). All numbers from the reloaded exports.", "",
             table(trows, cols), "",
             "Unstructured sparsity (ISS-P, magnitude) shrinks the export (values + bit mask) and the nonzero count, "
             "not the dense-kernel time: their speed-up stays ~1.0x. Heads/MLP pruning removes whole heads and hidden "
             "units, so params, GMACs and time drop together.", "",
             f"![accuracy vs sparsity and speed]({png})", "",
             f"Regenerate: `python tools/bench_weight_pruners.py {' '.join(argv)}` ({result['seconds'] / 60:.0f} min)"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_assets.add_argument(p)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--transfer-steps", type=int, default=600)
    p.add_argument("--prune-steps", type=int, default=150)
    p.add_argument("--tune-steps", type=int, default=150)
    p.add_argument("--heads-gmacs", type=float, default=0.6)
    p.add_argument("--methods", default="dense,issp,magnitude,heads")
    p.add_argument("--batch-sizes", default="128,1")
    p.add_argument("--work", type=Path, default=Path("runs") / "bench_weight_pruners")
    p.add_argument("--out", type=Path, default=HERE / "results" / "weight_pruners_cifar10")
    p.add_argument("--reuse", action="store_true", help="keep the exports already in --work (e.g. to re-measure on a quiet machine)")
    args = p.parse_args(argv)

    found = bench_assets.find(args.assets, bench_assets.DEIT_TINY, bench_assets.CIFAR10)
    if found is None:
        return 2
    weights, data_root = found
    t0 = time.perf_counter()
    threads = measure.pin_threads(int(os.environ.get("COMPRESS_THREADS", 2)))
    if args.work.exists() and not args.reuse:
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)

    transfer = base_recipe("transfer", weights, data_root, args.img_size, args.batch)
    transfer["stages"] = [{"kind": "finetune", "max_steps": args.transfer_steps, "optimizer": {"lr": 5e-4, "weight_decay": 0.05},
                           "schedule": {"warmup_steps": 20}}]
    start = run_recipe(transfer, args.work, args.reuse) / "model.safetensors"

    runs = []
    for method in args.methods.split(","):
        values = SPARSITIES if method in ("issp", "magnitude") else (args.heads_gmacs if method == "heads" else None,)
        for v in values:
            name = method if v is None else f"{method}-{int(round(100 * v))}"
            runs.append((name, method, v))
    exports = {}
    for name, method, value in runs:
        recipe = base_recipe(name, start, data_root, args.img_size, args.batch)
        recipe["stages"] = method_stages(method, value, args.prune_steps, args.tune_steps, 1e-4)
        exports[name] = run_recipe(recipe, args.work, args.reuse)

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    measured = measure_exports(exports, data_root, args.img_size, sizes)
    rows = {}
    for name, method, value in runs:
        rows[name] = {"method": method, "sparsity": value if method in ("issp", "magnitude") else 0.0,
                      "target": value, **measured[name]}
    result = {"model": MODEL, "img_size": args.img_size, "batch": args.batch, "threads": threads, "batch_sizes": sizes,
              "steps": {"transfer": args.transfer_steps, "prune": args.prune_steps, "tune": args.tune_steps},
              "rows": rows, "torch": torch.__version__, "seconds": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    if "dense" in rows:
        plot(result, args.out.with_suffix(".png"))
        md = markdown(result, argv, args.out.with_suffix(".png").name)
        args.out.with_suffix(".md").write_text(md)
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
