"""Model stage: a model spec -> a loaded timm model, its token layout and its own preprocessing config.

A spec is a timm model name (``deit_small_distilled_patch16_224``), ``hf-hub:ORG/NAME`` or
``local-dir:PATH`` (a folder with ``config.json`` and weights), optionally with a local weights file.
"""

from __future__ import annotations

import difflib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from vitattn.adapters.base import Family, Site
from vitattn.adapters.base import TokenLayout as TokenLayout  # re-exported: vitattn.models.TokenLayout
from vitattn.errors import DeviceError, ModelError, UsageError, WeightsUnavailableError
from vitattn.options import DEFAULT_MODEL, Query

if TYPE_CHECKING:
    import torch
    from torch import nn

MODEL_SOURCES = ("hf-hub:", "local-dir:")
DEMO_SPEC = "demo"
RANDOM_WEIGHTS_SEED = 0
_MAX_KEYS_SHOWN = 5


@dataclass
class LoadedModel:
    """A timm model ready for attention capture, with everything needed to read its maps.

    Attributes:
        model: the timm model, in eval mode, on ``device``.
        spec: the model spec as the user gave it.
        weights: where the weights came from: ``pretrained``, a file path, or ``random``.
        layout: the prefix-token layout.
        data_config: the model's own preprocessing config (timm ``resolve_model_data_config``).
        device: where the model runs.
        labels: class names when known (ImageNet info or the model config's ``label_names``).
        imagenet_head: True when the classifier is an ImageNet head (default top-k 5).
    """

    model: nn.Module
    spec: str
    weights: str
    layout: TokenLayout
    data_config: dict[str, Any]
    device: torch.device
    labels: list[str] | None = None
    imagenet_head: bool = False
    family: Family | None = None
    _transform: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.family is None:  # built by hand: read the model (UnsupportedModelError when no adapter can)
            from vitattn.adapters import read_family

            self.family = read_family(self.model, self.spec)

    @property
    def sites(self) -> tuple[Site, ...]:
        """The attention sites, in forward order: what a block index means."""
        assert self.family is not None  # set in __post_init__
        return self.family.sites

    @property
    def adapter(self) -> str:
        """The name of the adapter that reads this model (``vit``, ``class-attention``...)."""
        assert self.family is not None
        return self.family.adapter

    @property
    def default_query(self) -> Query:
        """The family's natural query (``cls``, ``pool`` or ``patch-mean``)."""
        assert self.family is not None
        return self.family.default_query

    @property
    def depth(self) -> int:
        """Number of attention sites (for ViT-like models: the blocks, then an attention-pool head if any)."""
        return len(self.sites)

    @property
    def num_heads(self) -> int:
        """Heads of the first site (every site of the supported families has as many)."""
        return self.sites[0].heads

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model's input in pixels."""
        _, h, w = self.data_config["input_size"]
        return int(h), int(w)

    @property
    def grid(self) -> tuple[int, int]:
        return self.layout.grid_for(self.input_size)

    @property
    def transform(self) -> Any:
        """The model's own timm evaluation transform (PIL RGB -> normalised tensor)."""
        if self._transform is None:
            from timm.data import create_transform

            self._transform = create_transform(**self.data_config, is_training=False)
        return self._transform

    def resolve_block(self, block: int) -> int:
        """A block index, negatives counting from the end, as a non-negative index."""
        depth = self.depth
        if not -depth <= block < depth:
            raise UsageError(
                f"block {block} is out of range: this model has {depth} blocks (0..{depth - 1}, or -{depth}..-1)",
                option="blocks",
            )
        return block % depth

    def resolve_heads(self, heads: list[int] | None) -> list[int]:
        """Head indices to keep (all when None), validated against the model."""
        n = self.num_heads
        if heads is None:
            return list(range(n))
        bad = [h for h in heads if not 0 <= h < n]
        if bad:
            raise UsageError(f"head {bad[0]} is out of range: this model has {n} heads (0..{n - 1})", option="heads")
        return list(dict.fromkeys(heads))

    def default_top_k(self) -> int:
        if self.imagenet_head:
            return 5
        if self.labels and self.num_classes:
            return min(5, self.num_classes)
        return 0


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu.

    Raises:
        UsageError: not a device name at all (``foo``).
        DeviceError: a device vitattn cannot run on (``hpu``, ``meta``) or that this machine lacks (fatal).
    """
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)", option="device") from exc
    if dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"{device}: not a device vitattn runs on (use auto, cpu, cuda, cuda:N or mps)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{device}: CUDA is not available on this machine (try cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise DeviceError(f"{device}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"{device}: MPS is not available on this machine (try cpu)")
    return dev


def token_layout(model: nn.Module, spec: str = "") -> TokenLayout:
    """The image-token layout of a model, as its family's adapter reads it; never assumed.

    Raises:
        UnsupportedModelError: no adapter reads the model (one line saying why).
    """
    from vitattn.adapters import read_family

    return read_family(model, spec).layout


def _suggest(name: str) -> str:
    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else "; see `vitattn models`"


def _hub_unreachable() -> str | None:
    """A reason when the Hugging Face hub clearly cannot be reached (no DNS, no route), else None.

    This avoids huggingface_hub's retries with back-off (about half a minute) on offline machines.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a proxy may reach what DNS here cannot
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    try:
        with socket.create_connection((host, 443), timeout=3):
            return None
    except OSError as exc:
        return f"cannot reach {host}: {exc.strerror or exc}"


