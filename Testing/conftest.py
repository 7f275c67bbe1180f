"""Shared fixtures: the conformance and real data live in ../shared beside the checkout; skip cleanly without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HIDESEEK_SHARED", REPO.parent / "shared"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared material not found at {path} (set HIDESEEK_SHARED)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _need(SHARED / "reference")


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    return _need(SHARED / "data" / "real")


@pytest.fixture(scope="session")
def slicer_core():
    """3D Slicer's MRML libraries (pip package slicer-core), headless; skip when not installed.

    Reading and writing .seg.nrrd through vtkMRMLSegmentationStorageNode needs no setup, but creating segments
    (AddEmptySegment, SetBinaryLabelmapToSegment) fails with "Unable to construct empty representation type
    'Binary labelmap'" until the conversion rules are registered, which the Slicer application does at start.
    """
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    return slicer
