"""The gallery of an output folder: ``OUT/index.html``, one row per input, rebuilt from the ``meta.json`` files.

Every result under the folder is listed, also those of earlier runs into it (a resumed run's gallery is
complete); the inputs that failed in this run are listed with their reason. The page is one file with its
rows as inline data: it lays out rows as they scroll into view and loads thumbnails lazily, so a folder of
10,000 results stays responsive; columns sort, and a text box and the status filter the rows.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from vitattn.store import META, peek

if TYPE_CHECKING:
    from vitattn.job import Outcome

GALLERY = "index.html"
"""The gallery's file name in the output folder."""

EXPLORE = "explore.html"  # vitattn.explorer.EXPLORE (not imported: that module loads torch)
_PICTURES = (".png", ".jpg", ".jpeg", ".webp")


def _url(out: Path, path: Path) -> str:
    """A relative URL from ``out/index.html`` to ``path``, each segment percent-encoded."""
    rel = os.path.relpath(path, out)
    return "/".join(quote(part, safe="") for part in Path(rel).parts)


_NOT_THUMBS = re.compile(r"_(head\d+|grid|mask)(_|\.)|\.npy$")


def thumbnail_name(meta: dict[str, Any]) -> str | None:
    """The fused map (or the method's map) of the latest run's first block, from the folder's result entries;
    else the first such picture among its files."""
    from vitattn.store import results_of

    blocks = meta.get("blocks") or []
    entries = [e for e in results_of(meta).values() if e.get("state") == "complete"]
    first = [e for e in entries if blocks and e.get("block") == blocks[0]]
    same = [e for e in first if e.get("method") == meta.get("method")] or first
    names: list[Any] = [n for e in same for n in e.get("files", [])] or list(meta.get("files", []))
    for name in names:
        if isinstance(name, str) and name.lower().endswith(_PICTURES) and not _NOT_THUMBS.search(name):
            return name
    return None


def gallery_rows(out: Path, outcomes: Iterable[Outcome] = ()) -> list[dict[str, Any]]:
    """One row per input: every result under ``out`` (from its meta.json), then this run's failures.

    An input that failed in this run is listed once, as failed, even when an older result of it exists.
    """
    failed = {}
    for o in outcomes:
        if o.status == "error":
            failed[str(o.record.get("input", o.item.path))] = o
    rows: list[dict[str, Any]] = []
    for folder, dirs, names in os.walk(out):
        dirs.sort()
        if META not in names:
            continue
        here = Path(folder)
        meta, _ = peek(here)
        if meta is None or not isinstance(meta.get("input"), str):
            continue
        name = meta["input"]
        if name in failed:
            continue
        top = meta.get("top") or []
        thumb = thumbnail_name(meta)
        row: dict[str, Any] = {
            "input": name,
            "status": "ok",
            "folder": _url(out, here),
            "label": top[0].get("label") if top else None,
            "prob": top[0].get("prob") if top else None,
            "thumb": _url(out, here / thumb) if thumb else None,
            "explore": _url(out, here / EXPLORE) if (here / EXPLORE).is_file() else None,
            "model": (meta.get("settings") or {}).get("model"),
        }
        rows.append(row)
    for name, o in failed.items():
        reason = o.error.reason if o.error is not None else o.record.get("error")
        detail = o.error.message if o.error is not None else str(reason)
        rows.append({"input": name, "status": "error", "reason": str(reason), "detail": detail})
    rows.sort(key=lambda r: r["input"])
    return rows


def write_gallery(out: Path, outcomes: Iterable[Outcome] = ()) -> Path:
    """Rebuild ``out/index.html`` (atomically) from the results under ``out`` and this run's outcomes."""
    from vitattn.explorer import render_template, write_page

    rows = gallery_rows(out, outcomes)
    page = render_template(GALLERY, {"rows": rows, "out": os.fspath(out)}, f"vitattn: {out}")
    path = out / GALLERY
    write_page(path, page)
    return path
