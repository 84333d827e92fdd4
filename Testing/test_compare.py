"""compare.py: label transfer, volumes (native, transferred, Jacobian-integrated), Dice and HD95.

Ground truth from analytic shapes and known mappings; Dice/Hausdorff against SimpleITK's filters and a scipy
KD-tree (independent implementations)."""
import numpy as np
import pytest
import SimpleITK as sitk

from MRIHistoRegLib import compare
from MRIHistoRegLib.mapping import AffineMapping
from helpers import SineWarp, grid, ellipsoidOccupancy


def ellipsoid(shape, ijkToRas, centre, radii, label=1, supersample=4):
    """Label map of an ellipsoid, partial-volume exact to 1/supersample^3 (voxel covered >= 50% -> label)."""
    return np.where(ellipsoidOccupancy(shape, ijkToRas, centre, radii, supersample) >= 0.5, label, 0).astype(np.uint8)


def test_label_volumes_use_the_voxel_volume():
    labels = np.zeros((4, 5, 6), np.uint16)
    labels[0, 0, :3] = 1
    labels[1:3, 1:3, 1:3] = 7
    volumes = compare.labelVolumesMm3(labels, np.diag([0.1, 0.2, 0.5, 1.0]))
    assert volumes == {1: pytest.approx(3 * 0.01), 7: pytest.approx(8 * 0.01)}


def test_dice_agrees_with_simpleitk_label_overlap():
    rng = np.random.default_rng(0)
    a = np.zeros((30, 40, 50), np.uint8)
    b = np.zeros_like(a)
    a[5:20, 10:30, 10:40] = 1
    b[8:24, 12:33, 5:35] = 1
    b &= (rng.random(b.shape) > 0.1).astype(np.uint8)
    measures = sitk.LabelOverlapMeasuresImageFilter()
    measures.Execute(sitk.GetImageFromArray(a), sitk.GetImageFromArray(b))
    assert compare.dice(a, b) == pytest.approx(measures.GetDiceCoefficient(), rel=1e-12)
    assert compare.dice(a, a) == 1.0
    assert compare.dice(a, np.zeros_like(a)) == 0.0


def test_hausdorff_agrees_with_simpleitk_and_a_kdtree_on_anisotropic_grids():
    spatial = pytest.importorskip("scipy.spatial")
    shape, m = grid((24, 40, 36), (0.05, 0.08, 0.2))
    a = ellipsoid(shape, m, np.array([0.9, 1.5, 2.3]), np.array([0.6, 0.9, 1.5]))
    b = ellipsoid(shape, m, np.array([1.0, 1.4, 2.1]), np.array([0.5, 1.0, 1.3]))
    b[18:21, 15:20, 5:9] = 1  # an outlying blob makes the 95% and 100% values differ
    spacing = [0.05, 0.08, 0.2]
    imageA, imageB = sitk.GetImageFromArray(a), sitk.GetImageFromArray(b)
    imageA.SetSpacing(spacing)
    imageB.SetSpacing(spacing)
    hausdorff = sitk.HausdorffDistanceImageFilter()
    hausdorff.Execute(imageA, imageB)
    assert compare.hausdorffMm(a, b, m, percentile=100) == pytest.approx(hausdorff.GetHausdorffDistance(), rel=1e-6)

    def surfacePoints(mask):
        padded = np.pad(mask.astype(bool), 1)
        inner = padded[1:-1, 1:-1, 1:-1].copy()
        for axis in range(3):
            for shift in (-1, 1):
                inner &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask.astype(bool) & ~inner)[:, ::-1] * np.array(spacing)

    pa, pb = surfacePoints(a), surfacePoints(b)
    dab = spatial.cKDTree(pb).query(pa)[0]
    dba = spatial.cKDTree(pa).query(pb)[0]
    expected = max(np.percentile(dab, 95), np.percentile(dba, 95))
    assert compare.hausdorff95Mm(a, b, m) == pytest.approx(expected, rel=1e-6)
    assert compare.hausdorff95Mm(a, b, m) < compare.hausdorffMm(a, b, m, percentile=100)
    assert compare.hausdorff95Mm(a, a, m) == 0.0


