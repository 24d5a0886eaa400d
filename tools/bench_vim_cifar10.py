"""ToP-ViM on a small Vision Mamba trained from scratch on CIFAR-10 (CPU, pure-PyTorch selective scan).

    python tools/bench_vim_cifar10.py [--assets ../shared/assets] [--train-steps 400] [--tune-steps 50] [--quick]

A Vim (32 px, 4 px patches = 64 tokens + the class token in the middle; d 64, depth 6, d_state 8) is trained from
scratch on the CIFAR-10 split (the 10,000 test images, 8,000 train / 2,000 val per class, disjoint). Then at two
budgets, ~0.7 and ~0.5 of the dense layers' MACs (``target_gmacs_ratio``, pruning after layers 3 and 4, and
after 2, 3 and 4: ``PRUNE_LAYERS``), three variants of ToP-ViM:

- ``aligned``: clipped SSM-output importance + pruning-aware hidden-state alignment (the method: each kept
  token held over the pruned gap before it in the scan);
- ``naive``: the same tokens, no alignment (``align: false``: ViT-style dropping);
- ``random``: random tokens dropped, with alignment (``mode: random``);

each evaluated zero-shot and after ``--tune-steps`` of fine-tuning with the pruner attached (a real
``compress fit`` of a generated recipe from the dense weights). ``dense +ft`` continues the dense model for the
same steps, the fair reference for the fine-tuned rows. Top-1 on the 2,000 val images, executed GMACs, and
images/s at batch 32 and 1 with every model timed interleaved in one process, threads pinned
(``COMPRESS_THREADS``, default 2). Then, zero-shot, the alignment forms compared (``alignment_forms``).
Writes tools/results/vim_topvim_cifar10.{json,md,png} (png with matplotlib).
``--quick`` is a smoke run (a few steps, 64 images per split, one timing repeat): its numbers mean nothing.
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
import torch.nn.functional as F
import yaml

import bench_assets

from compress import measure
from compress.models.selective_scan import selective_scan
from compress.report import table

HERE = Path(__file__).resolve().parent
MODEL = {"name": "vim_custom",
         "kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 6, "d_state": 8, "num_classes": 10}}
# Pruning layers (1-based, "after layer l") per budget, chosen zero-shot by KL to the dense model on 2,000 *train*
# images of the 1600-step model (the val images stay unseen): at 0.7 of the GMACs [3, 4] 0.154 against [1, 2, 4]
# 0.325, [2, 4] 0.243, [3] 0.180, [2, 3, 4] 0.230; at 0.5 [2, 3, 4] 0.440 against [1, 2, 4] 0.633, [2, 3] 0.501,
# [2, 4] 0.503 (aligned; naive alike). Pruning later at a lower keep ratio beats pruning early at a higher one.
PRUNE_LAYERS = {0.7: [3, 4], 0.5: [2, 3, 4]}
OTHER_BUDGETS_LAYERS = [2, 3, 4]  # for a --ratios budget not in PRUNE_LAYERS
VARIANTS = {"aligned": {}, "naive": {"align": False}, "random": {"mode": "random"}}


def prune_layers(ratio: float) -> list:
    return PRUNE_LAYERS.get(ratio, OTHER_BUDGETS_LAYERS)


def base_recipe(name: str, data_root: Path, batch: int, limit) -> dict:
    return {
        "name": name, "seed": 0, "model": json.loads(json.dumps(MODEL)),
        "data": {"kind": "cifar10", "root": str(data_root), "batch_size": batch, "num_workers": 2, "limit": limit,
                 "params": {"val_per_class": 200, "seed": 0}},
        "stages": [],
        "trainer": {"accelerator": "cpu", "devices": 1, "log_every_n_steps": 20, "enable_progress_bar": False},
        "evaluate": {"enabled": False, "bench": False},
    }


def run_recipe(recipe: dict, work: Path, reuse: bool) -> Path:
    """``compress fit`` of ``recipe``; returns its export folder (kept as is with ``reuse``)."""
    from compress.run import fit

    export = work / recipe["name"] / "export"
    if reuse and (export / "compress.json").is_file():
        return export
    recipe["export"] = {"enabled": True, "dir": str(export)}
    path = work / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    t0 = time.perf_counter()
    fit(path, out=work / recipe["name"] / "runs")
    print(f"[bench] {recipe['name']}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return export


def val_tensors(data_root: Path, model, limit) -> torch.utils.data.TensorDataset:
    """Decode and transform the val split once; every model is evaluated on the same tensors."""
    from compress.data.cifar10 import Cifar10

    ds = Cifar10(data_root, Cifar10.Config(val_per_class=200, seed=0), limit).dataset("val", model, train=False)
    xs, ys = zip(*torch.utils.data.DataLoader(ds, batch_size=250, num_workers=2))
    return torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))


def val_logits(model, val) -> torch.Tensor:
    torch.manual_seed(0)  # the random variant draws its tokens from the global generator
    return bench_assets.logits(model, val)


def _stretched_step(u, delta, A, B, C, D, z, delta_bias, softplus, hold):
    """Alignment form 'stretched step': delta -> s delta in decay and input (Mamba's Euler form of the hold; the
    kernel would run it at the pruned length)."""
    dl = F.softplus(delta.float() + delta_bias.float()[None, :, None]) * hold.float()[:, None, :]
    return selective_scan(u, dl.contiguous(), A, B, C, D, z, None, False)


def _decay_only(u, delta, A, B, C, D, z, delta_bias, softplus, hold):
    """Alignment form 'decay only': the gap's positions add no input, only their decay (delta of the kept token)."""
    dl = F.softplus(delta.float() + delta_bias.float()[None, :, None])
    s = hold.float()[:, None, :]
    y = selective_scan((u / s).contiguous(), (dl * s).contiguous(), A, B, C, None, None, None, False)
    return ((y + u * D[None, :, None]) * F.silu(z)).to(u.dtype)


