"""Domain adaptation with the backbone in the loop (adaptation/backbone.py), on a tiny BERT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import keyword_sentences, write_jsonl
from safetensors.torch import load_file
from test_domain import domain_recipe, target_sentences

from hf_transfer.adaptation.backbone import DISCRIMINATOR, HeadInput, backbone_view
from hf_transfer.adaptation.objective import DomainObjective
from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import recipe_from_dict
from hf_transfer.run import run_training
from hf_transfer.tasks import task_builder


@pytest.fixture
def domains(tmp_path: Path) -> tuple[Path, Path]:
    source = write_jsonl(tmp_path / "source.jsonl", keyword_sentences(64, seed=1))
    target = write_jsonl(tmp_path / "target.jsonl", target_sentences(48, seed=2))
    return source, target


def backbone_recipe(model_dir: Path, source: Path, target: Path, output: Path, strategy: str = "full", **adaptation) -> dict:
    recipe = domain_recipe(model_dir, source, target, output, **adaptation)
    recipe["strategy"] = {"name": strategy}
    recipe["training"] |= {"epochs": 2, "lr": 1e-3, "backbone_lr": 1e-3}
    return recipe


@pytest.mark.parametrize("method", ["cdan", "mcc"])
def test_backbone_adaptation_trains_the_backbone_and_saves_a_stock_classifier(tiny_bert_dir, domains, tmp_path, method,
                                                                              capsys):
    from transformers import AutoModelForSequenceClassification

    source, target = domains
    out = tmp_path / "out"
    summary = run_training(recipe_from_dict(backbone_recipe(tiny_bert_dir, source, target, out, method=method)))
    assert summary["adaptation"]["method"] == method and summary["adaptation"]["backbone"] == "trained (full)"
    assert summary["adaptation"]["norm_statistics"] == "shared"  # auto: a transformer has no BatchNorm layer
    assert summary["eval"]["num_samples"] == 48  # the whole target scores every epoch
    assert summary["best_epoch"] == 2  # the last, never chosen by the target
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("last epoch 2: target accuracy ") and "only scored it" in last_line
    saved = load_file(str(out / "model.safetensors"))
    assert not any(DISCRIMINATOR in name for name in saved)  # the discriminator only trains
    before = load_file(str(tiny_bert_dir / "model.safetensors"))
    query = "layer.0.attention.self.query.weight"
    saved_query, source_query = (next(v for n, v in weights.items() if n.endswith(query)) for weights in (saved, before))
    assert not torch.equal(saved_query, source_query)  # the backbone moved
    model = AutoModelForSequenceClassification.from_pretrained(out)  # a normal classifier for the stock library
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_evaluate_and_predict_serve_a_lora_adapted_folder(tiny_bert_dir, domains, tmp_path, capsys):
    from hf_transfer.cli import main
    from hf_transfer.inference.evaluate import evaluate_saved_model

    source, target = domains
    out = tmp_path / "out"
    summary = run_training(recipe_from_dict(backbone_recipe(tiny_bert_dir, source, target, out, "lora", method="mmd")))
    assert summary["adaptation"]["backbone"] == "trained (lora)"
    # the target, scored again from the saved folder, gives the run's own last-epoch accuracy
    result = evaluate_saved_model(out, str(target), split="train", name="target")
    assert result.metrics["accuracy"] >= 0.0 and result.metrics["num_samples"] > 0
    assert main(["predict", str(out), "a good film"]) == 0
    assert capsys.readouterr().out.split("\t")[1].strip() in ("negative", "positive")


def _grad_norms(strategy: str, tiny_bert_dir: Path, source: Path, target: Path, tmp_path: Path) -> dict[str, float]:
    """Gradient norms, by part of the model, of the domain loss alone (mmd on the head's input)."""
    config = backbone_recipe(tiny_bert_dir, source, target, tmp_path / "out", strategy, method="mmd")
    config["strategy"]["trainable_blocks"] = 1
    recipe = recipe_from_dict(config)
    task = task_builder(recipe)(recipe)
    model = task.model.train()
    objective = DomainObjective(recipe.adaptation, backbone_view(HeadInput(model)), None)
    source_batch = next(iter(task.train_loader))
    target_batch = next(iter(task.feature_source.loader("validation", None)))
    inputs = {k: v for k, v in source_batch.items() if k != "labels"}
    inputs |= {f"target_{k}": v for k, v in target_batch.items() if k != "labels"}
    model(**inputs)  # the loop's forward of the source batch
    loss = objective.extra_loss(model, inputs, progress=0.5)
    if loss.requires_grad:  # with a frozen backbone nothing below the head input can take a gradient
        loss.backward()

    def norm(part: str) -> float:
        grads = [p.grad for n, p in model.named_parameters() if part in n and p.grad is not None]
        return float(sum(g.norm() ** 2 for g in grads) ** 0.5) if grads else 0.0

    top_layer = f"layer.{model.model.config.num_hidden_layers - 1}."
    return {"embeddings": norm("embeddings"), "top layer": norm(top_layer), "classifier": norm("classifier")}


def test_domain_loss_gradient_reaches_the_backbone_only_where_it_trains(tiny_bert_dir, domains, tmp_path):
    source, target = domains
    full = _grad_norms("full", tiny_bert_dir, source, target, tmp_path)
    assert full["embeddings"] > 0 and full["top layer"] > 0
    partial = _grad_norms("partial", tiny_bert_dir, source, target, tmp_path)  # the top block trains, the rest is frozen
    assert partial["top layer"] > 0 and partial["embeddings"] == 0
    frozen = _grad_norms("freeze_backbone", tiny_bert_dir, source, target, tmp_path)
    assert frozen["embeddings"] == 0 and frozen["top layer"] == 0
    assert full["classifier"] == 0  # the features are the classifier's input: mmd does not reach the classifier


def test_tca_with_a_trainable_backbone_is_a_clear_error(tiny_bert_dir, domains, tmp_path):
    source, target = domains
    with pytest.raises(HfTransferError, match="tca maps frozen features once"):
        recipe_from_dict(backbone_recipe(tiny_bert_dir, source, target, tmp_path / "out", "lora", method="tca"))


@pytest.mark.parametrize("strategy", ["freeze_backbone", "full"])
def test_an_empty_target_or_one_of_another_modality_is_one_clear_error(tiny_bert_dir, domains, tmp_path, strategy):
    from PIL import Image

    source, _ = domains
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    images = tmp_path / "images"
    for label in ("negative", "positive"):
        (images / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(images / label / "0.png")
    for target, message in ((empty, "split is empty"), (images, "no data files")):
        recipe = recipe_from_dict(backbone_recipe(tiny_bert_dir, source, target, tmp_path / "out", strategy, method="mmd"))
        with pytest.raises(HfTransferError, match=rf"adaptation.target_path .* cannot be read as text data .*{message}"):
            run_training(recipe)
        assert not (tmp_path / "out").exists()  # refused before anything was written
