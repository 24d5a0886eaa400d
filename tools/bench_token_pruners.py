"""Zero-shot token pruners on the real DeiT-Tiny: top-1 vs executed GMACs vs measured CPU images/s.

    python tools/bench_token_pruners.py [--assets ../shared/assets] [--budgets 0.9,0.75,0.65,0.5]
                                        [--pruners "zero_tprune,zero_tprune merge,gtp,tome"]
                                        [--pruner LABEL='{name: tome, prop_attn: false}'] [--batch-sizes 32,1]

Every pruner gets the same budget, ``target_gmacs_ratio`` (the blocks' MACs relative to dense), and
turns it into its own schedule; the table reports the executed GMACs measured with FlopCounterMode,
so small differences from the asked budget are visible. Accuracy is on the 1000-image ImageNet
sample (one image per class: each image is 0.1 point, about +-1.3 points of noise; paired
differences on the same images are tighter, and the agreement with dense and KL(dense || pruned)
columns measure how far each pruner moves the outputs without needing labels). Speed-ups are measured against dense in the same
process, interleaved, median of repeats. Writes tools/results/token_pruners_deit_tiny.{json,md,png}.

At the ``--compile-budgets`` (default 0.65) each row is also timed under ``torch.compile`` (inductor; static
shapes, one compile per batch size): compiled pruned against compiled dense and against eager dense, in the same
interleaved rounds as the eager pair, after checking the compiled models against eager on real images.

DiffRate, which learns its schedule, has two kinds of rows: ``diffrate released`` applies the official DeiT-Tiny
rates (public numbers) through our implementation, at the budgets they were searched for; ``diffrate`` is our
search (``tools/search_diffrate.py``, its JSON given by ``--diffrate-schedules``; by default the KL-to-dense shape
search of ``recipes/deit_t_diffrate_shapes.yaml``), cross-fitted: each image is scored by the schedule searched on
the other half of the images.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import compress  # noqa: F401  (torchvision guard first)
import torch

import bench_assets

from compress import compiled, measure
from compress.models import build_model
from compress.pruners.base import build_pruner
from compress.recipe import ModelConfig
from compress.report import table

HERE = Path(__file__).resolve().parent
MODEL = "deit_tiny_patch16_224"
PRUNERS = {  # label -> spec (the budget is added)
    "zero_tprune": {"name": "zero_tprune"},
    "zero_tprune merge": {"name": "zero_tprune", "merge": True},
    "gtp": {"name": "gtp"},
    "tome": {"name": "tome"},
}
DIFFRATE_RELEASED = "diffrate released"  # the official DeiT-Tiny rates, through our implementation
DIFFRATE_LEARNED = "diffrate"  # our search (tools/search_diffrate.py), cross-fitted
# OpenGVLab/DiffRate compression_rate.json, "ViT-T-DeiT": kept tokens (CLS included) after pruning / merging per block,
# by the nominal GFLOPs they were searched for (public numbers; 0.8 is the 0.65-of-dense point of docs/peers.md)
RELEASED_DEIT_T = {
    "1.0": ([197, 197, 196, 194, 188, 184, 178, 164, 156, 137, 129, 21], [197, 197, 196, 190, 186, 154, 148, 156, 145, 135, 125, 21]),
    "0.9": ([197, 197, 196, 190, 182, 166, 141, 125, 113, 105, 99, 3], [197, 196, 194, 188, 172, 147, 129, 115, 107, 103, 96, 3]),
    "0.8": ([197, 197, 196, 186, 166, 147, 117, 103, 92, 80, 74, 3], [197, 196, 190, 172, 154, 125, 107, 96, 84, 78, 70, 3]),
    "0.7": ([197, 196, 194, 180, 150, 123, 98, 82, 68, 60, 52, 3], [197, 196, 192, 158, 133, 103, 88, 72, 64, 58, 49, 3]),
    "0.6": ([197, 196, 180, 157, 130, 107, 86, 73, 63, 51, 40, 3], [197, 187, 167, 139, 114, 90, 76, 66, 57, 45, 37, 3]),
}


def released_diffrate_specs() -> list:
    return [{"name": "diffrate", "prune_keep": [v - 1 for v in p], "merge_keep": [v - 1 for v in m]}
            for p, m in RELEASED_DEIT_T.values()]


def learned_diffrate_specs(searched) -> dict:
    """budget -> {fold: the spec searched on the other fold}, for the budgets searched on both folds."""
    by_budget = {}
    for s in searched["searches"]:
        by_budget.setdefault(s["budget"], {})[s["fold"]] = {
            "name": "diffrate", "prune_keep": s["prune_keep"], "merge_keep": s["merge_keep"],
            **({"merge_weighting": s["merge_weighting"]} if "merge_weighting" in s else {})}
    return {b: f for b, f in sorted(by_budget.items(), reverse=True) if set(f) == {0, 1}}


def speed(dense, pruned, input_size, batch_sizes, repeats, round_seconds, compiled_runners=None):
    """Speed-up per batch size: the median of the interleaved rounds' ratios (``measure.profile``, the protocol
    ``compress bench`` uses), with the rounds kept for the spread. ``compiled_runners``: the two compiled models, timed in
    the same rounds; their figures come back under "compiled"."""
    models = {"dense": dense, "pruned": pruned, **(compiled_runners or {})}
    prof = measure.profile(models, input_size, batch_sizes, repeats=repeats, round_seconds=round_seconds)
    rounds = measure.round_ratios(prof["pruned"], prof["dense"])
    figures = {}
    if compiled_runners:
        against = {"speedup": measure.round_ratios(prof["pruned (compiled)"], prof["dense (compiled)"]),
                   "vs_eager_dense": measure.round_ratios(prof["pruned (compiled)"], prof["dense"]),
                   "dense_vs_eager_dense": measure.round_ratios(prof["dense (compiled)"], prof["dense"])}
        figures = {k: {bs: statistics.median(v) for bs, v in r.items()} for k, r in against.items()}
        figures["rounds"] = against["speedup"]
    return {bs: statistics.median(v) for bs, v in rounds.items()}, rounds, prof, figures


def compiled_runner(model, data, batch_sizes):
    """``model`` under torch.compile, with its checks against eager on the real images at every batch size."""
    runner = compiled.CompiledModel(model.eval())
    return runner, [compiled.check(runner, lambda bs: data.tensors[0][:bs], bs) for bs in batch_sizes]


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["batch_sizes"]
    fig, axes = plt.subplots(1, 1 + len(sizes), figsize=(5 * (1 + len(sizes)), 4.2))
    dense = result["dense"]
    by_pruner = {}
    for row in result["rows"]:
        by_pruner.setdefault(row["pruner"], []).append(row)
    for ax_i, ax in enumerate(axes):
        if ax_i == 0:
            ax.set_xlabel("executed GMACs / image")
            dense_x = dense["gmacs"]
        else:
            bs = sizes[ax_i - 1]
            ax.set_xlabel(f"speed-up vs dense (images/s, batch {bs}, CPU)")
            dense_x = 1.0
        ax.scatter([dense_x], [dense["top1"]], marker="*", s=160, color="black", label="dense", zorder=3)
        for name, rows in by_pruner.items():
            rows = sorted(rows, key=lambda r: r["gmacs"])
            xs = [r["gmacs"] if ax_i == 0 else r["speedup"][str(sizes[ax_i - 1])] for r in rows]
            ax.plot(xs, [r["top1"] for r in rows], marker="o", label=name)
        ax.set_ylabel("top-1 % (1000 ImageNet val images)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Zero-shot token pruning of DeiT-Tiny ({result['images']} images, CPU {result['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spread(row, bs) -> str:
    rounds = row.get("speedup_rounds", {}).get(str(bs))
    return f"{min(rounds):.2f}-{max(rounds):.2f}" if rounds else "–"


def before_after(result, before) -> str:
    """The rows of an earlier run (``--before``: its JSON) beside this one's: same labels and budgets."""
    old = {(r["pruner"], r["budget"]): r for r in before["rows"]}
    sizes = [bs for bs in result["batch_sizes"] if bs in before["batch_sizes"]]
    rows = {}
    for r in result["rows"]:
        b = old.get((r["pruner"], r["budget"]))
        if b is None:
            continue
        rows[f"{r['pruner']} @ {r['budget']:.2f}"] = {
            "t0": b["top1"], "t1": r["top1"], "a0": b["paired"]["agreement"], "a1": r["paired"]["agreement"],
            **{f"s0_{bs}": b["speedup"][str(bs)] for bs in sizes}, **{f"s1_{bs}": r["speedup"][str(bs)] for bs in sizes},
            **{f"l1_{bs}": 100 * r["speedup"][str(bs)] * r["gmacs_ratio"] for bs in sizes}}
    cols = [("t0", "top-1 before", ".1f"), ("t1", "top-1 now", ".1f"), ("a0", "agrees before", ".1f"), ("a1", "agrees now", ".1f")]
    for bs in sizes:
        cols += [(f"s0_{bs}", f"speed-up @{bs} before", ".2f"), (f"s1_{bs}", f"@{bs} now", ".2f"), (f"l1_{bs}", f"@{bs} now, % of 1/GMACs", ".0f")]
    note = before.get("note", "")
    return "\n".join(["## Before and after", "", f"Before: {note}" if note else "Before: the earlier run given with --before.", "",
                      table(rows, cols), ""])


