"""ImageNet in ImageFolder layout (``<root>/<split>/<wnid>/*.JPEG``) with timm's transforms.

Labels are the standard ImageNet-1k index of each wnid (timm's ``ImageNetInfo`` order), so a folder
holding only some classes is still scored against the right logits. Bad folders and corrupt images are
handled as ``compress.data.base`` describes (fail early on structure, skip unreadable files).
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from torch.utils.data import Dataset

from compress.data.base import DataSource, ImageFiles, check_folder, class_folders, scan_image_folder
from compress.errors import CompressError
from compress.registry import register_dataset


def wnid_index() -> dict:
    from timm.data import ImageNetInfo

    return {w: i for i, w in enumerate(ImageNetInfo().label_names())}


@register_dataset("imagenet")
class ImageNet(DataSource):
    task = "classification"

    @property
    def num_classes(self) -> int:
        return 1000

    def split_dir(self, split: str) -> Path:
        if self.root is None:
            raise CompressError("data.root: required for data.kind 'imagenet' (a folder with train/ and val/ wnid folders)")
        root = check_folder(Path(self.root).expanduser(), expect="a folder with train/ and val/ wnid folders")
        d = root / split
        if not d.is_dir():
            hint = ""
            if any((root / w).is_dir() for w in wnid_index()):  # the user named the split itself
                hint = f"; it holds wnid folders itself: data.root is the folder above it, {root.resolve().parent}"
            raise CompressError(f"data.root: {root} has no '{split}/' folder of wnid class folders{hint}")
        return d

    def build(self, split: str, model: nn.Module, train: bool) -> Dataset:
        from timm.data import create_transform, resolve_data_config

        folder = self.split_dir(split)
        cfg = resolve_data_config({}, model=model)
        cfg["input_size"] = self.input_size(model)
        transform = create_transform(**cfg, is_training=train)
        classes = class_folders(folder)
        index = wnid_index()
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise CompressError(f"data.root: {folder} has folders that are not ImageNet-1k wnids, e.g. {unknown[0]!r}")
        samples = scan_image_folder(folder, classes)
        return ImageFiles([(path, index[classes[c]]) for path, c in samples], transform, classes)
