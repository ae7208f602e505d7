"""Side-by-side speed benchmarks (issue 4): each comparison runs both sides, each side in its own
process (its own peak memory, its own Accelerate state), and appends one table to BENCHMARKS.md.

    python scripts/benchmark.py cache        # a. frozen backbone, 10 epochs: cached vs uncached (CPU)
    python scripts/benchmark.py text-cpu     # b. MiniLM fine-tuning on CPU: hf_transfer vs Trainer (two set-ups)
    python scripts/benchmark.py text-cpu --text-set amazon_electronics   # the same on long reviews
    python scripts/benchmark.py gpu-text     # c. BERT-base bf16, SST-2, batch 32: vs Trainer (steady state)
    python scripts/benchmark.py gpu-fixed    # c. BERT-base bf16, every batch 128 tokens, batch 64
    python scripts/benchmark.py gpu-e2e      # c. end to end, 3 epochs of full SST-2, start-up included
    python scripts/benchmark.py gpu-images   # c. ResNet-50 on real JPEGs vs tensors already on the GPU
    python scripts/benchmark.py inference-text --run-dir RUN     # predict vs transformers.pipeline, SST-2 dev
    python scripts/benchmark.py inference-images --run-dir RUN   # predict vs timm, hymenoptera val

Fairness rules kept here: the same data sample, model, batch size, precision, learning rate and
epochs on both sides; the baseline as its users run it by default (the transformers text-
classification example pads every sentence to 128 tokens); steady state is the training time of
the epochs after the first (warm-up, graph recording and compilation excluded on both sides); end
to end is the wall time of the whole process. Evaluation is never inside a training time. Text
comparisons also run the Trainer as a careful user sets it up (dynamic padding, length grouping)
and report hf_transfer against the stronger Trainer side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "BENCHMARKS.md"
DEFAULT_DATA = REPO.parent / "shared" / "data"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


# ---------------------------------------------------------------------------------------------
# Measuring inside a side's process


def peak_memory() -> dict[str, float]:
    import torch

    memory = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        memory["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return memory


def steady_rate(samples_per_epoch: int, epoch_seconds: list[float]) -> float:
    """Samples per second over the epochs after the first (the only epoch when there is one)."""
    timed = epoch_seconds[1:] or epoch_seconds
    return samples_per_epoch * len(timed) / sum(timed)


def bert_base_dir(tokenizer_dir: str) -> str:
    """BERT-base's shape with random weights, plus an uncased BERT tokenizer (MiniLM's vocabulary)."""
    from transformers import AutoTokenizer, BertConfig

    folder = tempfile.mkdtemp(prefix="bert_base_")
    BertConfig(num_labels=2).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def tokenizer_source(args: argparse.Namespace) -> str:
    from hf_transfer.sources.text import resolve_text_source

    return args.tokenizer or resolve_text_source(MINILM)


# The text sets a text comparison runs on: the same data settings on every side. SST-2 sentences
# are short (13 tokens on average); Amazon electronics reviews are long (about 120 tokens, cut at 256).
TEXT_SETS = {
    "sst2": {"path": "sst2", "text_column": "sentence", "label_names": ["negative", "positive"], "max_length": 128},
    "amazon_electronics": {"path": "amazon_multidomain/electronics.jsonl", "text_column": "text",
                           "label_names": ["negative", "positive"], "validation_fraction": 0.2, "max_length": 256},
}


def text_data(args: argparse.Namespace) -> dict:
    """The recipe's `data` section of the comparison's text set (`--text-set`)."""
    data = dict(TEXT_SETS[args.text_set])
    return {**data, "path": str(Path(args.data_root) / data["path"]), "max_train_samples": args.train_samples}


def text_splits(args: argparse.Namespace):
    """The seeded training sample and the validation split, through the project's own loader, for every side."""
    from hf_transfer.data.text import load_text_splits
    from hf_transfer.recipe import DataConfig

    return load_text_splits(DataConfig(**text_data(args)), seed=42)