def compiled_section(result) -> list:
    """The rows timed under torch.compile: compiled pruned vs compiled dense and vs eager dense, beside eager."""
    sizes = result["batch_sizes"]
    rows = {}
    for r in result["rows"]:
        c = r.get("compiled")
        if not c:
            continue
        diff = max(k["max_rel_diff"] for ks in c["checks"].values() for k in ks)
        secs = max(k["compile_seconds"] or 0 for k in c["checks"]["pruned"])
        rows[f"{r['pruner']} @ {r['budget']:.2f}"] = {
            "ratio": r["gmacs_ratio"], "ideal": 1 / r["gmacs_ratio"], "diff": f"{diff:.1e}", "secs": secs, "breaks": c["breaks"],
            **{f"e{bs}": r["speedup"][str(bs)] for bs in sizes}, **{f"c{bs}": c["speedup"][str(bs)] for bs in sizes},
            **{f"r{bs}": f"{min(c['rounds'][str(bs)]):.2f}-{max(c['rounds'][str(bs)]):.2f}" for bs in sizes},
            **{f"v{bs}": c["vs_eager_dense"][str(bs)] for bs in sizes},
            **{f"d{bs}": c["dense_vs_eager_dense"][str(bs)] for bs in sizes}}
    if not rows:
        return []
    cols = [("ratio", "GMACs ratio", ".3f"), ("ideal", "1/ratio", ".2f")]
    for bs in sizes:
        cols += [(f"e{bs}", f"eager @{bs}", ".2f"), (f"c{bs}", f"compiled @{bs}", ".2f"), (f"r{bs}", "rounds", "s"),
                 (f"v{bs}", f"compiled pruned / eager dense @{bs}", ".2f"), (f"d{bs}", f"compiled dense / eager dense @{bs}", ".2f")]
    cols += [("diff", "largest difference from eager", "s"), ("secs", "compile s (pruned, per shape)", ".0f"),
             ("breaks", "graph breaks", "d")]
    return ["## Under torch.compile", "",
            "The same models under `torch.compile` (inductor, static shapes), timed in the same interleaved rounds as the "
            "eager pair: 'eager' = pruned / dense both eager (the main table's column, this run), 'compiled' = compiled pruned "
            "/ compiled dense. Each compiled model was first checked against eager on the real images at every batch size "
            "(largest difference relative to the largest output; tolerance 1e-4).", "", table(rows, cols), ""]


