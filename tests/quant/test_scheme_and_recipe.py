"""Schemes and recipes: validation errors are one clear line; overrides resolve by pattern."""

import pytest

from compress.errors import CompressError
from compress.quant import QuantScheme
from compress.recipe import Recipe


@pytest.mark.parametrize("bits", [0, 1, 5, 6, 7, 16, "4", True])
def test_unsupported_bits(bits):
    with pytest.raises(CompressError, match=r"bits=.* is not supported; choose one of 2, 3, 4, 8"):
        QuantScheme(bits=bits)


@pytest.mark.parametrize("group_size", [0, -2, -128, 1.5, 2**63, (1 << 24) + 1])
def test_invalid_group_size(group_size):
    with pytest.raises(CompressError, match=r"group size .* is invalid"):
        QuantScheme(group_size=group_size)


def test_power_of_two_group_shrinks_to_fit():
    scheme = QuantScheme(4, 128, True)
    assert scheme.fit("m", 1536) is scheme
    assert scheme.fit("m", 576).group_size == 64
    assert scheme.fit("m", 160).group_size == 32
    assert QuantScheme(4, -1).fit("m", 577).group_size == -1


def test_group_size_that_does_not_divide_is_an_error():
    with pytest.raises(CompressError, match=r"group size 100 does not divide the 576 input "
                       "features of layer.q; use -1 .* such as 32, 64"):
        QuantScheme(4, 100).fit("layer.q", 576)
    with pytest.raises(CompressError, match=r"does not divide"):
        QuantScheme(4, 128).fit("odd", 1000)  # would need groups of 8


def test_recipe_overrides_and_ignore():
    recipe = Recipe.from_dict({
        "method": "rtn",
        "scheme": {"bits": 4, "group_size": 128, "symmetric": True},
        "ignore": ["lm_head", "re:.*\\.layers\\.0\\..*"],
        "overrides": [{"pattern": "*.down_proj", "bits": 8, "group_size": -1}],
    })
    assert recipe.scheme_for("lm_head") is None
    assert recipe.scheme_for("model.layers.0.mlp.up_proj") is None
    assert recipe.scheme_for("model.layers.1.mlp.down_proj") == QuantScheme(8, -1, True)
    assert recipe.scheme_for("model.layers.1.mlp.up_proj") == QuantScheme(4, 128, True)
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_recipe_yaml_roundtrip(tmp_path):
    recipe = Recipe("rtn", QuantScheme(3, 64, False))
    f = tmp_path / "r.yaml"
    f.write_text(recipe.to_yaml())
    assert Recipe.from_yaml(f) == recipe


@pytest.mark.parametrize("data,message", [
    ({"method": "magic"}, "unknown method 'magic'"),
    ({"method": "awq", "awq": {"grid": -1}}, "awq: AWQ grid must be a positive integer"),
    ({"scheme": {"bits": 5}}, "bits=5 is not supported"),
    ({"scheme": {"bitz": 4}}, "unknown keys"),
    ({"colour": "red"}, "unknown keys"),
    ({"ignore": "lm_head"}, "ignore must be a list"),
    ({"overrides": [{"bits": 8}]}, "needs a 'pattern'"),
    ({"ignore": ["re:("]}, "bad regex"),
    ({"version": 99}, "version 99 is not supported"),
    ([1, 2], "must be a mapping"),
])
def test_recipe_errors(data, message):
    with pytest.raises(CompressError, match=message):
        Recipe.from_dict(data)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(CompressError, match=r"does not exist"):
        Recipe.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheme: [unclosed")
    with pytest.raises(CompressError, match=r"not valid YAML"):
        Recipe.from_yaml(bad)


def test_shipped_recipes_parse():
    from pathlib import Path

    from compress.recipe import CALIBRATED_METHODS

    shipped = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    assert shipped
    for path in shipped:
        assert Recipe.from_yaml(path).method in ("rtn", *CALIBRATED_METHODS), path
        first, second = path.read_text().splitlines()[:2]
        assert first.startswith("# ") and not second.startswith("#"), f"{path}: one-line doc"
