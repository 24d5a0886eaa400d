"""The extension claim for model families, proved from a test file alone: a model the package does not know (a timm
ViT wrapped as ``.encoder`` behind its own classifier) is registered here with its family file's worth of code
(where the ViT is, its blocks), and a token pruner and the heads pruner then run on it through ``compress fit``,
export and ``compress.load`` like on the bundled models. If either needs a line of shared code, this fails."""
import json

import compress  # noqa: F401  (first: torchvision guard before timm)

import pytest
import torch
import torch.nn as nn

from compress.families import Family
from compress.families.vit import vit_blocks, vit_geometry
from compress.registry import FAMILIES, MODELS, register_family, register_model
from compress.run import fit
from conftest import QUICKSTART, only_run

SMALL = ["data.params.num_train=64", "data.params.num_val=32", "data.batch_size=16", "evaluate.batch_size=8",
         "model.name=toy_wrapped_vit", "model.kwargs={depth: 3}"]


class WrappedViT(nn.Module):
    """A classifier that keeps its ViT one level down and owns its head."""

    def __init__(self, depth: int = 3, num_classes: int = 6):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.encoder = VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=depth, num_heads=3,
                                         mlp_ratio=3.0, num_classes=0)
        self.classifier = nn.Linear(96, num_classes)
        self.num_classes = num_classes
        self.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                               "interpolation": "bilinear", "crop_pct": 1.0, "num_classes": num_classes}

    def forward(self, x):
        return self.classifier(self.encoder(x))


class Wrapped(Family):
    name = "toy_wrapped"

    @classmethod
    def matches(cls, model):
        return isinstance(model, WrappedViT)

    @classmethod
    def token_host(cls, model):
        return model.encoder

    @classmethod
    def geometry(cls, model):
        return vit_geometry(model.encoder)

    @classmethod
    def blocks(cls, model):
        return [(f"encoder.{name}", attn, mlp) for name, attn, mlp in vit_blocks(model.encoder)]


@pytest.fixture(autouse=True, scope="module")
def registered():
    register_model("toy_wrapped_vit")(lambda pretrained=False, **kw: WrappedViT(**kw))
    register_family("toy_wrapped")(Wrapped)
    yield
    MODELS.unregister("toy_wrapped_vit")
    FAMILIES.unregister("toy_wrapped")


def test_a_token_pruner_runs_on_a_family_registered_in_a_test_file(tmp_path):
    metrics = fit(QUICKSTART, SMALL + ["stages=[{kind: prune, pruner: {name: tome, target_gmacs_ratio: 0.6}}]"],
                  out=tmp_path)
    loaded = compress.load(only_run(tmp_path) / "export")
    assert isinstance(loaded, WrappedViT)
    with torch.no_grad():
        loaded(torch.randn(2, 3, 32, 32))
    counts = loaded.encoder._compress_tokens.state.counts
    assert counts[0] == 65 and counts[-1] < 65  # merged: later blocks really run on fewer tokens
    assert metrics["bench"]["ratios"]["gmacs"] < 0.8


def test_the_heads_pruner_narrows_a_family_registered_in_a_test_file(tmp_path):
    fit(QUICKSTART, SMALL + ["stages=[{kind: prune, max_steps: 2, pruner: {name: heads, head_pruning_ratio: 0.34, "
                             "steps: 1, prune_every: 1}}]"], out=tmp_path)
    run_dir = only_run(tmp_path)
    loaded = compress.load(run_dir / "export")
    assert [b.attn.num_heads for b in loaded.encoder.blocks] == [2, 2, 2]
    (entry,) = json.loads((run_dir / "export" / "compress.json").read_text())["pruners"]
    assert "encoder.blocks.0.attn.qkv" in entry["edits"]["modules"]  # recorded where the family put the blocks
