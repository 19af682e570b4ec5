"""Evaluation and reporting: forward passes of trained networks, read-only restores, metrics, tables,
figures, the HTML report and Grad-CAM."""
