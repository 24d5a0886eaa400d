"""A tiny end-to-end ``compress fit`` on the quickstart task, then resume, export and eval of that run."""
import json
import shutil

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

import compress
from compress.cli import main
from compress.data.base import limit_dataset
from compress.data.quickstart import render_shapes
from compress.recipe import load_recipe
from compress.run import fit

from conftest import QUICKSTART, only_run

DEPTH = 4
OVERRIDES = [
    "data.params.num_train=128",
    "data.params.num_val=64",
    "data.batch_size=32",
    "stages.0.epochs=1",
    "stages.2.epochs=1",
    f"model.kwargs.depth={DEPTH}",
    # pinned here (not taken from the bundled recipe): 64 patches -> 32 after block 1 -> 20 after block 2
    "stages.1.pruner={name: zero_tprune, schedule: [{block: 1, s_ratio: 0.25, i_ratio: 0.25},"
    " {block: 2, s_ratio: 0.2, i_ratio: 0.2}]}",
    "evaluate.batch_size=4",  # batch size of the dense-vs-pruned timing
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(metrics returned by fit, run directory) of one tiny quickstart run, shared by this module."""
    out = tmp_path_factory.mktemp("runs")
    metrics = fit(QUICKSTART, OVERRIDES, out=out)
    run_dir = only_run(out)
    return metrics, run_dir


def expected_counts(recipe) -> list:
    """Tokens entering each block under the recipe's zero_tprune schedule (64 patches + CLS)."""
    m, counts = (32 // 4) ** 2, []
    layers = {s["block"]: s for s in recipe.stages[1].pruner.model_extra["schedule"]}
    for b in range(DEPTH):
        counts.append(m + 1)
        if b in layers:
            m -= round(layers[b]["s_ratio"] * m) + round(layers[b]["i_ratio"] * m)
    return counts


def val_images(n=8):
    images, labels = render_shapes(n, 32, seed=1)
    return (images - 0.5) / 0.5, labels


def test_run_directory_layout(run):
    metrics, run_dir = run
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recipe["model"]["kwargs"] == {"depth": DEPTH}  # the resolved recipe, overrides applied
    assert recipe["stages"][1]["pruner"]["schedule"][1]["block"] == 2
    stage_dirs = sorted(p.name for p in (run_dir / "stages").iterdir() if p.is_dir())
    assert stage_dirs == ["0-finetune", "1-prune", "2-distill"]
    for name in stage_dirs:
        done = json.loads((run_dir / "stages" / name / "done.json").read_text())
        assert done["stage"] == int(name[0])
        assert (run_dir / "stages" / name / "model.safetensors").is_file()
    assert (run_dir / "stages" / "2-distill" / "logs" / "metrics.csv").is_file()
    export = run_dir / "export"
    for f in ("model.safetensors", "compress.json", "recipe.yaml"):
        assert (export / f).is_file(), f
    assert (export / "recipe.yaml").read_text() == (run_dir / "recipe.yaml").read_text()


def test_metrics(run):
    metrics, run_dir = run
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert set(on_disk) >= {"dense", "pruned", "bench", "export"}
    for name in ("dense", "pruned"):
        assert on_disk[name]["images"] == 64
        assert 0 <= on_disk[name]["top1"] <= on_disk[name]["top5"] <= 100
    bench = on_disk["bench"]
    assert bench["pruned"]["gmacs"] < bench["dense"]["gmacs"]
    assert bench["ratios"]["gmacs"] == pytest.approx(bench["pruned"]["gmacs"] / bench["dense"]["gmacs"])
    assert bench["pruned"]["params"] == bench["dense"]["params"]  # token pruning removes no weights
    assert on_disk["pruned"] == pytest.approx(metrics["pruned"])


def test_manifest(run):
    _, run_dir = run
    manifest = json.loads((run_dir / "export" / "compress.json").read_text())
    assert manifest["format"] == "compress-export/1"
    assert manifest["model"] == {"builder": "compress", "name": "quickstart_vit", "kwargs": {"depth": DEPTH}}
    assert manifest["input_size"] == [3, 32, 32]
    (entry,) = manifest["pruners"]
    assert entry["kind"] == "token" and entry["spec"]["name"] == "zero_tprune"
    assert [layer["block"] for layer in entry["spec"]["schedule"]] == [1, 2]
    assert manifest["metrics"]["bench"]["pruned"]["gmacs"] < manifest["metrics"]["bench"]["dense"]["gmacs"]


def test_load_is_deterministic_and_follows_the_schedule(run):
    _, run_dir = run
    export = run_dir / "export"
    a, b = compress.load(export), compress.load(export)
    assert not a.training
    x, _ = val_images()
    with torch.inference_mode():
        la, lb = a(x), b(x)
    assert la.shape == (8, 6)
    assert torch.equal(la, lb)
    recipe = load_recipe(run_dir / "recipe.yaml")
    counts = a._compress_tokens.state.counts
    assert counts == expected_counts(recipe) == [65, 65, 33, 21]
    assert a._compress_pruners[0].expected_tokens() == counts

    dense_tokens = compress.load(export, with_pruners=False)
    assert getattr(dense_tokens, "_compress_tokens", None) is None
    with torch.inference_mode():
        ld = dense_tokens(x)
    assert not torch.equal(ld, la)  # same weights, all tokens: different logits
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), dense_tokens.state_dict().values()))


