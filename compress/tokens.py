"""Token pruning on timm ViTs: an in-place, reversible class swap (the tomesd way).

``patch(model, policy)`` swaps each ``Block`` and its ``Attention`` for subclasses that call the
original submodules (norm, attn, ls, drop_path, mlp), so LayerScale, qk-norm and prefix tokens keep
working. Attention stays fused (SDPA) unless the policy asks a layer for its probabilities. The
policy removes tokens physically by gathering; prefix tokens (CLS, distillation, registers) are
never touched and stay in front. ``model._compress_tokens.state.index`` maps the surviving tokens to
their original positions, so dense tasks can scatter results back. ``remove_patch`` restores the
original classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block

from compress.errors import CompressError
from compress.families.vit import block_macs, require_vit, vit_geometry  # noqa: F401  (re-exported: the ViT family's)


@dataclass
class TokenState:
    """What the policy knows about the current token set (reset at every forward)."""

    num_prefix: int
    index: torch.Tensor  # B x N long: original position of every current token (-1: none, e.g. a semantic token)
    size: Optional[torch.Tensor] = None  # B x N float: how many original tokens each one stands for
    extras: Dict[str, Any] = field(default_factory=dict)  # per-forward scratch space for policies
    counts: list = field(default_factory=list)  # tokens entering each block, for tests and reports


@dataclass
class AttnInfo:
    """What a block's attention exposes to the policy when asked (B x H x N x ...)."""

    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    probs: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None  # what was added to the logits (+log size), B x 1 x 1 x N, if anything


class TokenPolicy:
    """Base for token pruners' per-forward behaviour. Override what you need."""

    prop_attn: bool = False  # add log(size) to attention logits when sizes are tracked

    def needs(self, layer: int) -> Optional[str]:
        """What block ``layer``'s attention must expose: None, "keys" or "probs"."""
        return None

    def edit_probs(self, layer: int, probs: torch.Tensor, state: TokenState) -> torch.Tensor:
        """Edit block ``layer``'s attention probabilities before they weight the values (only where
        ``needs`` asked for "probs"; e.g. GTP's attention sparsity). Default: unchanged."""
        return probs

    def after_attn(self, layer: int, x: torch.Tensor, info: AttnInfo, state: TokenState) -> torch.Tensor:
        """Between attention and MLP (ToMe, GTP)."""
        return x

    def after_block(self, layer: int, x: torch.Tensor, info: AttnInfo, state: TokenState) -> torch.Tensor:
        """Between two blocks (Zero-TPrune)."""
        return x

    def begin(self, x: torch.Tensor, state: TokenState) -> None:
        """Called once per forward, before the first block."""

    def enter_block(self, layer: int, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        """Replace the tokens entering block ``layer`` (e.g. STViT-R restores the full map). Default: unchanged."""
        return x

    def run_block(self, layer: int, block: nn.Module, x: torch.Tensor, state: TokenState) -> Optional[torch.Tensor]:
        """Compute block ``layer`` the policy's own way from the block's submodules (e.g. STViT's
        semantic token generation); None runs the standard block with the hooks above."""
        return None


class TokenRuntime:
    """Stored on the model as ``_compress_tokens``: the policy plus the state of the last forward."""

    def __init__(self, policy: TokenPolicy, num_prefix: int):
        self.policy = policy
        self.num_prefix = num_prefix
        self.state: Optional[TokenState] = None

    def reset(self, x: torch.Tensor) -> None:
        B, N = x.shape[:2]
        index = torch.arange(N, device=x.device).unsqueeze(0).expand(B, N)
        self.state = TokenState(num_prefix=self.num_prefix, index=index)
        self.policy.begin(x, self.state)


class PrunableAttention(Attention):
    """timm ``Attention`` that can expose q/k/probabilities and add a token-size bias."""

    _compress_request: Optional[str] = None
    _compress_info: Optional[AttnInfo] = None
    _compress_bias: Optional[torch.Tensor] = None
    _compress_edit: Optional[Any] = None  # callable probs -> probs, set by the block for "probs"

    def forward(self, x, attn_mask=None, is_causal=False):
        request, bias = self._compress_request, self._compress_bias
        if request is None and bias is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if getattr(self, "gate", None) is not None:
            raise CompressError("token pruning does not support gated attention")
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = _combine_masks(attn_mask, bias, q.dtype)
        info = self._compress_info
        if request == "probs":
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if mask is not None:
                logits = logits + mask
            probs = logits.softmax(dim=-1)
            if self._compress_edit is not None:
                probs = self._compress_edit(probs)
            info.probs = probs
            out = self.attn_drop(probs) @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal
            )
        info.q, info.k, info.bias = q, k, bias
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(out)))


