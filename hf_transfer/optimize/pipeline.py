"""`hf-transfer optimize OUT`: prune, quantise and export a finished run's model into OUT/optimized/.

Every check (the run, the request, the optional packages, prunability) comes first; the folder is
then built in a temporary place, loaded back and checked (ONNX logits within tolerance, the reloaded
model's labels equal to the in-memory one's), and only then copied into the destination by renames.
The run's own files are read, never written.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_transfer.errors import HfTransferError
from hf_transfer.export.folder import check_output_dir, create_output_dir, staged, write_json, write_text
from hf_transfer.export.layout import (
    CARD_FILE,
    CONFIG_FILE,
    HEAD_INFO_FILE,
    IMAGE,
    METRICS_FILE,
    ONNX_FILE,
    OPTIMIZED,
    OPTIMIZED_DIR,
    OPTIMIZED_FILE,
    RECIPE_FILE,
    TEXT,
    WEIGHTS_FILE,
    folder_kind,
)
from hf_transfer.inference.loader import load_saved_run
from hf_transfer.inference.optimized import ONNX_RUNTIME, PYTORCH, load_optimized, quantize_int8, require
from hf_transfer.inference.saved import LogitsOf, PixelLogits, SavedModel, read_json
from hf_transfer.optimize.measure import (
    accuracy,
    latency_ms,
    predicted_labels,
    repeated,
    state_dict_bytes,
    training_sample,
    validation_batches,
)
from hf_transfer.optimize.card import optimized_card
from hf_transfer.optimize.onnx_export import (
    ATOL,
    EXPORTER,
    OPSET,
    RTOL,
    check_onnx,
    export_onnx,
    fuse_transformer_graph,
    quantize_onnx,
    text_example,
    with_eager_attention,
)
from hf_transfer.optimize.pruning import check_prunable, parameter_count, prune_model
from hf_transfer.optimize.recovery import recover
from hf_transfer.training.metrics import split_batch

QUANTIZATIONS = ("int8",)


@dataclass
class OptimizeRequest:
    prune: float | None = None  # share of attention heads and FFN neurons (text) or channels (CNN) to remove, in (0, 1)
    quantize: str | None = None  # "int8": torch dynamic on linear layers; with onnx, ONNX Runtime's (onnx_export.py)
    onnx: bool = False
    recovery_epochs: int = 0


@dataclass
class OptimizeResult:
    folder: Path
    manifest: dict[str, Any]


def check_request(request: OptimizeRequest) -> None:
    if request.prune is None and request.quantize is None and not request.onnx:
        raise HfTransferError("Nothing to do: give --prune RATIO, --quantize int8 and/or --onnx.")
    if request.prune is not None and not 0 < request.prune < 1:
        raise HfTransferError(f"--prune {request.prune:g}: give the share of heads, neurons or channels to remove, "
                              "strictly between 0 and 1 (e.g. 0.3).")
    if request.quantize is not None and request.quantize not in QUANTIZATIONS:
        raise HfTransferError(f"--quantize {request.quantize}: choose one of {', '.join(QUANTIZATIONS)}.")
    if request.recovery_epochs < 0:
        raise HfTransferError(f"--recovery-epochs {request.recovery_epochs}: give 0 or more epochs.")
    if request.recovery_epochs and request.prune is None:
        raise HfTransferError("--recovery-epochs fine-tunes a pruned model: add --prune RATIO.")
    if request.onnx:
        require("onnx", "--onnx")
        require("onnxruntime", "--onnx")


def check_finished_run(run: Path) -> str:
    """The run's kind (text or image); an error for anything that is not a finished text or image run."""
    if not run.is_dir():
        raise HfTransferError(f"{run} is not a folder; give the output folder of a finished run.")
    kind = folder_kind(run)
    if kind == OPTIMIZED:
        raise HfTransferError(f"{run} is already an optimised folder; give the output folder of the run it came from.")
    if kind not in (TEXT, IMAGE):
        raise HfTransferError(f"{run} holds a {kind.replace('_', '-')} model; optimize serves text and image runs only.")
    missing = [name for name in (RECIPE_FILE, METRICS_FILE) if not (run / name).is_file()]
    if missing:
        raise HfTransferError(f"{run} is not a finished run (no {' or '.join(missing)}); "
                              "give the output folder of a run that has finished training.")
    return kind


