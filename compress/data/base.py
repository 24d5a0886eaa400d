"""The dataset protocol: a kind builds train/val datasets for a model from the recipe's ``data``.

Bad data folders, the shared rules (``check_folder``, ``class_folders``, ``scan_image_folder``, ``ImageFiles``):

- Structural problems fail before anything trains or is written, with one line naming the folder: a
  root that is missing or a file, a folder without read permission, a split with no class folders, a
  split whose class folders hold no images, or one where none of a few images tried can be decoded.
- A class folder without images, beside others that have some, is skipped with a warning (its class
  keeps its label; it just has no samples).
- A corrupt or unreadable image file among good ones does not stop a run: decoding every file up front
  is too slow for ImageNet, so files are checked as they are read; a bad one is recorded and its place
  is taken by the next readable image of the split (batches keep their shape), a warning names the
  first bad file, and ``unreadable(ds)`` gives the count (``compress eval`` reports it).
"""
from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict
from torch.utils.data import Dataset, Subset

from compress.errors import CompressError

log = logging.getLogger("compress")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_errors() -> tuple:
    """What PIL raises for a file that is not a decodable image (truncated, random bytes, no permission)."""
    from PIL import Image

    return (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


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
        """(C, H, W) that the model sees with this data: the size a ViT was built for (one made with
        ``img_size: 32`` still carries its family's 224 px data config), else timm's data config."""
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if size:
            return (3, *size)
        from timm.data import resolve_data_config

        return tuple(resolve_data_config({}, model=model)["input_size"])


def limit_dataset(ds: Dataset, limit: Optional[int]) -> Dataset:
    """At most ``limit`` items, evenly spaced so every class of a sorted folder stays represented."""
    n = len(ds)
    if limit is None or limit >= n:
        return ds
    idx = torch.linspace(0, n - 1, limit).round().long().unique().tolist()
    return Subset(ds, idx)


# -- folders of images ----------------------------------------------------------------------------------


def check_folder(path: Path, key: str = "data.root", expect: str = "a folder") -> Path:
    """``path`` exists, is a folder and can be listed; otherwise one line that says which of these fails."""
    if not path.exists():
        raise CompressError(f"{key}: folder not found: {path}")
    if not path.is_dir():
        raise CompressError(f"{key}: {path} is a file, expected {expect}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise CompressError(f"{key}: cannot read folder {path} (permission denied)")
    return path


def warn(msg: str) -> None:
    """One warning line on stderr, through the ``compress`` logger (the CLI formats it)."""
    log.warning(msg)


_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warn(msg)


def class_folders(folder: Path, key: str = "data.root") -> List[str]:
    """The sorted class folder names of ``folder`` (a split); hidden ones (``.ipynb_checkpoints``) are not
    classes. A split without any is one line naming it."""
    check_folder(folder, key)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise CompressError(f"{key}: cannot list {folder} ({e.strerror})") from None
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not classes:
        loose = sum(e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries if e.is_file())
        hint = f"; it holds {loose} images directly, put them in one folder per class" if loose else ""
        raise CompressError(f"{key}: {folder} holds no class folders (expected {folder}/<class>/<image>){hint}")
    return classes


def scan_image_folder(folder: Path, classes: Sequence[str], key: str = "data.root") -> List[Tuple[str, int]]:
    """(path, class index) of every image in ``folder/<class>/**`` for ``classes`` (see ``class_folders``),
    as torchvision's ImageFolder finds them, after the structural checks of the module docstring. Errors
    come before the warning about empty class folders, so a failing command prints one line."""
    samples, empty = [], []
    for c, name in enumerate(classes):
        d = check_folder(folder / name, key)
        found = sorted(os.path.join(r, f) for r, _, files in os.walk(d, followlinks=True)
                       for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if not found:
            empty.append(name)
        samples += [(p, c) for p in found]
    if not samples:
        raise CompressError(f"{key}: none of the {len(classes)} class folders of {folder} holds images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
    probe([p for p, _ in samples], key)
    if empty:
        _warn_once(f"{key}: {len(empty)} of the {len(classes)} class folders of {folder} hold no images "
                   f"(e.g. {empty[0]}/); they have no samples")
    return samples


def probe(paths: Sequence[str], key: str = "data.root", tries: int = 4) -> None:
    """Decode a few images spread over ``paths``: if none can be read, the folder is not what the user
    thinks (placeholders, an unfinished download), and it should fail now, not mid-run."""
    n, count = len(paths), min(tries, len(paths))
    picks = sorted({round(i * (n - 1) / max(1, count - 1)) for i in range(count)})
    reasons = [why_unreadable(paths[j]) for j in picks]
    if all(reasons):
        raise CompressError(f"{key}: none of the {len(picks)} images tried could be read as an image, "
                            f"e.g. {paths[picks[0]]} ({reasons[0]})")


def open_image(path: str):
    """The image at ``path`` as RGB, fully decoded (so a truncated file fails here, not in a transform)."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def bad_image_reason(err: Exception) -> str:
    """The error as a short phrase for a one-line message."""
    from PIL import UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):  # its message repeats the path
        return "UnidentifiedImageError: not an image format PIL knows"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def why_unreadable(path: str) -> Optional[str]:
    """Why ``path`` cannot be decoded as an image, or None if it can."""
    try:
        open_image(path)
    except image_errors() as e:
        return bad_image_reason(e)
    return None


class ImageFiles(Dataset):
    """(transformed image, label) for a list of (path, label) samples, decoded lazily with PIL.

    An undecodable file is recorded in ``bad`` (in shared memory, so DataLoader workers' findings reach
    the main process) and replaced by the next readable sample; the first one is named in a warning."""

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Optional[Callable], classes=(),
                 key: str = "data.root"):
        self.samples = list(samples)
        self.targets = [y for _, y in self.samples]
        self.imgs = self.samples
        self.classes = list(classes)
        self.transform = transform
        self.key = key
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()
        self._errors = image_errors()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        n = len(self.samples)
        if not -n <= i < n:
            raise IndexError(i)  # also ends plain iteration over the dataset
        i %= n
        for k in range(n):
            j = (i + k) % n
            path, label = self.samples[j]
            if self.bad[j]:
                continue
            try:
                img = open_image(path)
            except self._errors as e:
                self._record(j, e)
                continue
            return (self.transform(img) if self.transform is not None else img), label
        raise CompressError(f"{self.key}: none of the {n} images could be read, e.g. {self.samples[i][0]}")

    def _record(self, j: int, err: Exception) -> None:
        first = not bool(self.bad.any())
        self.bad[j] = True
        if first:
            warn(f"{self.key}: cannot read image {self.samples[j][0]} ({bad_image_reason(err)}); "
                 "skipping it and any other unreadable image (the next readable one takes its place)")


def unreadable(ds: Dataset) -> Dict[str, object]:
    """How many images of ``ds`` (an ``ImageFiles``, maybe under ``Subset``s) were skipped as unreadable so
    far, and the first of them in the split's order with the reason: ``{}`` when none were."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    bad = getattr(ds, "bad", None)
    if bad is None or not bool(bad.any()):
        return {}
    first = ds.samples[int(bad.nonzero()[0])][0]
    return {"unreadable_images": int(bad.sum()), "first_unreadable": first, "unreadable_reason": why_unreadable(first)}


def report_unreadable(ds: Dataset) -> Dict[str, object]:
    """``unreadable(ds)``, also said in one warning line (for the end of an evaluation)."""
    found = unreadable(ds)
    if found:
        warn(f"skipped {found['unreadable_images']} unreadable image(s) of {len(ds)}, e.g. "
             f"{found['first_unreadable']} ({found['unreadable_reason']}); each was replaced by the next readable one")
    return found
