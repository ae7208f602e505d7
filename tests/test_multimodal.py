"""Two-tower multimodal heads: a label only the image and the text together decide."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NEGATIVE, POSITIVE, WORDS
from PIL import Image

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import recipe_from_dict
from hf_transfer.run import run_training
from hf_transfer.sources.two_tower import ConcatFusion, GatedFusion
from hf_transfer.tasks.multimodal import load_two_tower

SIZE = 32
COLOURS = {"red": (200, 50, 40), "blue": (40, 60, 200)}



def write_split(folder: Path, split: str, count: int, seed: int) -> None:
    """label = (the image is red) XOR (the text says wonderful): balanced, each half independent of the label."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        red, keyword = i % 2 == 0, (i // 2) % 2 == 0
        pixels = np.clip(np.array(COLOURS["red" if red else "blue"]) + np_rng.normal(0, 40, (SIZE, SIZE, 3)), 0, 255)
        path = folder / "images" / f"{split}_{i}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        words = rng.choices(WORDS, k=rng.randint(4, 8))
        words.insert(rng.randrange(len(words) + 1), POSITIVE if keyword else NEGATIVE)
        rows.append({"image": f"images/{path.name}" if i % 3 else str(path), "text": " ".join(words),
                     "label": "yes" if red != keyword else "no"})
    rng.shuffle(rows)
    with (folder / f"{split}.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["image", "text", "label"])
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def xor_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("xor")
    write_split(folder, "train", 160, seed=1)
    write_split(folder, "validation", 80, seed=2)
    return folder


def recipe(task: str, model_dir: Path, data: Path, output: Path, **multimodal) -> dict:
    return {
        "task": task,
        "model": {"name": "test_resnet", "pretrained": False} if task == "image" else {"name": str(model_dir)},
        "data": {"path": str(data), "image_size": SIZE, "max_length": 16, "augment": {"hflip": 0.0, "color_jitter": 0.0}},
        "strategy": {"name": "freeze_backbone"},
        "multimodal": {
            "image_model": {"name": "test_resnet", "pretrained": False},
            "text_model": {"name": str(model_dir)},
            "text_strategy": {"name": "full"},
            "text_pooling": "mean",
            "hidden_dim": 32,
            "dropout": 0.0,
            **multimodal,
        },
        "training": {"epochs": 10, "batch_size": 16, "lr": 3e-3, "seed": 0, "num_workers": 0,
                     "save_checkpoints": False, "logging_steps": 1000, "cache_features": False},
        "output": {"dir": str(output), "overwrite": True},
    }


@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_fused_towers_learn_what_neither_tower_can_alone(fusion, tiny_bert_dir, xor_data, tmp_path):
    summary = run_training(recipe_from_dict(recipe("multimodal", tiny_bert_dir, xor_data, tmp_path / "fused", fusion=fusion)))
    assert summary["eval"]["accuracy"] >= 0.9, summary["history"]

    model = load_two_tower(tmp_path / "fused")
    assert model.label_names == ["no", "yes"]


def test_each_tower_alone_stays_near_chance(tiny_bert_dir, xor_data, tmp_path):
    image_only = recipe("image", tiny_bert_dir, xor_data, tmp_path / "image")
    image_only["strategy"] = {"name": "full"}
    text_only = recipe("text", tiny_bert_dir, xor_data, tmp_path / "text")
    text_only["strategy"] = {"name": "full"}
    for single in (image_only, text_only):
        accuracy = run_training(recipe_from_dict(single))["history"][-1]["accuracy"]
        assert 0.3 <= accuracy <= 0.7, (single["task"], accuracy)


def test_saved_two_tower_model_reloads_with_identical_logits(tiny_bert_dir, xor_data, tmp_path, capsys):
    from hf_transfer import tasks as run_module

    captured = {}
    build = run_module.TASKS["multimodal"]

    def capturing(parsed):
        task = build(parsed)
        captured["task"] = task
        return task

    config = recipe("multimodal", tiny_bert_dir, xor_data, tmp_path / "out", fusion="gated",
                    text_strategy={"name": "lora", "lora": {"target_modules": ["query", "value"]}})
    config["training"]["epochs"] = 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(run_module.TASKS, "multimodal", capturing)
        run_training(recipe_from_dict(config))
    trained = captured["task"].model.eval()
    # per-tower strategies: image frozen (the recipe's strategy), text LoRA, fusion head trained
    trainable = {name for name, p in trained.named_parameters() if p.requires_grad}
    assert not any(name.startswith("model.image.") for name in trainable)
    text_trainable = {name for name in trainable if name.startswith("model.text.")}
    assert text_trainable and all("lora_" in name for name in text_trainable)
    assert all(p.requires_grad for p in trained.model["fusion"].parameters())
    batch = next(iter(captured["task"].eval_loader))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    reloaded = load_two_tower(tmp_path / "out")
    with torch.no_grad():
        assert torch.allclose(trained(**inputs), reloaded(**inputs), atol=1e-5)
    assert isinstance(reloaded.model["fusion"], GatedFusion)
    # the commands that serve one library's classifier say how to load this one instead
    from hf_transfer.cli import main

    assert main(["predict", str(tmp_path / "out"), "a caption"]) == 2
    assert "load_two_tower(folder); evaluate and predict do not serve it yet" in capsys.readouterr().err


def test_fusion_heads_map_two_feature_widths_to_classes():
    image, text = torch.randn(5, 12), torch.randn(5, 7)
    for fusion in (ConcatFusion(12, 7, 3, 16, 0.1), GatedFusion(12, 7, 3, 16, 0.1)):
        assert fusion(image, text).shape == (5, 3)


def test_missing_text_column_is_a_clear_error(tiny_bert_dir, xor_data, tmp_path):
    config = recipe("multimodal", tiny_bert_dir, xor_data, tmp_path / "out")
    config["data"]["text_column"] = "caption"
    with pytest.raises(HfTransferError, match="caption"):
        run_training(recipe_from_dict(config))
