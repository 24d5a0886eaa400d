"""What the segmentation data kinds (``camvid``, ``ade20k``) share: image/label-map pairs, the
mmsegmentation training pipeline and the evaluation transform.

Training (mmsegmentation's order and constants, written with torchvision v2 functionals and plain
torch): random rescale by a ratio in ``ratio_range`` of ``scale`` (keep the aspect ratio; image
bilinear, labels nearest), random crop that retries up to 10 times while one class covers more than
``cat_max_ratio`` of the labelled pixels, horizontal flip, photometric distortion (brightness ±32,
contrast and saturation ×0.5-1.5, hue ±18 of OpenCV's 180, contrast before or after the colour
steps), normalisation, padding to the crop (labels with ``IGNORE``).

Evaluation: the image resized so it fits ``eval_scale`` (or kept at its size), normalised; the
label map stays at its original size, and the task resizes the logits to it. Labels are remapped by
each kind's look-up table: its classes to 0..C-1, everything else to ``IGNORE`` (255).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from compress.data.base import DataSource
from compress.errors import CompressError

IGNORE = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class SegParams(BaseModel):
    """``data.params`` of the segmentation kinds."""

    model_config = ConfigDict(extra="forbid")
    crop_size: Tuple[int, int] = Field((512, 512), description="training crop (h, w); also the slide window")
    scale: Tuple[int, int] = Field((2048, 512), description="mmseg img_scale (long, short) the random rescale ratios apply to")
    ratio_range: Tuple[float, float] = Field((0.5, 2.0), description="random rescale ratios")
    cat_max_ratio: float = Field(0.75, gt=0, le=1, description="crop retried while one class covers more than this")
    flip: float = Field(0.5, ge=0, le=1, description="horizontal flip probability")
    photometric: bool = Field(True, description="mmseg PhotoMetricDistortion")
    eval_mode: Literal["whole", "slide"] = Field("whole", description="whole-image or sliding-window inference")
    eval_scale: Optional[Tuple[int, int]] = Field(None, description="(long, short) the eval image is resized to fit; None: as is")
    stride: Tuple[int, int] = Field((341, 341), description="sliding-window stride (h, w)")


def rescale_size(h: int, w: int, scale: Sequence[float]) -> Tuple[int, int]:
    """mmseg's keep-ratio rescale: the largest size with long side <= scale[0] and short side <= scale[1]."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_pair(img: torch.Tensor, label: torch.Tensor, size: Tuple[int, int]):
    import torchvision.transforms.v2.functional as TF

    img = TF.resize(img, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    label = TF.resize(label[None], list(size), interpolation=TF.InterpolationMode.NEAREST)[0]
    return img, label


def random_crop(img: torch.Tensor, label: torch.Tensor, crop: Tuple[int, int], cat_max_ratio: float, tries: int = 10):
    """mmseg RandomCrop: a random box; retried (at most ``tries`` times) while the crop holds a single
    class or its largest class covers ``cat_max_ratio`` or more of the labelled pixels."""
    H, W = label.shape
    ch, cw = min(crop[0], H), min(crop[1], W)

    def box():
        y, x = random.randint(0, H - ch), random.randint(0, W - cw)
        return y, x

    y, x = box()
    if cat_max_ratio < 1:
        for _ in range(tries):
            part = label[y:y + ch, x:x + cw]
            counts = torch.bincount(part[part != IGNORE].flatten().long())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio:
                break
            y, x = box()
    return img[:, y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]


def photometric(img: torch.Tensor) -> torch.Tensor:
    """mmseg PhotoMetricDistortion on a float image in [0, 1]; each step with probability 0.5."""
    import torchvision.transforms.v2.functional as TF

    def contrast(x):
        return (x * random.uniform(0.5, 1.5)).clamp(0, 1) if random.random() < 0.5 else x

    if random.random() < 0.5:
        img = (img + random.uniform(-32, 32) / 255).clamp(0, 1)
    contrast_first = random.random() < 0.5
    if contrast_first:
        img = contrast(img)
    if random.random() < 0.5:
        img = TF.adjust_saturation(img, random.uniform(0.5, 1.5))
    if random.random() < 0.5:
        img = TF.adjust_hue(img, random.uniform(-18, 18) / 180)
    if not contrast_first:
        img = contrast(img)
    return img


class SegPairs(Dataset):
    """(image, label map) pairs -> (normalised float image 3 x H x W, long labels H x W with ``IGNORE``)."""

    def __init__(self, pairs: List[Tuple[Path, Path]], lut: torch.Tensor, params: SegParams, mean, std, train: bool):
        self.pairs, self.lut, self.params, self.train = pairs, lut, params, train
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.inference = {"mode": params.eval_mode, "crop": tuple(params.crop_size), "stride": tuple(params.stride)}

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, i: int):
        """The raw pair: uint8 image 3 x H x W and remapped long labels H x W."""
        from PIL import Image
        import torchvision.transforms.v2.functional as TF

        img_path, label_path = self.pairs[i]
        try:
            with Image.open(img_path) as im:
                img = TF.pil_to_tensor(im.convert("RGB"))
            with Image.open(label_path) as lb:
                if lb.mode not in ("L", "P"):
                    raise CompressError(f"data.root: {label_path} is not a single-channel label map (mode {lb.mode})")
                label = TF.pil_to_tensor(lb)[0]
        except OSError as e:
            raise CompressError(f"data.root: cannot read {e.filename or img_path} ({e.strerror or e})") from None
        if img.shape[-2:] != label.shape:
            raise CompressError(f"data.root: {label_path} is {tuple(label.shape)} but its image is {tuple(img.shape[-2:])}")
        return img, self.lut[label.long()]

    def __getitem__(self, i: int):
        img, label = self.read(i)
        p = self.params
        if not self.train:
            if p.eval_scale is not None:
                img = resize_pair(img, label, rescale_size(*img.shape[-2:], p.eval_scale))[0]
            return (img.float() / 255 - self.mean) / self.std, label
        ratio = random.uniform(*p.ratio_range)
        img, label = resize_pair(img, label, rescale_size(*img.shape[-2:], [s * ratio for s in p.scale]))
        img, label = random_crop(img, label, p.crop_size, p.cat_max_ratio)
        if random.random() < p.flip:
            img, label = img.flip(-1), label.flip(-1)
        x = img.float() / 255
        if p.photometric:
            x = photometric(x)
        x = (x - self.mean) / self.std
        ph, pw = p.crop_size[0] - x.shape[-2], p.crop_size[1] - x.shape[-1]
        if ph > 0 or pw > 0:
            x = F.pad(x, (0, max(pw, 0), 0, max(ph, 0)))
            label = F.pad(label, (0, max(pw, 0), 0, max(ph, 0)), value=IGNORE)
        return x, label


