"""ToP-ViM on tiny Vims: selection and gaps against hand-made/naive references, the alignment against a full-length
scan whose pruned positions hold the kept token, nothing pruned = dense, order and middle class token, fewer tokens and
GMACs, alignment on/off and random differ, detach, export round trip, bad configs, and the weight pruners on Vim."""
import compress  # noqa: F401  (first: torchvision guard before timm)

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from compress.errors import CompressError
from compress.export import save
from compress.measure import count_gmacs
from compress.models.build import model_spec
from compress.models.selective_scan import scan, scan_reference, selective_scan
from compress.models.vim import VisionMamba
from compress.pruners.base import build_pruner
from compress.pruners.token.top_vim import TopVimVisionMamba, default_layers, gap_holds, importance, select
from compress.registry import MODELS
from conftest import only_run

KW = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, d_state=4, num_classes=6)  # 64 patches + class


def vim(**over):
    torch.manual_seed(0)
    return MODELS.get("vim_custom")(**{**KW, **over}).eval()


def attach(model, **params):
    pruner = build_pruner({"name": "top_vim", **params})
    pruner.attach(model)
    return pruner


def images(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---- the pieces ------------------------------------------------------------------------------------------------


def test_select_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 11, generator=g)
    cls, k = 5, 6
    got = select(scores, cls, k)
    for b in range(4):
        patches = [i for i in range(11) if i != cls]
        top = sorted(sorted(patches, key=lambda i: -float(scores[b, i]))[:k])
        assert got[b].tolist() == top[: k // 2] + [cls] + top[k // 2:]


def test_gap_holds_on_a_hand_example():
    # 8 patches, class token at sequence position 4; kept patch ordinals 1, 2, 5, 7 -> sequence 1, 2, 6, 8
    index = torch.tensor([[1, 2, 4, 6, 8]])  # class token re-inserted at index 2 (= k // 2)
    fwd, bwd = gap_holds(index, cls=2, cls_orig=4, num_patches=8)
    assert fwd.tolist() == [[2, 1, 1, 3, 2]]  # 1 + pruned patches just before, forward order
    assert bwd.tolist() == [[1, 3, 1, 2, 1]]  # 1 + pruned patches just after (= before, in the flipped scan)


def _hold_reference(u, raw, A, B, C, D, z, bias, kept):
    """Full-length scan whose pruned positions hold the next kept token (its u, delta, B), outputs at the kept ones."""
    L = u.shape[-1]
    nxt = torch.searchsorted(kept, torch.arange(L)).clamp(max=len(kept) - 1)
    held = lambda t: t[..., kept][..., nxt]  # noqa: E731
    delta = F.softplus(raw + bias[None, :, None])
    return scan_reference(held(u), held(delta), A, held(B), C, D, held(z), None, False)[..., kept]


def test_alignment_is_the_scan_that_holds_each_kept_token_over_its_gap():
    """The aligned scan over the kept tokens equals the full-length scan whose pruned positions are copies of the
    next kept token, at small and at large steps (where stretching the step, Mamba's Euler form of the hold, drifts);
    naive dropping does not."""
    g = torch.Generator().manual_seed(0)
    b, d, n, L = 2, 3, 4, 12
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u, raw, B, C, z = r(b, d, L), r(b, d, L), r(b, n, L), r(b, n, L), r(b, d, L)
    A, D, bias = -torch.rand(d, n, generator=g, dtype=torch.float64) * 3, r(d), r(d)
    kept = torch.tensor([1, 2, 5, 6, 10])
    hold = (kept - torch.cat([torch.tensor([-1]), kept[:-1]])).double().expand(b, -1).contiguous()
    for step in (0.01, 1.0):  # softplus(x + log s) ~ s softplus(x) for small s
        ref = _hold_reference(u, raw, A, B, C, D, z, bias + math.log(step), kept)
        args = (u[..., kept], raw[..., kept], A, B[..., kept], C[..., kept], D, z[..., kept], bias + math.log(step),
                True)
        assert torch.allclose(selective_scan(*args, hold), ref, atol=1e-12)
        assert (selective_scan(*args) - ref).norm() > 0.05 * ref.norm()


def _previous_reference(u, raw, A, B, C, D, z, bias, kept):
    """Full-length scan from the first kept position whose pruned positions hold the *previous* kept token (its u,
    delta, B, C, z), outputs at the kept ones."""
    L = u.shape[-1]
    pos = torch.arange(int(kept[0]), L)
    prev = torch.searchsorted(kept, pos, right=True) - 1
    held = lambda t: t[..., kept][..., prev]  # noqa: E731
    delta = F.softplus(raw + bias[None, :, None])
    out = scan_reference(held(u), held(delta), A, held(B), held(C), D, held(z), None, False)
    return out[..., kept - kept[0]]


def test_previous_alignment_carries_the_state_of_the_token_before_each_gap():
    """align 'previous': the aligned scan over the kept tokens equals the full-length scan whose pruned positions are
    copies of the kept token before them (read at the kept positions), at small and large steps; with the scan op's
    written-out backward, gradients match autograd through that reference."""
    g = torch.Generator().manual_seed(1)
    b, d, n, L = 2, 3, 4, 13
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u, raw, B, C, z = r(b, d, L), r(b, d, L), r(b, n, L), r(b, n, L), r(b, d, L)
    A, D, bias = -torch.rand(d, n, generator=g, dtype=torch.float64) * 3, r(d), r(d)
    kept = torch.tensor([0, 2, 3, 7, 8, 11])
    after = (torch.cat([kept[1:], torch.tensor([L])]) - kept).double().expand(b, -1).contiguous()  # 1 + gap after
    for step in (0.01, 1.0):
        ref = _previous_reference(u, raw, A, B, C, D, z, bias + math.log(step), kept)
        args = (u[..., kept], raw[..., kept], A, B[..., kept], C[..., kept], D, z[..., kept], bias + math.log(step),
                True)
        got = scan(*args, after, hold_from="previous")
        assert torch.allclose(got, ref, atol=1e-12)
        assert not torch.allclose(scan(*args, after), ref, atol=1e-3)  # 'next' is another scan
    leaves = [t.clone().requires_grad_() for t in (u, raw, A, B, C, D, z, bias)]
    gout = r(b, d, len(kept))
    ref = torch.autograd.grad(_previous_reference(*leaves, kept), leaves, gout)
    l2 = [t[..., kept] if t.dim() == 3 else t for t in leaves]
    got = torch.autograd.grad(scan(*l2[:7], l2[7], True, after, hold_from="previous"), leaves, gout)
    for rr, gg in zip(ref, got):
        assert torch.allclose(rr, gg, atol=1e-10)


def test_clipping_the_mean_of_the_directions_differs_from_clipping_each():
    y_f = torch.tensor([[[1.0, -2.0], [3.0, 1.0]]])
    y_b = torch.tensor([[[-3.0, 4.0], [1.0, -1.0]]])
    assert importance(y_f, y_b, "each").tolist() == [[2.5, 2.5]] == importance(y_f, y_b, True).tolist()
    assert importance(y_f, y_b, "mean").tolist() == [[2.0, 1.0]]
    assert importance(y_f, y_b, False).tolist() == [[1.0, 1.0]]


def test_default_schedule_is_the_released_one():
    assert default_layers(24) == [10, 20]
    assert default_layers(4) == [2, 3] and default_layers(12) == [5, 10]
    p = attach(MODELS.get("vim_tiny_patch16_224")(img_size=32, depth=24, embed_dim=16, d_state=2))
    assert p.layers == [10, 20] and p.keep == 0.8 and p.spec()["prune_layers"] == [10, 20]


# ---- in a model -------------------------------------------------------------------------------------------------


def test_nothing_pruned_gives_the_dense_logits():
    m = vim()
    x = images()
    with torch.no_grad():
        dense = m(x)
        p = attach(m, keep_ratio=1.0, prune_layers=[1, 2, 3])
        assert torch.equal(m(x), dense)
    assert p.trace.counts == [65, 65, 65, 65]


def test_kept_tokens_stay_in_order_with_the_class_token_in_the_middle_and_later_layers_see_fewer():
    m = vim()
    p = attach(m, keep_ratio=0.5, prune_layers=[1, 3])
    with torch.no_grad():
        m(images())
    assert p.trace.counts == [65, 33, 33, 17] == p.expected_tokens()
    index, cls = p.trace.index, p.trace.cls
    assert index.shape == (3, 17) and cls == 8
    assert (index[:, cls] == m.cls_position).all()  # the class token, at the middle of the 17 tokens
    patches = torch.cat([index[:, :cls], index[:, cls + 1:]], dim=1)
    assert (patches[:, 1:] > patches[:, :-1]).all()  # spatial order kept
    assert (patches != m.cls_position).all()
    assert not torch.equal(index[0], index[1])  # chosen per image


def test_the_layers_after_a_pruning_layer_run_on_fewer_tokens():
    m = vim()
    attach(m, keep_ratio=0.5, prune_layers=[2])
    seen = []
    hooks = [layer.mixer.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
             for layer in m.layers]
    with torch.no_grad():
        m(images())
    for h in hooks:
        h.remove()
    assert seen == [65, 65, 33, 33]


def test_gmacs_fall_as_planned():
    m = vim()
    x = images(1)
    dense = count_gmacs(m, x)
    p = attach(m, target_gmacs_ratio=0.6, prune_layers=[1, 2])
    pruned = count_gmacs(m, x)
    assert p.expected_macs_ratio() == pytest.approx(0.6, abs=0.02)
    assert pruned / dense == pytest.approx(p.expected_macs_ratio(), abs=0.03)  # + patch embed, head, conv padding
    assert pruned < 0.7 * dense
    naive = vim()
    attach(naive, target_gmacs_ratio=0.6, prune_layers=[1, 2], align=False)
    assert count_gmacs(naive, x) == pytest.approx(pruned, rel=1e-12)  # alignment is elementwise: same count


def test_alignment_and_random_dropping_change_the_output_but_not_the_token_counts():
    x = images()
    outs, counts = {}, {}
    for label, params in {"aligned": {}, "naive": {"align": False}, "random": {"mode": "random"},
                          "previous": {"align": "previous"}, "mean clip": {"clip": "mean"}}.items():
        m = vim()
        p = attach(m, keep_ratio=0.5, prune_layers=[1, 2], **params)
        torch.manual_seed(0)
        with torch.no_grad():
            outs[label] = m(x)
        counts[label] = p.trace.counts
    assert counts["aligned"] == counts["naive"] == counts["random"] == counts["previous"] == [65, 33, 17, 17]
    assert not torch.allclose(outs["aligned"], outs["naive"], atol=1e-5)
    assert not torch.allclose(outs["aligned"], outs["previous"], atol=1e-5)
    assert not torch.allclose(outs["previous"], outs["naive"], atol=1e-5)
    assert not torch.allclose(outs["aligned"], outs["mean clip"], atol=1e-5)
    assert not torch.allclose(outs["aligned"], outs["random"], atol=1e-5)


@pytest.mark.parametrize("align", [True, "previous"])
def test_training_through_the_pruned_model_reaches_the_weights(align):
    m = vim().train()
    attach(m, keep_ratio=0.5, prune_layers=[1], align=align)
    F.cross_entropy(m(images(4)), torch.tensor([0, 1, 2, 3])).backward()
    assert m.layers[3].mixer.A_b_log.grad.abs().sum() > 0 and m.pos_embed.grad.abs().sum() > 0


def test_detach_restores_the_dense_model():
    m = vim()
    x = images()
    with torch.no_grad():
        dense = m(x)
        p = attach(m, keep_ratio=0.5)
        assert type(m) is TopVimVisionMamba and not torch.allclose(m(x), dense)
        p.detach(m)
        assert type(m) is VisionMamba and "_top_vim" not in m.__dict__
        assert torch.equal(m(x), dense)


def test_export_and_load_replay_the_pruner(tmp_path):
    m = vim()
    p = attach(m, target_gmacs_ratio=0.55, prune_layers=[1, 2], align=True)
    out = save(m, tmp_path / "export", model_spec("vim_custom", KW), [p], input_size=(3, 32, 32))
    loaded = compress.load(out)
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
    assert type(loaded) is TopVimVisionMamba
    assert loaded._compress_pruners[0].spec() == p.spec() and p.spec()["target_gmacs_ratio"] is None
    dense = compress.load(out, with_pruners=False)
    p.detach(m)
    with torch.no_grad():
        assert torch.equal(dense(x), m(x))


# ---- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params,match", [
    ({"keep_ratio": 0.0}, r"stages\[0\]\.pruner\.keep_ratio"),
    ({"keep_ratio": 1.5}, r"stages\[0\]\.pruner\.keep_ratio"),
    ({"keep_ratio": 0.5, "target_gmacs_ratio": 0.5}, "only one of"),
    ({"prune_layers": [0]}, "1-based"),
    ({"align": "before"}, r"stages\[0\]\.pruner\.align"),
    ({"clip": "max"}, r"stages\[0\]\.pruner\.clip"),
    ({"keep": 0.5}, "unknown key"),
])
def test_bad_configs_name_the_key(params, match):
    with pytest.raises(CompressError, match=match):
        build_pruner({"name": "top_vim", **params}, where="stages[0].pruner")


