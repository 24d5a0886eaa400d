"""Zero-TPrune on the real DeiT-Tiny: top-1/top-5, executed GMACs and CPU images/s, dense vs pruned.

    python tools/bench_zero_tprune.py [--assets ../shared/assets] [--limit 1000] [--views 5]
                                      [--variant paper={} --variant merge='{merge: true}']

Every variant is ``zero_tprune`` at its default schedule plus the given parameters (``name`` picks
another pruner); the defaults are the paper's method (the S-stage prunes), ``merge: true`` (what
recipes/deit_t_zerotprune.yaml uses) and ToMe at the merge counts around the same GMACs. Accuracy is
on the 1000-image ImageNet sample, one image per class, so each image is 0.1 point; the table adds
paired statistics (agreement with dense, KL, flips, a bootstrap interval of the top-1 change) and the
same change over five more views of every image (``--views 5``: four corner crops and the mirrored
centre crop), which measures it with less noise. A variant with ``search`` is cross-fitted: each half
of the images is scored by a schedule searched on views of the other half, so no image is scored
by a schedule tuned on it (speed and GMACs: the first half's schedule). Speed is dense vs every
variant in one process, interleaved, median of repeats. Writes tools/results/zero_tprune_deit_tiny.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import compress  # noqa: F401  (torchvision guard first)
import torch

import bench_assets

from compress import measure
from compress.models import build_model
from compress.pruners.base import build_pruner
from compress.recipe import ModelConfig
from compress.report import table

HERE = Path(__file__).resolve().parent
DEFAULT_VARIANTS = {"paper": {}, "merge": {"merge": True},
                    # the schedule searched on 1024 unlabelled views of the other half of the images
                    "merge + search": {"merge": True, "search": {}},
                    # ToMe at the two merge counts around Zero-TPrune's GMACs, on the same images and views
                    "tome r=10": {"name": "tome", "r": 10}, "tome r=11": {"name": "tome", "r": 11}}


def spec_of(params: dict) -> dict:
    return {"name": "zero_tprune", **params}


def cross_fitted(spec: dict, deit, center, views, seed: int = 0):
    """A ``search`` variant scored on images its schedule was not searched on: fold f (image index
    mod 2) is scored by a model calibrated on images of the other fold (their five views when scored,
    else the centre crops). Returns (fold-0 model, centre logits, view logits, per-fold findings)."""
    n = len(center)
    image_of = torch.arange(len(views)) // 5 if views is not None else None
    calib_pool = views.tensors[0] if views is not None else center.tensors[0]
    pool_image = image_of if views is not None else torch.arange(n)
    out_c, out_v, folds, first = None, None, [], None
    for fold in (0, 1):
        m = deit()
        pruner = build_pruner(spec)
        pruner.attach(m)
        rows = (pool_image % 2 != fold).nonzero()[:, 0]
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:pruner.config.search.images]]
        found = pruner.calibrate(m, list(calib_pool[rows].split(64)))
        folds.append({**found, "schedule": pruner.spec()["schedule"]})
        mine = torch.arange(n) % 2 == fold
        c = bench_assets.logits(m, torch.utils.data.TensorDataset(*(t[mine] for t in center.tensors)))
        out_c = torch.empty(n, c.shape[1]) if out_c is None else out_c
        out_c[mine] = c
        if views is not None:
            mine_v = image_of % 2 == fold
            v = bench_assets.logits(m, torch.utils.data.TensorDataset(*(t[mine_v] for t in views.tensors)))
            out_v = torch.empty(len(views), v.shape[1]) if out_v is None else out_v
            out_v[mine_v] = v
        first = m if first is None else first
    return first, out_c, out_v, folds


def markdown(result, argv) -> str:
    sizes = result["batch_sizes"]
    d = result["dense"]
    rows = {"dense": {"top1": d["top1"], "top5": d["top5"], "gmacs": d["gmacs"], **{f"ips{bs}": d["ips"][bs] for bs in sizes}}}
    for name, v in result["variants"].items():
        c = v["center"]
        rows[name] = {"top1": c["top1"]["pruned"], "top5": c["top5"]["pruned"], "gmacs": v["gmacs"],
                      "change": c["top1_change"], "ci": "{:+.1f} .. {:+.1f}".format(*c["top1_change_ci95"]),
                      "agree": c["agreement"], "kl": c["kl"], "flips": f"{c['right_to_wrong']} / {c['wrong_to_right']}",
                      "ratio": v["gmacs"] / d["gmacs"], **{f"ips{bs}": v["ips"][bs] for bs in sizes},
                      **{f"s{bs}": v["speedup"][bs] for bs in sizes}}
        if "views" in v:
            rows[name]["views"] = "{:+.2f} ({:+.1f} .. {:+.1f})".format(v["views"]["top1_change"], *v["views"]["top1_change_ci95"])
    cols = [("top1", "top-1 %", ".1f"), ("top5", "top-5 %", ".1f"), ("change", "Δ top-1", "+.1f"), ("ci", "95 % CI", "s"),
            ("flips", "right→wrong / wrong→right", "s"), ("agree", "agrees with dense %", ".1f"), ("kl", "KL", ".4f")]
    if result.get("views"):
        cols.append(("views", f"Δ top-1 over {result['views']['n']} views (95 % CI)", "s"))
    cols += [("gmacs", "GMACs", ".4f"), ("ratio", "GMACs ratio", ".3f")]
    cols += [(f"ips{bs}", f"images/s @{bs}", ".1f") for bs in sizes] + [(f"s{bs}", f"speed-up @{bs}", ".2f") for bs in sizes]
    lines = [f"# Zero-TPrune on DeiT-Tiny ({d['images']} ImageNet val images, CPU {result['threads']} threads)", "",
             "Variants (`zero_tprune` at its default schedule plus these parameters, unless another `name` is given): "
             + ", ".join(f"{name} `{json.dumps(v['spec'])}`" for name, v in result["variants"].items()) + ".", "",
             table(rows, cols), ""]
    if result.get("views"):
        vd = result["views"]["dense_top1"]
        lines += [f"Over the {result['views']['n']} extra views (four corner crops and the mirrored centre crop of every image) "
                  f"dense scores {vd:.2f} %; the Δ column there is paired over all of them.", ""]
    for name, v in result["variants"].items():
        for f, fold in enumerate(v.get("folds", [])):
            layers = ", ".join(f"{layer['block']}: {layer['s_ratio']:.2f}/{layer['i_ratio']:.2f}" for layer in fold["schedule"])
            lines.append(f"- {name}, fold {f} (scored on images {f} mod 2, searched on the others): KL on its calibration images "
                         f"{fold['default_kl']:.4f} (default schedule) -> {fold['kl']:.4f} ({fold['trials']} schedules), "
                         f"analytic MACs ratio {fold['macs_ratio']:.3f}; block: S/I fraction {layers}")
    for name, v in result["variants"].items():
        s = v["speedup"][sizes[0]]
        ratio = v["gmacs"] / d["gmacs"]
        lines.append(f"- {name}: GMACs cut {100 * (1 - ratio):.1f} %; speed-up at batch {sizes[0]} {s:.2f}x = "
                     f"{100 * s * ratio:.0f} % of the {1 / ratio:.2f}x the GMACs allow.")
    lines += ["", f"Regenerate: `python tools/bench_zero_tprune.py {' '.join(argv)}` ({result['seconds']:.0f} s)"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_assets.add_argument(p)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--variant", action="append", default=[], help="NAME={yaml mapping of zero_tprune parameters}")
    p.add_argument("--views", type=int, choices=(0, 5), default=5, help="also score 5 extra views per image (0: skip)")
    p.add_argument("--batch-sizes", default="32,1")
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--out", type=Path, default=HERE / "results" / "zero_tprune_deit_tiny")
    args = p.parse_args(argv)

    found = bench_assets.deit_tiny_and_imagenet(args.assets)
    if found is None:
        return 2
    weights, images = found
    t0 = time.perf_counter()
    threads = measure.pin_threads(int(os.environ.get("COMPRESS_THREADS", 2)))
    variants = dict(bench_assets.labelled_spec(v) for v in args.variant) or DEFAULT_VARIANTS
    sizes = [str(int(s)) for s in args.batch_sizes.split(",")]

    def deit():
        return build_model(ModelConfig(name="deit_tiny_patch16_224", checkpoint=weights)).eval()

    dense = deit()
    center = bench_assets.imagenet_val(images, dense, args.limit)
    views = bench_assets.five_views(images, dense, args.limit) if args.views else None
    models, out, out_views, searched = {"dense": dense}, {}, {}, {}
    for name, params in variants.items():
        if "search" in spec_of(params):
            models[name], out[name], out_views[name], searched[name] = cross_fitted(spec_of(params), deit, center, views)
            continue
        models[name] = deit()
        build_pruner(spec_of(params)).attach(models[name])
    for name, m in models.items():
        if name not in out:
            out[name] = bench_assets.logits(m, center)
            if views is not None:
                out_views[name] = bench_assets.logits(m, views)
    labels = center.tensors[1]
    prof = measure.profile(models, tuple(center[0][0].shape), [int(s) for s in sizes], repeats=args.repeats)

    top = bench_assets.paired(out["dense"], out["dense"], labels)
    result = {"torch": torch.__version__, "threads": threads, "batch_sizes": sizes,
              "dense": {"images": len(labels), "top1": top["top1"]["dense"], "top5": top["top5"]["dense"],
                        "gmacs": prof["dense"]["gmacs"], "ips": {bs: prof["dense"]["speed"][bs]["images_per_s"] for bs in sizes}},
              "variants": {}}
    if views is not None:
        result["views"] = {"n": len(views), "dense_top1": bench_assets.paired(out_views["dense"], out_views["dense"], views.tensors[1])["top1"]["dense"]}
    for name, params in variants.items():
        ips = {bs: prof[name]["speed"][bs]["images_per_s"] for bs in sizes}
        v = {"spec": spec_of(params), "center": bench_assets.paired(out["dense"], out[name], labels),
             "gmacs": prof[name]["gmacs"], "ips": ips, "speedup": {bs: ips[bs] / result["dense"]["ips"][bs] for bs in sizes}}
        if views is not None:
            v["views"] = bench_assets.paired(out_views["dense"], out_views[name], views.tensors[1], views=5)
        if name in searched:
            v["folds"] = searched[name]
        result["variants"][name] = v
    result["seconds"] = time.perf_counter() - t0
    md = markdown(result, argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
