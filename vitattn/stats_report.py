"""The dataset-statistics report: :class:`DatasetStats` (what ``vitattn stats`` computes and writes), its
tables and files, and the ``partial/`` store that makes a run resumable and reports mergeable.

Report folder::

    REPORT/heads.csv                one row per block and head: each statistic's mean and std, the sink
    REPORT/stats.json               the same, plus model, settings, counts, definitions and class maps
    REPORT/attention_distance.png   mean attention distance per block, one point per head
    REPORT/entropy.png              block × head table of the query's attention entropy
    REPORT/prefix_mass.png          block × head tables of the attention patch queries give prefix tokens
    REPORT/class_maps.png           the mean fused query map per predicted class, and overall
    REPORT/partial/part-NNNNNN.json running sums and the inputs they count (the mergeable state)
    REPORT/partial/.lock            held (flock) by the one run adding to the report

Every ``partial/`` file holds a :class:`~vitattn.statistics.StatsState` and the inputs it counts, and the
report is the merge of all of them. A file that merges others names them in ``replaces``; those are then
ignored when read (and removed), so a crash between writing it and removing them counts nothing twice.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitattn.errors import OutputError, UsageError, display_path
from vitattn.outputs import atomic_write, raise_if_fatal, write_json
from vitattn.statistics import StatsState, merge_states

PARTIAL = "partial"
HEADS_CSV = "heads.csv"
STATS_JSON = "stats.json"
PLOT_NAMES = ("attention_distance.png", "entropy.png", "prefix_mass.png", "class_maps.png")
_PART_RE = re.compile(r"^part-(\d{6,})\.json$")

#: What each statistic means, with its unit (written into stats.json).
DEFINITIONS = {
    "distance_px": "mean attention distance in input pixels: for each patch query, the distance to the patch keys "
    "weighted by its attention renormalised over the patches, averaged over the patch queries "
    "(Dosovitskiy et al. 2021, Fig. 7)",
    "distance_patches": "the same in patches (grid steps between patch centres)",
    "entropy": "entropy of the query's attention over the patches (renormalised over them) / log(patches): "
    "0 all on one patch, 1 uniform",
    "query_prefix_mass": "the query's attention to all prefix tokens",
    "prefix_mass": "attention of patch queries to all prefix tokens, mean over patch queries",
    "prefix_mass_cls": "attention of patch queries to the class token, mean over patch queries",
    "prefix_mass_dist": "attention of patch queries to the distillation token, mean over patch queries",
    "prefix_mass_reg": "attention of patch queries to all register tokens, mean over patch queries",
    "sink_share": "share of images whose query attention peaks at the same patch (sink_row, sink_col), "
    "the most frequent peak",
}


@dataclass
class DatasetStats:
    """Attention statistics over a set of images: what ``vitattn stats`` writes and
    :func:`vitattn.dataset_stats` returns.

    Attributes:
        state: the running sums (exactly mergeable).
        model: the model's description (``vitattn info --json``).
        settings: everything that decides the numbers (model, weights, blocks, query...); two reports
            merge only when these are equal.
        labels: class index -> name for the predicted classes.
        failed: inputs that could not be counted in the run that made this object.
        classes_shown: how many of the most frequent classes get a map of their own.
    """

    state: StatsState
    model: dict[str, Any]
    settings: dict[str, Any]
    labels: dict[int, str] = field(default_factory=dict)
    failed: int = 0
    classes_shown: int = 20

    @property
    def images(self) -> int:
        return self.state.images

    def label(self, cls: int) -> str:
        return self.labels.get(cls, str(cls))

    def heads(self) -> list[dict[str, Any]]:
        """One row per block and head: ``{stat}_mean``, ``{stat}_std`` for every statistic, the sink, the count."""
        s = self.state
        moments = {name: s.moments(name) for name in s.names}
        share, patch = s.sink()
        gw = s.grid[1]
        rows = []
        for li, b in enumerate(s.blocks):
            for h in range(s.heads):
                row: dict[str, Any] = {"block": b, "head": h}
                for name, (mean, std) in moments.items():
                    row[f"{name}_mean"] = _num(mean[li, h])
                    row[f"{name}_std"] = _num(std[li, h])
                row["sink_share"] = _num(share[li, h])
                row["sink_row"], row["sink_col"] = divmod(int(patch[li, h]), gw) if s.images else (None, None)
                row["images"] = s.images
                rows.append(row)
        return rows

    def class_maps(self) -> list[dict[str, Any]]:
        """The overall mean map, then the most frequent classes' (``classes_shown``), each with its count."""
        s = self.state
        entries: list[dict[str, Any]] = [
            {"class": None, "label": "all images", "images": s.images, "map": s.class_map(None)}
        ]
        for c in s.top_classes(self.classes_shown):
            entries.append({"class": c, "label": self.label(c), "images": s.class_count[c], "map": s.class_map(c)})
        return entries

    def to_json(self) -> dict[str, Any]:
        """stats.json: model, settings, counts, definitions, per block and head statistics, class maps."""
        s = self.state
        blocks: list[dict[str, Any]] = []
        for row in self.heads():
            if not blocks or blocks[-1]["block"] != row["block"]:
                blocks.append({"block": row["block"], "heads": []})
            entry: dict[str, Any] = {"head": row["head"]}
            for name in s.names:
                entry[name] = {"mean": row[f"{name}_mean"], "std": row[f"{name}_std"], "count": s.images}
            entry["sink"] = {"share": row["sink_share"], "patch": [row["sink_row"], row["sink_col"]], "count": s.images}
            blocks[-1]["heads"].append(entry)
        classes = [
            {
                "class": e["class"],
                "label": e["label"],
                "images": e["images"],
                "map": [[round(float(v), 8) for v in r] for r in e["map"]],
            }
            for e in self.class_maps()
        ]
        return {
            "model": self.model,
            "settings": self.settings,
            "images": s.images,
            "failed": self.failed,
            "classes_predicted": len(s.class_count),
            "statistics": [*s.names, "sink_share"],
            "definitions": {k: v for k, v in DEFINITIONS.items() if k in s.names or k == "sink_share"},
            "blocks": blocks,
            "class_maps": classes,
        }

    def heads_csv(self) -> str:
        rows = self.heads()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["block", "head"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()


def _num(value: Any) -> float | None:
    """A float for JSON and CSV: None for NaN (no images yet)."""
    v = float(value)
    return None if v != v else v


def write_report(stats: DatasetStats, out: Path, *, plots: bool = True) -> dict[str, str]:
    """Write heads.csv, stats.json and (``plots``) the four plots into ``out``; returns name -> path."""
    files: dict[str, str] = {}
    csv_text = stats.heads_csv().encode("utf-8")

    def write_csv(tmp: Path) -> None:
        tmp.write_bytes(csv_text)

    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / HEADS_CSV, write_csv)
        files["heads"] = os.fspath(out / HEADS_CSV)
        write_json(out / STATS_JSON, stats.to_json())
        files["stats"] = os.fspath(out / STATS_JSON)
        if plots and stats.images:
            from vitattn.stats_plots import draw_plots

            for name, path in draw_plots(stats, out).items():
                files[name] = os.fspath(path)
    except OSError as exc:
        raise_if_fatal(exc, out)
        raise OutputError(f"cannot write the report in {display_path(out)}: {exc.strerror or exc}") from exc
    return files


