"""Rollout and gradient-weighted relevance: equal to the papers' formulas, computed independently.

Layers, as in the rest of the suite:
- pure math on hand-built attention (maps.py): invariants of rollout, relevance and mass masks;
- block pairing of gradients on a hand-made two-block model whose blocks' gradients differ;
- whole models of several families against references written here from the papers' formulas, on
  attention recorded through timm's own unfused path (every block, one ``Tensor.softmax`` each);
- what a rollout over all blocks holds in memory;
- the CLI end to end on ``test_vit``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import METHOD_FAMILIES, result_folder, tiny_model
from PIL import Image
from reference import recorded_attention
from torch import nn
from typer.testing import CliRunner

from vitattn.attention import capturing, forward_batch, resolve_settings
from vitattn.capture import AttentionCapture
from vitattn.cli import app
from vitattn.errors import UsageError
from vitattn.explainer import explain
from vitattn.maps import (
    HeadFusion,
    Query,
    attention_rollout,
    discard_lowest,
    grad_rollout,
    mass_mask,
    patch_grid,
    query_rows,
    query_weights,
    relevance_row_step,
    relevance_weights,
    rollout_step,
)
from vitattn.methods import GradRolloutReducer, RolloutReducer
from vitattn.models import LoadedModel, TokenLayout, load_model
from vitattn.options import AttentionOptions
from vitattn.overlays import mask_overlay

CLS = TokenLayout(roles=("cls",), patch_size=(16, 16))


def stochastic(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random row-stochastic attention (..., N, N) with distinct entries."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).mul(2).softmax(dim=-1)


# -- references, written from the papers' formulas (explicit loops, float64) ------------------------------


def ref_rollout(attns: list[torch.Tensor], fuse: str = "mean", discard_ratio: float = 0.0) -> list[torch.Tensor]:
    """Abnar & Zuidema: per block fuse heads, drop the lowest of each row (not its own token), add I, normalise.

    Returns the rollout after each block, block 0 first.
    """
    b, _, n, _ = attns[0].shape
    eye = torch.eye(n, dtype=torch.float64)
    r = eye.repeat(b, 1, 1)
    out = []
    for attn in attns:
        a = attn.double()
        a = {"mean": a.mean(1), "max": a.amax(1), "min": a.amin(1)}[fuse]  # (B, N, N)
        k = int(discard_ratio * (n - 1))  # of the N - 1 entries off the diagonal
        if k:
            others = a + torch.diag(torch.full((n,), math.inf, dtype=torch.float64))  # own token: never lowest
            lowest = torch.argsort(others, dim=-1, stable=True)[..., :k]
            a = a.scatter(-1, lowest, 0.0)
        a = a + eye
        a = a / a.sum(dim=-1, keepdim=True)
        r = a @ r
        out.append(r)
    return out


def ref_grad_rollout(attns: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Chefer, Gur & Wolf: R = I; for each block in order, Ā = mean_h (∇A ⊙ A)⁺, R ← R + Ā R (after each block)."""
    b, _, n, _ = attns[0].shape
    r = torch.eye(n, dtype=torch.float64).repeat(b, 1, 1)
    out = []
    for attn, grad in zip(attns, grads, strict=True):
        a_bar = (grad.double() * attn.detach().double()).clamp(min=0).mean(dim=1)
        r = r + a_bar @ r
        out.append(r)
    return out


def ref_row(matrix: torch.Tensor, query: str, roles: tuple[str, ...], grid: tuple[int, int]) -> torch.Tensor:
    """The query's row of (B, N, N) over the patches, folded: (B, gh, gw)."""
    p = len(roles)
    if query == "patch-mean":
        row = matrix[:, p:, :].mean(dim=1)
    elif query.startswith("patch:"):
        r, c = map(int, query.split(":")[1].split(","))
        row = matrix[:, p + r * grid[1] + c, :]
    else:
        row = matrix[:, roles.index(query), :]
    return row[:, p:].reshape(-1, *grid)


# -- pure math on hand-built attention ------------------------------------------------------------------


