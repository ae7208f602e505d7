"""Training: the Plan every mode produces, the loop that trains it, its callbacks, checkpoints,
CUDA graphs and metrics."""