def test_export_weights_are_the_last_stage(run):
    from safetensors.torch import load_file

    _, run_dir = run
    final = load_file(str(run_dir / "stages" / "2-distill" / "model.safetensors"))
    exported = load_file(str(run_dir / "export" / "model.safetensors"))
    assert final.keys() == exported.keys()
    assert all(torch.equal(final[k], exported[k]) for k in final)
    dense = load_file(str(run_dir / "stages" / "dense.safetensors"))
    assert not all(torch.equal(dense[k], exported[k]) for k in dense)  # the recovery stage trained


def test_resume_completes_an_interrupted_run(run, tmp_path):
    _, run_dir = run
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    (copy / "stages" / "2-distill" / "done.json").unlink()
    shutil.rmtree(copy / "export")
    (copy / "metrics.json").unlink()
    metrics = fit(resume=copy)
    assert (copy / "stages" / "2-distill" / "done.json").is_file()
    assert (copy / "metrics.json").is_file()
    for f in ("model.safetensors", "compress.json", "recipe.yaml"):
        assert (copy / "export" / f).is_file()
    assert metrics["export"] == str(copy / "export")
    assert json.loads((copy / "metrics.json").read_text())["dense"] == json.loads(
        (run_dir / "metrics.json").read_text())["dense"]  # the dense metrics survive the restart
    # The interrupted stage continued from its last.ckpt, which already finished: same weights.
    x, _ = val_images()
    with torch.inference_mode():
        assert torch.equal(compress.load(copy / "export")(x), compress.load(run_dir / "export")(x))
    assert compress.load(copy / "export")._compress_tokens is not None


def test_resume_rejects_a_non_run(tmp_path):
    with pytest.raises(compress.CompressError, match="not a run directory"):
        fit(resume=tmp_path)


def test_export_command_copies_a_loadable_export(run, tmp_path, capsys):
    _, run_dir = run
    out = tmp_path / "my_export"
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    x, _ = val_images()
    with torch.inference_mode():
        assert torch.equal(compress.load(out)(x), compress.load(run_dir / "export")(x))
    # a second export to the same place is refused
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("compress export: error: --out:")


def test_export_command_rebuilds_from_the_last_stage(run, tmp_path):
    """A run without export/ (e.g. interrupted at the end) is exported from its last completed stage."""
    _, run_dir = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "export")
    out = tmp_path / "rebuilt"
    assert main(["export", "--run", str(copy), "--out", str(out)]) == 0
    rebuilt, original = compress.load(out), compress.load(run_dir / "export")
    x, _ = val_images()
    with torch.inference_mode():
        assert torch.equal(rebuilt(x), original(x))
    assert rebuilt._compress_tokens.state.counts == original._compress_tokens.state.counts


