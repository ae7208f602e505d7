"""The recipe section of unsupervised domain adaptation (kept apart from schema.py, which holds the training sections)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hf_transfer.recipe.fields import _f


@dataclass
class AdaptationConfig:
    """Unsupervised domain adaptation: `data` is the labelled source, `target_path` the unlabelled target."""

    method: Literal["none", "dann", "cdan", "mmd", "coral", "mcc", "tca"] = _f(
        "none",
        "none: source only. dann: domain discriminator behind gradient reversal; cdan: a discriminator on the outer "
        "product of features and predictions, entropy-weighted (CDAN+E); mmd: multi-kernel MMD (DAN); coral: "
        "covariance alignment; mcc: minimum class confusion of the target predictions (no discriminator); tca: "
        "transfer component analysis of the frozen features before the head trains (freeze_backbone only).",
    )
    target_path: str | None = _f(
        None, "Target data, read like data.path (same columns and preprocessing). Its labels, if any, are used only "
        "to report target accuracy, never to train or to pick an epoch."
    )
    target_name: str | None = _f(None, "Hub dataset configuration name of the target data.")
    features: Literal["head_input", "mean"] = _f(
        "head_input",
        "Backbone features the head sees: head_input (what the source's own classifier reads: timm's pooled "
        "features, BERT's pooler output) or mean (text: mean of the last hidden states, what sentence encoders "
        "such as all-MiniLM-L6-v2 are trained to produce).",
    )
    weight: float | None = _f(
        None, "Weight of the domain loss: dann and cdan, the largest gradient-reversal weight (its ramp ends there); "
        "mmd, coral and mcc, the loss's multiplier. null: the method's default (dann 0.1, cdan 0.1, mmd 1, coral 1, "
        "mcc 1).", at_least=0
    )
    ramp_gamma: float = _f(10.0, "dann and cdan: steepness of the reversal-weight ramp 2/(1+exp(-gamma*progress))-1.", above=0)
    mcc_temperature: float = _f(
        2.5, "mcc: temperature that softens the target predictions before their class confusion is measured "
        "(the paper's 2.5).", above=0
    )
    norm_statistics: Literal["auto", "per_domain", "shared"] = _f(
        "auto",
        "A backbone with BatchNorm layers: per_domain normalises each domain by its own statistics (AdaBN, Li et "
        "al. 2016), the target's saved. With the backbone in the loop every BatchNorm layer, frozen ones too, reads "
        "the batch's own statistics while training (each batch is one domain) and the running ones are "
        "re-estimated on the whole unlabelled target before each evaluation; with freeze_backbone each domain's "
        "features are computed under its own re-estimated statistics. shared: as a plain run of the strategy. "
        "auto: per_domain where a method adapts (not none, the source-only baseline) and the model has BatchNorm "
        "layers (and strategy.norm_statistics is update), else shared.",
    )
    bottleneck_dim: int = _f(256, "Width of the bottleneck layer whose features the domain loss aligns.", at_least=1)
    dropout: float = _f(0.5, "Dropout after the bottleneck (and inside the domain discriminator).", at_least=0, below=1)
    tca_components: int = _f(64, "tca: number of transfer components (the head's input width).", at_least=1)
    tca_kernel: Literal["linear", "rbf"] = _f("linear", "tca: kernel of the component analysis.")
    tca_mu: float = _f(1.0, "tca: trade-off between keeping variance and matching the domains (larger: less matching).", above=0)
    tca_max_samples: int = _f(
        1000, "tca: fit on at most this many examples, half source, half target (its cost grows as n^3).", at_least=2
    )
