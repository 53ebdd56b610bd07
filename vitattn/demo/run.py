"""``make demo``: the default model on the sample photos, or, offline, the bundled model on the demo pictures.

Usage: ``python -m vitattn.demo.run [OUT]`` (default ``vitattn-out/demo``). In a checkout the repository's
``sample_images/`` are used; where vitattn is installed without them, the demo pictures are generated into
``OUT/pictures`` (the same pictures: they are made from fixed seeds) and the offline path is taken.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from vitattn.cli import main as cli_main
from vitattn.demo import DEMO_MODEL_DIR
from vitattn.models import pretrained_unavailable
from vitattn.options import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[2]
PHOTOS = REPO / "sample_images" / "photos"
PICTURES = REPO / "sample_images" / "synthetic"


def demo_pictures(out: Path) -> Path:
    """The folder of demo pictures: the repository's, or generated under ``out`` when they are not at hand."""
    if PICTURES.is_dir() and any(PICTURES.glob("*.png")):
        return PICTURES
    from vitattn.demo.synthetic import SAMPLE_COUNT, SAMPLE_SCALE, save_samples

    folder = out / "pictures"
    save_samples(folder, SAMPLE_COUNT, SAMPLE_SCALE)
    return folder


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "vitattn-out/demo").absolute()
    reason = pretrained_unavailable(DEFAULT_MODEL)
    if reason is None and PHOTOS.is_dir():
        pictures, args = PHOTOS, ["-o", str(out)]  # out/photos/<name>/
    else:
        why = f"the weights of {DEFAULT_MODEL} cannot be fetched ({reason})" if reason else "no sample photos here"
        sys.stderr.write(f"vitattn demo: {why}; running the bundled shapes model on the demo pictures instead\n")
        pictures = demo_pictures(out)
        # out/synthetic/<name>/ in a checkout; generated pictures (out/pictures/) give out/synthetic/pictures/<name>/
        target = out if pictures == PICTURES else out / "synthetic"
        args = ["-m", f"local-dir:{DEMO_MODEL_DIR}", "-o", str(target), "--npy"]
    os.chdir(pictures.parent)  # results are named by the inputs' paths relative to the current folder
    sys.argv = ["vitattn", "heatmap", pictures.name, *args]
    cli_main()


if __name__ == "__main__":
    main()
