"""Build a model from the recipe's ``model`` section: registered builders first, then timm.

Local checkpoints (.pth / .safetensors) load strictly; a checkpoint of another architecture is
reported with the first mismatching keys instead of a wall of text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from compress.errors import CompressError
from compress.registry import MODELS


def model_spec(name: str, kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """How to rebuild the base architecture (stored in exports)."""
    return {"builder": "compress" if name in MODELS else "timm", "name": name, "kwargs": dict(kwargs or {})}


def build_from_spec(spec: Dict[str, Any], pretrained: bool = False) -> nn.Module:
    """Call the builder; arguments it rejects (an unknown name, a negative size) are the user's error at
    ``model.kwargs``, wherever inside timm they surface; weights it cannot fetch are ``model.pretrained``'s."""
    import timm

    name, kwargs = spec["name"], dict(spec.get("kwargs") or {})
    if name not in MODELS and not timm.is_model(name):
        raise CompressError(f"model.name: unknown model {name!r} (not a timm model or a registered builder)")
    try:
        if name in MODELS:
            return MODELS.get(name)(pretrained=pretrained, **kwargs)
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise CompressError(f"model.kwargs: {name} does not accept these arguments ({e})") from None
    except (OSError, RuntimeError, ValueError, AssertionError, ZeroDivisionError, IndexError, KeyError) as e:
        # Fetching hub weights offline or without network: huggingface_hub's LocalEntryNotFoundError and
        # OfflineModeIsEnabled, urllib's URLError and requests' errors are all OSErrors; timm raises
        # RuntimeError for a model without pretrained weights. Anything else is the builder refusing kwargs.
        if pretrained and (isinstance(e, OSError) or "pretrained" in str(e).lower()):
            reason = " ".join(str(e).split()).split(". ")[0]  # hub messages go on for sentences
            raise CompressError(f"model.pretrained: cannot load the pretrained weights of {name} ({type(e).__name__}: "
                                f"{reason}); set model.checkpoint to a local .pth/.safetensors file instead") from None
        if isinstance(e, OSError):
            raise
        raise CompressError(f"model.kwargs: {name} cannot be built with {kwargs} ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'})") from e


def read_safetensors(path: Path, what: str, advice: str = "") -> Dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated or foreign file is one line naming it (``advice``: what to do)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CompressError(f"{what}: {path} is not a readable safetensors file ({e}){advice}") from None


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Weights only: safetensors, or ``torch.load(weights_only=True)``, which refuses (never runs) pickled
    objects; a file of anything but tensors is refused by name."""
    import pickle

    if path.suffix == ".safetensors":
        return read_safetensors(path, "model.checkpoint")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "global" in str(e):  # it names Python objects torch will not build (cf. checkpoints.py)
            raise CompressError(f"model.checkpoint: {path} holds pickled Python objects besides tensors (e.g. a whole "
                                "nn.Module or a training checkpoint); they are not unpickled: save model.state_dict() "
                                "or a .safetensors file") from None
        raise CompressError(f"model.checkpoint: cannot read {path} as a torch checkpoint (UnpicklingError)") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise CompressError(f"model.checkpoint: cannot read {path} as a torch checkpoint ({type(e).__name__})") from None
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CompressError(f"model.checkpoint: {path} holds a {type(obj).__name__}, expected a state_dict of tensors")
    other = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if other is not None or not obj:
        detail = f" ({other!r} is a {type(obj[other]).__name__})" if other is not None else " (it is empty)"
        raise CompressError(f"model.checkpoint: {path} holds no state_dict of tensors{detail}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: nn.Module, state: Dict[str, torch.Tensor], source: str, what: str = "model.checkpoint") -> None:
    """Strict load with a one-line explanation of any mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: file {list(state[k].shape)} vs model {list(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise CompressError(f"{what}: {source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def adapt_timm_checkpoint(model: nn.Module, state: Dict[str, torch.Tensor], source: str,
                          new_classes: bool) -> Dict[str, torch.Tensor]:
    """Fit a checkpoint to a timm model built with other kwargs (e.g. ``img_size: 96, num_classes: 10``): the model
    family's ``checkpoint_filter_fn`` resamples position embeddings; if the user changed ``num_classes``, a classifier
    whose shape differs is dropped and keeps the model's fresh initialisation. Anything else still fails strictly."""
    import importlib

    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    if new_classes:
        own = model.state_dict()
        heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        dropped = [k for h in heads for k in (f"{h}.weight", f"{h}.bias")
                   if k in state and k in own and state[k].shape != own[k].shape]
        if dropped:
            import logging

            for k in dropped:
                state[k] = own[k]
            logging.getLogger("compress").warning(
                "model.checkpoint: %s: classifier %s has another number of classes; reinitialised",
                source, ", ".join(sorted({k.rsplit(".", 1)[0] for k in dropped})))
    return state


def build_model(cfg) -> nn.Module:
    """``cfg`` is a ``recipe.ModelConfig``."""
    if cfg.checkpoint is not None:
        path = Path(cfg.checkpoint).expanduser()
        if path.is_dir() and getattr(MODELS.get(cfg.name) if cfg.name in MODELS else None, "folder_checkpoint", False):
            cfg.kwargs["pipeline"] = str(path)  # the builder reads the folder; exports rebuild from it
            return build_from_spec(model_spec(cfg.name, cfg.kwargs), pretrained=True)
        if path.is_dir() and (path / "model.safetensors").is_file():  # an export folder: its weights
            path = path / "model.safetensors"
        elif path.is_dir():
            raise CompressError(f"model.checkpoint: {path} is a folder, expected a .pth or .safetensors file "
                                "(or an export folder)")
        if not path.is_file():
            raise CompressError(f"model.checkpoint: file not found: {path}")
        model = build_from_spec(model_spec(cfg.name, cfg.kwargs), pretrained=False)
        state = _read_state_dict(path)
        adapt = getattr(model, "adapt_checkpoint", None)  # a builder's model may take another layout (a backbone)
        if adapt is not None:
            state = adapt(state, str(path))
        elif cfg.kwargs and cfg.name not in MODELS:
            state = adapt_timm_checkpoint(model, state, str(path), new_classes="num_classes" in cfg.kwargs)
        load_weights(model, state, str(path))
        return model
    return build_from_spec(model_spec(cfg.name, cfg.kwargs), pretrained=cfg.pretrained)
