"""``torch.compile`` of dense and pruned models: the runner ``compress bench --compile`` times beside eager, the
check that it computes what eager computes, and where dynamo splits the graph.

Token pruners keep a fixed token count per block, so a compiled pruned ViT is one graph per batch size
(``dynamic=False``: static shapes give the best kernels; each batch size compiles once). The batch-1 eager fast
paths of ``compress.tokens`` are skipped under compilation, so the compiled graph never depends on them.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from compress.errors import CompressError

from compress.deploy import TOLERANCE, difference, sample_differences  # max |compiled - eager| relative to the largest eager output


class CompiledModel(nn.Module):
    """``torch.compile(model)`` behind ``nn.Module``'s call; remembers how long each new input shape took to
    compile (its first call). ``eager_model`` is the model itself: its GMACs and parameters are the compiled
    one's."""

    def __init__(self, model: nn.Module, backend: str = "inductor", mode: Optional[str] = None):
        super().__init__()
        import torch._dynamo as dynamo

        known = dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise CompressError(f"unknown torch.compile backend {backend!r} (known: {', '.join(sorted(known))})")
        self.eager_model = model
        self.backend = backend
        self.compiled = torch.compile(model, backend=backend, mode=mode, dynamic=False)
        self.compile_seconds: Dict[str, float] = {}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = _shape_key(inputs)
        if key in self.compile_seconds:
            return self.compiled(*inputs)
        t0 = time.perf_counter()
        try:
            out = self.compiled(*inputs)
        except Exception as e:  # inductor needs a C++ compiler on the CPU; say what failed in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CompressError(f"torch.compile (backend {self.backend!r}) failed: {first[:300]}") from e
        self.compile_seconds[key] = time.perf_counter() - t0
        return out


def graph_breaks(model: nn.Module, *inputs: torch.Tensor) -> Dict[str, Any]:
    """How dynamo splits ``model``'s forward on ``inputs``: graphs, breaks and their distinct reasons with the
    first place in compress or the model's code where each happened (no compilation: tracing only)."""
    import torch._dynamo as dynamo

    with torch.no_grad():
        info = dynamo.explain(model)(*inputs)
    reasons: Dict[str, str] = {}
    for brk in info.break_reasons:
        reason = " ".join(str(brk.reason).split())[:200]
        frame = next((f for f in reversed(brk.user_stack or []) if "site-packages/torch" not in f.filename), None)
        reasons.setdefault(reason, f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
                           if frame is not None else "?")
    return {"graphs": info.graph_count, "breaks": info.graph_break_count,
            "reasons": [{"reason": r, "at": at} for r, at in reasons.items()]}


def check(compiled: CompiledModel, example_for: Callable[[int], Any], batch_size: int) -> Dict[str, Any]:
    """Compiled vs eager on one batch: the largest difference, absolute and relative to the largest output, and
    the compile time of that shape. Raises when it is over ``TOLERANCE``, saying how many samples differ.

    The batch is drawn from a fixed seed, so a failure repeats. Token pruners make discrete, data-dependent
    choices (which tokens to merge or drop); where two candidates score within rounding of each other, the
    compiled kernels' different summation order can pick the other one for that sample: a few samples far off
    while the rest agree to ~1e-6 is that, not a wrong kernel."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        args = example_for(batch_size)
    args = args if isinstance(args, tuple) else (args,)
    with torch.inference_mode():
        want = compiled.eager_model(*args)
        got = compiled(*args)
    result = {"batch_size": batch_size, **difference(got, want), "compile_seconds": compiled.compile_seconds.get(_shape_key(args))}
    if not result["max_rel_diff"] <= TOLERANCE:
        per_sample = sample_differences(got, want)
        off = int((per_sample > TOLERANCE).sum())
        raise CompressError(f"the compiled model differs from eager by {result['max_abs_diff']:.3g} (relative "
                            f"{result['max_rel_diff']:.3g}, tolerance {TOLERANCE:g}) at batch {batch_size}, in {off} of "
                            f"{len(per_sample)} samples" + (" (a discrete token choice flipped on near-tied scores in "
                                                           "those: see compress.compiled.check)" if off < len(per_sample) else ""))
    return result


def _shape_key(inputs) -> str:
    return "x".join(str(d) for d in inputs[0].shape)
