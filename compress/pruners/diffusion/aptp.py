"""APTP (ICLR'25, methods.md §7): prompt-routed pruning of a text-to-image UNet into K physically smaller
experts.

In the ``prune`` stage the UNet is frozen and only the router (architecture predictor + codes) trains,
with L = L_ddpm + w_res L_res + w_cont L_cont + w_distill L_distill + w_block L_block + w_std L_std +
w_max L_max. For the first ``pretrain_steps`` the UNet is gated by the router's own sampled gates; after
that each prompt gets a code by Sinkhorn-balanced assignment and the UNet runs with that code's gates.
When the stage ends every training prompt is routed (argmax) to its expert ("filtering") and each code
is sliced into its own narrower UNet (``slicing.py``); later stages (``distill`` from the dense model)
fine-tune the experts, each on the prompts routed to it. The export holds the router and the K UNets;
their widths are the edits ``apply_edits`` replays on load.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from compress.errors import CompressError
from compress.pruners.base import Pruner, PrunerConfig
from compress.pruners.diffusion.gates import GateHooks, Structure, find_structure, macs_ratio, unet_structure
from compress.pruners.diffusion.router import Router, contrastive_loss, sinkhorn
from compress.pruners.diffusion.slicing import keep_from_gates, slice_unet
from compress.registry import register_pruner
from compress.diffusion_losses import capture_blocks, weighted_mse


class APTPConfig(PrunerConfig):
    experts: int = Field(8, gt=0, description="K architecture codes (experts)")
    target_macs_ratio: float = Field(0.6, gt=0, le=1, description="average UNet MACs relative to dense")
    pretrain_steps: int = Field(500, ge=0, description="router pretraining steps (gates from the router itself)")
    temperature: float = Field(0.4, gt=0)
    base: float = Field(3.0, description="Gumbel-Sigmoid offset toward keeping")
    ff_gate_groups: int = Field(32, gt=0)
    sinkhorn_eps: float = Field(0.05, gt=0)
    sinkhorn_iters: int = Field(3, gt=0)
    w_resource: float = 2.0
    w_contrastive: float = 100.0
    w_distill: float = 0.2
    w_block: float = 0.2
    w_std: float = 0.1
    w_max: float = 0.1
    w_commit: float = Field(1.0, ge=0, description="pulls the router's architecture toward its assigned code (1 - "
                            "cosine; VQ-style commitment, not in the paper's loss list) so that argmax routing at "
                            "inference reproduces the balanced training assignment")


class RoutedUNets(nn.Module):
    """The router and K sliced UNets; ``forward(x, t, cond, route)`` runs each sample on its expert
    (``route=None``: all on ``expert``, default the expert with the most training prompts)."""

    def __init__(self, router: Router, experts: List[nn.Module], pair_of, unit, default_expert: int = 0):
        super().__init__()
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.pair_of, self.unit = list(pair_of), list(unit)
        self.default_expert = default_expert
        self.expert: Optional[int] = None  # set to measure one expert alone

    @property
    def config(self):
        return self.experts[0].config

    @torch.no_grad()
    def route(self, prompt_emb: torch.Tensor) -> torch.Tensor:
        return route_argmax(self.router, prompt_emb, self.pair_of, self.unit)

    def forward(self, x, t, cond, route: Optional[torch.Tensor] = None):
        if route is None:
            k = self.default_expert if self.expert is None else self.expert
            return self.experts[k](x, t, encoder_hidden_states=cond, return_dict=False)[0]
        out = None
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        for k in route.unique().tolist():
            idx = (route == k).nonzero().squeeze(1)
            y = self.experts[k](x[idx], t[idx], encoder_hidden_states=cond[idx], return_dict=False)[0]
            if out is None:
                out = y.new_zeros(x.shape[0], *y.shape[1:])
            out = out.index_copy(0, idx, y)
        return out


@torch.no_grad()
def init_codes(router: Router, logits: torch.Tensor, emb: torch.Tensor) -> None:
    """Data-dependent codebook init when router pretraining ends (as VQ codebooks are often seeded from
    encoder outputs): the K most mutually different architectures the router predicts for the batch
    (farthest-point on their routing embeddings) become the codes; with fewer distinct ones, the remaining
    codes keep their init. Codes that all start at the base offset stay identical when only the resource loss
    moves them, and argmax routing then sends every prompt to one expert."""
    picked = [0]
    for _ in range(1, min(router.experts, len(emb))):
        closeness = (emb @ emb[picked].t()).max(1).values
        j = int(closeness.argmin())
        if closeness[j] > 1 - 1e-6:
            break  # nothing new left
        picked.append(j)
    router.codes.weight[: len(picked)] = logits[picked]


def route_argmax(router: Router, prompt_emb: torch.Tensor, pair_of, unit) -> torch.Tensor:
    """Inference routing: the code whose (noise-free) architecture is most cosine-similar."""
    w, d = router.gates(router.logits(prompt_emb), sample=False)
    wc, dc = router.code_gates(sample=False)
    e = router.embedding(w, d, pair_of, unit)
    ec = router.embedding(wc, dc, pair_of, unit)
    return (e @ ec.t()).argmax(-1)


def _dataset_prompts(ds) -> List[str]:
    from torch.utils.data import Subset

    idx = None
    while isinstance(ds, Subset):
        idx = [ds.indices[i] for i in idx] if idx is not None else list(ds.indices)
        ds = ds.dataset
    prompts = getattr(ds, "prompts", [])
    return [prompts[i] for i in idx] if idx is not None else list(prompts)


@register_pruner("aptp")
class APTP(Pruner):
    """APTP (ICLR'25): prompt router + K codes -> K physically smaller UNet experts"""

    name = "aptp"
    kind = "diffusion"
    targets = "unet"
    Config = APTPConfig

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.step = 0
        self.sliced = False
        self.assignment: Dict[str, int] = {}
        self.edits: Dict[str, Any] = {}
        self.model: Optional[nn.Module] = None
        self.hooks: Optional[GateHooks] = None

    # -- attach --------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        c = self.config
        unet, self.structure = unet_structure(model, c.ff_gate_groups, "aptp")
        if not self.structure.groups:
            raise CompressError("aptp: the UNet has no prunable groups (attention heads, ResNet groups, GEGLU)")
        total, prunable = self.structure.total_macs, self.structure.prunable_macs
        self.target = 1 - (1 - c.target_macs_ratio) * total / prunable  # total-MACs target -> prunable-MACs target
        if self.target <= 0:
            raise CompressError(f"aptp.target_macs_ratio: {c.target_macs_ratio} is out of reach: only "
                                f"{prunable / total:.2f} of the UNet's MACs are prunable")
        s = self.structure
        self.pair_of = [g.pair for g in s.groups]
        self.unit = [g.unit for g in s.groups]
        model.aptp_router = Router(model._prompt[0].dim, [g.n for g in s.groups], len(s.pairs), c.experts,
                                   c.temperature, c.base)
        unet.requires_grad_(False)  # pruning stage: the UNet is frozen, router and codes train
        self.hooks = GateHooks(unet, s)
        self.model = model

    def detach(self, model: nn.Module) -> None:
        if self.hooks is not None:
            self.hooks.remove()
        if hasattr(model, "aptp_router"):
            del model.aptp_router
        model.unet.requires_grad_(True)

    # -- the pruning-stage loss ------------------------------------------------------------------
    def wants_loss(self) -> bool:
        return not self.sliced

    def own_loss(self, model, batch, teacher):
        """Until the experts are sliced, the stage trains the router through the gated UNet (``diffusion_loss``)."""
        return self.diffusion_loss(model, batch, teacher) if self.wants_loss() else None

    def _run(self, model, b, width, depth, capture: List[torch.Tensor]):
        try:
            self.hooks.set(width, depth)
            with capture_blocks(model.unet) as calls:
                out = model(b.noisy, b.t, b.cond)
            capture.extend(calls[0])
            return out
        finally:
            self.hooks.set(None, None)

    def diffusion_loss(self, model, b, teacher=None):

        c, r = self.config, model.aptp_router
        logits = r.logits(b.pooled)
        w_r, d_r = r.gates(logits, sample=True)
        e_r = r.embedding(w_r, d_r, self.pair_of, self.unit)
        commit = logits.new_zeros(())
        if self.step < c.pretrain_steps:
            width, depth = w_r, d_r
        else:
            if self.step == c.pretrain_steps and model.training:
                init_codes(r, logits.detach(), e_r.detach())
            # noise-free code gates: the resource loss then measures exactly the experts that are exported
            # (with Gumbel noise here the exported, noise-free experts came out well above the budget)
            wc, dc = r.code_gates(sample=False)
            e_c = r.embedding(wc, dc, self.pair_of, self.unit)
            idx = sinkhorn(e_r.detach() @ e_c.detach().t(), c.sinkhorn_eps, c.sinkhorn_iters)
            width, depth = wc[idx], dc[idx]
            commit = (1 - (e_r * e_c[idx].detach()).sum(-1)).mean()
        full_blocks, blocks = [], []
        with torch.no_grad():
            full = self._run(model, b, None, None, full_blocks)
        pred = self._run(model, b, width, depth, blocks)
        m = macs_ratio(self.structure, width, depth)
        losses = {
            "denoise": weighted_mse(pred, b.target, b.weight),
            "resource": (torch.log(m.mean() / self.target)).abs(),
            "contrastive": contrastive_loss(e_r, b.pooled),
            "distill": F.mse_loss(pred, full),
            "block": torch.stack([F.mse_loss(s, t) for s, t in zip(blocks, full_blocks)]).mean(),
            "std": -m.std() if m.numel() > 1 else m.new_zeros(()),
            "max": 1 - m.max(),
            "commit": commit,
        }
        loss = losses["denoise"] + sum(getattr(c, f"w_{k}") * v for k, v in losses.items() if k != "denoise")
        if model.training:
            self.step += 1
        logs = {f"train/{k}": v.detach() for k, v in losses.items()}
        logs["train/macs_ratio"] = m.mean().detach()
        return loss, logs

    # -- filtering and slicing -------------------------------------------------------------------
    def stage_end(self, run) -> None:
        """The search is over: route the training prompts, then slice the experts (once)."""
        if not self.sliced:
            loader = run.trainer.train_dataloader
            prompts = _dataset_prompts(loader.dataset) if loader is not None else []
            self.filter_prompts(run.model, prompts)
            self.slice(run.model)

    @torch.no_grad()
    def filter_prompts(self, model: nn.Module, prompts: List[str], chunk: int = 256) -> Dict[str, int]:
        """Route every (distinct) prompt to its expert (argmax); kept for the report and the default expert."""
        r = model.aptp_router
        for i in range(0, len(prompts), chunk):
            part = list(dict.fromkeys(p for p in prompts[i:i + chunk] if p))
            if part:
                _, pooled = model.encode_prompts(part, next(r.parameters()).device)
                for p, k in zip(part, route_argmax(r, pooled, self.pair_of, self.unit).tolist()):
                    self.assignment[p] = k
        self.counts = Counter(self.assignment[p] for p in prompts if p in self.assignment)
        return self.assignment

    @torch.no_grad()
    def expert_gates(self, model: nn.Module):
        return model.aptp_router.code_gates(sample=False)

    def slice(self, model: nn.Module) -> None:
        """Replace the gated UNet by the router and K physically narrower UNets."""
        wc, dc = self.expert_gates(model)
        experts = []
        for k in range(self.config.experts):
            keep, skip = keep_from_gates(self.structure, wc[k], dc[k] if dc.numel() else dc)
            experts.append({"keep": keep, "skip": skip})
        counts = getattr(self, "counts", Counter())
        default = max(range(self.config.experts), key=lambda k: counts.get(k, 0)) if counts else 0
        r = model.aptp_router
        self.edits = {
            "router": {"prompt_dim": r.width[0].in_features, "width_sizes": r.width_sizes, "n_depth": r.n_depth,
                       "experts": r.experts, "temperature": r.temperature, "base": r.base},
            "experts": experts,
            "default_expert": default,
            "prompts_per_expert": [counts.get(k, 0) for k in range(self.config.experts)],
            "assignment": dict(list(self.assignment.items())[:2000]),
        }
        self.hooks.remove()
        router = model.aptp_router
        del model.aptp_router
        build_routed(model, self.edits, self.config.ff_gate_groups, router=router)
        model.unet.requires_grad_(True)
        self.sliced = True

    @classmethod
    def figures(cls, m) -> Dict[str, Dict[str, Any]]:
        """Per-expert MACs, parameters and images/s of the routed model (timed: only with the bench on)."""
        from compress.pruners.diffusion.report import expert_report, is_routed

        if not (m.timing and is_routed(m.pruned)):
            return {}
        details = expert_report(m.pruned, m.example, m.batch_sizes, m.device, m.repeats, m.dense_gmacs, m.edits or None)
        return {"details": {**details, "text": details["table"]}}

    def finalize(self, model: nn.Module) -> Dict[str, Any]:
        if not self.sliced:
            self.slice(model)
        return {**self.edits, "ff_gate_groups": self.config.ff_gate_groups}

    @classmethod
    def apply_edits(cls, model: nn.Module, edits: Dict[str, Any]) -> None:
        for key in ("router", "experts"):
            if key not in edits:
                raise CompressError(f"edits: aptp edits have no {key!r}")
        build_routed(model, edits, int(edits.get("ff_gate_groups", 32)))

    @classmethod
    def trace_variants(cls, model: nn.Module, edits: Dict[str, Any]) -> List[Tuple[str, Any]]:
        """One graph per expert (``.expert<k>``): routing picks a whole UNet per prompt, so each deploys alone
        and the router (``model.route(prompt_emb)``) chooses which one to run."""
        def run_expert(k: int):
            return lambda m: setattr(m.unet, "expert", k)

        return [(f".expert{k}", run_expert(k)) for k in range(len(edits.get("experts", [])))] or [("", None)]

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "sliced": self.sliced, "edits": self.edits if self.sliced else {}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        if state.get("sliced") and not self.sliced and self.model is not None:
            self.edits = state["edits"]
            self.hooks.remove()
            del self.model.aptp_router
            build_routed(self.model, self.edits, self.config.ff_gate_groups)
            self.model.unet.requires_grad_(True)
            self.sliced = True


def build_routed(model: nn.Module, edits: Dict[str, Any], ff_gate_groups: int,
                 router: Optional[Router] = None) -> None:
    """``model.unet`` -> ``RoutedUNets`` with one sliced copy of the UNet per recorded expert."""
    unet = model.unet
    s: Structure = find_structure(unet, ff_gate_groups)
    cfg = edits["router"]
    if router is None:
        router = Router(int(cfg["prompt_dim"]), cfg["width_sizes"], int(cfg["n_depth"]), int(cfg["experts"]),
                        float(cfg["temperature"]), float(cfg["base"]))
    if [g.n for g in s.groups] != list(cfg["width_sizes"]):
        raise CompressError("edits: the recorded gate groups do not match this UNet (another base model?)")
    experts = [slice_unet(copy.deepcopy(unet), s, {k: list(v) for k, v in e["keep"].items()}, list(e["skip"]))
               for e in edits["experts"]]
    model.unet = RoutedUNets(router, experts, [g.pair for g in s.groups], [g.unit for g in s.groups],
                             int(edits.get("default_expert", 0)))