def test_ellipsoid_through_a_known_scaling_keeps_the_scaled_volume():
    # histology: an ellipsoid at 0.04 mm; MRI->histology mapping = scaling by 0.8 (histology shrunk)
    histShape, histM = grid((70, 80, 90), 0.04)
    centre, radii = np.array([1.8, 1.6, 1.4]), np.array([1.1, 0.9, 0.7])
    hist = ellipsoid(histShape, histM, centre, radii, label=3)
    m = np.diag([0.8, 0.8, 0.8, 1.0])
    mriShape, mriM = grid((60, 70, 80), 0.05)
    transferred = compare.transferLabels(hist, histM, AffineMapping(m), mriShape, mriM)
    assert transferred.dtype == np.uint8 and set(np.unique(transferred)) == {0, 3}
    expected = 4 / 3 * np.pi * np.prod(radii) / 0.8 ** 3
    volume = compare.labelVolumesMm3(transferred, mriM)[3]
    assert volume == pytest.approx(expected, rel=0.01)
    partial = {}
    compare.transferLabels(hist, histM, AffineMapping(m), mriShape, mriM, volumesMm3=partial)
    native = compare.labelVolumesMm3(hist, histM)[3]  # the partial volume carries the native voxelisation
    assert partial[3] == pytest.approx(native / 0.8 ** 3, rel=0.003)
    nearest = compare.transferLabels(hist, histM, AffineMapping(m), mriShape, mriM, method="nearest")
    assert compare.labelVolumesMm3(nearest, mriM)[3] == pytest.approx(expected, rel=0.03)
    # the transferred label coincides with the analytic ellipsoid on the MRI grid
    truth = ellipsoid(mriShape, mriM, centre / 0.8, radii / 0.8, label=3, supersample=2)
    assert compare.dice(transferred, truth) > 0.98
    assert compare.hausdorff95Mm(transferred, truth, mriM) <= 0.05 + 1e-9


def test_jacobian_integrated_volume_agrees_with_the_resampled_one_on_a_smooth_warp():
    histShape, histM = grid((60, 70, 80), 0.05)
    centre, radii = np.array([2.0, 1.7, 1.5]), np.array([1.2, 1.0, 0.8])
    hist = ellipsoid(histShape, histM, centre, radii, label=2)
    warp = SineWarp(np.diag([0.85, 0.85, 0.85, 1.0]) + np.diag([0, 0, 0, 0]), amplitude=0.08, wavelength=3.0)
    warp.matrix[:3, 3] = [0.1, 0.05, 0.0]
    mriShape, mriM = grid((54, 60, 70), 0.06)  # covers the label's preimage
    partial = {}
    transferred = compare.transferLabels(hist, histM, warp, mriShape, mriM, volumesMm3=partial)
    resampled = compare.labelVolumesMm3(transferred, mriM)[2]
    integrated = compare.jacobianIntegratedVolumeMm3(hist, histM, warp, 2)
    assert integrated == pytest.approx(resampled, rel=0.01)
    assert integrated == pytest.approx(partial[2], rel=0.005)
    # and both match the analytic volume of the preimage: integral over the histology ellipsoid of 1/det J
    native = compare.labelVolumesMm3(hist, histM)[2]
    assert integrated / native == pytest.approx(1 / 0.85 ** 3, rel=0.05)  # sanity: mostly the affine shrinkage
    blocked = compare.jacobianIntegratedVolumeMm3(hist, histM, warp, 2, blockVoxels=4)
    assert blocked == pytest.approx(integrated, rel=1e-3)


def test_mri_labels_to_histology_through_the_inverse_streamed_by_slab():
    mriShape, mriM = grid((30, 32, 34), 0.1)
    mri = ellipsoid(mriShape, mriM, np.array([1.7, 1.6, 1.5]), np.array([0.9, 0.8, 0.7]), label=5)
    warp = SineWarp(np.diag([0.8, 0.8, 0.8, 1.0]), amplitude=0.04, wavelength=4.0)
    inverse = compare.InverseMapping(warp)
    histShape, histM = grid((40, 45, 50), 0.05)
    slabs = {}
    compare.transferLabels(mri, mriM, inverse, histShape, histM, sink=lambda k0, slab: slabs.__setitem__(k0, slab.copy()))
    streamed = np.concatenate([slabs[k] for k in sorted(slabs)])
    whole = compare.transferLabels(mri, mriM, inverse, histShape, histM)
    assert streamed.shape == histShape and np.array_equal(streamed, whole)
    # histology-space volume = MRI volume x det J of MRI->histology (~0.8^3)
    ratio = compare.labelVolumesMm3(whole, histM)[5] / compare.labelVolumesMm3(mri, mriM)[5]
    assert ratio == pytest.approx(0.8 ** 3, rel=0.03)


