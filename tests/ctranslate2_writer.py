"""A test-only writer of CTranslate2's Whisper format, from a transformers Whisper state dict.

Written from the same layout description as the reader (``ModelSpec._serialize``), but mapping names
in the other direction by its own table, so a round trip checks the reader's mapping rather than
repeating it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

_DTYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _variable(name: str, array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    header = _string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
    return header + struct.pack("<BI", _DTYPE_IDS[array.dtype], array.nbytes) + array.tobytes()


def _layer(hf: dict[str, np.ndarray], side: str, i: int, decoder: bool) -> dict[str, np.ndarray]:
    p, out = f"model.{side}.layers.{i}.", {}
    c = f"{side}/layer_{i}/"
    q, k, v = (hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
    out[c + "self_attention/linear_0/weight"] = np.concatenate([q, k, v])
    zeros = np.zeros_like(hf[p + "self_attn.q_proj.bias"])
    out[c + "self_attention/linear_0/bias"] = np.concatenate([hf[p + "self_attn.q_proj.bias"], zeros, hf[p + "self_attn.v_proj.bias"]])
    out[c + "self_attention/linear_1/weight"] = hf[p + "self_attn.out_proj.weight"]
    out[c + "self_attention/linear_1/bias"] = hf[p + "self_attn.out_proj.bias"]
    out[c + "self_attention/layer_norm/gamma"] = hf[p + "self_attn_layer_norm.weight"]
    out[c + "self_attention/layer_norm/beta"] = hf[p + "self_attn_layer_norm.bias"]
    if decoder:
        out[c + "attention/linear_0/weight"] = hf[p + "encoder_attn.q_proj.weight"]
        out[c + "attention/linear_0/bias"] = hf[p + "encoder_attn.q_proj.bias"]
        out[c + "attention/linear_1/weight"] = np.concatenate([hf[p + "encoder_attn.k_proj.weight"], hf[p + "encoder_attn.v_proj.weight"]])
        out[c + "attention/linear_1/bias"] = np.concatenate([zeros, hf[p + "encoder_attn.v_proj.bias"]])
        out[c + "attention/linear_2/weight"] = hf[p + "encoder_attn.out_proj.weight"]
        out[c + "attention/linear_2/bias"] = hf[p + "encoder_attn.out_proj.bias"]
        out[c + "attention/layer_norm/gamma"] = hf[p + "encoder_attn_layer_norm.weight"]
        out[c + "attention/layer_norm/beta"] = hf[p + "encoder_attn_layer_norm.bias"]
    for n, (ct2, ours) in enumerate((("linear_0", "fc1"), ("linear_1", "fc2"))):
        out[c + f"ffn/{ct2}/weight"] = hf[p + f"{ours}.weight"]
        out[c + f"ffn/{ct2}/bias"] = hf[p + f"{ours}.bias"]
    out[c + "ffn/layer_norm/gamma"] = hf[p + "final_layer_norm.weight"]
    out[c + "ffn/layer_norm/beta"] = hf[p + "final_layer_norm.bias"]
    return out


def write_whisper_ctranslate2(model: torch.nn.Module, path: Path, dtype=np.float32, version: int = 6,
                              spec: str = "WhisperSpec", revision: int = 3) -> None:
    """Write ``model`` (a transformers WhisperForConditionalGeneration) as CTranslate2 would."""
    config = model.config
    hf = {k: v.detach().numpy().astype(dtype) for k, v in model.state_dict().items()}
    variables = {
        "decoder/activation": np.array(3, np.int8), "decoder/alibi": np.array(0, np.int8),
        "decoder/alignment_heads": np.array(1, np.int16), "decoder/alignment_layer": np.array(-1, np.int16),
        "decoder/embeddings/weight": hf["model.decoder.embed_tokens.weight"],
        "decoder/layer_norm/beta": hf["model.decoder.layer_norm.bias"],
        "decoder/layer_norm/gamma": hf["model.decoder.layer_norm.weight"],
        "decoder/num_heads": np.array(config.decoder_attention_heads, np.int16),
        "decoder/position_encodings/encodings": hf["model.decoder.embed_positions.weight"],
        "decoder/pre_norm": np.array(1, np.int8), "decoder/scale_embeddings": np.array(0, np.int8),
        "decoder/start_from_zero_embedding": np.array(0, np.int8),
        "encoder/conv1/weight": hf["model.encoder.conv1.weight"], "encoder/conv1/bias": hf["model.encoder.conv1.bias"],
        "encoder/conv2/weight": hf["model.encoder.conv2.weight"], "encoder/conv2/bias": hf["model.encoder.conv2.bias"],
        "encoder/layer_norm/beta": hf["model.encoder.layer_norm.bias"],
        "encoder/layer_norm/gamma": hf["model.encoder.layer_norm.weight"],
        "encoder/num_heads": np.array(config.encoder_attention_heads, np.int16),
        "encoder/position_encodings/encodings": hf["model.encoder.embed_positions.weight"],
    }
    for i in range(config.decoder_layers):
        variables.update(_layer(hf, "decoder", i, decoder=True))
    for i in range(config.encoder_layers):
        variables.update(_layer(hf, "encoder", i, decoder=False))
    body = struct.pack("<I", version) + _string(spec) + struct.pack("<II", revision, len(variables))
    body += b"".join(_variable(name, variables[name]) for name in sorted(variables))
    body += struct.pack("<I", 1) + _string("decoder/projection/weight") + _string("decoder/embeddings/weight")
    path.write_bytes(body)
