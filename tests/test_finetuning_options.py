"""Fine-tuning options: layer-wise learning-rate decay, an EMA of the weights, the interpolation with the start."""

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


def test_a_resumed_runs_weight_average_starts_from_the_resumed_weights():
    from types import SimpleNamespace

    from hf_transfer.training.callbacks import WeightAveraging

    model = torch.nn.Linear(3, 2)
    loop = SimpleNamespace(model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    averaging = WeightAveraging(decay=0.9)
    averaging.on_train_begin(loop)
    with torch.no_grad():  # what a checkpoint's restore does after the callbacks before it began
        model.weight.fill_(7.0)
    averaging.on_epoch_begin(loop, 1)
    assert torch.equal(averaging.average.module.weight, model.weight)


def test_interpolated_weights_are_evaluated_and_saved_halfway_between_start_and_live(tiny_bert_dir, keyword_data, tmp_path):
    out = tmp_path / "out"
    training = {"epochs": 1, "lr": 1e-3, "weight_interpolation": 0.25, "save_checkpoints": True}
    summary = train(tiny_bert_dir, keyword_data, out, strategy={"name": "full"}, training=training)
    saved = load_file(str(out / "model.safetensors"))
    live = load_file(str(sorted((out / "checkpoints").iterdir())[-1] / "model.safetensors"))
    live = {name.removeprefix("model."): value for name, value in live.items()}
    start = load_file(str(tiny_bert_dir / "model.safetensors"))
    # (not the word embeddings: a checkpoint holds the rows the training texts use, training.compact_embeddings)
    for key in ("encoder.layer.1.attention.self.query.weight", "embeddings.position_embeddings.weight"):
        moved = live[f"bert.{key}"] - start[key]
        assert moved.abs().max() > 1e-4  # fine-tuning moved it, so the mix below can fail
        assert torch.allclose(saved[f"bert.{key}"], start[key] + 0.25 * moved, atol=1e-6)

    from hf_transfer.inference.evaluate import evaluate_saved_model

    again = evaluate_saved_model(out, str(keyword_data), split="validation").metrics
    assert again["accuracy"] == pytest.approx(summary["eval"]["accuracy"])
    assert "0.75 x the weights fine-tuning started from + 0.25 x the fine-tuned ones" in (out / "README.md").read_text()


def test_a_run_resumed_with_an_interpolation_scores_its_epochs_as_the_uninterrupted_run(tiny_bert_dir, keyword_data, tmp_path):
    from test_text import text_recipe

    from hf_transfer.recipe import recipe_from_dict
    from hf_transfer.run import run_training

    out = tmp_path / "out"
    sections = {"strategy": {"name": "full"}, "output": {"save_total_limit": 2},
                "training": {"epochs": 2, "lr": 1e-3, "weight_interpolation": 0.5, "save_checkpoints": True,
                             "mixed_precision": "no"}}
    whole = run_training(recipe_from_dict(text_recipe(tiny_bert_dir, keyword_data, out, **sections)))
    first_epoch = min((out / "checkpoints").iterdir(), key=lambda path: int(path.name.split("-")[1]))
    resumed = run_training(recipe_from_dict(text_recipe(tiny_bert_dir, keyword_data, out, **sections)),
                           resume=str(first_epoch))
    assert resumed["history"] == whole["history"]  # the second epoch mixed with the same start as before


def test_a_resumed_runs_interpolation_starts_from_the_weights_the_plan_built():
    from types import SimpleNamespace

    from hf_transfer.training.callbacks import WeightInterpolation

    model = torch.nn.Linear(3, 2)
    built = model.weight.detach().clone()
    loop = SimpleNamespace(model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    interpolation = WeightInterpolation(share=0.5)
    interpolation.on_train_begin(loop)
    with torch.no_grad():  # what a checkpoint's restore does after this callback began
        model.weight.fill_(7.0)
    interpolation.on_update(loop, end_of_epoch=True)
    assert torch.allclose(model.weight, (built + 7.0) / 2)
    interpolation.on_epoch_end(loop, {})
    assert torch.equal(model.weight, torch.full_like(built, 7.0))  # training goes on from the live weights

    # and the loop calls it before the checkpoint's restore: it comes first in the list
    from hf_transfer.recipe import TrainingConfig
    from hf_transfer.training.callbacks import Checkpointing, recipe_callbacks

    plan = SimpleNamespace(epoch_rule="best")
    kinds = [type(c) for c in recipe_callbacks(TrainingConfig(weight_interpolation=0.5), plan, checkpoints=object())]
    assert kinds.index(WeightInterpolation) < kinds.index(Checkpointing)


@pytest.mark.parametrize(("sections", "message"), [
    ({"training": {"weight_interpolation": 0.5, "ema_decay": 0.99}},
     "training.ema_decay and training.weight_interpolation each choose the weights"),
    ({"training": {"weight_interpolation": 0.5}, "strategy": {"name": "freeze_backbone"}},
     "strategy freeze_backbone never moves it"),
])
def test_an_interpolation_the_run_cannot_honour_is_one_clear_error(tiny_bert_dir, keyword_data, tmp_path, sections, message):
    from test_text import text_recipe

    from hf_transfer.errors import HfTransferError
    from hf_transfer.recipe import recipe_from_dict

    values = text_recipe(tiny_bert_dir, keyword_data, tmp_path / "out")
    for section, setting in sections.items():
        values[section] = {**values.get(section, {}), **setting}
    with pytest.raises(HfTransferError, match=message):
        recipe_from_dict(values)
    assert not (tmp_path / "out").exists()


def test_head_first_starts_fine_tuning_from_the_fitted_probe(tiny_bert_dir, keyword_data, tmp_path):
    # a learning rate too small to move anything: what the run ends with is where fine-tuning started
    still = {"epochs": 1, "lr": 1e-12, "warmup_ratio": 0.0}
    fitted = train(tiny_bert_dir, keyword_data, tmp_path / "first", strategy={"name": "full", "head_first": True}, training=still)
    plain = train(tiny_bert_dir, keyword_data, tmp_path / "plain", strategy={"name": "full", "head_first": False}, training=still)

    record = fitted["head_first"]
    assert record["cv_folds"] == 5 and record["feature_cache"]["computed"] == ["train", "validation"]
    assert fitted["eval"]["accuracy"] == pytest.approx(record["accuracy"])  # the probe's score, recorded before training
    assert record["accuracy"] >= 0.8 and record["accuracy"] > plain["eval"]["accuracy"] + 0.2
    assert "head_first" not in plain
    card = (tmp_path / "first" / "README.md").read_text()
    assert "fitted first on the frozen backbone's features" in card


def test_head_first_true_where_it_cannot_apply_is_one_clear_error(tiny_bert_dir, keyword_data, tmp_path):
    from hf_transfer.errors import HfTransferError

    with pytest.raises(HfTransferError, match="strategy.head_first is true, but strategy lora wraps the head"):
        train(tiny_bert_dir, keyword_data, tmp_path / "out", strategy={"name": "lora", "head_first": True})
    assert not (tmp_path / "out").exists()



def test_head_first_auto_fits_the_head_first_for_images_and_not_for_text(tiny_bert_dir, keyword_data, tmp_path):
    from test_vision import image_recipe, write_colour_folder

    from hf_transfer.recipe import recipe_from_dict
    from hf_transfer.run import run_training

    colours = write_colour_folder(tmp_path / "colours")
    image = run_training(recipe_from_dict(image_recipe(colours, tmp_path / "image")))  # full, head_first by default
    assert image["head_first"]["accuracy"] >= 0.9  # the colour decides: the probe alone gets it
    text = train(tiny_bert_dir, keyword_data, tmp_path / "text", strategy={"name": "full"})
    assert "head_first" not in text
    # weight_interpolation auto mixes back only towards a probe fitted on pretrained weights: not this random CNN's
    assert image["weight_interpolation"] is None and text["weight_interpolation"] is None
    assert "fine-tuning started from" not in (tmp_path / "text" / "README.md").read_text()


def test_weight_interpolation_auto_mixes_halfway_back_where_a_pretrained_backbone_got_its_head_first(
        tiny_bert_dir, keyword_data, tmp_path):
    from types import SimpleNamespace

    from hf_transfer.recipe import TrainingConfig
    from hf_transfer.training.callbacks import interpolation_share

    probe_start, zero_start = SimpleNamespace(starts_from_probe=True), SimpleNamespace(starts_from_probe=False)
    assert interpolation_share(TrainingConfig(), probe_start) == 0.5
    assert interpolation_share(TrainingConfig(), zero_start) is None
    assert interpolation_share(TrainingConfig(ema_decay=0.99), probe_start) is None  # the average was asked for
    assert interpolation_share(TrainingConfig(weight_interpolation=0.3), zero_start) == 0.3
    assert interpolation_share(TrainingConfig(weight_interpolation=None), probe_start) is None

    # a run whose head is fitted first on loaded weights (tiny_bert_dir stands in for a pretrained encoder)
    summary = train(tiny_bert_dir, keyword_data, tmp_path / "out", strategy={"name": "full", "head_first": True},
                    training={"epochs": 1})
    assert summary["weight_interpolation"] == 0.5
    assert "0.5 x the weights fine-tuning started from + 0.5 x the fine-tuned ones" in (tmp_path / "out" / "README.md").read_text()

class _Step:
    """What BatchMixing reads of a running loop: the epoch, the batch and the process."""

    def __init__(self, batches_done: int):
        self.epoch, self.state = 0, type("State", (), {"batches_done": batches_done})()
        self.accelerator = type("Accelerator", (), {"process_index": 0})()


def test_mixing_blends_images_and_labels_reproducibly_and_keeps_an_odd_one_out():
    from hf_transfer.recipe import AugmentConfig
    from hf_transfer.training.mixing import BatchMixing

    images = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1])
    mixing = BatchMixing(AugmentConfig(mixup=0.4), num_classes=3, seed=7)
    batch = mixing.on_batch(_Step(3), {"pixel_values": images, "labels": labels})

    targets = batch["labels"]
    assert targets.shape == (5, 3) and torch.allclose(targets.sum(-1), torch.ones(5))
    assert not torch.equal(targets[:4], torch.nn.functional.one_hot(labels[:4], 3).float())  # soft targets
    assert torch.equal(targets[4], torch.tensor([0.0, 1.0, 0.0])) and torch.equal(batch["pixel_values"][4], images[4])
    assert not torch.equal(batch["pixel_values"][:4], images[:4]) and torch.equal(images, images.clone())  # input untouched
    # the same step draws the same mix (a resumed run), another step another mix
    again = mixing.on_batch(_Step(3), {"pixel_values": images, "labels": labels})
    other = mixing.on_batch(_Step(4), {"pixel_values": images, "labels": labels})
    assert torch.equal(again["labels"], targets) and not torch.equal(other["labels"], targets)
    # a batch of one class stays that class, whatever the mix
    same = mixing.on_batch(_Step(5), {"pixel_values": images[:4], "labels": torch.zeros(4, dtype=torch.long)})
    assert torch.equal(same["labels"], torch.tensor([[1.0, 0.0, 0.0]] * 4))


