"""The module panel's behaviour that does not need Qt: which actions are possible, the spacing fields' unit,
placing a landmark pair, running an action with one error report. MRIHistoReg.py wires these to widgets;
the tests drive them on a real MRML scene.

`parameters` below is the panel's parameter node (Slicer's parameterNodeWrapper instance in the application,
any object with the same attributes elsewhere).
"""
import contextlib
import logging
import os
import traceback
from typing import Callable, Dict, Optional, Sequence

import slicer

import vtk

from .progress import Cancelled, scaled as scaledProgress  # noqa: F401 - the widget's split progress
from .errors import UserInputError

log = logging.getLogger(__name__)

SPACING_UNIT_MM = {"um": 0.001, "mm": 1.0}
SPACING_FIELDS = ("spacingI", "spacingJ", "spacingK")
# Decimals of the spacing fields: a nanometre in mm (0.00325 mm is kept exactly), so either unit holds any
# light-sheet or MRI voxel size without rounding.
SPACING_DECIMALS = 6


def pathOrNone(path) -> Optional[str]:
    """`path` as a string, or None when it is empty ('' or '.': what an empty pathlib.Path parameter holds)."""
    text = "" if path is None else os.fspath(path)
    return None if text in ("", ".") else text


def inspectedStack(parameters, stackInfo):
    """`stackInfo` (logic.StackInfo) when it describes the stack the panel's path field names now,
    else None: the stack steps read the spacing fields, which hold that stack's spacing once it is inspected."""
    if not stackInfo or pathOrNone(parameters.stackPath) is None:
        return None
    return stackInfo if os.fspath(stackInfo.path) == os.fspath(parameters.stackPath) else None


def actionStates(parameters, stackInfo) -> Dict[str, bool]:
    """Which of the panel's buttons and fields can be used now, by widget name (the .ui's objectName)."""
    p = parameters
    stack = inspectedStack(p, stackInfo)
    hasMri, hasHistology = p.mriVolume is not None, p.histologyVolume is not None
    hasLists = p.mriLandmarks is not None and p.histologyLandmarks is not None
    hasTransform = p.landmarkTransform is not None
    hasPairsFile = pathOrNone(p.pairsPath) is not None
    return {
        "openStackButton": pathOrNone(p.stackPath) is not None,
        "loadFullResolutionButton": stack is not None,
        "channelComboBox": stack is not None and len(stack.channelNames) > 1,
        "resampleChannelsCheckBox": stack is not None and len(stack.channelNames) > 1,
        "useMetadataSpacingButton": stack is not None and stack.metadataSpacingMm is not None,
        "applySpacingButton": hasHistology,
        "downsampleButton": stack is not None and (hasMri or not p.targetSpacingFromMri),
        "targetSpacingSpinBox": not p.targetSpacingFromMri,
        "cropRoiSelector": p.cropEnabled,
        "placePairButton": hasLists,
        "fitButton": hasLists,
        "tpsRegularizationSpinBox": p.model == "affine+tps",
        "exportPairsButton": hasLists and hasPairsFile,
        "importPairsButton": hasLists and hasPairsFile,
        "refineButton": p.refineEnabled and hasMri and hasTransform,
        "resampleButton": hasMri and hasTransform and (stack is not None or hasHistology),
        "outputSpacingSpinBox": p.referenceGrid != "MRI",
        "compareButton": p.mriLabels is not None and p.histologyLabels is not None and hasTransform,
        "exportReportButton": pathOrNone(p.reportFolder) is not None,
        "checkerboardButton": hasMri and p.resampledVolume is not None,
        "warpMagnitudeButton": hasMri and hasTransform,
    }


def spacingFieldsMm(parameters) -> Sequence[float]:
    """The spacing fields (x, y, z in `parameters.spacingUnit`) in mm, validated (ValueError naming the fix)."""
    from .logic import MRIHistoRegLogicCore

    values = [getattr(parameters, name) for name in SPACING_FIELDS]
    return MRIHistoRegLogicCore.spacingToMm(values, parameters.spacingUnit)


def physicalSizeText(parameters, stackInfo) -> str:
    """The live 'physical size' readout of the inspected stack at the spacing in the fields ('' before inspecting)."""
    stack = inspectedStack(parameters, stackInfo)
    if stack is None:
        return ""
    try:
        spacingMm = spacingFieldsMm(parameters)
    except ValueError:
        return "Enter three positive spacing values."
    from .logic import MRIHistoRegLogicCore

    size = MRIHistoRegLogicCore.physicalSizeMm(stack.shapeIjk, spacingMm)
    return "Physical size at this spacing: " + " x ".join(f"{v:.3g}" for v in size) + " mm"


class SpacingUnitFollower:
    """Keeps the spacing the same length when the user switches its unit: the fields are converted (3.25 um ->
    0.00325 mm), not re-read in the new unit (which would change the spacing 1000-fold)."""

    def __init__(self, parameters=None):
        self._unit = None if parameters is None else parameters.spacingUnit

    def follow(self, parameters) -> bool:
        """Call on every parameter change; converts the fields when the unit changed. Returns True if it did."""
        previous, unit = self._unit, parameters.spacingUnit
        self._unit = unit  # before writing: each field write re-enters through the parameter node's observers
        if previous is None or previous == unit:
            return False
        factor = SPACING_UNIT_MM[previous] / SPACING_UNIT_MM[unit]
        for name in SPACING_FIELDS:
            setattr(parameters, name, getattr(parameters, name) * factor)
        return True


