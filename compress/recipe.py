"""The recipe: a strict pydantic schema, YAML loading, ``--set`` overrides and one-line errors.

Unknown keys are errors at every level (``extra="forbid"``), including inside a pruner's or dataset's
own parameters, which are validated by the config class that pruner or dataset registers.
"""
from __future__ import annotations

import codecs
import difflib
import functools
import typing
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

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
    limit: Optional[int] = Field(None, gt=0, description="use at most this many images per split (a quick look at a "
                                 "recipe); step-based stages (max_steps) then stop after one pass over them")
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
    block_weight: float = Field(0.0, ge=0, description="weight of the block-output MSE to the teacher (tasks "
                                "whose models have blocks to match: diffusion UNets, APTP's block loss); 0 = off")


class PrunerRef(BaseModel):
    """``{name: ..., <params>}``; the params are validated by the named pruner's own config, once (``config``,
    when the recipe is loaded), and every later use builds from that typed config."""

    model_config = ConfigDict(extra="allow")
    name: str
    _config: Any = PrivateAttr(None)

    def config(self, where: str):
        """The named pruner's typed ``Config`` of these params (validated on first use; errors name ``where``)."""
        if self._config is None:
            from compress.registry import PRUNERS

            if self.name not in PRUNERS:
                raise CompressError(f"{where}.name: unknown pruner {self.name!r} (known: {', '.join(PRUNERS.names())})")
            cfg_cls = PRUNERS.get(self.name).Config
            try:
                self._config = cfg_cls.model_validate(self.model_extra or {})
            except ValidationError as e:
                raise CompressError(format_validation_error(e, cfg_cls, tuple(where.split(".")))) from None
        return self._config

    def build(self, where: str):
        """A new pruner of this config."""
        from compress.registry import PRUNERS

        return PRUNERS.get(self.name)(self.config(where))


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


@functools.lru_cache(maxsize=None)
def _lightning_choices() -> Dict[str, tuple]:
    """The names and values the installed Lightning accepts, asked from Lightning itself."""
    from lightning.fabric.plugins.precision.precision import (
        _PRECISION_INPUT_INT,
        _PRECISION_INPUT_STR,
        _PRECISION_INPUT_STR_ALIAS,
    )
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    return {
        "accelerator": ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())),
        "strategy": ("auto", *StrategyRegistry.available_strategies()),
        "precision": tuple(v for lit in (_PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS, _PRECISION_INPUT_INT)
                           for v in typing.get_args(lit)),
    }


def _choice(what: str, value: Any, choices: tuple) -> ValueError:
    names = list(dict.fromkeys(map(str, choices)))  # precision 16 and "16" read the same
    close = difflib.get_close_matches(str(value), names, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "one of: " + ", ".join(names)
    return ValueError(f"{value!r} is not a Lightning {what} ({hint})")


def _is_index_list(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0 and len(set(value)) == len(value)
            and all(type(i) is int and i >= 0 for i in value))


class TrainerConfig(Strict):
    """The subset of Lightning ``Trainer`` arguments a recipe may set. The values are checked against what the
    installed Lightning accepts here, so a typo names its key path instead of failing in ``Trainer``;
    whether this machine can run them is ``check_trainer``'s job."""

    accelerator: str = "auto"
    devices: Union[int, str, List[int]] = "auto"
    num_nodes: int = Field(1, gt=0)
    strategy: Union[str, Dict[str, Any]] = "auto"
    precision: Union[int, str] = "32-true"
    log_every_n_steps: int = Field(50, gt=0)
    gradient_clip_val: Optional[float] = Field(None, gt=0)
    accumulate_grad_batches: int = Field(1, gt=0)
    enable_progress_bar: Optional[bool] = Field(None, description="default: only on an interactive terminal")
    checkpoint_every_n_steps: int = Field(200, gt=0, description="optimizer steps between the mid-stage checkpoints "
                                          "(last.ckpt) that --resume continues from")
    deterministic: bool = False

    @field_validator("accelerator", mode="before")
    @classmethod
    def _accelerator(cls, v: Any) -> Any:
        choices = _lightning_choices()["accelerator"]
        if v not in choices:
            raise _choice("accelerator", v, choices)
        return v

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, v: Any) -> Any:
        choices = _lightning_choices()["precision"]
        if type(v) not in (int, str) or v not in choices:  # not 16.0 or true, which compare equal to ints
            raise _choice("precision", v, choices)
        return v

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy(cls, v: Any) -> Any:
        if isinstance(v, dict):
            if set(v) != {"deepspeed"} or not isinstance(v["deepspeed"], dict):
                raise ValueError("a mapping must be {deepspeed: {<DeepSpeedStrategy arguments>}}")
            return v
        choices = _lightning_choices()["strategy"]
        if not isinstance(v, str) or v.lower() not in choices:
            raise _choice("strategy", v, choices)
        return v

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, v: Any) -> Any:
        """Lightning's forms: 'auto', N > 0, -1 (all), a list of indices, or the same as a string ('2', '-1', '0,1')."""
        text = v.strip() if isinstance(v, str) else None
        parts = [p.strip() for p in text.split(",") if p.strip()] if text and "," in text else None
        if (text in ("auto", "-1") or (text is not None and text.isascii() and text.isdigit() and int(text) > 0)
                or (parts is not None and all(p.isascii() and p.isdigit() for p in parts) and _is_index_list([int(p) for p in parts]))
                or (type(v) is int and (v > 0 or v == -1)) or _is_index_list(v)):
            return v
        raise ValueError(f"{v!r} is not a device count: use 'auto', a number > 0, -1 (all), "
                         "or device indices as a list [0, 1] or a string '0,1'")


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


