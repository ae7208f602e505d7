"""Shared fixtures: tiny models built from configs and tiny data written by the tests (no network)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(os.environ.get("HF_TRANSFER_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

WORDS = [
    "the", "a", "movie", "film", "book", "food", "service", "plot", "was", "is", "really", "quite",
    "very", "and", "but", "story", "actors", "music", "place", "staff", "today", "again", "it", "this",
]
POSITIVE, NEGATIVE = "wonderful", "dreadful"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with random weights and a word-level vocabulary, saved like a Hub model."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, POSITIVE, NEGATIVE]
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def keyword_sentences(count: int, seed: int, vocabulary: list[str] = WORDS, length: tuple[int, int] = (4, 10)) -> list[dict]:
    """Random sentences whose label is decided by one keyword: learnable, and only by reading."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.choices(vocabulary, k=rng.randint(*length))
        words.insert(rng.randrange(len(words) + 1), POSITIVE if label == "positive" else NEGATIVE)
        rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def keyword_data(tmp_path: Path) -> Path:
    """A folder with train.jsonl and validation.jsonl of keyword-labelled sentences."""
    folder = tmp_path / "keyword_data"
    write_jsonl(folder / "train.jsonl", keyword_sentences(160, seed=1))
    write_jsonl(folder / "validation.jsonl", keyword_sentences(60, seed=2))
    return folder


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; a test that made an Accelerator (cpu=True, say) must
    not decide the precision or device of the next test's run, as it would in one real process."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True, scope="session")
def cpu_without_native_bf16():
    """`training.mixed_precision: auto` picks bf16 on a CPU with AMX: tests must not depend on which CPU
    runs them (exact-logit and reload checks assume fp32), so in-process runs see a CPU without it.
    Tests of the choice itself patch it back (tests/test_speed.py)."""
    from hf_transfer.training import precision

    with pytest.MonkeyPatch.context() as session_patch:  # session-wide: module-scoped run fixtures see it too
        session_patch.setattr(precision, "cpu_has_native_bf16", lambda: False)
        yield


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread is faster than two contended, and gives the
    same summation order here as in the subprocesses some tests start (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_whisper_config(**overrides):
    """A Whisper of a few thousand parameters whose feature extractor takes 1 s windows (100 frames)."""
    from transformers import WhisperConfig

    settings = dict(
        vocab_size=120, num_mel_bins=16, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=50, max_target_positions=24, decoder_start_token_id=1, bos_token_id=1,
        eos_token_id=2, pad_token_id=2, suppress_tokens=[], begin_suppress_tokens=[],
    )
    return WhisperConfig(**{**settings, **overrides})


TINY_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "decoder_start_token_id": 1}


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny_whisper")
    torch.manual_seed(0)
    # weights drawn wider than Whisper's init (0.02), so that a random encoder passes the spectrum on
    WhisperForConditionalGeneration(tiny_whisper_config(**TINY_IDS, init_std=0.3)).save_pretrained(folder)
    # a 1 s window: 100 mel frames, which the encoder's 50 positions take after its stride-2 convolution
    WhisperFeatureExtractor(feature_size=16, chunk_length=1).save_pretrained(folder)
    return folder
