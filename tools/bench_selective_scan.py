"""The CPU selective scan against mambapy's parallel scan and against the previous implementation, at Vim-T's shapes,
and Vim-T dense images/s next to DeiT-Tiny's, all in one run.

    python tools/bench_selective_scan.py [--rounds 3] [--threads 1] [--before b6eeb47]

Scan: d_inner 384, d_state 16, L 197 (Vim-T's 196 patches + class), batch 8, fp32; inputs as a Vim layer makes them
(delta through softplus with Mamba's dt init, A = -(1..16), D, z gate). Forward (no grad) and forward+backward
(gradients of all eight inputs) of:

- ``compress``: this tree's op (``selective_scan``: the chunked time-major scan and its written-out backward);
- ``mambapy pscan``: mambapy 1.2.0's Blelloch scan (``mambapy.pscan.pscan``) with the same math around it, as
  ``mambapy.mamba.MambaBlock.selective_scan`` writes it (exp(delta*A) and delta*B*x as (B, L, D, N) tensors), autograd
  for the backward (a bench-only dependency: ``pip install -e .[bench]``);
- ``before``: the scan of commit ``--before`` (64-step (T, B, D, N) chunks), run in a subprocess on a ``git archive``
  of that commit (its op cannot be registered next to this one's).

Models (batch 8, 224 px, random weights, eval, no grad): Vim-T dense (``vim_tiny_patch16_224``) with this tree, with
``torch.set_flush_denormal(True)``, and with the ``--before`` tree; DeiT-Tiny (timm ``deit_tiny_patch16_224``).
Rounds interleave every implementation; each number is the median over rounds (min and max kept). Threads are pinned
(``--threads``; run it alone on the cores it gets). Writes tools/results/selective_scan_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPE = dict(b=8, d=384, L=197, n=16)


def inputs(dtype="float32", seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    b, d, L, n = SHAPE["b"], SHAPE["d"], SHAPE["L"], SHAPE["n"]
    dt = torch.exp(torch.rand(d, generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    bias = dt + torch.log(-torch.expm1(-dt))  # Mamba's dt init (inverse softplus of log-uniform [1e-3, 0.1])
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    return [r(b, d, L), r(b, d, L) * 0.5, A, r(b, n, L), r(b, n, L), torch.ones(d), r(b, d, L), bias]


def pscan_scan(u, delta, A, B, C, D, z, bias):
    """The same scan through mambapy's pscan, written as mambapy's MambaBlock.selective_scan: (B, L, D, N) tensors."""
    import torch
    import torch.nn.functional as F
    from mambapy.pscan import pscan

    dl = F.softplus(delta + bias[None, :, None]).transpose(1, 2)  # (B, L, D)
    x = u.transpose(1, 2)
    deltaA = torch.exp(dl.unsqueeze(-1) * A)  # (B, L, D, N)
    BX = dl.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * x.unsqueeze(-1)
    hs = pscan(deltaA, BX)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3) + D * x
    return (y * F.silu(z.transpose(1, 2))).transpose(1, 2)


def timed(fn, warmup=1):
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def scan_cases(with_pscan: bool):
    """name -> (forward fn, forward+backward fn)."""
    import torch
    from compress.models.selective_scan import selective_scan

    ins = inputs()
    grad = torch.randn(SHAPE["b"], SHAPE["d"], SHAPE["L"], generator=torch.Generator().manual_seed(1))

    def op(*a):
        return selective_scan(*a[:7], a[7], True)

    cases = {"compress": op}
    if with_pscan:
        cases["mambapy pscan"] = pscan_scan

    def make(f):
        def fwd():
            with torch.no_grad():
                f(*ins)

        def fwd_bwd():
            leaves = [t.detach().clone().requires_grad_() for t in ins]
            f(*leaves).backward(grad)

        return fwd, fwd_bwd

    return {name: make(f) for name, f in cases.items()}, ins


def model_cases(with_deit: bool, flush: bool):
    import torch
    import compress  # noqa: F401
    from compress.registry import MODELS

    torch.manual_seed(0)
    x = torch.randn(8, 3, 224, 224)
    vim = MODELS.get("vim_tiny_patch16_224")().eval()

    def run(m, denormal=False):
        def f():
            torch.set_flush_denormal(denormal)
            try:
                with torch.no_grad():
                    m(x)
            finally:
                torch.set_flush_denormal(False)
        return f

    cases = {"Vim-T dense": run(vim)}
    if flush:
        cases["Vim-T dense, flush denormals"] = run(vim, True)
    if with_deit:
        import timm

        cases["DeiT-Tiny"] = run(timm.create_model("deit_tiny_patch16_224", pretrained=False).eval())
    return cases


def one_round(scans, models) -> dict:
    out = {}
    for name, (fwd, fwd_bwd) in scans.items():
        out[f"scan {name}: forward"] = timed(fwd)
        out[f"scan {name}: forward+backward"] = timed(fwd_bwd)
    for name, f in models.items():
        out[name] = timed(f)
    return out


def child(rounds: int) -> None:
    """One round of the scan and the Vim-T model with whatever ``compress`` is importable (the --before tree)."""
    scans, _ = scan_cases(with_pscan=False)
    models = model_cases(with_deit=False, flush=False)
    print("RESULT " + json.dumps([one_round(scans, models) for _ in range(rounds)]), flush=True)


def before_tree(rev: str, root: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="bench_scan_before_"))
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "compress"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
    return tmp


def run_before(tree: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--threads", str(threads)],
                          cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, check=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return {f"before: {k}": v for k, v in json.loads(line[len("RESULT "):])[0].items()}


def accuracy() -> dict:
    """Max relative error of compress's scan and of the pscan form against the step-by-step reference (fp64)."""
    import torch
    from compress.models.selective_scan import scan_reference, selective_scan

    ins = [t.double() for t in inputs()]
    ref = scan_reference(*ins[:7], ins[7], True)
    f32 = [t.float() for t in ins]
    scale = ref.abs().max()
    out = {"compress fp32": float((selective_scan(*f32[:7], f32[7], True).double() - ref).abs().max() / scale)}
    try:
        out["mambapy pscan fp32"] = float((pscan_scan(*f32).double() - ref).abs().max() / scale)
    except ImportError:
        pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--before", default="b6eeb47", help="commit of the previous scan ('' to skip)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "selective_scan_cpu")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        child(1)
        return 0
    try:
        import mambapy  # noqa: F401
        with_pscan = True
    except ImportError:
        print("[bench] mambapy not installed (pip install mambapy): no pscan rows", flush=True)
        with_pscan = False
    t0 = time.perf_counter()
    scans, _ = scan_cases(with_pscan)
    models = model_cases(with_deit=True, flush=True)
    tree = before_tree(args.before, HERE.parent) if args.before else None
    rounds = []
    for r in range(args.rounds):
        row = one_round(scans, models)
        if tree is not None:
            row.update(run_before(tree, args.threads))
        rounds.append(row)
        print(f"[bench] round {r + 1}: " + ", ".join(f"{k} {v:.3f} s" for k, v in row.items()), flush=True)
    stats = {k: {"median_s": statistics.median(r[k] for r in rounds), "min_s": min(r[k] for r in rounds),
                 "max_s": max(r[k] for r in rounds)} for k in rounds[0]}
    for k, v in stats.items():
        if "scan " not in k:
            v["images_per_s"] = SHAPE["b"] / v["median_s"]
    result = {"shape": SHAPE, "threads": args.threads, "rounds": args.rounds, "before": args.before,
              "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "times": stats, "rel_err_vs_fp64_reference": accuracy(), "raw": rounds,
              "seconds": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(args.out) + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(str(args.out) + ".md").write_text(markdown(result, argv if argv is not None else sys.argv[1:]))
    print(Path(str(args.out) + ".md").read_text())
    return 0


NOTES = """Where a Vim-T batch of 8 goes (torch profiler, one thread, this tree, self time of ~3.0 s): the linear layers
(aten::mm) 0.65 s, the scan's exp2 0.65 s (one per state element: 24 layers x 2 directions x 8 x 197 x 384 x 16 =
465 M, ~1.4 ns each: Sleef's AVX2 exp on this Zen 1 core, compute-bound, the same per element at any chunk size),
the recurrence's fused multiply-adds and the conv's 0.32 s, the decay/input broadcasts 0.31 s, softplus 0.21 s and
silu 0.16 s (per-channel, ~4-7 ns an element), the Python step loop ~0.3 s, copies 0.12 s, readouts 0.11 s. Before
this change the scan itself was 4.0 of 5.2 s: 64-step (T, B, D, N) chunks of 12 MB per tensor streamed from memory
(every elementwise pass ~2 ns an element instead of ~0.2 in cache), the outer products and readouts were batched
matmuls with tiny inner sizes (1.3 s), and three transposed copies per direction moved single elements.
Flushing denormals changes nothing here (random-init Vim: no subnormal states; the gap between the two rows is noise).
Why not 3x: 3x the before speed is ~1.65 s a batch, while the matmuls (as many MACs as DeiT-Tiny's) and the exps
alone take 1.3 s; softplus and silu take 0.37 s more. mambapy's pscan materialises (B, L, D, N) tensors and does
~2 log2(L) passes over them: ~12x slower than the chunked scan here forward, ~6.5x forward+backward."""


def markdown(result: dict, argv) -> str:
    t = result["times"]
    s = result["shape"]

    def row(name, ref=None):
        v = t[name]
        spread = f"{v['min_s'] * 1e3:.0f}-{v['max_s'] * 1e3:.0f}"
        rel = f"{t[ref]['median_s'] / v['median_s']:.2f}x vs {ref}" if ref and ref in t else ""
        ips = f"{v['images_per_s']:.2f}" if "images_per_s" in v else ""
        return f"| {name} | {v['median_s'] * 1e3:.1f} | {spread} | {ips} | {rel} |"

    lines = [f"# Selective scan on CPU ({result['threads']} thread(s), {result['cpu_capability']}, torch "
             f"{result['torch']})", "",
             f"Scan at Vim-T's shapes: batch {s['b']}, d_inner {s['d']}, L {s['L']}, d_state {s['n']}, fp32. "
             f"Median of {result['rounds']} interleaved rounds (min-max in ms). 'before' = commit {result['before']} "
             "(same script, its tree in a subprocess, same round). Speed-up column: against the row named in it.", "",
             "| | median ms | min-max ms | images/s | speed-up |", "|---|---|---|---|---|"]
    for kind in ("forward", "forward+backward"):
        base = f"before: scan compress: {kind}"
        for name in (f"scan compress: {kind}", f"scan mambapy pscan: {kind}", base):
            if name in t:
                lines.append(row(name, base if name != base else None))
    for name, ref in (("Vim-T dense", "before: Vim-T dense"), ("Vim-T dense, flush denormals", "before: Vim-T dense"),
                      ("before: Vim-T dense", None), ("DeiT-Tiny", None)):
        if name in t:
            lines.append(row(name, ref))
    if "DeiT-Tiny" in t and "Vim-T dense" in t:
        lines += ["", f"Vim-T dense / DeiT-Tiny time per batch: {t['Vim-T dense']['median_s'] / t['DeiT-Tiny']['median_s']:.2f}"
                  + (f" (before: {t['before: Vim-T dense']['median_s'] / t['DeiT-Tiny']['median_s']:.2f})"
                     if "before: Vim-T dense" in t else "") + "."]
    lines += ["", NOTES]
    errs = ", ".join(f"{k} {v:.1e}" for k, v in result["rel_err_vs_fp64_reference"].items())
    lines += ["", f"Max error against the fp64 step-by-step reference, relative to its max |y|: {errs}.", "",
              f"Regenerate: `python tools/bench_selective_scan.py {' '.join(argv)}` "
              f"({result['seconds'] / 60:.0f} min)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