def test_compare_labels_and_tumours_report_every_figure():
    histShape, histM = grid((50, 50, 50), 0.05)
    hist = ellipsoid(histShape, histM, np.array([1.2, 1.25, 1.3]), np.array([0.6, 0.5, 0.4]), label=1)
    m = np.diag([0.8, 0.8, 0.8, 1.0])
    mriShape, mriM = grid((32, 32, 32), 0.1)
    mri = ellipsoid(mriShape, mriM, np.array([1.5, 1.56, 1.62]), np.array([0.75, 0.625, 0.5]), label=1)
    rows, transferred = compare.compareTumours(mri, mriM, hist, histM, AffineMapping(m))
    row = rows[1]
    assert row["histology_native_mm3"] == pytest.approx(4 / 3 * np.pi * 0.6 * 0.5 * 0.4, rel=0.02)
    assert row["histology_in_mri_jacobian_mm3"] == pytest.approx(row["histology_native_mm3"] / 0.512, rel=1e-9)
    # 0.1 mm MRI voxels on a 5-7.5 voxel radius ellipsoid: a few % voxelisation error
    assert row["histology_in_mri_label_voxels_mm3"] == pytest.approx(row["histology_in_mri_jacobian_mm3"], rel=0.04)
    assert row["histology_in_mri_resampled_mm3"] == pytest.approx(row["histology_in_mri_jacobian_mm3"], rel=0.01)
    assert row["dice"] > 0.95 and row["hd95_mm"] <= 0.1 + 1e-9
    assert row["mri_mm3"] == pytest.approx(compare.labelVolumesMm3(mri, mriM)[1])
    with pytest.raises(ValueError, match="share the MRI grid"):
        compare.compareLabels(mri, transferred[:-1], mriM)


def test_sample_data_tumour_through_the_true_mapping_recovers_the_true_volume(scene, sampleData):
    """End to end on the generated sample data: the histology tumour label carried onto the MRI grid through
    the exact (ground-truth) mapping has the true MRI-space volume, by resampling and by the Jacobian."""
    from MRIHistoRegLib import resample, sampledata, volumes

    truth = sampledata.loadTruth(str(sampleData))  # the session's shared seed-0 small sample (conftest)
    folder = str(sampleData)
    histM = np.array(truth["histology"]["true_ijk_to_ras"])
    mriM = np.array(truth["mri"]["ijk_to_ras"])
    mriShape = tuple(truth["mri"]["array_shape_kji"])
    hist = volumes.arrayFromVolume(volumes.loadVolume(scene, f"{folder}/{truth['histology']['label_file']}", labelmap=True)).copy()
    mriLabels = volumes.arrayFromVolume(volumes.loadVolume(scene, f"{folder}/{truth['mri']['label_file']}", labelmap=True)).copy()
    exact = sampledata.GroundTruthMapping(truth)
    trueVolume = truth["tumour"]["mri_volume_mm3"]
    partial = {}
    transferred = compare.transferLabels(hist, histM, exact, mriShape, mriM, volumesMm3=partial)
    resampled = partial[1]
    inverse = type("Forward", (), {"transformPoints": staticmethod(exact.histologyToMri)})()
    integrated = compare.jacobianIntegratedVolumeMm3(hist, histM, exact, 1, inverseMapping=inverse)
    assert resampled == pytest.approx(trueVolume, rel=0.01)
    assert compare.labelVolumesMm3(transferred, mriM)[1] == pytest.approx(trueVolume, rel=0.02)  # hard labels
    assert integrated == pytest.approx(trueVolume, rel=0.005)
    assert integrated == pytest.approx(resampled, rel=0.01)
    rows = compare.compareLabels(mriLabels, transferred, mriM)
    assert rows[1]["dice"] > 0.9 and rows[1]["hd95_mm"] <= 0.1 + 1e-6
    # and the light-sheet stack itself, resampled once through the same mapping, lands inside the MRI grid
    from MRIHistoRegLib import stacks

    stack = stacks.openStack(f"{folder}/histology.tif", spacingMm=truth["histology"]["true_spacing_mm"])
    image, info = resample.resampleToGrid(stack, exact, mriShape, mriM)
    assert info["level_by"] == "downsample.downsampleStack" and info["probe_max_error_voxels"] <= 0.1
    tumour = transferred == 1
    assert image[tumour].mean() > truth["histology"]["background_counts"]


