"""STViT vs dense vs the zero-shot token pruners on the quick-start task, at matched executed GMACs.

    python tools/bench_stvit.py [--num-train 2000] [--dense-epochs 6] [--distill-epochs 1] [--repeats 12]

One dense quickstart model is trained (stage 0 of recipes/quickstart_stvit.yaml). From that same
model, each pruner is attached and then given the same short distillation from the dense model
(stage 2 of that recipe): STViT, and zero_tprune / gtp / tome with ``target_gmacs_ratio`` set to
STViT's executed GMACs ratio. Accuracy on the val split (generated with a different seed than the
train split, so the two are disjoint) zero-shot and after distillation; GMACs executed; images/s at
batch 32 measured for all models in this one process, interleaved (compress.measure.profile). As a
control, the dense model gets the same extra training (finetune, same epochs and learning rate).
Writes tools/results/stvit_quickstart.{json,md}. The runs use the library's stage runner. The
defaults shrink the recipe's training (2000 train images, 6 dense epochs, 1 distill epoch) so the
whole comparison fits in about 15 minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import compress  # noqa: F401  (torchvision guard first)
import torch
import yaml

from compress.measure import count_gmacs, profile
from compress.pruners.base import build_pruner
from compress.recipe import recipe_from_dict
from compress.report import table
from compress.run import evaluate_model, prepare, run_stage

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "quickstart_stvit.yaml"
ZERO_SHOT = {  # the zero-shot pruners, their budget set to STViT's ratio below
    "zero_tprune": {"name": "zero_tprune", "wpr_iters": 3},
    "gtp": {"name": "gtp"},
    "tome": {"name": "tome"},
}


def recipe_for(base: dict, pruner: dict = None, control: bool = False):
    """The quickstart_stvit recipe with another pruner in stage 1 (or, for the control, a finetune
    with the distill stage's epochs and optimizer instead of prune + distill)."""
    data = copy.deepcopy(base)
    prune, distill = data["stages"][1], data["stages"][2]
    if control:
        data["stages"] = [data["stages"][0], {"kind": "finetune", "epochs": distill["epochs"], "evaluate": True,
                                              **{k: distill[k] for k in ("optimizer", "schedule") if k in distill}}]
    else:
        prune["pruner"] = pruner or prune["pruner"]
        prune["evaluate"] = distill["evaluate"] = True
    data["evaluate"]["bench"] = False
    data["export"] = {"enabled": False}
    return recipe_from_dict(data, str(RECIPE))


def run_from(dense_state, recipe, run_dir: Path, first: int):
    """Run stages ``first``.. of ``recipe`` on a model that starts from ``dense_state``."""
    ctx = prepare(recipe, run_dir)
    ctx.model.load_state_dict(dense_state)
    for i in range(first, len(recipe.stages)):
        run_stage(ctx, i, recipe.stages[i])
    return ctx


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense-epochs", type=int, default=6, help="the recipe has 8 on twice the images")
    p.add_argument("--distill-epochs", type=int, default=1, help="the recipe has 2")
    p.add_argument("--num-train", type=int, default=2000, help="the recipe has 4000")
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--out", type=Path, default=HERE / "results" / "stvit_quickstart")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("COMPRESS_THREADS", 2)))
    t0 = time.time()

    base = yaml.safe_load(RECIPE.read_text())
    base["trainer"]["enable_progress_bar"] = False
    if args.dense_epochs is not None:
        base["stages"][0]["epochs"] = args.dense_epochs
    if args.num_train is not None:
        base["data"]["params"]["num_train"] = args.num_train
    if args.distill_epochs is not None:
        base["stages"][2]["epochs"] = args.distill_epochs
    work = Path(tempfile.mkdtemp(prefix="bench_stvit_"))

    # 1. the dense model, trained once
    dense_recipe = recipe_for(base)
    ctx = prepare(dense_recipe, work / "dense")
    run_stage(ctx, 0, dense_recipe.stages[0])
    dense = ctx.model.eval()
    dense_state = copy.deepcopy(dense.state_dict())
    acc = {"dense": evaluate_model(ctx, dense)}

    # 2. STViT's executed GMACs ratio is the budget of the zero-shot pruners
    x1 = torch.randn(1, *ctx.input_size)
    probe = copy.deepcopy(dense)
    build_pruner(base["stages"][1]["pruner"]).attach(probe)
    target = count_gmacs(probe, x1) / count_gmacs(dense, x1)
    specs = {"stvit": base["stages"][1]["pruner"]}
    specs.update({k: {**v, "target_gmacs_ratio": round(target, 4)} for k, v in ZERO_SHOT.items()})

    # 3. each pruner from the same dense model: zero-shot, then the same short distillation
    models = {"dense": dense}
    for name, spec in specs.items():
        c = run_from(dense_state, recipe_for(base, spec), work / name, first=1)
        acc[name] = {"zero_shot": c.metrics["stages"]["1-prune"], "distilled": c.metrics["stages"]["2-distill"]}
        models[name] = c.model.eval()
    c = run_from(dense_state, recipe_for(base, control=True), work / "control", first=1)
    acc["dense + same training"] = {"distilled": c.metrics["stages"]["1-finetune"]}

    # 4. GMACs and speed, all models in this process, timings interleaved
    bench = profile(models, ctx.input_size, batch_sizes=(32,), repeats=args.repeats)
    d = bench["dense"]
    rows = {"dense": {"top1_zero": acc["dense"]["top1"], "top1_after": acc["dense"]["top1"], "gmacs": d["gmacs"], "ratio": 1.0,
                      "ips": d["speed"]["32"]["images_per_s"], "speedup": 1.0},
            "dense + same training": {"top1_after": acc["dense + same training"]["distilled"]["top1"]}}
    for name in specs:
        b = bench[name]
        rows[name] = {"top1_zero": acc[name]["zero_shot"]["top1"], "top1_after": acc[name]["distilled"]["top1"],
                      "gmacs": b["gmacs"], "ratio": b["gmacs"] / d["gmacs"], "ips": b["speed"]["32"]["images_per_s"],
                      "speedup": b["speed"]["32"]["images_per_s"] / d["speed"]["32"]["images_per_s"]}
    cols = [("top1_zero", "top-1 % zero-shot", ".1f"), ("top1_after", "top-1 % after distill", ".1f"),
            ("gmacs", "GMACs", ".5f"), ("ratio", "GMACs ratio", ".3f"), ("ips", "images/s @32", ".0f"),
            ("speedup", "speed-up", ".2f")]
    epochs = base["stages"][2]["epochs"]
    md = (f"# STViT vs zero-shot token pruners on the quick-start task (CPU, {torch.get_num_threads()} threads)\n\n"
          f"Dense quickstart_vit (6 blocks, 8x8 = 64 patch tokens) trained {base['stages'][0]['epochs']} epochs on "
          f"{base['data']['params']['num_train']} train images; accuracy on {acc['dense']['images']} disjoint val images. "
          f"Every pruner starts from that model and gets the same {epochs}-epoch distillation from it; the zero-shot "
          f"pruners use `target_gmacs_ratio` = STViT's executed ratio ({target:.3f}). 'dense + same training' is the "
          f"dense model fine-tuned for the same {epochs} epochs (a control for the extra training).\n\n"
          + table(rows, cols) +
          f"\n\nSTViT: `{json.dumps(specs['stvit'])}`. Speed: images/s at batch 32, all models timed in one process, "
          f"interleaved, median of repeats (the CPU is shared, so compare the ratios). Wall time {time.time() - t0:.0f} s.\n\n"
          f"Regenerate: `python tools/bench_stvit.py`\n")
    result = {"recipe": str(RECIPE.name), "target_gmacs_ratio": target, "pruners": specs, "accuracy": acc,
              "bench": bench, "rows": rows, "torch": torch.__version__, "wall_s": time.time() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    shutil.rmtree(work, ignore_errors=True)  # the stage checkpoints of the runs above
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
