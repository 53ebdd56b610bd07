"""Which timm architectures vitattn reads, and why not the others: a table decided without building models.

Every ``timm.list_models()`` architecture is in one of three classes, by the timm module that defines it
(and, for the few modules that mix kinds, a name pattern):

- supported: an adapter reads it (:mod:`vitattn.adapters`), less the variants in :data:`REFUSED`;
- attention without an adapter yet (:data:`NOT_YET`, with the reason);
- no softmax attention over image tokens (convolutional, MLP, channel- or linear-attention networks).

``tests/test_census.py`` builds every architecture on the meta device and checks this table against the
adapters' own decisions and against the attention layers each model really has; it prints the coverage.

Coverage is counted in pretrained tags (``timm.list_models(pretrained=True)``, e.g. ``vit_base_patch16_224.
augreg_in21k``), each attributed to its architecture: supported tags over the tags of attention-bearing
architectures (supported + not yet).
"""

from __future__ import annotations

import fnmatch
import functools
from collections import Counter
from dataclasses import dataclass

#: The timm modules whose architectures an adapter reads (module -> adapter).
SUPPORTED_MODULES: dict[str, str] = {
    "vision_transformer": "vit",
    "deit": "vit",
    "beit": "vit",
    "eva": "vit",
    "vision_transformer_relpos": "vit",
    "vision_transformer_hybrid": "vit",
    "vitamin": "vit",
    "qwen3_vit": "vit-encoder",
    "deepseek_vit": "vit-encoder",
    "swin_transformer": "swin",
    "swin_transformer_v2": "swin",
    "cait": "class-attention",
    "xcit": "class-attention",
}

#: Architectures of supported modules that the adapters refuse: (name pattern, reason).
REFUSED: tuple[tuple[str, str], ...] = (
    ("*_18x2_*", "its blocks run attention and MLP as one parallel block (no block.attn to read)"),
    ("*_xp_*", "its blocks run attention and MLP as one parallel block (no block.attn to read)"),
    ("vit_pwee_*", "its blocks run attention and MLP as one parallel block (no block.attn to read)"),
    ("vit_dpwee_*", "its blocks run attention and MLP as one parallel block (no block.attn to read)"),
    ("vit_dwee_*", "differential attention (softmax A1 - lambda * A2 per head) is not captured yet"),
    ("vit_dlittle_*", "differential attention (softmax A1 - lambda * A2 per head) is not captured yet"),
)

_WINDOWS = "windowed attention (windows stitched back onto the grid, shift undone) has no adapter yet"

#: Attention-bearing families without an adapter: module -> (reason, name patterns or None for all).
NOT_YET: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "swin_transformer_v2_cr": (_WINDOWS, None),
    "tiny_vit": (_WINDOWS, None),
    "gcvit": ("windowed global-context attention has no adapter yet", None),
    "davit": ("window and channel attention has no adapter yet", None),
    "hiera": ("mask-unit windowed attention has no adapter yet", None),
    "hieradet_sam2": ("windowed multi-scale attention (SAM2 Hiera) has no adapter yet", None),
    "vision_transformer_sam": ("windowed ViTDet blocks (SAM) have no adapter yet", None),
    "maxxvit": ("window and grid attention (MaxViT, CoAtNet) has no adapter yet", None),
    "pvt_v2": ("reduced-key attention (spatial-reduction keys) has no adapter yet", None),
    "twins": ("locally-grouped and reduced-key attention has no adapter yet", None),
    "nextvit": ("reduced-key attention has no adapter yet", None),
    "mobilenetv3": ("multi-query attention over reduced keys (MobileNetV4 hybrids) has no adapter yet", ("*hybrid*",)),
    "mobilenetv5": ("multi-query attention over reduced keys has no adapter yet", None),
    "pit": ("pooling stages with per-stage class tokens have no adapter yet", None),
    "crossvit": ("two-branch cross attention has no adapter yet", None),
    "levit": ("attention with reduced stages has no adapter yet", None),
    "mvitv2": ("pooled multi-scale attention has no adapter yet", None),
    "volo": ("outlook attention with a class-attention post-network has no adapter yet", None),
    "convit": ("gated positional self-attention has no adapter yet", None),
    "efficientformer": ("attention over the last stage's tokens has no adapter yet", None),
    "efficientformer_v2": ("attention over pooled stages has no adapter yet", None),
    "efficientvit_msra": ("cascaded group attention in local windows has no adapter yet", None),
    "naflexvit": ("variable-resolution patch sequences have no adapter yet", None),
    "fastvit": (
        "attention in the last stages of a convolutional network has no adapter yet",
        ("fastvit_sa*", "fastvit_ma*", "fastvit_mci*"),
    ),
    "mobilevit": ("attention over unfolded patches has no adapter yet", None),
    "metaformer": ("attention stages of a MetaFormer (CAFormer) have no adapter yet", ("caformer*",)),
    "byoanet": ("self-attention inside convolutional stages (BoTNet, HaloNet, Lambda) has no adapter yet", None),
    "byobnet": ("an attention-pool head or non-local attention has no adapter yet", ("resnet*_clip", "bat_*")),
    "gemma4_vit": ("pooled Gemma 4 vision tokens have no adapter yet", None),
    "nest": ("nested local-block attention has no adapter yet", None),
    "tnt": ("inner (pixel) and outer (patch) attention has no adapter yet", None),
    "visformer": ("attention in the last stages of a convolutional network has no adapter yet", None),
    "coat": ("factorized attention with convolutional position encoding has no adapter yet", None),
    "csatv2": ("attention after a frequency-domain stem has no adapter yet", None),
    "iformer": ("single-head modulation attention has no adapter yet", None),
    "cpubone": ("convolutional attention over reduced stages has no adapter yet", None),
    "lowformer": ("convolutional attention over reduced stages has no adapter yet", ("lowformer_b*", "lowformer_e3")),
}

