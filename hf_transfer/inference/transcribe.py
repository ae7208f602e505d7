"""Speech->text by transcription (the cascade): a speech recogniser writes what each clip says, and a
text run classifies that.

The recogniser is any transformers speech-recognition model, a Hub id or a local folder: an
encoder-decoder (Whisper: greedy `generate`) or a CTC model (wav2vec2, HuBERT: the most likely
token per frame, collapsed by its tokenizer); `openai/whisper-tiny.en` resolves to the packaged
offline copy when the Hub is out of reach. Clips are decoded and resampled as the audio task reads
them, and batched.

Written on the models rather than through transformers' speech-recognition pipeline: on this CPU the
pipeline was 2.1x slower one clip at a time and 9x slower in batches of 16 (tiny.en, spoken SST-2
clips, `python -m benchmarks.speech_to_text --compare-pipeline 24`; its transcripts were 3 points of
WER better there: benchmarks/BENCHMARKS.md, "Speech").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from hf_transfer.data.audio import decode_mono
from hf_transfer.errors import HfTransferError
from hf_transfer.export.layout import TEXT
from hf_transfer.sources.speech import resolve_speech_source

logger = logging.getLogger(__name__)

CHUNK_SECONDS = 30  # Whisper's window: longer clips are cut into pieces of this length, transcribed in turn
MAX_NEW_TOKENS = 128  # a transcript longer than this is a recogniser looping on one phrase, not speech
# clips per recogniser call at most, whatever --batch-size says: Whisper pads every clip to 30 s, and
# 64 clips of tiny.en took 8 GB on a CPU
MAX_BATCH = 16

# waves (mono, at the recogniser's rate) -> their transcripts
Transcriber = Callable[[list], list[str]]


def require_text_model(kind: str) -> None:
    """The cascade feeds transcripts to a text model; any other kind of saved model is refused."""
    if kind != TEXT:
        article = "an" if kind[0] in "aeiou" else "a"
        raise HfTransferError(f"--transcribe gives a text model the transcripts of audio; this is {article} {kind} "
                              "model: drop --transcribe.")


def _generated(model, processor, waves: list[np.ndarray], rate: int) -> list[str]:
    """An encoder-decoder's greedy transcripts (Whisper pads or cuts every wave to its window)."""
    inputs = processor.feature_extractor(waves, sampling_rate=rate, return_tensors="pt", return_attention_mask=True)
    ids = model.generate(inputs.input_features.to(model.device, model.dtype),
                         attention_mask=inputs.attention_mask.to(model.device), max_new_tokens=MAX_NEW_TOKENS)
    return processor.batch_decode(ids, skip_special_tokens=True)


def _ctc_decoded(model, processor, waves: list[np.ndarray], rate: int) -> list[str]:
    """A CTC model's most likely token per frame, collapsed and joined by its tokenizer."""
    inputs = processor(waves, sampling_rate=rate, return_tensors="pt", padding=True, return_attention_mask=True)
    logits = model(inputs.input_values.to(model.device, model.dtype),
                   attention_mask=inputs.attention_mask.to(model.device)).logits
    return processor.batch_decode(logits.argmax(-1))


def _pieces(wave: np.ndarray, length: int) -> list[np.ndarray]:
    return [wave[start:start + length] for start in range(0, len(wave), length)] or [wave]


def load_transcriber(name: str, batch_size: int = 8) -> tuple[Transcriber, int]:
    """The recogniser `name` as a function of waves, and the sampling rate it takes."""
    from transformers import (
        AutoConfig,
        AutoModelForCTC,
        AutoModelForSpeechSeq2Seq,
        AutoProcessor,
    )

    source = resolve_speech_source(name)
    try:
        seq2seq = AutoConfig.from_pretrained(source).is_encoder_decoder
        processor = AutoProcessor.from_pretrained(source)
        model = (AutoModelForSpeechSeq2Seq if seq2seq else AutoModelForCTC).from_pretrained(source).eval()
    except (OSError, ValueError, KeyError) as error:
        raise HfTransferError(
            f"Cannot load the speech recogniser {name!r} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "give a Whisper or CTC speech-recognition model: a Hub id (openai/whisper-tiny.en works offline) or a "
            "local folder."
        ) from None
    if torch.cuda.is_available():
        model.to("cuda")
    rate = processor.feature_extractor.sampling_rate
    decode = _generated if seq2seq else _ctc_decoded

    @torch.no_grad()
    def transcribe(waves: list) -> list[str]:
        # a long clip becomes several pieces of at most the window; their transcripts are joined back
        pieces = [_pieces(wave, CHUNK_SECONDS * rate) for wave in waves]
        if any(len(p) > 1 for p in pieces):
            logger.warning("%d clip(s) longer than %d s: transcribed in %d s pieces, one after another",
                           sum(len(p) > 1 for p in pieces), CHUNK_SECONDS, CHUNK_SECONDS)
        flat = [piece for clip in pieces for piece in clip]
        step = min(batch_size, MAX_BATCH)
        texts = [text for start in range(0, len(flat), step)
                 for text in decode(model, processor, flat[start:start + step], rate)]
        joined, used = [], 0
        for clip in pieces:
            joined.append(" ".join(text.strip() for text in texts[used:used + len(clip)]).strip())
            used += len(clip)
        return joined

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