def check_request_fits(kind: str, request: OptimizeRequest) -> None:
    """What the run's kind allows: pruning's package for images; int8 on a CNN only through ONNX Runtime."""
    if request.prune is not None:
        check_prunable(kind)
    if kind == IMAGE and request.quantize and not request.onnx:
        raise HfTransferError(
            "--quantize int8 without --onnx on an image run: torch's dynamic int8 reaches only a CNN's classifier, "
            "not its convolutions, and made EfficientNet-Lite0 slower. Add --onnx: ONNX Runtime's static int8 "
            "quantises the convolutions."
        )


def _inner_model(saved: SavedModel) -> nn.Module:
    """A copy of the classifier without its call wrapper, LoRA merged into the weights (peft's merge_and_unload)."""
    inner = copy.deepcopy(saved.model.model)
    if hasattr(inner, "merge_and_unload"):
        inner = inner.merge_and_unload()
    return inner.eval()


def _architecture(saved: SavedModel, inner: nn.Module) -> str:
    from hf_transfer.sources.text import MeanPooledClassifier

    if saved.kind == IMAGE:
        return "timm"
    return "mean_pooled" if isinstance(inner, MeanPooledClassifier) else "transformers"


def _write_model_files(saved: SavedModel, run: Path, inner: nn.Module, architecture: str, work: Path) -> None:
    """Weights (float), the architecture's config and the preprocessing, so the folder rebuilds on its own."""
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous() for name, tensor in inner.state_dict().items()}, str(work / WEIGHTS_FILE))
    shutil.copy2(run / RECIPE_FILE, work / RECIPE_FILE)
    if saved.kind == IMAGE:
        shutil.copy2(run / CONFIG_FILE, work / CONFIG_FILE)  # timm's config: architecture, classes, pretrained_cfg
        return
    (inner.encoder if architecture == "mean_pooled" else inner).config.save_pretrained(work)
    saved.tokenizer.save_pretrained(work)


def _export(saved: SavedModel, float_model: nn.Module, batches: list[dict], quantize: str | None, work: Path) -> dict:
    inputs, _ = split_batch(batches[0])
    if saved.kind == TEXT:
        example = text_example(inputs, saved.tokenizer.pad_token_id or 0)
        real_length = int(inputs["attention_mask"][0].sum())  # another batch size and sequence length
        checks = [inputs, {name: tensor[:1, :real_length] for name, tensor in inputs.items()}]
    else:
        example = {name: tensor[:2] for name, tensor in inputs.items()}
        checks = [inputs, {name: tensor[:1] for name, tensor in inputs.items()}]
    float_file = work / ("model.float.onnx" if quantize else ONNX_FILE)
    fused = None
    if saved.kind == TEXT:
        exported = work / "model.exported.onnx"
        names = export_onnx(with_eager_attention(float_model), example, exported, dynamic_sequence=True)
        fused = fuse_transformer_graph(float_model, exported, float_file, names, checks)
        if fused:
            exported.unlink()
        else:  # the plain export serves
            exported.replace(float_file)
    else:
        names = export_onnx(float_model, example, float_file, dynamic_sequence=False)
    # the difference of the file that serves: the fused graph, checked as it was written, or the plain export
    fused_operators, largest = fused or ({}, check_onnx(float_model, float_file, names, checks))
    quantized = None
    if quantize:
        quantized = quantize_onnx(saved.kind, float_file, work / ONNX_FILE,
                                  calibration=lambda: [split_batch(batch)[0] for batch in training_sample(saved, 64)])
        float_file.unlink()
    return {
        "file": ONNX_FILE, "inputs": names, "exporter": EXPORTER, "opset": OPSET,
        "dynamic_axes": ["batch", "sequence"] if saved.kind == TEXT else ["batch"],
        "tolerance": {"atol": ATOL, "rtol": RTOL}, "max_abs_diff_float": largest,
        "fused_operators": fused_operators, "quantized": quantize, "quantization": quantized,
        "runtime": "onnxruntime CPUExecutionProvider",
    }


