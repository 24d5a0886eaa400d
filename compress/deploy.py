"""Deployable files from a (pruned) model: ONNX for onnxruntime / TensorRT, and torch.export programs (``.pt2``).

Both come from one ``torch.export`` trace of the model ``compress.load`` rebuilds, token pruners included: a
fixed schedule is a fixed sequence of scores, top-k and gathers, so the traced graph drops the same tokens
(and runs as fast) as the eager model; heads, widths and channels are already physically smaller. The batch
dimension stays dynamic. What cannot be traced is refused with one line saying why (``Pruner.trace_problem``):
a data-dependent token count (DToP's exits) cannot be a static graph, so such a model is exported only on
request with its token pruner detached (``dense_tokens``), which runs every token. Each file is checked
against the eager model on a batch of another size before it is kept (``check``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from compress import files
from compress.errors import CompressError

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
TOLERANCE = 1e-4  # max |deployed - eager| relative to max |eager| accepted by ``check`` (fp32)
log = logging.getLogger("compress")


_PLAIN_OPS: List[Callable[[], Any]] = []  # context managers under which custom ops trace as standard ops


def register_plain_ops(context: Callable[[], Any]) -> Callable[[], Any]:
    """A model's custom op registers here how to trace it as standard ops (``selective_scan.as_plain_ops``):
    ONNX has no translation for a custom op, so ONNX traces run inside every registered context."""
    _PLAIN_OPS.append(context)
    return context


def _as_tuple(example: Any) -> Tuple[torch.Tensor, ...]:
    return example if isinstance(example, tuple) else (example,)


def trace_problems(model: nn.Module) -> List[Tuple[Any, str]]:
    """(pruner, why) for each attached pruner whose model cannot be traced to a static graph."""
    out = []
    for pruner in getattr(model, "_compress_pruners", []) or []:
        why = pruner.trace_problem()
        if why:
            out.append((pruner, why))
    return out


def prepare(model: nn.Module, dense_tokens: bool = False) -> nn.Module:
    """``model`` ready to trace: refuse (or, with ``dense_tokens``, detach) the pruners that cannot be traced."""
    problems = trace_problems(model)
    if problems and not dense_tokens:
        pruner, why = problems[0]
        raise CompressError(f"{pruner.name} cannot be exported to a static graph: {why}; pass --dense-tokens to "
                            f"export the same weights running every token (no {pruner.name} speed-up)")
    for pruner, why in problems:
        pruner.detach(model)
        model._compress_pruners = [p for p in model._compress_pruners if p is not pruner]
        log.warning("export: %s detached (%s): the exported graph runs every token", pruner.name, why)
    return model.eval()


def trace(model: nn.Module, example: Any, dynamic_batch: bool = True, plain_ops: bool = False) -> torch.export.ExportedProgram:
    """One ``torch.export`` trace of ``model(*example)``, batch dimension dynamic (every input's first axis);
    with ``plain_ops`` custom ops trace as the standard ops they are made of (see ``register_plain_ops``)."""
    args = _as_tuple(example)
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        shapes = tuple({0: batch} for _ in args)
    try:
        with torch.no_grad(), _quiet(), contextlib.ExitStack() as stack:
            for context in (_PLAIN_OPS if plain_ops else []):
                stack.enter_context(context())
            return torch.export.export(model.eval(), args, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # torch's messages run to pages; the first line says what went wrong
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CompressError(f"torch.export could not trace {type(model).__name__}: {type(e).__name__}: {first}") from e


@contextlib.contextmanager
def _quiet():
    """Silence torch's own deprecation warnings from inside its exporters (not actionable by our users)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def write(program: torch.export.ExportedProgram, fmt: str, out: Union[str, Path]) -> Path:
    """Write ``program`` as ``fmt`` (onnx | pt2) to ``out``, atomically."""
    out = Path(out)
    if fmt == "pt2":
        buffer = io.BytesIO()  # torch.export.save wants a name ending in .pt2 or a buffer, not our temporary name
        torch.export.save(program, buffer)
        with files.atomic_path(out) as tmp:
            tmp.write_bytes(buffer.getvalue())
        return out
    if fmt != "onnx":
        raise CompressError(f"--format: unknown format {fmt!r} (known: compress, {', '.join(FORMATS)})")
    _need_onnx()
    try:
        with _quiet():
            onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    except Exception as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        missing = _missing_onnx_ops(program)
        why = f"no ONNX translation for {', '.join(missing)}" if missing else f"{type(e).__name__}: {first}"
        raise CompressError(f"cannot convert to ONNX: {why}") from e
    files.write_with(out, lambda tmp: onnx_program.save(tmp))
    return out


def _missing_onnx_ops(program: torch.export.ExportedProgram) -> List[str]:
    """The custom (non-aten) ops of ``program``, which the ONNX exporter cannot translate by itself."""
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"
           and getattr(n.target, "namespace", "aten") not in ("aten", "prims", "_operator", "builtins")}
    return sorted(ops)


