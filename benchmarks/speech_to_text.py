"""Speech->text transfer with hf-transfer itself (issue 18): the cascade and the adaptation layer, at scale.

Runs after benchmarks/voice_sst2.py, on what it wrote under --output (the text model
runs/text_minilm, the held-out-voice and training-voice dev clips). It voices --pairs more SST-2
train sentences (none the text model trained on, none voiced before) with the training voices,
as a table of clips and their written sentences (the transcripts), then compares, on the same dev
clips, what a user gets from the commands:

1. the cascade: `hf-transfer predict TEXT_RUN CLIPS --transcribe openai/whisper-tiny.en`;
2. the adaptation layer: `hf-transfer train --recipe whisper_spoken_sentiment --set
   head.text_run=TEXT_RUN data.transcript_column=text` on the pairs (their labels unused);
3. a head trained on speech alone: the same recipe without head.text_run, on the pairs' labels;

each scored on the held-out voices (the run's validation split) and on the training voices
(`hf-transfer evaluate`), with seconds per utterance.

    python -m benchmarks.speech_to_text [--output /work/runs/spoken_sst2] [--pairs 2000]
    python -m benchmarks.speech_to_text --compare-pipeline 24   # the transcriber against transformers' pipeline
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import time
from pathlib import Path

from benchmarks.voice_sst2 import (
    TRAIN_VOICES,
    balanced_sample,
    read_manifest,
    read_sst2,
    voice,
)

RECOGNISER = "openai/whisper-tiny.en"  # offline: the packaged copy, converted once


def write_table(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def voice_pairs(output: Path, count: int, seed: int) -> Path:
    """pairs/train.csv (clip, written sentence, label) and pairs/validation.csv (the held-out-voice dev clips)."""
    folder = output / "pairs"
    if (folder / "train.csv").is_file():
        return folder
    used = {row["text"] for name in ("text_train", "train") for row in read_manifest(output / f"{name}.csv")}
    rng = random.Random(seed + 2)
    rows = balanced_sample([r for r in read_sst2("train.tsv") if r[0] not in used], count, rng)
    start = time.perf_counter()
    manifest = voice(rows, TRAIN_VOICES, folder / "audio", "pair", rng)
    print(f"voiced {len(manifest)} pairs in {time.perf_counter() - start:.0f} s", flush=True)
    write_table(folder / "validation.csv", read_manifest(output / "held_out.csv"))
    write_table(folder / "train.csv", manifest)
    return folder


def hf_transfer(*args: str) -> float:
    """Run one hf-transfer command as a user would; its wall seconds."""
    start = time.perf_counter()
    subprocess.run(["hf-transfer", args[0], "--quiet", *args[1:]], check=True)
    return time.perf_counter() - start


def evaluation(run: Path, name: str) -> dict:
    return json.loads((run / "evaluations" / name / "metrics.json").read_text())["eval"]


def compare_with_pipeline(output: Path, count: int) -> dict:
    """hf-transfer's transcriber against transformers' speech-recognition pipeline on the same held-out
    clips, one after the other in this process: seconds per clip and WER, at batch 1 and 16."""
    from transformers import pipeline

    from benchmarks.voice_sst2 import wer
    from hf_transfer.data.audio import decode_mono
    from hf_transfer.inference.transcribe import load_transcriber
    from hf_transfer.sources.speech import resolve_speech_source

    rows = read_manifest(output / "held_out.csv")[:count]
    waves, references = [decode_mono(r["path"], 16000) for r in rows], [r["text"] for r in rows]
    recogniser = pipeline("automatic-speech-recognition", model=resolve_speech_source(RECOGNISER), device=-1)
    sides = {}
    for batch in (1, 16):
        transcribe, _ = load_transcriber(RECOGNISER, batch)
        sides[f"hf_transfer_batch{batch}"] = lambda t=transcribe: t(waves)
        # the pipeline takes its inputs' dicts apart: fresh ones per call
        sides[f"pipeline_batch{batch}"] = lambda b=batch: [o["text"].strip() for o in recogniser(
            [{"raw": w, "sampling_rate": 16000} for w in waves], batch_size=b, generate_kwargs={"max_new_tokens": 128})]
    found = {}
    for name, side in sides.items():
        start = time.perf_counter()
        texts = side()
        found[name] = {"seconds_per_clip": round((time.perf_counter() - start) / len(rows), 3),
                       "wer": round(wer(references, texts), 4)}
        print(name, found[name], flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("/work/runs/spoken_sst2"))
    parser.add_argument("--pairs", type=int, default=2000, help="voiced SST-2 train sentences with their text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--voice-only", action="store_true", help="only voice the pairs")
    parser.add_argument("--compare-pipeline", type=int, metavar="CLIPS",
                        help="only time the transcriber against transformers' pipeline on this many held-out clips")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.compare_pipeline:
        found = compare_with_pipeline(args.output, args.compare_pipeline)
        (args.output / "transcriber_vs_pipeline.json").write_text(json.dumps(found, indent=2) + "\n")
        return
    output = args.output
    pairs = voice_pairs(output, args.pairs, args.seed)
    if args.voice_only:
        return
    text_run, runs = output / "runs" / "text_minilm", output / "runs"
    # the dev clips: held-out voices (audio/validation, the runs' validation split) and training voices
    dev = {"held_out": (output / "audio", "validation"), "seen": (output / "dev_seen_voices", "test")}
    clips = len(read_manifest(output / "held_out.csv"))
    saved = output / "speech_to_text.json"  # each figure is kept as soon as it is measured; a rerun skips those
    results: dict = json.loads(saved.read_text()) if saved.is_file() else {}
    results.update(pairs=len(read_manifest(pairs / "train.csv")), dev_clips=clips)

    def keep(key: str, value: dict) -> None:
        results[key] = value
        saved.write_text(json.dumps(results, indent=2) + "\n")
        print(key, value, flush=True)

    if "text_model_written" not in results:
        seconds = hf_transfer("evaluate", str(text_run), "--data", str(output / "text_dev.csv"), "--name", "written",
                              "--overwrite")
        keep("text_model_written", {"accuracy": evaluation(text_run, "written")["accuracy"],
                                    "seconds_per_utterance": seconds / clips})
    for voices, (data, split) in dev.items():
        if f"cascade_{voices}" not in results:
            seconds = hf_transfer("evaluate", str(text_run), "--data", str(data), "--split", split, "--transcribe",
                                  RECOGNISER, "--name", f"cascade_{voices}", "--overwrite")
            keep(f"cascade_{voices}", {"accuracy": evaluation(text_run, f"cascade_{voices}")["accuracy"],
                                       "seconds_per_utterance": seconds / clips})

    common = [f"data.path={pairs}", "data.audio_column=path", f"training.feature_cache_dir={runs / 'pairs_features'}",
              "training.num_workers=0", "--overwrite"]
    trained = {"adaptation_layer": ["data.transcript_column=text", f"head.text_run={text_run}"], "speech_head": []}
    for name, keys in trained.items():
        run = runs / f"{name}_{results['pairs']}"
        seconds = hf_transfer("train", "--recipe", "whisper_spoken_sentiment", "--output-dir", str(run),
                              "--set", *common[:-1], *keys, common[-1])
        metrics = json.loads((run / "metrics.json").read_text())
        keep(f"{name}_held_out", {"accuracy": metrics["eval"]["accuracy"], "train_wall_seconds": seconds,
                                  "fit": metrics.get("head_solver")})
        data, split = dev["seen"]  # an audio folder: its column is "audio", the pairs' table named it "path"
        seconds = hf_transfer("evaluate", str(run), "--data", str(data), "--split", split, "--name", "seen",
                              "--overwrite", "--set", "data.audio_column=audio")
        keep(f"{name}_seen", {"accuracy": evaluation(run, "seen")["accuracy"], "seconds_per_utterance": seconds / clips})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
