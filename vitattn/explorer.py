"""The explorer: one self-contained HTML page per picture, to look at attention interactively.

What the page holds (everything inline: script, styles, the photo and the data; no network request):

- every captured block's attention rows of each prefix token (class token, distillation token, registers),
  quantised to 16 bits per row;
- for the blocks that fit the page's size budget, the full patch-to-token attention (every patch's row),
  quantised to 8 bits per row, the last block first; the page says which blocks have it;
- with rollout or grad-rollout, the method's map of each chosen block for the run's query (float32);
- the predictions, and a few colour tables.

Quantisation: a row ``v`` (attention of one query over the N tokens, one head) is stored as
``q = round(v / max(v) * L)`` with ``L = 65535`` (prefix rows) or ``255`` (patch rows) and its float32
``max(v)``; the page reads ``q * max(v) / L``, within ``max(v) / (2 L)`` of the captured value. The page
shows that bound next to every value it reads out.

Two forward passes per picture: the heatmap's own path (:func:`vitattn.attention.forward_batch`: the
predictions, and the method's maps) and a capture keeping the rows above (:class:`AttentionCapture`).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitattn.attention import ImageAttention, Settings, autocast, capturing, forward_batch
from vitattn.capture import AttentionCapture
from vitattn.errors import InputError, Reason, VitattnError
from vitattn.maps import query_rows
from vitattn.options import DEFAULT_EXPLORE_BUDGET, Method, Query, RenderOptions
from vitattn.outputs import atomic_write
from vitattn.preprocess import Box

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from vitattn.heatmap import HeatmapRun
    from vitattn.job import Outcome
    from vitattn.models import LoadedModel, TokenLayout

EXPLORE = "explore.html"
"""The explorer page's file name in an input's output folder."""

#: Colour tables offered on every page, besides the run's own.
PAGE_CMAPS = ("inferno", "viridis", "magma", "plasma", "cividis", "turbo", "gray")
PREFIX_LEVELS = 65535  # 16-bit prefix rows
PATCH_LEVELS = 255  # 8-bit patch rows
_MARGIN = 64 * 1024  # JSON syntax and numbers around the base64 strings, in bytes (checked after building)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64_size(n: int) -> int:
    return 4 * ((n + 2) // 3)


def quantise(rows: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows quantised against their own maximum.

    Args:
        rows: (..., N) non-negative float.
        levels: 255 (uint8) or 65535 (uint16).

    Returns:
        (..., N) integer codes ``round(v / max * levels)`` and (...,) float32 maxima; ``code * max / levels``
        is within ``max / (2 * levels)`` of ``v``.
    """
    import torch

    rows = rows.double()  # float32 division would add up to ~1e-2 of a 16-bit step
    top = rows.amax(dim=-1).float().clamp_min(torch.finfo(torch.float32).tiny)  # (...,) as stored
    codes = (rows / top.double()[..., None] * levels).round().clamp_(0, levels)  # (..., N)
    dtype = torch.uint8 if levels == PATCH_LEVELS else torch.int32
    return codes.to(dtype), top


@dataclass(frozen=True)
class PagePlan:
    """Which blocks' rows go into a page of a given budget.

    Attributes:
        prefix_blocks: blocks whose prefix-token rows are stored (normally all captured blocks).
        patch_blocks: blocks whose patch rows are stored, in the order they were chosen (last block first).
    """

    prefix_blocks: tuple[int, ...]
    patch_blocks: tuple[int, ...]


def plan_page(
    blocks: Sequence[int], *, heads: int, prefix: int, grid: tuple[int, int], fixed: int, budget: int
) -> PagePlan:
    """Choose what fits in ``budget`` bytes after ``fixed`` bytes (photo, script, tables): prefix rows of
    each block first, then full patch rows, the last block first, while they fit."""
    gh, gw = grid
    n = prefix + gh * gw
    used = fixed + _MARGIN
    order = sorted(blocks, reverse=True)
    prefix_blocks, patch_blocks = [], []
    per_prefix = _b64_size(heads * prefix * n * 2) + _b64_size(heads * prefix * 4)
    for b in order:
        if prefix and used + per_prefix <= budget:
            prefix_blocks.append(b)
            used += per_prefix
    per_patch = _b64_size(heads * gh * gw * n) + _b64_size(heads * gh * gw * 4)
    for b in order:
        if used + per_patch <= budget:
            patch_blocks.append(b)
            used += per_patch
    return PagePlan(tuple(sorted(prefix_blocks)), tuple(patch_blocks))


