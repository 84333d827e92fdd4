"""Transform nodes from landmark models: direction checked through MRML's own API, .h5 round trips, live update,
results table, CLI register / map-points."""
import json

import numpy as np
import pytest
import slicer
import vtk

from MRIHistoRegLib import fitting, landmarks, transforms
from MRIHistoRegLib.context import moduleLogic


def _warp(points):
    """A known smooth nonlinear MRI -> histology mapping (shrink, rotate, bend)."""
    rotation = np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])
    shrunk = 0.8 * points @ rotation.T + [3.0, -2.0, 5.0]
    shrunk[:, 2] += 0.3 * np.sin(points[:, 0] / 4.0)
    shrunk[:, 0] += 0.2 * np.cos(points[:, 1] / 5.0)
    return shrunk


def _pairs(count=20, seed=0):
    rng = np.random.default_rng(seed)
    fixed = rng.uniform(-10, 10, size=(count, 3)) + [20.0, -5.0, 40.0]
    return [f"L{i}" for i in range(count)], fixed, _warp(fixed)


def _markupsWorldPoints(node):
    points = []
    for i in range(node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(i, p)
        points.append(p)
    return np.array(points)


def _transformBetween(source, target, points):
    general = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(source, target, general)
    return np.array([general.TransformPoint(*p) for p in points])


# --- direction, through MRML only ------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["rigid", "similarity", "affine", "affine+tps"])
def test_histologyUnderNodeLandsOnMri(scene, model):
    labels, fixed, moving = _pairs()
    fitted = fitting.fitLandmarks(fixed, moving, model)
    node = transforms.createTransformNode(scene, fitted, "T")
    assert node.IsA("vtkMRMLLinearTransformNode") == (model != "affine+tps")
    histology = landmarks.markupsFromPoints(scene, labels, moving, "histology")
    histology.SetAndObserveTransformNodeID(node.GetID())
    # where MRML puts the histology points in world (MRI) space: exactly where the model says they come from
    world = _markupsWorldPoints(histology)
    expected, _ = fitted.inverseTransformPoints(moving)
    tolerance = 1e-9 if model != "affine+tps" else 1e-2  # VTK's iterative TPS inverse (display direction)
    np.testing.assert_allclose(world, expected, atol=tolerance)
    np.testing.assert_allclose(_transformBetween(node, None, moving), expected, atol=tolerance)
    # the resampling direction: world (MRI) -> node (histology) is the model itself, no inversion
    np.testing.assert_allclose(_transformBetween(None, node, fixed), fitted.transformPoints(fixed), atol=1e-9)
    if model == "affine+tps":  # interpolating: the histology landmarks land on the MRI landmarks
        np.testing.assert_allclose(world, fixed, atol=1e-2)
        assert node.GetTransformFromParent().IsA("vtkThinPlateSplineTransform")
        assert node.GetTransformFromParent().GetBasisAsString() == "R"
    # hardening (Slicer's "Harden transform") moves the control points for good
    assert moduleLogic(scene, "Transforms").hardenTransform(histology)
    assert histology.GetParentTransformNode() is None
    np.testing.assert_allclose(_markupsWorldPoints(histology), expected, atol=tolerance)


def test_histologyVolumeUnderNode(scene):
    """A histology volume under the node: its voxel centres' world positions come from the node's to-parent."""
    from MRIHistoRegLib.volumes import createVolumeNode, ijkToRas

    labels, fixed, moving = _pairs()
    fitted = fitting.fitLandmarks(fixed, moving, "affine")
    node = transforms.createTransformNode(scene, fitted, "T")
    geometry = np.diag([0.5, 0.5, 0.7, 1.0])
    geometry[:3, 3] = moving.min(axis=0)
    volume = createVolumeNode(scene, np.zeros((4, 5, 6), np.float32), geometry, "histology")
    volume.SetAndObserveTransformNodeID(node.GetID())
    toWorld = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volume.GetParentTransformNode(), None, toWorld)
    corner = ijkToRas(volume)[:3, 3]
    np.testing.assert_allclose(fitted.transformPoints(toWorld.TransformPoint(*corner)), [corner], atol=1e-9)