# (label, top_vim parameters, scan form replacing the held scan, or None)
FORMS = [("naive (no alignment)", {"align": False}, None),
         ("next: hold after the gap (exact, 'align: next')", {"align": "next"}, None),
         ("previous: carry the state of the token before the gap ('align: previous')", {"align": "previous"}, None),
         ("next, stretched step (Euler)", {"align": "next"}, _stretched_step),
         ("next, decay only (gap adds no input)", {"align": "next"}, _decay_only)]
CLIPS = [("clip each direction", "each"), ("clip the mean of the directions", "mean")]


def alignment_forms(dense_export: Path, ratios, val, ref, labels) -> dict:
    """Zero-shot KL to dense and top-1 of the alignment forms and of the two clipping placements, with importance and
    with random tokens (random: one draw, the same for every form): which form of 'the scan sees the pruned gaps'
    keeps a pruned Vim closest to dense. A scan form replaces ``selective_scan``'s held scan while it runs."""
    from compress.export import load
    from compress.models import selective_scan as scan_module
    from compress.pruners.base import build_pruner

    out = {}
    try:
        for ratio in ratios:
            for mode in ("importance", "random"):
                for clip_label, clip in (CLIPS if mode == "importance" else CLIPS[:1]):
                    for form, params, fn in FORMS:
                        if clip != "each" and fn is not None:
                            continue
                        scan_module.selective_scan = _held_by(fn) if fn is not None else selective_scan
                        m = load(dense_export)
                        build_pruner({"name": "top_vim", "prune_layers": prune_layers(ratio), "target_gmacs_ratio": ratio,
                                      "mode": mode, "clip": clip, **params}).attach(m)
                        pair = bench_assets.paired(ref, val_logits(m, val), labels)
                        name = f"{mode} {ratio}, {clip_label if mode == 'importance' else 'random tokens'}: {form}"
                        out[name] = {"kl": pair["kl"], "agree": pair["agreement"], "top1": pair["top1"]["pruned"]}
                        print(f"[bench] forms {name}: KL {pair['kl']:.3f} top-1 {pair['top1']['pruned']:.2f}", flush=True)
    finally:
        scan_module.selective_scan = selective_scan
    return out


def _held_by(form):
    def held_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, hold=None):
        if hold is None:
            return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return form(u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold)
    return held_scan


