"""APTP: router pieces, gates, physical slicing (sliced == masked), the pruning loss, export round trip."""
import copy

import pytest
import torch

from diffusion_zoo import need_diffusion, tiny_model

PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a ship", "a photo of a truck"] * 2


def test_sinkhorn_balances_what_argmax_does_not():
    from compress.pruners.diffusion.router import sinkhorn

    torch.manual_seed(0)
    scores = torch.randn(64, 4) * 0.05
    scores[:, 0] += 0.2  # every prompt prefers code 0
    assert torch.bincount(scores.argmax(1), minlength=4).max() >= 60
    counts = torch.bincount(sinkhorn(scores, eps=0.05, iters=3), minlength=4)
    assert counts.min() >= 8 and counts.max() <= 32


def _skewed_scores():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(32, 4, generator=g) * 0.05
    scores[:16, 0] += 0.2  # the first half (rank 0's) prefers code 0, the second half (rank 1's) code 1
    scores[16:, 1] += 0.2
    return scores


def _sinkhorn_on_rank(rank, world):
    from compress.pruners.diffusion.router import sinkhorn

    half = _skewed_scores().chunk(world)[rank]
    return sinkhorn(half, eps=0.05, iters=3).tolist()


def test_sinkhorn_under_ddp_balances_the_global_batch(tmp_path):
    """Two gloo ranks with half a batch each assign exactly what one process assigns to the whole batch."""
    from compress.pruners.diffusion.router import sinkhorn
    from ranks import run_on_ranks

    whole = sinkhorn(_skewed_scores(), eps=0.05, iters=3).tolist()
    local = sum((sinkhorn(h, eps=0.05, iters=3).tolist() for h in _skewed_scores().chunk(2)), [])
    assert local != whole  # balancing each half alone is a different assignment
    assert sum(run_on_ranks(_sinkhorn_on_rank, tmp_path), []) == whole


def test_ordered_depth_gates_are_monotone_in_priority():
    from compress.pruners.diffusion.router import depth_order, ordered_depth_logits

    assert depth_order(14)[:6] == [13, 12, 0, 1, 11, 10]  # APTP's [-1, -2, 0, 1, -3, -4, ...]
    order = depth_order(6)
    keep = ordered_depth_logits(torch.randn(5, 6), order)
    by_priority = keep[:, order]
    assert (by_priority[:, 1:] <= by_priority[:, :-1] + 1e-5).all()


def test_contrastive_loss_prefers_architectures_that_follow_the_prompts():
    from compress.pruners.diffusion.router import contrastive_loss

    torch.manual_seed(0)
    z = torch.randn(3, 8).repeat_interleave(2, 0)  # three pairs of equal prompts
    follows = torch.randn(3, 16).repeat_interleave(2, 0)  # equal architectures for equal prompts
    assert contrastive_loss(follows, z) < 0.5 * contrastive_loss(torch.randn(6, 16), z)


@pytest.fixture(scope="module")
def attached():
    from compress.pruners.base import build_pruner

    need_diffusion()
    m = tiny_model()
    p = build_pruner({"name": "aptp", "experts": 4, "pretrain_steps": 2, "target_macs_ratio": 0.6})
    p.attach(m)
    return m, p


def _batch(m):
    from compress.tasks.diffusion import NoisyBatch

    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    cond, pooled = m.encode_prompts(PROMPTS)
    return NoisyBatch(x, torch.randint(0, 1000, (8,)), cond, pooled, torch.randn_like(x), torch.ones(8), PROMPTS)


def test_structure_has_width_groups_and_depth_pairs(attached):
    m, p = attached
    kinds = {g.kind for g in p.structure.groups}
    assert kinds == {"resnet", "heads", "ff"} and len(p.structure.pairs) == 4
    assert 0 < p.structure.prunable_macs < p.structure.total_macs
    assert [q.requires_grad for q in m.unet.parameters()] == [False] * len(list(m.unet.parameters()))


