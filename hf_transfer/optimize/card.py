"""The optimised folder's README.md: what was done to the run's model, and what it cost and gained."""

from __future__ import annotations

from pathlib import Path


def _steps(manifest: dict) -> list[str]:
    steps = ["LoRA merged into the weights (peft merge_and_unload)"] if manifest["merged_lora"] else []
    if manifest["prune"]:
        prune = manifest["prune"]
        if "kept_per_layer" in prune:  # a transformer: heads and FFN neurons per layer
            kept = ", ".join(f"{k['heads']} heads / {k['ffn_neurons']} FFN neurons" for k in prune["kept_per_layer"])
            kept = f"kept per layer: {kept} of {prune['original']['heads']} / {prune['original']['ffn_neurons']}"
        else:  # a CNN: convolution channels
            kept = f"convolution channels {prune['conv_channels']['before']:,} -> {prune['conv_channels']['after']:,}"
        steps.append(f"pruned {prune['ratio']:g} ({prune['method']}); {kept}")
    if manifest["recovery"]:
        steps.append(f"recovery fine-tune: {manifest['recovery']['epochs']} epoch(s) on the run's training split, "
                     "the run's recipe, every weight trained")
    if manifest["quantize"]:
        quantization = (manifest["onnx"] or {}).get("quantization")
        steps.append(f"int8 by ONNX Runtime, {quantization}" if quantization
                     else "int8 dynamic quantisation of the linear layers by torch (CPU)")
    if manifest["onnx"]:
        onnx = manifest["onnx"]
        steps.append(f"exported to ONNX with {onnx['exporter']}, opset {onnx['opset']}, dynamic "
                     f"{' and '.join(onnx['dynamic_axes'])}; float logits within atol {onnx['tolerance']['atol']:g} + "
                     f"rtol {onnx['tolerance']['rtol']:g} of PyTorch under ONNX Runtime (largest difference "
                     f"{onnx['max_abs_diff_float']:.1e})")
    return steps


def optimized_card(manifest: dict, run: Path) -> str:
    accuracy, size, latency = manifest["accuracy"], manifest["size_bytes"], manifest["latency_ms"]
    lines = [
        f"# Optimised model of `{run.name}`", "",
        *[f"- {step}" for step in _steps(manifest)], "",
        f"Served by {manifest['serve']}. Load it like the run itself: `hf-transfer predict FOLDER INPUT ...`, "
        "`hf-transfer evaluate FOLDER --data DATA`.", "",
        "| | before | after |", "| --- | --- | --- |",
        f"| accuracy, the run's validation split ({accuracy['examples']} examples) | {accuracy['before']:.4f} | "
        f"{accuracy['after']:.4f} |",
        f"| size ({size['measured_as']}), MB | {size['before'] / 1e6:.2f} | {size['after'] / 1e6:.2f} |",
        f"| parameters | {manifest['parameters']['before']:,} | {manifest['parameters']['after']:,} |",
    ]
    for batch in ("batch_1", "batch_32"):
        lines.append(f"| latency, {batch.replace('_', ' ')}, ms (CPU, {latency['threads']} threads) | "
                     f"{latency[batch]['before']:.2f} | {latency[batch]['after']:.2f} |")
    lines += ["", f"{accuracy['same_label_share']:.1%} of validation examples keep the label the run's model gave.",
              "Latency is measured once on the machine that optimised the model; compare on yours.", ""]
    return "\n".join(lines)
