"""Zero-TPrune (Wang, Dedhia, Jha, CVPR 2024): zero-shot token pruning on the attention graph.

A pruning layer after block l reads that block's attention probabilities and runs I' -> S -> I:
a one-pass pre-ranking (I'), similarity pruning of the less important half against the more
important half on cosine similarity of keys (S, "Sequential-U"), then Weighted PageRank importance
on the remaining tokens (I) with RMS head aggregation (EIR) and a variance band head filter (VHF).
No training. With ``merge`` (not in the paper) the S-stage averages each removed token into its
partner and attention weighs tokens by how many patches they stand for, as in ToMe: on DeiT-Tiny
this cuts the drift from the dense model's outputs by 4x (tools/results/zero_tprune_deit_tiny.md). With
``search`` the schedule is searched at the budget on unlabelled calibration images (the paper tuned its
schedule by Monte Carlo search) instead of spread evenly over every other block. See docs/methods.md
§2; the variance band is applied to the head's scores rescaled to mean 1 over the patch tokens (the
paper does not state the scale).
"""
from __future__ import annotations

import math
import random
from typing import Dict, List, Literal, Optional, Tuple, Union

import torch
from pydantic import Field, model_validator

from compress import tokens
from compress.errors import CompressError
from compress.pruners.base import PrunerConfig
from compress.pruners.token.base import TokenPruner, log_probs, mean_kl
from compress.registry import register_pruner


# ---- the method's pieces, as plain tensor functions ------------------------------------------