def test_pruning_loss_has_every_term_and_trains_router_and_codes(attached):
    m, p = attached
    b = _batch(m)
    params = [q for q in m.parameters() if q.requires_grad]
    assert params and all(any(q is r for r in m.aptp_router.parameters()) for q in params)
    opt = torch.optim.Adam(params, 5e-2)
    codes = m.aptp_router.codes.weight.detach().clone()
    ratios = []
    for _ in range(8):
        loss, logs = p.diffusion_loss(m.train(), b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ratios.append(float(logs["train/macs_ratio"]))
        assert set(logs) >= {"train/denoise", "train/resource", "train/contrastive", "train/distill", "train/block"}
    assert p.step == 8  # past pretrain_steps: codes + Sinkhorn routing
    assert ratios[0] < 1.0  # gated: some MACs off
    assert not torch.allclose(codes, m.aptp_router.codes.weight)  # seeded from the router, then trained


def test_sliced_experts_are_narrower_and_equal_the_masked_unet(attached):
    m, p = attached
    m = copy.deepcopy(m).eval()
    p = copy.copy(p)
    p.model, p.hooks = m, None
    from compress.pruners.diffusion.gates import GateHooks

    p.hooks = GateHooks(m.unet, p.structure)
    wc, dc = p.expert_gates(m)
    g = torch.Generator().manual_seed(3)
    wc = (torch.rand(wc.shape, generator=g) > 0.4).float()
    start = 0
    for grp in p.structure.groups:  # at least one gate per group, as the router guarantees
        wc[:, start] = 1
        start += grp.n
    dc = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.float)
    p.expert_gates = lambda model: (wc, dc)
    b = _batch(m)
    masked = []
    with torch.no_grad():
        for k in range(4):
            p.hooks.set(wc[k:k + 1].expand(2, -1), dc[k:k + 1].expand(2, -1))
            masked.append(m(b.noisy[:2], b.t[:2], b.cond[:2]))
        p.hooks.set(None, None)
    p.filter_prompts(m, PROMPTS)
    dense_params = sum(q.numel() for q in m.unet.parameters())
    p.slice(m)
    for k, expert in enumerate(m.unet.experts):
        with torch.no_grad():
            out = expert(b.noisy[:2], b.t[:2], encoder_hidden_states=b.cond[:2]).sample
        torch.testing.assert_close(out, masked[k], atol=2e-5, rtol=1e-4)
        if k != 1:
            assert sum(q.numel() for q in expert.parameters()) < dense_params
    attn = m.unet.experts[0].down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.heads < 2 or attn.to_q.out_features < 16  # a head removed, or none to remove
    assert type(m.unet.experts[2].up_blocks[1].resnets[2]).__name__ == "SkipResnet"  # depth gate off


def test_export_round_trip_rebuilds_router_and_experts(attached, tmp_path):
    import compress
    from compress.export import save
    from compress.models.build import model_spec
    from compress.tasks.diffusion import Diffusion

    m, p = attached
    m, p = copy.deepcopy(m).eval(), copy.deepcopy(p)
    p.model = m
    from compress.pruners.diffusion.gates import GateHooks

    p.hooks = GateHooks(m.unet, p.structure)
    p.filter_prompts(m, PROMPTS)
    edits = p.finalize(m)
    task = Diffusion()
    task.check_model(m, "test")
    from diffusion_zoo import TINY

    save(m, tmp_path / "export", model_spec("unet_small", TINY), [p], [edits], task=task, input_size=m.latent_shape())
    loaded = compress.load(tmp_path / "export")
    assert type(loaded.unet).__name__ == "RoutedUNets" and len(loaded.unet.experts) == 4
    b = _batch(m)
    route = loaded.route(b.pooled)
    assert torch.equal(route, m.route(b.pooled))
    with torch.no_grad():
        torch.testing.assert_close(loaded(b.noisy, b.t, b.cond, route), m(b.noisy, b.t, b.cond, route))
    images = loaded.generate(["a photo of a cat"], steps=2)
    assert images.shape == (1, 3, 16, 16)

    # the experts' fine-tune matches each expert's block outputs with the full UNet's on that expert's samples
    from compress.diffusion_losses import block_loss, capture_blocks, unet_blocks

    full = copy.deepcopy(attached[0]).eval()
    with torch.no_grad():
        with capture_blocks(full.unet) as t_calls:
            full(b.noisy, b.t, b.cond)
        with capture_blocks(loaded.unet) as s_calls:
            loaded(b.noisy, b.t, b.cond, route)
        got = block_loss(s_calls, t_calls[0], route)
        want, n = 0.0, 0
        for k in route.unique().tolist():
            idx = (route == k).nonzero().squeeze(1)
            alone, ref = [], []
            hooks = [blk.register_forward_hook(lambda m_, a, o: alone.append(o[0] if isinstance(o, tuple) else o))
                     for blk in unet_blocks(loaded.unet.experts[k])]
            hooks += [blk.register_forward_hook(lambda m_, a, o: ref.append(o[0] if isinstance(o, tuple) else o))
                      for blk in unet_blocks(full.unet)]
            loaded.unet.experts[k](b.noisy[idx], b.t[idx], encoder_hidden_states=b.cond[idx])
            full(b.noisy[idx], b.t[idx], b.cond[idx])
            for h in hooks:
                h.remove()
            want += len(idx) * torch.stack([torch.nn.functional.mse_loss(s, t) for s, t in zip(alone, ref)]).mean()
            n += len(idx)
    assert len(t_calls) == 1 and len(s_calls) == len(route.unique())
    assert got > 0  # the sliced experts' blocks differ from the full UNet's
    torch.testing.assert_close(got, want / n, rtol=1e-4, atol=1e-7)
    with torch.no_grad(), capture_blocks(full.unet) as again:
        full(b.noisy, b.t, b.cond)
    assert block_loss(again, t_calls[0], None) == 0  # the same UNet matches itself