@pytest.mark.parametrize("fuse", list(HeadFusion))
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
def test_rows_sum_to_one_after_every_step(fuse: HeadFusion, ratio: float) -> None:
    r = None
    for block in range(4):
        r = rollout_step(r, stochastic(2, 3, 7, 7, seed=block), fuse=fuse, discard_ratio=ratio)
        torch.testing.assert_close(r.sum(dim=-1), torch.ones(2, 7), atol=1e-6, rtol=0)
        assert bool((r >= 0).all())


def test_discard_drops_the_lowest_of_each_row_but_never_the_diagonal() -> None:
    a = stochastic(1, 6, 6, seed=3)
    a.diagonal(dim1=-2, dim2=-1).fill_(1e-6)  # the diagonal is the smallest entry of every row
    dropped = discard_lowest(a, 0.5)  # floor(0.5 * 5) = 2 of the 5 entries off the diagonal
    assert torch.equal(dropped.diagonal(dim1=-2, dim2=-1), a.diagonal(dim1=-2, dim2=-1))
    assert ((dropped == 0).sum(dim=-1) == 2).all()
    off = a.clone()
    off.diagonal(dim1=-2, dim2=-1).fill_(math.inf)
    lowest = off.topk(2, dim=-1, largest=False).indices
    assert (dropped.gather(-1, lowest) == 0).all()
    assert discard_lowest(a, 0.0) is a
    ties = torch.tensor([0.1, 0.2, 0.1, 0.1, 0.3]).expand(1, 5, 5)  # near-uniform attention ties in float32
    expected = [
        [0.1, 0.2, 0.0, 0.0, 0.3],  # its own 0.1 kept; the first tied entries by position go
        [0.0, 0.2, 0.0, 0.1, 0.3],
        [0.0, 0.2, 0.1, 0.0, 0.3],
        [0.0, 0.2, 0.0, 0.1, 0.3],
        [0.0, 0.2, 0.0, 0.1, 0.3],
    ]
    assert torch.equal(discard_lowest(ties, 0.5)[0], torch.tensor(expected))
    with pytest.raises(UsageError):
        discard_lowest(a, 1.0)


def test_discard_ratio_zero_is_plain_rollout() -> None:
    attns = [stochastic(2, 3, 9, 9, seed=s) for s in range(3)]
    plain = torch.eye(9).expand(2, 9, 9)
    for a in attns:
        step = a.mean(1) + torch.eye(9)
        plain = (step / step.sum(-1, keepdim=True)) @ plain
    torch.testing.assert_close(attention_rollout(attns, discard_ratio=0.0), plain)
    torch.testing.assert_close(attention_rollout(attns, discard_ratio=0.0), ref_rollout(attns)[-1].float())
    torch.testing.assert_close(
        attention_rollout(attns, discard_ratio=0.4, fuse=HeadFusion.max),
        ref_rollout(attns, "max", 0.4)[-1].float(),
    )


def test_identity_attention_rolls_out_to_the_identity() -> None:
    n, grid = 1 + 9, (3, 3)
    eye = torch.eye(n).expand(1, 2, n, n)
    r = attention_rollout([eye] * 4)
    torch.testing.assert_close(r, torch.eye(n).expand(1, n, n))
    cls_map = patch_grid(query_rows(r[:, None], Query("cls"), CLS, grid), CLS, grid)
    assert float(cls_map.abs().sum()) == 0.0  # a cls query keeps everything to itself
    g = torch.randn(1, 2, n, n)
    torch.testing.assert_close(grad_rollout([eye] * 3, [g.abs()] * 3)[0, 0, 1:], torch.zeros(n - 1))


def test_uniform_attention_gives_a_uniform_rollout() -> None:
    n, depth, grid = 1 + 16, 5, (4, 4)
    uniform = torch.full((1, 3, n, n), 1.0 / n)
    r = attention_rollout([uniform] * depth)
    cls_map = patch_grid(query_rows(r[:, None], Query("cls"), CLS, grid), CLS, grid)[0, 0]
    # ((U + I) / 2)^L = (1 - 2^-L) U + 2^-L I: every patch gets the same share
    torch.testing.assert_close(cls_map, torch.full(grid, (1 - 2.0**-depth) / n))
    patch_mean = patch_grid(query_rows(r[:, None], Query("patch-mean"), CLS, grid), CLS, grid)[0, 0]
    assert float(patch_mean.max() - patch_mean.min()) < 1e-7


