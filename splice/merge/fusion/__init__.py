"""Merges that are not one dense model from task vectors: EMR-Merging (a shared task vector
with per-task masks and rescalers), WEMoE (routed mixtures of task vectors in the MLP blocks)
and Transformer fusion with optimal transport (models trained from different initialisations).
One method per file; see docs/merging-fusion.md.
"""
