"""Compact export of weight-pruned models: bit packing, nonzero values + mask in model.safetensors, identical
reloads, dense storage when nothing is pruned, the storage lines of ``compress bench``, and GPU 2:4."""
import compress  # noqa: F401  (first: torchvision guard before timm)

import pytest
import torch
from safetensors.torch import load_file

from compress.cli import main
from compress.export import save
from compress.models.build import model_spec
from compress.pruners.base import build_pruner
from compress.pruners.weight import masks as M

SPEC = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2,
                                 "num_classes": 6})


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_bit_packing_round_trips(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    packed = M.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(M.unpack_bits(packed, n), mask)
    assert int(M.pack_bits(torch.tensor([True] + [False] * 7))[0]) == 128  # most significant bit first


def model():
    import timm

    torch.manual_seed(0)
    return timm.create_model(SPEC[0], pretrained=False, **SPEC[1]).eval()


def test_export_stores_values_and_bits_and_reloads_identically(tmp_path):
    m = model()
    pruner = build_pruner({"name": "magnitude", "sparsity": 0.9})
    pruner.attach(m)
    out = save(m, tmp_path / "pruned", model_spec(*SPEC), [pruner], [pruner.finalize(m)])
    dense = save(model(), tmp_path / "dense", model_spec(*SPEC))
    stored = load_file(str(out / "model.safetensors"))
    key = "blocks.0.mlp.fc1.weight"
    assert key not in stored
    assert stored[key + ".sparse_mask"].dtype == torch.uint8
    assert stored[key + ".sparse_values"].numel() == int(torch.count_nonzero(m.blocks[0].mlp.fc1.weight))
    assert "head.weight" in stored and "patch_embed.proj.weight" in stored  # not pruned, stored dense
    size, dense_size = (out / "model.safetensors").stat().st_size, (dense / "model.safetensors").stat().st_size
    assert size < 0.35 * dense_size, (size, dense_size)
    loaded = compress.load(out)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in loaded.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))


def test_nothing_pruned_is_stored_dense(tmp_path):
    m = model()
    pruner = build_pruner({"name": "issp", "sparsity": 0.9})
    pruner.attach(m)  # no optimizer step yet: nothing pruned; finalize freezes to hard zeros
    edits = pruner.finalize(m)
    assert edits["sparsity"] == pytest.approx(0.9, abs=1e-3)
    fresh = model()
    p2 = build_pruner({"name": "magnitude", "sparsity": 0.9, "include": ["nothing_matches_but_head"], "exclude": []})
    with pytest.raises(compress.CompressError):
        p2.attach(fresh)
    p3 = build_pruner({"name": "magnitude", "sparsity": 0.0})
    p3.attach(fresh)
    e3 = p3.finalize(fresh)
    assert e3["packed"] == {} and e3["sparsity"] == 0
    out = save(fresh, tmp_path / "dense_like", model_spec(*SPEC), [p3], [e3])
    assert not any("sparse" in k for k in load_file(str(out / "model.safetensors")))


def test_bench_reports_nonzero_params_file_size_and_the_speed_note(tmp_path, capsys):
    m = model()
    pruner = build_pruner({"name": "magnitude", "sparsity": 0.9})
    pruner.attach(m)
    out = save(m, tmp_path / "pruned", model_spec(*SPEC), [pruner], [pruner.finalize(m)], input_size=(3, 32, 32))
    json_path = tmp_path / "bench.json"
    assert main(["bench", "--round-seconds", "0", "--checkpoint", str(out), "--batch-sizes", "2", "--repeats", "1", "--device", "cpu",
                 "--json", str(json_path)]) == 0
    text = capsys.readouterr().out
    assert "nonzero params" in text and "MiB" in text and "not dense-kernel time" in text
    import json

    storage = json.loads(json_path.read_text())["storage"]
    assert storage["pruned_nonzero_params"] < 0.5 * storage["dense_nonzero_params"]
    assert storage["export_mb"] * 2**20 == (out / "model.safetensors").stat().st_size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured sparsity needs a CUDA GPU")
def test_2_4_weights_convert_to_semi_structured_on_cuda():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 64)).half().cuda().eval()
    pruner = build_pruner({"name": "magnitude", "n_m": [2, 4], "include": ["*"], "exclude": []})
    pruner.attach(lin)
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    with torch.no_grad():
        dense_out = lin(x)
        converted = M.to_semi_structured(lin)
        sparse_out = lin(x)
    assert converted == ["0", "1"]
    assert type(lin[0].weight.data).__name__.startswith("SparseSemiStructured")
    assert torch.allclose(sparse_out, dense_out, atol=1e-2, rtol=1e-2)