class _RowsReducer:
    """Capture reducer keeping, per block, the quantised prefix rows and (for planned blocks) patch rows of
    every picture of the batch; with ``query``, it returns the query's rows (B, H, N), as
    :func:`vitattn.attention.capturing` does, so that :func:`forward_batch` runs on the same pass."""

    def __init__(
        self, plan: PagePlan, heads: Sequence[int], layout: TokenLayout, grid: tuple[int, int], query: Query | None
    ) -> None:
        self.plan, self.heads, self.layout, self.grid, self.query = plan, list(heads), layout, grid, query
        self.kept: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def __call__(self, block: int, attn: torch.Tensor) -> torch.Tensor | None:
        import numpy as np

        a = attn.detach()  # (B, H, N, N)
        p = self.layout.num_prefix_tokens
        kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if block in self.plan.prefix_blocks and p:
            codes, top = quantise(a[:, self.heads, :p, :], PREFIX_LEVELS)  # (B, H', P, N), (B, H', P)
            kept["prefix"] = (codes.cpu().numpy().astype("<u2"), top.cpu().numpy().astype("<f4"))
        if block in self.plan.patch_blocks:
            parts = [quantise(a[:, h, p:, :], PATCH_LEVELS) for h in self.heads]  # per head: less memory
            codes_np = np.stack([c.cpu().numpy() for c, _ in parts], axis=1)  # (B, H', G, N)
            top_np = np.stack([t.cpu().numpy() for _, t in parts], axis=1).astype("<f4")  # (B, H', G)
            kept["patch"] = (codes_np, top_np)
        self.kept[block] = kept
        if self.query is None:
            return None
        return query_rows(attn, self.query, self.layout, self.grid).float()  # (B, H, N)


def _photo_url(photo: Image.Image) -> str:
    buf = io.BytesIO()
    photo.convert("RGB").save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + _b64(buf.getvalue())


def _luts(cmap: str) -> dict[str, str]:
    from vitattn.colors import colormap_lut

    names = dict.fromkeys([cmap, *PAGE_CMAPS])
    return {name: _b64(colormap_lut(name).tobytes()) for name in names}


def _template(name: str) -> str:
    return resources.files("vitattn").joinpath("explorer_page", name).read_text(encoding="utf-8")


def render_template(name: str, payload: dict[str, Any], title: str) -> str:
    """A page template with its data inlined as JSON (``</`` escaped, so no string closes the script)."""
    import html

    data = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    page = _template(name)
    for part in ("explorer.css", "explorer.js") if name == "explore.html" else ():
        page = page.replace(f"/*{part}*/", _template(part))
    return page.replace("__TITLE__", html.escape(title)).replace("/*__DATA__*/", data)


def build_page(
    loaded: LoadedModel,
    settings: Settings,
    x: torch.Tensor,
    photo: Image.Image,
    box: Box,
    *,
    name: str,
    render: RenderOptions | None = None,
    budget: int = DEFAULT_EXPLORE_BUDGET,
) -> str:
    """The explorer page of one picture, as HTML text of at most ``budget`` bytes (UTF-8).

    Args:
        loaded: the model.
        settings: what to compute (the captured blocks, heads, query, method).
        x: (3, H, W) the picture preprocessed for the model.
        photo: the upright picture the page shows.
        box: the region of ``photo`` the model saw, in its pixels.
        name: what the page is titled with (the input's path).
        render: colour table, opacity and scale the page opens with, and the photo's long side.
        budget: the page's largest size in bytes.
    """
    return build_pages(loaded, settings, x[None], [photo], [box], names=[name], render=render, budget=budget)[0]


