"""CamVid, 11-class version (SegNet tutorial layout): ``<root>/{train,val,test}`` images (.png or .jpg)
with same-named .png label maps in ``<root>/{train,val,test}annot``; labels 0..10 are the classes,
11 (Unlabelled) and anything above is ignored. Default pipeline: mmseg's steps at the native
480 x 360 scale (rescale 0.5-2.0), 224 px crops (the CPU setting), whole-image evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch
from pydantic import Field

from compress.data.segmentation import IGNORE, SegmentationSource, SegParams
from compress.errors import CompressError
from compress.registry import register_dataset

CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car", "pedestrian",
           "bicyclist")


class CamVidParams(SegParams):
    crop_size: Tuple[int, int] = Field((224, 224), description="training crop (h, w); also the slide window")
    scale: Tuple[int, int] = Field((480, 360), description="mmseg img_scale (long, short) the random rescale ratios apply to")


@register_dataset("camvid")
class CamVid(SegmentationSource):
    Config = CamVidParams
    classes = CLASSES
    kind = "camvid"
    layout = "a folder with train/, trainannot/, val/, valannot/ (and optionally test/, testannot/)"

    def lut(self) -> torch.Tensor:
        lut = torch.full((256,), IGNORE, dtype=torch.long)
        lut[: len(CLASSES)] = torch.arange(len(CLASSES))
        return lut

    def folders(self, root: Path, split: str):
        if split not in ("train", "val", "test"):
            raise CompressError(f"evaluate.split: camvid has the splits train, val and test, not {split!r}")
        images, labels = root / split, root / f"{split}annot"
        for d in (images, labels):
            if not d.is_dir():
                raise CompressError(f"data.root: {root} has no '{d.name}/' folder ({self.layout})")
        return images, labels
