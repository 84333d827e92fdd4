"""Landmark models as Slicer transform nodes: creation, live update, .h5 I/O, mapping points through nodes.

Direction (docs/ARCHITECTURE.md section 3): the histology (moving) volume sits under the transform node, the MRI (fixed) is
world. A fitted LandmarkModel maps fixed -> moving (MRI point -> histology point): that is the node's FROM-PARENT
transform, the direction resampling needs, so resampling never inverts anything. Display of the histology in
MRI space uses the to-parent direction, which VTK computes (exact for linear, iterative for the TPS).

- linear models -> vtkMRMLLinearTransformNode with SetMatrixTransformFromParent(A).
- affine+tps -> vtkMRMLTransformNode holding one vtkThinPlateSplineTransform (basis R, i.e. U(r) = r, double
  precision points) set with SetAndObserveTransformFromParent; source landmarks = the MRI points, target = the
  model's values there. Since a TPS with kernel r plus affine polynomial reproduces affine functions, this single
  VTK TPS *is* our affine + TPS(residual) model (tested to ~1e-12 mm); with regularization > 0 the targets are
  the smoothed values at the centres, and the interpolating TPS through them is again the same function. It is
  what Slicer writes to and reads from .h5 (an ITK thin-plate spline kernel transform).
"""
import logging
import os

import numpy as np
import slicer
import vtk

from .context import moduleLogic
from .mapping import Mapping, asPoints
from .volumes import matrixToNumpy, numpyToMatrix
from .errors import UserInputError

log = logging.getLogger(__name__)

TABLE_COLUMNS = ("label", "residual_mm", "loo_mm", "outlier", "included")


# --- model -> VTK / MRML -------------------------------------------------------------------------------------

def _vtkPoints(points) -> "vtk.vtkPoints":
    """Double-precision vtkPoints (the default float32 would cost ~1e-7 relative precision)."""
    result = vtk.vtkPoints()
    result.SetDataTypeToDouble()
    points = asPoints(points)
    result.SetNumberOfPoints(len(points))
    for i, p in enumerate(points):
        result.SetPoint(i, float(p[0]), float(p[1]), float(p[2]))
    return result


def _pointsToNumpy(vtkPointsObject) -> np.ndarray:
    return np.array([vtkPointsObject.GetPoint(i) for i in range(vtkPointsObject.GetNumberOfPoints())], dtype=float).reshape(-1, 3)


def vtkTransformFromModel(model) -> "vtk.vtkAbstractTransform":
    """The model (fixed -> moving) as a VTK transform: vtkTransform (linear) or vtkThinPlateSplineTransform (R)."""
    if model.isLinear:
        transform = vtk.vtkTransform()
        transform.SetMatrix(numpyToMatrix(model.affineMatrix))
        return transform
    tps = vtk.vtkThinPlateSplineTransform()
    tps.SetBasisToR()
    tps.SetSigma(1.0)
    tps.SetSourceLandmarks(_vtkPoints(model.tpsCentres))
    tps.SetTargetLandmarks(_vtkPoints(model.transformPoints(model.tpsCentres)))
    return tps


def _checkModel(model):
    from .fitting import LandmarkModel

    # by type: every Mapping has isLinear now, and only a LandmarkModel becomes a linear or TPS node
    if not isinstance(model, LandmarkModel):
        raise UserInputError(f"Expected a fitted LandmarkModel (fitting.fitLandmarks), got {type(model).__name__}.")
    if not np.isfinite(model.affineMatrix).all():
        raise UserInputError("The landmark model holds non-finite numbers; refit it from valid landmarks.")


def createTransformNode(scene, model, name="LandmarkTransform", generic=False):
    """A new transform node whose from-parent transform is `model` (fixed/MRI -> moving/histology).

    Linear models give a vtkMRMLLinearTransformNode, affine+tps a vtkMRMLTransformNode with the TPS. With
    generic=True a vtkMRMLTransformNode is used for every model (it can later hold either kind, which live
    update with a model switch needs). The scene is only touched once the VTK transform is built.
    """
    _checkModel(model)
    transform = vtkTransformFromModel(model)
    className = "vtkMRMLLinearTransformNode" if (model.isLinear and not generic) else "vtkMRMLTransformNode"
    node = scene.AddNewNodeByClass(className, name)
    _setFromParent(node, model, transform)
    _describe(node, model)
    return node


