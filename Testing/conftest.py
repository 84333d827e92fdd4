"""pytest set-up: MRIHistoReg/ on sys.path, an app-less MRML scene per test, the shared real data, the generated sample."""
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


def _folderDigest(folder):
    import hashlib

    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="session")
def sampleGeneration(tmp_path_factory):
    """The seed-0 small sample, generated ONCE per session: {"folder": Path, "manifest": the generator's return
    value, "fractions": the progress fractions it reported}. Shared and read-only: a test that needs to change
    a file copies the folder first (shutil.copytree). At the end of the session the folder must still hold
    exactly the bytes that were generated, else the session errors (a test wrote into the shared sample)."""
    from MRIHistoRegLib import sampledata

    folder = tmp_path_factory.mktemp("sampleData") / "sample"
    fractions = []
    manifest = sampledata.generateSampleData(folder, size="small", seed=0, progress=lambda f, m="": fractions.append(f))
    generated = _folderDigest(folder)
    yield {"folder": folder, "manifest": manifest, "fractions": fractions}
    assert _folderDigest(folder) == generated, f"a test modified the shared sample data in {folder}: copy it first"


@pytest.fixture(scope="session")
def sampleData(sampleGeneration):
    """Path of the shared seed-0 small sample folder (see sampleGeneration): read it, never write into it."""
    return sampleGeneration["folder"]
