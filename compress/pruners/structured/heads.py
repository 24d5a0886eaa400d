"""Attention-head and MLP-width pruning of timm ViTs, iterative during training.

Every ``prune_every`` optimizer steps of the first training stage after ``attach`` (``steps`` times),
each block keeps its most important heads and MLP hidden units, moving linearly from dense to the
final widths. The final widths come from ``target_gmacs_ratio`` (whole-model GMACs relative to
dense, solved to one keep fraction for heads and MLP width of every block) or from
``head_pruning_ratio`` / ``mlp_pruning_ratio``. Importance: ``magnitude`` = sum of squared weights
of a head (its q, k, v rows and proj columns) or hidden unit (fc1 row, fc2 column); ``taylor`` =
sum of |w * dL/dw| over the same weights, accumulated over the optimizer steps since the last prune.

Physically smaller at once: removed rows/columns leave the ``nn.Linear`` layers through
torch-pruning's pruning functions, and ``num_heads``/``attn_dim`` of timm's ``Attention`` follow, so
fused SDPA keeps working. Rank 0 decides and broadcasts the kept indices (``distributed.decide_on_rank0``).

Optimizer and DDP: in a single process the model shrinks in ``before_batch`` and the
optimizer's param groups are pointed at the new tensors (their Adam/momentum state is dropped). Under
a multi-process strategy (DDP, DeepSpeed) the DDP wrapper and sharded optimizers hold the old tensors,
so removed heads/units are masked (their weights zeroed after every step, which also zeroes their
gradients) and the model shrinks physically at the end of that stage (``stage_done``), before the
next stage builds its own optimizer and wrapper. Under DeepSpeed the weights are read and masked through
``compress.zero`` (fp32 master copy; gathered under ZeRO-3), the stage trains a copy of the model, and
``rejoin`` shrinks the run's model once it holds the consolidated weights. If a prune stage does not train, the remaining
prunes happen at the start of the next training stage's schedule or, at the latest, in ``finalize``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Tuple

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from compress import distributed, zero
from compress.errors import CompressError
from compress.families import family_of
from compress.families.vit import ViT, block_macs, tokens_in
from compress.pruners.base import Pruner, PrunerConfig, StageRun
from compress.pruners.structured.widths import (
    apply_widths, changed_widths, keep_heads, keep_hidden, param_names, read_widths, swap_optimizer_params,
    vit_blocks,
)
from compress.registry import register_pruner

DEFAULT_GMACS_RATIO = 0.6


class HeadsConfig(PrunerConfig):
    target_gmacs_ratio: Optional[float] = Field(
        None, gt=0, le=1, description=f"whole-model GMACs relative to dense (default {DEFAULT_GMACS_RATIO} without ratios)")
    head_pruning_ratio: Optional[float] = Field(None, ge=0, lt=1, description="fraction of heads removed per block")
    mlp_pruning_ratio: Optional[float] = Field(None, ge=0, lt=1, description="fraction of MLP hidden units removed per block")
    importance: Literal["magnitude", "taylor"] = "magnitude"
    steps: int = Field(5, ge=1, description="number of prune events (iterative pruning)")
    prune_every: int = Field(100, ge=1, description="optimizer steps between prune events")
    round_to: int = Field(8, ge=1, description="MLP hidden widths are multiples of this (or the full width)")
    min_heads: int = Field(1, ge=1, description="heads every block keeps at least")

    @model_validator(mode="after")
    def _one_budget(self):
        if self.target_gmacs_ratio is not None and (self.head_pruning_ratio is not None or self.mlp_pruning_ratio is not None):
            raise ValueError("give either target_gmacs_ratio or head_pruning_ratio/mlp_pruning_ratio, not both")
        return self


# ---- planning: final and per-event widths ----------------------------------------------------------


def round_width(x: float, full: int, multiple: int, least: int = 1) -> int:
    """``x`` rounded to a multiple of ``multiple`` within [least, full] (``full`` itself is always allowed)."""
    if full <= multiple:
        return int(min(full, max(least, round(x))))
    return int(min(full, max(multiple, least, round(x / multiple) * multiple)))


class Plan:
    """Base widths of every block and the widths a budget asks for."""

    def __init__(self, model: nn.Module):
        self.blocks = [(attn.num_heads, mlp.fc1.out_features) for _, attn, mlp in vit_blocks(model)]
        self._dims = [(attn.qkv.in_features, attn.head_dim, attn.gate is not None) for _, attn, _ in vit_blocks(model)]
        self._model = model
        self._host = family_of(model, default=ViT).token_host(model)  # the ViT (a segmenter's backbone)

    def macs(self, widths: List[Tuple[int, int]]) -> float:
        host = self._host
        n = tokens_in(host)
        total = sum(block_macs(n, n, d, m, width=h * hd, gated=g) for (h, m), (d, hd, g) in zip(widths, self._dims))
        pe = host.patch_embed.proj
        rest = pe.weight.numel() * int(host.patch_embed.num_patches)
        head = getattr(self._model, "head", None)
        if isinstance(head, nn.Linear):
            rest += head.weight.numel()
        return float(total + rest)

    def at_fraction(self, k: float, cfg: HeadsConfig) -> List[Tuple[int, int]]:
        return [(int(min(h, max(cfg.min_heads, round(k * h)))), round_width(k * m, m, cfg.round_to))
                for h, m in self.blocks]

    def final(self, cfg: HeadsConfig) -> List[Tuple[int, int]]:
        if cfg.head_pruning_ratio is not None or cfg.mlp_pruning_ratio is not None:
            hr, mr = cfg.head_pruning_ratio or 0.0, cfg.mlp_pruning_ratio or 0.0
            return [(int(min(h, max(cfg.min_heads, h - round(hr * h)))), round_width(m - mr * m, m, cfg.round_to))
                    for h, m in self.blocks]
        target = cfg.target_gmacs_ratio if cfg.target_gmacs_ratio is not None else DEFAULT_GMACS_RATIO
        dense = self.macs(self.blocks)
        if self.macs(self.at_fraction(0.0, cfg)) / dense > target + 1e-9:
            raise CompressError(f"target_gmacs_ratio: {target} is below what min_heads/round_to allow "
                                f"({self.macs(self.at_fraction(0.0, cfg)) / dense:.3f})")
        lo, hi = 0.0, 1.0  # largest keep fraction whose GMACs ratio stays within the target
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.macs(self.at_fraction(mid, cfg)) / dense <= target + 1e-9 else (lo, mid)
        return self.at_fraction(lo, cfg)

    def at_event(self, final: List[Tuple[int, int]], event: int, events: int, cfg: HeadsConfig) -> List[Tuple[int, int]]:
        """Widths after prune event ``event`` of ``events`` (linear from dense to ``final``)."""
        t = event / events
        out = []
        for (h, m), (hf, mf) in zip(self.blocks, final):
            heads = h - round((h - hf) * t)
            hidden = max(mf, round_width(m - (m - mf) * t, m, cfg.round_to)) if event < events else mf
            out.append((heads, hidden))
        return out


# ---- importance ---------------------------------------------------------------------------------------


def head_scores(attn: nn.Module, tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-head sum of ``tensors`` (same shapes as qkv.weight, qkv.bias, proj.weight; squared or |w*g|)."""
    h, hd = attn.num_heads, attn.head_dim
    s = tensors["qkv.weight"].reshape(3, h, hd, -1).sum(dim=(0, 2, 3))
    if "qkv.bias" in tensors:
        s = s + tensors["qkv.bias"].reshape(3, h, hd).sum(dim=(0, 2))
    return s + tensors["proj.weight"].reshape(-1, h, hd).sum(dim=(0, 2))


