"""Fine-tuning options: layer-wise learning-rate decay and an EMA of the weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_text import train

from hf_transfer.recipe import ModelConfig, TrainingConfig
from hf_transfer.sources.text import load_text_model
from hf_transfer.training.optim import parameter_groups


def test_layer_decay_gives_each_lower_block_a_lower_rate(tiny_bert_dir):
    model = load_text_model(ModelConfig(name=str(tiny_bert_dir)), ["negative", "positive"])
    groups = parameter_groups(model, TrainingConfig(lr=1e-3, backbone_lr=1e-4, layer_decay=0.5))
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    embeddings = rate[id(named["model.bert.embeddings.word_embeddings.weight"])]
    layer0 = rate[id(named["model.bert.encoder.layer.0.attention.self.query.weight"])]
    layer1 = rate[id(named["model.bert.encoder.layer.1.attention.self.query.weight"])]
    head = rate[id(named["model.classifier.weight"])]
    assert head == pytest.approx(1e-3)
    assert (layer1, layer0, embeddings) == pytest.approx((0.5e-4, 0.25e-4, 0.125e-4))
    # no decay asked: the two rates as before
    plain = {g["lr"] for g in parameter_groups(model, TrainingConfig(lr=1e-3, backbone_lr=1e-4))}
    assert plain == {1e-3, 1e-4}


def test_ema_weights_are_evaluated_and_saved_not_the_live_ones(tiny_bert_dir, keyword_data, tmp_path):
    out = tmp_path / "out"
    summary = train(tiny_bert_dir, keyword_data, out, training={"epochs": 2, "ema_decay": 0.9, "save_checkpoints": True})
    saved = load_file(str(out / "model.safetensors"))
    checkpoint = sorted((out / "checkpoints").iterdir())[-1]  # the last epoch's live weights
    live = load_file(str(checkpoint / "model.safetensors"))
    live = {name.removeprefix("model."): value for name, value in live.items()}
    key = "bert.encoder.layer.1.attention.self.query.weight"
    assert not torch.equal(saved[key], live[key])

    # the saved weights are the ones the run scored: evaluating them again gives the recorded accuracy
    from hf_transfer.inference.evaluate import evaluate_saved_model

    again = evaluate_saved_model(out, str(keyword_data), split="validation").metrics
    assert again["accuracy"] == pytest.approx(summary["eval"]["accuracy"])
    assert json.loads((out / "metrics.json").read_text())["eval"]["accuracy"] == summary["eval"]["accuracy"]
