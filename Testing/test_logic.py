"""The panel's logic facade (MRIHistoRegLib.logic) on a real app-less MRML scene: the actions the scenarios do not
cover - unit conversion, pair labelling and inclusion, pair files, live update, display helpers, ROI crops, the
report folder - each checked against numbers worked out here."""
import json
import os

import numpy as np
import pytest
import slicer
import vtk

from MRIHistoRegLib import volumes
from MRIHistoRegLib.logic import MRIHistoRegLogicCore


@pytest.fixture
def logic(scene):
    return MRIHistoRegLogicCore(scene)


def _pointList(scene, name, labelled):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for label, point in labelled:
        node.AddControlPoint(*[float(v) for v in point], label)
    return node


def _pairs(scene, matrix, count=8, seed=3):
    """Two point lists related by the affine `matrix` (MRI -> histology), labels P1..Pn."""
    rng = np.random.default_rng(seed)
    fixed = rng.uniform(-4, 4, size=(count, 3))
    moving = fixed @ matrix[:3, :3].T + matrix[:3, 3]
    labels = [f"P{i + 1}" for i in range(count)]
    return (_pointList(scene, "MRI", zip(labels, fixed)), _pointList(scene, "Histology", zip(labels, moving)),
            fixed, moving)


def test_spacing_units_and_physical_size(logic):
    assert logic.spacingToMm([3.25, 3.25, 5], "um") == pytest.approx([0.00325, 0.00325, 0.005])
    assert logic.spacingToMm([0.1, 0.2, 0.3], "mm") == [0.1, 0.2, 0.3]
    assert logic.physicalSizeMm([2160, 2560, 472], [0.00325, 0.00325, 0.005]) == pytest.approx([7.02, 8.32, 2.36])
    with pytest.raises(ValueError, match="unit"):
        logic.spacingToMm([1, 1, 1], "inch")
    with pytest.raises(ValueError, match="positive"):
        logic.spacingToMm([1, 0, 1], "um")
    assert logic.pathOrNone(".") is None and logic.pathOrNone("") is None and logic.pathOrNone("/a/b") == "/a/b"