def hidden_scores(mlp: nn.Module, tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    s = tensors["fc1.weight"].sum(dim=1) + tensors["fc2.weight"].sum(dim=0)
    return s + tensors["fc1.bias"] if "fc1.bias" in tensors else s


def _group_tensors(module: nn.Module, names: Tuple[str, ...]) -> Dict[str, nn.Parameter]:
    params = dict(module.named_parameters())
    return {n: params[n] for n in names if n in params}


ATTN_PARAMS = ("qkv.weight", "qkv.bias", "proj.weight")
MLP_PARAMS = ("fc1.weight", "fc1.bias", "fc2.weight")


def magnitude(module: nn.Module, names: Tuple[str, ...]) -> Dict[str, torch.Tensor]:
    """Squared weights (whole fp32 values: gathered under DeepSpeed ZeRO-3, a collective)."""
    return {n: zero.read(p) ** 2 for n, p in _group_tensors(module, names).items()}


def taylor_terms(module: nn.Module, names: Tuple[str, ...]) -> Dict[str, torch.Tensor]:
    """|w * dL/dw| between backward and the optimizer step (DeepSpeed's gradient partitions gathered)."""
    out = {}
    for n, p in _group_tensors(module, names).items():
        g = zero.read_grad(p)
        if g is not None:
            out[n] = (zero.read(p) * g).abs()
    return out


def top_k(scores: torch.Tensor, alive: List[int], k: int) -> List[int]:
    """The ``k`` highest-scoring of the ``alive`` indices, in ascending index order (ties: lower index)."""
    alive_t = torch.tensor(alive, dtype=torch.long)
    order = torch.argsort(-scores[alive_t].double(), stable=True)[:k]
    return sorted(int(i) for i in alive_t[order])


# ---- the pruner ---------------------------------------------------------------------------------------


@register_pruner("heads")
class HeadsPruner(Pruner):
    """Structured pruning of ViT attention heads and MLP hidden units during training (magnitude or Taylor)."""

    name = "heads"
    kind = "structured"
    Config = HeadsConfig

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self._model: Optional[nn.Module] = None
        self._base: Optional[Dict[str, Any]] = None
        self._plan: Optional[Plan] = None
        self._final: Optional[List[Tuple[int, int]]] = None
        self.events_done = 0
        self._alive: List[Tuple[List[int], List[int]]] = []  # per block: live heads, live hidden units
        self._widths: List[Tuple[int, int]] = []  # per block: heads, hidden units the model has now
        self._taylor: List[Dict[str, torch.Tensor]] = []
        self._attached = False
        self._run_here = False  # this training stage runs the schedule (the first to train after attach)
        self._trained_stages = 0
        self._physical = True

    # -- lifecycle ----------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Read the widths and the plan; nothing changes until the first prune event."""
        self._plan = Plan(model)
        self._final = self._plan.final(self.config)
        self._model = model
        self._base = read_widths(model)
        self._reset_alive()
        self._trained_stages = 0
        self._attached = True

    def detach(self, model: nn.Module) -> None:
        """Stop pruning; heads removed so far stay removed (the change is physical)."""
        self._attached = False
        self._run_here = False

    # -- training: the schedule runs in the first training stage after ``attach`` ---------------------
    def stage_setup(self, run: StageRun) -> None:
        if not self._attached:
            return
        self._trained_stages += 1
        self._run_here = self._trained_stages == 1 and not self.done
        # DeepSpeed trains a copy of the run's model (a new engine per stage): decide and mask on it, and let
        # ``rejoin`` shrink the run's model once it holds the consolidated weights.
        self._physical = run.world_size == 1 and not run.deepspeed
        self._model = run.model

    def before_batch(self, run: StageRun) -> None:
        if self._run_here and not self.done and run.step >= (self.events_done + 1) * self.config.prune_every:
            self.prune_event(physical=self._physical, optimizers=run.optimizers)

    def before_optimizer_step(self, run: StageRun) -> None:
        if self._run_here and self.config.importance == "taylor" and not self.done:
            self.accumulate_taylor()

    def after_optimizer_step(self, run: StageRun) -> None:
        if self._run_here and not self._physical and self.masked:
            self.apply_masks()

    def stage_end(self, run: StageRun) -> None:
        """Under DeepSpeed the last events run here, while the engine (and its process group) still stands:
        ``stage_done`` comes after Lightning's teardown."""
        if self._run_here and run.deepspeed:
            while not self.done:
                self.prune_event(physical=False)
            self._run_here = False

    def stage_done(self, run: StageRun) -> None:
        if self._run_here:
            self.complete(optimizers=run.optimizers if self._physical else ())
            self._run_here = False

    @property
    def final_widths(self) -> List[Tuple[int, int]]:
        return list(self._final or [])

    @property
    def done(self) -> bool:
        return self.events_done >= self.config.steps

    def _reset_alive(self) -> None:
        self._widths = [(a.num_heads, m.fc1.out_features) for _, a, m in vit_blocks(self._model)]
        self._alive = [(list(range(h)), list(range(m))) for h, m in self._widths]
        self._taylor = [{} for _ in self._alive]

    # -- decisions ----------------------------------------------------------------------------------
    def scores(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per block (head scores, hidden-unit scores) under the configured importance."""
        out = []
        for (_, attn, mlp), acc in zip(vit_blocks(self._model), self._taylor):
            if self.config.importance == "taylor" and acc:
                out.append((head_scores(attn, {k[5:]: v for k, v in acc.items() if k.startswith("attn.")}),
                            hidden_scores(mlp, {k[4:]: v for k, v in acc.items() if k.startswith("mlp.")})))
            else:  # magnitude, or Taylor before any gradient was seen
                out.append((head_scores(attn, magnitude(attn, ATTN_PARAMS)), hidden_scores(mlp, magnitude(mlp, MLP_PARAMS))))
        return out

    def decide(self, event: int) -> List[Dict[str, List[int]]]:
        """Kept head / hidden indices (of the current layers) per block after ``event``; rank 0's choice."""
        widths = self._plan.at_event(self._final, event, self.config.steps, self.config)
        scores = self.scores()  # on every rank: under DeepSpeed reading the weights is a collective

        def choose():
            kept = []
            for (hs, ms), (alive_h, alive_m), (h, m) in zip(scores, self._alive, widths):
                kept.append({"heads": top_k(hs, alive_h, min(h, len(alive_h))),
                             "hidden": top_k(ms, alive_m, min(m, len(alive_m)))})
            return kept

        return distributed.decide_on_rank0(choose)

    def prune_event(self, physical: bool = True, optimizers=()) -> None:
        """One step of the schedule: decide, then shrink (or mask, under a multi-process strategy)."""
        kept = self.decide(self.events_done + 1)
        self.events_done += 1
        self._alive = [(k["heads"], k["hidden"]) for k in kept]
        if physical:
            self.shrink(optimizers)
        else:
            self.apply_masks()
        self._taylor = [{} for _ in self._alive]

    def shrink(self, optimizers=()) -> None:
        """Remove every head / hidden unit that is not alive; re-point ``optimizers`` at the new tensors."""
        before = param_names(self._model)
        for (_, attn, mlp), (heads, hidden) in zip(vit_blocks(self._model), self._alive):
            keep_heads(attn, heads)
            keep_hidden(mlp, hidden)
        swap_optimizer_params(list(optimizers), before, self._model)
        self._reset_alive()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the weights of removed heads / units (multi-process training; shrunk at the stage end). Under
        DeepSpeed the optimizer's fp32 master copy is zeroed too (``compress.zero.write``)."""
        for (_, attn, mlp), (heads, hidden) in zip(vit_blocks(self._model), self._alive):
            hmask = torch.zeros(attn.num_heads, dtype=torch.bool)
            hmask[heads] = True
            cmask = hmask.repeat_interleave(attn.head_dim)
            umask = torch.zeros(mlp.fc1.out_features, dtype=torch.bool)
            umask[hidden] = True
            _mul(attn.qkv.weight, cmask.repeat(3)[:, None])
            if attn.qkv.bias is not None:
                _mul(attn.qkv.bias, cmask.repeat(3))
            _mul(attn.proj.weight, cmask[None, :])
            _mul(mlp.fc1.weight, umask[:, None])
            if mlp.fc1.bias is not None:
                _mul(mlp.fc1.bias, umask)
            _mul(mlp.fc2.weight, umask[None, :])

    @property
    def pending(self) -> bool:
        """Decisions made but not yet physical (without looking at the model, which a token pruner may have
        patched since)."""
        return any(len(h) < n_h or len(m) < n_m for (h, m), (n_h, n_m) in zip(self._alive, self._widths))

    @property
    def masked(self) -> bool:
        return any(len(h) < a.num_heads or len(m) < p.fc1.out_features
                   for (h, m), (_, a, p) in zip(self._alive, vit_blocks(self._model)))

    def accumulate_taylor(self) -> None:
        for acc, (_, attn, mlp) in zip(self._taylor, vit_blocks(self._model)):
            terms = {f"attn.{k}": v for k, v in taylor_terms(attn, ATTN_PARAMS).items()}
            terms.update({f"mlp.{k}": v for k, v in taylor_terms(mlp, MLP_PARAMS).items()})
            for k, v in terms.items():
                acc[k] = acc[k] + v if k in acc else v

    def decisions(self) -> Dict[str, Any]:
        return {"events_done": self.events_done, "alive": [[list(h), list(m)] for h, m in self._alive]}

    def rejoin(self, model: nn.Module) -> None:
        """After a DeepSpeed stage (which trained a masked copy): continue on ``model``, which holds the
        consolidated weights, and shrink it now, before the next stage builds its engine."""
        self._model = model
        if self.pending:
            self.shrink()

    def complete(self, optimizers=()) -> None:
        """Run the remaining prune events now and make everything physical."""
        while not self.done:
            self.prune_event(physical=False)
        if self.pending:
            self.shrink(optimizers)

    # -- export -------------------------------------------------------------------------------------
    def finalize(self, model: nn.Module) -> Dict[str, Any]:
        if self._model is not model:
            raise CompressError("heads: finalize got a different model than the one attached")
        self.complete()
        return changed_widths(self._base, model)

    @classmethod
    def apply_edits(cls, model: nn.Module, edits: Dict[str, Any]) -> None:
        apply_widths(model, edits)

    def state_dict(self) -> Dict[str, Any]:
        edits = changed_widths(self._base, self._model) if self._model is not None else {}
        state = {"events_done": self.events_done, "edits": edits}
        if self._model is not None and self.pending:  # mid-stage under DDP/DeepSpeed: the decisions not yet physical
            state["alive"] = [[list(h), list(m)] for h, m in self._alive]
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume after a completed stage: the model (still dense) takes the recorded widths again."""
        self.events_done = int(state.get("events_done", 0))
        if state.get("edits") and self._model is not None and not changed_widths(self._base, self._model):
            apply_widths(self._model, state["edits"])
            self._reset_alive()
        alive = state.get("alive")
        if alive and self._model is not None and len(alive) == len(self._alive):
            self._alive = [(list(h), list(m)) for h, m in alive]


@torch.no_grad()
def _mul(param: torch.Tensor, mask: torch.Tensor) -> None:
    """``param *= mask`` (broadcast), in DeepSpeed's master copy too when it keeps one."""
    if zero.has_master(param):
        full = zero.read(param)
        zero.write(param, full * mask.to(full.device))
    else:
        param.mul_(mask.to(param.device))