# -- the partial store ---------------------------------------------------------------------------
@dataclass
class Partial:
    """What a report folder's ``partial/`` holds: settings, merged state, counted inputs, its files."""

    settings: dict[str, Any] | None = None
    model: dict[str, Any] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)
    state: StatsState | None = None
    inputs: set[str] = field(default_factory=set)
    files: list[Path] = field(default_factory=list)


@contextlib.contextmanager
def report_lock(out: Path) -> Iterator[None]:
    """Hold ``out/partial/.lock`` (an exclusive ``flock``) while adding to the report; a second run that adds
    to the same report at the same time would lose counts, so it fails at once instead.

    Raises:
        OutputError: another process holds the lock, or the folder cannot be written.
    """
    folder = out / PARTIAL
    try:
        import fcntl
    except ImportError:  # no flock (Windows): unlocked
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        raise OutputError(f"cannot use {display_path(folder)}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"{display_path(out)}: another vitattn stats run is adding to this report; wait for it, or use "
                "another folder and --merge the two"
            ) from None
        yield
    finally:
        os.close(fd)


def part_files(folder: Path) -> list[tuple[int, Path]]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise OutputError(f"cannot read {display_path(folder)}: {exc.strerror or exc}") from exc
    found = [(int(m.group(1)), folder / n) for n in names if (m := _PART_RE.match(n))]
    return sorted(found)


