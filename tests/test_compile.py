"""``torch.compile`` of ``compress.load`` models (``compress bench --compile``): the same outputs as eager, and
where dynamo breaks the graph. Tolerance: max |compiled - eager| <= 1e-4 of the largest output (fp32).

Inductor compiles a 4-block ViT in over a minute on a 2-core CPU, so these tests use torch's ``aot_eager``
backend: dynamo's capture and AOTAutograd's functionalised graph are what can go wrong in pruned models (graph
breaks, mutated state, specialised shapes); tools/results/compile_deit_tiny.md has inductor on the real DeiT-Tiny.
"""
import compress  # noqa: F401

import json

import pytest
import torch

from compress import compiled
from compress.cli import main
from compress.errors import CompressError
from compress.export import load, save
from compress.models import model_spec
from compress.pruners.base import build_pruner
from compress.registry import MODELS
from vit_zoo import CASES, images32, pruned_vim_export, pruned_vit_export


def assert_close(got, want):
    assert got.shape == want.shape
    assert (got - want).abs().max() <= compiled.TOLERANCE * want.abs().max()


@pytest.mark.parametrize("case", CASES)
def test_every_vit_pruner_compiles_to_one_graph_with_eager_outputs(case, tmp_path):
    """fullgraph=True: no ViT pruner breaks the graph (token counts are fixed per block, and the batch-1 eager
    fast paths are skipped while compiling)."""
    torch._dynamo.reset()
    model = load(pruned_vit_export(tmp_path, case))
    fast = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    for n in (1, 3):  # batch 1 is where compress.tokens has its own eager path
        x = images32(n)
        with torch.inference_mode():
            assert_close(fast(x), model(x))


def _vim(tmp_path):
    return load(pruned_vim_export(tmp_path, depth=4))


def _dtop(tmp_path):
    kw = dict(backbone="deit_tiny_patch16_224", num_classes=5, img_size=32, aux_blocks=[0, 1],
              backbone_kwargs={"depth": 4, "patch_size": 4}, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = MODELS.get("segmenter")(**kw).eval()
    pruner = build_pruner({"name": "dtop"})
    pruner.attach(model)
    return load(save(model, tmp_path / "export", model_spec("segmenter", kw), [pruner], input_size=(3, 32, 32)))


@pytest.mark.parametrize("family", ["vim", "dtop"])
def test_vim_and_dtop_compile_with_eager_outputs_and_their_breaks_are_named(family, tmp_path):
    torch._dynamo.reset()
    model = (_vim if family == "vim" else _dtop)(tmp_path)
    x = images32(2)
    runner = compiled.CompiledModel(model, backend="eager")  # dynamo alone: the breaks are its own
    result = compiled.check(runner, lambda n: images32(n), 2)
    assert result["max_rel_diff"] <= compiled.TOLERANCE and result["compile_seconds"] > 0
    breaks = compiled.graph_breaks(model, x)
    assert breaks["graphs"] == breaks["breaks"] + 1
    assert len(breaks["reasons"]) <= breaks["breaks"] and all(r["reason"] and r["at"] for r in breaks["reasons"])
    if family == "dtop":  # its exits depend on the image: a data-dependent branch dynamo cannot trace through
        assert breaks["breaks"] > 0 and any("dtop.py" in r["at"] for r in breaks["reasons"])


def test_bench_compile_times_compiled_models_beside_eager(tmp_path, capsys):
    folder = pruned_vit_export(tmp_path, "tome")
    out = tmp_path / "bench.json"
    assert main(["bench", "--round-seconds", "0", "--checkpoint", str(folder), "--compile", "eager",
                 "--batch-sizes", "2", "--repeats", "1", "--device", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "pruned (compiled) / dense" in text and "0 graph break(s)" in text
    r = json.loads(out.read_text())
    assert set(r["compile"]) == {"dense (compiled)", "pruned (compiled)"}
    for c in r["compile"].values():
        assert c["breaks"] == 0 and c["checks"][0]["max_rel_diff"] <= compiled.TOLERANCE
    assert r["runtimes"]["pruned (compiled)"]["speed"]["2"]["images_per_s"] > 0


def test_unknown_backend_is_one_line(tmp_path, capsys):
    with pytest.raises(CompressError, match="unknown torch.compile backend 'nope'"):
        compiled.CompiledModel(torch.nn.Linear(2, 2), backend="nope")
    folder = pruned_vit_export(tmp_path, "dense")
    assert main(["bench", "--checkpoint", str(folder), "--compile", "nope", "--batch-sizes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown torch.compile backend 'nope'" in err and len(err.splitlines()) == 1


def test_check_draws_a_fixed_batch_and_names_the_samples_that_differ():
    model = torch.nn.Linear(4, 3).eval()
    runner = compiled.CompiledModel(model, backend="eager")
    seen = []

    def example_for(n):
        seen.append(torch.randn(n, 4))
        return seen[-1]

    compiled.check(runner, example_for, 5)
    compiled.check(runner, example_for, 5)
    assert torch.equal(seen[0], seen[1])  # a failure repeats: the batch does not depend on the global RNG's state

    class OneSampleOff(torch.nn.Module):  # as if one sample's discrete choice had flipped
        def forward(self, x):
            return model(x) + 10.0 * (torch.arange(len(x)) == 2).unsqueeze(1)

    runner.compiled = OneSampleOff()
    with pytest.raises(CompressError, match=r"at batch 5, in 1 of 5 samples \(a discrete token choice flipped"):
        compiled.check(runner, example_for, 5)