def test_single_architecture_baseline_meets_the_budget_and_round_trips(tmp_path):
    import compress
    from compress import measure
    from compress.export import save
    from compress.models.build import model_spec
    from compress.pruners.base import build_pruner
    from compress.tasks.diffusion import Diffusion

    from diffusion_zoo import TINY

    need_diffusion()
    m = tiny_model()
    task = Diffusion()
    task.check_model(m, "test")
    ex = task.example(m.latent_shape(), 1)
    dense = measure.count_gmacs(m, ex)
    p = build_pruner({"name": "unet_magnitude", "target_macs_ratio": 0.7})
    p.attach(m)
    ratio = measure.count_gmacs(m, ex) / dense
    assert 0.6 < ratio <= 0.71
    save(m, tmp_path / "e", model_spec("unet_small", TINY), [p], [p.finalize(m)], task=task, input_size=m.latent_shape())
    loaded = compress.load(tmp_path / "e")
    with torch.no_grad():
        torch.testing.assert_close(loaded(*ex), m.eval()(*ex))


def test_trained_codes_meet_the_budget_and_argmax_routing_uses_several_experts():
    """After router pretraining the codes are seeded from the router's architectures; a few dozen steps on
    ten class prompts then give experts around the budget and routing that does not collapse to one."""
    from compress.data.cifar10 import CLASSES
    from compress.pruners.base import build_pruner
    from compress.pruners.diffusion.aptp import route_argmax
    from compress.pruners.diffusion.gates import macs_ratio
    from compress.tasks.diffusion import NoisyBatch

    need_diffusion()
    m = tiny_model()
    p = build_pruner({"name": "aptp", "experts": 4, "pretrain_steps": 8, "target_macs_ratio": 0.6})
    p.attach(m)
    prompts = [f"a photo of a {c}" for c in CLASSES]
    cond, pooled = m.encode_prompts(prompts)
    opt = torch.optim.Adam([q for q in m.parameters() if q.requires_grad], 3e-2)
    torch.manual_seed(0)
    for _ in range(40):
        x = torch.randn(10, 3, 16, 16)
        b = NoisyBatch(x, torch.randint(0, 1000, (10,)), cond, pooled, torch.randn_like(x), torch.ones(10), prompts)
        loss, _ = p.diffusion_loss(m.train(), b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    routes = route_argmax(m.aptp_router, pooled, p.pair_of, p.unit)
    assert len(routes.unique()) >= 2
    wc, dc = m.aptp_router.code_gates(sample=False)
    ratios = macs_ratio(p.structure, wc, dc)
    assert abs(float(ratios[routes].mean()) - p.target) < 0.15 and float(ratios.max()) < 0.9
