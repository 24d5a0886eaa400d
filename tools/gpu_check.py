"""One unattended GPU check of the CUDA paths no CPU test reaches; writes a JSON and a markdown table.

    python tools/gpu_check.py [--out tools/results/gpu_check] [--only NAME,...] [--budget-s 420]
    python tools/gpu_check.py --device cpu --smoke          # tiny shapes, 1-2 steps: what the CPU can run

Every check runs in its own try/except (and under its own time limit) and ends ``ok``, ``failed`` (with the
one-line error) or ``skipped`` (with the reason), so one failure never hides the rest. The JSON is rewritten
after every check, so a run killed from outside still leaves what it had. Checks:

- train_bf16 / train_fp16: ``compress.run.fit`` of a finetune -> Zero-TPrune -> distill recipe on a small timm
  ViT with ``trainer.precision`` bf16-mixed / 16-mixed: losses finite, median time per step, export loads;
- deepspeed_zero2 / deepspeed_zero3 (run last): ``compress fit`` in a child process with ``trainer.strategy:
  deepspeed_stage_2/3`` on 1 GPU (heads, ISS-P, distill; sharded checkpoint folders), then ``compress.load`` of the
  export gives exactly the logits of the consolidated weights the last stage ended with;
- vim_scan: the selective scan on the device (mamba-ssm's kernel if importable, else compress's PyTorch scan),
  plain and held (ToP-ViM), values and gradients against the step-by-step float64 loop on CPU; a small dense and
  ToP-ViM-pruned Vim's logits on the device against CPU;
- vim_speed: Vim-T dense vs ToP-ViM-pruned (the bundled vim_t_topvim settings) images/s at batch 1 and 64
  and the executed GMACs ratio (``compress.report.compare``);
- sparse24_fp16 / sparse24_bf16 / sparse24_deit: magnitude 2:4 pruning, then ``to_semi_structured``: outputs
  against the masked dense layers, speed against them (a ViT-B MLP; DeiT-Tiny's MLPs end to end);
- tokens_*: Zero-TPrune (drop / merge), ToMe and GTP at target_gmacs_ratio 0.65 on a random DeiT-Tiny, dense vs
  pruned images/s at batch 1 and 64 and the executed GMACs ratio (``compress.report.compare``);
- aptp: an APTP-routed tiny UNet (4 sliced experts) on the device against CPU, per-expert images/s vs dense.

Exit status: 0 when nothing failed, 1 when a check failed, 2 when the machine cannot run it (no CUDA).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no internet; nothing here downloads
os.environ.setdefault("COMPRESS_PROGRESS_SECONDS", "3600")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "gpu_check"

# the tiny text-to-image UNet of tests/diffusion_zoo.py (smoke mode); on a GPU unet_small's own default (32 px)
TINY_UNET = dict(block_out_channels=[16, 32], down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], sample_size=16, layers_per_block=2)
PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a ship", "a photo of a truck",
           "a red car on a road", "a bird in the sky", "a green field", "a blue circle"]
TOKEN_PRUNERS = {
    "tokens_zero_tprune": {"name": "zero_tprune"},
    "tokens_zero_tprune_merge": {"name": "zero_tprune", "merge": True},
    "tokens_tome": {"name": "tome"},
    "tokens_gtp": {"name": "gtp"},
}
TOKEN_BUDGET = 0.65


class Skip(Exception):
    """Raised by a check that cannot run here; its message is the reason."""


class CheckTimeout(Exception):
    """Raised (from SIGALRM) inside a check that ran past its limit."""


class CheckFailed(Exception):
    """A failure with a one-line message and a longer ``detail`` (a child process's log tail) for the JSON."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


class Ctx:
    """What every check needs: the device, smoke mode, a scratch folder, the batch sizes to time."""

    def __init__(self, device: str, smoke: bool, work: Path, repeats: Optional[int] = None):
        import torch

        self.device = device
        self.dev = torch.device(device)
        self.cuda = self.dev.type == "cuda"
        self.smoke = smoke
        self.work = work
        self.batch_sizes = (1, 2) if smoke else (1, 64)
        self.repeats = repeats or (3 if smoke else 12)
        self.cuda_broken: Optional[str] = None

    def need_cuda(self) -> None:
        if not self.cuda:
            raise Skip("needs CUDA")

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.dev)


CHECKS: List[Dict[str, Any]] = []


def check(name: str, title: str, limit_s: int, cuda_only: bool = False):
    """Register a check: ``fn(ctx) -> (one-line summary, result dict)``; ``limit_s`` is its time limit on a GPU."""
    def register(fn):
        CHECKS.append({"name": name, "title": title, "fn": fn, "limit_s": limit_s, "cuda_only": cuda_only})
        return fn
    return register


