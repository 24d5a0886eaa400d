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
from typing import Annotated, Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from compress import files
from compress.errors import CompressError

FORMAT = "compress-export/1"
EXPORT_FILES = {"model.safetensors", "compress.json", "recipe.yaml", "README.md", "tradeoff.png"}  # + a Hub card


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


class _Spec(BaseModel):
    """What ``load`` reads from ``compress.json``; other keys (metrics, a later version's extras) pass."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


class _ModelSpec(_Spec):
    name: StrictStr
    builder: StrictStr = "timm"
    kwargs: Dict[str, Any] = {}


class _PrunerSpec(_Spec):
    name: StrictStr


class _PrunerEntry(_Spec):
    spec: _PrunerSpec
    kind: Optional[StrictStr] = None
    edits: Optional[Dict[str, Any]] = None


class _Manifest(_Spec):
    format: StrictStr
    task: StrictStr = "classification"
    task_info: Optional[Dict[str, Any]] = None
    model: _ModelSpec
    pruners: List[_PrunerEntry]
    input_size: Optional[Annotated[List[Annotated[StrictInt, Field(gt=0)]], Field(min_length=3, max_length=3)]] = None
    metrics: Optional[Dict[str, Any]] = None


def read_manifest(path: Union[str, Path]) -> Dict[str, Any]:
    """The checked ``compress.json`` of the export folder ``path``: any problem with the folder or the
    manifest's shape is one line naming the file and the key."""
    from compress.recipe import format_validation_error
    from compress.registry import TASKS

    path = Path(path)
    manifest_path = path / "compress.json"
    if path.is_file():
        raise CompressError(f"checkpoint: {path} is a file, expected an export folder (compress.json + model.safetensors)")
    if not path.is_dir():
        raise CompressError(f"checkpoint: export folder not found: {path}")
    for name in ("compress.json", "model.safetensors"):
        if not (path / name).is_file():
            raise CompressError(f"checkpoint: {path} is not a compress export: it has no {name} "
                                "(needs compress.json and model.safetensors)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CompressError(f"checkpoint: {manifest_path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    except (UnicodeDecodeError, OSError) as e:
        raise CompressError(f"checkpoint: cannot read {manifest_path} ({type(e).__name__})") from None
    if not isinstance(manifest, dict):
        raise CompressError(f"checkpoint: {manifest_path} holds a JSON {type(manifest).__name__}, expected an object")
    if manifest.get("format") != FORMAT:
        raise CompressError(f"checkpoint: {manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    try:
        _Manifest.model_validate(manifest)
    except ValidationError as e:
        raise CompressError(f"checkpoint: {manifest_path}: {format_validation_error(e, _Manifest)}") from None
    if manifest.get("task", "classification") not in TASKS:
        raise CompressError(f"checkpoint: {manifest_path}: task: unknown task {manifest['task']!r} "
                            f"(known: {', '.join(TASKS.names())})")
    return manifest


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
