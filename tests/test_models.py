"""`vitattn models` lists what vitattn can load, and refuses what it cannot, checked on the meta device."""

from __future__ import annotations

import random

import pytest
import timm
import torch

from vitattn.coverage import REFUSED, SUPPORTED_MODULES
from vitattn.errors import UnsupportedModelError
from vitattn.models import supported_models, token_layout


def build_on_meta(name: str) -> torch.nn.Module:
    with torch.device("meta"):  # no memory, no weights: only the structure
        return timm.create_model(name, pretrained=False)


def test_a_sample_of_listed_models_has_a_readable_layout() -> None:
    names = supported_models()
    assert "deit_small_distilled_patch16_224" in names and "vit_small_patch14_reg4_dinov2" in names
    assert "eva02_tiny_patch14_224" in names and "beit_base_patch16_224" in names
    for name in random.Random(0).sample(names, 10):
        model = build_on_meta(name)
        assert token_layout(model, name).num_prefix_tokens == int(model.num_prefix_tokens)


def test_excluded_models_are_the_unsupported_ones() -> None:
    listed = set(supported_models())
    excluded = sorted(n for module in SUPPORTED_MODULES for n in timm.list_models(module=module) if n not in listed)
    assert excluded, "the exclusion patterns match nothing any more"
    for name in excluded:
        with pytest.raises(UnsupportedModelError, match="not supported"):
            token_layout(build_on_meta(name), name)
    assert all(any(p.strip("*") in n for n in excluded) for p, _ in REFUSED)


def test_pattern_filters() -> None:
    names = supported_models("*dinov2*")
    assert names and all("dinov2" in n for n in names)
    assert supported_models("convnext*") == []
