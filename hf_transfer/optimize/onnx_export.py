"""ONNX export of a classifier, checked with ONNX Runtime against the PyTorch logits.

Exporter: torch.onnx.export with dynamo=False (the TorchScript exporter) and `dynamic_axes`.
Checked on torch 2.14: it exports BERT (batch and sequence length dynamic) and timm EfficientNet
(batch dynamic) to graphs that match PyTorch to ~1e-8 under ONNX Runtime, needs no package beyond
onnx, and takes ~1 s where the dynamo exporter (dynamo=True, the default) takes 5-10 s on a tiny
model and needs onnxscript as well; both gave the same logits. torch 2.14 marks the TorchScript
path deprecated (a DeprecationWarning): moving to dynamo=True means `dynamic_shapes` instead of
`dynamic_axes` and onnxscript in the extra. optimum's exporter pins transformers below 5: not used.
Text models then go through ONNX Runtime's own transformer optimiser (fused attention), and int8 is
ONNX Runtime's quantisation: dynamic for text, static (calibrated) for CNNs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from hf_transfer.errors import HfTransferError
from hf_transfer.export.layout import IMAGE, TEXT
from hf_transfer.inference.optimized import OnnxClassifier, require

EXPORTER = "torch.onnx.export (TorchScript exporter, dynamo=False)"
OPSET = 17
# float32 ONNX Runtime against float32 PyTorch: kernels differ only in summation order
ATOL, RTOL = 1e-4, 1e-3


class _Positional(nn.Module):
    """`model(**batch)` called with positional tensors, in `names` order, as the exporter passes them."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors)))