def _need_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise CompressError(f"ONNX export needs {' and '.join(missing)}: pip install 'compress-vision[onnx]'")


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by onnxruntime behind ``nn.Module``'s call, so the benchmarks time it like a model."""

    def __init__(self, path: Union[str, Path], threads: Optional[int] = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise CompressError("running ONNX needs onnxruntime: pip install 'compress-vision[onnx]'") from None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: x.detach().cpu().numpy() for name, x in zip(self.input_names, inputs)}
        return torch.from_numpy(self.session.run(None, feed)[0])


def runner(path: Union[str, Path], fmt: str) -> Callable[..., torch.Tensor]:
    """A callable that runs the deployed file ``path``."""
    if fmt == "onnx":
        return OnnxRuntimeModel(path)
    with _quiet():
        return torch.export.load(str(path)).module()


def check(model: nn.Module, path: Union[str, Path], fmt: str, example_for: Callable[[int], Any],
          batch_size: int) -> Dict[str, Any]:
    """Run the deployed file and the eager model on the same batch of ``batch_size``; the largest difference,
    absolute and relative to the largest output. Raises when it is over ``TOLERANCE``."""
    args = _as_tuple(example_for(batch_size))
    with torch.no_grad():
        want = model(*args)
        got = runner(path, fmt)(*args)
    result = {"batch_size": batch_size, **difference(got, want)}
    if not result["max_rel_diff"] <= TOLERANCE:  # NaN fails too
        raise CompressError(f"the {fmt} file disagrees with the eager model: max |difference| {result['max_abs_diff']:.3g} "
                            f"({result['max_rel_diff']:.2g} of the largest output; tolerance {TOLERANCE:g})")
    return result


def sample_differences(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Each sample's largest |got - want| (dim 0 = samples), on ``difference``'s relative scale."""
    return (got.float() - want.float()).flatten(1).abs().amax(1) / _scale(want)


def _scale(want: torch.Tensor) -> float:
    return float(want.abs().max()) or 1.0


def difference(got: torch.Tensor, want: torch.Tensor) -> Dict[str, float]:
    """The largest |got - want|, absolute and relative to the largest |want|, beside ``TOLERANCE``: how a deployed
    or compiled model is held to the eager one."""
    diff = float((got.float() - want.float()).abs().max())
    return {"max_abs_diff": diff, "max_rel_diff": diff / _scale(want), "tolerance": TOLERANCE}


def export_model(model: nn.Module, fmt: str, out: Union[str, Path], example_for: Callable[[int], Any],
                 dynamic_batch: bool = True, dense_tokens: bool = False) -> Dict[str, Any]:
    """Trace, write and check ``model`` as ``fmt`` at ``out``; ``example_for(batch_size)`` makes its inputs.

    Traced at batch 2 and checked at batch 3 (with ``dynamic_batch``), so the file works at other batch
    sizes than the one it was traced at. Nothing is left at ``out`` when anything fails."""
    out = Path(out)
    model = prepare(model, dense_tokens)
    program = trace(model, example_for(2), dynamic_batch, plain_ops=fmt == "onnx")
    write(program, fmt, out)
    try:
        result = check(model, out, fmt, example_for, 3 if dynamic_batch else 2)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return {"file": str(out), "format": fmt, "dynamic_batch": dynamic_batch, "check": result}
