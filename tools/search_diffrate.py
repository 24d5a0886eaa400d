"""DiffRate's count search on the real DeiT-Tiny, cross-fitted on the ImageNet sample, through ``compress fit``.

    python tools/search_diffrate.py [--assets ../shared/assets] [--budgets 0.9,0.75,0.65,0.5]
                                    [--search gradient|shapes] [--steps 300] [--set KEY=VALUE ...]

The 1000 sample images are split by class index parity into two folds. For each budget and fold f, a bundled
recipe runs its prune stage with ``data.root`` a folder whose ``train/`` holds the *other* fold's images and whose
``val/`` holds fold f's, which the search never reads (evaluation is off). ``--search gradient``:
``recipes/deit_t_diffrate.yaml``, DiffRate's search (a Lightning run, the ViT frozen; labelled: cross-entropy, or
KL to dense with ``--set "stages.0.distill={teacher: dense, alpha: 1.0}"``, random-crop views). ``--search
shapes``: ``recipes/deit_t_diffrate_shapes.yaml``, schedule shapes scored on the train images (top-1 error on
their labels, ties by KL to dense; no training). The budgets are of the blocks' MACs (0.639 of them is 0.647 of DeiT-Tiny's GMACs). The schedules found
go to ``--out`` (tools/results/diffrate_schedules.json); ``tools/bench_token_pruners.py --diffrate-schedules`` scores each
fold's images with the schedule searched on the other fold, so no image is scored by a schedule that saw it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import compress  # noqa: F401  (torchvision guard first)

import bench_assets

from compress import measure
from compress.run import fit

HERE = Path(__file__).resolve().parent
RECIPES = {"gradient": HERE.parent / "recipes" / "deit_t_diffrate.yaml",  # DiffRate's search, a training stage
           "shapes": HERE.parent / "recipes" / "deit_t_diffrate_shapes.yaml"}  # schedule shapes, scored on train/


def fold_root(images: Path, fold: int, into: Path) -> Path:
    """``into`` with train/ = the images of the classes whose index parity is not ``fold``, val/ = the others
    (symbolic links; ImageNet labels come from the wnid folder names, so half the classes per split is fine)."""
    src = images / "val"
    for i, wnid in enumerate(sorted(p.name for p in src.iterdir() if p.is_dir())):
        split = "val" if i % 2 == fold else "train"
        folder = into / split / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for img in (src / wnid).iterdir():
            (folder / img.name).symlink_to(img.resolve())
    return into


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_assets.add_argument(p)
    p.add_argument("--budgets", default="0.9,0.75,0.65,0.5")
    p.add_argument("--search", choices=sorted(RECIPES), default="gradient")
    p.add_argument("--steps", type=int, default=300, help="gradient search: optimizer steps of each search (batch 32)")
    p.add_argument("--folds", default="0,1")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a further recipe override (repeatable), e.g. stages.0.distill={teacher: dense, alpha: 1.0}")
    p.add_argument("--out", type=Path, default=HERE / "results" / "diffrate_schedules.json")
    args = p.parse_args(argv)
    found = bench_assets.deit_tiny_and_imagenet(args.assets)
    if found is None:
        return 2
    weights, images = found
    threads = measure.pin_threads(int(os.environ.get("COMPRESS_THREADS", 2)))
    result = json.loads(args.out.read_text()) if args.out.exists() else {"searches": []}
    recipe = RECIPES[args.search]
    steps = [f"stages.0.max_steps={args.steps}"] if args.search == "gradient" else []
    result.update({"threads": threads})
    with tempfile.TemporaryDirectory() as tmp:
        for fold in (int(f) for f in args.folds.split(",")):
            root = fold_root(images, fold, Path(tmp) / f"fold{fold}")
            for budget in (float(b) for b in args.budgets.split(",")):
                t0 = time.perf_counter()
                metrics = fit(recipe, [f"model.checkpoint={weights}", f"data.root={root}", "data.num_workers=1",
                                       *steps, f"stages.0.pruner.target_gmacs_ratio={budget}",
                                       "evaluate.enabled=false", "evaluate.bench=false", "export.enabled=false",
                                       *args.overrides],
                              out=Path(tmp) / "runs")
                seconds = time.perf_counter() - t0
                schedule = metrics["schedules"]["stages[0].pruner"]
                entry = {"budget": budget, "fold": fold, "searched_on": "train/ = the other fold's 500 images",
                         "recipe": str(recipe.relative_to(HERE.parent)), "overrides": args.overrides,
                         **({"steps": args.steps, "batch_size": 32} if args.search == "gradient" else
                            {"calibration": metrics.get("calibration")}), "seconds": seconds, **schedule}
                result["searches"] = [s for s in result["searches"] if (s["budget"], s["fold"]) != (budget, fold)] + [entry]
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=2) + "\n")
                print(f"budget {budget} fold {fold}: {seconds:.0f} s, {json.dumps(schedule)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