def test_model_dependent_errors_name_the_stage_before_anything_runs():
    from compress.recipe import recipe_from_dict
    from compress.run import check_pruners

    recipe = recipe_from_dict({
        "name": "t", "model": {"name": "vim_custom", "kwargs": KW}, "data": {"kind": "quickstart"},
        "stages": [{"kind": "prune", "pruner": {"name": "top_vim", "prune_layers": [2, 4]}}]}, "t.yaml")
    with pytest.raises(CompressError, match=r"stages\[0\]\.pruner: prune_layers: layer 4 is past"):
        check_pruners(recipe, vim())
    with pytest.raises(ValueError, match="target_gmacs_ratio"):
        attach(vim(), prune_layers=[3], target_gmacs_ratio=0.3)


def test_attaching_to_a_vit_or_twice_is_a_clear_error(tiny_vit):
    with pytest.raises(CompressError, match="needs a Vision Mamba"):
        attach(tiny_vit)
    m = vim()
    attach(m)
    with pytest.raises(CompressError, match="already has a token pruner"):
        attach(m)


# ---- weight pruners on Vim's linear layers ----------------------------------------------------------------------


def test_magnitude_prunes_the_mixer_linears_and_round_trips(tmp_path):
    m = vim()
    p = build_pruner({"name": "magnitude", "sparsity": 0.5})
    p.attach(m)
    mixer = m.layers[0].mixer
    for lin in (mixer.in_proj, mixer.out_proj, mixer.x_proj, mixer.dt_proj_b):
        assert (lin.weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    assert (m.head.weight != 0).all() and (m.patch_embed.proj.weight != 0).all()
    out = save(m, tmp_path / "export", model_spec("vim_custom", KW), [p], [p.finalize(m)])
    loaded = compress.load(out)
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))


