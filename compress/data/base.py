"""The dataset protocol: a kind builds train/val datasets for a model from the recipe's ``data``."""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict
from torch.utils.data import Dataset, Subset


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSource:
    """Subclasses set ``Config`` (their ``data.params``), ``task`` and ``build``."""

    Config: ClassVar[type] = NoParams
    task: ClassVar[str] = "classification"

    def __init__(self, root, params: Optional[BaseModel] = None, limit: Optional[int] = None):
        self.root = root
        self.params = params if params is not None else self.Config()
        self.limit = limit

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def build(self, split: str, model: nn.Module, train: bool) -> Dataset:
        raise NotImplementedError

    def dataset(self, split: str, model: nn.Module, train: bool = False) -> Dataset:
        ds = self.build(split, model, train)
        return limit_dataset(ds, self.limit)

    def input_size(self, model: nn.Module) -> tuple:
        """(C, H, W) that the model sees with this data."""
        from timm.data import resolve_data_config

        return tuple(resolve_data_config({}, model=model)["input_size"])


def limit_dataset(ds: Dataset, limit: Optional[int]) -> Dataset:
    """At most ``limit`` items, evenly spaced so every class of a sorted folder stays represented."""
    n = len(ds)
    if limit is None or limit >= n:
        return ds
    idx = torch.linspace(0, n - 1, limit).round().long().unique().tolist()
    return Subset(ds, idx)