def weighted_pagerank(attn: torch.Tensor, iters: int, init: torch.Tensor, alive: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Power iteration s <- A^T s on row-stochastic ``attn`` (... x N x N); ``init`` is ... x N.

    With ``alive`` (... x N, 0/1) it runs on the subgraph of the alive tokens with its rows
    renormalised, without gathering a smaller matrix: dead tokens neither vote nor receive votes.
    The iterations are memory-bound GEMVs, so they run on cache-sized chunks of the matrices (all
    iterations of one chunk before the next): about 3x faster on CPU than sweeping the whole batch.
    """
    n = attn.shape[-1]
    lead = attn.shape[:-2]
    mats = attn.reshape(-1, n, n)
    s = init.expand(*lead, n).reshape(-1, 1, n)
    if alive is not None:
        alive = alive.to(attn.dtype).expand(*lead, n).reshape(-1, 1, n)
        inv_mass = 1.0 / torch.bmm(mats, alive.transpose(1, 2)).transpose(1, 2).clamp_min(1e-12)
        s = s * alive
    # one pass gains nothing from cache-sized chunks: then the whole batch is a single call; so does a traced
    # graph (torch.export, torch.compile), where a Python loop over the batch would fix the batch size, and a
    # batch that fits one chunk
    chunk = max(1, (1 << 20) // (n * n * attn.element_size()))
    if iters <= 1 or torch.compiler.is_compiling() or mats.shape[0] <= chunk:
        return _power_iterations(mats, s, iters, alive, inv_mass if alive is not None else None).reshape(*lead, n)
    out = torch.empty_like(s)
    for i in range(0, mats.shape[0], chunk):
        part = slice(i, i + chunk)
        out[part] = _power_iterations(mats[part], s[part], iters, None if alive is None else alive[part],
                                      None if alive is None else inv_mass[part])
    return out.reshape(*lead, n)


def _power_iterations(a: torch.Tensor, v: torch.Tensor, iters: int, live: Optional[torch.Tensor],
                      w: Optional[torch.Tensor]) -> torch.Tensor:
    """``iters`` steps of s <- s @ A on one run of matrices; with ``live`` (the alive mask) and ``w`` (inverse
    row masses) on the alive subgraph (see ``weighted_pagerank``)."""
    if live is None:
        for _ in range(iters):
            v = torch.bmm(v, a)
        return v
    if iters <= 0:
        return v
    # s <- ((s * w) @ A) * live, iterated on u = s * w: u <- u @ (A * (live * w)), the column
    # scaling folded into the chunk's matrices once so every step is a single GEMV
    u = v * w
    if iters > 1:
        scaled = a * (live * w)
        for _ in range(iters - 1):
            u = torch.bmm(u, scaled)
    return torch.bmm(u, a) * live


def initial_scores(shape: Tuple[int, ...], n: int, cls_init: str, device, dtype, alive: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Uniform start; with ``sqrt_n`` the CLS token (index 0) starts sqrt(N) times higher, N being
    the number of (alive) tokens."""
    if alive is None:
        return start_scores(n, n, cls_init, device, dtype).expand(*shape, n)
    s = torch.ones(*shape, n, device=device, dtype=dtype)
    s = s * alive.to(dtype)
    if cls_init == "sqrt_n":
        s[..., 0] = s.sum(-1).sqrt()
    return s / s.sum(-1, keepdim=True)


def start_scores(n: int, alive: int, cls_init: str, device, dtype) -> torch.Tensor:
    """``initial_scores`` of one image (N) with ``alive`` tokens, CLS among them, as one vector: multiplied by a
    0/1 alive mask it is the start on the alive subgraph (three ops at batch 1 instead of eight)."""
    cls = math.sqrt(alive) if cls_init == "sqrt_n" else 1.0
    s = torch.full((n,), 1.0 / (alive - 1 + cls), device=device, dtype=dtype)
    if cls != 1.0:
        s[0] = cls / (alive - 1 + cls)
    return s


def aggregate_heads(scores: torch.Tensor, band: Tuple[float, float]) -> torch.Tensor:
    """EIR + VHF: RMS over the heads whose score variance lies in ``band`` (B x H x M -> B x M).

    Variance is measured on the scores rescaled to mean 1 over the M tokens. Images where no head
    falls in the band use all heads.
    """
    m = scores.shape[-1]
    rescaled = scores * (m / scores.sum(-1, keepdim=True).clamp_min(1e-12))
    var = rescaled.var(-1, unbiased=False)
    keep = (var >= band[0]) & (var <= band[1])
    keep = keep | ~keep.any(1, keepdim=True)
    # the mean of the kept heads' squares as one (B x 1 x H) @ (B x H x M) product (few ops: at batch 1 each
    # costs more than its arithmetic)
    return ((keep / keep.sum(1, keepdim=True)).unsqueeze(1) @ rescaled.square()).squeeze(1).sqrt()


def similarity_pairs(keys: torch.Tensor, importance: torch.Tensor, r: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """S-stage (Sequential-U): r (victim, partner) pairs, each B x r: a victim from the less important half and
    the token of the more important half it is most cosine-similar to."""
    B, M = importance.shape
    order = importance.argsort(dim=1, descending=True)
    half = (M + 1) // 2
    top, low = order[:, :half], order[:, half:]
    unit = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    best, partner = (tokens.take_rows(unit, low) @ tokens.take_rows(unit, top).transpose(1, 2)).max(-1)  # cosine
    pick = best.topk(min(r, M - half), dim=1).indices
    return low.gather(1, pick), top.gather(1, partner.gather(1, pick))


def merge_into(x: torch.Tensor, size: torch.Tensor, victims: torch.Tensor, partners: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean of every victim into its partner (``x`` B x M x C, ``size`` B x M); the
    victims' rows are left as they are (the caller drops them). Returns (x, size).

    Only the partners' rows change, by x_p += sum_v s_v (x_v - x_p) / S_p (S_p: the merged size),
    which is the weighted mean without reweighting the whole tensor.
    """
    s_victim = size.gather(1, victims)
    merged = size.scatter_add(1, partners, s_victim)
    weight = (s_victim / merged.gather(1, partners)).to(x.dtype).unsqueeze(-1)
    delta = (tokens.take_rows(x, victims) - tokens.take_rows(x, partners)) * weight
    return tokens.add_rows(x, partners, delta), merged


def _complement(m: int, drop: torch.Tensor) -> torch.Tensor:
    """Indices of 0..m-1 not in ``drop`` (B x r), in ascending order (B x (m - r)).

    A top-k of distinct keys (kept tokens first, lower positions first) rather than ``nonzero``, whose
    data-dependent size a traced graph (ONNX, torch.export) cannot have."""
    position = torch.arange(m, device=drop.device, dtype=torch.float32)
    key = (2 * m - position).expand(drop.shape[0], m).scatter(1, drop, -1.0)
    return key.topk(m - drop.shape[1], dim=1).indices


# ---- config -----------------------------------------------------------------------------------


class PruningLayer(PrunerConfig):
    block: int = Field(ge=0, description="the pruning layer sits after this block and reads its attention")
    s_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of patch tokens the S-stage removes")
    i_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of patch tokens the I-stage removes")

    @model_validator(mode="after")
    def _total(self):
        if self.s_ratio + self.i_ratio >= 1:
            raise ValueError("s_ratio + i_ratio must be < 1")
        return self


# Default budget: the paper's DeiT-S operating point (Zero-TP-a, -34.7 % FLOPs), spread over pruning
# layers after every other block from depth/4 to depth-3 (DeiT: 3, 5, 7, 9), three quarters of each
# layer's removals by the S-stage. Measured on DeiT-Tiny (tools/results/zero_tprune_deit_tiny.md): as
# close to the dense outputs as starting at block 2 or pruning after every block, and faster, since
# there are fewer pruning layers and none in the first three blocks, where WPR needs 30 iterations.
DEFAULT_GMACS_RATIO = 0.655  # analytic (blocks only); measured on DeiT-S: about 0.665
MAX_REMOVAL = 0.3  # a larger budget spreads over more pruning layers (see ZeroTPrune.solve_schedule)
SEARCH_CAP = 0.9  # the most of the patch tokens one searched pruning layer may remove


def layers_removing(fractions: Dict[int, float], share: float) -> List[PruningLayer]:
    """Pruning layers after the blocks of ``fractions``, each removing its fraction of the patch tokens,
    ``share`` of it by the S-stage and the rest by the I-stage."""
    return [PruningLayer(block=b, s_ratio=f * share, i_ratio=f * (1 - share)) for b, f in sorted(fractions.items())]


class ScheduleSearch(PrunerConfig):
    """Monte Carlo search of the pruning layers at the budget, as the paper tuned its schedule: random
    schedules scored by the KL divergence of the pruned from the dense outputs on unlabelled images."""

    trials: int = Field(32, ge=1, description="schedules scored, the default one first; the second half perturbs the best so far")
    images: int = Field(1024, ge=1, description="calibration images, a seeded random subset of the split (on DeiT-Tiny 256 "
                        "were too few: the schedule found fit those images and did no better than the default on others)")
    max_layers: Optional[int] = Field(None, ge=1, description="most pruning layers in a schedule (default: no limit). Each "
                                      "runs explicit attention, which costs time its MACs do not show; on DeiT-Tiny the "
                                      "schedules found use all 10 blocks, and capping them at 4 left nothing to find")
    split: str = Field("train", description="data split the calibration images come from (labels unused)")
    seed: int = 0


class ZeroTPruneConfig(PrunerConfig):
    schedule: Optional[List[PruningLayer]] = Field(
        None, description="pruning layers; default: after every other block from depth/4 on, at about 0.665 of dense GMACs"
    )
    target_gmacs_ratio: Optional[float] = Field(
        None, gt=0, le=1, description="budget instead of a schedule: the blocks' MACs relative to dense"
    )
    similarity_share: float = Field(0.75, ge=0, le=1, description="share of removals done by the S-stage")
    wpr_iters: Optional[Union[int, List[int]]] = Field(
        None, description="WPR iterations: one number, or one per block; default 30 / 8 / 1 (first 3 / middle / last 3)"
    )
    cls_init: Literal["sqrt_n", "uniform"] = "sqrt_n"
    head_band: Tuple[float, float] = Field((0.01, 0.7), description="VHF variance band [v_min, v_max]")
    merge: bool = Field(
        False, description="S-stage merges each removed token into its most similar kept one (size-weighted mean) and "
        "attention counts every token by its size, as ToMe does; the paper prunes (false)"
    )

    search: Optional[ScheduleSearch] = Field(
        None, description=f"{ScheduleSearch().model_dump()}: search the schedule at the budget "
        "for the outputs closest to dense on unlabelled images of the split, instead of spreading it evenly (not with schedule)"
    )

    @model_validator(mode="after")
    def _exclusive(self):
        if self.schedule is not None and self.target_gmacs_ratio is not None:
            raise ValueError("give either schedule or target_gmacs_ratio, not both")
        if self.schedule is not None and self.search is not None:
            raise ValueError("give either schedule or search, not both")
        if self.head_band[0] > self.head_band[1]:
            raise ValueError("head_band must be [v_min, v_max] with v_min <= v_max")
        return self


@register_pruner("zero_tprune")
class ZeroTPrune(TokenPruner):
    """Zero-shot token pruning by Weighted PageRank on attention + key-similarity pruning."""

    name = "zero_tprune"
    Config = ZeroTPruneConfig

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.prop_attn = bool(self.config.merge)  # proportional attention needs the merged sizes

    # -- planning ---------------------------------------------------------------------------
    @property
    def budget(self) -> float:
        """The GMACs ratio a schedule is solved or searched for."""
        return self.config.target_gmacs_ratio or DEFAULT_GMACS_RATIO

    @staticmethod
    def candidate_blocks(depth: int) -> List[List[int]]:
        """Pruning-layer positions for a budget, fewest layers first: every other block from depth/4
        (DeiT: 3, 5, 7, 9), every other from depth/6 (2, 4, 6, 8, 10), every block from depth/6, every
        block from 1."""
        quarter, sixth = max(1, round(depth / 4)), max(1, round(depth / 6))
        return [list(range(quarter, depth - 2, 2)), list(range(sixth, depth - 1, 2)),
                list(range(sixth, depth - 1)), list(range(1 if depth > 2 else 0, depth - 1))]

    def solve_schedule(self, geometry, target: float) -> List[PruningLayer]:
        """One removal fraction for every pruning layer, solved for ``target`` GMACs, on the first
        candidate positions where no layer removes more than MAX_REMOVAL of the patch tokens: few
        layers cost least, but on DeiT-Tiny at 0.5 of the GMACs four layers removing 45 % each lose 12
        points more than nine removing 22 %."""
        share = self.config.similarity_share

        def layers_for(blocks, removed: float) -> List[PruningLayer]:
            return layers_removing(dict.fromkeys(blocks, removed), share)

        candidates = [c for c in self.candidate_blocks(geometry["depth"]) if c]
        if not candidates:
            raise CompressError(f"zero_tprune: a {geometry['depth']}-block model has no block to prune after")
        for blocks in candidates:
            def ratio(keep: float, blocks=blocks) -> float:
                return tokens.schedule_macs_ratio(geometry, self._counts(geometry, layers_for(blocks, 1 - keep)))

            removed = 1 - tokens.solve_monotone(ratio, target, 0.02, 1.0)
            if removed <= MAX_REMOVAL:
                break
        return layers_for(blocks, removed)

    def plan(self, geometry) -> None:
        cfg, depth = self.config, geometry["depth"]
        if cfg.schedule is not None:
            layers = list(cfg.schedule)
        else:
            layers = self.solve_schedule(geometry, self.budget)
        for layer in layers:
            if layer.block >= depth - 1:
                raise CompressError(f"zero_tprune.schedule: pruning after block {layer.block} of a {depth}-block model removes nothing useful")
        self.layers = {layer.block: layer for layer in layers}
        if isinstance(cfg.wpr_iters, int):
            self.iters = [cfg.wpr_iters] * depth
        elif cfg.wpr_iters is not None:
            if len(cfg.wpr_iters) != depth:
                raise CompressError(f"zero_tprune.wpr_iters: {len(cfg.wpr_iters)} entries for a {depth}-block model")
            self.iters = list(cfg.wpr_iters)
        else:
            self.iters = [30 if i < 3 else (1 if i >= depth - 3 else 8) for i in range(depth)]

    def pinned(self) -> dict:
        return {"schedule": [self.layers[b].model_dump() for b in sorted(self.layers)], "target_gmacs_ratio": None,
                "wpr_iters": list(self.iters), "search": None}

    # -- schedule search ----------------------------------------------------------------------
    def calibration(self):
        s = self.config.search
        return None if s is None else (s.split, s.images, s.seed)

    def scaled_schedule(self, weights: Dict[int, float], share: float, target: float) -> Optional[List[PruningLayer]]:
        """Pruning layers after the blocks of ``weights``, block b removing scale * weights[b] of the
        patch tokens (at most SEARCH_CAP), scale solved for ``target``; None where the cap stops it."""
        def layers(scale: float) -> List[PruningLayer]:
            return layers_removing({b: min(SEARCH_CAP, scale * w) for b, w in weights.items()}, share)

        def ratio(scale: float) -> float:
            return tokens.schedule_macs_ratio(self.geometry, self._counts(self.geometry, layers(scale)))

        scale = tokens.solve_monotone(lambda v: -ratio(v), -target, 0.0, SEARCH_CAP / min(weights.values()), iters=30)
        return layers(scale) if ratio(scale) <= target + 0.005 else None

    def _propose(self, rng: random.Random, best: Optional[tuple]) -> tuple:
        """(weights, share): a random schedule shape, or a perturbation of ``best``."""
        allowed = self.candidate_blocks(self.geometry["depth"])[-1]  # every block a pruning layer may follow
        most = min(self.config.search.max_layers or len(allowed), len(allowed))
        if best is None:
            blocks = rng.sample(allowed, rng.randint(1, most))
            return {b: rng.uniform(0.1, 1.1) for b in blocks}, rng.choice((0.5, 0.75, 1.0))
        weights, share = {b: w * math.exp(rng.gauss(0, 0.4)) for b, w in best[0].items()}, best[1]
        unused = [b for b in allowed if b not in weights]
        move = rng.random()
        if move < 0.2 and unused and len(weights) < most:
            weights[rng.choice(unused)] = rng.uniform(0.1, 1.1)
        elif move < 0.4 and len(weights) > 1:
            del weights[rng.choice(sorted(weights))]
        elif move < 0.5:
            share = rng.choice((0.5, 0.75, 1.0))
        return weights, share

    @torch.no_grad()
    def calibrate(self, model, batches, labels=None) -> dict:
        """Search the schedule (``config.search``) at the budget on ``batches`` (``labels`` unused): keep the one
        whose outputs are closest to the dense model's (mean KL). The default schedule is the first trial,
        so the search never ends further from dense on these images than the default."""
        cfg = self.config.search
        target = self.budget
        rng = random.Random(cfg.seed)
        default = sorted(self.layers.values(), key=lambda layer: layer.block)
        self.layers = {}  # nothing pruned: the patched model gives the dense outputs
        dense = log_probs(model, batches)

        def kl(layers: List[PruningLayer]) -> float:
            self.layers = {layer.block: layer for layer in layers}
            return mean_kl(model, batches, dense)

        shape = ({layer.block: 1.0 for layer in default}, self.config.similarity_share)
        best, best_kl = (shape, default), kl(default)
        default_kl, scored = best_kl, 1
        # the default's layer positions and denser ones, evenly loaded, first: on DeiT-Tiny the good
        # schedules prune after every block, which a few random draws alone did not always reach
        most = cfg.max_layers or self.geometry["depth"]
        starts = [({b: 1.0 for b in blocks}, share) for blocks in self.candidate_blocks(self.geometry["depth"])
                  for share in (0.75, 1.0) if blocks and len(blocks) <= most]
        starts = [start for start in starts if start != shape]
        from compress.progress import track

        for trial in track(range(1, cfg.trials), "zero_tprune search", unit="trials"):
            if trial <= len(starts):
                weights, share = starts[trial - 1]
            else:
                weights, share = self._propose(rng, best[0] if trial >= cfg.trials // 2 else None)
            layers = self.scaled_schedule(weights, share, target)
            if layers is None:
                continue
            score, scored = kl(layers), scored + 1
            if score < best_kl:
                best, best_kl = ((weights, share), layers), score
        self.layers = {layer.block: layer for layer in best[1]}
        return {"default_kl": default_kl, "kl": best_kl, "trials": scored, "macs_ratio": self.expected_macs_ratio()}

    @staticmethod
    def _removals(m: int, layer: PruningLayer) -> Tuple[int, int]:
        r_s, r_i = round(layer.s_ratio * m), round(layer.i_ratio * m)
        over = r_s + r_i - (m - 1)
        if over > 0:
            r_i = max(0, r_i - over)
            r_s = min(r_s, m - 1 - r_i)
        return r_s, r_i

    def _counts(self, geometry, layers) -> list:
        by_block = {layer.block: layer for layer in layers}
        m, counts = geometry["num_patches"], []
        for b in range(geometry["depth"]):
            counts.append(m + geometry["num_prefix"])
            if b in by_block:
                r_s, r_i = self._removals(m, by_block[b])
                m -= r_s + r_i
        return counts

    def expected_tokens(self) -> list:
        return self._counts(self.geometry, list(self.layers.values()))

    # -- per forward ----------------------------------------------------------------------
    def needs(self, layer: int) -> Optional[str]:
        return "probs" if layer in self.layers else None

    def after_block(self, layer, x, info, state):
        step = self.layers.get(layer)
        if step is None:
            return x
        P = state.num_prefix
        attn = info.probs.float()  # B x H x N x N
        B, H, N, _ = attn.shape
        m = N - P
        r_s, r_i = self._removals(m, step)
        if r_s + r_i == 0:
            return x
        band, cls_init = tuple(self.config.head_band), self.config.cls_init
        alive = None  # every token; after the S-stage a 0/1 mask of its survivors (B x 1 x N, the same for every head)
        if r_s:
            # I': a single voting pass only orders the tokens for the partition.
            init = start_scores(N, N, cls_init, attn.device, attn.dtype)
            pre = aggregate_heads(weighted_pagerank(attn, 1, init)[..., P:], band)
            keys = info.k[:, :, P:].transpose(1, 2).reshape(B, m, -1).float()  # a strided view of qkv otherwise
            victims, partners = similarity_pairs(keys, pre, r_s)
            if self.config.merge:
                if state.size is None:  # sizes start at the first merge: the blocks before keep plain SDPA
                    state.size = torch.ones(B, N, device=x.device, dtype=torch.float32)
                x, state.size = merge_into(x, state.size, victims + P, partners + P)
            remaining = _complement(m, victims)
            if r_i:
                alive = torch.ones(B, 1, N, device=x.device, dtype=attn.dtype).scatter(2, victims.unsqueeze(1) + P, 0.0)
        else:
            remaining = torch.arange(m, device=x.device).expand(B, m)
        if r_i:
            # I: Weighted PageRank on the graph of the tokens that survived S.
            init = start_scores(N, N - r_s, cls_init, attn.device, attn.dtype)
            if alive is not None:
                init = alive * init
            wpr = weighted_pagerank(attn, self.iters[layer], init, alive)[..., P:]
            scores = aggregate_heads(tokens.take_cols(wpr, remaining), band)
            top = scores.topk(remaining.shape[1] - r_i, dim=1).indices
            remaining = remaining.gather(1, top)
        return tokens.keep_tokens(x, state, remaining)
