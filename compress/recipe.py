"""The recipe: a strict pydantic schema, YAML loading, ``--set`` overrides and one-line errors.

Unknown keys are errors at every level (``extra="forbid"``), including inside a pruner's or dataset's
own parameters, which are validated by the config class that pruner or dataset registers.
"""
from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress.errors import CompressError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(Strict):
    name: str = Field(description="timm model name or a registered compress builder")
    pretrained: bool = Field(False, description="load the hub weights (needs internet)")
    checkpoint: Optional[Path] = Field(None, description="local .pth/.safetensors; wins over pretrained")
    kwargs: Dict[str, Any] = Field(default_factory=dict, description="extra builder kwargs, e.g. num_classes")


class DataConfig(Strict):
    kind: str = "imagenet"
    root: Optional[Path] = None
    batch_size: int = Field(64, gt=0)
    eval_batch_size: Optional[int] = Field(None, gt=0)
    num_workers: Union[int, Literal["auto"]] = Field(
        "auto", description="data loader processes; 'auto': as many as this machine's CPUs allow, at most 8")
    limit: Optional[int] = Field(None, gt=0, description="use at most this many images per split")
    params: Dict[str, Any] = Field(default_factory=dict, description="dataset-specific options")


class OptimizerConfig(Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, description="sgd only")


class ScheduleConfig(Strict):
    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class DistillConfig(Strict):
    teacher: str = Field("dense", description="'dense' = the model before pruning, or a timm model name")
    checkpoint: Optional[Path] = None
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KD term; 1 - alpha goes to the labels")
    temperature: float = Field(1.0, gt=0)


class PrunerRef(BaseModel):
    """``{name: ..., <params>}``; the params are validated by the named pruner's own config."""

    model_config = ConfigDict(extra="allow")
    name: str


class StageConfig(Strict):
    kind: Literal["prune", "distill", "finetune"]
    pruner: Optional[PrunerRef] = None
    epochs: Optional[int] = Field(None, ge=0, description="default: 0 for prune, 1 otherwise")
    max_steps: Optional[int] = Field(None, gt=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    distill: Optional[DistillConfig] = None
    evaluate: bool = Field(False, description="evaluate on the val split after this stage")

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "prune" and self.pruner is None:
            raise ValueError("a prune stage needs a pruner")
        if self.kind != "prune" and self.pruner is not None:
            raise ValueError(f"only prune stages take a pruner (this one is {self.kind!r})")
        if self.distill is not None and self.kind == "finetune":
            raise ValueError("distill options belong to a 'distill' stage")
        if self.kind == "distill" and self.distill is None:
            self.distill = DistillConfig()
        if self.epochs is None:
            self.epochs = 0 if self.kind == "prune" else 1
        return self

    @property
    def trains(self) -> bool:
        return bool(self.epochs) or self.max_steps is not None


class TrainerConfig(Strict):
    """The subset of Lightning ``Trainer`` arguments a recipe may set."""

    accelerator: str = "auto"
    devices: Union[int, str, List[int]] = "auto"
    num_nodes: int = Field(1, gt=0)
    strategy: Union[str, Dict[str, Any]] = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = Field(50, gt=0)
    gradient_clip_val: Optional[float] = Field(None, gt=0)
    accumulate_grad_batches: int = Field(1, gt=0)
    enable_progress_bar: Optional[bool] = Field(None, description="default: only on an interactive terminal")
    checkpoint_every_n_steps: int = Field(200, gt=0, description="optimizer steps between the mid-stage checkpoints "
                                          "(last.ckpt) that --resume continues from")
    deterministic: bool = False


class EvaluateConfig(Strict):
    enabled: bool = True
    split: str = "val"
    bench: bool = Field(True, description="measure GMACs and images/s of dense and pruned")
    batch_size: int = Field(32, gt=0, description="batch size for the throughput measurement")


class ExportConfig(Strict):
    enabled: bool = True
    dir: Optional[Path] = None


class Recipe(Strict):
    name: str
    seed: int = 0
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    stages: List[StageConfig] = Field(min_length=1)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="after")
    def _teacher_needs_prune(self):
        seen_prune = False
        for i, stage in enumerate(self.stages):
            seen_prune |= stage.kind == "prune"
            if stage.distill is not None and stage.distill.teacher == "dense" and not seen_prune:
                raise ValueError(f"stages[{i}].distill.teacher: 'dense' is the model before the first prune stage, "
                                 "but no prune stage comes before this one")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError("must be a non-empty name without '/'")
        return v