def build_pages(
    loaded: LoadedModel,
    settings: Settings,
    x: torch.Tensor,
    photos: Sequence[Image.Image],
    boxes: Sequence[Box],
    *,
    names: Sequence[str],
    render: RenderOptions | None = None,
    budget: int = DEFAULT_EXPLORE_BUDGET,
) -> list[str]:
    """:func:`build_page` for a batch ``x`` (B, 3, H, W): one forward pass for ``raw`` (the rows, the query's
    maps and the predictions), two for rollout and grad-rollout (the method's own pass, then the rows)."""
    from vitattn.overlays import _fit_photo

    check_supported(loaded, settings.blocks)
    r = render or RenderOptions()
    shown = []
    for photo, box in zip(photos, boxes, strict=True):
        fitted = _fit_photo(photo, r.max_side)  # as the overlays draw it: long side max_side, small ones scaled up
        sx, sy = fitted.width / photo.width, fitted.height / photo.height
        shown.append((fitted, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)))
    layout = loaded.layout
    bases = [
        {
            "input": name,
            "model": loaded.spec,
            "weights": loaded.weights,
            "depth": loaded.depth,
            "grid": list(settings.grid),
            "roles": list(layout.roles),
            "heads": list(settings.heads),
            "blocks": list(settings.blocks),
            "query": str(settings.query),
            "method": settings.method.value,
            "methods": {},
            "target": None,
            "top": [],
            "photo": _photo_url(fitted),
            "photo_size": list(fitted.size),
            "crop_box": [float(v) for v in box],
            "luts": _luts(r.cmap),
            "cmap": r.cmap,
            "alpha": r.alpha,
            "shared_scale": r.shared_scale,
            "fuse": settings.fuse.value,
            "levels": {"prefix": PREFIX_LEVELS, "patch": PATCH_LEVELS},
            "budget": budget,
        }
        for name, (fitted, box) in zip(names, shown, strict=True)
    ]
    atts: list[ImageAttention] | None = None
    if settings.method is not Method.raw:  # the method's own pass, exactly as the heatmap computes it
        with capturing(loaded, settings) as cap:
            atts = forward_batch(loaded, cap, x, settings)
        for base, att in zip(bases, atts, strict=True):
            base.update(_results(att))
    fixed = max(len(render_template("explore.html", base, "").encode("utf-8")) for base in bases)
    fixed += 4 * max(len(n) for n in names) + 2048  # the title twice, escaped; predictions still to come
    plan = plan_page(
        settings.blocks,
        heads=len(settings.heads),
        prefix=layout.num_prefix_tokens,
        grid=settings.grid,
        fixed=fixed,
        budget=budget,
    )
    while True:
        pages = _pages_for(loaded, settings, x, plan, bases, atts)
        if all(len(page.encode("utf-8")) <= budget for page in pages) or not plan.patch_blocks:
            return pages
        plan = replace(plan, patch_blocks=plan.patch_blocks[:-1])  # the margin was not enough: one block less


def check_supported(loaded: LoadedModel, blocks: Sequence[int]) -> None:
    """The page reads self-attention over the model's prefix tokens and one patch grid in every block it holds
    (UsageError naming the first block that is not so: windowed, pooled or class-attention sites)."""
    from vitattn.errors import UsageError

    grid = loaded.grid
    for b in blocks:
        site = loaded.sites[b]
        same = site.kind == "self" and site.layout == loaded.layout and site.layout.grid_for(loaded.input_size) == grid
        if not same:
            raise UsageError(
                f"block {b} of {loaded.spec} is {site.kind} attention over {site.layout.roles or 'no'} prefix tokens "
                "and its own token grid: the explorer shows self-attention over the model's patch grid "
                "(ViT-style blocks) only",
                option="blocks",
            )


def _results(att: ImageAttention) -> dict[str, Any]:
    return {
        "methods": _method_maps(att),
        "target": _prediction(att.target) if att.target is not None else None,
        "top": [_prediction(t) for t in att.top],
    }


def _pages_for(
    loaded: LoadedModel,
    settings: Settings,
    x: torch.Tensor,
    plan: PagePlan,
    bases: list[dict[str, Any]],
    atts: list[ImageAttention] | None,
) -> list[str]:
    """One capture pass keeping the planned rows (and, for ``raw``, giving the predictions), then the pages."""
    import torch

    raw = atts is None
    reducer = _RowsReducer(plan, settings.heads, loaded.layout, settings.grid, settings.query if raw else None)
    if raw:
        stop = settings.top_k == 0
        with AttentionCapture(
            loaded.model, settings.blocks, reduce=reducer, stop_early=stop, family=loaded.family
        ) as cap:
            atts = forward_batch(loaded, cap, x, settings)
        results = [_results(att) for att in atts]
    else:
        results = [{} for _ in bases]
        wanted = sorted({*plan.prefix_blocks, *plan.patch_blocks})
        if wanted:
            with (
                AttentionCapture(loaded.model, wanted, reduce=reducer, stop_early=True, family=loaded.family) as cap,
                torch.inference_mode(),
                autocast(loaded.device, settings.precision),
            ):
                cap.run(x.to(loaded.device))
    pages = []
    for i, (base, result) in enumerate(zip(bases, results, strict=True)):
        stored: dict[str, dict[str, Any]] = {"prefix": {}, "patch": {}}
        for b, kept in reducer.kept.items():
            for kind, (codes, top) in kept.items():
                stored[kind][str(b)] = {"q": _b64(codes[i].tobytes()), "s": _b64(top[i].tobytes())}
        payload = {**base, **result, "patch_blocks": list(plan.patch_blocks), **stored}
        pages.append(render_template("explore.html", payload, str(base["input"])))
    return pages


