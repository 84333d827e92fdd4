"""Landmark pairing from real markups nodes and point-file I/O (Slicer's own storage nodes / markups logic as
the other side of every round trip)."""
import numpy as np
import pytest
import slicer

from MRIHistoRegLib import landmarks
from MRIHistoRegLib.context import moduleLogic
from MRIHistoRegLib.volumes import numpyToMatrix
from helpers import readElastixPoints


def _node(scene, name, labels, points):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for label, p in zip(labels, points):
        node.AddControlPoint(*[float(v) for v in p], label)
    return node


POINTS = np.array([[1.0, 2.0, 3.0], [4.0, -5.0, 6.5], [-7.0, 8.0, 9.0], [10.0, 11.0, -12.0], [0.5, 0.25, 0.125]])


# --- pairing ---------------------------------------------------------------------------------------------------

def test_pairByLabelNotByOrder(scene):
    fixed = _node(scene, "mri", ["a", "b", "c", "d", "e"], POINTS)
    order = [3, 0, 4, 1, 2]
    moving = _node(scene, "histology", [["a", "b", "c", "d", "e"][i] for i in order], POINTS[order] * 2)
    pairs = landmarks.pairLandmarks(fixed, moving)
    assert pairs.labels == ["a", "b", "c", "d", "e"] and not pairs.pairedByIndex
    np.testing.assert_array_equal(pairs.fixed, POINTS)
    np.testing.assert_array_equal(pairs.moving, POINTS * 2)
    assert pairs.messages() == [] and pairs.warnings() == []


def test_pairingReportsEverythingLeftOut(scene, caplog):
    fixed = _node(scene, "mri", ["a", "b", "c", "d", "only-mri", "dup", "dup"], np.vstack([POINTS, POINTS[:2] + 1]))
    moving = _node(scene, "histology", ["e", "d", "c", "b", "a", "only-histo", "dup"], np.vstack([POINTS, POINTS[:2]]) * 3)
    fixed.SetNthControlPointSelected(1, False)      # b excluded by the user
    moving.UnsetNthControlPointPosition(2)          # c not placed in the histology list
    with caplog.at_level("WARNING"):
        pairs = landmarks.pairLandmarks(fixed, moving)
    assert pairs.labels == ["a", "d"]
    np.testing.assert_array_equal(pairs.fixed, POINTS[[0, 3]])
    np.testing.assert_array_equal(pairs.moving, POINTS[[4, 1]] * 3)
    assert pairs.excluded == ["b"] and pairs.undefined == ["c"] and pairs.duplicates == ["dup"]
    assert pairs.unmatchedFixed == ["only-mri"] and sorted(pairs.unmatchedMoving) == ["e", "only-histo"]
    assert "only-mri" in caplog.text and "only-histo" in caplog.text and "dup" in caplog.text
    assert not any("excluded" in w for w in pairs.warnings()) and any("excluded" in m for m in pairs.messages())


def test_pairByIndexWhenNoLabelShared(scene):
    fixed = _node(scene, "mri", ["F-1", "F-2", "F-3", "F-4"], POINTS[:4])
    moving = _node(scene, "histology", ["M-1", "M-2", "M-3"], POINTS[:3] + 1)
    pairs = landmarks.pairLandmarks(fixed, moving)
    assert pairs.pairedByIndex and pairs.labels == ["F-1/M-1", "F-2/M-2", "F-3/M-3"]
    assert pairs.unmatchedFixed == ["F-4"] and pairs.unmatchedMoving == []
    assert "paired by their order" in pairs.messages()[0]
    np.testing.assert_array_equal(pairs.moving, POINTS[:3] + 1)


