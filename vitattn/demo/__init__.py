"""A small Vision Transformer that vitattn trains itself, and the synthetic pictures it learns from.

Pretrained ImageNet weights need a download; this package ships a tiny ViT (about 0.8 M parameters,
64x64 input, 8x8 patches) trained on generated pictures in which exactly one object sits on a cluttered
background. The label is the object's *shape*, so a correct prediction requires looking at the object,
and its pixel box is known: the model's attention can be checked against ground truth.

Load it offline with ``timm.create_model(f"local-dir:{DEMO_MODEL_DIR}", pretrained=True)``; generate
pictures with :func:`vitattn.demo.synthetic.make_picture`; retrain with ``python -m tools.train_demo``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

CLASS_NAMES: Final[tuple[str, ...]] = ("circle", "square", "triangle", "cross")
"""The demo model's labels (the object's shape), in class-index order."""

DEMO_MODEL_DIR: Path = Path(__file__).resolve().parent / "shapes_vit"
"""The shipped model: a timm ``local-dir:`` folder holding ``config.json`` and ``model.safetensors``."""

__all__ = ["CLASS_NAMES", "DEMO_MODEL_DIR"]
