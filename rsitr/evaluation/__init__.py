"""Retrieval metrics (R@K, mR, computed in chunks), the SMR re-rank, and evaluating a model on a split."""
