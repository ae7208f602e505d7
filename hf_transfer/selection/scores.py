"""Transferability scores: how well a source model's frozen features suit the user's labels, before
any training. Pure numpy: features (examples x dimensions) and integer labels in, one number out;
higher is better for every score.

- `logme`: LogME (You et al., ICML 2021, "LogME: Practical Assessment of Pre-trained Models for
  Transfer Learning"), the log marginal evidence of a Bayesian linear model, written here from the
  paper's equations;
- `hscore`: H-score (Bao et al., ICIP 2019, "An Information-theoretic Approach to Transferability in
  Task Transfer Learning"), with a shrunk feature covariance;
- `knn_accuracy`: accuracy of a cosine k-nearest-neighbour vote of training features on held-out ones.
"""

from __future__ import annotations

import numpy as np

MAX_ITERATIONS = 100
TOLERANCE = 1e-5  # relative change of alpha / beta at which the fixed-point iteration stops
# five neighbours: the data sets this serves are small (tens of examples in the smallest classes), so
# a neighbourhood must stay well inside one class, yet more than one neighbour votes away a single
# mislabelled or atypical example (DINO's k=20 assumes ImageNet's thousand examples per class)
KNN_NEIGHBOURS = 5
_TINY = 1e-300  # floors a zero fit residual or weight norm, where the iteration would divide by zero


def _as_float64(features: np.ndarray) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or not len(array):
        raise ValueError(f"features must be a non-empty (examples x dimensions) array; got shape {array.shape}")
    return array


def _one_hot(labels: np.ndarray) -> np.ndarray:
    """One column per class present in `labels` (a class with no example carries no evidence)."""
    _, index = np.unique(np.asarray(labels), return_inverse=True)
    return np.eye(index.max() + 1)[index]


def _spectrum(features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s, z): the nonzero eigenvalues s_i of F^T F (the squared singular values of F) and the
    targets' coordinates z = U^T y on the matching left singular vectors of F (one column per target).

    Through the smaller Gram matrix, F^T F (d x d) or F F^T (n x n): the same nonzero spectrum,
    and never an n x n matrix when there are more examples than dimensions.
    """
    n, d = features.shape
    gram = features.T @ features if n >= d else features @ features.T
    s, vectors = np.linalg.eigh(gram)
    keep = s > max(float(s.max()), 0.0) * max(n, d) * np.finfo(np.float64).eps  # numerically zero: no direction
    s, vectors = s[keep], vectors[:, keep]
    if n >= d:  # u_i = F v_i / sigma_i
        z = (vectors.T @ (features.T @ targets)) / np.sqrt(s)[:, None]
    else:
        z = vectors.T @ targets
    return s, z


def _evidence_terms(s: np.ndarray, z: np.ndarray, y_norm2: float, alpha: float, beta: float):
    """For the model w ~ N(0, alpha^-1 I), y ~ N(F w, beta^-1 I), in the eigenbasis of F^T F:
    gamma (the effective number of parameters), |m|^2 and |F m - y|^2 for the posterior mean
    m = beta A^-1 F^T y, and log|A| without the (d - r) log(alpha) of the directions F does not span."""
    denominator = alpha + beta * s  # the eigenvalues of A = alpha I + beta F^T F
    gamma = float(np.sum(beta * s / denominator))
    weight_norm2 = float(np.sum(beta**2 * s * z**2 / denominator**2))
    # y's part along the singular vectors, shrunk by alpha / (alpha + beta s_i), plus its part outside them
    residual2 = float(np.sum((alpha / denominator) ** 2 * z**2) + max(y_norm2 - float(np.sum(z**2)), 0.0))
    return gamma, weight_norm2, residual2, float(np.sum(np.log(denominator)))


def _log_evidence(s: np.ndarray, z: np.ndarray, y_norm2: float, n: int, d: int, alpha: float, beta: float) -> float:
    _, weight_norm2, residual2, log_det_spanned = _evidence_terms(s, z, y_norm2, alpha, beta)
    log_det = log_det_spanned + (d - len(s)) * np.log(alpha)
    return float(
        n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
        - beta / 2 * residual2 - alpha / 2 * weight_norm2 - log_det / 2
    )


def log_evidence(features: np.ndarray, target: np.ndarray, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) of one target column y: the quantity LogME maximises over alpha, beta.

    The paper's closed form: n/2 log beta + d/2 log alpha - n/2 log 2pi - beta/2 |F m - y|^2
    - alpha/2 |m|^2 - 1/2 log|A|, with A = alpha I + beta F^T F and m = beta A^-1 F^T y.
    """
    features = _as_float64(features)
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    s, z = _spectrum(features, target[:, None])
    return _log_evidence(s, z[:, 0], float(target @ target), *features.shape, alpha, beta)


