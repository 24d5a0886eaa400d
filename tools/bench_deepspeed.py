"""DDP vs DeepSpeed ZeRO-2 vs ZeRO-3 on 2 CPU processes: the same small recipe, the same seed.

    python tools/bench_deepspeed.py [--steps 32] [--out tools/results]

Runs ``compress fit`` three times (one ``trainer.strategy`` each) on the quick-start task and model:
finetune, ISS-P pruning (50 %), distillation from the dense model, export. Reports the final top-1/top-5,
the largest difference of the exported weights from the DDP run's, the wall time of the whole run, and
the peak resident memory of each rank (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, written by every
rank when its process ends). One thread per rank; run it on an otherwise idle machine. Writes
``<out>/deepspeed_cpu.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STRATEGIES = ["ddp", "deepspeed_stage_2", "deepspeed_stage_3"]
WORKER_ENV = "COMPRESS_BENCH_RSS_DIR"


def recipe(strategy: str, steps: int) -> dict:
    return {
        "name": "bench_ds", "seed": 0,
        "model": {"name": "quickstart_vit"},
        "data": {"kind": "quickstart", "batch_size": 32, "num_workers": 0, "params": {"num_train": 2048, "num_val": 512}},
        "stages": [
            {"kind": "finetune", "max_steps": steps, "optimizer": {"lr": 2.0e-3}, "schedule": {"warmup_steps": 4}},
            {"kind": "prune", "max_steps": steps // 2, "pruner": {"name": "issp", "sparsity": 0.5}},
            {"kind": "distill", "max_steps": steps // 2, "optimizer": {"lr": 2.0e-4},
             "distill": {"teacher": "dense", "alpha": 0.5, "temperature": 2.0}},
        ],
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": strategy, "log_every_n_steps": 8},
        "evaluate": {"batch_size": 64, "bench": False},
    }


def worker(recipe_path: str, out: str) -> None:
    """One rank (Lightning re-runs this command for rank 1): fit, then record this process's peak RSS."""
    import compress  # noqa: F401
    from compress.run import fit

    try:
        fit(recipe_path, out=Path(out))
    finally:
        rank = os.environ.get("LOCAL_RANK", "0")
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        Path(os.environ[WORKER_ENV], f"rank{rank}.json").write_text(json.dumps({"maxrss_mib": kib / 1024}))


def run_one(strategy: str, steps: int, work: Path) -> dict:
    import torch

    import compress

    d = work / strategy
    d.mkdir(parents=True)
    import yaml

    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(strategy, steps)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **{WORKER_ENV: str(d)})
    for key in ("LOCAL_RANK", "NODE_RANK", "COMPRESS_RUN_DIR"):
        env.pop(key, None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", str(path), str(d / "runs")], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} failed:\n{proc.stderr[-3000:]}")
    run = next(p for p in (d / "runs").glob("*/*") if p.is_dir())
    metrics = json.loads((run / "metrics.json").read_text())
    rss = [json.loads((d / f"rank{r}.json").read_text())["maxrss_mib"] for r in range(2)]
    model = compress.load(run / "export")
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {"strategy": strategy, "wall_s": wall, "top1": metrics["pruned"]["top1"], "top5": metrics["pruned"]["top5"],
            "dense_top1": metrics["dense"]["top1"], "maxrss_mib": rss, "zero_linear_weights": zeros,
            "_weights": weights}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=32, help="finetune steps (prune and distill: half each)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(HERE.parent / ".cache" / "torch_extensions"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in STRATEGIES:
            rows.append(run_one(strategy, args.steps, Path(tmp)))
            print(f"{strategy}: {rows[-1]['wall_s']:.1f} s, top-1 {rows[-1]['top1']:.2f}", flush=True)
    ref = rows[0]["_weights"]
    for row in rows:
        w = row.pop("_weights")
        row["max_abs_weight_diff_vs_ddp"] = max(float((w[k] - ref[k]).abs().max()) for k in ref)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"steps": {"finetune": args.steps, "prune": args.steps // 2, "distill": args.steps // 2},
            "processes": 2, "threads_per_process": 1, "batch_per_process": 16, "model": "quickstart_vit (0.5 M params)",
            "recipe": recipe("<strategy>", args.steps)}
    (args.out / "deepspeed_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# DDP vs DeepSpeed ZeRO-2 vs ZeRO-3, 2 CPU processes (gloo), one thread each", "",
             f"Recipe: quickstart_vit on the quick-start task, finetune {args.steps} steps, ISS-P 50 % {args.steps // 2} "
             f"steps, distill {args.steps // 2} steps, global batch 32, seed 0 (`tools/bench_deepspeed.py`).", "",
             "| strategy | top-1 % | top-5 % | max abs weight diff vs DDP | zeroed Linear weights | wall s | peak RSS rank 0 / 1 (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['max_abs_weight_diff_vs_ddp']:.2e} | "
                     f"{r['zero_linear_weights']} | {r['wall_s']:.1f} | {r['maxrss_mib'][0]:.0f} / {r['maxrss_mib'][1]:.0f} |")
    (args.out / "deepspeed_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
