"""A built-in, learnable toy task: coloured shapes on noisy backgrounds, generated in memory.

The class is the shape (not its colour, size or place), so a model must look at the object tokens
and can ignore the background: the kind of image token pruning is made for. No download, seeded.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset, TensorDataset

from compress.data.base import DataSource
from compress.registry import register_dataset

SHAPES = ("disc", "square", "triangle", "cross", "ring", "bar")


def render_shapes(n: int, size: int, seed: int) -> tuple:
    """``n`` images (n x 3 x size x size, in [0, 1]) and their shape labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(SHAPES), (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    r = size * (0.16 + 0.14 * torch.rand(n, generator=g))
    cx = r + (size - 2 * r) * torch.rand(n, generator=g)
    cy = r + (size - 2 * r) * torch.rand(n, generator=g)
    dx = (xx - cx[:, None, None]) / r[:, None, None]
    dy = (yy - cy[:, None, None]) / r[:, None, None]
    ax, ay = dx.abs(), dy.abs()
    masks = torch.stack(
        [
            dx**2 + dy**2 <= 1,  # disc
            (ax <= 0.8) & (ay <= 0.8),  # square
            (dy <= 0.8) & (dy >= -0.8) & (ax <= (dy + 0.8) * 0.6),  # triangle
            ((ax <= 0.25) & (ay <= 1)) | ((ay <= 0.25) & (ax <= 1)),  # cross
            (dx**2 + dy**2 <= 1) & (dx**2 + dy**2 >= 0.45),  # ring
            (ax <= 1) & (ay <= 0.3),  # bar
        ],
        dim=1,
    )[torch.arange(n), labels]
    background = 0.35 * torch.rand(n, 3, 1, 1, generator=g) + 0.15 * torch.rand(n, 3, size, size, generator=g)
    colour = 0.55 + 0.45 * torch.rand(n, 3, 1, 1, generator=g)
    images = torch.where(masks[:, None], colour.expand(-1, -1, size, size), background)
    return images.clamp(0, 1), labels


class QuickstartParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_size: int = Field(32, ge=16)
    num_train: int = Field(4000, gt=0)
    num_val: int = Field(1000, gt=0)
    seed: int = 0


class _Augment(Dataset):
    """Random horizontal flips for the training split (shapes are flip-invariant)."""

    def __init__(self, base: TensorDataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), y


@register_dataset("quickstart")
class Quickstart(DataSource):
    Config = QuickstartParams
    task = "classification"

    @property
    def num_classes(self) -> int:
        return len(SHAPES)

    def input_size(self, model: nn.Module) -> tuple:
        return (3, self.params.image_size, self.params.image_size)

    def build(self, split: str, model: nn.Module, train: bool) -> Dataset:
        p = self.params
        n, seed = (p.num_train, p.seed) if split == "train" else (p.num_val, p.seed + 1)
        images, labels = render_shapes(n, p.image_size, seed)
        ds = TensorDataset((images - 0.5) / 0.5, labels)
        return _Augment(ds) if train else ds
