"""The module's logic without the Slicer application: usable from the Python console, scripts and tests.

A run is: export the inputs into a fresh temporary folder (``inputs``), start ``python -m hideseek segment``
there (``runner``; PythonSlicer inside Slicer, ``sys.executable`` elsewhere), follow its progress, and when it
ends well import ``lesions.nii.gz`` + ``report.json`` (``results``). ``startRun``/``finishRun`` are the
non-blocking halves the widget drives from a QTimer; ``process`` is both, blocking, for scripts. A cancelled or
failed run imports nothing, and the temporary folder is always removed. No Qt and no dialogs here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hideseek.errors import Cancelled, HideSeekError, InputError

from . import dependencies, inputs, models, results
from .runner import ProcessRunner

MODES = ("mid", "3d")
PRESETS = ("fast", "published")
DEVICES = ("auto", "cpu", "cuda")
MAX_DDIM_STEPS = 250  # the published inversion's count; the GUI's spin box stops here too
POLL_SECONDS = 0.2
ENGINE_DIR = Path(__file__).resolve().parents[1]
"""The folder holding the ``hideseek`` package (the module's folder): put first on the worker's PYTHONPATH so
that it runs the engine shipped with this module, not another installed copy."""

Progress = Callable[[dict], None]


@dataclass
class Run:
    """One started run: its worker, its temporary folder and the CT its results belong to."""

    runner: ProcessRunner
    workDir: Path
    outDir: Path
    ctVolume: object
    inputs: inputs.ExportedInputs

    def cleanup(self) -> None:
        shutil.rmtree(self.workDir, ignore_errors=True)


class HideSeekLogic:
    """Everything the module does; ``pythonCommand`` and ``environment`` say how to start the worker."""

    def __init__(
        self,
        pythonCommand: Sequence[str] | None = None,
        environment: Mapping[str, str] | None = None,
        workRoot: str | Path | None = None,
    ) -> None:
        self.pythonCommand = list(pythonCommand) if pythonCommand else [sys.executable]
        self.environment = dict(environment) if environment is not None else dict(os.environ)
        self.workRoot = workRoot

    # inputs, models, dependencies -------------------------------------------------------------------------

    def listVertebrae(self, vertebraeNode) -> list[str]:
        """Levels in a segmentation or labelmap node, superior to inferior (raises InputError if none)."""
        return inputs.listVertebrae(vertebraeNode)

    def exportInputs(self, ctVolume, vertebraeNode, folder: str | Path) -> inputs.ExportedInputs:
        return inputs.exportInputs(ctVolume, vertebraeNode, folder)

    def findModels(self, extraFolders: Sequence[str | Path] = ()) -> list[models.ModelCard]:
        """The bundled models and those in folders the user added."""
        return models.findModels([models.BUNDLED_MODELS, *extraFolders])

    def missingDependencies(self) -> list[str]:
        """Requirements still to install before the first run (shown to the user for confirmation)."""
        return dependencies.missingRequirements()

    def installDependencies(self, requirements: Sequence[str]) -> None:
        dependencies.installRequirements(requirements)

    # running ------------------------------------------------------------------------------------------------

    def segmentCommand(
        self,
        exported: inputs.ExportedInputs,
        outDir: str | Path,
        levels: Sequence[str] | None = None,
        mode: str = "mid",
        model: str | Path | None = None,
        preset: str | None = "fast",
        deltaThreshold: float | None = None,
        device: str = "auto",
        ddimSteps: int | None = None,
        minLesionVoxels: int | None = None,
        searchEverySlice: bool = False,
    ) -> list[str]:
        """The worker's command line (``hideseek segment``, see docs/output-contract.md); checks the settings.

        ``ddimSteps`` sets the DDIM steps of the inversion and the edit (None: the preset's own);
        ``minLesionVoxels`` the smallest lesion kept (None: the engine's default); ``searchEverySlice`` turns the
        model's healthy gate off (``--gate 0``)."""
        _check(mode in MODES, f"mode {mode!r}: use {' or '.join(MODES)}")
        _check(preset is None or preset in PRESETS, f"preset {preset!r}: use {' or '.join(PRESETS)}")
        _check(device in DEVICES or device.startswith("cuda:"), f"device {device!r}: use {', '.join(DEVICES)}")
        _check(deltaThreshold is None or 0.0 <= deltaThreshold <= 1.0, f"Δ threshold {deltaThreshold}: use 0..1")
        _check(levels is None or len(levels) > 0, "no vertebra chosen: tick at least one level")
        _check(ddimSteps is None or 1 <= ddimSteps <= MAX_DDIM_STEPS,
               f"DDIM steps {ddimSteps}: use 1..{MAX_DDIM_STEPS}, or none for the preset's own")
        _check(minLesionVoxels is None or minLesionVoxels >= 1,
               f"smallest lesion {minLesionVoxels} voxels: use 1 or more, or none for the default")
        command = [
            *self.pythonCommand, "-m", "hideseek", "segment",
            "--ct", str(exported.ct),
            "--vertebrae", str(exported.vertebrae),
            "--label-format", "plain",
            "--label-table", str(exported.labelTable),
            "--mode", mode,
            "--device", device,
            "--out", str(outDir),
            "--progress", "json",
        ]
        if levels:
            command += ["--levels", ",".join(levels)]
        if model is not None:
            command += ["--model", str(model)]
        if preset is not None:
            command += ["--preset", preset]
        if deltaThreshold is not None:
            command += ["--delta-threshold", repr(float(deltaThreshold))]
        if ddimSteps is not None:
            command += ["--ddim-steps", str(int(ddimSteps))]
        if minLesionVoxels is not None:
            command += ["--min-lesion-voxels", str(int(minLesionVoxels))]
        if searchEverySlice:
            command += ["--gate", "0"]
        return command

    def startRun(
        self,
        ctVolume,
        vertebrae,
        levels: Sequence[str] | None = None,
        mode: str = "mid",
        model: str | Path | None = None,
        preset: str | None = "fast",
        deltaThreshold: float | None = None,
        device: str = "auto",
        ddimSteps: int | None = None,
        minLesionVoxels: int | None = None,
        searchEverySlice: bool = False,
        onEvent: Progress | None = None,
    ) -> Run:
        """Export the inputs and start the worker; returns at once. Follow it with ``run.runner.poll()``."""
        workDir = Path(tempfile.mkdtemp(prefix="hideseek-", dir=self.workRoot))
        try:
            exported = self.exportInputs(ctVolume, vertebrae, workDir / "inputs")
            outDir = workDir / "out"
            command = self.segmentCommand(exported, outDir, levels, mode, model, preset, deltaThreshold, device,
                                          ddimSteps, minLesionVoxels, searchEverySlice)
            runner = ProcessRunner(command, env=self._workerEnvironment(), cwd=workDir, onEvent=onEvent)
            runner.start()
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        return Run(runner, workDir, outDir, ctVolume, exported)

    def finishRun(self, run: Run, outputSegmentation=None) -> results.ImportedResult:
        """Import a finished run's results (into ``outputSegmentation``, or a new node) and remove its folder.

        Raises ``Cancelled`` for a cancelled run and ``HideSeekError`` (one line) for a failed one: neither
        imports anything.
        """
        try:
            if run.runner.running:
                raise RuntimeError("finishRun() called while the worker is still running")
            if run.runner.cancelled:
                raise Cancelled("the run was cancelled; nothing was imported")
            if not run.runner.succeeded:
                raise HideSeekError(run.runner.error)
            return results.importResults(run.outDir, run.ctVolume, outputSegmentation)
        finally:
            run.cleanup()

    def process(
        self,
        ctVolume,
        vertebrae,
        outputSegmentation=None,
        levels: Sequence[str] | None = None,
        mode: str = "mid",
        model: str | Path | None = None,
        preset: str | None = "fast",
        deltaThreshold: float | None = None,
        device: str = "auto",
        ddimSteps: int | None = None,
        minLesionVoxels: int | None = None,
        searchEverySlice: bool = False,
        progress: Progress | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> results.ImportedResult:
        """Segment the metastases of the chosen vertebrae (all when ``levels`` is None); blocks until done.

        ``progress`` receives each progress event (dict, see docs/output-contract.md) on the calling thread;
        ``cancel`` is asked between events and stops the run (raising ``Cancelled``) when it returns True.
        """
        run = self.startRun(ctVolume, vertebrae, levels, mode, model, preset, deltaThreshold, device, ddimSteps,
                            minLesionVoxels, searchEverySlice)
        try:
            self._follow(run, progress, cancel)
        except BaseException:
            run.runner.cancel()
            run.cleanup()
            raise
        return self.finishRun(run, outputSegmentation)

    def _follow(self, run: Run, progress: Progress | None, cancel: Callable[[], bool] | None) -> None:
        while True:
            for event in run.runner.poll():
                if progress is not None:
                    progress(event)
            if not run.runner.running:
                return
            if cancel is not None and cancel():
                run.runner.cancel()
                return
            try:
                run.runner.wait(POLL_SECONDS)
            except subprocess.TimeoutExpired:
                continue

    def _workerEnvironment(self) -> dict[str, str]:
        environment = dict(self.environment)
        paths = [str(ENGINE_DIR), *filter(None, [environment.get("PYTHONPATH")])]
        environment["PYTHONPATH"] = os.pathsep.join(paths)
        environment["PYTHONIOENCODING"] = "utf-8"  # progress lines carry units such as mm³
        return environment


def describeProgress(event: dict) -> str:
    """One status line for a progress event: stage, vertebra i/n and level, percent, time left."""
    if event.get("stage") == "done":
        return "done"
    parts = [str(event.get("stage", ""))]
    if event.get("vertebrae"):
        parts.append(f"vertebra {event.get('vertebra')}/{event['vertebrae']} {event.get('level', '')}".rstrip())
    if event.get("percent") is not None:
        parts.append(f"{float(event['percent']):.0f} %")
    eta = event.get("eta_s")
    if eta is not None:
        minutes, seconds = divmod(round(eta), 60)
        parts.append(f"about {minutes}:{seconds:02d} left")
    return " · ".join(parts)


def _check(condition: bool, problem: str) -> None:
    if not condition:
        raise InputError(f"invalid setting: {problem}")
