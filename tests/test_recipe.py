"""The recipe schema: strict keys at every level, one-line errors naming the key path, --set overrides."""
import copy
from pathlib import Path

import pytest
import yaml

from compress.errors import CompressError
from compress.recipe import (
    Recipe,
    apply_override,
    dump_recipe,
    load_recipe,
    parse_override,
    recipe_from_dict,
)

from conftest import QUICKSTART, RECIPES

BASE = {
    "name": "t",
    "model": {"name": "quickstart_vit"},
    "data": {"kind": "quickstart", "num_workers": 0, "params": {"num_train": 64}},
    "stages": [
        {"kind": "finetune", "epochs": 1, "optimizer": {"lr": 1e-3}},
        {"kind": "prune", "pruner": {"name": "zero_tprune", "schedule": [{"block": 1, "s_ratio": 0.2, "i_ratio": 0.2}]}},
    ],
    "trainer": {"accelerator": "cpu", "devices": 1},
}


def recipe(**changes) -> dict:
    d = copy.deepcopy(BASE)
    d.update(changes)
    return d


def error_of(data) -> str:
    with pytest.raises(CompressError) as info:
        recipe_from_dict(data, "r.yaml")
    msg = str(info.value)
    assert "\n" not in msg, "errors must be one line"
    assert msg.startswith("r.yaml: "), msg
    return msg[len("r.yaml: "):]


def test_base_recipe_is_valid():
    r = recipe_from_dict(recipe())
    assert isinstance(r, Recipe)
    assert r.stages[0].kind == "finetune" and r.stages[0].epochs == 1
    assert r.stages[1].epochs == 0  # prune stages default to zero epochs
    assert r.stages[1].pruner.name == "zero_tprune"


# ---- unknown keys, at every level -----------------------------------------------------------


def test_unknown_top_level_key():
    msg = error_of(recipe(bogus=1))
    assert msg.startswith("bogus: unknown key"), msg
    assert "stages" in msg  # lists the allowed keys


def test_unknown_key_suggests_close_match():
    d = recipe()
    d["stages"][0]["optimzer"] = {"lr": 0.1}
    msg = error_of(d)
    assert msg.startswith("stages[0].optimzer: unknown key"), msg
    assert "'optimizer'" in msg


def test_unknown_nested_key_in_model_and_optimizer():
    d = recipe()
    d["model"]["pretrianed"] = True
    assert error_of(d).startswith("model.pretrianed: unknown key (did you mean 'pretrained'?)")
    d = recipe()
    d["stages"][0]["optimizer"]["lrate"] = 0.1
    assert error_of(d).startswith("stages[0].optimizer.lrate: unknown key")


def test_unknown_key_inside_pruner_params():
    d = recipe()
    d["stages"][1]["pruner"]["foo"] = 3
    msg = error_of(d)
    assert msg.startswith("stages[1].pruner.foo: unknown key"), msg
    assert "schedule" in msg and "target_gmacs_ratio" in msg  # the pruner's own allowed keys


def test_unknown_key_deep_inside_pruner_schedule():
    d = recipe()
    d["stages"][1]["pruner"]["schedule"][0]["blok"] = 2
    msg = error_of(d)
    assert msg.startswith("stages[1].pruner.schedule[0].blok: unknown key"), msg
    assert "'block'" in msg


def test_unknown_key_inside_dataset_params():
    d = recipe()
    d["data"]["params"]["num_tran"] = 5
    msg = error_of(d)
    assert msg.startswith("data.params.num_tran: unknown key"), msg
    assert "num_train" in msg


# ---- wrong types and values -----------------------------------------------------------------


@pytest.mark.parametrize(
    "path, value, where",
    [
        (("data", "batch_size"), "lots", "data.batch_size:"),
        (("data", "batch_size"), 0, "data.batch_size:"),
        (("seed",), "zero", "seed:"),
        (("stages",), {"kind": "prune"}, "stages:"),
        (("trainer", "log_every_n_steps"), [1], "trainer.log_every_n_steps:"),
    ],
)
def test_wrong_type_names_the_key(path, value, where):
    d = recipe()
    node = d
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    assert error_of(d).startswith(where)


def test_wrong_type_in_list_item_and_pruner_param():
    d = recipe()
    d["stages"][0]["optimizer"]["lr"] = "fast"
    assert error_of(d).startswith("stages[0].optimizer.lr:")
    d = recipe()
    d["stages"][1]["pruner"]["schedule"][0]["s_ratio"] = "half"
    assert error_of(d).startswith("stages[1].pruner.schedule[0].s_ratio:")
    d = recipe()
    d["stages"][1]["pruner"]["schedule"][0]["s_ratio"] = 0.6
    d["stages"][1]["pruner"]["schedule"][0]["i_ratio"] = 0.6
    msg = error_of(d)
    assert msg.startswith("stages[1].pruner.schedule[0]") and "s_ratio + i_ratio" in msg, msg


def test_literal_choices_and_stage_rules():
    d = recipe()
    d["stages"][0]["kind"] = "train"
    assert error_of(d).startswith("stages[0].kind:")
    d = recipe()
    d["stages"][1]["pruner"] = None
    assert "a prune stage needs a pruner" in error_of(d)
    d = recipe()
    d["stages"][0]["pruner"] = {"name": "zero_tprune"}
    assert "only prune stages take a pruner" in error_of(d)


def test_missing_required_keys():
    d = recipe()
    del d["model"]
    assert error_of(d) == "model: required key is missing"
    d = recipe()
    del d["model"]["name"]
    assert error_of(d) == "model.name: required key is missing"