# ---------------------------------------------------------------------------------------------
# The sides


def side_hf_transfer_text(args: argparse.Namespace) -> dict:
    from hf_transfer.recipe import recipe_from_dict
    from hf_transfer.run import run_training

    random_bert = args.model == "bert-base"
    recipe = {
        "name": "bench", "task": "text",
        "model": {"name": bert_base_dir(tokenizer_source(args)) if random_bert else MINILM, "pretrained": not random_bert},
        "data": {**text_data(args), "pad_to_multiple_of": args.pad_to_multiple_of,
                 "group_by_length": not args.no_length_groups,
                 **({"length_window": args.length_window} if args.length_window else {})},
        "strategy": {"name": "full"},
        "head": {"pooling": "head_input"},  # the Trainer side's model: transformers' own head on the pooler
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "eval_batch_size": 256, "lr": 5e-5,
                     "weight_decay": 0.0, "warmup_ratio": 0.0, "scheduler": "linear", "max_grad_norm": 1.0,
                     "mixed_precision": args.precision, "seed": 42, "logging_steps": 500,
                     "cuda_graphs": not args.eager, "compact_embeddings": not args.whole_embeddings},
        "output": {"dir": tempfile.mkdtemp(prefix="bench_out_"), "overwrite": True},
    }
    summary = run_training(recipe_from_dict(recipe))
    samples = round(summary["train_samples_per_second"] * summary["train_seconds"] / args.epochs)
    return {
        "steady_samples_per_s": steady_rate(samples, summary["epoch_train_seconds"]),
        "epoch_seconds": summary["epoch_train_seconds"],
        "dev_accuracy": summary["history"][-1]["accuracy"],  # the last epoch, as the Trainer reports it
        **peak_memory(),
    }


def side_trainer_text(args: argparse.Namespace) -> dict:
    """transformers' text-classification example (run_glue.py) with its defaults: pad to max_seq_length 128.

    `--careful`: the Trainer as a user who knows it sets it up: no padding at tokenisation,
    `DataCollatorWithPadding` (each batch padded to its longest) and length-grouped batches
    (`train_sampling_strategy="group_by_length"`, transformers 5's name for `group_by_length`).
    """
    import numpy as np
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    set_seed(42)
    splits, data = text_splits(args), text_data(args)
    if args.model == "bert-base":
        source = bert_base_dir(tokenizer_source(args))
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(source, num_labels=2))
    else:
        from hf_transfer.sources.text import resolve_text_source

        source = resolve_text_source(MINILM)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(source)

    def preprocess(batch: dict) -> dict:
        padding = False if args.careful else "max_length"
        return tokenizer(batch[data["text_column"]], padding=padding, max_length=data["max_length"], truncation=True)

    train = splits.train.map(preprocess, batched=True, remove_columns=[data["text_column"]])
    dev = splits.validation.map(preprocess, batched=True, remove_columns=[data["text_column"]])

    class EpochTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_epoch_begin(self, *_args, **_kwargs):
            self._sync()
            self.started = time.perf_counter()

        def on_epoch_end(self, *_args, **_kwargs):
            self._sync()  # the GPU may still be working through queued steps
            self.seconds.append(time.perf_counter() - self.started)

        @staticmethod
        def _sync():
            if torch.cuda.is_available():
                torch.cuda.synchronize()

    timer = EpochTimer()
    arguments = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="trainer_out_"), per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs, learning_rate=5e-5, seed=42, bf16=args.precision == "bf16",
        use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no", disable_tqdm=True,
        **({"train_sampling_strategy": "group_by_length"} if args.careful else {}),
    )
    collator = DataCollatorWithPadding(tokenizer) if args.careful else default_data_collator
    trainer = Trainer(model=model, args=arguments, train_dataset=train, data_collator=collator, callbacks=[timer])
    trainer.train()
    predictions = trainer.predict(dev)
    accuracy = float(np.mean(predictions.predictions.argmax(-1) == predictions.label_ids))
    return {"steady_samples_per_s": steady_rate(len(train), timer.seconds), "epoch_seconds": timer.seconds,
            "dev_accuracy": accuracy, **peak_memory()}