def test_place_pair_labels_and_inclusion(logic, scene):
    mri, histology = logic.createPointLists()
    assert scene.IsNodePresent(mri) and scene.IsNodePresent(histology)
    assert logic.nextPairLabel(mri, histology) == "P1"
    mri.AddControlPoint(1.0, 2.0, 3.0)
    logic.labelLastPoint(mri, "P1")
    assert logic.nextPairLabel(mri, histology) == "P2"  # P1 is taken (in one list already)
    histology.AddControlPoint(0.5, 1.0, 1.5, "P7")
    assert logic.nextPairLabel(mri, histology) == "P8"
    with pytest.raises(ValueError, match="no point"):
        logic.labelLastPoint(scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode"), "P1")
    histology.AddControlPoint(0.5, 1.0, 1.5, "P1")
    logic.setPairIncluded(mri, histology, "P1", False)
    assert not mri.GetNthControlPointSelected(0) and not histology.GetNthControlPointSelected(1)
    assert histology.GetNthControlPointSelected(0), "other pairs keep their state"
    with pytest.raises(ValueError, match="No point labelled"):
        logic.setPairIncluded(mri, histology, "P99", True)


def test_include_column_of_the_table_drives_the_fit(logic, scene):
    mri, histology, fixed, moving = _pairs(scene, np.diag([0.8, 0.8, 0.8, 1.0]))
    result = logic.fitLandmarks(mri, histology, "affine")
    table = result.tableNode
    assert logic.applyIncludedFromTable(table, mri, histology) == 0  # table and lists agree after a fit
    labels = [table.GetTable().GetValueByName(r, "label").ToString() for r in range(table.GetNumberOfRows())]
    row = labels.index("P2")
    table.GetTable().SetValueByName(row, "included", vtk.vtkVariant(0))  # the user unticks P2
    assert logic.applyIncludedFromTable(table, mri, histology) == 1
    refit = logic.fitLandmarks(mri, histology, "affine", result.transformNode, table)
    assert "P2" not in refit.evaluation["labels"] and refit.evaluation["count"] == len(fixed) - 1
    assert logic.applyIncludedFromTable(table, mri, histology) == 0  # the excluded row stays, unticked


def test_fit_recovers_a_known_similarity_and_its_shrinkage(logic, scene):
    angle = np.radians(20)
    scale = 0.8  # histology 20% smaller per axis: volume ratio 0.512, shrinkage 48.8%
    matrix = np.eye(4)
    matrix[:3, :3] = scale * np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    matrix[:3, 3] = [1.0, -2.0, 0.5]
    mri, histology, fixed, moving = _pairs(scene, matrix)
    result = logic.fitLandmarks(mri, histology, "similarity")
    assert result.evaluation["shrinkage_volume_percent"] == pytest.approx(100 * (1 - scale ** 3), abs=1e-6)
    assert result.evaluation["residual_max_mm"] < 1e-9
    fromParent = vtk.vtkMatrix4x4()
    result.transformNode.GetMatrixTransformFromParent(fromParent)
    np.testing.assert_allclose(volumes.matrixToNumpy(fromParent), matrix, atol=1e-9)
    assert "48.8% by volume" in logic.describeFit(result)
    # refit into the same nodes with another model: no new nodes
    count = scene.GetNumberOfNodes()
    logic.fitLandmarks(mri, histology, "affine", result.transformNode, result.tableNode)
    assert scene.GetNumberOfNodes() == count
    with pytest.raises(ValueError, match="Unknown model"):
        logic.fitLandmarks(mri, histology, "bspline")


def test_pair_file_roundtrip_keeps_labels_points_and_exclusions(logic, scene, tmp_path):
    matrix = np.diag([0.9, 0.8, 0.7, 1.0])
    mri, histology, fixed, moving = _pairs(scene, matrix, count=6)
    logic.setPairIncluded(mri, histology, "P3", False)
    path = logic.exportPointPairs(str(tmp_path / "pairs.csv"), mri, histology)
    newMri, newHistology = logic.createPointLists("MRI 2", "Histology 2")
    assert logic.importPointPairs(path, newMri, newHistology) == 6
    for original, imported in ((mri, newMri), (histology, newHistology)):
        labels = [imported.GetNthControlPointLabel(i) for i in range(imported.GetNumberOfControlPoints())]
        assert sorted(labels) == sorted(f"P{i + 1}" for i in range(6))
        for i in range(imported.GetNumberOfControlPoints()):
            label = imported.GetNthControlPointLabel(i)
            j = [original.GetNthControlPointLabel(n) for n in range(original.GetNumberOfControlPoints())].index(label)
            np.testing.assert_allclose(imported.GetNthControlPointPosition(i), original.GetNthControlPointPosition(j), atol=1e-12)
            assert imported.GetNthControlPointSelected(i) == (label != "P3")


def test_points_placed_on_the_aligned_histology_are_stored_in_histology_space(logic, scene, tmp_path):
    """Aligning puts the histology point list under the transform with the volume: a click on the aligned image at
    world (MRI) position w is stored as the transform's from-parent image of w, pairing reads it there, and the refit
    stays the known transform. Un-aligning gives the list back its own space, coordinates untouched."""
    from MRIHistoRegLib import transforms

    angle = np.radians(15)
    matrix = np.eye(4)  # known MRI -> histology affine
    matrix[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]) @ np.diag([0.8, 0.9, 0.7])
    matrix[:3, 3] = [2.0, -1.0, 0.5]
    mri, histology, fixed, moving = _pairs(scene, matrix)
    result = logic.fitLandmarks(mri, histology, "affine")
    transformNode, tableNode = result.transformNode, result.tableNode
    volume = volumes.createVolumeNode(scene, np.zeros((2, 2, 2), np.float32), np.eye(4), "histology")
    logic.setHistologyAligned(volume, transformNode, True, histologyLandmarks=histology)
    assert volume.GetParentTransformNode() is transformNode and histology.GetParentTransformNode() is transformNode
    for i in range(len(fixed)):  # stored in histology space, shown on the MRI feature
        np.testing.assert_allclose(histology.GetNthControlPointPosition(i), moving[i], atol=1e-12)
        np.testing.assert_allclose(histology.GetNthControlPointPositionWorld(i), fixed[i], atol=1e-6)

    clicked = np.array([1.5, -0.5, 2.0])  # the new pair: the same anatomy clicked in the MRI and on the aligned histology
    mri.AddControlPoint(*clicked, "P9")
    index = histology.AddControlPoint(0.0, 0.0, 0.0, "P9")
    histology.SetNthControlPointPositionWorld(index, *clicked)  # what the placement widget does with a click
    local = np.array(histology.GetNthControlPointPosition(index))
    np.testing.assert_allclose(local, matrix[:3, :3] @ clicked + matrix[:3, 3], atol=1e-9)
    np.testing.assert_allclose(local, transforms.mappingFromWorldToNode(transformNode).transformPoints(clicked[None])[0], atol=1e-9)
    refit = logic.fitLandmarks(mri, histology, "affine", transformNode, tableNode)
    assert refit.evaluation["count"] == len(fixed) + 1 and refit.evaluation["residual_max_mm"] < 1e-9
    fromParent = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformFromParent(fromParent)
    np.testing.assert_allclose(volumes.matrixToNumpy(fromParent), matrix, atol=1e-9)

    # the pair file (excluded pairs included) holds histology-space points too
    logic.setPairIncluded(mri, histology, "P2", False)
    newMri, newHistology = logic.createPointLists("MRI 2", "Histology 2")
    assert logic.importPointPairs(logic.exportPointPairs(str(tmp_path / "pairs.csv"), mri, histology), newMri, newHistology) == 9
    imported = {newHistology.GetNthControlPointLabel(i): newHistology.GetNthControlPointPosition(i)
                for i in range(newHistology.GetNumberOfControlPoints())}
    np.testing.assert_allclose(imported["P2"], moving[1], atol=1e-9)
    np.testing.assert_allclose(imported["P9"], local, atol=1e-9)

    logic.setHistologyAligned(volume, transformNode, False, histologyLandmarks=histology)
    assert volume.GetParentTransformNode() is None and histology.GetParentTransformNode() is None
    np.testing.assert_allclose(histology.GetNthControlPointPositionWorld(index), local, atol=1e-12)


