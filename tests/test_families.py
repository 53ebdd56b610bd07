"""Each adapter's maps equal an independent computation written out here from the module's own parameters.

The reference records the input each attention module receives (a plain forward pre-hook on a copy of the
model, not vitattn's readers), then computes ``softmax(q k^T * scale)`` from that module's projections:
self-attention (hybrid ViT), class attention (CaiT, XCiT: only the class token asks) and an attention-pool
head (SigLIP: its latent query asks). Compared at the first, a middle and the last block of each kind, for
every query the family offers, within 1e-5; logits unchanged with capture on; hooks removed afterwards.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import timm
import torch

from vitattn.adapters import support
from vitattn.attention import capturing, forward_batch, resolve_settings
from vitattn.capture import AttentionCapture
from vitattn.errors import UnsupportedModelError, UsageError
from vitattn.models import LoadedModel, load_model
from vitattn.options import AttentionOptions, Method

TINY = {"embed_dim": 64, "num_heads": 2}

#: name -> (create_model overrides, adapter, site kinds in order, default query, grid at 224 px)
MODELS: dict[str, tuple[dict[str, Any], str, tuple[str, ...], str, tuple[int, int]]] = {
    "cait_xxs24_224": ({**TINY, "depth": 1, "depth_token_only": 3}, "class-attention", ("class",) * 3, "cls", (14, 14)),
    "xcit_nano_12_p16_224": (
        {**TINY, "depth": 1, "cls_attn_layers": 3},
        "class-attention",
        ("class",) * 3,
        "cls",
        (14, 14),
    ),
    "vit_base_patch16_siglip_224": ({**TINY, "depth": 2}, "vit", ("self", "self", "pool"), "pool", (14, 14)),
    # EVA's attention-pool head sees the class token too, and has 8 heads where the blocks have 2
    "vit_pe_core_tiny_patch16_384": (
        {**TINY, "depth": 2, "img_size": 224, "pretrained_cfg_overlay": {"input_size": (3, 224, 224)}},
        "vit",
        ("self", "self", "pool"),
        "pool",
        (14, 14),
    ),
    # hybrid: a ResNet stem of stride 16, then 8-pixel patches of its features: a 7x7 grid (not 224 / 8)
    "vit_tiny_r_s16_p8_224": ({"depth": 3}, "vit", ("self",) * 3, "cls", (7, 7)),
}


@functools.cache
def tiny(name: str) -> LoadedModel:
    """A seeded random-weight model whose attention is peaked (its query and key weights scaled up), so that
    a slightly wrong computation shows: random-init attention is nearly uniform."""
    torch.manual_seed(0)
    loaded = load_model(name, pretrained=False, device="cpu", model_kwargs=MODELS[name][0])
    with torch.no_grad():
        for site in loaded.sites:
            for pname, param in loaded.model.get_submodule(site.path).named_parameters():
                if pname.split(".")[0] in ("qkv", "q", "k", "kv", "latent"):
                    param.mul_(10.0)
    return loaded


def picture(loaded: LoadedModel, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, *loaded.input_size, generator=torch.Generator().manual_seed(seed))


def heads_split(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, H, N, C / H)."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def explicit_attention(module: torch.nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) from the module's own projections, for the module's input x (B, N, C)."""
    h = int(module.num_heads)
    if kind == "self":
        q, k, _ = module.qkv(x).chunk(3, dim=-1)  # 3 x (B, N, C)
        q, k = module.q_norm(heads_split(q, h)), module.k_norm(heads_split(k, h))  # (B, H, N, d)
    elif kind == "class":
        q = heads_split(module.q(x[:, :1]), h)  # (B, H, 1, d): only the class token asks
        k = heads_split(module.k(x), h)  # (B, H, N, d)
    else:  # attention-pool head: its latent query over the tokens
        assert module.pos_embed is None and isinstance(module.q_norm, torch.nn.Identity)
        q = heads_split(module.q(module.latent.expand(x.shape[0], -1, -1)), h)  # (B, H, L, d)
        k = heads_split(module.kv(x)[..., : x.shape[-1]], h)  # (B, H, N, d): the first half of kv is k
    return (q @ k.transpose(-2, -1) * module.scale).softmax(dim=-1)  # (B, H, Q, N)


#: Models whose self-attention applies rotary embeddings (EVA / PE): there the blocks' reference is timm's
#: own unfused path (:func:`unfused_reference`); their other sites keep the explicit computation.
ROTARY = {"vit_pe_core_tiny_patch16_384"}


