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
