"""DiffRate (Chen et al., ICCV 2023): differentiable compression rates, searched with the ViT frozen.

In every block after the first, between attention and MLP, the patch tokens are ranked by the CLS
token's attention to them (mean over heads). The first ``prune_keep`` stay, the rest are dropped;
of those, the ones ranked after ``merge_keep`` are merged into their most cosine-similar token among
the first ``merge_keep`` (the metric is the block's features; prefix tokens neither merge nor
receive), their sizes weighted by that similarity (the paper's similarity-aware proportional
attention, +log size on the logits). Only the MLP and later blocks see fewer tokens.

The per-block counts are learned (when no ``prune_keep``/``merge_keep`` are given, in a training
stage: a ``prune`` stage with ``max_steps``): each block holds a categorical distribution over the candidate
counts {M, M-g, ..., g}; its expectation, ceiled with a straight-through gradient, is the count, and
a token at rank j is kept with probability P(count > j), the hard 0/1 mask taking that gradient
(STE). During the search no token is dropped: removed ones are masked out of every later softmax,
and the loss is the task's plus ``flops_weight * (GMACs - target GMACs)^2``. Only the distributions
train (the stage's optimizer sees nothing else), and at the end of the stage they become fixed
``prune_keep`` / ``merge_keep`` lists, which the export records and ``compress.load`` replays. See
docs/methods.md §B2. Written from the paper and that spec (no code reuse).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Literal, Optional, Tuple

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from compress import tokens
from compress.errors import CompressError
from compress.pruners.base import PrunerConfig
from compress.pruners.token.base import TokenPruner, kl_and_error, log_probs
from compress.registry import register_pruner

RATES = "diffrate_rates"  # the submodule that holds the distributions on the model while they are searched


# ---- the method's pieces ---------------------------------------------------------------------


class _CeilSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.ceil(x)

    @staticmethod
    def backward(ctx, g):
        return g


def min_ste(n: torch.Tensor, *counts: torch.Tensor) -> torch.Tensor:
    """min(n, counts...) whose gradient reaches every count (not n), as the paper's FLOPs count has it: the
    tokens left after a block depend on both its pruning and its merging rate."""
    hard = torch.stack([n.detach(), *[c.detach() for c in counts]]).min()
    total = sum(counts)
    return hard + (total - total.detach())


class KeptCount(nn.Module):
    """A categorical distribution over candidate kept counts {M, M-g, ..., g} of M patch tokens."""

    def __init__(self, m: int, granularity: int):
        super().__init__()
        candidates = torch.arange(m, 0, -granularity, dtype=torch.float32)
        self.register_buffer("candidates", candidates, persistent=False)
        # kept[c, j] = 1 where rank j survives candidate c: P(rank j kept) = probs @ kept
        self.register_buffer("kept", (torch.arange(m)[None, :] < candidates[:, None]).float(), persistent=False)
        self.logits = nn.Parameter(torch.zeros(len(candidates)))

    def count(self) -> torch.Tensor:
        """The expected count, ceiled (a float tensor with a straight-through gradient)."""
        return _CeilSTE.apply(self.logits.softmax(-1) @ self.candidates)

    def mask(self, keep: int, upto: int) -> torch.Tensor:
        """0/1 over the M ranks: 0 on [keep, upto), where this block removes tokens, 1 elsewhere (earlier blocks'
        removals are in their own masks); its gradient is that of P(rank kept)."""
        p = self.logits.softmax(-1) @ self.kept
        rank = torch.arange(p.shape[0], device=p.device)
        hard = ((rank < keep) | (rank >= upto)).to(p.dtype)
        return hard + (p - p.detach())


class Rates(nn.Module):
    """Every block's pruning and merging distributions (block 0 is never compressed). With ``final`` the last
    block's count is fixed at it instead of searched (0 when only the prefix tokens matter after it)."""

    def __init__(self, depth: int, m: int, granularity: int, final: Optional[int] = None):
        super().__init__()
        searched = depth - 1 - (final is not None)
        self.m, self.final = m, final
        self.prune = nn.ModuleList([KeptCount(m, granularity) for _ in range(searched)])
        self.merge = nn.ModuleList([KeptCount(m, granularity) for _ in range(searched)])

    def counts(self) -> Tuple[List[int], List[int]]:
        """The hard (prune, merge) counts per block, non-increasing as the forward applies them."""
        prune, merge, alive = [self.m], [self.m], self.m
        with torch.no_grad():
            for p, q in zip(self.prune, self.merge):
                kp = min(alive, int(p.count()))
                km = min(kp, int(q.count()))
                prune.append(kp)
                merge.append(km)
                alive = km
        if self.final is not None:
            prune.append(min(alive, self.final))
            merge.append(min(alive, self.final))
        return prune, merge