# ----------------------------------------------------------------------------------------------
# errors


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(root: type, loc: tuple) -> Optional[type]:
    """The pydantic model class that owns the last key of ``loc`` (for 'did you mean')."""
    cls: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        while typing.get_origin(ann) in (Union, list, List, typing.Optional) or str(typing.get_origin(ann)) == "types.UnionType":
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            ann = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), args[0] if args else None)
        cls = ann
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def format_validation_error(err: ValidationError, root: type, prefix: tuple = ()) -> str:
    lines = []
    for e in err.errors():
        loc = prefix + tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        if e["type"] == "extra_forbidden":
            key = loc[-1]
            owner = _model_at(root, e["loc"]) if root is not None else None
            hint = ""
            if owner is not None:
                allowed = sorted(owner.model_fields)
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"
            lines.append(f"{_path(loc)}: unknown key{hint}")
        elif e["type"] == "missing":
            lines.append(f"{_path(loc)}: required key is missing")
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            lines.append(f"{_path(loc) or '<recipe>'}: {msg}")
    return "; ".join(lines)


# ----------------------------------------------------------------------------------------------
# loading


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise CompressError(f"--set {text!r}: expected dotted.key=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise CompressError(f"--set {text!r}: empty key segment")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise CompressError(f"--set {text!r}: value is not valid YAML ({e.problem})") from None
    return parts, parsed


def apply_override(data: dict, parts: list[str], value: Any, text: str) -> None:
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise CompressError(f"--set {text}: {where}: no list item {part} (the list has {len(node)})")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise CompressError(f"--set {text}: {'.'.join(parts[:i])} is a value, not a mapping")


def validate_plugin_params(recipe: Recipe) -> None:
    """Validate each pruner's and the dataset's own parameters with their registered configs."""
    from compress.registry import DATASETS, PRUNERS

    for i, stage in enumerate(recipe.stages):
        if stage.pruner is None:
            continue
        if stage.pruner.name not in PRUNERS:
            known = ", ".join(PRUNERS.names())
            raise CompressError(f"stages[{i}].pruner.name: unknown pruner {stage.pruner.name!r} (known: {known})")
        cfg_cls = PRUNERS.get(stage.pruner.name).Config
        try:
            cfg_cls.model_validate(stage.pruner.model_extra or {})
        except ValidationError as e:
            raise CompressError(format_validation_error(e, cfg_cls, ("stages", i, "pruner"))) from None
    if recipe.data.kind not in DATASETS:
        known = ", ".join(DATASETS.names())
        raise CompressError(f"data.kind: unknown dataset {recipe.data.kind!r} (known: {known})")
    ds_cls = DATASETS.get(recipe.data.kind)
    try:
        ds_cls.Config.model_validate(recipe.data.params)
    except ValidationError as e:
        raise CompressError(format_validation_error(e, ds_cls.Config, ("data", "params"))) from None


def recipe_from_dict(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise CompressError(f"{source}: the recipe must be a YAML mapping")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise CompressError(f"{source}: {format_validation_error(e, Recipe)}") from None
    try:
        validate_plugin_params(recipe)
    except CompressError as e:
        raise CompressError(f"{source}: {e}") from None
    return recipe


def read_yaml(path: Union[str, Path]) -> Any:
    return yaml.safe_load(Path(path).read_text())


def load_recipe(path: Union[str, Path], overrides: Optional[List[str]] = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise CompressError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    for text in overrides or []:
        parts, value = parse_override(text)
        apply_override(data if isinstance(data, dict) else {}, parts, value, text)
    return recipe_from_dict(data, str(path))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=False), sort_keys=False)
