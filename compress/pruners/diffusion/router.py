"""APTP's prompt router (methods.md §7): architecture predictor, K architecture codes, Gumbel-Sigmoid
gates with ordered depth gates, Sinkhorn-balanced assignment in training and argmax at inference, and
the contrastive loss that gives similar prompts similar architectures.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def gumbel_sigmoid(logits: torch.Tensor, temperature: float, base: float, sample: bool) -> torch.Tensor:
    """Hard 0/1 gates forward, the soft sigmoid's gradient backward (straight-through). ``base`` biases
    toward keeping; no noise when ``sample`` is False (inference)."""
    x = logits + base
    if sample:
        u = torch.rand_like(x).clamp(1e-6, 1 - 1e-6)
        x = x + torch.log(u) - torch.log1p(-u)  # logistic = difference of two Gumbels
    soft = torch.sigmoid(x / temperature)
    hard = (soft >= 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def ordered_depth_logits(logits: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """Monotone keep-logits: softmax, cumulative sum, flip, logit; position j of ``order`` (most protected
    first) gets keep probability sum(p[: n - j]), so a code chooses how many pairs to drop, in order."""
    p = logits.softmax(-1)
    keep = p.cumsum(-1).flip(-1).clamp(1e-4, 1 - 1e-4)
    ordered = torch.log(keep) - torch.log1p(-keep)
    out = torch.empty_like(ordered)
    out[..., list(order)] = ordered
    return out


def depth_order(n: int) -> List[int]:
    """Outermost pairs first, bottleneck last, as APTP's [-1, -2, 0, 1, -3, -4, 2, 3, ...] for SD: pairs are
    listed down blocks then up blocks, so the ends of the list are the outer layers."""
    idx, lo, hi = [], 0, n - 1
    while lo <= hi:
        for _ in range(2):
            if lo <= hi:
                idx.append(hi)
                hi -= 1
        for _ in range(2):
            if lo <= hi:
                idx.append(lo)
                lo += 1
    return idx


def _world():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """SwAV-style balanced assignment: (B, K) similarities -> expert per sample (argmax of the plan).

    Under several processes (DDP) the plan balances the experts over the *global* batch, as APTP's all-reduce
    variant does: the maximum, the total and the per-expert sums are all-reduced, so each rank's assignment is
    the one a single process would make for the concatenated batch."""
    dist = _world()
    top = scores.detach().max()
    if dist is not None:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = torch.exp((scores - top) / eps).t()  # K x B
    k, b = q.shape
    total = q.sum()
    if dist is not None:
        dist.all_reduce(total)
        b = b * dist.get_world_size()
    q = q / total
    for _ in range(iters):
        per_expert = q.sum(1, keepdim=True)
        if dist is not None:
            dist.all_reduce(per_expert)
        q = q / per_expert / k
        q = q / q.sum(0, keepdim=True) / b
    return q.argmax(0)


def contrastive_loss(arch: torch.Tensor, text: torch.Tensor, t_arch: float = 0.03, t_text: float = 0.03):
    """BCE between the row-softmaxed similarity matrices of architectures and of prompts."""
    a = F.normalize(arch, dim=-1)
    z = F.normalize(text, dim=-1)
    s_arch = (a @ a.t() / t_arch).softmax(-1)
    s_text = (z @ z.t() / t_text).softmax(-1)
    return F.binary_cross_entropy(s_arch.clamp(1e-6, 1 - 1e-6), s_text)


class Router(nn.Module):
    """Linear maps (orthogonal init, no nonlinearity) from the prompt embedding to one logit per width
    gate and per depth gate, and a codebook of K architecture vectors in the same space."""

    def __init__(self, prompt_dim: int, width_sizes: Sequence[int], n_depth: int, experts: int,
                 temperature: float = 0.4, base: float = 3.0):
        super().__init__()
        self.width_sizes = list(width_sizes)
        self.n_depth = n_depth
        self.temperature, self.base = temperature, base
        self.order = depth_order(n_depth)
        self.width = nn.ModuleList(nn.Linear(prompt_dim, n, bias=False) for n in self.width_sizes)
        self.depth = nn.Linear(prompt_dim, max(1, n_depth), bias=False)
        dim = sum(self.width_sizes) + max(1, n_depth)
        self.codes = nn.Embedding(experts, dim)
        for lin in [*self.width, self.depth]:
            nn.init.orthogonal_(lin.weight)
        nn.init.orthogonal_(self.codes.weight)

    @property
    def experts(self) -> int:
        return self.codes.num_embeddings

    def logits(self, prompt_emb: torch.Tensor) -> torch.Tensor:
        return torch.cat([lin(prompt_emb) for lin in self.width] + [self.depth(prompt_emb)], -1)

    def gates(self, logits: torch.Tensor, sample: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """Hard (STE) width gates (B, W) with at least one gate on per group, and depth gates (B, D)."""
        w = sum(self.width_sizes)
        width = gumbel_sigmoid(logits[..., :w], self.temperature, self.base, sample)
        parts, start = [], 0
        for n in self.width_sizes:  # non_zero_width: the strongest gate of an all-off group is forced on
            g = width[..., start:start + n]
            off = (g.detach().sum(-1, keepdim=True) == 0).to(g.dtype)
            top = F.one_hot(logits[..., start:start + n].argmax(-1), n).to(g.dtype)
            parts.append(g + off * top)
            start += n
        width = torch.cat(parts, -1)
        if self.n_depth:
            depth = gumbel_sigmoid(ordered_depth_logits(logits[..., w:], self.order), self.temperature, 0.0, sample)
        else:
            depth = logits.new_ones(*logits.shape[:-1], 0)
        return width, depth

    def embedding(self, width: torch.Tensor, depth: torch.Tensor, pair_of: Sequence, unit: Sequence[int]):
        """Routing space: width gates times their pair's depth gate, scaled by sqrt(1/group size), then
        the depth gates; L2-normalised."""
        cols, start = [], 0
        for n, pair, u in zip(self.width_sizes, pair_of, unit):
            g = width[..., start:start + n] * (u ** -0.5)
            if pair is not None:
                g = g * depth[..., pair:pair + 1]
            cols.append(g)
            start += n
        return F.normalize(torch.cat(cols + [depth], -1), dim=-1)

    def code_gates(self, sample: bool):
        return self.gates(self.codes.weight, sample)
