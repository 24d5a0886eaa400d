"""The task layer: a task registered outside the package runs through the same runner, CLI and export.

A toy regression task (predict an image's mean brightness, MSE, metric ``mae``) and its data kind are
registered here, in the test, the way a new task module would register itself; ``compress fit``,
``compress eval``, ``compress bench`` and ``compress.load`` must handle it without knowing it.
"""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import compress
from compress.cli import main
from compress.data.base import DataSource
from compress.registry import TASKS, register_dataset, register_task
from compress.tasks.base import Task
from compress.tasks.module import StageModule

from conftest import QUICKSTART, only_run


class BrightnessModule(StageModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.model(x).squeeze(-1), y)
        self.log("train/loss", loss)
        return loss


@register_task("toy_brightness")
class Brightness(Task):
    name = "toy_brightness"
    columns = (("mae", "MAE", ".4f"),)
    primary = "mae"

    def module(self, model, stage, teacher=None):
        return BrightnessModule(model, stage, teacher)

    @torch.inference_mode()
    def evaluate(self, model, loader, device="cpu", label="evaluate"):
        err, n = 0.0, 0
        for x, y in loader:
            err += (model(x).squeeze(-1) - y).abs().sum().item()
            n += len(y)
        return {"mae": err / n, "images": n}


@register_dataset("toy_brightness")
class BrightnessData(DataSource):
    task = "toy_brightness"

    @property
    def num_classes(self):
        return None

    def input_size(self, model):
        return (3, 32, 32)

    def build(self, split, model, train):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        x = torch.rand(64, 3, 32, 32, generator=g) * torch.rand(64, 1, 1, 1, generator=g)
        return TensorDataset(x, x.mean(dim=(1, 2, 3)))


OVERRIDES = ["data.kind=toy_brightness", "data.params={}", "data.batch_size=16", "model.kwargs.num_classes=1",
             "model.kwargs.depth=2", "stages.0.epochs=1", "stages.2.epochs=1", "evaluate.batch_size=4",
             "stages.1.pruner={name: heads, target_gmacs_ratio: 0.7, steps: 1, prune_every: 1}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["fit", "--recipe", str(QUICKSTART), "--out", str(out), *[a for o in OVERRIDES for a in ("--set", o)]]) == 0
    return only_run(out)


def test_registered_tasks_declare_their_report():
    for name, cls in TASKS.items():
        assert cls.name == name and cls.columns and cls.primary in {key for key, _, _ in cls.columns}


def test_fit_runs_a_task_the_runner_does_not_know(run, capsys):
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["dense"]) == {"mae", "images"} and set(metrics["pruned"]) == {"mae", "images"}
    assert metrics["bench"]["ratios"]["gmacs"] < 0.9  # the heads pruner shrank the model
    manifest = json.loads((run / "export" / "compress.json").read_text())
    assert manifest["task"] == "toy_brightness" and manifest["task_info"] == {"num_classes": None}


def test_eval_and_bench_use_the_export_task(run, capsys, tmp_path):
    export = run / "export"
    assert main(["eval", "--checkpoint", str(export), "--data", "toy_brightness:", "--json", str(tmp_path / "e.json")]) == 0
    shown = capsys.readouterr().out
    assert "MAE" in shown and "top-1" not in shown
    result = json.loads((tmp_path / "e.json").read_text())
    model = compress.load(export)
    ds = BrightnessData(None).dataset("val", model)
    x, y = ds.tensors
    assert result["mae"] == pytest.approx((model(x).squeeze(-1) - y).abs().mean().item(), rel=1e-5)
    assert main(["bench", "--round-seconds", "0", "--checkpoint", str(export), "--batch-sizes", "2", "--repeats", "3"]) == 0
    assert "pruned / dense" in capsys.readouterr().out


def test_eval_refuses_data_of_another_task(run, capsys):
    assert main(["eval", "--checkpoint", str(run / "export"), "--data", "quickstart:"]) == 2
    err = capsys.readouterr().err
    assert "quickstart is a classification dataset but the export is a toy_brightness model" in err


@pytest.mark.parametrize("build", ["timm_reg", "vim"])
def test_weight_decay_skips_what_the_model_names_in_no_weight_decay(build):
    """The optimizer's no-decay group: norms and biases, every name a (sub)module's ``no_weight_decay()`` gives
    (timm's convention: position embedding, class and register tokens) and Mamba's flagged A and D."""
    import timm

    from compress.recipe import StageConfig
    from compress.registry import MODELS

    if build == "timm_reg":
        model = timm.create_model("vit_base_patch16_reg4_gap_256", depth=1, embed_dim=32, num_heads=2)
        expect_skip, expect_decay = {"pos_embed", "reg_token"}, "blocks.0.attn.qkv.weight"
    else:
        model = MODELS.get("vim_custom")(depth=2, embed_dim=32)
        expect_skip, expect_decay = {"pos_embed", "cls_token", "layers.0.mixer.A_log"}, "layers.0.mixer.in_proj.weight"
    module = StageModule(nn.Sequential(), StageConfig(kind="finetune", max_steps=1, schedule={"name": "constant"}))
    module.model = model
    decay, no_decay = module.configure_optimizers().param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] > 0
    assert expect_skip <= skipped and expect_decay in {names[id(p)] for p in decay["params"]}
