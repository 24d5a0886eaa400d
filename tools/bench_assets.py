"""Where the benchmarks find the real weights and images, shared by ``tools/bench_*.py``.

``--assets`` defaults to ``$COMPRESS_ASSETS`` or ``../shared/assets`` beside the checkout.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

DEFAULT = Path(os.environ.get("COMPRESS_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
DEIT_TINY = "deit_tiny/deit_tiny_patch16_224.pth"
IMAGENET = "imagenet-sample"
CIFAR10 = "cifar10-test/cifar10_test_jpg.tar"


def add_argument(parser) -> None:
    parser.add_argument("--assets", type=Path, default=DEFAULT, help="folder of the real assets (default: %(default)s)")


def find(assets: Path, *relpaths: str) -> Optional[List[Path]]:
    """The asset paths, or None after saying on stderr which one is missing."""
    paths = [assets / rel for rel in relpaths]
    for path in paths:
        if not path.exists():
            print(f"missing asset: {path} (set --assets or COMPRESS_ASSETS)", file=sys.stderr)
            return None
    return paths


def deit_tiny_and_imagenet(assets: Path) -> Optional[Tuple[Path, Path]]:
    """(DeiT-Tiny weights, ImageNet sample folder), or None after saying which one is missing."""
    found = find(assets, DEIT_TINY, IMAGENET + "/val")
    return None if found is None else (found[0], assets / IMAGENET)


def imagenet_val(images: Path, model, limit: Optional[int]) -> torch.utils.data.TensorDataset:
    """Decode and transform the ImageNet sample once (timm's eval transform of ``model``); every
    configuration of a benchmark reuses the tensors."""
    from compress.data.imagenet import ImageNet

    ds = ImageNet(images, limit=limit).dataset("val", model)
    xs, ys = zip(*torch.utils.data.DataLoader(ds, batch_size=100, num_workers=2))
    return torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
