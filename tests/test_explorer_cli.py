"""``vitattn explore`` and ``vitattn heatmap --html`` from the command line (the bundled demo model), and the
gallery ``OUT/index.html`` in a real browser: good and bad inputs, links, a resumed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
from typer.testing import CliRunner

from tests.browser import browser, open_file  # noqa: F401  (browser is a fixture)
from vitattn.cli import app
from vitattn.gallery import GALLERY

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


REPO = Path(__file__).resolve().parent.parent


def run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}  # this checkout's code, from any folder
    return subprocess.run([sys.executable, "-m", "vitattn", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


def demo_picture(path: Path, seed: int) -> Path:
    from vitattn.demo.synthetic import make_picture

    make_picture(seed).image.save(path)
    return path


def records(proc: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


def invoke(args: list[str]) -> Any:
    """The CLI in this process (no interpreter start: torch is imported once); ``returncode`` as a process's."""
    result = CliRunner().invoke(app, args)
    result.returncode = result.exit_code
    return result


def test_explore_prints_the_page_and_its_record(tmp_path: Path) -> None:
    a = demo_picture(tmp_path / "a.png", 1)
    proc = run(["explore", str(a), "-m", "demo", "-o", str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].endswith("explore.html") and Path(lines[0]).is_file()
    page = Path(lines[0]).read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    proc = invoke(["explore", str(a), "-m", "demo", "-o", str(tmp_path / "out2"), "--json", "--explore-budget", "0.3"])
    assert proc.returncode == 0, proc.stderr
    (rec,) = records(proc)
    path = Path(rec["files"]["explore"])
    assert rec["status"] == "ok" and path.is_file() and path.stat().st_size <= 300_000


def test_demo_page_screenshots(browser: Any, tmp_path: Path) -> None:  # noqa: F811
    """The bundled demo model's page, every block: the class token's view and a pinned patch's view. With
    VITATTN_SCREENSHOTS=1 (``make screenshots``) the two screenshots replace the README's in docs/images."""
    demo_picture(tmp_path / "square.png", 5)
    proc = run(["explore", "square.png", "-m", "demo", "-o", "out", "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (rec,) = records(proc)
    opened = open_file(browser, tmp_path / rec["files"]["explore"])
    page = opened.page
    depth, heads = 4, 4  # the demo model
    assert page.locator("#multiples canvas").count() == depth * (heads + 1)
    docs = Path(__file__).resolve().parent.parent / "docs" / "images"
    folder = docs if os.environ.get("VITATTN_SCREENSHOTS") else tmp_path
    box = page.locator("#view").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.45)
    page.wait_for_function("() => document.getElementById('readout').dataset.row !== undefined")
    page.screenshot(path=str(folder / "explorer_cls.png"))
    page.select_option("#query", "patch")
    page.mouse.click(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.6)  # pin a patch on the shape
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.3)
    page.wait_for_function("() => document.getElementById('readout').textContent.includes('query patch:')")
    page.screenshot(path=str(folder / "explorer_patch.png"))
    assert (folder / "explorer_cls.png").stat().st_size > 10_000
    opened.check_clean()
    page.close()


def test_explore_open_opens_the_first_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import webbrowser

    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url) or True)
    a, b = demo_picture(tmp_path / "a.png", 1), demo_picture(tmp_path / "b.png", 2)
    result = CliRunner().invoke(app, ["explore", str(a), str(b), "-m", "demo", "-o", str(tmp_path / "o"), "--open"])
    assert result.exit_code == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert opened == [Path(first).resolve().as_uri()]


def gallery_rows(page: Any) -> list[dict[str, str]]:
    return page.evaluate(  # type: ignore[no-any-return]
        "() => Array.from(document.querySelectorAll('#rows tr')).map(tr => ({input: tr.dataset.input,"
        " status: tr.className, text: tr.textContent}))"
    )


