"""Cross-domain objectives for unsupervised domain adaptation.

A training loop with labelled source batches and unlabelled target batches adds one of these
losses, computed on the two batches' features, to the source task loss:

- "dann":  a domain discriminator behind gradient reversal (Ganin & Lempitsky, 2015);
- "mmd":   multi-kernel Gaussian maximum mean discrepancy (DAN, Long et al., 2015);
- "coral": distance between feature covariances (Deep CORAL, Sun & Saenko, 2016).

`TransferComponentAnalysis` (Pan et al., 2011) is the classical baseline on frozen features.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg
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


def domain_loss(method: str, source_features: Tensor, target_features: Tensor,
                weight: float = 1.0, discriminator: DomainDiscriminator | None = None,
                **options: Any) -> Tensor:
    """The named domain loss, to add to the task loss; `weight` scales its gradient on the features.

    For "dann" the discriminator itself trains at full strength and `weight` is the reversal
    coefficient; for "mmd" and "coral" the loss is multiplied by `weight`. `options` go to the loss.
    """
    loss_fn = _lookup(method)
    if method == "dann":
        if discriminator is None:
            raise AdaptationError("method 'dann' needs a DomainDiscriminator: pass discriminator=")
        return loss_fn(discriminator, source_features, target_features, weight)
    return weight * loss_fn(source_features, target_features, **options)


DOMAIN_LOSSES: dict[str, Callable[..., Tensor]] = {
    "dann": domain_adversarial_loss,
    "mmd": mmd_loss,
    "coral": coral_loss,
}


def _lookup(method: str) -> Callable[..., Tensor]:
    if method not in DOMAIN_LOSSES:
        raise AdaptationError(f"unknown domain adaptation method {method!r}; "
                              f"choose one of {', '.join(sorted(DOMAIN_LOSSES))}")
    return DOMAIN_LOSSES[method]


class TransferComponentAnalysis:
    """Transfer Component Analysis (Pan, Tsang, Kwok & Yang, 2011) on extracted features.

    Finds `n_components` directions in the kernel space of the pooled source + target samples
    that keep their variance while shrinking the MMD between the domains: the leading
    eigenvectors of (K L K + mu I)^-1 K H K. Memory and time grow as n^2 and n^3 in the number
    of fitted samples, so fit on a few thousand at most. With the linear kernel keep n_components
    well below the feature width: at the full width the projection is merely a change of basis.
    `mu` weighs the projection's size against the domain gap, so it is relative to the kernel's
    scale: rbf entries are at most 1 and need mu ~ 0.01 to align (at mu = 1 TCA is nearly kernel
    PCA), while a linear kernel on raw features aligns strongly at mu = 1.
    """

    def __init__(self, n_components: int = 30, kernel: str = "linear", mu: float = 1.0,
                 gamma: float | None = None) -> None:
        if kernel not in ("linear", "rbf"):
            raise AdaptationError(f"unknown TCA kernel {kernel!r}; choose 'linear' or 'rbf'")
        if n_components < 1 or mu <= 0 or (gamma is not None and gamma <= 0):
            raise AdaptationError(f"need n_components >= 1, mu > 0 and gamma > 0, got "
                                  f"{n_components}, {mu}, {gamma}")
        self.n_components, self.kernel, self.mu, self.gamma = n_components, kernel, mu, gamma

    def _kernel(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self.kernel == "linear":
            return a @ b.T
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return np.exp(-self.gamma_ * np.maximum(sq, 0.0))

    def fit(self, source: np.ndarray, target: np.ndarray) -> TransferComponentAnalysis:
        """Learn the transfer components from unlabelled source and target samples (n, d)."""
        source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
        if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
            raise AdaptationError(f"TCA needs two (n, d) arrays of equal d, got "
                                  f"{source.shape} and {target.shape}")
        n_source, n_target = len(source), len(target)
        n = n_source + n_target
        if n_source < 1 or n_target < 1 or self.n_components > n:
            raise AdaptationError(f"n_components ({self.n_components}) must not exceed the "
                                  f"number of samples ({n}), and both domains need samples")
        self.samples_ = np.vstack([source, target])
        # sklearn's "scale" default: 1 / (d * variance) keeps exponents O(1) whatever the units
        self.gamma_ = self.gamma or 1.0 / (self.samples_.shape[1] * self.samples_.var() or 1.0)
        k = self._kernel(self.samples_, self.samples_)
        # L encodes the MMD of the domain means in kernel space: tr(K L) = MMD^2
        e = np.concatenate([np.full(n_source, 1.0 / n_source), np.full(n_target, -1.0 / n_target)])
        centring = np.eye(n) - 1.0 / n
        spread = k @ centring @ k
        mismatch = k @ np.outer(e, e) @ k + self.mu * np.eye(n)
        # symmetrise away round-off so eigh's symmetric-definite solver applies
        spread, mismatch = (spread + spread.T) / 2, (mismatch + mismatch.T) / 2
        _, vectors = scipy.linalg.eigh(spread, mismatch,
                                       subset_by_index=[n - self.n_components, n - 1])
        self.components_ = vectors[:, ::-1]  # largest eigenvalue first
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project samples (m, d) through the kernel against the fitted samples -> (m, n_components)."""
        if not hasattr(self, "components_"):
            raise AdaptationError("call fit(source, target) before transform")
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.samples_.shape[1]:
            raise AdaptationError(f"expected (m, {self.samples_.shape[1]}) samples, got {x.shape}")
        return self._kernel(x, self.samples_) @ self.components_

    def fit_transform(self, source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fit on both domains and return (source, target) projected."""
        self.fit(source, target)
        return self.transform(source), self.transform(target)
