"""DiffRate: the differentiable count (straight-through ceil, rank masks), the fixed-schedule forward against a
hand-written per-image reference, the search (only the distributions learn; the GMACs penalty moves the counts),
and a search in a ``compress fit`` prune stage whose counts are exported and replayed by ``compress.load``."""
import json
import math

import compress  # noqa: F401  (first: torchvision guard before timm)

import pytest
import torch
import torch.nn.functional as F

from compress.pruners.base import build_pruner
from compress.pruners.token.diffrate import RATES, KeptCount, counts_tokens, min_ste
from compress.run import fit
from conftest import QUICKSTART, only_run
from vit_zoo import DIST, VIT, assert_unpatched, export_round_trip, images, make


def test_count_is_the_ceiled_expectation_with_its_gradient():
    c = KeptCount(10, 3)
    assert c.candidates.tolist() == [10, 7, 4, 1]
    with torch.no_grad():
        c.logits.copy_(torch.tensor([0.0, 1.0, 2.0, 0.0]))
    p = c.logits.softmax(-1).detach()
    expected = float(p @ c.candidates)
    n = c.count()
    assert n.item() == math.ceil(expected)
    n.backward()
    assert torch.allclose(c.logits.grad, p * (c.candidates - expected), atol=1e-6)  # softmax Jacobian . candidates


def test_rank_mask_is_hard_forward_and_keep_probability_backward():
    c = KeptCount(10, 3)
    with torch.no_grad():
        c.logits.copy_(torch.tensor([0.5, 1.0, -1.0, 0.0]))
    m = c.mask(4, 8)
    assert m.tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    p = c.logits.softmax(-1).detach()
    keep = torch.tensor([sum(float(p[i]) for i, cand in enumerate([10, 7, 4, 1]) if j < cand) for j in range(10)])
    w = torch.randn(10)
    (m * w).sum().backward()
    logits = c.logits.detach().clone().requires_grad_(True)
    probs = logits.softmax(-1)
    own = torch.stack([probs[[i for i, cand in enumerate([10, 7, 4, 1]) if j < cand]].sum() for j in range(10)])
    assert torch.allclose(own.detach(), keep, atol=1e-6)
    (own * w).sum().backward()
    assert torch.allclose(c.logits.grad, logits.grad, atol=1e-6)


def test_min_passes_its_gradient_to_every_count():
    n, a, b = torch.tensor(9.0), torch.tensor(7.0, requires_grad=True), torch.tensor(8.0, requires_grad=True)
    out = min_ste(n, a, b)
    assert out.item() == 7
    out.backward()
    assert a.grad.item() == 1 and b.grad.item() == 1


def test_counts_tokens():
    assert counts_tokens(1, [64, 50, 60, 10], [64, 40, 45, 3]) == [(65, 65), (65, 41), (41, 41), (41, 4)]


# ---- the fixed schedule against a reference --------------------------------------------------------------


def reference(model, x, prune, merge, weighting="mean"):
    """The pruned forward one image at a time from the timm submodules, with the paper's rules written out (a
    merged token: the plain mean of its members, or with ``weighting="size"`` their mean weighted by the sizes
    they bring)."""
    P = model.num_prefix_tokens
    outs = []
    for img in x:
        t = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))[0]
        size = torch.ones(t.shape[0])
        for layer, blk in enumerate(model.blocks):
            attn = blk.attn
            n = t.shape[0]
            q, k, v = attn.qkv(blk.norm1(t)).reshape(n, 3, attn.num_heads, -1).permute(1, 2, 0, 3)
            a = ((q @ k.transpose(-2, -1)) * attn.scale + size.log()).softmax(-1)  # proportional attention
            t = t + blk.ls1(attn.proj((a @ v).transpose(0, 1).reshape(n, -1)))
            m = n - P
            kp, km = min(m, prune[layer]), min(m, prune[layer], merge[layer])
            if layer > 0 and km < m:
                cls_attn = a[:, 0, P:].mean(0)
                order = sorted(range(m), key=lambda i: -float(cls_attn[i]))
                dst, src = order[:km], order[km:kp]
                unit = F.normalize(t, dim=-1)
                members = {d: [(t[P + d], size[P + d])] for d in dst}
                sizes = {d: size[P + d] for d in dst}
                for s in src:
                    sims = [float(unit[P + s] @ unit[P + d]) for d in dst]
                    j = max(range(len(dst)), key=lambda i: sims[i])
                    members[dst[j]].append((t[P + s], size[P + s] * max(sims[j], 0.0)))
                    sizes[dst[j]] = sizes[dst[j]] + size[P + s] * max(sims[j], 0.0)

                def merged(group):
                    w = torch.stack([wt for _, wt in group]) if weighting == "size" else torch.ones(len(group))
                    return (torch.stack([row for row, _ in group]) * w[:, None]).sum(0) / w.sum()

                t = torch.cat([t[:P], torch.stack([merged(members[d]) for d in dst])])
                size = torch.cat([size[:P], torch.stack([sizes[d] for d in dst])])
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        outs.append(model.forward_head(model.norm(t[None])))
    return torch.cat(outs)


