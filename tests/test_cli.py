"""The real ``compress`` console entry on bad input: exit code 2, one stderr line, nothing written."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.cli import main

from conftest import QUICKSTART, REPO


def check_error(capsys, command, args, *needles):
    """Run ``compress <command>`` in-process; assert code 2 and one stderr line holding every needle."""
    code = main([command, *args])
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith(f"compress {command}: error: "), line
    for needle in needles:
        assert needle in line, line
    return line


def check_fit_error(capsys, tmp_path, args, *needles):
    """``check_error`` for ``compress fit``, and no run dir."""
    out = tmp_path / "runs"
    line = check_error(capsys, "fit", ["--out", str(out), *args], *needles)
    assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))
    return line


def test_unknown_recipe_key(capsys, tmp_path):
    check_fit_error(capsys, tmp_path, ["--recipe", str(QUICKSTART), "--set", "stages.0.optimzer.lr=0.1"],
                    "stages[0].optimzer: unknown key", "quickstart.yaml")


def test_unknown_key_in_recipe_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("seed: 0", "seed: 0\nsede: 1"))
    check_fit_error(capsys, tmp_path, ["--recipe", str(bad)], "sede: unknown key", str(bad))


def test_wrong_type(capsys, tmp_path):
    check_fit_error(capsys, tmp_path, ["--recipe", str(QUICKSTART), "--set", "data.batch_size=big"],
                    "data.batch_size:", "integer")


def test_missing_data_root(capsys, tmp_path):
    check_fit_error(capsys, tmp_path, ["--recipe", str(QUICKSTART), "--set", "data.kind=imagenet",
                                       "--set", "data.params={}", "--set", "data.root=/nonexistent",
                                       "--set", "model.kwargs.num_classes=1000"],
                    "data.root", "/nonexistent")


def test_data_root_without_split_folder(capsys, tmp_path):
    root = tmp_path / "imagenet"
    root.mkdir()
    check_fit_error(capsys, tmp_path, ["--recipe", str(QUICKSTART), "--set", "data.kind=imagenet",
                                       "--set", "data.params={}", "--set", f"data.root={root}",
                                       "--set", "model.kwargs.num_classes=1000"],
                    "data.root", "train/")


def test_schedule_search_without_its_calibration_split(capsys, tmp_path):
    root = tmp_path / "imagenet"
    (root / "val").mkdir(parents=True)
    check_fit_error(capsys, tmp_path, ["--recipe", str(QUICKSTART), "--set", "data.kind=imagenet",
                                       "--set", "data.params={}", "--set", f"data.root={root}",
                                       "--set", "model.kwargs.num_classes=1000",
                                       "--set", "stages=[{kind: prune, pruner: {name: zero_tprune, search: {split: train}}}]"],
                    "stages[0].pruner: calibration images", "train/")


def test_missing_checkpoint_file(capsys, tmp_path):
    missing = tmp_path / "nope.pth"
    check_fit_error(capsys, tmp_path, ["--recipe", str(QUICKSTART), "--set", f"model.checkpoint={missing}"],
                    "model.checkpoint", str(missing))


def test_checkpoint_of_another_architecture(capsys, tmp_path, tiny_vit):
    ckpt = tmp_path / "other.pth"
    torch.save(tiny_vit.state_dict(), ckpt)  # 192-wide, 8 px patches, 10 classes vs quickstart_vit
    line = check_fit_error(capsys, tmp_path, ["--recipe", str(QUICKSTART), "--set", f"model.checkpoint={ckpt}"],
                           "model.checkpoint", str(ckpt), "does not fit")
    assert "shape mismatch" in line or "missing keys" in line


def test_unreadable_checkpoint(capsys, tmp_path):
    ckpt = tmp_path / "junk.pth"
    ckpt.write_bytes(b"this is not a checkpoint")
    check_fit_error(capsys, tmp_path, ["--recipe", str(QUICKSTART), "--set", f"model.checkpoint={ckpt}"],
                    "model.checkpoint", str(ckpt))


def test_unknown_pruner_name(capsys, tmp_path):
    check_fit_error(capsys, tmp_path, ["--recipe", str(QUICKSTART), "--set", "stages.1.pruner.name=magic"],
                    "stages[1].pruner.name", "unknown pruner 'magic'", "zero_tprune")


def test_missing_recipe_file(capsys, tmp_path):
    check_fit_error(capsys, tmp_path, ["--recipe", str(tmp_path / "nope.yaml")], "recipe file not found")


def test_recipe_and_resume_are_exclusive(capsys, tmp_path):
    check_fit_error(capsys, tmp_path, [], "--recipe")
    check_fit_error(capsys, tmp_path, ["--resume", str(tmp_path / "nothing")], "not a run directory")


def test_console_script_subprocess(tmp_path):
    """Once through a real process: the installed entry point (or ``python -m compress.cli``)."""
    exe = Path(sys.executable).parent / "compress"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "compress.cli"]
    out = tmp_path / "runs"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("COMPRESS_DEBUG", None)
    proc = subprocess.run(cmd + ["fit", "--recipe", str(QUICKSTART), "--out", str(out), "--set",
                                 "stages.1.pruner.foo=1"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("compress fit: error: ") and "stages[1].pruner.foo: unknown key" in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_debug_flag_shows_the_exception(tmp_path):
    from compress.errors import CompressError

    with pytest.raises(CompressError):
        main(["--debug", "fit", "--recipe", str(tmp_path / "nope.yaml")])


def test_pruners_lists_zero_tprune_with_parameters(capsys):
    assert main(["pruners"]) == 0
    out = capsys.readouterr().out
    assert "zero_tprune" in out and "[token]" in out
    for param in ("schedule", "target_gmacs_ratio", "similarity_share", "wpr_iters", "cls_init", "head_band"):
        assert f"    {param} = " in out, param
    assert "cls_init = 'sqrt_n'" in out  # defaults are shown


def test_recipes_lists_quickstart(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert str(REPO / "recipes") in out
    line = next(l for l in out.splitlines() if l.startswith("quickstart.yaml"))
    assert "Quick start" in line  # the recipe's first comment line


@pytest.mark.parametrize("pruner, params_shrink", [("{name: heads, target_gmacs_ratio: 0.6}", True),
                                                   ("{name: zero_tprune}", False)])
def test_bench_on_a_recipe_applies_every_pruner_decision(tmp_path, pruner, params_shrink):
    """``compress bench --recipe``: pruners are attached and finalized, so a structured pruner whose decision
    normally comes during training shows its final structure here too."""
    import json

    out = tmp_path / "bench.json"
    assert main(["bench", "--round-seconds", "0", "--recipe", str(QUICKSTART), "--set", f"stages.1.pruner={pruner}", "--batch-sizes", "4",
                 "--repeats", "1", "--device", "cpu", "--json", str(out)]) == 0
    ratios = json.loads(out.read_text())["ratios"]
    assert ratios["gmacs"] < 0.7
    assert (ratios["params"] < 0.7) == params_shrink
