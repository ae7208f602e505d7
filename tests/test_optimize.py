"""`hf-transfer optimize` on tiny models: int8, ONNX (text, image, LoRA merged), pruning, loading back
through predict / evaluate, and one clear error for each bad input. No test depends on speed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import NEGATIVE, POSITIVE, keyword_sentences, write_jsonl
from test_vision import image_recipe, write_colour_folder

from hf_transfer.cli import main
from hf_transfer.errors import HfTransferError
from hf_transfer.inference.loader import load_saved_run
from hf_transfer.inference.optimized import load_pytorch_model, read_manifest
from hf_transfer.inference.predict import predict
from hf_transfer.optimize import OptimizeRequest, optimize_run
from hf_transfer.recipe import recipe_from_dict
from hf_transfer.run import run_training

TEXTS = [f"the film was {POSITIVE}", f"a {NEGATIVE} plot and {NEGATIVE} music", "staff", f"{POSITIVE} " * 12]


def _train_text(model_dir: Path, data: Path, output: Path, **strategy) -> Path:
    recipe = {
        "task": "text", "model": {"name": str(model_dir)},
        "data": {"path": str(data), "text_column": "text", "label_column": "label", "max_length": 32},
        "strategy": {"name": "full", **strategy},
        "training": {"epochs": 6, "batch_size": 16, "lr": 2e-3, "warmup_ratio": 0.1, "logging_steps": 50, "seed": 0},
        "output": {"dir": str(output)},
    }
    run_training(recipe_from_dict(recipe))
    return output


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keyword_data")
    write_jsonl(folder / "train.jsonl", keyword_sentences(160, seed=1))
    write_jsonl(folder / "validation.jsonl", keyword_sentences(40, seed=2))
    return folder


@pytest.fixture(scope="module")
def text_run(tiny_bert_dir: Path, text_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train_text(tiny_bert_dir, text_data, tmp_path_factory.mktemp("runs") / "text")


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _batch(saved, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(saved.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt"))


def test_int8_stays_close_to_float_and_the_run_folder_is_unchanged(text_run: Path, tmp_path: Path) -> None:
    before = _hashes(text_run)
    result = optimize_run(text_run, OptimizeRequest(quantize="int8"), tmp_path / "int8")
    assert _hashes(text_run) == before  # the run is read, never written
    manifest = read_manifest(result.folder)
    assert manifest["quantize"] == "int8" and manifest["serve"] == "pytorch"
    assert manifest["accuracy"]["examples"] == 40 and manifest["accuracy"]["before"] > 0.9
    assert manifest["accuracy"]["same_label_share"] >= 0.9
    assert manifest["size_bytes"]["after"] < manifest["size_bytes"]["before"]
    quantized = load_pytorch_model(result.folder, manifest)
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())  # every Linear became int8
    original = load_saved_run(text_run)
    batch = _batch(original, TEXTS)
    with torch.no_grad():
        float_logits, int8_logits = original.model(**batch), quantized(**batch).logits
    assert (float_logits - int8_logits).abs().max() <= 0.05 * float_logits.abs().max()
    assert torch.equal(float_logits.argmax(-1), int8_logits.argmax(-1))
    assert (result.folder / "README.md").read_text().startswith("# Optimised model of `text`")


def test_predict_and_evaluate_accept_the_optimised_folder_with_the_same_labels(text_run: Path, text_data: Path,
                                                                               tmp_path: Path) -> None:
    from hf_transfer.inference.evaluate import evaluate_saved_model

    folder = optimize_run(text_run, OptimizeRequest(quantize="int8", onnx=True), tmp_path / "both").folder
    original = [p.labels[0] for p in predict(text_run, TEXTS)]
    assert [p.labels[0] for p in predict(folder, TEXTS)] == original
    result = evaluate_saved_model(folder, str(text_data), split="validation", name="kw")
    assert result.metrics["num_samples"] == 40 and result.folder == folder / "evaluations" / "kw"
    assert result.metrics["accuracy"] == read_manifest(folder)["accuracy"]["after"] > 0.9


def test_onnx_text_matches_pytorch_for_other_batch_sizes_and_lengths(text_run: Path, tmp_path: Path) -> None:
    result = optimize_run(text_run, OptimizeRequest(onnx=True), tmp_path / "onnx")
    onnx = result.manifest["onnx"]
    assert onnx["dynamic_axes"] == ["batch", "sequence"] and "dynamo=False" in onnx["exporter"]
    assert onnx["fused_operators"]["Attention"] == 2  # each of the two layers' attention is one fused operator
    original, exported = load_saved_run(text_run), load_saved_run(result.folder)
    assert type(exported.model).__name__ == "OnnxClassifier"
    for texts in (TEXTS[:1], TEXTS, TEXTS[1:3]):  # batch 1, 4 (padded, length 14), 2
        batch = _batch(original, texts)
        with torch.no_grad():
            torch.testing.assert_close(exported.model(**batch), original.model(**batch),
                                       atol=onnx["tolerance"]["atol"], rtol=onnx["tolerance"]["rtol"])


def test_onnx_of_a_lora_run_is_the_merged_model(tiny_bert_dir: Path, text_data: Path, tmp_path: Path) -> None:
    run = _train_text(tiny_bert_dir, text_data, tmp_path / "lora", name="lora", lora={"r": 4, "alpha": 8})
    assert (run / "adapter_config.json").is_file()
    result = optimize_run(run, OptimizeRequest(onnx=True), tmp_path / "lora_onnx")
    assert result.manifest["merged_lora"] and result.manifest["architecture"] == "transformers"
    original, exported = load_saved_run(run), load_saved_run(result.folder)
    batch = _batch(original, TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(exported.model(**batch), original.model(**batch), atol=1e-4, rtol=1e-3)


def test_pruning_shrinks_the_layers_and_the_model_still_runs_and_reloads(text_run: Path, tmp_path: Path) -> None:
    result = optimize_run(text_run, OptimizeRequest(prune=0.5), tmp_path / "pruned")
    prune = result.manifest["prune"]
    assert prune["kept_per_layer"] == [{"heads": 1, "ffn_neurons": 32}] * 2  # of 2 heads and 64 neurons
    assert result.manifest["parameters"]["after"] < result.manifest["parameters"]["before"]
    reloaded = load_pytorch_model(result.folder, result.manifest)
    layer = reloaded.bert.encoder.layer[0]
    assert layer.attention.self.query.weight.shape == (16, 32)  # one head of 16 dimensions
    assert layer.attention.output.dense.weight.shape == (32, 16)
    assert layer.intermediate.dense.weight.shape == (32, 32) and layer.output.dense.weight.shape == (32, 32)
    saved = load_saved_run(result.folder)
    with torch.no_grad():
        logits = saved.model(**_batch(saved, TEXTS))
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()
    assert len(list(predict(result.folder, TEXTS))) == 4


def test_taylor_importance_prunes_a_neuron_that_never_fires_however_large_its_weights(text_run: Path) -> None:
    from hf_transfer.optimize.measure import training_sample
    from hf_transfer.optimize.pruning import prune_transformer

    saved = load_saved_run(text_run)
    model = saved.model.model
    layer = model.bert.encoder.layer[0]
    with torch.no_grad():  # neuron 5: the largest weights of the layer, but GELU(-1e4) = 0 on every input
        layer.intermediate.dense.weight[5] *= 100
        layer.output.dense.weight[:, 5] *= 100
        layer.intermediate.dense.bias[5] = -1e4
    original_rows = layer.intermediate.dense.weight.clone()
    report = prune_transformer(model, 0.5, training_sample(saved, 32))
    assert report["scored_on"] == "32 training examples"
    pruned = model.bert.encoder.layer[0].intermediate.dense
    assert pruned.out_features == 32 and -1e4 not in pruned.bias  # the silent neuron is gone
    # (a weight-norm score would have kept it first); every neuron that stayed kept its exact weights
    assert all(any(torch.equal(row, original) for original in original_rows) for row in pruned.weight)


def test_recovery_fine_tunes_the_pruned_model_with_the_runs_recipe(text_run: Path, tmp_path: Path) -> None:
    plain = optimize_run(text_run, OptimizeRequest(prune=0.5), tmp_path / "plain").manifest
    recovered = optimize_run(text_run, OptimizeRequest(prune=0.5, recovery_epochs=1), tmp_path / "recovered").manifest
    assert recovered["recovery"]["epochs"] == 1 and "accuracy" in recovered["recovery"]["last_epoch"]
    assert recovered["parameters"] == plain["parameters"]  # the same shrunken shapes, other weights
    assert recovered["accuracy"]["after"] >= plain["accuracy"]["after"] - 0.05
    before = load_pytorch_model(tmp_path / "plain", plain).state_dict()
    after = load_pytorch_model(tmp_path / "recovered", recovered).state_dict()
    assert not all(torch.equal(before[name], after[name]) for name in before)
    with pytest.raises(HfTransferError, match="--recovery-epochs fine-tunes a pruned model: add --prune RATIO"):
        optimize_run(text_run, OptimizeRequest(quantize="int8", recovery_epochs=1))


@pytest.fixture(scope="module")
def image_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_colour_folder(tmp_path_factory.mktemp("colours"), train=8, val=4)


@pytest.fixture(scope="module")
def image_run(image_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "image"
    recipe = image_recipe(image_data, output, model={"name": "test_efficientnet", "pretrained": False})
    run_training(recipe_from_dict(recipe))
    return output


def test_onnx_image_matches_pytorch_for_other_batch_sizes(image_run: Path, image_data: Path, tmp_path: Path) -> None:
    result = optimize_run(image_run, OptimizeRequest(onnx=True), tmp_path / "onnx")
    assert result.manifest["onnx"]["dynamic_axes"] == ["batch"]
    original, exported = load_saved_run(image_run), load_saved_run(result.folder)
    for size in (1, 5):
        pixels = torch.randn(size, 3, 32, 32, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            torch.testing.assert_close(exported.model(pixel_values=pixels), original.model(pixel_values=pixels),
                                       atol=1e-4, rtol=1e-3)
    images = [str(image_data / "val")]
    assert [p.labels for p in predict(result.folder, images)] == [p.labels for p in predict(image_run, images)]


def test_onnx_int8_of_a_cnn_quantises_its_convolutions_and_stays_close(image_run: Path, tmp_path: Path) -> None:
    import onnx

    result = optimize_run(image_run, OptimizeRequest(onnx=True, quantize="int8"), tmp_path / "int8")
    assert result.manifest["onnx"]["quantization"].startswith("static: convolution")
    graph = onnx.load(str(result.folder / "model.onnx")).graph
    initializers = {tensor.name: tensor.data_type for tensor in graph.initializer}
    convolution_weights = [node.input[1] for node in graph.node if node.op_type == "Conv"]
    # QDQ: each convolution reads its weight through DequantizeLinear of an int8 initializer
    dequantized = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    assert convolution_weights and all(initializers.get(dequantized.get(name)) == onnx.TensorProto.INT8
                                       for name in convolution_weights)
    original, quantized = load_saved_run(image_run), load_saved_run(result.folder)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = original.model(pixel_values=pixels), quantized.model(pixel_values=pixels)
    # int8 rounding of a tiny, barely trained CNN, not a different model: the same class for every input, and within
    # a fifth of the largest logit (a tenth held by chance: it depends on the trained weights' activation ranges)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert (got - expected).abs().max() < 0.2 * expected.abs().max()


def test_cnn_pruning_removes_channels_recovers_exports_and_reloads(image_run: Path, image_data: Path,
                                                                  tmp_path: Path) -> None:
    request = OptimizeRequest(prune=0.3, recovery_epochs=1, onnx=True)
    manifest = optimize_run(image_run, request, tmp_path / "pruned").manifest
    channels = manifest["prune"]["conv_channels"]
    assert channels["after"] < channels["before"] and manifest["parameters"]["after"] < manifest["parameters"]["before"]
    assert manifest["prune"]["library"].startswith("torch-pruning ") and manifest["recovery"]["epochs"] == 1
    reloaded = load_pytorch_model(tmp_path / "pruned", manifest)  # the shrunken convolutions rebuilt from the weights
    stem = reloaded.conv_stem.weight
    assert stem.is_contiguous(memory_format=torch.channels_last)  # served as fast as the run's own model
    assert sum(m.out_channels for m in reloaded.modules() if isinstance(m, torch.nn.Conv2d)) == channels["after"]
    with torch.no_grad():
        assert reloaded(torch.randn(3, 3, 32, 32)).shape == (3, 2)
    images = [str(image_data / "val")]
    assert len(list(predict(tmp_path / "pruned", images))) == 8


def test_a_mean_pooled_text_run_prunes_and_quantises(tiny_bert_dir: Path, text_data: Path, tmp_path: Path) -> None:
    from hf_transfer.recipe import recipe_from_dict as build

    recipe = {
        "task": "text", "model": {"name": str(tiny_bert_dir)}, "head": {"pooling": "mean"},
        "data": {"path": str(text_data), "text_column": "text", "label_column": "label", "max_length": 32},
        "training": {"epochs": 1, "batch_size": 16, "lr": 2e-3, "seed": 0}, "output": {"dir": str(tmp_path / "run")},
    }
    run_training(build(recipe))
    manifest = optimize_run(tmp_path / "run", OptimizeRequest(prune=0.5, quantize="int8"), tmp_path / "opt").manifest
    assert manifest["architecture"] == "mean_pooled" and manifest["prune"]["kept_per_layer"][0]["ffn_neurons"] == 32
    assert [len(p.labels) for p in predict(tmp_path / "opt", TEXTS)] == [1] * 4


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error each, nothing written


def test_a_folder_that_is_not_a_finished_run_is_refused(text_run: Path, tmp_path: Path) -> None:
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text((text_run / "recipe.yaml").read_text())
    with pytest.raises(HfTransferError, match=r"is not a finished run \(no metrics.json\); give the output folder"):
        optimize_run(unfinished, OptimizeRequest(quantize="int8"))
    assert sorted(p.name for p in unfinished.iterdir()) == ["recipe.yaml"]


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
def test_a_ratio_outside_zero_one_is_refused(text_run: Path, ratio: float) -> None:
    with pytest.raises(HfTransferError, match=rf"--prune {ratio:g}: give the share .* strictly between 0 and 1"):
        optimize_run(text_run, OptimizeRequest(prune=ratio))
    assert not (text_run / "optimized").exists()


def test_an_image_model_without_convolutions_is_refused_by_name() -> None:
    import timm

    from hf_transfer.optimize.cnn_pruning import prune_cnn

    with pytest.raises(HfTransferError, match=r"--prune: VisionTransformer has attention layers \(Attention\)"):
        prune_cnn(timm.create_model("test_vit", img_size=32, num_classes=2), 0.3, torch.randn(1, 3, 32, 32))


def test_torch_int8_on_a_cnn_is_refused_with_the_onnx_way(image_run: Path) -> None:
    with pytest.raises(HfTransferError, match=r"^--quantize int8 without --onnx on an image run: .* Add --onnx"):
        optimize_run(image_run, OptimizeRequest(quantize="int8"))
    assert not (image_run / "optimized").exists()


def test_a_missing_optional_package_names_the_install_command(text_run: Path, image_run: Path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    missing = {"onnxruntime", "torch_pruning"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    with pytest.raises(HfTransferError) as error:
        optimize_run(text_run, OptimizeRequest(onnx=True))
    assert str(error.value) == ("--onnx needs the optional package onnxruntime: "
                                "pip install 'hf-transfer-learning[optimize]'")
    with pytest.raises(HfTransferError) as error:
        optimize_run(image_run, OptimizeRequest(prune=0.3))
    assert str(error.value) == ("--prune on an image model needs the optional package torch_pruning: "
                                "pip install 'hf-transfer-learning[optimize]'")


def test_the_cli_gives_one_line_and_status_2(text_run: Path, tmp_path: Path, capsys) -> None:
    assert main(["optimize", str(text_run), "--prune", "2"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("hf-transfer: error: --prune 2:") and error.count("\n") == 1
    assert main(["optimize", str(tmp_path / "missing"), "--quantize", "int8"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["optimize", str(text_run)]) == 2
    assert "Nothing to do" in capsys.readouterr().err
    optimized = text_run / "optimized"
    assert main(["optimize", str(text_run), "--quantize", "int8", "--quiet"]) == 0
    assert "written to" in capsys.readouterr().out and json.loads((optimized / "optimized.json").read_text())
    assert main(["optimize", str(optimized), "--onnx"]) == 2
    assert "already an optimised folder" in capsys.readouterr().err


def test_a_pruned_text_model_exports_fused_with_its_remaining_heads(text_run: Path, tmp_path: Path) -> None:
    result = optimize_run(text_run, OptimizeRequest(prune=0.5, onnx=True), tmp_path / "pruned_onnx")
    assert result.manifest["onnx"]["fused_operators"]["Attention"] == 2  # one head left in each layer, still fused
    pruned = load_pytorch_model(result.folder, result.manifest)
    exported = load_saved_run(result.folder)
    batch = _batch(exported, TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(exported.model(**batch), pruned(**batch).logits, atol=1e-4, rtol=1e-3)