# ---- helpers ------------------------------------------------------------------------------------------------


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (want's scale, so small outputs do not inflate it)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))


def require(cond: bool, message: str) -> None:
    if not cond:
        raise AssertionError(message)


def speed_rows(cmp: Dict[str, Any]) -> Dict[str, Any]:
    """The figures of a ``compress.report.compare`` worth keeping (not every round's timings)."""
    out = {"gmacs_dense": cmp["dense"]["gmacs"], "gmacs_pruned": cmp["pruned"]["gmacs"],
           "gmacs_ratio": cmp["ratios"]["gmacs"], "speedup": cmp["ratios"]["speedup"],
           "speedup_rounds": cmp["ratios"]["speedup_rounds"], "images_per_s": {}}
    for name in ("dense", "pruned"):
        out["images_per_s"][name] = {bs: s["images_per_s"] for bs, s in cmp[name]["speed"].items()}
    return out


def speed_line(row: Dict[str, Any]) -> str:
    s = ", ".join(f"{v:.2f}x @{bs}" for bs, v in row["speedup"].items())
    return f"GMACs ratio {row['gmacs_ratio']:.3f}, speed-up {s}"


def recipe_trainer(ctx: Ctx, **extra) -> Dict[str, Any]:
    devices = [ctx.dev.index] if ctx.cuda and ctx.dev.index is not None else 1  # --device cuda:N: that GPU
    return {"accelerator": "gpu" if ctx.cuda else "cpu", "devices": devices, "log_every_n_steps": 1,
            "enable_progress_bar": False, **extra}


def write_yaml(path: Path, data: Dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def only_run(out: Path) -> Path:
    runs = [p for p in out.glob("*/*") if p.is_dir()]
    require(len(runs) == 1, f"expected one run directory under {out}, found {len(runs)}")
    return runs[0]


# ---- 1. mixed-precision training through the runner ---------------------------------------------------------


def step_timer_class():
    """A Lightning callback timing every training step (CUDA-synchronised) and keeping its loss."""
    import lightning.pytorch as pl
    import torch

    class StepTimer(pl.Callback):
        def __init__(self):
            self.stages: List[Dict[str, list]] = []
            self._t0 = 0.0

        def on_train_start(self, trainer, module):
            self.stages.append({"seconds": [], "loss": [], "precision": str(trainer.precision)})

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)
            self.stages[-1]["seconds"].append(time.perf_counter() - self._t0)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.stages[-1]["loss"].append(float(loss.detach().float()) if torch.is_tensor(loss) else float("nan"))

    return StepTimer


@contextlib.contextmanager
def extra_callbacks(callbacks: list):
    """``compress.run.fit`` with more Lightning callbacks on every stage's Trainer (the runner takes none)."""
    from compress import stages as run  # trainer_kwargs lives with the stage runner

    original = run.trainer_kwargs

    def with_callbacks(*args, **kwargs):
        out = original(*args, **kwargs)
        out["callbacks"] = list(out["callbacks"]) + callbacks
        return out

    run.trainer_kwargs = with_callbacks
    try:
        yield
    finally:
        run.trainer_kwargs = original


def train_with_precision(ctx: Ctx, precision: str):
    import torch

    import compress
    from compress.run import fit

    steps = 2 if ctx.smoke else 20
    recipe = {
        "name": f"gpu_check_{precision}", "seed": 0,
        "model": {"name": "quickstart_vit", "kwargs": {"depth": 3} if ctx.smoke else {}},
        "data": {"kind": "quickstart", "batch_size": 8 if ctx.smoke else 64, "num_workers": 0,
                 "params": {"num_train": 16 if ctx.smoke else 2048, "num_val": 8 if ctx.smoke else 256}},
        "stages": [
            {"kind": "finetune", "max_steps": steps, "optimizer": {"lr": 2.0e-3}},
            {"kind": "prune", "max_steps": steps, "pruner": {"name": "zero_tprune", "merge": True, "schedule": [
                {"block": 0, "s_ratio": 0.45, "i_ratio": 0.0}, {"block": 1, "s_ratio": 0.3, "i_ratio": 0.0}]}},
            {"kind": "distill", "max_steps": steps, "optimizer": {"lr": 1.0e-3},
             "distill": {"teacher": "dense", "alpha": 0.5, "temperature": 2.0}},
        ],
        "trainer": recipe_trainer(ctx, precision=precision),
        "evaluate": {"batch_size": 8 if ctx.smoke else 64, "bench": False},
    }
    work = ctx.work / f"train_{precision}"
    path = write_yaml(work / "recipe.yaml", recipe)
    timer = step_timer_class()()
    with extra_callbacks([timer]):
        metrics = fit(path, out=work / "runs")
    stages = timer.stages
    require(len(stages) == 3, f"expected 3 training stages, timed {len(stages)}")
    losses = [v for s in stages for v in s["loss"]]
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    require(not bad, f"loss not finite at step {bad[:1]} of {len(losses)} ({losses[bad[0]] if bad else ''})")
    require(all(s["precision"] == precision for s in stages), f"trainer precision {[s['precision'] for s in stages]}")
    per_stage = []
    for s in stages:
        timed = s["seconds"][1:] or s["seconds"]  # the first step of a stage pays for warm-up
        per_stage.append({"steps": len(s["seconds"]), "median_ms": 1e3 * statistics.median(timed),
                          "first_ms": 1e3 * s["seconds"][0], "loss_first": s["loss"][0], "loss_last": s["loss"][-1]})
    model = compress.load(metrics["export"]).to(ctx.dev).eval()
    x = torch.rand(4, 3, 32, 32, device=ctx.dev)
    with torch.inference_mode():
        out = model(x)
    require(bool(torch.isfinite(out).all()), "the exported model's logits are not finite")
    med = statistics.median(p["median_ms"] for p in per_stage)
    result = {"precision": precision, "stages": per_stage, "median_ms_per_step": med,
              "batch_size": recipe["data"]["batch_size"], "top1_dense": (metrics.get("dense") or {}).get("top1"),
              "top1_pruned": (metrics.get("pruned") or {}).get("top1"), "export": metrics["export"]}
    summary = (f"{sum(p['steps'] for p in per_stage)} steps, median {med:.1f} ms/step (batch "
               f"{result['batch_size']}), loss {per_stage[0]['loss_first']:.3f} -> {per_stage[-1]['loss_last']:.3f}, "
               "export loads")
    return summary, result


@check("train_bf16", "bf16-mixed training steps (compress.run.fit, quickstart_vit)", limit_s=120)
def check_train_bf16(ctx: Ctx):
    import torch

    if ctx.cuda and not torch.cuda.is_bf16_supported():
        raise Skip(f"{torch.cuda.get_device_name(ctx.dev)} has no bf16")
    return train_with_precision(ctx, "bf16-mixed")


@check("train_fp16", "fp16-mixed training steps (compress.run.fit, quickstart_vit)", limit_s=120, cuda_only=True)
def check_train_fp16(ctx: Ctx):
    ctx.need_cuda()  # Lightning runs 16-mixed only on CUDA
    return train_with_precision(ctx, "16-mixed")


# ---- 3. Vision Mamba ----------------------------------------------------------------------------------------


def scan_inputs(b: int, d: int, L: int, n: int, seed: int = 0):
    """Float64 CPU inputs of the selective scan (shapes as mamba-ssm's selective_scan_fn)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 4 - 0.1
    return [r(b, d, L), r(b, d, L), A, r(b, n, L), r(b, n, L), r(d), r(b, d, L), r(d)]


def scan_agreement(ctx: Ctx, hold_pattern: Optional[List[int]]) -> Dict[str, float]:
    """The op on the device (float32) vs the float64 loop on CPU: output and all 8 input gradients."""
    import torch

    from compress.models.selective_scan import scan_by_expansion, scan_reference, selective_scan

    b, d, L, n = (2, 8, 37, 4) if ctx.smoke else (2, 64, 197, 16)
    ref_in = [t.requires_grad_() for t in scan_inputs(b, d, L, n)]
    hold = None
    if hold_pattern is not None:
        hold = torch.tensor([hold_pattern[i % len(hold_pattern)] for i in range(b * L)],
                            dtype=torch.float64).view(b, L)
    grad = torch.randn(b, d, L, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if hold is None:
        ref = scan_reference(*ref_in, True)
    else:  # the held scan = the plain loop over the sequence with each token repeated hold times
        ref = scan_by_expansion(lambda *a: scan_reference(*a), *ref_in, delta_softplus=True, hold=hold)
    ref_grads = torch.autograd.grad(ref, ref_in, grad)
    dev_in = [t.detach().float().to(ctx.dev).requires_grad_() for t in ref_in]
    out = selective_scan(*dev_in, True, None if hold is None else hold.float().to(ctx.dev))
    dev_grads = torch.autograd.grad(out, dev_in, grad.float().to(ctx.dev))
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    errs = {"out": rel_err(out, ref)}
    errs.update({f"grad_{k}": rel_err(g, r) for k, g, r in zip(names, dev_grads, ref_grads)})
    return errs


@check("vim_scan", "Vim selective scan + Vim logits, device vs CPU reference", limit_s=120)
def check_vim_scan(ctx: Ctx):
    import importlib.util

    import torch

    from compress.models.selective_scan import cuda_scan
    from compress.pruners.base import build_pruner
    from compress.registry import MODELS

    kernel = "mamba_ssm selective_scan_fn" if ctx.cuda and cuda_scan() is not None else \
        f"compress chunked PyTorch scan on {ctx.dev.type}"
    plain = scan_agreement(ctx, None)
    held = scan_agreement(ctx, [1, 2, 1, 3])
    tol_out, tol_grad = 1e-4, 1e-3  # float32 on the device vs float64, relative to each tensor's scale
    for label, errs in (("plain", plain), ("held", held)):
        for key, err in errs.items():
            require(err <= (tol_out if key == "out" else tol_grad), f"{label} scan {key}: relative error {err:.2e}")
    # a small Vim, dense and ToP-ViM-pruned: the whole model (conv, scans, held scans) on the device vs CPU
    torch.manual_seed(0)
    dense = MODELS.get("vim_custom")(img_size=32, patch_size=4, embed_dim=32 if ctx.smoke else 64, depth=4,
                                     d_state=4 if ctx.smoke else 8, num_classes=10).eval()
    pruned = copy.deepcopy(dense)
    build_pruner({"name": "top_vim", "keep_ratio": 0.5, "prune_layers": [1, 2]}).attach(pruned)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model_errs = {}
    for label, model in (("dense", dense), ("top_vim", pruned)):
        with torch.inference_mode():
            want = model(x)
            got = copy.deepcopy(model).to(ctx.dev)(x.to(ctx.dev))
        model_errs[label] = rel_err(got, want)
        require(model_errs[label] <= 1e-2, f"{label} Vim logits on {ctx.dev.type} vs CPU: relative error "
                                           f"{model_errs[label]:.2e}")
    result = {"kernel": kernel, "causal_conv1d": importlib.util.find_spec("causal_conv1d") is not None,
              "scan_rel_err": plain, "held_scan_rel_err": held, "vim_logits_rel_err": model_errs,
              "tolerance": {"out": tol_out, "grad": tol_grad, "logits": 1e-2}}
    worst = max(max(plain.values()), max(held.values()))
    return (f"{kernel}: scan + grads worst rel err {worst:.1e} (plain, held); Vim logits vs CPU "
            f"{model_errs['dense']:.1e} dense, {model_errs['top_vim']:.1e} ToP-ViM"), result


@check("vim_speed", "Vim-T dense vs ToP-ViM-pruned images/s", limit_s=240)
def check_vim_speed(ctx: Ctx):
    import torch

    from compress.models.selective_scan import cuda_scan
    from compress.pruners.base import build_pruner
    from compress.registry import MODELS
    from compress.report import compare

    torch.manual_seed(0)
    if ctx.smoke:
        dense, size = MODELS.get("vim_custom")(img_size=32, patch_size=8, embed_dim=32, depth=4, d_state=4,
                                               num_classes=10), (3, 32, 32)
        spec = {"name": "top_vim", "keep_ratio": 0.5, "prune_layers": [1]}
    else:
        dense, size = MODELS.get("vim_tiny_patch16_224")(), (3, 224, 224)
        spec = {"name": "top_vim"}  # the paper's layers and keep ratio (0.8) for Vim-T's depth
    dense.eval()
    pruned = copy.deepcopy(dense)
    pruner = build_pruner(spec)
    pruner.attach(pruned)
    cmp = compare(dense, pruned, size, ctx.batch_sizes, ctx.device, repeats=max(3, ctx.repeats // 2))
    row = speed_rows(cmp)
    row.update(model="vim_custom (smoke)" if ctx.smoke else "vim_tiny_patch16_224", pruner=pruner.spec(),
               kernel="mamba_ssm" if ctx.cuda and cuda_scan() is not None else "compress PyTorch scan")
    return f"{row['kernel']}: {speed_line(row)}", row


# ---- 4. 2:4 semi-structured sparsity ------------------------------------------------------------------------


def sparse_24_supported(ctx: Ctx, dtype) -> None:
    import torch

    ctx.need_cuda()
    cap = torch.cuda.get_device_capability(ctx.dev)
    if cap < (8, 0):
        raise Skip(f"2:4 sparse tensor cores need compute capability 8.0+, this GPU has {cap[0]}.{cap[1]}")
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise Skip("no bf16 on this GPU")
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError as e:
        raise Skip(f"this torch has no torch.sparse.to_sparse_semi_structured ({e})") from None


def time_ms(ctx: Ctx, model, x) -> float:
    from compress import measure

    return 1e3 * statistics.median(measure.time_forward(model, x, warmup=5, repeats=max(10, ctx.repeats * 2)))


def sparse_24(ctx: Ctx, model, x, include: List[str]):
    """Magnitude 2:4 on ``include``, then the same model with its 2:4 weights as semi-structured tensors."""
    import torch

    from compress.pruners.base import build_pruner
    from compress.pruners.weight import masks as M

    build_pruner({"name": "magnitude", "n_m": [2, 4], "include": include, "exclude": []}).attach(model)
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and M.is_2_4(m.weight)]
    require(bool(layers), "magnitude n_m [2, 4] left no 2:4 Linear layer")
    model.eval()
    with torch.inference_mode():
        want = model(x)
    dense_ms = time_ms(ctx, model, x)
    converted = M.to_semi_structured(model)
    require(converted == layers, f"converted {converted}, expected {layers}")
    with torch.inference_mode():
        got = model(x)
    sparse_ms = time_ms(ctx, model, x)
    err = rel_err(got, want)
    require(err <= 2e-2, f"semi-structured outputs vs masked dense: relative error {err:.2e}")
    return {"layers": len(converted), "rel_err": err, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms, "input": list(x.shape), "dtype": str(x.dtype)}


def sparse_24_mlp(ctx: Ctx, dtype):
    import torch

    sparse_24_supported(ctx, dtype)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(768, 3072), torch.nn.GELU(), torch.nn.Linear(3072, 768))
    mlp = mlp.to(ctx.dev, dtype)
    x = torch.randn(8192, 768, device=ctx.dev, dtype=dtype)
    row = sparse_24(ctx, mlp, x, ["*"])
    return (f"ViT-B MLP, 8192 tokens: rel err {row['rel_err']:.1e}, {row['dense_ms']:.3f} -> {row['sparse_ms']:.3f} ms "
            f"({row['speedup']:.2f}x)"), row


@check("sparse24_fp16", "2:4 semi-structured vs dense, ViT-B MLP fp16", limit_s=60, cuda_only=True)
def check_sparse24_fp16(ctx: Ctx):
    import torch

    return sparse_24_mlp(ctx, torch.float16)


@check("sparse24_bf16", "2:4 semi-structured vs dense, ViT-B MLP bf16", limit_s=60, cuda_only=True)
def check_sparse24_bf16(ctx: Ctx):
    import torch

    return sparse_24_mlp(ctx, torch.bfloat16)


@check("sparse24_deit", "2:4 semi-structured DeiT-Tiny MLPs end to end, fp16", limit_s=60, cuda_only=True)
def check_sparse24_deit(ctx: Ctx):
    import timm
    import torch

    sparse_24_supported(ctx, torch.float16)
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).to(ctx.dev, torch.float16)
    x = torch.randn(64, 3, 224, 224, device=ctx.dev, dtype=torch.float16)
    row = sparse_24(ctx, model, x, ["blocks.*.mlp.fc1", "blocks.*.mlp.fc2"])
    return (f"{row['layers']} MLP Linears 2:4: logits rel err {row['rel_err']:.1e}, {row['dense_ms']:.2f} -> "
            f"{row['sparse_ms']:.2f} ms per batch ({row['speedup']:.2f}x)"), row


# ---- 5. token pruners on a DeiT-Tiny-shaped model -----------------------------------------------------------


def deit_tiny(ctx: Ctx):
    import timm
    import torch

    torch.manual_seed(0)
    if ctx.smoke:  # DeiT-Tiny's width and heads on 64 px (16 patches), 4 blocks
        return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, depth=4).eval(), (3, 64, 64)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval(), (3, 224, 224)


def token_check(name: str):
    def run(ctx: Ctx):
        import torch

        from compress.pruners.base import build_pruner
        from compress.report import compare

        dense, size = deit_tiny(ctx)
        pruned = copy.deepcopy(dense)
        pruner = build_pruner({**TOKEN_PRUNERS[name], "target_gmacs_ratio": TOKEN_BUDGET})
        pruner.attach(pruned)
        x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0)).to(ctx.dev)
        with torch.inference_mode():
            out = pruned.to(ctx.dev)(x)
        require(bool(torch.isfinite(out).all()), "pruned logits are not finite")
        cmp = compare(dense, pruned, size, ctx.batch_sizes, ctx.device, repeats=ctx.repeats)
        row = speed_rows(cmp)
        row.update(model="deit_tiny_patch16_224" + (" (64 px, depth 4)" if ctx.smoke else ""), spec=pruner.spec(),
                   target_gmacs_ratio=TOKEN_BUDGET)
        return speed_line(row), row
    return run


for _name, _spec in TOKEN_PRUNERS.items():
    _label = _spec["name"] + (" merge" if _spec.get("merge") else "")
    check(_name, f"{_label} @ {TOKEN_BUDGET} GMACs ratio, DeiT-Tiny dense vs pruned images/s", limit_s=90)(
        token_check(_name))


# ---- 6. APTP-routed diffusion UNet --------------------------------------------------------------------------


def expert_gates(shape_w, shape_d, groups: List[int], keep: List[float]):
    """Fixed random gates: expert k keeps about ``keep[k]`` of each group (at least one) and of the block pairs."""
    import torch

    g = torch.Generator().manual_seed(3)
    wc = torch.zeros(shape_w)
    dc = torch.zeros(shape_d)
    for k in range(shape_w[0]):
        wc[k] = (torch.rand(shape_w[1], generator=g) < keep[k]).float()
        start = 0
        for n in groups:
            wc[k, start] = 1
            start += n
        if dc.numel():
            dc[k] = (torch.rand(shape_d[1], generator=g) < keep[k]).float()
    return wc, dc


@check("aptp", "APTP-routed UNet on the device vs CPU, per-expert images/s vs dense", limit_s=180)
def check_aptp(ctx: Ctx):
    import importlib.util

    import torch

    missing = [m for m in ("diffusers", "transformers", "all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"the diffusion extra is not installed ({', '.join(missing)})")
    from compress import measure
    from compress.pruners.base import build_pruner
    from compress.pruners.diffusion.report import expert_report
    from compress.registry import MODELS
    from compress.tasks.diffusion import Diffusion

    torch.manual_seed(0)
    dense = MODELS.get("unet_small")(**(TINY_UNET if ctx.smoke else {})).eval()
    model = copy.deepcopy(dense)
    task = Diffusion()
    task.check_model(model, "gpu_check")
    pruner = build_pruner({"name": "aptp", "experts": 4, "pretrain_steps": 2, "target_macs_ratio": 0.6})
    pruner.attach(model)
    wc, dc = pruner.expert_gates(model)
    gates = expert_gates(tuple(wc.shape), tuple(dc.shape), [grp.n for grp in pruner.structure.groups],
                         [1.0, 0.8, 0.6, 0.4])
    pruner.expert_gates = lambda m: gates  # four experts of decreasing width/depth, as a trained router gives
    pruner.filter_prompts(model, PROMPTS)
    edits = pruner.finalize(model)
    model.eval()
    require(type(model.unet).__name__ == "RoutedUNets", f"model.unet is {type(model.unet).__name__}")

    cond, pooled = model.encode_prompts(PROMPTS)
    route = model.route(pooled)
    x, t, _ = task.example(model.latent_shape(), len(PROMPTS), "cpu")
    with torch.inference_mode():
        want = model(x, t, cond, route)
        on_dev = copy.deepcopy(model).to(ctx.dev)
        got = on_dev(x.to(ctx.dev), t.to(ctx.dev), cond.to(ctx.dev), on_dev.route(pooled.to(ctx.dev)))
    err = rel_err(got, want)
    require(err <= 2e-2, f"routed UNet on {ctx.dev.type} vs CPU: relative error {err:.2e}")
    del on_dev

    def example(bs):
        return task.example(model.latent_shape(), bs, ctx.device)

    dense.to(ctx.dev)
    dense_gmacs = measure.count_gmacs(dense, example(1))
    dense_speed = {str(bs): measure.throughput(dense, example(bs), warmup=2, repeats=ctx.repeats)
                   for bs in ctx.batch_sizes}
    report = expert_report(model.to(ctx.dev), example, ctx.batch_sizes, ctx.device, ctx.repeats, dense_gmacs, edits)
    experts = []
    for row in report["experts"]:
        experts.append({"expert": row["expert"], "gmacs_ratio": row["gmacs"] / dense_gmacs, "params": row["params"],
                        "speedup": {bs: row["speed"][bs]["images_per_s"] / dense_speed[bs]["images_per_s"]
                                    for bs in dense_speed},
                        "images_per_s": {bs: s["images_per_s"] for bs, s in row["speed"].items()}})
    result = {"model": "unet_small" + (" (tests/diffusion_zoo TINY)" if ctx.smoke else " (default, 32 px)"),
              "routed_rel_err_vs_cpu": err, "routes": route.tolist(), "dense_gmacs": dense_gmacs,
              "dense_images_per_s": {bs: s["images_per_s"] for bs, s in dense_speed.items()}, "experts": experts,
              "avg_gmacs_ratio": report.get("avg_gmacs_ratio"), "table": report["table"]}
    bs = str(ctx.batch_sizes[-1])
    per = ", ".join(f"e{e['expert']} {e['gmacs_ratio']:.2f}/{e['speedup'][bs]:.2f}x" for e in experts)
    return f"routed vs CPU rel err {err:.1e}; GMACs ratio/speed-up @{bs}: {per}", result


# ---- 2. DeepSpeed ZeRO-2 / ZeRO-3 on one GPU (run last: the slowest, the likeliest to hang) -------------


def deepspeed_fit(ctx: Ctx, strategy: str):
    import importlib.util

    import torch
    from safetensors.torch import load_file

    import compress

    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("deepspeed is not importable (pip install -e '.[deepspeed]')")
    if ctx.smoke and not ctx.cuda:
        raise Skip("smoke mode on CPU: DeepSpeed builds its CPU communication op for minutes on first use "
                   "(tests/test_deepspeed.py covers ZeRO on CPU)")
    recipe = {
        "name": f"gpu_check_{strategy}", "seed": 0,
        "model": {"name": "quickstart_vit", "kwargs": {"depth": 3}},
        "data": {"kind": "quickstart", "batch_size": 32, "num_workers": 0, "params": {"num_train": 256, "num_val": 64}},
        "stages": [
            {"kind": "prune", "max_steps": 4,
             "pruner": {"name": "heads", "target_gmacs_ratio": 0.7, "steps": 2, "prune_every": 1, "importance": "taylor"}},
            {"kind": "prune", "max_steps": 4, "pruner": {"name": "issp", "sparsity": 0.5}},
            {"kind": "distill", "max_steps": 4, "distill": {"teacher": "dense"}},
        ],
        "trainer": recipe_trainer(ctx, strategy=strategy, checkpoint_every_n_steps=2),  # sharded checkpoint folders
        "evaluate": {"batch_size": 32, "bench": False},
    }
    work = ctx.work / strategy
    path = write_yaml(work / "recipe.yaml", recipe)
    env = dict(os.environ, HF_HUB_OFFLINE="1", COMPRESS_PROGRESS_SECONDS="3600")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "COMPRESS_RUN_DIR", "MASTER_PORT"):
        env.pop(key, None)
    t0 = time.perf_counter()
    # its own process: DeepSpeed's process group and engine state stay out of the other checks
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "fit", "--recipe", str(path), "--out", "runs"],
                          cwd=work, env=env, capture_output=True, text=True,
                          timeout=170 if ctx.cuda else 900)  # DeepSpeed on CPU first builds an op
    wall = time.perf_counter() - t0
    (work / "stdout.txt").write_text(proc.stdout)
    (work / "stderr.txt").write_text(proc.stderr)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()]
        last = (errors or lines or ["no stderr"])[-1]
        raise CheckFailed(f"compress fit exited {proc.returncode}: {last} (log: {work / 'stderr.txt'})",
                          "\n".join(lines[-60:]))
    run = only_run(work / "runs")
    require("initializing deepspeed distributed" in proc.stdout + proc.stderr, "the run never initialised DeepSpeed")
    shards = sorted(p.name for p in (run / "stages").glob("*/checkpoints/last.ckpt/checkpoint/*_model_states.pt"))
    require(len(shards) == 3, f"expected a DeepSpeed checkpoint folder per stage, found model shards {shards}")
    if strategy.endswith("3"):
        require(all(n.startswith("zero_pp_rank_") for n in shards), f"ZeRO-3 wrote unpartitioned shards {shards}")
    exported = compress.load(run / "export").to(ctx.dev).eval()
    consolidated = compress.load(run / "export")
    last = sorted((run / "stages").glob("*-distill"))[-1] / "model.safetensors"
    consolidated.load_state_dict(load_file(str(last)), strict=True)  # the fp32 weights the last stage ended with
    consolidated = consolidated.to(ctx.dev).eval()
    weight_diff = max(float((a.float() - b.float()).abs().max()) for a, b in
                      zip(exported.state_dict().values(), consolidated.state_dict().values()))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(ctx.dev)
    with torch.inference_mode():
        a, b = exported(x), consolidated(x)
    diff = float((a - b).abs().max())
    require(torch.equal(a, b), f"export's logits differ from the consolidated model's by {diff:.3g}")
    heads = [blk.attn.num_heads for blk in exported.blocks]
    zeros = sum(int((blk.mlp.fc1.weight == 0).sum()) for blk in exported.blocks)
    total = sum(blk.mlp.fc1.weight.numel() for blk in exported.blocks)
    require(heads != [3, 3, 3], f"no head was pruned: {heads}")
    result = {"strategy": strategy, "wall_s": wall, "checkpoint_shards": shards, "heads_per_block": heads, "fc1_zero_fraction": zeros / total,
              "max_logit_diff": diff, "max_weight_diff": weight_diff, "run": str(run)}
    return (f"fit + checkpoints + export {wall:.0f} s; export == consolidated logits; heads {heads}, fc1 zeros "
            f"{zeros / total:.2f}"), result


@check("deepspeed_zero2", "DeepSpeed ZeRO-2 fit + export + compress.load (1 GPU)", limit_s=150)
def check_zero2(ctx: Ctx):
    return deepspeed_fit(ctx, "deepspeed_stage_2")


@check("deepspeed_zero3", "DeepSpeed ZeRO-3 fit + export + compress.load (1 GPU)", limit_s=150)
def check_zero3(ctx: Ctx):
    return deepspeed_fit(ctx, "deepspeed_stage_3")


# ---- running --------------------------------------------------------------------------------------------------


def environment(ctx: Ctx) -> Dict[str, Any]:
    import importlib.metadata as md

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": ctx.device, "smoke": ctx.smoke, "threads": torch.get_num_threads(), "host": platform.node()}
    for pkg in ("lightning", "timm", "deepspeed", "mamba-ssm", "causal-conv1d", "diffusers"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    if ctx.cuda:
        env["gpu"] = torch.cuda.get_device_name(ctx.dev)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(ctx.dev)))
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(ctx.dev).total_memory / 2**30, 1)
    return env


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``CheckTimeout`` in the main thread after ``seconds`` (between Python bytecodes)."""
    def fire(signum, frame):
        raise CheckTimeout(f"ran past its {seconds:.0f} s limit")

    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}" if text else type(e).__name__