@pytest.mark.parametrize("weighting", ["mean", "size"])
@pytest.mark.parametrize("cfg", [VIT, DIST], ids=["vit", "distilled"])
def test_fixed_schedule_matches_the_reference(cfg, weighting):
    model, x = make(cfg), images(3)
    depth = len(model.blocks)
    prune, merge = [64, 50, 48, 20][:depth], [64, 40, 44, 6][:depth]
    pruner = build_pruner({"name": "diffrate", "prune_keep": prune, "merge_keep": merge, "merge_weighting": weighting})
    with torch.no_grad():
        want = reference(model, x, prune, merge, weighting)
        pruner.attach(model)
        got = model(x)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    if weighting == "size":  # and the weighting changes the outputs
        assert not torch.allclose(got, reference(model, x, prune, merge, "mean"), atol=1e-3)
    P = model.num_prefix_tokens
    assert model._compress_tokens.state.counts == [a for a, _ in counts_tokens(P, prune, merge)]
    state = model._compress_tokens.state
    assert torch.equal(state.index[:, :P], torch.arange(P).expand(3, P))
    for row in state.index:
        assert len(set(row.tolist())) == row.numel()
    export_round_trip(model, pruner, cfg, x, _tmp(model))
    pruner.detach(model)
    assert_unpatched(model)


def _tmp(model):
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp()) / "export"


def test_schedule_lengths_are_checked():
    with pytest.raises(compress.CompressError, match="prune_keep and merge_keep together"):
        build_pruner({"name": "diffrate", "prune_keep": [4, 4]})
    pruner = build_pruner({"name": "diffrate", "prune_keep": [4, 4], "merge_keep": [4, 4]})
    with pytest.raises(compress.CompressError, match="2 entries for a 4-block model"):
        pruner.attach(make(VIT))


# ---- the search -------------------------------------------------------------------------------------------


def test_search_trains_only_the_distributions_toward_the_budget():
    model, x = make(VIT), images(4)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = build_pruner({"name": "diffrate", "target_gmacs_ratio": 0.9, "granularity": 2, "flops_weight": 1e4})
    pruner.attach(model)
    pruner._start_search(model)
    # blocks 1 and 2 are searched; block 3 is the last, whose patch tokens the class-token head never reads
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"{RATES}.{kind}.{i}.logits" for kind in ("prune", "merge") for i in range(2)]
    start = pruner.expected_macs_ratio()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0)
    for _ in range(40):
        out = model(x)
        assert model._compress_tokens.state.counts == [65] * 4  # nothing leaves during the search
        loss, logs = pruner.training_loss()
        (loss + 0 * out.sum()).backward()
        opt.step()
        opt.zero_grad()
    assert abs(logs["gmacs_ratio"] - 0.9) < abs(start - 0.9) / 2, (start, logs)
    model.eval()
    pruner._end_search(model)
    assert not hasattr(model, RATES) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert abs(pruner.expected_macs_ratio() - 0.9) < abs(start - 0.9)
    with torch.no_grad():
        model(x)
    assert model._compress_tokens.state.counts == [a for a, _ in pruner.expected_tokens()]
    prune, merge = pruner.counts()
    assert prune[-1] == merge[-1] == 0 and pruner.expected_tokens()[-1] == (pruner.expected_tokens()[-2][1], 1)


def test_every_searched_block_learns_from_the_task_even_where_it_removes_nothing():
    """A block whose count is above the tokens still alive removes nothing, yet its distribution must hear what
    keeping fewer would cost (the mask's P(rank kept) gradient); the budget penalty is left out here."""
    model, x = make(VIT), images(4)
    pruner = build_pruner({"name": "diffrate", "target_gmacs_ratio": 0.8, "granularity": 2})
    pruner.attach(model)
    pruner._start_search(model)
    model.train()
    with torch.no_grad():  # block 1 keeps few, so block 2 binds nowhere
        pruner.rates.prune[0].logits.copy_(torch.linspace(-4, 4, len(pruner.rates.prune[0].logits)))
    prune, _ = pruner.rates.counts()
    assert prune[2] >= prune[1]
    model(x).logsumexp(-1).sum().backward()
    pruner._macs = None
    for kind in (pruner.rates.prune, pruner.rates.merge):
        for c in kind:
            assert c.logits.grad is not None and c.logits.grad.abs().sum() > 0