def _maximised_evidence(s: np.ndarray, z: np.ndarray, y_norm2: float, n: int, d: int) -> float:
    """The evidence at the alpha, beta the paper's fixed-point iteration reaches:
    alpha <- gamma / |m|^2, beta <- (n - gamma) / |F m - y|^2, from alpha = beta = 1."""
    alpha, beta = 1.0, 1.0
    for _ in range(MAX_ITERATIONS):
        gamma, weight_norm2, residual2, _ = _evidence_terms(s, z, y_norm2, alpha, beta)
        new_alpha = gamma / max(weight_norm2, _TINY)
        new_beta = max(n - gamma, _TINY) / max(residual2, _TINY)
        ratio, new_ratio = alpha / beta, new_alpha / new_beta
        alpha, beta = new_alpha, new_beta
        if abs(new_ratio - ratio) <= TOLERANCE * ratio:
            break
    return _log_evidence(s, z, y_norm2, n, d, alpha, beta)


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME: the maximised log evidence of a Bayesian linear regression from the features to each
    class's one-hot column, averaged over the classes and divided by the number of examples.

    The features are used as they come (the paper neither centres nor scales them); one
    eigendecomposition serves every class.
    """
    features = _as_float64(features)
    targets = _one_hot(labels)
    n, d = features.shape
    s, z = _spectrum(features, targets)
    if not len(s):  # features that are all zero explain nothing
        return float("-inf")
    evidences = [
        _maximised_evidence(s, z[:, k], float(targets[:, k] @ targets[:, k]), n, d) for k in range(targets.shape[1])
    ]
    return float(np.mean(evidences) / n)


def ledoit_wolf_covariance(features: np.ndarray) -> np.ndarray:
    """The feature covariance shrunk towards a multiple of the identity by the Ledoit-Wolf (2004)
    weight: well conditioned even with more dimensions than examples, and equal to the sample
    covariance when the sample is large enough not to need shrinking."""
    centred = features - features.mean(0)
    n, d = centred.shape
    sample = centred.T @ centred / n
    mu = float(np.trace(sample)) / d
    # squared Frobenius norms divided by d, as in the paper
    dispersion = float(np.sum((sample - mu * np.eye(d)) ** 2)) / d
    row_norms2 = np.sum(centred**2, axis=1)
    noise = float(np.sum(row_norms2**2) - n * np.sum(sample**2)) / (n * n * d)
    shrinkage = min(max(noise, 0.0), dispersion) / dispersion if dispersion > 0 else 1.0
    return (1 - shrinkage) * sample + shrinkage * mu * np.eye(d)


def hscore(features: np.ndarray, labels: np.ndarray) -> float:
    """H-score: tr(cov(f)^-1 cov(E[f|y])), how much of the features' variance lies between the
    classes' means, measured in the features' own metric.

    cov(f) is the Ledoit-Wolf shrunk covariance (not the sample covariance's pseudo-inverse): with
    hundreds of examples in hundreds of dimensions the sample covariance has tiny eigenvalues whose
    inverses would dominate the trace with noise (Ibrahim et al. 2022 found the unshrunk H-score
    ranks models unreliably for this reason). Both covariances are centred, so adding a constant
    to the features changes nothing.
    """
    features = _as_float64(features)
    covariance = ledoit_wolf_covariance(features)
    centred = features - features.mean(0)
    _, index, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    class_means = np.zeros((len(counts), features.shape[1]))
    np.add.at(class_means, index, centred)
    class_means /= counts[:, None]
    between = (class_means.T * (counts / len(features))) @ class_means  # cov(E[f|y]), weighted by class size
    return float(np.trace(np.linalg.solve(covariance, between)))


def knn_accuracy(train_features: np.ndarray, train_labels: np.ndarray, features: np.ndarray, labels: np.ndarray,
                 k: int = KNN_NEIGHBOURS) -> float:
    """Accuracy on (features, labels) of a vote among the k training examples of highest cosine
    similarity; a tie between classes goes to the one whose voters are more similar in sum."""
    def unit(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float32)
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)

    train, queries = unit(train_features), unit(features)
    train_labels, labels = np.asarray(train_labels), np.asarray(labels)
    k = min(k, len(train))
    classes = int(max(train_labels.max(), labels.max())) + 1
    correct = 0
    for start in range(0, len(queries), 256):  # bounded memory: 256 rows of similarities at a time
        similarity = queries[start:start + 256] @ train.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        rows = np.arange(len(nearest))[:, None]
        votes, closeness = np.zeros((len(nearest), classes)), np.zeros((len(nearest), classes))
        np.add.at(votes, (rows, train_labels[nearest]), 1.0)
        np.add.at(closeness, (rows, train_labels[nearest]), similarity[rows, nearest])
        # one more vote always wins: the summed similarities differ by at most 2k, a vote counts 2k + 1
        predicted = np.argmax(votes * (2 * k + 1) + closeness, axis=1)
        correct += int(np.sum(predicted == labels[start:start + 256]))
    return correct / len(queries)
