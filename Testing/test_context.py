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
