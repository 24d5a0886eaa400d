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


def register_cpu_sdpa_formula() -> None:
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
    register_cpu_sdpa_formula()
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


def time_forward(model: nn.Module, example: Any, warmup: int = 3, repeats: int = 10, seconds: float = 0.0) -> list:
    """Seconds per forward of ``example``, one entry per forward after warm-up: at least ``repeats`` of them,
    and as many more as fit in ``seconds``."""
    model.eval()
    times = []
    dev = _device_of(example)
    with torch.inference_mode():
        for _ in range(warmup):
            run(model, example)
        end = time.perf_counter() + seconds
        while len(times) < repeats or time.perf_counter() < end:
            _sync(dev)
            t0 = time.perf_counter()
            run(model, example)
            _sync(dev)
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
    watch = CpuWatch()
    if not watch.ok:
        return None
    time.sleep(seconds)
    return watch.others()


class CpuWatch:
    """CPU cores that other processes used since this was made (``/proc/stat`` minus this process's own CPU
    time, over the wall time): a round of timings during which a neighbour woke up is retaken, since a
    thread pool that shares its cores with another process can run many times slower for that moment."""

    def __init__(self):
        self.ok = True
        self.start = self._sample()

    def _sample(self):
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            self.ok = False
            return None
        busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # all but idle + iowait
        return busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.perf_counter()

    def others(self) -> Optional[float]:
        now = self._sample() if self.ok else None
        if now is None or self.start is None or now[2] <= self.start[2]:
            return None
        return max(0.0, ((now[0] - self.start[0]) - (now[1] - self.start[1])) / (now[2] - self.start[2]))


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks instead of handing them back to the OS after every forward.

    By default large activations are mmap-ed and returned at free, so every forward page-faults its memory
    in again; on the 2-core CPU measured (tools/results/token_pruners_deit_tiny.md) that cost about a quarter
    of a batch-32 DeiT-Tiny forward and four times the index work of a token-pruning layer, which hid the
    pruners' gain. Dense and pruned models are timed with the same setting. Returns whether it applied (not
    glibc: nothing to do)."""
    global _KEPT
    if _KEPT is not None:
        return _KEPT
    _KEPT = False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        _KEPT = bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 1 << 30))
    except (OSError, AttributeError):
        pass
    return _KEPT


_KEPT: Optional[bool] = None


def profile(
    models: Dict[str, nn.Module],
    example: Union[Sequence[int], Callable[[int], Any]],
    batch_sizes: Iterable[int] = (1, 32),
    device: str = "cpu",
    warmup: int = 3,
    repeats: int = 10,
    rounds: int = 5,
    round_seconds: float = 0.0,
    max_others: float = 0.25,
) -> Dict[str, Dict]:
    """GMACs, params and speed for several models in one process: the protocol every benchmark here uses.

    ``example`` is an input shape (C, H, W) (a seeded normal input) or a function ``batch_size -> inputs``
    (a task's ``example``). Each batch size is timed in ``rounds`` interleaved rounds; in a round every model
    runs at least ``repeats // rounds`` forwards and ``round_seconds`` (median kept), the models in an
    order rotated every round, so drift in machine speed and the cache left by the previous model hit them all
    alike. On the CPU, threads are pinned, freed memory is kept (``keep_freed_memory``) and a round during which
    other processes used more than ``max_others`` cores is retaken (at most ``rounds`` retakes per batch size; counted in
    ``dropped_rounds``). Speed-ups are best read as the median of the per-round ratios
    (``rounds_images_per_s``; ``report.compare`` does), with their spread."""
    from compress.progress import track

    dev = torch.device(device)
    pin_threads()
    if dev.type == "cpu":
        keep_freed_memory()
    if callable(example):
        make = example
    else:
        gen = torch.Generator().manual_seed(0)
        make = lambda bs: torch.randn(bs, *example, generator=gen).to(dev)  # noqa: E731
    out: Dict[str, Dict] = {}
    for name, model in models.items():
        model.to(dev).eval()
        costed = getattr(model, "eager_model", model)  # a compiled runner costs what its eager model does
        out[name] = {"gmacs": count_gmacs(costed, make(1)), "params": count_params(costed), "speed": {}}
    names = list(models)
    per_round = max(1, repeats // rounds)
    runs: Dict[str, Dict[int, list]] = {name: {} for name in models}
    inputs: Dict[int, Any] = {}
    dropped = {bs: 0 for bs in batch_sizes}
    for bs in batch_sizes:
        x = inputs.setdefault(bs, make(bs))
        for name in names:  # warm-up outside the rounds: first-call allocations, lazy inits
            time_forward(models[name], x, warmup, 0)
    steps = [(bs, r) for bs in batch_sizes for r in range(rounds)]
    for bs, r in track(steps, "benchmark", unit="rounds"):
        x = inputs[bs]
        while True:
            watch = CpuWatch() if dev.type == "cpu" else None
            order = names[r % len(names):] + names[: r % len(names)]
            row = {name: statistics.median(time_forward(models[name], x, 0, per_round, round_seconds)) for name in order}
            others = watch.others() if watch is not None else None
            if others is None or others <= max_others or dropped[bs] >= rounds:  # at most ``rounds`` retakes in all
                break
            dropped[bs] += 1
        for name in names:
            runs[name].setdefault(bs, []).append(row[name])
    for name in models:
        for bs in batch_sizes:
            med = statistics.median(runs[name][bs])
            out[name]["speed"][str(bs)] = {
                "images_per_s": bs / med,
                "latency_ms": med * 1e3,
                "peak_memory_mb": peak_memory_mb(models[name], inputs[bs]),
                "rounds_images_per_s": [bs / t for t in runs[name][bs]],
                "dropped_rounds": dropped[bs],
            }
    return out


def round_ratios(model: Dict, baseline: Dict) -> Dict[str, list]:
    """Per batch size, ``model``'s images/s over ``baseline``'s in each interleaved round of ``profile``."""
    return {bs: [m / b for m, b in zip(model["speed"][bs]["rounds_images_per_s"], baseline["speed"][bs]["rounds_images_per_s"])]
            for bs in baseline["speed"]}
