"""Recipe files: found by name or path, read as YAML, with dotted `--set` overrides merged in.

Recipes by name come from ./recipes, then the recipes shipped in the package (hf_transfer/recipes,
which in the source tree is a link to the project's top-level recipes/ folder).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe.checks import recipe_from_dict
from hf_transfer.recipe.schema import Recipe

PACKAGE_RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error, not the last wins."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key '{key}' appears twice in one section", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str, what: str) -> Any:
    """Safe YAML (no Python tags), every key once; a syntax error names `what`."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise HfTransferError(f"{what} is not valid YAML: {' '.join(str(error).split())}") from None


def available_recipes() -> list[str]:
    dirs = [Path("recipes"), PACKAGE_RECIPES_DIR]
    return sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})


def find_recipe(name_or_path: str) -> Path:
    """A recipe is a path to a YAML file, or a name looked up in ./recipes and the project's recipes/."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if candidate.is_file():
            return candidate
        raise HfTransferError(f"Recipe file '{name_or_path}' does not exist.")
    for folder in (Path("recipes"), PACKAGE_RECIPES_DIR):
        path = folder / f"{name_or_path}.yaml"
        if path.is_file():
            return path
    raise HfTransferError(
        f"Recipe '{name_or_path}' not found. Available recipes: {', '.join(available_recipes()) or 'none'}; "
        "or pass a path to a .yaml file."
    )


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["training.lr=3e-5", "data.path=x"]` -> nested dict; values are read as YAML scalars."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise HfTransferError(f"Override '{pair}' is not KEY=VALUE (e.g. --set training.lr=3e-5).")
        value = read_yaml(raw, f"The value of override '{pair}'") if raw else None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise HfTransferError(f"Override '{pair}' sets a key inside '{part}', which is not a section.")
        node[parts[-1]] = value
    return nested


def merge_values(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve_relative_path(path: str | None, recipe_dir: Path) -> str | None:
    """Paths written in a recipe file are relative to that file; a Hub id stays as it is."""
    if path is None or Path(path).is_absolute():
        return path
    candidate = (recipe_dir / path).resolve()
    return str(candidate) if candidate.exists() else path


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    path = find_recipe(name_or_path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise HfTransferError(f"Cannot read recipe {path}: {error}") from None
    values = read_yaml(text, f"Recipe {path}") or {}
    if not isinstance(values, dict):
        raise HfTransferError(f"Recipe {path} must be a YAML mapping of sections (model:, data:, ...).")
    output = values.get("output")
    if isinstance(output, dict) and output.get("overwrite"):
        # a recipe someone sent must not be able to replace files on its own: only the user, on the command line
        raise HfTransferError(
            f"Recipe {path} sets output.overwrite; remove it and pass --overwrite on the command line instead."
        )
    values.setdefault("name", path.stem)
    data = values.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str):
        data["path"] = _resolve_relative_path(data["path"], path.parent)
    model = values.get("model")
    if isinstance(model, dict) and isinstance(model.get("weights_file"), str):
        model["weights_file"] = _resolve_relative_path(model["weights_file"], path.parent)
    if isinstance(model, dict) and isinstance(model.get("name"), str) and model["name"].startswith("."):
        # only ./ and ../ names: 'bert-base-uncased' must stay a Hub id even if such a folder exists here
        model["name"] = _resolve_relative_path(model["name"], path.parent)
    adaptation = values.get("adaptation")
    if isinstance(adaptation, dict) and isinstance(adaptation.get("target_path"), str):
        adaptation["target_path"] = _resolve_relative_path(adaptation["target_path"], path.parent)
    head = values.get("head")
    if isinstance(head, dict) and isinstance(head.get("text_run"), str):
        head["text_run"] = _resolve_relative_path(head["text_run"], path.parent)
    changes = parse_overrides(overrides or [])
    return recipe_from_dict(merge_values(values, {**renamed_for_other_data(path.stem, values, changes), **changes}))


def renamed_for_other_data(stem: str, values: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A recipe run on other data (data.path set on the command line) must not keep the name and
    description of the data it was written for: the output folder, model card and model-index would
    say "ants vs bees" for flowers. Derived here unless the command line names them itself."""
    data_path = changes.get("data", {}).get("path") if isinstance(changes.get("data"), dict) else None
    if not isinstance(data_path, str) or data_path == (values.get("data") or {}).get("path"):
        return {}
    data_name = re.sub(r"[^\w.-]+", "_", Path(data_path.rstrip("/")).name or "data").strip("._") or "data"
    derived: dict[str, Any] = {}
    if "name" not in changes:
        derived["name"] = f"{stem}-{data_name}"
    if "description" not in changes:
        derived["description"] = f"Recipe {stem} on {data_path}."
    return derived