class ActionRunner:
    """Runs panel actions so that one failure gives one error report and nothing escapes to Qt or VTK.

    `slicer.util.tryWithErrorDisplay` shows the error and then re-raises it (Base/Python/slicer/util.py): nested
    in another action it gives a second dialog, and raised out of a VTK observer or enter() it leaves a
    traceback and aborts the caller. Here the outermost action reports (message, traceback) once through
    `showError`, and cancellation (progress.Cancelled) is only logged and shown through `showStatus`.
    """

    def __init__(self, showError: Callable[[str, str], None], showStatus: Optional[Callable[[str], None]] = None,
                 progressDialog=None, waitCursor=None):
        self._showError = showError
        self._showStatus = showStatus or (lambda message: None)
        self._progressDialog = progressDialog  # title -> context manager yielding a progress callback
        self._waitCursor = waitCursor or contextlib.nullcontext
        self._depth = 0
        self.lastError = None

    @contextlib.contextmanager
    def action(self, errorMessage: str, progressTitle: Optional[str] = None):
        """`with runner.action("Fit failed.", "Fitting") as progress:`; progress is None without a title."""
        outermost = self._depth == 0
        self._depth += 1
        try:
            with contextlib.ExitStack() as stack:
                if progressTitle and self._progressDialog is not None:
                    progress = stack.enter_context(self._progressDialog(progressTitle))
                else:
                    progress = None
                    if outermost:
                        stack.enter_context(self._waitCursor())
                yield progress
        except Cancelled as cancelled:
            if not outermost:
                raise
            log.info("%s", cancelled)
            self._showStatus(str(cancelled))
        except Exception as error:
            if not outermost:
                raise
            self.lastError = error
            details = traceback.format_exc()
            log.error("%s %s\n%s", errorMessage, error, details)
            self._showError(f"{errorMessage}\n\n{error}", details)
        finally:
            self._depth -= 1


class PairPlacement:
    """'Place pair': the user clicks the MRI point, then the same structure on the histology; both points get one
    new label (pairs match by label).

    Slicer's rule (vtkSlicerMarkupsWidget::PlacePoint): the widget invokes PointPositionDefinedEvent on the list
    and only afterwards, when place-mode persistence is off, switches the interaction node back to view
    transform. A histology placement started from inside that event is undone by that switch, so it is
    deferred to the event loop through `defer` (qt.QTimer.singleShot(0, ...) in the panel).
    """

    def __init__(self, scene, markupsLogic, defer: Callable[[Callable[[], None]], None],
                 showStatus: Optional[Callable[[str], None]] = None,
                 onFinished: Optional[Callable[[], None]] = None):
        self._scene = scene
        self._onFinished = onFinished or (lambda: None)
        self._markupsLogic = markupsLogic
        self._defer = defer
        self._showStatus = showStatus or (lambda message: None)
        self._observed = None  # (pointList, observer tag)
        self.label = None
        self.stage = None  # None, "mri" or "histology"
        self._lists = None

    @property
    def active(self) -> bool:
        return self.stage is not None

    def start(self, mriLandmarks, histologyLandmarks, label: str) -> None:
        if mriLandmarks is None or histologyLandmarks is None:
            raise UserInputError("Select (or create) the MRI and the histology point lists before placing a pair.")
        self.stop()
        self._lists = (mriLandmarks, histologyLandmarks)
        self.label = label
        self._placeOn("mri")

    def stop(self) -> None:
        """End placing (also when the user unticks the button, closes the scene or leaves the module)."""
        wasActive = self.active
        self._unobserve()
        self.stage = None
        if wasActive:
            interaction = self._interactionNode()
            if interaction is not None:
                interaction.SwitchToViewTransformMode()
            self._onFinished()

    def _interactionNode(self):
        return self._scene.GetFirstNodeByClass("vtkMRMLInteractionNode")

    def _placeOn(self, stage: str) -> None:
        pointList = self._lists[0] if stage == "mri" else self._lists[1]
        self.stage = stage
        self._unobserve()

        # The event's call data is the placed point's index: the widget may fill an unplaced point of the list
        # rather than add one at the end (vtkMRMLMarkupsDisplayNode::UpdateActiveControlPointWorld).
        def onPointDefined(caller, event, index):
            self._onPointDefined(caller, index)

        onPointDefined.CallDataType = vtk.VTK_INT
        tag = pointList.AddObserver(slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, onPointDefined)
        self._observed = (pointList, tag, onPointDefined)
        self._markupsLogic.SetActiveList(pointList)
        self._markupsLogic.StartPlaceMode(False)
        what = "MRI" if stage == "mri" else "histology"
        self._showStatus(f"Click the {what} point of pair {self.label}")

    def _unobserve(self) -> None:
        if self._observed is not None:
            pointList, tag, _callback = self._observed
            pointList.RemoveObserver(tag)
            self._observed = None

    def _onPointDefined(self, pointList, index: Optional[int]) -> None:
        if index is None or not 0 <= index < pointList.GetNumberOfControlPoints():
            index = pointList.GetNumberOfControlPoints() - 1
        pointList.SetNthControlPointLabel(index, self.label)
        self._unobserve()
        if self.stage == "mri":
            self.stage = "waiting"
            self._defer(self._placeHistologyPoint)
        else:
            self.stage = None
            self._showStatus(f"Pair {self.label} placed")
            self._onFinished()

    def _placeHistologyPoint(self) -> None:
        if self.stage == "waiting":  # not stopped in between
            self._placeOn("histology")

