"""Dataset statistics: the math on hand-built attention (closed forms), the state's exact merge, and every
family's statistics against timm's own unfused attention with the definitions written out here."""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest
import torch
from conftest import FAMILIES, tiny_model
from reference import recorded_attention

from vitattn.errors import UsageError
from vitattn.models import TokenLayout
from vitattn.options import Query, QueryKind
from vitattn.statistics import StatsReducer, StatsState, merge_states, stat_names
from vitattn.stats_run import dataset_stats

CLS = Query(QueryKind.cls)


def patch_rc(m: int, gw: int) -> tuple[int, int]:
    return divmod(m, gw)


def build(patch_rows: np.ndarray, p: int, prefix_share: float = 0.0) -> torch.Tensor:
    """(1, 1, N, N) attention whose patch queries give ``prefix_share`` equally to the P prefix tokens and
    ``patch_rows`` (M, M, rows summing to one) scaled by the rest; prefix queries attend uniformly."""
    m = patch_rows.shape[0]
    n = p + m
    a = np.full((n, n), 1.0 / n)
    if p:
        a[p:, :p] = prefix_share / p
    a[p:, p:] = patch_rows * (1.0 - prefix_share)
    return torch.tensor(a, dtype=torch.float32)[None, None]


def distance_of(
    attn: torch.Tensor, roles: tuple[str, ...], grid: tuple[int, int], patch: tuple[int, int]
) -> tuple[float, float]:
    reducer = StatsReducer(TokenLayout(roles, patch), grid, CLS if "cls" in roles else Query(QueryKind.patch_mean))
    out = reducer(0, attn)
    return float(out["distance_patches"][0, 0]), float(out["distance_px"][0, 0])


@pytest.mark.parametrize("prefix_share", [0.0, 0.3])
def test_one_hot_self_attention_has_distance_zero(prefix_share: float) -> None:
    grid = (4, 5)
    attn = build(np.eye(20), 1, prefix_share)
    assert distance_of(attn, ("cls",), grid, (16, 16)) == (0.0, 0.0)


@pytest.mark.parametrize(("grid", "patch"), [((3, 4), (16, 16)), ((5, 2), (8, 14))])
def test_uniform_attention_gives_the_mean_pairwise_distance(grid: tuple[int, int], patch: tuple[int, int]) -> None:
    r, c = grid
    m = r * c
    cells = list(itertools.product(range(r), range(c)))
    # brute force, float64: every ordered pair of patch centres, a patch with itself included
    want_patches = sum(math.hypot(a[0] - b[0], a[1] - b[1]) for a in cells for b in cells) / m**2
    want_px = sum(math.hypot((a[0] - b[0]) * patch[0], (a[1] - b[1]) * patch[1]) for a in cells for b in cells) / m**2
    attn = build(np.full((m, m), 1.0 / m), 1, prefix_share=0.25)  # prefix mass is renormalised away
    got_patches, got_px = distance_of(attn, ("cls",), grid, patch)
    assert got_patches == pytest.approx(want_patches, rel=1e-6)
    assert got_px == pytest.approx(want_px, rel=1e-6)


@pytest.mark.parametrize(("offset", "patch"), [((0, 1), (16, 16)), ((2, 1), (16, 16)), ((1, 3), (4, 10))])
def test_attention_to_a_fixed_offset_gives_its_length(offset: tuple[int, int], patch: tuple[int, int]) -> None:
    grid = (6, 7)
    gh, gw = grid
    m = gh * gw
    rows = np.zeros((m, m))
    for q in range(m):
        r, c = patch_rc(q, gw)
        # the offset forwards where it stays on the grid, else backwards: the same length for every query
        tr = r + offset[0] if r + offset[0] < gh else r - offset[0]
        tc = c + offset[1] if c + offset[1] < gw else c - offset[1]
        rows[q, tr * gw + tc] = 1.0
    attn = build(rows, 2, prefix_share=0.1)
    got_patches, got_px = distance_of(attn, ("cls", "dist"), grid, patch)
    assert got_patches == pytest.approx(math.hypot(*offset), rel=1e-6)
    assert got_px == pytest.approx(math.hypot(offset[0] * patch[0], offset[1] * patch[1]), rel=1e-6)


