"""Faults a long run meets: stop signals, kills mid-write, damaged files, a full disk, a user's folder.

Each case runs the real ``compress fit`` (a subprocess where a signal or a resource limit is the point)
and checks the promise: a non-zero exit with one line that says what to do, a resumable run directory,
no truncated or half-written file, nothing of the user's touched.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import compress
from compress.cli import main
from compress.files import TMP_PREFIX
from compress.run import fit

from conftest import QUICKSTART, only_run

TINY = ["data.params.num_train=256", "data.params.num_val=32", "data.batch_size=16", "model.kwargs.depth=2",
        "evaluate.batch_size=4", "evaluate.bench=false", "trainer.checkpoint_every_n_steps=2",
        "trainer.log_every_n_steps=1"]

# A prune stage, then a long training stage to be interrupted after its first checkpoint.
PRUNERS = {
    "heads": "{name: heads, target_gmacs_ratio: 0.6, steps: 2, prune_every: 1}",  # shrinks before the checkpoint
    "issp": "{name: issp, sparsity: 0.5}",
    "stvit": "{name: stvit, stgm_block: 0, num_semantic: 4}",
}


def recipe_file(tmp_path: Path, pruner: str, train_steps: int = 2000) -> Path:
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["stages"] = [{"kind": "prune", "pruner": yaml.safe_load(pruner)},
                        {"kind": "finetune", "max_steps": train_steps, "optimizer": {"lr": 1e-3}}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli(args, **kw) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COMPRESS_PROGRESS_SECONDS="3600")
    for key in ("LOCAL_RANK", "NODE_RANK", "COMPRESS_RUN_DIR"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, "-m", "compress.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def wait_for(pattern: str, root: Path, proc: subprocess.Popen, timeout: float = 180) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = list(root.glob(pattern))
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {pattern} appeared: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{pattern} did not appear in {timeout} s")


def interrupt_after_first_checkpoint(tmp_path, pruner, sig):
    out = tmp_path / "runs"
    args = ["fit", "--recipe", str(recipe_file(tmp_path, pruner)), "--out", str(out)]
    proc = cli(args + [f"--set={o}" for o in TINY])
    ckpt = wait_for("*/*/stages/1-finetune/checkpoints/last.ckpt", out, proc)
    first = ckpt.stat().st_mtime_ns
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, ckpt, first


@pytest.mark.parametrize("kind", sorted(PRUNERS))
def test_sigterm_mid_stage_then_resume(tmp_path, kind):
    code, err, ckpt, first = interrupt_after_first_checkpoint(tmp_path, PRUNERS[kind], signal.SIGTERM)
    run_dir = ckpt.parents[3]
    lines = [line for line in err.splitlines() if line.startswith("compress fit:")]
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert lines == [f"compress fit: interrupted by SIGTERM; resume with: compress fit --resume {run_dir}"], err[-2000:]
    assert ckpt.stat().st_mtime_ns > first  # saved at the step the signal stopped, not only the periodic one
    interrupted_step = torch.load(ckpt, weights_only=True)["global_step"]
    assert 2 <= interrupted_step < 2000
    log = run_dir / "stages" / "1-finetune" / "logs" / "metrics.csv"
    assert log.is_file()
    before = log.read_text()

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["stages"][1]["max_steps"] = interrupted_step + 3  # finish soon after the resume point
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    metrics = fit(resume=run_dir)

    assert log.read_text() == before  # the interrupted attempt's log is kept; the resumed one logs beside it
    assert (run_dir / "stages" / "1-finetune" / "logs" / "resume-1" / "metrics.csv").is_file()
    assert torch.load(ckpt, weights_only=True)["global_step"] > interrupted_step  # trained on from there
    model = compress.load(run_dir / "export")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 6)
    if kind == "heads":  # the resumed stage started from the shrunk checkpoint and exported the narrow model
        assert metrics["pruned"] and json.loads((run_dir / "export" / "compress.json").read_text())["pruners"][0]["edits"]


def test_ctrl_c_stops_with_one_line(tmp_path):
    code, err, ckpt, _ = interrupt_after_first_checkpoint(tmp_path, PRUNERS["issp"], signal.SIGINT)
    assert code == 128 + signal.SIGINT
    assert err.strip().splitlines()[-1] == f"compress fit: interrupted by SIGINT; resume with: compress fit --resume {ckpt.parents[3]}"


def finished_run(tmp_path):
    fit(recipe_file(tmp_path, PRUNERS["issp"], train_steps=4), TINY, out=tmp_path / "runs")
    return only_run(tmp_path / "runs")


@pytest.fixture
def unfinished(tmp_path):
    """A run whose finetune stage has a mid-stage checkpoint but no done.json (as if killed)."""
    run_dir = finished_run(tmp_path)
    (run_dir / "stages" / "1-finetune" / "done.json").unlink()
    (run_dir / "metrics.json").unlink()
    return run_dir


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(300))
    elif how == "pickle":  # a payload that would run code if unpickled
        path.write_bytes(b"cos\nsystem\n(S'touch " + str(path.parent / "PWNED").encode() + b"'\ntR.")


@pytest.mark.parametrize("target, how, fragment", [
    ("stages/1-finetune/checkpoints/last.ckpt", "truncated", "is damaged"),
    ("stages/1-finetune/checkpoints/last.ckpt", "garbage", "is damaged"),
    ("stages/1-finetune/checkpoints/last.ckpt", "pickle", "holds Python objects"),
    ("stages/0-prune/done.json", "truncated", "is damaged"),
    ("stages/0-prune/model.safetensors", "truncated", "is damaged"),
    ("stages/dense.safetensors", "garbage", "is damaged"),
])
def test_damaged_run_files_are_named_on_resume(unfinished, capsys, target, how, fragment):
    path = unfinished / target
    damage(path, how)
    assert main(["fit", "--resume", str(unfinished)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("compress fit: error: --resume: ") and str(path) in err[0], err
    assert fragment in err[0]
    assert not (path.parent / "PWNED").exists()


def test_resume_sweeps_what_a_killed_writer_left(unfinished):
    stale = unfinished / "stages" / "1-finetune" / f"{TMP_PREFIX}model.safetensors.x1"
    stale.write_bytes(b"half")
    stale_dir = unfinished / f"{TMP_PREFIX}export.x2"
    stale_dir.mkdir()
    fit(resume=unfinished)
    assert not stale.exists() and not stale_dir.exists()
    assert not list(unfinished.rglob(TMP_PREFIX + "*"))


def test_export_dir_with_user_files_is_refused_before_training(tmp_path, capsys):
    mine = tmp_path / "my_results"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    code = main(["fit", "--recipe", str(recipe_file(tmp_path, PRUNERS["issp"])), "--out", str(tmp_path / "runs"),
                 "--set", f"export.dir={mine}",
                 *[a for o in TINY for a in ("--set", o)]])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and "export.dir" in err[0] and str(mine) in err[0], err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"] and (mine / "thesis.tex").read_text() == "precious"
    assert not (tmp_path / "runs").exists()


def test_export_dir_may_replace_an_earlier_export(tmp_path):
    target = tmp_path / "exp"
    for _ in range(2):
        fit(recipe_file(tmp_path, PRUNERS["issp"], train_steps=2), TINY + [f"export.dir={target}"], out=tmp_path / "r")
    assert sorted(p.name for p in target.iterdir()) == ["compress.json", "model.safetensors", "recipe.yaml"]
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))


def test_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "runs"
    out.write_text("not a folder")
    assert main(["fit", "--recipe", str(QUICKSTART), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"compress fit: error: --out: {out} is a file, not a folder"]


def test_no_space_left_while_saving(tmp_path):
    """A file-size limit makes every write past 64 KiB fail as a full disk would (EFBIG): one line, exit 2,
    and no partial file anywhere."""
    out = tmp_path / "runs"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # noqa: E731
    proc = cli(["fit", "--recipe", str(recipe_file(tmp_path, PRUNERS["issp"], train_steps=2)), "--out", str(out),
                *[f"--set={o}" for o in TINY]], preexec_fn=limit)
    _, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == 2, err[-2000:]
    assert lines[-1].startswith("compress fit: error: cannot write or read ") and "File too large" in lines[-1]
    assert not list(tmp_path.rglob(TMP_PREFIX + "*"))
    assert not out.exists() or not list(out.rglob("*.safetensors"))


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        run_dir = finished_run(tmp_path)
    finally:
        os.umask(old)
    assert (run_dir / "export").stat().st_mode & 0o777 == 0o750
    for f in ("model.safetensors", "compress.json"):
        assert (run_dir / "export" / f).stat().st_mode & 0o777 == 0o640
    assert (run_dir / "metrics.json").stat().st_mode & 0o777 == 0o640


def test_bad_teacher_checkpoint_fails_before_the_first_stage(tmp_path, capsys):
    bad = tmp_path / "teacher.pth"
    bad.write_bytes(b"not a checkpoint")
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["stages"] = [{"kind": "finetune", "epochs": 1},
                        {"kind": "distill", "distill": {"teacher": "quickstart_vit", "checkpoint": str(bad)}}]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["fit", "--recipe", str(path), "--out", str(tmp_path / "runs"), *[a for o in TINY for a in ("--set", o)]]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("compress fit: error: stages[1].distill.checkpoint") and str(bad) in err[0], err
    assert not (tmp_path / "runs").exists()
