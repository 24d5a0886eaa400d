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

The CPU scan (``scan_chunked``) works time-major: its inputs are read once as (L, B, C) (a cheap copy from the
(B, L, C) rows a linear layer writes), the state is (B, N, D) per step with channels innermost, and L is cut into
chunks of ``CHUNK`` (8) steps. Per chunk the decays exp(delta*A) (as exp2, ~10 % cheaper) and inputs delta*B*u
are formed at once into two (T, B, N, D) buffers that every chunk reuses (1.5 MB each at Vim-T's shapes: they stay
in cache, where the previous 64-step (T, B, D, N) tensors of 12 MB streamed from memory), the state runs through
the chunk with one fused multiply-add per step in place of the inputs (the only sequential part: O(L) small ops),
and one batched matrix-vector product reads it out with C. The output is (B, D, L) laid out as (B, L, D), which
the next linear layer reads without a copy. What remains is mostly the exp itself: one per state element, 465 M
per Vim-T batch of 8 at ~1.4 ns each on this CPU (tools/results/selective_scan_cpu.md). A parallel within-chunk
form (weights exp(S_t - S_i) over a (T, T) matrix per state) does T/2 times the exp work; a factored one
(exp(S_t) * cumsum(exp(-S_i) ...)) twice the exps and overflows. ``scan_reference`` is the plain step-by-step
loop that tests compare against.
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

CHUNK = None  # steps per chunk; None: as many as fill CHUNK_ELEMENTS (8 at Vim-T's batch 8, 64 at batch 1)
CHUNK_ELEMENTS = 8 * 8 * 16 * 384  # state elements per chunk buffer (1.5 MB in fp32: stays in cache)
LOG2E = 1.4426950408889634
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


def _as_hold(hold, A, dtype):
    if hold is None:
        return None
    if not torch.compiler.is_compiling() and not bool((A < 0).all()):  # a traced graph cannot branch on values
        raise ValueError("selective_scan: hold needs a decaying state (A < 0 everywhere), as every Mamba has")
    return hold.to(dtype)


