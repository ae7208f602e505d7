"""Unsupervised domain adaptation: cross-domain losses, both domains' features, the adapted head,
its plan, and the saved model it loads back to."""