def optimize_run(run_dir: str | Path, request: OptimizeRequest, output_dir: str | Path | None = None,
                 overwrite: bool = False, trust_remote_code: bool = False) -> OptimizeResult:
    """Optimise the model of a finished run; writes the optimised folder and returns its manifest."""
    run = Path(run_dir)
    check_request(request)
    kind = check_finished_run(run)
    check_request_fits(kind, request)
    destination = Path(output_dir) if output_dir else run / OPTIMIZED_DIR
    check_output_dir(destination, overwrite)
    saved = load_saved_run(run, trust_remote_code=trust_remote_code)
    inner = _inner_model(saved)
    architecture = _architecture(saved, inner)
    batches = validation_batches(saved)
    before_labels = predicted_labels(saved.model, batches)
    parameters_before, bytes_before = parameter_count(inner), state_dict_bytes(inner)
    pruning = prune_model(kind, inner, request.prune, saved) if request.prune is not None else None
    recovery = recover(inner, saved, request.recovery_epochs) if request.recovery_epochs else None
    wrap = LogitsOf if kind == TEXT else PixelLogits
    served = wrap(quantize_int8(copy.deepcopy(inner)) if request.quantize else inner).eval()
    manifest: dict[str, Any] = {
        "format": 1, "source_run": str(run.resolve()), "task": kind, "architecture": architecture,
        "label_names": list(saved.label_names), "head": _head(run, kind),
        "merged_lora": hasattr(saved.model.model, "merge_and_unload"), "prune": pruning,
        "recovery": recovery,
        "quantize": request.quantize, "serve": ONNX_RUNTIME if request.onnx else PYTORCH, "onnx": None,
    }
    with tempfile.TemporaryDirectory(prefix="hf-transfer-optimize-") as temporary:
        work = Path(temporary)
        _write_model_files(saved, run, inner, architecture, work)
        if request.onnx:
            manifest["onnx"] = _export(saved, wrap(inner).eval(), batches, request.quantize, work)
        write_json(work / OPTIMIZED_FILE, manifest)
        reloaded = load_optimized(work, trust_remote_code=trust_remote_code)
        after_labels = predicted_labels(reloaded.model, batches)
        if not request.onnx and not torch.equal(after_labels, predicted_labels(served, batches)):
            raise HfTransferError("The optimised folder, loaded back, labels the validation split differently from "
                                  "the model it was saved from; nothing was written. Report this to hf-transfer.")
        manifest.update(_report(saved, reloaded.model, batches, before_labels, after_labels, parameters_before,
                                parameter_count(inner), bytes_before, work, request.onnx, served))
        write_json(work / OPTIMIZED_FILE, manifest)
        write_text(work / CARD_FILE, optimized_card(manifest, run))
        create_output_dir(destination)
        with staged(destination) as staging:
            for item in work.iterdir():
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
    return OptimizeResult(destination, manifest)


def _head(run: Path, kind: str) -> dict | None:
    info = run / HEAD_INFO_FILE
    return read_json(info).get("head") if kind == IMAGE and info.is_file() else None


def _report(saved: SavedModel, optimized: nn.Module, batches: list[dict], before: torch.Tensor, after: torch.Tensor,
            parameters_before: int, parameters_after: int, bytes_before: int, work: Path, onnx: bool,
            served: nn.Module) -> dict:
    bytes_after = (work / ONNX_FILE).stat().st_size if onnx else state_dict_bytes(served)
    first = next(iter(split_batch(batches[0])[0].values()))
    latency = {"threads": torch.get_num_threads(), "input_shape_per_example": list(first.shape[1:])}
    for size in (1, 32):
        inputs = repeated(batches[0], size)
        latency[f"batch_{size}"] = {"before": latency_ms(saved.model, inputs),
                                    "after": latency_ms(optimized, inputs)}
    return {
        "accuracy": {"split": "validation", "examples": int(before.numel()),
                     "before": accuracy(before, batches), "after": accuracy(after, batches),
                     "same_label_share": round(float((before == after).float().mean()), 6)},
        "parameters": {"before": parameters_before, "after": parameters_after},
        "size_bytes": {"before": bytes_before, "after": bytes_after,
                       "measured_as": "model.onnx file" if onnx else "serialised PyTorch state dict"},
        "latency_ms": latency,
    }