def reference(loaded: LoadedModel, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and every site's attention (B, H, Q, N), from the inputs its module received on a copy."""
    if loaded.spec in ROTARY:
        _, unfused = unfused_reference(loaded, x)
        logits, explicit = _explicit_reference(loaded, x)
        return logits, [u if s.kind == "self" else e for s, u, e in zip(loaded.sites, unfused, explicit, strict=True)]
    return _explicit_reference(loaded, x)


def _explicit_reference(loaded: LoadedModel, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = copy.deepcopy(loaded.model)
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(s.path).register_forward_pre_hook(
            lambda m, args, path=s.path: inputs.__setitem__(path, args[0])
        )
        for s in loaded.sites
    ]
    with torch.inference_mode():
        logits = model(x)
        attns = [
            explicit_attention(model.get_submodule(s.path), s.kind, inputs[s.path])
            if s.kind != "self" or loaded.spec not in ROTARY
            else torch.empty(0)
            for s in loaded.sites
        ]
    for handle in handles:
        handle.remove()
    return logits, attns


@pytest.fixture(scope="module", params=sorted(MODELS))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_adapter_sites_default_query_and_grid(name: str) -> None:
    _, adapter, kinds, default, grid = MODELS[name]
    loaded = tiny(name)
    assert loaded.adapter == adapter
    assert tuple(s.kind for s in loaded.sites) == kinds
    assert str(loaded.default_query) == default
    assert loaded.grid == grid
    assert resolve_settings(loaded).query == loaded.default_query


def queries_of(loaded: LoadedModel, kind: str) -> list[str]:
    gh, gw = loaded.grid
    if kind == "self":
        return [*(["cls"] if loaded.sites[0].layout.has_cls else []), "patch-mean", f"patch:{gh - 1},{gw // 2}"]
    return ["cls" if kind == "class" else "pool"]


def test_maps_equal_the_explicit_attention(name: str) -> None:
    loaded = tiny(name)
    x = picture(loaded)
    _, attns = reference(loaded, x)
    assert all(float(a.amax()) > 4 / a.shape[-1] for a in attns)  # peaked: a wrong map would show
    gh, gw = loaded.grid
    for kind in sorted({s.kind for s in loaded.sites}):
        indices = [i for i, s in enumerate(loaded.sites) if s.kind == kind]
        chosen = sorted({indices[0], indices[len(indices) // 2], indices[-1]})
        for query in queries_of(loaded, kind):
            settings = resolve_settings(loaded, AttentionOptions(blocks=chosen, query=query, top_k=0))
            assert settings.blocks == tuple(chosen)
            with capturing(loaded, settings) as cap:
                results = forward_batch(loaded, cap, x, settings)
            for b in chosen:
                attn = attns[b]  # (B, H, Q, N)
                p = attn.shape[-1] - gh * gw  # prefix tokens among the keys
                if query == "patch-mean":
                    rows = attn[:, :, p:, :].mean(dim=2)  # (B, H, N)
                elif query.startswith("patch:"):
                    rows = attn[:, :, p + (gh - 1) * gw + gw // 2, :]
                elif kind == "self":
                    rows = attn[:, :, 0, :]  # the class token is the first token
                else:
                    rows = attn[:, :, 0, :]  # the one query token (class token, latent query)
                for i in range(x.shape[0]):
                    got = torch.from_numpy(results[i].blocks[b].heads)  # (H, gh, gw)
                    torch.testing.assert_close(got, rows[i, :, p:].reshape(-1, gh, gw), atol=1e-5, rtol=1e-4)
                    prefix = torch.from_numpy(results[i].blocks[b].prefix)
                    torch.testing.assert_close(prefix, rows[i, :, :p], atol=1e-5, rtol=1e-4)


def test_logits_unchanged_and_hooks_removed(name: str) -> None:
    loaded = tiny(name)
    x = picture(loaded, n=1, seed=2)
    expected, _ = reference(loaded, x)
    modules = [loaded.model.get_submodule(s.path) for s in loaded.sites]
    fused = [getattr(m, "fused_attn", None) for m in modules]
    everything = list(range(loaded.depth))
    with AttentionCapture(loaded.model, everything, family=loaded.family) as cap, torch.inference_mode():
        logits, captured = cap.run(x)
    assert logits is not None and sorted(captured) == everything
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    assert [getattr(m, "fused_attn", None) for m in modules] == fused
    for m in loaded.model.modules():
        assert not m._forward_hooks and not m._forward_hooks_with_kwargs and not m._forward_pre_hooks


def test_negative_blocks_count_among_the_blocks_that_offer_the_query() -> None:
    loaded = tiny("vit_base_patch16_siglip_224")  # blocks 0, 1 (self-attention), 2 (the pool head)
    assert resolve_settings(loaded).blocks == (2,)  # the natural map: the pool's latent query
    assert resolve_settings(loaded, AttentionOptions(query="patch-mean")).blocks == (1,)
    assert resolve_settings(loaded, AttentionOptions(blocks=None, query="patch-mean")).blocks == (0, 1)
    with pytest.raises(UsageError, match=r"block 2 \(attn_pool, pool attention\) has no patch-mean query"):
        resolve_settings(loaded, AttentionOptions(blocks=[2], query="patch-mean"))
    with pytest.raises(UsageError, match="this model has no cls token"):
        resolve_settings(loaded, AttentionOptions(query="cls"))


def test_blocks_with_other_head_counts_need_the_heads_named() -> None:
    loaded = tiny("vit_pe_core_tiny_patch16_384")  # blocks: 2 heads; the pool head: 8
    assert resolve_settings(loaded).heads == tuple(range(8))
    assert resolve_settings(loaded, AttentionOptions(query="cls")).heads == (0, 1)
    with pytest.raises(UsageError, match=r"head 5 is out of range: the chosen blocks have 2 heads"):
        resolve_settings(loaded, AttentionOptions(blocks=[0], query="cls", heads=[5]))


def test_methods_that_chain_blocks_refuse_other_kinds_of_attention() -> None:
    with pytest.raises(UsageError, match=r"rollout is not defined at block 0 .*class attention"):
        resolve_settings(tiny("cait_xxs24_224"), AttentionOptions(method=Method.rollout))
    with pytest.raises(UsageError, match=r"rollout is not defined at block 2 .*pool attention"):
        resolve_settings(tiny("vit_base_patch16_siglip_224"), AttentionOptions(method=Method.rollout))
    loaded = tiny("vit_tiny_r_s16_p8_224")  # hybrid: plain self-attention blocks, so rollout works
    assert resolve_settings(loaded, AttentionOptions(method=Method.rollout)).blocks == (2,)


def test_differential_attention_is_refused_in_one_line() -> None:
    with torch.device("meta"):
        model = timm.create_model("vit_dwee_patch16_reg1_gap_256", pretrained=False)
    adapter, why = support(model)
    assert adapter is None and why is not None and "differential attention" in why
    with pytest.raises(UnsupportedModelError, match="differential attention") as info:
        load_model("vit_dwee_patch16_reg1_gap_256", pretrained=False, device="cpu", model_kwargs={"depth": 1})
    assert "\n" not in str(info.value)


#: Families whose attention applies rotary embeddings or runs behind a convolutional stem: the reference is
#: timm's own unfused path on a copy (every site module switched to it), its 4-D softmax outputs recorded.
UNFUSED: dict[str, tuple[dict[str, Any], str, tuple[int, int]]] = {
    "qwen3_vit_88m": (  # axial RoPE, no prefix tokens
        {**TINY, "depth": 3, "img_size": 224, "pretrained_cfg_overlay": {"input_size": (3, 224, 224)}},
        "vit-encoder",
        (14, 14),
    ),
    "vitamin_small_224": ({"depth": 3}, "vit", (14, 14)),  # MbConv stem: the grid from patch_embed.grid_size
}


@functools.cache
def tiny_unfused(name: str) -> LoadedModel:
    torch.manual_seed(0)
    loaded = load_model(name, pretrained=False, device="cpu", model_kwargs=UNFUSED[name][0])
    with torch.no_grad():
        for site in loaded.sites:  # peaked attention, as in tiny()
            loaded.model.get_submodule(site.path).qkv.weight.mul_(10.0)
    return loaded


def unfused_reference(loaded: LoadedModel, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = copy.deepcopy(loaded.model)
    for site in loaded.sites:
        model.get_submodule(site.path).fused_attn = False
    recorded: list[torch.Tensor] = []
    original = torch.Tensor.softmax

    def recording(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = original(self, *args, **kwargs)
        if out.dim() == 4:
            recorded.append(out)
        return out

    torch.Tensor.softmax = recording  # type: ignore[method-assign]
    try:
        with torch.inference_mode():
            logits = model(x)
    finally:
        torch.Tensor.softmax = original  # type: ignore[method-assign]
    assert len(recorded) == len(loaded.sites)
    return logits, recorded


@pytest.mark.parametrize("unfused_name", sorted(UNFUSED))
def test_maps_equal_timm_unfused_attention(unfused_name: str) -> None:
    _, adapter, grid = UNFUSED[unfused_name]
    loaded = tiny_unfused(unfused_name)
    assert loaded.adapter == adapter and loaded.grid == grid and str(loaded.default_query) == "patch-mean"
    x = picture(loaded)
    expected_logits, attns = unfused_reference(loaded, x)
    assert all(float(a.amax()) > 4 / a.shape[-1] for a in attns)
    gh, gw = grid
    for query in ("patch-mean", f"patch:{gh - 1},{gw // 2}"):
        settings = resolve_settings(loaded, AttentionOptions(blocks=[0, 1, 2], query=query, top_k=0))
        with capturing(loaded, settings) as cap:
            results = forward_batch(loaded, cap, x, settings)
        for b in (0, 1, 2):
            attn = attns[b]  # (B, H, N, N), no prefix tokens
            rows = attn.mean(dim=2) if query == "patch-mean" else attn[:, :, (gh - 1) * gw + gw // 2, :]
            for i in range(x.shape[0]):
                got = torch.from_numpy(results[i].blocks[b].heads)
                torch.testing.assert_close(got, rows[i].reshape(-1, gh, gw), atol=1e-5, rtol=1e-4)
    with AttentionCapture(loaded.model, [0, 2], family=loaded.family) as cap, torch.inference_mode():
        logits, _ = cap.run(x)
    assert logits is not None
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)
    for m in loaded.model.modules():
        assert not m._forward_hooks
