"""``make bench`` (explorer part): the cost of an explorer page against the default heatmap outputs, its size,
and how fast it draws in headless Chromium.

Usage: ``python -m tools.bench_explorer [--images N] [--rounds R] [--quick]``

- time per image of ``vitattn heatmap --html`` (last block) and of ``vitattn explore`` (the last block's
  PNGs and a page holding every block) against ``vitattn heatmap`` (default outputs), the same photos, through the
  library (no process start), alternating rounds, median and per-round ratio ranges;
- the page's size for the default model (every block) against its 24 MB budget;
- in headless Chromium (the system's, through Playwright): time to first paint (navigation to the first drawn
  frame) and the redraw per hover (class-token query: picture, readout, statistics, small multiples; and a
  patch query, whose map changes with every patch), medians; the target is one frame (16 ms).

Weights are random (nothing is downloaded); the architecture is the default model's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tools.bench import MODEL, _median, _paired, _rounds, make_photos


def _heatmap(photos: list[Path], out: Path, *, html: bool, every_block: bool = False) -> float:
    """Images per second of one heatmap run (outputs redone), with or without the explorer pages."""
    from vitattn import AttentionOptions, InputOptions, RenderOptions, RunOptions, start_heatmap
    from vitattn.explorer import add_pages

    run = start_heatmap(
        inputs=InputOptions(tuple(str(p) for p in photos)),
        model=_loaded(),
        attention=AttentionOptions(blocks=(-1,)),
        render=RenderOptions(out=out),
        run=RunOptions(overwrite=True),
    )
    t0 = time.perf_counter()
    outcomes = list(add_pages(run, blocks=None if every_block else ())) if html else list(run.outcomes())
    assert all(o.status == "ok" for o in outcomes), [o.record for o in outcomes]
    return len(photos) / (time.perf_counter() - t0)


_LOADED: Any = None


def _loaded() -> Any:
    global _LOADED
    if _LOADED is None:
        from vitattn.models import load_model

        _LOADED = load_model(MODEL, pretrained=False, device="cpu")
    return _LOADED


def _browser_figures(page_path: Path, hovers: int) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("VITATTN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("bench_explorer: no chromium (make install installs it)")
    figures: dict[str, list[float]] = {"first paint": [], "hover, cls query": [], "hover, patch query": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for _ in range(3):
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(page_path.resolve().as_uri())
            page.wait_for_selector("body[data-ready='1']")
            figures["first paint"].append(float(page.evaluate("() => document.body.dataset.firstPaintMs")))
            box = page.locator("#view").bounding_box()
            assert box is not None
            for mode, key in (("p0", "hover, cls query"), ("patch", "hover, patch query")):
                page.select_option("#query", mode)
                page.evaluate("() => { window.vitattnDrawMs.length = 0; }")
                for i in range(hovers):  # a diagonal sweep: a new patch (mostly) at every step
                    f = 0.1 + 0.8 * i / max(1, hovers - 1)
                    page.mouse.move(box["x"] + box["width"] * f, box["y"] + box["height"] * (1 - f))
                    page.evaluate("() => new Promise(requestAnimationFrame)")
                figures[key].extend(page.evaluate("() => window.vitattnDrawMs.slice()"))
            page.close()
        browser.close()
    return {k: _median(v) for k, v in figures.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_explorer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="photos per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians are reported)")
    parser.add_argument("--hovers", type=int, default=40, help="hover steps per query kind and page load")
    parser.add_argument("--quick", action="store_true", help="fewer images, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds, args.hovers = 2, 1, 10
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="vitattn-bench-explorer-"))
    try:
        photos = make_photos(root / "photos", args.images, large=False)
        results = _rounds(
            {
                "heatmap (default outputs)": lambda: _heatmap(photos, root / "plain", html=False),
                "heatmap --html": lambda: _heatmap(photos, root / "html1", html=True),
                "explore (every block)": lambda: _heatmap(photos, root / "html", html=True, every_block=True),
            },
            args.rounds,
        )
        base = results["heatmap (default outputs)"]
        page = next((root / "html").rglob("explore.html"))
        size = page.stat().st_size
        browser = _browser_figures(page, args.hovers)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [  # time per image, and how many times the default outputs' time (per round: the same ratio)
        (name, f"{1000 / _median(v):.0f} ms/img", f"{_median(base) / _median(v):.2f}x", _paired(base, v))
        for name, v in results.items()
    ]
    rows.append(("page size (default model, 12 blocks)", f"{size / 1e6:.1f} MB", f"{size / 24e6:.2f} of budget", ""))
    for key, ms in browser.items():
        target = "" if key == "first paint" else ("within 16 ms" if ms <= 16 else "over 16 ms")
        rows.append((f"chromium: {key}", f"{ms:.1f} ms", target, ""))
    width = max(len(r[0]) for r in rows)
    print(f"{'explorer':<{width}}  {'median':>12}  {'ratio':>16}  per-round")
    for name, value, ratio, spread in rows:
        print(f"{name:<{width}}  {value:>12}  {ratio:>16}  {spread}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
