"""The model card's sentences on how the head and the model were trained (the solver, the head fitted
first, batch and learning rate as trained, cached features), from the recipe and metrics.json."""

from __future__ import annotations

from typing import Any

from hf_transfer.export.layout import LR_FINDER_PNG
from hf_transfer.recipe import Recipe, TrainingConfig


def solver_text(summary: dict[str, Any]) -> str:
    solver = summary.get("head_solver")
    if not solver:
        return ""
    if solver.get("kind") == "text_projection":  # speech->text transfer: cache/projection.py
        return (f"; the head of the text run {solver['text_run']} reading the speech through an adaptation layer: a "
                f"ridge projection (strength {solver['ridge_strength']:.3g}, chosen by {solver['cv_folds']}-fold "
                "cross-validation) of the frozen speech features into that text model's features, fitted on the "
                "training clips' transcripts (their labels unused); on held-out training pairs the speech is labelled "
                f"as the text model labels the transcript {solver['cv_agreement_with_text_model']:.1%} of the time")
    chosen = f"chosen by {solver['cv_folds']}-fold cross-validation on the training features" if solver["cv_folds"] else "the default"
    return f"; fitted to convergence on the cached features as a logistic regression (L2 strength C={solver['C']:.3g}, {chosen})"


def head_first_text(summary: dict[str, Any]) -> str:
    fit = summary.get("head_first")
    if not fit:
        return ""
    return (f"; fitted first on the frozen backbone's features as a logistic regression (C={fit['C']:.3g}, validation "
            f"accuracy {fit['accuracy']:.4f}), then fine-tuned with the backbone")


def batch_and_lr_text(t: TrainingConfig, summary: dict[str, Any], processes: int) -> str:
    """Batch and learning rate as trained: what training.batch_size / lr auto found is in metrics.json."""
    batch, lr = summary.get("batch_size_finder"), summary.get("lr_finder")
    size, accumulation = (batch["batch_size"], batch["gradient_accumulation_steps"]) if batch else (
        t.batch_size, t.gradient_accumulation_steps)
    how = f" (training.batch_size auto: {batch['how']})" if batch else ""
    rate = (f"lr {t.lr:g}" if not lr else f"lr auto ({lr['how']})" if lr["lr"] is None else
            f"lr {lr['lr']:.3g} (training.lr auto: a learning-rate range test, {lr['rule']}; curve in {LR_FINDER_PNG})")
    return f"batch {size} x {processes} process(es) x {accumulation} accumulation{how}, {t.optimizer} {rate}"


def cache_views_text(recipe: Recipe) -> str:
    if recipe.task != "image":
        return ""
    views = recipe.training.cache_views
    return (", without training augmentation (training.cache_views=1)" if views == 1
            else f", {views} augmented views of each training image")


def evaluated_weights_text(t: TrainingConfig, summary: dict[str, Any]) -> str:
    """Which weights each epoch was scored with, and the card's model holds, where they are not the trained ones."""
    if t.ema_decay:
        return f"; every epoch scored, and the model saved, with an exponential moving average of the weights (decay {t.ema_decay:g})"
    share = summary.get("weight_interpolation")
    if share:
        return (f"; every epoch scored, and the model saved, with {1 - share:g} x the weights fine-tuning started from "
                f"+ {share:g} x the fine-tuned ones (WiSE-FT, training.weight_interpolation)")
    return ""


def adaptation_text(summary: dict[str, Any]) -> str:
    """A domain-adaptation run with the backbone in the loop: what its evaluation examples and statistics are."""
    adaptation = summary.get("adaptation")
    if not adaptation:
        return ""
    return (f"; adapted without labels to `{adaptation['target_path']}` (method {adaptation['method']}): the "
            "evaluation examples are that whole target, whose labels only scored the epochs"
            + ("; its BatchNorm statistics were re-estimated on the target (per-domain statistics, AdaBN), so the "
               "model normalises inputs as on the target, not as on the source"
               if adaptation.get("norm_statistics") == "per_domain" else ""))


def training_text(recipe: Recipe, summary: dict[str, Any], processes: int) -> str:
    t = recipe.training
    if summary.get("head_solver"):  # no loop ran: epochs, rates and schedule did not apply
        return (f"no training loop: the head was fitted by the solver on frozen features cached once"
                f"{cache_views_text(recipe)} (see the head above)")
    return (
        f"{t.epochs} epochs, {batch_and_lr_text(t, summary, processes)}, {t.scheduler} schedule (warmup "
        f"{t.warmup_ratio:g}), weight decay {t.weight_decay:g}, label smoothing {t.label_smoothing:g}"
        + evaluated_weights_text(t, summary)
        + (f"; the head trained on frozen features cached once{cache_views_text(recipe)}"
           if summary.get("feature_cache") else "")
    )
