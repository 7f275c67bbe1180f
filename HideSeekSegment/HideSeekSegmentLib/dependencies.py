"""The Python packages the worker needs beyond what 3D Slicer ships, checked and installed on first use only.

Slicer bundles numpy, SimpleITK and vtk: those are never installed or upgraded here (replacing Slicer's own copy
breaks Slicer). torch comes through the PyTorch extension (``PyTorchUtils``), which picks the build that fits the
GPU driver; the rest through Slicer's pip helpers. The version ranges are those of the engine's
``pyproject.toml`` (a test keeps them equal). Nothing here runs at import time, and nothing asks the user: the
module's widget shows one confirmation listing ``missingRequirements()`` before calling ``installRequirements``.
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
    pipRequirements = [str(requirement) for requirement in parsed if requirement.name != "torch"]
    if pipRequirements:
        # Slicer >= 5.12 has slicer.packaging (progress dialog, restart prompt); before, slicer.util.pip_install.
        packaging = getattr(slicer, "packaging", None)
        install = getattr(packaging, "pip_install", None) or slicer.util.pip_install
        install(pipRequirements)
    still = missingRequirements(requirements)
    if still:
        raise HideSeekError(f"could not install {', '.join(still)}: see the Python console, then restart Slicer")


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
