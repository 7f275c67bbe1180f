"""The Slicer extension's build files agree with the files on disk: what CMake does not list is not packaged.

The CMake files are parsed here (no CMake or Slicer build needed): every ``.py`` of the module folder (engine
package included) must be in MODULE_PYTHON_SCRIPTS, every other file of it in MODULE_PYTHON_RESOURCES, and every
model bundle under ``models/`` in MODULE_MODEL_BUNDLES.
"""

from __future__ import annotations

import re
import struct
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO

MODULE = "HideSeekSegment"
MODULE_DIR = REPO / MODULE
RAW_URL = "https://raw.githubusercontent.com/hideseeksegment/HideSeekSegment/main/"


def _commands(path: Path) -> list[tuple[str, list[str]]]:
    """CMake commands as (name, arguments), comments removed, quoted arguments kept whole (without quotes)."""
    text = re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8"))
    commands = []
    for name, body in re.findall(r"(\w+)\s*\(((?:[^()\"]|\"[^\"]*\")*)\)", text):
        arguments = [a[1:-1] if a.startswith('"') else a for a in re.findall(r"\"[^\"]*\"|[^\s\"]+", body)]
        commands.append((name.lower(), arguments))
    return commands


def _variables(path: Path) -> dict[str, list[str]]:
    """``set(NAME values...)`` of a CMake file, with ``${VAR}`` of earlier single-value sets substituted."""
    variables: dict[str, list[str]] = {}

    def substitute(match: re.Match) -> str:
        return variables.get(match.group(1), [match.group(0)])[0]

    for name, arguments in _commands(path):
        if name == "set" and arguments:
            variables[arguments[0]] = [re.sub(r"\$\{(\w+)\}", substitute, a) for a in arguments[1:]]
    return variables


def _module_files() -> list[Path]:
    return [p for p in MODULE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def top() -> dict[str, list[str]]:
    return _variables(REPO / "CMakeLists.txt")


@pytest.fixture(scope="module")
def module() -> dict[str, list[str]]:
    return _variables(MODULE_DIR / "CMakeLists.txt")


def test_extension_metadata(top):
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION"):
        assert top.get(name) and top[name][0].strip(), f"{name} is missing or empty"
    assert top["EXTENSION_HOMEPAGE"] == ["https://github.com/hideseeksegment/HideSeekSegment"]
    assert top["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert top["EXTENSION_DEPENDS"] == ["PyTorch"]
    (icon,) = top["EXTENSION_ICONURL"]
    assert icon.startswith(RAW_URL) and (REPO / icon.removeprefix(RAW_URL)).is_file()
    assert top["EXTENSION_SCREENSHOTURLS"], "at least one screenshot URL"
    for url in top["EXTENSION_SCREENSHOTURLS"][0].split():
        assert url.startswith(RAW_URL + "Resources/Screenshots/") and url.endswith(".png"), url


def test_extension_commands_in_order():
    names = [(name, " ".join(args)) for name, args in _commands(REPO / "CMakeLists.txt")]
    expected = [
        ("cmake_minimum_required", None), ("project", "HideSeekSegment"), ("find_package", "Slicer REQUIRED"),
        ("include", "${Slicer_USE_FILE}"), ("add_subdirectory", MODULE),
        ("include", "${Slicer_EXTENSION_GENERATE_CONFIG}"), ("include", "${Slicer_EXTENSION_CPACK}"),
    ]
    positions = [
        next(i for i, (name, args) in enumerate(names) if name == want and (arg is None or args == arg))
        for want, arg in expected
    ]
    assert positions == sorted(positions)


def test_every_python_file_of_the_module_is_listed(module):
    listed = module["MODULE_PYTHON_SCRIPTS"]
    on_disk = sorted(p.relative_to(MODULE_DIR).as_posix() for p in _module_files() if p.suffix == ".py")
    assert len(listed) == len(set(listed)), "a script is listed twice"
    assert sorted(listed) == on_disk, (
        f"not listed: {sorted(set(on_disk) - set(listed))}; listed but missing: {sorted(set(listed) - set(on_disk))}"
    )


def test_every_resource_of_the_module_is_listed(module):
    listed = module["MODULE_PYTHON_RESOURCES"]
    on_disk = sorted(
        p.relative_to(MODULE_DIR).as_posix()
        for p in _module_files()
        if p.suffix != ".py" and p.name != "CMakeLists.txt"
    )
    assert sorted(listed) == on_disk, (
        f"not listed: {sorted(set(on_disk) - set(listed))}; listed but missing: {sorted(set(listed) - set(on_disk))}"
    )


def test_module_is_built_with_generic_tests_and_its_unittest():
    commands = _commands(MODULE_DIR / "CMakeLists.txt")
    (build,) = [args for name, args in commands if name == "slicermacrobuildscriptedmodule"]
    assert build == ["NAME", "${MODULE_NAME}", "SCRIPTS", "${MODULE_PYTHON_SCRIPTS}", "RESOURCES",
                     "${MODULE_PYTHON_RESOURCES}", "WITH_GENERIC_TESTS"]
    guard = commands.index(("if", ["BUILD_TESTING"]))
    assert commands[guard + 1] == ("slicer_add_python_unittest", ["SCRIPT", "${MODULE_NAME}.py"])


def test_model_bundles_are_packaged(module):
    from hideseek.bundle import MANIFEST_NAME, WEIGHTS_NAME
    from hideseek.modelcard import CARD_FILE, CURVE_FILE
    from hideseek.pipeline import DEFAULT_MODEL_NAME

    listed = module["MODULE_MODEL_BUNDLES"]
    assert module["MODULE_MODEL_FILES"] == [MANIFEST_NAME, WEIGHTS_NAME, CARD_FILE, CURVE_FILE]
    assert DEFAULT_MODEL_NAME in listed, "the engine's default model must ship with the extension"
    on_disk = sorted(p.parent.name for p in (REPO / "models").glob(f"*/{MANIFEST_NAME}"))
    assert set(on_disk) <= set(listed), f"bundles in models/ that are not packaged: {set(on_disk) - set(listed)}"


def test_icons_are_128_pixel_pngs(top):
    (icon,) = top["EXTENSION_ICONURL"]
    for path in (REPO / icon.removeprefix(RAW_URL), MODULE_DIR / "Resources" / "Icons" / f"{MODULE}.png"):
        assert _png_size(path) == (128, 128), path


def test_licence_is_mit():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "Copyright (c) 2026 HideSeekSegment contributors" in text


def test_slicer_installs_what_the_engine_declares():
    """The module installs torch, scipy and safetensors with the ranges of pyproject.toml, and never Slicer's own
    numpy, SimpleITK or vtk."""
    sys.path.insert(0, str(MODULE_DIR))
    try:
        from HideSeekSegmentLib.dependencies import REQUIREMENTS
    finally:
        sys.path.remove(str(MODULE_DIR))
    from packaging.requirements import Requirement

    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    bundled_with_slicer = {"numpy", "simpleitk", "vtk"}
    engine = {r.name.lower(): r.specifier for r in map(Requirement, declared)}
    ours = {r.name.lower(): r.specifier for r in map(Requirement, REQUIREMENTS)}
    assert ours == {name: spec for name, spec in engine.items() if name not in bundled_with_slicer}
