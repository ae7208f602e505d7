"""Cross-domain objectives for unsupervised domain adaptation.

A training loop with labelled source batches and unlabelled target batches adds one of these
losses, computed on the two batches' features, to the source task loss:

- "dann":  a domain discriminator behind gradient reversal (Ganin & Lempitsky, 2015);
- "mmd":   multi-kernel Gaussian maximum mean discrepancy (DAN, Long et al., 2015);
- "coral": distance between feature covariances (Deep CORAL, Sun & Saenko, 2016);
- "cdan":  a discriminator on the outer product of features and predictions, entropy-weighted
           (CDAN+E, Long, Cao, Wang & Jordan, 2018);
- "mcc":   minimum class confusion of the target predictions, no discriminator (Jin, Wang, Long &
           Wang, 2020).

`TransferComponentAnalysis` (Pan et al., 2011, tca.py) is the classical baseline on frozen features.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hf_transfer.errors import HfTransferError


class AdaptationError(HfTransferError, ValueError):
    """A bad domain-adaptation setting (unknown method, out-of-range value, wrong shapes)."""


def _check_feature_pair(source: Tensor, target: Tensor, min_rows: int = 1) -> None:
    if source.dim() != 2 or target.dim() != 2:
        raise AdaptationError(
            f"domain losses take 2-D (batch, features) tensors, got shapes "
            f"{tuple(source.shape)} and {tuple(target.shape)}; flatten or pool the features first")
    if source.shape[1] != target.shape[1]:
        raise AdaptationError(
            f"source and target features differ in width ({source.shape[1]} vs "
            f"{target.shape[1]}); pass features from the same layer")
    if source.shape[0] < min_rows or target.shape[0] < min_rows:
        raise AdaptationError(f"each batch needs at least {min_rows} rows, got "
                              f"{source.shape[0]} source and {target.shape[0]} target")


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -weight (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: float) -> Tensor:
        ctx.weight = float(weight)
        # view_as so autograd records a new node rather than returning the input itself
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output * -ctx.weight, None


def grad_reverse(x: Tensor, weight: float = 1.0) -> Tensor:
    """Pass `x` through unchanged; its gradient comes back multiplied by `-weight`."""
    if not math.isfinite(weight) or weight < 0:
        raise AdaptationError(f"gradient reversal weight must be a finite number >= 0, got {weight}")
    return GradientReversal.apply(x, weight)


def dann_weight(progress: float, gamma: float = 10.0, max_weight: float = 1.0) -> float:
    """DANN ramp max_weight * (2 / (1 + exp(-gamma * progress)) - 1) (Ganin & Lempitsky, 2015).

    `progress` is the fraction of training done, in [0, 1]. Starting at 0 keeps the noisy
    early discriminator from scrambling features before the classifier has learnt anything.
    """
    if not 0.0 <= progress <= 1.0:
        raise AdaptationError(f"progress must be in [0, 1] (step / total_steps), got {progress}")
    if gamma <= 0 or max_weight < 0:
        raise AdaptationError(f"need gamma > 0 and max_weight >= 0, got {gamma} and {max_weight}")
    return max_weight * (2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0)


class DomainDiscriminator(nn.Module):
    """MLP that tells source (logit > 0) from target features, behind gradient reversal (DANN)."""

    def __init__(self, in_features: int, hidden: int = 256, dropout: float = 0.5) -> None:
        super().__init__()
        if in_features < 1 or hidden < 1 or not 0.0 <= dropout < 1.0:
            raise AdaptationError(f"need in_features >= 1, hidden >= 1 and dropout in [0, 1), got "
                                  f"{in_features}, {hidden}, {dropout}")
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )
        # Filled by domain_adversarial_loss; a tensor, so logging it costs no device sync
        # until someone calls float() on it.
        self.last_accuracy: Tensor | None = None

    def forward(self, features: Tensor, weight: float = 1.0) -> Tensor:
        """Domain logits of shape (batch,); gradients reaching `features` are reversed."""
        return self.net(grad_reverse(features, weight)).squeeze(-1)


def domain_adversarial_loss(discriminator: DomainDiscriminator, source_features: Tensor,
                            target_features: Tensor, weight: float = 1.0) -> Tensor:
    """BCE of the discriminator on source (label 1) vs target (label 0) features (DANN).

    Minimising it trains the discriminator normally, while the features receive the reversed
    gradient scaled by `weight`, pushing them towards domain invariance. The discriminator's
    accuracy on this batch is left in `discriminator.last_accuracy` (0.5 means aligned).
    """
    _check_feature_pair(source_features, target_features)
    logits = discriminator(torch.cat([source_features, target_features]), weight)
    labels = torch.cat([logits.new_ones(source_features.shape[0]),
                        logits.new_zeros(target_features.shape[0])])
    discriminator.last_accuracy = ((logits.detach() > 0).float() == labels).float().mean()
    return F.binary_cross_entropy_with_logits(logits, labels)


def mmd_loss(source: Tensor, target: Tensor, kernel_mul: float = 2.0, kernel_num: int = 5,
             bandwidth: float | None = None) -> Tensor:
    """Biased multi-kernel Gaussian MMD^2 between two feature batches (DAN, Long et al., 2015).

    Gaussian kernels exp(-||a - b||^2 / bandwidth_i), averaged, with `kernel_num` bandwidths in a
    geometric family (ratio `kernel_mul`) centred on `bandwidth`, by default the mean pairwise
    squared distance of the joint batch. That centre is detached: it picks the kernel, and
    gradients through it would let the features move the kernel instead of the domains.
    Batch sizes may differ.
    """
    _check_feature_pair(source, target)
    if kernel_num < 1 or kernel_mul <= 0:
        raise AdaptationError(f"need kernel_num >= 1 and kernel_mul > 0, got {kernel_num}, {kernel_mul}")
    n_source = source.shape[0]
    joint = torch.cat([source, target]).float()  # half precision overflows in squared distances
    squared_norms = joint.pow(2).sum(1)
    distances = (squared_norms[:, None] + squared_norms[None, :] - 2.0 * joint @ joint.T).clamp_min(0)
    if bandwidth is None:
        n = joint.shape[0]
        centre = distances.detach().sum() / max(n * n - n, 1)
    else:
        if bandwidth <= 0:
            raise AdaptationError(f"bandwidth must be > 0, got {bandwidth}")
        centre = torch.tensor(float(bandwidth), device=joint.device)
    centre = centre.clamp_min(1e-8)  # identical batches would otherwise divide by zero
    base = centre / kernel_mul ** (kernel_num // 2)
    # DAN's convex combination of kernels with equal weights: averaging rather than summing keeps
    # the loss in [0, 2] whatever kernel_num is, so a recipe's loss weight means the same thing
    kernels = sum(torch.exp(-distances / (base * kernel_mul ** i)) for i in range(kernel_num)) / kernel_num
    k_ss = kernels[:n_source, :n_source].mean()
    k_tt = kernels[n_source:, n_source:].mean()
    k_st = kernels[:n_source, n_source:].mean()
    return k_ss + k_tt - 2.0 * k_st


def coral_loss(source: Tensor, target: Tensor) -> Tensor:
    """Squared Frobenius distance of the feature covariances / (4 d^2) (Deep CORAL, Sun & Saenko, 2016)."""
    _check_feature_pair(source, target, min_rows=2)  # a covariance needs two rows

    def covariance(x: Tensor) -> Tensor:
        centred = x.float() - x.float().mean(0, keepdim=True)
        return centred.T @ centred / (x.shape[0] - 1)

    d = source.shape[1]
    return (covariance(source) - covariance(target)).pow(2).sum() / (4.0 * d * d)


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of each row's softmax: (batch, classes) -> (batch,)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(1)


def certainty_weights(logits: Tensor) -> Tensor:
    """1 + exp(-H(p)): CDAN's entropy conditioning and MCC's example weights; detached, they only weigh."""
    return 1.0 + torch.exp(-entropy(logits.detach()))


class RandomizedMultilinearMap(nn.Module):
    """CDAN's randomized multilinear map (Long et al., 2018, eq. 6): (R_f f) * (R_g g) / sqrt(out).

    Fixed Gaussian matrices, drawn once from `seed`; used when the full outer product of features and
    predictions would be wider than `max_outer_width`, where its expectation is that product's inner product.
    """

    def __init__(self, feature_dim: int, num_classes: int, out_features: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("feature_matrix", torch.randn(feature_dim, out_features, generator=generator))
        self.register_buffer("class_matrix", torch.randn(num_classes, out_features, generator=generator))
        self.out_features = out_features

    def forward(self, features: Tensor, probabilities: Tensor) -> Tensor:
        return (features @ self.feature_matrix) * (probabilities @ self.class_matrix) / math.sqrt(self.out_features)


# the paper switches to the randomized map for wide features; 4,096 keeps a 256-wide bottleneck with
# up to 16 classes exact, and the discriminator's first layer under ~1M weights at a hidden width of 256
MAX_OUTER_WIDTH = 4096
RANDOMIZED_WIDTH = 1024


def multilinear_map(features: Tensor, probabilities: Tensor) -> Tensor:
    """CDAN's conditioning T(f, g) = f outer g, flattened: (batch, d) x (batch, C) -> (batch, d * C).

    Entry [b, i * C + j] is f[b, i] * g[b, j], so the discriminator sees which class each feature co-occurs with.
    """
    if features.dim() != 2 or probabilities.dim() != 2 or len(features) != len(probabilities):
        raise AdaptationError(f"CDAN needs (batch, d) features and (batch, classes) predictions of one batch, got "
                              f"{tuple(features.shape)} and {tuple(probabilities.shape)}")
    return torch.bmm(features.unsqueeze(2), probabilities.unsqueeze(1)).flatten(1)


def cdan_input_width(feature_dim: int, num_classes: int) -> int:
    """Width of the CDAN discriminator's input: the outer product, or the randomized map where that is too wide."""
    outer = feature_dim * num_classes
    return outer if outer <= MAX_OUTER_WIDTH else RANDOMIZED_WIDTH


