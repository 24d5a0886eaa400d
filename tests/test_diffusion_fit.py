"""End to end through the CLI: dense training, APTP pruning into experts, distillation, export, eval, bench."""
import json
import time

import pytest

import compress
from compress.cli import main

from conftest import only_run
from diffusion_zoo import caption_folder, need_fid

OVERRIDES = [
    "data.root={root}", "data.params={{source: folder, cfg_dropout: 0.1, eval: {{images: 4, steps: 2, batch_size: 4, fid_weights: null}}}}",
    "model.kwargs={{block_out_channels: [16, 32], down_block_types: [CrossAttnDownBlock2D, CrossAttnDownBlock2D], "
    "up_block_types: [CrossAttnUpBlock2D, CrossAttnUpBlock2D], sample_size: 16, layers_per_block: 2, "
    "prediction_type: v_prediction, min_snr_gamma: 5.0, ema_decay: 0.9}}",
    "data.batch_size=4", "stages.0.max_steps=3", "stages.1.max_steps=3", "stages.1.pruner.pretrain_steps=1",
    "stages.2.max_steps=2", "evaluate.batch_size=2", "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    need_fid()
    root = caption_folder(tmp_path_factory.mktemp("captions"))
    out = tmp_path_factory.mktemp("runs")
    sets = [a for o in OVERRIDES for a in ("--set", o.format(root=root))]
    assert main(["fit", "--recipe", "recipes/cifar10_unet_aptp.yaml", "--out", str(out), *sets]) == 0
    return only_run(out), root


def test_fit_exports_router_and_experts(run):
    run_dir, _ = run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dense"] == {"images": 4} and metrics["pruned"] == {"images": 4}  # FID off here; on in eval below
    details = metrics["details"]  # APTP's own figures (Pruner.figures)
    assert len(details["experts"]) == 4 and sum(r["prompts"] for r in details["experts"]) > 0
    manifest = json.loads((run_dir / "export" / "compress.json").read_text())
    assert manifest["task"] == "diffusion" and manifest["pruners"][0]["spec"]["name"] == "aptp"
    model = compress.load(run_dir / "export")
    assert model.generate(["a red square"], steps=2).shape == (1, 3, 16, 16)
    logged = (run_dir / "stages" / "2-distill" / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "train/kd" in logged and "train/block" in logged  # the experts' fine-tune: output and block distillation


def test_eval_and_bench_on_the_export(run, capsys, tmp_path):
    run_dir, root = run
    export = run_dir / "export"
    assert main(["eval", "--checkpoint", str(export), "--data", f"prompts:{root}", "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["task"] == "diffusion" and result["images"] == 6 and result["fid"] > 0
    assert main(["bench", "--round-seconds", "0", "--checkpoint", str(export), "--batch-sizes", "2", "--repeats", "2"]) == 0
    shown = capsys.readouterr().out
    assert "| expert | GMACs |" in shown and "prompt-weighted average GMACs" in shown


def test_export_from_the_stage_records_matches_the_run_export(run, tmp_path):
    """``compress export --run`` without an export rebuilds the model from the last stage's record: the
    APTP pruner re-attaches, re-slices from its recorded edits, and the weights fit strictly."""
    import shutil

    import torch

    run_dir, _ = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export", "checkpoints"))
    assert main(["export", "--run", str(copy), "--out", str(tmp_path / "again")]) == 0
    a, b = compress.load(run_dir / "export"), compress.load(tmp_path / "again")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("stage", ["1-prune", "2-distill"])
def test_sigterm_mid_aptp_stage_then_resume(tmp_path, stage):
    """A SIGTERM during the router/codes training (the step counter decides pretraining vs codes) or during the
    experts' fine-tune (the model is already K sliced UNets), then ``--resume``: the stage continues from the
    saved step with the pruner's state, and the run exports the router and the experts."""
    import signal

    import torch
    import yaml

    from test_faults import cli, wait_for

    root = caption_folder(tmp_path / "captions")
    index = int(stage[0])
    sets = [o.format(root=root) for o in OVERRIDES] + [f"stages.{index}.max_steps=2000",
                                                      "trainer.checkpoint_every_n_steps=2"]
    out = tmp_path / "runs"
    proc = cli(["fit", "--recipe", "recipes/cifar10_unet_aptp.yaml", "--out", str(out),
                *(a for s in sets for a in ("--set", s))])
    ckpt = wait_for(f"*/*/stages/{stage}/checkpoints/last.ckpt", out, proc, timeout=300)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    saved = torch.load(ckpt, weights_only=True)
    step, state = saved["global_step"], saved["compress_pruners"][0]
    assert 2 <= step < 2000 and state["sliced"] == (stage == "2-distill")
    if stage == "1-prune":
        assert state["step"] == step  # APTP's own counter (pretraining, then codes) rides in the checkpoint

    run_dir = ckpt.parents[3]
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["stages"][index]["max_steps"] = step + 2
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["fit", "--resume", str(run_dir)]) == 0
    resumed = torch.load(ckpt, weights_only=True)
    assert resumed["global_step"] > step  # trained on from the saved step
    if stage == "1-prune":  # APTP's counter went on from the saved step, not from 0
        assert resumed["compress_pruners"][0]["step"] == resumed["global_step"]
    model = compress.load(run_dir / "export")
    assert type(model.unet).__name__ == "RoutedUNets" and len(model.unet.experts) == 4