def _prediction(p: Any) -> dict[str, Any]:
    return {"index": p.index, "label": p.label, "prob": p.prob}


def _method_maps(att: ImageAttention) -> dict[str, Any]:
    """{method: {"query": ..., "maps": {block: base64 float32 (gh * gw)}}} for rollout / grad-rollout."""
    if att.method is Method.raw:
        return {}
    maps = {
        str(b): _b64(bm.method_map.astype("<f4").tobytes()) for b, bm in att.blocks.items() if bm.method_map is not None
    }
    return {att.method.value: {"query": str(att.query), "maps": maps}}


def write_page(path: Path, page: str) -> None:
    """Write a page atomically."""
    data = page.encode("utf-8")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


EXPLORE_BATCH = 8
"""Pictures per explorer pass at most (their full attention rows are held together)."""


def add_pages(
    run: HeatmapRun,
    *,
    budget: int = DEFAULT_EXPLORE_BUDGET,
    gallery: bool = False,
    blocks: Sequence[int] | None = (),
) -> Iterator[Outcome]:
    """The run's outcomes, each ``ok`` or ``skipped`` input with its explorer page written into its folder
    (``files.explore`` in its record); with ``gallery``, ``OUT/index.html`` is rebuilt at the end.

    ``blocks`` are the blocks the pages capture (negatives count from the end): empty for the run's own,
    None for every block.

    The pages are built once the heatmap run is done (its capture scope is closed: the model runs one capture
    at a time), in batches. A page that cannot be built fails its input.
    """
    from vitattn.job import HeatmapJob, Outcome, Prepared

    with contextlib.closing(run.outcomes()) as stream:
        outcomes = list(stream)
    # the job's own preparation (decoding, draft size, transform), without its resume check
    job = HeatmapJob(run.loaded, run.settings, run.job.render, replace(run.run, overwrite=True))
    settings = run.settings
    if blocks is None or blocks:
        chosen = range(run.loaded.depth) if blocks is None else blocks
        settings = replace(settings, blocks=tuple(sorted({run.loaded.resolve_block(b) for b in chosen})))
    size = max(1, min(run.run.batch_size, EXPLORE_BATCH))
    done: list[Outcome] = []
    for start in range(0, len(outcomes), size):
        chunk = outcomes[start : start + size]
        preps: dict[int, Prepared] = {}
        for i, outcome in enumerate(chunk):
            folder = outcome.folder
            if outcome.status not in ("ok", "skipped") or folder is None:
                continue
            if outcome.status == "skipped" and (folder / EXPLORE).is_file():
                _set_page(outcome, folder / EXPLORE)
                continue
            prep = job.prepare(outcome.item)
            if isinstance(prep, Outcome):  # the input changed since its result was written
                chunk[i] = prep
            else:
                preps[i] = prep
        for i, result in _write_pages(run, settings, list(preps.items()), budget):
            chunk[i] = _failed(chunk[i], result) if isinstance(result, InputError) else _set_page(chunk[i], result)
        done.extend(chunk)
        yield from chunk
    if gallery:
        from vitattn.gallery import write_gallery

        write_gallery(run.job.render.out, done)


def _set_page(outcome: Outcome, path: Path) -> Outcome:
    files = outcome.record.get("files")
    if isinstance(files, dict):
        files["explore"] = str(path)
    return outcome


def _write_pages(
    run: HeatmapRun, settings: Settings, preps: list[tuple[int, Any]], budget: int
) -> list[tuple[int, Path | InputError]]:
    """Build and write the pages of a batch; when the batch fails, each picture alone (so one fails alone)."""
    import torch

    from vitattn.job import exc_line
    from vitattn.store import open_locked

    if not preps:
        return []
    try:
        pages = build_pages(
            run.loaded,
            settings,
            torch.stack([p.tensor for _, p in preps]),  # (B, 3, H, W)
            [p.photo for _, p in preps],
            [p.box for _, p in preps],
            names=[str(p.item.path) for _, p in preps],
            render=run.job.render,
            budget=budget,
        )
        results: list[tuple[int, Path | InputError]] = []
        for (i, p), page in zip(preps, pages, strict=True):
            data = page.encode("utf-8")
            with open_locked(run.job.render.out, p.rel, p.item.path) as folder:  # as the result files are
                folder.write(EXPLORE, lambda f, data=data: f.write(data))  # type: ignore[misc]
            results.append((i, p.folder / EXPLORE))
        return results
    except (VitattnError, MemoryError) as exc:
        if not isinstance(exc, InputError):
            raise
        if len(preps) == 1:
            return [(preps[0][0], exc)]
    except Exception as exc:
        if len(preps) == 1:
            item = preps[0][1].item
            return [(preps[0][0], InputError(item.path, Reason.WRITE, f"explorer: {exc_line(exc)}"))]
    return [r for one in preps for r in _write_pages(run, settings, [one], budget)]


