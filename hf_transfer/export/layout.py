"""The output folder's layout: the names of the files a run writes, and which kind of model a folder holds.

Writers (tasks/, adaptation/, sources/vision.py) and readers (inference/) name files through these
constants, so a folder is recognised in one place (`folder_kind`).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
LOG_FILE = "log.jsonl"
CARD_FILE = "README.md"
LR_FINDER_PNG = "lr_finder.png"  # training.lr auto: the learning-rate range test's curve
CONFIG_FILE = "config.json"  # transformers' or timm's model config
ADAPTER_CONFIG_FILE = "adapter_config.json"  # a peft adapter
HEAD_INFO_FILE = "hf_transfer.json"  # image and audio runs: what the library's config.json cannot say (the head, the source)
AUDIO_HEAD_FILE = "head.safetensors"  # audio runs: the head on the encoder's pooled states
MULTIMODAL_FILE = "multimodal.json"
FUSION_WEIGHTS_FILE = "fusion.safetensors"
ADAPTATION_FILE = "adaptation.json"
ADAPTATION_HEAD_FILE = "adaptation_head.safetensors"
TCA_FILE = "tca.safetensors"
TARGET_NORMS_FILE = "target_norm_statistics.safetensors"  # adaptation.norm_statistics per_domain, frozen backbone
# a mean-pooled text run: a sentence-transformers folder (encoder at the top, then pooling, then the
# linear head as a Dense layer), in the format every sentence-transformers release since 2 reads
SENTENCE_MODULES_FILE = "modules.json"
SENTENCE_CONFIG_FILE = "sentence_bert_config.json"
POOLING_DIR = "1_Pooling"
DENSE_DIR = "2_Dense"
MERGED_DIR = "merged"  # LoRA runs with strategy.merge_lora: the merged full model
EVALUATIONS_DIR = "evaluations"
# `hf-transfer optimize`: OUT/optimized/ with its manifest, the float weights (pruned, LoRA merged), an ONNX file
OPTIMIZED_DIR = "optimized"
OPTIMIZED_FILE = "optimized.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"

# folder kinds: a model one library loads (text: transformers / peft, image: timm), or one that
# hf_transfer's own loader rebuilds (two_tower, adapted, optimized)
TEXT, IMAGE, TWO_TOWER, ADAPTED, OPTIMIZED, AUDIO = "text", "image", "two_tower", "adapted", "optimized", "audio"
_MARKERS = {MULTIMODAL_FILE: TWO_TOWER, ADAPTATION_FILE: ADAPTED, OPTIMIZED_FILE: OPTIMIZED}


def _recipe_task(folder: Path) -> str | None:
    try:
        values = yaml.safe_load((folder / RECIPE_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return values.get("task", "text") if isinstance(values, dict) else None


def folder_kind(folder: Path) -> str:
    """TEXT, IMAGE, AUDIO, TWO_TOWER, ADAPTED or OPTIMIZED; a folder that is none of them reads as IMAGE, whose loader says why."""
    for marker, kind in _MARKERS.items():
        if (folder / marker).is_file():
            return kind
    task = _recipe_task(folder) if (folder / RECIPE_FILE).is_file() else None
    if task is not None:  # an unreadable recipe.yaml: the model's own config tells, and the loader says what is wrong
        return {"text": TEXT, "audio": AUDIO}.get(task, IMAGE)
    config = folder / CONFIG_FILE
    try:
        is_transformers = config.is_file() and "model_type" in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        is_transformers = False
    return TEXT if is_transformers else IMAGE  # timm's config.json has 'architecture' instead
