"""Domain adaptation runs: recipe section, both domains' frozen features, the head in the shared loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import SHARED_DATA, keyword_sentences, write_jsonl

from hf_transfer.adaptation.model import load_adapted_model
from hf_transfer.adaptation.plan import (
    DomainFeatures,
    SourceWithTarget,
    build_adaptation_plan,
)
from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import load_recipe, recipe_from_dict
from hf_transfer.run import run_training
from hf_transfer.sources.pooling import PooledFeatures, mean_token_states
from hf_transfer.training.callbacks import recipe_callbacks
from hf_transfer.training.loop import train

TARGET_WORDS = ["gadget", "battery", "cable", "screen", "charger", "works", "broke", "after", "week", "my"]



def target_sentences(count: int, seed: int) -> list[dict]:
    """The same keyword rule in other words (the tiny vocabulary reads them as [UNK]): a shifted domain."""
    return keyword_sentences(count, seed, vocabulary=TARGET_WORDS, length=(6, 12))


def domain_recipe(model_dir: Path, source: Path, target: Path, output: Path, **adaptation) -> dict:
    return {
        "name": "tiny_domain",
        "task": "text",
        "model": {"name": str(model_dir)},
        "data": {"path": str(source), "max_length": 32},
        "strategy": {"name": "freeze_backbone"},
        "adaptation": {"method": "dann", "target_path": str(target), "bottleneck_dim": 16, **adaptation},
        "training": {"epochs": 3, "batch_size": 16, "lr": 1e-2, "seed": 0, "save_checkpoints": False,
                     "feature_cache_dir": str(output.parent / "feature_store")},
        "output": {"dir": str(output), "overwrite": True},
    }


@pytest.fixture
def domains(tmp_path: Path) -> tuple[Path, Path]:
    source = write_jsonl(tmp_path / "source.jsonl", keyword_sentences(96, seed=1))
    target = write_jsonl(tmp_path / "target.jsonl", target_sentences(64, seed=2))
    return source, target


# ---------------------------------------------------------------------------------------------
# The whole run


def test_adaptation_run_reports_target_keeps_last_epoch_and_reuses_features(tiny_bert_dir, domains, tmp_path, monkeypatch):
    source, target = domains
    calls = []
    original = PooledFeatures.features
    monkeypatch.setattr(PooledFeatures, "features", lambda self, **inputs: calls.append(1) or original(self, **inputs))

    out = tmp_path / "dann"
    summary = run_training(recipe_from_dict(domain_recipe(tiny_bert_dir, source, target, out, features="mean")))
    first_run_batches = len(calls)

    assert summary["adaptation"]["method"] == "dann"
    assert summary["best_epoch"] == 3  # the last epoch, whatever the target says
    assert summary["eval"]["accuracy"] == summary["history"][-1]["accuracy"]
    assert sum(map(sum, summary["eval"]["confusion_matrix"]["matrix"])) == 64  # the whole target
    assert 0.0 <= summary["adaptation"]["source_validation_accuracy"] <= 1.0
    info = json.loads((out / "adaptation.json").read_text())
    assert info["label_names"] == ["negative", "positive"] and info["adaptation"]["features"] == "mean"
    assert (out / "adaptation_head.safetensors").is_file()
    assert first_run_batches > 0

    # another seed splits the source differently, another method trains differently: same examples, no backbone pass
    out = tmp_path / "tca"
    recipe = domain_recipe(tiny_bert_dir, source, target, out, method="tca", features="mean", tca_components=8)
    recipe["training"]["seed"] = 1
    summary = run_training(recipe_from_dict(recipe))
    assert len(calls) == first_run_batches

    # the saved folder reloads as one model from token ids to logits, with the same target accuracy
    from transformers import AutoTokenizer

    model = load_adapted_model(out)
    rows = target_sentences(64, seed=2)
    tokens = AutoTokenizer.from_pretrained(tiny_bert_dir)([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = [model.label_names[i] for i in model(**tokens).argmax(-1)]
    accuracy = np.mean([p == r["label"] for p, r in zip(predicted, rows)])
    assert accuracy == pytest.approx(summary["eval"]["accuracy"])
    assert "load_adapted_model" in (out / "README.md").read_text()


def test_target_with_other_classes_is_a_clear_error(tiny_bert_dir, domains, tmp_path):
    source, _ = domains
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "the film", "label": name} for name in ("good", "bad") * 20])
    with pytest.raises(HfTransferError, match="same classes"):
        run_training(recipe_from_dict(domain_recipe(tiny_bert_dir, source, other, tmp_path / "out")))


ADAPTATION = {"method": "coral", "target_path": "target.jsonl"}


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"strategy": {"name": "freeze_backbone"}, "adaptation": {"method": "mmd"}}, "target_path"),
        ({"strategy": {"name": "full"}, "adaptation": {**ADAPTATION, "method": "tca"}}, "tca maps frozen features"),
        ({"strategy": {"name": "auto"}, "adaptation": ADAPTATION}, "needs one strategy"),
        ({"strategy": {"name": "lora"}, "training": {"lr": "auto"}, "adaptation": ADAPTATION}, "range test on source batches"),
        ({"task": "image", "strategy": {"name": "freeze_backbone"}, "adaptation": {**ADAPTATION, "features": "mean"}},
         "text models"),
        ({"strategy": {"name": "freeze_backbone"}, "adaptation": {**ADAPTATION, "tca_components": 600}}, "tca_max_samples"),
        ({"task": "multimodal", "strategy": {"name": "freeze_backbone"}, "adaptation": ADAPTATION}, "multimodal"),
    ],
)
def test_recipe_mistakes_are_caught_before_training(recipe, message):
    with pytest.raises(HfTransferError, match=message):
        recipe_from_dict(recipe)


# ---------------------------------------------------------------------------------------------
# The pieces


def test_mean_pooling_ignores_padding(tiny_bert_dir):
    from hf_transfer.recipe import ModelConfig
    from hf_transfer.sources.text import load_text_model, load_tokenizer

    config = ModelConfig(name=str(tiny_bert_dir))
    model, tokenizer = load_text_model(config, ["a", "b"]).eval(), load_tokenizer(config)
    alone = tokenizer(["the film was wonderful"], return_tensors="pt")
    padded = tokenizer(["the film was wonderful", "the movie was really very quite dreadful today"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(mean_token_states(model, **alone)[0], mean_token_states(model, **padded)[0], atol=1e-5)


def test_batches_pair_source_with_target_and_never_carry_target_labels():
    source = (torch.arange(20.0).reshape(10, 2), torch.arange(10) % 2)
    target = torch.full((7, 2), -1.0)
    pairs = SourceWithTarget(source, target, seed=3)
    batch = pairs.__getitems__([4, 1, 8])
    assert set(batch) == {"features", "labels", "target_features"}
    assert torch.equal(batch["features"], source[0][[4, 1, 8]]) and torch.equal(batch["labels"], source[1][[4, 1, 8]])
    assert batch["target_features"].shape == (3, 2) and (batch["target_features"] == -1).all()
    # the same batch of the same epoch draws the same target rows (a resumed epoch repeats itself)
    assert torch.equal(SourceWithTarget(source, torch.randn(7, 2, generator=torch.Generator().manual_seed(0)), 3)
                       .__getitems__([4, 1, 8])["target_features"],
                       SourceWithTarget(source, torch.randn(7, 2, generator=torch.Generator().manual_seed(0)), 3)
                       .__getitems__([4, 1, 8])["target_features"])


def spurious_shift(seed: int, n: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 informative in both domains, x1 more so in the source, but moved by `shift` in the target:
    a head that leans on x1 puts most target examples in one class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    signs = 2.0 * labels - 1.0
    features = np.stack([signs + rng.normal(0, 0.7, n), 1.5 * signs + rng.normal(0, 0.5, n) + shift,
                         rng.normal(0, 1.0, n)], axis=1)
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


def target_accuracy(method: str, tmp_path: Path, weight: float | None = None) -> float:
    """The run's head and objective on synthetic features, trained by the shared trainer."""
    source, validation, target = spurious_shift(0, 600, 0.0), spurious_shift(1, 100, 0.0), spurious_shift(2, 600, 3.0)
    recipe = recipe_from_dict({
        "strategy": {"name": "freeze_backbone"},
        "adaptation": {"method": method, "target_path": "synthetic", "bottleneck_dim": 16, "dropout": 0.0, "weight": weight,
                       "tca_components": 2, "tca_max_samples": 400},
        "training": {"epochs": 40, "batch_size": 64, "lr": 1e-2, "seed": 0, "logging_steps": 1000},
    })
    torch.manual_seed(0)
    plan = build_adaptation_plan(DomainFeatures(source, validation, target), ["0", "1"], recipe, torch.device("cpu"))
    result = train(plan, recipe.training, Accelerator(cpu=True), tmp_path, recipe_callbacks(recipe.training, plan))
    return result.best_metrics["accuracy"]


