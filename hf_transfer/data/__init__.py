"""Data loading and preprocessing for each modality."""