def _failed(outcome: Outcome, err: InputError) -> Outcome:
    from vitattn.job import Outcome

    record = {**outcome.record, "status": "error", "error": err.message}
    return Outcome(outcome.item, "error", record, outcome.folder, err, outcome.warnings)


class Explorer:
    """An explorer page held in memory: shown inline by Jupyter, saved with :meth:`save`.

    Attributes:
        html: the page, one self-contained HTML document.
    """

    def __init__(self, html: str) -> None:
        self.html = html

    def _repr_html_(self) -> str:
        import html

        return (
            f'<iframe srcdoc="{html.escape(self.html, quote=True)}" style="width:100%;height:900px;border:0" '
            'sandbox="allow-scripts"></iframe>'
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the page to ``path`` (atomically); returns the path."""
        target = Path(path)
        write_page(target, self.html)
        return target

    def __len__(self) -> int:
        return len(self.html.encode("utf-8"))


def explore(
    model: Any,
    image: Any,
    *,
    blocks: int | Sequence[int] | None = None,
    method: Method | str = Method.raw,
    query: str | None = None,
    heads: int | Sequence[int] | None = None,
    fuse: str = "mean",
    discard_ratio: float | None = None,
    target_class: int | None = None,
    top_k: int | None = None,
    cmap: str = RenderOptions.cmap,
    alpha: float = RenderOptions.alpha,
    max_side: int = RenderOptions.max_side,
    budget: int = DEFAULT_EXPLORE_BUDGET,
) -> Explorer:
    """The explorer page of ``model`` on one picture, for notebooks (``_repr_html_``) and files (``save``).

    Args:
        model: a timm ``nn.Module`` or a :func:`vitattn.load_model` result.
        image: a path or a PIL image.
        blocks: the blocks captured (negatives count from the end); None: every block.
        method, query, heads, fuse, discard_ratio, target_class, top_k: as for :func:`vitattn.explain`.
        cmap, alpha: the colour table and opacity the page opens with.
        max_side: long side of the photo shown, in pixels (0: its own size).
        budget: the page's largest size in bytes.
    """
    from vitattn.attention import resolve_settings
    from vitattn.explainer import _batch, _eval_mode
    from vitattn.heatmap import as_loaded
    from vitattn.job import shrink
    from vitattn.options import AttentionOptions, HeadFusion, Query, parse_choice

    options = AttentionOptions(
        blocks=(blocks,) if isinstance(blocks, int) else (tuple(blocks) if blocks is not None else None),
        method=parse_choice(Method, method, "method"),
        query=Query.parse(query) if query is not None else None,
        heads=(heads,) if isinstance(heads, int) else (tuple(heads) if heads is not None else None),
        fuse=parse_choice(HeadFusion, fuse, "fuse"),
        discard_ratio=discard_ratio,
        target_class=target_class,
        top_k=top_k,
    )
    render = RenderOptions(cmap=cmap, alpha=alpha, max_side=max_side)
    loaded = as_loaded(model)
    settings = resolve_settings(loaded, options)
    _, x, photos, boxes = _batch(loaded, image)
    photo, box = shrink(photos[0], boxes[0], max_side)
    name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else "picture"
    with _eval_mode(loaded.model):
        page = build_page(loaded, settings, x[0], photo, box, name=name, render=render, budget=budget)
    return Explorer(page)


def page_arrays(payload: dict[str, Any], kind: str, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode one block's stored rows from a page's data (for tests and tools): (H', R, N) values and their
    (H', R) maxima, as the page reads them."""
    import numpy as np

    entry = payload[kind][str(block)]
    top = np.frombuffer(base64.b64decode(entry["s"]), "<f4")
    dtype, levels = ("<u2", PREFIX_LEVELS) if kind == "prefix" else ("u1", PATCH_LEVELS)
    codes = np.frombuffer(base64.b64decode(entry["q"]), dtype).astype(np.float64)
    heads = len(payload["heads"])
    codes = codes.reshape(heads, top.size // heads, -1)
    return codes * top.reshape(heads, -1, 1) / levels, top.reshape(heads, -1)