def _combine_masks(attn_mask, bias, dtype):
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))
    if attn_mask is None:
        return bias
    return attn_mask if bias is None else attn_mask + bias


class PrunableBlock(Block):
    """timm ``Block`` with two policy hooks: after attention and after the block."""

    _compress_layer: int = -1
    _compress_runtime: Optional[TokenRuntime] = None

    def forward(self, x, attn_mask=None, is_causal=False):
        rt, layer = self._compress_runtime, self._compress_layer
        if layer == 0:
            rt.reset(x)
        policy, state = rt.policy, rt.state
        x = policy.enter_block(layer, x, state)
        state.counts.append(x.shape[1])
        replaced = policy.run_block(layer, self, x, state)
        if replaced is not None:
            if attn_mask is not None:
                raise CompressError("attention masks are not supported in blocks a token policy computes itself")
            return replaced
        info = AttnInfo()
        self.attn._compress_request = policy.needs(layer)
        self.attn._compress_info = info
        if type(policy).edit_probs is not TokenPolicy.edit_probs:
            self.attn._compress_edit = lambda probs: policy.edit_probs(layer, probs, state)
        self.attn._compress_bias = (
            state.size.log()[:, None, None, :].to(x.dtype) if (policy.prop_attn and state.size is not None) else None
        )
        if attn_mask is not None and x.shape[1] != state.index.shape[1]:
            raise CompressError("attention masks are not supported once tokens were removed")
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = policy.after_attn(layer, x, info, state)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        x = policy.after_block(layer, x, info, state)
        self.attn._compress_info = None
        self.attn._compress_edit = None
        self.attn._compress_bias = None  # no tensor stays on the module between forwards (torch.export flags it)
        return x


_PATCHED: Dict[type, type] = {Block: PrunableBlock, Attention: PrunableAttention}