def test_bad_name_and_empty_stages():
    assert error_of(recipe(name="a/b")).startswith("name:")
    assert error_of(recipe(stages=[])).startswith("stages:")


def test_not_a_mapping():
    with pytest.raises(CompressError, match="must be a YAML mapping"):
        recipe_from_dict([1, 2], "r.yaml")


# ---- registry-validated names --------------------------------------------------------------


def test_unknown_pruner_name():
    d = recipe()
    d["stages"][1]["pruner"] = {"name": "zero_tprun"}
    msg = error_of(d)
    assert msg.startswith("stages[1].pruner.name: unknown pruner 'zero_tprun'"), msg
    assert "zero_tprune" in msg.split("known:")[1]


def test_unknown_data_kind():
    d = recipe()
    d["data"]["kind"] = "imagenet22k"
    d["data"]["params"] = {}
    msg = error_of(d)
    assert msg.startswith("data.kind: unknown dataset 'imagenet22k'"), msg
    known = msg.split("known:")[1]
    assert "imagenet" in known and "quickstart" in known


# ---- files and --set overrides ---------------------------------------------------------------


def write(tmp_path: Path, data) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def test_override_dotted_path_list_index_and_yaml_scalars(tmp_path):
    path = write(tmp_path, recipe())
    r = load_recipe(path, [
        "stages.0.optimizer.lr=2.5e-3",
        "stages.0.epochs=3",
        "data.root=/data/imagenet",
        "trainer.deterministic=true",
        "model.kwargs.depth=4",
        "stages.1.pruner.target_gmacs_ratio=0.65",
        "stages.1.pruner.schedule=null",
        "data.params.num_val=16",
    ])
    assert r.stages[0].optimizer.lr == pytest.approx(2.5e-3)
    assert r.stages[0].epochs == 3 and isinstance(r.stages[0].epochs, int)
    assert r.data.root == Path("/data/imagenet")
    assert r.trainer.deterministic is True
    assert r.model.kwargs == {"depth": 4}
    assert r.stages[1].pruner.model_extra["target_gmacs_ratio"] == 0.65
    assert r.stages[1].pruner.model_extra["schedule"] is None
    assert r.data.params == {"num_train": 64, "num_val": 16}


def test_override_replaces_list_item_with_yaml_flow_mapping(tmp_path):
    path = write(tmp_path, recipe())
    r = load_recipe(path, ["stages.1.pruner.schedule.0={block: 0, s_ratio: 0.1, i_ratio: 0.3}"])
    assert r.stages[1].pruner.model_extra["schedule"] == [{"block": 0, "s_ratio": 0.1, "i_ratio": 0.3}]


def test_override_is_validated_like_the_file(tmp_path):
    path = write(tmp_path, recipe())
    with pytest.raises(CompressError, match=r"stages\[0\]\.optimzer: unknown key"):
        load_recipe(path, ["stages.0.optimzer.lr=0.1"])
    with pytest.raises(CompressError, match=r"stages\[1\]\.pruner\.foo: unknown key"):
        load_recipe(path, ["stages.1.pruner.foo=1"])
    with pytest.raises(CompressError, match=r"data\.batch_size: "):
        load_recipe(path, ["data.batch_size=many"])


@pytest.mark.parametrize(
    "text, match",
    [
        ("stages.5.epochs=1", r"stages\.5: no list item 5 \(the list has 2\)"),
        ("stages.x.epochs=1", r"stages\.x: no list item x"),
        ("stages.\u00b2.epochs=1", r"stages\.\u00b2: no list item \u00b2"),  # a superscript two is a digit to str.isdigit
        ("name.first=1", r"name is a value, not a mapping"),
        ("seed", r"expected dotted\.key=value"),
        ("stages..epochs=1", r"empty key segment"),
        ("seed=[1, 2", r"not valid YAML"),
    ],
)
def test_bad_override(tmp_path, text, match):
    path = write(tmp_path, recipe())
    with pytest.raises(CompressError, match=match) as info:
        load_recipe(path, [text])
    assert "\n" not in str(info.value)


def test_parse_override_scalars():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a=1.5") == (["a"], 1.5)
    assert parse_override("a=off") == (["a"], False)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=") == (["a"], None)
    assert parse_override("a=x=y") == (["a"], "x=y")
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    data = {"a": [{"b": 1}]}
    apply_override(data, ["a", "0", "c", "d"], 5, "a.0.c.d=5")
    assert data == {"a": [{"b": 1, "c": {"d": 5}}]}


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(CompressError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(CompressError, match=r"bad\.yaml:3: invalid YAML"):
        load_recipe(bad)


# ---- bundled recipes and dump ---------------------------------------------------------------


BUNDLED = sorted(RECIPES.glob("*.yaml"))


def test_bundled_recipes_exist():
    assert QUICKSTART in BUNDLED


@pytest.mark.parametrize("path", BUNDLED, ids=[p.name for p in BUNDLED])
def test_bundled_recipe_validates(path):
    r = load_recipe(path)
    assert r.name and r.stages
    assert path.read_text().startswith("#"), "the first line describes the recipe (shown by `compress recipes`)"


@pytest.mark.parametrize("path", BUNDLED, ids=[p.name for p in BUNDLED])
def test_dump_recipe_round_trips(path, tmp_path):
    r = load_recipe(path)
    text = dump_recipe(r)
    again = recipe_from_dict(yaml.safe_load(text))
    assert again == r
    assert dump_recipe(again) == text
    # the dump is complete: every default is spelled out
    assert "trainer" in yaml.safe_load(text) and "optimizer" in yaml.safe_load(text)["stages"][0]
