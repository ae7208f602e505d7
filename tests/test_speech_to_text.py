"""Speech->text transfer: a text run's head on speech, through an adaptation layer (head.text_run) or
through transcripts (predict / evaluate --transcribe); and the speech encoders besides Whisper.

Tiny random models only: a 2-layer BERT text run that reads one keyword, and tones standing in for
speech, each tone paired with a sentence holding one of the two keywords.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import recipe_from_dict
from tests.conftest import keyword_sentences, write_jsonl
from tests.test_speech import tone, write_wav

# the tone each class is spoken as: what the adaptation layer has to tie to the keyword of the transcript
PITCH = {"positive": 3000.0, "negative": 300.0}


@pytest.fixture(scope="module")
def text_run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mean-pooled text run (frozen tiny BERT, the solver's head) that labels sentences by their keyword."""
    from hf_transfer.run import run_training

    root = tmp_path_factory.mktemp("text_run")
    write_jsonl(root / "data" / "train.jsonl", keyword_sentences(120, seed=0))
    write_jsonl(root / "data" / "validation.jsonl", keyword_sentences(40, seed=1))
    summary = run_training(recipe_from_dict({
        "task": "text", "model": {"name": str(tiny_bert_dir)}, "data": {"path": str(root / "data")},
        "head": {"pooling": "mean"}, "strategy": {"name": "freeze_backbone"},
        "training": {"num_workers": 0, "mixed_precision": "no"},
        "output": {"dir": str(root / "run"), "overwrite": True},
    }))
    assert summary["eval"]["accuracy"] == 1.0  # the text model itself reads the keyword
    return root / "run"