def test_fit_issp_then_top_vim_exports_a_model_that_reloads_identically(tmp_path):
    """Lightning end to end on the built-in shapes: ISS-P on the linears, then ToP-ViM with a short fine-tune."""
    from safetensors.torch import load_file

    from compress.models.build import build_from_spec, load_weights
    from compress.run import fit

    kw = {**KW, "depth": 2}
    recipe = {
        "name": "tiny_vim", "model": {"name": "vim_custom", "kwargs": kw},
        "data": {"kind": "quickstart", "batch_size": 16, "num_workers": 0, "params": {"num_train": 32, "num_val": 16}},
        "stages": [
            {"kind": "prune", "pruner": {"name": "issp", "sparsity": 0.5, "alpha": 0.5}, "max_steps": 2,
             "optimizer": {"lr": 1e-3}, "schedule": {"name": "constant"}},
            {"kind": "prune", "pruner": {"name": "top_vim", "keep_ratio": 0.5, "prune_layers": [1]}, "max_steps": 1,
             "optimizer": {"lr": 1e-3}},
        ],
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "log_every_n_steps": 1},
        "evaluate": {"enabled": True, "bench": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    metrics = fit(path, out=tmp_path / "runs")
    assert "dense" in metrics
    export = only_run(tmp_path / "runs") / "export"
    loaded = compress.load(export)
    assert [p.name for p in loaded._compress_pruners] == ["top_vim"]  # the weight pruner's mask is in the weights
    final = load_file(str(export.parent / "stages" / "1-prune" / "model.safetensors"))
    ref = build_from_spec(model_spec("vim_custom", kw)).eval()
    load_weights(ref, final, "final")
    attach(ref, keep_ratio=0.5, prune_layers=[1])
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))
    w = loaded.layers[0].mixer.in_proj.weight
    assert (w == 0).float().mean() == pytest.approx(0.5, abs=0.01)


def test_compress_bench_on_a_vim_export_reports_the_pruned_gmacs(tmp_path):
    import json

    from compress.cli import main

    m = vim()
    p = attach(m, target_gmacs_ratio=0.6, prune_layers=[1, 2])
    out = save(m, tmp_path / "export", model_spec("vim_custom", KW), [p], input_size=(3, 32, 32))
    json_path = tmp_path / "bench.json"
    assert main(["bench", "--checkpoint", str(out), "--batch-sizes", "2", "--repeats", "1", "--device", "cpu",
                 "--json", str(json_path)]) == 0
    ratios = json.loads(json_path.read_text())["ratios"]
    assert ratios["gmacs"] == pytest.approx(0.6, abs=0.05) and ratios["params"] == 1.0