def test_auto_update_refits_when_a_point_moves_and_stops(logic, scene):
    mri, histology, fixed, moving = _pairs(scene, np.diag([0.8, 0.8, 0.8, 1.0]))
    nodes = logic.setAutoUpdate(True, mri, histology, "affine")
    transformNode, tableNode = nodes.transformNode, nodes.tableNode
    assert tableNode.GetNumberOfRows() == len(fixed)

    def mapped(point):
        return np.array(transformNode.GetTransformFromParent().TransformPoint(point))

    np.testing.assert_allclose(mapped([1.0, 0.0, 0.0]), [0.8, 0.0, 0.0], atol=1e-9)
    # move every histology point to 0.5 x: the live fit follows
    for i, point in enumerate(fixed):
        histology.SetNthControlPointPosition(i, *(0.5 * point))
    np.testing.assert_allclose(mapped([1.0, 0.0, 0.0]), [0.5, 0.0, 0.0], atol=1e-9)
    logic.setAutoUpdate(False)
    histology.SetNthControlPointPosition(0, 10.0, 10.0, 10.0)
    np.testing.assert_allclose(mapped([1.0, 0.0, 0.0]), [0.5, 0.0, 0.0], atol=1e-9)
    assert logic.autoUpdateError is None


def test_checkerboard_alternates_squares_of_the_given_size(logic, scene):
    rng = np.random.default_rng(0)
    matrix = np.diag([0.5, 0.5, 0.5, 1.0])
    a, b = rng.uniform(0, 1, (4, 4, 8)), rng.uniform(100, 300, (4, 4, 8))
    nodeA = volumes.createVolumeNode(scene, a.astype(np.float32), matrix, "a")
    nodeB = volumes.createVolumeNode(scene, b.astype(np.float32), matrix, "b")
    board = volumes.arrayFromVolume(logic.createCheckerboardVolume(nodeA, nodeB, squareMm=1.0))
    # 1 mm squares = 2 voxels along each axis: parity of (i//2 + j//2 + k//2) says whose voxel it is
    k, j, i = np.indices(a.shape)
    fromA = (i // 2 + j // 2 + k // 2) % 2 == 0

    def increasingIn(source, mask):  # board values there are an increasing function of `source`
        order = np.argsort(source[mask])
        return bool(np.all(np.diff(board[mask][order]) >= -1e-6))

    assert increasingIn(a, fromA) and increasingIn(b, ~fromA)
    assert not increasingIn(b, fromA) and not increasingIn(a, ~fromA)
    assert 0.0 <= board.min() and board.max() <= 1.0  # both images brought to one range so both show
    other = volumes.createVolumeNode(scene, a.astype(np.float32), np.diag([0.4, 0.5, 0.5, 1.0]), "c")
    with pytest.raises(ValueError, match="same grid"):
        logic.createCheckerboardVolume(nodeA, other)


def test_warp_magnitude_of_a_translation_is_its_length(logic, scene):
    reference = volumes.createVolumeNode(scene, np.zeros((3, 4, 5), np.float32), np.diag([0.5, 0.5, 0.5, 1.0]), "grid")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 3.0)
    matrix.SetElement(1, 3, 4.0)
    transform.SetMatrixTransformToParent(matrix)
    magnitude = volumes.arrayFromVolume(logic.createWarpMagnitudeVolume(transform, reference))
    assert magnitude.shape == (3, 4, 5)
    np.testing.assert_allclose(magnitude, 5.0, atol=1e-4)