def test_pairingUsesEachListsOwnCoordinates(scene):
    """A list under a transform node (e.g. histology points shown on the aligned histology) pairs in its own
    image's space (the node's local coordinates), not in world space."""
    fixed = _node(scene, "mri", ["a", "b"], POINTS[:2])
    moving = _node(scene, "histology", ["a", "b"], POINTS[:2])
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift = np.eye(4)
    shift[:3, 3] = [10.0, 0.0, -1.0]
    parent.SetMatrixTransformToParent(numpyToMatrix(shift))
    moving.SetAndObserveTransformNodeID(parent.GetID())
    assert np.allclose(moving.GetNthControlPointPositionWorld(0), POINTS[0] + [10.0, 0.0, -1.0])  # world moved
    pairs = landmarks.pairLandmarks(fixed, moving)
    np.testing.assert_allclose(pairs.moving, POINTS[:2])
    with pytest.raises(ValueError, match="two markups point lists"):
        landmarks.pairLandmarks(fixed, None)


# --- point files -----------------------------------------------------------------------------------------------

LABELS = ["a", "b,with comma", "c d", "e", "f"]


@pytest.mark.parametrize("fmt,name", [("mrk.json", "p.mrk.json"), ("fcsv", "p.fcsv"), ("slicer-csv", "p.csv"),
                                      ("csv", "p.csv")])
def test_pointFileRoundTrip(tmp_path, fmt, name):
    path = tmp_path / name
    selected = [True, False, True, True, True]
    landmarks.writePoints(path, LABELS, POINTS, format=fmt, selected=selected)
    assert landmarks.detectFormat(path) == fmt
    records = landmarks.readPointRecords(path)
    assert records.labels == LABELS
    np.testing.assert_allclose(records.points, POINTS, atol=1e-12)
    assert records.selected == (selected if fmt != "csv" else [True] * 5)


def test_slicerFilesReadByMrmlMatchOurs(scene, tmp_path):
    """Files we write are what Slicer's own readers see, and files Slicer writes are what we read."""
    node = _node(scene, "src", LABELS, POINTS)
    logic = moduleLogic(scene, "Markups")
    # Slicer's markups CSV in LPS columns (the default export) -> converted to RAS
    assert logic.ExportControlPointsToCSV(node, str(tmp_path / "lps.csv"))
    assert landmarks.detectFormat(tmp_path / "lps.csv") == "slicer-csv"
    labels, points = landmarks.readPoints(tmp_path / "lps.csv")
    assert labels == LABELS
    np.testing.assert_allclose(points, POINTS)
    # our Slicer CSV imported by the markups logic
    landmarks.writePoints(tmp_path / "ours.csv", LABELS, POINTS, format="slicer-csv")
    imported = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "imported")
    assert logic.ImportControlPointsFromCSV(imported, str(tmp_path / "ours.csv"))
    assert [imported.GetNthControlPointLabel(i) for i in range(5)] == LABELS
    np.testing.assert_allclose([imported.GetNthControlPointPositionWorld(i) for i in range(5)], POINTS)
    # our .mrk.json read by a plain JSON storage node
    landmarks.writePoints(tmp_path / "ours.mrk.json", LABELS, POINTS)
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "ours.mrk.json"))
    read = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "read")
    assert storage.ReadData(read)
    np.testing.assert_allclose([read.GetNthControlPointPositionWorld(i) for i in range(5)], POINTS)


