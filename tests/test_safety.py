"""Nothing lost, nothing wrong in silence: the bad inputs, faults and misuses a careless or unlucky user
meets, each ending in one `hf-transfer: error:` line, exit status 2, and a finished run left byte for
byte as it was. The table grows with every case found; the fixtures are tiny and trained once."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import keyword_sentences, write_jsonl

from hf_transfer.cli import main
from hf_transfer.errors import HfTransferError


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_recipe(path: Path, model: Path, data: Path, output: Path, extra: str = "") -> Path:
    path.write_text(
        f"name: safety\ntask: text\nmodel:\n  name: {model}\ndata:\n  path: {data}\n  max_length: 32\n"
        f"training:\n  epochs: 2\n  batch_size: 16\n  lr: 5.0e-3\n  seed: 0\n  logging_steps: 2\n"
        f"output:\n  dir: {output}\n{extra}"
    )
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safety")
    data = root / "data"
    write_jsonl(data / "train.jsonl", keyword_sentences(64, seed=1))
    write_jsonl(data / "validation.jsonl", keyword_sentences(24, seed=2))
    recipe = write_recipe(root / "safety.yaml", tiny_bert_dir, data, root / "run")
    assert main(["train", "--recipe", str(recipe)]) == 0
    return {"root": root, "data": data, "recipe": recipe, "run": root / "run", "model": tiny_bert_dir}


def fails_cleanly(argv: list[str], capsys: pytest.CaptureFixture, expected: str, untouched: Path | None = None) -> str:
    """Run the CLI; assert exit 2, exactly one stderr line naming the problem, and `untouched` unchanged."""
    before = folder_digest(untouched) if untouched is not None else None
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hf-transfer: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    if untouched is not None:
        assert folder_digest(untouched) == before, "the finished run's folder changed"
    return lines[0]


# ------------------------------------------------------------------ recipe values, checked at load time

BAD_VALUES = [
    ("training.max_grad_norm=-1", "training.max_grad_norm must be more than 0"),
    ("training.warmup_ratio=5", "training.warmup_ratio must lie between 0 and 1"),
    ("data.max_length=0", "data.max_length must be at least 1"),
    ("strategy.unfreeze_every=0", "strategy.unfreeze_every must be at least 1"),
    ("data.image_size=0", "data.image_size must be at least 1"),
    ("data.image_size=-5", "data.image_size must be at least 1"),
    ("training.lr=-1", "training.lr must be more than 0"),
    ("training.lr=nan", "training.lr must be more than 0; got nan"),
    ("training.label_smoothing=2", "training.label_smoothing must lie between 0 and 1"),
    ("data.max_train_samples=0", "data.max_train_samples must be at least 1"),
    ("training.lr=[1,", "is not valid YAML"),
    ("training.lr=!!python/object/apply:os.system [echo hacked]", "is not valid YAML"),
    ("training.learning_rate=1e-3", "Did you mean 'training.lr'?"),
    ("name=../elsewhere", "is not a plain name"),
    ("training.class_weights=[1, -2]", "class_weights must all be positive"),
]


@pytest.mark.parametrize(("override", "expected"), BAD_VALUES)
def test_bad_recipe_values_are_one_line_and_touch_nothing(workspace, capsys, override, expected):
    fails_cleanly(["train", "--recipe", str(workspace["recipe"]), "--output-dir", str(workspace["run"]),
                   "--overwrite", "--set", override], capsys, expected, untouched=workspace["run"])


def test_a_recipe_file_cannot_overwrite_or_repeat_a_key(workspace, tmp_path, capsys):
    w = workspace
    overwriting = write_recipe(tmp_path / "o.yaml", w["model"], w["data"], w["run"], "  overwrite: true\n")
    fails_cleanly(["train", "--recipe", str(overwriting)], capsys, "pass --overwrite on the command line", w["run"])
    twice = tmp_path / "twice.yaml"
    twice.write_text(w["recipe"].read_text() + "training:\n  epochs: 9\n")
    fails_cleanly(["train", "--recipe", str(twice)], capsys, "the key 'training' appears twice", w["run"])


# ------------------------------------------------------------------ the output folder contract


def test_a_refused_resume_writes_nothing(workspace, capsys):
    w = workspace
    fails_cleanly(["train", "--recipe", str(w["recipe"]), "--resume", "--set", "training.lr=1e-2"], capsys,
                  "the recipe differs in training.lr", untouched=w["run"])
    assert not (w["run"] / "feature_cache").exists()


def test_a_failed_overwrite_leaves_the_finished_run_usable(workspace, capsys):
    w = workspace
    fails_cleanly(["train", "--recipe", str(w["recipe"]), "--overwrite", "--set", "data.text_column=review"],
                  capsys, "Column(s) ['review'] not found", untouched=w["run"])
    assert main(["predict", str(w["run"]), "wonderful film"]) == 0


def test_resume_into_another_non_empty_folder_needs_overwrite(workspace, tmp_path, capsys):
    w = workspace
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    checkpoint = sorted((w["run"] / "checkpoints").iterdir())[-1]
    fails_cleanly(["train", "--recipe", str(w["recipe"]), "--resume", str(checkpoint), "--output-dir", str(other)],
                  capsys, "is not empty", untouched=other)


def test_output_folder_under_a_file_is_refused(workspace, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    fails_cleanly(["train", "--recipe", str(workspace["recipe"]), "--output-dir", str(tmp_path / "a_file" / "run")],
                  capsys, "would lie under the file")


def test_overwrite_removes_only_the_runs_own_files(workspace, tmp_path):
    w = workspace
    run = tmp_path / "run"
    shutil.copytree(w["run"], run)
    (run / "checkpoints" / "my_notes.txt").write_text("keep me")
    assert main(["train", "--recipe", str(w["recipe"]), "--output-dir", str(run), "--overwrite",
                 "--set", "training.epochs=1"]) == 0
    assert (run / "checkpoints" / "my_notes.txt").read_text() == "keep me"
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-4"]


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_checkpoint(workspace, tmp_path, capsys,
                                                                                    monkeypatch):
    from accelerate import Accelerator

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", full)
    out = tmp_path / "full"
    fails_cleanly(["train", "--recipe", str(workspace["recipe"]), "--output-dir", str(out)], capsys,
                  "No space left on device")
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_ctrl_c_names_the_last_checkpoint_and_exits_130(workspace, tmp_path, capsys, monkeypatch):
    from hf_transfer import run as run_module

    run = tmp_path / "run"
    shutil.copytree(workspace["run"], run)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run_training", interrupted)
    assert main(["train", "--recipe", str(workspace["recipe"]), "--output-dir", str(run), "--resume"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted" in err and str(run / "checkpoints" / "checkpoint-8") in err


# ------------------------------------------------------------------ labels and data files


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize(
    ("label_of", "extra", "expected"),
    [
        (str, {"text": "a", "label": ""}, "1 empty label(s) in column 'label' (first at row 64)"),
        (str, {"text": "a", "label": "3"}, "mixes numbers and words"),
        (lambda name: int(name == "positive"), {"text": "a", "label": 0.5}, "holds 0.5 (row 64), not a class"),
    ],
)
def test_labels_that_would_become_silent_classes_are_errors(workspace, tmp_path, capsys, label_of, extra, expected):
    data = tmp_path / "data"
    rows = [{"text": r["text"], "label": label_of(r["label"])} for r in keyword_sentences(64, seed=1)]
    write_csv(data / "train.csv", rows + [extra])
    write_csv(data / "validation.csv", [{"text": r["text"], "label": label_of(r["label"])}
                                        for r in keyword_sentences(24, seed=2)])
    fails_cleanly(["train", "--recipe", str(workspace["recipe"]), "--output-dir", str(tmp_path / "out"),
                   "--set", f"data.path={data}"], capsys, expected)


def test_labels_differing_only_by_surrounding_spaces_are_one_class(workspace, tmp_path):
    from hf_transfer.data.text import load_text_splits
    from hf_transfer.recipe import DataConfig

    data = tmp_path / "data"
    rows = keyword_sentences(40, seed=1)
    for row in rows[::3]:
        row["label"] = f" {row['label']} "
    write_jsonl(data / "train.jsonl", rows)
    assert load_text_splits(DataConfig(path=str(data)), 0).label_names == ["negative", "positive"]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("train.csv", b"text,label\n", "The train split is empty"),
        ("train.csv", "text,label\ncaf\u00e9 au lait,positive\n".encode("latin-1"), "is not UTF-8 text"),
        ("train.jsonl", b'{"text": "a", "label": "x"}\n{"text": "b", "label": \n', "line 2, is not valid JSON"),
        ("train.jsonl", b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": "y"}\n',
         "fewer than 2 training examples"),
    ],
)
def test_unreadable_data_files_are_one_line(workspace, tmp_path, capsys, name, content, expected):
    data = tmp_path / "data"
    data.mkdir()
    (data / name).write_bytes(content)
    fails_cleanly(["train", "--recipe", str(workspace["recipe"]), "--output-dir", str(tmp_path / "out"),
                   "--set", f"data.path={data}"], capsys, expected)


def test_max_length_beyond_the_models_positions_cuts_texts_at_its_limit(workspace, tmp_path):
    out = tmp_path / "out"
    long_text = " ".join(["film"] * 200) + " wonderful"
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", keyword_sentences(64, seed=1) + [{"text": long_text, "label": "positive"}])
    shutil.copy(workspace["data"] / "validation.jsonl", data / "validation.jsonl")
    assert main(["train", "--recipe", str(workspace["recipe"]), "--output-dir", str(out), "--set",
                 f"data.path={data}", "data.max_length=512", "training.epochs=1"]) == 0  # tiny BERT has 64 positions


# ------------------------------------------------------------------ predict, evaluate, push


def test_predict_and_evaluate_misuses_are_one_line(workspace, tmp_path, capsys):
    w = workspace
    fails_cleanly(["predict", str(w["run"]), str(w["data"])], capsys, "is a folder; a text model labels texts", w["run"])
    fails_cleanly(["predict", str(tmp_path), "hello"], capsys, "is not a saved image model")
    fails_cleanly(["push", str(w["data"]), "--repo-id", "me/data"], capsys, "not the output folder of an hf-transfer run")


def test_a_run_folder_cannot_grant_itself_remote_code(workspace, tmp_path, capsys):
    run = tmp_path / "downloaded"
    shutil.copytree(workspace["run"], run)
    config = json.loads((run / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "evil_model.EvilModel"}
    (run / "config.json").write_text(json.dumps(config))
    (run / "recipe.yaml").write_text((run / "recipe.yaml").read_text().replace("trust_remote_code: false",
                                                                                "trust_remote_code: true"))
    fails_cleanly(["predict", str(run), "hello"], capsys, "--trust-remote-code", untouched=run)


@pytest.mark.parametrize(("damaged", "expected"), [
    ("model.safetensors", "Cannot load the model"), ("recipe.yaml", "recipe.yaml"), ("metrics.json", "metrics.json"),
])
def test_truncated_run_files_are_one_line(workspace, tmp_path, capsys, damaged, expected):
    run = tmp_path / "run"
    shutil.copytree(workspace["run"], run)
    path = run / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    fails_cleanly(["predict", str(run), "wonderful"], capsys, expected, untouched=run)


def test_a_truncated_checkpoint_state_is_one_line(workspace, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(workspace["run"], run)
    state = sorted((run / "checkpoints").iterdir())[-1] / "trainer_state.json"
    state.write_text(state.read_text()[:50])
    fails_cleanly(["train", "--recipe", str(workspace["recipe"]), "--output-dir", str(run), "--resume"], capsys,
                  "trainer_state.json cannot be read", untouched=run)


def test_staged_writes_merge_folders_and_leave_nothing_behind_on_failure(tmp_path):
    from hf_transfer.export.folder import staged

    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "mine.txt").write_text("mine")
    with staged(tmp_path) as staging:
        (staging / "merged").mkdir()
        (staging / "merged" / "model.safetensors").write_text("new")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["mine.txt", "model.safetensors"]
    with pytest.raises(HfTransferError, match="No space left"):
        with staged(tmp_path) as staging:
            (staging / "config.json").write_text("{}")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not (tmp_path / ".staging").exists() and not (tmp_path / "config.json").exists()


# ------------------------------------------------------------------ any value of any key: a recipe or one clear error


def test_any_value_for_any_key_builds_a_recipe_or_raises_one_clear_error():
    hypothesis = pytest.importorskip("hypothesis", reason="hypothesis drives this property test (the dev extra)")
    from hypothesis import strategies as st
    from test_readme import recipe_keys

    from hf_transfer.recipe import recipe_from_dict

    keys = recipe_keys()
    values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                       st.text(max_size=12), st.lists(st.floats(-5, 5), max_size=3))

    @hypothesis.settings(max_examples=300, deadline=None, database=None)
    @hypothesis.given(st.dictionaries(st.sampled_from(keys), values, max_size=4))
    def build(overrides: dict) -> None:
        nested: dict = {}
        for key, value in overrides.items():
            *sections, last = key.split(".")
            node = nested
            for section in sections:
                node = node.setdefault(section, {})
            node[last] = value
        try:
            recipe_from_dict(nested)
        except HfTransferError as error:
            assert "\n" not in str(error) and str(error)

    build()


# ------------------------------------------------------------------ images


def write_images(root: Path, per_class: int = 12) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for name, colour in (("blue", (40, 60, 200)), ("red", (200, 50, 40))):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def image_recipe(path: Path, images: Path, output: Path, training: str = "") -> Path:
    path.write_text(
        f"name: images\ntask: image\nmodel:\n  name: test_resnet\n  pretrained: false\n"
        f"data:\n  path: {images}\n  image_size: 32\nstrategy:\n  name: partial\n  trainable_blocks: 1\n"
        f"training:\n  epochs: 2\n  batch_size: 4\n  lr: 1.0e-2\n  seed: 0\n  logging_steps: 1\n{training}"
        f"output:\n  dir: {output}\n  save_total_limit: 100\n"
    )
    return path


def test_image_resume_mid_epoch_with_workers_matches_an_uninterrupted_run(tmp_path):
    images = write_images(tmp_path / "images")
    recipe = image_recipe(tmp_path / "r.yaml", images, tmp_path / "uninterrupted",
                          "  num_workers: 2\n  checkpoint_every_steps: 2\n")
    assert main(["train", "--recipe", str(recipe)]) == 0
    mid_epoch = tmp_path / "uninterrupted" / "checkpoints" / "checkpoint-8"  # 6 steps an epoch: step 2 of epoch 2
    assert json.loads((mid_epoch / "trainer_state.json").read_text())["state"]["batches_done"] == 2
    assert main(["train", "--recipe", str(recipe), "--resume", str(mid_epoch),
                 "--output-dir", str(tmp_path / "resumed")]) == 0
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    reference = json.loads((tmp_path / "uninterrupted" / "metrics.json").read_text())
    assert resumed["history"][-1] == reference["history"][-1]  # loss to the last digit: the same augmentations
    assert resumed["eval"] == reference["eval"]


def test_image_folder_mistakes_and_unreadable_images_are_one_line(tmp_path, capsys, monkeypatch):
    images = write_images(tmp_path / "images", per_class=4)
    recipe = image_recipe(tmp_path / "r.yaml", images, tmp_path / "out", "  num_workers: 0\n")
    (images / "train" / "red" / "more").mkdir()
    (images / "train" / "red" / "0.png").rename(images / "train" / "red" / "more" / "0.png")
    fails_cleanly(["train", "--recipe", str(recipe)], capsys, "holds the folder more/")
    (images / "train" / "red" / "more" / "0.png").rename(images / "train" / "red" / "0.png")
    (images / "train" / "red" / "more").rmdir()
    (images / "train" / "red" / "1.png").write_bytes(b"not an image")
    fails_cleanly(["train", "--recipe", str(recipe), "--set", "data.verify_images=false"], capsys,
                  "Cannot decode the image")
    assert main(["train", "--recipe", str(recipe), "--overwrite"]) == 0  # verified: the broken file is skipped
    broken = tmp_path / "broken"
    for name in ("red", "blue"):
        (broken / "train" / name).mkdir(parents=True)
        (broken / "train" / name / "x.png").write_bytes(b"not an image either")
    fails_cleanly(["predict", str(tmp_path / "out"), str(broken)], capsys, "None of the 2 image(s)")
    fails_cleanly(["evaluate", str(tmp_path / "out"), "--data", str(broken), "--split", "train"], capsys,
                  "No image of the train split can be decoded")


def test_an_image_over_pils_pixel_limit_says_so(tmp_path, monkeypatch):
    from PIL import Image

    from hf_transfer.data.images import ImageCheck, check_images

    (tmp_path / "big.png").write_bytes(b"")
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x64 is then far over twice the limit
    from datasets import Dataset

    check = ImageCheck()
    kept = check_images(Dataset.from_dict({"image": [{"bytes": None, "path": str(tmp_path / "big.png")}]}),
                        "image", 1, check)
    assert len(kept) == 0 and "over PIL's limit of 100 pixels" in check.skipped[0]