def test_mappingFromNodes(scene):
    labels, fixed, moving = _pairs()
    fitted = fitting.fitLandmarks(fixed, moving, "affine+tps")
    node = transforms.createTransformNode(scene, fitted, "T")
    rng = np.random.default_rng(1)
    probe = fixed.mean(axis=0) + rng.normal(size=(50, 3)) * 4
    np.testing.assert_allclose(transforms.mappingFromTransformNode(node).transformPoints(probe),
                               fitted.transformPoints(probe), atol=1e-9)
    # a parent above the landmark node: world -> node goes through both from-parents
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "P")
    shift = np.eye(4)
    shift[:3, 3] = [1.0, 2.0, 3.0]
    from MRIHistoRegLib.volumes import numpyToMatrix

    parent.SetMatrixTransformFromParent(numpyToMatrix(shift))
    node.SetAndObserveTransformNodeID(parent.GetID())
    np.testing.assert_allclose(transforms.mappingFromWorldToNode(node).transformPoints(probe),
                               fitted.transformPoints(probe + [1.0, 2.0, 3.0]), atol=1e-9)
    back = transforms.mappingFromNodeToWorld(node).transformPoints(fitted.transformPoints(probe + [1.0, 2.0, 3.0]))
    np.testing.assert_allclose(back, probe, atol=1e-2)


# --- files ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["similarity", "affine+tps"])
def test_h5RoundTrip(scene, tmp_path, model):
    labels, fixed, moving = _pairs(25)
    fitted = fitting.fitLandmarks(fixed, moving, model, regularization=0.5 if model == "affine+tps" else 0.0)
    node = transforms.createTransformNode(scene, fitted, "T")
    path = transforms.saveTransform(node, tmp_path / "sub" / "landmarks.h5")
    loaded = transforms.loadTransform(scene, path, name="reloaded")
    assert loaded.GetName() == "reloaded" and loaded.GetID() != node.GetID()
    assert loaded.IsLinear() == fitted.isLinear
    rng = np.random.default_rng(2)
    probe = fixed.mean(axis=0) + rng.normal(size=(100, 3)) * 6
    np.testing.assert_allclose(_transformBetween(None, loaded, probe), fitted.transformPoints(probe), atol=1e-9)
    if not fitted.isLinear:  # stored in the resampling direction, as a TPS (not a grid or an inverse)
        assert loaded.GetTransformFromParent().IsA("vtkThinPlateSplineTransform")


def test_loadTransformErrors(scene, tmp_path):
    before = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="not found"):
        transforms.loadTransform(scene, tmp_path / "missing.h5")
    garbage = tmp_path / "garbage.h5"
    garbage.write_text("not a transform")
    with pytest.raises(ValueError, match="Could not read"):
        transforms.loadTransform(scene, garbage)
    assert scene.GetNumberOfNodes() == before


def test_updateTransformNode(scene):
    labels, fixed, moving = _pairs()
    linear = fitting.fitLandmarks(fixed, moving, "affine")
    tps = fitting.fitLandmarks(fixed, moving, "affine+tps")
    node = transforms.createTransformNode(scene, linear, "T")
    with pytest.raises(ValueError, match="linear and cannot hold"):
        transforms.updateTransformNode(node, tps)
    generic = transforms.createTransformNode(scene, linear, "G", generic=True)
    assert not generic.IsA("vtkMRMLLinearTransformNode") and generic.IsLinear()
    transforms.updateTransformNode(generic, tps)
    np.testing.assert_allclose(_transformBetween(None, generic, fixed), moving, atol=1e-9)
    transforms.updateTransformNode(generic, linear)
    np.testing.assert_allclose(_transformBetween(None, generic, fixed), linear.transformPoints(fixed), atol=1e-9)


# --- results table and live update ----------------------------------------------------------------------------

def test_resultsTable(scene):
    labels, fixed, moving = _pairs(12)
    moving[3] += [2.0, 0.0, 0.0]
    evaluation = fitting.evaluateFit(fixed, moving, labels, "affine")
    table = transforms.resultsTable(scene, evaluation, "errors")
    rows = transforms.tableToRows(table)
    assert [row["label"] for row in rows] == labels
    assert float(rows[3]["loo_mm"]) == pytest.approx(evaluation["loo_mm"][3], rel=1e-5)
    assert rows[3]["outlier"] == "1" and all(row["included"] == "1" for row in rows)
    assert float(table.GetAttribute("MRIHistoReg.loo_rms_mm")) == pytest.approx(evaluation["loo_rms_mm"])


