"""ADE20K SceneParsing (150 classes) in the official ``ADEChallengeData2016`` layout:
``<root>/images/{training,validation}/*.jpg`` and ``<root>/annotations/{training,validation}/*.png``.
Label 0 ("other") is ignored and 1..150 become 0..149 (mmseg's ``reduce_zero_label``). Splits
``train``/``val`` name ``training``/``validation``. Default pipeline: mmseg's ADE20K config (scale
2048 x 512, rescale 0.5-2.0, 512 crops), sliding-window evaluation (512 window, 341 stride) on the
image resized to fit 2048 x 512."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Tuple

import torch
from pydantic import Field

from compress.data.segmentation import IGNORE, SegmentationSource, SegParams
from compress.errors import CompressError
from compress.registry import register_dataset

NUM_CLASSES = 150
SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


class ADE20KParams(SegParams):
    eval_mode: Literal["whole", "slide"] = Field("slide", description="whole-image or sliding-window inference")
    eval_scale: Optional[Tuple[int, int]] = Field((2048, 512), description="(long, short) the eval image is resized to fit")


@register_dataset("ade20k")
class ADE20K(SegmentationSource):
    Config = ADE20KParams
    classes = tuple(f"class{i}" for i in range(NUM_CLASSES))  # names: objectInfo150.txt of the dataset
    kind = "ade20k"
    layout = "ADEChallengeData2016 with images/ and annotations/, each holding training/ and validation/"

    def lut(self) -> torch.Tensor:
        lut = torch.full((256,), IGNORE, dtype=torch.long)
        lut[1: NUM_CLASSES + 1] = torch.arange(NUM_CLASSES)
        return lut

    def folders(self, root: Path, split: str):
        if split not in SPLITS:
            raise CompressError(f"evaluate.split: ade20k has the splits train and val (training/validation), not {split!r}")
        images, labels = root / "images" / SPLITS[split], root / "annotations" / SPLITS[split]
        for d in (images, labels):
            if not d.is_dir():
                raise CompressError(f"data.root: {root} has no '{d.relative_to(root)}/' folder ({self.layout})")
        return images, labels