def test_mixup_trains_an_image_model_without_the_feature_cache(tmp_path):
    from test_vision import image_recipe, train_capturing, write_colour_folder

    colours = write_colour_folder(tmp_path / "colours")
    recipe = image_recipe(colours, tmp_path / "out", strategy={"name": "freeze_backbone"},
                          data={"augment": {"mixup": 0.4, "cutmix": 1.0}}, training={"epochs": 3})
    summary, _, _ = train_capturing(recipe)
    assert summary["feature_cache"] is None  # cached features cannot be blended: the loop ran on images
    assert summary["eval"]["accuracy"] > 0.9


@pytest.mark.parametrize(("sections", "message"), [
    ({"task": "text"}, "data.augment.mixup / cutmix blend images; task text has none"),
    ({"training": {"cache_features": True}}, "cached features cannot stand in for them"),
])
def test_mixing_where_it_cannot_apply_is_one_clear_error(sections, message, tmp_path):
    from test_vision import image_recipe

    from hf_transfer.errors import HfTransferError
    from hf_transfer.recipe import recipe_from_dict

    recipe = image_recipe(tmp_path, tmp_path / "out", data={"augment": {"mixup": 0.2}}, **sections)
    with pytest.raises(HfTransferError, match=message):
        recipe_from_dict(recipe)