def test_one_hot_attention_to_a_patch_puts_the_whole_map_on_it() -> None:
    n, grid, target = 1 + 12, (3, 4), 1 + 6  # patch (1, 2)
    a = torch.zeros(2, 2, n, n)
    a[..., target] = 1.0  # every query of every head looks at that patch only
    r = attention_rollout([a] * 3)
    # the class token's row, and the patch's own (patches other than it keep their residual share)
    for query in (Query("cls"), Query("patch", 1, 2)):
        m = patch_grid(query_rows(r[:, None], query, CLS, grid), CLS, grid)[:, 0]  # (B, gh, gw)
        others = m.clone()
        others[:, 1, 2] = 0
        assert float(others.abs().max()) < 1e-7 and float(m[:, 1, 2].min()) > 0
        expected = np.zeros(grid, dtype=bool)
        expected[1, 2] = True
        assert np.array_equal(mass_mask(m[0].numpy(), 0.6), expected)
    raw = patch_grid(query_rows(a, Query("cls"), CLS, grid), CLS, grid)
    assert float(raw[:, :, 1, 2].min()) == 1.0 and float(raw.sum()) == 4.0


def test_query_weights_select_the_same_rows() -> None:
    layout = TokenLayout(roles=("cls", "dist", "reg0"), patch_size=(16, 16))
    grid = (2, 3)
    a = stochastic(2, 4, 9, 9, seed=5)
    for query in (Query("cls"), Query("dist"), Query("patch-mean"), Query("patch", 1, 2)):
        w = query_weights(query, layout, grid)
        torch.testing.assert_close(w @ a, query_rows(a, query, layout, grid))


