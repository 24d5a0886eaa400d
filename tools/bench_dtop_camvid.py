"""DToP on CamVid with the real DeiT-Tiny backbone: dense segmenter vs DToP at several p0, one process.

    python tools/bench_dtop_camvid.py [--dense-steps 1500] [--dtop-steps 200] [--thresholds 0.8,0.9,0.95] [--quick]

1. A segmenter (recipes/camvid_deit_t_segmenter.yaml: DeiT-Tiny ImageNet weights, linear heads after
   blocks 5 and 7 and the decode head after 11) is trained on CamVid train through the stage runner.
2. From that model, DToP at each p0 is attached and fine-tuned ``--dtop-steps`` (recipes/camvid_deit_t_dtop.yaml,
   pruning active). As a control the dense model gets the same extra steps without pruning.
3. Every model is evaluated on CamVid val (whole 480x360 images): mIoU/mAcc/aAcc, executed GMACs averaged over
   the images (FlopCounterMode per image), exit fractions per stage.
4. Speed, all models in this process, interleaved rounds: latency at batch 1 (mean over 8 val images of the
   median per image) and images/s at batch 8 (the same 8 images); DToP's ragged batches both padded + masked
   and one image at a time (``ragged: loop``).
5. The ADE20K sample (3 real images) through the ADE20K loader and sliding-window evaluation (a 150-class
   segmenter on the same backbone; its heads are untrained, so only the mechanics and the cost are shown).

Writes tools/results/dtop_camvid.{json,md,png} (the PNG: mIoU vs GMACs ratio, and dense and DToP masks of a
few val images, exited tokens shaded by stage; no CamVid pixels, which may not be redistributed). ``--quick`` shrinks everything to a smoke run of a few minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import compress  # noqa: F401  (torchvision guard first)
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_assets  # noqa: E402

from compress.recipe import recipe_from_dict  # noqa: E402
from compress.report import table  # noqa: E402
from compress.run import evaluate_model, prepare, run_stage  # noqa: E402

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "recipes"
SEG, DTOP = RECIPES / "camvid_deit_t_segmenter.yaml", RECIPES / "camvid_deit_t_dtop.yaml"


def recipe(path: Path, args, root: Path, checkpoint: Path, steps: int, pruner=None, control=False):
    data = yaml.safe_load(path.read_text())
    data["model"]["checkpoint"] = str(checkpoint)
    data["data"].update(root=str(root), num_workers=args.workers, limit=args.limit)
    stage = data["stages"][0]
    stage["max_steps"] = steps
    if pruner is not None:
        stage["pruner"] = pruner
    if control:
        data["stages"] = [{k: v for k, v in stage.items() if k != "pruner"} | {"kind": "finetune"}]
    data["trainer"]["enable_progress_bar"] = False
    data["evaluate"].update(enabled=False, bench=False)  # evaluated once per model below
    data["export"] = {"enabled": False}
    return recipe_from_dict(data, str(path))


def train(rec, work: Path, state=None):
    ctx = prepare(rec, work)
    if state is not None:
        ctx.model.load_state_dict(state)
    t0 = time.perf_counter()
    run_stage(ctx, 0, rec.stages[0])
    ctx.train_seconds = time.perf_counter() - t0
    return ctx


def timings(models: dict, images: list, rounds: int) -> dict:
    """Latency at batch 1 (mean over images of each image's median) and images/s at batch len(images),
    interleaving the models in every round so drift in machine speed hits them alike."""
    batch = torch.cat(images)
    lat = {n: [[] for _ in images] for n in models}
    bat = {n: [] for n in models}
    with torch.inference_mode():
        for m in models.values():
            m.eval()(images[0])
            m(batch)
        for _ in range(rounds):
            for name, m in models.items():
                for i, img in enumerate(images):
                    t0 = time.perf_counter()
                    m(img)
                    lat[name][i].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                m(batch)
                bat[name].append(time.perf_counter() - t0)
    return {n: {"latency_ms_b1": 1e3 * statistics.mean(statistics.median(t) for t in lat[n]),
                f"images_per_s_b{len(images)}": len(images) / statistics.median(bat[n])} for n in models}


def ade20k_check(assets: Path, checkpoint: Path) -> dict:
    """The 3 ADE20K sample images through the ade20k loader and sliding-window evaluation."""
    from compress.data.ade20k import ADE20K
    from compress.models import build_model
    from compress.recipe import ModelConfig
    from compress.tasks.segmentation import Segmentation

    root = assets / "ade20k-sample"
    model = build_model(ModelConfig(name="segmenter", checkpoint=checkpoint,
                                    kwargs={"backbone": "deit_tiny_patch16_224", "num_classes": 150, "img_size": 512,
                                            "aux_blocks": [5, 7]})).eval()
    ds = ADE20K(root).dataset("val", model)
    t0 = time.perf_counter()
    r = Segmentation(150).evaluate(model, torch.utils.data.DataLoader(ds), label="ADE20K sample (slide)")
    return {"images": r["images"], "gmacs_per_image": r["gmacs"], "latency_ms_b1": r["latency_ms"],
            "seconds": time.perf_counter() - t0, "mIoU_untrained_heads": r["mIoU"],
            "sizes": [list(ds[i][0].shape[-2:]) for i in range(len(ds))]}


def plot(result: dict, masks: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    n = len(masks["dense"])
    fig = plt.figure(figsize=(11, 4.2 * (n + 1)))
    ax = fig.add_subplot(n + 1, 1, 1)
    ax.set_title("mIoU vs executed GMACs on CamVid val")
    for name, r in rows.items():
        ax.scatter(r["gmacs_ratio"], r["mIoU"], s=40, label=name)
        ax.annotate(name, (r["gmacs_ratio"], r["mIoU"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(0.8, color="grey", ls=":", lw=1)
    ax.set_xlabel("executed GMACs / dense (mean over CamVid val images)")
    ax.set_ylabel("mIoU %")
    ax.grid(alpha=0.3)
    cmap = plt.get_cmap("tab20", 12)
    for i in range(n):
        # predictions only: CamVid's images and label maps may not be redistributed with the repository
        cells = [(f"dense (val image {masks['index'][i]})", masks["dense"][i], None),
                 (f"{masks['label']}, exited tokens shaded (darker: earlier head)", masks["pruned"][i],
                  masks["stages"][i])]
        for j, (title, pic, stage) in enumerate(cells):
            a = fig.add_subplot(n + 1, 2, 2 * (i + 1) + j + 1)
            a.imshow(pic, cmap=cmap, vmin=0, vmax=11, interpolation="nearest")
            if stage is not None:  # exited tokens shaded: darker = earlier stage
                H, W = pic.shape
                shade = torch.zeros(*stage.shape, 4)
                for m in range(int(stage.max()) + 1):
                    shade[stage == m] = torch.tensor([0.0, 0.0, 0.0, max(0.15, 0.55 - 0.25 * m)])
                a.imshow(shade, extent=(0, stage.shape[1] * 16, stage.shape[0] * 16, 0), interpolation="nearest")
                a.set_xlim(0, W)
                a.set_ylim(H, 0)
            a.set_title(title, fontsize=9)
            a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def sample_masks(dense, pruned, ds, label: str, count: int = 3) -> dict:
    """Dense and DToP masks of ``count`` val images spread over the split, with DToP's exit-stage maps."""
    out = {"index": [], "dense": [], "pruned": [], "stages": [], "label": label}
    policy = pruned.token_pruner()
    picks = sorted({round(k * (len(ds) - 1) / max(count - 1, 1)) for k in range(count)})
    with torch.inference_mode():
        for i in picks:
            x, _ = ds[i]
            out["index"].append(i)
            out["dense"].append(dense(x[None]).argmax(1)[0])
            out["pruned"].append(pruned(x[None]).argmax(1)[0])
            out["stages"].append(policy.last["exit_stage"][0])
    return out


def markdown(result: dict, png: str) -> str:
    cols = [("mIoU", "mIoU %", ".2f"), ("mAcc", "mAcc %", ".2f"), ("aAcc", "aAcc %", ".2f"), ("gmacs", "GMACs", ".3f"),
            ("gmacs_ratio", "GMACs ratio", ".3f"), ("exited", "exited %", ".1f"), ("stages", "exited per stage %", ""),
            ("latency_ms_b1", "latency ms @1", ".1f"), ("latency_gain", "latency gain @1", ".2f"),
            ("ips8", "images/s @8", ".2f"), ("ips8_loop", "images/s @8 (loop)", ".2f")]
    rows = {n: {**r, "stages": " / ".join(f"{v:.1f}" for v in r.get("exit_stages", [])) or "–"}
            for n, r in result["rows"].items()}
    a = result["args"]
    ade = result.get("ade20k")
    text = (f"# DToP on CamVid, DeiT-Tiny segmenter (CPU, {result['threads']} threads)\n\n"
            f"Segmenter: DeiT-Tiny (real ImageNet weights) + linear heads after blocks 5, 7 (auxiliary) and 11, "
            f"trained {a['dense_steps']} steps (batch 8, 224 crops, mmseg pipeline) on CamVid train "
            f"({result['train_images']} images). DToP (k {a['top_k']}) and the control (dense, same extra steps) each "
            f"fine-tune {a['dtop_steps']} steps from it. Evaluated on {result['val_images']} CamVid val images "
            f"(whole 480x360). GMACs: executed (FlopCounterMode), mean per image; latency @1: mean over 8 val images "
            f"of each image's median; images/s @8: the same 8 images as one batch (padded + masked ragged tokens; "
            f"'loop': one image at a time). Latency gain = dense latency / model latency.\n\n"
            + table(rows, cols) + "\n\n"
            "Target (issue 12): GMACs ratio <= 0.80 with mIoU within 0.5 of dense, latency gain at batch 1 >= 80 % "
            "of 1 / GMACs ratio. " + result["verdict"] + "\n\n")
    if ade:
        text += (f"ADE20K sample: {ade['images']} real images (sizes {ade['sizes']} after resizing to fit 2048x512) "
                 f"through the ade20k loader and sliding-window inference (512 window, 341 stride): "
                 f"{ade['gmacs_per_image']:.2f} GMACs per image, {ade['latency_ms_b1']:.0f} ms per image "
                 f"(its 150-class heads are untrained: mechanics and cost only).\n\n")
    return text + f"![mIoU vs GMACs and masks]({png})\n\nRegenerate: `python tools/bench_dtop_camvid.py`; wall time {result['seconds']:.0f} s.\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_assets.add_argument(p)
    p.add_argument("--dense-steps", type=int, default=1500)
    p.add_argument("--dtop-steps", type=int, default=200)
    p.add_argument("--thresholds", default="0.8,0.9,0.95")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--limit", type=int, default=None, help="images per split (default: all)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-control", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: 10 + 3 steps, 8 images per split, 2 rounds")
    p.add_argument("--out", type=Path, default=HERE / "results" / "dtop_camvid")
    args = p.parse_args(argv)
    if args.quick:
        args.dense_steps, args.dtop_steps, args.limit, args.rounds = 10, 3, 8, 2
        if args.out == HERE / "results" / "dtop_camvid":
            args.out = Path(tempfile.gettempdir()) / "dtop_camvid_quick"
    threads = int(os.environ.get("COMPRESS_THREADS", 2))
    torch.set_num_threads(threads)
    found = bench_assets.find(args.assets, bench_assets.DEIT_TINY, "camvid/trainannot")
    if found is None:
        return 2
    ckpt, root = found[0], args.assets / "camvid"
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench_dtop_"))
    try:
        # 1. the dense segmenter from the ImageNet backbone
        ctx = train(recipe(SEG, args, root, ckpt, args.dense_steps), work / "dense")
        dense = ctx.model.eval()
        seg_file = work / "segmenter.safetensors"
        from safetensors.torch import save_file

        state = {k: v.detach().clone().contiguous() for k, v in dense.state_dict().items()}
        save_file(state, str(seg_file))
        evals = {"dense": evaluate_model(ctx, dense, "evaluate dense")}
        models = {"dense": dense}
        seconds = {"dense": ctx.train_seconds}
        # 2. DToP at each p0 (and the control) from that model
        thresholds = [float(t) for t in args.thresholds.split(",")]
        for t in thresholds:
            name = f"dtop p0={t:g}"
            pruner = {"name": "dtop", "threshold": t, "top_k": args.top_k}
            c = train(recipe(DTOP, args, root, seg_file, args.dtop_steps, pruner=pruner), work / name)
            models[name], seconds[name] = c.model.eval(), c.train_seconds
            evals[name] = evaluate_model(c, c.model, f"evaluate {name}")
        if not args.no_control:
            c = train(recipe(SEG, args, root, seg_file, args.dtop_steps, control=True), work / "control")
            models["dense + same steps"], seconds["dense + same steps"] = c.model.eval(), c.train_seconds
            evals["dense + same steps"] = evaluate_model(c, c.model, "evaluate control")
        # 3. speed, interleaved; DToP's ragged batches also one image at a time
        images = ctx.task.examples[:8]
        speed = timings(models, images, args.rounds)
        for name, m in models.items():
            policy = m.token_pruner()
            if policy is not None:
                policy.config.ragged = "loop"
        loop = timings({n: m for n, m in models.items() if m.token_pruner() is not None}, images, args.rounds)
        for name, m in models.items():
            if m.token_pruner() is not None:
                m.token_pruner().config.ragged = "pad"
        rows = {}
        d = evals["dense"]
        for name, e in evals.items():
            s = speed[name]
            rows[name] = {**{k: e[k] for k in ("mIoU", "mAcc", "aAcc", "gmacs")}, "gmacs_ratio": e["gmacs"] / d["gmacs"],
                          "exited": e.get("exit_fraction"), "exit_stages": e.get("exit_fraction_stages", []),
                          "latency_ms_b1": s["latency_ms_b1"], "latency_gain": speed["dense"]["latency_ms_b1"] / s["latency_ms_b1"],
                          "ips8": s[f"images_per_s_b{len(images)}"],
                          "ips8_loop": loop.get(name, {}).get(f"images_per_s_b{len(images)}"),
                          "train_seconds": seconds[name]}
        # mIoU is compared with the control when there is one: DToP had that many more training steps
        ref = "dense + same steps" if "dense + same steps" in rows else "dense"
        ok = [n for n, r in rows.items() if n.startswith("dtop") and r["gmacs_ratio"] <= 0.8
              and r["mIoU"] >= rows[ref]["mIoU"] - 0.5 and r["latency_gain"] >= 0.8 / r["gmacs_ratio"]]
        verdict = (f"mIoU compared with '{ref}'. " + (f"Met by: {', '.join(ok)}." if ok else
                                                        "Not met by any p0 in this run (see the rows)."))
        # 4. masks for the figure, ADE20K sample mechanics
        pick = f"dtop p0={0.9 if 0.9 in thresholds else thresholds[0]:g}"
        val = ctx.source.dataset("val", dense)
        masks = sample_masks(dense, models[pick], val, pick)
        ade = ade20k_check(args.assets, ckpt) if (args.assets / "ade20k-sample").is_dir() else None
        result = {"args": vars(args) | {"assets": str(args.assets), "out": str(args.out)}, "threads": threads,
                  "train_images": len(ctx.source.dataset("train", dense, train=True)), "val_images": d["images"],
                  "rows": rows, "evaluations": evals, "verdict": verdict, "ade20k": ade, "torch": torch.__version__,
                  "seconds": time.time() - t0}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        plot(result, masks, args.out.with_suffix(".png"))
        md = markdown(result, args.out.with_suffix(".png").name)
        args.out.with_suffix(".md").write_text(md)
        print(md)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
