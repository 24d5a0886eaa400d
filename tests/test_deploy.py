"""ONNX and torch.export files of pruned models (``compress export --format onnx|pt2``): they run without compress's
eager code (onnxruntime; ``torch.export.load``) and give what ``compress.load`` gives, at another batch size than
the one traced. Tolerance: max |difference| <= 1e-4 of the largest output (fp32; measured ~1e-6)."""
import compress  # noqa: F401

import pytest
import timm
import torch

from compress import commands, deploy
from compress.cli import main
from compress.export import load, save
from compress.models import model_spec
from compress.pruners.base import build_pruner
from vit_zoo import CASES, images32 as images, pruned_vim_export, pruned_vit_export as vit_export

ort = pytest.importorskip("onnxruntime", reason="ONNX tests need the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxscript", reason="ONNX tests need the onnx extra: pip install -e '.[onnx]'")

def onnx_run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def assert_close(got, want):
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("case", CASES)
def test_onnx_file_runs_in_onnxruntime_like_compress_load(case, tmp_path):
    folder = vit_export(tmp_path, case)
    [result] = commands.deploy_export(folder, tmp_path / "model.onnx", "onnx")
    assert result["dynamic_batch"] and result["check"]["max_rel_diff"] <= deploy.TOLERANCE
    model = load(folder)
    x = images(5)  # traced at batch 2, checked at 3: a third size here
    with torch.no_grad():
        want = model(x)
    assert_close(onnx_run(tmp_path / "model.onnx", x), want)
    if model._compress_pruners:  # a token pruner's gathers are in the graph: tokens really drop in the file too
        with torch.no_grad():
            dense_tokens = load(folder, with_pruners=False)(x)
        assert (onnx_run(tmp_path / "model.onnx", x) - dense_tokens).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["dense", "zero_tprune", "tome", "heads"])
def test_pt2_program_loads_with_torch_export_alone(case, tmp_path):
    folder = vit_export(tmp_path, case)
    commands.deploy_export(folder, tmp_path / "model.pt2", "pt2")
    program = torch.export.load(str(tmp_path / "model.pt2"))
    x = images(4)
    with torch.no_grad():
        assert_close(program.module()(x), load(folder)(x))


def test_static_batch_is_fixed_in_the_file(tmp_path):
    folder = vit_export(tmp_path, "tome")
    [result] = commands.deploy_export(folder, tmp_path / "m.onnx", "onnx", dynamic_batch=False)
    assert not result["dynamic_batch"]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 2


def test_vim_scan_exports_as_an_onnx_loop(tmp_path):
    folder = pruned_vim_export(tmp_path, depth=2)
    commands.deploy_export(folder, tmp_path / "vim.onnx", "onnx")
    import onnx

    ops = {node.op_type for node in onnx.load(str(tmp_path / "vim.onnx")).graph.node}
    assert "Scan" in ops  # the recurrence is one loop, not L unrolled steps
    x = images(3)
    with torch.no_grad():
        assert_close(onnx_run(tmp_path / "vim.onnx", x), load(folder)(x))
    commands.deploy_export(folder, tmp_path / "vim.pt2", "pt2")  # the op itself stays one node in a .pt2
    program = torch.export.load(str(tmp_path / "vim.pt2"))
    assert any("selective_scan" in str(n.target) for n in program.graph.nodes)


def test_dtop_is_refused_with_its_reason_or_exported_with_every_token(tmp_path):
    from compress.models.build import build_from_spec

    kw = {"num_classes": 5, "img_size": 32, "aux_blocks": [0], "backbone_kwargs": {"depth": 2}}
    torch.manual_seed(0)
    model = build_from_spec({"name": "segmenter", "kwargs": kw}).eval()
    pruner = build_pruner({"name": "dtop"})
    pruner.attach(model)
    folder = save(model, tmp_path / "export", model_spec("segmenter", kw), [pruner], input_size=(3, 32, 32))
    with pytest.raises(compress.CompressError, match="dtop cannot be exported.*known only at run time.*--dense-tokens"):
        commands.deploy_export(folder, tmp_path / "seg.onnx", "onnx")
    assert not (tmp_path / "seg.onnx").exists()
    commands.deploy_export(folder, tmp_path / "seg.onnx", "onnx", dense_tokens=True)
    x = images(2)
    with torch.no_grad():
        assert_close(onnx_run(tmp_path / "seg.onnx", x), load(folder, with_pruners=False)(x))