def _weights_unavailable(spec: str, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"cannot fetch pretrained weights for {spec} ({reason}). Ways out: connect to the network "
        "(weights come from the Hugging Face hub and are cached), pass --weights FILE with a local checkpoint, "
        "or use -m local-dir:PATH with a downloaded model folder (or --no-pretrained for random weights)"
    )


def _is_cached(spec: str) -> bool:
    """True when the default pretrained weights for this timm name are already in the local hub cache."""
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(spec)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not hub_id:
            return False
        return any(
            isinstance(try_to_load_from_cache(hub_id, fname), str)
            for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
        )
    except Exception:
        return False


def _hub_file_cached(repo_id: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # an invalid repo id, for one: not cached
        return False


def pretrained_unavailable(spec: str) -> str | None:
    """Why the pretrained weights of ``spec`` cannot be fetched now, or None when they can (or are cached).

    A quick check (local cache, then one connection attempt) used to fail fast and to pick a fallback.
    """
    if spec.startswith("local-dir:") or _is_cached(spec):
        return None
    return _hub_unreachable()


def _create(spec: str, *, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm

    if not spec.startswith(MODEL_SOURCES) and not timm.is_model(spec):
        raise UsageError(f"unknown model {spec!r}{_suggest(spec)}", option="model")
    folder = Path(spec.removeprefix("local-dir:")) if spec.startswith("local-dir:") else None
    if folder is not None:
        check_model_folder(folder, pretrained=pretrained)
    if spec.startswith("hf-hub:"):
        _check_hub_name(spec)
    if spec.startswith("hf-hub:") and not _hub_file_cached(spec.removeprefix("hf-hub:"), "config.json"):
        reason = _hub_unreachable()  # the config comes from the hub too, random weights or not
        if reason:
            raise ModelError(
                f"cannot load {spec}: its config and weights come from the Hugging Face hub ({reason}); "
                "use a local-dir: folder with a downloaded copy"
            )
    reason = pretrained_unavailable(spec) if pretrained else None
    if reason:
        raise _weights_unavailable(spec, reason)
    try:
        model: nn.Module = timm.create_model(spec, pretrained=pretrained, **kwargs)
    except (OSError, ConnectionError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if pretrained and not spec.startswith("local-dir:"):
            raise _weights_unavailable(spec, first) from exc
        raise ModelError(f"cannot load {spec}: {first}") from exc
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:  # e.g. model_args the model does not take
        where = f" (check {folder / 'config.json'})" if folder is not None else ""
        raise ModelError(f"cannot create {spec}: {_first_line(exc)}{where}") from exc
    except Exception as exc:  # a weights reader's own error types (safetensors, pickle) for a bad file
        raise ModelError(f"cannot load {spec}: {type(exc).__name__}: {_first_line(exc)}") from exc
    return model


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


#: Checkpoint names a local-dir: folder is searched for, in timm's order, then the first file per extension.
_FOLDER_WEIGHTS = (
    "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth", "open_clip_pytorch_model.bin"
)
_FOLDER_HINT = "a local-dir: model is a folder with config.json and weights"
_WEIGHT_EXTENSIONS = (".safetensors", ".pth", ".pth.tar", ".bin")


def check_model_folder(folder: Path, *, pretrained: bool) -> None:
    """A ``local-dir:`` folder's config.json and (with ``pretrained``) weights file, checked before timm reads
    them, so that a missing folder, invalid JSON or a corrupt checkpoint is one line naming the file.

    Raises:
        ModelError: the folder, its config.json or its weights file is missing or unreadable.
    """
    import json

    import timm

    spec = f"local-dir:{folder}"
    if not folder.exists():
        raise ModelError(f"{spec}: no such folder {folder}")
    if not folder.is_dir():
        raise ModelError(f"{spec}: {folder} is not a folder ({_FOLDER_HINT})")
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"{spec}: no config.json in {folder} ({_FOLDER_HINT})")
    try:
        cfg = json.loads(config.read_bytes())
    except OSError as exc:
        raise ModelError(f"{config}: cannot read it ({exc.strerror or type(exc).__name__})") from exc
    except UnicodeDecodeError as exc:
        raise ModelError(f"{config}: not valid JSON (not UTF-8 text)") from exc
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not isinstance(arch, str) or not arch:
        raise ModelError(f"{config}: no \"architecture\" (the timm model name of this folder)")
    if not timm.is_model(arch):
        raise ModelError(f"{config}: unknown architecture {arch!r}{_suggest(arch)}")
    for key in ("model_args", "pretrained_cfg"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise ModelError(f"{config}: \"{key}\" must be an object, not {type(cfg[key]).__name__}")
    if not pretrained:
        return
    found = next((folder / n for n in _FOLDER_WEIGHTS if (folder / n).exists()), None)
    for ext in _WEIGHT_EXTENSIONS if found is None else ():
        found = next(iter(sorted(folder.glob(f"*{ext}"))), None)
        if found is not None:
            break
    if found is None:
        raise ModelError(f"{spec}: no weights file in {folder} (model.safetensors or pytorch_model.bin; "
                         "--no-pretrained for random weights)")
    check_checkpoint(found)


def check_checkpoint(path: str | os.PathLike[str]) -> str:
    """What kind of checkpoint a file is, from its first bytes: ``safetensors`` or ``torch``.

    A safetensors file's header is read and checked against the file's size (a truncated or corrupt file
    fails here); a torch file is recognised by its zip or pickle signature.

    Raises:
        ModelError: the file is missing, unreadable, not a checkpoint, or a damaged safetensors file.
    """
    import struct

    name = os.fspath(path)
    try:
        size = os.path.getsize(name)
        with open(name, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        reason = "no such file" if not os.path.exists(name) else (exc.strerror or type(exc).__name__)
        raise ModelError(f"weights file {name}: {reason}") from exc
    if os.path.isdir(name):
        raise ModelError(f"weights file {name}: is a folder")
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save: a zip archive, or a legacy pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte little-endian header length, then JSON
        (header_len,) = struct.unpack("<Q", head[:8])
        if 8 + header_len > size:
            raise ModelError(f"weights file {name}: truncated safetensors file (its header alone needs "
                             f"{8 + header_len} bytes, the file has {size})")
        try:
            from safetensors import safe_open

            with safe_open(name, framework="pt"):  # checks the header and that the tensors cover the file
                pass
        except Exception as exc:
            raise ModelError(f"weights file {name}: damaged safetensors file ({_first_line(exc)})") from exc
        return "safetensors"
    what = "an empty file" if size == 0 else "not a checkpoint"
    raise ModelError(f"weights file {name}: {what} (expected a .safetensors file or a torch .pth/.pt/.bin)")


def _check_hub_name(spec: str) -> None:
    """``hf-hub:ORG/NAME[@REVISION]`` with a repository name the hub accepts (no ``..``, no slashes beyond one)."""
    repo = spec.removeprefix("hf-hub:").split("@", 1)[0]
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(repo)
        ok = repo.count("/") <= 1
    except Exception:
        ok = False
    if not ok:
        raise ModelError(f"{spec}: {repo!r} is not a Hugging Face hub repository name (hf-hub:ORG/NAME)")


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a local checkpoint into ``model``, strictly, naming what does not fit.

    Accepts .safetensors and torch .pth/.pt/.bin files holding a state dict, optionally wrapped
    (``state_dict``, ``model``, ``state_dict_ema``, ``model_ema``) and with ``module.`` prefixes.

    Raises:
        ModelError: the file cannot be read, or its keys or shapes do not fit the model.
    """
    from timm.models import load_state_dict

    path = os.fspath(path)
    check_checkpoint(path)
    try:
        state = load_state_dict(path, use_ema=True)
    except Exception as exc:  # torch.load / safetensors raise many types for unreadable files
        raise ModelError(f"weights file {path}: cannot read it ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ModelError(f"weights file {path}: not a state dict of tensors")
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:  # one short line: the first tensor that differs says which model the file is for
        k = mismatched[0]
        more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise ModelError(
            f"weights file {path} does not fit the model: {k} is {list(state[k].shape)} in the file and "
            f"{list(own[k].shape)} in the model{more}; weights of another model size?"
        )
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        detail = "; ".join(lines[:_MAX_KEYS_SHOWN]) or str(exc).splitlines()[0]
        raise ModelError(f"weights file {path} does not fit the model: {detail}") from exc
    if result.missing_keys or result.unexpected_keys:
        parts = []
        for label, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)):
            if keys:
                more = f" (+{len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else ""
                parts.append(f"{len(keys)} {label} keys: {', '.join(keys[:_MAX_KEYS_SHOWN])}{more}")
        raise ModelError(f"weights file {path} does not fit the model: {'; '.join(parts)}")


def _labels(model: nn.Module) -> tuple[list[str] | None, bool]:
    from timm.data import ImageNetInfo, infer_imagenet_subset

    num_classes = int(getattr(model, "num_classes", 0) or 0)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("label_names")
    if names and len(names) == num_classes:
        return [str(n) for n in names], False
    subset = infer_imagenet_subset(model) if num_classes else None
    if subset:
        info = ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(num_classes)], True
    return None, False


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = True,
    device: str = "auto",
    model_kwargs: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a ViT-style timm model for attention capture.

    Args:
        spec: a timm model name, ``hf-hub:ORG/NAME`` or ``local-dir:PATH``.
        weights: a local checkpoint to load instead of the pretrained weights.
        pretrained: fetch the pretrained weights (ignored when ``weights`` is given). False gives random
            weights, whose maps are meaningless but exercise every code path.
        device: ``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        model_kwargs: passed to ``timm.create_model`` (e.g. ``img_size=384`` for models that allow it).

    Raises:
        UsageError: unknown model name or unavailable device.
        UnsupportedModelError: no adapter reads the model (see :mod:`vitattn.adapters`).
        WeightsUnavailableError: pretrained weights cannot be fetched (offline).
        ModelError: weights that cannot be read or do not fit.
    """
    dev = resolve_device(device)
    source_spec = resolve_spec(spec)
    use_pretrained = pretrained and weights is None
    import torch

    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(RANDOM_WEIGHTS_SEED)  # random weights: the same command gives the same maps
        model = _create(source_spec, pretrained=use_pretrained, **(model_kwargs or {}))
    from vitattn.adapters import read_family

    read_family(model, spec)  # refuse an unsupported model before reading any weights into it
    if weights is not None:
        load_weights(model, weights)
        source = os.fspath(weights)
    else:
        source = "pretrained" if use_pretrained else "random"
    return wrap_model(model.eval().to(dev), spec=spec, weights=source)


def resolve_spec(spec: str) -> str:
    """``demo`` names the bundled model (a ``local-dir:`` spec that works from any folder and when installed)."""
    if spec.strip().lower() == DEMO_SPEC:
        from vitattn.demo import DEMO_MODEL_DIR

        return f"local-dir:{DEMO_MODEL_DIR}"
    return spec


def wrap_model(model: nn.Module, *, spec: str | None = None, weights: str = "caller") -> LoadedModel:
    """A timm model the caller built (``timm.create_model(...)``) as a :class:`LoadedModel`, left where it is.

    Args:
        model: a timm ViT-style model; its mode (train or eval) is not changed here.
        spec: the name shown in records; None: the model's timm architecture name.
        weights: where its weights came from, as recorded.
    """
    from timm.data import resolve_model_data_config

    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = spec or str(cfg.get("architecture") or type(model).__name__)
    from vitattn.adapters import read_family

    family = read_family(model, name)
    param = next(iter(model.parameters()), None)
    import torch

    device = param.device if param is not None else torch.device("cpu")
    labels, imagenet = _labels(model)
    data_config = dict(resolve_model_data_config(model))
    check_data_config(data_config, name, channels=_in_channels(model))
    return LoadedModel(
        model=model,
        spec=name,
        weights=weights,
        layout=family.layout,
        data_config=data_config,
        device=device,
        labels=labels,
        imagenet_head=imagenet,
        family=family,
    )


def _in_channels(model: nn.Module) -> int | None:
    """The picture channels the patch embedding takes; None when unknown (a hybrid's projection reads the
    backbone's features, not the picture)."""
    embed = getattr(model, "patch_embed", None)
    if getattr(embed, "backbone", None) is not None:
        return None
    proj = getattr(embed, "proj", None)
    channels = getattr(proj, "in_channels", None)
    return int(channels) if isinstance(channels, int) else None


_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def check_data_config(cfg: dict[str, Any], spec: str, *, channels: int | None = None) -> None:
    """A model's preprocessing config, checked once at load: a bad one would fail every input.

    Checks ``input_size`` (channels, height, width: positive integers; the channels those of the patch
    embedding), ``mean`` and ``std`` (one finite number per channel, ``std`` > 0), ``crop_pct`` (finite, > 0)
    and ``interpolation``; then runs the model's own evaluation transform once on a small grey picture.

    Raises:
        ModelError: the first value that is wrong, named with the config it comes from.
    """
    import math

    where = f"{spec}: preprocessing config"
    size = cfg.get("input_size")
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ModelError(f"{where}: input_size must be three positive integers (channels, height, width), got {size!r}")
    if channels is not None and size[0] != channels:
        raise ModelError(f"{where}: input_size has {size[0]} channels but the model takes {channels}")
    for key in ("mean", "std"):
        values = cfg.get(key)
        if not isinstance(values, (tuple, list)) or len(values) != size[0]:
            raise ModelError(f"{where}: {key} must have one value per channel ({size[0]}), got {values!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ModelError(f"{where}: {key} must be finite numbers, got {list(values)!r}")
    if any(v <= 0 for v in cfg["std"]):
        raise ModelError(f"{where}: std must be above 0 (pixels are divided by it), got {list(cfg['std'])!r}")
    crop = cfg.get("crop_pct")
    if crop is not None and (
        isinstance(crop, bool) or not isinstance(crop, (int, float)) or not math.isfinite(crop) or crop <= 0
    ):
        raise ModelError(f"{where}: crop_pct must be a number above 0 (1.0: no crop), got {crop!r}")
    interp = cfg.get("interpolation")
    if interp is not None and interp not in _INTERPOLATIONS:
        raise ModelError(f"{where}: unknown interpolation {interp!r} (use one of {', '.join(_INTERPOLATIONS)})")
    from PIL import Image
    from timm.data import create_transform

    _, h, w = size
    try:  # the transform, once: what it makes of a picture must be the model's input
        out = create_transform(**cfg, is_training=False)(Image.new("RGB", (w * 2, h * 2), (128, 128, 128)))
        shape = tuple(out.shape)
    except Exception as exc:
        raise ModelError(f"{where}: its transform fails ({_first_line(exc)})") from exc
    if shape != tuple(size):
        raise ModelError(f"{where}: its transform makes {list(shape)} pictures, not input_size {list(size)}")


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """Everything ``vitattn info`` shows, as plain JSON-able data."""
    cfg = loaded.data_config
    layout = loaded.layout
    gh, gw = loaded.grid
    return {
        "model": loaded.spec,
        "architecture": type(loaded.model).__name__,
        "depth": loaded.depth,
        "heads": loaded.num_heads,
        "embed_dim": int(getattr(loaded.model, "embed_dim", 0) or 0),
        "prefix_tokens": [{"index": i, "role": r} for i, r in enumerate(layout.roles)],
        "patch_size": list(layout.patch_size),
        "grid": [gh, gw],
        "tokens": layout.num_prefix_tokens + gh * gw,
        "input_size": list(cfg["input_size"]),
        "mean": [round(float(x), 6) for x in cfg["mean"]],
        "std": [round(float(x), 6) for x in cfg["std"]],
        "interpolation": cfg.get("interpolation"),
        "crop_pct": cfg.get("crop_pct"),
        "crop_mode": cfg.get("crop_mode", "center"),
        "num_classes": loaded.num_classes,
        "default_query": str(loaded.default_query),
        "adapter": loaded.adapter,
        "sites": [
            {
                "block": i,
                "module": s.path,
                "kind": s.kind,
                "heads": s.heads,
                "prefix_tokens": list(s.layout.roles),
                "queries": list(s.layout.query_names()),
                "grid": list(s.layout.grid_for(loaded.input_size)),
            }
            for i, s in enumerate(loaded.sites)
        ],
    }


def supported_models(pattern: str = "", *, pretrained: bool = False) -> list[str]:
    """timm model names (optionally matching a wildcard ``pattern``, in any case) that vitattn can handle.

    Decided without building each model, from :mod:`vitattn.coverage` (the families an adapter reads, less
    the variants it refuses); ``tests/test_census.py`` checks that table on every architecture on the meta
    device. With ``pretrained``, only architectures that have pretrained weights (a timm pretrained tag).
    """
    import timm

    from vitattn.coverage import census

    keep = {s.name for s in census(pattern) if s.supported}
    if pretrained:
        keep &= {tag.split(".")[0] for tag in timm.list_models(pattern.lower() or "*", pretrained=True)}
    return sorted(keep)