def patched_class(cls: type) -> type:
    """The prunable class for a timm ``Block``/``Attention`` class or any subclass of one (tomesd's way: a class made
    on first use that puts the hooks in front of ``cls``, so ``remove_patch`` restores exactly ``cls``). The hooks
    need the timm layout (``norm1``, ``attn``, ``ls1``, ``mlp``...; ``qkv``, ``q_norm``...) a subclass keeps."""
    if cls not in _PATCHED:
        hooks = PrunableBlock if issubclass(cls, Block) else PrunableAttention
        # MRO: the hooks, then ``cls``, then timm's class: the hooks' ``super().forward`` (attention's dense path)
        # is ``cls``'s own forward
        name = f"Prunable{cls.__name__}"
        while name in globals():  # two subclasses of the same name from different modules
            name += "_"
        made = type(name, (hooks, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = _PATCHED[cls] = made  # importable by name (pickling a patched model)
    return _PATCHED[cls]


def original_class(module: nn.Module) -> type:
    """The class a patched module had before ``patch`` (itself when it is not patched)."""
    return next((c for c, made in _PATCHED.items() if made is type(module)), type(module))


def _swap_class(module: nn.Module, base: type) -> None:
    if not isinstance(module, base):
        raise CompressError(f"token pruning supports timm {base.__name__} modules (or subclasses), found "
                            f"{type(module).__module__}.{type(module).__name__}")
    if type(module) not in _PATCHED.values():
        module.__class__ = patched_class(type(module))


def patch(model: nn.Module, policy: TokenPolicy) -> TokenRuntime:
    """Patch a timm ViT in place so ``policy`` can prune its tokens. Returns the runtime."""
    if getattr(model, "_compress_tokens", None) is not None:
        raise CompressError("this model already has a token pruner attached; detach it first")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not len(blocks):
        raise CompressError(f"token pruning needs a timm ViT with .blocks, got {type(model).__name__}")
    for blk in blocks:
        _swap_class(blk, Block)
        _swap_class(blk.attn, Attention)
    rt = TokenRuntime(policy, int(getattr(model, "num_prefix_tokens", 1)))
    for i, blk in enumerate(blocks):
        blk._compress_layer = i
        blk._compress_runtime = rt
    model._compress_tokens = rt
    return rt


def remove_patch(model: nn.Module) -> None:
    rt = getattr(model, "_compress_tokens", None)
    if rt is None:
        return
    for blk in model.blocks:
        blk.__class__ = original_class(blk)
        blk.attn.__class__ = original_class(blk.attn)
        for name in ("_compress_layer", "_compress_runtime"):
            blk.__dict__.pop(name, None)
        for name in ("_compress_request", "_compress_info", "_compress_bias", "_compress_edit"):
            blk.attn.__dict__.pop(name, None)
    del model._compress_tokens


# ---- helpers shared by token pruners --------------------------------------------------------


def _flat_rows(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Row numbers in a (B * n) x ... view for per-image indices ``idx`` (B x K)."""
    return (idx + torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * n).reshape(-1)


def _one_image(x: torch.Tensor) -> bool:
    """Batch 1 in eager mode: indices can address dim 1 directly. A traced graph (torch.export, torch.compile)
    always takes the general path, so a dynamic batch axis is never specialised by this test."""
    return not torch.compiler.is_compiling() and x.shape[0] == 1


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b]]`` for every image: ``x`` is B x N x ..., ``idx`` B x K -> B x K x ...

    The same as ``x.gather(1, idx[..., None].expand(...))``, as one ``index_select`` of whole rows: on CPU the
    element-wise gather of a B x K x C index is 7x (batch 1) to 20x (batch 32) slower, which made every token
    pruner's own index work cost more than the blocks it saved at batch 1."""
    if _one_image(x):
        return x.index_select(1, idx[0])
    B, N = x.shape[:2]
    return x.reshape(B * N, *x.shape[2:]).index_select(0, _flat_rows(idx, N)).view(B, idx.shape[1], *x.shape[2:])


def take_cols(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, :, idx[b]]`` for every image: ``x`` is B x R x N, ``idx`` B x K -> B x R x K (e.g. a token graph's
    or a score matrix's columns). One ``index_select`` at batch 1 (see ``take_rows``), a gather otherwise."""
    if _one_image(x):
        return x.index_select(2, idx[0])
    return x.gather(2, idx.unsqueeze(1).expand(-1, x.shape[1], -1))


def add_rows(x: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` (B x N x ...) with ``src[b, k]`` added to row ``idx[b, k]`` (repeats add up): the
    row-wise ``scatter_add`` as one ``index_add`` (see ``take_rows``)."""
    if _one_image(x):
        return x.index_add(1, idx[0], src)
    B, N = x.shape[:2]
    rest = x.shape[2:]
    return x.reshape(B * N, *rest).index_add(0, _flat_rows(idx, N), src.reshape(-1, *rest)).view(x.shape)


def positions(start: int, stop: int, x: torch.Tensor, step: int = 1) -> torch.Tensor:
    """The positions ``start, start + step, ... < stop`` for every image of ``x`` (B x K long, expanded, not copied):
    the prefix rows, or a run of ranks, in an index that token pruners gather with."""
    return torch.arange(start, stop, step, device=x.device).expand(x.shape[0], -1)


def keep_tokens(x: torch.Tensor, state: TokenState, keep: torch.Tensor, sort: bool = True) -> torch.Tensor:
    """Keep the prefix tokens plus the patch tokens at ``keep`` (B x K, indices among patch tokens).

    Updates ``state.index``/``state.size``; with ``sort`` the kept tokens stay in original order.
    """
    P = state.num_prefix
    if sort:
        keep = keep.sort(dim=1).values
    idx = keep + P
    full = torch.cat([positions(0, P, x), idx], dim=1)
    state.index = state.index.gather(1, full)
    if state.size is not None:
        state.size = state.size.gather(1, full)
    return take_rows(x, full)


def schedule_macs_ratio(geometry: Dict[str, Any], tokens_per_block: list) -> float:
    """Blocks' MACs for per-block token counts relative to dense (analytic; for solving budgets).

    Each item is the token count entering the block, or ``(n_attn, n_mlp)`` when a pruner reduces
    tokens between attention and MLP.
    """
    n0 = geometry["num_patches"] + geometry["num_prefix"]
    d, h = geometry["dim"], geometry["mlp_hidden"]
    dense = geometry["depth"] * block_macs(n0, n0, d, h)
    pruned = 0.0
    for item in tokens_per_block:
        na, nm = item if isinstance(item, (tuple, list)) else (item, item)
        pruned += block_macs(na, nm, d, h)
    return pruned / dense


def solve_monotone(fn, target: float, lo: float, hi: float, iters: int = 60) -> float:
    """Bisection for ``fn(x) = target`` with ``fn`` increasing in x on [lo, hi]."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        if fn(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