def test_shape_search_keeps_the_schedule_closest_to_dense():
    model, x = make(VIT), images(6)
    with torch.no_grad():
        dense = model(x).log_softmax(-1)
    pruner = build_pruner({"name": "diffrate", "target_gmacs_ratio": 0.7,
                           "calibrate": {"starts": [1, 2], "powers": [1.0], "merge_shares": [0.0, 0.2]}})
    pruner.attach(model)
    assert pruner.calibration() == ("train", 512, 0)

    def kl():
        with torch.no_grad():
            return F.kl_div(model(x).log_softmax(-1), dense, log_target=True, reduction="sum").item() / len(x)

    provisional = kl()
    found = pruner.calibrate(model, [x[:3], x[3:]])
    assert found["schedules"] >= 4 and abs(found["kl"] - kl()) < 1e-5
    assert found["kl"] <= provisional + 1e-6  # the provisional (middle) shape is among those scored
    assert abs(pruner.expected_macs_ratio() - 0.7) < 0.03
    assert pruner.spec()["calibrate"] is None and pruner.learned()["prune_keep"] == pruner.spec()["prune_keep"]
    with pytest.raises(compress.CompressError, match="not both"):
        build_pruner({"name": "diffrate", "prune_keep": [4] * 4, "merge_keep": [4] * 4, "calibrate": {}})


def test_shape_search_by_labelled_error_keeps_the_fewest_errors_then_the_lowest_kl():
    model, x = make(VIT), images(8)
    with torch.no_grad():
        dense = model(x).log_softmax(-1)
    y = dense.argmax(-1)  # errors = disagreements with dense, which the shapes differ in
    cal = {"starts": [1, 2], "powers": [0.7, 1.4], "merge_shares": [0.0, 0.3], "merge_weightings": ["mean", "size"],
           "score": "error", "refine": False}
    pruner = build_pruner({"name": "diffrate", "target_gmacs_ratio": 0.6, "calibrate": cal})
    pruner.attach(model)
    found = pruner.calibrate(model, [x[:4], x[4:]], [y[:4], y[4:]])
    chosen = (pruner.counts(), pruner.merge_weighting)

    def scored(start, power, share, weighting):  # each grid shape scored by hand
        pruner.prune_keep, pruner.merge_keep = pruner.fit_shape(start, power, share)
        pruner.merge_weighting = weighting
        with torch.no_grad():
            lp = model(x).log_softmax(-1)
        kl = F.kl_div(lp, dense, log_target=True, reduction="sum").item() / len(x)
        return (lp.argmax(-1) != y).float().mean().item(), kl

    grid = {(s, p, q, w): scored(s, p, q, w) for s in cal["starts"] for p in cal["powers"]
            for q in cal["merge_shares"] for w in cal["merge_weightings"]}
    assert found["schedules"] == len(grid) == 16 and len({e for e, _ in grid.values()}) > 1  # the errors differ
    best = min(grid, key=grid.get)
    assert abs(found["error"] - grid[best][0]) < 1e-9 and abs(found["kl"] - grid[best][1]) < 1e-5
    assert (found["start"], found["power"], found["merge_share"], found["merge_weighting"]) == best
    pruner.prune_keep, pruner.merge_keep = pruner.fit_shape(*best[:3])
    assert chosen == (pruner.counts(), best[3])
    with pytest.raises(compress.CompressError, match="needs one class index per calibration image"):
        pruner.calibrate(model, [x], None)


def test_shapes_that_cannot_meet_the_budget_are_skipped():
    """Merging a large share from block 1 on removes more than a light budget allows, whatever the pruning."""
    model, x = make(VIT), images(4)
    pruner = build_pruner({"name": "diffrate", "target_gmacs_ratio": 0.8,
                           "calibrate": {"starts": [1], "powers": [1.0], "merge_shares": [0.0, 0.6], "refine": False}})
    pruner.attach(model)  # the middle shape (0.6) is off budget: the placeholder is the other one
    assert abs(pruner.expected_macs_ratio() - 0.8) < 0.01
    with pytest.raises(compress.CompressError, match="merge_share=0.6 cannot meet target_gmacs_ratio 0.8"):
        pruner.fit_shape(1, 1.0, 0.6)
    found = pruner.calibrate(model, [x])
    assert (found["schedules"], found["off_budget"], found["merge_share"]) == (1, 1, 0.0)
    off = build_pruner({"name": "diffrate", "target_gmacs_ratio": 0.8,
                        "calibrate": {"starts": [1], "powers": [1.0], "merge_shares": [0.6]}})
    with pytest.raises(compress.CompressError, match="no shape of the grid meets target_gmacs_ratio 0.8"):
        off.attach(make(VIT))