#: Modules whose layers are named attention but are not softmax attention over image tokens.
NO_TOKEN_ATTENTION: dict[str, str] = {
    "sknet": "selective-kernel (channel) attention",
    "resnest": "split (channel) attention",
    "edgenext": "cross-covariance (channel) attention",
    "swiftformer": "additive attention (no softmax over tokens)",
}

NO_ATTENTION = "no softmax attention over image tokens"


@dataclass(frozen=True)
class Status:
    """One architecture's place in the table.

    Attributes:
        name: the timm architecture.
        module: the timm module that defines it.
        supported: an adapter reads it.
        attention: it has softmax attention over image tokens (supported or not yet).
        reason: why it is not supported (None when it is).
        adapter: the adapter that reads it (None when none does).
    """

    name: str
    module: str
    supported: bool
    attention: bool
    reason: str | None
    adapter: str | None = None


def _matches(name: str, patterns: tuple[str, ...] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatch(name, p) for p in patterns)


@functools.cache
def _modules() -> dict[str, str]:
    import timm

    return {name: module for module in timm.list_modules() for name in timm.list_models(module=module)}


def module_of(name: str) -> str:
    """The timm module that defines an architecture (``vision_transformer``...); empty when unknown."""
    return _modules().get(name, "")


def status(name: str, module: str | None = None) -> Status:
    """Where ``name`` stands, from the table alone (no model is built)."""
    module = module if module is not None else module_of(name)
    if module in SUPPORTED_MODULES:
        for pattern, why in REFUSED:
            if fnmatch.fnmatch(name, pattern):
                return Status(name, module, False, True, why)
        return Status(name, module, True, True, None, SUPPORTED_MODULES[module])
    entry = NOT_YET.get(module)
    if entry is not None and _matches(name, entry[1]):
        return Status(name, module, False, True, entry[0])
    detail = NO_TOKEN_ATTENTION.get(module)
    return Status(name, module, False, False, f"{NO_ATTENTION} ({detail})" if detail else NO_ATTENTION)


def census(pattern: str = "") -> list[Status]:
    """Every timm architecture (matching a wildcard ``pattern``, in any case) with its status."""
    import timm

    return [status(n) for n in timm.list_models(pattern.lower() or "*")]


def pretrained_tags() -> Counter[str]:
    """Pretrained tags per architecture."""
    import timm

    return Counter(tag.split(".")[0] for tag in timm.list_models(pretrained=True))


@dataclass(frozen=True)
class Coverage:
    """Counts of architectures and pretrained tags.

    Attributes:
        by_family: module -> (supported architectures, attention-bearing architectures, supported tags,
            attention-bearing tags), for the attention-bearing modules.
    """

    supported_archs: int
    attention_archs: int
    supported_tags: int
    attention_tags: int
    by_family: dict[str, tuple[int, int, int, int]]

    @property
    def fraction(self) -> float:
        """Supported pretrained tags over the attention-bearing ones."""
        return self.supported_tags / self.attention_tags if self.attention_tags else 0.0


def coverage(statuses: list[Status] | None = None) -> Coverage:
    """The coverage figures over ``statuses`` (every architecture when None)."""
    rows = census() if statuses is None else statuses
    tags = pretrained_tags()
    by: dict[str, list[int]] = {}
    for s in rows:
        if not s.attention:
            continue
        c = by.setdefault(s.module, [0, 0, 0, 0])
        c[0] += s.supported
        c[1] += 1
        c[2] += tags[s.name] if s.supported else 0
        c[3] += tags[s.name]
    total = [sum(c[i] for c in by.values()) for i in range(4)]
    return Coverage(total[0], total[1], total[2], total[3], {m: (c[0], c[1], c[2], c[3]) for m, c in by.items()})