def side_feature_cache(args: argparse.Namespace) -> dict:
    from hf_transfer.recipe import recipe_from_dict
    from hf_transfer.run import run_training

    recipe = {
        "name": "bench_cache", "task": "image",
        "model": {"name": "tf_efficientnet_lite0"},
        "data": {"path": str(Path(args.data_root) / "hymenoptera")},
        "strategy": {"name": "freeze_backbone"},
        "head": {"solver": "loop"},  # both sides train the head in the loop: the cache's speed-up is measured
        "training": {"epochs": args.epochs, "batch_size": 32, "lr": 1e-3, "seed": 42, "logging_steps": 500,
                     "cache_features": args.cached, "feature_cache_dir": tempfile.mkdtemp(prefix="cache_")},
        "output": {"dir": tempfile.mkdtemp(prefix="bench_out_"), "overwrite": True},
    }
    started = time.perf_counter()
    summary = run_training(recipe_from_dict(recipe))
    return {"run_seconds": time.perf_counter() - started, "train_seconds": summary["train_seconds"],
            "best_accuracy": summary["eval"]["accuracy"], "last_epoch_accuracy": summary["history"][-1]["accuracy"],
            "feature_cache": summary["feature_cache"], **peak_memory()}


def _inference_result(labels: list[str], seconds: float) -> dict:
    return {"samples": len(labels), "seconds": seconds, "samples_per_s": len(labels) / seconds, "labels": labels,
            **peak_memory()}


# what the inference comparisons label: SST-2's dev sentences, hymenoptera's validation images
INFERENCE_INPUTS = {"text": ("sst2", "dev.tsv"), "images": ("hymenoptera", "val")}


def side_predict(args: argparse.Namespace) -> dict:
    """`hf-transfer predict RUN INPUTS` through its Python entry point (model loading included)."""
    import timm  # noqa: F401  (imported before the clock starts, as the other sides import theirs: imports are
    import transformers  # noqa: F401  not timed on any side, loading the model is)

    from hf_transfer.inference.predict import predict

    inputs = str(Path(args.data_root).joinpath(*INFERENCE_INPUTS[args.inputs]))
    started = time.perf_counter()
    labels = [p.labels[0] for p in predict(args.run_dir, [inputs], batch_size=args.batch_size)]
    return _inference_result(labels, time.perf_counter() - started)


def side_pipeline_text(args: argparse.Namespace) -> dict:
    """transformers' `pipeline("text-classification")` on the same folder and sentences (loading included)."""
    import csv

    from transformers import pipeline

    with open(Path(args.data_root).joinpath(*INFERENCE_INPUTS["text"]), newline="") as table:
        sentences = [row["sentence"] for row in csv.DictReader(table, delimiter="\t", quoting=csv.QUOTE_NONE)]
    started = time.perf_counter()
    classifier = pipeline("text-classification", model=args.run_dir, device="cpu", truncation=True, max_length=128)
    labels = [r["label"] for r in classifier(sentences, batch_size=args.batch_size)]
    return _inference_result(labels, time.perf_counter() - started)


