"""The Hub, offline: ``compress.load("hf-hub:org/name")`` through the real huggingface_hub client reading a cache
in the Hub's layout, the model card, and a push that cannot reach the Hub failing in one line."""
import compress  # noqa: F401

import shutil

import pytest
import timm
import torch

from compress import hub
from compress.export import load, save
from compress.models import model_spec
from compress.pruners.base import build_pruner

VIT = dict(img_size=32, patch_size=8, depth=2, num_classes=10)


def export(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT).eval()
    pruner = build_pruner({"name": "tome", "target_gmacs_ratio": 0.8})
    pruner.attach(model)
    metrics = {"dense": {"top1": 80.0, "top5": 95.0}, "pruned": {"top1": 79.5, "top5": 94.8},
               "bench": {"dense": {"gmacs": 0.02, "params": 5e5, "speed": {"8": {"images_per_s": 100.0}}},
                         "pruned": {"gmacs": 0.015, "params": 5e5, "speed": {"8": {"images_per_s": 130.0}}},
                         "ratios": {"gmacs": 0.75, "params": 1.0, "speedup": {"8": 1.3}}}}
    return model, save(model, tmp_path / "export", model_spec("vit_tiny_patch16_224", VIT), [pruner],
                       recipe_yaml="name: tiny\n", metrics=metrics)


def test_load_from_a_hub_cache_offline(tmp_path):
    model, folder = export(tmp_path)
    hub.write_card(folder, "org/tiny-tome")
    snapshot = tmp_path / "cache" / "models--org--tiny-tome" / "snapshots" / ("a" * 40)
    shutil.copytree(folder, snapshot)
    (tmp_path / "cache" / "models--org--tiny-tome" / "refs").mkdir()
    (tmp_path / "cache" / "models--org--tiny-tome" / "refs" / "main").write_text("a" * 40)
    loaded = load("hf-hub:org/tiny-tome", cache_dir=tmp_path / "cache")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(compress.CompressError, match="not in the local Hub cache"):
        load("hf-hub:org/absent", cache_dir=tmp_path / "cache")
    with pytest.raises(compress.CompressError, match="expected hf-hub:<org>/<name>"):
        load("hf-hub:justaname", cache_dir=tmp_path / "cache")


def test_model_card_has_metadata_table_plot_and_recipe(tmp_path):
    _, folder = export(tmp_path)
    card = hub.write_card(folder, "org/tiny-tome").read_text()
    assert card.startswith("---\n") and "library_name: compress" in card and "- tome" in card
    assert 'compress.load("hf-hub:org/tiny-tome")' in card
    assert "| pruned | 79.50" in card or "| pruned | 79.5" in card
    assert "name: tiny" in card and "![trade-off](tradeoff.png)" in card
    assert (folder / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    load(folder)  # the card files do not stop the folder loading as an export


def test_push_without_the_hub_fails_in_one_line(tmp_path, capsys):
    from compress.cli import main

    _, folder = export(tmp_path)
    assert main(["export", "--checkpoint", str(folder), "--push-to-hub", "org/tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--push-to-hub org/tiny" in err and len(err.splitlines()) == 1
    assert main(["export", "--checkpoint", str(folder), "--push-to-hub", "not a repo!"]) == 2