def test_refined_transform_is_the_landmark_transform_after_the_refinement(logic, scene):
    """landmark(refinement(x)) in one node, the landmark transform taken with its parent: checked against the
    mappings composed by hand (refinement x + d(x) at the field's grid nodes, the parent's matrix, the fitted
    landmark transform), the result a copy that later refits do not move."""
    from MRIHistoRegLib import refine, transforms

    mri, histology, fixed, _ = _pairs(scene, np.array([[0.8, 0.1, 0, 1.0], [-0.1, 0.8, 0, 2.0], [0, 0, 0.75, -1.0], [0, 0, 0, 1]]))
    landmarkNode = logic.fitLandmarks(mri, histology, "affine+tps").transformNode
    parentMatrix = np.array([[0, -1, 0, 0.5], [1, 0, 0, -0.25], [0, 0, 1, 0.3], [0, 0, 0, 1.0]])  # 90 deg about z + shift
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "parent")
    parent.SetMatrixTransformFromParent(volumes.numpyToMatrix(parentMatrix))
    landmarkNode.SetAndObserveTransformNodeID(parent.GetID())
    # a smooth refinement field d(x) = (0.2 sin(x/3), 0.1 y/5, -0.15) on a 0.5 mm grid
    fieldIjkToRas = np.diag([0.5, 0.5, 0.5, 1.0])
    fieldIjkToRas[:3, 3] = -6.0
    k, j, i = np.indices((25, 25, 25))
    x, y = -6.0 + 0.5 * i, -6.0 + 0.5 * j
    field = np.stack([0.2 * np.sin(x / 3), 0.1 * y / 5, np.full(x.shape, -0.15)], axis=-1)
    result = refine.RefinementResult(transforms.mappingFromWorldToNode(landmarkNode), field, fieldIjkToRas, accepted=True, reason="test")
    refinementNode = refine.refinementTransformNode(scene, result, "refinement")
    # probes on grid nodes, where the refinement is exactly x + d(x)
    rng = np.random.default_rng(5)
    nodes = rng.integers(2, 23, size=(40, 3))  # (i, j, k)
    points = -6.0 + 0.5 * nodes.astype(float)
    refined = points + np.stack([0.2 * np.sin(points[:, 0] / 3), 0.1 * points[:, 1] / 5, np.full(len(points), -0.15)], 1)
    inParent = refined @ parentMatrix[:3, :3].T + parentMatrix[:3, 3]
    expected = transforms.mappingFromTransformNode(landmarkNode).transformPoints(inParent)  # the landmark's own from-parent
    landmarkBefore = transforms.mappingFromWorldToNode(landmarkNode).transformPoints(fixed)

    output = scene.AddNewNodeByClass("vtkMRMLTransformNode", "refined output")
    composite = logic.composeRefinedTransform(landmarkNode, refinementNode, output)
    assert composite is output and composite.GetParentTransformNode() is None
    np.testing.assert_allclose(transforms.mappingFromWorldToNode(composite).transformPoints(points), expected, atol=1e-6)
    np.testing.assert_allclose(result.transformPoints(points), expected, atol=1e-6)  # the mapping refinement reported
    # the inputs are unchanged: the landmark transform keeps its parent and mapping
    assert landmarkNode.GetParentTransformNode() is parent and refinementNode.GetParentTransformNode() is None
    np.testing.assert_allclose(transforms.mappingFromWorldToNode(landmarkNode).transformPoints(fixed), landmarkBefore, atol=1e-12)
    # a copy: refitting the landmarks or moving the parent later does not move the refined chain
    histology.SetNthControlPointPosition(0, 9.0, 9.0, 9.0)
    logic.fitLandmarks(mri, histology, "affine+tps", landmarkNode)
    parent.SetMatrixTransformFromParent(volumes.numpyToMatrix(np.eye(4)))
    np.testing.assert_allclose(transforms.mappingFromWorldToNode(composite).transformPoints(points), expected, atol=1e-6)
    # without an output node a new one is created
    assert logic.composeRefinedTransform(landmarkNode, refinementNode) not in (composite, landmarkNode, refinementNode)
    with pytest.raises(ValueError, match="separate node"):
        logic.composeRefinedTransform(landmarkNode, refinementNode, landmarkNode)
    with pytest.raises(ValueError, match="linear"):
        logic.composeRefinedTransform(landmarkNode, refinementNode, parent)


