"""Speed features keep results: length-grouped batching, the frozen-feature cache, CUDA graph steps."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import keyword_sentences, write_jsonl

from hf_transfer.cache.store import FeatureKey, FeatureStore, weights_digest
from hf_transfer.data.sampling import LengthGroupedBatchSampler, PadToMultipleCollator
from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import recipe_from_dict
from hf_transfer.run import run_training


def text_recipe(model_dir: Path, data_dir: Path, output_dir: Path, **training) -> dict:
    return {
        "name": "speed",
        "task": "text",
        "model": {"name": str(model_dir)},
        "data": {"path": str(data_dir), "max_length": 32},
        "strategy": {"name": "freeze_backbone"},
        "head": {"solver": "loop"},  # these tests compare the loop on cached and on live features
        "training": {"epochs": 3, "batch_size": 16, "lr": 1e-2, "seed": 0, "logging_steps": 100,
                     "feature_cache_dir": str(output_dir.parent / "cache"), **training},
        "output": {"dir": str(output_dir), "overwrite": True},
    }



def train_text(model_dir: Path, data_dir: Path, output_dir: Path, **training) -> dict:
    return run_training(recipe_from_dict(text_recipe(model_dir, data_dir, output_dir, **training)))


# ------------------------------------------------------------------ batching


@pytest.mark.parametrize("count,batch_size", [(1, 4), (37, 8), (1000, 32), (64, 64)])
def test_length_grouped_batches_hold_every_index_once_per_epoch(count: int, batch_size: int) -> None:
    lengths = [random.Random(i).randint(1, 60) for i in range(count)]
    for shuffle in (True, False):
        sampler = LengthGroupedBatchSampler(lengths, batch_size, shuffle=shuffle, seed=3)
        epochs = [list(sampler) for _ in range(3)]
        for batches in epochs:
            flat = [i for batch in batches for i in batch]
            assert sorted(flat) == list(range(count))  # nothing dropped, nothing twice
            assert len(batches) == len(sampler)
            assert sum(len(b) < batch_size for b in batches) <= 1
        if shuffle and count > batch_size:
            assert epochs[0] != epochs[1]  # a new order every epoch
            sampler.set_epoch(0)
            assert list(sampler) == epochs[0]  # and the same order for the same seed and epoch


def test_length_grouped_batches_carry_little_padding() -> None:
    rng = random.Random(0)
    lengths = [max(1, int(rng.lognormvariate(2.5, 0.5))) for _ in range(4000)]

    def padding_efficiency(batches) -> float:
        return sum(lengths) / sum(len(b) * max(lengths[i] for i in b) for b in batches)

    grouped = list(LengthGroupedBatchSampler(lengths, 32, shuffle=True, seed=0))
    order = list(range(len(lengths)))
    rng.shuffle(order)
    random_batches = [order[i:i + 32] for i in range(0, len(order), 32)]
    # windows keep batches varied (data.length_window) yet pad far less than random batches
    assert padding_efficiency(grouped) > 0.6 > 0.45 > padding_efficiency(random_batches)
    assert max(lengths[i] for i in grouped[0]) == max(lengths)  # the longest batch comes first


def test_pad_collator_matches_transformers_collator(tiny_bert_dir: Path) -> None:
    from transformers import AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = [row["text"] for row in keyword_sentences(20, seed=5)]
    encoded = tokenizer(texts, truncation=True, max_length=32)
    examples = [{**{k: v[i] for k, v in encoded.items()}, "labels": i % 2} for i in range(len(texts))]
    for side in ("right", "left"):
        tokenizer.padding_side = side
        expected = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8, return_tensors="pt")(examples)
        actual = PadToMultipleCollator(tokenizer.pad_token_id, 8, side)(examples)
        assert actual.keys() == expected.keys()
        for key in expected:
            assert torch.equal(actual[key], expected[key]), (side, key)


# ------------------------------------------------------------------ frozen-feature cache


def test_cache_hits_misses_and_invalidates_on_data_change(tiny_bert_dir: Path, keyword_data: Path, tmp_path: Path) -> None:
    first = train_text(tiny_bert_dir, keyword_data, tmp_path / "first")
    assert first["feature_cache"] == {"hits": [], "computed": ["validation", "train"]}
    second = train_text(tiny_bert_dir, keyword_data, tmp_path / "second")
    assert second["feature_cache"] == {"hits": ["validation", "train"], "computed": []}
    assert second["eval"]["accuracy"] == first["eval"]["accuracy"]  # a hit trains exactly like a miss

    changed = tmp_path / "changed"
    rows = keyword_sentences(160, seed=1)
    rows[7]["text"] = "the staff again"  # one training sentence differs
    write_jsonl(changed / "train.jsonl", rows)
    (changed / "validation.jsonl").write_text((keyword_data / "validation.jsonl").read_text())
    third = train_text(tiny_bert_dir, changed, tmp_path / "third")
    assert third["feature_cache"] == {"hits": ["validation"], "computed": ["train"]}


@pytest.fixture
def tuned_encoder_dir(tiny_bert_dir: Path, keyword_data: Path, tmp_path: Path) -> Path:
    """The tiny BERT fine-tuned on the keyword rule, saved without its classifier: a source whose frozen
    features carry the rule, as a pretrained model's do (a random BERT's pooled output barely varies)."""
    from transformers import AutoModel, AutoTokenizer

    recipe = text_recipe(tiny_bert_dir, keyword_data, tmp_path / "tuned", epochs=6, lr=2e-3, warmup_ratio=0.1)
    recipe["strategy"] = {"name": "full"}
    run_training(recipe_from_dict(recipe))
    folder = tmp_path / "encoder"
    AutoModel.from_pretrained(tmp_path / "tuned").save_pretrained(folder)
    AutoTokenizer.from_pretrained(tmp_path / "tuned").save_pretrained(folder)
    return folder


def test_cached_training_matches_uncached_and_saves_the_full_model(
    tuned_encoder_dir: Path, keyword_data: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cached = train_text(tuned_encoder_dir, keyword_data, tmp_path / "cached", epochs=4)
    uncached = train_text(tuned_encoder_dir, keyword_data, tmp_path / "uncached", epochs=4, cache_features=False)
    assert uncached["feature_cache"] is None
    cached_losses = [epoch["train_loss"] for epoch in cached["history"]]
    uncached_losses = [epoch["train_loss"] for epoch in uncached["history"]]
    assert cached_losses[-1] < min(0.5, cached_losses[0])  # the new head learned
    # the uncached run has dropout inside the frozen encoder (its draws change with the batch width),
    # so the two agree closely, not bit for bit; a head on wrong features would stay near log 2 = 0.69
    np.testing.assert_allclose(cached_losses, uncached_losses, rtol=0.3)
    assert cached["eval"]["accuracy"] > 0.9
    assert abs(cached["eval"]["accuracy"] - uncached["eval"]["accuracy"]) <= 0.05

    # the saved folder is the ordinary full model, and it scores what training reported
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cached").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "cached")
    rows = [json.loads(line) for line in (keyword_data / "validation.jsonl").read_text().splitlines()]
    with torch.no_grad():
        logits = model(**tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")).logits
    predicted = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    accuracy = np.mean([p == r["label"] for p, r in zip(predicted, rows)])
    assert accuracy == pytest.approx(cached["eval"]["accuracy"])


def test_cache_true_is_an_error_where_the_cache_cannot_serve(tiny_bert_dir: Path, keyword_data: Path, tmp_path: Path) -> None:
    recipe = text_recipe(tiny_bert_dir, keyword_data, tmp_path / "out", cache_features=True)
    recipe["strategy"] = {"name": "full"}
    with pytest.raises(HfTransferError, match="cache_features is true, but strategy full trains backbone"):
        run_training(recipe_from_dict(recipe))


def test_weights_digest_follows_the_backbone_not_the_head(tiny_bert_dir: Path) -> None:
    from hf_transfer.recipe import ModelConfig
    from hf_transfer.sources.text import load_text_model

    model = load_text_model(ModelConfig(name=str(tiny_bert_dir)), ["a", "b"])
    before = weights_digest(model)
    with torch.no_grad():
        model.model.classifier.weight.add_(1.0)
    assert weights_digest(model) == before
    with torch.no_grad():
        model.model.bert.encoder.layer[1].output.dense.bias.add_(1e-3)
    assert weights_digest(model) != before


def test_cache_files_are_keyed_and_a_broken_file_is_a_miss(tmp_path: Path) -> None:
    cache = FeatureStore(tmp_path)
    key = FeatureKey("m", "Bert", "w1", "token ids", "d1", "no")
    features, labels = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    cache.save(key, features, labels)
    loaded = cache.load(key)
    assert loaded is not None and torch.equal(loaded[0], features) and torch.equal(loaded[1], labels)
    for changed in (dict(weights="w2"), dict(data="d2"), dict(preprocessing="p"), dict(view=0), dict(precision="bf16")):
        assert cache.load(FeatureKey(**{**key.__dict__, **changed})) is None
    cache.path(key).write_bytes(b"not a safetensors file")
    assert cache.load(key) is None
    assert not list(tmp_path.glob("*.tmp"))


def test_image_cache_stores_augmented_views_and_reuses_them(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 6)):
        for name, colour in (("blue", (40, 60, 200)), ("red", (200, 50, 40))):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")

    def train(output: str, **training) -> dict:
        return run_training(recipe_from_dict({
            "task": "image",
            "model": {"name": "test_resnet", "pretrained": False},
            "data": {"path": str(tmp_path / "images"), "image_size": 32},
            "strategy": {"name": "freeze_backbone"},
            "head": {"solver": "loop"},  # epoch e trains on view e mod K: the loop's behaviour under test
            "training": {"epochs": 3, "batch_size": 8, "lr": 1e-2, "num_workers": 0, "cache_views": 2,
                         "feature_cache_dir": str(tmp_path / "cache"), **training},
            "output": {"dir": str(tmp_path / output), "overwrite": True},
        }))

    first = train("first")
    assert first["feature_cache"] == {"hits": [], "computed": ["validation", "train view 0", "train view 1"]}
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    second = train("second", epochs=2, cache_views=1)  # un-augmented features: a new file, views unused
    assert second["feature_cache"] == {"hits": ["validation"], "computed": ["train"]}
    assert second["history"][-1]["train_loss"] < second["history"][0]["train_loss"]


# ------------------------------------------------------------------ CUDA graphs


def test_cuda_graphs_say_why_they_are_off() -> None:
    from accelerate import Accelerator

    from hf_transfer.recipe import TrainingConfig
    from hf_transfer.training.loop import cuda_graphs_blocker

    accelerator = Accelerator(cpu=True)
    assert cuda_graphs_blocker(TrainingConfig(), accelerator) == "the device is not a CUDA GPU"
    assert cuda_graphs_blocker(TrainingConfig(cuda_graphs=False), accelerator) == "training.cuda_graphs is false"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_graphed_steps_update_exactly_like_eager_steps() -> None:
    from transformers import get_scheduler

    from hf_transfer.training.cuda_graphs import GraphedStep, make_lr_tensors

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 3)).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True, capturable=True)
        make_lr_tensors(optimizer, torch.device("cuda"))
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=3, num_training_steps=40)

        def step(batch):
            loss = torch.nn.functional.cross_entropy(model(batch["x"]), batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        return model, optimizer, scheduler, step

    generator = torch.Generator().manual_seed(1)
    batches = [
        {"x": torch.randn(size, 8, generator=generator).cuda(), "labels": torch.randint(0, 3, (size,), generator=generator).cuda()}
        for size in [16, 16, 16, 16, 8, 16, 16, 8, 8, 8] * 4
    ]
    results = []
    for graphed in (False, True):
        model, optimizer, scheduler, step = setup()
        run_step = GraphedStep(step, optimizer) if graphed else step
        losses = []
        for batch in batches:
            losses.append(run_step(batch))
            scheduler.step()
        results.append((torch.stack(losses).cpu(), [p.detach().cpu() for p in model.parameters()]))
        if graphed:
            assert len(run_step.graphs) == 2  # one graph per batch shape, after the warm-up
    (eager_losses, eager_params), (graph_losses, graph_params) = results
    torch.testing.assert_close(graph_losses, eager_losses)
    for graph_param, eager_param in zip(graph_params, eager_params):
        torch.testing.assert_close(graph_param, eager_param)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_graphed_run_trains_like_an_eager_run(tiny_bert_dir: Path, keyword_data: Path, tmp_path: Path) -> None:
    def run(graphs: bool) -> dict:
        recipe = text_recipe(tiny_bert_dir, keyword_data, tmp_path / f"graphs_{graphs}", cuda_graphs=graphs,
                             epochs=4, lr=1e-3, warmup_ratio=0.2, mixed_precision="bf16")
        recipe["strategy"] = {"name": "full"}
        recipe["data"]["pad_to_multiple_of"] = 16
        return run_training(recipe_from_dict(recipe))

    eager, graphed = run(False), run(True)
    eager_losses = [e["train_loss"] for e in eager["history"]]
    graphed_losses = [e["train_loss"] for e in graphed["history"]]
    # dropout draws differ between the two runs, so compare the trajectories, not bits
    assert graphed_losses[-1] < graphed_losses[0]
    np.testing.assert_allclose(graphed_losses, eager_losses, rtol=0.15)


# ------------------------------------------------------------------ precision
@pytest.mark.parametrize(("requested", "launched", "native_cpu", "expected"), [
    ("no", "bf16", True, "no"),  # written in the recipe: as written
    ("bf16", "no", False, "bf16"),
    (None, "fp16", True, None),  # null: Accelerate reads its own config
    ("auto", "fp16", True, "fp16"),  # the launcher chose
    ("auto", "no", True, "bf16"),  # the launcher left the default: the hardware decides
    ("auto", "no", False, "no"),
    ("auto", None, True, "bf16"),  # not launched through accelerate at all
])
def test_mixed_precision_resolves_recipe_then_launcher_then_hardware(
    monkeypatch: pytest.MonkeyPatch, requested: str | None, launched: str | None, native_cpu: bool, expected: str | None
) -> None:
    from hf_transfer.training import precision

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    if launched is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_cpu)
    assert precision.resolve_mixed_precision(requested, trains_backbone=True, task="text", device_type="cpu") == expected
    if requested == "auto" and launched in (None, "no"):  # a frozen backbone: one cached pass, kept in fp32
        assert precision.resolve_mixed_precision(requested, trains_backbone=False, task="text", device_type="cpu") == "no"
        # on a CPU only the tasks measured to gain (text); a CNN was no faster in bf16 there
        assert precision.resolve_mixed_precision(requested, trains_backbone=True, task="image", device_type="cpu") == "no"


def test_auto_precision_on_a_gpu_machine_launched_on_the_cpu_asks_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_transfer.training import precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(precision, "cuda_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_mixed_precision("auto", trains_backbone=True, task="image") == "bf16"  # the GPU
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # accelerate launch --cpu
    assert precision.resolve_mixed_precision("auto", trains_backbone=True, task="image") == "no"


@pytest.mark.parametrize(("native_cpu", "expected"), [(True, "bf16"), (False, "no")])
def test_auto_precision_is_what_the_run_trains_in_and_records(
    tiny_bert_dir: Path, keyword_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native_cpu: bool,
    expected: str,
) -> None:
    from hf_transfer.training import precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_cpu)
    recipe = text_recipe(tiny_bert_dir, keyword_data, tmp_path / "run", epochs=1)
    summary = run_training(recipe_from_dict({**recipe, "strategy": {"name": "full"}}))
    assert summary["mixed_precision"] == expected
    assert f"precision {expected}" in (tmp_path / "run" / "README.md").read_text()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a second run in this process, in its own precision
    frozen = train_text(tiny_bert_dir, keyword_data, tmp_path / "frozen", cache_features=False, epochs=1)
    assert frozen["mixed_precision"] == "no"  # nothing steps through the backbone: auto keeps it in fp32