def test_routed_diffusion_exports_one_file_per_expert(tmp_path):
    from diffusion_zoo import TINY, need_diffusion, tiny_model

    need_diffusion()
    from compress.pruners.diffusion.aptp import RoutedUNets
    from compress.tasks.diffusion import Diffusion

    model = tiny_model()
    pruner = build_pruner({"name": "aptp", "experts": 2, "pretrain_steps": 1, "target_macs_ratio": 0.6})
    pruner.attach(model)
    pruner.filter_prompts(model, ["a photo of a cat", "a photo of a dog", "a red ship", "a blue truck"])
    edits = pruner.finalize(model)
    assert isinstance(model.unet, RoutedUNets)
    folder = save(model, tmp_path / "export", model_spec("unet_small", TINY), [pruner], [edits], task=Diffusion(),
                  input_size=model.latent_shape())
    # diffusers' UNet specialises the batch while traced (measured: "Constraints violated (batch)"), so fixed batch
    results = commands.deploy_export(folder, tmp_path / "unet.onnx", "onnx", dynamic_batch=False)
    assert [r["variant"] for r in results] == ["expert0", "expert1"]
    loaded = load(folder)
    x, t, cond = Diffusion.for_manifest(loaded._compress_manifest).example(model.latent_shape(), 2)
    for k, r in enumerate(results):
        session = ort.InferenceSession(r["file"], providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        got = torch.from_numpy(session.run(None, dict(zip(names, (x.numpy(), t.numpy(), cond.numpy()))))[0])
        with torch.no_grad():
            want = loaded.unet.experts[k](x, t, encoder_hidden_states=cond, return_dict=False)[0]
        assert_close(got, want)


def test_cli_export_onnx_then_bench_it_beside_pytorch(tmp_path, capsys):
    folder = vit_export(tmp_path, "zero_tprune")
    assert main(["export", "--checkpoint", str(folder), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "batch dynamic" in capsys.readouterr().out
    # the file is there: a second export refuses to overwrite it, in one line
    assert main(["export", "--checkpoint", str(folder), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and len(err.splitlines()) == 1
    assert main(["export", "--checkpoint", str(folder), "--format", "onnx"]) == 2
    assert "needs --out FILE" in capsys.readouterr().err
    results = commands.bench(folder, None, [], [2], "cpu", 3, onnx=True, round_seconds=0)
    assert set(results["runtimes"]) == {"dense (onnxruntime)", "pruned (onnxruntime)"}
    assert all(v["speed"]["2"]["images_per_s"] > 0 for v in results["runtimes"].values())
    assert "pruned (onnxruntime) / dense" in commands.bench_table(results)


def test_real_deit_tiny_token_pruned_onnx_agrees_on_real_images(tmp_path):
    """The real DeiT-Tiny with Zero-TPrune (merge) at 0.65 of the GMACs: the ONNX file gives compress.load's logits
    on real ImageNet images (same tolerance) and the same top-1 class for every image."""
    from PIL import Image

    from conftest import need_asset
    from compress.models import build_model
    from compress.recipe import ModelConfig

    ckpt = need_asset("deit_tiny/deit_tiny_patch16_224.pth")
    val = need_asset("imagenet-sample/val")
    model = build_model(ModelConfig(name="deit_tiny_patch16_224", checkpoint=ckpt)).eval()
    pruner = build_pruner({"name": "zero_tprune", "target_gmacs_ratio": 0.65, "merge": True})
    pruner.attach(model)
    folder = save(model, tmp_path / "export", model_spec("deit_tiny_patch16_224"), [pruner], [pruner.finalize(model)])
    [result] = commands.deploy_export(folder, tmp_path / "deit.onnx", "onnx")
    assert result["dynamic_batch"] and result["check"]["max_rel_diff"] <= deploy.TOLERANCE
    loaded = load(folder)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=loaded), is_training=False)
    files = sorted(f for d in sorted(val.iterdir()) if d.is_dir() for f in sorted(d.iterdir()))[::250][:4]
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.inference_mode():
        want = loaded(x)
    got = onnx_run(tmp_path / "deit.onnx", x)
    assert_close(got, want)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
