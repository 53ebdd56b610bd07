"""Every timm architecture, built on the meta device: supported (its adapter captures block 0 with shapes that
fit the adapter's layout) or refused with a reason; the static table of :mod:`vitattn.coverage` agrees.

Weight initialisers are skipped while building (they only fill tensors, and on the meta device they are most
of the build time); the structure, which is all the adapters read, is timm's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import timm
import torch

from vitattn.adapters import has_attention_layers, support
from vitattn.capture import AttentionCapture
from vitattn.coverage import NO_TOKEN_ATTENTION, REFUSED, census, coverage, status

_FILLS = ("uniform_", "normal_", "erfinv_", "clamp_", "fill_", "zero_", "copy_", "mul_", "add_", "exponential_")


@contextlib.contextmanager
def no_initialisers() -> Iterator[None]:
    saved = {name: getattr(torch.Tensor, name) for name in _FILLS}

    def keep(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    for name in _FILLS:
        setattr(torch.Tensor, name, keep)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def meta_model(name: str) -> torch.nn.Module:
    with no_initialisers(), torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def capture_block_0(name: str, model: torch.nn.Module) -> str | None:
    """Capture the first site on meta; a problem as one line, else None."""
    adapter, _ = support(model)
    assert adapter is not None
    family = adapter.family(model)
    site = family.sites[0]
    cfg = timm.data.resolve_model_data_config(model)
    _, h, w = cfg["input_size"]
    gh, gw = family.layout.grid_for((int(h), int(w)))
    x = torch.empty(1, 3, int(h), int(w), device="meta")
    with torch.inference_mode(), AttentionCapture(model.eval(), [0], stop_early=True, family=family) as cap:
        _, captured = cap.run(x)
    attn = captured[0]  # (1, H, Q, N)
    n = site.layout.num_prefix_tokens + gh * gw
    q = n if site.layout.queries is None else len(site.layout.queries)
    if tuple(attn.shape) != (1, site.heads, q, n):
        return f"{name}: block 0 gave {tuple(attn.shape)}, the layout says {(1, site.heads, q, n)}"
    return None


@pytest.mark.slow
def test_every_architecture_is_supported_or_refused_with_a_reason(capsys: pytest.CaptureFixture[str]) -> None:
    problems: list[str] = []
    rows = census()
    assert len(rows) == len(timm.list_models())
    for row in rows:
        model = meta_model(row.name)
        adapter, why = support(model)
        if (adapter is not None) != row.supported:
            problems.append(f"{row.name}: the table says supported={row.supported}, the adapters say {why or 'yes'}")
            continue
        attention = has_attention_layers(model) and row.module not in NO_TOKEN_ATTENTION
        if attention != row.attention:
            problems.append(f"{row.name} ({row.module}): attention layers {attention}, the table says {row.attention}")
        if adapter is not None:
            problem = capture_block_0(row.name, model)
            if problem:
                problems.append(problem)
        else:
            assert row.reason and why and "\n" not in row.reason  # refused with one line
    assert not problems, "\n".join(problems[:30])
    c = coverage(rows)
    with capsys.disabled():
        print(
            f"\ncoverage: {c.supported_tags}/{c.attention_tags} attention-bearing pretrained tags "
            f"({100 * c.fraction:.1f}%), {c.supported_archs}/{c.attention_archs} architectures"
        )
    assert c.attention_tags > 900  # timm 1.0.31: about 930 tags of attention-bearing architectures


def test_refusal_patterns_each_match_some_architecture() -> None:
    names = timm.list_models()
    for pattern, _ in REFUSED:
        assert any(status(n).reason for n in timm.list_models(pattern)), pattern
    assert not status("vit_base_patch16_224").reason and status("swin_tiny_patch4_window7_224").attention
    assert status("resnet50").reason == "no softmax attention over image tokens" and names
