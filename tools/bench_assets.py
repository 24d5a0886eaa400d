"""Where the benchmarks find the real weights and images, shared by ``tools/bench_*.py``.

``--assets`` defaults to ``$COMPRESS_ASSETS`` or ``../shared/assets`` beside the checkout.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import yaml

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


def labelled_spec(text: str) -> Tuple[str, dict]:
    """``LABEL={yaml mapping}`` from the command line -> (label, mapping); a bare LABEL maps to {}."""
    label, _, params = text.partition("=")
    params = yaml.safe_load(params) if params else {}
    if not isinstance(params, dict):
        raise SystemExit(f"{text}: expected LABEL={{key: value, ...}}")
    return label, params


def five_views(images: Path, model, limit: Optional[int]) -> torch.utils.data.TensorDataset:
    """Five more views of every image of the sample: the four corner crops and the mirrored centre crop
    of timm's resized eval image (same size, interpolation and normalisation). Paired over five times as
    many predictions, a top-1 difference between two models is measured with less noise than one image
    per class allows."""
    import torchvision.transforms.v2 as T
    from timm.data import resolve_data_config

    from compress.data.imagenet import ImageNet

    cfg = resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    resize = T.Compose([T.ToImage(), T.Resize(int(size / cfg["crop_pct"]), interpolation=T.InterpolationMode(cfg["interpolation"])),
                        T.ToDtype(torch.float32, scale=True), T.Normalize(cfg["mean"], cfg["std"])])

    def views(img):
        tl, tr, bl, br, centre = T.functional.five_crop(resize(img), size)
        return torch.stack([tl, tr, bl, br, centre.flip(-1)])

    ds = ImageNet(images, limit=limit).dataset("val", model)
    getattr(ds, "dataset", ds).transform = views  # the ImageFolder under the optional Subset
    xs, ys = zip(*torch.utils.data.DataLoader(ds, batch_size=50, num_workers=2))
    return torch.utils.data.TensorDataset(torch.cat(xs).flatten(0, 1), torch.cat(ys).repeat_interleave(5))


def logits(model, data: torch.utils.data.TensorDataset, batch_size: int = 100) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x) for x, _ in torch.utils.data.DataLoader(data, batch_size=batch_size)])


def paired(dense: torch.Tensor, pruned: torch.Tensor, labels: torch.Tensor, views: int = 1, resamples: int = 2000) -> dict:
    """Dense vs pruned on the same images: top-1/top-5, the top-1 change with a paired bootstrap 95 %
    interval, how often the top-1 class agrees, KL(dense || pruned), and the flips (right -> wrong and
    wrong -> right) that make up the change. With ``views`` consecutive rows per image the bootstrap
    resamples images, not rows, since views of one image are not independent."""
    def top(logits, k):
        return (logits.topk(k, dim=1).indices == labels[:, None]).any(1)

    right_d, right_p = top(dense, 1), top(pruned, 1)
    diff = right_p.float() - right_d.float()
    per_image = diff.view(-1, views).mean(1)
    g = torch.Generator().manual_seed(0)
    boot = per_image[torch.randint(len(per_image), (resamples, len(per_image)), generator=g)].mean(1).mul(100)
    lo, hi = boot.quantile(torch.tensor([0.025, 0.975])).tolist()
    kl = torch.nn.functional.kl_div(pruned.log_softmax(1), dense.log_softmax(1), log_target=True, reduction="batchmean")
    return {"n": len(labels),
            "top1": {"dense": right_d.float().mean().item() * 100, "pruned": right_p.float().mean().item() * 100},
            "top5": {"dense": top(dense, 5).float().mean().item() * 100, "pruned": top(pruned, 5).float().mean().item() * 100},
            "top1_change": diff.mean().item() * 100, "top1_change_ci95": [lo, hi],
            "agreement": (dense.argmax(1) == pruned.argmax(1)).float().mean().item() * 100, "kl": kl.item(),
            "right_to_wrong": int((right_d & ~right_p).sum()), "wrong_to_right": int((~right_d & right_p).sum())}
