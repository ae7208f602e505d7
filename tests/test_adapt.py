"""Tests of the cross-domain objectives in hf_transfer.adapt, each on a synthetic domain shift."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn

from hf_transfer.adaptation.losses import (
    DOMAIN_METHODS,
    MAX_OUTER_WIDTH,
    RANDOMIZED_WIDTH,
    ConditionalDiscriminator,
    DomainDiscriminator,
    coral_loss,
    dann_weight,
    domain_adversarial_loss,
    domain_loss,
    certainty_weights,
    conditional_adversarial_loss,
    grad_reverse,
    minimum_class_confusion_loss,
    mmd_loss,
    multilinear_map,
)
from hf_transfer.adaptation.tca import TransferComponentAnalysis
from hf_transfer.errors import HfTransferError


def test_grad_reverse_flips_and_scales_the_gradient_exactly():
    torch.manual_seed(0)
    x = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)
    reversed_x = grad_reverse(x, 0.37)
    assert torch.equal(reversed_x, x)
    (reversed_x * upstream).sum().backward()
    identity_grad = torch.autograd.grad((x * upstream).sum(), x)[0]
    assert torch.allclose(x.grad, -0.37 * identity_grad, rtol=0, atol=1e-7)
    with pytest.raises(ValueError):
        grad_reverse(x, -1.0)


def test_dann_weight_ramps_from_zero_towards_max_weight():
    weights = [dann_weight(p, max_weight=0.5) for p in np.linspace(0, 1, 11)]
    assert weights[0] == 0.0
    assert all(later > earlier for earlier, later in zip(weights, weights[1:]))
    assert 0.499 < weights[-1] <= 0.5
    with pytest.raises(ValueError):
        dann_weight(1.5)


def test_mmd_is_near_zero_for_one_distribution_and_grows_with_a_mean_shift():
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(300, 4, generator=generator)
    shifts = [0.0, 0.5, 1.0, 2.0]
    # unequal batch sizes on purpose: a training loop's last batches rarely match
    values = [mmd_loss(source, torch.randn(250, 4, generator=generator) + torch.tensor([s, 0, 0, 0])).item()
              for s in shifts]
    assert 0 <= values[0] < 0.01
    assert all(later > earlier for earlier, later in zip(values, values[1:]))
    assert values[-1] > 0.1


def test_coral_is_zero_for_equal_covariances_and_positive_otherwise():
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(200, 5, generator=generator)
    assert torch.allclose(coral_loss(source, source + 3.0), torch.tensor(0.0), atol=1e-6)
    stretched = source * torch.tensor([1.0, 3.0, 1.0, 1.0, 0.2])
    assert coral_loss(source, stretched).item() > 0.01


def test_domain_loss_dispatches_by_name_and_rejects_unknown_names():
    generator = torch.Generator().manual_seed(0)
    source, target = torch.randn(16, 8, generator=generator), torch.randn(12, 8, generator=generator) + 1
    assert set(DOMAIN_METHODS) == {"dann", "cdan", "mmd", "coral", "mcc"}
    assert torch.allclose(domain_loss("coral", source, target, weight=2.0), 2.0 * coral_loss(source, target))
    discriminator = DomainDiscriminator(8, hidden=16)
    assert domain_loss("dann", source, target, discriminator=discriminator).item() > 0
    assert 0.0 <= float(discriminator.last_accuracy) <= 1.0
    with pytest.raises(HfTransferError, match="cdan, coral, dann, mcc, mmd"):
        domain_loss("wasserstein", source, target)
    with pytest.raises(ValueError, match="discriminator"):
        domain_loss("dann", source, target)


def _spurious_shift(seed: int, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Two classes; x0 is informative in both domains, x1 more so in source, but the target moves
    it by `shift` so a classifier that leans on x1 puts every target sample in one class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    signs = 2.0 * labels - 1.0
    features = np.stack([signs + rng.normal(0, 0.7, n),
                         1.5 * signs + rng.normal(0, 0.5, n) + shift,
                         rng.normal(0, 1.0, n)], axis=1)
    return features, labels


def test_tca_recovers_the_shared_subspace_under_a_nuisance_shift():
    source, source_labels = _spurious_shift(0, 200, shift=0.0)
    target, target_labels = _spurious_shift(1, 200, shift=4.0)
    raw = LogisticRegression().fit(source, source_labels).score(target, target_labels)
    tca = TransferComponentAnalysis(n_components=2, kernel="linear", mu=1.0)
    source_z, target_z = tca.fit_transform(source, target)
    adapted = LogisticRegression().fit(source_z, source_labels).score(target_z, target_labels)
    assert raw < 0.65
    assert adapted > 0.8 and adapted > raw + 0.2
    assert np.allclose(tca.transform(target[:5]), target_z[:5])


def _train(source, source_labels, target, adversarial: bool | str, seed: int = 0, steps: int = 300) -> nn.Module:
    """Source-only (False), DANN (True) or CDAN ("cdan") on a small tanh network."""
    torch.manual_seed(seed)
    # tanh, not ReLU: dead ReLUs on the shifted target leave the reversed gradient nothing to move
    features = nn.Sequential(nn.Linear(source.shape[1], 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())
    classifier = nn.Linear(16, 2)
    discriminator = ConditionalDiscriminator(16, 2, hidden=32) if adversarial == "cdan" else DomainDiscriminator(16, hidden=32)
    parameters = [*features.parameters(), *classifier.parameters(), *discriminator.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        source_rows = torch.randint(0, len(source), (128,), generator=generator)
        target_rows = torch.randint(0, len(target), (128,), generator=generator)
        source_features = features(source[source_rows])
        loss = F.cross_entropy(classifier(source_features), source_labels[source_rows])
        if adversarial == "cdan":
            target_features = features(target[target_rows])
            loss = loss + domain_loss("cdan", source_features, target_features, dann_weight(step / steps), discriminator,
                                      classifier(source_features), classifier(target_features))
        elif adversarial:
            weight = dann_weight(step / steps)
            loss = loss + domain_adversarial_loss(discriminator, source_features,
                                                  features(target[target_rows]), weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return nn.Sequential(features, classifier).eval()


def test_dann_beats_source_only_on_a_shifted_target():
    # Checked with data/training seeds 0-59: DANN 0.75-0.89 on target, source-only 0.47-0.65,
    # DANN ahead by at least 0.20 every time; TCA's test likewise held on 60 seeds (gap >= 0.27).
    source, source_labels = _spurious_shift(0, 1000, shift=0.0)
    target, target_labels = _spurious_shift(1, 1000, shift=3.0)
    pooled = np.concatenate([source, target])  # standardise on both domains, as a loop would
    mean, std = pooled.mean(0), pooled.std(0)
    source, target = (torch.tensor((x - mean) / std, dtype=torch.float32) for x in (source, target))
    source_labels, target_labels = torch.tensor(source_labels), torch.tensor(target_labels)

    def target_accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return (model(target).argmax(1) == target_labels).float().mean().item()

    # tiny matrices: extra threads only add synchronisation (seconds instead of tens of seconds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        source_only = target_accuracy(_train(source, source_labels, target, adversarial=False))
        dann = target_accuracy(_train(source, source_labels, target, adversarial=True))
        cdan = target_accuracy(_train(source, source_labels, target, adversarial="cdan"))
    finally:
        torch.set_num_threads(threads)
    assert source_only < 0.7
    assert dann > 0.7 and dann > source_only + 0.15
    # CDAN, on data seeds 0-4: 0.69-0.83 against source-only 0.50-0.60, ahead by at least 0.18
    assert cdan > 0.7 and cdan > source_only + 0.15


def test_mcc_is_lower_for_confident_diagonal_predictions_than_for_confused_ones():
    labels = torch.arange(4).repeat(8)  # every class, equally often
    confident = 30.0 * F.one_hot(labels, 4).float()  # each example sure of its own class (also at T = 2.5)
    confused = confident.clone()
    confused[:, 0] = confused[:, 1] = 15.0  # ... or torn between classes 0 and 1
    uniform = torch.zeros(32, 4)
    assert minimum_class_confusion_loss(confident).item() < 0.01
    assert minimum_class_confusion_loss(confident) < minimum_class_confusion_loss(confused) < minimum_class_confusion_loss(uniform)
    # uniform predictions: every normalised column is 1/C everywhere, so (C - 1) / C of it is off the diagonal
    assert minimum_class_confusion_loss(uniform).item() == pytest.approx(3 / 4, abs=1e-6)
    with pytest.raises(HfTransferError, match="temperature"):
        minimum_class_confusion_loss(confident, temperature=0.0)


def test_cdan_conditions_on_the_outer_product_of_features_and_predictions():
    generator = torch.Generator().manual_seed(0)
    features, probabilities = torch.randn(5, 3, generator=generator), torch.rand(5, 4, generator=generator)
    mapped = multilinear_map(features, probabilities)
    assert mapped.shape == (5, 3 * 4)  # T(f, g) = f (x) g, flattened: d x C per example
    assert torch.allclose(mapped.view(5, 3, 4), features[:, :, None] * probabilities[:, None, :])
    discriminator = ConditionalDiscriminator(3, 4, hidden=8)
    assert discriminator.net[0].in_features == 12
    logits = torch.randn(5, 4, generator=generator)
    assert torch.allclose(discriminator.condition(features, logits), multilinear_map(features, logits.softmax(1)))
    # too wide for the full product: the paper's randomized multilinear map, of a fixed width
    wide = ConditionalDiscriminator(MAX_OUTER_WIDTH, 2, hidden=8)
    assert wide.net[0].in_features == RANDOMIZED_WIDTH
    assert wide.condition(torch.randn(5, MAX_OUTER_WIDTH), torch.randn(5, 2)).shape == (5, RANDOMIZED_WIDTH)


def test_cdan_entropy_conditioning_weighs_confident_examples_more():
    sure, unsure = torch.tensor([[8.0, -8.0]]), torch.tensor([[0.0, 0.0]])
    assert certainty_weights(sure).item() == pytest.approx(2.0, abs=1e-3)  # 1 + exp(-0)
    assert certainty_weights(unsure).item() == pytest.approx(1.5, abs=1e-6)  # 1 + exp(-log 2)
    generator = torch.Generator().manual_seed(0)
    source, target = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator) + 1
    source_logits, target_logits = torch.zeros(6, 3), torch.zeros(6, 3)  # equal entropies: plain mean BCE
    torch.manual_seed(0)
    discriminator = ConditionalDiscriminator(4, 3, hidden=8, dropout=0.0)
    weighted = conditional_adversarial_loss(discriminator, source, target, source_logits, target_logits)
    plain = conditional_adversarial_loss(discriminator, source, target, source_logits, target_logits,
                                         entropy_conditioning=False)
    assert torch.allclose(weighted, plain, atol=1e-6)
    with pytest.raises(ValueError, match="logits"):
        domain_loss("cdan", source, target, discriminator=discriminator)


def _blobs(seed: int, n: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two well-separated classes along x0; the target moves both by `shift`, so the source's boundary
    cuts through the target's first class while the gap between the target's classes stays empty."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    x = torch.randn(n, 2, generator=generator) * 0.6
    x[:, 0] += 4.0 * labels - 2.0 + shift
    return x, labels


def test_mcc_moves_the_boundary_into_the_targets_gap():
    # Checked with seeds 0-7: source-only 0.79-0.84 on target, MCC 0.89-0.97, ahead by at least 0.09
    source, source_labels = _blobs(0, 500, 0.0)
    target, target_labels = _blobs(100, 500, 1.8)
    accuracy = {}
    for use_mcc in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(200):
            loss = F.cross_entropy(model(source), source_labels)
            if use_mcc:
                loss = loss + domain_loss("mcc", source, target, target_logits=model(target))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy[use_mcc] = (model(target).argmax(1) == target_labels).float().mean().item()
    assert accuracy[False] < 0.87
    assert accuracy[True] > 0.88 and accuracy[True] > accuracy[False] + 0.05