def check_links(page: Any) -> int:
    """Every link and thumbnail of the gallery points at an existing file; returns how many."""
    urls = page.evaluate(
        "() => [...Array.from(document.querySelectorAll('#rows a')).map(a => a.href),"
        " ...Array.from(document.querySelectorAll('#rows img')).map(i => i.src)]"
    )
    for url in urls:
        path = Path(unquote(urlparse(url).path))
        assert path.exists(), url
        if path.is_dir():
            assert (path / "meta.json").is_file()
    return len(urls)


def test_gallery_lists_every_input_once_and_a_resumed_run_completes_it(browser: Any, tmp_path: Path) -> None:  # noqa: F811
    photos = tmp_path / "photos"
    (photos / "sub dir").mkdir(parents=True)
    demo_picture(photos / "a.png", 1)
    (photos / "bad.jpg").write_bytes(b"not a picture at all")
    out = tmp_path / "maps"
    args = ["heatmap", str(photos), "-r", "-m", "demo", "-o", str(out), "--html", "--json"]
    first = invoke(args)
    assert first.returncode == 1, first.stderr  # one input failed
    recs = {Path(r["input"]).name: r for r in records(first)}
    assert recs["a.png"]["status"] == "ok" and Path(recs["a.png"]["files"]["explore"]).is_file()
    assert recs["bad.jpg"]["status"] == "error"

    # the run is resumed with one more picture: the first result is skipped, and the gallery lists all three
    demo_picture(photos / "sub dir" / "b #1.png", 2)  # characters that need quoting in a URL
    second = invoke(args)
    assert second.returncode == 1, second.stderr
    statuses = {Path(r["input"]).name: r["status"] for r in records(second)}
    assert statuses == {"a.png": "skipped", "b #1.png": "ok", "bad.jpg": "error"}
    opened = open_file(browser, out / GALLERY, ready="#rows tr")
    page = opened.page
    rows = gallery_rows(page)
    assert sorted(Path(r["input"]).name for r in rows) == ["a.png", "b #1.png", "bad.jpg"]  # each once
    bad = next(r for r in rows if r["input"].endswith("bad.jpg"))
    assert bad["status"] == "error" and "not an image" in bad["text"]
    assert check_links(page) == 2 * 3  # folder, explorer and thumbnail of both results
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    page.locator("#filter").fill("bad")
    assert [r["input"] for r in gallery_rows(page)] == [bad["input"]]
    page.locator("#filter").fill("")
    page.select_option("#status", "ok")
    assert len(gallery_rows(page)) == 2
    page.select_option("#status", "")
    page.locator("th[data-key=input]").click()  # already sorted by input: the click reverses
    names = [r["input"] for r in gallery_rows(page)]
    assert names == sorted(names, reverse=True)
    opened.check_clean(files_under=out)
    page.close()
    # the explorer page linked from the gallery opens from file:// too
    link = Path(unquote(urlparse(page_link := records(second)[0]["files"]["explore"]).path))
    assert link.is_file(), page_link
    opened = open_file(browser, link)
    opened.check_clean()
    opened.page.close()


def test_gallery_scales_to_many_rows(browser: Any, tmp_path: Path) -> None:  # noqa: F811
    """10,000 results: the gallery lays out one chunk of rows at first, and more as it scrolls."""
    from vitattn.explorer import render_template

    rows = [{"input": f"photos/{i:05d}.jpg", "status": "ok", "folder": f"photos/{i:05d}.jpg", "label": "cat",
             "prob": 0.5, "thumb": f"photos/{i:05d}.jpg/block11_mean.png", "explore": None} for i in range(10_000)]
    path = tmp_path / GALLERY
    path.write_text(render_template(GALLERY, {"rows": rows, "out": "x"}, "x"), encoding="utf-8")
    opened = open_file(browser, path, ready="#rows tr")
    page = opened.page
    assert page.locator("#rows tr").count() == 200
    page.locator("#filter").fill("0999")
    assert page.locator("#rows tr").count() == 11  # 00999 and 09990..09999
    page.locator("#filter").fill("")
    page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
    page.wait_for_function("() => document.querySelectorAll('#rows tr').length > 200")
    page.close()
