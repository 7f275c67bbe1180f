"""The Python packages the worker needs beyond what 3D Slicer ships, checked and installed on first use only.

Slicer bundles numpy, SimpleITK and vtk: those are never installed or upgraded here (replacing Slicer's own copy
breaks Slicer). torch comes through the PyTorch extension (``PyTorchUtils``), which picks the build that fits the
GPU driver; the rest through Slicer's ``pip_ensure`` (Slicer >= 5.11), or ``slicer.util.pip_install`` before.
The version ranges are those of the engine's ``pyproject.toml`` (a test keeps them equal). Nothing here runs at
import time; the module's widget shows one confirmation listing ``missingRequirements()`` before calling
``installRequirements`` (on Slicer >= 5.11 ``pip_ensure`` may ask once more before it installs).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Sequence

from packaging.requirements import Requirement

from hideseek.errors import HideSeekError

TORCH_REQUIREMENT = "torch>=2.1,<2.14"
PIP_REQUIREMENTS = ("scipy>=1.10", "safetensors>=0.4", "matplotlib>=3.7")
REQUIREMENTS = (TORCH_REQUIREMENT, *PIP_REQUIREMENTS)


def missingRequirements(requirements: Iterable[str] = REQUIREMENTS) -> list[str]:
    """The requirements that are not installed in a matching version, in the order given."""
    return [text for text in requirements if not _satisfied(Requirement(text))]


def installRequirements(requirements: Sequence[str]) -> None:
    """Install the given requirements inside Slicer (torch via the PyTorch extension); raises HideSeekError."""
    import slicer

    parsed = [Requirement(text) for text in requirements]
    for requirement in parsed:
        if requirement.name == "torch":
            _installTorch(str(requirement.specifier))
    pipRequirements = [requirement for requirement in parsed if requirement.name != "torch"]
    if pipRequirements:
        ensure = _pipEnsure(slicer)
        if ensure is not None:  # progress dialog, restart offer; never touches what Slicer bundles
            ensure(pipRequirements, requester="HideSeekSegment", skip_packages=list(SLICER_BUNDLED))
        else:
            slicer.util.pip_install(" ".join(str(r) for r in pipRequirements))
    still = missingRequirements(requirements)
    if still:
        raise HideSeekError(f"could not install {', '.join(still)}: see the Python console, then restart Slicer")


SLICER_BUNDLED = ("numpy", "SimpleITK", "vtk", "torch")
"""Never installed by pip here: Slicer's own packages, and torch (the PyTorch extension's job)."""


def _pipEnsure(slicer):
    """``pip_ensure`` of Slicer >= 5.11 (``slicer.pydeps``, later ``slicer.packaging``), else None."""
    for name in ("packaging", "pydeps"):
        ensure = getattr(getattr(slicer, name, None), "pip_ensure", None)
        if ensure is not None:
            return ensure
    return None


def _satisfied(requirement: Requirement) -> bool:
    try:
        version = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return requirement.specifier.contains(version, prereleases=True)


def _installTorch(versionSpecifier: str) -> None:
    try:
        import PyTorchUtils
    except ModuleNotFoundError as exc:
        raise HideSeekError(
            "the PyTorch extension is not installed: install 'PyTorch' in the Extensions Manager and restart Slicer"
        ) from exc
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=versionSpecifier)
    if torch is None:
        raise HideSeekError("PyTorch was not installed: open the 'PyTorch Utils' module to install it, then retry")
