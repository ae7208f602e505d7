"""head.pooling for text: mean pooling that ignores padding, auto picking it for sentence encoders,
and a mean-pooled output folder that the stock sentence-transformers library loads to the same logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import NEGATIVE, POSITIVE
from test_text import text_recipe, train

from hf_transfer.errors import HfTransferError
from hf_transfer.inference.loader import load_saved_run
from hf_transfer.recipe import ModelConfig, recipe_from_dict
from hf_transfer.sources.text import load_text_model, load_tokenizer, resolve_pooling


@pytest.fixture(scope="session")
def tiny_sentence_encoder(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT saved as a sentence-transformers model with mean pooling (as all-MiniLM-L6-v2 is)."""
    folder = tmp_path_factory.mktemp("tiny_sentence_encoder") / "model"
    shutil.copytree(tiny_bert_dir, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
    ))
    return folder


def test_auto_pooling_is_mean_for_a_sentence_encoder_and_the_pooler_otherwise(tiny_bert_dir, tiny_sentence_encoder):
    assert resolve_pooling("auto", ModelConfig(name=str(tiny_sentence_encoder))) == "mean"
    assert resolve_pooling("auto", ModelConfig(name=str(tiny_bert_dir))) == "head_input"
    assert resolve_pooling("head_input", ModelConfig(name=str(tiny_sentence_encoder))) == "head_input"


def test_mean_pooling_ignores_padding(tiny_bert_dir):
    config = ModelConfig(name=str(tiny_bert_dir))
    model = load_text_model(config, ["negative", "positive"], pooling="mean").eval()
    tokenizer = load_tokenizer(config)
    text = f"the film was {POSITIVE}"
    alone = tokenizer([text], return_tensors="pt")
    padded = tokenizer([text, "a " * 20 + "long sentence"], return_tensors="pt", padding=True)
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]  # the text really is padded
    with torch.no_grad():
        assert torch.allclose(model(**alone)[0], model(**padded)[0], atol=1e-5)


def test_mean_pooled_run_reloads_to_identical_logits_with_stock_sentence_transformers(
    tiny_sentence_encoder, keyword_data, tmp_path
):
    sentence_transformers = pytest.importorskip("sentence_transformers", reason="the dev extra installs it")
    out = tmp_path / "out"
    summary = train(tiny_sentence_encoder, keyword_data, out)
    assert summary["text_pooling"] == "mean" and summary["eval"]["accuracy"] > 0.9

    texts = [f"the film was {POSITIVE}", f"the food was {NEGATIVE} and the service very slow today"]
    stock = sentence_transformers.SentenceTransformer(str(out), device="cpu")
    stock_logits = stock.encode(texts, convert_to_tensor=True)
    saved = load_saved_run(out)  # what predict and evaluate use
    with torch.no_grad():
        ours = saved.model(**saved.tokenizer(texts, return_tensors="pt", padding=True))
    assert torch.allclose(stock_logits, ours, atol=1e-5)
    assert [saved.label_names[i] for i in ours.argmax(-1)] == ["positive", "negative"]
    card = (out / "README.md").read_text()
    assert "SentenceTransformer(" in card and "library_name: sentence-transformers" in card


def test_mean_pooled_lora_folds_the_adapter_into_the_saved_encoder(tiny_sentence_encoder, keyword_data, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "out"
    train(tiny_sentence_encoder, keyword_data, out, strategy={"name": "lora"},
          training={"epochs": 3, "lr": 5e-3})
    before = AutoModel.from_pretrained(tiny_sentence_encoder).state_dict()
    after = AutoModel.from_pretrained(out).state_dict()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed and all("query" in name or "value" in name for name in changed)  # peft's BERT targets
    assert not (out / "adapter_config.json").exists()


def test_frozen_mean_pooled_head_leaves_the_encoder_unchanged(tiny_sentence_encoder, keyword_data, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "out"
    summary = train(tiny_sentence_encoder, keyword_data, out, strategy={"name": "freeze_backbone"})
    assert summary["head_solver"]["C"] > 0
    card = (out / "README.md").read_text()
    assert "fitted to convergence on the cached features as a logistic regression" in card
    assert "no training loop: the head was fitted by the solver" in card and " epochs, batch " not in card
    before = AutoModel.from_pretrained(tiny_sentence_encoder).state_dict()
    for name, value in AutoModel.from_pretrained(out).state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize(("sections", "message"), [
    ({"task": "image", "head": {"pooling": "mean"}}, "head.pooling mean applies to text models"),
    ({"head": {"type": "mlp"}}, "a text model's head is linear"),
    ({"head": {"solver": "logistic"}}, "head.solver logistic fits a head on cached frozen features"),
    ({"strategy": {"name": "freeze_backbone"}, "head": {"solver": "logistic"}, "training": {"label_smoothing": 0.1}},
     "head.solver logistic fits the plain cross-entropy"),
    ({"strategy": {"name": "freeze_backbone"}, "head": {"solver": "logistic"}, "training": {"ema_decay": 0.99}},
     "training.ema_decay averages the weights of the training loop"),
])
def test_a_head_setting_the_run_cannot_honour_is_one_clear_error(tiny_bert_dir, keyword_data, tmp_path, sections, message):
    values = text_recipe(tiny_bert_dir, keyword_data, tmp_path / "out")
    for section, setting in sections.items():
        values[section] = {**values.get(section, {}), **setting} if isinstance(setting, dict) else setting
    with pytest.raises(HfTransferError, match=message):
        recipe_from_dict(values)
    assert not (tmp_path / "out").exists()
