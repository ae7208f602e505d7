"""Transfer Component Analysis (Pan, Tsang, Kwok & Yang, 2011): the classical baseline on frozen features."""

from __future__ import annotations

import numpy as np
import scipy.linalg

from hf_transfer.adaptation.losses import AdaptationError


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
