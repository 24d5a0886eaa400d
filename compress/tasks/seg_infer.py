"""Segmentation inference: whole image or mmseg-style sliding window, with executed MACs and exits.

Sliding window (mmseg ``slide_inference``): windows of ``crop`` every ``stride``, the last window of a
row/column moved back inside the image, logits summed and divided by the number of windows covering
each pixel. A window larger than the image is the image itself (the model pads to its patch size).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn


def slide_windows(h: int, w: int, crop, stride):
    """(y1, y2, x1, x2) of every window, in mmseg's order."""
    ch, cw = crop
    sh, sw = stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            out.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return out


def infer(model: nn.Module, img: torch.Tensor, spec: Dict, after: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Logits (B x C x H x W) of ``img`` (B x 3 x H x W) by ``spec['mode']`` (whole | slide); ``after``
    is called after every forward (e.g. to read a token pruner's exits)."""
    if spec.get("mode", "whole") == "whole":
        out = model(img)
        if after:
            after()
        return out
    B, _, H, W = img.shape
    logits, count = None, img.new_zeros(1, 1, H, W)
    for y1, y2, x1, x2 in slide_windows(H, W, spec["crop"], spec["stride"]):
        part = model(img[:, :, y1:y2, x1:x2])
        if after:
            after()
        if logits is None:
            logits = img.new_zeros(B, part.shape[1], H, W)
        logits[:, :, y1:y2, x1:x2] += part
        count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def first_window(img: torch.Tensor, spec: Dict) -> torch.Tensor:
    """What one forward of ``infer`` sees first: the image, or its first sliding window."""
    if spec.get("mode", "whole") == "whole":
        return img
    y1, y2, x1, x2 = slide_windows(img.shape[-2], img.shape[-1], spec["crop"], spec["stride"])[0]
    return img[..., y1:y2, x1:x2]
