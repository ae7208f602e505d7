"""Where a CPU text fine-tuning step spends its time, piece by piece (issue 14).

Four measurements, each cheap enough to run beside other work (times are medians of repeats):

1. tokens per epoch: what each way of batching pads, as a multiple of the real tokens, on the
   training texts of SST-2 (a seeded 2,000) and of Amazon electronics (1,600 after the 20%
   validation share; batch 32): random batches, the
   length windows of data/sampling.py at several sizes, and transformers' LengthGroupedSampler
   (the Trainer's `group_by_length`), each padded to the batch's longest and to a multiple of 8;
2. the optimiser step on MiniLM-L6's 22.7M parameters: torch's AdamW as constructed by default,
   and with `fused=True` (what the Trainer's default `adamw_torch_fused` builds);
3. the collator: ours (data/sampling.py) against transformers' DataCollatorWithPadding;
4. one training step on 32 SST-2 training sentences of about the median length (bf16 autocast, or
   fp32 with --precision fp32) cut into its parts (forward, backward, fused AdamW, clipping), and the
   whole step with only the embedding rows the SST-2 sample uses trained (training.compact_embeddings)
   and with the word embeddings frozen.

    python benchmarks/text_step_profile.py [--data-root ../shared/data] [--precision bf16|fp32]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SETS = {  # name -> DataConfig fields (max_length as the comparisons in speed.py use them)
    "sst2": {"path": "sst2", "text_column": "sentence", "label_names": ["negative", "positive"], "max_length": 128},
    "amazon_electronics": {"path": "amazon_multidomain/electronics.jsonl", "text_column": "text",
                           "label_names": ["negative", "positive"], "validation_fraction": 0.2, "max_length": 256},
}
BATCH = 32


def median_seconds(work, repeats: int = 7) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def token_ids(data_root: Path, name: str, tokenizer) -> list[list[int]]:
    from hf_transfer.data.text import load_text_splits
    from hf_transfer.recipe import DataConfig

    fields = dict(SETS[name])
    config = DataConfig(**{**fields, "path": str(data_root / fields["path"]), "max_train_samples": 2000})
    texts = [str(t) for t in load_text_splits(config, seed=42).train[config.text_column][:]]
    return tokenizer(texts, truncation=True, max_length=config.max_length)["input_ids"]


def padding_table(lengths: list[int]) -> list[tuple[str, float, float]]:
    """(batching, padded tokens / real tokens at multiple 1, at multiple 8)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from hf_transfer.data.sampling import LengthGroupedBatchSampler

    real = sum(lengths)

    def cost(batches: list[list[int]], multiple: int) -> float:
        return sum(len(b) * math.ceil(max(lengths[i] for i in b) / multiple) * multiple for b in batches) / real

    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    schemes = {"random batches": [order[i:i + BATCH] for i in range(0, len(order), BATCH)]}
    for window in (4, 16, 50):
        schemes[f"length windows of {window} batches"] = list(LengthGroupedBatchSampler(lengths, BATCH, True, 0, window))
    trainer_order = list(LengthGroupedSampler(BATCH, lengths=lengths, generator=torch.Generator().manual_seed(0)))
    schemes["Trainer LengthGroupedSampler"] = [trainer_order[i:i + BATCH] for i in range(0, len(trainer_order), BATCH)]
    return [(name, cost(batches, 1), cost(batches, 8)) for name, batches in schemes.items()]


def optimizer_step_ms(model: torch.nn.Module) -> dict[str, float]:
    results = {}
    for label, options in (("AdamW (default construction)", {}), ("AdamW fused=True", {"fused": True})):
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, **options)
        for parameter in model.parameters():
            parameter.grad = torch.randn_like(parameter) * 1e-3
        results[label] = 1000 * median_seconds(optimizer.step)
    return results


