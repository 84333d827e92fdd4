"""The sample data's ground truth is self-consistent (issue 2, item 5).

Checks use independent readers (csv, pynrrd, tifffile, MRML storage nodes) and re-implement the mapping formula
from truth.json's numbers, so the generator's own code is not trusted to check itself. Expected geometry is
derived by hand in the tests.
"""
import csv
import hashlib
import json
import math
import os

import numpy as np
import pytest

from MRIHistoRegLib import sampledata
from MRIHistoRegLib.progress import Cancelled
from MRIHistoRegLib.volumes import ijkToRas, loadVolume

SMALL_SHAPE_IJK = (270, 320, 59)
SMALL_SPACING_MM = np.array([0.026, 0.026, 0.040])


@pytest.fixture(scope="module")
def sample(sampleGeneration):
    """The session's shared seed-0 small sample (conftest.sampleGeneration), with truth.json read here."""
    folder = sampleGeneration["folder"]
    with open(folder / "truth.json", encoding="utf-8") as f:
        truth = json.load(f)
    return dict(sampleGeneration, truth=truth)


def readCsv(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["label"] for r in rows], np.array([[float(r["x"]), float(r["y"]), float(r["z"])] for r in rows])


def forwardFromTruth(truth, y):
    """x = A y + t + sum a exp(-|y-c|^2 / 2s^2), written here from the formula in truth.json (independent code)."""
    m = truth["mapping"]
    x = y @ np.array(m["A"]).T + np.array(m["t_mm"])
    for bump in m["bumps"]:
        d2 = np.sum((y - np.array(bump["centre_mm"])) ** 2, axis=1)
        x = x + np.exp(-d2 / (2 * bump["sigma_mm"] ** 2))[:, None] * np.array(bump["amplitude_mm"])
    return x


def insideTumour(truth, x):
    t = truth["tumour"]
    local = (x - np.array(t["centre_mri_ras_mm"])) @ np.array(t["rotation"])  # R^T d, row-wise
    return np.sum((local / np.array(t["semi_axes_mm"])) ** 2, axis=1) <= 1.0


def histologyBox(truth, margin=0.0):
    """The stack's field of view in its true-spacing RAS frame, by hand: RAS = (-i*sx, -j*sy, k*sz)."""
    ni, nj, nk = truth["histology"]["shape_ijk"]
    sx, sy, sz = truth["histology"]["true_spacing_mm"]
    low = np.array([-(ni - 1) * sx, -(nj - 1) * sy, 0.0]) + margin
    high = np.array([0.0, 0.0, (nk - 1) * sz]) - margin
    return low, high


