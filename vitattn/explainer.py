"""``vitattn.explain``: the attention of a model on pictures, for Python users holding a timm model.

Example:
    >>> import timm, vitattn
    >>> model = timm.create_model("deit_small_distilled_patch16_224", pretrained=True)
    >>> result = vitattn.explain(model, "cat.jpg", blocks=-1)
    >>> result[-1].heads.shape            # (heads, grid_h, grid_w)
    >>> result.overlay(head=0, cmap="viridis").save("head0.png")
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Union, overload

from vitattn.attention import ImageAttention, capturing, forward_batch, resolve_settings
from vitattn.errors import UsageError
from vitattn.heatmap import as_loaded
from vitattn.options import AttentionOptions, HeadFusion, Method, Precision, Query, parse_choice
from vitattn.preprocess import Box, crop_box, to_batch

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

    from vitattn.models import LoadedModel

One = Union["Image.Image", str, "os.PathLike[str]"]
"""One picture: a PIL image, or the path of an image file."""

_D = AttentionOptions()  # the defaults, defined once in vitattn.options


@overload
def explain(  # type: ignore[overload-overlap]  # a str is one path, though it is a Sequence[str] too
    model: LoadedModel | nn.Module,
    images: One,
    *,
    blocks: int | Sequence[int] | None = ...,
    method: Method | str = ...,
    query: Query | str | None = ...,
    heads: int | Sequence[int] | None = ...,
    fuse: HeadFusion | str = ...,
    discard_ratio: float | None = ...,
    target_class: int | None = ...,
    top_k: int | None = ...,
    precision: Precision | str = ...,
) -> ImageAttention: ...


@overload
def explain(
    model: LoadedModel | nn.Module,
    images: Sequence[One] | torch.Tensor,
    *,
    blocks: int | Sequence[int] | None = ...,
    method: Method | str = ...,
    query: Query | str | None = ...,
    heads: int | Sequence[int] | None = ...,
    fuse: HeadFusion | str = ...,
    discard_ratio: float | None = ...,
    target_class: int | None = ...,
    top_k: int | None = ...,
    precision: Precision | str = ...,
) -> list[ImageAttention]: ...


def explain(
    model: LoadedModel | nn.Module,
    images: One | Sequence[One] | torch.Tensor,
    *,
    blocks: int | Sequence[int] | None = _D.blocks,
    method: Method | str = _D.method,
    query: Query | str | None = _D.query,
    heads: int | Sequence[int] | None = _D.heads,
    fuse: HeadFusion | str = _D.fuse,
    discard_ratio: float | None = _D.discard_ratio,
    target_class: int | None = _D.target_class,
    top_k: int | None = _D.top_k,
    precision: Precision | str = _D.precision,
) -> ImageAttention | list[ImageAttention]:
    """Attention maps of ``model`` for one picture or many, preprocessed with the model's own transform.

    Args:
        model: a timm ViT-style ``nn.Module`` (e.g. from ``timm.create_model``), or a model from
            :func:`vitattn.load_model`. Its train/eval mode is restored afterwards.
        images: a PIL image or an image path (one result), a sequence of them (a list), or a tensor already
            preprocessed for the model, (3, H, W) (one result) or (B, 3, H, W) (a list).
        blocks: block indices, negatives counting from the end; None: every block. ``result[b]`` reads
            them back by the same index.
        method: ``raw``, ``rollout`` or ``grad-rollout``.
        query: ``cls``, ``dist``, ``patch-mean`` or ``patch:R,C``; None: the model's natural query.
        heads: head indices kept; None: all.
        fuse: ``mean``, ``max`` or ``min``: how heads are combined.
        discard_ratio: ``rollout`` only: drop this fraction of each row's lowest entries.
        target_class: ``grad-rollout`` only: the class explained; None: each picture's top-1 class.
        top_k: predictions to report; None: 5 for an ImageNet head (as the CLI).
        precision: ``fp32``, ``bf16`` or ``fp16``.

    Returns:
        An :class:`ImageAttention` per picture, with its ``photo`` and ``crop_box`` set, so that
        ``result.overlay()`` draws a map over it.
    """
    options = AttentionOptions(
        blocks=(blocks,) if isinstance(blocks, int) else (tuple(blocks) if blocks is not None else None),
        method=parse_choice(Method, method, "method"),
        query=Query.parse(query) if query is not None else None,
        heads=(heads,) if isinstance(heads, int) else (tuple(heads) if heads is not None else None),
        fuse=parse_choice(HeadFusion, fuse, "fuse"),
        discard_ratio=discard_ratio,
        target_class=target_class,
        top_k=top_k,
        precision=parse_choice(Precision, precision, "precision"),
    )
    loaded = as_loaded(model)
    settings = resolve_settings(loaded, options)
    single, x, photos, boxes = _batch(loaded, images)
    with _eval_mode(loaded.model), capturing(loaded, settings) as cap:
        results = forward_batch(loaded, cap, x, settings)
    for res, photo, box in zip(results, photos, boxes, strict=True):
        res.photo, res.crop_box = photo, box
    if single:
        return results[0]
    return results


def _batch(
    loaded: LoadedModel, images: One | Sequence[One] | torch.Tensor
) -> tuple[bool, torch.Tensor, list[Image.Image], list[Box]]:
    """(one picture given?, the batch (B, 3, H, W), the upright pictures the maps belong to, and the region of
    each that the model saw: the transform's crop box, or all of it for a preprocessed tensor)."""
    import torch
    from PIL import Image

    if isinstance(images, torch.Tensor):
        if images.ndim not in (3, 4) or images.shape[-3] != 3:
            raise UsageError(f"a preprocessed tensor is (3, H, W) or (B, 3, H, W), not {tuple(images.shape)}",
                             option="images")
        x = images[None] if images.ndim == 3 else images  # (B, 3, H, W)
        seen = [_unnormalize(loaded, t) for t in x]
        return images.ndim == 3, x, seen, [(0.0, 0.0, float(p.width), float(p.height)) for p in seen]
    single = isinstance(images, (Image.Image, str, os.PathLike))
    many: Sequence[One] = [images] if single else images  # type: ignore[list-item, assignment]
    photos = [_picture(p) for p in many]
    if not photos:
        raise UsageError("no pictures given", option="images")
    boxes = [crop_box(loaded.transform, p.size) for p in photos]
    return single, to_batch(photos, loaded.transform), photos, boxes


def _picture(item: One) -> Image.Image:
    from PIL import Image

    if isinstance(item, Image.Image):
        return item.convert("RGB") if item.mode != "RGB" else item
    from vitattn.decoding import load_image

    return load_image(os.fspath(item)).image


def _unnormalize(loaded: LoadedModel, t: torch.Tensor) -> Image.Image:
    """A preprocessed (3, H, W) tensor back as the picture the model saw (for overlays)."""
    import torch
    from PIL import Image

    mean = torch.tensor(loaded.data_config["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(loaded.data_config["std"], dtype=torch.float32).view(3, 1, 1)
    rgb = (t.detach().float().cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)  # (3, H, W)
    return Image.fromarray(rgb.permute(1, 2, 0).contiguous().numpy())


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside (dropout off: the captured probabilities are the model's), the caller's mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
