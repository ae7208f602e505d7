"""A BERT encoder's checkpoint, read back from a sentence-transformers ONNX export.

``torch.onnx.export`` keeps the names of the tensors it stores as they are (embeddings, biases,
LayerNorms) except each Linear weight: that one it stores transposed, as the second input of a
MatMul, under a made-up name (``onnx::MatMul_470``). The MatMul's result goes into an Add with the
layer's own bias, whose name names the weight: ``<layer>.bias`` -> ``<layer>.weight``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_transfer.errors import HfTransferError

# where sentence-transformers' export puts the transformers model (module 0, its auto_model)
SENTENCE_TRANSFORMERS_PREFIX = "model.0.auto_model."


def _load_graph(path: Path) -> tuple[Any, dict[str, np.ndarray]]:
    """The ONNX graph and its stored tensors by name."""
    try:
        import onnx  # only here: nothing else needs it, and only this copy needs it offline
        from onnx import numpy_helper
    except ImportError:
        raise HfTransferError(
            f"Reading {path.name} needs the onnx package. Run: pip install 'hf-transfer-learning[offline]'  (or: pip install onnx)"
        ) from None
    graph = onnx.load(str(path)).graph
    return graph, {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def bert_state_dict_from_onnx(path: Path, prefix: str = SENTENCE_TRANSFORMERS_PREFIX) -> dict[str, torch.Tensor]:
    """The transformers ``BertModel`` tensors stored in an ONNX export, under their transformers names."""
    graph, tensors = _load_graph(path)
    named = {name[len(prefix):]: array for name, array in tensors.items() if name.startswith(prefix)}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" else ""
        if weight not in tensors or weight.startswith(prefix):
            continue  # attention's MatMuls multiply activations; only a stored, unnamed tensor is a Linear weight
        biases = [name for add in consumers.get(node.output[0], []) if add.op_type == "Add"
                  for name in add.input if name.startswith(prefix) and name.endswith(".bias")]
        if len(biases) != 1:
            raise HfTransferError(
                f"Cannot name the weight {weight} in {path.name}: its MatMul feeds {len(biases)} named biases, not 1. "
                "This package version is not supported offline."
            )
        named[biases[0][len(prefix):-len("bias")] + "weight"] = tensors[weight].T  # MatMul stores W transposed
    if not named:
        raise HfTransferError(f"{path.name} holds no tensors named {prefix}*; it is not a sentence-transformers export.")
    # a C-ordered, writable copy: onnx's arrays are read-only, and the transposed ones not contiguous
    return {name: torch.from_numpy(np.array(array, order="C")) for name, array in named.items()}


def bert_shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """The BertConfig sizes that the tensors themselves fix (the head count they do not)."""
    vocab_size, hidden_size = state_dict["embeddings.word_embeddings.weight"].shape
    layers = {int(m.group(1)) for key in state_dict if (m := re.match(r"encoder\.layer\.(\d+)\.", key))}
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "max_position_embeddings": state_dict["embeddings.position_embeddings.weight"].shape[0],
        "type_vocab_size": state_dict["embeddings.token_type_embeddings.weight"].shape[0],
        "num_hidden_layers": len(layers),
        "intermediate_size": state_dict["encoder.layer.0.intermediate.dense.bias"].shape[0],
    }