def test_folder_layout_and_config(sample):
    folder, truth = sample["folder"], sample["truth"]
    expected = {"mri.nrrd", "mri_tumour_label.nrrd", "histology.tif", "histology.nrrd", "histology_tumour_label.nrrd",
                "landmarks_mri.mrk.json", "landmarks_histology.mrk.json", "landmarks_mri.csv", "landmarks_histology.csv",
                "eval_points_mri.csv", "eval_points_histology.csv", "truth.json", "config.json"}
    assert set(os.listdir(folder)) == expected
    assert set(truth["files"]) == expected
    assert sample["manifest"]["folder"] == os.path.abspath(folder)
    assert not [n for n in os.listdir(folder.parent) if n.startswith(".")], "temporary folder left behind"
    fractions = sample["fractions"]
    assert fractions[-1] == 1.0 and all(b >= a for a, b in zip(fractions, fractions[1:]))
    with open(folder / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["histology"] == "histology.tif" and config["model"] == "affine+tps" and config["refine"] is True
    assert config["histology_spacing_um"] == pytest.approx([26.0, 26.0, 40.0])
    for value in (config["mri"], config["histology"], *config["landmarks"].values(), *config["labels"].values(),
                  *config["evaluate_points"].values()):
        assert not os.path.isabs(value) and (folder / value).is_file()
    assert truth["seed"] == 0 and truth["size"] == "small"
    assert truth["shrinkage"]["volume_shrinkage_percent"] == pytest.approx(100 * (1 - 0.843 ** 3))


def test_evaluation_points_follow_the_exact_mapping(sample):
    folder, truth = sample["folder"], sample["truth"]
    labelsMri, mri = readCsv(folder / "eval_points_mri.csv")
    labelsHistology, histology = readCsv(folder / "eval_points_histology.csv")
    assert labelsMri == labelsHistology == [f"E{n:02d}" for n in range(1, 31)]
    # independent re-implementation of the forward formula (CSV holds 6 decimals)
    assert np.abs(forwardFromTruth(truth, histology) - mri).max() < 5e-6
    assert np.abs(sampledata.groundTruthHistologyToMri(truth, histology) - mri).max() < 5e-6
    back = sampledata.groundTruthMriToHistology(truth, mri)
    assert np.abs(back - histology).max() < 5e-6
    assert np.abs(forwardFromTruth(truth, back) - mri).max() < 1e-6  # Newton residual
    low, high = histologyBox(truth)
    assert np.all((histology > low) & (histology < high)), "evaluation points must lie inside the stack"
    assert np.ptp(histology, axis=0).min() > 1.0, "evaluation points should spread in 3-D"
    # the mapping really shrinks ~40 % and is not a plain scaling: warp + rotation present
    A = np.array(truth["mapping"]["A"])
    assert np.linalg.det(A) * 0.843 ** 3 == pytest.approx(1.0, rel=1e-9)
    angle = math.degrees(math.acos((np.trace(A * 0.843) - 1) / 2))
    assert 10 <= angle <= 20
    warp = forwardFromTruth(truth, histology) - (histology @ A.T + np.array(truth["mapping"]["t_mm"]))
    assert 0.02 < np.linalg.norm(warp, axis=1).max() < 0.5


def test_mapping_is_invertible_without_folding(sample):
    truth = sample["truth"]
    low, high = histologyBox(truth)
    rng = np.random.default_rng(1)
    y = rng.uniform(low - 1.0, high + 1.0, size=(4000, 3))
    h = 1e-4
    jac = np.stack([(forwardFromTruth(truth, y + h * e) - forwardFromTruth(truth, y - h * e)) / (2 * h) for e in np.eye(3)], axis=2)
    det = np.linalg.det(jac)
    assert det.min() > 0.3 * 0.843 ** -3, "the ground-truth warp must not fold"
    mapping = sampledata.GroundTruthMapping(truth)
    mri = forwardFromTruth(truth, y[:50])
    assert np.abs(mapping.transformPoints(mri) - y[:50]).max() < 1e-6
    numeric = np.stack([(mapping.transformPoints(mri + h * e) - mapping.transformPoints(mri - h * e)) / (2 * h) for e in np.eye(3)], axis=2)
    assert np.abs(mapping.jacobian(mri) - numeric).max() < 1e-5


def test_landmarks_agree_with_the_mapping_within_their_noise(sample, scene):
    folder, truth = sample["folder"], sample["truth"]
    labels, mri = readCsv(folder / "landmarks_mri.csv")
    labelsH, histology = readCsv(folder / "landmarks_histology.csv")
    assert labels == labelsH == [f"L{n:02d}" for n in range(1, 13)]
    # the .mrk.json files hold the same points (read back through MRML's markups storage node, RAS)
    for name, points in (("landmarks_mri.mrk.json", mri), ("landmarks_histology.mrk.json", histology)):
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
        storage = scene.AddNewNodeByClass("vtkMRMLMarkupsJsonStorageNode")
        storage.SetFileName(str(folder / name))
        assert storage.ReadData(node)
        assert [node.GetNthControlPointLabel(n) for n in range(node.GetNumberOfControlPoints())] == labels
        read = np.array([node.GetNthControlPointPosition(n) for n in range(node.GetNumberOfControlPoints())])
        assert np.abs(read - points).max() < 1e-5
    residual = sampledata.groundTruthMriToHistology(truth, mri) - histology
    sdMri, sdHistology = truth["landmarks"]["mri_noise_sd_mm"], truth["landmarks"]["histology_noise_sd_mm"]
    assert 0.03 <= sdMri <= 0.1 and 0.005 <= sdHistology <= 0.03
    expectedRms = math.sqrt(3 * ((0.843 * sdMri) ** 2 + sdHistology ** 2))  # 3-D rms of the combined noise
    rms = math.sqrt(np.mean(np.sum(residual ** 2, axis=1)))
    assert 0.5 * expectedRms < rms < 1.5 * expectedRms, (rms, expectedRms)
    assert np.linalg.norm(residual, axis=1).max() < 5 * expectedRms
    low, high = histologyBox(truth, margin=0.1)
    assert np.all((histology > low) & (histology < high)), "landmarks must lie inside the stack"
    singular = np.linalg.svd(histology - histology.mean(axis=0), compute_uv=False)
    assert singular.min() > 0.5, "landmarks must not be (nearly) coplanar"
    assert len(set(truth["landmarks"]["names"].values())) == 12


def test_tumour_label_volumes(sample):
    import nrrd

    folder, truth = sample["folder"], sample["truth"]
    a, b, c = truth["tumour"]["semi_axes_mm"]
    analytic = 4 / 3 * math.pi * a * b * c
    assert 0.5 < 2 * max(a, b, c) * 1.0 < 1.6 and truth["tumour"]["mri_volume_mm3"] == pytest.approx(analytic)
    mriLabel, header = nrrd.read(str(folder / "mri_tumour_label.nrrd"), index_order="C")
    assert mriLabel.shape == (120, 200, 100) and set(np.unique(mriLabel)) == {0, 1}
    assert np.count_nonzero(mriLabel) * 0.1 ** 3 == pytest.approx(analytic, rel=0.03)

    histologyLabel, _ = nrrd.read(str(folder / "histology_tumour_label.nrrd"), index_order="C")
    assert histologyLabel.shape == SMALL_SHAPE_IJK[::-1] and histologyLabel.dtype == np.uint8
    voxelMm3 = float(np.prod(SMALL_SPACING_MM))  # the TRUE spacing, not the header's 1 mm
    native = truth["tumour"]["histology_volume_mm3"]
    assert np.count_nonzero(histologyLabel) * voxelMm3 == pytest.approx(native, rel=0.01)
    # independent Monte-Carlo estimate of the native volume (test-side formula, not the generator's code)
    rng = np.random.default_rng(7)
    k, j, i = np.nonzero(histologyLabel)
    centre = np.array([-i.mean() * 0.026, -j.mean() * 0.026, k.mean() * 0.040])
    box = 0.8
    y = centre + rng.uniform(-box, box, size=(300000, 3))
    monteCarlo = np.mean(insideTumour(truth, forwardFromTruth(truth, y))) * (2 * box) ** 3
    assert native == pytest.approx(monteCarlo, rel=0.02)
    assert 0.45 < native / analytic < 0.75  # ~40 % shrinkage, modulated by the local warp
    # the label sits where the mapping sends the tumour centre
    expected = sampledata.groundTruthMriToHistology(truth, np.array(truth["tumour"]["centre_mri_ras_mm"]))[0]
    assert np.linalg.norm(centre - expected) < 0.03


def test_tiff_and_nrrd_hold_identical_voxels_with_the_wrong_1mm_header(sample):
    import nrrd
    import tifffile

    folder, truth = sample["folder"], sample["truth"]
    with tifffile.TiffFile(str(folder / "histology.tif")) as tif:
        assert len(tif.pages) == 59
        page = tif.pages[0]
        assert page.tags["XResolution"].value == (1, 1) and page.tags["YResolution"].value == (1, 1)
        assert page.tags["ResolutionUnit"].value == 1  # NONE: no physical unit at all
        stack = tif.asarray()
    volume, header = nrrd.read(str(folder / "histology.nrrd"), index_order="C")
    assert stack.dtype == np.uint16 and stack.shape == (59, 320, 270)
    assert np.array_equal(stack, volume)
    assert header["encoding"] == "raw" and header["space"] == "left-posterior-superior"
    assert np.array_equal(header["space directions"], np.eye(3))
    assert np.array_equal(header["space origin"], np.zeros(3))
    assert np.array_equal(nrrd.read_header(str(folder / "histology_tumour_label.nrrd"))["space directions"], np.eye(3))
    assert truth["histology"]["header_spacing_mm"] == [1.0, 1.0, 1.0]
    assert truth["histology"]["true_spacing_um"] == pytest.approx([26.0, 26.0, 40.0])
    assert truth["histology"]["true_spacing_mm"] == pytest.approx([0.026, 0.026, 0.040])
    # full size keeps the anisotropy: 3.25 x 3.25 x 5 um is the small spacing / 8
    assert np.array(truth["histology"]["true_spacing_um"]) / 8 == pytest.approx([3.25, 3.25, 5.0])
    # microscopy-like content: background ~100 counts, bright tumour, dark CSF
    label, _ = nrrd.read(str(folder / "histology_tumour_label.nrrd"), index_order="C")
    background = stack[:, :40, :40]  # anterior-right corner, outside the brain
    assert 80 < np.median(background) < 120
    tissue = stack[(label == 0) & (stack > 250)]
    assert stack[label == 1].mean() > 1.5 * tissue.mean()


def test_histology_image_shows_the_tumour_where_the_mapping_puts_it(sample):
    """The bright tumour segmented from the image (not the label file) sits on the exact label."""
    import nrrd
    import tifffile
    from scipy import ndimage

    folder = sample["folder"]
    stack = tifffile.imread(str(folder / "histology.tif")).astype(np.float32)
    label, _ = nrrd.read(str(folder / "histology_tumour_label.nrrd"), index_order="C")
    k, j, i = np.nonzero(label)
    box = tuple(slice(max(int(v.min()) - 8, 0), int(v.max()) + 9) for v in (k, j, i))
    smooth = ndimage.uniform_filter(stack, size=3)[box]
    inside = label[box] == 1
    threshold = 0.5 * (np.median(smooth[inside]) + np.median(smooth[~inside & (smooth > 250)]))
    bright = smooth > threshold
    dice = 2 * np.count_nonzero(bright & inside) / (np.count_nonzero(bright) + np.count_nonzero(inside))
    assert dice > 0.85
    spacing = SMALL_SPACING_MM[::-1]  # (k, j, i)
    offset = (np.array(np.nonzero(bright)).mean(axis=1) - np.array(np.nonzero(inside)).mean(axis=1)) * spacing
    assert np.linalg.norm(offset) < 0.01, offset


def test_volumes_load_into_a_scene_with_hand_derived_geometry(sample, scene):
    folder = sample["folder"]
    mri = loadVolume(scene, folder / "mri.nrrd")
    # LPS-aligned 0.1 mm voxels: IJK->RAS = diag(-0.1, -0.1, 0.1); the centre voxel (49.5, 99.5, 59.5) sits at RAS 0
    expected = np.array([[-0.1, 0, 0, 0.1 * 49.5], [0, -0.1, 0, 0.1 * 99.5], [0, 0, 0.1, -0.1 * 59.5], [0, 0, 0, 1]])
    assert np.allclose(ijkToRas(mri), expected, atol=1e-9)
    assert mri.GetImageData().GetDimensions() == (100, 200, 120)
    # the same geometry through an independent reader (pynrrd, LPS): directions diag(0.1), origin LPS = (-x, -y, z)
    import nrrd

    header = nrrd.read_header(str(folder / "mri.nrrd"))
    assert header["space"] == "left-posterior-superior" and header["type"] in ("short", "int16")
    assert np.allclose(header["space directions"], 0.1 * np.eye(3))
    assert np.allclose(header["space origin"], [-4.95, -9.95, -5.95])
    histology = loadVolume(scene, folder / "histology.nrrd")
    assert np.allclose(ijkToRas(histology), np.diag([-1.0, -1.0, 1.0, 1.0]), atol=1e-12)  # the wrong 1 mm claim
    assert histology.GetImageData().GetDimensions() == SMALL_SHAPE_IJK
    label = loadVolume(scene, folder / "histology_tumour_label.nrrd", labelmap=True)
    assert np.allclose(ijkToRas(label), np.diag([-1.0, -1.0, 1.0, 1.0]), atol=1e-12)
    mriLabel = loadVolume(scene, folder / "mri_tumour_label.nrrd", labelmap=True)
    assert np.allclose(ijkToRas(mriLabel), expected, atol=1e-9)
    # T2-like MRI: the tumour is brighter than the brain around it, the air outside dark
    from MRIHistoRegLib.volumes import arrayFromVolume

    image, tumour = arrayFromVolume(mri), arrayFromVolume(mriLabel)
    assert image[tumour == 1].mean() > 1.3 * np.median(image[image > 500])
    assert np.median(image[:5, :5, :5]) < 150


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    import nrrd
    import tifffile

    def digest(folder):
        stack = tifffile.imread(str(folder / "histology.tif"))
        mri, _ = nrrd.read(str(folder / "mri.nrrd"), index_order="C")
        return (hashlib.sha256(stack.tobytes()).hexdigest(), hashlib.sha256(mri.tobytes()).hexdigest(),
                (folder / "landmarks_mri.csv").read_text(), (folder / "eval_points_histology.csv").read_text())

    first = sampledata.generateSampleData(tmp_path / "a", size=20, seed=3)
    again = sampledata.generateSampleData(tmp_path / "b", size="20", seed=3)
    other = sampledata.generateSampleData(tmp_path / "c", size=20, seed=4)
    assert first["truth"]["histology"]["shape_ijk"] == [108, 128, 24]
    assert (tmp_path / "a" / "histology.nrrd").read_bytes() == (tmp_path / "b" / "histology.nrrd").read_bytes()
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    differs = [x != y for x, y in zip(digest(tmp_path / "a"), digest(tmp_path / "c"))]
    assert all(differs)
    assert first["truth"]["mapping"] == again["truth"]["mapping"] != other["truth"]["mapping"]


def test_streamed_lattice_path_matches_exact_rendering(tmp_path):
    """The full-size path (anatomy on a coarse lattice, interpolated per page) on a reduced grid."""
    import nrrd
    import tifffile

    anatomy = sampledata.PhantomAnatomy()
    forward = sampledata._buildMapping(0, anatomy)
    grid = sampledata.HistologyGrid(10)  # 216 x 256 x 47 at 32.5 x 32.5 x 50 um
    exactDir, latticeDir = tmp_path / "exact", tmp_path / "lattice"
    exactDir.mkdir()
    latticeDir.mkdir()
    pages = []
    exact = sampledata._writeHistology(str(exactDir), anatomy, forward, grid, 0, latticeStep=1)
    lattice = sampledata._writeHistology(str(latticeDir), anatomy, forward, grid, 0, latticeStep=4,
                                         progress=lambda f, m="": pages.append(f))
    assert lattice["lattice_step"] == 4 and len(pages) == grid.shapeIjk[2]
    a = tifffile.imread(str(exactDir / "histology.tif")).astype(float)
    b = tifffile.imread(str(latticeDir / "histology.tif")).astype(float)
    assert a.shape == b.shape == grid.shapeIjk[::-1]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9
    volume = anatomy.tumourVolumeMm3()
    native = sampledata._histologyVolumeByQuadrature(forward, anatomy)
    voxel = float(np.prod(grid.spacingMm))
    assert 0.4 < native / volume < 0.8
    assert exact["label_voxels"] * voxel == pytest.approx(native, rel=0.02)
    # the label is exact on both paths (the lattice only locates the tumour)
    assert np.array_equal(nrrd.read(str(exactDir / "histology_tumour_label.nrrd"), index_order="C")[0],
                          nrrd.read(str(latticeDir / "histology_tumour_label.nrrd"), index_order="C")[0])
    assert tifffile.imread(str(latticeDir / "histology.tif")).tobytes() == \
        (latticeDir / "histology.nrrd").read_bytes()[-a.size * 2:]
    # page content does not depend on how pages are grouped: re-render single pages out of order
    renderer = sampledata._StackRenderer(anatomy, forward, grid, 0, latticeStep=4)
    for k in (30, 3, 17):
        assert np.array_equal(renderer.page(k)[0], b[k].astype(np.uint16))


@pytest.mark.parametrize("size, words", [("medium", "Unknown sample data size .medium."), (50, "too small"), (0.5, ">= 1"), ("nan", ">= 1")])
def test_bad_size_is_refused_and_nothing_written(tmp_path, size, words):
    with pytest.raises(ValueError, match=words):
        sampledata.generateSampleData(tmp_path / "out", size=size)
    assert os.listdir(tmp_path) == []


def test_bad_destinations_are_refused(tmp_path):
    existing = tmp_path / "full"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        sampledata.generateSampleData(existing)
    assert os.listdir(existing) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["full"]
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="afile"):
        sampledata.generateSampleData(blocker / "sub" / "out")
    with pytest.raises(ValueError, match="is a file"):
        sampledata.generateSampleData(blocker)
    with pytest.raises(ValueError, match="seed"):
        sampledata.generateSampleData(tmp_path / "new", seed=-1)
    assert sorted(os.listdir(tmp_path)) == ["afile", "full"]
    with pytest.raises(ValueError, match="not found"):
        sampledata.loadTruth(tmp_path / "missing")


