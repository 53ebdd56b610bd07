"""The heatmap run as one library call: options in, outcomes out. ``vitattn heatmap`` is a thin shell on it.

Example:
    >>> from vitattn import AttentionOptions, InputOptions, RenderOptions, start_heatmap
    >>> run = start_heatmap(inputs=InputOptions(["photos"], recursive=True), render=RenderOptions(out="maps"))
    >>> for outcome in run.outcomes():
    ...     print(outcome.status, outcome.folder)
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, BinaryIO

from vitattn.attention import Settings, resolve_settings
from vitattn.errors import UsageError
from vitattn.job import HeatmapJob, Outcome
from vitattn.models import LoadedModel, load_model
from vitattn.options import AttentionOptions, Engine, InputOptions, ModelOptions, RenderOptions, RunOptions

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class HeatmapSpec:
    """What builds a heatmap job, in picklable options: a cluster worker receives it and builds its own job
    (a loaded model does not travel; each worker loads one)."""

    model: ModelOptions
    attention: AttentionOptions | None
    render: RenderOptions
    run: RunOptions

    def build(self) -> HeatmapJob:
        """Load the model and resolve the options against it (what :func:`start_heatmap` does)."""
        loaded = as_loaded(self.model)
        return HeatmapJob(loaded, resolve_settings(loaded, self.attention), self.render, self.run)


@dataclass
class HeatmapRun:
    """A heatmap run whose model is loaded and whose options are checked; :meth:`outcomes` does the work.

    Attributes:
        loaded: the model.
        settings: the attention options resolved against the model.
        job: the per-batch unit of work (what a cluster worker runs).
        spec: what builds the job on a cluster worker (``Engine.ray``); None for a model given loaded.
    """

    loaded: LoadedModel
    settings: Settings
    job: HeatmapJob
    inputs: InputOptions
    run: RunOptions
    stdin: BinaryIO | None = field(default=None, repr=False)
    spec: HeatmapSpec | None = None
    _scheduler: Any = field(default=None, repr=False)

    @property
    def unreported(self) -> list[Outcome]:
        """Outcomes finished but not yielded by :meth:`outcomes` when it was stopped early (closed, Ctrl-C,
        an error): results on disk that the caller should still report, in input order."""
        return list(self._scheduler.unreported) if self._scheduler is not None else []

    def outcomes(self) -> Generator[Outcome, None, None]:
        """Discover the inputs and process them on the run's engine; one outcome per input.

        The local engine yields them in input order; the Ray engine as the cluster finishes them.

        Raises:
            OutputError: the output folder cannot be written (fatal for the run).
            EngineError: the Ray cluster cannot be reached, or its workers do not see the output folder.
        """
        from vitattn.discovery import iter_inputs

        out = self.job.render.out
        items = iter_inputs(
            list(self.inputs.paths),
            recursive=self.inputs.recursive,
            null_separated=self.inputs.null_separated,
            stdin=self.stdin,
            exclude=[out],
        )
        if self.run.engine is Engine.ray:
            from vitattn.ray_engine import RayEngine

            assert self.spec is not None  # start_heatmap refuses a loaded model with the ray engine
            yield from RayEngine(self.spec, out=self.job.render.out).run(items)
        else:
            from vitattn.scheduler import Scheduler

            self._scheduler = Scheduler(self.job, self.run)
            yield from self._scheduler.run(items)


def count_inputs(inputs: InputOptions, *, out: str | os.PathLike[str]) -> int | None:
    """How many inputs the files and folders given hold, found as a run finds them (``out`` left out), or None
    when paths come from stdin (not known in advance). A walk of the tree, no model needed; nothing is opened."""
    from vitattn.discovery import iter_inputs

    if "-" in inputs.paths:
        return None
    items = iter_inputs(list(inputs.paths), recursive=inputs.recursive, stdin=None, exclude=[out])
    return sum(1 for _ in items)


def start_heatmap(
    *,
    inputs: InputOptions,
    model: ModelOptions | LoadedModel | nn.Module | None = None,
    attention: AttentionOptions | None = None,
    render: RenderOptions | None = None,
    run: RunOptions | None = None,
    stdin: BinaryIO | None = None,
) -> HeatmapRun:
    """Load the model and check every option against it: problems that concern every input raise here.

    Args:
        inputs: files, folders, or ``-`` for paths on ``stdin``.
        model: options to load a model with, a model loaded before, or a timm ``nn.Module``; None: the
            default model, pretrained.
        attention: what to compute; None: the defaults.
        render: how to draw and where to write; None: the defaults.
        run: batch size, resume, limits and the engine; None: the defaults. The Ray engine needs ``model``
            as options (each worker loads its own copy; here it loads on the CPU, to check the options).
        stdin: the binary stream ``-`` reads; None: ``sys.stdin.buffer``.

    Raises:
        UsageError: an option does not fit the model.
        ModelError: the model or its weights cannot be loaded.
        OutputError: the output folder cannot be created.
    """
    from vitattn.outputs import prepare_out_root

    run = run or RunOptions()
    render = render or RenderOptions()
    spec = None
    if run.engine is Engine.ray:
        from vitattn.ray_engine import require_ray

        require_ray()
        if not (model is None or isinstance(model, ModelOptions)):
            raise UsageError("the ray engine loads the model on each worker: give model options", option="engine")
        spec = HeatmapSpec(model=model or ModelOptions(), attention=attention, render=render, run=run)
        model = replace(spec.model, device="cpu")  # the driver's copy only checks the options
    loaded = as_loaded(model)
    settings = resolve_settings(loaded, attention)
    job = HeatmapJob(loaded, settings, render, run)
    prepare_out_root(render.out)
    return HeatmapRun(loaded=loaded, settings=settings, job=job, inputs=inputs, run=run, stdin=stdin, spec=spec)


def as_loaded(model: ModelOptions | LoadedModel | nn.Module | None) -> LoadedModel:
    """A loaded model from options, a loaded model, or a plain timm module."""
    if isinstance(model, LoadedModel):
        return model
    if model is None or isinstance(model, ModelOptions):
        o = model or ModelOptions()
        return load_model(o.spec, weights=o.weights, pretrained=o.pretrained, device=o.device)
    from vitattn.models import wrap_model

    return wrap_model(model)
