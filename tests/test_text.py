"""The text path end to end on a tiny BERT: learning, strategies, output folder, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import POSITIVE, keyword_sentences, write_jsonl

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import recipe_from_dict
from hf_transfer.run import run_training

REPO = Path(__file__).resolve().parents[1]


def text_recipe(model_dir: Path, data_dir: Path, output_dir: Path, **sections) -> dict:
    recipe = {
        "name": "tiny_text",
        "task": "text",
        "model": {"name": str(model_dir)},
        "data": {"path": str(data_dir), "text_column": "text", "label_column": "label", "max_length": 32},
        "strategy": {"name": "full"},
        "training": {"epochs": 6, "batch_size": 16, "lr": 2e-3, "warmup_ratio": 0.1, "logging_steps": 5, "seed": 0},
        "output": {"dir": str(output_dir)},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


def train(model_dir, data_dir, output_dir, **sections) -> dict:
    return run_training(recipe_from_dict(text_recipe(model_dir, data_dir, output_dir, **sections)))


def test_full_finetuning_learns_keyword_rule_and_exports_a_pipeline(tiny_bert_dir, keyword_data, tmp_path):
    out = tmp_path / "out"
    summary = train(tiny_bert_dir, keyword_data, out)

    assert summary["eval"]["accuracy"] > 0.9
    losses = [epoch["train_loss"] for epoch in summary["history"]]
    assert losses[-1] < losses[0] * 0.5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["confusion_matrix"]["labels"] == ["negative", "positive"]
    assert sum(map(sum, metrics["eval"]["confusion_matrix"]["matrix"])) == 60
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("loss" in r and "lr" in r for r in log) and any("accuracy" in r for r in log)
    assert "strategy:" in (out / "recipe.yaml").read_text()

    from transformers import pipeline

    classify = pipeline("text-classification", model=str(out))
    predictions = classify([f"the film was {POSITIVE}", "the film was dreadful"])
    assert [p["label"] for p in predictions] == ["positive", "negative"]


def test_freeze_backbone_changes_only_the_head(tiny_bert_dir, keyword_data, tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification

    before = AutoModel.from_pretrained(tiny_bert_dir).state_dict()
    train(tiny_bert_dir, keyword_data, tmp_path / "out", strategy={"name": "freeze_backbone"}, training={"epochs": 2})
    trained = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")

    for name, value in trained.bert.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert trained.classifier.weight.abs().sum() > 0


def test_partial_trains_only_the_top_blocks(tiny_bert_dir, keyword_data, tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification

    before = AutoModel.from_pretrained(tiny_bert_dir).state_dict()
    train(tiny_bert_dir, keyword_data, tmp_path / "out", strategy={"name": "partial", "trainable_blocks": 1},
          training={"epochs": 1})
    after = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").bert.state_dict()

    unchanged = {n for n in before if torch.equal(before[n], after[n])}
    assert {n for n in before if n.startswith(("embeddings.", "encoder.layer.0."))} <= unchanged
    assert not any(n.startswith(("encoder.layer.1.", "pooler.")) for n in unchanged)


def test_frozen_word_embeddings_keep_their_values_while_the_rest_trains(tiny_bert_dir, keyword_data, tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification

    before = AutoModel.from_pretrained(tiny_bert_dir).state_dict()
    summary = train(tiny_bert_dir, keyword_data, tmp_path / "out", strategy={"freeze_word_embeddings": True},
                    training={"epochs": 2})
    after = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").bert.state_dict()

    assert torch.equal(after["embeddings.word_embeddings.weight"], before["embeddings.word_embeddings.weight"])
    assert not torch.equal(after["embeddings.position_embeddings.weight"], before["embeddings.position_embeddings.weight"])
    assert not torch.equal(after["encoder.layer.0.attention.self.query.weight"],
                           before["encoder.layer.0.attention.self.query.weight"])
    vocabulary, width = before["embeddings.word_embeddings.weight"].shape
    assert summary["trainable_parameters"] == summary["total_parameters"] - vocabulary * width
    assert "the word embeddings stay at their pretrained values" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize(("sections", "message"), [
    ({"task": "image"}, "task image has none"),
    ({"strategy": {"name": "gradual_unfreeze"}}, "does not combine with gradual_unfreeze"),
])
def test_frozen_word_embeddings_where_they_cannot_apply_are_refused(tiny_bert_dir, keyword_data, tmp_path,
                                                                     sections, message):
    recipe = text_recipe(tiny_bert_dir, keyword_data, tmp_path / "out", strategy={"freeze_word_embeddings": True})
    for section, values in sections.items():
        recipe[section] = {**recipe[section], **values} if isinstance(values, dict) else values
    with pytest.raises(HfTransferError, match=f"strategy.freeze_word_embeddings .*{message}"):
        recipe_from_dict(recipe)
    assert not (tmp_path / "out").exists()


def test_lora_saves_only_the_adapter_and_reloads_to_the_same_predictions(tiny_bert_dir, keyword_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "out"
    summary = train(tiny_bert_dir, keyword_data, out, strategy={"name": "lora", "merge_lora": True,
                                                                "lora": {"r": 4, "alpha": 8}},
                    training={"epochs": 3, "lr": 5e-3})
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()
    assert summary["trainable_parameters"] < summary["total_parameters"] / 2

    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer([f"a {POSITIVE} plot", "a dreadful plot"], return_tensors="pt", padding=True)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    adapted = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        adapted_logits = adapted(**batch).logits
        merged_logits = merged(**batch).logits
    torch.testing.assert_close(adapted_logits, merged_logits, atol=1e-5, rtol=1e-5)
    assert merged.config.id2label == {0: "negative", 1: "positive"}


def test_validation_is_carved_stratified_when_absent_and_class_weights_auto(tiny_bert_dir, tmp_path):
    data = write_jsonl(tmp_path / "only_train.jsonl", keyword_sentences(100, seed=3))
    summary = train(tiny_bert_dir, data, tmp_path / "out", data={"validation_fraction": 0.2},
                    training={"epochs": 1, "class_weights": "auto"})
    support = [c["support"] for c in summary["eval"]["per_class"].values()]
    assert support == [10, 10]


def test_integer_labels_take_names_from_the_recipe(tiny_bert_dir, tmp_path):
    rows = [{"sentence": r["text"], "label": int(r["label"] == "positive")} for r in keyword_sentences(80, 4)]
    folder = tmp_path / "tsv"
    folder.mkdir()
    for split, part in (("train", rows[:60]), ("dev", rows[60:])):
        # a stray quote, as in GLUE's TSVs, must not swallow the following lines
        lines = ["sentence\tlabel"] + [f'{r["sentence"]} " it\t{r["label"]}' for r in part]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    summary = train(tiny_bert_dir, folder, tmp_path / "out",
                    data={"text_column": "sentence", "label_names": ["neg", "pos"]}, training={"epochs": 1})
    assert list(summary["eval"]["per_class"]) == ["neg", "pos"]
    assert summary["eval"]["num_samples"] == 20


# ------------------------------------------------------------------ bad input: one clear error


def test_missing_column_names_the_existing_ones(tiny_bert_dir, keyword_data, tmp_path):
    with pytest.raises(HfTransferError, match=r"Column\(s\) \['review'\] not found .* columns \['text', 'label'\]"):
        train(tiny_bert_dir, keyword_data, tmp_path / "out", data={"text_column": "review"})


def test_unknown_validation_label_is_an_error(tiny_bert_dir, tmp_path):
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", keyword_sentences(20, 5))
    write_jsonl(folder / "validation.jsonl", [{"text": "the plot", "label": "neutral"}])
    with pytest.raises(HfTransferError, match=r"validation split has label\(s\) \['neutral'\] that training does not know"):
        train(tiny_bert_dir, folder, tmp_path / "out")


def test_empty_split_is_an_error(tiny_bert_dir, tmp_path):
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", keyword_sentences(20, 5))
    (folder / "validation.csv").parent.mkdir(exist_ok=True)
    write_jsonl(folder / "validation.jsonl", [])
    with pytest.raises(HfTransferError, match="The validation split is empty"):
        train(tiny_bert_dir, folder, tmp_path / "out")


def test_unknown_model_lists_offline_copies(keyword_data, tmp_path):
    with pytest.raises(HfTransferError, match="offline copies: sentence-transformers/all-MiniLM-L6-v2"):
        train(tmp_path / "no-such-model", keyword_data, tmp_path / "out")


def test_non_empty_output_folder_is_refused_and_kept(tiny_bert_dir, keyword_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(HfTransferError, match="is not empty.*--overwrite"):
        train(tiny_bert_dir, keyword_data, out)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_cli_reports_user_errors_in_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--recipe", "minilm_sentiment", "--set", "training.lr=abc"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "hf-transfer: error: Recipe key 'training.lr' got 'abc', which is not float or 'auto'. Fix the value."
    )


def test_a_saved_adapter_names_its_base_model_by_hub_id_not_by_a_local_path(tiny_bert_dir, tmp_path):
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_transfer.tasks.text import save_text_model

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    adapted = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    save_text_model(adapted, AutoTokenizer.from_pretrained(tiny_bert_dir), tmp_path, merged=False,
                    base_id="sentence-transformers/all-MiniLM-L6-v2")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_predict_reads_a_text_too_long_to_be_a_file_name_as_a_text():
    from hf_transfer.inference.predict import read_texts

    long_text = "the north of " * 40  # 520 characters: stat() on it fails with "File name too long"
    assert read_texts([long_text, "short"], "text") == [long_text, "short"]