def text_example(batch: dict[str, torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Two rows of `batch`, one of them padded: traced without a masked position, transformers' attention
    skips the mask (all ones) and the graph would ignore padding for ever."""
    example = {name: tensor[:2].clone() for name, tensor in batch.items()}
    column = {name: torch.zeros_like(tensor[:, :1]) for name, tensor in example.items()}
    column["input_ids"] = torch.full_like(column["input_ids"], pad_token_id)
    return {name: torch.cat([tensor, column[name]], dim=1) for name, tensor in example.items()}


def export_onnx(model: nn.Module, example: dict[str, torch.Tensor], path: Path, dynamic_sequence: bool) -> list[str]:
    """Write `model` (called as `model(**example) -> logits`) to `path`; returns the graph's input names."""
    require("onnx", "--onnx")
    names = list(example)
    dynamic = {0: "batch", 1: "sequence"} if dynamic_sequence else {0: "batch"}
    wrapper = _Positional(model, names).eval()  # the exporter restores the wrapper's mode: eval, never dropout
    try:
        # the tracer warns where a model branches on a shape; check_onnx runs the file at other batch sizes and
        # lengths, which is what those warnings ask for, so they are not passed on to the user
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", module=r"torch\.onnx")
            torch.onnx.export(
                wrapper, tuple(example[name] for name in names), str(path), dynamo=False, opset_version=OPSET,
                input_names=names, output_names=["logits"],
                dynamic_axes={**{name: dynamic for name in names}, "logits": {0: "batch"}},
            )
    except Exception as error:  # an operator the exporter lacks, say: the model's, not the user's, but one line
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise HfTransferError(f"Exporting the model to ONNX failed ({type(error).__name__}: {first_line}); "
                              "nothing was written. Optimise without --onnx.") from None
    finally:
        model.eval()
    return names


def with_eager_attention(model: nn.Module) -> nn.Module:
    """A copy of a transformers classifier that computes attention with explicit matrix products, as the
    graph fuser below recognises them: the scaled_dot_product_attention that transformers 5 runs by default
    exports to a pattern ONNX Runtime does not fuse."""
    from transformers import PreTrainedModel

    eager = copy.deepcopy(model)
    for module in eager.modules():
        if isinstance(module, PreTrainedModel):
            module.set_attn_implementation("eager")
    return eager.eval()


def fuse_transformer_graph(model: nn.Module, source: Path, target: Path, names: list[str],
                           batches: list[dict[str, torch.Tensor]]) -> tuple[dict[str, int], float] | None:
    """ONNX Runtime's transformer optimiser on an exported BERT-family file: attention, embedding layer norm,
    GELU and skip layer norms each become one fused operator (written to `target`, which ONNX Runtime alone
    runs). A pruned model fuses with the heads it kept; the fused file is checked against PyTorch like the
    export. Returns the fused operators counted and the largest logit difference, or None (nothing written)
    when the layers differ in head count or the fused graph fails the check. On Amazon reviews (128 tokens, batch 32) ONNX Runtime int8
    ran 1.35x the PyTorch model's samples/s unfused and 2.0x fused (BENCHMARKS.md, issue 16)."""
    from onnxruntime.transformers.optimizer import optimize_model

    # transformers reshapes by head size (view(..., -1, head_size)), so the fuser cannot read the head count
    # from the graph: it is given, one count for every layer (pruning removes the same share everywhere)
    shapes = {(module.num_attention_heads, module.all_head_size) for module in model.modules()
              if hasattr(module, "num_attention_heads") and hasattr(module, "query")}
    if len(shapes) != 1:
        return None
    heads, attention_width = shapes.pop()
    with _quiet_root_logger():
        fused = optimize_model(str(source), model_type="bert", num_heads=heads, hidden_size=attention_width)
    counts = {name: count for name, count in fused.get_fused_operator_statistics().items() if count}
    fused.save_model_to_file(str(target))
    try:
        return counts, check_onnx(model, target, names, batches)
    except HfTransferError:
        target.unlink()
        return None


def check_onnx(model: nn.Module, path: Path, names: list[str], batches: list[dict[str, torch.Tensor]]) -> float:
    """The largest |ONNX Runtime - PyTorch| logit over `batches` (of different shapes); an error past the tolerance."""
    session = OnnxClassifier(path, names)
    largest = 0.0
    with torch.no_grad():
        for batch in batches:
            expected = model(**batch).float()
            got = session(**batch)
            if got.shape != expected.shape or not torch.allclose(got, expected, atol=ATOL, rtol=RTOL):
                difference = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
                raise HfTransferError(
                    f"The ONNX export differs from PyTorch by {difference:.2e} on a batch of shape "
                    f"{tuple(batch[names[0]].shape)} (tolerance {ATOL:g} + {RTOL:g}*|logit|); nothing was written. "
                    "Optimise without --onnx, and report the model to hf-transfer."
                )
            largest = max(largest, (got - expected).abs().max().item())
    return largest


def quantize_dynamic_int8(source: Path, target: Path, calibration: Callable[[], list[dict[str, torch.Tensor]]]) -> str:
    """int8 dynamic quantisation by ONNX Runtime of the MatMul/Gemm weights (the linear layers) and of fused
    Attention operators' query/key/value weights, activations quantised per batch at run time: what a
    transformer's matrix products need, with no calibration data. (Leaving the fused attention in float
    kept a third of the weights at 32 bits and ran 1.3x slower at batch 32 on the SST-2 sample.)

    One scale per output channel, not per matrix: on MiniLM fine-tuned on the SST-2 sample it kept 98.4% of
    the dev labels (-0.2 points) where one scale per matrix kept 96.1% (-1.1 points); BENCHMARKS.md, issue 16."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():  # its advice to pre-process the graph is for static quantisation
        quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul", "Gemm", "Attention"],
                         weight_type=QuantType.QInt8, per_channel=True,
                         # a fused graph's contrib operators leave some outputs untyped: they are float
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
    return "dynamic: MatMul/Gemm/Attention weights int8 per output channel, activations quantised per batch"


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantisation tools log advice and progress on the root logger; not the user's concern."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol (get_next -> one feed, None when done) over torch batches."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.feeds = iter([{name: tensor.numpy() for name, tensor in batch.items()} for batch in batches])

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def quantize_static_int8(source: Path, target: Path, calibration: Callable[[], list[dict[str, torch.Tensor]]]) -> str:
    """int8 static quantisation by ONNX Runtime of every convolution and matrix product: weights per output
    channel, activations with ranges fixed beforehand from calibration images (the run's training split),
    QDQ format. Dynamic quantisation cannot serve a CNN (ONNX Runtime's CPU ConvInteger takes uint8 only, and
    quantising activations per batch would cost more than it saves); static int8 ran EfficientNet-Lite0 1.4x
    faster than ONNX Runtime float at batch 32 (BENCHMARKS.md, issue 16)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_suffix(".prepared.onnx")  # shapes inferred and graph folded, as ONNX Runtime advises
    try:
        with _quiet_root_logger():
            quant_pre_process(str(source), str(prepared))
            quantize_static(str(prepared), str(target), _Batches(calibration()), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)
    return "static: convolution and MatMul/Gemm weights int8 per output channel, activations uint8 with ranges " \
           "calibrated on training images (QDQ)"


# the run's kind -> how ONNX Runtime quantises its exported float file to int8; returns what it did
ONNX_INT8: dict[str, Callable[[Path, Path, Callable[[], list[dict[str, torch.Tensor]]]], str]] = {
    TEXT: quantize_dynamic_int8,
    IMAGE: quantize_static_int8,
}


def quantize_onnx(kind: str, source: Path, target: Path,
                  calibration: Callable[[], list[dict[str, torch.Tensor]]]) -> str:
    """Quantise the float ONNX file `source` to int8 at `target` as the model's kind needs; what was done.
    `calibration` is called only by the quantisers that need example inputs."""
    require("onnxruntime", "--onnx --quantize int8")
    return ONNX_INT8[kind](source, target, calibration)
