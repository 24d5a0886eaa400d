"""Model weights read and written the same way in one process, under DDP and under DeepSpeed ZeRO.

Why pruners cannot just edit ``param.data`` under DeepSpeed: the optimizer steps its own fp32 master
copy of every weight and copies it back into the parameters after each step, so an edit made only to the
parameter (a mask, ISS-P's shrinkage) is undone one step later (ZeRO-1/2, and bf16/fp16 at any stage).
Under ZeRO-3 a parameter is moreover an empty placeholder outside its module's forward: its values live
in partitions spread over the ranks.

``read`` returns full fp32 values (DeepSpeed's ``safe_get_full_fp32_param``: the master copy, gathered);
``write`` sets the master copy (``safe_set_full_fp32_param``) and the parameter itself (gathered and
re-partitioned under ZeRO-3). Under DeepSpeed both are collectives: every rank must call them for the same
parameters in the same order, with the same values (decide on rank 0 and broadcast first). Without
DeepSpeed they touch the tensors directly. ``consolidated_state`` gives a module's whole state dict that
way, for saving stage weights and exports.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn


def partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its values live in partitions across the ranks)."""
    return hasattr(param, "ds_id")


def has_master(param: torch.Tensor) -> bool:
    """A parameter whose values a DeepSpeed optimizer owns (an fp32 master copy, any ZeRO stage)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


@torch.no_grad()
def read(param: torch.Tensor) -> torch.Tensor:
    """The full fp32 values of ``param`` (a detached tensor; collective under DeepSpeed)."""
    if has_master(param) and param.requires_grad:
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(param)
        if full is not None:
            return full.detach().float().reshape(_shape(param)).clone()
    if partitioned(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().float().clone()
    return param.detach().float()


@torch.no_grad()
def write(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set ``param`` to ``value`` (full shape) everywhere it is kept: master copy and parameter."""
    if not has_master(param):
        param.copy_(value.to(param.dtype))
        return
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(param, value.detach().float().to(_device(param)).reshape(_shape(param)))
    if partitioned(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.copy_(value.to(param.dtype).reshape(param.shape))
    else:
        param.copy_(value.to(param.dtype).reshape(param.shape))


@torch.no_grad()
def read_grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The full gradient of ``param`` between backward and the optimizer step (None without one)."""
    if has_master(param):
        from deepspeed.utils import safe_get_full_grad

        g = safe_get_full_grad(param)
        return None if g is None else g.detach().float().reshape(_shape(param))
    return None if param.grad is None else param.grad.detach().float()


def shape(param: torch.Tensor) -> torch.Size:
    """The full shape (ZeRO-3 placeholders are empty; ``ds_shape`` keeps the real one)."""
    return _shape(param)


def _shape(param: torch.Tensor) -> torch.Size:
    return param.ds_shape if partitioned(param) else param.shape


def _device(param: torch.Tensor) -> torch.device:
    return param.ds_tensor.device if partitioned(param) else param.device


def consolidated_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``module.state_dict()`` with every parameter as its full fp32 value on CPU (collective under DeepSpeed);
    buffers as they are."""
    params = dict(module.named_parameters(remove_duplicate=False))
    out = {}
    for name, value in module.state_dict(keep_vars=True).items():
        p = params.get(name)
        if p is not None:
            out[name] = read(p).cpu().contiguous()
        else:
            out[name] = value.detach().cpu().contiguous()
    return out


def register_external(pairs: Iterable[Tuple[nn.Module, nn.Parameter]]) -> List[Tuple[nn.Module, nn.Parameter]]:
    """Tell ZeRO-3 that ``module``'s forward uses ``param`` although it is not one of its own (it is gathered
    whenever that module runs)."""
    import deepspeed

    pairs = list(pairs)
    for module, param in pairs:
        deepspeed.zero.register_external_parameter(module, param)
    return pairs
