"""Bad recipe input through the real CLI entry: one stderr line ``compress <cmd>: error: ...`` naming the
key path or the file (and line), exit code 2, nothing written. One table of cases, so that a whole
family stays fixed; then the inputs that must keep working (bare recipe names, BOMs, Lightning values)."""
import codecs
import importlib.util
import json
import time
from pathlib import Path
from typing import Callable, List

import pytest
import torch

from compress.cli import main
from compress.errors import CompressError
from compress.recipe import (
    bundled_recipes_dir,
    check_trainer,
    dump_recipe,
    load_recipe,
    read_yaml,
    recipe_from_dict,
    resolve_recipe,
)

from conftest import QUICKSTART
from test_cli import check_error, check_fit_error

Make = Callable[[Path], List[str]]


def recipe(content) -> Make:
    """The case's input is this recipe file (``str``: written as UTF-8; ``bytes``: as they are)."""
    def make(tmp: Path) -> List[str]:
        path = tmp / "r.yaml"
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return ["--recipe", str(path)]
    return make


def run_dir(content: str, flag: str, *more: str) -> Make:
    """A run directory whose ``recipe.yaml`` holds ``content``, given as ``flag`` (--resume / --run)."""
    def make(tmp: Path) -> List[str]:
        (tmp / "run").mkdir()
        (tmp / "run" / "recipe.yaml").write_text(content)
        return [flag, str(tmp / "run"), *(m.replace("{tmp}", str(tmp)) for m in more)]
    return make


def argv(*args: str) -> Make:
    return lambda tmp: [a.replace("{tmp}", str(tmp)) for a in args]


def quick(*sets: str) -> Make:
    """The bundled quick-start, by bare name, with ``--set`` overrides."""
    return argv("--recipe", "quickstart", *(x for s in sets for x in ("--set", s)))


LOL = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
DEEP_BLOCK = "".join("  " * i + f"k{i}:\n" for i in range(100))
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None

