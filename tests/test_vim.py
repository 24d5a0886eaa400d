"""Vision Mamba: the CPU scan against a step-by-step reference (values and gradients), the scan's MAC formula in
the FLOP counter, a hustvl/Vim-layout checkpoint through ``model.checkpoint`` against an independent functional
forward, every registered vim builder, training through the scan, and the data config."""
import compress  # noqa: F401  (first: torchvision guard before timm)

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from compress.errors import CompressError
from compress.measure import count_gmacs, count_params
from compress.models.build import build_model
from compress.models import selective_scan as scan_module
from compress.models.selective_scan import (scan_by_expansion, scan_chunked, scan_chunked_backward, scan_macs,
                                           scan_reference, selective_scan)
from compress.models.vim import VisionMamba, layer_macs_per_token, vim_geometry
from compress.recipe import ModelConfig
from compress.registry import MODELS

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, d_state=4, num_classes=5)


def scan_inputs(b=2, d=5, L=23, n=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    A = -torch.rand(d, n, generator=g, dtype=dtype) * 4 - 0.1
    return r(b, d, L), r(b, d, L), A, r(b, n, L), r(b, n, L), r(d), r(b, d, L), r(d)


# ---- the scan ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_chunked_scan_equals_the_step_by_step_reference(chunk, dtype, tol):
    u, delta, A, B, C, D, z, bias = scan_inputs(dtype=dtype)
    for extra in [(D, z, bias, True), (None, None, None, False)]:
        d = delta if extra[3] else delta.abs()
        ref = scan_reference(u, d, A, B, C, *extra)
        out = scan_chunked(u, d, A, B, C, *extra, chunk=chunk)
        assert out.dtype == dtype and out.shape == u.shape
        assert torch.allclose(out, ref, atol=tol, rtol=tol), (out - ref).abs().max()


def test_reference_is_the_recurrence_written_out():
    """Two steps by hand: h1 = dt1 B1 u1; h2 = exp(dt2 A) h1 + dt2 B2 u2; y = C h + D u, times silu(z)."""
    u, delta, A, B, C, D, z, bias = scan_inputs(b=1, d=1, L=2, n=2)
    dt = F.softplus(delta + bias[None, :, None])[0, 0]
    h1 = dt[0] * B[0, :, 0] * u[0, 0, 0]
    h2 = torch.exp(dt[1] * A[0]) * h1 + dt[1] * B[0, :, 1] * u[0, 0, 1]
    y = torch.stack([C[0, :, 0] @ h1, C[0, :, 1] @ h2]) + D[0] * u[0, 0]
    y = y * F.silu(z[0, 0])
    assert torch.allclose(scan_reference(u, delta, A, B, C, D, z, bias, True)[0, 0], y, atol=1e-12)


def test_scan_op_gradients_match_finite_differences():
    inputs = [t.requires_grad_() for t in scan_inputs(b=1, d=2, L=6, n=2)]
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, True), inputs, atol=1e-6, fast_mode=True)
    u, delta, A, B, C = [t.detach().clone().requires_grad_() for t in inputs[:5]]
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, None, None, None, False),
                                    [u, delta.abs().detach().requires_grad_(), A, B, C], atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("keep_states", [True, False])
@pytest.mark.parametrize("softplus,present", [(True, [1] * 8), (False, [1, 1, 1, 1, 1, 0, 0, 0]),
                                              (True, [1, 1, 1, 1, 1, 1, 0, 0]), (False, [1, 1, 1, 1, 1, 0, 1, 1])])
def test_written_out_backward_equals_autograd_through_the_reference(monkeypatch, keep_states, softplus, present):
    monkeypatch.setattr(scan_module, "KEEP_STATES", 2**30 if keep_states else 0)  # keep states / recompute chunks
    args = list(scan_inputs(b=2, d=3, L=13, n=4))
    if not softplus:
        args[1] = args[1].abs()
    ins = [a.requires_grad_() if p else None for a, p in zip(args, present)]
    grad = torch.randn(2, 3, 13, dtype=torch.float64)
    ref = torch.autograd.grad(scan_reference(*ins, softplus), [t for t in ins if t is not None], grad)
    got = scan_chunked_backward(grad, *[t.detach() if t is not None else None for t in ins], softplus, chunk=5)
    assert [g is not None for g in got] == [bool(p) for p in present]
    for r, g in zip(ref, [g for g in got if g is not None]):
        assert torch.allclose(r, g, atol=1e-12)