def real_batch(texts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """BATCH texts of about the median length, padded to their longest: a batch as length windows make them.
    Real ids matter: their repeats and the padding make the dense embedding gradient costlier than random ids do."""
    by_length = sorted(texts, key=len)
    middle = len(by_length) // 2
    rows = by_length[middle - BATCH // 2: middle + BATCH // 2]
    longest = max(map(len, rows))
    ids = torch.tensor([row + [pad_id] * (longest - len(row)) for row in rows])
    return {"input_ids": ids, "attention_mask": (torch.arange(longest) < torch.tensor([len(r) for r in rows])[:, None]).long(),
            "labels": torch.arange(BATCH) % 2}


def step_parts_ms(model: torch.nn.Module, inputs: dict[str, torch.Tensor], used_ids: torch.Tensor,
                  bf16: bool = True) -> dict[str, float]:
    """One training step (bf16 autocast, or fp32) of `inputs`, piece by piece (median ms); the whole step again with
    only the rows of `used_ids` trained (training.compact_embeddings), and with the word embeddings frozen (their
    gradient, clipping and update skipped)."""
    from hf_transfer.training.compact_embeddings import CompactEmbedding

    model.train()

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(**inputs).loss

    def step(optimizer, parameters):
        loss().backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    everything = list(model.parameters())
    optimizer = torch.optim.AdamW(everything, lr=5e-5, fused=True)
    results = {"forward": 1000 * median_seconds(loss),
               "forward + backward": 1000 * median_seconds(lambda: (loss().backward(), optimizer.zero_grad(set_to_none=True))),
               "whole step (+ clipping, fused AdamW)": 1000 * median_seconds(lambda: step(optimizer, everything))}
    loss().backward()
    results["fused AdamW alone"] = 1000 * median_seconds(optimizer.step)
    results["clipping alone"] = 1000 * median_seconds(lambda: torch.nn.utils.clip_grad_norm_(everything, 1.0))
    optimizer.zero_grad(set_to_none=True)
    whole = model.get_input_embeddings()
    model.set_input_embeddings(CompactEmbedding(whole, used_ids))
    compact = list(model.parameters())
    compact_optimizer = torch.optim.AdamW(compact, lr=5e-5, fused=True)
    results[f"whole step, only the {len(used_ids):,} used rows of the word embeddings trained"] = (
        1000 * median_seconds(lambda: step(compact_optimizer, compact)))
    model.set_input_embeddings(whole)
    model.get_input_embeddings().weight.requires_grad_(False)
    trained = [p for p in everything if p.requires_grad]
    frozen_words = torch.optim.AdamW(trained, lr=5e-5, fused=True)
    results["whole step, word embeddings frozen"] = 1000 * median_seconds(lambda: step(frozen_words, trained))
    model.get_input_embeddings().weight.requires_grad_(True)
    return results


def collator_ms(tokenizer, lengths_source: list[str]) -> dict[str, float]:
    from transformers import DataCollatorWithPadding

    from hf_transfer.data.sampling import PadToMultipleCollator

    encoded = tokenizer(lengths_source[:BATCH], truncation=True, max_length=128)
    examples = [{**{k: v[i] for k, v in encoded.items()}, "labels": i % 2} for i in range(BATCH)]
    theirs = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    ours = PadToMultipleCollator(tokenizer.pad_token_id, 1, tokenizer.padding_side)
    return {"DataCollatorWithPadding": 1000 * median_seconds(lambda: theirs(examples), 50),
            "PadToMultipleCollator": 1000 * median_seconds(lambda: ours(examples), 50)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=os.environ.get("HF_TRANSFER_SHARED_DATA", "../shared/data"))
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="the training step's precision")
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_transfer.sources.text import resolve_text_source

    source = resolve_text_source(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(source)
    print(f"torch threads {torch.get_num_threads()}\n")
    print("| data set | batching | tokens / real tokens, padded to the batch's longest | rounded up to x8 |")
    print("|---|---|---|---|")
    used_ids = None
    for name in SETS:
        texts = token_ids(Path(options.data_root), name, tokenizer)
        for scheme, exact, rounded in padding_table([len(ids) for ids in texts]):
            print(f"| {name} | {scheme} | {exact:.2f} | {rounded:.2f} |")
        if name == "sst2":  # the step below: a batch of SST-2's texts, and the rows its training texts use
            used_ids = torch.tensor(sorted({i for ids in texts for i in ids} | {tokenizer.pad_token_id}))
            batch = real_batch(texts, tokenizer.pad_token_id)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    print(f"\noptimiser step, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters (median ms):")
    for label, ms in optimizer_step_ms(model).items():
        print(f"- {label}: {ms:.0f} ms")
    bf16 = options.precision == "bf16"
    shape = " x ".join(map(str, batch["input_ids"].shape))
    print(f"\none training step, {'bf16 autocast' if bf16 else 'fp32'}, {shape} SST-2 tokens (median ms):")
    for label, ms in step_parts_ms(model, batch, used_ids, bf16=bf16).items():
        print(f"- {label}: {ms:.0f} ms")
    sentences = ["a gripping , funny and ultimately moving film", "dull", "it is not the worst movie of the year"] * BATCH
    print(f"\ncollating {BATCH} tokenised sentences (median ms):")
    for label, ms in collator_ms(tokenizer, sentences).items():
        print(f"- {label}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