CASES = [
    # --- recipe text: encodings
    pytest.param("fit", recipe(b"name: t\nseed: 0  # caf\xe9\n"), ["r.yaml:2:", "not UTF-8", "0xe9", "offset 22"],
                 id="latin-1-byte"),
    pytest.param("fit", recipe("name: t\nseed: 0\n".encode("utf-16-le")), ["r.yaml:1:", "NUL byte", "UTF-8"],
                 id="utf-16-without-bom"),
    pytest.param("fit", recipe(codecs.BOM_UTF16_LE + "name: t\n".encode("utf-16-le") + b"x"),
                 ["r.yaml:2:", "broken UTF-16", "0x78"], id="utf-16-truncated"),
    # --- recipe text: YAML
    pytest.param("fit", recipe("name: t\nseed: 1\x07\n"), ["r.yaml:2:", "control character U+0007"],
                 id="control-character"),
    pytest.param("fit", recipe("name: t\nseed: 0\x00\n"), ["r.yaml:2:", "NUL byte"], id="nul-byte"),
    pytest.param("fit", recipe("name: t\nmodel: [unclosed\n"), ["r.yaml:3:", "invalid YAML", "line 2"],
                 id="unclosed-flow"),
    pytest.param("fit", recipe("name: t\nmodel:\n\tname: x\n"), ["r.yaml:3:", "invalid YAML"], id="tab-indent"),
    pytest.param("fit", recipe("name: t\n---\nname: u\n"), ["r.yaml:2:", "single document"], id="two-documents"),
    pytest.param("fit", recipe("seed: " + "[" * 20000 + "]" * 20000 + "\n"), ["r.yaml:1:", "nested deeper than"],
                 id="deep-flow"),
    pytest.param("fit", recipe(DEEP_BLOCK), ["r.yaml:64:", "nested deeper than"], id="deep-block"),
    pytest.param("fit", recipe(LOL), ["r.yaml:2:", "alias *a"], id="alias-bomb"),
    pytest.param("fit", recipe("base: &b {lr: 1}\nopt:\n  <<: *b\n"), ["r.yaml:3:", "alias *b"], id="merge-alias"),
    pytest.param("fit", recipe("name: t\nseed: 0\nmodel: {name: x}\nseed: 1\n"),
                 ["r.yaml:4:", "duplicate key 'seed'", "first at line 2"], id="duplicate-key"),
    pytest.param("fit", recipe("name: t\nstages:\n  - kind: prune\n    epochs: 1\n    epochs: 2\n"),
                 ["r.yaml:5:", "duplicate key 'epochs'", "line 4"], id="duplicate-nested-key"),
    pytest.param("fit", recipe("model: {name: a, name: b}\n"), ["r.yaml:1:", "duplicate key 'name'"],
                 id="duplicate-flow-key"),
    pytest.param("fit", recipe(""), ["r.yaml", "must be a YAML mapping"], id="empty-file"),
    # --- recipe files and names
    pytest.param("fit", argv("--recipe", "{tmp}"), ["recipe file not found", "is a folder"], id="recipe-is-a-folder"),
    pytest.param("fit", argv("--recipe", "quickstrat"), ["recipe file not found", "did you mean 'quickstart'"],
                 id="misspelt-bundled-name"),
    pytest.param("fit", argv("--recipe", "{tmp}/nope.yaml"), ["recipe file not found", "nope.yaml"],
                 id="missing-path"),
    pytest.param("fit", argv("--recipe", "{tmp}/recipes/quickstart.yaml"),
                 ["recipe file not found", "a bundled recipe has this name: --recipe quickstart"],
                 id="repository-path-outside-the-repository"),
    pytest.param("bench", argv("--recipe", "nothing_like_this", "--batch-sizes", "1"),
                 ["recipe file not found", "quickstart"], id="bench-unknown-name-lists-bundled"),
    # --- --set values go through the same loader
    pytest.param("fit", quick("seed=*x"), ["--set 'seed=*x'", "alias *x"], id="set-alias"),
    pytest.param("fit", quick("data.params={a: 1, a: 2}"), ["--set", "duplicate key 'a'"], id="set-duplicate-key"),
    pytest.param("fit", quick("name=\x1b"), ["--set", "control character U+001B"], id="set-control-character"),
    # --- the same loader for a run's recipe.yaml (--resume, export --run)
    pytest.param("fit", run_dir("name: t\nseed: 0\nseed: 1\n", "--resume"),
                 ["recipe.yaml:3:", "duplicate key 'seed'"], id="resume-duplicate-key"),
    pytest.param("export", run_dir("name: t\nseed: [\n", "--run", "--out", "{tmp}/exported"),
                 ["recipe.yaml:3:", "invalid YAML"], id="export-run-broken-yaml"),
    # --- trainer settings: in the schema, with the key path
    pytest.param("fit", quick("trainer.accelerator=gpux"), ["trainer.accelerator:", "'gpux'", "'gpu'"],
                 id="accelerator-typo"),
    pytest.param("fit", quick("trainer.precision=fp16"), ["trainer.precision:", "'fp16'"], id="precision-name"),
    pytest.param("fit", quick("trainer.precision=15"), ["trainer.precision:", "15"], id="precision-number"),
    pytest.param("fit", quick("trainer.precision=16.0"), ["trainer.precision:", "16.0"], id="precision-float"),
    pytest.param("fit", quick("stages.2.distill.block_weight=0.2"),
                 ["stages[2].distill.block_weight:", "classification task has no block outputs"], id="block-distill-task"),
    pytest.param("fit", quick("trainer.devices=0"), ["trainer.devices:", "0 is not a device count"], id="devices-0"),
    pytest.param("fit", quick("trainer.devices=-2"), ["trainer.devices:", "-2"], id="devices-negative"),
    pytest.param("fit", quick("trainer.devices=[]"), ["trainer.devices:", "[]"], id="devices-empty-list"),
    pytest.param("fit", quick("trainer.devices=[0, 0]"), ["trainer.devices:"], id="devices-repeated"),
    pytest.param("fit", quick("trainer.devices=true"), ["trainer.devices:", "True"], id="devices-bool"),
    pytest.param("fit", quick("trainer.devices=two"), ["trainer.devices:", "'two'"], id="devices-word"),
    pytest.param("fit", quick("trainer.strategy=dpp"), ["trainer.strategy:", "did you mean 'ddp'"], id="strategy-typo"),
    pytest.param("fit", quick("trainer.strategy={fsdp: {}}"), ["trainer.strategy:", "deepspeed"],
                 id="strategy-mapping"),
    # --- trainer settings this machine cannot run: before anything is written
    pytest.param("fit", quick("trainer.accelerator=cuda"), ["trainer.accelerator:", "'cuda'"], id="no-cuda",
                 marks=NO_CUDA),
    pytest.param("fit", quick("trainer.accelerator=gpu", "trainer.devices=2"), ["trainer.accelerator:", "'gpu'"],
                 id="no-gpu", marks=NO_CUDA),
    pytest.param("fit", quick("trainer.accelerator=mps"), ["trainer.accelerator:", "'mps'"], id="no-mps"),
    pytest.param("fit", quick("trainer.devices=[0]"), ["trainer.devices:", "[0]"], id="device-list-on-cpu"),
    pytest.param("fit", quick("trainer.strategy=fsdp", "trainer.devices=2"), ["trainer.strategy:", "'fsdp'"],
                 id="fsdp-on-cpu"),
    pytest.param("fit", quick("trainer.precision=transformer-engine"), ["trainer.precision:", "transformer"],
                 id="precision-missing-library"),
    pytest.param("fit", quick("trainer.strategy=deepspeed_stage_2"), ["trainer.strategy:", "DeepSpeed"],
                 id="deepspeed-not-installed", marks=pytest.mark.skipif(HAS_DEEPSPEED, reason="DeepSpeed installed")),
    # --- pretrained weights without network (conftest sets HF_HUB_OFFLINE=1; the hub cache is empty here)
    pytest.param("fit", quick("model.name=vit_tiny_patch16_224", "model.pretrained=true",
                              "model.kwargs={img_size: 32, patch_size: 8, depth: 1, num_classes: 6}"),
                 ["model.pretrained:", "vit_tiny_patch16_224", "set model.checkpoint to a local"],
                 id="pretrained-offline"),
    # --- --json: checked before the work
    pytest.param("bench", argv("--recipe", "quickstart", "--json", "{tmp}/nope/b.json"),
                 ["--json: folder not found", "nope"], id="bench-json-missing-folder"),
    pytest.param("bench", argv("--recipe", "quickstart", "--json", "{tmp}"), ["--json:", "is a folder"],
                 id="bench-json-is-a-folder"),
    pytest.param("eval", argv("--checkpoint", "{tmp}", "--data", "quickstart:", "--json", "{tmp}/nope/e.json"),
                 ["--json: folder not found"], id="eval-json-missing-folder"),
]