def read_partial(out: Path) -> Partial:
    """The merged contents of ``out/partial/`` (empty when there is none).

    Raises:
        OutputError: a file there cannot be read, or the files disagree on the settings.
    """
    folder = out / PARTIAL
    chunks: list[tuple[Path, dict[str, Any]]] = []
    for _, path in part_files(folder):
        try:
            chunks.append((path, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot read {display_path(path)}: {exc}") from exc
    replaced = {name for _, c in chunks for name in c.get("replaces", [])}
    result = Partial()
    states = []
    for path, c in chunks:
        if path.name in replaced:
            continue
        if result.settings is None:
            result.settings = c["settings"]
        elif c["settings"] != result.settings:
            raise OutputError(f"{display_path(path)} holds statistics of other settings than the rest of {folder}")
        try:
            states.append(StatsState.from_dict(c["state"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise OutputError(f"{display_path(path)}: not a statistics state ({exc})") from exc
        result.model = c.get("model", result.model)
        result.labels.update({int(k): v for k, v in c.get("labels", {}).items()})
        inputs = c.get("inputs", [])
        twice = result.inputs.intersection(inputs)
        if twice:
            raise OutputError(f"{display_path(path)} counts {len(twice)} input(s) again, e.g. {sorted(twice)[0]}")
        result.inputs.update(inputs)
        result.files.append(path)
    result.state = merge_states(states) if states else None
    return result


def write_part(
    out: Path,
    *,
    settings: dict[str, Any],
    model: dict[str, Any],
    labels: dict[int, str],
    state: StatsState,
    inputs: Sequence[str],
    replaces: Iterable[Path] = (),
) -> Path:
    """Add one file to ``out/partial/`` (the next number), atomically; returns its path."""
    folder = out / PARTIAL
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {display_path(folder)}: {exc.strerror or exc}") from exc
    parts = part_files(folder)
    n = parts[-1][0] + 1 if parts else 1
    path = folder / f"part-{n:06d}.json"
    used = {c: labels[c] for c in state.class_count if c in labels}
    record = {
        "settings": settings,
        "model": model,
        "labels": {str(k): v for k, v in used.items()},
        "state": state.to_dict(),
        "inputs": list(inputs),
        "replaces": [p.name for p in replaces],
    }
    data = json.dumps(record, ensure_ascii=False, allow_nan=False).encode("utf-8", "surrogateescape")

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    try:
        atomic_write(path, write)
    except OSError as exc:
        raise_if_fatal(exc, path)
        raise OutputError(f"cannot write {display_path(path)}: {exc.strerror or exc}") from exc
    return path


def compact(out: Path, partial: Partial) -> Partial:
    """Merge every file of ``out/partial/`` into one (fewer, larger files); returns the new contents."""
    if len(partial.files) <= 1 or partial.state is None or partial.settings is None:
        return partial
    path = write_part(
        out,
        settings=partial.settings,
        model=partial.model,
        labels=partial.labels,
        state=partial.state,
        inputs=sorted(partial.inputs),
        replaces=partial.files,
    )
    remove_parts(partial.files)
    partial.files = [path]
    return partial


def remove_parts(paths: Iterable[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OutputError(f"cannot remove {display_path(p)}: {exc.strerror or exc}") from exc


def check_settings(out: Path, have: dict[str, Any] | None, want: dict[str, Any]) -> None:
    """Refuse to add to a report of other settings, naming the first difference."""
    if have is None or have == want:
        return
    diff = next((k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)), "settings")
    raise UsageError(
        f"{display_path(out)} holds statistics of other settings ({diff}: {have.get(diff)!r} there, "
        f"{want.get(diff)!r} now): use another report folder, or overwrite it",
        option="out",
    )


def merge_reports(sources: Sequence[Path], out: Path, *, overwrite: bool = False, classes: int = 20,
                  plots: bool = True) -> tuple[DatasetStats, dict[str, str]]:
    """Merge the ``partial/`` states of report folders into the report ``out`` (as one run over all inputs).

    Raises:
        UsageError: a source holds no statistics, the sources' settings differ, an input is counted in two
            sources, or ``out`` holds statistics and ``overwrite`` is not set.
    """
    parts = []
    for src in sources:
        if not src.is_dir():
            raise UsageError(f"{display_path(src)}: not a report folder", option="inputs")
        p = read_partial(src)
        if p.state is None or p.settings is None:
            raise UsageError(f"{display_path(src)}: no statistics in it ({PARTIAL}/ is empty)", option="inputs")
        parts.append((src, p))
    first_src, first = parts[0]
    assert first.settings is not None
    seen: dict[str, Path] = {k: first_src for k in first.inputs}
    for src, p in parts[1:]:
        try:
            check_settings(first_src, first.settings, p.settings or {})
        except UsageError as exc:
            raise UsageError(f"cannot merge {display_path(src)}: {exc}", option="inputs") from None
        both = [k for k in p.inputs if k in seen]
        if both:
            raise UsageError(
                f"{display_path(src)} and {display_path(seen[both[0]])} both count {len(both)} input(s), "
                f"e.g. {both[0]}: merging would count them twice",
                option="inputs",
            )
        seen.update({k: src for k in p.inputs})
    with report_lock(out):
        return _merge_into(out, parts, seen, first, overwrite=overwrite, classes=classes, plots=plots)


def _merge_into(
    out: Path,
    parts: list[tuple[Path, Partial]],
    seen: dict[str, Path],
    first: Partial,
    *,
    overwrite: bool,
    classes: int,
    plots: bool,
) -> tuple[DatasetStats, dict[str, str]]:
    assert first.settings is not None
    existing = read_partial(out)
    if existing.files and not overwrite:
        raise UsageError(f"{display_path(out)} already holds statistics: use another folder, or overwrite",
                         option="out")
    state = merge_states(p.state for _, p in parts if p.state is not None)
    labels: dict[int, str] = {}
    for _, p in parts:
        labels.update(p.labels)
    write_part(
        out,
        settings=first.settings,
        model=first.model,
        labels=labels,
        state=state,
        inputs=sorted(seen),
        replaces=existing.files,
    )
    remove_parts(existing.files)
    stats = DatasetStats(state, first.model, first.settings, labels, classes_shown=classes)
    return stats, write_report(stats, out, plots=plots)