def test_slice_layers_follow_the_fade(logic, scene):
    assert logic.setSliceLayers(opacity=0.3) == 0  # an app-less scene has no slice views
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    volume = volumes.createVolumeNode(scene, np.zeros((2, 2, 2), np.float32), np.eye(4), "v")
    assert logic.setSliceLayers(foreground=volume, opacity=1.7) == 1
    assert composite.GetForegroundOpacity() == 1.0 and composite.GetForegroundVolumeID() == volume.GetID()


def test_roi_crop_covers_the_voxels_inside_the_box(logic, scene):
    # stack geometry of docs/ARCHITECTURE.md section 3: RAS = (-i sx, -j sy, k sz), 0.1 mm voxels, 50 x 40 x 30 (i, j, k)
    ijkToRas = np.diag([-0.1, -0.1, 0.1, 1.0])
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(-1.0, -2.0, 1.5)  # voxel centre (10, 20, 15)
    roi.SetSize(0.6, 0.4, 1.0)
    crop = logic.roiToCrop(roi, (30, 40, 50), ijkToRas)
    # i: RAS x in [-1.3, -0.7] -> i in [7, 13]: voxels 7..13 touch it -> [7, 14); j: [18, 22] -> [18, 23); k: [10, 20] -> [10, 21)
    assert crop == ((7, 14), (18, 23), (10, 21))
    roi.SetCenter(100.0, 100.0, 100.0)
    with pytest.raises(ValueError, match="does not overlap"):
        logic.roiToCrop(roi, (30, 40, 50), ijkToRas)


def test_report_folder_holds_the_results_and_refuses_foreign_folders(logic, scene, tmp_path):
    mri, histology, _, _ = _pairs(scene, np.diag([0.8, 0.8, 0.8, 1.0]))
    result = logic.fitLandmarks(mri, histology, "affine+tps")
    grid = np.diag([0.5, 0.5, 0.5, 1.0])
    mriVolume = volumes.createVolumeNode(scene, np.random.default_rng(1).uniform(0, 1, (12, 12, 12)), grid, "mri")
    resampled = volumes.createVolumeNode(scene, np.random.default_rng(2).uniform(0, 1, (12, 12, 12)), grid, "resampled")
    folder = logic.exportReport(str(tmp_path / "report"), result.transformNode, result.tableNode, None, resampled,
                                mri, histology, mriVolume)
    names = set(os.listdir(folder))
    assert {"transform.h5", "histology_on_mri.nrrd", "landmarks_mri.mrk.json", "landmarks_histology.mrk.json",
            "report.json", "report.csv", "landmark_errors.png", "overlay_axial.png"} <= names
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["transform"]["model"] == "affine+tps"
    assert report["transform"]["shrinkage_volume_percent"] == pytest.approx(100 * (1 - 0.8 ** 3), abs=1e-6)
    assert [row["label"] for row in report["landmarks"]] == [f"P{i + 1}" for i in range(8)]
    # the nodes still point at no report file (a temporary storage node wrote them)
    assert resampled.GetStorageNode() is None
    # the written transform maps like the node
    reread = slicer.vtkMRMLTransformNode()
    scene.AddNode(reread)
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(os.path.join(folder, "transform.h5"))
    assert storage.ReadData(reread)
    point = [1.0, 2.0, -1.0]
    np.testing.assert_allclose(reread.GetTransformFromParent().TransformPoint(point),
                               result.transformNode.GetTransformFromParent().TransformPoint(point), atol=1e-6)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not empty"):
        logic.exportReport(str(foreign), result.transformNode)
    assert os.listdir(foreign) == ["holiday.jpg"]


