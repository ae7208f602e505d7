"""Speech->text by transcription (the cascade): a speech recogniser writes what each clip says, and a
text run classifies that.

The recogniser is transformers' `automatic-speech-recognition` pipeline on any Whisper or CTC
model (a Hub id or a local folder); `openai/whisper-tiny.en` resolves to the packaged offline copy
when the Hub is out of reach. Clips are decoded and resampled as the audio task reads them; clips
longer than the recogniser's 30 s window are transcribed in 30 s chunks (said once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from hf_transfer.data.audio import decode_mono
from hf_transfer.errors import HfTransferError
from hf_transfer.export.layout import TEXT
from hf_transfer.sources.speech import resolve_speech_source

logger = logging.getLogger(__name__)

CHUNK_SECONDS = 30  # Whisper's window; the pipeline cuts longer clips into chunks of this length
MAX_NEW_TOKENS = 128  # a transcript longer than this is a recogniser looping on one phrase, not speech

# waves (mono, at the recogniser's rate) -> their transcripts
Transcriber = Callable[[list], list[str]]


def require_text_model(kind: str) -> None:
    """The cascade feeds transcripts to a text model; any other kind of saved model is refused."""
    if kind != TEXT:
        article = "an" if kind[0] in "aeiou" else "a"
        raise HfTransferError(f"--transcribe gives a text model the transcripts of audio; this is {article} {kind} "
                              "model: drop --transcribe.")


def load_transcriber(name: str, batch_size: int = 8) -> tuple[Transcriber, int]:
    """The recogniser `name` as a function of waves, and the sampling rate it takes."""
    import torch
    from transformers import pipeline

    try:
        recogniser = pipeline("automatic-speech-recognition", model=resolve_speech_source(name),
                              device=0 if torch.cuda.is_available() else -1)
    except (OSError, ValueError, KeyError) as error:
        raise HfTransferError(
            f"Cannot load the speech recogniser {name!r} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "give a Whisper or CTC speech-recognition model: a Hub id (openai/whisper-tiny.en works offline) or a "
            "local folder."
        ) from None
    rate = recogniser.feature_extractor.sampling_rate
    is_whisper = recogniser.type == "seq2seq_whisper"

    options = {"generate_kwargs": {"max_new_tokens": MAX_NEW_TOKENS}} if is_whisper else {}

    def run(waves: list, **chunking) -> list[str]:
        inputs = [{"raw": wave, "sampling_rate": rate} for wave in waves]
        return [output["text"].strip() for output in recogniser(inputs, batch_size=batch_size, **chunking, **options)]

    def transcribe(waves: list) -> list[str]:
        long = [i for i, wave in enumerate(waves) if len(wave) > CHUNK_SECONDS * rate]
        short = [i for i in range(len(waves)) if i not in set(long)]
        texts = [""] * len(waves)
        for indices, chunking in ((short, {}), (long, {"chunk_length_s": CHUNK_SECONDS})):
            if indices:
                for i, text in zip(indices, run([waves[i] for i in indices], **chunking)):
                    texts[i] = text
        if long:
            logger.warning("%d clip(s) longer than %d s transcribed in %d s chunks", len(long), CHUNK_SECONDS,
                           CHUNK_SECONDS)
        return texts

    return transcribe, rate


def transcribe_files(transcribe: Transcriber, rate: int, paths: list[Path]) -> tuple[list[Path], list[str]]:
    """The files that decode, and their transcripts; a file that cannot be decoded is skipped and said."""
    kept, waves = [], []
    for path in paths:
        try:
            waves.append(decode_mono(path, rate))
            kept.append(path)
        except Exception as error:  # any decode failure: say which file, go on
            logger.warning("skipped %s: cannot decode it (%s)", path, type(error).__name__)
    return kept, (transcribe(waves) if waves else [])