def test_liveUpdate(scene):
    labels, fixed, moving = _pairs(8)
    fixedNode = landmarks.markupsFromPoints(scene, labels[:4], fixed[:4], "mri")
    movingNode = landmarks.markupsFromPoints(scene, labels[:4], moving[:4], "histology")
    before = scene.GetNumberOfNodes()
    live = transforms.LiveLandmarkRegistration(scene, fixedNode, movingNode, "affine+tps", name="live").start()
    # 4 pairs are too few for affine+tps: nothing created, the reason recorded
    assert live.transformNode is None and "at least 5" in live.lastError
    assert scene.GetNumberOfNodes() == before
    fixedNode.AddControlPoint(*fixed[4], labels[4])
    assert live.transformNode is None  # the moving partner is still missing
    movingNode.AddControlPoint(*moving[4], labels[4])
    assert live.lastError is None and live.transformNode is not None and live.tableNode is not None
    np.testing.assert_allclose(_transformBetween(None, live.transformNode, fixed[:5]), moving[:5], atol=1e-9)
    for i in range(5, 8):
        fixedNode.AddControlPoint(*fixed[i], labels[i])
        movingNode.AddControlPoint(*moving[i], labels[i])
    assert live.lastEvaluation["count"] == 8 and live.transformNode.GetTransformFromParent().GetSourceLandmarks().GetNumberOfPoints() == 8
    assert live.lastEvaluation["jacobian_region"].startswith("landmark bounding box")
    # dragging a point: the transform follows (cheap refit), the table on end of interaction
    evaluations = live.evaluationCount
    movingNode.SetNthControlPointPositionWorld(2, *(moving[2] + [1.0, 0.0, 0.0]))
    np.testing.assert_allclose(_transformBetween(None, live.transformNode, fixed[2:3]), [moving[2] + [1.0, 0, 0]], atol=1e-9)
    assert live.evaluationCount == evaluations
    movingNode.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    assert live.evaluationCount == evaluations + 1
    # excluding a pair (unselect) keeps it in the lists, out of the fit, listed in the table
    fixedNode.SetNthControlPointSelected(2, False)
    movingNode.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    assert live.lastEvaluation["count"] == 7 and "L2" not in live.lastEvaluation["labels"]
    rows = transforms.tableToRows(live.tableNode)
    assert [row["label"] for row in rows if row["included"] == "0"] == ["L2"]
    # removing points down to too few: the last good transform stays
    fixedNode.RemoveNthControlPoint(0)
    fixedNode.RemoveNthControlPoint(0)  # L0, L1 gone, L2 excluded: 5 pairs left, still enough
    assert live.lastError is None and live.lastEvaluation["labels"] == labels[3:]
    mapping = transforms.mappingFromWorldToNode(live.transformNode).transformPoints(fixed)
    fixedNode.RemoveNthControlPoint(1)  # L3 gone: 4 pairs
    assert "at least 5" in live.lastError
    np.testing.assert_allclose(transforms.mappingFromWorldToNode(live.transformNode).transformPoints(fixed), mapping)
    # model switch on the same (generic) node, then detach
    fixedNode.AddControlPoint(*fixed[0], labels[0])
    live.setModel("similarity")
    assert live.transformNode.IsLinear() and live.lastError is None
    fits = live.fitCount
    live.stop()
    movingNode.SetNthControlPointPositionWorld(0, 0.0, 0.0, 0.0)
    assert live.fitCount == fits and not live.observing


def test_movingListUnderTheTransformStillFitsInHistologySpace(scene):
    """The histology list placed under the registration transform (points shown on the aligned histology) still
    pairs and fits in histology space: the fit recovers the known histology points, not their MRI images."""
    labels, fixed, moving = _pairs(12)
    fixedNode = landmarks.markupsFromPoints(scene, labels, fixed, "mri")
    movingNode = landmarks.markupsFromPoints(scene, labels, moving, "histology")
    live = transforms.LiveLandmarkRegistration(scene, fixedNode, movingNode, "affine", name="live").start()
    assert live.lastError is None
    movingNode.SetAndObserveTransformNodeID(live.transformNode.GetID())
    np.testing.assert_allclose(_markupsWorldPoints(movingNode), fixed, atol=1.5)  # displayed near the MRI points
    live.update(evaluate=True)
    np.testing.assert_allclose(live.lastPairs.moving, moving, atol=1e-12)  # ground truth: the known points
    np.testing.assert_allclose(_transformBetween(None, live.transformNode, fixed),
                               fitting.fitLandmarks(fixed, moving, "affine").transformPoints(fixed), atol=1e-9)
    pairs = landmarks.pairLandmarks(fixedNode, movingNode)
    np.testing.assert_allclose(pairs.moving, moving, atol=1e-12)
    np.testing.assert_allclose(pairs.fixed, fixed, atol=1e-12)
    live.stop()


