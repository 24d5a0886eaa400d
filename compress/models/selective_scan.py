"""Mamba's selective scan as one opaque op: a chunked pure-PyTorch scan on CPU, the mamba-ssm kernel on CUDA.

The recurrence (Gu & Dao 2023, with Mamba's simplified discretisation), per batch b, channel d, state n:

    delta_t = softplus(delta_t + delta_bias)            (if delta_softplus)
    h_t     = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B[b, n, t] * u[b, d, t]
    y_t     = sum_n C[b, n, t] * h_t[n]  (+ D[d] * u_t)  (* silu(z_t))

Shapes follow ``mamba_ssm.selective_scan_fn``: u, delta, z (B, D, L); A (D, N); B, C (B, N, L); D, delta_bias (D,).

``hold`` (B, L), optional: step t stands for its token held over ``hold[b, t]`` consecutive steps (ToP-ViM's
hidden-state alignment: a kept token held over the pruned gap before it). Exactly, with s = hold_t:

    h_t = exp(s delta_t A) h_{t-1} + [expm1(s delta_t A) / expm1(delta_t A)] delta_t B_t u_t

(the s copies' inputs summed over their decays, a geometric series per state). On CPU this is one more elementwise
factor per chunk; mamba-ssm's kernel cannot take a per-state input factor, so on CUDA the sequence is expanded to
the held length (``scan_by_expansion``: each token repeated ``hold`` times, the scan, the last copy read back).

Why an op of its own (``torch.library.custom_op``):
- ``torch.utils.flop_counter`` sees it as one node and uses the MAC formula registered below, instead of
  missing the scan (it is no matmul) or counting the kernel's internals;
- its backward recomputes the scan (activation checkpointing of the scan), so a training step keeps no
  (B, L, D, N) intermediates per layer. On CPU the backward is written out (``scan_chunked_backward``, a
  reverse scan, chunked like the forward); on CUDA it recomputes through mamba-ssm's autograd.

The CPU scan (``scan_chunked``) cuts L into chunks of ``CHUNK`` steps: the discretised decay and input of a
whole chunk are computed at once, the state then runs through the chunk with one fused multiply-add per step
(the only sequential part: O(L) small ops), and is carried to the next chunk. Memory is (T, B, D, N) per
chunk, time-major so that each step reads and writes contiguous slices, and the outer products and contractions
with B and C are batched matmuls over that layout (no transposed copies): on a CIFAR-sized Vim that made the
forward 4.5x and a training step 2.5x faster than the (B, D, T, N) layout with broadcasts and einsums. A
parallel within-chunk form (weights exp(S_t - S_i) over a (T, T) matrix per state) was ~10x slower still: it
does T/2 times the exp work. ``scan_reference`` is the plain step-by-step loop that tests compare against.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils import flop_counter

from compress import deploy

CHUNK = 64
KEEP_STATES = 2**24  # the backward keeps all (B, D, L, N) states up to this many elements (64 MB in fp32)


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
    """The recurrence, one step at a time (computes in fp32, or fp64 if the inputs are fp64); no ``hold``: a held
    scan's reference is this one over the expanded sequence (``scan_by_expansion``)."""
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


