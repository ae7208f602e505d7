"""`hf-transfer rank`: the transferability scores against known answers, and the command on tiny text
models built from configs (a ranking written, a winner named, the features left for `train`)."""

from __future__ import annotations

import json
import shlex
import typing
from pathlib import Path

import numpy as np
import pytest
from conftest import NEGATIVE, POSITIVE, WORDS
from test_safety import fails_cleanly

from hf_transfer.cli import main
from hf_transfer.selection.scores import hscore, knn_accuracy, log_evidence, logme

# ------------------------------------------------------------------ the scores


def class_features(separation: float, seed: int = 0, n: int = 240, d: int = 24, classes: int = 3):
    """Gaussian features around one mean per class, the means `separation` apart in scale; 0: pure noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    means = rng.normal(size=(classes, d))
    return means[labels] * separation + rng.normal(size=(n, d)), labels


def test_logme_and_hscore_order_separable_above_weak_above_random():
    separable, labels = class_features(4.0)
    weak, weak_labels = class_features(0.5)
    noise, noise_labels = class_features(0.0)
    for score in (logme, hscore):
        values = [score(separable, labels), score(weak, weak_labels), score(noise, noise_labels)]
        assert values[0] > values[1] > values[2], (score.__name__, values)
    # same features, labels shuffled: the features no longer tell the classes apart
    shuffled = np.random.default_rng(1).permutation(labels)
    assert logme(separable, labels) > logme(separable, shuffled)
    assert hscore(separable, labels) > 10 * hscore(separable, shuffled)


def test_hscore_is_invariant_to_adding_a_constant():
    features, labels = class_features(1.0, d=40, n=60)  # fewer examples than dimensions: shrinkage needed
    shifted = features + np.linspace(-50.0, 80.0, features.shape[1])
    assert np.isfinite(hscore(features, labels))
    assert hscore(shifted, labels) == pytest.approx(hscore(features, labels), rel=1e-8)


@pytest.mark.parametrize(("n", "d"), [(12, 5), (5, 12)])  # more examples than dimensions, and fewer
def test_log_evidence_matches_the_gaussian_marginal_likelihood(n, d):
    """For fixed alpha, beta: y = F w + noise, w ~ N(0, I/alpha), noise ~ N(0, I/beta), so y is Gaussian
    with covariance I/beta + F F^T/alpha; its log density, evaluated directly, is the evidence."""
    rng = np.random.default_rng(n * d)
    features, target = rng.normal(size=(n, d)), rng.integers(0, 2, size=n).astype(float)
    for alpha, beta in [(0.7, 2.3), (5.0, 0.1), (1e-2, 40.0)]:
        covariance = np.eye(n) / beta + features @ features.T / alpha
        _, log_det = np.linalg.slogdet(covariance)
        direct = -0.5 * (n * np.log(2 * np.pi) + log_det + target @ np.linalg.solve(covariance, target))
        assert log_evidence(features, target, alpha, beta) == pytest.approx(direct, rel=1e-9, abs=1e-9)


def test_logme_is_the_evidence_at_its_maximum_averaged_over_classes():
    from scipy.optimize import minimize

    features, labels = class_features(1.0, n=60, d=8, classes=3)
    best = []
    for k in range(3):
        target = (labels == k).astype(float)
        found = minimize(lambda p: -log_evidence(features, target, np.exp(p[0]), np.exp(p[1])), x0=[0.0, 0.0],
                         method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 4000})
        best.append(-found.fun)
    assert logme(features, labels) == pytest.approx(np.mean(best) / len(labels), abs=1e-6)


def test_knn_accuracy_on_clusters_and_on_noise():
    features, labels = class_features(4.0, n=300)
    assert knn_accuracy(features[:200], labels[:200], features[200:], labels[200:]) == 1.0
    noise, noise_labels = class_features(0.0, n=600, classes=2)
    assert 0.35 < knn_accuracy(noise[:400], noise_labels[:400], noise[400:], noise_labels[400:]) < 0.65


def test_every_score_the_recipe_can_name_is_computed():
    from hf_transfer.recipe import RankConfig
    from hf_transfer.selection.rank import SCORES

    assert set(SCORES) == set(typing.get_args(typing.get_type_hints(RankConfig)["score"]))


def test_equal_scores_go_to_the_higher_logme_and_a_missing_score_goes_last():
    from hf_transfer.selection.rank import order_rows

    rows = [{"model": "a", "probe_accuracy": 0.9, "logme": -0.5}, {"model": "failed"},
            {"model": "b", "probe_accuracy": 0.9, "logme": -0.2}, {"model": "c", "probe_accuracy": 0.8, "logme": 0.3}]
    ranked = order_rows(rows, "probe_accuracy")
    assert [row["model"] for row in ranked] == ["b", "a", "c", "failed"]
    assert [row["rank"] for row in ranked] == [1, 2, 3, None]


# ------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def second_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny BERT (one layer, other width and weights) with the same vocabulary."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("second_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, POSITIVE, NEGATIVE]
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(1)
    BertModel(config).save_pretrained(folder)
    return folder


def write_recipe(path: Path, model: Path, data: Path, extra: str = "") -> Path:
    path.write_text(
        f"name: ranked\ntask: text\nmodel:\n  name: {model}\ndata:\n  path: {data}\n  max_length: 32\n"
        f"training:\n  seed: 0\n{extra}"
    )
    return path


def test_rank_scores_both_models_names_a_winner_and_leaves_its_features_for_train(
        tiny_bert_dir, second_bert_dir, keyword_data, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "ranked.yaml", tiny_bert_dir, keyword_data,
                          f"rank:\n  candidates: [{tiny_bert_dir}, {second_bert_dir}]\n")
    out = tmp_path / "rank"
    assert main(["rank", "--recipe", str(recipe), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out

    ranking = json.loads((out / "ranking.json").read_text())
    rows = {row["model"]: row for row in ranking["candidates"]}
    assert set(rows) == {str(tiny_bert_dir), str(second_bert_dir)}
    assert ranking["score"] == "probe_accuracy" and ranking["winner"] == ranking["candidates"][0]["model"]
    first, second = ranking["candidates"]
    assert (first["probe_accuracy"], first["logme"]) >= (second["probe_accuracy"], second["logme"])
    assert [row["rank"] for row in ranking["candidates"]] == [1, 2]
    for row in rows.values():
        assert row["error"] is None and row["train_examples"] == 160 and row["validation_examples"] == 60
        assert all(np.isfinite(row[key]) for key in ("logme", "hscore", "probe_accuracy", "knn_accuracy"))
        assert 0 <= row["probe_accuracy"] <= 1 and 0 <= row["knn_accuracy"] <= 1
        assert row["feature_cache"] == {"hits": [], "computed": ["train", "validation"]}
    assert rows[str(tiny_bert_dir)]["feature_dim"] == 32 and rows[str(second_bert_dir)]["feature_dim"] == 16
    assert f"would train: {ranking['winner']}" in printed and "LogME" in printed and "parameters" in printed

    # the hint trains the winner on the features rank cached: nothing is computed again, and the
    # solver's validation accuracy is the probe accuracy rank reported
    winner = ranking["winner"]
    run = tmp_path / "run"
    hint = next(line for line in printed.splitlines() if line.startswith("train it: hf-transfer "))
    assert main([*shlex.split(hint.removeprefix("train it: hf-transfer ")), "--output-dir", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["feature_cache"] == {"hits": ["validation", "train"], "computed": []}
    assert metrics["eval"]["accuracy"] == pytest.approx(rows[winner]["probe_accuracy"])

    # ranked again: every feature comes from the cache, and --candidates replaces rank.candidates
    assert main(["rank", "--recipe", str(recipe), "--output-dir", str(out), "--overwrite",
                 "--candidates", str(second_bert_dir), "--set", "rank.score=logme"]) == 0
    again = json.loads((out / "ranking.json").read_text())
    assert [row["model"] for row in again["candidates"]] == [str(second_bert_dir)]
    assert again["score"] == "logme" and again["winner"] == str(second_bert_dir)
    assert again["candidates"][0]["feature_cache"] == {"hits": ["train", "validation"], "computed": []}
    assert again["candidates"][0]["logme"] == pytest.approx(rows[str(second_bert_dir)]["logme"])


def test_a_candidate_that_cannot_load_is_reported_and_the_others_ranked(tiny_bert_dir, keyword_data, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "ranked.yaml", tiny_bert_dir, keyword_data)
    missing = tmp_path / "no-such-model"
    out = tmp_path / "rank"
    assert main(["rank", "--recipe", str(recipe), "--output-dir", str(out),
                 "--candidates", str(missing), str(tiny_bert_dir)]) == 0
    printed = capsys.readouterr().out
    ranking = json.loads((out / "ranking.json").read_text())
    assert ranking["winner"] == str(tiny_bert_dir)
    failed = ranking["candidates"][-1]
    assert failed["model"] == str(missing) and failed["rank"] is None and "Cannot load text model" in failed["error"]
    assert ranking["candidates"][0]["error"] is None and ranking["candidates"][0]["rank"] == 1
    assert f"{missing}  cannot load: Cannot load text model" in printed
    fails_cleanly(["rank", "--recipe", str(recipe), "--output-dir", str(tmp_path / "none"),
                   "--candidates", str(missing)], capsys,
                  f"No candidate could be ranked ({missing}: cannot load: Cannot load text model")
    assert not (tmp_path / "none").exists()


def test_mistakes_are_one_line_before_anything_is_loaded_or_written(tiny_bert_dir, keyword_data, tmp_path, capsys,
                                                                      monkeypatch):
    import hf_transfer.tasks

    def no_loading(_recipe):
        raise AssertionError("a model was loaded before the checks finished")

    monkeypatch.setitem(hf_transfer.tasks.TASKS, "text", no_loading)
    recipe = write_recipe(tmp_path / "ranked.yaml", tiny_bert_dir, keyword_data)
    out = tmp_path / "rank"
    command = ["rank", "--recipe", str(recipe), "--output-dir", str(out)]
    fails_cleanly([*command, "--candidates", str(tiny_bert_dir), "resnet18"], capsys,
                  "every candidate must be a transformers text model: resnet18 is a timm image model")
    fails_cleanly([*command, "--candidates", "timm/vit_tiny_patch16_224.augreg_in21k"], capsys, "is a timm image model")
    fails_cleanly(command, capsys, "No candidates to rank: name them with --candidates")
    fails_cleanly([*command, "--candidates", str(tiny_bert_dir), "--set", "rank.score=accuracy"], capsys,
                  "Recipe key 'rank.score' got 'accuracy'")
    fails_cleanly([*command, "--candidates", str(tiny_bert_dir), "--set", "task=multimodal"], capsys,
                  "rank compares single source models of task text or image")
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fails_cleanly([*command, "--candidates", str(tiny_bert_dir)], capsys, "is not empty")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_rank_on_images_and_a_text_folder_is_the_wrong_modality(tiny_bert_dir, tmp_path, capsys):
    from test_vision import SIZE, write_colour_folder

    data = write_colour_folder(tmp_path / "colours", train=12, val=6)
    recipe = tmp_path / "colours.yaml"
    recipe.write_text(f"task: image\nmodel:\n  name: test_resnet\n  pretrained: false\ndata:\n  path: {data}\n"
                      f"  image_size: {SIZE}\ntraining:\n  num_workers: 0\n  batch_size: 8\n")
    out = tmp_path / "rank"
    fails_cleanly(["rank", "--recipe", str(recipe), "--output-dir", str(out), "--candidates", "test_resnet",
                   str(tiny_bert_dir)], capsys, f"{tiny_bert_dir} is a transformers text model")
    assert not out.exists()
    assert main(["rank", "--recipe", str(recipe), "--output-dir", str(out),
                 "--candidates", "test_resnet", "test_efficientnet"]) == 0
    ranking = json.loads((out / "ranking.json").read_text())
    assert {row["model"] for row in ranking["candidates"]} == {"test_resnet", "test_efficientnet"}
    assert ranking["winner"] in {"test_resnet", "test_efficientnet"}
    assert all(row["error"] is None and row["train_examples"] == 24 for row in ranking["candidates"])


def test_rank_scores_a_sample_of_the_training_split_and_the_whole_validation_split(
        tiny_bert_dir, keyword_data, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "ranked.yaml", tiny_bert_dir, keyword_data, "rank:\n  max_train_examples: 100\n")
    out = tmp_path / "rank"
    assert main(["rank", "--recipe", str(recipe), "--output-dir", str(out), "--candidates", str(tiny_bert_dir)]) == 0
    assert "at most 100 training examples" in capsys.readouterr().out
    ranking = json.loads((out / "ranking.json").read_text())
    row = ranking["candidates"][0]
    assert ranking["max_train_examples"] == 100
    assert (row["train_examples"], row["validation_examples"]) == (100, 60)

    # a recipe that samples fewer itself keeps its own sample
    assert main(["rank", "--recipe", str(recipe), "--output-dir", str(out), "--overwrite",
                 "--candidates", str(tiny_bert_dir), "--set", "data.max_train_samples=80"]) == 0
    assert json.loads((out / "ranking.json").read_text())["candidates"][0]["train_examples"] == 80
    fails_cleanly(["rank", "--recipe", str(recipe), "--output-dir", str(tmp_path / "bad"), "--candidates",
                   str(tiny_bert_dir), "--set", "rank.max_train_examples=1"], capsys,
                  "rank.max_train_examples must be at least 2")
