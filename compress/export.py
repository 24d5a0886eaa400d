"""Export format and ``compress.load``: ``model.safetensors`` + ``compress.json`` + ``recipe.yaml``.

``load`` rebuilds the base architecture (timm or a registered builder), replays the pruners'
structural edits, re-attaches token pruners from their spec and loads the weights strictly. It uses
no Lightning, no DeepSpeed and never unpickles: weights are safetensors, everything else JSON.
Exports are written to a temporary folder and renamed into place, so a failure leaves nothing, and
only ever replace an earlier export, never a folder of the user's. A damaged or foreign export (a
truncated file, a manifest missing a key) is one line naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from compress import files
from compress.errors import CompressError

from compress.manifest import FORMAT, check_export_target, read_manifest  # noqa: F401  (export's API)


def _plain_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save(
    model: nn.Module,
    out_dir: Union[str, Path],
    base: Dict[str, Any],
    pruners: Sequence = (),
    edits: Optional[List[Dict[str, Any]]] = None,
    recipe_yaml: Optional[str] = None,
    metrics: Optional[Dict[str, Any]] = None,
    task=None,
    input_size: Optional[Sequence[int]] = None,
) -> Path:
    """Write an export folder atomically. ``pruners`` are attached pruner objects, in order; ``task`` is the
    ``compress.tasks.base.Task`` the model was made for (default: classification, classes unrecorded)."""
    out = Path(out_dir)
    edits = edits if edits is not None else [{} for _ in pruners]
    manifest = {
        "format": FORMAT,
        "task": task.name if task is not None else "classification",
        "task_info": task.record() if task is not None else {},
        "model": base,
        "input_size": list(input_size) if input_size is not None else None,
        "pruners": [{"spec": p.spec(), "kind": p.kind, "edits": e} for p, e in zip(pruners, edits)],
        "metrics": metrics or {},
    }
    check_export_target(out, "export")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = _plain_state_dict(model)
    for p, e in zip(pruners, edits):
        state = type(p).pack_state(state, e)
    with files.atomic_dir(out) as tmp:
        files.save_safetensors(state, tmp / "model.safetensors", metadata={"format": FORMAT})
        (tmp / "compress.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if recipe_yaml is not None:
            (tmp / "recipe.yaml").write_text(recipe_yaml)
    return out


def build_base(manifest: Dict[str, Any]) -> nn.Module:
    from compress.models.build import build_from_spec

    return build_from_spec(manifest["model"], pretrained=False)


def load(path: Union[str, Path], with_pruners: bool = True, cache_dir: Optional[Union[str, Path]] = None) -> nn.Module:
    """Rebuild an exported (pruned) model as a plain ``nn.Module`` in eval mode.

    ``path`` is an export folder or a Hub repository, ``"hf-hub:org/name[@revision]"`` (downloaded into the Hub
    cache, ``cache_dir`` if given). With ``with_pruners=False`` token pruners are detached after the weights
    are loaded (the same weights, dense tokens; parameters a token pruner added, e.g. STViT's, go with it).
    """
    from compress import hub
    from compress.models.build import load_weights, read_safetensors
    from compress.pruners.base import build_pruner
    from compress.registry import PRUNERS

    path = hub.resolve(path, cache_dir) if hub.is_hub_name(path) else Path(path)
    manifest = read_manifest(path)
    attached = []
    try:  # read_manifest checked the shape; what only the builder and the pruners can check names the file too
        model = build_base(manifest)
        for i, entry in enumerate(manifest["pruners"]):
            spec = entry["spec"]
            if spec["name"] not in PRUNERS:
                raise CompressError(f"pruners[{i}].spec.name: unknown pruner {spec['name']!r} "
                                    f"(known: {', '.join(PRUNERS.names())})")
            cls = PRUNERS.get(spec["name"])
            try:
                if entry.get("edits"):
                    try:
                        cls.apply_edits(model, entry["edits"])
                    except CompressError as e:  # "edits: ..." from the pruner -> "pruners[i].edits: ..."
                        raise CompressError(f"pruners[{i}]" + (f".{e}" if str(e).startswith("edits") else f": {e}")) from e
                if getattr(cls, "replay_on_load", False):
                    pruner = build_pruner(spec, where=f"pruners[{i}].spec")
                    pruner.attach(model)
                    attached.append(pruner)
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise CompressError(f"pruners[{i}]: {spec['name']} cannot be replayed on this model "
                                    f"({type(e).__name__}: {e})") from e
    except CompressError as e:
        raise CompressError(f"checkpoint: {path / 'compress.json'}: {e}") from e
    weights = path / "model.safetensors"
    state = read_safetensors(weights, "checkpoint")
    for i, entry in reversed(list(enumerate(manifest["pruners"]))):  # undo pack_state in reverse order
        try:
            state = PRUNERS.get(entry["spec"]["name"]).unpack_state(state, entry.get("edits") or {})
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise CompressError(f"checkpoint: {weights} does not hold what pruners[{i}] stored "
                                f"({type(e).__name__}: {e})") from e
    load_weights(model, state, str(weights), what="checkpoint")
    if not with_pruners:
        for pruner in reversed(attached):
            pruner.detach(model)
        attached = []
    model.eval()
    model._compress_pruners = attached
    model._compress_manifest = manifest
    return model
