"""``compress schema``: the recipe JSON schema an editor uses holds every registered pruner's and dataset's
own keys, accepts every bundled recipe and refuses what ``load_recipe`` refuses (a typo in a pruner key, a
pruner that does not exist, a value of the wrong type)."""
import json

import compress  # noqa: F401  (first: torchvision guard before timm)

import pytest

from compress import cli, schema
from compress.recipe import bundled_recipes_dir, read_yaml
from compress.registry import DATASETS, PRUNERS

jsonschema = pytest.importorskip("jsonschema", reason="the test extra brings jsonschema")


@pytest.fixture(scope="module")
def validator():
    s = schema.recipe_schema()
    jsonschema.Draft202012Validator.check_schema(s)
    return jsonschema.Draft202012Validator(s)


@pytest.mark.parametrize("path", sorted(bundled_recipes_dir().glob("*.yaml")), ids=lambda p: p.stem)
def test_every_bundled_recipe_is_valid(validator, path):
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(read_yaml(path))]
    assert not errors, errors


@pytest.mark.parametrize("name", PRUNERS.names())
def test_every_registered_pruner_has_its_keys(name):
    s = schema.recipe_schema()
    (entry,) = [p for p in s["$defs"]["PrunerRef"]["oneOf"] if p["properties"]["name"]["const"] == name]
    assert set(entry["properties"]) == {"name", *PRUNERS.get(name).Config.model_fields}
    assert entry["additionalProperties"] is False


def _recipe(pruner):
    return {"name": "r", "model": {"name": "quickstart_vit"}, "data": {"kind": "quickstart"},
            "stages": [{"kind": "prune", "pruner": pruner}]}


@pytest.mark.parametrize("pruner, where", [
    ({"name": "tome", "target_gmacs_ration": 0.6}, "target_gmacs_ration"),  # a typo
    ({"name": "no_such_pruner"}, "no_such_pruner"),
    ({"name": "tome", "target_gmacs_ratio": "half"}, "half"),
])
def test_what_load_recipe_refuses_the_schema_refuses(validator, pruner, where):
    errors = list(validator.iter_errors(_recipe(pruner)))
    assert errors
    assert any(where in json.dumps(e.instance) or where in e.message
               or any(where in json.dumps(c.instance) or where in c.message for c in e.context) for e in errors)


def test_dataset_params_follow_the_kind(validator):
    assert not list(validator.iter_errors({**_recipe({"name": "tome"}), "data": {"kind": "quickstart", "params": {"num_train": 8}}}))
    bad = {**_recipe({"name": "tome"}), "data": {"kind": "quickstart", "params": {"num_trian": 8}}}
    assert list(validator.iter_errors(bad))
    assert set(schema.recipe_schema()["$defs"]["DataConfig"]["properties"]["kind"]["enum"]) == set(DATASETS.names())


def test_cli_writes_the_schema(tmp_path, capsys):
    out = tmp_path / "recipe.schema.json"
    assert cli.main(["schema", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == schema.recipe_schema()
    capsys.readouterr()
    assert cli.main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == schema.recipe_schema()
