"""The task protocol: what a kind of problem (classification, segmentation, ...) supplies to the runner.

A dataset kind names its task (``DataSource.task``); the stage runner, ``compress eval``, ``compress
bench`` and the export look the task up in ``TASKS`` and never assume classification, so a new task is
one module here (registered with ``@register_task``) plus its data kinds.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from compress.errors import CompressError

Column = Tuple[str, str, str]  # (metric key, table title, format)


class Task:
    """Subclasses set ``name``, ``columns`` and ``primary`` and implement ``module`` and ``evaluate``."""

    name: ClassVar[str] = "?"
    columns: ClassVar[Sequence[Column]] = ()  # the quality metrics of a report, in table order
    primary: ClassVar[str] = ""  # the metric whose change the report and benchmarks quote
    block_distill: ClassVar[bool] = False  # whether its module honours ``distill.block_weight``

    def __init__(self, num_classes: Optional[int] = None):
        self.num_classes = num_classes

    @classmethod
    def for_source(cls, source) -> "Task":
        """The task of a dataset (``DataSource``), built for its classes."""
        from compress.registry import TASKS

        return TASKS.get(source.task).from_source(source)

    @classmethod
    def for_manifest(cls, manifest: Dict[str, Any]) -> "Task":
        """The task an export was made for (see ``record``)."""
        from compress.registry import TASKS

        return TASKS.get(manifest.get("task", "classification")).from_record(manifest.get("task_info") or {})

    @classmethod
    def from_source(cls, source) -> "Task":
        """Hook: a task whose settings live in its data kind's params reads them here."""
        return cls(num_classes=source.num_classes)

    @classmethod
    def from_record(cls, info: Dict[str, Any]) -> "Task":
        """Hook, inverse of ``record``."""
        return cls(num_classes=info.get("num_classes"))

    def record(self) -> Dict[str, Any]:
        """What an export stores about the task (``compress.json`` ``task_info``)."""
        return {"num_classes": self.num_classes}

    def check_model(self, model: nn.Module, where: str) -> None:
        """Refuse a model whose outputs cannot fit this task's data (``where`` names the setting at fault)."""
        classes = getattr(model, "num_classes", None)
        if self.num_classes is not None and classes is not None and classes != self.num_classes:
            raise CompressError(f"{where}: the model has {classes} classes but the data has {self.num_classes}")

    def module(self, model: nn.Module, stage, teacher: Optional[nn.Module] = None):
        """The LightningModule that trains ``model`` in ``stage`` (a ``recipe.StageConfig``)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader, device: str = "cpu", label: str = "evaluate") -> Dict[str, Any]:
        """The task's metrics of ``model`` over ``loader``, without a Trainer, in one process."""
        raise NotImplementedError

    def use_data(self, dataset) -> None:
        """Measure on inputs from ``dataset`` (``compress bench --data``) rather than random ones; for tasks
        whose models' cost depends on the input. Default: random inputs are as good."""

    def example(self, input_size: Sequence[int], batch_size: int, device: str = "cpu") -> Any:
        """A batch of model inputs for measuring GMACs and speed (a tensor, or a tuple of positional args)."""
        return torch.randn(batch_size, *input_size, device=device)