class _YamlProblem(Exception):
    """Why a YAML text was refused, with the 1-based line where that is known."""

    def __init__(self, message: str, line: Optional[int] = None):
        super().__init__(message)
        self.message, self.line = message, line


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with three refusals that recipes need.

    - Aliases (``*name``, also in ``<<: *name``) are refused. Expanding nested aliases is exponential
      (the "billion laughs" bomb hangs validation), and an alias makes two places of the recipe one
      shared object, so ``--set`` on one would silently change the other. Recipes never need them;
      anchors alone are harmless.
    - Nesting deeper than ``MAX_DEPTH`` is refused with its line instead of a ``RecursionError``.
    - A key repeated in one mapping is refused, naming both lines (PyYAML keeps the last one silently).
    """

    MAX_DEPTH = 64

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def fetch_flow_collection_start(self, TokenClass):
        # the scanner's cost grows with the square of the flow depth: stop `[[[[...` before the composer
        if self.flow_level >= self.MAX_DEPTH:
            raise _YamlProblem(f"nested deeper than {self.MAX_DEPTH} levels", self.line + 1)
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _YamlProblem(f"alias *{event.anchor}: recipes do not take YAML aliases, write the value out",
                               event.start_mark.line + 1)
        self._depth += 1
        try:
            if self._depth > self.MAX_DEPTH:
                raise _YamlProblem(f"nested deeper than {self.MAX_DEPTH} levels", event.start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        first: Dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in first:
                    raise _YamlProblem(f"duplicate key {key!r} (first at line {first[key]})", line)
                first[key] = line
            except TypeError:  # an unhashable key: PyYAML reports it
                continue
        return super().construct_mapping(node, deep)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _parse_yaml(text: str) -> Any:
    """Parse one YAML document with ``_RecipeLoader``; every failure becomes a one-line ``_YamlProblem``."""
    try:
        loader = _RecipeLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (control characters, NUL)
        line = text.count("\n", 0, e.position) + 1
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise _YamlProblem(f"control character U+{code:04X} is not allowed in YAML", line) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        context = f" ({_one_line(e.context)} at line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        raise _YamlProblem(f"invalid YAML: {_one_line(e.problem)}{context}",
                           mark.line + 1 if mark is not None else None) from None
    except yaml.YAMLError as e:
        raise _YamlProblem(f"invalid YAML: {_one_line(e)}") from None
    except RecursionError:
        raise _YamlProblem("nested too deeply") from None


# UTF-32 first: its little-endian BOM starts with UTF-16's.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _decode(data: bytes, path: Path) -> str:
    """UTF-8, strictly. A byte-order mark may announce UTF-8, UTF-16 or UTF-32 (the encodings the YAML
    spec allows; Windows editors write UTF-16 with a BOM): such files are decoded, not refused."""
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[:e.start].decode(encoding, errors="replace").count("\n") + 1
        what = "not UTF-8 text" if encoding == "utf-8" else f"broken {encoding.upper()} text after its byte-order mark"
        raise CompressError(f"{path}:{line}: {what} (byte 0x{data[e.start]:02x} at offset {e.start}); "
                            "save the recipe as UTF-8") from None
    if encoding == "utf-8" and "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise CompressError(f"{path}:{line}: NUL byte: UTF-16 or UTF-32 text without a byte-order mark? "
                            "save the recipe as UTF-8")
    return text


def read_yaml(path: Union[str, Path]) -> Any:
    """The one way compress reads a recipe's YAML (``--recipe``, ``--resume``, ``export --run``): strict
    decoding and ``_RecipeLoader``; any problem is a one-line ``CompressError`` naming ``path:line``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CompressError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    try:
        return _parse_yaml(_decode(data, path))
    except _YamlProblem as e:
        raise CompressError(f"{path}:{e.line}: {e.message}" if e.line else f"{path}: {e.message}") from None