def _tm(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """A (b, c, L) tensor as a contiguous time-major (L, b, c): each step's slice is contiguous. From a (b, c, L)
    view of (b, L, c) memory (how a linear layer's output arrives) this is a cheap copy, rows stay contiguous."""
    t = t if dtype is None else t.to(dtype)
    return t.permute(2, 0, 1).contiguous()


def _from_tm(t: torch.Tensor) -> torch.Tensor:
    """(L, b, c) -> (b, c, L) laid out as (b, L, c) in memory: rows stay contiguous (a copy to a contiguous
    (b, c, L) would move single elements, ~8x slower), and the next linear layer reads (b, L, c) as it is."""
    return t.transpose(0, 1).contiguous().transpose(1, 2)


class _Scan:
    """The scan's inputs prepared once, time-major: per-channel (L, b, d), per-state (L, b, n), A as (n, d).

    The states are (T, b, n, d) per chunk: channels innermost, so that every elementwise op of the scan runs over
    contiguous rows of d with at most a per-row scalar broadcast (decay and input: 0.2 ns an element, against 0.6
    with the state innermost), and the readouts are batched matrix-vector products over the state's own layout.
    """

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold, hold_previous: bool = False):
        self.dtype = dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
        self.uT = _tm(u, dtype)
        raw = _tm(delta, dtype)
        if delta_bias is not None:
            raw = raw + delta_bias.to(dtype)
        self.rawT = raw
        self.dlT = F.softplus(raw) if delta_softplus else raw
        self.duT = self.dlT * self.uT
        self.BT, self.CT = _tm(B, dtype), _tm(C, dtype)
        self.A = A.to(dtype).t().contiguous()  # (n, d)
        self.A2 = self.A * LOG2E  # exp2 is ~10 % cheaper than exp here, and the exp is most of the scan's time
        self.holdT = None if hold is None else _as_hold(hold, A, dtype).t().contiguous()  # (L, b)
        self.zT = None if z is None else _tm(z, dtype)
        self.D = None if D is None else D.to(dtype)
        self.L, self.b, self.d = self.uT.shape
        self.n = self.A.shape[0]
        self.held = self.dl_held = None
        if self.holdT is not None:
            self._held_previous_terms() if hold_previous else self._held_terms()

    def _held_terms(self):
        """The held steps (hold != 1: a pruned gap before them, a minority) differ from plain steps only in the
        decay, exp(s x) (formed for every step at no extra cost from delta * s, see ``terms``), and in the input
        factor (1 - e^{sx}) / (1 - e^x): the factor and the held inputs are computed here once, for all the held
        steps as whole (n, d) rows of the flattened (L * b) steps, and each chunk copies its rows in (one op)."""
        s_rows = self.holdT.reshape(-1)
        self.dl_held = self.dlT * self.holdT[:, :, None]  # s delta: the decay of every step is exp(s delta A)
        idx = (s_rows != 1).nonzero().squeeze(1)
        if idx.numel() == 0:
            return
        x2 = self.dlT.reshape(-1, self.d).index_select(0, idx)[:, None, :] * self.A2  # (H, n, d)
        e1 = torch.exp2(x2)
        d_held = x2.mul_(s_rows.index_select(0, idx)[:, None, None]).exp2_()  # e^{sx}
        factor = (d_held - 1).div_(e1 - 1 - 1e-30)
        inp = torch.mul(self.duT.reshape(-1, self.d).index_select(0, idx)[:, None, :],
                        self.BT.reshape(-1, self.n).index_select(0, idx)[:, :, None]).mul_(factor)
        self.held = (idx, inp, factor, e1)
        self._bounds = {}

    def _held_previous_terms(self):
        """``hold_from='previous'`` as one plain scan (inference): token k - 1 carries m = hold_{k-1} - 1 copies of
        itself after its own step, so the state that token k reads is h'_k = e^{x_k} (e^{m x_{k-1}} h'_{k-1} +
        f(m) i_{k-1}) + i_k with f(m) = (e^{m x_{k-1}} - 1) / (e^{x_{k-1}} - 1) and i = delta B u: a scan with decay
        exp(A (delta_k + m delta_{k-1})) (from a combined delta, at no extra cost) and, at the steps after a
        carried gap only, the input i_k + e^{x_k} f(m) i_{k-1} (computed here as whole rows, as ``_held_terms``)."""
        m = torch.zeros_like(self.holdT)
        m[1:] = self.holdT[:-1] - 1  # (L, b): copies carried between step k - 1 and step k
        self.dl_held = torch.addcmul(self.dlT, torch.cat([self.dlT[:1] * 0, self.dlT[:-1]]), m[:, :, None])
        m_rows = m.reshape(-1)
        idx = (m_rows != 0).nonzero().squeeze(1)
        if idx.numel() == 0:
            return
        prev = idx - self.b  # the same image's previous step (m is 0 at step 0)
        flat_dl, flat_du, flat_B = self.dlT.reshape(-1, self.d), self.duT.reshape(-1, self.d), self.BT.reshape(-1, self.n)
        xp = flat_dl.index_select(0, prev)[:, None, :] * self.A2  # (H, n, d): x_{k-1}
        ep = torch.exp2(xp)
        f = torch.exp2(xp.mul_(m_rows.index_select(0, idx)[:, None, None])).sub_(1).div_(ep.sub_(1).sub_(1e-30))
        ek = torch.exp2(flat_dl.index_select(0, idx)[:, None, :] * self.A2)  # e^{x_k}
        i_prev = flat_du.index_select(0, prev)[:, None, :] * flat_B.index_select(0, prev)[:, :, None]
        inp = torch.addcmul(flat_du.index_select(0, idx)[:, None, :] * flat_B.index_select(0, idx)[:, :, None],
                            ek.mul_(f), i_prev)
        self.held = (idx, inp, None, None)
        self._bounds = {}

    def _held_in(self, s: int, e: int):
        """The held rows of steps s..e: (their row indices in the chunk's (T * b) rows, held input, factor, e^x)."""
        idx, inp, factor, e1 = self.held
        T = e - s
        if T not in self._bounds:  # the row ranges of every chunk of T steps, found at once
            starts = torch.arange(0, self.L + T, T, device=idx.device).clamp(max=self.L) * self.b
            self._bounds[T] = torch.searchsorted(idx, starts).tolist()
        bounds = self._bounds[T]
        if s % T == 0 and s // T + 1 < len(bounds):
            lo, hi = bounds[s // T], bounds[s // T + 1]
        else:  # the last, shorter chunk
            lo, hi = torch.searchsorted(idx, torch.tensor([s * self.b, e * self.b], device=idx.device)).tolist()
        if lo == hi:
            return None
        if factor is None:  # hold_previous (inference only)
            return idx[lo:hi] - s * self.b, inp[lo:hi], None, None
        return idx[lo:hi] - s * self.b, inp[lo:hi], factor[lo:hi], e1[lo:hi]

    def chunk(self) -> int:
        """``CHUNK``, or the steps that fill ``CHUNK_ELEMENTS`` (8 to 64): small batches take longer chunks, which
        keeps the Python loop's per-chunk ops few."""
        if CHUNK:
            return CHUNK
        return max(8, min(64, CHUNK_ELEMENTS // (self.b * self.n * self.d)))

    def buffers(self, chunk: int, count: int):
        return [self.uT.new_empty(min(chunk, self.L), self.b, self.n, self.d) for _ in range(count)]

    def terms(self, s: int, e: int, dec: torch.Tensor, inp: torch.Tensor):
        """Decay and input of steps s..e into ``dec`` and ``inp`` ((T, b, n, d)); with ``hold`` also, at the held steps
        (hold != 1) only, the input factor (1 - e^{sx}) / (1 - e^x) and (their row indices, e^x), x = delta*A (the
        backward needs them; ``dense_hold_terms`` spreads them out).

        The factor is taken from e^{sx} (the decay) and e^x rather than from expm1, which is ~4x slower than exp on
        CPU: a relative error of ~eps/|x| (1e-4 at |x| = 1e-3 in fp32) in a term of size ~|x|. A is negative (a
        decaying state), so 1 - e^x > 0; adding 1e-30 keeps it so where x underflows, and the factor -> 0 there, in
        a term that is 0 anyway."""
        dl = self.dlT if self.holdT is None else self.dl_held
        torch.mul(dl[s:e, :, None, :], self.A2, out=dec).exp2_()
        torch.mul(self.duT[s:e, :, None, :], self.BT[s:e, :, :, None], out=inp)
        held = self._held_in(s, e) if self.held is not None else None
        if held is None:
            return dec, inp, None, None
        loc, inp_held, factor, e1 = held
        T, rows = e - s, self.n * self.d
        inp.view(T * self.b, rows).index_copy_(0, loc, inp_held.view(-1, rows))
        return dec, inp, factor, None if factor is None else (loc, e1)

    def dense_hold_terms(self, dec, factor, held):
        """The sparse hold terms of ``terms`` as full (T, b, n, d) tensors (factor 1 and e^x = decay where hold is
        1), for the backward."""
        idx, e1 = held
        T = dec.shape[0]
        full_f = torch.ones_like(dec)
        full_f.view(T * self.b, -1).index_copy_(0, idx, factor.reshape(idx.numel(), -1))
        full_e1 = dec.clone()
        full_e1.view(T * self.b, -1).index_copy_(0, idx, e1.reshape(idx.numel(), -1))
        return full_f, full_e1

    def readout(self, H: torch.Tensor, s: int, e: int, out: torch.Tensor) -> None:
        """y_t = sum_n C_t[n] h_t[n, :] for the chunk's states H, into out (T, b, d)."""
        T = e - s
        torch.bmm(self.CT[s:e].reshape(T * self.b, 1, self.n), H.view(T * self.b, self.n, self.d),
                  out=out.view(T * self.b, 1, self.d))

    def finish(self, yT: torch.Tensor) -> torch.Tensor:
        """(y + D u) * silu(z), time-major, in place in yT."""
        if self.D is not None:
            yT.addcmul_(self.uT, self.D)
        if self.zT is not None:
            yT.mul_(F.silu(self.zT))
        return yT


def _run_chunk(dec: torch.Tensor, H: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The chunk's states in place of its inputs H: h_t = dec_t h_{t-1} + inp_t, one fused op per step over
    contiguous (b, n, d) slices (the only sequential part); returns the last state (a view into H)."""
    for h_t, dec_t in zip(H.unbind(0), dec.unbind(0)):
        h = h_t.addcmul_(dec_t, h)
    return h


def scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, hold=None,
                 chunk: Optional[int] = None, hold_previous: bool = False):
    """The recurrence over chunks of ``chunk`` steps; same result as ``scan_reference`` (as the expanded reference
    with ``hold``). Out: (b, d, L) in u's dtype, laid out as (b, L, d) (see ``_from_tm``).

    Per chunk, the decays exp(delta*A) and inputs delta*B*u of all its steps are formed at once into two
    (T, b, n, d) buffers reused by every chunk (a few MB: they stay in cache), the state runs through the chunk
    with one fused multiply-add per step, in place of the inputs, and is read out with C in one batched
    matrix-vector product.
    """
    p = _Scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold, hold_previous)
    chunk = chunk or p.chunk()
    dec, H0, H1 = p.buffers(chunk, 3)
    yT = p.uT.new_empty(p.L, p.b, p.d)
    h = p.uT.new_zeros(p.b, p.n, p.d)
    for i, s in enumerate(range(0, p.L, chunk)):
        e = min(s + chunk, p.L)
        T = e - s
        H = (H0 if i % 2 == 0 else H1)[:T]  # two input/state buffers in turn: the last state stays readable
        dc, H, _, _ = p.terms(s, e, dec[:T], H)
        h = _run_chunk(dc, H, h)
        p.readout(H, s, e, yT[s:e])
    return _from_tm(p.finish(yT)).to(u.dtype)


def scan_chunked_backward(grad, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, hold=None,
                          chunk: Optional[int] = None):
    """Gradients of ``scan_chunked`` w.r.t. (u, delta, A, B, C, D, z, delta_bias), written out (no autograd graph);
    ``hold`` is a constant (token counts), it gets none.

    A forward pass computes the outputs and keeps the state at each chunk start (all chunks' decays and states
    too when they are small, ``KEEP_STATES``); chunks are then visited in reverse, each recomputed from its start
    state in cache-sized buffers (recomputing the exp is cheaper here than storing and re-reading (L, b, n, d)
    tensors from memory), and the state gradient runs backwards: gh_t = C_t g_t + exp(delta_{t+1} A) gh_{t+1}.
    """
    p = _Scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold)
    chunk = chunk or p.chunk()
    L, b, n, d = p.L, p.b, p.n, p.d
    bounds = [(s, min(s + chunk, L)) for s in range(0, L, chunk)]
    keep_all = b * d * L * n <= KEEP_STATES
    dec, H0, H1, GH, GX = p.buffers(chunk, 5)
    yT = p.uT.new_empty(L, b, d)
    h = p.uT.new_zeros(b, n, d)
    starts, kept = [], []
    for i, (s, e) in enumerate(bounds):  # forward: outputs (for the gate's gradient) and the chunk-start states
        T = e - s
        starts.append(h.clone())
        if keep_all:
            dc, H, factor, e1 = p.terms(s, e, p.uT.new_empty(T, b, n, d), p.uT.new_empty(T, b, n, d))
        else:
            dc, H, factor, e1 = p.terms(s, e, dec[:T], (H0 if i % 2 == 0 else H1)[:T])
        h = _run_chunk(dc, H, h)
        p.readout(H, s, e, yT[s:e])
        kept.append((dc, H, factor, e1) if keep_all else None)
    gT = _tm(grad, p.dtype)
    g_zT = None
    if p.zT is not None:  # out = y_full * silu(z), y_full = y + D u
        if p.D is not None:
            yT.addcmul_(p.uT, p.D)
        sig = torch.sigmoid(p.zT)
        g_zT = gT * yT * sig * (1 + p.zT * (1 - sig))
        gT = gT * (p.zT * sig)
    g_uT = gT * p.D if p.D is not None else torch.zeros_like(p.uT)
    g_D = (gT * p.uT).sum((0, 1)) if p.D is not None else None
    g_dlT, g_BT, g_CT = torch.empty_like(p.uT), torch.empty_like(p.BT), torch.empty_like(p.CT)
    g_A = torch.zeros_like(p.A)  # (n, d)
    carry = torch.zeros_like(h)  # gradient reaching the chunk's last state from the chunks after it
    for i in reversed(range(len(bounds))):
        s, e = bounds[i]
        T = e - s
        h0 = starts[i]
        if keep_all:
            dc, H, factor, e1 = kept[i]
        else:
            dc, H, factor, e1 = p.terms(s, e, dec[:T], H0[:T])
            _run_chunk(dc, H, h0)
        if factor is not None:
            factor, e1 = p.dense_hold_terms(dc, factor, e1)
        gy = gT[s:e]  # (T, b, d)
        Gh = torch.mul(p.CT[s:e, :, :, None], gy[:, :, None, :], out=GH[:T])  # C_t g_t
        gh = Gh[T - 1].add_(carry)
        for t in reversed(range(T - 1)):
            gh = Gh[t].addcmul_(dc[t + 1], gh)
        carry = dc[0] * gh
        torch.bmm(H.view(T * b, n, d), gy.reshape(T * b, d, 1), out=g_CT[s:e].view(T * b, n, 1))
        Ghf = Gh if factor is None else Gh * factor  # the input term is (factor *) du * B
        duT, BT = p.duT[s:e], p.BT[s:e]
        torch.bmm(Ghf.view(T * b, n, d), duT.reshape(T * b, d, 1), out=g_BT[s:e].view(T * b, n, 1))
        g_du = torch.bmm(BT.reshape(T * b, 1, n), Ghf.view(T * b, n, d)).view(T, b, d)
        gx = GX[:T]  # d/dx of the decay term: Gh * h_{t-1} * exp(x) (* hold)
        torch.mul(Gh[1:], H[:-1], out=gx[1:])
        torch.mul(Gh[0], h0, out=gx[0])
        gx.mul_(dc)
        if factor is not None:  # decay = exp(s x), and the input factor depends on x too
            sh = p.holdT[s:e, :, None, None]
            x = (p.dlT[s:e, :, None, :] * p.A)
            # d factor / dx = (s e^{sx} expm1(x) - expm1(sx) e^x) / expm1(x)^2 -> s (s - 1) / 2 as x -> 0
            den = torch.expm1(x)
            safe = torch.where(den != 0, den, torch.ones_like(den))
            dfactor = torch.where(den != 0, (sh * dc * den - torch.expm1(sh * x) * e1) / safe**2, sh * (sh - 1) / 2)
            gx.mul_(sh).addcmul_(Gh, dfactor * torch.mul(duT[:, :, None, :], BT[:, :, :, None]))
        g_A += (gx * p.dlT[s:e, :, None, :]).sum((0, 1))
        torch.sum(gx.mul_(p.A), 2, out=g_dlT[s:e])
        g_dlT[s:e].addcmul_(g_du, p.uT[s:e])
        g_uT[s:e].addcmul_(g_du, p.dlT[s:e])
    g_rawT = g_dlT * torch.sigmoid(p.rawT) if delta_softplus else g_dlT
    g_bias = g_rawT.sum((0, 1)) if delta_bias is not None else None
    g_z = _from_tm(g_zT) if g_zT is not None else None
    return _from_tm(g_uT), _from_tm(g_rawT), g_A.t(), _from_tm(g_BT), _from_tm(g_CT), g_D, g_z, g_bias


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
    counts = hold.round().long().clamp(min=0)  # 0: a step that is skipped (``scan``'s hold_from='previous')
    ends = counts.cumsum(1)  # (B, L): one past each token's last copy
    b, d, L = u.shape
    positions = torch.arange(int(ends[:, -1].max()), device=u.device).expand(b, -1).contiguous()
    src = torch.searchsorted(ends, positions, right=True).clamp(max=L - 1)  # (B, L'): the token at each position

    def expand(t):
        return None if t is None else t.gather(2, src[:, None].expand(-1, t.shape[1], -1)).contiguous()

    y = scan(expand(u), expand(delta), A, expand(B), expand(C), D, expand(z), delta_bias, delta_softplus)
    return y.gather(2, (ends - 1)[:, None].expand(-1, d, -1))


def _scan_autograd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold=None, hold_previous=False):
    """The differentiable implementation for the tensors' device."""
    if hold is not None and hold_previous:
        if u.is_cuda:  # token pairs through the plain held scan (mamba-ssm's kernel has no per-state input factor)
            return scan_hold_previous(selective_scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold)
        return scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold, hold_previous=True)
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


def _twice(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(b, c, K) -> (b, c, 2K), every step twice in a row (copied token-major: rows stay contiguous)."""
    if t is None:
        return None
    b, c, K = t.shape
    return t.transpose(1, 2).unsqueeze(2).expand(b, K, 2, c).reshape(b, 2 * K, c).transpose(1, 2)


def scan_hold_previous(scan_fn, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, hold=None):
    """The scan in which token t is followed by ``hold[t] - 1`` copies of itself whose outputs nobody reads: its
    output is read at its own step and its state is carried across the copies (ToP-ViM alignment 'previous': a
    pruned gap takes the state of the kept token before it). Exactly: each token is two steps, [t with hold 1 (read
    here), t with hold s_t - 1 (carries the gap; hold 0 is the identity step)], through ``scan_fn``'s hold, and the
    first step of each pair is read. Twice the scan's length (its projections are not repeated)."""
    b, _, K = u.shape
    pairs = torch.stack([torch.ones_like(hold), hold - 1], dim=-1).reshape(b, 2 * K)
    y = scan_fn(_twice(u), _twice(delta), A, _twice(B), _twice(C), D, _twice(z), delta_bias, delta_softplus, pairs)
    return y[..., 0::2]


def _plain_ops() -> bool:
    """Inside ``as_plain_ops`` (torch.export for ONNX runs this Python; torch.compile's dynamo cannot read a
    ContextVar, and it keeps the op: its fake implementation traces)."""
    return not torch.compiler.is_dynamo_compiling() and _AS_PLAIN_OPS.get()


def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, hold=None,
         hold_from: str = "next") -> torch.Tensor:
    """What models call: the op ``selective_scan``, or its plain PyTorch ops inside ``as_plain_ops``.

    ``hold_from``: 'next' (the op's ``hold``: token t stands for the pruned gap *before* it, read at its last copy) or
    'previous' (token t carries the gap *after* it, read at its own step: ``scan_hold_previous``)."""
    if hold_from not in ("next", "previous"):
        raise ValueError(f"scan: hold_from must be 'next' or 'previous', got {hold_from!r}")
    if hold is not None and hold_from == "previous":
        if _plain_ops():
            return scan_hold_previous(scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold)
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold, True)
    if _plain_ops():
        return scan_as_loop(u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold)
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold)


def scan_as_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, hold=None) -> torch.Tensor:
    """The recurrence with its step loop as torch's ``scan`` operator (one loop node in a traced graph, which the
    ONNX exporter turns into an ONNX ``Scan``) instead of L unrolled steps: an ONNX export of a tiny Vim took
    200 s unrolled. Inference only; the decay and input of all L steps are formed at once ((L, B, D, N))."""
    from torch._higher_order_ops.scan import scan as loop

    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    out_dtype = u.dtype
    hold = _as_hold(hold, A, dtype)
    uT, BT, CT = _tm(u, dtype), _tm(B, dtype), _tm(C, dtype)
    dlT = _prepare(_tm(delta, dtype).permute(1, 2, 0), delta_bias, delta_softplus).permute(2, 0, 1)  # (L, b, d)
    At = A.to(dtype).t()  # (n, d)
    x = dlT[:, :, None, :] * At  # (L, b, n, d); plain exp, no exp2 (ONNX has no Exp2)
    inp = (dlT * uT)[:, :, None, :] * BT[..., None]
    if hold is None:
        decay = torch.exp(x)
    else:
        decay = torch.exp(x * hold.t()[:, :, None, None])
        inp = inp * (decay - 1) / (torch.exp(x) - 1 - 1e-30)
    b, n, d = u.shape[0], At.shape[0], At.shape[1]

    def step(h, xs):
        h = torch.addcmul(xs[1], xs[0], h)
        return h, h.clone()

    _, H = loop(step, uT.new_zeros(b, n, d), (decay, inp))
    L = uT.shape[0]
    yT = torch.bmm(CT.reshape(L * b, 1, n), H.contiguous().view(L * b, n, d)).view(L, b, d)
    if D is not None:
        yT = yT + uT * D.to(dtype)
    if z is not None:
        yT = yT * F.silu(_tm(z, dtype))
    return yT.permute(1, 2, 0).to(out_dtype)


