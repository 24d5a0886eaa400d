"""Export format and ``compress.load``: ``model.safetensors`` + ``compress.json`` + ``recipe.yaml``.

``load`` rebuilds the base architecture (timm or a registered builder), replays the pruners'
structural edits, re-attaches token pruners from their spec and loads the weights strictly. It uses
no Lightning, no DeepSpeed and never unpickles: weights are safetensors, everything else JSON.
Exports are written to a temporary folder and renamed into place, so a failure leaves nothing, and
only ever replace an earlier export, never a folder of the user's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from compress import files
from compress.errors import CompressError

FORMAT = "compress-export/1"
EXPORT_FILES = {"model.safetensors", "compress.json", "recipe.yaml"}


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


def check_export_target(out: Path, where: str) -> None:
    """An export may go to a new path, an empty folder, or over an earlier compress export; anything else
    (a file, a folder of the user's own files) is refused: compress never deletes what it did not write."""
    if not out.exists():
        return
    if not out.is_dir():
        raise CompressError(f"{where}: {out} is a file, not a folder")
    entries = {p.name for p in out.iterdir()}
    if entries and not (entries <= EXPORT_FILES and "compress.json" in entries):
        raise CompressError(f"{where}: {out} is a folder that holds other files and is not a compress export; "
                            "choose a new or empty folder")


def read_manifest(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    manifest_path = path / "compress.json"
    if not path.is_dir():
        raise CompressError(f"checkpoint: export folder not found: {path}")
    if not manifest_path.is_file() or not (path / "model.safetensors").is_file():
        raise CompressError(f"checkpoint: {path} is not a compress export (needs compress.json and model.safetensors)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CompressError(f"checkpoint: {manifest_path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if manifest.get("format") != FORMAT:
        raise CompressError(f"checkpoint: {manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def build_base(manifest: Dict[str, Any]) -> nn.Module:
    from compress.models.build import build_from_spec

    return build_from_spec(manifest["model"], pretrained=False)


def load(path: Union[str, Path], with_pruners: bool = True) -> nn.Module:
    """Rebuild an exported (pruned) model as a plain ``nn.Module`` in eval mode.

    With ``with_pruners=False`` token pruners are detached after the weights are loaded (the same
    weights, dense tokens; parameters a token pruner added, e.g. STViT's, go with it).
    """
    from safetensors.torch import load_file

    from compress.models.build import load_weights
    from compress.pruners.base import build_pruner
    from compress.registry import PRUNERS

    path = Path(path)
    manifest = read_manifest(path)
    model = build_base(manifest)
    attached = []
    for i, entry in enumerate(manifest["pruners"]):
        spec = entry["spec"]
        cls = PRUNERS.get(spec["name"])
        if entry.get("edits"):
            cls.apply_edits(model, entry["edits"])
        if getattr(cls, "replay_on_load", False):
            pruner = build_pruner(spec, where=f"pruners[{i}]")
            pruner.attach(model)
            attached.append(pruner)
    state = load_file(str(path / "model.safetensors"))
    for entry in reversed(manifest["pruners"]):  # undo pack_state in reverse order
        state = PRUNERS.get(entry["spec"]["name"]).unpack_state(state, entry.get("edits") or {})
    load_weights(model, state, str(path / "model.safetensors"), what="checkpoint")
    if not with_pruners:
        for pruner in reversed(attached):
            pruner.detach(model)
        attached = []
    model.eval()
    model._compress_pruners = attached
    model._compress_manifest = manifest
    return model