def test_prefix_groups_entropy_and_peak_on_hand_built_attention() -> None:
    roles = ("cls", "reg0", "reg1")
    grid = (3, 3)
    p, m = 3, 9
    n = p + m
    a = np.zeros((1, 2, n, n))
    # patch queries: 0.1 to the class token, 0.2 to each register, 0.5 uniformly over the patches
    a[:, :, p:, 0] = 0.1
    a[:, :, p:, 1:3] = 0.2
    a[:, :, p:, p:] = 0.5 / m
    # the class token's row: head 0 all on patch 4 (entropy 0), head 1 uniform over the patches (entropy 1),
    # with 0.4 to prefix tokens
    a[:, :, 0, :p] = 0.4 / p
    a[0, 0, 0, p + 4] = 0.6
    a[0, 1, 0, p:] = 0.6 / m
    a[:, :, 1:3, :] = 1.0 / n
    out = StatsReducer(TokenLayout(roles, (8, 8)), grid, CLS, map_block=0)(0, torch.tensor(a, dtype=torch.float32))
    assert set(stat_names(roles)) == {k for k in out if k not in ("peak", "map")}
    assert all(v.shape in ((1, 2), (1, m)) for v in out.values())  # nothing of size N x N leaves the hook
    assert out["prefix_mass_cls"][0].tolist() == pytest.approx([0.1, 0.1])
    assert out["prefix_mass_reg"][0].tolist() == pytest.approx([0.4, 0.4])
    assert out["prefix_mass"][0].tolist() == pytest.approx([0.5, 0.5])
    assert out["query_prefix_mass"][0].tolist() == pytest.approx([0.4, 0.4])
    assert out["entropy"][0].tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    assert out["peak"][0, 0] == 4
    assert out["map"][0].reshape(3, 3)[1, 1] == pytest.approx((0.6 + 0.6 / m) / 2)


