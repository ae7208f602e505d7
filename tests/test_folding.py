"""BatchNorm folded into the convolution before it, for frozen feature passes (sources/folding.py)."""

from __future__ import annotations

import contextlib

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from hf_transfer.cache.store import extract_features
from hf_transfer.sources.folding import fold_batch_norms, folded_if_same


class Features(nn.Module):
    """A model with the `features` method extraction calls."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values)


def with_random_statistics(model: nn.Module) -> nn.Module:
    """Running statistics far from the identity, so that folding them in changes the weights."""
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-1, 1)
                layer.running_var.uniform_(0.5, 2)
                layer.weight.uniform_(0.5, 2)
                layer.bias.uniform_(-1, 1)
    return model.eval()


def count_norms(model: nn.Module) -> int:
    return sum(isinstance(layer, nn.BatchNorm2d) for layer in model.modules())


def test_a_timm_cnn_folds_every_norm_and_computes_the_same_features():
    model = with_random_statistics(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0))
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        folded = fold_batch_norms(model)
        got = folded(images)
    assert count_norms(model) > 0 and count_norms(folded) == 0
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    with torch.no_grad():
        assert torch.equal(model(images), expected)  # the original keeps its layers and weights


def test_a_model_without_batch_norm_is_served_as_it_is():
    model = Features(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    assert fold_batch_norms(model) is None
    assert folded_if_same(model, "features", {"pixel_values": torch.randn(2, 3, 8, 8)}) is model


class ConvUsedTwice(nn.Module):
    """A convolution followed by a BatchNorm among the children, whose output the forward also reads unnormalised:
    folding would change that second use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return (self.norm(y) + y).mean(dim=(2, 3))


def test_a_pairing_the_forward_does_not_follow_is_caught_and_the_model_kept():
    model = Features(with_random_statistics(ConvUsedTwice()))
    assert fold_batch_norms(model) is not None  # the children look like a pair...
    assert folded_if_same(model, "features", {"pixel_values": torch.randn(4, 3, 8, 8)}) is model  # ...but are not


def test_extraction_with_the_folded_copy_gives_the_unfolded_features():
    model = Features(with_random_statistics(timm.create_model("resnet18", pretrained=False, num_classes=0)))
    images, labels = torch.randn(6, 3, 48, 48), torch.arange(6) % 2
    loader = DataLoader([{"pixel_values": x, "labels": y} for x, y in zip(images, labels)], batch_size=4)
    features, read_labels = extract_features(model, loader, torch.device("cpu"), contextlib.nullcontext)
    with torch.no_grad():
        expected = model.features(images)
    assert torch.equal(read_labels, labels)
    assert torch.allclose(features, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert count_norms(model) > 0  # the run's own model is untouched


def test_predict_and_evaluate_serve_an_image_model_folded_and_other_models_as_they_are():
    from timm.data import create_transform, resolve_data_config

    from hf_transfer.export.layout import IMAGE, TEXT
    from hf_transfer.inference.loader import fold_for_inference
    from hf_transfer.inference.saved import PixelLogits, SavedModel

    cnn = with_random_statistics(timm.create_model("resnet18", pretrained=False, num_classes=3))
    transform = create_transform(**resolve_data_config({}, model=cnn))
    saved = SavedModel(PixelLogits(cnn).eval(), ["a", "b", "c"], IMAGE, None, transform=transform)
    served = fold_for_inference(saved)
    pixels = torch.randn(4, 3, 96, 96)
    with torch.no_grad():
        expected, got = saved.model(pixel_values=pixels), served.model(pixel_values=pixels)
    assert count_norms(served.model) == 0 and count_norms(saved.model) > 0
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))

    text = SavedModel(nn.Linear(2, 2), ["a", "b"], TEXT, None)
    assert fold_for_inference(text) is text