def _time_major(t: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """Steps s..e of a (b, c, L) tensor as a contiguous (T, b, c) (elementwise results follow their inputs'
    memory layout, so a permuted view would make every step's slice strided again)."""
    return t[:, :, s:e].permute(2, 0, 1).contiguous()


def _chunk_terms(dl, du, A, B, hold, s: int, e: int):
    """Decay exp(s dA) and input of steps s..e, time-major (T, b, d, n) so that each step's slice is contiguous
    (3x faster steps than slicing a (b, d, T, n) tensor); with ``hold`` also x = dA and the input factor
    (1 - e^{sx}) / (1 - e^x) that the backward needs.

    The factor is taken from e^{sx} (the decay) and e^x rather than from expm1, which is ~4x slower than exp on
    CPU: a relative error of ~eps/|x| (1e-4 at |x| = 1e-3 in fp32) in a term of size ~|x|. A is negative (a
    decaying state), so 1 - e^x > 0; adding 1e-30 keeps it so where x underflows, and the factor -> 0 there, in a
    term that is 0 anyway.
    """
    dlT = _time_major(dl, s, e)
    x = dlT[..., None] * A
    inp = _outer(_time_major(du, s, e), _time_major(B, s, e))
    if hold is None:
        return torch.exp(x), inp, x, None
    decay = torch.exp((dlT * hold[:, s:e].t()[:, :, None])[..., None] * A)
    factor = (decay - 1).div_(torch.exp(x).sub_(1).sub_(1e-30))
    return decay, inp.mul_(factor), x, factor


def _outer(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """w[t, b, d] v[t, b, n] -> (T, b, d, n) as a batched matmul (7x faster than a broadcast multiply here)."""
    T, b, d = w.shape
    return torch.bmm(w.reshape(T * b, d, 1), v.reshape(T * b, 1, v.shape[-1])).view(T, b, d, -1)


def _over_state(H: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_n H[t, b, d, n] v[t, b, n] -> (b, d, T): one batched matmul over H's own layout (no transposed copy)."""
    T, b, d, n = H.shape
    return torch.bmm(H.view(T * b, d, n), v.reshape(T * b, n, 1)).view(T, b, d).permute(1, 2, 0)


def _over_channels(H: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_d H[t, b, d, n] w[t, b, d] -> (b, n, T), likewise."""
    T, b, d, n = H.shape
    return torch.bmm(w.reshape(T * b, 1, d), H.view(T * b, d, n)).view(T, b, n).permute(1, 2, 0)


def _run_chunk(decay, inp, h):
    """The states of one chunk, (T, b, d, n): h_t = decay_t h_{t-1} + inp_t, one fused op per step."""
    H = torch.empty_like(inp)
    for t in range(inp.shape[0]):
        h = torch.addcmul(inp[t], decay[t], h, out=H[t])
    return H


def _as_hold(hold, A, dtype):
    if hold is None:
        return None
    if not torch.compiler.is_compiling() and not bool((A < 0).all()):  # a traced graph cannot branch on values
        raise ValueError("selective_scan: hold needs a decaying state (A < 0 everywhere), as every Mamba has")
    return hold.to(dtype)


def scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, hold=None,
                 chunk: int = CHUNK):
    """The recurrence over chunks of ``chunk`` steps; same result as ``scan_reference`` (as the expanded reference
    with ``hold``).

    Per chunk, exp(delta*A) and delta*B*u are computed for all its steps at once ((T, B, D, N) tensors), then
    the state runs through the chunk with one fused multiply-add per step and is read out with C in one
    contraction; the state is carried to the next chunk. Memory is bounded by the chunk, not by L.
    """
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    out_dtype = u.dtype
    u, A, B, C, hold = u.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype), _as_hold(hold, A, dtype)
    delta = _prepare(delta.to(dtype), delta_bias, delta_softplus)
    b, d, L = u.shape
    du = delta * u  # (b, d, L)
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        decay, inp, _, _ = _chunk_terms(delta, du, A, B, hold, s, e)
        H = _run_chunk(decay, inp, h)
        h = H[-1]
        ys.append(_over_state(H, _time_major(C, s, e)))
    y = torch.cat(ys, dim=-1)
    return _finish(y, u, D if D is None else D.to(dtype), z if z is None else z.to(dtype)).to(out_dtype)


def scan_chunked_backward(grad, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, hold=None,
                          chunk: int = CHUNK):
    """Gradients of ``scan_chunked`` w.r.t. (u, delta, A, B, C, D, z, delta_bias), written out (no autograd graph);
    ``hold`` is a constant (token counts), it gets none.

    A forward pass recomputes the states; it keeps them all when they are small (``KEEP_STATES``), otherwise only
    the state at each chunk start, and the chunks are recomputed one by one (memory (T, B, D, N) per chunk). Chunks
    are visited in reverse and the state gradient runs backwards: gh_t = C_t g_t + exp(delta_{t+1} A) gh_{t+1}.
    (Autograd through the forward's step loop costs ~8x the forward on this CPU; this costs ~3x.)
    """
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, A, B, C, g_out = u.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype), grad.to(dtype)
    hold = _as_hold(hold, A, dtype)
    raw = delta.to(dtype)
    if delta_bias is not None:
        raw = raw + delta_bias.to(dtype)[None, :, None]
    dl = F.softplus(raw) if delta_softplus else raw
    b, d, L = u.shape
    du = dl * u
    Dd = D.to(dtype) if D is not None else None
    starts, kept, h = [], [], u.new_zeros(b, d, A.shape[1])
    keep_all = b * d * L * A.shape[1] <= KEEP_STATES  # small enough: keep every state instead of recomputing
    bounds = [(s, min(s + chunk, L)) for s in range(0, L, chunk)]
    for s, e in bounds:  # states at chunk starts
        starts.append(h)
        decay, inp, x, factor = _chunk_terms(dl, du, A, B, hold, s, e)
        H = _run_chunk(decay, inp, h)
        h = H[-1].clone()  # not a view: the chunk's states are freed unless kept
        kept.append(((decay, x, factor), H) if keep_all else None)  # the input is not needed again
    g_u, g_dl, g_C, g_B = torch.zeros_like(u), torch.zeros_like(u), torch.zeros_like(C), torch.zeros_like(B)
    g_z = torch.zeros_like(u) if z is not None else None
    g_A = torch.zeros_like(A)
    g_D = torch.zeros_like(Dd) if Dd is not None else None
    carry = torch.zeros_like(h)  # gradient reaching the last state of the chunk from the chunks after it
    for (s, e), h0, states in zip(reversed(bounds), reversed(starts), reversed(kept)):
        if states is not None:
            (decay, x, factor), H = states
        else:
            decay, inp, x, factor = _chunk_terms(dl, du, A, B, hold, s, e)
            H = _run_chunk(decay, inp, h0)
        Hprev = torch.cat([h0[None], H[:-1]], dim=0)
        T, CT, BT = e - s, _time_major(C, s, e), _time_major(B, s, e)  # (T, b, n)
        g_y = g_out[:, :, s:e]
        if z is not None:
            zc = z[:, :, s:e].to(dtype)
            y = _over_state(H, CT)
            if Dd is not None:
                y = y + u[:, :, s:e] * Dd[None, :, None]
            sig = torch.sigmoid(zc)
            g_z[:, :, s:e] = g_y * y * sig * (1 + zc * (1 - sig))
            g_y = g_y * zc * sig
        if Dd is not None:
            g_u[:, :, s:e] += g_y * Dd[None, :, None]
            g_D += (g_y * u[:, :, s:e]).sum((0, 2))
        g_yT = _time_major(g_y, 0, T)
        direct = _outer(g_yT, CT)  # (T, b, d, n): C_t g_t
        GH = torch.empty_like(direct)
        gh = torch.add(direct[T - 1], carry, out=GH[T - 1])
        for t in reversed(range(T - 1)):  # gh_t = C_t g_t + exp(delta_{t+1} A) gh_{t+1}: one fused op per step
            gh = torch.addcmul(direct[t], decay[t + 1], gh, out=GH[t])
        carry = decay[0] * gh  # to the previous chunk's last state
        duT = _time_major(du, s, e)
        g_C[:, :, s:e] = _over_channels(H, g_yT)
        GHf = GH if factor is None else GH * factor  # the input term is (factor *) du * B
        g_B[:, :, s:e] = _over_channels(GHf, duT)
        g_du = _over_state(GHf, BT)
        if factor is None:
            g_x = GH.mul_(Hprev).mul_(decay)  # d/dx of exp(x) h_prev, x = delta*A (GH is not needed after this)
        else:  # decay = exp(s x), and the factor depends on x too:
            sh = hold[:, s:e].t()[:, :, None, None]
            # d factor / dx = (s e^{sx} expm1(x) - expm1(sx) e^x) / expm1(x)^2 -> s (s - 1) / 2 as x -> 0
            den = torch.expm1(x)
            safe = torch.where(den != 0, den, torch.ones_like(den))
            dfactor = torch.where(den != 0, (sh * decay * den - torch.expm1(sh * x) * torch.exp(x)) / safe**2,
                                  sh * (sh - 1) / 2)
            g_x = GH * Hprev * decay * sh + GH * dfactor * _outer(duT, BT)
        g_A += (g_x * _time_major(dl, s, e)[..., None]).sum((0, 1))
        g_dl[:, :, s:e] = (g_x * A).sum(-1).permute(1, 2, 0) + g_du * u[:, :, s:e]
        g_u[:, :, s:e] += g_du * dl[:, :, s:e]
    g_raw = g_dl * torch.sigmoid(raw) if delta_softplus else g_dl
    g_bias = g_raw.sum((0, 2)) if delta_bias is not None else None
    return g_u, g_raw, g_A, g_B, g_C, g_D, g_z, g_bias


@functools.lru_cache(maxsize=1)
def cuda_scan():
    """``mamba_ssm``'s selective_scan_fn, or None when mamba-ssm is not installed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # noqa: BLE001 - any import failure (no CUDA build, no triton) means: not available
        return None
    return selective_scan_fn


def scan_by_expansion(scan, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, hold=None):
    """A held scan through a scan that has no ``hold``: each token repeated ``hold`` (integer) times, ``scan`` over
    the expanded sequence, the output read at each token's last copy. Rows may expand to different lengths; the
    shorter ones are padded at the end with their last token, which is causal and read by nobody."""
    counts = hold.round().long().clamp(min=1)
    ends = counts.cumsum(1)  # (B, L): one past each token's last copy
    b, d, L = u.shape
    positions = torch.arange(int(ends[:, -1].max()), device=u.device).expand(b, -1).contiguous()
    src = torch.searchsorted(ends, positions, right=True).clamp(max=L - 1)  # (B, L'): the token at each position

    def expand(t):
        return None if t is None else t.gather(2, src[:, None].expand(-1, t.shape[1], -1)).contiguous()

    y = scan(expand(u), expand(delta), A, expand(B), expand(C), D, expand(z), delta_bias, delta_softplus)
    return y.gather(2, (ends - 1)[:, None].expand(-1, d, -1))


def _scan_autograd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold=None):
    """The differentiable implementation for the tensors' device."""
    fn = cuda_scan() if u.is_cuda else None
    if fn is not None:
        if hold is not None:
            return scan_by_expansion(fn, u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold)
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold)


_AS_PLAIN_OPS = contextvars.ContextVar("compress_scan_as_plain_ops", default=False)


@contextlib.contextmanager
def as_plain_ops():
    """Within this, ``scan`` runs the chunked PyTorch scan itself instead of the opaque op, so that a trace holds
    only standard ops: for exporters that cannot carry a custom op (ONNX). The graph then has L small steps per
    scan, unrolled."""
    token = _AS_PLAIN_OPS.set(True)
    try:
        yield
    finally:
        _AS_PLAIN_OPS.reset(token)


deploy.register_plain_ops(as_plain_ops)


def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, hold=None) -> torch.Tensor:
    """What models call: the op ``selective_scan``, or its plain PyTorch ops inside ``as_plain_ops``."""
    if _AS_PLAIN_OPS.get():
        return scan_as_loop(u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold)
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold)


def scan_as_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, hold=None) -> torch.Tensor:
    """The recurrence with its step loop as torch's ``scan`` operator (one loop node in a traced graph, which the
    ONNX exporter turns into an ONNX ``Scan``) instead of L unrolled steps: an ONNX export of a tiny Vim took
    200 s unrolled. Inference only; the decay and input of all L steps are formed at once ((L, B, D, N))."""
    from torch._higher_order_ops.scan import scan as loop

    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    out_dtype = u.dtype
    u, A, B, C, hold = u.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype), _as_hold(hold, A, dtype)
    delta = _prepare(delta.to(dtype), delta_bias, delta_softplus)
    b, d, L = u.shape
    decay, inp, _, _ = _chunk_terms(delta, delta * u, A, B, hold, 0, L)

    def step(h, xs):
        h = torch.addcmul(xs[1], xs[0], h)
        return h, h.clone()

    _, H = loop(step, u.new_zeros(b, d, A.shape[1]), (decay, inp))
    y = _over_state(H.contiguous(), _time_major(C, 0, L))
    return _finish(y, u, D if D is None else D.to(dtype), z if z is None else z.to(dtype)).to(out_dtype)


