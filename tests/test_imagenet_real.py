"""Real DeiT-Tiny weights on real ImageNet images (skipped when the assets are absent).

``compress eval`` on an export of the dense model must give exactly the top-1 of a plain timm loop:
timm's eval transform, the same images, class index = position of the wnid in ImageNetInfo.
"""
import json

import pytest
import timm
import torch
from PIL import Image

import compress
from compress.cli import main
from compress.export import save
from compress.models import build_model, model_spec
from compress.recipe import ModelConfig

from conftest import need_asset

LIMIT = 100
WEIGHTS = "deit_tiny/deit_tiny_patch16_224.pth"
IMAGES = "imagenet-sample/val"


@pytest.fixture(scope="module")
def deit_export(tmp_path_factory):
    ckpt = need_asset(WEIGHTS)
    model = build_model(ModelConfig(name="deit_tiny_patch16_224", checkpoint=ckpt))
    out = tmp_path_factory.mktemp("deit") / "deit_tiny_dense"
    save(model, out, model_spec("deit_tiny_patch16_224"))
    return out


def plain_timm_top1(ckpt, val_dir) -> tuple:
    """Top-1 (percent) and image count of timm's DeiT-Tiny on ``LIMIT`` evenly spaced images."""
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model), is_training=False)
    label_of = {w: i for i, w in enumerate(timm.data.ImageNetInfo().label_names())}
    files = sorted((d.name, f) for d in val_dir.iterdir() if d.is_dir() for f in sorted(d.iterdir()))
    n = len(files)
    picked = [files[round(i * (n - 1) / (LIMIT - 1))] for i in range(LIMIT)]
    correct = 0
    with torch.inference_mode():
        for start in range(0, LIMIT, 25):
            chunk = picked[start:start + 25]
            x = torch.stack([transform(Image.open(f).convert("RGB")) for _, f in chunk])
            pred = model(x).argmax(-1)
            correct += sum(int(p) == label_of[wnid] for p, (wnid, _) in zip(pred, chunk))
    return 100.0 * correct / LIMIT, LIMIT


def test_export_of_dense_deit_loads_bit_identically(deit_export):
    ckpt = need_asset(WEIGHTS)
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    ref.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    loaded = compress.load(deit_export)
    assert loaded._compress_pruners == []
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(loaded(x), ref(x))


def test_eval_matches_a_plain_timm_loop(deit_export, tmp_path, capsys):
    ckpt = need_asset(WEIGHTS)
    val_dir = need_asset(IMAGES)
    out_json = tmp_path / "eval.json"
    code = main(["eval", "--checkpoint", str(deit_export), "--data", f"imagenet:{val_dir.parent}",
                 "--limit", str(LIMIT), "--batch-size", "5", "--workers", "0", "--device", "cpu",
                 "--json", str(out_json)])
    assert code == 0, capsys.readouterr().err
    results = json.loads(out_json.read_text())
    top1, n = plain_timm_top1(ckpt, val_dir)
    assert results["images"] == n
    assert results["top1"] == pytest.approx(top1, abs=1e-3)
    assert results["top1"] > 50  # DeiT-Tiny is ~72 % on ImageNet val: wrong labels would show here
    assert results["top1"] <= results["top5"]
    assert results["gmacs"] == pytest.approx(1.254, rel=0.01)
    assert results["params"] == 5_717_416
