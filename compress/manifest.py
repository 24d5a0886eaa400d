"""The export folder's format: what ``compress.json`` must hold, the one-line check of a folder that claims to be
an export, and which folders an export may replace (only earlier exports)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from compress.errors import CompressError

FORMAT = "compress-export/1"
EXPORT_FILES = {"model.safetensors", "compress.json", "recipe.yaml", "README.md", "tradeoff.png"}  # + a Hub card


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
    except RecursionError:
        raise CompressError(f"checkpoint: {manifest_path} is nested too deeply to be a compress manifest") from None
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