def markdown(result, argv, before=None, plot_name="token_pruners_deit_tiny.png") -> str:
    sizes = result["batch_sizes"]
    d = result["dense"]
    rows = {"dense": {"budget": "-", "ratio": 1.0, "gmacs": d["gmacs"], "top1": d["top1"], "top5": d["top5"], "drop": 0.0,
                      **{f"s{bs}": 1.0 for bs in sizes}}}
    for r in result["rows"]:
        rows[f"{r['pruner']} @ {r['budget']:.2f}"] = {
            "budget": f"{r['budget']:.2f}", "ratio": r["gmacs_ratio"], "gmacs": r["gmacs"], "top1": r["top1"],
            "top5": r["top5"], "drop": r["top1"] - d["top1"], "ideal": 1 / r["gmacs_ratio"],
            "agree": r["paired"]["agreement"], "kl": r["paired"]["kl"],
            **{f"s{bs}": r["speedup"][str(bs)] for bs in sizes},
            **{f"r{bs}": _spread(r, bs) for bs in sizes},
        }
    cols = [("gmacs", "GMACs", ".3f"), ("ratio", "GMACs ratio", ".3f"), ("top1", "top-1 %", ".1f"), ("top5", "top-5 %", ".1f"),
            ("drop", "Δ top-1", "+.1f"), ("agree", "agrees with dense %", ".1f"), ("kl", "KL", ".3f"),
            ("ideal", "1/ratio", ".2f")] + [c for bs in sizes for c in ((f"s{bs}", f"speed-up @{bs}", ".2f"), (f"r{bs}", "rounds", "s"))]
    lines = [f"# Zero-shot token pruners on DeiT-Tiny ({result['images']} ImageNet val images, CPU {result['threads']} threads)",
             "", "Each pruner gets `target_gmacs_ratio` = budget and solves its own schedule; GMACs are measured on the executed "
             "forward. Speed-ups are images/s relative to dense in the same process: the median over 5 interleaved rounds "
             "(`compress bench`'s protocol: threads pinned, freed memory kept, rounds with another process on the CPU retaken), "
             "with the range of the rounds.", "",
             table(rows, cols), "", f"![top-1 vs GMACs and speed]({plot_name})", ""]
    near = {}
    for r in result["rows"]:
        if abs(r["budget"] - 0.65) < 1e-6:
            near[r["pruner"]] = r
    if near:
        lines.append("At the 0.65 budget:")
        for name, r in near.items():
            speeds = "; ".join(f"{r['speedup'][str(bs)]:.2f}x at batch {bs} = {100 * r['speedup'][str(bs)] * r['gmacs_ratio']:.0f} %"
                               for bs in sizes)
            lines.append(f"- {name}: top-1 {r['top1']:.1f} ({r['top1'] - d['top1']:+.1f}) at {r['gmacs_ratio']:.3f} of dense GMACs; "
                         f"speed-up {speeds} of the {1 / r['gmacs_ratio']:.2f}x the GMACs allow")
        lines.append("")
    lines += compiled_section(result)
    if before is not None:
        lines.append(before_after(result, before))
    lines.append(f"Regenerate: `python tools/bench_token_pruners.py {shlex.join(argv)}` ({result['seconds']:.0f} s)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_assets.add_argument(p)
    p.add_argument("--limit", type=int, default=None, help="evaluate on this many images (default: all)")
    p.add_argument("--budgets", default="0.9,0.75,0.65,0.5")
    p.add_argument("--pruners", default=None, help="labels to run, from the built-in ones and --pruner (default: all, "
                   f"{DIFFRATE_RELEASED!r} and, when --diffrate-schedules exists, {DIFFRATE_LEARNED!r})")
    p.add_argument("--pruner", action="append", default=[], help="LABEL={yaml spec}: one more pruner")
    p.add_argument("--batch-sizes", default="32,1")
    p.add_argument("--repeats", type=int, default=10, help="forwards per model and batch size, at least (over 5 rounds)")
    p.add_argument("--round-seconds", type=float, default=0.5, help="each model runs at least this long in every round")
    p.add_argument("--out", type=Path, default=HERE / "results" / "token_pruners_deit_tiny")
    p.add_argument("--diffrate-schedules", type=Path, default=HERE / "results" / "diffrate_schedules_shapes.json",
                   help=f"the searches of tools/search_diffrate.py, for the {DIFFRATE_LEARNED!r} rows")
    p.add_argument("--compile-budgets", default="0.65", help="budgets whose rows are also timed under torch.compile "
                   "(inductor), comma-separated; '' for none. DiffRate rows within 0.015 of one count")
    p.add_argument("--before", type=Path, help="JSON of an earlier run, shown beside this one (its \"note\" says what it was)")
    args = p.parse_args(argv)

    before = json.loads(args.before.read_text()) if args.before else None  # read first: a bad path fails at once
    searched = json.loads(args.diffrate_schedules.read_text()) if args.diffrate_schedules.exists() else None
    extra = dict(bench_assets.labelled_spec(item) for item in args.pruner)
    specs = {**PRUNERS, **extra, DIFFRATE_RELEASED: {}, **({DIFFRATE_LEARNED: {}} if searched else {})}
    labels = args.pruners.split(",") if args.pruners else [*PRUNERS, DIFFRATE_RELEASED, *([DIFFRATE_LEARNED] if searched else [])]
    labels += [label for label in extra if label not in labels]
    unknown = [label for label in labels if label not in specs]
    if unknown:
        p.error(f"unknown pruner label(s) {unknown}; built in: {sorted(PRUNERS)}")
    found = bench_assets.deit_tiny_and_imagenet(args.assets)
    if found is None:
        return 2
    weights, images = found
    t0 = time.perf_counter()
    threads = measure.pin_threads(int(os.environ.get("COMPRESS_THREADS", 2)))
    dense = build_model(ModelConfig(name=MODEL, checkpoint=weights)).eval()
    data = bench_assets.imagenet_val(images, dense, args.limit)
    labels_y = data.tensors[1]
    input_size = tuple(data[0][0].shape)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    example = data[0][0].unsqueeze(0)
    dense_logits = bench_assets.logits(dense, data)
    acc = bench_assets.paired(dense_logits, dense_logits, labels_y)
    result = {"model": MODEL, "images": len(labels_y), "threads": threads, "batch_sizes": sizes, "torch": torch.__version__,
              "dense": {"gmacs": measure.count_gmacs(dense, example), "top1": acc["top1"]["dense"], "top5": acc["top5"]["dense"]},
              "rows": []}
    print(f"dense: top-1 {result['dense']['top1']:.1f}, {result['dense']['gmacs']:.3f} GMACs", flush=True)
    compile_budgets = [float(b) for b in args.compile_budgets.split(",") if b.strip()]
    # one compiled dense for every row, checked once: inductor compiles each batch size once
    dense_compiled = compiled_runner(dense, data, sizes) if compile_budgets else None

    def add_row(label, budget, spec, models, logits, note=None):
        stats = bench_assets.paired(dense_logits, logits, labels_y)
        gmacs = statistics.mean(measure.count_gmacs(m, example) for m in models)
        runners, compiled_info = None, None
        if any(abs(budget - b) <= 0.015 for b in compile_budgets):
            runner, checks = compiled_runner(models[0], data, sizes)
            runners = {"dense (compiled)": dense_compiled[0], "pruned (compiled)": runner}
            compiled_info = {"checks": {"dense": dense_compiled[1], "pruned": checks},
                             **compiled.graph_breaks(models[0], data.tensors[0][:1])}
        speedup, rounds, prof, compiled_figures = speed(dense, models[0], input_size, sizes, args.repeats, args.round_seconds, runners)
        row = {"pruner": label, "budget": budget, "spec": spec, "gmacs": gmacs, "gmacs_ratio": gmacs / result["dense"]["gmacs"],
               "top1": stats["top1"]["pruned"], "top5": stats["top5"]["pruned"], "paired": stats, "speedup": speedup,
               "speedup_rounds": rounds, "profile": prof, **({"note": note} if note else {}),
               **({"compiled": {**compiled_info, **compiled_figures}} if runners else {})}
        result["rows"].append(row)
        print(f"{label} @ {budget}: top-1 {row['top1']:.1f}, agreement {stats['agreement']:.1f}, GMACs ratio {row['gmacs_ratio']:.3f}, "
              "speed-up " + ", ".join(f"{v:.2f}x @{bs}" for bs, v in speedup.items())
              + ("; compiled " + ", ".join(f"{v:.2f}x @{bs}" for bs, v in compiled_figures["speedup"].items()) if runners else ""),
              flush=True)

    def attached(spec):
        pruned = copy.deepcopy(dense)
        build_pruner(spec).attach(pruned)
        return pruned

    for label in labels:
        if label == DIFFRATE_RELEASED:
            for spec in released_diffrate_specs():
                pruned = attached(spec)
                budget = round(pruned._compress_tokens.policy.expected_macs_ratio(), 2)
                add_row(label, budget, spec, [pruned], bench_assets.logits(pruned, data))
            continue
        if label == DIFFRATE_LEARNED:
            for budget, folds in learned_diffrate_specs(searched).items():
                models = [attached(folds[f]) for f in (0, 1)]
                fold_logits = [bench_assets.logits(m, data) for m in models]
                logits = torch.where((labels_y % 2 == 0).unsqueeze(1), fold_logits[0], fold_logits[1])
                how = sorted({s.get("recipe", "recipes/deit_t_diffrate.yaml") for s in searched["searches"] if s["budget"] == budget})
                add_row(label, budget, folds, models, logits,
                        note=f"searched by {', '.join(how)}; each image scored by the schedule searched on the other fold; "
                             "speed of fold 0's schedule")
            continue
        for budget in (float(b) for b in args.budgets.split(",")):
            spec = {**specs[label], "target_gmacs_ratio": budget}
            pruned = attached(spec)
            add_row(label, budget, spec, [pruned], bench_assets.logits(pruned, data))
    result["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    md = markdown(result, argv, before, args.out.with_suffix(".png").name)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
