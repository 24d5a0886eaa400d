"""Rank-0 decisions for pruners: every rank must remove the same weights/heads/channels, or the ranks' models
diverge.

``decide_on_rank0`` runs the decision on rank 0 only and broadcasts it (a JSON-able object such as
kept indices) to every rank with ``torch.distributed.broadcast_object_list``; without an initialised
process group it simply runs locally.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def decide_on_rank0(decide: Callable[[], Any]) -> Any:
    """``decide()`` on rank 0, its result broadcast to all ranks (the same object everywhere).

    ``decide`` runs on rank 0 alone, so it must not communicate: read weights that may be partitioned (DeepSpeed
    ZeRO, ``compress.zero.read`` is a collective) on every rank first, then decide from what was read."""
    if world_size() == 1:
        return decide()
    box = [decide() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def same_on_all_ranks(obj: Any) -> bool:
    """True when every rank holds an equal ``obj`` (a cheap consistency check)."""
    if world_size() == 1:
        return True
    objs = [None] * world_size()
    dist.all_gather_object(objs, obj)
    return all(o == objs[0] for o in objs)
