"""Choosing a source model before training: transferability scores (scores.py), the candidates
(candidates.py) and the ranking command (rank.py)."""