def test_adaptation_methods_beat_source_only_on_a_shifted_target(tmp_path):
    source_only = target_accuracy("none", tmp_path)
    # weight 1 for dann: the features move 3 source standard deviations, far more than on real data
    adapted = {"dann": target_accuracy("dann", tmp_path, weight=1.0)}
    adapted |= {method: target_accuracy(method, tmp_path) for method in ("mmd", "tca")}
    assert source_only < 0.7
    for method, accuracy in adapted.items():
        assert accuracy > source_only + 0.1, (method, accuracy, source_only)


# ---------------------------------------------------------------------------------------------
# The shipped recipes


RECIPES = {
    "pacs_photo_to_cartoon": ("pacs/photo", "pacs/cartoon"),
    "pacs_photo_to_art": ("pacs/photo", "pacs/art_painting"),
    "amazon_books_to_electronics": ("amazon_multidomain/books.jsonl", "amazon_multidomain/electronics.jsonl"),
    "amazon_dvd_to_books": ("amazon_multidomain/dvd.jsonl", "amazon_multidomain/books.jsonl"),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shipped_recipes_name_the_shared_data(name):
    if not (SHARED_DATA / "pacs").is_dir() or not (SHARED_DATA / "amazon_multidomain").is_dir():
        pytest.skip(f"the shared data ({SHARED_DATA}) is not on this machine")
    recipe = load_recipe(name)
    source, target = RECIPES[name]
    assert Path(recipe.data.path) == (SHARED_DATA / source).resolve()
    assert Path(recipe.adaptation.target_path) == (SHARED_DATA / target).resolve()
    assert recipe.strategy.name == "freeze_backbone" and recipe.adaptation.method != "none"
