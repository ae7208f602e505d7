"""A built wheel carries what a non-editable install needs: the recipes, the data set the offline
recipe trains on, and the model card template; installed from it, `train --recipe` runs from any folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # no build isolation: the test environment's setuptools builds it, with no index to reach
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True, capture_output=True, text=True,
    )
    (found,) = out.glob("hf_transfer_learning-*.whl")
    return found


def test_wheel_carries_recipes_data_and_card_template(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {f"hf_transfer/recipes/{p.name}" for p in (REPO / "recipes").glob("*.yaml")}
    assert recipes and recipes <= names, sorted(recipes - names)
    data = {f"hf_transfer/recipes/sentiment_mini/{p.name}" for p in (REPO / "recipes" / "sentiment_mini").iterdir()}
    assert data <= names, sorted(data - names)
    assert "hf_transfer/model_cards/model_card.md" in names
    assert not any(name.startswith(("recipes/", "model_cards/", "tests/")) for name in names)


def test_installed_wheel_trains_a_packaged_recipe_from_any_folder(wheel: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True, capture_output=True, text=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the packaged recipe and its packaged data; a tiny model stands in for MiniLM to keep it fast
    script = (
        "import sys, hf_transfer; from hf_transfer.cli import main; "
        f"assert hf_transfer.__file__.startswith({str(site)!r}), hf_transfer.__file__; "
        f"sys.exit(main(['train', '--recipe', 'minilm_sentiment', '--output-dir', 'out', "
        f"'--set', 'model.name={tiny_bert_dir}', 'training.epochs=1']))"
    )
    environment = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    out = elsewhere / "out"
    assert "sentiment_mini" in (out / "recipe.yaml").read_text()
    assert json.loads((out / "metrics.json").read_text())["train_samples"] == 400
    assert (out / "README.md").read_text().startswith("---")  # the model card, rendered from the packaged template
