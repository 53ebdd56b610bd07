"""``make bench``: vitattn's throughput, memory and latency against baselines measured in the same run.

Usage: ``python -m tools.bench [--images N] [--rounds R] [--device cpu|cuda] [--quick]``

Every figure is a median over alternating rounds (the configurations take turns, in rotating order, so
background load hits them alike), and each is printed as a ratio against its baseline: the ratio of the
medians, and the range of the ratios within each round (a run against the baseline run next to it):

- plain classification (decode, the model's transform, forward at batch 16): the physical limit of the job;
- vitattn end to end with default outputs (PNG, every head, mean, grid), with ``--format jpg``, and at block 5
  with ``--top-k 0`` (the forward pass stops early);
- ``vitattn stats --top-k 0`` over every block (attention distance, entropy, prefix mass, sinks), plots left out;
- the naive recipe (patched ``attn.forward`` plus a matplotlib figure per head) on a small subset;
- peak memory (max RSS) of the CLI for 100 and for 1000 images;
- ``vitattn --help`` latency, and one image through the CLI against a bare script that imports timm,
  creates the model and runs it once;
- bf16 autocast: speed-up and fidelity against fp32 (colour levels of the rendered maps).

Weights are random (nothing is downloaded); the architecture is the default model's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODEL = "deit_small_distilled_patch16_224"
PLAIN_BATCH = 16
NAIVE_IMAGES = 6


def _photo(seed: int, size: tuple[int, int]) -> Any:
    """A photo-like picture: smooth colour fields, edges and sensor noise (JPEG-compressible like a photo)."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 255, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)
    for _ in range(6):  # a few hard-edged shapes
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = min(w, x0 + int(rng.integers(w // 10, w // 3))), min(h, y0 + int(rng.integers(h // 10, h // 3)))
        arr[y0:y1, x0:x1] = rng.integers(0, 255, 3)
    arr += rng.normal(0, 6, arr.shape)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)
    return out


def make_photos(folder: Path, n: int, *, large: bool) -> list[Path]:
    """Deterministic JPEGs: 1.2-1.9 MP when ``large`` (like phone photos), else 640x480. Reused when present."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(1600, 1200), (1280, 960), (1200, 1600), (1440, 1080)] if large else [(640, 480)]
    paths = []
    for i in range(n):
        p = folder / f"img{i:04d}.jpg"
        if not p.exists():
            _photo(i, sizes[i % len(sizes)]).save(p, quality=90)
        paths.append(p)
    return paths


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from vitattn.models import load_model

        self.args = args
        self.root = Path(args.workdir)
        self.photos = make_photos(self.root / "photos", args.images, large=True)
        self.loaded = load_model(MODEL, pretrained=False, device=args.device)
        self.device = self.loaded.device
        # Output folders are removed at the end, not after each run: on a filesystem whose inode allocator
        # steps over recently deleted inodes (ext4 without a journal, as on this project's machines), deleting
        # a run's few hundred files made file creation in the next minutes cost up to 1.3 ms of CPU instead of
        # 0.02 ms (measured), slowing whichever configuration came next.
        self.outputs: list[Path] = []
        torch.manual_seed(0)

    # -- configurations -----------------------------------------------------------------------
    def plain(self) -> float:
        """What a plain classification script does: decode, transform, forward at batch 16."""
        import torch
        from PIL import Image

        model, transform = self.loaded.model, self.loaded.transform
        start = time.perf_counter()
        for i in range(0, len(self.photos), PLAIN_BATCH):
            batch = []
            for p in self.photos[i : i + PLAIN_BATCH]:
                with Image.open(p) as im:
                    batch.append(transform(im.convert("RGB")))
            with torch.inference_mode():
                logits = model(torch.stack(batch).to(self.device))
                logits.softmax(-1).topk(5)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return len(self.photos) / (time.perf_counter() - start)

    def vitattn(self, **kw: Any) -> float:
        from vitattn.heatmap import start_heatmap
        from vitattn.options import AttentionOptions, InputOptions, RenderOptions

        fmt = kw.pop("format", "png")
        out = Path(tempfile.mkdtemp(dir=self.root, prefix="out-"))
        run = start_heatmap(
            inputs=InputOptions(tuple(str(p) for p in self.photos)),  # exactly these, whatever else the folder holds
            model=self.loaded,
            attention=AttentionOptions(**kw),
            render=RenderOptions(out=out, format=fmt),
        )
        start = time.perf_counter()
        n = sum(1 for o in run.outcomes() if o.status == "ok")
        elapsed = time.perf_counter() - start
        self.outputs.append(out)
        if n != len(self.photos):
            raise SystemExit(f"bench: vitattn processed {n} of {len(self.photos)} images")
        return n / elapsed

    def stats(self) -> float:
        """``vitattn stats --top-k 0`` at every block (the plots, drawn once per report, are left out)."""
        from vitattn.options import AttentionOptions, InputOptions, StatsOptions
        from vitattn.stats_run import start_stats

        out = Path(tempfile.mkdtemp(dir=self.root, prefix="stats-"))
        run = start_stats(
            inputs=InputOptions(tuple(str(p) for p in self.photos)),
            model=self.loaded,
            attention=AttentionOptions(blocks=None, top_k=0),
            stats=StatsOptions(out=out, plots=False),
        )
        start = time.perf_counter()
        n = sum(1 for o in run.outcomes() if o.status == "ok")
        elapsed = time.perf_counter() - start
        self.outputs.append(out)
        if n != len(self.photos) or run.report is None or run.report.images != n:
            raise SystemExit(f"bench: vitattn stats counted {n} of {len(self.photos)} images")
        return n / elapsed

    def naive(self) -> float:
        """The recipe users copy: patch blocks[-1].attn.forward, slice [:, :, 0, 2:], a figure per head."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import torch
        from PIL import Image

        model, transform = self.loaded.model, self.loaded.transform
        attn_mod = model.blocks[-1].attn  # type: ignore[index, union-attr]
        original = attn_mod.forward
        store: dict[str, torch.Tensor] = {}

        def patched(x: torch.Tensor, attn_mask: Any = None, **_: Any) -> torch.Tensor:
            b, n, c = x.shape
            qkv = attn_mod.qkv(x).reshape(b, n, 3, attn_mod.num_heads, c // attn_mod.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            attn = (q @ k.transpose(-2, -1)) * attn_mod.scale
            attn = attn.softmax(dim=-1)
            store["attn"] = attn
            x = (attn @ v).transpose(1, 2).reshape(b, n, c)
            return attn_mod.proj(x)  # type: ignore[no-any-return]

        out = Path(tempfile.mkdtemp(dir=self.root, prefix="naive-"))
        photos = self.photos[:NAIVE_IMAGES]
        attn_mod.forward = patched
        try:
            start = time.perf_counter()
            for j, p in enumerate(photos):
                with Image.open(p) as im:
                    img = im.convert("RGB")
                with torch.inference_mode():
                    model(transform(img)[None].to(self.device))
                a = store["attn"][0, :, 0, 2:].reshape(-1, 14, 14).float().cpu().numpy()
                for h in range(a.shape[0]):
                    fig, ax = plt.subplots(figsize=(6, 6))
                    ax.imshow(img)
                    ax.imshow(a[h], cmap="inferno", alpha=0.6, extent=(0, img.width, img.height, 0))
                    ax.axis("off")
                    fig.savefig(out / f"{j}_{h}.png", bbox_inches="tight")
                    plt.close(fig)
            elapsed = time.perf_counter() - start
        finally:
            attn_mod.forward = original
            self.outputs.append(out)
        return len(photos) / elapsed

    # -- subprocess measurements ----------------------------------------------------------------
    def cleanup(self) -> None:
        """Remove every output folder the runs left."""
        for out in self.outputs:
            shutil.rmtree(out, ignore_errors=True)
        self.outputs.clear()

    def memory(self, n: int, photos: list[Path]) -> float:
        """Peak RSS (MiB) of one CLI process over ``n`` photos piped in as a list (early-exit, jpg outputs)."""
        out = Path(tempfile.mkdtemp(dir=self.root, prefix="mem-"))
        listing = b"\n".join(os.fsencode(p) for p in photos[:n]) + b"\n"
        args = ["vitattn", "heatmap", "-", "--no-pretrained", "--format", "jpg", "-b", "5", "--top-k", "0"]
        args += ["-o", str(out), "--device", self.args.device]
        wrapper = (
            "import atexit, resource, runpy, sys; atexit.register(lambda: sys.stderr.write("
            "f'\\nMAXRSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n')); "
            f"sys.argv = {args!r}; runpy.run_module('vitattn', run_name='__main__')"
        )
        proc = subprocess.run([sys.executable, "-c", wrapper], input=listing, capture_output=True, check=False)
        self.outputs.append(out)
        if proc.returncode != 0:
            raise SystemExit(f"bench: memory run failed: {proc.stderr.decode()[-500:]}")
        line = [ln for ln in proc.stderr.decode().splitlines() if ln.startswith("MAXRSS ")][-1]
        return int(line.split()[1]) / 1024.0

    def latency(self, cmd: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        return time.perf_counter() - start

    def fidelity(self) -> tuple[float, float]:
        """bf16 against fp32: mean and max difference of the rendered (scaled) maps, in colour levels."""
        import numpy as np
        from PIL import Image

        from vitattn.colors import scale_maps
        from vitattn.explainer import explain

        images = []
        for p in self.photos[:8]:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        diffs = []
        for precision in ("fp32", "bf16"):
            res = explain(self.loaded, images, blocks=-1, top_k=0, precision=precision)
            diffs.append(np.stack([scale_maps(r.blocks[max(r.blocks)].heads, shared=False) for r in res]))
        levels = np.abs(diffs[0] - diffs[1]) * 255
        return float(levels.mean()), float(levels.max())


def _spread(values: list[float] | None) -> str:
    """`` (lo-hi)`` over the rounds, so that the noise behind a median is visible; empty for a single value."""
    return f" ({min(values):.1f}-{max(values):.1f})" if values and len(values) > 1 else ""


def _paired(values: list[float] | None, baseline: list[float]) -> str:
    """The lowest and highest of each round's ratio to the baseline's run in the same round, as ``lo-hi``."""
    if not values or len(values) != len(baseline) or len(values) < 2:
        return ""
    ratios = [v / b for v, b in zip(values, baseline, strict=True)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}x"


def _rounds(funcs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {k: [] for k in funcs}
    names = list(funcs)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            results[name].append(funcs[name]())
            print(f"  round {r + 1}/{rounds} {name:<28} {results[name][-1]:7.2f} img/s", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48, help="photos per throughput measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians are reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workdir", default="vitattn-out/bench", help="where photos and outputs go")
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds, skip the 1000-image run")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 16, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    print(
        f"vitattn bench: {MODEL} (random weights), device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, {args.images} photos of 1.2-1.9 MP, "
        f"{args.rounds} rounds",
        file=sys.stderr,
    )
    bench = Bench(args)
    try:
        return _measure(bench, args)
    finally:
        bench.cleanup()


def _measure(bench: Bench, args: argparse.Namespace) -> int:
    """Every measurement, then the table."""
    configs: dict[str, Callable[[], float]] = {
        "plain classification": bench.plain,
        "vitattn default (png)": bench.vitattn,
        "vitattn --format jpg": lambda: bench.vitattn(format="jpg"),
        "vitattn -b 5 --top-k 0 jpg": lambda: bench.vitattn(format="jpg", blocks=[5], top_k=0),
        "naive recipe": bench.naive,
        "vitattn stats --top-k 0": bench.stats,
    }
    results = _rounds(configs, args.rounds)
    med = {k: _median(v) for k, v in results.items()}
    # bf16 once, outside the rounds: on CPUs without native bf16 it is several times slower than fp32
    med["vitattn --precision bf16 jpg"] = bench.vitattn(format="jpg", precision="bf16")
    plain = med["plain classification"]

    mem_photos = make_photos(bench.root / "small", 100 if args.quick else 1000, large=False)
    mem100 = bench.memory(100, mem_photos)
    mem1000 = float("nan") if args.quick else bench.memory(1000, mem_photos)

    cli = [sys.executable, "-m", "vitattn"]
    one = str(bench.photos[0])
    one_out = str(bench.root / "one")
    bare = (
        "import sys, torch, timm; from PIL import Image; from timm.data import resolve_model_data_config, "
        "create_transform; m = timm.create_model(sys.argv[1], pretrained=False).eval(); "
        "t = create_transform(**resolve_model_data_config(m)); "
        "torch.inference_mode().__enter__(); print(m(t(Image.open(sys.argv[2]).convert('RGB'))[None]).argmax())"
    )
    help_t, one_t, bare_t = [], [], []
    for _ in range(3 if args.quick else 5):
        help_t.append(bench.latency([*cli, "--help"]))
        shutil.rmtree(one_out, ignore_errors=True)
        one_t.append(bench.latency([*cli, "heatmap", one, "--no-pretrained", "-o", one_out, "--device", args.device]))
        bare_t.append(bench.latency([sys.executable, "-c", bare, MODEL, one]))
    fid_mean, fid_max = bench.fidelity()

    base = results["plain classification"]
    rows: list[tuple[str, str, str, str, str]] = [
        ("plain classification", f"{plain:.2f} img/s{_spread(base)}", "1.00x", "", "baseline"),
        *[
            (
                name,
                f"{med[name]:.2f} img/s{_spread(results.get(name))}",
                f"{med[name] / plain:.2f}x",
                _paired(results.get(name), base),
                target,
            )
            for name, target in (
                ("vitattn default (png)", ">= 0.6x"),
                ("vitattn --format jpg", ">= 0.9x"),
                ("vitattn -b 5 --top-k 0 jpg", ">= 1.8x"),
                ("vitattn --precision bf16 jpg", "opt-in"),
                ("vitattn stats --top-k 0", ">= 0.8x"),
                ("naive recipe", ""),
            )
        ],
        (
            "vitattn default vs naive",
            "",
            f"{med['vitattn default (png)'] / med['naive recipe']:.1f}x",
            _paired(results["vitattn default (png)"], results["naive recipe"]),
            ">= 10x",
        ),
        ("peak RSS, 100 images", f"{mem100:.0f} MiB", "", "", ""),
        ("peak RSS, 1000 images", f"{mem1000:.0f} MiB", f"{mem1000 / mem100:.2f}x", "", "<= 1.2x"),
        ("vitattn --help", f"{_median(help_t) * 1000:.0f} ms", "", "", "< 500 ms"),
        ("one image, CLI", f"{_median(one_t):.2f} s", f"{_median(one_t) / _median(bare_t):.2f}x", "", "<= 1.2x"),
        ("one image, bare timm script", f"{_median(bare_t):.2f} s", "1.00x", "", "baseline"),
        ("bf16 vs fp32 maps", f"mean {fid_mean:.2f}, max {fid_max:.0f}", "", "", "colour levels of 255"),
    ]
    print(f"\n{'measure':<30} {'value (range over rounds)':>34} {'ratio':>8} {'per round':>13}  target")
    for name, value, ratio, paired, target in rows:
        print(f"{name:<30} {value:>34} {ratio:>8} {paired:>13}  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