@torch.library.custom_op("compress::selective_scan", mutates_args=())
def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   hold: Optional[torch.Tensor] = None, hold_previous: bool = False) -> torch.Tensor:
    """Selective scan, (B, D, L) out in u's dtype, laid out as (B, L, D). Differentiable (not in ``hold``); counted
    by the FLOP counter. ``hold_previous``: ``hold`` as ``scan``'s hold_from='previous'."""
    with torch.no_grad():
        return _out_layout(_scan_autograd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, hold,
                                          hold_previous).to(u.dtype))


@selective_scan.register_fake
def _(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, hold=None, hold_previous=False):
    b, d, L = u.shape
    return u.new_empty(b, L, d).transpose(1, 2)


def _out_layout(y: torch.Tensor) -> torch.Tensor:
    """The op's output layout: (b, d, L) laid out as (b, L, d), which the CPU scan produces directly and Vim's
    out_proj reads without a copy (the CUDA kernel's contiguous output is transposed once)."""
    b, d, L = y.shape
    if y.stride() == (L * d, 1, d) or d == 1 or L == 1:
        return y
    return y.transpose(1, 2).contiguous().transpose(1, 2)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8], inputs[9])
    ctx.delta_softplus = inputs[8]
    ctx.hold_previous = len(inputs) > 10 and bool(inputs[10])


def _backward(ctx, grad):
    *saved, hold = ctx.saved_tensors
    leaves = [t.detach().requires_grad_(ctx.needs_input_grad[i]) if t is not None else None
              for i, t in enumerate(saved)]
    wanted = [i for i, t in enumerate(leaves) if t is not None and ctx.needs_input_grad[i]]
    grads = [None] * 11
    if not wanted:
        return tuple(grads)
    if ctx.hold_previous and hold is not None:  # through the token pairs and this op's own backward
        with torch.enable_grad():
            out = scan_hold_previous(selective_scan, *leaves, ctx.delta_softplus, hold).to(grad.dtype)
            found = torch.autograd.grad(out, [leaves[i] for i in wanted], grad, allow_unused=True)
        for i, g in zip(wanted, found):
            grads[i] = g
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
               delta_softplus=False, hold_shape=None, hold_previous=False, *args, out_shape=None, **kwargs) -> int:
    b, d, L = u_shape
    return 2 * scan_macs(b, d, L, A_shape[1])  # the counter's FLOPs = 2 x MACs
