"""The recipe's JSON schema with every registered pruner's and dataset's own config in it.

``Recipe`` leaves ``stages[].pruner`` and ``data.params`` open, since their keys belong to whichever pruner or
dataset is named; this fills them from the registries, so an editor (VS Code's YAML extension, PyCharm) can
complete and check a pruner's keys. ``compress schema`` prints it. A plugin registered before the call is in it.
"""
from __future__ import annotations

import json
from typing import Any, Dict

from compress.recipe import PrunerRef, Recipe
from compress.registry import DATASETS, PRUNERS

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _lift(schema: Dict[str, Any], defs: Dict[str, Any]) -> Dict[str, Any]:
    """``schema`` with its own ``$defs`` moved into ``defs`` (names are pydantic's, unique per class)."""
    for name, sub in schema.pop("$defs", {}).items():
        defs.setdefault(name, sub)
    return schema


def pruner_schema(name: str, defs: Dict[str, Any]) -> Dict[str, Any]:
    """One pruner's ``{name: <name>, ...its config}`` object, closed to other keys."""
    cls = PRUNERS.get(name)
    sub = _lift(cls.Config.model_json_schema(ref_template="#/$defs/{model}"), defs)
    props = {"name": {"const": name, "description": (cls.__doc__ or "").strip().split("\n")[0]},
             **sub.get("properties", {})}
    return {"type": "object", "title": f"pruner {name}", "properties": props,
            "required": ["name", *sub.get("required", [])], "additionalProperties": False}


def recipe_schema() -> Dict[str, Any]:
    """The JSON schema of a recipe file, pruners and datasets included."""
    schema = Recipe.model_json_schema(ref_template="#/$defs/{model}")
    defs = schema.setdefault("$defs", {})
    pruners = [pruner_schema(n, defs) for n in PRUNERS.names()]
    defs[PrunerRef.__name__] = {
        "title": "pruner", "type": "object", "required": ["name"],
        "properties": {"name": {"enum": PRUNERS.names(), "description": "a registered pruner (compress pruners)"}},
        "oneOf": pruners,
    }
    # data.params depends on data.kind: one if/then per registered dataset
    data = defs["DataConfig"]
    data["properties"]["kind"] = {**data["properties"]["kind"], "enum": DATASETS.names()}
    rules = []
    for name in DATASETS.names():
        params = _lift(DATASETS.get(name).Config.model_json_schema(ref_template="#/$defs/{model}"), defs)
        params.pop("title", None)
        rules.append({"if": {"properties": {"kind": {"const": name}}},
                      "then": {"properties": {"params": params}}})
    data["allOf"] = rules
    return {"$schema": SCHEMA_DIALECT, **schema, "title": "compress recipe"}


def dumps() -> str:
    return json.dumps(recipe_schema(), indent=2) + "\n"