@pytest.fixture(autouse=True)
def empty_hub_cache(monkeypatch, tmp_path_factory):
    """Offline and with an empty Hugging Face cache, whatever this machine downloaded before."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf")))


def tree(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("command, make, needles", CASES)
def test_bad_input(command, make, needles, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written by mistake would land here and be seen
    args = make(tmp_path)
    before = tree(tmp_path)
    if command == "fit":
        check_fit_error(capsys, tmp_path, args, *needles)
    else:
        check_error(capsys, command, args, *needles)
    assert tree(tmp_path) == before


def test_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "lol.yaml"
    path.write_text(LOL)
    t0 = time.perf_counter()
    with pytest.raises(CompressError, match="alias"):
        read_yaml(path)
    assert time.perf_counter() - t0 < 0.5


# ---- what must keep working --------------------------------------------------------------------


def test_bare_recipe_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bundled_recipes_dir() == QUICKSTART.parent.resolve()
    for name in ("quickstart", "quickstart.yaml"):
        assert resolve_recipe(name) == bundled_recipes_dir() / "quickstart.yaml"
        assert load_recipe(name).name == "quickstart"
    # a path to an existing file wins over the bundled name
    (tmp_path / "quickstart.yaml").write_text(QUICKSTART.read_text().replace("name: quickstart", "name: mine"))
    assert load_recipe("quickstart.yaml").name == "mine"
    assert load_recipe("quickstart").name == "quickstart"  # no such file here: the bundled one


def test_bench_by_bare_name_writes_json_atomically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench.json"
    out.write_text("old")
    assert main(["bench", "--round-seconds", "0", "--recipe", "quickstart", "--batch-sizes", "2", "--repeats", "1", "--device", "cpu",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["source"] == "quickstart"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # no temporary file left


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_recipe_with_a_byte_order_mark_loads(tmp_path, encoding):
    path = tmp_path / "bom.yaml"
    path.write_bytes(QUICKSTART.read_text().encode(encoding))  # Python writes the BOM for these three
    assert load_recipe(path) == load_recipe(QUICKSTART)


@pytest.mark.parametrize("trainer", [
    {"precision": "bf16-mixed", "devices": 1},
    {"precision": 16, "devices": -1},
    {"precision": "64", "devices": "0,1"},
    {"precision": "16-mixed", "devices": [0, 1], "accelerator": "gpu", "strategy": "ddp"},
    {"accelerator": "cuda", "devices": "2", "strategy": "DDP_spawn"},
    {"strategy": "deepspeed_stage_2", "devices": "auto", "precision": "32"},
    {"strategy": {"deepspeed": {"stage": 3}}},
])
def test_lightning_values_validate(trainer):
    d = load_recipe(QUICKSTART).model_dump(mode="json")
    d["trainer"].update(trainer)
    assert recipe_from_dict(d).trainer.model_dump(include=set(trainer)) == trainer  # kept as written


@pytest.mark.parametrize("trainer", [{"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed"},
                                     {"accelerator": "cpu", "devices": 2, "strategy": "ddp"},
                                     {"accelerator": "auto", "devices": "auto"}])
def test_check_trainer_accepts_what_this_machine_runs(trainer):
    d = load_recipe(QUICKSTART).model_dump(mode="json")
    d["trainer"].update(trainer)
    check_trainer(recipe_from_dict(d).trainer)


def test_resumed_recipes_read_back(tmp_path):
    """``--resume`` reads the run's ``recipe.yaml`` (``dump_recipe``) with the same strict loader: no
    aliases, no repeated keys there, for every bundled recipe."""
    for path in sorted(bundled_recipes_dir().glob("*.yaml")):
        r = load_recipe(path)
        (tmp_path / "recipe.yaml").write_text(dump_recipe(r))
        assert recipe_from_dict(read_yaml(tmp_path / "recipe.yaml")) == r, path.name
