"""Vision Mamba (Vim, Zhu et al., ICML 2024): bidirectional Mamba layers over patch tokens, class token in the middle.

The layout and state-dict keys follow hustvl/Vim (``vim_t_midclstok_76p1acc.pth``, ``vim_s_midclstok_80p5acc.pth``):
``patch_embed.proj``, ``pos_embed``, ``cls_token``, ``layers.i.norm`` (RMSNorm, weight only),
``layers.i.mixer.{in_proj, conv1d, conv1d_b, x_proj, x_proj_b, dt_proj, dt_proj_b, A_log, A_b_log, D, D_b, out_proj}``,
``norm_f``, ``head``. The released models are "bimamba v2" with ``if_divide_out``: one in_proj/out_proj shared by a
forward and a flipped scan that each have their own conv1d, x_proj, dt_proj, A and D, and
out = out_proj((y_fwd + flip(y_bwd)) / 2). Blocks are pre-norm with the residual stream kept in fp32 and
mamba-ssm's fused add-norm order: residual = residual + drop_path(hidden); hidden = mixer(norm(residual)).
The class token sits at sequence index ``num_patches // 2`` (position embedding added after inserting it) and its
final-normed state is the feature the head classifies.

The scan is ``compress.models.selective_scan`` (pure PyTorch on CPU, the mamba-ssm kernel on CUDA when installed);
the depthwise causal conv uses ``causal_conv1d_fn`` on CUDA when installed. Written from the papers and the
checkpoint layout, no code reuse.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.errors import CompressError
from compress.models.selective_scan import scan
from compress.registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (mamba-ssm's RMSNorm: weight only, eps 1e-5)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return out.to(self.weight.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (B, N, D); ``img_size`` and ``grid_size`` as timm's, for the data config."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise CompressError(f"Vim built for {self.img_size[0]}x{self.img_size[1]} images, got "
                                f"{x.shape[-2]}x{x.shape[-1]}")
        return self.proj(x).flatten(2).transpose(1, 2)


@functools.lru_cache(maxsize=1)
def _cuda_conv():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # noqa: BLE001 - not installed or no CUDA build
        return None
    return causal_conv1d_fn


def causal_conv_silu(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """silu(depthwise causal conv1d(x)) on (B, D, L): token t sees tokens t-k+1..t of its own direction."""
    fn = _cuda_conv() if x.is_cuda else None
    if fn is not None:
        return fn(x, conv.weight.squeeze(1), conv.bias, activation="silu")
    return F.silu(conv(x)[..., : x.shape[-1]])


def _counting_flops() -> bool:
    """Whether a ``torch.utils.flop_counter.FlopCounterMode`` is active (it counts convolutions, not the
    elementwise form of the conv below, so the conv is run as one while counting: same MACs as before)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    if torch.compiler.is_dynamo_compiling():  # dynamo cannot trace the mode stack, and counts nothing
        return False
    return any("FlopCounterMode" in type(m).__name__ for m in _get_current_dispatch_mode_stack())


