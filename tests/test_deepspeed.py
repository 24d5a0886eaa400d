"""Real DeepSpeed ZeRO-2 and ZeRO-3 runs of ``compress fit`` with 2 CPU processes (gloo), through Lightning.

One recipe exercises every kind of pruner that acts while training: ``heads`` (Taylor importance, masked on
the engine's copy, the model shrunk between stages), ``issp`` (soft shrinkage written into DeepSpeed's fp32
master copy), then ``stvit`` (trained semantic tokens whose STGM reads ``qkv`` weights outside their module's
forward: external ZeRO-3 parameters) and a distillation stage with the teacher outside the engine. Each run
must leave one run directory and one export, the ranks must have made the same decisions, and the export
must give the logits of the consolidated weights the run ended with. A SIGTERM mid-stage and ``--resume``
must continue from DeepSpeed's checkpoint folder. The op DeepSpeed compiles on CPU is built once per session
(``deepspeed_ops`` in conftest.py).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import compress
from compress.errors import CompressError

pytestmark = pytest.mark.usefixtures("deepspeed_ops")

RECIPE = {
    "name": "ds",
    "seed": 0,
    "model": {"name": "quickstart_vit", "kwargs": {"depth": 3}},
    "data": {"kind": "quickstart", "batch_size": 16, "num_workers": 0, "params": {"num_train": 128, "num_val": 32}},
    "stages": [
        {"kind": "prune", "max_steps": 3,
         "pruner": {"name": "heads", "target_gmacs_ratio": 0.7, "steps": 2, "prune_every": 1, "importance": "taylor"}},
        {"kind": "prune", "max_steps": 3, "pruner": {"name": "issp", "sparsity": 0.6}},
        {"kind": "prune", "pruner": {"name": "stvit", "stgm_block": 0, "num_semantic": 4}},
        {"kind": "distill", "max_steps": 2, "distill": {"teacher": "dense"}},
    ],
    "trainer": {"accelerator": "cpu", "devices": 2, "log_every_n_steps": 1},
    "evaluate": {"batch_size": 16, "bench": False},
}


def write_recipe(tmp_path: Path, strategy, **changes) -> Path:
    recipe = json.loads(json.dumps(RECIPE))
    recipe["trainer"]["strategy"] = strategy
    for key, value in changes.items():
        recipe[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli(args, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COMPRESS_PROGRESS_SECONDS="3600")
    for key in ("LOCAL_RANK", "NODE_RANK", "COMPRESS_RUN_DIR", "RANK", "WORLD_SIZE"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, "-m", "compress.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def finish(proc: subprocess.Popen, timeout: float = 400):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"compress fit hung: {err[-3000:]}")
    return proc.returncode, out, err


def only_run(out: Path) -> Path:
    runs = [p for p in out.glob("*/*") if p.is_dir()]
    assert len(runs) == 1, f"expected one run directory, found {runs}"
    return runs[0]


def export_matches_final_weights(run: Path) -> None:
    """``compress.load(export)`` gives the logits of the weights the last stage ended with (written once, by
    rank 0, from the consolidated fp32 weights)."""
    from safetensors.torch import load_file

    exported = compress.load(run / "export")
    last = sorted((run / "stages").glob("*-distill"))[-1] / "model.safetensors"
    final = compress.load(run / "export")
    final.load_state_dict(load_file(str(last)), strict=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = exported(x), final(x)
    assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_zero_fit_heads_issp_stvit_two_ranks(tmp_path, strategy):
    code, out, err = finish(cli(["fit", "--recipe", str(write_recipe(tmp_path, strategy)), "--out", "runs"], tmp_path))
    assert code == 0, err[-4000:]
    run = only_run(tmp_path / "runs")
    assert out.count("exported to") == 1  # rank 0 alone evaluates and exports
    metrics = json.loads((run / "metrics.json").read_text())
    # both ranks ended every training stage with the same kept heads / ISS-P masks / plans
    for stage in ("0-prune", "1-prune", "3-distill"):
        ranks = metrics["ranks"][stage]
        assert len(ranks) == 2 and ranks[0] == ranks[1], stage
    heads = metrics["ranks"]["0-prune"][0][0]
    assert heads["events_done"] == 2 and any(len(h) < 3 for h, _ in heads["alive"])
    assert metrics["ranks"]["1-prune"][0][1]["layers"] > 0  # ISS-P's masks were decided (their digest agrees)

    model = compress.load(run / "export")
    assert [b.attn.num_heads for b in model.blocks] != [3, 3, 3]  # physically fewer heads
    zeros = sum(int((b.mlp.fc1.weight == 0).sum()) for b in model.blocks)
    total = sum(b.mlp.fc1.weight.numel() for b in model.blocks)
    assert abs(zeros / total - 0.6) < 0.01  # ISS-P's hard zeros at the target, in the consolidated weights
    assert model.stvit.global_centres is not None  # STViT's trained parameters came back through ZeRO
    export_matches_final_weights(run)


def logged_steps(csv: Path) -> list:
    rows = csv.read_text().splitlines()
    col = rows[0].split(",").index("step")
    return [int(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]


def test_zero3_resume_after_sigterm_mid_stage(tmp_path):
    stages = [{"kind": "prune", "max_steps": 2,
               "pruner": {"name": "heads", "target_gmacs_ratio": 0.7, "steps": 2, "prune_every": 1}},
              {"kind": "finetune", "max_steps": 2000}]
    recipe = write_recipe(tmp_path, "deepspeed_stage_3", stages=stages)
    text = yaml.safe_load(recipe.read_text())
    text["trainer"]["checkpoint_every_n_steps"] = 2
    recipe.write_text(yaml.safe_dump(text))
    proc = cli(["fit", "--recipe", str(recipe), "--out", "runs"], tmp_path)
    end = time.monotonic() + 300
    marker = None
    while time.monotonic() < end and proc.poll() is None:
        found = list((tmp_path / "runs").glob("*/*/stages/1-finetune/checkpoints/last.ckpt/latest"))
        if found:
            marker = found[0]
            break
        time.sleep(0.3)
    assert marker is not None, f"no DeepSpeed checkpoint folder appeared: {proc.communicate()[1][-3000:]}"
    proc.send_signal(signal.SIGTERM)  # to rank 0 alone: both ranks must stop after the same batch
    code, _, err = finish(proc, 120)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    run = only_run(tmp_path / "runs")
    assert f"compress fit --resume {run.relative_to(tmp_path)}" in err
    assert err.count("resume with") == 1, err[-3000:]  # said once, by rank 0, though both ranks stopped
    assert not list(run.rglob(".compress-tmp-*"))  # the checkpoint folder was renamed into place whole
    assert not (run / "stages" / "1-finetune" / "done.json").exists()
    ckpt = run / "stages" / "1-finetune" / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in (ckpt / "checkpoint").iterdir()) == [  # one shard per rank, saved together
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    stopped = max(logged_steps(run / "stages" / "1-finetune" / "logs" / "metrics.csv"))
    assert 2 <= stopped < 1990

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["stages"][1]["max_steps"] = stopped + 4  # finish soon after the resume point
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, out, err = finish(cli(["fit", "--resume", str(run.relative_to(tmp_path))], tmp_path))
    assert code == 0, err[-4000:]
    assert "continuing from" in out and out.count("exported to") == 1
    resumed = logged_steps(run / "stages" / "1-finetune" / "logs" / "resume-1" / "metrics.csv")
    assert min(resumed) >= 2 and max(resumed) >= stopped + 3  # continued from the saved step, not from 0
    model = compress.load(run / "export")
    assert [b.attn.num_heads for b in model.blocks] != [3, 3, 3]  # the heads pruned before the interruption


def test_deepspeed_strategy_resolution_and_validation():
    from compress.recipe import recipe_from_dict
    from compress.strategies import check_deepspeed, deepspeed_strategy_class, resolve_strategy, zero_stage

    cpu = deepspeed_strategy_class(True)
    s3 = resolve_strategy("deepspeed_stage_3", "cpu")
    assert type(s3) is cpu and s3.zero_stage_3
    from lightning.pytorch.strategies import DeepSpeedStrategy

    on_gpu = resolve_strategy("deepspeed_stage_2", "gpu")  # Lightning's, with atomic checkpoint folders
    assert isinstance(on_gpu, DeepSpeedStrategy) and type(on_gpu).__name__ == "AtomicDeepSpeedStrategy"
    assert issubclass(cpu, type(on_gpu))
    own = resolve_strategy({"deepspeed": {"zero_optimization": {"stage": 3}}}, "cpu")
    assert own.config["zero_optimization"]["stage"] == 3 and own.config["zero_allow_untested_optimizer"]
    assert zero_stage({"deepspeed": {"zero_optimization": {"stage": 3}}}) == 3 and zero_stage("deepspeed") == 2
    assert zero_stage("ddp") is None
    with pytest.raises(CompressError, match=r"^trainer.strategy.deepspeed.stagee: neither"):
        resolve_strategy({"deepspeed": {"stagee": 3}}, "cpu")
    with pytest.raises(CompressError, match=r"^trainer.strategy.deepspeed.stage: give DeepSpeed config keys"):
        resolve_strategy({"deepspeed": {"zero_optimization": {"stage": 3}, "stage": 2}}, "cpu")
    from compress.recipe import check_trainer

    recipe = json.loads(json.dumps(RECIPE))
    recipe["trainer"]["strategy"] = "deepspeed_stage_3"
    check_trainer(recipe_from_dict(recipe).trainer)  # Lightning takes the CPU strategy with every other setting
    recipe["trainer"]["precision"] = "bf16-mixed"
    check_deepspeed(recipe_from_dict(recipe))  # DeepSpeed's CPU accelerator trains bf16 (tested below)
    recipe["trainer"]["precision"] = "16-mixed"
    with pytest.raises(CompressError, match=r"^trainer.precision: '16-mixed' under DeepSpeed needs CUDA GPUs"):
        check_deepspeed(recipe_from_dict(recipe))


def test_zero3_problem_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """A pruner that declares it cannot run on partitioned weights is refused at validation, naming the key."""
    from compress.pruners.weight.magnitude import Magnitude
    from compress.run import fit

    monkeypatch.setattr(Magnitude, "zero3_problem", classmethod(
        lambda cls, cfg: "scope: global needs every weight at once" if cfg.scope == "global" else None))
    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"] = [{"kind": "prune", "max_steps": 1, "pruner": {"name": "magnitude", "scope": "global"}}]
    recipe["trainer"]["strategy"] = "deepspeed_stage_3"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(CompressError, match=r"^stages\[0\].pruner.scope: global needs every weight at once \(trainer"):
        fit(path, out=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("accelerator, devices", [
    ("cpu", 2),
    pytest.param("gpu", 1, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
])
def test_bf16_zero2_trains_in_bf16_and_exports_fp32(tmp_path, accelerator, devices):
    """bf16-mixed under ZeRO-2: the engine's module (and so its checkpoint) is bf16, the export comes from the
    fp32 master copy, and the distillation teacher (fp32, outside the engine) takes the bf16 batches."""
    recipe = write_recipe(tmp_path, "deepspeed_stage_2")
    text = yaml.safe_load(recipe.read_text())
    text["stages"] = [s for s in text["stages"] if (s.get("pruner") or {}).get("name") != "stvit"]
    text["trainer"].update(accelerator=accelerator, devices=devices, precision="bf16-mixed",
                           checkpoint_every_n_steps=1)
    recipe.write_text(yaml.safe_dump(text))
    code, out, err = finish(cli(["fit", "--recipe", str(recipe), "--out", "runs"], tmp_path))
    assert code == 0, err[-4000:]
    run = only_run(tmp_path / "runs")
    states = torch.load(next((run / "stages").glob("*-distill/checkpoints/last.ckpt/checkpoint/mp_rank_00_model_states.pt")),
                        map_location="cpu", weights_only=False)["module"]
    assert {v.dtype for k, v in states.items() if v.is_floating_point()} == {torch.bfloat16}  # trained in bf16
    model = compress.load(run / "export")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # exported from DeepSpeed's fp32 master copy
    export_matches_final_weights(run)


TOKEN_FAMILIES = {
    # ToP-ViM on a tiny Vim: the selective scan's A_log/D and the conv weights partitioned by ZeRO-3
    "vim_top_vim": {
        "model": {"name": "vim_custom", "kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 3,
                                                   "d_state": 4, "num_classes": 6}},
        "stages": [{"kind": "prune", "max_steps": 2, "pruner": {"name": "top_vim", "keep_ratio": 0.5,
                                                                 "prune_layers": [1]}},
                   {"kind": "distill", "max_steps": 2, "distill": {"teacher": "dense"}}]},
    # DToP on a tiny segmenter on real CamVid crops: early exits at the auxiliary heads, per-pixel distillation
    "segmenter_dtop": {
        "model": {"name": "segmenter", "kwargs": {"backbone": "deit_tiny_patch16_224", "num_classes": 11,
                                                  "img_size": 32, "aux_blocks": [0], "backbone_kwargs": {"depth": 2}}},
        "data": {"kind": "camvid", "root": "camvid", "batch_size": 2, "num_workers": 0, "limit": 8,
                 "params": {"crop_size": [32, 32]}},
        "stages": [{"kind": "prune", "max_steps": 2, "pruner": {"name": "dtop", "threshold": 0.2, "top_k": 1}},
                   {"kind": "distill", "max_steps": 2, "distill": {"teacher": "dense", "alpha": 0.5}}],
        "evaluate": {"batch_size": 2, "bench": False}},
}


@pytest.mark.parametrize("family", sorted(TOKEN_FAMILIES))
def test_zero3_token_pruners_of_vim_and_segmenter(tmp_path, family):
    """The other model families' token pruners under ZeRO-3 with 2 ranks: one run, one export, the export gives
    the logits (or logit maps) of the consolidated weights the run ended with."""
    changes = json.loads(json.dumps(TOKEN_FAMILIES[family]))
    if "data" in changes:
        from conftest import need_asset

        changes["data"]["root"] = str(need_asset(changes["data"]["root"]))
    recipe = write_recipe(tmp_path, "deepspeed_stage_3", **changes)
    code, out, err = finish(cli(["fit", "--recipe", str(recipe), "--out", "runs"], tmp_path))
    assert code == 0, err[-4000:]
    run = only_run(tmp_path / "runs")
    assert out.count("exported to") == 1
    model = compress.load(run / "export")
    assert [p.name for p in model._compress_pruners] == [changes["stages"][0]["pruner"]["name"]]
    export_matches_final_weights(run)
