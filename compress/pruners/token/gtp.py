"""GTP-ViT (Xu et al., WACV 2024): graph-based token propagation, zero-shot.

A sparse token graph over the patch tokens is built once per forward from the embeddings that
enter block 0 (spatial 8-neighbourhood, semantic top-k cosine, or their union; self-loops removed;
symmetric normalisation Â = D^-1/2 G D^-1/2 with D the row sums) and kept in ``state.extras``. In
a pruning block, between attention and MLP, every patch token is scored by
max_h A_h[i, i] * max_h sum_j A_h[j, i] (regeneration difficulty x broadcasting ability; the column
sum runs over all rows, prefix rows included, as in the official code); the ``P`` lowest are
propagated into the kept tokens, X_kept += alpha * Â[kept, prop] @ X_prop, and removed; the graph
stays the one over the original tokens, addressed by the survivors' original positions (which is
Â shrunk to Â[kept, kept] block after block). With ``token_scale`` the token sizes propagate the same way and
weight the attention (+log size). ``theta`` < 1 zeroes the smallest (1 - theta) N^2 attention
probabilities per image and head (no renormalisation). See docs/methods.md §4.
"""
from __future__ import annotations

import math
from typing import List, Literal, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from compress import tokens
from compress.errors import CompressError
from compress.pruners.base import PrunerConfig
from compress.pruners.token.base import TokenPruner
from compress.registry import register_pruner

GRAPH_KEY = "gtp_graph"


# ---- the method's pieces, as plain tensor functions ------------------------------------------


def spatial_graph(grid: Tuple[int, int], device=None) -> torch.Tensor:
    """0/1 adjacency (M x M) of the 8-neighbourhood on an ``grid`` = (rows, cols) patch grid."""
    h, w = grid
    rows = torch.arange(h * w, device=device) // w
    cols = torch.arange(h * w, device=device) % w
    near = ((rows[:, None] - rows[None, :]).abs() <= 1) & ((cols[:, None] - cols[None, :]).abs() <= 1)
    # masks, not in-place writes to a diagonal view: those trace to a strided scatter that ONNX has no op for
    return (near & ~torch.eye(h * w, dtype=torch.bool, device=device)).float()


