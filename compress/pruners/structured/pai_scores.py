"""Pruning-at-initialisation scores -> layer-wise densities (the first step of PreCropping).

Each function scores every weight of the named layers on a throw-away copy of the model, ranks all of
them globally, keeps the top ``density`` fraction and returns the kept fraction per layer.

* ``synflow`` (Tanaka et al. 2020): data-free. |w| everywhere, an all-ones input, BN in eval mode,
  float64; R = sum of the outputs, score = w * dR/dw; ``iterations`` rounds with the exponential
  schedule density^(k/iterations), pruned weights masked to zero between rounds.
* ``snip`` (Lee et al. 2019): |w * dL/dw| of the cross-entropy on one batch, single shot.
* ``grasp`` (Wang et al. 2020): score = -w * (H g); the highest scores are pruned, so the lowest are kept.

SNIP and GraSP need a batch: ``random_batch`` gives a fixed-seed one (N(0, 1) images at the model's
input size, uniform labels), because ``attach`` runs before any data loader exists; it is the same
on every rank.

All three score a copy in which norm layers' affine scales are 1 and shifts 0 (timm zero-initialises
the last BN of every residual branch, which would otherwise give every weight of that branch a zero
score) and timm attention runs unfused (GraSP needs double backward, which fused SDPA lacks). The
copy runs on ``device`` (CUDA when available: float64 convolutions are slow on CPU).
"""
from __future__ import annotations

import copy
from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.errors import CompressError
from compress.pruners.structured.widths import NORMS


def score_copy(model: nn.Module, device: str, dtype=torch.float32) -> nn.Module:
    net = copy.deepcopy(model).to(device=device, dtype=dtype)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, NORMS) and m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
    return net


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _weights(net: nn.Module, layers: Sequence[str]) -> Dict[str, nn.Parameter]:
    named = dict(net.named_modules())
    return {n: named[n].weight for n in layers}


def keep_top(scores: Dict[str, torch.Tensor], density: float) -> Dict[str, torch.Tensor]:
    """Global ranking: boolean masks keeping the ``density`` fraction of highest scores."""
    flat = torch.cat([s.flatten().cpu() for s in scores.values()])
    k = max(1, int(round(density * flat.numel())))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = keep[start:start + s.numel()].view_as(s).to(s.device)
        start += s.numel()
    return out


def densities(masks: Dict[str, torch.Tensor]) -> Dict[str, float]:
    return {n: float(m.float().mean()) for n, m in masks.items()}


def _output(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = net(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def synflow_scores(net: nn.Module, layers: Sequence[str], input_shape: Tuple[int, ...]) -> Dict[str, torch.Tensor]:
    """One SynFlow round on ``net`` as it is (already |w|, float64, eval): w * dR/dw per layer."""
    weights = _weights(net, layers)
    net.zero_grad(set_to_none=True)
    device = next(net.parameters()).device
    r = _output(net, torch.ones(1, *input_shape, dtype=torch.float64, device=device)).sum()
    if not torch.isfinite(r):
        raise CompressError("precropping: the SynFlow objective overflowed float64; use score: snip or grasp")
    r.backward()
    return {n: (w.grad * w).detach().abs() if w.grad is not None else torch.zeros_like(w) for n, w in weights.items()}


def synflow(model: nn.Module, layers: Sequence[str], density: float, input_shape: Tuple[int, ...],
            iterations: int = 100, device: str = "cpu") -> Dict[str, float]:
    net = score_copy(model, device, torch.float64).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    weights = _weights(net, layers)
    original = {n: w.detach().clone() for n, w in weights.items()}
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    for k in range(1, iterations + 1):
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(original[n] * masks[n])
        masks = keep_top(synflow_scores(net, layers, input_shape), density ** (k / iterations))
    return densities(masks)


def random_batch(input_shape: Tuple[int, ...], num_classes: int, batch_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, *input_shape, generator=g), torch.randint(0, num_classes, (batch_size,), generator=g)


def snip(model: nn.Module, layers: Sequence[str], density: float, batch, device: str = "cpu") -> Dict[str, float]:
    net = score_copy(model, device).train()
    weights = _weights(net, layers)
    x, y = (t.to(device) for t in batch)
    loss = F.cross_entropy(_output(net, x), y)
    grads = torch.autograd.grad(loss, list(weights.values()))
    scores = {n: (w.detach() * g).abs() for (n, w), g in zip(weights.items(), grads)}
    return densities(keep_top(scores, density))


def grasp(model: nn.Module, layers: Sequence[str], density: float, batch, device: str = "cpu") -> Dict[str, float]:
    net = score_copy(model, device).train()
    weights = _weights(net, layers)
    params = list(weights.values())
    x, y = (t.to(device) for t in batch)
    g = [t.detach() for t in torch.autograd.grad(F.cross_entropy(_output(net, x), y), params)]
    gw = torch.autograd.grad(F.cross_entropy(_output(net, x), y), params, create_graph=True)
    hg = torch.autograd.grad(sum((a * b).sum() for a, b in zip(gw, g)), params)
    # GraSP removes the weights with the highest -w * Hg, so rank by w * Hg and keep the top
    scores = {n: (w.detach() * h) for (n, w), h in zip(weights.items(), hg)}
    return densities(keep_top(scores, density))