def _random_batch(seed: int, b: int, roles: tuple[str, ...], grid: tuple[int, int], heads: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = len(roles) + grid[0] * grid[1]
    return (torch.randn(b, heads, n, n, generator=g) * 3).softmax(dim=-1)  # (B, H, N, N)


def test_state_sums_give_mean_std_and_sink_and_merge_exactly() -> None:
    roles, grid = ("cls", "reg0"), (3, 4)
    reducer = StatsReducer(TokenLayout(roles, (16, 16)), grid, CLS, map_block=1)
    batches = [_random_batch(s, 3, roles, grid) for s in range(4)]
    classes = [[0, 1, 1], [2, 0, 0], [1, 1, 1], [0, 2, 5]]
    whole = StatsState((0, 1), 2, grid, stat_names(roles))
    parts = []
    per_image = []
    for x, top1 in zip(batches, classes, strict=True):
        captured = {0: reducer(0, x), 1: reducer(1, x)}
        whole.add(captured, top1)
        part = StatsState.like(whole)
        part.add(captured, top1)
        parts.append(part)
        per_image.append(captured)
    assert whole.images == 12
    for name in whole.names:
        values = np.concatenate([[c[b][name].numpy() for b in (0, 1)] for c in per_image], axis=1)  # (L, 12, H)
        mean, std = whole.moments(name)
        np.testing.assert_allclose(mean, values.mean(axis=1), rtol=1e-6)
        np.testing.assert_allclose(std, values.std(axis=1), rtol=1e-5, atol=1e-9)
    peaks = np.concatenate([c[1]["peak"].numpy() for c in per_image])  # (12, H)
    share, patch = whole.sink()
    for h in range(2):
        counts = np.bincount(peaks[:, h], minlength=12)
        assert share[1, h] == counts.max() / 12 and patch[1, h] == counts.argmax()
    maps = np.concatenate([c[1]["map"].numpy() for c in per_image])  # (12, M)
    labels = np.concatenate(classes)
    assert whole.class_count == {0: 4, 1: 5, 2: 2, 5: 1}
    np.testing.assert_allclose(whole.class_map(1).ravel(), maps[labels == 1].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(whole.class_map(None).ravel(), maps.mean(axis=0), rtol=1e-6)
    assert whole.top_classes(2) == [1, 0]

    merged = merge_states([merge_states(parts[:2]), merge_states(parts[2:])])
    for field in ("sums", "squares", "peaks", "map_sum"):
        np.testing.assert_allclose(getattr(merged, field), getattr(whole, field), rtol=1e-12)
    assert merged.class_count == whole.class_count and merged.images == whole.images

    again = StatsState.from_dict(whole.to_dict())  # JSON-able, exactly
    assert np.array_equal(again.sums, whole.sums) and np.array_equal(again.peaks, whole.peaks)
    assert again.class_count == whole.class_count
    assert all(np.array_equal(again.class_sum[c], whole.class_sum[c]) for c in whole.class_sum)
    unpickled = pickle.loads(pickle.dumps(whole))
    assert np.array_equal(unpickled.squares, whole.squares)
    assert len(pickle.dumps(whole)) < 20_000  # small: no maps per image, only sums

    other = StatsState((0,), 2, grid, stat_names(roles))
    with pytest.raises(UsageError, match="cannot merge"):
        whole.merge(other)


def test_non_finite_images_are_left_out() -> None:
    roles, grid = ("cls",), (2, 2)
    x = _random_batch(0, 3, roles, grid)
    x[1] = float("nan")
    reducer = StatsReducer(TokenLayout(roles, (16, 16)), grid, CLS, map_block=0)
    state = StatsState((0,), 2, grid, stat_names(roles))
    state.add({0: reducer(0, x)}, keep=[True, False, True])
    assert state.images == 2 and np.isfinite(state.sums).all()


def reference_stats(attn: torch.Tensor, roles: tuple[str, ...], grid: tuple[int, int],
                    patch: tuple[int, int]) -> dict[str, np.ndarray]:
    """The definitions written out in float64 numpy: (B, H) per statistic for one block (B, H, N, N)."""
    a = attn.double().numpy()
    p = len(roles)
    gh, gw = grid
    rr, cc = np.divmod(np.arange(gh * gw), gw)
    d = np.hypot((rr[:, None] - rr[None]) * patch[0], (cc[:, None] - cc[None]) * patch[1])  # (M, M)
    pp = a[:, :, p:, p:]
    pp = pp / pp.sum(axis=-1, keepdims=True)
    out = {"distance_px": (pp * d).sum(axis=-1).mean(axis=-1)}
    row = a[:, :, 0, :] if "cls" in roles else a[:, :, p:, :].mean(axis=2)  # (B, H, N)
    q = row[:, :, p:] / row[:, :, p:].sum(axis=-1, keepdims=True)
    out["entropy"] = -(q * np.log(q)).sum(axis=-1) / np.log(gh * gw)
    if p:
        out["query_prefix_mass"] = row[:, :, :p].sum(axis=-1)
        out["prefix_mass"] = a[:, :, p:, :p].sum(axis=-1).mean(axis=-1)
        for g in ("cls", "dist", "reg"):
            idx = [i for i, r in enumerate(roles) if r == g or (g == "reg" and r.startswith("reg"))]
            if idx:
                out[f"prefix_mass_{g}"] = a[:, :, p:, idx].sum(axis=-1).mean(axis=-1)
    return out


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_matches_timm_unfused_attention(name: str) -> None:
    loaded = tiny_model(name)
    f = FAMILIES[name]
    h, w = loaded.input_size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = recorded_attention(loaded.model, x, grad=False)[1]
    stats = dataset_stats(loaded, x, top_k=0, batch_size=1)  # two batches merged
    assert stats.images == 2 and stats.state.blocks == tuple(range(loaded.depth))
    if len(f.roles) > 1 and "cls" in f.roles and any(r.startswith("reg") for r in f.roles):
        assert {"prefix_mass_cls", "prefix_mass_reg"} <= set(stats.state.names)  # registers apart from the cls
    for li, attn in enumerate(ref):
        want = reference_stats(attn, f.roles, f.grid, loaded.layout.patch_size)
        for stat, values in want.items():
            mean, std = stats.state.moments(stat)
            np.testing.assert_allclose(mean[li], values.mean(axis=0), rtol=2e-4, atol=1e-6, err_msg=f"{stat} {li}")
            np.testing.assert_allclose(std[li], values.std(axis=0), rtol=0.05, atol=1e-5, err_msg=f"{stat} {li}")


def test_dataset_stats_halves_merge_to_the_whole(test_vit: object) -> None:
    from PIL import Image

    rng = np.random.default_rng(3)
    pictures = [Image.fromarray(rng.integers(0, 255, (90 + 9 * i, 120, 3), dtype=np.uint8)) for i in range(6)]
    whole = dataset_stats(test_vit, pictures, batch_size=3)  # type: ignore[arg-type]
    a = dataset_stats(test_vit, pictures[:3], batch_size=3)  # type: ignore[arg-type]
    b = dataset_stats(test_vit, pictures[3:], batch_size=3)  # type: ignore[arg-type]
    merged = merge_states([a.state, b.state])
    assert merged.images == whole.images == 6
    for field in ("sums", "squares", "map_sum"):
        np.testing.assert_allclose(getattr(merged, field), getattr(whole.state, field), rtol=1e-6, atol=1e-9)
    assert np.array_equal(merged.peaks, whole.state.peaks)
    assert merged.class_count == whole.state.class_count and sum(merged.class_count.values()) == 6
    rows = whole.heads()
    assert len(rows) == 6 * 2 and {"distance_px_mean", "entropy_std", "sink_share"} <= set(rows[0])