def paired_files(images: Path, labels: Path) -> List[Tuple[Path, Path]]:
    """Every image in ``images`` (.jpg/.jpeg/.png) with the same-named .png in ``labels``."""
    found = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise CompressError(f"data.root: {images} holds no .jpg/.png images")
    pairs = []
    for img in found:
        label = labels / f"{img.stem}.png"
        if not label.is_file():
            raise CompressError(f"data.root: {img} has no label map {label}")
        pairs.append((img, label))
    return pairs


class SegmentationSource(DataSource):
    """Base of the segmentation kinds: subclasses set ``Config``, ``classes``, ``lut`` and ``folders``."""

    task = "segmentation"
    Config = SegParams
    classes: Tuple[str, ...] = ()
    kind = "?"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def lut(self) -> torch.Tensor:
        raise NotImplementedError

    def folders(self, root: Path, split: str) -> Tuple[Path, Path]:
        raise NotImplementedError

    def _root(self) -> Path:
        if self.root is None:
            raise CompressError(f"data.root: required for data.kind '{self.kind}' ({self.layout})")
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise CompressError(f"data.root: folder not found: {root}")
        return root

    def pairs(self, split: str) -> List[Tuple[Path, Path]]:
        images, labels = self.folders(self._root(), split)
        return paired_files(images, labels)

    def build(self, split: str, model: nn.Module, train: bool) -> Dataset:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        return SegPairs(self.pairs(split), self.lut(), self.params, cfg["mean"], cfg["std"], train)

    def input_size(self, model: nn.Module) -> tuple:
        """What one forward sees at evaluation: the slide window, or the first eval image (resized)."""
        p = self.params
        if p.eval_mode == "slide":
            return (3, *p.crop_size)
        try:
            from PIL import Image

            with Image.open(self.pairs("val")[0][0]) as im:
                h, w = im.height, im.width
        except CompressError:
            return (3, *p.crop_size)
        if p.eval_scale is not None:
            h, w = rescale_size(h, w, p.eval_scale)
        return (3, h, w)