def causal_conv_silu_tokens(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """The same on token-major (B, L, D) (how in_proj's output lies), out (B, L, D): on CPU as K shifted
    multiply-adds over whole rows, which reads in_proj's output in place and hands x_proj and the scan rows
    they read without a copy (a Conv1d wants (B, D, L) and its output goes back to (B, L, D): two transposes
    that cost more than the conv)."""
    if (x.is_cuda and _cuda_conv() is not None) or _counting_flops():  # the FLOP counter counts a conv, not this
        return causal_conv_silu(x.transpose(1, 2), conv).transpose(1, 2)
    L, K = x.shape[1], conv.kernel_size[0]
    w = conv.weight[:, 0].t()  # (K, D): out[t] = bias + sum_j w[j] x[t + j - (K - 1)]
    xp = F.pad(x, (0, 0, K - 1, 0))
    out = torch.addcmul(conv.bias, xp[:, K - 1:], w[K - 1]) if conv.bias is not None else xp[:, K - 1:] * w[K - 1]
    for j in range(K - 1):
        out = out.addcmul_(xp[:, j: j + L], w[j]) if not torch.is_grad_enabled() else out.addcmul(xp[:, j: j + L], w[j])
    return F.silu(out)


class BiMamba(nn.Module):
    """Mamba mixer, bimamba v2: shared in/out projections, a forward and a flipped scan with their own parameters.

    ``hold`` (two (B, L) tensors, forward and backward direction, both in sequence order): token t is held over
    hold_t steps of its scan (the scan op's ``hold``). With hold_t = 1 + (pruned tokens skipped just before t in that
    direction) each kept token stands in for its gap, so the state evolves over as many steps as in the unpruned
    scan (ToP-ViM's hidden-state alignment, see ``compress.pruners.token.top_vim``).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, divide_out: bool = True):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.divide_out = divide_out
        d = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * d, bias=False)
        self.out_proj = nn.Linear(d, d_model, bias=False)
        for suffix in ("", "_b"):
            conv = nn.Conv1d(d, d, d_conv, groups=d, padding=d_conv - 1, bias=True)
            x_proj = nn.Linear(d, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, d, bias=True)
            # Mamba's init: dt_proj so that softplus(bias) is log-uniform in [dt_min, dt_max]; A = -(1..N)
            std = self.dt_rank ** -0.5
            nn.init.uniform_(dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(d) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            with torch.no_grad():
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            dt_proj.bias._no_reinit = True
            setattr(self, "conv1d" + suffix, conv)
            setattr(self, "x_proj" + suffix, x_proj)
            setattr(self, "dt_proj" + suffix, dt_proj)
            A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d, 1)
            # hustvl's names: A_log / A_b_log, D / D_b
            A_log, D = nn.Parameter(A_log), nn.Parameter(torch.ones(d))
            A_log._no_weight_decay = D._no_weight_decay = True  # as Mamba marks them; StageModule honours the flag
            setattr(self, "A_log" if suffix == "" else "A_b_log", A_log)
            setattr(self, "D" + suffix, D)

    def _direction(self, xz: torch.Tensor, suffix: str, hold: Optional[torch.Tensor], hold_from: str = "next"
                   ) -> torch.Tensor:
        """One scan direction on token-major xz (B, L, 2 d_inner); its gated output (B, d_inner, L)."""
        conv, x_proj, dt_proj = (getattr(self, n + suffix) for n in ("conv1d", "x_proj", "dt_proj"))
        A_log, D = (self.A_log, self.D) if suffix == "" else (self.A_b_log, self.D_b)
        x, z = xz.chunk(2, dim=-1)  # (B, L, d_inner) each
        x = causal_conv_silu_tokens(x, conv)
        dbc = x_proj(x)  # (B, L, R + 2N)
        dt, Bm, Cm = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = dt @ dt_proj.weight.t()  # (B, L, d_inner); the bias goes in with the softplus
        A = -torch.exp(A_log.float())
        # the scan takes (B, C, L): transposed views of token-major rows (it reads them time-major, a cheap copy)
        return scan(x.transpose(1, 2), delta.transpose(1, 2), A, Bm.transpose(1, 2), Cm.transpose(1, 2), D.float(),
                    z.transpose(1, 2), dt_proj.bias.float(), True, None if hold is None else hold.contiguous(),
                    hold_from=hold_from)

    def forward(self, hidden: torch.Tensor, hold: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                return_scan: bool = False, hold_from: str = "next"):
        """(B, L, d_model) -> (B, L, d_model); with ``return_scan`` also both directions' gated scan outputs
        (B, d_inner, L), in sequence order. ``hold_from``: see ``selective_scan.scan`` ('previous': each direction's
        token t carries hold_t - 1 steps after it instead of standing for the hold_t - 1 before it)."""
        xz = self.in_proj(hidden)  # (B, L, 2 d_inner)
        fwd_hold, bwd_hold = hold if hold is not None else (None, None)
        y_f = self._direction(xz, "", fwd_hold, hold_from)
        y_b = self._direction(xz.flip(1), "_b", None if bwd_hold is None else bwd_hold.flip(-1), hold_from).flip(-1)
        y = y_f + y_b
        if self.divide_out:
            y = y / 2
        out = self.out_proj(y.transpose(1, 2))
        return (out, y_f, y_b) if return_scan else out


class Block(nn.Module):
    """Pre-norm Vim block: residual = residual + drop_path(hidden); hidden = mixer(norm(residual)); fp32 residual."""

    def __init__(self, dim: int, mixer: nn.Module, drop_path: float = 0.0, residual_in_fp32: bool = True):
        super().__init__()
        from timm.layers import DropPath

        self.mixer = mixer
        self.norm = RMSNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.residual_in_fp32 = residual_in_fp32

    def add_norm(self, hidden: torch.Tensor, residual: Optional[torch.Tensor]):
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        normed = self.norm(residual.to(self.norm.weight.dtype))
        return normed, (residual.float() if self.residual_in_fp32 else residual)

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor] = None, **mixer_kwargs):
        normed, residual = self.add_norm(hidden, residual)
        return self.mixer(normed, **mixer_kwargs), residual


class VisionMamba(nn.Module):
    """Vim classifier (hustvl/Vim layout, middle class token, bimamba v2, mean of the two directions)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 192,
                 depth: int = 24, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 residual_in_fp32: bool = True, divide_out: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise CompressError(f"model.kwargs: img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_position = n // 2
        self.num_prefix_tokens = 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.layers = nn.ModuleList(
            Block(embed_dim, BiMamba(embed_dim, d_state, d_conv, expand, dt_rank, divide_out=divide_out), dpr[i],
                  residual_in_fp32)
            for i in range(depth)
        )
        self.norm_f = RMSNorm(embed_dim)
        from timm.layers import DropPath

        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(depth)
        self.pretrained_cfg = self.default_cfg = {
            "input_size": (in_chans, img_size, img_size), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
            "interpolation": "bicubic", "crop_pct": 0.875, "num_classes": num_classes, "classifier": "head",
            "first_conv": "patch_embed.proj",
        }

    def _init_weights(self, depth: int) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:  # GPT-2 style: shrink the residual branch's output projection with depth
            with torch.no_grad():
                layer.mixer.out_proj.weight.div_(math.sqrt(depth))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """timm's convention (Vim's too): parameters the optimizer must not decay, by name."""
        return {"pos_embed", "cls_token"}

    # -- forward, in pieces that a token pruner can replace ------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the class token inserted at ``cls_position``, plus the position embedding."""
        x = self.patch_embed(x)
        p = self.cls_position
        x = torch.cat([x[:, :p], self.cls_token.expand(x.shape[0], -1, -1), x[:, p:]], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_layers(self, hidden: torch.Tensor):
        """Run the layers; returns (last mixer output, residual stream, index of the class token)."""
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return hidden, residual, self.cls_position

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        hidden, residual, cls = self.forward_layers(self.embed(x))
        residual = residual + self.drop_path(hidden)
        return self.norm_f(residual.to(self.norm_f.weight.dtype))[:, cls]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head


def vim_geometry(model: nn.Module) -> dict:
    """Depth, widths and token count of a Vim (for pruning schedules and MAC budgets)."""
    if not isinstance(model, VisionMamba):
        raise CompressError(f"needs a Vision Mamba (compress.models.vim.VisionMamba), got {type(model).__name__}")
    mixer = model.layers[0].mixer
    return {"depth": len(model.layers), "dim": model.embed_dim, "d_inner": mixer.d_inner, "d_state": mixer.d_state,
            "d_conv": mixer.d_conv, "dt_rank": mixer.dt_rank, "num_patches": model.patch_embed.num_patches}


def layer_macs_per_token(g: dict) -> int:
    """MACs of one Vim layer per token (all of its cost is per token): in/out projections, and for each of the two
    directions the depthwise conv, x_proj, dt_proj and the scan (``selective_scan.scan_macs``)."""
    d, e, n, r, k = g["dim"], g["d_inner"], g["d_state"], g["dt_rank"], g["d_conv"]
    per_direction = e * k + e * (r + 2 * n) + r * e + e * 4 * n
    return d * 2 * e + e * d + 2 * per_direction


# ---- builders ---------------------------------------------------------------------------------------------------


def _build(defaults: dict, pretrained: bool, name: str, **kwargs) -> VisionMamba:
    if pretrained:
        raise CompressError(f"model.pretrained: {name} has no hub weights; download hustvl/Vim's release and set "
                            "model.checkpoint to the .pth")
    args = dict(defaults)
    args.update(kwargs)
    return VisionMamba(**args)


@register_model("vim_tiny_patch16_224")
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Tiny (hustvl ``vim_t_midclstok_76p1acc.pth``): d 192, depth 24, d_state 16, 7 M parameters."""
    return _build(dict(patch_size=16, embed_dim=192, depth=24), pretrained, "vim_tiny_patch16_224", **kwargs)


@register_model("vim_small_patch16_224")
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Small (hustvl ``vim_s_midclstok_80p5acc.pth``): d 384, depth 24, d_state 16, 26 M parameters."""
    return _build(dict(patch_size=16, embed_dim=384, depth=24), pretrained, "vim_small_patch16_224", **kwargs)


@register_model("vim_custom")
def vim_custom(pretrained: bool = False, **kwargs) -> VisionMamba:
    """A configurable Vim for small images (default: 32 px, 4 px patches = 64 tokens + class, d 64, depth 4)."""
    return _build(dict(img_size=32, patch_size=4, embed_dim=64, depth=4, d_state=8, num_classes=10),
                  pretrained, "vim_custom", **kwargs)
