"""ToMe (Bolya et al., ICLR 2023): token merging by bipartite soft matching, zero-shot.

In every block, between attention and MLP, ``r`` patch tokens are merged into their most similar
partner: the metric is the attention keys averaged over heads and L2-normalised; the current
tokens are split alternately into A (even positions) and B (odd positions); every A token picks its
most cosine-similar B token, and the ``r`` A tokens with the highest such similarity are merged
into it by a size-weighted mean. Prefix tokens (CLS, distillation, registers) are never merged and
stay in front; the new order is [prefix, unmerged A, B]. Sizes are tracked in ``state.size`` and
used for proportional attention (+log size on the logits). A merged token keeps the original index
of its B token. See docs/methods.md §B1. Written from the paper and that spec (no code reuse).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from compress import tokens
from compress.pruners.base import PrunerConfig
from compress.pruners.token.base import TokenPruner
from compress.registry import register_pruner


# ---- the method's pieces, as plain tensor functions ------------------------------------------


def bipartite_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: torch.Tensor,
    index: torch.Tensor,
    r: int,
    num_prefix: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge ``r`` tokens of ``x`` (B x N x C) by bipartite soft matching on ``metric`` (B x N x D).

    ``size`` (B x N) and ``index`` (B x N) are carried along. Returns (x, size, index) with N - r
    tokens in the order [prefix, unmerged A (original order), B]. ``r`` is capped so that at least
    one token of each side survives.

    At batch 1 on CPU each op costs about as much as its arithmetic, so the merge works on positions in
    the full tensors: the merged B rows are updated in place of a copy by x_b += sum_a s_a (x_a - x_b) / S_b
    (S_b the merged size: the size-weighted mean), and one permutation gathers the surviving rows of x,
    size and index in the output order.
    """
    B, N, C = x.shape
    P = num_prefix
    n_a = (N + 1) // 2
    a_pre, b_pre = (P + 1) // 2, P // 2  # prefix tokens on each side (the first ones)
    r = min(r, n_a - a_pre, (N - P) // 2)
    if r <= 0 or N - n_a == b_pre:
        return x, size, index
    metric = metric.float()
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # prefix tokens neither merge nor receive merges: A and B start after them (positions 2 a_pre, 2 b_pre + 1)
    a0, b0 = 2 * a_pre, 2 * b_pre + 1
    best, best_b = (metric[:, a0::2] @ metric[:, b0::2].transpose(1, 2)).max(dim=-1)  # B x (Na - a_pre) cosine
    order = best.argsort(dim=1, descending=True)
    src = order[:, :r] * 2 + a0  # positions of the A tokens that merge
    dst = best_b.gather(1, order[:, :r]) * 2 + b0  # positions of their B partners
    s_src = size.gather(1, src)
    merged = size.scatter_add(1, dst, s_src)
    weight = (s_src / merged.gather(1, dst)).to(x.dtype).unsqueeze(-1)
    x = tokens.add_rows(x, dst, (tokens.take_rows(x, src) - tokens.take_rows(x, dst)) * weight)
    # output order: prefix, the unmerged A tokens in original order, B
    perm = torch.cat([tokens.positions(0, P, x), order[:, r:].sort(dim=1).values * 2 + a0, tokens.positions(b0, N, x, 2)], dim=1)
    return tokens.take_rows(x, perm), merged.gather(1, perm), index.gather(1, perm)


def merged_counts(n0: int, num_prefix: int, rs: List[int]) -> List[Tuple[int, int]]:
    """(tokens in attention, tokens in MLP) per block for merges of ``rs`` (capped as in the merge)."""
    n, counts = n0, []
    for r in rs:
        m = n - num_prefix
        a = (n + 1) // 2 - (num_prefix + 1) // 2  # even positions among num_prefix..n-1
        r_eff = max(min(r, a, m // 2), 0) if m - a > 0 else 0  # as capped in bipartite_merge
        counts.append((n, n - r_eff))
        n -= r_eff
    return counts


# ---- config -----------------------------------------------------------------------------------


class ToMeConfig(PrunerConfig):
    r: Optional[int] = Field(None, ge=0, description="tokens merged in every block (default 8 without a budget)")
    r_schedule: Optional[List[int]] = Field(None, description="explicit r per block (one entry per block)")
    target_gmacs_ratio: Optional[float] = Field(
        None, gt=0, le=1, description="budget instead of r: the blocks' MACs relative to dense; solved to a constant r"
    )
    prop_attn: bool = Field(True, description="proportional attention (+log size); False for MAE / training")

    @model_validator(mode="after")
    def _exclusive(self):
        given = [k for k in ("r", "r_schedule", "target_gmacs_ratio") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of r, r_schedule, target_gmacs_ratio (got {', '.join(given)})")
        if self.r_schedule is not None and any(v < 0 for v in self.r_schedule):
            raise ValueError("r_schedule entries must be >= 0")
        return self


DEFAULT_R = 8


@register_pruner("tome")
class ToMe(TokenPruner):
    """Token merging (bipartite soft matching) between attention and MLP in every block."""

    name = "tome"
    Config = ToMeConfig

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.prop_attn = bool(self.config.prop_attn)

    # -- planning ---------------------------------------------------------------------------
    def _counts(self, geometry, rs: List[int]) -> List[Tuple[int, int]]:
        return merged_counts(geometry["num_patches"] + geometry["num_prefix"], geometry["num_prefix"], rs)

    def plan(self, geometry) -> None:
        cfg, depth = self.config, geometry["depth"]
        if cfg.r_schedule is not None:
            if len(cfg.r_schedule) != depth:
                raise ValueError(f"r_schedule has {len(cfg.r_schedule)} entries for a {depth}-block model")
            rs = list(cfg.r_schedule)
        elif cfg.target_gmacs_ratio is not None:
            n_max = (geometry["num_patches"] + 1) // 2
            rs = [self.constant_for_budget(geometry, range(n_max + 1), cfg.target_gmacs_ratio)] * depth
        else:
            rs = [cfg.r if cfg.r is not None else DEFAULT_R] * depth
        self.rs = rs

    def pinned(self) -> dict:
        return {"r": None, "r_schedule": list(self.rs), "target_gmacs_ratio": None}

    def expected_tokens(self) -> list:
        return self._counts(self.geometry, self.rs)

    # -- per forward ----------------------------------------------------------------------
    def needs(self, layer: int) -> Optional[str]:
        return "keys" if self.rs[layer] > 0 else None

    def begin(self, x, state) -> None:
        state.size = torch.ones(x.shape[:2], device=x.device, dtype=torch.float32)

    def after_attn(self, layer, x, info, state):
        r = self.rs[layer]
        if r <= 0:
            return x
        metric = info.k.sum(dim=1)  # B x N x head_dim: the heads' mean up to a scale the cosine ignores
        x, state.size, state.index = bipartite_merge(x, metric, state.size, state.index, r, state.num_prefix)
        return x