def test_cancel_leaves_nothing_behind(tmp_path):
    def cancelHalfWay(fraction, message=""):
        return fraction > 0.5  # True = cancel, during the stack writing

    with pytest.raises(Cancelled):
        sampledata.generateSampleData(tmp_path / "new" / "deeper" / "out", size=16, progress=cancelHalfWay)
    assert os.listdir(tmp_path) == [], "parents created for the output must be removed again"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Cancelled):
        sampledata.generateSampleData(empty, size=16, progress=cancelHalfWay)
    assert os.listdir(tmp_path) == ["empty"] and os.listdir(empty) == []
    manifest = sampledata.generateSampleData(empty, size=16)  # an empty existing folder is fine
    assert os.path.isfile(os.path.join(manifest["folder"], "truth.json"))


def test_contrasts_csf_bright_in_mri_dark_in_microscopy(sample):
    """T2-like MRI: CSF (lateral ventricle) brighter than tissue; light-sheet: ventricle darker than tissue."""
    import nrrd
    import tifffile

    folder, truth = sample["folder"], sample["truth"]
    centre = np.array(sampledata.PhantomAnatomy.ventricleCentres[0])  # right lateral ventricle, RAS mm
    mri, _ = nrrd.read(str(folder / "mri.nrrd"), index_order="C")
    # hand-inverted geometry: i = (4.95 - x) / 0.1, j = (9.95 - y) / 0.1, k = (z + 5.95) / 0.1
    i, j, k = (int(round(v)) for v in ((4.95 - centre[0]) / 0.1, (9.95 - centre[1]) / 0.1, (centre[2] + 5.95) / 0.1))
    brain = mri[mri > 400]
    assert mri[k, j - 3:j + 4, i].mean() > 1.4 * np.median(brain)
    stack = tifffile.imread(str(folder / "histology.tif"))
    y = sampledata.groundTruthMriToHistology(truth, centre)[0]
    i, j, k = (int(round(v)) for v in (-y[0] / 0.026, -y[1] / 0.026, y[2] / 0.040))
    tissue = stack[stack > 250]
    assert stack[k, j - 5:j + 6, i - 1:i + 2].mean() < 0.6 * np.median(tissue)


