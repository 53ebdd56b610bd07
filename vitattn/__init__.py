"""vitattn: exact per-head attention heatmaps for Vision Transformers."""

__version__ = "0.1.0"
