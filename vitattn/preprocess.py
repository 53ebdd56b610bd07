"""Preprocess stage: the model's own timm evaluation transform, and where its crop lies on the photo.

The transform is exactly ``create_transform(**resolve_model_data_config(model))``; nothing here hard-codes
a size or normalisation. :func:`tensor_transform` runs the same steps with torch's uint8 resamplers (the
batch pipeline's fast path, within two 8-bit levels of the transform). :func:`crop_box` follows the
transform's geometric steps (resize, centre crop) to tell which region of the upright photo the model saw,
so maps can be drawn back onto the photo.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def _resized_size(resize: Any, w: float, h: float) -> tuple[int, int]:
    """The (width, height) torchvision's ``Resize`` makes of a (w, h) picture (short side, or exact size)."""
    if isinstance(resize.size, int) or len(resize.size) == 1:
        target = resize.size if isinstance(resize.size, int) else resize.size[0]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = int(target), int(target * long / short)
        if resize.max_size is not None and new_long > resize.max_size:
            new_short, new_long = int(resize.max_size * new_short / new_long), int(resize.max_size)
        return (new_short, new_long) if w <= h else (new_long, new_short)
    th, tw = _pair(resize.size)
    return tw, th


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
            nw, nh = (float(v) for v in _resized_size(t, w, h))
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


def photo_tensor(photo: Image.Image) -> torch.Tensor:
    """An RGB picture as a uint8 (3, H, W) tensor in channels-last memory (what torch's fast resamplers take)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.array(photo, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W), strides of (H, W, 3)


def tensor_transform(transform: Any) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
    """The model's transform, run on a :func:`photo_tensor` with torch's antialiased uint8 resampling.

    torch's antialiased bilinear and bicubic kernels for uint8 pictures follow Pillow's (the same filters,
    rounded to 8 bits after each pass; outputs differ by one level, rarely two, on a few pixels: under 1 %
    for bicubic, up to a fifth for some bilinear scales; tested) at two to three times the speed here. Only the
    common evaluation pipeline is recognised: torchvision ``Resize`` (bilinear or bicubic) -> ``CenterCrop``
    -> ``ToTensor`` (timm's ``MaybeToTensor``) -> ``Normalize``.

    Returns:
        None for any other transform (apply it to the PIL picture instead); otherwise a function of a
        uint8 (3, H, W) tensor that gives the model's (3, h, w) input, or None for a picture the centre crop
        would pad (smaller than the crop after resizing): the transform handles those.
    """
    import torch
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    if len(steps) != 4:
        return None
    resize, crop, to_tensor, normalize = steps
    modes = {T.InterpolationMode.BILINEAR: "bilinear", T.InterpolationMode.BICUBIC: "bicubic"}
    if not (
        type(resize) is T.Resize
        and resize.interpolation in modes
        and type(crop) is T.CenterCrop
        and isinstance(to_tensor, T.ToTensor)
        and type(normalize) is T.Normalize
    ):
        return None
    mode = modes[resize.interpolation]
    crop_h, crop_w = _pair(crop.size)

    def run(x: torch.Tensor) -> torch.Tensor | None:
        _, h, w = x.shape  # (3, H, W) uint8
        nw, nh = _resized_size(resize, w, h)
        if crop_w > nw or crop_h > nh:
            return None
        y = torch.nn.functional.interpolate(x[None], size=(nh, nw), mode=mode, antialias=True)[0]  # (3, nh, nw)
        top, left = round((nh - crop_h) / 2.0), round((nw - crop_w) / 2.0)  # as CenterCrop
        y = y[:, top : top + crop_h, left : left + crop_w]  # (3, ch, cw)
        y = y.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)  # (3, ch, cw) in [0, 1]
        out: torch.Tensor = normalize(y)
        return out

    return run
