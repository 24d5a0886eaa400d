"""Segmentation: the metric against a hand computation, the segmenter builder, the CamVid/ADE20K loaders on
real images, sliding-window evaluation, and fit -> eval -> bench -> DToP -> load through the real CLI."""
import compress  # noqa: F401

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from compress.cli import main
from compress.data.ade20k import ADE20K
from compress.data.camvid import CamVid
from compress.data.segmentation import IGNORE, random_crop, rescale_size
from compress.errors import CompressError
from compress.models.build import build_from_spec, build_model
from compress.recipe import ModelConfig
from compress.tasks.seg_infer import infer, slide_windows
from compress.tasks.seg_metrics import confusion_metric, scores
from compress.tasks.segmentation import Segmentation

from conftest import RECIPES, only_run

TINY = dict(backbone="deit_tiny_patch16_224", num_classes=11, img_size=32, aux_blocks=[0],
            backbone_kwargs={"depth": 2}, drop_path_rate=0.0)


# ---- metric ------------------------------------------------------------------------------------


def test_miou_macc_aacc_match_a_hand_computation():
    # 4 classes; class 3 appears in neither prediction nor truth; class 2 is predicted but never true
    target = torch.tensor([0, 0, 0, 1, 1, 1, 1, IGNORE, IGNORE, 0])
    pred = torch.tensor([0, 0, 1, 1, 1, 2, 1, 3, 3, 0])
    cm = confusion_metric(4, sync=False)
    cm.update(pred[:5], target[:5])  # two updates: the counts are summed over the split
    cm.update(pred[5:], target[5:])
    r = scores(cm.compute())
    # class 0: I 3, truth 4, pred 3 -> U 4; class 1: I 3, truth 4, pred 4 -> U 5; class 2: I 0, U 1; class 3: absent
    assert r["class_iou"][3] is None
    assert r["mIoU"] == pytest.approx((3 / 4 + 3 / 5 + 0) / 3 * 100)
    assert r["mAcc"] == pytest.approx((3 / 4 + 3 / 4) / 2 * 100)  # class 2 has no truth: no accuracy
    assert r["aAcc"] == pytest.approx(6 / 8 * 100)  # the ignored pixels count nowhere


# ---- the segmenter -----------------------------------------------------------------------------


def test_segmenter_pads_odd_sizes_and_gives_one_map_per_head():
    model = build_from_spec({"name": "segmenter", "kwargs": {**TINY, "aux_blocks": [0], "head": "mask"}}).eval()
    x = torch.randn(2, 3, 45, 70)
    with torch.no_grad():
        out, maps = model(x), model.forward_maps(x)
    assert out.shape == (2, 11, 45, 70)
    assert [tuple(m.shape) for m in maps] == [(2, 11, 3, 5), (2, 11, 3, 5)]  # 45 -> 48, 70 -> 80 at 16 px patches


def test_backbone_checkpoint_loads_resampled_and_a_segmenter_checkpoint_loads_as_is(require_asset, tmp_path):
    path = require_asset("deit_tiny/deit_tiny_patch16_224.pth")
    kw = {**TINY, "backbone_kwargs": {}, "img_size": 64}
    model = build_model(ModelConfig(name="segmenter", checkpoint=path, kwargs=kw))
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    assert model.backbone.pos_embed.shape == (1, 1 + 16, 192)  # 14 x 14 resampled to the 4 x 4 grid of 64 px
    assert torch.equal(model.backbone.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "seg.safetensors"))
    again = build_model(ModelConfig(name="segmenter", checkpoint=tmp_path / "seg.safetensors", kwargs=kw))
    assert torch.equal(again.decode_head.proj.weight, model.decode_head.proj.weight)
    with pytest.raises(CompressError, match="does not fit Segmenter"):
        build_model(ModelConfig(name="segmenter", checkpoint=tmp_path / "seg.safetensors", kwargs={**kw, "num_classes": 5}))


@pytest.mark.parametrize("kwargs, match", [
    ({"aux_blocks": [1]}, r"model.kwargs.aux_blocks: \[1\] must be distinct block indices in 0..0"),
    ({"head": "fpn"}, "model.kwargs.head: 'fpn' is not a segmenter head"),
    ({"backbone": "no_such_vit"}, "model.kwargs.backbone: 'no_such_vit' is not a timm model"),
])
def test_bad_segmenter_kwargs(kwargs, match):
    with pytest.raises(CompressError, match=match):
        build_from_spec({"name": "segmenter", "kwargs": {**TINY, **kwargs}})


# ---- data ----------------------------------------------------------------------------------------


