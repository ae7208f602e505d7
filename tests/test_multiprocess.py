"""Two processes on CPU (gloo): `accelerate launch --cpu --num_processes 2 scripts/train.py ...`.

The two-process run must score every validation example exactly once, write its files from the
main process only, and reach the metrics of one process that sees the same global batches: one
process with batch 16 and 2 accumulation steps takes the same pairs of batches that two processes
with batch 16 take together. (With the default length-grouped batching, one process with batch 32
would group other examples together; with data.group_by_length false it takes the same 32 and
matches too, measured to 5e-8 in the loss.) With dropout off the two compute the same numbers up to
the order of floating-point sums (measured: equal to 1e-15; the test allows 1e-6).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import NEGATIVE, POSITIVE, WORDS, keyword_sentences, write_jsonl

from hf_transfer.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bert_without_dropout(tmp_path_factory) -> Path:
    """The conftest tiny BERT with dropout off: each process draws its own dropout masks otherwise."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_bert_no_dropout")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, POSITIVE, NEGATIVE]
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tiny_bert_without_dropout, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", keyword_sentences(160, seed=1))  # 10 batches of 16: 5 per process
    write_jsonl(data / "validation.jsonl", keyword_sentences(61, seed=2))  # 61 = 3 x (2 x 8) + 13: uneven
    values = {
        "name": "two_processes",
        "model": {"name": str(tiny_bert_without_dropout)},
        "data": {"path": str(data), "max_length": 32},
        # fp32 on both sides: auto would pick bf16 on an AMX CPU, whose rounding differs between the runs
        "training": {"epochs": 4, "batch_size": 16, "eval_batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.1,
                     "logging_steps": 1, "seed": 0, "mixed_precision": "no"},
        "output": {"dir": str(tmp_path / "two")},
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(values))
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(REPO / "scripts" / "train.py"), "--recipe", str(recipe),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launched = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--recipe", str(recipe), "--output-dir", str(tmp_path / "one"),
                     "--set", "training.gradient_accumulation_steps=2"]) == 0
    finally:
        torch.set_num_threads(threads)

    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert (two["num_processes"], one["num_processes"]) == (2, 1)
    assert "processes 2" in launched.stdout + launched.stderr
    # every validation example exactly once: no sampler padding counted, nothing dropped
    assert two["eval"]["num_samples"] == 61
    assert sum(map(sum, two["eval"]["confusion_matrix"]["matrix"])) == 61
    for a, b in zip(two["history"], one["history"], strict=True):
        assert all(abs(a[k] - b[k]) <= 1e-6 for k in a), (a, b)
    assert two["eval"]["confusion_matrix"] == one["eval"]["confusion_matrix"]
    assert two["eval"]["accuracy"] > 0.9  # it learned, so the agreement is not that of two untrained models

    # the main process alone wrote: one line per logged step and epoch, the same files as one process
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "accuracy" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log if "step" in r] == list(range(1, 21))
    listing = lambda run: sorted(p.name for p in (tmp_path / run).iterdir())  # noqa: E731
    assert listing("two") == listing("one")
    # one checkpoint, whole: no process wrote into a temporary folder after the main process had renamed it
    [checkpoint] = list((tmp_path / "two" / "checkpoints").iterdir())
    # the one exception: each process keeps its own RNG state in the checkpoint, for an exact resume
    assert sorted(p.name for p in checkpoint.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
