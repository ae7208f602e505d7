"""Recipes: every shipped one validates, overrides parse as the README says, mistakes are one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import (
    available_recipes,
    load_recipe,
    parse_overrides,
    recipe_from_dict,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_validates_and_survives_a_round_trip(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
    # recipe.yaml in an output folder is the resolved recipe: loading it back gives the same recipe
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


def test_overrides_take_dotted_keys_several_pairs_and_yaml_scalars() -> None:
    recipe = load_recipe(
        "minilm_sentiment",
        ["training.lr=3e-5", "training.epochs=2", "strategy.lora.r=4", "data.label_names=[neg, pos]",
         "training.max_grad_norm=null", "output.overwrite=true"],
    )
    assert recipe.training.lr == pytest.approx(3e-5)
    assert recipe.training.epochs == 2
    assert recipe.strategy.lora.r == 4
    assert recipe.data.label_names == ["neg", "pos"]
    assert recipe.training.max_grad_norm is None
    assert recipe.output.overwrite is True
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_yaml_words_read_as_booleans_are_given_back_where_the_field_takes_the_word(tmp_path: Path) -> None:
    # YAML 1.1 reads `no` as false: `mixed_precision: no` in a file or on --set must still mean "no"
    assert load_recipe("minilm_sentiment", ["training.mixed_precision=no"]).training.mixed_precision == "no"
    file = tmp_path / "r.yaml"
    file.write_text("name: r\ntask: text\nmodel: {name: m}\ndata: {path: d}\ntraining: {mixed_precision: no}\n")
    assert load_recipe(str(file)).training.mixed_precision == "no"
    with pytest.raises(HfTransferError, match="Recipe key 'training.mixed_precision' got True"):
        load_recipe("minilm_sentiment", ["training.mixed_precision=yes"])  # no choice is the word yes


def test_unknown_key_names_the_closest_valid_key(tmp_path: Path) -> None:
    with pytest.raises(HfTransferError, match=r"^Unknown recipe key 'training.lrr'. Did you mean 'training.lr'\?$"):
        load_recipe("minilm_sentiment", ["training.lrr=1e-4"])
    written = tmp_path / "mine.yaml"
    written.write_text("strategy:\n  nmae: full\n")
    with pytest.raises(HfTransferError, match=r"'strategy.nmae'. Did you mean 'strategy.name'\?"):
        load_recipe(str(written))


def test_missing_recipe_lists_the_available_ones() -> None:
    with pytest.raises(HfTransferError) as raised:
        load_recipe("no_such_recipe")
    message = str(raised.value)
    assert message.startswith("Recipe 'no_such_recipe' not found. Available recipes: ")
    assert all(name in message for name in available_recipes())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.lr=abc"], "Recipe key 'training.lr' got 'abc', which is not float or 'auto'. Fix the value."),
        (["training.lr"], "Override 'training.lr' is not KEY=VALUE"),
        (["data.validation_fraction=1.5"], "data.validation_fraction must lie between 0 and 1"),
        (["strategy.name=everything"], "strategy.name"),
        (["training.metric_for_best=num_samples"], "not one of 'accuracy', 'f1_macro'"),
    ],
)
def test_bad_values_are_one_clear_error(overrides: list[str], message: str) -> None:
    with pytest.raises(HfTransferError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_recipe("minilm_sentiment", overrides)


def test_paths_in_a_recipe_file_are_relative_to_that_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "project" / "data").mkdir(parents=True)
    written = tmp_path / "project" / "recipes" / "local.yaml"
    written.parent.mkdir()
    written.write_text("data:\n  path: ../data\n")
    monkeypatch.chdir(tmp_path)  # somewhere else: the path must not depend on where the command runs
    assert load_recipe(str(written)).data.path == str((tmp_path / "project" / "data").resolve())
    # a Hub dataset id is not a path and stays as written
    written.write_text("data:\n  path: stanfordnlp/sst2\n")
    assert load_recipe(str(written)).data.path == "stanfordnlp/sst2"


def test_recipes_command_lists_every_recipe_file_and_version_prints(capsys) -> None:
    from hf_transfer import __version__
    from hf_transfer.cli import main

    assert main(["recipes"]) == 0
    listed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"hf-transfer {__version__}"


def test_a_recipe_run_on_other_data_takes_its_name_and_description_from_that_data() -> None:
    recipe = load_recipe("effnet_ants_bees", ["data.path=/data/flowers"])
    assert recipe.name == "effnet_ants_bees-flowers" and recipe.output_dir == Path("runs/effnet_ants_bees-flowers")
    assert recipe.description == "Recipe effnet_ants_bees on /data/flowers."
    kept = load_recipe("effnet_ants_bees", ["data.path=/data/flowers", "name=flowers", "description=Flowers."])
    assert (kept.name, kept.description) == ("flowers", "Flowers.")
    assert load_recipe("effnet_ants_bees").name == "effnet_ants_bees"