def test_segmentation_and_label_map_nodes_give_the_same_labels(scene):
    import slicer

    from MRIHistoRegLib import volumes

    shape, m = grid((20, 24, 28), (0.1, 0.1, 0.2), origin=(1.0, 2.0, 3.0))
    labels = np.zeros(shape, np.uint8)
    labels[5:12, 6:15, 4:20] = 1
    labels[14:18, 3:9, 10:14] = 2
    labelNode = volumes.createVolumeNode(scene, labels, m, "labels", labelmap=True)
    reference = volumes.createVolumeNode(scene, np.zeros(shape, np.float32), m, "image")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "tumours")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelNode, segmentation)
    fromLabel, geometryLabel = compare.labelArrayFromNode(labelNode)
    fromSegmentation, geometrySegmentation = compare.labelArrayFromNode(segmentation, referenceNode=reference)
    assert np.allclose(geometryLabel, m) and np.allclose(geometrySegmentation, m)
    assert np.array_equal(fromLabel, labels) and np.array_equal(fromSegmentation, labels)
    with pytest.raises(ValueError, match="label map volume or a segmentation"):
        compare.labelArrayFromNode(scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "points"))


def test_label_crop_streamed_from_a_gzip_nrrd_equals_the_whole_map(tmp_path):
    """A sparse label map on a big grid: the streamed crop keeps every labelled voxel at its RAS position."""
    import nrrd

    from MRIHistoRegLib import stacks

    shape = (30, 40, 50)  # [k, j, i]
    labels = np.zeros(shape, np.uint8)
    labels[7:12, 20:26, 3:9] = 1
    labels[15, 30, 40] = 2
    path = tmp_path / "labels.nrrd"
    # header claims 1 mm (the seed's mistake); the true geometry is passed in, as the pipeline does
    nrrd.write(str(path), labels.transpose(2, 1, 0), {"space": "left-posterior-superior", "encoding": "gzip",
                                                      "space directions": np.eye(3), "space origin": np.zeros(3)})
    trueGeometry = np.diag([-0.02, -0.03, 0.05, 1.0])
    trueGeometry[:3, 3] = (1.0, 2.0, 3.0)
    with stacks.openStack(path) as source:
        crop, cropGeometry = compare.readLabelCrop(source, ijkToRas=trueGeometry)
    assert crop.shape == (15 - 7 + 1, 30 - 20 + 1, 40 - 3 + 1)
    assert compare.labelVolumesMm3(crop, cropGeometry) == pytest.approx(compare.labelVolumesMm3(labels, trueGeometry))
    # every labelled voxel keeps its RAS position (centroids computed from the whole map by hand)
    for label in (1, 2):
        whole = np.argwhere(labels == label)[:, ::-1].mean(axis=0)
        part = np.argwhere(crop == label)[:, ::-1].mean(axis=0)
        np.testing.assert_allclose(cropGeometry[:3, :3] @ part + cropGeometry[:3, 3],
                                   trueGeometry[:3, :3] @ whole + trueGeometry[:3, 3], atol=1e-12)


def test_label_quadrature_blocks_keep_the_volume_and_the_centroid():
    """Blocked quadrature (the Jacobian integral's and the volume interval's) keeps each label's volume and first
    moment exactly, whatever the block size; the volume through an affine map is the volume / |det A|."""
    shape, m = grid((30, 34, 40), (0.05, 0.06, 0.08), origin=(1.0, -2.0, 0.5))
    labels = ellipsoid(shape, m, np.array([2.0, -1.0, 1.6]), np.array([0.7, 0.6, 0.5]), label=3)
    voxels = np.argwhere(labels == 3)[:, ::-1].astype(float)
    centroid = (voxels @ m[:3, :3].T + m[:3, 3]).mean(axis=0)
    volume = len(voxels) * 0.05 * 0.06 * 0.08
    for blocks in (None, 1, 3, 7):
        points, weights = compare.labelQuadrature(labels, m, 3, blockVoxels=blocks, maxEvaluations=500)
        assert weights.sum() == pytest.approx(volume, rel=1e-12)
        np.testing.assert_allclose((points * weights[:, None]).sum(0) / weights.sum(), centroid, atol=1e-9)
    assert len(compare.labelQuadrature(labels, m, 3, maxEvaluations=500)[0]) <= 500
    matrix = np.diag([0.8, 0.9, 0.7, 1.0])
    points, weights = compare.labelQuadrature(labels, m, 3, maxEvaluations=500)
    assert compare.volumeInMriMm3(points, weights, AffineMapping(matrix)) == pytest.approx(volume / 0.504, rel=1e-9)
    with pytest.raises(compare.UserInputError, match="empty"):
        compare.labelQuadrature(labels, m, 9)