def cuda_still_works(ctx: Ctx) -> Optional[str]:
    """None when CUDA still answers after a failed check, else why not (a sticky error ends the CUDA checks)."""
    if not ctx.cuda:
        return None
    import torch

    try:
        torch.cuda.synchronize(ctx.dev)
        torch.ones(1, device=ctx.dev).sum().item()
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 - whatever CUDA raises, the context is gone
        return one_line(e)
    return None


def free_memory(ctx: Ctx) -> None:
    """What one check allocated goes before the next one (its models are local to it)."""
    import gc

    gc.collect()
    if ctx.cuda and not ctx.cuda_broken:
        import torch

        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - cuda_still_works already had its say
            pass


def run_check(ctx: Ctx, spec: Dict[str, Any], deadline: float) -> Dict[str, Any]:
    record = {"name": spec["name"], "title": spec["title"], "status": "ok", "seconds": 0.0, "summary": "",
              "result": {}}
    left = deadline - time.monotonic()
    if ctx.cuda_broken:
        record.update(status="skipped", summary=f"the CUDA context broke earlier ({ctx.cuda_broken}); rerun with "
                                                f"--only {spec['name']}")
        return record
    if left < 5:
        record.update(status="skipped", summary="the run's time budget (--budget-s) was spent")
        return record
    print(f"\n=== {spec['name']}: {spec['title']}", flush=True)
    t0 = time.perf_counter()
    try:
        limit = min(spec["limit_s"] * (3 if not ctx.cuda else 1), left)
        with time_limit(limit):
            summary, result = spec["fn"](ctx)
        record.update(summary=summary, result=result)
    except Skip as e:
        record.update(status="skipped", summary=str(e))
    except BaseException as e:  # noqa: BLE001 - a check's failure is a result; Ctrl-C still stops the run
        if isinstance(e, KeyboardInterrupt):
            raise
        record.update(status="failed", summary=one_line(e), traceback=traceback.format_exc()[-4000:])
        if getattr(e, "detail", ""):
            record["detail"] = e.detail
        ctx.cuda_broken = cuda_still_works(ctx)
    finally:
        free_memory(ctx)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"=== {spec['name']}: {record['status']} ({record['seconds']:.1f} s): {record['summary']}", flush=True)
    return record