def write_spoken_pairs(root: Path, train: int = 16, validation: int = 6, seed: int = 0) -> Path:
    """train.csv: a tone per clip, its transcript (a keyword sentence of the tone's class) and a RANDOM
    label (the adaptation layer must not read it); validation.csv: tones with their true labels."""
    rng, draw = np.random.default_rng(seed), random.Random(seed)
    sentences = {label: [r["text"] for r in keyword_sentences(2 * train, seed=seed + 5) if r["label"] == label]
                 for label in PITCH}
    for split, count in (("train", train), ("validation", validation)):
        rows = []
        for i in range(count):
            label = "positive" if i % 2 == 0 else "negative"
            path = write_wav(root / split / f"{split}_{i}.wav", tone(PITCH[label], 0.6, 16000, rng), 16000)
            shown = draw.choice(list(PITCH)) if split == "train" else label
            rows.append({"path": f"{split}/{path.name}", "transcript": sentences[label][i // 2], "label": shown})
        with (root / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def spoken_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_spoken_pairs(tmp_path_factory.mktemp("spoken"))


def adapter_recipe(whisper: Path, data: Path, text_run: Path, output: Path, **head) -> dict:
    return {
        "task": "audio", "model": {"name": str(whisper)},
        "data": {"path": str(data), "audio_column": "path", "transcript_column": "transcript"},
        "strategy": {"name": "freeze_backbone"}, "head": {"text_run": str(text_run), **head},
        "training": {"num_workers": 0, "batch_size": 8},
        "output": {"dir": str(output), "overwrite": True},
    }


@pytest.fixture(scope="module")
def adapted_run(tiny_whisper_dir: Path, spoken_pairs: Path, text_run: Path, tmp_path_factory: pytest.TempPathFactory):
    from hf_transfer.run import run_training

    output = tmp_path_factory.mktemp("adapted") / "run"
    summary = run_training(recipe_from_dict(adapter_recipe(tiny_whisper_dir, spoken_pairs, text_run, output)))
    return summary, output


def test_adaptation_layer_lets_the_text_head_label_speech_without_speech_labels(adapted_run):
    summary, _ = adapted_run
    # the training clips' labels are random: a head trained on them would sit near chance; the text model
    # reading the transcripts labels every held-out tone right
    assert summary["eval"]["accuracy"] == 1.0
    fit = summary["head_solver"]
    assert fit["kind"] == "text_projection" and fit["cv_agreement_with_text_model"] == 1.0


def test_adapted_folder_is_an_audio_classifier_with_the_text_runs_labels(adapted_run, spoken_pairs: Path, text_run: Path):
    from hf_transfer.inference.predict import predict

    _, output = adapted_run
    info = json.loads((output / "hf_transfer.json").read_text())
    assert info["text_run"] == str(text_run) and info["task"] == "audio"
    rows = list(csv.DictReader((spoken_pairs / "validation.csv").open()))
    predictions = list(predict(output, [str(spoken_pairs / r["path"]) for r in rows]))
    assert [p.labels[0] for p in predictions] == [r["label"] for r in rows]
    assert "adaptation layer" in (output / "README.md").read_text()


def test_the_adapted_head_is_the_text_head_on_projected_speech(tiny_whisper_dir: Path, text_run: Path):
    """Folding the projection into one linear head changes nothing: the text head on the projection's
    output gives the same logits, and the fit is blind to the training labels."""
    from hf_transfer.cache.projection import TextTargets, fit_projected_text_head
    from hf_transfer.tasks.text import load_mean_pooled

    generator = torch.Generator().manual_seed(0)
    speech = torch.randn(40, 16, generator=generator)
    text_head = load_mean_pooled(text_run).classifier
    mixing = torch.randn(16, text_head.in_features, generator=generator)
    targets = TextTargets(speech @ mixing, text_head.weight.detach(), text_head.bias.detach(), "run")
    head = torch.nn.Linear(16, 2)
    fit = fit_projected_text_head(head, speech, targets, seed=0)
    assert fit.agreement == 1.0
    with torch.no_grad():  # an exactly linear relation is recovered with the weakest ridge of the grid
        assert torch.allclose(head(speech), text_head(speech @ mixing), atol=1e-2 * text_head(speech @ mixing).abs().max())


@pytest.mark.parametrize(("change", "message"), [
    ({"strategy": {"name": "full"}}, "head.text_run fits an adaptation layer on cached frozen speech features, but "
                                     "strategy full trains the speech encoder (set strategy.name freeze_backbone)."),
    ({"data": {"transcript_column": None}}, "head.text_run fits an adaptation layer on cached frozen speech features, "
                                            "but data.transcript_column is not set (name the column holding what each "
                                            "clip says)."),
    ({"task": "image"}, "head.text_run fits an adaptation layer on cached frozen speech features, but task image is "
                        "not audio (set task: audio)."),
])
def test_text_run_where_it_cannot_apply_is_refused_before_anything_runs(change: dict, message: str, tmp_path: Path):
    recipe = adapter_recipe(tmp_path, tmp_path, tmp_path, tmp_path / "out")
    for section, values in change.items():
        recipe[section] = {**recipe[section], **values} if isinstance(values, dict) else values
    with pytest.raises(HfTransferError) as error:
        recipe_from_dict(recipe)
    assert str(error.value) == message
    assert not (tmp_path / "out").exists()


def test_a_text_run_that_is_not_one_or_has_other_labels_is_one_clear_error(tiny_whisper_dir: Path, spoken_pairs: Path,
                                                                           text_run: Path, tmp_path: Path):
    from hf_transfer.run import run_training

    missing = tmp_path / "no_such_run"
    with pytest.raises(HfTransferError, match=r"head.text_run .*no_such_run does not exist: give the output folder"):
        run_training(recipe_from_dict(adapter_recipe(tiny_whisper_dir, spoken_pairs, missing, tmp_path / "a")))
    other = write_spoken_pairs(tmp_path / "other")
    for split in ("train", "validation"):
        table = (other / f"{split}.csv").read_text().replace(",positive", ",good").replace(",negative", ",bad")
        (other / f"{split}.csv").write_text(table)
    with pytest.raises(HfTransferError, match=r"The audio data's labels \['bad', 'good'\] are not the text run's"):
        run_training(recipe_from_dict(adapter_recipe(tiny_whisper_dir, other, text_run, tmp_path / "b")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------
# The cascade: predict / evaluate --transcribe (a text run labels what a speech recogniser wrote)


def keyword_recogniser(name: str, batch_size: int = 8):
    """Stands in for a speech recogniser: 'hears' the keyword sentence of a tone's pitch (high: positive)."""
    def transcribe(waves: list) -> list[str]:
        pitches = [np.abs(np.fft.rfft(wave)).argmax() * 16000 / len(wave) for wave in waves]
        return [f"the film was {'wonderful' if pitch > 1000 else 'dreadful'} today" for pitch in pitches]

    return transcribe, 16000


def test_predict_and_evaluate_transcribe_then_label_with_the_text_run(text_run: Path, spoken_pairs: Path,
                                                                      monkeypatch, capsys):
    from hf_transfer.cli import main
    from hf_transfer.inference import transcribe

    monkeypatch.setattr(transcribe, "load_transcriber", keyword_recogniser)
    rows = list(csv.DictReader((spoken_pairs / "validation.csv").open()))
    clips = [str(spoken_pairs / r["path"]) for r in rows]
    main(["predict", str(text_run), *clips, "--transcribe", "any-recogniser", "--format", "json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["input"] for line in lines] == clips
    assert [line["labels"][0] for line in lines] == [r["label"] for r in rows]
    assert lines[0]["transcript"] == "the film was wonderful today"

    main(["evaluate", str(text_run), "--data", str(spoken_pairs), "--split", "validation", "--transcribe",
          "any-recogniser", "--set", "data.audio_column=path", "--name", "spoken"])
    metrics = json.loads((text_run / "evaluations" / "spoken" / "metrics.json").read_text())
    assert metrics["eval"]["accuracy"] == 1.0 and metrics["eval"]["num_samples"] == len(rows)
    assert metrics["transcribed_by"] == "any-recogniser"


def test_transcribe_on_an_audio_run_is_refused(adapted_run, spoken_pairs: Path, capsys):
    from hf_transfer.cli import main

    _, output = adapted_run
    assert main(["predict", str(output), str(spoken_pairs / "validation"), "--transcribe", "openai/whisper-tiny.en"]) == 2
    assert capsys.readouterr().err.strip() == ("hf-transfer: error: --transcribe gives a text model the transcripts "
                                               "of audio; this is an audio model: drop --transcribe.")


@pytest.fixture(scope="module")
def tiny_ctc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random wav2vec2 CTC recogniser with a character vocabulary, saved with its processor."""
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    folder = tmp_path_factory.mktemp("tiny_ctc")
    letters = list("abcdefghijklmnopqrstuvwxyz'")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, **{c: i + 5 for i, c in enumerate(letters)}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"))
    processor = Wav2Vec2Processor(feature_extractor=Wav2Vec2FeatureExtractor(), tokenizer=tokenizer)
    torch.manual_seed(0)
    config = Wav2Vec2Config(vocab_size=len(vocab), **TINY_WAV2VEC2)
    Wav2Vec2ForCTC(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# a wav2vec2 / HuBERT of a few thousand parameters: two small convolutions (stride 5 x 4 = 20 ms frames)
TINY_WAV2VEC2 = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=8,
                     num_conv_pos_embedding_groups=2, do_stable_layer_norm=False)


def test_a_stock_recogniser_transcribes_every_clip_and_chunks_long_ones(tiny_ctc_dir: Path, tmp_path: Path, caplog):
    import logging

    from hf_transfer.inference.transcribe import (
        CHUNK_SECONDS,
        load_transcriber,
        transcribe_files,
    )

    rng = np.random.default_rng(0)
    clips = [write_wav(tmp_path / "short.wav", tone(300, 0.5, 8000, rng), 8000),
             write_wav(tmp_path / "long.wav", tone(300, CHUNK_SECONDS + 2, 16000, rng), 16000)]
    (tmp_path / "broken.wav").write_bytes(b"RIFF not audio")
    transcribe, rate = load_transcriber(str(tiny_ctc_dir))
    with caplog.at_level(logging.WARNING, logger="hf_transfer.inference.transcribe"):
        kept, transcripts = transcribe_files(transcribe, rate, [clips[0], tmp_path / "broken.wav", clips[1]])
    assert rate == 16000 and kept == clips and len(transcripts) == 2
    # a random recogniser writes random letters, but only its vocabulary's
    letters = [set(re.sub(r"<[^>]*>", "", text)) for text in transcripts]  # the vocabulary's special tokens aside
    assert all(found <= set("abcdefghijklmnopqrstuvwxyz' ") for found in letters)
    assert len(transcripts[1].split()) > 10  # the 32 s clip, chunked and joined back into one transcript
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("skipped ") and m.endswith("broken.wav: cannot decode it (RuntimeError)") for m in messages)
    assert f"1 clip(s) longer than {CHUNK_SECONDS} s: transcribed in {CHUNK_SECONDS} s pieces, one after another" in messages


def test_an_unloadable_recogniser_is_one_clear_error(tmp_path: Path):
    from hf_transfer.inference.transcribe import load_transcriber

    with pytest.raises(HfTransferError, match=r"^Cannot load the speech recogniser '.*empty'.*give a Whisper or CTC"):
        load_transcriber(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------
# Speech encoders besides Whisper: wav2vec2 and HuBERT (their raw-wave inputs, their frame masks)


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
def test_task_audio_trains_and_predicts_with_wav2vec2_and_hubert(kind: str, tmp_path: Path):
    from transformers import (
        HubertConfig,
        HubertModel,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Model,
    )

    from hf_transfer.inference.predict import predict
    from hf_transfer.run import run_training
    from tests.test_speech import write_tone_folder

    model_class, config_class = {"wav2vec2": (Wav2Vec2Model, Wav2Vec2Config), "hubert": (HubertModel, HubertConfig)}[kind]
    torch.manual_seed(0)
    model_class(config_class(**TINY_WAV2VEC2)).save_pretrained(tmp_path / "encoder")
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(tmp_path / "encoder")
    tones = write_tone_folder(tmp_path / "tones", train=8, val=4)
    summary = run_training(recipe_from_dict({
        "task": "audio", "model": {"name": str(tmp_path / "encoder")}, "data": {"path": str(tones)},
        "strategy": {"name": "freeze_backbone"}, "training": {"num_workers": 0, "batch_size": 4},
        "output": {"dir": str(tmp_path / "run"), "overwrite": True},
    }))
    assert summary["eval"]["accuracy"] == 1.0 and summary["head_solver"]["cv_folds"] >= 2
    files = sorted(str(p) for p in (tones / "val").rglob("*.wav"))
    assert [p.labels[0] for p in predict(tmp_path / "run", files)] == [Path(f).parent.name for f in files]