def side_timm_images(args: argparse.Namespace) -> dict:
    """timm as its docs show it: the exported folder, its data config's eval transform, PIL images, batches."""
    import timm
    import torch
    from PIL import Image

    started = time.perf_counter()
    model = timm.create_model(f"local-dir:{args.run_dir}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    names = json.loads((Path(args.run_dir) / "config.json").read_text())["label_names"]
    files, labels = sorted(Path(args.data_root).joinpath(*INFERENCE_INPUTS["images"]).rglob("*.jpg")), []
    with torch.inference_mode():
        for first in range(0, len(files), args.batch_size):
            pixels = torch.stack([transform(Image.open(f).convert("RGB")) for f in files[first:first + args.batch_size]])
            labels += [names[i] for i in model(pixels).argmax(-1).tolist()]
    return _inference_result(labels, time.perf_counter() - started)


def side_resnet_images(args: argparse.Namespace) -> dict:
    """ResNet-50 training steps (bf16, channels_last, batch 256) fed by one of the image pipelines."""
    import timm
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    model = timm.create_model("resnet50", num_classes=2).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    root = Path(args.data_root) / "cats_dogs" / "train"
    files = sorted(str(p) for p in root.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg"))
    labels = [0 if Path(f).parent.name == sorted(p.name for p in root.iterdir())[0] else 1 for f in files]
    batches = _image_batches(args.pipeline, files, labels, args.batch_size, mean, std, device)

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(batch["pixel_values"]), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def run(steps: int) -> int:
        images = 0
        for _ in range(steps):
            batch = next(batches)
            step(batch)
            images += len(batch["labels"])
        return images

    run(args.warmup_steps)
    torch.cuda.synchronize()
    started = time.perf_counter()
    images = run(args.steps)
    torch.cuda.synchronize()
    return {"images_per_s": images / (time.perf_counter() - started), **peak_memory()}


def _image_batches(pipeline: str, files, labels, batch_size, mean, std, device):
    """An endless iterator of {"pixel_values", "labels"} on the GPU, from the named pipeline."""
    import torch

    if pipeline == "ready":  # the ceiling: the same step on tensors already on the GPU
        pixels = torch.randn(batch_size, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
        batch = {"pixel_values": pixels, "labels": torch.randint(0, 2, (batch_size,), device=device)}
        while True:
            yield batch
    if pipeline in ("gpu_once", "gpu_every_step"):
        from hf_transfer.data.gpu_images import GpuImageBatches

        source = GpuImageBatches(files, labels, batch_size, 224, mean, std, device,
                                 decode="once" if pipeline == "gpu_once" else "every_step")
    else:  # "pil": torchvision ImageFolder-style decoding with PIL in DataLoader workers
        from PIL import Image
        from torch.utils.data import DataLoader, Dataset
        from torchvision import transforms

        transform = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                        transforms.ToTensor(), transforms.Normalize(mean, std)])

        class Files(Dataset):
            def __len__(self):
                return len(files)

            def __getitem__(self, i):
                return transform(Image.open(files[i]).convert("RGB")), labels[i]

        workers = max(1, min(15, (os.cpu_count() or 2) - 1))
        loader = DataLoader(Files(), batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=True,
                            persistent_workers=True, prefetch_factor=4)
        source = (
            {"pixel_values": x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last),
             "labels": y.to(device, non_blocking=True)}
            for epoch in iter(int, 1) for x, y in loader
        )
        yield from source
        return
    while True:
        yield from source


SIDES = {
    "hf_transfer_text": side_hf_transfer_text,
    "trainer_text": side_trainer_text,
    "feature_cache": side_feature_cache,
    "resnet_images": side_resnet_images,
    "predict": side_predict,
    "pipeline_text": side_pipeline_text,
    "timm_images": side_timm_images,
}


# ---------------------------------------------------------------------------------------------
# The comparisons: which sides, with which settings


