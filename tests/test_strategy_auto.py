"""strategy auto: the ladder of strategies on tiny models, its rules (tie, budget), and its output folder."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from conftest import NEGATIVE, POSITIVE
from test_text import text_recipe
from test_vision import image_recipe, random_batch, write_colour_folder

from hf_transfer.errors import HfTransferError
from hf_transfer.ladder import run_ladder
from hf_transfer.ladder.rules import (
    RungResult,
    budget_blocker,
    continue_blocker,
    estimated_seconds,
    halve,
    pick_winner,
    tie_tolerance,
)
from hf_transfer.recipe import recipe_from_dict
from hf_transfer.run import run_training

RUNGS = ["freeze_backbone", "lora", "partial", "full"]


def trained(strategy: str, score: float, seconds: float = 10.0, epochs: int = 2) -> RungResult:
    return RungResult(strategy, "trained", accuracy=score, f1_macro=score, score=score, best_epoch=1,
                      epochs=epochs, seconds=seconds)


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def text_auto(tiny_bert_dir, tmp_path_factory):
    from conftest import keyword_sentences, write_jsonl

    data = tmp_path_factory.mktemp("keyword_data")
    write_jsonl(data / "train.jsonl", keyword_sentences(160, seed=1))
    write_jsonl(data / "validation.jsonl", keyword_sentences(60, seed=2))
    out = tmp_path_factory.mktemp("auto") / "out"
    recipe = text_recipe(tiny_bert_dir, data, out, strategy={"name": "auto"}, training={"epochs": 3})
    return run_ladder(recipe_from_dict(recipe)), out, data


def test_auto_records_every_rung_and_why_the_winner_won(text_auto):
    summary, out, _ = text_auto
    metrics = json.loads((out / "metrics.json").read_text())
    search = metrics["strategy_search"]
    assert search == summary["strategy_search"]
    assert metrics["lr_finder"] is None and metrics["batch_size_finder"] is None  # as README says: null when not asked for
    assert [rung["strategy"] for rung in search["rungs"]] == RUNGS
    assert all(rung["status"] == "trained" for rung in search["rungs"]), search["rungs"]
    for rung in search["rungs"]:
        assert 0 <= rung["accuracy"] <= 1 and rung["seconds"] > 0 and 1 <= rung["best_epoch"] <= rung["epochs"] <= 3
    assert search["rungs"][0]["epochs"] == 1  # the frozen head: fitted by the solver, evaluated once
    # the ladder's own patience: 1 epoch for these text rungs, whose epochs are not mixed with their start
    assert search["early_stopping_patience"] is None and search["time_budget"] is None
    assert search["rules"]["patience"].startswith("a rung stops after 1 epoch(s) without a better accuracy")
    assert [rung["patience"] for rung in search["rungs"]] == [1, 1, 1, 1]
    assert search["tie_tolerance"] == pytest.approx(0.5 / 60)
    winner = next(rung for rung in search["rungs"] if rung["strategy"] == search["winner"])
    best = max(rung["accuracy"] for rung in search["rungs"])
    assert winner["accuracy"] >= best - search["tie_tolerance"]
    assert summary["strategy"] == search["winner"] and summary["eval"]["accuracy"] == winner["accuracy"]
    assert search["winner"] in search["why"]

    card = (out / "README.md").read_text()
    assert "How the strategy was chosen" in card and search["why"] in card
    for rung in search["rungs"]:
        assert f"| {rung['strategy']} | trained" in card and f"{rung['accuracy']:.4f}" in card
    # each rung's log in the scratch folder; the output's own log is the winner's
    logs = {strategy: (out / "ladder" / strategy / "log.jsonl").read_text() for strategy in RUNGS}
    assert (out / "log.jsonl").read_text() == logs[search["winner"]]


def test_the_winners_folder_is_that_strategys_run(text_auto, tmp_path):
    summary, out, _ = text_auto
    winner = summary["strategy_search"]["winner"]
    # on the random tiny BERT the keyword already separates the frozen features; fine-tuning at this lr does not gain
    assert winner == "freeze_backbone"
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["strategy"]["name"] == winner and saved["training"]["time_budget"] is None
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer_config.json"}
    assert not (out / "adapter_config.json").exists()

    from transformers import pipeline

    classify = pipeline("text-classification", model=str(out))
    labels = [p["label"] for p in classify([f"the film was {POSITIVE}", f"the film was {NEGATIVE}"])]
    assert labels == ["positive", "negative"]

    # the rung trained from the pretrained weights, seeded as a run of its own: its recipe.yaml repeats it
    again = dict(saved, output={"dir": str(tmp_path / "again")})
    alone = run_training(recipe_from_dict(again))
    assert alone["eval"]["accuracy"] == summary["eval"]["accuracy"]
    assert alone["history"] == summary["history"]


def test_successive_halving_stops_the_lower_half_and_the_rung_that_goes_on_trains_as_it_would_alone(
        tiny_bert_dir, keyword_data, tmp_path):
    from hf_transfer.ladder.search import rung_recipe

    out = tmp_path / "out"
    recipe = recipe_from_dict(text_recipe(tiny_bert_dir, keyword_data, out, strategy={"name": "auto"},
                                          training={"epochs": 4, "early_stopping_patience": 4,
                                                    "mixed_precision": "no"}))  # fp32: the same numbers on any CPU
    search = run_ladder(recipe)["strategy_search"]
    rungs = {rung["strategy"]: rung for rung in search["rungs"]}
    tuned = [rungs[name] for name in RUNGS[1:]]
    # on this data the three tie after epoch 1 (all go on), then full, then lora fall behind partial
    halted = {rung["strategy"]: rung["epochs"] for rung in tuned if "successive halving" in (rung["halted"] or "")}
    assert halted == {"full": 2, "lora": 3}, search["rungs"]
    assert rungs["partial"]["epochs"] == 4 and rungs["partial"]["halted"] is None
    assert search["winner"] == "partial" and "halving" in search["rules"]
    assert not list(out.glob("ladder/*/checkpoints"))  # removed once each rung was done

    # partial paused after epochs 1, 2 and 3 and was resumed from its checkpoint each time: its epochs are
    # exactly those of the same rung run alone, from start to end
    alone = rung_recipe(recipe, "partial")
    alone = run_training(dataclasses.replace(alone, output=dataclasses.replace(alone.output, dir=str(tmp_path / "alone"))))
    logged = [json.loads(line) for line in (out / "ladder" / "partial" / "log.jsonl").read_text().splitlines()]
    assert [record for record in logged if "accuracy" in record] == alone["history"]
    assert json.loads((out / "metrics.json").read_text())["history"] == alone["history"]


def test_a_budget_smaller_than_anything_keeps_the_frozen_head_and_says_so(tiny_bert_dir, keyword_data, tmp_path, capsys):
    from hf_transfer.cli import main

    out = tmp_path / "out"
    recipe = text_recipe(tiny_bert_dir, keyword_data, out, strategy={"name": "auto"}, training={"time_budget": 0.001})
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", "--recipe", str(path)]) == 0  # the command goes through the ladder
    printed = capsys.readouterr().out
    assert "time budget of 0.001 s was exceeded by the frozen rung" in printed

    search = json.loads((out / "metrics.json").read_text())["strategy_search"]
    assert search["winner"] == "freeze_backbone" and search["budget_exceeded"] is True
    assert [rung["status"] for rung in search["rungs"]] == ["trained", "skipped", "skipped", "skipped"]
    assert all("time budget is spent" in rung["reason"] for rung in search["rungs"][1:])
    assert yaml.safe_load((out / "recipe.yaml").read_text())["strategy"]["name"] == "freeze_backbone"
    assert "the budget was exceeded" in (out / "README.md").read_text()


def test_auto_on_a_cnn_skips_lora_saying_why_and_a_tie_goes_to_the_frozen_head(tmp_path):
    import timm

    colours = write_colour_folder(tmp_path / "colours")  # the colour decides: the frozen head already gets all
    out = tmp_path / "out"
    # the fine-tuning rungs evaluated on weights halfway between their start and the fine-tuned ones
    recipe = image_recipe(colours, out, strategy={"name": "auto", "trainable_blocks": 1},
                          training={"epochs": 2, "weight_interpolation": 0.5})
    summary = run_ladder(recipe_from_dict(recipe))

    rungs = {rung["strategy"]: rung for rung in summary["strategy_search"]["rungs"]}
    # the ladder's patience counts 1 / share epochs where the evaluated weights move only that share as far
    assert (rungs["freeze_backbone"]["patience"], rungs["partial"]["patience"], rungs["full"]["patience"]) == (1, 2, 2)
    assert rungs["lora"]["status"] == "skipped" and "no default LoRA targets" in rungs["lora"]["reason"]
    assert "strategy.lora.target_modules" in rungs["lora"]["reason"]
    assert rungs["freeze_backbone"]["accuracy"] == 1.0
    tied = [name for name in ("partial", "full") if rungs[name]["accuracy"] == 1.0]
    assert tied, rungs  # a costlier rung reached the same: the tie goes to the cheaper frozen head
    assert summary["strategy_search"]["winner"] == "freeze_backbone"
    assert "a tie goes to the cheaper rung" in summary["strategy_search"]["why"]
    assert "no default LoRA targets" in (out / "README.md").read_text()

    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # a freeze_backbone run's folder
    assert reloaded.pretrained_cfg["label_names"] == ["blue", "red"]
    with torch.no_grad():
        assert reloaded(random_batch()).shape == (4, 2)


# ------------------------------------------------------------------ the rules


def test_the_ladders_patience_counts_the_share_of_the_movement_an_epoch_is_evaluated_on():
    from hf_transfer.ladder.rules import rung_patience

    assert [rung_patience(share) for share in (None, 1.0, 0.5, 0.3)] == [1, 1, 2, 4]


def test_a_tie_within_half_a_validation_example_goes_to_the_cheaper_rung():
    tolerance = tie_tolerance(40)  # 0.0125
    results = [trained("freeze_backbone", 0.9), trained("lora", 0.9), trained("partial", 0.91), trained("full", 0.85)]
    winner, why = pick_winner(results, tolerance, "accuracy")
    assert winner.strategy == "freeze_backbone" and "partial's 0.9100" in why and "tie goes to the cheaper" in why

    results[2] = trained("partial", 0.925)  # one validation example more: a real gain
    assert pick_winner(results, tolerance, "accuracy")[0].strategy == "partial"

    # the tolerance is measured from the best, not from the rung that was best before
    chain = [trained("freeze_backbone", 0.80), trained("lora", 0.81), trained("partial", 0.815)]
    assert pick_winner(chain, tolerance, "accuracy")[0].strategy == "lora"


def test_halving_keeps_the_better_half_rounded_up_and_ties_with_the_last_kept():
    lora, partial, full = trained("lora", 0.80), trained("partial", 0.90), trained("full", 0.85)
    going_on, stopping = halve([lora, partial, full], tolerance=0.001)
    assert [r.strategy for r in going_on] == ["partial", "full"] and [r.strategy for r in stopping] == ["lora"]
    going_on, stopping = halve([partial, full], tolerance=0.001)
    assert [r.strategy for r in going_on] == ["partial"] and [r.strategy for r in stopping] == ["full"]
    tied = trained("full", 0.8995)  # within the tolerance of the last one kept: it goes on too
    assert [r.strategy for r in halve([lora, partial, tied], tolerance=0.001)[0]] == ["partial", "full"]
    assert halve([lora], tolerance=0.001) == ([lora], [])
    # one more epoch must fit what is left of the budget, at the rung's own seconds per epoch (10 s here)
    rung = trained("full", 0.9, seconds=20.0, epochs=2)
    assert continue_blocker(rung, spent=50.0, budget=None) is None
    assert continue_blocker(rung, spent=50.0, budget=60.0) is None
    assert "one more epoch (10.0 s) would end past it" in continue_blocker(rung, spent=50.5, budget=60.0)


def test_a_rung_that_would_not_fit_the_budget_is_skipped_by_the_stated_estimate():
    frozen = RungResult("freeze_backbone", "trained", score=0.8, epochs=1, seconds=4.0, pass_seconds=1.0)
    # the frozen rung again (build, head fit) + 3 epochs x 3 forward passes' work
    assert estimated_seconds([frozen], epochs=3)[0] == pytest.approx(4.0 + 3 * 3 * 1.0)
    assert budget_blocker([frozen], epochs=3, spent=4.0, budget=20) is None
    assert "estimated 13.0 s" in budget_blocker([frozen], epochs=3, spent=4.0, budget=15)
    lora = trained("lora", 0.8, seconds=20.0, epochs=2)  # 10 s per epoch measured: the next estimate
    assert estimated_seconds([frozen, lora], epochs=3)[0] == pytest.approx(30.0)
    assert budget_blocker([frozen, lora], epochs=3, spent=24.0, budget=60) is None
    assert "of lora" in budget_blocker([frozen, lora], epochs=3, spent=24.0, budget=50)
    cached = RungResult("freeze_backbone", "trained", score=0.8, epochs=1, seconds=0.5, pass_seconds=None)
    assert estimated_seconds([cached], epochs=3)[0] is None  # no pass measured: the rung starts, the deadline guards
    assert budget_blocker([cached], epochs=3, spent=0.5, budget=10) is None
    assert budget_blocker([frozen], epochs=3, spent=5.0, budget=None) is None
    assert "time budget is spent" in budget_blocker([frozen], epochs=3, spent=5.0, budget=5.0)


def test_the_deadline_stops_a_rung_after_the_epoch_past_which_the_next_would_not_fit():
    import time
    from types import SimpleNamespace

    from hf_transfer.training.callbacks import Deadline

    def loop(epochs_done: int) -> SimpleNamespace:
        return SimpleNamespace(state=SimpleNamespace(history=[{}] * epochs_done), config=SimpleNamespace(epochs=5),
                               stop=False, accelerator=SimpleNamespace(print=lambda *_: None))

    far, near = Deadline(time.perf_counter() + 3600), Deadline(time.perf_counter() + 0.05)
    for deadline in (far, near):
        deadline.on_train_begin(None)
    time.sleep(0.03)  # one epoch of 0.03 s: a second one would end past the near deadline
    running, stopped = loop(1), loop(1)
    far.on_epoch_end(running, {})
    near.on_epoch_end(stopped, {})
    assert not running.stop and far.stopped_at is None
    assert stopped.stop and near.stopped_at == 1

    # a resumed run: the three epochs of its history from before do not shorten the mean of the one run here
    resumed = Deadline(time.perf_counter() + 0.05)
    resumed.on_train_begin(None)
    resumed.on_epoch_begin(loop(3), 3)
    time.sleep(0.03)
    late = loop(4)
    resumed.on_epoch_end(late, {})
    assert late.stop and resumed.stopped_at == 4


def test_recipes_that_auto_cannot_serve_are_refused_before_anything_runs(tiny_bert_dir, keyword_data, tmp_path):
    def recipe(**sections):
        return recipe_from_dict(text_recipe(tiny_bert_dir, keyword_data, tmp_path / "out", **sections))

    with pytest.raises(HfTransferError, match="time_budget bounds the search of strategy auto"):
        recipe(training={"time_budget": 60})
    with pytest.raises(HfTransferError, match="training.time_budget must be more than 0"):
        recipe(strategy={"name": "auto"}, training={"time_budget": 0})
    with pytest.raises(HfTransferError, match="cache_features true .* strategy auto's lora, partial and full"):
        recipe(strategy={"name": "auto"}, training={"cache_features": True})
    with pytest.raises(HfTransferError, match="head_first is true.*strategy auto"):
        recipe(strategy={"name": "auto", "head_first": True})
    with pytest.raises(HfTransferError, match="strategy auto trains several strategies"):
        run_training(recipe(strategy={"name": "auto"}))
    with pytest.raises(HfTransferError, match="does not resume"):
        run_ladder(recipe(strategy={"name": "auto"}), resume="latest")
    assert not (tmp_path / "out").exists()


def test_a_rung_out_of_memory_fails_alone_and_the_cheaper_winner_is_saved(tiny_bert_dir, keyword_data, tmp_path,
                                                                          monkeypatch):
    import hf_transfer.ladder.search as search

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(search, "train", out_of_memory)  # every fine-tuning rung; the frozen one uses its solver
    out = tmp_path / "out"
    summary = run_ladder(recipe_from_dict(text_recipe(tiny_bert_dir, keyword_data, out, strategy={"name": "auto"})))

    rungs = summary["strategy_search"]["rungs"]
    assert [rung["status"] for rung in rungs] == ["trained", "failed", "failed", "failed"]
    assert all("out of memory: a smaller training.batch_size" in rung["reason"] for rung in rungs[1:])
    assert summary["strategy_search"]["winner"] == "freeze_backbone"
    assert json.loads((out / "metrics.json").read_text())["strategy"] == "freeze_backbone"


def test_the_lora_rung_trains_at_a_larger_rate_and_the_others_at_the_recipes():
    from hf_transfer.ladder.rules import LORA_LR_SCALE
    from hf_transfer.ladder.search import rung_recipe
    from hf_transfer.recipe import recipe_from_dict

    recipe = recipe_from_dict({"task": "text", "model": {"name": "x"}, "strategy": {"name": "auto"},
                               "training": {"lr": 1e-4, "backbone_lr": 2e-5, "head_lr": 1e-3}})
    lora = rung_recipe(recipe, "lora").training
    assert (lora.lr, lora.backbone_lr, lora.head_lr) == pytest.approx((1e-4 * LORA_LR_SCALE, 2e-5 * LORA_LR_SCALE, 1e-3))
    full = rung_recipe(recipe, "full").training
    assert (full.lr, full.backbone_lr, full.head_lr) == (1e-4, 2e-5, 1e-3)
