"""tools/gpu_check.py runs unattended on a GPU machine later, so its CPU-reachable paths must work now: the smoke mode
on CPU records every check with a status, runs the ones that need no CUDA ("ok"), skips the others saying why, and
without a GPU the default (CUDA) mode refuses in one line with exit status 2."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

TOOL = Path(__file__).resolve().parent.parent / "tools" / "gpu_check.py"
# what a CPU can run in smoke mode; DeepSpeed is skipped there (its CPU op takes minutes to build)
CPU_CHECKS = {"train_bf16", "vim_scan", "vim_speed", "tokens_zero_tprune", "tokens_zero_tprune_merge", "tokens_tome",
              "tokens_gtp"}
NEEDS_CUDA = {"train_fp16", "sparse24_fp16", "sparse24_bf16", "sparse24_deit"}
DIFFUSION = importlib.util.find_spec("diffusers") is not None and importlib.util.find_spec("all_minilm_l6_v2") is not None


def load_tool():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_on_cpu_records_every_check(tmp_path, capsys):
    tool = load_tool()
    out = tmp_path / "gc"
    code = tool.main(["--device", "cpu", "--smoke", "--out", str(out), "--threads", "1"])
    report = json.loads(out.with_suffix(".json").read_text())
    by_name = {r["name"]: r for r in report["checks"]}
    assert list(by_name) == [c["name"] for c in tool.CHECKS]  # every check, once, in order
    assert all(r["status"] in ("ok", "failed", "skipped") and r["summary"] for r in report["checks"])
    failed = {n: r["summary"] for n, r in by_name.items() if r["status"] == "failed"}
    assert not failed and code == 0, failed
    expected_ok = CPU_CHECKS | ({"aptp"} if DIFFUSION else set())
    assert {n for n, r in by_name.items() if r["status"] == "ok"} == expected_ok
    for name in NEEDS_CUDA:
        assert by_name[name]["status"] == "skipped" and by_name[name]["summary"] == "needs CUDA"
    assert by_name["deepspeed_zero2"]["status"] == "skipped" and by_name["deepspeed_zero3"]["status"] == "skipped"

    train = by_name["train_bf16"]["result"]
    assert train["precision"] == "bf16-mixed" and len(train["stages"]) == 3 and train["median_ms_per_step"] > 0
    scan = by_name["vim_scan"]["result"]
    assert max(scan["scan_rel_err"].values()) < 1e-4 and len(scan["held_scan_rel_err"]) == 9  # out + 8 gradients
    for name in ("vim_speed", "tokens_zero_tprune", "tokens_tome", "tokens_gtp"):
        row = by_name[name]["result"]
        assert 0 < row["gmacs_ratio"] < 1 and set(row["speedup"]) == {"1", "2"}, name
    assert abs(by_name["tokens_tome"]["result"]["gmacs_ratio"] - 0.65) < 0.05
    if DIFFUSION:
        experts = by_name["aptp"]["result"]["experts"]
        assert len(experts) == 4 and experts[-1]["gmacs_ratio"] < experts[0]["gmacs_ratio"]

    md = out.with_suffix(".md").read_text()
    assert all(f"| {c['name']}:" in md for c in tool.CHECKS)
    assert "| check | status | s | result |" in capsys.readouterr().out  # the table is printed at the end
    assert torch.get_num_threads() == 1  # CPU mode pins the thread count


def test_a_failing_check_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    tool = load_tool()

    def broken(ctx):
        raise ValueError("boom\nsecond line")

    spec = next(c for c in tool.CHECKS if c["name"] == "tokens_tome")
    monkeypatch.setitem(spec, "fn", broken)
    out = tmp_path / "gc"
    code = tool.main(["--device", "cpu", "--smoke", "--out", str(out), "--only", "tokens_tome,tokens_gtp,train_fp16"])
    checks = {r["name"]: r for r in json.loads(out.with_suffix(".json").read_text())["checks"]}
    assert code == 1
    assert checks["tokens_tome"]["status"] == "failed" and checks["tokens_tome"]["summary"] == "ValueError: boom second line"
    assert "Traceback" in checks["tokens_tome"]["traceback"]
    assert checks["tokens_gtp"]["status"] == "ok" and checks["train_fp16"]["status"] == "skipped"


def test_time_limit_stops_a_check_that_runs_too_long(tmp_path, monkeypatch):
    tool = load_tool()

    def slow(ctx):
        while True:
            pass

    spec = next(c for c in tool.CHECKS if c["name"] == "vim_scan")
    monkeypatch.setitem(spec, "fn", slow)
    monkeypatch.setitem(spec, "limit_s", 0.3)  # x3 on CPU
    out = tmp_path / "gc"
    assert tool.main(["--device", "cpu", "--smoke", "--out", str(out), "--only", "vim_scan"]) == 1
    record = json.loads(out.with_suffix(".json").read_text())["checks"][0]
    assert record["status"] == "failed" and record["summary"].startswith("CheckTimeout: ran past its 1 s limit")


def test_without_cuda_the_default_mode_exits_2_with_one_line(tmp_path):
    if torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has a CUDA GPU")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(TOOL), "--out", str(tmp_path / "gc")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpu_check: needs a CUDA GPU"), lines
    assert not (tmp_path / "gc.json").exists()