def _text_sides(model: str, precision: str, batch: int, pad: int | None, samples: int | None, epochs: int,
                text_set: str, with_eager: bool = False, default_trainer: bool = True, lean: bool = False) -> list[tuple]:
    """The Trainer as the example runs it and as a careful user sets it up, then hf_transfer.

    On a CPU (`precision` auto) hf_transfer runs at its default precision (bf16 where the CPU has
    AMX, else fp32) and once more in fp32; the Trainer runs in fp32 (its default) and, where the
    CPU computes bf16 natively, once more with `bf16=True`, so every precision has its baseline."""
    from hf_transfer.training.precision import cpu_has_native_bf16

    common = ["--model", model, "--batch-size", str(batch), "--epochs", str(epochs), "--text-set", text_set]
    if samples:
        common += ["--train-samples", str(samples)]
    ours = common + (["--pad-to-multiple-of", str(pad)] if pad else [])
    padding = f"pad to x{pad}" if pad else "the recipe's padding"
    on_cpu = precision == "auto"
    trainer_precision = ["--precision", "no" if on_cpu else precision]
    sides = [("transformers Trainer, pad to max_length (the example's default)", "trainer_text", common + trainer_precision)]
    sides = sides if default_trainer else []
    sides.append(("transformers Trainer, dynamic padding + group_by_length", "trainer_text",
                  common + trainer_precision + ["--careful"]))
    if on_cpu and cpu_has_native_bf16():
        sides.append(("transformers Trainer, dynamic padding + group_by_length, bf16=True", "trainer_text",
                      common + ["--precision", "bf16", "--careful"]))
    fp32 = ours + ["--precision", "no"]
    ours += ["--precision", precision]
    sides.append((f"hf_transfer (length groups, {padding}, precision {precision})", "hf_transfer_text", ours))
    if on_cpu and not lean:  # the same in fp32, and random batches padded to their own longest (what grouping adds)
        sides.append((f"hf_transfer (length groups, {padding}, fp32)", "hf_transfer_text", fp32))
        sides.append((f"hf_transfer, no length groups ({padding}, precision {precision})", "hf_transfer_text",
                      ours + ["--no-length-groups"]))
    if on_cpu:  # what training only the embedding rows the texts use adds (training.compact_embeddings)
        sides.append((f"hf_transfer (length groups, {padding}, precision {precision}, whole embedding matrix updated)",
                      "hf_transfer_text", ours + ["--whole-embeddings"]))
    if with_eager:  # on a GPU: the same loop without CUDA graphs, to show what they add
        sides.append((f"hf_transfer, no CUDA graphs (length groups, {padding})", "hf_transfer_text", ours + ["--eager"]))
    return sides


def comparisons(name: str, options: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    if name == "cache":
        return [(label, "feature_cache", ["--epochs", str(options.epochs or 10)] + flag)
                for label, flag in (("uncached", []), ("cached features", ["--cached"]))]
    text_set = options.text_set
    if name == "text-cpu":  # the CPU's own padding (data.pad_to_multiple_of null: none)
        return _text_sides("minilm", "auto", 32, None, options.train_samples or 2000, options.epochs or 2, text_set,
                           default_trainer=not options.without_default_trainer, lean=options.lean)
    if name == "gpu-text":
        return _text_sides("bert-base", "bf16", 32, 16, options.train_samples or 16000, options.epochs or 2, text_set, True)
    if name == "gpu-fixed":
        return _text_sides("bert-base", "bf16", 64, 128, options.train_samples or 12800, options.epochs or 2, text_set)
    if name == "gpu-e2e":
        return _text_sides("bert-base", "bf16", 32, 16, options.train_samples, options.epochs or 3, text_set)
    if name in ("inference-text", "inference-images"):  # both sides label the same inputs at the same batch size
        if not options.run_dir:
            raise SystemExit(f"{name} needs --run-dir: the output folder of a {name.split('-')[1][:-1]} run")
        common = ["--run-dir", options.run_dir, "--batch-size", str(options.batch_size)]
        if name == "inference-text":
            return [("transformers pipeline('text-classification')", "pipeline_text", common),
                    ("hf-transfer predict", "predict", common + ["--inputs", "text"])]
        return [("timm: create_model(local-dir:), its eval transform, PIL", "timm_images", common),
                ("hf-transfer predict", "predict", common + ["--inputs", "images"])]
    if name == "gpu-images":
        steps = ["--steps", str(options.steps or 30), "--warmup-steps", "5", "--batch-size", "256"]
        return [(label, "resnet_images", ["--pipeline", pipeline] + steps) for label, pipeline in (
            ("tensors already on the GPU (ceiling)", "ready"),
            ("JPEGs decoded once, augmented on the GPU every step", "gpu_once"),
            ("JPEGs decoded (nvJPEG) and augmented on the GPU every step", "gpu_every_step"),
            ("torchvision-style PIL DataLoader, CPU workers", "pil"),
        )]
    raise SystemExit(f"unknown benchmark {name!r}")


def run_side(side: str, side_args: list[str], options: argparse.Namespace) -> dict:
    """One side in a fresh process; returns its result and the process's wall time."""
    command = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--side", side, "--data-root", options.data_root,
               *(["--tokenizer", options.tokenizer] if options.tokenizer else []), *side_args]
    started = time.perf_counter()
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - started
    result_lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not result_lines:
        print(completed.stdout[-3000:])
        return {"error": f"exit {completed.returncode}", "wall_seconds": wall}
    return {**json.loads(result_lines[-1][len("RESULT "):]), "wall_seconds": wall}


