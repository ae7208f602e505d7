"""training.lr auto (the learning-rate range test) and training.batch_size auto (the largest batch that fits)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image
from test_text import text_recipe, train
from torch import nn

from hf_transfer.cache.head import CachedFeatures, cached_loader
from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import TrainingConfig, recipe_from_dict
from hf_transfer.run import run_training
from hf_transfer.sources.base import TransferModel
from hf_transfer.sources.text import TextClassifier
from hf_transfer.training import auto, batch_finder
from hf_transfer.training.batch_finder import (
    largest_fitting_batch,
    settle_batch,
    smaller_batch,
)
from hf_transfer.training.lr_finder import lr_range_test, valley
from hf_transfer.training.optim import build_optimizer
from hf_transfer.training.plan import Plan

# ---------------------------------------------------------------------------------------------
# A tiny problem whose good learning rate a grid search can find: two Gaussian classes, a linear head


class TinyClassifier(TransferModel):
    """BatchNorm (running statistics to keep) and dropout (random draws to keep) in front of a linear head."""

    input_names = ("features",)

    def __init__(self, dim: int = 16, batch_norm: bool = True, dropout: float = 0.0):
        super().__init__()
        self.model = nn.Sequential(nn.BatchNorm1d(dim) if batch_norm else nn.Identity(), nn.Dropout(dropout),
                                   nn.Linear(dim, 2))
        self.head_modules, self.head_prefixes, self.block_prefixes = ["2"], ["model.2."], [["model.0."]]
        self.label_names = ["a", "b"]
        self.oom_above: int | None = None  # batch sizes above this raise CUDA's out-of-memory error in training

    def forward(self, features: torch.Tensor, **_unused: torch.Tensor) -> torch.Tensor:
        if self.training and self.oom_above is not None and len(features) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.model(features)


def two_classes(count: int = 512, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=generator)
    labels = torch.arange(count) % 2
    features = torch.randn(count, dim, generator=generator) + (2 * labels[:, None] - 1) * 1.5 * direction / direction.norm()
    return features, labels


def tiny_plan(model: TinyClassifier, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 32) -> Plan:
    data = CachedFeatures([features], labels)
    return Plan(
        model=model, train_loader=cached_loader(data, batch_size, True, 0), eval_loader=cached_loader(data, 64, False, 0),
        label_names=model.label_names, train_labels=labels.tolist(), save=lambda _folder: None,
        train_loader_for=lambda size: cached_loader(data, size, True, 0),
    )


def final_loss_after(model: TinyClassifier, config: TrainingConfig, features, labels, steps: int = 50) -> float:
    """The full-data loss after `steps` training steps at config.lr: the grid search's score."""
    model.train()
    optimizer = build_optimizer(model, config, include_frozen=False)
    loader, done = cached_loader(CachedFeatures([features], labels), config.batch_size, True, 0), 0
    while done < steps:
        for batch in loader:
            F.cross_entropy(model(features=batch["features"]), batch["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == steps:
                break
    model.eval()
    with torch.no_grad():
        loss = float(F.cross_entropy(model(features=features), labels))
    return loss if math.isfinite(loss) else math.inf


def test_the_range_test_leaves_weights_batch_norm_statistics_modes_and_rng_as_they_were():
    features, labels = two_classes()
    torch.manual_seed(0)
    model = TinyClassifier(dropout=0.1)
    model.eval()  # a mode the test must put back (it trains in train mode)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()

    test = lr_range_test(tiny_plan(model, features, labels), TrainingConfig(batch_size=32), Accelerator(cpu=True))

    assert len(test.lrs) > 50  # it trained: the loss only diverges at a large rate
    after = model.state_dict()
    assert set(after) == set(before)
    for name, value in before.items():  # BatchNorm's running mean, variance and batch count included
        assert torch.equal(after[name], value), name
    assert int(after["model.0.num_batches_tracked"]) == 0
    assert not model.training and not model.model[0].training
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_range_test_suggests_a_rate_within_a_decade_of_the_grid_searched_best():
    features, labels = two_classes()
    torch.manual_seed(0)
    start = TinyClassifier(batch_norm=False)
    config = TrainingConfig(batch_size=32, weight_decay=0.0, max_grad_norm=None)  # adamw, the default optimiser
    grid = [10.0 ** (exponent / 2) for exponent in range(-12, 3)]  # 1e-6 ... 10, half decades
    scores = {lr: final_loss_after(copy.deepcopy(start), dataclasses.replace(config, lr=lr), features, labels)
              for lr in grid}
    best = min(scores, key=scores.get)

    found = lr_range_test(tiny_plan(copy.deepcopy(start), features, labels), config, Accelerator(cpu=True)).lr

    assert 1e-3 <= best <= 1.0  # the problem is what it claims: neither end of the grid wins
    assert abs(math.log10(found / best)) <= 1.0, (found, best, scores)
    assert scores[min(grid, key=lambda lr: abs(math.log10(lr / found)))] < 0.5 * scores[grid[0]]  # and it trains


def test_valley_is_halfway_along_the_longest_fall():
    curve = [5, 5, 4, 3, 2, 1, 0, 3, 9]
    assert valley(curve) == 3  # the fall runs from index 1 (5) to 6 (0)


# ---------------------------------------------------------------------------------------------
# training.lr auto in a run


def test_lr_auto_records_and_draws_the_rate_and_trains_as_a_run_given_it(tiny_bert_dir, keyword_data, tmp_path, monkeypatch):
    plain_head = {"name": "full", "head_first": False}  # a zero head: the range test reads the whole fall
    training = {"lr": "auto", "epochs": 2, "save_checkpoints": True}
    out = tmp_path / "auto"
    found = train(tiny_bert_dir, keyword_data, out, strategy=plain_head, training=training, output={"save_total_limit": 2})

    record = json.loads((out / "metrics.json").read_text())["lr_finder"]
    lr = record["lr"]
    assert record == found["lr_finder"] and 1e-5 < lr < 1.0 and "valley" in record["rule"]
    assert len(record["lrs"]) == len(record["losses"]) == record["steps"] > 20
    with Image.open(out / "lr_finder.png") as picture:  # a valid PNG, not an empty file
        assert picture.format == "PNG" and picture.size[0] > 200
        picture.verify()
    assert "lr: auto" in (out / "recipe.yaml").read_text()  # the recipe keeps auto; metrics.json has the number
    assert f"lr {lr:.3g} (training.lr auto" in (out / "README.md").read_text()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert max(r["lr"] for r in log if "lr" in r) <= lr

    # the range test left no trace: a run given the found rate trains exactly alike, epoch for epoch
    given = train(tiny_bert_dir, keyword_data, tmp_path / "given", strategy=plain_head,
                  training={**training, "lr": lr})
    assert given["lr_finder"] is None
    assert given["history"] == found["history"]

    # a resumed run takes the rate its checkpoint recorded instead of testing again
    def no_second_test(*_args, **_kwargs):
        raise AssertionError("a resumed run must not run the range test again")

    monkeypatch.setattr(auto, "lr_range_test", no_second_test)
    first_epoch = min((out / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    recipe = recipe_from_dict(text_recipe(tiny_bert_dir, keyword_data, out, strategy=plain_head, training=training,
                                          output={"save_total_limit": 2}))
    resumed = run_training(recipe, resume=str(first_epoch))
    assert resumed["lr_finder"]["lr"] == lr and resumed["history"] == found["history"]


def test_lr_auto_is_recorded_as_unused_where_the_solver_fits_the_head(tiny_bert_dir, keyword_data, tmp_path):
    out = tmp_path / "out"
    summary = train(tiny_bert_dir, keyword_data, out, strategy={"name": "freeze_backbone"},
                    training={"lr": "auto", "batch_size": "auto", "epochs": 1})
    assert summary["head_solver"]["C"] > 0  # the solver fitted the head: no loop, no learning rate
    assert summary["lr_finder"]["lr"] is None and "solver" in summary["lr_finder"]["how"]
    assert "solver" in summary["batch_size_finder"]["how"]
    assert not (out / "lr_finder.png").exists()


# ---------------------------------------------------------------------------------------------
# training.batch_size auto


@pytest.fixture
def no_cache_to_clear(monkeypatch):
    """A CPU has no device cache; accelerate's clearing of it (a full garbage collection, half a second in
    a test process full of objects) after each simulated out-of-memory error would only cost time."""
    import accelerate.utils.memory

    monkeypatch.setattr(accelerate.utils.memory, "clear_device_cache", lambda **_kwargs: None)
    monkeypatch.setattr(batch_finder, "clear_device_cache", lambda **_kwargs: None)


@pytest.mark.usefixtures("no_cache_to_clear")
def test_batch_auto_halves_on_out_of_memory_and_keeps_the_effective_batch():
    features, labels = two_classes()
    model = TinyClassifier()
    model.oom_above = 8
    before = copy.deepcopy(model.state_dict())
    config = TrainingConfig(batch_size="auto", max_batch_size=32, gradient_accumulation_steps=2)

    found = largest_fitting_batch(tiny_plan(model, features, labels, 32), config, Accelerator(cpu=True))

    assert found.tried == [32, 16, 8]
    assert (found.batch_size, found.gradient_accumulation_steps) == (8, 8)
    assert found.batch_size * found.gradient_accumulation_steps == 32 * 2
    assert all(torch.equal(model.state_dict()[name], value) for name, value in before.items())

    # a cap that is no power of two: divisors only, so the effective batch stays exact
    odd = largest_fitting_batch(tiny_plan(model, features, labels, 24), dataclasses.replace(config, max_batch_size=24),
                                Accelerator(cpu=True))
    assert odd.tried == [24, 12, 6] and odd.batch_size * odd.gradient_accumulation_steps == 24 * 2
    assert [smaller_batch(100, size) for size in (100, 50, 25, 10, 5, 2, 1)] == [50, 25, 10, 5, 2, 1, 0]

    model.oom_above = 0
    with pytest.raises(HfTransferError, match="not even a batch of 1 fits"):
        largest_fitting_batch(tiny_plan(model, features, labels, 4), dataclasses.replace(config, max_batch_size=4),
                              Accelerator(cpu=True))


def test_batch_auto_on_a_cpu_takes_at_most_32_untried_and_keeps_the_effective_batch():
    features, labels = two_classes()
    model = TinyClassifier()
    model.oom_above = 0  # any training step would fail: on a CPU nothing is tried
    config = TrainingConfig(batch_size="auto", max_batch_size=128, gradient_accumulation_steps=3)
    found = settle_batch(tiny_plan(model, features, labels), config, Accelerator(cpu=True))
    assert (found.batch_size, found.gradient_accumulation_steps, found.tried) == (32, 12, [])


@pytest.mark.usefixtures("no_cache_to_clear")
def test_batch_auto_in_a_run_trains_with_the_batch_found(tiny_bert_dir, keyword_data, tmp_path, monkeypatch):
    # a GPU, simulated: this CPU counts as a device that reports running out of memory, above 4 texts
    monkeypatch.setattr(batch_finder, "probes_memory", lambda _device: True)
    original = TextClassifier.forward

    def forward(self, **inputs):
        if self.training and len(inputs["input_ids"]) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
        return original(self, **inputs)

    monkeypatch.setattr(TextClassifier, "forward", forward)
    out = tmp_path / "out"
    summary = train(tiny_bert_dir, keyword_data, out, strategy={"head_first": False},
                    training={"batch_size": "auto", "max_batch_size": 16, "epochs": 1, "logging_steps": 1})

    found = summary["batch_size_finder"]
    assert (found["batch_size"], found["gradient_accumulation_steps"], found["effective_batch_size"]) == (4, 4, 16)
    assert found["tried"] == [16, 8, 4]
    steps = [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "step" in r]
    assert max(steps) == math.ceil(160 / 4 / 4)  # 40 batches of 4, 4 to an optimiser step
    assert "batch 4 x 1 process(es) x 4 accumulation" in (out / "README.md").read_text()
    assert "batch_size: auto" in (out / "recipe.yaml").read_text()


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("key, value", [("lr", "fast"), ("lr", [1e-3]), ("batch_size", "big"), ("batch_size", 0)])
def test_a_value_that_is_neither_a_number_nor_auto_is_one_clear_error(tiny_bert_dir, keyword_data, tmp_path, key, value):
    with pytest.raises(HfTransferError, match=f"training.{key}"):
        recipe_from_dict(text_recipe(tiny_bert_dir, keyword_data, tmp_path, training={key: value}))


def test_lr_auto_with_both_rates_given_has_nothing_to_find(tiny_bert_dir, keyword_data, tmp_path):
    with pytest.raises(HfTransferError, match="head_lr and backbone_lr are both set"):
        recipe_from_dict(text_recipe(tiny_bert_dir, keyword_data, tmp_path,
                                     training={"lr": "auto", "head_lr": 1e-3, "backbone_lr": 1e-5}))
    # one of them given: the other part trains at the rate found
    recipe = recipe_from_dict(text_recipe(tiny_bert_dir, keyword_data, tmp_path, training={"lr": "auto", "backbone_lr": 1e-5}))
    assert recipe.training.lr == "auto"
