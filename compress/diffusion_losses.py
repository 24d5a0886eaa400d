"""The losses the diffusion task and APTP share: the weighted denoising MSE, and block-output distillation for
UNets (APTP's L_block, used again in the experts' fine-tune). Here, not in either, so neither imports the other.

The student's and the teacher's UNet block outputs (every down block, the mid block, every up block) are
captured with forward hooks and matched by MSE. Pruning slices widths *inside* blocks and skips layers, never
the channels between blocks, so the shapes agree. A routed set of experts (an APTP export) runs each expert on
its own samples; each expert's block outputs are matched with the teacher's rows of those samples, and the
experts' terms are averaged by sample count.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def unet_blocks(unet: nn.Module) -> List[nn.Module]:
    """A diffusers UNet's blocks in execution order."""
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


@contextmanager
def capture_blocks(unet: nn.Module) -> Iterator[List[List[torch.Tensor]]]:
    """Yields a list that fills with one list of block outputs per UNet call (per expert call for a routed set,
    in the order the experts ran)."""
    unets = list(unet.experts) if hasattr(unet, "experts") else [unet]
    calls: List[List[torch.Tensor]] = []

    def hook(index: int):
        def record(module, args, out):
            if index == 0:
                calls.append([])
            calls[-1].append(out[0] if isinstance(out, tuple) else out)
        return record

    handles = [blk.register_forward_hook(hook(i)) for u in unets for i, blk in enumerate(unet_blocks(u))]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def block_loss(student: List[List[torch.Tensor]], teacher: List[torch.Tensor],
               route: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of the MSE between student and teacher block outputs. ``route`` (expert per sample) says
    which teacher rows each expert call saw: the experts ran in ascending expert order (``RoutedUNets``)."""
    if route is None:
        (calls,) = student
        return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(calls, teacher)]).mean()
    total, n = 0.0, 0
    for k, calls in zip(route.unique().tolist(), student):
        idx = (route == k).nonzero().squeeze(1)
        term = torch.stack([F.mse_loss(s.float(), t[idx].float()) for s, t in zip(calls, teacher)]).mean()
        total, n = total + term * len(idx), n + len(idx)
    return total / n


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE (over every other dimension) weighted by ``weight`` (the scheduler's loss weighting)."""
    per = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (per * weight).mean()
