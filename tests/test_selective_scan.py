"""The time-major chunked CPU scan against the step-by-step reference: values and all eight gradients in fp64 and fp32
(tolerances stated per test), chunk lengths that do and do not divide L, the batch-size-dependent default chunk,
held steps scattered among plain ones (with steps of hold 0), both scan directions of a Vim mixer, the output's
(B, L, D) layout, and the token-major causal conv against nn.Conv1d."""
import compress  # noqa: F401  (first: torchvision guard before timm)

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.models import selective_scan as ss
from compress.models.selective_scan import (scan, scan_by_expansion, scan_chunked, scan_chunked_backward,
                                           scan_hold_previous, scan_reference, selective_scan)
from compress.models.vim import BiMamba, causal_conv_silu, causal_conv_silu_tokens


def inputs(b=3, d=6, L=29, n=5, dtype=torch.float64, seed=0, step=0.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    A = -torch.rand(d, n, generator=g, dtype=dtype) * 4 - 0.1
    return [r(b, d, L), r(b, d, L), A, r(b, n, L), r(b, n, L), r(d), r(b, d, L), r(d) + step]


def mixed_holds(b, L, seed=5):
    """Mostly 1 (plain steps), some 2..5 held steps, scattered so that chunks have none, some or only held rows."""
    g = torch.Generator().manual_seed(seed)
    h = torch.ones(b, L, dtype=torch.float64)
    mask = torch.rand(b, L, generator=g) < 0.35
    h[mask] = torch.randint(2, 6, (int(mask.sum()),), generator=g).double()
    return h


@pytest.mark.parametrize("chunk", [None, 1, 3, 8, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_forward_equals_the_reference(chunk, dtype, tol):
    ins = inputs(dtype=dtype)
    ref = scan_reference(*ins[:7], ins[7], True)
    out = scan_chunked(*ins[:7], ins[7], True, chunk=chunk)
    assert out.dtype == dtype and out.shape == ref.shape
    assert (out - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("chunk", [None, 4, 7])
@pytest.mark.parametrize("held", [False, True])
def test_all_gradients_equal_autograd_through_the_reference_fp64(chunk, held, monkeypatch):
    """Tolerance 1e-10 (fp64); the held scan against the reference over the expanded sequence."""
    for keep in (True, False):
        monkeypatch.setattr(ss, "KEEP_STATES", 2**30 if keep else 0)
        ins = [t.requires_grad_() for t in inputs(b=2, d=4, L=23, n=3)]
        hold = mixed_holds(2, 23) if held else None
        grad = torch.randn(2, 4, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        ref_out = (scan_by_expansion(scan_reference, *ins, True, hold) if held else scan_reference(*ins, True))
        ref = torch.autograd.grad(ref_out, ins, grad)
        got = scan_chunked_backward(grad, *[t.detach() for t in ins], True, hold, chunk=chunk)
        for r, g in zip(ref, got):
            assert torch.allclose(r, g, atol=1e-10, rtol=1e-10)


def test_fp32_gradients_are_close_to_fp64():
    """fp32 op gradients within 1e-4 (relative to each gradient's max) of fp64 autograd through the reference."""
    ins64 = [t.requires_grad_() for t in inputs(b=4, d=16, L=40, n=8, step=-1.0)]
    ins32 = [t.detach().float().requires_grad_() for t in ins64]
    grad = torch.randn(4, 16, 40, dtype=torch.float64)
    ref = torch.autograd.grad(scan_reference(*ins64, True), ins64, grad)
    got = torch.autograd.grad(selective_scan(*ins32, True), ins32, grad.float())
    for r, g in zip(ref, got):
        assert (r - g.double()).abs().max() <= 1e-4 * r.abs().max()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_held_steps_among_plain_ones_equal_the_expanded_reference(dtype, tol):
    ins = inputs(b=3, d=5, L=31, n=4, dtype=dtype)
    hold = mixed_holds(3, 31).to(dtype)
    ref = scan_by_expansion(scan_reference, *ins, True, hold)
    for chunk in (None, 1, 5, 8):
        out = scan_chunked(*ins, True, hold, chunk=chunk)
        assert (out - ref).abs().max() <= tol * ref.abs().max()
    zero = hold.clone()
    zero[:, 3] = 0  # hold 0: the identity step (no decay, no input), as hold_from='previous' uses
    ref0 = scan_by_expansion(scan_reference, *ins, True, zero)
    out0 = scan_chunked(*ins, True, zero)
    keep = [t for t in range(31) if t != 3]
    assert (out0[..., keep] - ref0[..., keep]).abs().max() <= tol * ref0.abs().max()


def test_previous_form_is_the_scan_whose_copies_follow_each_token():
    """hold_from='previous': token t is read at its own step and its state carried over hold_t - 1 copies after it."""
    ins = inputs(b=2, d=3, L=9, n=4)
    hold = torch.tensor([[1.0, 3, 1, 2, 1, 1, 4, 1, 2], [2.0, 1, 1, 1, 3, 1, 1, 2, 1]], dtype=torch.float64)
    got = scan(*ins, True, hold, hold_from="previous")
    for b in range(2):
        counts = hold[b].long().tolist()
        src = [t for t, c in enumerate(counts) for _ in range(c)]
        first = [sum(counts[:t]) for t in range(9)]
        one = [t[b:b + 1] if t.dim() == 3 else t for t in ins]
        ex = [t[..., src] if t.dim() == 3 and t.shape[0] == 1 else t for t in one]
        ref = scan_reference(*ex, True)[..., first]
        assert torch.allclose(got[b:b + 1], ref, atol=1e-12)
    small = [t[:1, :2, :5].detach().clone().requires_grad_() if t.dim() == 3 else t[:2].detach().clone().requires_grad_()
             for t in inputs(b=1, d=2, L=5, n=2)]
    small[2] = inputs(b=1, d=2, L=5, n=2)[2].requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: scan_hold_previous(selective_scan, *a, True, hold[:1, :5]), small,
                                    atol=1e-6, fast_mode=True)


def test_default_chunk_follows_the_batch():
    ins = inputs(b=1, d=384, L=5, n=16, dtype=torch.float32)
    assert ss._Scan(*ins, True, None).chunk() == 64
    ins = inputs(b=8, d=384, L=5, n=16, dtype=torch.float32)
    assert ss._Scan(*ins, True, None).chunk() == 8


def test_output_is_laid_out_token_major():
    ins = inputs(b=2, d=6, L=11, n=3, dtype=torch.float32)
    y = selective_scan(*ins, True)
    assert y.shape == (2, 6, 11) and y.transpose(1, 2).is_contiguous()
    assert torch.allclose(y, scan_reference(*ins, True), atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_both_directions_of_a_mixer_equal_reference_scans(dtype, tol):
    """BiMamba's forward and flipped scans, each against the reference on its own direction's inputs."""
    torch.manual_seed(0)
    mixer = BiMamba(16, d_state=4).to(dtype).eval()
    h = torch.randn(2, 13, 16, dtype=dtype)
    with torch.no_grad():
        _, y_f, y_b = mixer(h, return_scan=True)
        xz = mixer.in_proj(h)
        for y, suffix, seq in ((y_f, "", xz), (y_b, "_b", xz.flip(1))):
            conv, x_proj, dt_proj = (getattr(mixer, n + suffix) for n in ("conv1d", "x_proj", "dt_proj"))
            A_log, D = (mixer.A_log, mixer.D) if suffix == "" else (mixer.A_b_log, mixer.D_b)
            x, z = seq.chunk(2, dim=-1)
            x = causal_conv_silu(x.transpose(1, 2).contiguous(), conv)  # the nn.Conv1d path
            dt, Bm, Cm = x_proj(x.transpose(1, 2)).split([mixer.dt_rank, 4, 4], dim=-1)
            # the mixer takes A, D and the bias in fp32 (as mamba-ssm does), so does this
            ref = scan_reference(x, (dt @ dt_proj.weight.t()).transpose(1, 2), -torch.exp(A_log.float()),
                                 Bm.transpose(1, 2), Cm.transpose(1, 2), D.float(), z.transpose(1, 2),
                                 dt_proj.bias.float(), True)
            ref = ref if suffix == "" else ref.flip(-1)
            assert (y - ref).abs().max() <= tol * ref.abs().max()


def test_token_major_conv_equals_conv1d():
    conv = nn.Conv1d(8, 8, 4, groups=8, padding=3, bias=True)
    x = torch.randn(2, 10, 8)
    ref = F.silu(conv(x.transpose(1, 2))[..., :10]).transpose(1, 2)
    assert torch.allclose(causal_conv_silu_tokens(x, conv), ref, atol=1e-6)
    xg = x.clone().requires_grad_()
    causal_conv_silu_tokens(xg, conv).sum().backward()
    assert xg.grad is not None and conv.weight.grad is not None


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_previous_form_in_one_scan_equals_the_token_pairs(dtype, tol):
    """The CPU forward of hold_from='previous' (one plain scan with a combined delta and, after carried gaps, a
    combined input) equals the token-pair form through the held scan, across chunk boundaries."""
    ins = inputs(b=3, d=5, L=31, n=4, dtype=dtype)
    hold = mixed_holds(3, 31).to(dtype)
    ref = scan_hold_previous(scan_reference_held, *ins, True, hold)
    for chunk in (None, 1, 4, 8):
        out = scan_chunked(*ins, True, hold, chunk=chunk, hold_previous=True)
        assert (out - ref).abs().max() <= tol * ref.abs().max()
    assert torch.allclose(selective_scan(*ins, True, hold, True), scan_chunked(*ins, True, hold, hold_previous=True))


def scan_reference_held(*args):
    return scan_by_expansion(scan_reference, *args)
