"""Zero-TPrune on the real DeiT-Tiny: top-1/top-5, executed GMACs and CPU images/s, dense vs pruned.

    python tools/bench_zero_tprune.py [--assets ../shared/assets] [--limit 1000] [--set target_gmacs_ratio=0.65]

Writes tools/results/zero_tprune_deit_tiny.{json,md}. Accuracy is on the 1000-image ImageNet sample
(one image per class: each image is 0.1 point, noise about +-1.3 points; paired differences are
tighter). Speed is measured dense vs pruned in one process, interleaved, median of repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import compress  # noqa: F401  (torchvision guard first)
import torch
import yaml

import bench_assets

from compress.models import build_model
from compress.pruners.base import build_pruner
from compress.recipe import ModelConfig
from compress.report import compare, table
from compress.tasks.classification import evaluate

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_assets.add_argument(p)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--set", dest="params", action="append", default=[], help="pruner parameter, e.g. target_gmacs_ratio=0.65")
    p.add_argument("--batch-sizes", default="32,1")
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--out", type=Path, default=HERE / "results" / "zero_tprune_deit_tiny")
    args = p.parse_args(argv)

    found = bench_assets.deit_tiny_and_imagenet(args.assets)
    if found is None:
        return 2
    weights, images = found
    torch.set_num_threads(int(os.environ.get("COMPRESS_THREADS", 2)))
    spec = {"name": "zero_tprune"}
    for item in args.params:
        key, value = item.split("=", 1)
        spec[key] = yaml.safe_load(value)

    dense = build_model(ModelConfig(name="deit_tiny_patch16_224", checkpoint=weights)).eval()
    pruned = build_model(ModelConfig(name="deit_tiny_patch16_224", checkpoint=weights)).eval()
    build_pruner(spec).attach(pruned)
    loader = torch.utils.data.DataLoader(bench_assets.imagenet_val(images, dense, args.limit), batch_size=100)
    acc = {"dense": evaluate(dense, loader, 1000), "pruned": evaluate(pruned, loader, 1000)}
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    bench = compare(dense, pruned, (3, 224, 224), sizes, repeats=args.repeats)

    result = {"pruner": spec, "accuracy": acc, "bench": bench, "torch": torch.__version__}
    rows = {}
    for name in ("dense", "pruned"):
        rows[name] = {"top1": acc[name]["top1"], "top5": acc[name]["top5"], "gmacs": bench[name]["gmacs"]}
        for bs in bench[name]["speed"]:
            rows[name][f"ips{bs}"] = bench[name]["speed"][bs]["images_per_s"]
    rows["pruned / dense"] = {"top1": acc["pruned"]["top1"] - acc["dense"]["top1"],
                              "top5": acc["pruned"]["top5"] - acc["dense"]["top5"],
                              "gmacs": bench["ratios"]["gmacs"],
                              **{f"ips{bs}": v for bs, v in bench["ratios"]["speedup"].items()}}
    cols = [("top1", "top-1 %", ".1f"), ("top5", "top-5 %", ".1f"), ("gmacs", "GMACs", ".4f")]
    cols += [(f"ips{bs}", f"images/s @{bs}", ".2f") for bs in bench["dense"]["speed"]]
    gain = 1 / bench["ratios"]["gmacs"]
    speed = bench["ratios"]["speedup"][str(sizes[0])]
    md = (f"# Zero-TPrune on DeiT-Tiny ({acc['dense']['images']} ImageNet val images, CPU {bench['threads']} threads)\n\n"
          f"pruner: `{json.dumps(spec)}`\n\n" + table(rows, cols) +
          f"\n\n(last row: accuracy difference in points; GMACs and images/s as ratios)\n\n"
          f"GMACs cut {100 * (1 - bench['ratios']['gmacs']):.1f} %; speed-up at batch {sizes[0]} {speed:.2f}x = "
          f"{100 * speed / gain:.0f} % of the {gain:.2f}x the GMACs allow.\n\n"
          f"Regenerate: `python tools/bench_zero_tprune.py {' '.join('--set ' + s for s in args.params)}`\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
