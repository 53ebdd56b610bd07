"""``make bench`` (second part): the Ray engine against the local engine on this machine, in the same run.

Usage: ``python -m tools.bench_ray [--images N] [--rounds R] [--workers W]``

A local Ray head (this process, ``--workers`` CPUs) serves every Ray run; each configuration is the CLI end to
end (``vitattn heatmap`` with default outputs, random weights of the default model) over N and over N/4
photos, the configurations taking turns in rotating order. From the two sizes come, per engine, the fixed cost
of a run (start, model loads, the Ray actors starting) and the cost of one more image (the slope), and their
ratios against the local engine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.bench import MODEL, make_photos


def _run(photos: Path, out: Path, extra: list[str], env: dict[str, str]) -> float:
    cmd = [sys.executable, "-m", "vitattn", "heatmap", str(photos), "-m", MODEL, "--no-pretrained", "-o", str(out)]
    start = time.perf_counter()
    subprocess.run([*cmd, "--overwrite", *extra], check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_ray", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48, help="photos in the large measurement (N/4 in the small)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians are reported)")
    parser.add_argument("--workers", type=int, default=2, help="Ray CPU workers (model replicas)")
    parser.add_argument("--workdir", default="vitattn-out/bench-ray", help="where photos and outputs go")
    args = parser.parse_args(argv)
    try:
        import ray
    except ImportError:
        print("bench_ray: Ray is not installed (pip install -e '.[ray]'); skipped", file=sys.stderr)
        return 0

    work = Path(args.workdir)
    big, small = args.images, max(2, args.images // 4)
    folders = {}
    for n in (small, big):
        folders[n] = work / f"photos{n}"
        make_photos(folders[n], n, large=False)
    temp = tempfile.mkdtemp(prefix="vb", dir="/tmp")  # Ray's socket paths must stay short
    ctx = ray.init(
        address="local", num_cpus=args.workers, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
        logging_level="ERROR",
    )  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # with the token mode ray.init set for a local head
    ray_args = ["--engine", "ray", "--ray-address", ctx.address_info["gcs_address"], "--ray-workers", str(args.workers)]
    try:
        configs = {
            f"{engine} {n}": (lambda n=n, extra=extra, engine=engine: _run(folders[n], work / engine, extra, env))
            for engine, extra in (("local", []), ("ray", ray_args))
            for n in (small, big)
        }
        results: dict[str, list[float]] = {name: [] for name in configs}
        names = list(configs)
        for r in range(args.rounds):  # the configurations take turns, in rotating order
            for name in names[r % len(names) :] + names[: r % len(names)]:
                results[name].append(configs[name]())
                print(f"  round {r + 1}/{args.rounds} {name:<12} {results[name][-1]:6.1f} s", file=sys.stderr)
    finally:
        ray.shutdown()
    med = {name: statistics.median(times) for name, times in results.items()}
    print(f"\nRay engine ({args.workers} CPU workers) against the local engine, {MODEL}, random weights, 640x480")
    print(f"medians over {args.rounds} rounds, seconds; {small} and {big} photos per run\n")
    slopes, fixed = {}, {}
    for engine in ("local", "ray"):
        slope = (med[f"{engine} {big}"] - med[f"{engine} {small}"]) / (big - small)
        slopes[engine], fixed[engine] = slope, med[f"{engine} {big}"] - slope * big
        print(
            f"{engine:<6} {small} photos {med[f'{engine} {small}']:6.1f} s, {big} photos {med[f'{engine} {big}']:6.1f}"
            f" s: {1000 * slope:6.0f} ms per more photo, {fixed[engine]:5.1f} s fixed per run"
        )
    print(
        f"\nray/local: end to end at {big} photos {med[f'local {big}'] / med[f'ray {big}']:.2f}x the throughput; "
        f"per photo {slopes['local'] / slopes['ray']:.2f}x; fixed cost {fixed['ray'] / fixed['local']:.2f}x "
        f"({fixed['ray'] - fixed['local']:+.1f} s)"
    )
    print(
        f"one Ray worker's cost per photo: {1000 * slopes['ray'] * args.workers:.0f} ms "
        f"(the local engine's {1000 * slopes['local']:.0f} ms on all cores)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