def test_camvid_reads_real_pairs_and_ignores_label_11(require_asset):
    root = require_asset("camvid")
    model = build_from_spec({"name": "segmenter", "kwargs": TINY})
    source = CamVid(root, CamVid.Config(crop_size=(64, 64)), limit=3)
    val = source.dataset("val", model)
    x, y = val[0]
    img_path, label_path = val.dataset.pairs[0] if hasattr(val, "dataset") else val.pairs[0]
    raw = torch.from_numpy(np.array(Image.open(label_path))).long()
    assert x.shape == (3, 360, 480) and y.shape == (360, 480)
    assert torch.equal(y[raw < 11], raw[raw < 11]) and bool((y[raw == 11] == IGNORE).all()) and bool((raw == 11).any())
    assert source.input_size(model) == (3, 360, 480)
    train = source.dataset("train", model, train=True)
    for i in range(3):
        x, y = train[i]
        assert x.shape == (3, 64, 64) and y.shape == (64, 64) and y.dtype == torch.long
        assert set(y.unique().tolist()) <= set(range(11)) | {IGNORE}


def test_ade20k_shifts_labels_and_slides_over_the_three_real_images(require_asset):
    root = require_asset("ade20k-sample")
    model = build_from_spec({"name": "segmenter", "kwargs": {**TINY, "num_classes": 150}}).eval()
    source = ADE20K(root, ADE20K.Config(crop_size=(64, 64), stride=(48, 48), eval_scale=(256, 128)))
    val = source.dataset("val", model)
    assert len(val) == 3
    x, y = val[0]
    raw = torch.from_numpy(np.array(Image.open(val.pairs[0][1]))).long()
    assert y.shape == raw.shape and x.shape[-2:] == rescale_size(*raw.shape, (256, 128))
    assert bool((y[raw == 0] == IGNORE).all()) and torch.equal(y[raw > 0], raw[raw > 0] - 1)
    with pytest.raises(CompressError, match="has no 'images/training/' folder"):
        source.dataset("train", model, train=True)  # the sample holds the validation split only
    result = Segmentation(150).evaluate(model, torch.utils.data.DataLoader(val))
    assert result["images"] == 3 and 0 <= result["mIoU"] <= 100 and result["latency_ms"] > 0
    # executed GMACs per image = the sum over its windows
    windows = sum(len(slide_windows(*val[i][0].shape[-2:], (64, 64), (48, 48))) for i in range(3)) / 3
    from compress.measure import count_gmacs

    assert result["gmacs"] == pytest.approx(windows * count_gmacs(model, torch.randn(1, 3, 64, 64)), rel=0.05)


class PerPixel(nn.Module):
    """A model whose output at a pixel depends only on that pixel: sliding must give the whole-image result."""

    def forward(self, x):
        return torch.cat([x, x.square()], 1)