def markdown(report: Dict[str, Any]) -> str:
    env = report["environment"]
    where = env.get("gpu") or f"CPU ({env['threads']} threads)"
    lines = [f"# compress GPU check: {where}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), lightning {env['lightning']}, deepspeed {env['deepspeed']}, "
             f"mamba-ssm {env['mamba-ssm']}, causal-conv1d {env['causal-conv1d']}; "
             f"{'smoke mode, ' if env['smoke'] else ''}{report['seconds']:.0f} s in all "
             f"(`python tools/gpu_check.py {' '.join(report['argv'])}`)", "",
             "| check | status | s | result |", "|---|---|---|---|"]
    for r in report["checks"]:
        summary = r["summary"].replace("|", "\\|")
        lines.append(f"| {r['name']}: {r['title']} | {r['status']} | {r['seconds']:.1f} | {summary} |")
    counts = {s: sum(r["status"] == s for r in report["checks"]) for s in ("ok", "failed", "skipped")}
    lines += ["", f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped"]
    aptp = next((r for r in report["checks"] if r["name"] == "aptp" and r["status"] == "ok"), None)
    if aptp:
        lines += ["", "APTP experts (`compress.pruners.diffusion.report.expert_table`):", "", aptp["result"]["table"]]
    return "\n".join(lines) + "\n"


def write_report(report: Dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default; needs a GPU) or cpu (with --smoke: the CPU paths)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and 1-2 steps per check (for CPU tests)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="prefix of the .json and .md written")
    p.add_argument("--only", default=None, help="comma-separated check names (default: all); --list shows them")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting checks after this many seconds")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 12; smoke 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (CPU mode; default: COMPRESS_THREADS or "
                                                             "OMP_NUM_THREADS or the CPUs this process may use)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder of runs and logs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list:
        for spec in CHECKS:
            print(f"{spec['name']:28s} {spec['title']}")
        return 0
    names = [c["name"] for c in CHECKS]
    chosen = names if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        print(f"gpu_check: unknown check(s) {', '.join(unknown)}; known: {', '.join(names)}", file=sys.stderr)
        return 2
    import compress  # noqa: F401  (the torchvision guard, before timm / Lightning)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False); run on the GPU machine, or pass "
              "--device cpu --smoke for the CPU paths", file=sys.stderr)
        return 2
    if args.device not in ("cpu",) and not args.device.startswith("cuda"):
        print(f"gpu_check: --device {args.device!r}: use cuda, cuda:N or cpu", file=sys.stderr)
        return 2
    if args.device == "cpu":
        from compress import measure

        threads = args.threads or int(os.environ.get("COMPRESS_THREADS", 0) or os.environ.get("OMP_NUM_THREADS", 0) or 0)
        measure.pin_threads(threads or None)  # dense and pruned timings share one fixed thread count
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="compress-gpu-check-"))
    ctx = Ctx(args.device, args.smoke, work, args.repeats)
    if ctx.cuda:
        torch.cuda.set_device(ctx.dev)
    report = {"argv": argv, "environment": environment(ctx), "checks": [], "seconds": 0.0, "work": str(work)}
    deadline = started + args.budget_s
    try:
        for spec in CHECKS:
            if spec["name"] not in chosen:
                continue
            report["checks"].append(run_check(ctx, spec, deadline))
            report["seconds"] = time.monotonic() - started
            write_report(report, args.out)  # after every check: a run killed from outside keeps what it had
    finally:
        failed = any(r["status"] == "failed" for r in report["checks"])
        if args.keep_work or failed:  # the runs' logs are what explains a failure
            print(f"scratch folder kept: {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = time.monotonic() - started
    write_report(report, args.out)
    print()
    print(markdown(report))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 1 if any(r["status"] == "failed" for r in report["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