# ---------------------------------------------------------------------------------------------
# Writing the results


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}){gpu}"


def versions() -> str:
    import accelerate
    import timm
    import torch
    import transformers

    return (f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"timm {timm.__version__}, accelerate {accelerate.__version__}")


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, list):
        return " / ".join(_format(v) for v in value)
    return str(value)


def markdown(name: str, rows: list[tuple[str, dict]], sides: list[str], command: str, note: str | None) -> str:
    hidden = ("feature_cache", "labels")
    columns = [key for key in rows[0][1] if key not in hidden]
    for _, result in rows[1:]:
        columns += [key for key in result if key not in columns and key not in hidden]
    lines = [f"#### {name} — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"- command: `{command}`", f"- machine: {machine()}", f"- versions: {versions()}"]
    if note:
        lines.append(f"- note: {note}")
    lines += ["", "| side | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(_format(result.get(c, "")) for c in columns) + " |" for label, result in rows]
    lines += ["", *ratio_lines(name, rows, sides), ""]
    return "\n".join(lines) + "\n"


def ratio_lines(name: str, rows: list[tuple[str, dict]], sides: list[str]) -> list[str]:
    results = [r for _, r in rows]
    if any("error" in r for r in results):
        return ["- a side failed; no ratio"]
    base, ours = results[0], results[1]
    if name == "cache":
        return [f"- speed-up, whole run: {base['run_seconds'] / ours['run_seconds']:.1f}x; "
                f"training loop: {base['train_seconds'] / max(ours['train_seconds'], 1e-9):.1f}x",
                f"- accuracy difference (best epoch): {100 * (ours['best_accuracy'] - base['best_accuracy']):+.1f} points"]
    if name.startswith("inference-"):
        agree = sum(a == b for a, b in zip(base["labels"], ours["labels"])) / max(len(base["labels"]), 1)
        return [f"- {rows[1][0]}: {ours['samples_per_s'] / base['samples_per_s']:.2f}x the samples/s of "
                f"{rows[0][0]}; the same top label for {100 * agree:.1f}% of the {len(base['labels'])} inputs"]
    if name == "gpu-images":
        ceiling = base["images_per_s"]
        return [f"- {label}: {100 * r['images_per_s'] / ceiling:.0f}% of the ceiling" for label, r in rows[1:]]
    # text: every hf_transfer side against the strongest Trainer side (the careful user's), and the default one
    trainers = [(label, r) for (label, r), side in zip(rows, sides) if side == "trainer_text"]
    strongest_label, strongest = max(trainers, key=lambda item: item[1]["steady_samples_per_s"])
    default = base if "max_length" in rows[0][0] else None
    # the careful user's Trainer in its own default precision (fp32), where a bf16 side is the strongest
    careful = next((r for label, r in trainers if label.endswith("group_by_length")), None)
    careful = careful if careful is not strongest else None
    lines = [f"- strongest Trainer side: {strongest_label}"]
    for (label, r), side in zip(rows, sides):
        if side == "trainer_text":
            continue
        against_default = (f" ({r['steady_samples_per_s'] / default['steady_samples_per_s']:.2f}x the default one)"
                           if default else "")
        against_careful = (f"; {r['steady_samples_per_s'] / careful['steady_samples_per_s']:.2f}x (end to end "
                           f"{careful['wall_seconds'] / r['wall_seconds']:.2f}x) the careful Trainer in fp32" if careful else "")
        lines.append(
            f"- {label}: steady state {r['steady_samples_per_s'] / strongest['steady_samples_per_s']:.2f}x the "
            f"strongest Trainer{against_default}{against_careful}; "
            f"end to end (process wall time) {strongest['wall_seconds'] / r['wall_seconds']:.2f}x; "
            f"dev accuracy {100 * (r['dev_accuracy'] - strongest['dev_accuracy']):+.1f} points"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", nargs="?", help="cache, text-cpu, gpu-text, gpu-fixed, gpu-e2e, gpu-images, "
                        "inference-text or inference-images")
    parser.add_argument("--data-root", default=str(DEFAULT_DATA), help="folder holding sst2/, hymenoptera/, cats_dogs/")
    parser.add_argument("--tokenizer", help="tokenizer folder for BERT-base (default: the offline MiniLM's)")
    parser.add_argument("--text-set", choices=sorted(TEXT_SETS), default="sst2", help="text comparisons: the data set")
    parser.add_argument("--train-samples", type=int, help="seeded sample of the training split (default per benchmark)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--note", help="a line to record with the results, e.g. that the machine was shared")
    parser.add_argument("--results", default=str(RESULTS), help="markdown file the table is appended to")
    # a side's own arguments (used when the driver starts it)
    parser.add_argument("--side", choices=sorted(SIDES))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--precision", default="no", help="a side's training.mixed_precision (auto, no, bf16)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pad-to-multiple-of", type=int, help="hf_transfer side (default: the recipe's)")
    parser.add_argument("--length-window", type=int, help="hf_transfer side: data.length_window (default: the recipe's)")
    parser.add_argument("--careful", action="store_true", help="Trainer side: dynamic padding and length grouping")
    parser.add_argument("--without-default-trainer", action="store_true",
                        help="text-cpu: leave out the Trainer padding to max_length (the slowest side, by far)")
    parser.add_argument("--lean", action="store_true",
                        help="text-cpu: leave out hf_transfer's fp32 and random-batch sides (what precision and grouping add)")
    parser.add_argument("--cached", action="store_true")
    parser.add_argument("--eager", action="store_true", help="hf_transfer side without CUDA graphs")
    parser.add_argument("--no-length-groups", action="store_true", help="hf_transfer side with random batches")
    parser.add_argument("--whole-embeddings", action="store_true",
                        help="hf_transfer side with training.compact_embeddings false")
    parser.add_argument("--pipeline", default="ready")
    parser.add_argument("--run-dir", help="inference comparisons: the output folder of a finished run")
    parser.add_argument("--inputs", choices=sorted(INFERENCE_INPUTS), default="text", help="predict side: what it labels")
    parser.add_argument("--warmup-steps", type=int, default=5)
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if options.side:
        if options.steps is None:
            options.steps = 30
        print("RESULT " + json.dumps(SIDES[options.side](options)), flush=True)
        return 0
    if not options.benchmark:
        parser.error("name a benchmark")
    rows, sides = [], []
    for label, side, side_args in comparisons(options.benchmark, options):
        print(f"== {options.benchmark}: {label}", flush=True)
        result = run_side(side, side_args, options)
        print(json.dumps(result), flush=True)
        rows.append((label, result))
        sides.append(side)
    command = "python scripts/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(options.benchmark, rows, sides, command, options.note)
    print(section)
    with open(options.results, "a") as results:
        results.write(section)
    return 0
