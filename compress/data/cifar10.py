"""CIFAR-10 from its 10,000 test images (``test/<class>/*.jpg`` in a folder or in a .tar), split per class into
disjoint ``train`` and ``val`` sets: a small real transfer task (e.g. DeiT-Tiny at 64-96 px on a CPU).

Images are decoded once into memory (32x32 each, a few MB) and read straight from the tar, never extracted.
Labels follow the usual CIFAR order (airplane ... truck). Transforms come from the model's timm data config,
with light augmentation (random resized crop, flip; no auto-augment) for ``train``. An image that cannot be
decoded is skipped with one warning giving the count and the first one (all are decoded here, once).
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from compress.data.base import DataSource, bad_image_reason, check_folder, image_errors, warn
from compress.errors import CompressError
from compress.registry import register_dataset

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CACHE: Dict[str, List[Tuple[str, object, int]]] = {}


class Cifar10Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    val_per_class: int = Field(200, gt=0, description="images per class held out for val; the rest is train")
    seed: int = Field(0, description="seed of the per-class shuffle that makes the split")


def _decode(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def _label(member: str):
    """``.../test/<class>/<file>.jpg`` -> class index, or None for anything else."""
    parts = Path(member).parts
    if len(parts) >= 3 and parts[-3] == "test" and parts[-2] in CLASSES and parts[-1].lower().endswith((".jpg", ".jpeg", ".png")):
        return CLASSES.index(parts[-2])
    return None


def read_images(root: Path) -> List[Tuple[str, object, int]]:
    """(member name, PIL image, label) for every test image under ``root`` (folder or tar), sorted by name."""
    key = str(root.resolve())
    if key in _CACHE:
        return _CACHE[key]
    items, bad = [], []

    def add(name: str, read, y: int) -> None:
        try:
            items.append((name, _decode(read()), y))
        except image_errors() as e:
            bad.append((name, e))

    if root.is_file():
        if not tarfile.is_tarfile(root):
            raise CompressError(f"data.root: {root} is a file but not a tar archive (expected cifar10_test_jpg.tar, "
                                "or a folder with test/<class>/*.jpg)")
        try:
            with tarfile.open(root) as tar:
                for m in tar:
                    y = _label(m.name) if m.isfile() else None
                    if y is not None:
                        add(m.name, tar.extractfile(m).read, y)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise CompressError(f"data.root: {root} is not a readable tar ({' '.join(str(e).split())})") from None
    else:
        for d in [root, root / "test", *sorted(p for p in (root / "test").glob("*") if p.is_dir())]:
            if d.is_dir():
                check_folder(d)
        for p in sorted((root / "test").glob("*/*")):
            y = _label(str(p))
            if y is not None:
                add(str(p.relative_to(root)), p.read_bytes, y)
    if not items:
        found = f" (e.g. {bad[0][0]}: {bad_image_reason(bad[0][1])})" if bad else ""
        raise CompressError(f"data.root: {root} holds no readable test/<class>/*.jpg CIFAR-10 images{found}")
    if bad:
        name, e = bad[0]
        warn(f"data.root: skipped {len(bad)} unreadable image(s) in {root}, e.g. {name} ({bad_image_reason(e)})")
    items.sort(key=lambda t: (t[2], t[0]))
    _CACHE[key] = items
    return items


def split_indices(labels: List[int], val_per_class: int, seed: int) -> Dict[str, List[int]]:
    """Deterministic, disjoint per-class split: ``val_per_class`` of each class to val, the rest to train."""
    g = torch.Generator().manual_seed(seed)
    out = {"train": [], "val": []}
    for c in range(len(CLASSES)):
        idx = [i for i, y in enumerate(labels) if y == c]
        if not idx:
            continue  # a folder may hold only some classes
        if len(idx) <= val_per_class:
            raise CompressError(f"data.params.val_per_class: {val_per_class} leaves no training image of {CLASSES[c]!r} "
                                f"({len(idx)} images)")
        perm = torch.randperm(len(idx), generator=g).tolist()
        out["val"] += sorted(idx[i] for i in perm[:val_per_class])
        out["train"] += sorted(idx[i] for i in perm[val_per_class:])
    return out


class ImageList(Dataset):
    def __init__(self, images: List[object], labels: List[int], transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


@register_dataset("cifar10")
class Cifar10(DataSource):
    Config = Cifar10Params
    task = "classification"

    @property
    def num_classes(self) -> int:
        return len(CLASSES)

    def _root(self) -> Path:
        if self.root is None:
            raise CompressError("data.root: required for data.kind 'cifar10' (a folder with test/<class>/*.jpg, "
                                "or cifar10_test_jpg.tar itself)")
        root = Path(self.root).expanduser()
        if not root.exists():
            raise CompressError(f"data.root: not found: {root}")
        return root

    def build(self, split: str, model: nn.Module, train: bool) -> Dataset:
        from timm.data import create_transform, resolve_data_config

        if split not in ("train", "val"):
            raise CompressError(f"evaluate.split: cifar10 has the splits 'train' and 'val', not {split!r}")
        items = read_images(self._root())
        labels = [y for _, _, y in items]
        idx = split_indices(labels, self.params.val_per_class, self.params.seed)[split]
        cfg = resolve_data_config({}, model=model)
        cfg["input_size"] = self.input_size(model)
        if train:
            transform = create_transform(**cfg, is_training=True, scale=(0.6, 1.0), auto_augment=None,
                                         color_jitter=None, re_prob=0.0)
        else:
            cfg["crop_pct"] = 1.0  # 32 px sources: resize the whole image, crop nothing
            transform = create_transform(**cfg, is_training=False)
        return ImageList([items[i][1] for i in idx], [labels[i] for i in idx], transform)