@torch.library.custom_op("compress::selective_scan", mutates_args=())
def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   hold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Selective scan, (B, D, L) out in u's dtype. Differentiable (not in ``hold``); counted by the FLOP counter."""
    with torch.no_grad():
        return _scan_autograd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold).to(u.dtype).contiguous()


@selective_scan.register_fake
def _(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, hold=None):
    return torch.empty_like(u)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8], inputs[9])
    ctx.delta_softplus = inputs[8]


def _backward(ctx, grad):
    *saved, hold = ctx.saved_tensors
    leaves = [t.detach().requires_grad_(ctx.needs_input_grad[i]) if t is not None else None
              for i, t in enumerate(saved)]
    wanted = [i for i, t in enumerate(leaves) if t is not None and ctx.needs_input_grad[i]]
    grads = [None] * 10
    if not wanted:
        return tuple(grads)
    if saved[0].is_cuda and cuda_scan() is not None:
        with torch.enable_grad():  # recompute with the kernel: nothing of the forward's inner graph was kept
            out = _scan_autograd(*leaves, ctx.delta_softplus, hold).to(grad.dtype)
            found = torch.autograd.grad(out, [leaves[i] for i in wanted], grad, allow_unused=True)
        for i, g in zip(wanted, found):
            grads[i] = g
        return tuple(grads)
    found = scan_chunked_backward(grad, *saved, ctx.delta_softplus, hold)
    for i in wanted:
        grads[i] = found[i].to(saved[i].dtype)
    return tuple(grads)


selective_scan.register_autograd(_backward, setup_context=_setup_context)


# ---- counting ---------------------------------------------------------------------------------------------------


def scan_macs(batch: int, channels: int, length: int, state: int) -> int:
    """MACs of one scan: 4 per (b, l, d, n) state element.

    Per state element: delta*A (the discretisation's argument of exp), delta*u*B (the input B-bar*u), the update
    A-bar*h + B-bar*u, and the readout C*h. Per-channel elementwise work (softplus, exp, D*u, the silu(z) gate) is
    not counted, as the FLOP counter counts no elementwise op; so a scan with or without D and z, or with ``hold``
    (one more elementwise input factor on CPU), counts the same. (On CUDA a held scan runs the kernel over the
    expanded sequence: its scan costs the held length, which this count does not see.)
    """
    return batch * channels * length * 4 * state


@flop_counter.register_flop_formula(torch.ops.compress.selective_scan)
def _scan_flop(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape=None, z_shape=None, delta_bias_shape=None,
               delta_softplus=False, hold_shape=None, *args, out_shape=None, **kwargs) -> int:
    b, d, L = u_shape
    return 2 * scan_macs(b, d, L, A_shape[1])  # the counter's FLOPs = 2 x MACs
