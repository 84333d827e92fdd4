"""The app-less scene behaves like Slicer's for the node types the pipeline uses."""
import numpy as np

from MRIHistoRegLib import context, volumes


def test_scene_has_module_logics(scene):
    assert context.moduleLogic(scene, "Volumes") is not None
    assert context.moduleLogic(scene, "Markups") is not None
    assert not context.insideSlicerApplication()


def test_volume_roundtrip_keeps_voxels_and_geometry(scene, tmp_path):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 1000, size=(4, 5, 6)).astype(np.int16)
    # LPS-aligned volume with anisotropic spacing and an origin, written by hand as IJK->RAS
    matrix = np.array([[-0.5, 0, 0, 10.0], [0, -0.25, 0, -3.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])
    node = volumes.createVolumeNode(scene, array, matrix, "phantom")
    path = tmp_path / "phantom.nrrd"
    volumes.saveNode(node, path)
    loaded = volumes.loadVolume(scene, path)
    np.testing.assert_array_equal(volumes.arrayFromVolume(loaded), array)
    np.testing.assert_allclose(volumes.ijkToRas(loaded), matrix, atol=1e-9)
    np.testing.assert_allclose(volumes.spacingOf(matrix), [0.5, 0.25, 2.0])


def test_a_scene_and_its_logics_are_freed_with_the_last_reference():
    import gc

    scene = context.createScene()
    assert context.moduleLogic(scene, "Volumes") is not None and len(context._contexts) >= 1
    before = len(context._contexts)
    del scene
    gc.collect()
    assert len(context._contexts) == before - 1


def test_memory_stays_flat_across_a_cohort(sampleData, tmp_path):
    """Subjects run one after another in one process (a cohort): after a first subject (which also pays the lazy
    imports: tifffile, matplotlib, SimpleITK filters) resident memory stays within a few MB over the next four.
    Measured in a fresh process (the test runner's own memory is not the product's). Before the scene-owned context
    it grew about 16 MB per subject."""
    import json
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    sample = tmp_path / "sample"
    shutil.copytree(sampleData, sample)
    config = json.loads((sample / "config.json").read_text())
    config["refine"] = False  # the landmark pipeline: seconds per subject
    configPath = sample / "subject.json"
    configPath.write_text(json.dumps(config))
    script = f"""
import ctypes, gc, sys
sys.path.insert(0, {str(REPO / "MRIHistoReg")!r})
from MRIHistoRegLib import pipeline
from MRIHistoRegLib.config import loadConfig
def rss():
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
sizes = []
for i in range(5):
    pipeline.runPipeline(loadConfig({str(configPath)!r}), {str(tmp_path)!r} + "/run%d" % i)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so RSS shows what is still held
    sizes.append(rss())
print(sizes)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    sizes = eval(result.stdout.strip().splitlines()[-1])
    assert max(sizes[2:]) - sizes[1] < 8.0, f"RSS after each subject (MB): {sizes}"
