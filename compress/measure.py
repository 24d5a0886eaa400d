"""Measuring: executed GMACs (torch.utils.flop_counter), parameters, throughput, latency, memory.

FlopCounterMode counts FLOPs = 2 x MACs on the forward that actually runs, so dropped tokens count.
The CPU SDPA kernel has no flop formula in torch, so fused attention would be under-counted; we
register torch's own SDPA formula for it.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Dict, Iterable, Optional, Sequence

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


def count_gmacs(model: nn.Module, example: torch.Tensor) -> float:
    """Executed GMACs per image of ``model(example)`` (eval mode, no grad)."""
    _register_cpu_sdpa_formula()
    was_training = model.training
    model.eval()
    counter = flop_counter.FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(example)
    model.train(was_training)
    return counter.get_total_flops() / 2 / example.shape[0] / 1e9


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero_params(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model: nn.Module, example: torch.Tensor, warmup: int = 3, repeats: int = 10) -> list:
    """Seconds per forward of ``example``, one entry per repeat (after warm-up)."""
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            _sync(example.device)
            t0 = time.perf_counter()
            model(example)
            _sync(example.device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def throughput(model: nn.Module, example: torch.Tensor, warmup: int = 3, repeats: int = 10) -> Dict[str, float]:
    """Median images/s and median latency (ms per batch) of ``model`` on ``example``."""
    med = statistics.median(time_forward(model, example, warmup, repeats))
    return {"images_per_s": example.shape[0] / med, "latency_ms": med * 1e3}


def peak_memory_mb(model: nn.Module, example: torch.Tensor) -> Optional[float]:
    """Peak CUDA memory of one forward in MiB; None on CPU (no reliable allocator statistic)."""
    if example.device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(example.device)
    with torch.inference_mode():
        model(example)
    return torch.cuda.max_memory_allocated(example.device) / 2**20


def pin_threads(threads: Optional[int] = None) -> int:
    """Fix the CPU thread count so dense and pruned timings are comparable."""
    n = threads or int(os.environ.get("COMPRESS_THREADS", 0)) or torch.get_num_threads()
    torch.set_num_threads(n)
    return n


def profile(
    models: Dict[str, nn.Module],
    input_size: Sequence[int],
    batch_sizes: Iterable[int] = (1, 32),
    device: str = "cpu",
    warmup: int = 3,
    repeats: int = 10,
) -> Dict[str, Dict]:
    """GMACs, params and speed for several models in one process, interleaving the timings so
    that drift in machine speed hits all of them alike."""
    dev = torch.device(device)
    pin_threads()
    out: Dict[str, Dict] = {}
    for name, model in models.items():
        model.to(dev).eval()
        out[name] = {
            "gmacs": count_gmacs(model, torch.randn(1, *input_size, device=dev)),
            "params": count_params(model),
            "speed": {},
        }
    for bs in batch_sizes:
        x = torch.randn(bs, *input_size, device=dev)
        runs: Dict[str, list] = {name: [] for name in models}
        for _ in range(3):  # interleave dense / pruned repeats
            for name, model in models.items():
                runs[name] += time_forward(model, x, warmup, max(1, repeats // 3))
        for name in models:
            med = statistics.median(runs[name])
            out[name]["speed"][str(bs)] = {
                "images_per_s": bs / med,
                "latency_ms": med * 1e3,
                "peak_memory_mb": peak_memory_mb(models[name], x),
            }
    return out