def _setFromParent(node, model, transform):
    if node.IsA("vtkMRMLLinearTransformNode"):
        node.SetMatrixTransformFromParent(numpyToMatrix(model.affineMatrix))
    else:
        node.SetAndObserveTransformFromParent(transform)


def _describe(node, model):
    node.SetAttribute("MRIHistoReg.landmarkModel", model.model)
    node.SetAttribute("MRIHistoReg.direction", "from parent = fixed (MRI) -> moving (histology)")


def updateTransformNode(node, model) -> None:
    """Replace the node's from-parent transform with `model` (live update). A vtkMRMLLinearTransformNode cannot
    hold a TPS: ValueError (create the node with generic=True for model switching)."""
    _checkModel(model)
    if node.IsA("vtkMRMLLinearTransformNode") and not model.isLinear:
        raise UserInputError(f"Transform node '{node.GetName()}' is linear and cannot hold the {model.model} model; "
                         "create a new node with createTransformNode(..., generic=True).")
    _setFromParent(node, model, vtkTransformFromModel(model))
    _describe(node, model)


# --- mapping points through nodes -----------------------------------------------------------------------------

class VtkTransformMapping(Mapping):
    """A Mapping (transformPoints: (N,3) -> (N,3); numerical Jacobian) around any vtkAbstractTransform."""

    def __init__(self, transform):
        self.transform = transform

    def transformPoints(self, points):
        points = asPoints(points)
        output = vtk.vtkPoints()
        output.SetDataTypeToDouble()
        self.transform.TransformPoints(_vtkPoints(points), output)
        return _pointsToNumpy(output)


def mappingFromTransformNode(node) -> VtkTransformMapping:
    """The node's own from-parent transform (parent space -> node space; MRI -> histology for our nodes)."""
    return VtkTransformMapping(node.GetTransformFromParent())


def mappingFromWorldToNode(node) -> VtkTransformMapping:
    """World -> the node's local space through the whole parent chain (MRML's GetTransformBetweenNodes)."""
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, node, transform)
    return VtkTransformMapping(transform)


def mappingFromNodeToWorld(node) -> VtkTransformMapping:
    """The node's local space -> world (histology -> MRI for our nodes; VTK inverts a TPS iteratively)."""
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(node, None, transform)
    return VtkTransformMapping(transform)


# --- files -----------------------------------------------------------------------------------------------------

def saveTransform(node, path) -> str:
    """Write the transform node to `path` (.h5, .tfm, .txt) through vtkMRMLTransformStorageNode."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    storage = slicer.vtkMRMLTransformStorageNode()
    storage.SetFileName(path)
    if not storage.WriteData(node):
        raise UserInputError(f"Could not write transform '{node.GetName()}' to {path}; check the folder is writable "
                         "and the extension is .h5, .tfm or .txt.")
    return path


def loadTransform(scene, path, name=None):
    """Read a transform file (.h5, .tfm, ...) into a new node (linear or not, as the file says)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserInputError(f"Transform file not found: {path}. Check the path.")
    node = moduleLogic(scene, "Transforms").AddTransform(path, scene)
    if node is None:
        raise UserInputError(f"Could not read a transform from {path}: not an ITK/Slicer transform file.")
    if name:
        node.SetName(name)
    return node


# --- results table ---------------------------------------------------------------------------------------------

