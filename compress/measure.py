"""Measuring: executed GMACs (torch.utils.flop_counter), parameters, throughput, latency, memory.

FlopCounterMode counts FLOPs = 2 x MACs on the forward that actually runs, so dropped tokens count.
The CPU SDPA kernel has no flop formula in torch, so fused attention would be under-counted; we
register torch's own SDPA formula for it.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils import flop_counter

_REGISTERED = False


def _register_cpu_sdpa_formula() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op.default in flop_counter.flop_registry or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if bwd is not None:

        @flop_counter.register_flop_formula(bwd)
        def _cpu_sdpa_bwd_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def run(model: nn.Module, example: Any):
    """``model(example)``, or ``model(*example)`` for a tuple of positional inputs."""
    return model(*example) if isinstance(example, tuple) else model(example)


def batch_size(example: Any) -> int:
    return (example[0] if isinstance(example, tuple) else example).shape[0]


def count_gmacs(model: nn.Module, example: Any) -> float:
    """Executed GMACs per image of ``model(example)`` (eval mode, no grad)."""
    _register_cpu_sdpa_formula()
    was_training = model.training
    model.eval()
    counter = flop_counter.FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        run(model, example)
    model.train(was_training)
    return counter.get_total_flops() / 2 / batch_size(example) / 1e9


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero_params(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(example: Any) -> torch.device:
    return (example[0] if isinstance(example, tuple) else example).device


def time_forward(model: nn.Module, example: Any, warmup: int = 3, repeats: int = 10) -> list:
    """Seconds per forward of ``example``, one entry per repeat (after warm-up)."""
    model.eval()
    times = []
    dev = _device_of(example)
    with torch.inference_mode():
        for i in range(warmup + repeats):
            _sync(dev)
            t0 = time.perf_counter()
            run(model, example)
            _sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def throughput(model: nn.Module, example: Any, warmup: int = 3, repeats: int = 10) -> Dict[str, float]:
    """Median images/s and median latency (ms per batch) of ``model`` on ``example``."""
    med = statistics.median(time_forward(model, example, warmup, repeats))
    return {"images_per_s": batch_size(example) / med, "latency_ms": med * 1e3}


def peak_memory_mb(model: nn.Module, example: Any) -> Optional[float]:
    """Peak CUDA memory of one forward in MiB; None on CPU (no reliable allocator statistic)."""
    dev = _device_of(example)
    if dev.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode():
        run(model, example)
    return torch.cuda.max_memory_allocated(dev) / 2**20


def pin_threads(threads: Optional[int] = None) -> int:
    """Fix the CPU thread count: ``threads``, else ``COMPRESS_THREADS``, else torch's default capped at the
    CPUs this process may run on (a container's or scheduler's CPU set; torch counts the whole machine's
    cores, and more threads than CPUs makes OpenMP spin-wait). Dense and pruned timings share it."""
    n = threads or int(os.environ.get("COMPRESS_THREADS", 0))
    if not n:
        allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, min(torch.get_num_threads(), allowed))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def busy_cores_elsewhere(seconds: float = 0.5) -> Optional[float]:
    """CPU cores other processes keep busy, sampled from ``/proc/stat`` while this one sleeps (None where
    there is no ``/proc``). Timings taken beside a busy neighbour are not worth comparing."""
    def sample():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals), vals[3] + (vals[4] if len(vals) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 == total0:
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


def profile(
    models: Dict[str, nn.Module],
    example: Union[Sequence[int], Callable[[int], Any]],
    batch_sizes: Iterable[int] = (1, 32),
    device: str = "cpu",
    warmup: int = 3,
    repeats: int = 10,
    rounds: int = 3,
) -> Dict[str, Dict]:
    """GMACs, params and speed for several models in one process, interleaving the timings so
    that drift in machine speed hits all of them alike.

    ``example`` is an input shape (C, H, W) or a function ``batch_size -> inputs`` (a task's
    ``example``). Each model is timed in ``rounds`` interleaved rounds; the per-round medians are kept
    (``rounds_images_per_s``) so that reports can show how much a ratio moved between rounds."""
    from compress.progress import track

    dev = torch.device(device)
    pin_threads()
    make = example if callable(example) else (lambda bs: torch.randn(bs, *example, device=dev))
    out: Dict[str, Dict] = {}
    for name, model in models.items():
        model.to(dev).eval()
        out[name] = {"gmacs": count_gmacs(model, make(1)), "params": count_params(model), "speed": {}}
    steps = [(bs, r) for bs in batch_sizes for r in range(rounds)]
    per_round = max(1, repeats // rounds)
    runs: Dict[str, Dict[int, list]] = {name: {} for name in models}
    inputs: Dict[int, Any] = {}
    for bs, _ in track(steps, "benchmark", unit="rounds"):
        x = inputs.setdefault(bs, make(bs))
        for name, model in models.items():  # interleave dense / pruned repeats
            runs[name].setdefault(bs, []).append(time_forward(model, x, warmup, per_round))
    for name in models:
        for bs in batch_sizes:
            times = [t for rnd in runs[name][bs] for t in rnd]
            med = statistics.median(times)
            out[name]["speed"][str(bs)] = {
                "images_per_s": bs / med,
                "latency_ms": med * 1e3,
                "peak_memory_mb": peak_memory_mb(models[name], inputs[bs]),
                "rounds_images_per_s": [bs / statistics.median(rnd) for rnd in runs[name][bs]],
            }
    return out