def test_gradient_pairing_matters_and_the_row_form_matches() -> None:
    attns = [stochastic(2, 2, 5, 5, seed=s) for s in (1, 2)]
    grads = [torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    right = grad_rollout(attns, grads)
    torch.testing.assert_close(right, ref_grad_rollout(attns, grads)[-1].float())
    swapped = grad_rollout(attns, grads[::-1])
    assert float((right - swapped).abs().max()) > 1e-2  # a wrong pairing would show
    # backward order: start from the query at the last block, right-multiply by (I + Ā_b) going down
    w = torch.tensor([1.0, 0, 0, 0, 0]).expand(2, 5)
    row = w
    for attn, grad in reversed(list(zip(attns, grads, strict=True))):
        row = relevance_row_step(row, relevance_weights(attn, grad))
    torch.testing.assert_close(row, right[:, 0])


def test_mass_mask_is_the_smallest_set_holding_the_mass() -> None:
    heat = np.array([[0.05, 0.4], [0.3, 0.25]])
    assert mass_mask(heat, 0.4).tolist() == [[False, True], [False, False]]
    assert mass_mask(heat, 0.6).tolist() == [[False, True], [True, False]]
    assert mass_mask(heat, 0.7).tolist() == [[False, True], [True, False]]  # 0.4 + 0.3 reaches 0.7
    assert mass_mask(heat, 0.71).tolist() == [[False, True], [True, True]]
    assert mass_mask(heat, 1.0).all()
    assert not mass_mask(np.zeros((2, 2)), 0.5).any()
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(UsageError):
            mass_mask(heat, bad)


def test_mask_overlay_outlines_the_patches() -> None:
    photo = Image.new("RGB", (40, 20), (200, 200, 200))
    mask = np.zeros((2, 4), dtype=bool)
    mask[0, 1] = True  # pixels x 10..19, y 0..9
    out = np.asarray(mask_overlay(photo, mask, crop_box=(0, 0, 40, 20), color=(255, 0, 0), max_side=0, line=2))
    assert tuple(out[5, 10]) == (255, 0, 0) and tuple(out[0, 15]) == (255, 0, 0)  # the outline
    assert tuple(out[5, 15]) == (200, 200, 200)  # inside: the photo as it is
    assert out[15, 30].max() < 100  # outside: shaded


# -- gradients paired with their own block: a hand-made two-block model ----------------------------------


class ToyAttention(nn.Module):
    """timm's attention shape: a fused path, and an unfused one that passes probabilities through attn_drop."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.attn_drop = nn.Identity()
        self.fused_attn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.fused_attn:
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            attn = self.attn_drop((q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1))
            out = attn @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class ToyBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = ToyAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class ToyViT(nn.Module):
    """Tokens in, logits of the first (cls) token out; two blocks."""

    def __init__(self, dim: int = 8, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.blocks = nn.Sequential(ToyBlock(dim, heads), ToyBlock(dim, heads))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x)[:, 0])  # type: ignore[no-any-return]


def test_gradients_are_paired_with_their_own_block() -> None:
    torch.manual_seed(0)
    model = ToyViT().eval()
    for p in model.parameters():  # make the blocks clearly different
        p.data.mul_(3.0)
    grid = (2, 2)
    x = torch.randn(2, 1 + 4, 8)
    reducer = GradRolloutReducer([0, 1], Query("cls"), CLS, grid)
    with AttentionCapture(model, reducer.blocks, reduce=reducer) as cap:
        assert all(blk.attn.fused_attn is False for blk in model.blocks)
        logits, _ = cap.run(x.requires_grad_(True))
        assert logits is not None
        targets = reducer.backward(logits, 2)
    assert targets.tolist() == [2, 2]
    rows = reducer.finish()

    # the reference: backward through a copy, gradients read off each block's own recorded tensor
    ref_logits, ref_attns = recorded_attention(model, x.detach(), grad=True)
    ref_logits[:, 2].sum().backward()
    grads = [a.grad for a in ref_attns]
    assert all(g is not None for g in grads)
    right = ref_grad_rollout(ref_attns, grads)  # type: ignore[arg-type]
    wrong = ref_grad_rollout(ref_attns, grads[::-1])  # type: ignore[arg-type]
    for b in (0, 1):
        torch.testing.assert_close(rows[b].double(), right[b][:, 0], atol=1e-6, rtol=1e-6)
        assert float((rows[b].double() - wrong[b][:, 0]).abs().max()) > 1e-3  # a wrong pairing would show
    assert not reducer._attn  # every block's attention was released when its gradient came


# -- whole models against the references -----------------------------------------------------------------

@pytest.fixture(scope="module", params=METHOD_FAMILIES)
def family(request: pytest.FixtureRequest) -> tuple[LoadedModel, torch.Tensor]:
    loaded = tiny_model(request.param)
    big = loaded.grid[0] * loaded.grid[1] > 1000  # DINOv2's 37x37: one picture keeps the float64 reference quick
    x = torch.randn(1 if big else 2, 3, *loaded.input_size, generator=torch.Generator().manual_seed(1))
    return loaded, x


def _close(got: np.ndarray, expected: torch.Tensor) -> None:
    """Within 1e-5, absolutely and relative to the map's largest value."""
    g = torch.from_numpy(got).double()
    torch.testing.assert_close(g, expected, atol=1e-5, rtol=1e-5)
    scale = float(expected.abs().max())
    assert scale > 0 and float((g - expected).abs().max()) / scale < 1e-5


def test_rollout_equals_the_reference(family: tuple[LoadedModel, torch.Tensor]) -> None:
    loaded, x = family
    roles, grid, depth = loaded.layout.roles, loaded.grid, loaded.depth
    blocks = [0, depth // 2, depth - 1]
    _, attns = recorded_attention(loaded.model, x, grad=False)
    query = "dist" if "dist" in roles else "cls" if "cls" in roles else "patch-mean"
    cases = [("mean", None, query), ("max", 0.5, f"patch:{grid[0] - 1},{grid[1] // 2}"), ("min", 0.9, "patch-mean")]
    for fuse, ratio, q in cases:
        settings = resolve_settings(
            loaded, AttentionOptions(blocks=blocks, method="rollout", fuse=fuse, discard_ratio=ratio, query=q, top_k=0))
        with capturing(loaded, settings) as cap:
            results = forward_batch(loaded, cap, x, settings)
        reference = ref_rollout(attns, fuse, ratio or 0.0)
        for b in blocks:
            expected = ref_row(reference[b], q, roles, grid)
            for i in range(len(x)):
                _close(results[i].blocks[b].method_map, expected[i])  # type: ignore[arg-type]


def test_grad_rollout_equals_the_reference(family: tuple[LoadedModel, torch.Tensor]) -> None:
    loaded, x = family
    roles, grid, depth = loaded.layout.roles, loaded.grid, loaded.depth
    blocks = [0, depth - 2, depth - 1]
    query = "cls" if "cls" in roles else "patch-mean"
    n = loaded.layout.num_prefix_tokens + grid[0] * grid[1]
    for target in (None, 3) if n < 1000 else (3,):
        options = AttentionOptions(blocks=blocks, method="grad-rollout", target_class=target, query=query)
        settings = resolve_settings(loaded, options)
        with capturing(loaded, settings) as cap:
            # only the blocks up to the last chosen one leave the fused path
            assert [blk.attn.fused_attn for blk in loaded.model.blocks[: depth - 1]] == [False] * (depth - 1)
            results = forward_batch(loaded, cap, x, settings)
        logits, attns = recorded_attention(loaded.model, x, grad=True)
        targets = logits.argmax(dim=-1) if target is None else torch.full((len(x),), target)
        logits.gather(1, targets[:, None]).sum().backward()
        grads = [a.grad for a in attns]
        assert [r.target.index for r in results] == targets.tolist()  # type: ignore[union-attr]
        reference = ref_grad_rollout(attns, grads)  # type: ignore[arg-type]
        for b in blocks:
            expected = ref_row(reference[b], query, roles, grid)
            for i in range(len(x)):
                _close(results[i].blocks[b].method_map, expected[i])  # type: ignore[arg-type]
        # the raw per-head maps of the chosen blocks come along, equal to the recorded attention
        raw = patch_grid(query_rows(attns[depth - 1].detach(), Query(query), loaded.layout, grid), loaded.layout, grid)
        got = torch.from_numpy(results[-1].blocks[depth - 1].heads)
        torch.testing.assert_close(got, raw[-1], atol=1e-5, rtol=1e-4)


# -- memory: rollout over all blocks keeps one N×N matrix per image, not one per block -------------------


def _tensors(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, dict):
            for item in v.values():
                walk(item)
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item)

    walk(vars(obj))
    return found


def test_rollout_over_all_blocks_holds_one_matrix() -> None:
    loaded = load_model("test_vit", pretrained=False, device="cpu")
    depth, n = loaded.depth, 1 + 100
    settings = resolve_settings(loaded, AttentionOptions(blocks=list(range(depth)), method="rollout", top_k=0))
    x = torch.randn(2, 3, *loaded.input_size)
    square = []  # (B, N, N) tensors the reducer holds after each block's hook

    with capturing(loaded, settings) as cap:
        reducer = cap.reduce
        assert isinstance(reducer, RolloutReducer)
        inner = reducer.__call__

        def watched(block: int, attn: torch.Tensor) -> Any:
            out = inner(block, attn)
            square.append(sum(t.shape[-2:] == (n, n) for t in _tensors(reducer)))
            assert out is None or out.shape == (2, 2, n)  # the capture keeps (B, H, N) rows only
            return out

        cap.reduce = watched
        with torch.inference_mode():
            _, captured = cap.run(x)
        held = [t for t in _tensors(reducer) if t.shape[-2:] == (n, n)]
    assert square == [1] * depth  # at every block, one matrix: the rollout so far
    assert len(held) == 1 and held[0].shape == (2, n, n)
    assert sorted(captured) == list(range(depth))
    assert all(v.shape == (2, 2, n) for v in captured.values())  # no per-block N×N kept
    assert not any(t.shape[-2:] == (n, n) for t in _tensors(cap))


# -- the Python API ---------------------------------------------------------------------------------------


def test_explain_methods() -> None:
    torch.manual_seed(0)
    loaded = load_model("test_vit", pretrained=False, device="cpu")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    [raw] = explain(loaded, [photo], blocks=[1, -1])
    assert raw.method.value == "raw" and raw.blocks[5].method_map is None
    [roll] = explain(loaded, [photo], blocks=[1, -1], method="rollout", discard_ratio=0.2)
    [rel] = explain(loaded, [photo], blocks=[-1], method="grad-rollout", target_class=7)
    assert roll.blocks[1].method_map.shape == (10, 10)  # type: ignore[union-attr]
    assert rel.target is not None and rel.target.index == 7 and rel.blocks[5].method_map.shape == (10, 10)  # type: ignore[union-attr]
    np.testing.assert_allclose(roll.blocks[5].heads, raw.blocks[5].heads, atol=1e-6)  # unfused vs fused
    with pytest.raises(UsageError, match="rollout only"):
        explain(loaded, [photo], discard_ratio=0.2)
    with pytest.raises(UsageError, match="grad-rollout only"):
        explain(loaded, [photo], method="rollout", target_class=1)
    with pytest.raises(UsageError, match="unknown fuse"):
        explain(loaded, [photo], fuse="median")
    no_head = load_model("test_vit", pretrained=False, device="cpu", model_kwargs={"num_classes": 0})
    with pytest.raises(UsageError, match="no classifier head"):
        explain(no_head, [photo], method="grad-rollout")


# -- the CLI ------------------------------------------------------------------------------------------------

MODEL = ["-m", "test_vit", "--no-pretrained"]  # 6 blocks, 2 heads, 10x10 grid


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("in") / "wide.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)).save(path)
    return path


def invoke(args: list[str]) -> tuple[int, dict[str, Any] | None, str]:
    result = CliRunner().invoke(app, ["heatmap", *args, *MODEL, "--json"])
    out = result.stdout_bytes.decode().strip()
    return result.exit_code, json.loads(out) if out else None, result.stderr


@pytest.mark.parametrize("method", ["raw", "rollout", "grad-rollout"])
def test_cli_methods_write_the_documented_files(photo: Path, tmp_path: Path, method: str) -> None:
    code, rec, err = invoke([str(photo), "-o", str(tmp_path), "--method", method, "-b", "1,3", "--npy"])
    assert code == 0, err
    assert rec is not None and rec["method"] == method and rec["block"] == 1
    folder = result_folder(tmp_path, photo)
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}  # .vitattn.lock: the writers' lock
    for b in (1, 3):
        if method == "raw":
            want = {f"block{b}_head0.png", f"block{b}_head1.png", f"block{b}_mean.png", f"block{b}_attn.npy"}
            want.add(f"block{b}_grid.png")
        else:
            want = {f"block{b}_{method}.png", f"block{b}_{method}.npy", f"block{b}_{method}_grid.png"}
        assert want <= names
    assert not any(n.startswith(("block0", "block2", "block4", "block5")) for n in names)
    meta = json.loads((folder / "meta.json").read_text())
    assert set(meta["files"]) == names and meta["method"] == method
    assert [b["block"] for b in rec["blocks"]] == [1, 3] and rec["files"] == rec["blocks"][0]["files"]
    assert rec["head_stats"] == meta["head_stats"] and set(rec["head_stats"]) == {"1", "3"}
    assert set(rec["head_stats"]["3"][0]) == {"head", "entropy", "prefix_mass", "peak"}
    for block in rec["blocks"]:
        files = block["files"]
        for key in ("grid", "npy", "meta", *(["mean"] if method == "raw" else ["map"])):
            assert Path(files[key]).is_file()
    if method != "raw":
        arr = np.load(rec["blocks"][1]["files"]["npy"])
        assert arr.dtype == np.float32 and arr.shape == (10, 10) and arr.min() >= 0
        assert rec["files"]["heads"] == [] and "mean" not in rec["files"]
    if method == "grad-rollout":
        assert rec["target"] == rec["top"][0] == meta["target"]