def _fillTable(tableNode, evaluation, pairs=None):
    table = vtk.vtkTable()
    columns = {
        "label": vtk.vtkStringArray(),
        "residual_mm": vtk.vtkDoubleArray(),
        "loo_mm": vtk.vtkDoubleArray(),
        "outlier": vtk.vtkIntArray(),
        "included": vtk.vtkBitArray(),  # qMRMLTableModel shows bit columns as checkboxes
    }
    for columnName in TABLE_COLUMNS:
        columns[columnName].SetName(columnName)
    rows = []
    if evaluation is not None:
        for i, label in enumerate(evaluation["labels"]):
            rows.append((label, evaluation["residual_mm"][i], evaluation["loo_mm"][i], int(evaluation["outlier"][i]), 1))
    if pairs is not None:
        for label in pairs.excluded:
            rows.append((label, float("nan"), float("nan"), 0, 0))
    for label, residual, loo, outlier, included in rows:
        columns["label"].InsertNextValue(str(label))
        columns["residual_mm"].InsertNextValue(float(residual))
        columns["loo_mm"].InsertNextValue(float(loo))
        columns["outlier"].InsertNextValue(outlier)
        columns["included"].InsertNextValue(included)
    for columnName in TABLE_COLUMNS:
        table.AddColumn(columns[columnName])
    tableNode.SetAndObserveTable(table)
    tableNode.SetUseColumnNameAsColumnHeader(True)
    if evaluation is not None:
        for key in ("model", "count", "residual_rms_mm", "residual_max_mm", "loo_rms_mm", "loo_max_mm",
                    "loo_median_mm", "scale", "shrinkage_linear_percent", "shrinkage_volume_percent"):
            tableNode.SetAttribute(f"MRIHistoReg.{key}", str(evaluation[key]))
        for key, value in (evaluation.get("jacobian") or {}).items():
            tableNode.SetAttribute(f"MRIHistoReg.jacobian_{key}", str(value))
    tableNode.Modified()


def resultsTable(scene, evaluation, name="LandmarkErrors", pairs=None, tableNode=None):
    """A vtkMRMLTableNode (one row per pair: label, residual_mm, loo_mm, outlier, included) from an
    evaluateFit dict; `pairs` (LandmarkPairs) adds its excluded labels as rows with included = 0. Summary figures
    go into node attributes 'MRIHistoReg.<key>'. Reuses `tableNode` when given."""
    if tableNode is None:
        tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    _fillTable(tableNode, evaluation, pairs)
    return tableNode


def tableToRows(tableNode):
    """The table's rows as dicts (for tests and export)."""
    table = tableNode.GetTable()
    rows = []
    for r in range(table.GetNumberOfRows()):
        rows.append({table.GetColumnName(c): table.GetValue(r, c).ToString() for c in range(table.GetNumberOfColumns())})
    return rows


# --- live update -----------------------------------------------------------------------------------------------

class LiveLandmarkRegistration:
    """Refit when the point lists change: observers on both markups nodes update a transform node and a table.

    While a point is dragged (PointModifiedEvent) only the fit and the transform are updated (~0.3 ms at 50
    pairs); on PointEndInteraction/Added/Removed the leave-one-out evaluation and the table are refreshed too
    (~10-15 ms at 50 pairs). A failing fit (too few pairs, degenerate points) leaves the transform as it was and
    records the reason in `lastError` (observers must not raise). Call stop() (or removeObservers) to detach.
    With `referenceVolume` (the MRI) the Jacobian summary covers its grid (subsampled to jacobianMaxSamples),
    else the landmarks' bounding box.
    """

    def __init__(self, scene, fixedNode, movingNode, model="affine+tps", regularization=0.0, transformNode=None,
                 tableNode=None, name="LandmarkTransform", referenceVolume=None, jacobianMaxSamples=32768):
        from . import fitting

        if model not in fitting.MODELS:
            raise UserInputError(f"Unknown landmark model '{model}'; choose one of {', '.join(fitting.MODELS)}.")
        self.scene = scene
        self.fixedNode = fixedNode
        self.movingNode = movingNode
        self.model = model
        self.regularization = float(regularization)
        self.transformNode = transformNode
        self.tableNode = tableNode
        self.name = name
        self.referenceVolume = referenceVolume
        self.jacobianMaxSamples = int(jacobianMaxSamples)
        self.lastPairs = None
        self.lastModel = None
        self.lastEvaluation = None
        self.lastError = None
        self.fitCount = 0
        self.evaluationCount = 0
        self._observations = []

    @property
    def observing(self) -> bool:
        return bool(self._observations)

    def start(self):
        """Add the observers and fit once now."""
        if self._observations:
            return self
        events = (
            (slicer.vtkMRMLMarkupsNode.PointModifiedEvent, False),
            (slicer.vtkMRMLMarkupsNode.PointAddedEvent, True),
            (slicer.vtkMRMLMarkupsNode.PointRemovedEvent, True),
            (slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, True),
        )
        for node in (self.fixedNode, self.movingNode):
            for event, full in events:
                callback = self._onFullChange if full else self._onPointMoved
                self._observations.append((node, node.AddObserver(event, callback)))
        self.update(evaluate=True)
        return self

    def stop(self):
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []

    removeObservers = stop

    def setModel(self, model, regularization=None):
        self.model = model
        if regularization is not None:
            self.regularization = float(regularization)
        return self.update(evaluate=True)

    def _onPointMoved(self, caller=None, event=None):
        self.update(evaluate=False)

    def _onFullChange(self, caller=None, event=None):
        self.update(evaluate=True)

    def update(self, evaluate=True):
        """Pair, fit, update the transform (and with evaluate=True the LOO table). Returns the evaluation dict,
        the model (evaluate=False), or None when the fit failed (see lastError)."""
        from . import fitting
        from .landmarks import pairLandmarks

        try:
            pairs = pairLandmarks(self.fixedNode, self.movingNode)
            if evaluate:
                shapeIjk = ijkToRas = None
                if self.referenceVolume is not None and self.referenceVolume.GetImageData() is not None:
                    from .volumes import ijkToRas as ijkToRasOf

                    shapeIjk = self.referenceVolume.GetImageData().GetDimensions()
                    ijkToRas = ijkToRasOf(self.referenceVolume)
                fitted, evaluation = fitting.evaluateAndFit(pairs.fixed, pairs.moving, pairs.labels, self.model,
                                                           self.regularization, shapeIjk, ijkToRas,
                                                           jacobianMaxSamples=self.jacobianMaxSamples)
            else:
                fitted = fitting.fitLandmarks(pairs.fixed, pairs.moving, self.model, self.regularization, pairs.labels)
                evaluation = None
        except ValueError as error:
            self.lastError = str(error)
            log.info("Landmark live update: transform left unchanged: %s", error)
            return None
        self.lastError = None
        self.lastPairs, self.lastModel = pairs, fitted
        if self.transformNode is None:
            self.transformNode = createTransformNode(self.scene, fitted, self.name, generic=True)
        else:
            updateTransformNode(self.transformNode, fitted)
        self.fitCount += 1
        if evaluation is None:
            return fitted
        self.lastEvaluation = evaluation
        self.tableNode = resultsTable(self.scene, evaluation, self.name + " errors", pairs=pairs, tableNode=self.tableNode)
        self.evaluationCount += 1
        return evaluation