class ConditionalDiscriminator(DomainDiscriminator):
    """CDAN's discriminator: a DANN discriminator on the multilinear map of features and predictions."""

    def __init__(self, feature_dim: int, num_classes: int, hidden: int = 256, dropout: float = 0.5) -> None:
        width = cdan_input_width(feature_dim, num_classes)
        super().__init__(width, hidden, dropout)
        self.randomized = (RandomizedMultilinearMap(feature_dim, num_classes, width)
                           if width != feature_dim * num_classes else None)

    def condition(self, features: Tensor, logits: Tensor) -> Tensor:
        # the predictions condition but do not learn from the discriminator: detached, as in the
        # paper's released code, so the reversed gradient reaches the classifier only through f
        probabilities = F.softmax(logits.detach().float(), dim=1).to(features.dtype)
        if self.randomized is not None:
            return self.randomized(features, probabilities)
        return multilinear_map(features, probabilities)


def conditional_adversarial_loss(discriminator: ConditionalDiscriminator, source_features: Tensor,
                                 target_features: Tensor, source_logits: Tensor, target_logits: Tensor,
                                 weight: float = 1.0, entropy_conditioning: bool = True) -> Tensor:
    """CDAN+E (Long et al., NeurIPS 2018): the DANN loss on T(f, g), each example weighted by 1 + exp(-H(g)).

    The weights are normalised within each domain, so source and target carry half the loss each and
    confident (low-entropy) examples, whose predictions are more likely right, count for more.
    """
    _check_feature_pair(source_features, target_features)
    conditioned = torch.cat([discriminator.condition(source_features, source_logits),
                             discriminator.condition(target_features, target_logits)])
    logits = discriminator(conditioned, weight)
    n_source = source_features.shape[0]
    labels = torch.cat([logits.new_ones(n_source), logits.new_zeros(target_features.shape[0])])
    discriminator.last_accuracy = ((logits.detach() > 0).float() == labels).float().mean()
    per_example = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    if not entropy_conditioning:
        return per_example.mean()
    source_weights, target_weights = certainty_weights(source_logits), certainty_weights(target_logits)
    weights = torch.cat([source_weights / source_weights.sum(), target_weights / target_weights.sum()]) / 2
    return (weights * per_example).sum()


