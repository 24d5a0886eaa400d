"""The trade-off PNG: drawn from the metrics a real (tiny) fit writes, written by ``report.finish`` beside
metrics.json, and skipped (None, no file) when a run has nothing to plot."""
import contextlib
import copy
import io
import json

import pytest
from PIL import Image

from compress.plots import tradeoff_png
from compress.run import fit

from conftest import QUICKSTART, only_run

TINY_FIT = [
    "data.params.num_train=64",
    "data.params.num_val=32",
    "data.batch_size=32",
    "model.kwargs.depth=3",
    "stages.0.epochs=1",
    "stages.2.epochs=1",
    "stages.1.pruner={name: zero_tprune, merge: true, schedule: [{block: 0, s_ratio: 0.4, i_ratio: 0.0}]}",
    "export.enabled=false",
    "evaluate.batch_size=4",  # batch size of the dense-vs-pruned timing
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(metrics.json of a tiny quick-start fit, its run directory, what it printed)."""
    out = tmp_path_factory.mktemp("runs")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        fit(QUICKSTART, TINY_FIT, out=out)
    run_dir = only_run(out)
    return json.loads((run_dir / "metrics.json").read_text()), run_dir, printed.getvalue()


def check_png(path, min_width=400):
    with Image.open(path) as image:
        image.verify()  # a complete, uncorrupted PNG
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width >= min_width and 200 <= height <= 2000, image.size


def test_fit_writes_the_plot_beside_metrics(tiny_run):
    metrics, run_dir, printed = tiny_run
    plot = run_dir / "tradeoff.png"
    check_png(plot, min_width=800)  # two panels
    assert f"trade-off plot: {plot}" in printed
    assert not list(run_dir.glob(".compress-tmp-*"))  # written atomically, no temporary left


def test_plot_from_metrics_json(tiny_run, tmp_path):
    metrics, _, _ = tiny_run
    out = tradeoff_png(metrics, tmp_path / "t.png", title="tiny", metric="top1", metric_label="top-1 %")
    assert out == tmp_path / "t.png"
    check_png(out, min_width=800)
    assert tradeoff_png(metrics, tmp_path / "default.png") == tmp_path / "default.png"  # metric: the first float


def test_other_task_metric_names(tiny_run, tmp_path):
    """Nothing is classification-specific: a segmentation run's mIoU plots the same way."""
    metrics, _, _ = tiny_run
    seg = copy.deepcopy(metrics)
    for side in ("dense", "pruned"):
        seg[side] = {"mIoU": seg[side]["top1"] / 2, "aAcc": seg[side]["top5"], "images": seg[side]["images"]}
    check_png(tradeoff_png(seg, tmp_path / "seg.png", metric="mIoU", metric_label="mIoU %"))


def test_gmacs_without_speed_draws_one_panel(tiny_run, tmp_path):
    metrics, _, _ = tiny_run
    no_speed = copy.deepcopy(metrics)
    for side in ("dense", "pruned"):
        no_speed["bench"][side]["speed"] = {}
    out = tradeoff_png(no_speed, tmp_path / "one.png", metric="top1")
    with Image.open(out) as image:
        assert image.size[0] < 700


def test_nothing_to_plot_returns_none(tiny_run, tmp_path):
    metrics, _, _ = tiny_run
    no_bench = {k: v for k, v in metrics.items() if k != "bench"}
    no_quality = {k: v for k, v in metrics.items() if k not in ("dense", "pruned")}
    for case in (no_bench, no_quality, {}, metrics):
        metric = "fid" if case is metrics else None  # a metric the run does not have
        assert tradeoff_png(case, tmp_path / "none.png", metric=metric) is None
    assert not list(tmp_path.iterdir())