# --- mapping points both ways through a node ------------------------------------------------------------------

def modelFromTransformNode(node):
    """The LandmarkModel a landmark transform node holds (linear matrix, or the TPS rebuilt from its landmarks:
    an interpolating TPS is determined by its landmarks, so this is the same function), else None."""
    from .fitting import LandmarkModel, fitLandmarks

    if node.IsLinear():
        matrix = vtk.vtkMatrix4x4()
        node.GetMatrixTransformFromParent(matrix)
        return LandmarkModel("affine", matrixToNumpy(matrix))
    transform = node.GetTransformFromParent()
    if transform is not None and transform.IsA("vtkThinPlateSplineTransform") and transform.GetBasisAsString() == "R":
        return fitLandmarks(_pointsToNumpy(transform.GetSourceLandmarks()),
                            _pointsToNumpy(transform.GetTargetLandmarks()), "affine+tps")
    return None


def mapPoints(node, points, direction="fixed-to-moving"):
    """Map points through a transform node's own from-parent transform: (points, residual_mm).

    fixed-to-moving (MRI -> histology) is the node's from-parent transform, exact (residual 0).
    moving-to-fixed inverts it: exactly for linear nodes, by Newton iterations for a TPS (or any other node, with
    a numerical Jacobian), with the residual |forward(x) - point| returned so non-convergence is visible.
    """
    from .mapping import invertPoints

    points = asPoints(points)
    if direction not in ("fixed-to-moving", "moving-to-fixed"):
        raise UserInputError(f"Unknown direction '{direction}': use fixed-to-moving or moving-to-fixed.")
    model = modelFromTransformNode(node)
    forward = model if model is not None else mappingFromTransformNode(node)
    if direction == "fixed-to-moving":
        return forward.transformPoints(points), np.zeros(len(points))
    if model is not None:
        return model.inverseTransformPoints(points)
    result, residual = invertPoints(forward, points, tolerance=1e-6)
    if not (residual < 1e-4).all():
        log.warning("Inverse mapping did not converge for %d of %d points (max residual %.3g mm).",
                    int((~(residual < 1e-4)).sum()), len(points), np.nanmax(residual))
    return result, residual