# --- CLI -------------------------------------------------------------------------------------------------------

def test_cliRegisterAndMapPoints(tmp_path):
    from MRIHistoRegLib import cli

    labels, fixed, moving = _pairs(15)
    landmarks.writePoints(tmp_path / "mri.mrk.json", labels, fixed)
    landmarks.writePoints(tmp_path / "histology.csv", list(reversed(labels)), moving[::-1])
    out = tmp_path / "result"
    assert cli.main(["register", "--fixed-points", str(tmp_path / "mri.mrk.json"), "--moving-points",
                     str(tmp_path / "histology.csv"), "--model", "affine+tps", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    summary = report["landmark_summary"]
    assert report["transform"]["model"] == "affine+tps" and summary["count"] == 15 and summary["residual_max_mm"] < 1e-9
    assert [row["label"] for row in report["landmarks"]] == labels
    assert report["refinement"] is None and report["resampling"] is None  # steps that did not run: null, not absent
    # map the MRI points to histology and back, through the written .h5
    assert cli.main(["map-points", "--transform", str(out / "transform.h5"), "--points",
                     str(tmp_path / "mri.mrk.json"), "--direction", "fixed-to-moving", "--out", str(tmp_path / "h.csv")]) == 0
    mappedLabels, mapped = landmarks.readPoints(tmp_path / "h.csv")
    assert mappedLabels == labels
    np.testing.assert_allclose(mapped, moving, atol=1e-6)
    assert cli.main(["map-points", "--transform", str(out / "transform.h5"), "--points",
                     str(tmp_path / "h.csv"), "--direction", "moving-to-fixed", "--out", str(tmp_path / "m.csv")]) == 0
    np.testing.assert_allclose(landmarks.readPoints(tmp_path / "m.csv")[1], fixed, atol=1e-6)
    # a user error: exit code 2, nothing written
    assert cli.main(["register", "--fixed-points", str(tmp_path / "mri.mrk.json"), "--moving-points",
                     str(tmp_path / "histology.csv"), "--model", "cubic", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_registerReplacesTheFolderWhole(tmp_path):
    """register writes through an atomic folder: a failed rerun leaves the earlier result as it was, a new run
    replaces it whole, and a folder of someone else's files is refused untouched."""
    from MRIHistoRegLib import cli

    def register(moving, model, out):
        return cli.main(["register", "--fixed-points", str(tmp_path / "mri.csv"), "--moving-points", str(moving),
                         "--model", model, "--out", str(out)])

    labels, fixed, moving = _pairs(12)
    landmarks.writePoints(tmp_path / "mri.csv", labels, fixed)
    landmarks.writePoints(tmp_path / "histology.csv", labels, moving)
    landmarks.writePoints(tmp_path / "few.csv", labels[:3], moving[:3])
    out = tmp_path / "result"
    assert register(tmp_path / "histology.csv", "affine+tps", out) == 0
    first = {name: (out / name).read_bytes() for name in sorted(p.name for p in out.iterdir())}
    assert {"transform.h5", "report.json", "report.csv"} <= set(first)
    assert register(tmp_path / "few.csv", "affine+tps", out) == 2
    assert {name: (out / name).read_bytes() for name in sorted(p.name for p in out.iterdir())} == first
    (out / "stale.txt").write_text("from an older run")
    assert register(tmp_path / "histology.csv", "similarity", out) == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "report.json").read_text())["transform"]["model"] == "similarity"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert register(tmp_path / "histology.csv", "affine", foreign) == 2
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_phantomThroughMrml(scene, tmp_path):
    """The whole chain on the generated phantom: markups files -> pairing -> TPS node -> MRML maps the held-out
    points (MRI -> histology by the from-parent transform; histology -> MRI by hardening) near the truth."""
    from MRIHistoRegLib import sampledata

    folder = tmp_path / "sample"
    sampledata.generateSampleData(folder, size=20, seed=0)
    mri = landmarks.loadMarkups(scene, folder / "landmarks_mri.mrk.json")
    histology = landmarks.loadMarkups(scene, folder / "landmarks_histology.mrk.json")
    pairs = landmarks.pairLandmarks(mri, histology)
    node = transforms.createTransformNode(scene, fitting.fitLandmarks(pairs.fixed, pairs.moving, "affine+tps"), "T")
    labels, evalMri = landmarks.readPoints(folder / "eval_points_mri.csv")
    _, evalHistology = landmarks.readPoints(folder / "eval_points_histology.csv")
    toHistology = _transformBetween(None, node, evalMri)
    assert np.median(np.linalg.norm(toHistology - evalHistology, axis=1)) < 0.1
    points = landmarks.markupsFromPoints(scene, labels, evalHistology, "eval histology")
    points.SetAndObserveTransformNodeID(node.GetID())
    assert moduleLogic(scene, "Transforms").hardenTransform(points)
    assert np.median(np.linalg.norm(_markupsWorldPoints(points) - evalMri, axis=1)) < 0.15


def test_createTransformNodeFailsWithoutTouchingScene(scene):
    before = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="fitted LandmarkModel"):
        transforms.createTransformNode(scene, np.eye(4), "T")
    with pytest.raises(ValueError, match="non-finite"):
        transforms.createTransformNode(scene, fitting.LandmarkModel("affine", np.full((4, 4), np.nan)), "T")
    with pytest.raises(ValueError, match="Unknown landmark model"):
        transforms.LiveLandmarkRegistration(scene, None, None, "spline")
    assert scene.GetNumberOfNodes() == before


def test_sceneSaveAndReload(scene, tmp_path):
    """Saving the scene (MRML + .h5 through the node's storage node) and reloading restores the TPS transform and
    the histology points under it."""
    from MRIHistoRegLib.context import createScene

    labels, fixed, moving = _pairs(12)
    fitted = fitting.fitLandmarks(fixed, moving, "affine+tps")
    node = transforms.createTransformNode(scene, fitted, "MRI to histology")
    histology = landmarks.markupsFromPoints(scene, labels, moving, "histology")
    histology.SetAndObserveTransformNodeID(node.GetID())
    for saved, fileName in ((node, "transform.h5"), (histology, "histology.mrk.json")):
        saved.AddDefaultStorageNode()
        saved.GetStorageNode().SetFileName(str(tmp_path / fileName))
        assert saved.GetStorageNode().WriteData(saved)
    scene.SetRootDirectory(str(tmp_path))
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    reloaded = createScene()
    reloaded.SetRootDirectory(str(tmp_path))
    reloaded.SetURL(str(tmp_path / "scene.mrml"))
    assert reloaded.Connect()
    node2 = reloaded.GetFirstNodeByName("MRI to histology")
    histology2 = reloaded.GetFirstNodeByName("histology")
    assert node2.GetTransformFromParent().IsA("vtkThinPlateSplineTransform")
    assert histology2.GetParentTransformNode() is node2
    probe = fixed.mean(axis=0) + np.random.default_rng(3).normal(size=(40, 3)) * 5
    np.testing.assert_allclose(_transformBetween(None, node2, probe), fitted.transformPoints(probe), atol=1e-9)
    np.testing.assert_allclose(_markupsWorldPoints(histology2), fixed, atol=1e-2)


def test_liveUpdateJacobianOnReferenceGrid(scene):
    from MRIHistoRegLib.volumes import createVolumeNode

    labels, fixed, moving = _pairs(10)
    geometry = np.diag([0.5, 0.5, 0.5, 1.0])
    geometry[:3, 3] = fixed.min(axis=0)
    mri = createVolumeNode(scene, np.zeros((40, 41, 42), np.float32), geometry, "mri")
    live = transforms.LiveLandmarkRegistration(scene, landmarks.markupsFromPoints(scene, labels, fixed, "f"),
                                               landmarks.markupsFromPoints(scene, labels, moving, "m"),
                                               referenceVolume=mri, jacobianMaxSamples=5000).start()
    evaluation = live.lastEvaluation
    assert evaluation["jacobian_region"] == "fixed image grid (42, 41, 40) (ijk)"
    assert evaluation["jacobian"]["samples"] <= 5000 and evaluation["jacobian"]["step"] == 3
    live.stop()


def test_jsonReadyIsStrictJson():
    """outputs.jsonReady (the one NaN -> None sanitiser): strict JSON from numpy values, nested."""
    from MRIHistoRegLib.outputs import jsonReady

    value = {"a": [1.0, float("nan"), np.float32(2.5), np.inf], 3: (np.int64(4), np.bool_(True)),
             "arr": np.array([[1.0, np.nan]]), "s": "text", "none": None, "flag": False}
    ready = jsonReady(value)
    assert ready == {"a": [1.0, None, 2.5, None], "3": [4, True], "arr": [[1.0, None]], "s": "text", "none": None,
                     "flag": False}
    json.dumps(ready, allow_nan=False)
    assert type(ready["3"][0]) is int and type(ready["3"][1]) is bool