def semantic_graph(x: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 adjacency (B x M x M): each token's ``k`` most cosine-similar other tokens (not symmetric)."""
    z = F.normalize(x.float(), dim=-1)
    sim = (z @ z.transpose(1, 2)).masked_fill(torch.eye(x.shape[1], dtype=torch.bool, device=x.device), float("-inf"))
    k = min(k, x.shape[1] - 1)
    g = torch.zeros_like(sim)
    if k > 0:
        g.scatter_(2, sim.topk(k, dim=-1).indices, 1.0)
    return g


def normalise_graph(g: torch.Tensor) -> torch.Tensor:
    """Â = D^-1/2 G D^-1/2 with D the row sums (isolated nodes keep zero rows and columns)."""
    d = g.sum(-1)
    inv = torch.where(d > 0, d.clamp_min(1e-12).rsqrt(), torch.zeros_like(d))
    return inv.unsqueeze(-1) * g * inv.unsqueeze(-2)


def selection_scores(probs: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """MixedAttnMax: max_h diag(A_h) * max_h colsum(A_h) for the patch tokens (B x H x N x N -> B x M)."""
    P = num_prefix
    diag = probs.diagonal(dim1=-2, dim2=-1)[..., P:].amax(dim=1)
    col = probs[..., P:].sum(dim=-2).amax(dim=1)
    return diag * col


def sparsify_attention(probs: torch.Tensor, theta: float) -> torch.Tensor:
    """Zero the entries below the k-th smallest value per (image, head), k = floor(N^2 (1 - theta))."""
    B, H, N, _ = probs.shape
    k = int(N * N * (1 - theta))
    if k < 1:
        return probs
    flat = probs.reshape(B, H, N * N)
    threshold = flat.kthvalue(k, dim=-1, keepdim=True).values.unsqueeze(-1)  # B x H x 1 x 1
    return probs.masked_fill(probs < threshold, 0.0)


def graph_weights(graph: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Â[rows, cols] for every image (B x K x P): ``graph`` is the graph over the original patch tokens, M x M
    (the same for every image) or B x M x M; ``rows``/``cols`` are original patch positions (B x K, B x P).

    Indexing the original graph by original positions gives what shrinking it to Â[kept, kept] block after
    block gives (the shrunk graph is the original restricted to the survivors), while reading only the K x P
    entries a block needs instead of copying two K x M slices of it."""
    B, K = rows.shape
    M = graph.shape[-1]
    flat = graph.reshape(-1, M * M).expand(B, -1)
    idx = (rows.unsqueeze(-1) * M + cols.unsqueeze(1)).reshape(B, -1)
    return flat.gather(1, idx).view(B, K, cols.shape[1])


def propagate(
    x: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor, prop: torch.Tensor, alpha: float,
    size: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Graph summarisation: the rows ``keep`` of ``x`` (B x N x C) plus alpha * weights @ X[prop], where
    ``weights`` = Â[kept patches, propagated patches] (B x K' x P). ``keep`` (B x K) lists the rows that stay,
    prefix rows first: their last K' are the patch tokens ``weights`` refers to; ``prop`` (B x P) lists the
    propagated rows. The sizes (B x N, if given) propagate likewise. Returns (x, size) with K rows."""
    out = tokens.take_rows(x, keep)
    first = keep.shape[1] - weights.shape[1]  # the prefix rows, which receive nothing
    w = weights.to(x.dtype) * alpha
    patches = out[:, first:] + w @ tokens.take_rows(x, prop)
    out = torch.cat([out[:, :first], patches], dim=1) if first else patches
    if size is not None:
        kept = size.gather(1, keep)
        gain = (w.to(size.dtype) @ size.gather(1, prop).unsqueeze(-1)).squeeze(-1)
        size = torch.cat([kept[:, :first], kept[:, first:] + gain], dim=1) if first else kept + gain
    return out, size


def propagation_counts(n0: int, num_prefix: int, props: List[int]) -> List[Tuple[int, int]]:
    """(tokens in attention, tokens in MLP) per block; at least one patch token always survives."""
    n, counts = n0, []
    for p in props:
        p = max(0, min(p, n - num_prefix - 1))
        counts.append((n, n - p))
        n -= p
    return counts


# ---- config -----------------------------------------------------------------------------------


class GTPConfig(PrunerConfig):
    num_prop: Optional[Union[int, List[int]]] = Field(
        None, description="tokens propagated (removed) per block: one number for every block, or one per block"
    )
    target_gmacs_ratio: Optional[float] = Field(
        None, gt=0, le=1, description="budget instead of num_prop: the blocks' MACs relative to dense; solved to a constant P"
    )
    alpha: float = Field(0.1, ge=0, description="weight of the propagated features")
    graph: Literal["spatial", "semantic", "mixed"] = "spatial"
    num_neighbours: int = Field(8, ge=1, description="semantic graph: neighbours per token")
    token_scale: bool = Field(False, description="track token sizes and use them in attention (+log size)")
    theta: float = Field(1.0, gt=0, le=1, description="attention sparsity: keep the top theta*N^2 entries; 1 = off")

    @model_validator(mode="after")
    def _exclusive(self):
        if self.num_prop is not None and self.target_gmacs_ratio is not None:
            raise ValueError("give either num_prop or target_gmacs_ratio, not both")
        props = self.num_prop if isinstance(self.num_prop, list) else [self.num_prop or 0]
        if any(p < 0 for p in props):
            raise ValueError("num_prop must be >= 0")
        return self


DEFAULT_NUM_PROP = 8


@register_pruner("gtp")
class GTP(TokenPruner):
    """Graph-based token propagation between attention and MLP (training-free)."""

    name = "gtp"
    Config = GTPConfig

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.prop_attn = bool(self.config.token_scale)

    def attach(self, model: nn.Module) -> None:
        grid = getattr(getattr(self.host(model), "patch_embed", None), "grid_size", None)
        self.grid = (int(grid[0]), int(grid[1])) if grid is not None else None
        super().attach(model)

    # -- planning ---------------------------------------------------------------------------
    def _counts(self, geometry, props: List[int]) -> List[Tuple[int, int]]:
        return propagation_counts(geometry["num_patches"] + geometry["num_prefix"], geometry["num_prefix"], props)

    def plan(self, geometry) -> None:
        cfg, depth = self.config, geometry["depth"]
        if isinstance(cfg.num_prop, list):
            if len(cfg.num_prop) != depth:
                raise ValueError(f"num_prop has {len(cfg.num_prop)} entries for a {depth}-block model")
            props = list(cfg.num_prop)
        elif cfg.target_gmacs_ratio is not None:
            props = [self.constant_for_budget(geometry, range(geometry["num_patches"]), cfg.target_gmacs_ratio)] * depth
        else:
            props = [cfg.num_prop if cfg.num_prop is not None else DEFAULT_NUM_PROP] * depth
        self.props = props

    def pinned(self) -> dict:
        return {"num_prop": list(self.props), "target_gmacs_ratio": None}

    def expected_tokens(self) -> list:
        return self._counts(self.geometry, self.props)

    # -- per forward ----------------------------------------------------------------------
    def needs(self, layer: int) -> Optional[str]:
        return "probs" if (self.props[layer] > 0 or self.config.theta < 1) else None

    def _graph(self, x_patch: torch.Tensor) -> torch.Tensor:
        B, M, _ = x_patch.shape
        kind = self.config.graph
        g = None
        if kind in ("spatial", "mixed"):
            grid = self.grid
            if grid is None or grid[0] * grid[1] != M:
                side = int(math.isqrt(M))
                if side * side != M:
                    raise CompressError(f"gtp: cannot lay {M} patch tokens on a grid for the spatial graph")
                grid = (side, side)
            if kind == "spatial":  # the same for every image and forward: normalised once per grid and device
                return self._spatial(grid, x_patch.device)
            g = spatial_graph(grid, x_patch.device).unsqueeze(0).expand(B, M, M)
        sem = semantic_graph(x_patch, self.config.num_neighbours)
        return normalise_graph(sem if g is None else torch.maximum(g, sem))

    def _spatial(self, grid: Tuple[int, int], device) -> torch.Tensor:
        """The normalised spatial graph, kept between forwards in eager mode (a traced graph builds it)."""
        if torch.compiler.is_compiling():
            return normalise_graph(spatial_graph(grid, device))
        cache = self.__dict__.setdefault("_spatial_graphs", {})
        key = (grid, str(device))
        if key not in cache:
            cache[key] = normalise_graph(spatial_graph(grid, device))
        return cache[key]

    def begin(self, x, state) -> None:
        if self.config.token_scale:
            state.size = torch.ones(x.shape[:2], device=x.device, dtype=torch.float32)
        if any(p > 0 for p in self.props) and self.config.alpha != 0:
            state.extras[GRAPH_KEY] = self._graph(x[:, state.num_prefix:])

    def edit_probs(self, layer, probs, state):
        theta = self.config.theta
        return probs if theta >= 1 else sparsify_attention(probs, theta)

    def after_attn(self, layer, x, info, state):
        P = state.num_prefix
        m = x.shape[1] - P
        num = max(0, min(self.props[layer], m - 1))
        if num == 0:
            return x
        scores = selection_scores(info.probs.float(), P)
        order = scores.argsort(dim=1, descending=True)
        keep = order[:, : m - num].sort(dim=1).values
        prop = order[:, m - num:]
        graph = state.extras.get(GRAPH_KEY)
        if graph is None:  # alpha == 0: plain removal of the propagated tokens
            return tokens.keep_tokens(x, state, keep, sort=False)
        rows = torch.cat([tokens.positions(0, P, x), keep + P], dim=1)  # prefix, then the kept patches in order
        prop = prop + P
        index = state.index.gather(1, rows)
        # the graph is over the original patch tokens: address it by where the current ones came from
        weights = graph_weights(graph, index[:, P:] - P, state.index.gather(1, prop) - P)
        x, state.size = propagate(x, weights, rows, prop, self.config.alpha, state.size)
        state.index = index
        return x