def test_eval_command_on_quickstart(run, tmp_path, capsys):
    _, run_dir = run
    export = run_dir / "export"
    out_json = tmp_path / "eval.json"
    code = main(["eval", "--checkpoint", str(export), "--data", "quickstart:", "--json", str(out_json),
                 "--workers", "0", "--batch-size", "20", "--limit", "200"])
    assert code == 0
    assert "top-1 %" in capsys.readouterr().out
    results = json.loads(out_json.read_text())
    assert results["images"] == 200  # --limit of quickstart's default 1000-image val split
    # the same number from a plain loop over the same (evenly spaced) images
    model = compress.load(export)
    images, labels = render_shapes(1000, 32, seed=1)
    subset = limit_dataset(TensorDataset((images - 0.5) / 0.5, labels), 200)
    x = torch.stack([subset[i][0] for i in range(len(subset))])
    y = torch.stack([subset[i][1] for i in range(len(subset))])
    with torch.inference_mode():
        pred = torch.cat([model(x[i:i + 50]).argmax(-1) for i in range(0, len(x), 50)])
    assert results["top1"] == pytest.approx((pred == y).float().mean().item() * 100, abs=1e-3)
    bench = json.loads((run_dir / "metrics.json").read_text())["bench"]
    assert results["gmacs"] == pytest.approx(bench["pruned"]["gmacs"], rel=1e-6)
    assert results["params"] == bench["pruned"]["params"]


def test_eval_command_errors(run, tmp_path, capsys):
    _, run_dir = run
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--data", "quickstart:"]) == 2
    assert main(["eval", "--checkpoint", str(run_dir / "export"), "--data", "quickstart"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith("compress eval: error: checkpoint:") and "none" in err[0]
    assert err[1].startswith("compress eval: error: --data:")


def test_model_dependent_pruner_error_fails_before_training(tmp_path, capsys):
    """A schedule past the model's depth is only checkable with the model: it must still fail up front."""
    out = tmp_path / "runs"
    code = main(["fit", "--recipe", str(QUICKSTART), "--out", str(out), "--set", "model.kwargs.depth=4",
                 "--set", "stages.1.pruner={name: zero_tprune, schedule: [{block: 3, s_ratio: 0.2, i_ratio: 0.2}]}"])
    captured = capsys.readouterr()
    assert code == 2
    (line,) = captured.err.splitlines()
    assert line.startswith("compress fit: error: stages[1].pruner") and "block 3" in line, line
    assert "training" not in captured.out
    assert not out.exists() or not any(out.iterdir())


def test_schedule_search_runs_in_the_prune_stage_and_its_result_is_exported(tmp_path):
    search = "{trials: 4, images: 16, split: val, seed: 3}"
    metrics = fit(QUICKSTART, ["data.params.num_train=32", "data.params.num_val=32", f"model.kwargs.depth={DEPTH}",
                               "evaluate.batch_size=4",
                               f"stages=[{{kind: prune, pruner: {{name: zero_tprune, merge: true, target_gmacs_ratio: 0.7, search: {search}}}}}]"],
                  out=tmp_path)
    found = metrics["calibration"]["stages[0].pruner"]
    assert found["images"] == 16 and found["split"] == "val" and found["kl"] <= found["default_kl"]
    run_dir = only_run(tmp_path)
    (entry,) = json.loads((run_dir / "export" / "compress.json").read_text())["pruners"]
    spec = entry["spec"]
    assert spec["search"] is None and spec["schedule"]  # reloads without searching again
    loaded = compress.load(run_dir / "export")
    x, _ = val_images(4)
    with torch.no_grad():
        assert loaded(x).shape == (4, 6)


def test_data_limit_shortens_step_based_stages(tmp_path):
    """``data.limit`` is for a quick look: a max_steps stage stops after one pass over the limited data."""
    fit(QUICKSTART, ["data.limit=32", "data.batch_size=16", f"model.kwargs.depth={DEPTH}", "evaluate.bench=false",
                     "trainer.checkpoint_every_n_steps=1", "stages=[{kind: finetune, max_steps: 1000}]"], out=tmp_path)
    ckpt = only_run(tmp_path) / "stages" / "0-finetune" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2
