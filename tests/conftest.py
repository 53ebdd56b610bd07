"""Shared test fixtures: tiny random-weight models built once per test run, and the families table.

Every model here is offline (``pretrained=False``), seeded, and shrunk (``depth``, ``embed_dim``) where its
token layout and grid allow, so that the suites that compare against independent references stay fast.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from vitattn.models import LoadedModel, load_model


@dataclass(frozen=True)
class Family:
    """One model per family: how to shrink it, and the layout it must report.

    Attributes:
        kwargs: ``timm.create_model`` overrides that keep the token layout and grid.
        roles: the prefix tokens, in sequence order.
        grid: the patch grid at the model's input size.
        methods: also checked by the rollout / grad-rollout reference tests.
    """

    kwargs: dict[str, Any] = field(default_factory=dict)
    roles: tuple[str, ...] = ("cls",)
    grid: tuple[int, int] = (10, 10)
    methods: bool = False


SMALL = {"depth": 3}
NARROW = {**SMALL, "embed_dim": 96, "num_heads": 3}
REG4 = ("reg0", "reg1", "reg2", "reg3")

FAMILIES: dict[str, Family] = {
    "test_vit": Family(methods=True),
    "test_vit2": Family(roles=("reg0",)),
    "test_vit_relpos": Family(roles=(), methods=True),  # no prefix tokens
    "deit_tiny_distilled_patch16_224": Family(SMALL, ("cls", "dist"), (14, 14), methods=True),
    "deit3_small_patch16_224": Family(NARROW, grid=(14, 14)),
    "flexivit_small": Family(NARROW, grid=(15, 15)),
    "vit_small_patch14_reg4_dinov2": Family({**NARROW, "num_classes": 10}, ("cls", *REG4), (37, 37), methods=True),
    "vit_base_patch16_reg4_gap_256": Family(NARROW, REG4, (16, 16), methods=True),  # registers, no class token
    "beit_base_patch16_224": Family(NARROW, grid=(14, 14)),
    "eva02_tiny_patch14_224": Family({**SMALL, "num_classes": 10}, grid=(16, 16), methods=True),  # rotary
}
"""The families the capture and methods references cover: one small model each."""

METHOD_FAMILIES = sorted(name for name, f in FAMILIES.items() if f.methods)


@functools.cache
def tiny_model(name: str, **kwargs: Any) -> LoadedModel:
    """A seeded random-weight model, built once per test run (tests must not change its weights)."""
    overrides = {**(FAMILIES[name].kwargs if name in FAMILIES else {}), **kwargs}
    torch.manual_seed(0)
    return load_model(name, pretrained=False, device="cpu", model_kwargs=overrides)


@pytest.fixture(scope="session")
def test_vit() -> LoadedModel:
    """timm's ``test_vit``: 6 blocks, 2 heads, a 10x10 grid at 160 px, an ImageNet head."""
    return tiny_model("test_vit")


def result_folder(out: Path | str, path: Path | str) -> Path:
    """Where the outputs of ``path`` go, by the documented rule (written out here, not taken from vitattn):
    ``OUT/`` + the path relative to the current folder, or, outside it, the absolute path without its ``/``."""
    absolute = os.path.abspath(path)
    cwd = os.getcwd()
    rel = os.path.relpath(absolute, cwd) if absolute.startswith(cwd.rstrip("/") + "/") else absolute.lstrip("/")
    return Path(out) / rel
