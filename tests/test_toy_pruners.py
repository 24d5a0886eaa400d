"""The extension claim, proved from a test file alone: a token pruner, a weight pruner with a loss term and a
structured pruner, each registered here (nothing in ``compress/`` knows them), run through ``compress fit``,
export and ``compress.load`` like the bundled ones. If one of them needs a line of shared code, this fails."""
import json
from typing import Any, Dict, List

import compress  # noqa: F401  (first: torchvision guard before timm)

import pytest
import torch
import torch.nn as nn
from pydantic import Field, model_validator

from compress.pruners.base import Pruner, PrunerConfig
from compress.pruners.token.base import TokenPruner
from compress.registry import PRUNERS, register_pruner
from compress.run import fit
from conftest import QUICKSTART, only_run

SMALL = ["data.params.num_train=64", "data.params.num_val=32", "model.kwargs.depth=3", "data.batch_size=16",
         "evaluate.batch_size=8", "trainer.log_every_n_steps=1"]


# ---- a token pruner: the first `keep` patch tokens go on after every block's attention ----------------------


class KeepFirstConfig(PrunerConfig):
    keep: int = Field(8, ge=1, description="patch tokens kept after each block's attention")


class KeepFirst(TokenPruner):
    name = "toy_keep_first"
    Config = KeepFirstConfig

    def after_attn(self, layer, x, info, state):
        P = state.num_prefix
        n = min(x.shape[1], P + self.config.keep)
        state.index = state.index[:, :n]
        return x[:, :n]

    def expected_tokens(self) -> list:
        g = self.geometry
        first = g["num_prefix"] + g["num_patches"]
        kept = g["num_prefix"] + min(g["num_patches"], self.config.keep)
        return [(first, kept)] + [(kept, kept)] * (g["depth"] - 1)


# ---- a weight pruner with a loss term: L1 on the head while training, its smallest weights zeroed at the end ----


VALIDATED = []  # every HeadL1Config validation of this file's runs


class HeadL1Config(PrunerConfig):
    l1: float = Field(1.0, ge=0)
    sparsity: float = Field(0.5, gt=0, lt=1)

    @model_validator(mode="after")
    def _count(self):
        VALIDATED.append(self.l1)
        return self


class HeadL1(Pruner):
    name = "toy_head_l1"
    kind = "weight"
    Config = HeadL1Config

    def attach(self, model: nn.Module) -> None:
        self.model = model
        self.steps = []  # the stage's step after each optimizer step, from the lifecycle hook

    def detach(self, model: nn.Module) -> None:
        self.model = None

    def after_optimizer_step(self, run) -> None:
        self.steps.append(run.step)

    def learned(self):
        return {"steps": self.steps}

    def training_loss(self):
        w = self.model.get_classifier().weight
        norm = w.abs().sum()
        return self.config.l1 * norm, {"head_l1": float(norm.detach())}

    def finalize(self, model: nn.Module) -> Dict[str, Any]:
        w = model.get_classifier().weight
        with torch.no_grad():
            cut = w.abs().flatten().kthvalue(int(self.config.sparsity * w.numel())).values
            w[w.abs() <= cut] = 0
        return {}


# ---- a structured pruner: block 0's MLP keeps its `hidden` strongest channels, physically -------------------------


class NarrowConfig(PrunerConfig):
    hidden: int = Field(16, ge=1)


class NarrowMLP(Pruner):
    name = "toy_narrow_mlp"
    kind = "structured"
    Config = NarrowConfig

    def attach(self, model: nn.Module) -> None:
        pass

    def detach(self, model: nn.Module) -> None:
        pass

    def finalize(self, model: nn.Module) -> Dict[str, Any]:
        mlp = model.blocks[0].mlp
        keep = mlp.fc1.weight.norm(dim=1).topk(self.config.hidden).indices.sort().values
        fc1, fc2 = self._narrow(mlp, len(keep))
        with torch.no_grad():
            fc1.weight.copy_(mlp.fc1.weight[keep])
            fc1.bias.copy_(mlp.fc1.bias[keep])
            fc2.weight.copy_(mlp.fc2.weight[:, keep])
            fc2.bias.copy_(mlp.fc2.bias)
        mlp.fc1, mlp.fc2 = fc1, fc2
        return {"hidden": len(keep)}

    @staticmethod
    def _narrow(mlp, hidden):
        return nn.Linear(mlp.fc1.in_features, hidden), nn.Linear(hidden, mlp.fc2.out_features)

    @classmethod
    def apply_edits(cls, model: nn.Module, edits: Dict[str, Any]) -> None:
        mlp = model.blocks[0].mlp
        mlp.fc1, mlp.fc2 = cls._narrow(mlp, edits["hidden"])