def test_shape_search_runs_as_a_prune_stage_without_training(tmp_path):
    metrics = fit(QUICKSTART, ["data.params.num_train=64", "data.params.num_val=32", "model.kwargs.depth=4",
                               "evaluate.batch_size=8", "stages=[{kind: prune, pruner: {name: diffrate, target_gmacs_ratio: 0.7, "
                               "calibrate: {images: 16, starts: [1], powers: [1.0], merge_shares: [0.0, 0.2], "
                               "score: error, merge_weightings: [mean, size]}}}]"], out=tmp_path)
    found = metrics["schedules"]["stages[0].pruner"]
    calibration = metrics["calibration"]["stages[0].pruner"]
    assert calibration["images"] == 16 and calibration["score"] == "error" and 0 <= calibration["error"] <= 1
    spec = json.loads((only_run(tmp_path) / "export" / "compress.json").read_text())["pruners"][0]["spec"]
    assert spec["calibrate"] is None and spec["prune_keep"] == found["prune_keep"] and spec["prune_keep"][-1] == 0
    assert spec["merge_weighting"] == found["merge_weighting"] == calibration["merge_weighting"]
    loaded = compress.load(only_run(tmp_path) / "export")
    assert loaded._compress_tokens.policy.merge_weighting == found["merge_weighting"]


def test_the_last_block_on_the_class_token_alone_is_exact():
    """Keeping no patch token after the last attention changes no logit when the head reads the class token; a
    search on a mean-pooling head keeps the last block searched."""
    model, x = make(VIT), images(3)
    m = model.patch_embed.num_patches
    with torch.no_grad():
        want = model(x)
        pruner = build_pruner({"name": "diffrate", "prune_keep": [m, m, m, 0], "merge_keep": [m, m, m, 0]})
        pruner.attach(model)
        got = model(x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert model._compress_tokens.state.index.shape[1] == model.num_prefix_tokens
    assert pruner.expected_macs_ratio() < 0.95
    pruner.detach(model)
    pooled = make(VIT)
    pooled.global_pool = "avg"
    search = build_pruner({"name": "diffrate", "target_gmacs_ratio": 0.8})
    search.attach(pooled)
    assert len(search.rates.prune) == 3 and search.rates.final is None


def test_search_runs_as_a_prune_stage_and_its_counts_are_exported(tmp_path):
    metrics = fit(QUICKSTART, ["data.params.num_train=64", "data.params.num_val=32", "model.kwargs.depth=4",
                               "data.batch_size=16", "evaluate.batch_size=4",
                               "trainer.log_every_n_steps=1", "stages=[{kind: prune, max_steps: 4, optimizer: {lr: 0.05, weight_decay: 0.0}, "
                               "pruner: {name: diffrate, target_gmacs_ratio: 0.7}, distill: {teacher: dense, alpha: 1.0}}]"], out=tmp_path)
    run_dir = only_run(tmp_path)
    (entry,) = json.loads((run_dir / "export" / "compress.json").read_text())["pruners"]
    spec = entry["spec"]
    assert spec["target_gmacs_ratio"] is None and len(spec["prune_keep"]) == 4 and len(spec["merge_keep"]) == 4
    assert spec["prune_keep"] != [64] * 4  # the search left a schedule that removes tokens
    log = (run_dir / "stages" / "0-prune" / "logs" / "metrics.csv").read_text()
    assert "train/diffrate_gmacs_ratio" in log  # the penalty's figures are logged with the task's
    assert "train/kd" in log  # a prune stage's distill options are used: the search matches the dense model
    found = metrics["schedules"]["stages[0].pruner"]
    assert found["prune_keep"] == spec["prune_keep"] and found["merge_keep"] == spec["merge_keep"]
    loaded = compress.load(run_dir / "export")
    assert not any(k.startswith(RATES) for k in loaded.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        loaded(x)
    assert loaded._compress_tokens.state.counts == [a for a, _ in counts_tokens(1, spec["prune_keep"], spec["merge_keep"])]