def test_full_resolution_load_is_the_stack_at_its_true_spacing(logic, scene, tmp_path):
    from MRIHistoRegLib import sampledata, scenarios

    folder = scenarios._sampleFolder(tmp_path)
    truth = sampledata.loadTruth(folder)
    node = logic.loadFullResolution(os.path.join(folder, "histology.tif"), truth["histology"]["true_spacing_mm"])
    reference = volumes.loadVolume(scene, os.path.join(folder, "histology.nrrd"))  # the same voxels, 1 mm header
    np.testing.assert_array_equal(volumes.arrayFromVolume(node), volumes.arrayFromVolume(reference))
    np.testing.assert_allclose(volumes.ijkToRas(node), truth["histology"]["true_ijk_to_ras"], atol=1e-12)


def test_full_resolution_load_checks_memory_once_for_its_one_copy(logic, scene, tmp_path, monkeypatch):
    """The planes go straight into the node's buffer (one copy of the stack): one memory check, for nbytes."""
    import tifffile

    from MRIHistoRegLib import stacks
    import MRIHistoRegLib.stacks.base  # noqa: F401  (the memory guard lives there)

    array = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    path = str(tmp_path / "stack.tif")
    tifffile.imwrite(path, array, photometric="minisblack")  # one page per k
    checks = []
    monkeypatch.setattr(stacks.base, "availableMemoryBytes", lambda: checks.append(1) or array.nbytes)
    before = scene.GetNumberOfNodes()
    node = logic.loadFullResolution(path, [0.01, 0.02, 0.03])
    assert len(checks) == 1  # checked once, and a stack of exactly the available size loads
    np.testing.assert_array_equal(volumes.arrayFromVolume(node), array)
    assert volumes.arrayFromVolume(node).dtype == np.uint16
    np.testing.assert_allclose(volumes.spacingOf(volumes.ijkToRas(node)), [0.01, 0.02, 0.03], rtol=1e-9)
    monkeypatch.setattr(stacks.base, "availableMemoryBytes", lambda: array.nbytes - 1)
    count = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="streamed downsampling"):
        logic.loadFullResolution(path, [0.01, 0.02, 0.03])
    assert scene.GetNumberOfNodes() == count  # nothing left behind
    assert count > before


def test_custom_spacing_grid_covers_the_histology_footprint(logic, scene):
    # a histology volume 2 x 3 x 4 mm at 0.5 mm, identity registration: the footprint grid is that box at 0.25 mm
    histologyIjkToRas = np.diag([0.5, 0.5, 0.5, 1.0])
    histology = volumes.createVolumeNode(scene, np.ones((8, 6, 4), np.float32), histologyIjkToRas, "histology")
    mri = volumes.createVolumeNode(scene, np.zeros((10, 10, 10), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]), "mri")
    identity = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    output = logic.resampleHistology(identity, mri, histologyVolume=histology, outputSpacingMm=0.25)
    np.testing.assert_allclose(volumes.spacingOf(volumes.ijkToRas(output)), [0.25] * 3, atol=1e-12)
    shape = volumes.arrayFromVolume(output).shape
    assert shape == (16, 12, 8)  # 4 x 3 x 2 mm / 0.25 mm (k, j, i)
    # first voxel centre: the histology box's corner (-0.25 mm) + half an output voxel
    np.testing.assert_allclose(volumes.ijkToRas(output)[:3, 3], [-0.125] * 3, atol=1e-9)
    np.testing.assert_allclose(volumes.arrayFromVolume(output)[1:-1, 1:-1, 1:-1], 1.0, atol=1e-5)
