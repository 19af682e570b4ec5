"""Data layer: fundus preprocessing, quality transform, synthetic fundus, records and pipelines.

Nothing here imports model or training code.
"""
