"""pytest set-up: MRIHistoReg/ on sys.path, an app-less MRML scene per test, the shared real data."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MRIHistoReg"))

SHARED_DATA = Path(os.environ.get("MRIHISTOREG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def scene():
    """A fresh app-less scene with application and module logics (what Slicer would give)."""
    from MRIHistoRegLib.context import createScene

    return createScene()


@pytest.fixture
def sharedData():
    """../shared/data (real microscopy, lung landmarks); tests needing it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (a fresh clone has no ../shared): real-data test skipped")
    return SHARED_DATA
