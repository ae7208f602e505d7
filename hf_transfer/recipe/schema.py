"""The recipe schema: one dataclass per section, every field with its default and help text.

A recipe is the only place where choices are made. Every field has a default and a help text
(the style of peft's config dataclasses), so a YAML file names only what differs. A section checks
its own values (`check`); checks.py builds a recipe from nested dicts and runs them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe.adaptation_config import AdaptationConfig
from hf_transfer.recipe.augment_config import AugmentConfig
from hf_transfer.recipe.fields import _f
from hf_transfer.recipe.rank_config import RankConfig


@dataclass
class ModelConfig:
    name: str = _f("sentence-transformers/all-MiniLM-L6-v2", "Hub id, local folder, or timm model name of the source model.")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the source model.")
    pretrained: bool = _f(True, "Load pretrained weights; false starts from random weights (tests, ablations).")
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the Hub. Off unless you trust the repository.")
    weights_file: str | None = _f(
        None, "Image tasks: a local .safetensors (or .pth) file of weights for the timm architecture named in model.name."
    )


# Batches per length-sorted window (data.length_window). Padding, as a multiple of the real tokens
# (batch 32): SST-2 1.55 at 4, 1.14 at 16, 1.07 at 50; Amazon reviews 1.23, 1.08, 1.02. Fine-tuning
# accuracy at 4 and at 50 agreed within one standard error (SST-2, two seeds; Amazon electronics),
# but an earlier run with the whole epoch in one window lost 3 points: 16 pads like the Trainer's
# own grouping and keeps batches less uniform (benchmarks/BENCHMARKS.md, issue 14).
LENGTH_WINDOW = 16


@dataclass
class DataConfig:
    path: str | None = _f(None, "Hub dataset id, a local folder, or a data file (csv, tsv, json, jsonl, parquet).")
    name: str | None = _f(None, "Hub dataset configuration name.")
    train_split: str = _f("train", "Split (or file stem) used for training.")
    validation_split: str | None = _f("validation", "Split used for validation; if absent, it is carved from train.")
    validation_fraction: float = _f(0.1, "Share of train carved off (stratified, seeded) when there is no validation split.", above=0, below=1)
    text_column: str = _f("text", "Column holding the text (text tasks).")
    text_pair_column: str | None = _f(None, "Optional second text column (sentence-pair tasks).")
    image_column: str = _f("image", "Column holding the image (image tasks): image files, or paths in a CSV.")
    audio_column: str = _f("audio", "Column holding the audio (audio tasks): sound files, or paths in a CSV.")
    transcript_column: str | None = _f(
        None, "Audio with head.text_run: the column holding what each training clip says (its transcript)."
    )
    image_size: int | None = _f(None, "Image tasks: square input size in pixels; null takes the source model's own.", at_least=1)
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={"help": "Image tasks: training augmentation."})
    verify_images: bool = _f(True, "Image tasks: decode every image once before training; skip (and list) unreadable ones.")
    label_column: str = _f("label", "Column holding the label.")
    label_names: list[str] | None = _f(None, "Names of the labels in id order, when the data stores integer ids.")
    max_length: int = _f(128, "Longest tokenised text; longer texts are truncated. Batches pad only to their own longest.", at_least=1)
    group_by_length: bool = _f(
        True, "Text: batch texts of similar length together (shuffled by length group), so batches carry little padding."
    )
    length_window: int = _f(
        LENGTH_WINDOW, "Text, with group_by_length: each shuffled window of this many batches is sorted by length and "
        "cut into batches. Larger windows pad less; 1 is random batches.", at_least=1
    )
    pad_to_multiple_of: int | None = _f(
        None, "Text: pad each batch to a multiple of this many tokens. null: 8 on a CUDA GPU (tensor cores), 1 "
        "elsewhere (a CPU gains nothing from it). 16 or 32 gives fewer batch shapes, which CUDA graphs and "
        "torch.compile need.", at_least=1
    )
    max_train_samples: int | None = _f(None, "Use only this many training examples (a seeded random sample).", at_least=1)
    max_eval_samples: int | None = _f(None, "Use only this many validation examples (a seeded random sample).", at_least=1)

    def check(self) -> None:
        self.augment.check()


@dataclass
class LoraConfig:
    r: int = _f(8, "Rank of the LoRA update matrices.", at_least=1)
    alpha: int = _f(16, "LoRA scaling numerator (the update is scaled by alpha / r).", above=0)
    dropout: float = _f(0.1, "Dropout on the LoRA branch.", at_least=0, below=1)
    target_modules: list[str] | None = _f(None, "Module names to adapt; default: the attention projections (text), the attention and MLP linears (timm "
        "ViTs); CNNs have no default, so name their modules.")


@dataclass
class StrategyConfig:
    name: Literal["full", "freeze_backbone", "partial", "gradual_unfreeze", "lora", "auto"] = _f(
        "full", "Which parameters train: everything, only the head, the top blocks, blocks unfrozen over epochs, or LoRA. "
        "auto: a search, cheapest first (freeze_backbone with the solver, lora where the source has default LoRA "
        "targets, partial, full), each rung with early stopping within training.time_budget, the fine-tuning rungs "
        "sharing the epochs by successive halving (the better half goes on after each epoch); the best by "
        "training.metric_for_best is saved, a tie (within half a validation example) going to the cheaper rung."
    )
    trainable_blocks: int = _f(2, "partial: how many of the top backbone blocks train with the head.", at_least=1)
    unfreeze_every: int = _f(1, "gradual_unfreeze: epochs between unfreezing the next block (top down).", at_least=1)
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA settings (strategy lora)."})
    merge_lora: bool = _f(False, "lora: also save a merged full model under OUTPUT/merged.")
    head_first: bool | Literal["auto"] = _f(
        "auto",
        "partial, full, gradual_unfreeze: fit the head before the backbone moves, as a logistic regression on the "
        "frozen backbone's cached features (the head.solver fit), so fine-tuning starts from the linear probe instead "
        "of a zero head (linear probing then fine-tuning, LP-FT; fastai's fine_tune trains the head first too). "
        "auto (the default): for image tasks, wherever the head is one linear layer and the frozen-feature cache can "
        "serve the task (measured to lift fine-tuning's last epoch on images, neutral on text: "
        "benchmarks/BENCHMARKS.md); true: for any task, an error where it cannot; false: the head starts at zero.",
    )
    freeze_word_embeddings: bool = _f(
        False,
        "Text, full and partial: keep the token embedding matrix at its pretrained values while the rest trains. "
        "It is about half of a small encoder's parameters, and its dense gradient, clipping and optimiser update "
        "are an eighth to a fifth of a MiniLM bf16 step on the CPUs measured; most rows are never seen in a small data "
        "set. Measured at the same accuracy (two data sets, two seeds), a gain for short texts only: off by default.",
    )
    norm_statistics: Literal["update", "frozen"] = _f(
        "update",
        "Strategies that train the backbone: whether its BatchNorm layers re-estimate their running statistics "
        "from the training batches (update, PyTorch's default) or keep the pretrained ones (frozen: the layers run "
        "as in evaluation, their scale and shift still train). Layers whose weights are all frozen always keep theirs.",
    )


@dataclass
class HeadConfig:
    type: Literal["linear", "mlp", "bottleneck"] = _f("linear", "Classification head on the pooled features.")
    hidden_dim: int = _f(512, "Hidden width of the mlp head / bottleneck width of the bottleneck head.", at_least=1)
    dropout: float = _f(0.0, "Dropout before the head's layers.", at_least=0, below=1)
    pooling: Literal["auto", "head_input", "mean"] = _f(
        "auto",
        "Text: the features the head reads. head_input: what the source's own classifier reads (BERT's pooler "
        "output of [CLS]); mean: the mean of the last hidden states over the real tokens, the output is then a "
        "sentence-transformers folder; auto: mean for a sentence-transformers source trained with mean pooling "
        "(its modules.json says so), head_input otherwise. Images always read timm's pooled features.",
    )
    solver: Literal["auto", "loop", "logistic"] = _f(
        "auto",
        "How a linear head on cached frozen features is trained. loop: training.epochs of the training loop; "
        "logistic: a multinomial logistic regression fitted to convergence, its L2 strength chosen by "
        "cross-validation on the training features (scikit-learn), then evaluated once; auto: logistic wherever "
        "the frozen-feature cache serves the run with a linear head and no label smoothing, loop otherwise.",
    )
    text_run: str | None = _f(
        None,
        "Audio: the output folder of a mean-pooled text run whose head classifies the speech (speech->text "
        "transfer). An adaptation layer, a ridge projection of the frozen speech features into the text model's "
        "features, is fitted on the training clips and their transcripts (data.transcript_column), and the text "
        "head reads the projected speech. The training clips' labels are not used; the label names are the text "
        "run's. Needs strategy freeze_backbone and a linear head.",
    )


@dataclass
class MultimodalConfig:
    """Two towers (a timm image model, a transformers text encoder) joined by a fusion head (task multimodal)."""

    image_model: ModelConfig = field(
        default_factory=lambda: ModelConfig(name="tf_efficientnet_lite0"), metadata={"help": "The image tower."}
    )
    text_model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The text tower."})
    image_strategy: StrategyConfig | None = _f(
        None, "Which image-tower parameters train (freeze_backbone, lora, full, ...); null: the recipe's strategy."
    )
    text_strategy: StrategyConfig | None = _f(
        None, "Which text-tower parameters train (freeze_backbone, lora, full, ...); null: the recipe's strategy."
    )
    fusion: Literal["concat", "gated"] = _f(
        "concat", "concat: both towers' features concatenated into an MLP; gated: a gated multimodal unit weighs "
        "the two projected features per dimension, then an MLP."
    )
    hidden_dim: int = _f(256, "Width of the fusion head's hidden layer.", at_least=1)
    dropout: float = _f(0.1, "Dropout in the fusion head.", at_least=0, below=1)
    text_pooling: Literal["head_input", "mean"] = _f(
        "head_input", "Text tower features: head_input (BERT's pooler output) or mean (mean of the last hidden states)."
    )


@dataclass
class TrainingConfig:
    epochs: int = _f(3, "Number of passes over the training data.", at_least=1)
    batch_size: int | Literal["auto"] = _f(32, "Examples per step on each process (before accumulation). auto: on a GPU the "
        "largest batch up to max_batch_size whose training step fits in memory (halved on out-of-memory), on a CPU (no "
        "such error to go by) at most 32; gradient_accumulation_steps grows so the effective batch stays max_batch_size "
        "x gradient_accumulation_steps.", at_least=1)
    max_batch_size: int = _f(32, "batch_size auto: the batch tried first, and x gradient_accumulation_steps the effective "
        "batch kept (32 keeps the default batch_size's training; raise it for larger batches).", at_least=1)
    eval_batch_size: int = _f(64, "Examples per evaluation batch.", at_least=1)
    lr: float | Literal["auto"] = _f(5e-5, "Learning rate (of every parameter unless backbone_lr / head_lr say otherwise). "
        "auto: found by a learning-rate range test before training (lr raised from 1e-7 towards 10 over 100 steps on the "
        "run's own model and data, the model then restored): halfway along the longest fall of the smoothed loss "
        "(fastai's valley); backbone_lr / head_lr given as numbers stay. Curve: lr_finder.png; metrics.json: lr_finder.", above=0)
    backbone_lr: float | None = _f(None, "Learning rate of the pretrained backbone's trainable parameters.", above=0)
    head_lr: float | None = _f(None, "Learning rate of the new head.", above=0)
    layer_decay: float | None = _f(None, "Layer-wise lr decay: the backbone's top block at backbone_lr x decay, one more "
        "factor per block below (timm's param_groups_layer_decay rule, on any source's blocks). null: off.", above=0, at_most=1)
    ema_decay: float | None = _f(None, "EMA of the weights (timm's ModelEmaV3, this decay per update): every epoch is "
        "evaluated with the average, and the average is kept and saved. null: off.", above=0, below=1)
    weight_interpolation: float | Literal["auto"] | None = _f("auto", "WiSE-FT: epochs scored and saved with (1-x) x the "
        "start + x x the tuned weights; auto: 0.5 if the head is fitted first on pretrained weights and no ema_decay; "
        "null: off.", above=0, below=1)
    weight_decay: float = _f(0.01, "Decoupled weight decay; never applied to biases and norm weights.", at_least=0)
    compact_embeddings: bool = _f(True, "Text: a trained token-embedding matrix updates only the rows the training "
        "texts use; every other row gets the one factor the optimiser's weight decay gives a row without gradient. The "
        "same model as updating the whole matrix, in less time per step (not with adam and weight_decay > 0, which "
        "update it whole). false: update it whole.")
    optimizer: Literal["adamw", "adam", "sgd"] = _f("adamw", "Optimiser.")
    momentum: float = _f(0.9, "Momentum (sgd).", at_least=0, below=1)
    scheduler: Literal["linear", "cosine", "constant", "step", "onecycle"] = _f("linear", "Learning-rate schedule.")
    warmup_ratio: float = _f(0.0, "Share of steps spent warming the learning rate up from 0 (linear, cosine, constant).", at_least=0, below=1)
    step_size: int = _f(7, "step: epochs between learning-rate decays.", at_least=1)
    gamma: float = _f(0.1, "step: decay factor.", above=0)
    gradient_accumulation_steps: int = _f(1, "Batches accumulated per optimiser step.", at_least=1)
    max_grad_norm: float | None = _f(1.0, "Clip the gradient norm to this; null disables clipping.", above=0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] | None = _f(
        "auto", "Precision. auto: the launcher's choice if it made one, else bf16 when backbone weights train and "
        "the hardware computes it natively (a CUDA GPU of compute capability 8+; a CPU with AMX for text), else no; null: "
        "the accelerate config's."
    )
    seed: int = _f(42, "Seed of every random choice (sampling, initialisation, shuffling, dropout).")
    extra_metrics: list[str] = _f(
        [], "More validation metrics from the `evaluate` library, by name (e.g. matthews_correlation, loaded from "
        "the Hub) or a local metric folder, computed every epoch and in `evaluate` beside accuracy and macro F1."
    )
    metric_for_best: Literal["accuracy", "f1_macro"] = _f(
        "accuracy", "Validation metric that picks the best epoch (higher is better)."
    )
    early_stopping_patience: int | None = _f(None, "Stop after this many epochs without a better metric_for_best.", at_least=1)
    time_budget: float | None = _f(
        None, "strategy auto: seconds the search may spend training its rungs (null: no limit). The frozen head always "
        "runs; a later rung whose estimated time does not fit what is left is skipped, and a rung stops after the "
        "epoch past which the next one would not fit.", above=0,
    )
    class_weights: str | list[float] | None = _f(None, "Loss weight per class: a list, 'auto' (inverse frequency), or null.")
    label_smoothing: float = _f(0.0, "Label smoothing of the cross-entropy loss.", at_least=0, below=1)
    logging_steps: int = _f(10, "Log loss and learning rate every this many optimiser steps.", at_least=1)
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "all"]] | None = _f(
        None, "Experiment trackers that receive what log.jsonl gets (Accelerate's trackers; local ones write under "
        "OUTPUT/logs), e.g. [tensorboard]; all: every tracker installed. null: log.jsonl only."
    )
    save_checkpoints: bool = _f(
        True,
        "Write a resumable checkpoint (weights, optimiser, scheduler, RNG, data position, best metric) into "
        "OUTPUT/checkpoints at the end of every epoch; `train --resume` continues from the newest.",
    )
    checkpoint_every_steps: int | None = _f(
        None, "Also checkpoint every this many optimiser steps, mid-epoch (long epochs); null: at epoch ends only.", at_least=1
    )
    num_workers: int | None = _f(None, "DataLoader worker processes; null: 0 for text (tokenised batches are cheap), from the CPU count for images.", at_least=0)
    cache_features: bool | Literal["auto"] = _f(
        "auto",
        "Frozen-feature cache: with strategy freeze_backbone, compute the backbone's features once and train the "
        "head on them (every epoch after the first costs only the head). auto: when the model supports it; "
        "true: always (an error where it cannot); false: never.",
    )
    cache_views: int = _f(
        1,
        "Frozen-feature cache, image tasks: 1 caches one view of each training image without augmentation (the "
        "usual linear probe, fastest); K > 1 caches K augmented views and epoch e trains on view e mod K.",
    at_least=1)
    feature_cache_dir: str | None = _f(
        None, "Folder of the frozen-feature cache; null: OUTPUT/feature_cache. Point runs at one folder to share it."
    )
    cuda_graphs: bool = _f(
        True,
        "Replay each training step as one CUDA graph per batch shape (removes per-kernel launch cost, the "
        "bottleneck of small batches), where the run allows it: one CUDA GPU, bf16 or fp32, no accumulation, "
        "adam/adamw, no one-cycle schedule, no gradual unfreezing, no domain-adaptation loss, no torch.compile. "
        "Elsewhere, and when false, steps run eagerly.",
    )
    compile: Literal["no", "default", "reduce-overhead", "max-autotune"] = _f(
        "no", "torch.compile the model with this mode; compiling costs time up front (minutes for large models)."
    )

    def check(self) -> None:
        weights = self.class_weights
        if isinstance(weights, str) and weights != "auto":
            raise HfTransferError("training.class_weights must be 'auto', a list of numbers, or null.")
        if isinstance(weights, list) and not all(math.isfinite(w) and w > 0 for w in weights):
            raise HfTransferError(f"training.class_weights must all be positive numbers; got {weights}.")


@dataclass
class OutputConfig:
    dir: str | None = _f(None, "Output folder; default runs/<recipe name>.")
    overwrite: bool = _f(False, "Allow writing into a non-empty output folder.")
    save_total_limit: int = _f(
        1, "Keep the newest N checkpoints in OUTPUT/checkpoints; an older one is deleted once a newer one is complete.", at_least=1
    )
    license: str | None = _f(
        None, "Licence id for the model card (e.g. apache-2.0, mit); it must allow what the source model's and "
        "data's licences allow. null: left out of the card's metadata."
    )
    push_to_hub: bool = _f(
        False, "Upload the output folder to the Hub in one commit when training ends (needs output.hub_repo_id and "
        "a token: `hf auth login` or HF_TOKEN). A failed upload keeps the folder; `hf-transfer push` retries."
    )
    hub_repo_id: str | None = _f(None, "Hub repository to push to, 'user/name' or 'org/name'; created if missing.")
    hub_private: bool = _f(False, "Create the Hub repository as private (an existing one keeps its visibility).")

    def check(self) -> None:
        if self.push_to_hub and not self.hub_repo_id:
            raise HfTransferError("output.push_to_hub needs output.hub_repo_id, e.g. --set output.hub_repo_id=user/name.")
        if self.hub_repo_id is not None:
            check_repo_id(self.hub_repo_id)


@dataclass
class Recipe:
    name: str = _f("recipe", "Name of the recipe (the file stem when loaded from a file).")
    description: str = _f("", "One line saying what the recipe does.")
    task: Literal["text", "image", "multimodal", "audio"] = _f(
        "text", "Modality of the inputs; multimodal: an image column and a text column (see multimodal); audio: "
        "sound files (class folders or a table of paths) for a speech encoder (Whisper, wav2vec2, HuBERT)."
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Source model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data set and preprocessing."})
    strategy: StrategyConfig = field(default_factory=StrategyConfig, metadata={"help": "Transfer strategy."})
    head: HeadConfig = field(default_factory=HeadConfig, metadata={"help": "Classification head."})
    adaptation: AdaptationConfig = field(
        default_factory=AdaptationConfig, metadata={"help": "Unsupervised domain adaptation to a target data set."}
    )
    multimodal: MultimodalConfig = field(
        default_factory=MultimodalConfig, metadata={"help": "Task multimodal: the two towers and their fusion."}
    )
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "The training loop."})
    rank: RankConfig = field(
        default_factory=RankConfig, metadata={"help": "hf-transfer rank: the candidate source models and the score."}
    )
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "Where results go."})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def changes(self) -> dict[str, Any]:
        """The values that differ from the defaults, nested as in a recipe file."""

        def differences(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
            changed = {}
            for key, value in values.items():
                if isinstance(value, dict) and isinstance(defaults.get(key), dict):
                    nested = differences(value, defaults[key])
                    if nested:
                        changed[key] = nested
                elif value != defaults.get(key):
                    changed[key] = value
            return changed

        return differences(self.to_dict(), Recipe().to_dict())

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir) if self.output.dir else Path("runs") / self.name


def check_repo_id(repo_id: str) -> None:
    """A Hub model repository id: 'namespace/name' of letters, digits, '-', '_' and '.'."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id) or ".." in repo_id or len(repo_id) > 96:
        raise HfTransferError(
            f"'{repo_id}' is not a Hub repository id; write it as user/name or org/name "
            "(letters, digits, '-', '_', '.')."
        )
