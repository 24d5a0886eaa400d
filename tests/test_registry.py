"""Tests generated from the registries, so every new pruner, model builder and dataset is exercised."""
import compress  # noqa: F401

import pytest
import timm
import torch

from compress.export import load, save
from compress.models import model_spec
from compress.pruners.base import build_pruner
from compress.registry import DATASETS, MODELS, PRUNERS

# token pruners of timm ViT classifiers (dtop's segmenters and top_vim's Vision Mambas have their own tests)
TOKEN_PRUNERS = [n for n, cls in PRUNERS.items() if cls.kind == "token" and cls.targets == "vit"]


@pytest.mark.parametrize("name", PRUNERS.names())
def test_pruner_describes_itself(name):
    cls = PRUNERS.get(name)
    assert cls.name == name and cls.kind in {"token", "weight", "structured", "diffusion"}
    assert (cls.__doc__ or "").strip(), f"{name} needs a docstring: `compress pruners` prints its first line"
    with pytest.raises(compress.CompressError, match="unknown key"):
        build_pruner({"name": name, "definitely_not_a_parameter": 1})


@pytest.mark.parametrize("name", TOKEN_PRUNERS)
def test_token_pruner_prunes_and_round_trips_through_export(name, tmp_path):
    torch.manual_seed(0)
    base = {"img_size": 64}
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **base).eval()
    x = torch.randn(2, 3, 64, 64)
    pruner = build_pruner({"name": name})
    pruner.attach(model)
    with torch.no_grad():
        out = model(x)
    counts = model._compress_tokens.state.counts
    assert counts[-1] < counts[0], f"{name} removed no token with its default config: {counts}"
    save(model, tmp_path / "export", model_spec("deit_tiny_patch16_224", base), [pruner])
    loaded = load(tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    pruner.detach(model)
    assert not hasattr(model, "_compress_tokens")


@pytest.mark.parametrize("name", TOKEN_PRUNERS)
def test_token_pruner_export_pins_its_plan(name, tmp_path):
    """A budget or default schedule is resolved when attached; the export stores the resolved plan, so the
    model reloads the same even if a later version changes the defaults that produced it."""
    base = {"img_size": 64}
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **base).eval()
    pruner = build_pruner({"name": name, "target_gmacs_ratio": 0.6})
    pruner.attach(model)
    spec = pruner.spec()
    assert spec["target_gmacs_ratio"] is None, f"{name} exports its budget instead of the plan it solved: {spec}"
    again = build_pruner(spec)
    again.attach(timm.create_model("deit_tiny_patch16_224", pretrained=False, **base))
    assert again.expected_tokens() == pruner.expected_tokens()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    save(model, tmp_path / "export", model_spec("deit_tiny_patch16_224", base), [pruner])
    cls = PRUNERS.get(name)
    real_plan = cls.plan
    try:  # a "later version" whose planning ignores the config: only the pinned spec can reproduce the plan
        cls.plan = lambda self, geometry: real_plan(self, geometry) if self.config.target_gmacs_ratio is None else 1 / 0
        with torch.no_grad():
            assert torch.equal(load(tmp_path / "export")(x), out)
    finally:
        cls.plan = real_plan


@pytest.mark.parametrize("name", MODELS.names())
def test_registered_model_builds_and_runs(name):
    from compress.models.build import build_from_spec

    task = getattr(MODELS.get(name), "task", "classification")
    if task != "classification":  # e.g. the text-to-image builders: their own tests build and run them
        pytest.skip(f"{name} is a {task} model (tests/test_diffusion*.py)")
    model = build_from_spec({"name": name, "kwargs": getattr(MODELS.get(name), "test_kwargs", {})}).eval()
    from timm.data import resolve_data_config

    size = resolve_data_config({}, model=model)["input_size"]
    with torch.no_grad():  # a segmenter gives B x classes x H x W
        assert model(torch.randn(1, *size)).ndim == (4 if hasattr(model, "forward_maps") else 2)


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_kind_without_root_fails_clearly_or_works(name):
    cls = DATASETS.get(name)
    source = cls(None, cls.Config(), limit=4)
    try:
        ds = source.dataset("val", torch.nn.Identity())
    except compress.CompressError as e:
        assert "data.root" in str(e)
    else:
        x, y = ds[0]
        assert x.ndim == 3 and 0 <= int(y) < source.num_classes