@pytest.fixture(autouse=True, scope="module")
def registered():
    """Registered while this file's tests run, as a plugin would be, and gone after (the registry-driven tests of
    the bundled pruners never see them)."""
    for cls in (KeepFirst, HeadL1, NarrowMLP):
        register_pruner(cls.name)(cls)
    yield
    for cls in (KeepFirst, HeadL1, NarrowMLP):
        PRUNERS.unregister(cls.name)


def _fit(tmp_path, stages: List[str]):
    metrics = fit(QUICKSTART, SMALL + [f"stages=[{', '.join(stages)}]"], out=tmp_path)
    run_dir = only_run(tmp_path)
    return metrics, run_dir, compress.load(run_dir / "export")


def test_a_token_pruner_from_a_test_file(tmp_path):
    metrics, run_dir, loaded = _fit(tmp_path, ["{kind: prune, pruner: {name: toy_keep_first, keep: 5}}"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pruned = loaded(x)
    assert loaded._compress_tokens.state.counts == [65, 6, 6]  # really fewer tokens after block 0
    assert metrics["bench"]["ratios"]["gmacs"] < 0.5
    dense = compress.load(run_dir / "export", with_pruners=False)
    with torch.no_grad():
        assert not torch.allclose(dense(x), pruned)


def test_a_weight_pruner_with_a_loss_term_from_a_test_file(tmp_path):
    VALIDATED.clear()
    metrics, run_dir, loaded = _fit(tmp_path, ["{kind: prune, max_steps: 6, optimizer: {lr: 0.01, weight_decay: 0.0}, "
                                         "pruner: {name: toy_head_l1, l1: 0.05, sparsity: 0.5}}"])
    log = (run_dir / "stages" / "0-prune" / "logs" / "metrics.csv").read_text().splitlines()
    head = log[0].split(",")
    assert "train/toy_head_l1_loss" in head  # the term and its figures are logged under the pruner's name
    col = head.index("train/toy_head_l1_head_l1")
    norms = [float(r.split(",")[col]) for r in log[1:] if r.split(",")[col]]
    assert norms[-1] < norms[0]  # the loss term reached the optimizer
    w = loaded.get_classifier().weight
    assert (w == 0).float().mean() >= 0.5
    (entry,) = json.loads((run_dir / "export" / "compress.json").read_text())["pruners"]
    assert entry["kind"] == "weight" and entry["spec"]["name"] == "toy_head_l1"
    assert metrics["schedules"]["stages[0].pruner"] == {"steps": [1, 2, 3, 4, 5, 6]}  # once per optimizer step
    assert VALIDATED == [0.05]  # the recipe's params were validated once, for the whole run


def test_recipe_pruner_params_are_validated_once_and_errors_name_the_key(tmp_path):
    from compress.errors import CompressError

    with pytest.raises(CompressError, match=r"stages\[0\]\.pruner\.l1"):
        fit(QUICKSTART, SMALL + ["stages=[{kind: prune, pruner: {name: toy_head_l1, l1: -1}}]"], out=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_a_structured_pruner_from_a_test_file(tmp_path):
    metrics, run_dir, loaded = _fit(tmp_path, ["{kind: prune, pruner: {name: toy_narrow_mlp, hidden: 12}}"])
    assert loaded.blocks[0].mlp.fc1.out_features == 12 and loaded.blocks[1].mlp.fc1.out_features > 12
    assert metrics["bench"]["ratios"]["params"] < 1
    (entry,) = json.loads((run_dir / "export" / "compress.json").read_text())["pruners"]
    assert entry["edits"] == {"hidden": 12}