def holds(b, L, seed=3):
    """Per-row different hold counts 1..4, so the expanded rows have different lengths."""
    return torch.randint(1, 5, (b, L), generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_held_scan_equals_the_reference_over_the_expanded_sequence(chunk):
    """hold = s: the token's s copies in a row, summed in one step (CPU), = the plain scan over the copies."""
    u, delta, A, B, C, D, z, bias = scan_inputs(L=17)
    hold = holds(2, 17)
    assert hold[0].sum() != hold[1].sum()
    ref = scan_by_expansion(scan_reference, u, delta, A, B, C, D, z, bias, True, hold)
    got = scan_chunked(u, delta, A, B, C, D, z, bias, True, hold, chunk=chunk)
    assert torch.allclose(got, ref, atol=1e-12)
    assert torch.allclose(selective_scan(u, delta, A, B, C, D, z, bias, True, torch.ones_like(hold)),
                          scan_chunked(u, delta, A, B, C, D, z, bias, True), atol=1e-14)  # hold 1 = no hold
    assert not torch.allclose(got, scan_chunked(u, delta, A, B, C, D, z, bias, True), atol=1e-3)
    with pytest.raises(ValueError, match="A < 0"):  # the closed form sums a decaying geometric series
        scan_chunked(u, delta, -A, B, C, D, z, bias, True, hold)


def test_expansion_repeats_each_token_and_reads_its_last_copy():
    u = torch.arange(3.0).view(1, 1, 3)
    seen = {}

    def spy(u, *rest):
        seen["u"] = u
        return u * 10
    out = scan_by_expansion(spy, u, u, None, u[:, :1], u[:, :1], hold=torch.tensor([[2.0, 1.0, 3.0]]))
    assert seen["u"].tolist() == [[[0, 0, 1, 2, 2, 2]]] and out.tolist() == [[[0, 10, 20]]]


@pytest.mark.parametrize("keep_states", [True, False])
def test_held_scan_backward_equals_autograd_through_the_expanded_reference(monkeypatch, keep_states):
    monkeypatch.setattr(scan_module, "KEEP_STATES", 2**30 if keep_states else 0)
    ins = [t.requires_grad_() for t in scan_inputs(b=2, d=3, L=13, n=4)]
    hold = holds(2, 13)
    grad = torch.randn(2, 3, 13, dtype=torch.float64)
    ref = torch.autograd.grad(scan_by_expansion(scan_reference, *ins, True, hold), ins, grad)
    got = torch.autograd.grad(selective_scan(*ins, True, hold), ins, grad)  # the op, written-out backward
    for r, g in zip(ref, got):
        assert torch.allclose(r, g, atol=1e-12)
    small = [t.detach().clone().requires_grad_() for t in scan_inputs(b=1, d=2, L=6, n=2)]
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, True, holds(1, 6)), small, atol=1e-6,
                                    fast_mode=True)


def test_held_scan_in_fp32_is_close_to_fp64_at_small_steps():
    """The hold's input factor (1 - e^{sx}) / (1 - e^x) loses ~eps/|x| in fp32 where x = delta*A is small: values and
    gradients stay within 1e-5 at steps ~0.05 and within 1e-3 at steps ~1e-4 (ten times below Mamba's dt_min)."""
    u, delta, A, B, C, D, z, bias = scan_inputs(b=2, d=8, L=30, n=8)
    hold, grad = holds(2, 30), torch.randn(2, 8, 30, dtype=torch.float64)
    for shift, tol in ((-3.0, 1e-5), (-9.0, 1e-3)):  # softplus steps ~0.05 and ~1e-4
        args = (u, delta, A, B, C, D, z, bias + shift)
        args32 = [t.float() for t in args]
        ref = [scan_chunked(*args, True, hold)] + list(scan_chunked_backward(grad, *args, True, hold))
        got = [scan_chunked(*args32, True, hold.float())] + list(
            scan_chunked_backward(grad.float(), *args32, True, hold.float()))
        for r, g in zip(ref, got):
            assert ((r - g.double()).norm() / r.norm()) < tol


def test_flop_counter_counts_the_scan_with_the_documented_formula():
    u, delta, A, B, C, D, z, bias = [t.float() for t in scan_inputs(b=3, d=6, L=17, n=5)]
    with FlopCounterMode(display=False) as fc:
        selective_scan(u, delta, A, B, C, D, z, bias, True)
    assert fc.get_total_flops() == 2 * 3 * 6 * 17 * 4 * 5  # FLOPs = 2 x MACs, 4 MACs per (b, d, l, n)
    with FlopCounterMode(display=False) as fc:
        selective_scan(u, delta, A, B, C, None, None, None, False)  # D and the gate are elementwise: not counted
    assert fc.get_total_flops() == 2 * scan_macs(3, 6, 17, 5) == 2 * 3 * 6 * 17 * 20
    with FlopCounterMode(display=False) as fc:  # the hold's input factor is elementwise too
        selective_scan(u, delta, A, B, C, D, z, bias, True, torch.full((3, 17), 2.0))
    assert fc.get_total_flops() == 2 * scan_macs(3, 6, 17, 5)


