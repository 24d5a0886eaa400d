"""A real 2-process ``compress fit`` with Lightning's ``ddp`` strategy on CPU (gloo): Lightning re-runs the
command for rank 1, which must join rank 0's run directory, train with it, and leave every file to rank 0;
the pruned export must be the one both ranks agreed on."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import compress

RECIPE = {
    "name": "ddp_fit",
    "seed": 0,
    "model": {"name": "quickstart_vit"},
    "data": {"kind": "quickstart", "batch_size": 32, "num_workers": 0, "params": {"num_train": 256, "num_val": 64}},
    "stages": [
        {"kind": "finetune", "max_steps": 4},
        {"kind": "prune", "max_steps": 8, "pruner": None},
        {"kind": "distill", "max_steps": 4, "distill": {"teacher": "dense"}},
    ],
    "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "log_every_n_steps": 2},
    "evaluate": {"batch_size": 16},
}
PRUNERS = {
    "heads": {"name": "heads", "target_gmacs_ratio": 0.6, "steps": 2, "prune_every": 3, "importance": "taylor"},
    "issp": {"name": "issp", "sparsity": 0.7},
}


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_two_rank_ddp_fit_writes_one_run_and_a_pruned_export(tmp_path, pruner):
    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"][1]["pruner"] = PRUNERS[pruner]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    exe = Path(sys.executable).parent / "compress"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "compress.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for key in ("LOCAL_RANK", "NODE_RANK", "COMPRESS_RUN_DIR"):
        env.pop(key, None)
    proc = subprocess.run(cmd + ["fit", "--recipe", str(path), "--out", str(tmp_path / "runs")], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in (tmp_path / "runs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, f"each rank made its own run directory: {runs}"
    assert proc.stdout.count("exported to") == 1  # rank 0 only
    model = compress.load(runs[0] / "export")
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["pruned"]["images"] == 64  # the whole val split, evaluated once, not all-gathered twice
    if pruner == "heads":
        assert model.blocks[0].attn.num_heads < 3
        assert metrics["bench"]["ratios"]["gmacs"] < 0.65
    else:
        zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, torch.nn.Linear))
        total = sum(m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))
        assert zeros / total > 0.6


def test_the_writing_process_follows_lightnings_rank(monkeypatch):
    """SLURM's or torchrun's rank (read by Lightning) counts as well as the LOCAL_RANK/NODE_RANK of Lightning's launcher."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from compress.context import is_global_zero

    for key in ("LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert is_global_zero()
    monkeypatch.setattr(rank_zero_only, "rank", 3)
    assert not is_global_zero()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    monkeypatch.setenv("NODE_RANK", "1")
    assert not is_global_zero()
