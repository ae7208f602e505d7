"""Speech->text adaptation layers (issue 18, part b): a text-trained head classifying speech directly.

Runs after benchmarks/voice_sst2.py, on what it wrote under --output: the voiced SST-2 train and dev
audio, the dev transcripts, and the text model trained by the `minilm_sentiment` recipe (frozen
MiniLM, mean-pooled token states, a linear head). Each voiced train sentence pairs a speech clip with
its written text; a projection from Whisper tiny.en's states into the text model's feature space (the
mean-pooled MiniLM states its head reads) is fitted on those pairs by ridge regression, and the text
model's own head then classifies the projected speech of the dev sentences. Two speech states:

- encoder: the mean of tiny.en's encoder states over the frames that hold audio;
- decoder: the mean of tiny.en's decoder states over a transcript, teacher-forced (train: the written
  sentence, as spoken; dev: the model's own greedy transcript, as voice_sst2.py wrote it).

For reference, a logistic head trained on each kind of speech state with the labels (no text model).

    OMP_NUM_THREADS=1 python benchmarks/speech_adapter.py [--output /work/runs/spoken_sst2]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.voice_sst2 import LABELS, speakable


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


class TextModel:
    """The recipe's text run (a sentence-transformers folder): its features and its head, apart."""

    def __init__(self, folder: Path):
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.encoder = AutoModel.from_pretrained(folder).eval()
        head = load_file(str(folder / "2_Dense" / "model.safetensors"))
        self.weight, self.bias = head["linear.weight"], head["linear.bias"]
        self.labels = [json.loads((folder / "config.json").read_text())["id2label"][str(i)] for i in range(len(self.bias))]

    @torch.no_grad()
    def features(self, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), 64):
            batch = self.tokenizer(texts[start:start + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            states = self.encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(((states * mask).sum(1) / mask.sum(1)).numpy())
        return np.concatenate(out)

    def classify(self, features: np.ndarray) -> list[str]:
        logits = torch.from_numpy(features).float() @ self.weight.T + self.bias
        return [self.labels[i] for i in logits.argmax(-1).tolist()]


class SpeechStates:
    """tiny.en's encoder states (mean over the audio's frames) and decoder states (mean over a transcript)."""

    def __init__(self, folder: Path):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.processor = WhisperProcessor.from_pretrained(folder)
        self.model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
        self.prompt = self.processor.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])

    @torch.no_grad()
    def states(self, path: str, transcript: str) -> tuple[np.ndarray, np.ndarray]:
        from hf_transfer.data.audio import decode_mono

        inputs = self.processor.feature_extractor(decode_mono(path, 16000), sampling_rate=16000,
                                                  return_tensors="pt", return_attention_mask=True)
        encoded = self.model.model.encoder(inputs.input_features).last_hidden_state
        frames = inputs.attention_mask[:, ::2][:, : encoded.shape[1]].unsqueeze(-1).float()
        encoder_mean = (encoded * frames).sum(1) / frames.sum(1)
        text_ids = self.processor.tokenizer(" " + transcript.strip(), add_special_tokens=False).input_ids[:200]
        ids = torch.tensor([self.prompt + text_ids])
        decoded = self.model.model.decoder(input_ids=ids, encoder_hidden_states=encoded).last_hidden_state
        decoder_mean = decoded[:, len(self.prompt):].mean(1) if text_ids else decoded.mean(1)
        return encoder_mean[0].numpy(), decoder_mean[0].numpy()


def ridge(source: np.ndarray, target: np.ndarray, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """W, b minimising |source W + b - target|^2 + strength |W|^2 (closed form, on centred data)."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    x, y = source - source_mean, target - target_mean
    weight = np.linalg.solve(x.T @ x + strength * np.eye(x.shape[1]), x.T @ y)
    return weight, target_mean - source_mean @ weight


def fit_projection(source: np.ndarray, target: np.ndarray, labels: list[str], text: TextModel) -> tuple:
    """The ridge strength chosen by 5-fold accuracy of the text head on the projected held-out fold."""
    folds = np.arange(len(source)) % 5
    best = None
    for strength in (1e-2, 1e-1, 1.0, 10.0, 100.0):
        correct = 0
        for fold in range(5):
            fit, held = folds != fold, folds == fold
            weight, bias = ridge(source[fit], target[fit], strength)
            predicted = text.classify(source[held] @ weight + bias)
            correct += sum(p == g for p, g in zip(predicted, np.array(labels)[held]))
        if best is None or correct > best[0]:
            best = (correct, strength)
    weight, bias = ridge(source, target, best[1])
    return weight, bias, best[1], best[0] / len(source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("/work/runs/spoken_sst2"))
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression

    from hf_transfer.sources.offline import offline_speech_model_dir

    output = args.output
    text = TextModel(output / "runs" / "text_minilm")
    speech = SpeechStates(offline_speech_model_dir("openai/whisper-tiny.en"))
    transcripts = json.loads((output / "transcripts.json").read_text())
    sets = {name: read_rows(output / f"{name}.csv") for name in ("train", "held_out", "seen")}
    # a sentence espeak-ng took for options (one starting with "--", before voice_sst2.py passed text on stdin) has no clip
    sets["train"] = [r for r in sets["train"] if Path(r["path"]).is_file()]

    start = time.perf_counter()
    train = [speech.states(r["path"], speakable(r["text"])) for r in sets["train"]]
    states_seconds = (time.perf_counter() - start) / len(train)
    dev = {name: [speech.states(r["path"], t) for r, t in zip(sets[name], transcripts[name])] for name in ("held_out", "seen")}
    text_targets = text.features([r["text"] for r in sets["train"]])
    train_labels = [r["label"] for r in sets["train"]]
    results: dict = {"pairs": len(train), "speech_states_seconds_per_utterance": round(states_seconds, 3)}
    for index, kind in enumerate(("encoder", "decoder")):
        source = np.stack([pair[index] for pair in train])
        weight, bias, strength, cv = fit_projection(source, text_targets, train_labels, text)
        probe = LogisticRegression(max_iter=2000, C=1.0).fit(source, train_labels)
        for name in ("held_out", "seen"):
            features = np.stack([pair[index] for pair in dev[name]])
            gold = [r["label"] for r in sets[name]]
            projected = text.classify(features @ weight + bias)
            results[f"{kind}_{name}"] = {
                "projection_to_text_head": round(float(np.mean([p == g for p, g in zip(projected, gold)])), 4),
                "speech_logistic_head": round(float(probe.score(features, gold)), 4),
            }
        results[f"{kind}_ridge_strength"], results[f"{kind}_cv_accuracy"] = strength, round(cv, 4)
        print(kind, {k: v for k, v in results.items() if k.startswith(kind)}, flush=True)
    assert set(LABELS) == set(text.labels)
    (output / "adapter_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