def test_bigWarpLandmarks(tmp_path):
    # a file as BigWarp writes it: quoted, no header, moving xyz then fixed xyz
    path = tmp_path / "landmarks.csv"
    path.write_text('"Pt-0","true","1.5","2.5","3.5","10.0","20.0","30.0"\n'
                    '"Pt-1","false","4.0","5.0","6.0","40.0","50.0","60.0"\n')
    assert landmarks.detectFormat(path) == "bigwarp"
    labels, fixed, moving, active = landmarks.readBigWarpLandmarks(path, flipXY=False)  # as written in the file
    assert labels == ["Pt-0", "Pt-1"] and active == [True, False]
    np.testing.assert_array_equal(moving, [[1.5, 2.5, 3.5], [4.0, 5.0, 6.0]])
    np.testing.assert_array_equal(fixed, [[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])
    assert landmarks.readPoints(path, role="moving", flipXY=False)[1].tolist() == moving.tolist()
    with pytest.raises(ValueError, match="role"):
        landmarks.readPoints(path, role="both")
    # default: Fiji (x, y, z) of an orientation-less stack -> Slicer RAS (-x, -y, z)
    _, flipped, flippedMoving, _ = landmarks.readBigWarpLandmarks(path)
    np.testing.assert_array_equal(flipped, fixed * [-1, -1, 1])
    np.testing.assert_array_equal(flippedMoving, moving * [-1, -1, 1])
    np.testing.assert_array_equal(landmarks.readPoints(path, role="moving")[1], moving * [-1, -1, 1])
    out = tmp_path / "written.csv"
    landmarks.writeBigWarpLandmarks(out, labels, fixed, moving, active, flipXY=False)
    assert landmarks.readBigWarpLandmarks(out, flipXY=False)[1].tolist() == fixed.tolist()
    assert out.read_text().splitlines()[1].startswith('"Pt-1","false","4.0"')
    # default write flips back: RAS points read by default are written as the original Fiji coordinates
    landmarks.writeBigWarpLandmarks(out, labels, flipped, flippedMoving, active)
    assert out.read_text().splitlines()[1].startswith('"Pt-1","false","4.0"')
    assert landmarks.readBigWarpLandmarks(out)[1].tolist() == flipped.tolist()
    bad = tmp_path / "bad.csv"
    bad.write_text('"Pt-0","true","1","2","3","4","5"\n')
    with pytest.raises(ValueError, match="8 fields"):
        landmarks.readBigWarpLandmarks(bad)


def test_bigWarpStackCoordinatesMatchSlicerStackGeometry(scene, tmp_path):
    """A voxel (i, j, k) of a stack with spacing (sx, sy, sz) is at Fiji (i sx, j sy, k sz); loaded by default it
    lands on that voxel's RAS position in the stack geometry Slicer gives the stack (docs/ARCHITECTURE.md section 3)."""
    spacing = (0.5, 0.25, 2.0)
    voxels = np.array([[0, 0, 0], [3, 1, 2], [7, 5, 1]], float)
    fiji = voxels * spacing
    path = tmp_path / "bw.csv"
    landmarks.writeBigWarpLandmarks(path, ["a", "b", "c"], fiji, fiji, flipXY=False)
    node = landmarks.loadMarkups(scene, path, role="moving")
    loaded = np.array([node.GetNthControlPointPosition(i) for i in range(3)])
    matrix = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # the stack's IJK->RAS (section 3)
    np.testing.assert_allclose(loaded, voxels @ matrix[:3, :3].T + matrix[:3, 3], atol=1e-12)
    off = landmarks.loadMarkups(scene, path, role="moving", flipXY=False)
    np.testing.assert_allclose([off.GetNthControlPointPosition(i) for i in range(3)], fiji)


def test_loadMarkupsKeepsFlagsAndFailsCleanly(scene, tmp_path):
    landmarks.writePoints(tmp_path / "p.mrk.json", LABELS, POINTS, selected=[True, True, False, True, True])
    node = landmarks.loadMarkups(scene, tmp_path / "p.mrk.json")
    assert node.GetName() == "p" and node.GetNumberOfControlPoints() == 5
    assert not node.GetNthControlPointSelected(2) and node.GetNthControlPointSelected(0)
    before = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="not found"):
        landmarks.loadMarkups(scene, tmp_path / "missing.csv")
    (tmp_path / "broken.csv").write_text("label,x,y,z\na,1,2,zz\n")
    with pytest.raises(ValueError, match="row 1.*'zz' is not a number"):
        landmarks.loadMarkups(scene, tmp_path / "broken.csv")
    with pytest.raises(ValueError, match="NaN.*c d"):
        landmarks.markupsFromPoints(scene, LABELS, np.where(np.arange(5)[:, None] == 2, np.nan, POINTS), "x")
    with pytest.raises(ValueError, match="one label per point"):
        landmarks.markupsFromPoints(scene, LABELS[:2], POINTS, "x")
    assert scene.GetNumberOfNodes() == before


def test_elastixPointSets(sharedData):
    labels, points = readElastixPoints(sharedData / "lung_landmarks" / "CT_3D_lung_fixed_point_set_corrected.txt")
    assert len(labels) == 51 and points.shape == (51, 3) and labels[0] == "1"
    np.testing.assert_allclose(points[0], [-36.351, -36.974, -1204.5])