def test_pixel_kd_is_zero_for_the_teacher_itself_and_positive_otherwise():
    from compress.tasks.segmentation import pixel_kd

    t = torch.randn(2, 5, 8, 8)
    assert float(pixel_kd(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(pixel_kd(torch.randn(2, 5, 8, 8), t, 2.0)) > 0


def test_sliding_window_covers_every_pixel_and_averages_overlaps():
    img = torch.randn(1, 3, 70, 101)
    assert slide_windows(70, 101, (32, 32), (21, 21))[-1] == (38, 70, 69, 101)
    spec = {"mode": "slide", "crop": (32, 32), "stride": (21, 21)}
    assert torch.allclose(infer(PerPixel(), img, spec), PerPixel()(img), atol=1e-6)
    small = {"mode": "slide", "crop": (128, 128), "stride": (85, 85)}  # window larger than the image: one forward
    assert slide_windows(70, 101, (128, 128), (85, 85)) == [(0, 70, 0, 101)]
    assert torch.allclose(infer(PerPixel(), img, small), PerPixel()(img))


def test_random_crop_avoids_crops_dominated_by_one_class():
    torch.manual_seed(0)
    label = torch.zeros(100, 100, dtype=torch.long)
    label[:, 80:] = 1  # class 0 covers 80 %: most 40 px crops are all class 0
    img = torch.zeros(3, 100, 100)
    import random

    random.seed(0)
    mixed = sum(len(random_crop(img, label, (40, 40), 0.75)[1].unique()) > 1 for _ in range(50))
    random.seed(0)
    plain = sum(len(random_crop(img, label, (40, 40), 1.0)[1].unique()) > 1 for _ in range(50))
    assert mixed > plain + 10


# ---- through the CLI -----------------------------------------------------------------------------


def fit_overrides(root, out):
    return ["fit", "--recipe", str(RECIPES / "camvid_deit_t_segmenter.yaml"), "--out", str(out),
            "--set", f"data.root={root}", "--set", "data.limit=4", "--set", "data.batch_size=2",
            "--set", "data.num_workers=0", "--set", "data.params.crop_size=[32, 32]",
            "--set", "model.kwargs={backbone: deit_tiny_patch16_224, num_classes: 11, img_size: 32, aux_blocks: [0], "
                     "backbone_kwargs: {depth: 2}}",
            "--set", "stages.0.max_steps=2", "--set", "evaluate.batch_size=2"]


@pytest.fixture(scope="module")
def segmenter_run(tmp_path_factory):
    from conftest import need_asset

    root = need_asset("camvid")
    out = tmp_path_factory.mktemp("seg")
    assert main(fit_overrides(root, out)) == 0
    return root, only_run(out)


def test_fit_trains_evaluates_and_exports_a_segmenter(segmenter_run, capsys):
    root, run = segmenter_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["pruned"]["images"] == 4 and 0 <= metrics["pruned"]["mIoU"] <= 100
    manifest = json.loads((run / "export" / "compress.json").read_text())
    assert manifest["task"] == "segmentation" and manifest["task_info"] == {"num_classes": 11}
    assert manifest["input_size"] == [3, 360, 480]


def test_eval_and_bench_print_segmentation_metrics(segmenter_run, capsys, tmp_path):
    root, run = segmenter_run
    assert main(["eval", "--checkpoint", str(run / "export"), "--data", f"camvid:{root}", "--limit", "2",
                 "--workers", "0", "--json", str(tmp_path / "e.json")]) == 0
    shown = capsys.readouterr().out
    for title in ("mIoU %", "mAcc %", "aAcc %", "GMACs", "latency ms @1", "images/s"):
        assert title in shown
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["images"] == 2 and r["timing_batch"] == 2 and r["gmacs"] > 0
    assert main(["bench", "--round-seconds", "0", "--checkpoint", str(run / "export"), "--batch-sizes", "1", "--repeats", "2"]) == 0
    assert "pruned / dense" in capsys.readouterr().out


def test_dtop_fit_from_a_segmenter_export_and_load_gives_the_same_masks(segmenter_run, tmp_path, capsys):
    root, run = segmenter_run
    args = fit_overrides(root, tmp_path)
    args[args.index(str(RECIPES / "camvid_deit_t_segmenter.yaml"))] = str(RECIPES / "camvid_deit_t_dtop.yaml")
    args += ["--set", f"model.checkpoint={run / 'export'}",  # an export folder: its model.safetensors
             "--set", "stages=[{kind: prune, pruner: {name: dtop, threshold: 0.2, top_k: 1}, max_steps: 2}, "
                      "{kind: distill, max_steps: 2, distill: {alpha: 0.5, temperature: 2.0}}]",
             "--set", "trainer.log_every_n_steps=1"]
    assert main(args) == 0
    assert "exited %" in capsys.readouterr().out
    dtop_run = only_run(tmp_path)
    logged = (dtop_run / "stages" / "1-distill" / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "train/kd" in logged and "train/exit_fraction" in logged  # per-pixel KD from the dense segmenter, with exits
    metrics = json.loads((dtop_run / "metrics.json").read_text())
    assert metrics["pruned"]["exit_fraction"] > 0 and "exit_fraction" not in metrics["dense"]
    assert metrics["pruned"]["gmacs"] < metrics["dense"]["gmacs"]
    # bench on real val images: the pruned model exits tokens there, so it executes fewer GMACs than dense
    assert main(["bench", "--round-seconds", "0", "--checkpoint", str(dtop_run / "export"), "--data", f"camvid:{root}", "--batch-sizes", "1",
                 "--repeats", "2", "--json", str(tmp_path / "b.json")]) == 0
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench["input_size"] == [3, 360, 480] and bench["ratios"]["gmacs"] < 1
    assert main(["bench", "--round-seconds", "0", "--checkpoint", str(dtop_run / "export"), "--data", "quickstart:"]) == 2
    assert "--data: quickstart is a classification dataset but the model is a segmentation model" in capsys.readouterr().err
    model = compress.load(dtop_run / "export")
    assert model.token_pruner() is not None
    ds = CamVid(root, CamVid.Config(), limit=2).dataset("val", model)
    x = torch.stack([ds[i][0] for i in range(2)])
    with torch.no_grad():
        first = model(x).argmax(1)
        again = compress.load(dtop_run / "export")(x).argmax(1)
    assert torch.equal(first, again)


def test_camvid_root_without_label_folders_is_one_line(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    assert main(fit_overrides(tmp_path, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.root" in err and "'trainannot/'" in err


def test_segmentation_data_needs_a_segmenter(tmp_path, capsys, require_asset):
    root = require_asset("camvid")
    args = fit_overrides(root, tmp_path) + ["--set", "model={name: deit_tiny_patch16_224, kwargs: {num_classes: 11}}"]
    assert main(args) == 2
    assert "segmentation data needs a segmenter" in capsys.readouterr().err