def minimum_class_confusion_loss(target_logits: Tensor, temperature: float = 2.5) -> Tensor:
    """MCC (Jin et al., ECCV 2020): the between-class confusion of the target predictions.

    Softened predictions Y = softmax(Z / T); example weights W = B (1 + exp(-H)) / sum(1 + exp(-H));
    class correlation C = Y^T W Y; each column divided by its sum (category normalisation); the loss
    is the sum of the off-diagonal entries divided by the number of classes. It is 0 when every
    example is confidently one class and grows as classes are predicted together.
    """
    if target_logits.dim() != 2 or target_logits.shape[0] < 1:
        raise AdaptationError(f"MCC needs (batch, classes) target logits, got shape {tuple(target_logits.shape)}")
    if temperature <= 0:
        raise AdaptationError(f"MCC's temperature must be > 0, got {temperature}")
    batch, classes = target_logits.shape
    probabilities = F.softmax(target_logits.float() / temperature, dim=1)
    example_weights = certainty_weights(target_logits.float() / temperature)
    example_weights = batch * example_weights / example_weights.sum()
    correlation = probabilities.T @ (example_weights[:, None] * probabilities)
    correlation = correlation / correlation.sum(0, keepdim=True).clamp_min(1e-12)
    return (correlation.sum() - correlation.trace()) / classes


