"""``make demo``: the default model on the sample photos, or, offline, the bundled model on the demo pictures.

Usage: ``python -m vitattn.demo.run [OUT]`` (default ``vitattn-out/demo``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from vitattn.cli import main as cli_main
from vitattn.models import pretrained_unavailable
from vitattn.options import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[2]
PHOTOS = REPO / "sample_images" / "photos"
PICTURES = REPO / "sample_images" / "synthetic"
BUNDLED = Path(__file__).resolve().parent / "shapes_vit"


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "vitattn-out/demo")
    reason = pretrained_unavailable(DEFAULT_MODEL)
    if reason is None:
        args = ["heatmap", str(PHOTOS), "-o", str(out / "photos")]
    else:
        sys.stderr.write(
            f"vitattn demo: the weights of {DEFAULT_MODEL} cannot be fetched ({reason}); "
            f"running the bundled shapes model on the demo pictures instead\n"
        )
        args = ["heatmap", str(PICTURES), "-m", f"local-dir:{BUNDLED}", "-o", str(out / "synthetic"), "--npy"]
    sys.argv = ["vitattn", *args]
    cli_main()


if __name__ == "__main__":
    main()