def test_cli_fuse_and_threshold(photo: Path, tmp_path: Path) -> None:
    out = tmp_path / "f"
    args = [str(photo), "-o", str(out), "--fuse", "max", "--threshold", "0.6", "--npy", "-b", "2"]
    code, rec, err = invoke(args)
    assert code == 0, err
    assert rec is not None
    folder = result_folder(out, photo)
    assert rec["files"]["mean"] == str(folder / "block2_max.png")
    assert rec["files"]["masks"] == {
        "heads": [str(folder / "block2_max_head0_mask.png"), str(folder / "block2_max_head1_mask.png")],
        "mean": str(folder / "block2_max_mask.png"),
    }
    assert all(Path(p).is_file() for p in [*rec["files"]["masks"]["heads"], rec["files"]["masks"]["mean"]])
    assert not (folder / "block2_mean.png").exists()
    code, rec, err = invoke([str(photo), "-o", str(tmp_path / "r"), "--method", "rollout", "--threshold", "0.5"])
    assert code == 0, err
    assert rec is not None and Path(rec["files"]["masks"]["map"]).name == "block5_rollout_mask.png"
    assert Path(rec["files"]["masks"]["map"]).is_file()


def test_cli_block_all_in_one_pass(photo: Path, tmp_path: Path) -> None:
    code, rec, err = invoke([str(photo), "-o", str(tmp_path), "-b", "all", "--method", "rollout", "--top-k", "0"])
    assert code == 0, err
    assert rec is not None and [b["block"] for b in rec["blocks"]] == list(range(6))
    assert all(Path(b["files"]["map"]).is_file() for b in rec["blocks"])


