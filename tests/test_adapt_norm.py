"""Per-domain BatchNorm statistics (adaptation.norm_statistics per_domain, AdaBN) on a tiny timm ResNet."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_vision import image_recipe, write_colour_folder
from torch import nn
from torch.utils.data import DataLoader

from hf_transfer.adaptation.norms import estimate_statistics
from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import recipe_from_dict
from hf_transfer.run import run_training

STEM_NORM = "bn1.running_mean"  # test_resnet's first BatchNorm: frozen under partial


class ConvNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(pixel_values))


def test_statistics_are_the_plain_average_over_the_batches():
    torch.manual_seed(0)
    model = ConvNorm().eval()
    images = torch.randn(12, 3, 8, 8) * 3 + 2
    loader = DataLoader([{"pixel_values": image, "labels": 0} for image in images], batch_size=4)
    estimate_statistics(model, loader, torch.device("cpu"))
    with torch.no_grad():
        activations = model.conv(images)
    torch.testing.assert_close(model.norm.running_mean, activations.mean((0, 2, 3)))
    assert not model.training and model.norm.momentum == 0.1  # left as found


def adaptation_recipe(source: Path, target: Path, output: Path, statistics: str, strategy: str = "partial") -> dict:
    return image_recipe(
        source, output,
        strategy={"name": strategy, "trainable_blocks": 1},
        adaptation={"method": "none", "target_path": str(target), "norm_statistics": statistics},
        training={"epochs": 2, "save_checkpoints": False, "feature_cache_dir": str(output.parent / "store")},
    )


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("domains")
    return write_colour_folder(root / "source", seed=0), write_colour_folder(root / "target", train=16, val=6, seed=1)


def test_per_domain_statistics_are_the_targets_in_the_saved_model(domains, tmp_path):
    import timm

    source, target = domains
    runs = {}
    for statistics in ("shared", "auto"):  # auto with mcc: per_domain, since the model has BatchNorm layers
        out = tmp_path / statistics
        config = adaptation_recipe(source, target, out, statistics)
        config["adaptation"]["method"] = "mcc"
        summary = run_training(recipe_from_dict(config))
        resolved = {"shared": "shared", "auto": "per_domain"}[statistics]
        assert summary["adaptation"]["norm_statistics"] == resolved
        runs[resolved] = load_file(str(out / "model.safetensors"))
    # shared: the frozen stem keeps the statistics it started with (a random model's zeros); per_domain: the target's
    assert torch.equal(runs["shared"][STEM_NORM], torch.zeros_like(runs["shared"][STEM_NORM]))
    assert not torch.equal(runs["per_domain"][STEM_NORM], runs["shared"][STEM_NORM])
    assert "re-estimated on the target (per-domain statistics" in (tmp_path / "auto" / "README.md").read_text()
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'auto'}", pretrained=True).eval()
    assert torch.equal(reloaded.bn1.running_mean, runs["per_domain"][STEM_NORM])  # a stock timm folder


@pytest.mark.parametrize("strategy", ["full", "freeze_backbone"])
def test_per_domain_statistics_without_batchnorm_is_one_clear_error(tiny_bert_dir, tmp_path, strategy):
    from conftest import keyword_sentences, write_jsonl
    from test_domain import domain_recipe, target_sentences

    source = write_jsonl(tmp_path / "source.jsonl", keyword_sentences(32, seed=1))
    target = write_jsonl(tmp_path / "target.jsonl", target_sentences(16, seed=2))
    config = domain_recipe(tiny_bert_dir, source, target, tmp_path / "out", method="mcc", norm_statistics="per_domain")
    with pytest.raises(HfTransferError, match="norm_statistics per_domain .* no BatchNorm layer .* set it to auto or shared"):
        run_training(recipe_from_dict(config | {"strategy": {"name": strategy}}))
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_frozen_per_domain_features_and_the_saved_folder_score_the_target_alike(domains, tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    from hf_transfer.adaptation.features import load_target_task
    from hf_transfer.adaptation.model import load_adapted_model
    from hf_transfer.recipe import load_recipe

    source, target = domains
    weights = tmp_path / "source.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), str(weights))
    out = tmp_path / "frozen"
    config = adaptation_recipe(source, target, out, "per_domain", "freeze_backbone")
    config["model"] = {"name": "test_resnet", "pretrained": True, "weights_file": str(weights)}
    config["adaptation"] |= {"method": "mmd", "bottleneck_dim": 8}
    summary = run_training(recipe_from_dict(config))
    assert summary["adaptation"]["norm_statistics"] == "per_domain"
    saved = load_file(str(out / "target_norm_statistics.safetensors"))
    pretrained = load_file(str(weights))
    assert saved.keys() <= pretrained.keys() and not torch.equal(saved["bn1.running_mean"], pretrained["bn1.running_mean"])
    assert "re-estimated on the target" in (out / "README.md").read_text()

    # the folder reloads as one module, normalising as on the target: it scores the whole target as the run did
    model = load_adapted_model(out)
    recipe = load_recipe(str(out / "recipe.yaml"))
    target_task = load_target_task(recipe, model.label_names)
    correct = total = 0
    with torch.no_grad():
        for split in ("train", "validation"):
            for batch in target_task.feature_source.loader(split, None):
                correct += int((model(pixel_values=batch["pixel_values"]).argmax(-1) == batch["labels"]).sum())
                total += len(batch["labels"])
    assert total == 44 and correct / total == pytest.approx(summary["eval"]["accuracy"])

    # a second run reads both domains' statistics (and so their features) from the store: no pass to estimate them
    def no_pass(*args, **kwargs):
        raise AssertionError("the statistics were estimated again")

    monkeypatch.setattr("hf_transfer.adaptation.features.estimate_statistics", no_pass)
    again = run_training(recipe_from_dict(config))
    assert again["eval"]["accuracy"] == summary["eval"]["accuracy"]
    assert load_file(str(out / "target_norm_statistics.safetensors")).keys() == saved.keys()


def test_the_source_is_scored_under_its_own_statistics_and_the_targets_come_back():
    from types import SimpleNamespace

    from hf_transfer.adaptation.backbone import source_statistics

    torch.manual_seed(0)
    model = ConvNorm().eval()

    def loader(shift: float) -> DataLoader:
        return DataLoader([{"pixel_values": image} for image in torch.randn(8, 3, 8, 8) + shift], batch_size=4)

    estimate_statistics(model, loader(5.0), torch.device("cpu"))
    target_mean = model.norm.running_mean.clone()
    source = SimpleNamespace(feature_source=SimpleNamespace(loader=lambda split, view: loader(-5.0)))
    with source_statistics(model, source, torch.device("cpu")):
        assert not torch.allclose(model.norm.running_mean, target_mean)
    assert torch.equal(model.norm.running_mean, target_mean)


@pytest.mark.parametrize(("method", "statistics", "expected"), [
    ("mcc", "auto", True), ("none", "auto", False), ("none", "per_domain", True), ("mcc", "shared", False),
])
def test_auto_gives_each_domain_its_statistics_only_where_a_method_adapts(domains, tmp_path, method, statistics,
                                                                          expected):
    from hf_transfer.adaptation.norms import per_domain_statistics

    source, target = domains
    config = adaptation_recipe(source, target, tmp_path / "out", statistics)
    config["adaptation"]["method"] = method
    assert per_domain_statistics(recipe_from_dict(config), ConvNorm()) is expected