@dataclass(frozen=True)
class DomainBatch:
    """What one training step gives a domain loss: both domains' aligned features and their logits."""

    source_features: Tensor
    target_features: Tensor
    source_logits: Tensor | None = None
    target_logits: Tensor | None = None


@dataclass(frozen=True)
class DomainMethod:
    """A domain objective: its loss on a `DomainBatch`, its default weight, whether the weight ramps
    up as DANN's does, and the discriminator it trains (None: it needs none)."""

    loss: Callable[..., Tensor]  # (batch, weight, discriminator, **options) -> the loss to add
    default_weight: float
    ramped: bool = False
    discriminator: Callable[[int, int, int, float], DomainDiscriminator] | None = None  # (width, classes, hidden, dropout)
    needs_logits: bool = False


def _needs(discriminator: DomainDiscriminator | None, method: str) -> DomainDiscriminator:
    if discriminator is None:
        raise AdaptationError(f"method {method!r} needs a domain discriminator: pass discriminator=")
    return discriminator


def _needs_logits(batch: DomainBatch, method: str) -> tuple[Tensor, Tensor]:
    if batch.source_logits is None or batch.target_logits is None:
        raise AdaptationError(f"method {method!r} needs both domains' logits: pass source_logits= and target_logits=")
    return batch.source_logits, batch.target_logits


def _needs_target_logits(batch: DomainBatch, method: str) -> Tensor:
    if batch.target_logits is None:
        raise AdaptationError(f"method {method!r} needs the target's logits: pass target_logits=")
    return batch.target_logits


# Default weights: dann 0.1 was chosen once on the two PACS pairs (benchmarks/BENCHMARKS.md) and kept
# for every pair; cdan shares DANN's discriminator, ramp and weight; mmd and coral 1; mcc 1 (its paper's).
DOMAIN_METHODS: dict[str, DomainMethod] = {
    "dann": DomainMethod(
        lambda b, w, d, **_: domain_adversarial_loss(_needs(d, "dann"), b.source_features, b.target_features, w),
        default_weight=0.1, ramped=True,
        discriminator=lambda width, _classes, hidden, dropout: DomainDiscriminator(width, hidden, dropout),
    ),
    "cdan": DomainMethod(
        lambda b, w, d, **_: conditional_adversarial_loss(_needs(d, "cdan"), b.source_features, b.target_features,
                                                     *_needs_logits(b, "cdan"), w),
        default_weight=0.1, ramped=True, needs_logits=True,
        discriminator=lambda width, classes, hidden, dropout: ConditionalDiscriminator(width, classes, hidden, dropout),
    ),
    "mmd": DomainMethod(lambda b, w, _d, **_: w * mmd_loss(b.source_features, b.target_features), default_weight=1.0),
    "coral": DomainMethod(lambda b, w, _d, **_: w * coral_loss(b.source_features, b.target_features), default_weight=1.0),
    "mcc": DomainMethod(lambda b, w, _d, temperature=2.5, **_: w * minimum_class_confusion_loss(
                            _needs_target_logits(b, "mcc"), temperature),
                        default_weight=1.0, needs_logits=True),
}


def domain_method(method: str) -> DomainMethod:
    if method not in DOMAIN_METHODS:
        raise AdaptationError(f"unknown domain adaptation method {method!r}; "
                              f"choose one of {', '.join(sorted(DOMAIN_METHODS))}")
    return DOMAIN_METHODS[method]


def domain_loss(method: str, source_features: Tensor, target_features: Tensor, weight: float = 1.0,
                discriminator: DomainDiscriminator | None = None, source_logits: Tensor | None = None,
                target_logits: Tensor | None = None, **options: Any) -> Tensor:
    """The named domain loss, to add to the task loss; `weight` scales its gradient on the features.

    For the adversarial methods (dann, cdan) the discriminator itself trains at full strength and
    `weight` is the reversal coefficient; for the others the loss is multiplied by `weight`.
    `options` go to the method (mcc: temperature).
    """
    batch = DomainBatch(source_features, target_features, source_logits, target_logits)
    return domain_method(method).loss(batch, weight, discriminator, **options)
