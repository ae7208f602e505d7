"""head.solver logistic: the cached linear head fitted to convergence, the same model scikit-learn fits."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from hf_transfer.cache.solver import fit_logistic_head


def _blobs(seed: int, n: int, classes: int, dim: int = 12, scale: float = 50.0, noise_seed: int | None = None):
    """Gaussian classes on features of a large, uneven scale (as backbone features are); `seed` fixes the
    classes and the scales, `noise_seed` draws fresh examples of them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 0.6
    scales = scale * rng.uniform(0.1, 3, size=dim)
    rng = np.random.default_rng(noise_seed) if noise_seed is not None else rng
    labels = np.arange(n) % classes
    features = (centres[labels] + rng.normal(size=(n, dim))) * scales
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


def test_the_fitted_head_is_scikit_learns_logistic_regression_on_raw_features():
    x, y = _blobs(0, 150, classes=3)
    head = nn.Linear(12, 3)
    fit = fit_logistic_head(head, [x], y, weights=None, seed=0)
    assert fit.folds == 5 and fit.C > 0
    # the same regularised problem, solved by scikit-learn on standardised features: same probabilities
    z = (x.double() - x.double().mean(0)) / x.double().var(0, unbiased=False).mean().sqrt()
    reference = LogisticRegression(C=fit.C, max_iter=5000).fit(z.numpy(), y.numpy())
    expected = reference.predict_proba(z.numpy())
    with torch.no_grad():
        ours = head(x).softmax(-1).double().numpy()
    assert (ours.argmax(-1) == expected.argmax(-1)).all()
    assert np.allclose(ours, expected, atol=0.02)  # both solvers stop at a tolerance, not at the exact optimum


def test_it_reaches_the_default_probe_on_held_out_data_in_binary_and_multiclass():
    for classes in (2, 5):
        x, y = _blobs(1, 200, classes)
        x_test, y_test = _blobs(1, 2000, classes, noise_seed=7)
        head = nn.Linear(12, classes)
        fit_logistic_head(head, [x], y, weights=None, seed=0)
        with torch.no_grad():
            ours = float((head(x_test).argmax(-1) == y_test).float().mean())
        probe = LogisticRegression(max_iter=5000).fit(x.numpy(), y.numpy()).score(x_test.numpy(), y_test.numpy())
        assert ours >= probe - 0.02, (classes, ours, probe)  # two standard errors of 2,000 test examples


def test_views_stay_in_one_fold_and_a_class_missing_from_training_is_never_predicted():
    x, y = _blobs(2, 60, classes=2)
    views = [x, x + torch.randn_like(x)]
    head = nn.Linear(12, 3)  # a third class the training data never shows
    fit = fit_logistic_head(head, views, y, weights=None, seed=0)
    assert fit.folds == 5
    with torch.no_grad():
        predictions = head(torch.cat(views)).argmax(-1)
    assert set(predictions.tolist()) <= {0, 1}
    assert float((predictions == torch.cat([y, y])).float().mean()) > 0.75  # chance is 0.5