# ---------------------------------------------------------------------------------------------------------
# Geometry as parameters (issue 15, item 5) and the tumour reporter channel (issue 14, item 3)
# ---------------------------------------------------------------------------------------------------------
def test_truth_records_the_default_geometry(sample):
    recorded = sample["truth"]["geometry"]
    assert recorded["mriSpacingMm"] == [0.1, 0.1, 0.1] and recorded["mriShapeIjk"] == [100, 200, 120]
    assert recorded["stackSpacingUm"] is None and recorded["tumourChannel"] is False
    assert sampledata.SampleGeometry.fromDict(recorded) == sampledata.SampleGeometry()
    assert sampledata.CHANNELS_FILE not in os.listdir(sample["folder"])


def _mriMatrixByHand(geometry, centre):
    """IJK->RAS from the geometry's numbers: columns = direction x spacing, the grid's centre voxel at `centre`."""
    linear = np.array(geometry.mriDirection) * np.array(geometry.mriSpacingMm)
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = np.array(centre) - linear @ ((np.array(geometry.mriShapeIjk) - 1) / 2)
    return m


OBLIQUE_FLIPPED = tuple(map(tuple, sampledata.rotationMatrix((1.0, 0.3, 0.2), 35.0) @ np.diag([1.0, -1.0, 1.0])))
GEOMETRIES = {
    # oblique, left-handed MRI grid with anisotropic voxels; a stack coarser than the MRI along z
    "oblique": sampledata.SampleGeometry(mriSpacingMm=(0.08, 0.08, 0.12), mriShapeIjk=(60, 60, 40),
                                         mriDirection=OBLIQUE_FLIPPED, mriCentreRasMm="stack",
                                         stackSpacingUm=(30.0, 30.0, 150.0), stackExtentMm=(2.6, 2.6, 2.1),
                                         linearShrink=0.9, rotationDeg=40.0, landmarkCount=8),
    # a stack over ~5 % of a whole-brain 0.2 mm MRI: the named landmarks run out, covered points fill in
    "partial": sampledata.SampleGeometry(mriSpacingMm=(0.2, 0.2, 0.2), mriShapeIjk=(50, 100, 60),
                                         stackSpacingUm=(40.0, 40.0, 40.0), stackExtentMm=(3.0, 3.0, 2.0),
                                         bumpAmplitudeMm=(0.05, 0.1), bumpSigmaMm=(0.5, 0.7), landmarkCount=12),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_a_custom_geometry_keeps_the_ground_truth_exact(name, tmp_path, scene):
    import nrrd

    geometry = GEOMETRIES[name]
    truth = sampledata.generateSampleData(tmp_path / "s", seed=2, geometry=geometry)["truth"]
    folder = tmp_path / "s"
    assert sampledata.SampleGeometry.fromDict(truth["geometry"]) == geometry
    # the stack: the geometry's spacing and field of view (shape by hand)
    spacing = np.array(geometry.stackSpacingUm) * 1e-3
    assert truth["histology"]["shape_ijk"] == [int(round(e / s)) for e, s in zip(geometry.stackExtentMm, spacing)]
    # the MRI header (pynrrd, LPS) holds the hand-derived grid, centred on the stack's footprint when asked
    low, high = histologyBox(truth)
    centre = forwardFromTruth(truth, ((low + high) / 2)[None])[0] if geometry.mriCentreRasMm == "stack" else (0, 0, 0)
    expected = _mriMatrixByHand(geometry, centre)
    header = nrrd.read_header(str(folder / "mri.nrrd"))
    lpsToRas = np.diag([-1.0, -1.0, 1.0])
    assert np.allclose(lpsToRas @ np.array(header["space directions"]).T, expected[:3, :3], atol=1e-9)
    assert np.allclose(lpsToRas @ np.array(header["space origin"]), expected[:3, 3], atol=1e-6)
    assert list(header["sizes"]) == list(geometry.mriShapeIjk)
    rasToIjk = np.linalg.inv(expected)

    def insideMri(points):
        ijk = points @ rasToIjk[:3, :3].T + rasToIjk[:3, 3]
        return np.all((ijk >= -1e-6) & (ijk <= np.array(geometry.mriShapeIjk) - 1 + 1e-6), axis=1)

    # evaluation points and landmarks follow the exact mapping and lie in both images
    _, evalMri = readCsv(folder / "eval_points_mri.csv")
    _, evalHistology = readCsv(folder / "eval_points_histology.csv")
    assert len(evalMri) == geometry.evalPointCount
    assert np.abs(forwardFromTruth(truth, evalHistology) - evalMri).max() < 5e-6
    assert np.all((evalHistology > low) & (evalHistology < high)) and insideMri(evalMri).all()
    labels, lmMri = readCsv(folder / "landmarks_mri.csv")
    _, lmHistology = readCsv(folder / "landmarks_histology.csv")
    assert len(labels) == geometry.landmarkCount
    mriTrue, histologyTrue = np.array(truth["landmarks"]["mri_true_ras_mm"]), np.array(truth["landmarks"]["histology_true_ras_mm"])
    assert np.abs(forwardFromTruth(truth, histologyTrue) - mriTrue).max() < 1e-6
    assert np.linalg.norm(lmMri - mriTrue, axis=1).max() < 5 * geometry.landmarkNoiseMriMm
    assert np.all((lmHistology > low) & (lmHistology < high)) and insideMri(lmMri).all()
    assert np.linalg.svd(histologyTrue - histologyTrue.mean(0), compute_uv=False).min() > 0.3, "coplanar landmarks"
    # the warp: the geometry's shrinkage and rotation in A
    A = np.array(truth["mapping"]["A"])
    assert np.linalg.det(A) * geometry.linearShrink ** 3 == pytest.approx(1.0, rel=1e-9)
    angle = math.degrees(math.acos((np.trace(A * geometry.linearShrink) - 1) / 2))
    assert angle == pytest.approx(geometry.rotationDeg, abs=1e-6)
    # tumour volumes: the MRI label (on the oblique grid) vs the analytic ellipsoid, the stack's vs the quadrature
    mriLabel, _ = nrrd.read(str(folder / "mri_tumour_label.nrrd"), index_order="C")
    analytic = truth["tumour"]["mri_volume_mm3"]
    assert np.count_nonzero(mriLabel) * np.prod(geometry.mriSpacingMm) == pytest.approx(analytic, rel=0.05)
    k, j, i = np.nonzero(mriLabel)
    centroid = np.c_[i, j, k].mean(axis=0) @ expected[:3, :3].T + expected[:3, 3]
    assert np.linalg.norm(centroid - truth["tumour"]["centre_mri_ras_mm"]) < 0.5 * max(geometry.mriSpacingMm)
    histologyLabel, _ = nrrd.read(str(folder / "histology_tumour_label.nrrd"), index_order="C")
    native = truth["tumour"]["histology_volume_mm3"]
    assert np.count_nonzero(histologyLabel) * np.prod(spacing) == pytest.approx(native, rel=0.03)
    rng = np.random.default_rng(3)
    kk, jj, ii = np.nonzero(histologyLabel)
    middle = np.array([-ii.mean() * spacing[0], -jj.mean() * spacing[1], kk.mean() * spacing[2]])
    y = middle + rng.uniform(-0.9, 0.9, size=(200000, 3))
    assert native == pytest.approx(np.mean(insideTumour(truth, forwardFromTruth(truth, y))) * 1.8 ** 3, rel=0.03)
    # coverage: Monte-Carlo over the stack's box with a finite-difference Jacobian of the test-side formula
    y = rng.uniform(low, high, size=(20000, 3))
    h = 1e-4
    jac = np.stack([(forwardFromTruth(truth, y + h * e) - forwardFromTruth(truth, y - h * e)) / (2 * h) for e in np.eye(3)], 2)
    footprint = np.mean(np.abs(np.linalg.det(jac))) * np.prod(high - low)
    assert truth["coverage"]["stack_footprint_mm3"] == pytest.approx(footprint, rel=0.01)
    if name == "partial":
        assert truth["coverage"]["brain_fraction"] < 0.1 and truth["coverage"]["mri_fraction"] < 0.05
        assert any(n.startswith("covered brain point") for n in truth["landmarks"]["names"].values())


def test_tumour_channel_is_a_two_channel_ome_tiff_with_known_tumour_volume(tmp_path):
    import nrrd
    import tifffile
    from scipy import ndimage

    from MRIHistoRegLib import stacks

    geometry = sampledata.SampleGeometry(tumourChannel=True)
    manifest = sampledata.generateSampleData(tmp_path / "s", size=16, seed=1, geometry=geometry)
    truth, folder = manifest["truth"], tmp_path / "s"
    assert sampledata.CHANNELS_FILE in manifest["files"] and truth["channels"]["names"] == ["autofluorescence", "tumour"]
    spacingUm = truth["histology"]["true_spacing_um"]
    with tifffile.TiffFile(str(folder / sampledata.CHANNELS_FILE)) as tif:
        assert tif.is_ome and tif.series[0].axes == "CZYX"
        data = tif.series[0].asarray()
        pixels = [e for e in __import__("xml.etree.ElementTree", fromlist=["x"]).fromstring(tif.ome_metadata).iter()
                  if e.tag.endswith("Pixels")][0]
        assert [float(pixels.get(f"PhysicalSize{a}")) for a in "XYZ"] == pytest.approx(spacingUm)
    nk, nj, ni = truth["histology"]["array_shape_kji"]
    assert data.shape == (2, nk, nj, ni) and data.dtype == np.uint16
    assert np.array_equal(data[0], tifffile.imread(str(folder / "histology.tif")))  # the registration channel
    label, _ = nrrd.read(str(folder / "histology_tumour_label.nrrd"), index_order="C")
    tumour = data[1].astype(np.float32)
    assert np.median(tumour[label == 1]) > 5 * np.median(tumour[label == 0])
    # a plain segmentation (midpoint threshold after a 3-voxel mean, largest component) finds the native volume
    smooth = ndimage.uniform_filter(tumour, size=3)
    threshold = 0.5 * (np.median(smooth[label == 1]) + np.median(smooth[label == 0]))
    components, count = ndimage.label(smooth > threshold)
    largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
    volume = np.count_nonzero(components == largest) * np.prod(truth["histology"]["true_spacing_mm"])
    native = truth["channels"]["tumour_native_volume_mm3"]
    assert native == truth["tumour"]["histology_volume_mm3"]
    assert volume == pytest.approx(native, rel=0.05)
    assert truth["channels"]["tumour_occupancy_volume_mm3"] == pytest.approx(native, rel=0.02)
    # the project's reader picks either channel by name, with the file's true spacing
    with stacks.openStack(folder / sampledata.CHANNELS_FILE, channel="tumour") as source:
        assert source.channelNames == ["autofluorescence", "tumour"]
        assert np.allclose(source.spacingMm, np.array(spacingUm) * 1e-3)
        assert np.array_equal(source.readPlane(nk // 2), data[1, nk // 2])


@pytest.mark.parametrize("geometry, words", [
    (sampledata.SampleGeometry(bumpAmplitudeMm=(0.8, 1.0), bumpSigmaMm=(0.3, 0.4)), "could fold"),
    (sampledata.SampleGeometry(stackSpacingUm=(30.0, 30.0, 40.0), stackExtentMm=(1.0, 3.0, 2.0)), "cannot hold the tumour"),
    (sampledata.SampleGeometry(mriDirection=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.5, 1.0))), "orthonormal"),
    (sampledata.SampleGeometry(mriShapeIjk=(30, 30, 30), mriCentreRasMm=(30.0, 0.0, 0.0)), "inside the MRI"),
])
def test_an_impossible_geometry_is_refused_and_nothing_written(tmp_path, geometry, words):
    with pytest.raises(ValueError, match=words):
        sampledata.generateSampleData(tmp_path / "out", geometry=geometry)
    assert not os.path.exists(tmp_path / "out") and os.listdir(tmp_path) == []