def test_cli_rerun_skips_and_another_method_sits_next_to_it(photo: Path, tmp_path: Path) -> None:
    args = [str(photo), "-o", str(tmp_path), "-b", "1,3", "--method", "rollout", "--top-k", "0"]
    code, first, err = invoke(args)
    assert code == 0, err
    code, again, err = invoke(args)
    assert code == 0 and again is not None and again["status"] == "skipped"
    assert again["blocks"] == first["blocks"] and again["head_stats"] == first["head_stats"]  # type: ignore[index]
    other = [str(photo), "-o", str(tmp_path), "-b", "1,3", "--method", "grad-rollout"]
    code, rec, err = invoke(other)
    assert code == 0 and rec is not None and rec["status"] == "ok", err
    names = sorted(p.name for p in result_folder(tmp_path, photo).iterdir() if not p.name.startswith("."))
    assert names == sorted(
        [f"block{b}_{m}{kind}.png" for b in (1, 3) for m in ("rollout", "grad-rollout") for kind in ("", "_grid")]
        + ["meta.json"]
    )  # both results, side by side
    code, rec, err = invoke([*other, "--overwrite"])
    assert code == 0 and rec is not None and rec["status"] == "ok", err
    assert sorted(p.name for p in result_folder(tmp_path, photo).iterdir() if not p.name.startswith(".")) == names


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--discard-ratio", "1.5", "--method", "rollout"], "--discard-ratio: discard ratio 1.5"),
        (["--discard-ratio", "0.5"], "--discard-ratio: a discard ratio applies to rollout only"),
        (["--target-class", "5000", "--method", "grad-rollout"], "--target-class: target class 5000 is out of range"),
        (["--target-class", "cat", "--method", "grad-rollout"], "a class index or top1"),
        (["--target-class", "3", "--method", "rollout"], "--target-class: a target class applies to grad-rollout only"),
        (["--method", "foo"], "'--method': 'foo' is not one of"),
        (["--fuse", "avg"], "'--fuse': 'avg' is not one of"),
        (["--threshold", "0"], "threshold 0.0"),
        (["--threshold", "1.2"], "threshold 1.2"),
    ],
)
def test_cli_bad_values_are_one_line(photo: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "never"
    code, rec, err = invoke([str(photo), "-o", str(out), *args])
    assert code == 2, err
    assert rec is None and message in err and "Traceback" not in err
    assert err.count("vitattn: error:") == 1 and not out.exists()


def test_head_stats_entropy_is_normalised_to_one() -> None:
    from vitattn.attention import BlockMaps, ImageAttention
    from vitattn.options import Query
    from vitattn.records import head_stats

    one_hot = np.zeros((3, 4), np.float32)
    one_hot[1, 2] = 0.5  # half the mass on one patch, the rest on prefix tokens
    uniform = np.full((3, 4), 0.9 / 12, np.float32)
    bm = BlockMaps(block=0, heads=np.stack([one_hot, uniform]), prefix=np.array([[0.5], [0.1]]), head_ids=(0, 1))
    [h0, h1] = head_stats(ImageAttention(query=Query("cls"), grid=(3, 4), blocks={0: bm}))["0"]
    assert h0["entropy"] == 0.0 and h0["peak"] == [1, 2] and h0["prefix_mass"] == 0.5
    assert abs(h1["entropy"] - 1.0) < 1e-5 and abs(h1["prefix_mass"] - 0.1) < 1e-6