def importance(q: torch.Tensor, k: torch.Tensor, size_bias: Optional[torch.Tensor], num_prefix: int) -> torch.Tensor:
    """The CLS token's attention to the patch tokens, mean over heads (B x M), from its query alone: the block's
    attention stays fused (q, k: B x H x N x d; ``size_bias``: B x 1 x 1 x N or None)."""
    logits = (q[:, :, :1] * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if size_bias is not None:
        logits = logits + size_bias
    return logits.softmax(-1)[:, :, 0, num_prefix:].mean(1)


def merge_similar(x: torch.Tensor, size: torch.Tensor, dst: torch.Tensor, src: torch.Tensor,
                  weighting: str = "mean") -> Tuple[torch.Tensor, torch.Tensor]:
    """Every ``src`` row (B x S positions in ``x``, B x N x C) joins its most cosine-similar ``dst`` row (B x D
    positions), and the destination's size gains each source's size times their similarity (clamped at 0).
    The destination becomes the plain mean of itself and its sources (``weighting="mean"``, the paper's), or their
    mean weighted by those sizes (``"size"``: a token that already stands for several counts for several, as in
    ToMe). Returns full-length (x, size); the caller drops ``src``."""
    unit = x.detach().float()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim, best = (tokens.take_rows(unit, src) @ tokens.take_rows(unit, dst).transpose(1, 2)).max(-1)  # B x S
    target = dst.gather(1, best)
    added = size.gather(1, src) * sim.clamp_min(0).to(size.dtype)
    merged = size.scatter_add(1, target, added)
    moved = tokens.take_rows(x, src)
    if weighting == "size":
        w = size.to(x.dtype).unsqueeze(-1)
        x = tokens.add_rows(x * w, target, moved * added.to(x.dtype).unsqueeze(-1)) / merged.to(x.dtype).unsqueeze(-1)
    else:
        ones = torch.ones_like(sim, dtype=x.dtype)
        count = tokens.add_rows(torch.ones_like(size, dtype=x.dtype), target, ones)
        x = tokens.add_rows(x, target, moved) / count.unsqueeze(-1)
    return x, merged


def scaled_counts(prune: List[int], merge: List[int], factor: float, m: int,
                  fixed_last: bool = False) -> Tuple[List[int], List[int]]:
    """Both schedules' counts after block 0 times ``factor`` (between 1 and ``m``; block 0 stays dense, and so
    does the last block's count with ``fixed_last``)."""
    def scale(counts):
        stop = len(counts) - 1 if fixed_last else len(counts)
        return counts[:1] + [min(m, max(1, round(c * factor))) for c in counts[1:stop]] + counts[stop:]

    return scale(prune), scale(merge)


def counts_tokens(num_prefix: int, prune: List[int], merge: List[int]) -> List[Tuple[int, int]]:
    """(tokens in attention, tokens in MLP) per block for the patch counts kept."""
    n, out = None, []
    for kp, km in zip(prune, merge):
        m = kp if n is None else n
        out.append((num_prefix + m, num_prefix + min(m, kp, km)))
        n = min(m, kp, km)
    return out


def shaped_counts(m: int, depth: int, start: int, power: float, merge_share: float, c: float,
                  final: Optional[int]) -> Tuple[List[int], List[int]]:
    """A schedule of one smooth shape: from block ``start`` on, m * exp(-c * (l - start + 1) ** power) patch tokens
    survive pruning in block l, and the last ``merge_share`` of them merge into the others; blocks before ``start``
    keep every token, and the last keeps ``final`` when given (``c`` sets the budget)."""
    prune, merge = [m], [m]
    for layer in range(1, depth - (final is not None)):
        k = m if layer < start else m * math.exp(-c * (layer - start + 1) ** power)
        kp = max(1, min(m, round(k)))
        prune.append(kp)
        merge.append(kp if layer < start else max(1, round(kp * (1 - merge_share))))
    if final is not None:
        prune.append(final)
        merge.append(final)
    return prune, merge


# ---- config -----------------------------------------------------------------------------------


class ShapeSearch(PrunerConfig):
    """Instead of the gradient search: schedules of one smooth family (``shaped_counts``), each fitted to the budget
    (shapes that cannot reach it are skipped), scored on calibration images, the best kept: by the KL divergence of
    the pruned from the dense outputs (``score: kl``, unlabelled), or by the top-1 error on the split's labels, ties
    broken by that KL (``score: error``). A grid, then one round around the best (``refine``); a few minutes on a
    2-core CPU for DeiT-Tiny."""

    images: int = Field(512, ge=1, description="calibration images, a seeded random subset of the split")
    split: str = Field("train", description="data split the calibration images come from")
    seed: int = 0
    score: Literal["kl", "error"] = Field(
        "kl", description="kl: closest to dense (labels unused); error: fewest top-1 errors on the split's labels "
        "(KL to dense breaks ties). On DeiT-Tiny KL keeps confident predictions and favours starting a block late, "
        "top-1 turns on the borderline images")
    starts: List[int] = Field([1, 2, 3], min_length=1, description="first block that removes tokens")
    powers: List[float] = Field([0.7, 1.0, 1.4], min_length=1, description="how the removal speeds up with depth")
    merge_shares: List[float] = Field([0.0, 0.1, 0.2], min_length=1,
                                      description="share of each block's survivors merged rather than kept")
    merge_weightings: List[Literal["mean", "size"]] = Field(
        ["mean"], min_length=1, description="merge_weighting values searched with the shapes")
    refine: bool = Field(True, description="a second round around the best shape (27 more schedules)")



class DiffRateConfig(PrunerConfig):
    target_gmacs_ratio: Optional[float] = Field(
        0.65, gt=0, le=1, description="the budget the search aims at: the blocks' MACs relative to dense")
    prune_keep: Optional[List[int]] = Field(
        None, description="a fixed schedule instead of a search: patch tokens kept after pruning in each block "
        "(DiffRate's released prune_kept_num minus the CLS token)")
    merge_keep: Optional[List[int]] = Field(
        None, description="with prune_keep: patch tokens left after merging in each block")
    granularity: int = Field(4, ge=1, description="search: the step between candidate counts (the paper: 4)")
    flops_weight: float = Field(5.0, ge=0, description="search: lambda of lambda * (GMACs - target GMACs)^2")
    prop_attn: bool = Field(True, description="proportional attention (+log size)")
    merge_weighting: Literal["mean", "size"] = Field(
        "mean", description="a merged token: the plain mean of itself and its sources (the paper's), or their mean "
        "weighted by the tokens each stands for (size, as ToMe)")
    calibrate: Optional[ShapeSearch] = Field(
        None, description="search the counts over schedule shapes scored on calibration images (see ShapeSearch) "
        "instead of by gradient in a training stage: the prune stage needs no training steps")
    prefix_only_last: bool = Field(
        True, description="search: the last block keeps no patch token after its attention when the head reads "
        "the class token alone (exact, and frees its MLP's MACs for the other blocks); false = search it too")

    @model_validator(mode="after")
    def _schedule(self):
        if (self.prune_keep is None) != (self.merge_keep is None):
            raise ValueError("give prune_keep and merge_keep together")
        if self.prune_keep is not None and self.calibrate is not None:
            raise ValueError("give prune_keep/merge_keep (a fixed schedule) or calibrate (a search), not both")
        if self.calibrate is not None and self.target_gmacs_ratio is None:
            raise ValueError("calibrate needs target_gmacs_ratio")
        if self.prune_keep is not None:
            if len(self.prune_keep) != len(self.merge_keep):
                raise ValueError(f"prune_keep has {len(self.prune_keep)} entries, merge_keep {len(self.merge_keep)}")
            if any(v < 1 for v in self.prune_keep[:-1] + self.merge_keep[:-1]):
                raise ValueError("kept counts must be >= 1 (0 is allowed in the last block alone)")
            if min(self.prune_keep[-1:] + self.merge_keep[-1:], default=1) < 0:
                raise ValueError("kept counts must be >= 0")
        return self


@register_pruner("diffrate")
class DiffRate(TokenPruner):
    """Prune inattentive and merge similar tokens at per-block counts learned at a GMACs budget."""

    name = "diffrate"
    Config = DiffRateConfig

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.prop_attn = bool(self.config.prop_attn)
        self.merge_weighting = self.config.merge_weighting  # a shape search may pick the other one
        self.rates: Optional[Rates] = None
        self._trainable: Dict[str, bool] = {}
        self._dense_pass = False  # calibration: the patched model runs dense

    # -- planning ---------------------------------------------------------------------------
    def plan(self, geometry) -> None:
        cfg, depth, m = self.config, geometry["depth"], geometry["num_patches"]
        if cfg.prune_keep is not None:
            if len(cfg.prune_keep) != depth:
                raise CompressError(f"diffrate.prune_keep: {len(cfg.prune_keep)} entries for a {depth}-block model")
            self.prune_keep = [min(m, v) for v in cfg.prune_keep]
            self.merge_keep = [min(m, v) for v in cfg.merge_keep]
        else:
            self.prune_keep = self.merge_keep = None

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        if self.prune_keep is None and self.config.calibrate is not None:  # until ``calibrate``: a shape of the grid
            self.prune_keep, self.merge_keep = self._placeholder_shape()
        elif self.prune_keep is None:  # to be searched by a training stage (``stage_setup``)
            g = self.geometry
            self.rates = Rates(g["depth"], g["num_patches"], self.config.granularity, self._final())
            self.rates.to(next(model.parameters()).device).train(False)  # model.train() in the stage turns it on

    def _placeholder_shape(self) -> Tuple[List[int], List[int]]:
        """The counts until ``calibrate``: the grid's middle shape at the budget or, when it cannot meet it, the first
        of the grid that can (smallest merge share first)."""
        cal = self.config.calibrate

        def middle(values):
            return sorted(values)[len(values) // 2]

        starts = self._starts() or [1]
        grid = sorted(((s, p, q) for s in starts for p in cal.powers for q in cal.merge_shares), key=lambda sh: sh[2])
        for shape in [(middle(starts), middle(cal.powers), middle(cal.merge_shares)), *grid]:  # small shares reach more
            try:
                return self.fit_shape(*shape)
            except CompressError:
                continue
        raise self._off_budget()

    def _starts(self) -> List[int]:
        """The grid's start blocks this model can use: block 0 stays dense and the last has its own count."""
        return [s for s in self.config.calibrate.starts if 0 < s < self.geometry["depth"] - 1]

    def _off_budget(self) -> CompressError:
        return CompressError(f"diffrate.calibrate: no shape of the grid meets target_gmacs_ratio "
                             f"{self.config.target_gmacs_ratio:g}; give smaller merge_shares or later starts")

    def detach(self, model: nn.Module) -> None:
        self._end_search(model)
        super().detach(model)

    def _final(self) -> Optional[int]:
        """The last block's fixed patch count in a search (None: searched like the others)."""
        return 0 if self.config.prefix_only_last and self.geometry["head_reads_prefix"] else None

    def _start_search(self, model: nn.Module) -> None:
        """The distributions join the model, so the stage's optimizer trains them; the model's weights freeze."""
        if self.rates is None or getattr(model, RATES, None) is self.rates:
            return
        self._trainable = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        model.add_module(RATES, self.rates)
        self.rates.train(model.training)  # Lightning sets the mode of the modules it found before; this one is new

    def _end_search(self, model: nn.Module) -> None:
        """Fix the counts the distributions reached and give the model back its trainable weights."""
        if self.rates is None:
            return
        self.prune_keep, self.merge_keep = self.fit_budget(*self.rates.counts())
        if getattr(model, RATES, None) is self.rates:
            delattr(model, RATES)
            for n, p in model.named_parameters():
                p.requires_grad_(self._trainable.get(n, True))
        self.rates = None

    def schedule_ratio(self, prune: List[int], merge: List[int]) -> float:
        """The blocks' MACs ratio of a (prune, merge) schedule on this model."""
        return tokens.schedule_macs_ratio(self.geometry, counts_tokens(self.geometry["num_prefix"], prune, merge))

    def fit_budget(self, prune: List[int], merge: List[int]) -> Tuple[List[int], List[int]]:
        """The searched counts scaled by one factor so the blocks' MACs ratio meets the budget: the penalty
        only pulls the expectation towards it (on DeiT-Tiny it ended 0.03 above), and rows compared at equal
        GMACs must be at equal GMACs. The shape the search found is kept."""
        target, m = self.config.target_gmacs_ratio, self.geometry["num_patches"]
        fixed = self._final() is not None

        def ratio(f: float) -> float:
            return self.schedule_ratio(*scaled_counts(prune, merge, f, m, fixed))

        if target is None or abs(ratio(1.0) - target) < 0.002:
            return prune, merge
        f = tokens.solve_monotone(ratio, target, 0.0, float(m))
        return scaled_counts(prune, merge, f, m, fixed)

    def fit_shape(self, start: int, power: float, merge_share: float) -> Tuple[List[int], List[int]]:
        """``shaped_counts`` at the budget; a CompressError when the shape cannot meet it (merging a large share
        from an early block removes more than the budget allows even where pruning keeps every token)."""
        final, m, depth = self._final(), self.geometry["num_patches"], self.geometry["depth"]
        target = self.config.target_gmacs_ratio

        def ratio(c: float) -> float:  # falls as c grows
            return self.schedule_ratio(*shaped_counts(m, depth, start, power, merge_share, c, final))

        c = tokens.solve_monotone(lambda c: -ratio(c), -target, 0.0, 20.0)
        if abs(ratio(c) - target) > 0.01:
            raise CompressError(f"diffrate: the shape start={start}, power={power:g}, merge_share={merge_share:g} cannot "
                                f"meet target_gmacs_ratio {target:g} (it reaches {ratio(c):.3f} at best); use a smaller "
                                "merge_share or a later start")
        return shaped_counts(m, depth, start, power, merge_share, c, final)

    def calibration(self):
        cal = self.config.calibrate
        return None if cal is None or self.config.prune_keep is not None else (cal.split, cal.images, cal.seed)

    def calibrate(self, model, batches, labels=None) -> dict:
        """``config.calibrate``: the shape (and merge weighting) whose outputs on ``batches`` score best, by KL to
        the dense model's or by top-1 error on ``labels`` (see ShapeSearch)."""
        from compress.progress import track

        cal = self.config.calibrate
        by_error = cal.score == "error"
        if by_error:
            self._check_labels(batches, labels)
        self._dense_pass = True
        try:
            dense = log_probs(model, batches)
        finally:
            self._dense_pass = False
        scored: Dict[Tuple[int, float, float, str], Tuple[float, float]] = {}  # shape -> (error or 0, KL)
        fitted: Dict[Tuple[int, float, float], Optional[Tuple[List[int], List[int]]]] = {}

        def score(shape) -> None:
            counts = shape[:3]
            if counts not in fitted:
                try:
                    fitted[counts] = self.fit_shape(*counts)
                except CompressError:
                    fitted[counts] = None  # off the budget: not comparable
            if shape in scored or fitted[counts] is None:
                return
            (self.prune_keep, self.merge_keep), self.merge_weighting = fitted[counts], shape[3]
            kl, error = kl_and_error(model, batches, dense, labels if by_error else None)
            scored[shape] = (error if by_error else 0.0, kl)

        depth = self.geometry["depth"]
        grid = [(s, p, q, w) for s in self._starts() for p in cal.powers for q in cal.merge_shares
                for w in cal.merge_weightings]
        with torch.no_grad():
            for shape in track(grid, "diffrate shape search", unit="schedules"):
                score(shape)
            if not scored:
                raise self._off_budget()
            if cal.refine:  # one round around the best
                s, p, q, w = min(scored, key=scored.get)
                near = [(s2, p * f, min(0.9, max(0.0, q + dq)), w) for s2 in {s - 1, s, s + 1} if 0 < s2 < depth - 1
                        for f in (0.85, 1.0, 1.15) for dq in (-0.05, 0.0, 0.05)]
                for shape in track(near, "diffrate shape refine", unit="schedules"):
                    score(shape)
        best = min(scored, key=scored.get)
        (self.prune_keep, self.merge_keep), self.merge_weighting = fitted[best[:3]], best[3]
        error, kl = scored[best]
        return {"score": cal.score, "kl": kl, **({"error": error} if by_error else {}), "schedules": len(scored),
                "off_budget": sum(v is None for v in fitted.values()), "start": best[0], "power": round(best[1], 3),
                "merge_share": round(best[2], 3), "merge_weighting": best[3]}

    @staticmethod
    def _check_labels(batches, labels) -> None:
        """score: error needs one class index per image."""
        ok = labels is not None and len(labels) == len(batches) and all(
            torch.is_tensor(y) and y.dim() == 1 and not y.is_floating_point() and len(y) == len(b)
            for b, y in zip(batches, labels))
        if not ok:
            raise CompressError("diffrate.calibrate.score: 'error' needs one class index per calibration image (a "
                                "classification split); this data gives none; use score: kl")

    def finalize(self, model: nn.Module) -> Dict[str, Any]:
        self._end_search(model)
        return {}

    def pinned(self) -> dict:
        prune, merge = self.counts()
        return {"prune_keep": prune, "merge_keep": merge, "merge_weighting": self.merge_weighting,
                "target_gmacs_ratio": None, "calibrate": None}

    def learned(self) -> Optional[Dict[str, Any]]:
        if self.prune_keep is None or self.config.prune_keep is not None:
            return None  # nothing searched (a given schedule)
        prune, merge = self.counts()
        return {"prune_keep": prune, "merge_keep": merge, "merge_weighting": self.merge_weighting,
                "macs_ratio": round(self.expected_macs_ratio(), 4)}

    def counts(self) -> Tuple[List[int], List[int]]:
        return self.rates.counts() if self.rates is not None else (list(self.prune_keep), list(self.merge_keep))

    def expected_tokens(self) -> list:
        return counts_tokens(self.geometry["num_prefix"], *self.counts())

    def state_dict(self) -> Dict[str, Any]:
        return {} if self.rates is not None else {"prune_keep": self.prune_keep, "merge_keep": self.merge_keep,
                                                  "merge_weighting": self.merge_weighting}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("prune_keep") is not None:  # the search had ended with these counts
            self.rates = None
            self.prune_keep, self.merge_keep = list(state["prune_keep"]), list(state["merge_keep"])
            self.merge_weighting = state.get("merge_weighting", self.merge_weighting)

    def stage_setup(self, run) -> None:
        """Before the optimizer is made, so it trains the distributions."""
        self._start_search(run.model)

    def stage_end(self, run) -> None:
        self._end_search(run.model)

    # -- the search's loss ------------------------------------------------------------------------
    def training_loss(self) -> Optional[Tuple[torch.Tensor, Dict[str, float]]]:
        """flops_weight * (GMACs - target)^2 of the last (training) forward's expected counts."""
        macs = getattr(self, "_macs", None)
        if macs is None:
            return None
        self._macs = None
        g = self.geometry
        n0 = g["num_patches"] + g["num_prefix"]
        dense = g["depth"] * tokens.block_macs(n0, n0, g["dim"], g["mlp_hidden"])
        gmacs, target = macs / 1e9, self.config.target_gmacs_ratio * dense / 1e9
        return self.config.flops_weight * (gmacs - target) ** 2, {"gmacs_ratio": float(macs.detach() / dense)}

    # -- per forward ----------------------------------------------------------------------
    @property
    def searching(self) -> bool:
        return self.rates is not None and self.rates.training and torch.is_grad_enabled()

    def needs(self, layer: int) -> Optional[str]:
        if self._dense_pass:
            return None
        if self.searching:
            return "probs"
        return "keys" if layer > 0 else None

    def begin(self, x, state) -> None:
        state.size = torch.ones(x.shape[:2], device=x.device, dtype=torch.float32)
        if self.searching:
            state.extras["mask"] = torch.ones(x.shape[:2], device=x.device, dtype=x.dtype)
            state.extras["alive"] = x.shape[1] - state.num_prefix
            n = torch.tensor(float(x.shape[1] - state.num_prefix), device=x.device)
            state.extras["n"] = n
            g = self.geometry
            state.extras["macs"] = tokens.block_macs(x.shape[1], x.shape[1], g["dim"], g["mlp_hidden"]) * torch.ones((), device=x.device)
        else:
            self._prune, self._merge = self.counts()

    def edit_probs(self, layer, probs, state):
        mask = state.extras.get("mask")
        if mask is None:
            return probs
        # tokens removed so far stop receiving attention; each still attends to itself (the paper's softmax policy)
        m = mask[:, None, None, :].to(probs.dtype)
        eye = torch.eye(probs.shape[-1], device=probs.device, dtype=probs.dtype)
        w = probs * (m + (1 - m) * eye)
        return (w + 1e-6 / probs.shape[-1]) / (w.sum(-1, keepdim=True) + 1e-6)

    def after_attn(self, layer, x, info, state):
        if layer == 0 or self._dense_pass:
            return x
        if self.searching:
            return self._search_step(layer, x, info, state)
        P = state.num_prefix
        m = x.shape[1] - P
        kp = min(m, self._prune[layer])
        km = min(kp, self._merge[layer])
        if km >= m:
            return x
        if km == 0:  # the prefix tokens alone go on (the last block, when the head reads them alone)
            state.index, state.size = state.index[:, :P], state.size[:, :P]
            return x[:, :P]
        order = importance(info.q, info.k, info.bias, P).argsort(dim=1, descending=True) + P  # the attention's own +log size
        rows = torch.cat([tokens.positions(0, P, x), order[:, :km]], dim=1)
        if km < kp:
            x, state.size = merge_similar(x, state.size, order[:, :km], order[:, km:kp], self.merge_weighting)
        state.index = state.index.gather(1, rows)
        state.size = state.size.gather(1, rows)
        return tokens.take_rows(x, rows)

    def _search_step(self, layer, x, info, state):
        """No token leaves: rank them, mask the removed ones for the later softmaxes, merge into the kept."""
        P = state.num_prefix
        probs = info.probs
        order = probs[:, :, 0, P:].mean(1).argsort(dim=1, descending=True) + P
        rows = torch.cat([tokens.positions(0, P, x), order], dim=1)
        x = tokens.take_rows(x, rows)
        state.index = state.index.gather(1, rows)
        state.size = state.size.gather(1, rows)
        g = self.geometry
        if layer > len(self.rates.prune):  # the fixed last block: nothing after it reads the masks
            n_mlp = torch.full_like(state.extras["n"], float(min(self.rates.final, state.extras["alive"])))
            self._macs = state.extras["macs"] + tokens.block_macs(state.extras["n"] + P, n_mlp + P, g["dim"], g["mlp_hidden"])
            return x
        mask = state.extras["mask"].gather(1, rows)
        alive = state.extras["alive"]
        prune, merge = self.rates.prune[layer - 1], self.rates.merge[layer - 1]
        kp_t, km_t = prune.count(), merge.count()
        kp, km = int(kp_t), int(km_t)
        ones = torch.ones(x.shape[0], P, device=x.device, dtype=mask.dtype)
        # the masks apply even where they remove nothing (hard 1): their gradient, P(rank kept), is how the loss
        # would change were this block to keep fewer, the signal a block that does not bind yet needs
        mid = min(alive, kp)
        mask = mask * torch.cat([ones, prune.mask(mid, alive).to(mask.dtype).expand(x.shape[0], -1)], dim=1)
        if km < mid:
            dst, src = tokens.positions(P, P + km, x), tokens.positions(P + km, P + mid, x)
            x, size = merge_similar(x, state.size.clamp_min(1), dst, src, self.merge_weighting)  # sources stay, masked from now on
            state.size = size
        mask = mask * torch.cat([ones, merge.mask(min(km, mid), mid).to(mask.dtype).expand(x.shape[0], -1)], dim=1)
        state.extras["mask"] = mask
        state.extras["alive"] = min(mid, km)
        n_attn = state.extras["n"]
        n_mlp = min_ste(n_attn, kp_t, km_t)
        state.extras["n"] = n_mlp
        state.extras["macs"] = state.extras["macs"] + tokens.block_macs(n_attn + P, n_mlp + P, g["dim"], g["mlp_hidden"])
        if layer == g["depth"] - 1:
            self._macs = state.extras["macs"]
        return x
