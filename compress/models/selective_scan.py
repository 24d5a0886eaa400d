"""Mamba's selective scan as one opaque op: a chunked pure-PyTorch scan on CPU, the mamba-ssm kernel on CUDA.

The recurrence (Gu & Dao 2023, with Mamba's simplified discretisation), per batch b, channel d, state n:

    delta_t = softplus(delta_t + delta_bias)            (if delta_softplus)
    h_t     = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B[b, n, t] * u[b, d, t]
    y_t     = sum_n C[b, n, t] * h_t[n]  (+ D[d] * u_t)  (* silu(z_t))

Shapes follow ``mamba_ssm.selective_scan_fn``: u, delta, z (B, D, L); A (D, N); B, C (B, N, L); D, delta_bias (D,).

Why an op of its own (``torch.library.custom_op``):
- ``torch.utils.flop_counter`` sees it as one node and uses the MAC formula registered below, instead of
  missing the scan (it is no matmul) or counting the kernel's internals;
- its backward recomputes the scan with autograd (activation checkpointing of the scan), so a training step
  keeps no (B, L, D, N) intermediates per layer: only one layer's scan graph is alive at a time.

The CPU scan (``scan_chunked``) cuts L into chunks of ``CHUNK`` steps: the discretised decay and input of a
whole chunk are computed at once, the state then runs through the chunk with one fused multiply-add per step
(the only sequential part: O(L) small ops), and is carried to the next chunk. Memory is (B, D, T, N) per
chunk. On this CPU that is ~10x faster than a parallel within-chunk form (weights exp(S_t - S_i) over a
(T, T) matrix per state), which does T/2 times the exp work. ``scan_reference`` is the plain step-by-step
loop that tests compare against.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils import flop_counter

CHUNK = 64


def _prepare(delta: torch.Tensor, delta_bias: Optional[torch.Tensor], delta_softplus: bool) -> torch.Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[None, :, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y, u, D, z):
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence, one step at a time (computes in fp32, or fp64 if the inputs are fp64)."""
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, A, B, C = u.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
    delta = _prepare(delta.to(dtype), delta_bias, delta_softplus)
    b, d, L = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(L):
        dt = delta[:, :, t, None]  # (b, d, 1)
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    return _finish(y, u, D if D is None else D.to(dtype), z if z is None else z.to(dtype)).to(u.dtype)


def scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, chunk: int = CHUNK):
    """The recurrence over chunks of ``chunk`` steps; same result as ``scan_reference``.

    Per chunk, exp(delta*A) and delta*B*u are computed for all its steps at once ((B, D, T, N) tensors), then
    the state runs through the chunk with one fused multiply-add per step and is read out with C in one
    contraction; the state is carried to the next chunk. Memory is bounded by the chunk, not by L.
    """
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    out_dtype = u.dtype
    u, A, B, C = u.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
    delta = _prepare(delta.to(dtype), delta_bias, delta_softplus)
    b, d, L = u.shape
    du = delta * u  # (b, d, L)
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        decay = torch.exp(delta[:, :, s:e, None] * A[None, :, None, :])  # (b, d, T, n)
        inp = du[:, :, s:e, None] * B[:, None, :, s:e].transpose(-1, -2)  # (b, d, T, n)
        hs = torch.empty_like(decay)
        for t in range(e - s):
            h = torch.addcmul(inp[:, :, t], decay[:, :, t], h)
            hs[:, :, t] = h
        ys.append(torch.einsum("bdtn,bnt->bdt", hs, C[:, :, s:e]))
    y = torch.cat(ys, dim=-1)
    return _finish(y, u, D if D is None else D.to(dtype), z if z is None else z.to(dtype)).to(out_dtype)


@functools.lru_cache(maxsize=1)
def cuda_scan():
    """``mamba_ssm``'s selective_scan_fn, or None when mamba-ssm is not installed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # noqa: BLE001 - any import failure (no CUDA build, no triton) means: not available
        return None
    return selective_scan_fn


def _scan_autograd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The differentiable implementation for the tensors' device."""
    fn = cuda_scan() if u.is_cuda else None
    if fn is not None:
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@torch.library.custom_op("compress::selective_scan", mutates_args=())
def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False) -> torch.Tensor:
    """Selective scan, (B, D, L) out in u's dtype. Differentiable; counted by the FLOP counter."""
    with torch.no_grad():
        return _scan_autograd(u, delta, A, B, C, D, z, delta_bias, delta_softplus).to(u.dtype).contiguous()


@selective_scan.register_fake
def _(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    return torch.empty_like(u)


_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*[t if t is not None else None for t in inputs[:8]])
    ctx.present = [t is not None for t in inputs[:8]]
    ctx.delta_softplus = inputs[8]


def _backward(ctx, grad):
    saved = list(ctx.saved_tensors)
    leaves = [t.detach().requires_grad_(ctx.needs_input_grad[i]) if t is not None else None
              for i, t in enumerate(saved)]
    wanted = [i for i, t in enumerate(leaves) if t is not None and ctx.needs_input_grad[i]]
    grads = [None] * 9
    if not wanted:
        return tuple(grads)
    with torch.enable_grad():  # recompute: nothing of the forward's inner graph was kept
        out = _scan_autograd(*leaves, ctx.delta_softplus).to(grad.dtype)
        found = torch.autograd.grad(out, [leaves[i] for i in wanted], grad, allow_unused=True)
    for i, g in zip(wanted, found):
        grads[i] = g
    return tuple(grads)


selective_scan.register_autograd(_backward, setup_context=_setup_context)


# ---- counting ---------------------------------------------------------------------------------------------------


def scan_macs(batch: int, channels: int, length: int, state: int, with_d: bool, with_z: bool) -> int:
    """MACs of one scan: 4 per (b, l, d, n) element + 1 per (b, l, d) for each of D and z.

    Per state element: delta*A (the discretisation's argument of exp), delta*u*B (the input B-bar*u),
    the update A-bar*h + B-bar*u, and the readout C*h. Per channel and step: D*u and the silu(z) gate.
    exp/softplus/silu themselves are not counted, as the FLOP counter counts no elementwise activation.
    """
    return batch * channels * length * (4 * state + int(with_d) + int(with_z))


@flop_counter.register_flop_formula(torch.ops.compress.selective_scan)
def _scan_flop(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape=None, z_shape=None, delta_bias_shape=None,
               delta_softplus=False, *args, out_shape=None, **kwargs) -> int:
    b, d, L = u_shape
    return 2 * scan_macs(b, d, L, A_shape[1], D_shape is not None, z_shape is not None)  # FLOPs = 2 x MACs