def forms_only(args, data_root, limit, threads, t0) -> int:
    """Train (or reuse) the dense model, compare the alignment forms zero-shot, and put the comparison into the
    existing results (its own model: the table above it may come from a longer-trained one)."""
    from compress.export import load

    dense_recipe = base_recipe("dense", data_root, args.batch, limit)
    dense_recipe["stages"] = [{"kind": "finetune", "max_steps": args.train_steps,
                               "optimizer": {"lr": args.lr, "weight_decay": 0.05}, "schedule": {"warmup_steps": 20}}]
    dense_export = run_recipe(dense_recipe, args.work, args.reuse)
    dense = load(dense_export)
    val = val_tensors(data_root, dense, limit)
    ratios = [float(r) for r in args.ratios.split(",")]
    ref = val_logits(dense, val)
    labels = val.tensors[1]
    dense_top1 = bench_assets.paired(ref, ref, labels)["top1"]["dense"]
    forms = alignment_forms(dense_export, ratios, val, ref, labels)
    path = Path(str(args.out) + ".json")
    result = json.loads(path.read_text()) if path.is_file() else {}
    result["alignment_forms"] = forms
    result["alignment_forms_model"] = {"train_steps": args.train_steps, "batch": args.batch, "threads": threads,
                                       "dense_top1": dense_top1, "val_images": len(val),
                                       "prune_layers": {str(r): prune_layers(r) for r in ratios},
                                       "seconds": time.perf_counter() - t0, "argv": sys.argv[1:]}
    path.write_text(json.dumps(result, indent=2) + "\n")
    if "rows" in result:
        png = Path(str(args.out) + ".png")
        argv = result.get("argv", ["--train-steps", "1600", "--tune-steps", "100"])  # the table's run
        Path(str(args.out) + ".md").write_text(markdown(result, argv, png.name if png.is_file() else None))
    print(json.dumps(result["alignment_forms_model"], indent=2))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_assets.add_argument(p)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=400, help="dense training from scratch")
    p.add_argument("--tune-steps", type=int, default=50, help="fine-tune of every pruned variant (and dense +ft)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tune-lr", type=float, default=5e-4)
    p.add_argument("--ratios", default="0.7,0.5", help="target_gmacs_ratio of the layers")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"a subset of {','.join(VARIANTS)}")
    p.add_argument("--no-forms", action="store_true", help="skip the zero-shot comparison of alignment forms")
    p.add_argument("--batch-sizes", default="32,1")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="smoke run: a few steps, 64 images per split")
    p.add_argument("--work", type=Path, default=Path("runs") / "bench_vim_cifar10")
    p.add_argument("--out", type=Path, default=HERE / "results" / "vim_topvim_cifar10")
    p.add_argument("--reuse", action="store_true", help="keep the exports already in --work")
    p.add_argument("--forms-only", action="store_true",
                   help="only the dense model and the zero-shot comparison of alignment forms and clipping, merged "
                        "into the existing --out results")
    args = p.parse_args(argv)
    if args.quick:
        args.train_steps, args.tune_steps, args.repeats = 3, 2, 1
        if args.out == p.get_default("out"):
            args.out = args.work / "quick"
    limit = 64 if args.quick else None
    found = bench_assets.find(args.assets, bench_assets.CIFAR10)
    if found is None:
        return 2
    data_root = found[0]
    t0 = time.perf_counter()
    threads = measure.pin_threads(int(os.environ.get("COMPRESS_THREADS", 2)))
    args.work.mkdir(parents=True, exist_ok=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    variants = {v: VARIANTS[v] for v in args.variants.split(",")}
    if args.forms_only:
        return forms_only(args, data_root, limit, threads, t0)

    # 1. dense from scratch, and dense continued for the fine-tune's steps (the reference after fine-tuning)
    dense_recipe = base_recipe("dense", data_root, args.batch, limit)
    dense_recipe["stages"] = [{"kind": "finetune", "max_steps": args.train_steps,
                               "optimizer": {"lr": args.lr, "weight_decay": 0.05}, "schedule": {"warmup_steps": 20}}]
    dense_export = run_recipe(dense_recipe, args.work, args.reuse)
    weights = str(dense_export / "model.safetensors")
    tune = {"kind": "finetune", "max_steps": args.tune_steps, "optimizer": {"lr": args.tune_lr, "weight_decay": 0.05}}
    more = base_recipe("dense_ft", data_root, args.batch, limit)
    more["model"]["checkpoint"] = weights
    more["stages"] = [dict(tune)]
    exports = {"dense": dense_export, "dense +ft": run_recipe(more, args.work, args.reuse)}

    # 2. every variant at every budget: zero-shot on the dense weights, then a fine-tune with the pruner attached
    specs = {}
    for ratio in ratios:
        for variant, params in variants.items():
            name = f"{variant} {ratio}"
            specs[name] = {"name": "top_vim", "prune_layers": prune_layers(ratio), "target_gmacs_ratio": ratio,
                           **params}
            r = base_recipe(f"{variant}_{ratio}", data_root, args.batch, limit)
            r["model"]["checkpoint"] = weights
            r["stages"] = [{"kind": "prune", "pruner": specs[name]}, dict(tune)]
            exports[name + " +ft"] = run_recipe(r, args.work, args.reuse)

    # 3. measure everything in this process
    from compress.export import load
    from compress.pruners.base import build_pruner

    models = {name: load(path) for name, path in exports.items()}
    val = val_tensors(data_root, models["dense"], limit)
    for name, spec in specs.items():  # zero-shot: the dense weights with the pruner attached
        m = load(dense_export)
        build_pruner(spec).attach(m)
        models[name] = m
    example = torch.randn(1, 3, 32, 32)
    rows = {}
    order = ["dense", "dense +ft"] + [f"{v} {r}{s}" for r in ratios for s in ("", " +ft") for v in variants]
    labels = val.tensors[1]
    logits = {}
    for name in order:
        m = models[name]
        pr = getattr(m, "_top_vim", None)
        logits[name] = val_logits(m, val)
        # how far pruning moved the predictions of the model the row started from (less noisy than top-1)
        ref = logits["dense +ft" if name.endswith("+ft") else "dense"] if name != "dense +ft" else logits["dense"]
        pair = bench_assets.paired(ref, logits[name], labels)
        rows[name] = {"top1": pair["top1"]["pruned"], "agree": pair["agreement"], "kl": pair["kl"],
                      "gmacs": measure.count_gmacs(m, example), "params": measure.count_params(m),
                      "keep": getattr(pr, "keep", None), "tokens": pr.expected_tokens() if pr else None}
        print(f"[bench] {name}: top-1 {rows[name]['top1']:.2f}, {rows[name]['gmacs']:.4f} GMACs", flush=True)
    forms = {} if args.no_forms else alignment_forms(dense_export, ratios, val, logits["dense"], labels)
    timed = {n: models[n] for n in ["dense"] + [f"{v} {r} +ft" for r in ratios for v in variants]}
    prof = measure.profile(timed, (3, 32, 32), batch_sizes, repeats=args.repeats)
    for name in order:  # a zero-shot row has the same plan, hence the same cost, as its fine-tuned row
        src = "dense" if name.startswith("dense") else (name if name.endswith("+ft") else name + " +ft")
        rows[name]["speed"] = prof[src]["speed"]
    result = {"model": MODEL, "prune_layers": {str(r): prune_layers(r) for r in ratios}, "ratios": ratios, "variants": list(variants),
              "batch": args.batch,
              "steps": {"train": args.train_steps, "tune": args.tune_steps}, "threads": threads,
              "batch_sizes": batch_sizes, "val_images": len(val), "quick": args.quick, "rows": rows,
              "alignment_forms": forms,
              "seconds": time.perf_counter() - t0, "argv": argv}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(args.out) + ".json").write_text(json.dumps(result, indent=2) + "\n")
    png = None
    try:
        plot(result, Path(str(args.out) + ".png"))
        png = Path(str(args.out) + ".png").name
    except ImportError:
        print("[bench] matplotlib not installed: no plot", flush=True)
    Path(str(args.out) + ".md").write_text(markdown(result, argv, png))
    print(Path(str(args.out) + ".md").read_text())
    return 0