@pytest.mark.parametrize("img_size", [32, 48])
def test_model_gmacs_are_the_analytic_count_and_grow_with_tokens(img_size):
    torch.manual_seed(0)
    m = MODELS.get("vim_custom")(**{**TINY, "img_size": img_size}).eval()
    g = vim_geometry(m)
    tokens = g["num_patches"] + 1
    patch = g["num_patches"] * 3 * 8 * 8 * g["dim"]
    head = g["dim"] * 5
    conv_pad = 2 * (g["d_conv"] - 1) * g["d_inner"] * g["d_conv"]  # the causal conv also computes 3 padded outputs
    expected = (patch + g["depth"] * (tokens * layer_macs_per_token(g) + conv_pad) + head) / 1e9
    got = count_gmacs(m, torch.randn(1, 3, img_size, img_size))
    assert got == pytest.approx(expected, rel=1e-9)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(torch.randn(1, 3, img_size, img_size))
    scan = fc.get_flop_counts()["Global"][torch.ops.compress.selective_scan]
    assert scan == 2 * g["depth"] * 2 * scan_macs(1, g["d_inner"], tokens, g["d_state"])


# ---- checkpoints in hustvl/Vim's layout -------------------------------------------------------------------------


def hustvl_state_dict(dim, depth, d_state, patch, num_patches, num_classes, seed=0):
    """A random state dict written from hustvl/Vim's key names and shapes (bimamba v2, middle class token)."""
    g = torch.Generator().manual_seed(seed)
    e, r, k = 2 * dim, -(-dim // 16), 4
    shapes = {"patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
              "pos_embed": (1, num_patches + 1, dim), "cls_token": (1, 1, dim), "norm_f.weight": (dim,),
              "head.weight": (num_classes, dim), "head.bias": (num_classes,)}
    for i in range(depth):
        p = f"layers.{i}."
        shapes[p + "norm.weight"] = (dim,)
        shapes[p + "mixer.in_proj.weight"] = (2 * e, dim)
        shapes[p + "mixer.out_proj.weight"] = (dim, e)
        for s, a in (("", "A_log"), ("_b", "A_b_log")):
            shapes[p + f"mixer.conv1d{s}.weight"] = (e, 1, k)
            shapes[p + f"mixer.conv1d{s}.bias"] = (e,)
            shapes[p + f"mixer.x_proj{s}.weight"] = (r + 2 * d_state, e)
            shapes[p + f"mixer.dt_proj{s}.weight"] = (e, r)
            shapes[p + f"mixer.dt_proj{s}.bias"] = (e,)
            shapes[p + f"mixer.{a}"] = (e, d_state)
            shapes[p + f"mixer.D{s}"] = (e,)
    sd = {name: torch.randn(*shape, generator=g) * 0.3 for name, shape in shapes.items()}
    for name in sd:
        if name.endswith("norm.weight") or name == "norm_f.weight":
            sd[name] = 1 + 0.1 * sd[name]
        if "A_log" in name or "A_b_log" in name:
            sd[name] = torch.log(torch.arange(1, d_state + 1).float()).repeat(e, 1) + 0.1 * sd[name]
    return sd


def reference_logits(sd, x, depth, patch, d_state):
    """Vim's forward written out from the paper and hustvl's layout, independent of compress.models.vim."""
    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def scan(u, delta, A, B, C):  # (L, e) per image, loops
        h, ys = torch.zeros(u.shape[1], A.shape[1]), []
        for t in range(u.shape[0]):
            h = torch.exp(delta[t, :, None] * A) * h + delta[t, :, None] * B[t][None] * u[t, :, None]
            ys.append(h @ C[t])
        return torch.stack(ys)

    def mixer(h, p):
        xz = h @ sd[p + "in_proj.weight"].T
        x, z = xz.chunk(2, dim=-1)
        outs = []
        for s, a, flip in (("", "A_log", False), ("_b", "A_b_log", True)):
            xs, zs = (x.flip(0), z.flip(0)) if flip else (x, z)
            L, e = xs.shape
            w = sd[p + f"conv1d{s}.weight"]  # (e, 1, 4): out_t = sum_j w[j] x_{t-3+j}
            padded = torch.cat([xs.new_zeros(3, e), xs])
            xc = F.silu(sum(padded[j:j + L] * w[:, 0, j] for j in range(4)) + sd[p + f"conv1d{s}.bias"])
            dbc = xc @ sd[p + f"x_proj{s}.weight"].T
            rnk = sd[p + f"dt_proj{s}.weight"].shape[1]
            dt, B, C = dbc[:, :rnk], dbc[:, rnk:rnk + d_state], dbc[:, rnk + d_state:]
            delta = F.softplus(dt @ sd[p + f"dt_proj{s}.weight"].T + sd[p + f"dt_proj{s}.bias"])
            y = scan(xc, delta, -torch.exp(sd[p + a]), B, C) + xc * sd[p + f"D{s}"]
            y = y * F.silu(zs)
            outs.append(y.flip(0) if flip else y)
        return ((outs[0] + outs[1]) / 2) @ sd[p + "out_proj.weight"].T

    logits = []
    for img in x:
        tok = F.conv2d(img[None], sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
        tok = tok.flatten(2)[0].T
        mid = tok.shape[0] // 2
        seq = torch.cat([tok[:mid], sd["cls_token"][0], tok[mid:]]) + sd["pos_embed"][0]
        hidden, residual = seq, None
        for i in range(depth):
            residual = hidden if residual is None else residual + hidden
            hidden = mixer(rms(residual, sd[f"layers.{i}.norm.weight"]), f"layers.{i}.mixer.")
        feat = rms(residual + hidden, sd["norm_f.weight"])[mid]
        logits.append(feat @ sd["head.weight"].T + sd["head.bias"])
    return torch.stack(logits)


def test_hustvl_checkpoint_loads_through_model_checkpoint_and_gives_the_reference_logits(tmp_path):
    sd = hustvl_state_dict(dim=32, depth=2, d_state=4, patch=8, num_patches=16, num_classes=5)
    path = tmp_path / "vim_tiny_midclstok.pth"
    torch.save({"model": sd, "epoch": 299}, path)  # hustvl wraps the weights in {"model": ...}
    model = build_model(ModelConfig(name="vim_custom", checkpoint=path, kwargs=TINY)).eval()
    assert set(model.state_dict()) == set(sd)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, reference_logits(sd, x, depth=2, patch=8, d_state=4), atol=1e-4, rtol=1e-4)


def test_a_checkpoint_of_another_size_is_one_clear_error(tmp_path):
    sd = hustvl_state_dict(dim=32, depth=3, d_state=4, patch=8, num_patches=16, num_classes=5)
    path = tmp_path / "other.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CompressError, match=r"model.checkpoint: .* 1 unexpected keys|unexpected keys"):
        build_model(ModelConfig(name="vim_custom", checkpoint=path, kwargs=TINY))


# ---- every registered builder ---------------------------------------------------------------------------------

VIM_BUILDERS = [n for n in MODELS.names() if n.startswith("vim_")]
FULL_PARAMS = {"vim_tiny_patch16_224": 7.1e6, "vim_small_patch16_224": 25.8e6}  # hustvl: 7 M and 26 M


def test_the_vim_builders_are_registered():
    assert {"vim_tiny_patch16_224", "vim_small_patch16_224", "vim_custom"} <= set(VIM_BUILDERS)


@pytest.mark.parametrize("name", VIM_BUILDERS)
def test_every_vim_builder_builds_and_runs(name):
    if name in FULL_PARAMS:  # full size: parameters as published; the forward runs at tiny kwargs below
        full = MODELS.get(name)()
        assert count_params(full) == pytest.approx(FULL_PARAMS[name], rel=0.01)
        assert full.pretrained_cfg["input_size"] == (3, 224, 224) and full.num_classes == 1000
    torch.manual_seed(0)
    m = MODELS.get(name)(**TINY).eval()
    assert isinstance(m, VisionMamba)
    with torch.no_grad():
        out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    with pytest.raises(CompressError, match="model.pretrained"):
        MODELS.get(name)(pretrained=True)


def test_data_config_and_input_checks():
    import timm.data

    m = MODELS.get("vim_custom")(**TINY)
    cfg = timm.data.resolve_data_config({}, model=m)
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.485, 0.456, 0.406)
    assert m.patch_embed.img_size == (32, 32) and m.num_classes == 5
    with pytest.raises(CompressError, match="32x32"):
        m(torch.randn(1, 3, 40, 40))


def test_a_training_step_reaches_every_parameter_through_the_scan():
    torch.manual_seed(0)
    m = MODELS.get("vim_custom")(**TINY).train()
    loss = F.cross_entropy(m(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_class_token_sits_in_the_middle_and_is_the_feature():
    """Changing only the class token's pos-embed row changes the logits; the head reads index num_patches // 2."""
    torch.manual_seed(0)
    m = MODELS.get("vim_custom")(**TINY).eval()
    assert m.cls_position == 8
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tokens = m.embed(x)
        assert torch.allclose(tokens[0, 8], (m.cls_token + m.pos_embed[:, 8])[0, 0])
