"""The frozen-feature cache: one feature store (store.py) and the head-only plan it serves (head.py)."""