def markdown(result: dict, argv, png) -> str:
    rows, dense, dft = result["rows"], result["rows"]["dense"], result["rows"]["dense +ft"]
    bs = [str(b) for b in result["batch_sizes"]]
    trows = {}
    for name, r in rows.items():
        ref = dft if name.endswith("+ft") else dense
        trows[name] = {"top1": r["top1"], "drop": r["top1"] - ref["top1"], "gmacs": r["gmacs"],
                       "agree": r.get("agree"), "kl": r.get("kl"),
                       "gr": r["gmacs"] / dense["gmacs"], "keep": r["keep"] if r["keep"] is not None else 1.0,
                       **{f"s{b}": r["speed"][b]["images_per_s"] for b in bs},
                       **{f"x{b}": r["speed"][b]["images_per_s"] / dense["speed"][b]["images_per_s"] for b in bs}}
    cols = [("top1", "top-1 %", ".2f"), ("drop", "Δ vs dense", "+.2f"), ("agree", "same class as dense %", ".1f"),
            ("kl", "KL to dense", ".3f"), ("gmacs", "GMACs", ".4f"),
            ("gr", "GMACs ratio", ".3f"), ("keep", "keep", ".3f")]
    cols += [(f"s{b}", f"images/s @{b}", ".1f") for b in bs] + [(f"x{b}", f"speed-up @{b}", ".2f") for b in bs]
    s, m = result["steps"], result["model"]["kwargs"]
    lines = [f"# ToP-ViM on a small Vim trained from scratch on CIFAR-10 (CPU, {result['threads']} threads)", "",
             f"Vim d {m['embed_dim']}, depth {m['depth']}, d_state {m['d_state']}, {m['img_size']} px / {m['patch_size']} px "
             f"patches (64 tokens + class), trained {s['train']} steps from scratch at batch {result['batch']}; pruning "
             "after layers " + ", ".join(f"{layers} at {r}" for r, layers in result["prune_layers"].items())
             + " of the GMACs, one keep ratio solved for each budget; '+ft' = "
             f"{s['tune']} fine-tune steps with the pruner attached (Δ against 'dense +ft', the dense model trained as "
             f"long), otherwise zero-shot (Δ against dense). {result['val_images']} val images. Variants: aligned = "
             "clipped importance + hidden-state alignment; naive = same importance, no alignment; random = random "
             "tokens, with alignment. 'same class as dense' and 'KL to dense' compare a row's val predictions with the "
             "model it started from (dense; 'dense +ft' for the fine-tuned rows): how far pruning moved them, less "
             "noisy than top-1. Speeds are timed interleaved in one process; a zero-shot row shares the timing "
             "of its fine-tuned row (same plan, same cost).", "",
             table(trows, cols), ""]
    if result.get("alignment_forms"):
        fm = result.get("alignment_forms_model")
        model_note = (f"On its own dense model: trained {fm['train_steps']} steps at batch {fm['batch']} "
                      f"({fm['threads']} thread(s)), dense top-1 {fm['dense_top1']:.2f} % on {fm['val_images']} val "
                      "images, pruning after layers " + ", ".join(f"{l} at {r}" for r, l in fm["prune_layers"].items())
                      + " (`python tools/bench_vim_cifar10.py " + " ".join(fm["argv"]) + "`, "
                      f"{fm['seconds'] / 60:.0f} min). " if fm else "")
        lines += ["## Alignment forms and clipping, zero-shot", "",
                  model_note + "The same pruning plan with each form of the hidden-state alignment (zero-shot on the "
                  "dense weights): naive = none; next = each kept token held over the gap *before* it (its copies "
                  "fill the gap, output read at the last copy; exact, summed per state in the scan); previous = the "
                  "gap filled with copies of the kept token *before* it (its output read at its own step, its state "
                  "carried across the gap); stretched step = next's delta times 1 + gap in decay and input (the "
                  "hold's Euler form, which mamba-ssm's kernel runs at the pruned length); decay only = the gap's "
                  "decay without its input. Importance clips each direction's SSM output at 0 and sums (clip each, "
                  "the default) or clips their mean, what enters out_proj (clip mean). Random tokens: one draw for "
                  "every form. KL to dense, lower is closer.", "",
                  table(result["alignment_forms"], [("kl", "KL to dense", ".3f"),
                                                    ("agree", "same class as dense %", ".1f"),
                                                    ("top1", "top-1 %", ".2f")]), ""]
    if result.get("quick"):
        lines += ["**Smoke run (--quick): a few steps on 64 images; the numbers mean nothing.**", ""]
    if png:
        lines += [f"![top-1 vs GMACs]({png})", ""]
    lines += [f"Regenerate: `python tools/bench_vim_cifar10.py {' '.join(argv)}` ({result['seconds'] / 60:.0f} min)"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, dense = result["rows"], result["rows"]["dense"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, suffix, ref in ((axes[0], "", "dense"), (axes[1], " +ft", "dense +ft")):
        for variant, marker in zip(result.get("variants", list(VARIANTS)), "os^"):
            pts = sorted((rows[f"{variant} {r}{suffix}"]["gmacs"] / dense["gmacs"], rows[f"{variant} {r}{suffix}"]["top1"])
                         for r in result["ratios"])
            ax.plot(*zip(*pts), marker=marker, label=variant)
        ax.axhline(rows[ref]["top1"], color="black", ls="--", label=ref)
        ax.set_xlabel("GMACs / dense")
        ax.set_title("zero-shot" if not suffix else f"after {result['steps']['tune']} fine-tune steps")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel(f"top-1 % (CIFAR-10 val, {result['val_images']} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