def bundled_recipes_dir() -> Path:
    """The recipes shipped inside the package (``compress/recipes``, a link to the repository's
    ``recipes/`` in a checkout; real files in a wheel), resolved so messages show where they are."""
    return (Path(__file__).parent / "recipes").resolve()


def resolve_recipe(arg: Union[str, Path]) -> Path:
    """``--recipe``: an existing file wins; otherwise a bare name (with or without ``.yaml``) is a
    bundled recipe, so ``--recipe deit_s_zerotprune`` works from any directory."""
    path = Path(arg).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise CompressError(f"recipe file not found: {path} is a folder")
    bundled = sorted(p.stem for p in bundled_recipes_dir().glob("*.yaml"))
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if len(path.parts) > 1:  # a path: say so only if its name is a bundled one
        hint = f" (a bundled recipe has this name: --recipe {stem})" if stem in bundled else ""
        raise CompressError(f"recipe file not found: {path}{hint}")
    if stem in bundled:
        return bundled_recipes_dir() / f"{stem}.yaml"
    close = difflib.get_close_matches(stem, bundled, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"bundled: {', '.join(bundled) or 'none'}"
    raise CompressError(f"recipe file not found: {path} (not a file, nor a bundled recipe name; {hint})")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise CompressError(f"--set {text!r}: expected dotted.key=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise CompressError(f"--set {text!r}: empty key segment")
    try:
        parsed = _parse_yaml(value) if value.strip() else None
    except _YamlProblem as e:
        raise CompressError(f"--set {text!r}: value is not valid YAML ({e.message})") from None
    return parts, parsed


def apply_override(data: dict, parts: list[str], value: Any, text: str) -> None:
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not (part.isascii() and part.isdigit()) or int(part) >= len(node):  # '²'.isdigit() too
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
    from compress.registry import DATASETS

    for i, stage in enumerate(recipe.stages):
        if stage.pruner is not None:
            stage.pruner.config(f"stages[{i}].pruner")
    if recipe.data.kind not in DATASETS:
        known = ", ".join(DATASETS.names())
        raise CompressError(f"data.kind: unknown dataset {recipe.data.kind!r} (known: {known})")
    ds_cls = DATASETS.get(recipe.data.kind)
    try:
        ds_cls.Config.model_validate(recipe.data.params)
    except ValidationError as e:
        raise CompressError(format_validation_error(e, ds_cls.Config, ("data", "params"))) from None


def check_trainer(t: TrainerConfig) -> None:
    """What the schema cannot know: whether this machine has the accelerator, devices and libraries the
    trainer settings ask for, and whether Lightning takes them together. Lightning itself is asked, with
    throw-away ``Trainer``s given one more setting each time (cheap: nothing starts or is written), so the
    error names the key that tipped it. ``fit`` calls this before it writes anything; recipe loading does
    not, as ``bench`` and ``export`` read GPU recipes on machines without one."""
    import warnings

    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from compress.strategies import resolve_strategy

    steps = [("accelerator", t.accelerator, {"accelerator": t.accelerator}),
             ("devices", t.devices, {"devices": t.devices, "num_nodes": t.num_nodes}),
             ("strategy", t.strategy, {"strategy": resolve_strategy(t.strategy, t.accelerator)}),
             ("precision", t.precision, {"precision": t.precision})]
    kwargs: Dict[str, Any] = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                  enable_model_summary=False)
    for key, value, more in steps:
        kwargs.update(more)
        if key != "strategy" and "strategy" in kwargs:  # a strategy object belongs to one Trainer: a fresh one each time
            kwargs["strategy"] = resolve_strategy(t.strategy, t.accelerator)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pl.Trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError, ImportError, RuntimeError) as e:
            raise CompressError(f"trainer.{key}: Lightning cannot use {value!r} here: {_one_line(e)}") from None


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


def load_recipe(path: Union[str, Path], overrides: Optional[List[str]] = None) -> Recipe:
    path = resolve_recipe(path)
    data = read_yaml(path)
    for text in overrides or []:
        parts, value = parse_override(text)
        apply_override(data if isinstance(data, dict) else {}, parts, value, text)
    return recipe_from_dict(data, str(path))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=False), sort_keys=False)
