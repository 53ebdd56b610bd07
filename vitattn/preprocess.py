"""Preprocess stage: the model's own timm evaluation transform, and where its crop lies on the photo.

The transform is exactly ``create_transform(**resolve_model_data_config(model))``; nothing here hard-codes
a size or normalisation. :func:`crop_box` follows the transform's geometric steps (resize, centre crop)
to tell which region of the upright photo the model saw, so maps can be drawn back onto the photo.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in photo pixels


def _pair(size: Any) -> tuple[int, int]:
    """A torchvision size (int or (h, w) sequence) as (h, w)."""
    if isinstance(size, int):
        return size, size
    seq = list(size)
    return (int(seq[0]), int(seq[0])) if len(seq) == 1 else (int(seq[0]), int(seq[1]))


def crop_box(transform: Any, size: tuple[int, int]) -> Box:
    """The region of a (width, height) photo that the transform's output covers, in photo pixels.

    Follows torchvision ``Resize`` (short side or exact size), timm ``ResizeKeepRatio``, ``CenterCrop`` and
    ``CenterCropOrPad``. A padded crop gives a box that extends past the photo. Steps without geometry
    (to-tensor, normalise) are skipped; an unknown geometric step gives the whole photo.
    """
    return _geometry(transform, size)[0]


def peak_pixels(transform: Any, size: tuple[int, int]) -> int:
    """The largest picture (width × height) the transform's steps make from a (width, height) photo.

    A short-side resize of a very thin photo (1×3000) makes a huge intermediate picture (168×504000) before
    the centre crop; callers refuse such inputs instead of running out of memory. Steps after an unknown
    geometric one are not followed.
    """
    return _geometry(transform, size)[1]


def _geometry(transform: Any, size: tuple[int, int]) -> tuple[Box, int]:
    w, h = float(size[0]), float(size[1])
    peak = w * h
    # current picture coords -> photo coords: photo = offset + current * scale
    sx = sy = 1.0
    ox = oy = 0.0
    steps = getattr(transform, "transforms", [transform])
    for t in steps:
        name = type(t).__name__
        if name == "Resize":
            if isinstance(t.size, int) or len(t.size) == 1:
                target = t.size if isinstance(t.size, int) else t.size[0]
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = float(target), float(int(target * long / short))
                if t.max_size is not None and new_long > t.max_size:
                    new_short, new_long = float(int(t.max_size * new_short / new_long)), float(t.max_size)
                nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
            else:
                th, tw = _pair(t.size)
                nw, nh = float(tw), float(th)
        elif name == "ResizeKeepRatio":
            th, tw = _pair(t.size)
            ratio_h, ratio_w = h / th, w / tw
            ratio = max(ratio_h, ratio_w) * t.longest + min(ratio_h, ratio_w) * (1.0 - t.longest)
            nh, nw = float(round(h / ratio)), float(round(w / ratio))
        elif name in ("CenterCrop", "CenterCropOrPad"):
            ch, cw = _pair(t.size)
            # torchvision: top = round((H - ch) / 2); padding (when smaller) is symmetric, same formula
            left, top = float(round((w - cw) / 2.0)), float(round((h - ch) / 2.0))
            ox, oy = ox + left * sx, oy + top * sy
            w, h = float(cw), float(ch)
            continue
        elif name in ("MaybeToTensor", "ToTensor", "Normalize", "MaybePILToTensor", "PILToTensor", "ConvertImageDtype"):
            continue
        else:
            return (0.0, 0.0, float(size[0]), float(size[1])), int(peak)
        sx, sy = sx * w / nw, sy * h / nh
        w, h = nw, nh
        peak = max(peak, w * h)
    return (ox, oy, ox + w * sx, oy + h * sy), int(peak)


def to_batch(images: Sequence[Image.Image], transform: Any) -> torch.Tensor:
    """Apply the model's transform to upright RGB pictures: -> (B, 3, H, W) float tensor."""
    import torch

    return torch.stack([transform(img) for img in images])  # (B, 3, H, W)
