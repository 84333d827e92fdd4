"""The logic facade behind the module panel: one method per panel action, each a thin call into the Lib modules.

`MRIHistoRegLogicCore` holds no GUI and no algorithm of its own (beyond small display and geometry helpers: the
checkerboard, an ROI's voxel box, pair labels): it resolves the scene (Slicer's own inside the
application, an app-less one from `context.createScene()` elsewhere), calls the pipeline step modules and puts
their results into MRML nodes (volumes, markups, transforms, tables). The Slicer module's
`MRIHistoRegLogic(ScriptedLoadableModuleLogic, MRIHistoRegLogicCore)` adds only the parameter node, so the
panel, the Python console, headless Slicer and the tests all drive the same calls.

Conventions: lowerCamelCase methods; nodes in, nodes out; spacing in mm as (x, y, z) = (i, j, k); a ValueError
whose message says how to fix the input; long work takes `progress=None`, a callable (fraction, message) that
cancels by raising `progress.Cancelled` (see `MRIHistoRegLib.progress`). Step modules are imported inside the
methods so importing this facade costs nothing and a missing optional package only fails the step that needs it.
"""

import contextlib
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import json
from dataclasses import dataclass, field

import numpy as np
import slicer
import vtk

from . import context, outputs, volumes
from .progress import report as reportProgress
from .errors import UserInputError

log = logging.getLogger(__name__)

from .settings import MODELS, REFERENCE_GRIDS, REFINE_PRESETS, SPACING_UNITS  # noqa: E402,F401 (the panel imports them here)

# The MRML node types the methods take (annotations).
VolumeNode = slicer.vtkMRMLScalarVolumeNode
PointListNode = slicer.vtkMRMLMarkupsFiducialNode
TransformNode = slicer.vtkMRMLTransformNode
TableNode = slicer.vtkMRMLTableNode
RoiNode = slicer.vtkMRMLMarkupsROINode
LabelsNode = Union[slicer.vtkMRMLLabelMapVolumeNode, slicer.vtkMRMLSegmentationNode]
ProgressCallback = Callable[[float, str], Optional[bool]]  # raises progress.Cancelled (or returns True) to cancel
PAIR_LABEL_PREFIX = "P"


@dataclass
class StackInfo:
    """What 'Inspect stack' learns from a stack's header and metadata (nothing of its voxels is read)."""

    path: str
    shapeIjk: List[int]
    dtype: str
    headerSpacingMm: Optional[List[float]]
    metadataSpacingMm: Optional[List[float]]
    spacingMm: List[float]  # in use: the given spacing, else the metadata's, else the header's
    spacingSource: str
    physicalSizeMm: List[float]
    plausible: bool
    verdict: str
    channelNames: List[str] = field(default_factory=lambda: ["C0"])  # the file's channels (a selector when several)
    channelIndex: int = 0  # the channel read: the registration channel every action opens


@dataclass
class SampleNodes:
    """The generated sample loaded into the scene (loadSampleData): its nodes by role, the folder, truth.json and
    the TIFF stack's path (for the stack-based steps: downsampling, resampling from the original)."""

    folder: str
    truth: dict
    stackPath: str
    mri: VolumeNode
    histology: VolumeNode  # histology.nrrd with its TRUE spacing applied (header only)
    mriLandmarks: PointListNode
    histologyLandmarks: PointListNode
    mriLabels: VolumeNode
    histologyLabels: VolumeNode


@dataclass
class LandmarkFitResult:
    """What 'Fit' produced: the nodes it filled, fitting.evaluateAndFit's figures (model, count, labels,
    residual_/loo_ RMS and max in mm, outliers, shrinkage %, 'jacobian' summary) and the pairing messages."""

    transformNode: TransformNode
    tableNode: TableNode
    evaluation: dict
    messages: List[str]


@dataclass
class LiveFitNodes:
    """The nodes live landmark registration (setAutoUpdate) keeps updating."""

    transformNode: TransformNode
    tableNode: TableNode


@dataclass
class RefinementOutcome:
    """What 'Refine' produced: `transformNode` is the refined chain (None when rejected: the landmark transform stays
    in use), `summary` the one-line readout, `report` the report's refinement section, `landmarks` its
    before/after landmark residuals (None without point lists)."""

    accepted: bool
    reason: str
    summary: str
    report: dict
    landmarks: Optional[dict] = None
    transformNode: Optional[TransformNode] = None
    refinementNode: Optional[TransformNode] = None


@dataclass
class LabelComparison:
    """What 'Compare labels' produced: one row of figures per label ({label: {quantity: value}}), the table node
    showing them and the histology labels carried onto the MRI labels' grid."""

    rows: Dict[object, dict]
    tableNode: TableNode
    transferredNode: VolumeNode
    summary: str = ""  # one line per label: the volume in MRI space and its interval (uncertainty.py)


class MRIHistoRegLogicCore:
    """Every action of the MRIHistoReg panel, usable without Qt (`MRIHistoRegLogicCore(scene)`)."""

    def __init__(self, scene=None) -> None:
        """`scene`: the MRML scene to work on; None = Slicer's scene in the application, else a new app-less one."""
        self._scene = scene
        self._liveRegistration = None

    @property
    def scene(self):
        """The MRML scene this logic works on (resolved on first use)."""
        if self._scene is None:
            self._scene = context.getScene(None)
        return self._scene

    # --- sample data ------------------------------------------------------------------------------------------

    def generateSampleData(
        self, folder: str, size: str = "small", seed: int = 0, progress: Optional[ProgressCallback] = None
    ) -> dict:
        """Write the generated sample (MRI, light-sheet stack, landmarks, labels, truth.json) into `folder`;
        returns its manifest (file paths and ground truth)."""
        from . import sampledata

        return sampledata.generateSampleData(folder, size=size, seed=seed, progress=progress)

    def loadSampleData(
        self, folder: str, size: str = "small", seed: int = 0, progress: Optional[ProgressCallback] = None
    ) -> SampleNodes:
        """Load the generated sample from `folder`, generating it there first unless its truth.json already matches
        `size` and `seed`. Loads the MRI, the histology volume (histology.nrrd) with its TRUE spacing applied
        (header only), both landmark lists and both tumour label maps (the histology one at the true spacing too).

        Returns the nodes by role with the folder, truth.json and the TIFF stack's path (SampleNodes).
        """
        from . import sampledata

        folder = os.path.abspath(os.fspath(folder))
        truth = None
        if os.path.isfile(os.path.join(folder, "truth.json")):
            truth = sampledata.loadTruth(folder)
            if (truth.get("size"), truth.get("seed")) != (size, seed) or not all(
                os.path.isfile(os.path.join(folder, name)) for name in truth["files"]
            ):
                raise UserInputError(
                    f"{folder} holds a different or incomplete sample ({truth.get('size')}, seed "
                    f"{truth.get('seed')}): delete the folder or choose another one."
                )
        if truth is None:
            truth = sampledata.generateSampleData(folder, size=size, seed=seed, progress=progress)["truth"]

        def path(name):
            return os.path.join(folder, name)

        trueSpacingMm = [float(v) for v in truth["histology"]["true_spacing_mm"]]
        nodes = SampleNodes(
            folder=folder,
            truth=truth,
            stackPath=path("histology.tif"),
            mri=volumes.loadVolume(self.scene, path(truth["mri"]["file"]), "MRI"),
            histology=volumes.loadVolume(self.scene, path("histology.nrrd"), "Histology"),
            mriLandmarks=self.loadPointList(path("landmarks_mri.mrk.json"), "MRI landmarks"),
            histologyLandmarks=self.loadPointList(path("landmarks_histology.mrk.json"), "Histology landmarks"),
            mriLabels=volumes.loadVolume(self.scene, path(truth["mri"]["label_file"]), "MRI tumour", labelmap=True),
            histologyLabels=volumes.loadVolume(
                self.scene, path(truth["histology"]["label_file"]), "Histology tumour", labelmap=True
            ),
        )
        self.applySpacing(nodes.histology, trueSpacingMm)
        self.applySpacing(nodes.histologyLabels, trueSpacingMm)
        reportProgress(progress, 1.0, "sample data loaded")
        return nodes

    def selectSampleNodes(self, parameterNode: object, nodes: SampleNodes) -> None:
        """Put loaded sample nodes (loadSampleData's SampleNodes) into the module's parameter node, stack path and
        true spacing (in um) included, so the panel is ready for every step."""
        parameterNode.mriVolume = nodes.mri
        parameterNode.histologyVolume = nodes.histology
        parameterNode.mriLandmarks = nodes.mriLandmarks
        parameterNode.histologyLandmarks = nodes.histologyLandmarks
        parameterNode.mriLabels = nodes.mriLabels
        parameterNode.histologyLabels = nodes.histologyLabels
        parameterNode.stackPath = type(parameterNode.stackPath)(nodes.stackPath)
        parameterNode.spacingUnit = "um"
        self.setSpacingFields(parameterNode, nodes.truth["histology"]["true_spacing_mm"])

    def setSpacingFields(self, parameterNode: object, spacingMm: Sequence[float]) -> None:
        """Write `spacingMm` (x, y, z) into the parameter node's spacing fields, in its current unit."""
        if spacingMm is None:
            raise UserInputError("No spacing to use: the stack's metadata holds none. Enter the true spacing by hand.")
        factor = 1000.0 if parameterNode.spacingUnit == "um" else 1.0
        parameterNode.spacingI, parameterNode.spacingJ, parameterNode.spacingK = [float(v) * factor for v in spacingMm]

    @staticmethod
    def pathOrNone(path) -> Optional[str]:
        """`path` as a string, or None when it is empty ('' or '.', what an empty path field holds)."""
        from .panel import pathOrNone

        return pathOrNone(path)

    # --- inputs: stack, spacing -----------------------------------------------------------------------------

    @staticmethod
    def spacingToMm(values: Sequence[float], unit: str) -> List[float]:
        """(x, y, z) spacing given in `unit` ('um' or 'mm') as millimetres."""
        if unit not in SPACING_UNITS:
            raise UserInputError(f"Unknown spacing unit '{unit}': use one of {', '.join(SPACING_UNITS)}.")
        spacing = [float(v) for v in values]
        if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise UserInputError(
                f"Spacing must be three positive numbers (x, y, z), got {list(values)}: enter the true voxel size."
            )
        return [v / 1000.0 for v in spacing] if unit == "um" else spacing

    @staticmethod
    def physicalSizeMm(shapeIjk: Sequence[int], spacingMm: Sequence[float]) -> List[float]:
        """Physical extent (x, y, z) in mm of `shapeIjk` voxels at `spacingMm` (what the panel shows live)."""
        return [float(n) * float(s) for n, s in zip(shapeIjk, spacingMm)]

    def openStack(
        self,
        path: str,
        spacingMm: Optional[Sequence[float]] = None,
        referenceVolume: Optional[VolumeNode] = None,
        channel: Optional[Union[int, str]] = None,
    ) -> "StackInfo":
        """Open a TIFF file/folder or NRRD stack lazily (header and metadata only) and describe it (StackInfo; the
        spacing in use is the given one, else the metadata's, else the header's). The verdict compares the physical
        size at that spacing with `referenceVolume`'s (the MRI) or, without it, a mouse brain's. `channel` (index
        or name; None = 0) picks the channel of a multi-channel stack; StackInfo lists them all."""
        from . import spacing as spacingLib

        with self._openSource(path, spacingMm, channel) as source:
            verdict = spacingLib.checkPlausibility(source, source.spacingMm, referenceExtentMm=referenceVolume)
        shapeIjk = [int(n) for n in source.shape[::-1]]
        return StackInfo(
            path=os.fspath(path),
            shapeIjk=shapeIjk,
            dtype=str(source.dtype),
            headerSpacingMm=_listOrNone(source.headerSpacingMm),
            metadataSpacingMm=_listOrNone(source.metadataSpacingMm),
            spacingMm=[float(v) for v in source.spacingMm],
            spacingSource=source.spacingSource,
            physicalSizeMm=self.physicalSizeMm(shapeIjk, source.spacingMm),
            plausible=bool(verdict.ok),
            verdict=verdict.message,
            channelNames=[str(n) for n in source.channelNames],
            channelIndex=int(source.channelIndex),
        )

    @staticmethod
    def describeStack(info: "StackInfo") -> str:
        """The stack summary shown under 'Inspect stack' (from openStack's dict)."""

        def mm(values):
            return "none" if values is None else " x ".join(f"{v:.6g}" for v in values) + " mm"

        shape = " x ".join(str(n) for n in info.shapeIjk)
        size = " x ".join(f"{v:.3g}" for v in info.physicalSizeMm)
        channels = ""
        if len(info.channelNames) > 1:
            channels = f"channel {info.channelIndex} ({info.channelNames[info.channelIndex]}) of {len(info.channelNames)}\n"
        return (
            f"{shape} voxels ({info.dtype})\n{channels}header spacing: {mm(info.headerSpacingMm)}\n"
            f"metadata spacing: {mm(info.metadataSpacingMm)}\n"
            f"in use ({info.spacingSource}): {mm(info.spacingMm)} -> {size} mm\n"
            f"{'OK' if info.plausible else 'CHECK'}: {info.verdict}"
        )

    def applySpacing(self, volumeNode: VolumeNode, spacingMm: Sequence[float]) -> None:
        """Give `volumeNode` the voxel size `spacingMm` (x, y, z): its IJK->RAS directions and origin are kept,
        voxel values are not touched (the header-only fix of a wrong stack spacing)."""
        from . import spacing as spacingLib

        if volumeNode is None:
            raise UserInputError("Select the histology volume whose spacing should be set.")
        spacingLib.setVolumeSpacing(volumeNode, self.spacingToMm(spacingMm, "mm"))

    def loadFullResolution(
        self,
        path: str,
        spacingMm: Optional[Sequence[float]] = None,
        name: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
        channel: Optional[Union[int, str]] = None,
    ) -> VolumeNode:
        """Load the whole stack (its `channel`: index or name, None = 0) as a volume node at its true spacing; refused (ValueError naming the streamed
        downsampling) when it does not fit in the memory available now.

        The planes are read straight into the volume's own VTK buffer, so the peak is one copy of the stack
        (reading into a numpy array and handing it to a node would need two), and memory is checked once for it."""
        from vtk.util import numpy_support

        from . import stacks

        with self._openSource(path, spacingMm, channel) as source:
            stacks.checkMemoryFor(source.nbytes, f"the full stack {os.path.basename(os.fspath(path))}")
            depth, rows, columns = source.shape
            imageData = vtk.vtkImageData()
            imageData.SetDimensions(columns, rows, depth)
            imageData.AllocateScalars(numpy_support.get_vtk_array_type(np.dtype(source.dtype)), 1)
            imageData.GetPointData().GetScalars().SetName("ImageScalars")
            array = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(source.shape)
            for k in range(depth):
                source.readPlane(k, out=array[k])
                reportProgress(progress, (k + 1) / depth, f"reading plane {k + 1}/{depth}")
            ijkToRas = source.ijkToRas()
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or volumes.baseName(path))
        node.SetAndObserveImageData(imageData)
        volumes.setIjkToRas(node, ijkToRas)
        node.CreateDefaultDisplayNodes()
        return node

    # --- downsample ---------------------------------------------------------------------------------------

    @staticmethod
    def defaultTargetSpacingMm(mriVolume: VolumeNode) -> float:
        """The MRI's smallest voxel size (mm): the default downsampling target."""
        if mriVolume is None:
            raise UserInputError(
                "Select the MRI volume (its spacing is the default target) or untick 'use the MRI's spacing'."
            )
        return float(volumes.spacingOf(volumes.ijkToRas(mriVolume)).min())

    def downsampleStack(
        self,
        path: str,
        targetSpacingMm: float,
        spacingMm: Optional[Sequence[float]] = None,
        cropRoi: Optional[RoiNode] = None,
        name: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
        channel: Optional[Union[int, str]] = None,
    ) -> VolumeNode:
        """Stream the stack at `path` (its `channel`, index or name, None = 0; true spacing `spacingMm`, None = the
        file's metadata/header) down to isotropic
        `targetSpacingMm` by exact area averaging into a new volume node; `cropRoi` (a markups ROI placed in the
        histology's physical space at that spacing) limits it to the voxels the ROI covers."""
        from . import downsample

        if not targetSpacingMm or targetSpacingMm <= 0:
            raise UserInputError(f"Target spacing must be positive (mm), got {targetSpacingMm}.")
        with self._openSource(path, spacingMm, channel) as source:
            crop = None if cropRoi is None else self.roiToCrop(cropRoi, source.shape, source.ijkToRas())
            return downsample.downsampleToNode(
                self.scene, source, float(targetSpacingMm), name=name, crop=crop, progress=progress
            )

    @staticmethod
    def roiToCrop(
        roiNode: RoiNode, shapeKji: Sequence[int], ijkToRas: Sequence[Sequence[float]]
    ) -> Tuple[Tuple[int, int], ...]:
        """Voxel ranges ((i0, i1), (j0, j1), (k0, k1)) (half-open) of a grid covered by a markups ROI's box."""
        bounds = [0.0] * 6
        roiNode.GetRASBounds(bounds)
        if bounds[0] > bounds[1]:
            raise UserInputError(f"ROI '{roiNode.GetName()}' is not placed: place it over the region to keep.")
        corners = np.array([[x, y, z, 1.0] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]])
        ijk = corners @ np.linalg.inv(np.asarray(ijkToRas, float)).T
        counts = list(shapeKji)[::-1]
        crop = []
        for axis in range(3):
            low = int(np.clip(np.floor(ijk[:, axis].min() + 0.5), 0, counts[axis]))
            high = int(np.clip(np.ceil(ijk[:, axis].max() + 0.5), 0, counts[axis]))
            if high <= low:
                raise UserInputError(
                    f"ROI '{roiNode.GetName()}' does not overlap the stack: place it over the histology "
                    f"(with the true spacing applied)."
                )
            crop.append((low, high))
        return tuple(crop)

    # --- landmarks -----------------------------------------------------------------------------------------

    def createPointLists(
        self, mriName: str = "MRI landmarks", histologyName: str = "Histology landmarks"
    ) -> Tuple[PointListNode, PointListNode]:
        """Two new, empty markups point lists (MRI, histology) whose new points are labelled by pair, not by list."""
        nodes = []
        for name in (mriName, histologyName):
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
            node.CreateDefaultDisplayNodes()
            nodes.append(node)
        return nodes[0], nodes[1]

    def loadPointList(self, path: str, name: Optional[str] = None, role: str = "fixed") -> PointListNode:
        """Read a point file (.mrk.json, .fcsv, Slicer CSV, plain 'label,x,y,z' CSV, BigWarp) into a new point list."""
        from . import landmarks

        return landmarks.loadMarkups(self.scene, path, name, role=role)

    @staticmethod
    def nextPairLabel(mriLandmarks: PointListNode, histologyLandmarks: PointListNode) -> str:
        """The label for the next 'place pair' (P<n>, n one more than the largest used in either list)."""
        largest = 0
        for node in (mriLandmarks, histologyLandmarks):
            if node is None:
                continue
            for i in range(node.GetNumberOfControlPoints()):
                label = node.GetNthControlPointLabel(i)
                if label.startswith(PAIR_LABEL_PREFIX) and label[len(PAIR_LABEL_PREFIX) :].isdigit():
                    largest = max(largest, int(label[len(PAIR_LABEL_PREFIX) :]))
        return f"{PAIR_LABEL_PREFIX}{largest + 1}"

    @staticmethod
    def labelLastPoint(pointList: PointListNode, label: str) -> None:
        """Give the most recently added control point of `pointList` the pair label `label`."""
        count = pointList.GetNumberOfControlPoints()
        if count == 0:
            raise UserInputError(f"Point list '{pointList.GetName()}' has no point to label: place a point first.")
        pointList.SetNthControlPointLabel(count - 1, label)

    @staticmethod
    def setPairIncluded(
        mriLandmarks: PointListNode, histologyLandmarks: PointListNode, label: str, included: bool
    ) -> None:
        """Include or exclude the pair `label` from the fit (the control points' 'selected' flag in both lists)."""
        found = False
        for node in (mriLandmarks, histologyLandmarks):
            for i in range(node.GetNumberOfControlPoints()):
                if node.GetNthControlPointLabel(i) == label:
                    node.SetNthControlPointSelected(i, bool(included))
                    found = True
        if not found:
            raise UserInputError(
                f"No point labelled '{label}' in '{mriLandmarks.GetName()}' or '{histologyLandmarks.GetName()}'."
            )

    def applyIncludedFromTable(
        self, tableNode: TableNode, mriLandmarks: PointListNode, histologyLandmarks: PointListNode
    ) -> int:
        """Make the point lists follow the landmark table's 'included' column (the panel's include checkbox):
        each pair whose flag differs from its control points' 'selected' state is switched. Returns how many."""
        if tableNode is None or mriLandmarks is None or histologyLandmarks is None or tableNode.GetTable() is None:
            return 0
        table = tableNode.GetTable()
        labels, flags = table.GetColumnByName("label"), table.GetColumnByName("included")
        if labels is None or flags is None:
            return 0
        selected = {
            mriLandmarks.GetNthControlPointLabel(i): bool(mriLandmarks.GetNthControlPointSelected(i))
            for i in range(mriLandmarks.GetNumberOfControlPoints())
        }
        changed = 0
        for row in range(table.GetNumberOfRows()):
            label = labels.GetValue(row)
            wanted = bool(float(flags.GetVariantValue(row).ToDouble()))
            if label in selected and selected[label] != wanted:
                self.setPairIncluded(mriLandmarks, histologyLandmarks, label, wanted)
                changed += 1
        return changed

    def fitLandmarks(
        self,
        mriLandmarks: PointListNode,
        histologyLandmarks: PointListNode,
        model: str = "affine+tps",
        transformNode: Optional[TransformNode] = None,
        tableNode: Optional[TableNode] = None,
        regularization: float = 0.0,
        referenceVolume: Optional[VolumeNode] = None,
    ) -> LandmarkFitResult:
        """Pair the lists by label, fit `model` (MRI -> histology) and store it in `transformNode` (created when None)
        and the per-pair errors in `tableNode` (created when None). Returns the nodes with the evaluation (residual
        and leave-one-out errors, outliers, shrinkage %, Jacobian summary) and the pairing messages
        (unpaired/excluded labels)."""
        from . import landmarks, transforms, workflow

        if model not in MODELS:
            raise UserInputError(f"Unknown model '{model}': choose one of {', '.join(MODELS)}.")
        pairs = landmarks.pairLandmarks(mriLandmarks, histologyLandmarks)
        grid = None
        if referenceVolume is not None and referenceVolume.GetImageData() is not None:
            grid = self._image(referenceVolume)
        fit = workflow.fitLandmarks(pairs, model, regularization, grid=grid)
        fitted, evaluation = fit.model, dict(fit.evaluation, jacobian=fit.jacobian)
        if transformNode is None:
            transformNode = transforms.createTransformNode(self.scene, fitted, "MRI to histology", generic=True)
        else:
            transforms.updateTransformNode(transformNode, fitted)
        tableNode = transforms.resultsTable(self.scene, evaluation, "Landmark errors", pairs=pairs, tableNode=tableNode)
        tableNode.SetAttribute("MRIHistoReg.regularization", repr(float(regularization)))  # to refit for the report
        return LandmarkFitResult(transformNode, tableNode, evaluation, list(pairs.messages()))

    @staticmethod
    def describeFit(fit: LandmarkFitResult) -> str:
        """One-paragraph readout of a fit: errors and shrinkage (for the panel)."""
        evaluation = fit.evaluation
        text = (
            f"{evaluation['model']}, {evaluation['count']} pairs: residual RMS {evaluation['residual_rms_mm']:.3f} mm, "
            f"leave-one-out RMS {evaluation['loo_rms_mm']:.3f} mm. Shrinkage {evaluation['shrinkage_volume_percent']:.1f}% "
            f"by volume ({evaluation['shrinkage_linear_percent']:.1f}% linear)."
        )
        if evaluation.get("outliers"):
            text += f" Possible outliers: {', '.join(evaluation['outliers'])}."
        if evaluation.get("jacobian"):
            text += f" Folded fraction {100 * evaluation['jacobian']['folded_fraction']:.2f}%."
        for message in fit.messages:
            text += f"\n{message}"
        return text

    def setAutoUpdate(
        self,
        enabled: bool,
        mriLandmarks: Optional[PointListNode] = None,
        histologyLandmarks: Optional[PointListNode] = None,
        model: str = "affine+tps",
        transformNode: Optional[TransformNode] = None,
        tableNode: Optional[TableNode] = None,
        regularization: float = 0.0,
    ) -> Optional[LiveFitNodes]:
        """Start (refit whenever a point is added, moved or removed) or stop live landmark registration.

        Returns the nodes being updated (LiveFitNodes) (created when None; a linear transform node is
        replaced by a general one, which can hold every model), or None when stopped."""
        from . import transforms

        if self._liveRegistration is not None:
            self._liveRegistration.stop()
            self._liveRegistration = None
        if not enabled:
            return None
        if mriLandmarks is None or histologyLandmarks is None:
            raise UserInputError("Auto-update needs both point lists: select the MRI and the histology points.")
        if transformNode is not None and transformNode.IsA("vtkMRMLLinearTransformNode"):
            transformNode = None  # model switching needs a general transform node
        if tableNode is None:
            tableNode = self.scene.AddNewNodeByClass("vtkMRMLTableNode", "Landmark errors")
        live = transforms.LiveLandmarkRegistration(
            self.scene,
            mriLandmarks,
            histologyLandmarks,
            model,
            regularization,
            transformNode=transformNode,
            tableNode=tableNode,
            name="MRI to histology",
        )
        live.start()
        if live.transformNode is None:  # the first fit failed (too few pairs yet): an empty node to be filled
            live.transformNode = self.scene.AddNewNodeByClass("vtkMRMLTransformNode", "MRI to histology")
        self._liveRegistration = live
        return LiveFitNodes(live.transformNode, live.tableNode)

    @property
    def autoUpdateError(self) -> Optional[str]:
        """Why the last live refit left the transform unchanged (None when it succeeded or is off)."""
        return None if self._liveRegistration is None else self._liveRegistration.lastError

    def importPointPairs(self, path: str, mriLandmarks: PointListNode, histologyLandmarks: PointListNode) -> int:
        """Add the pairs of a pair file (BigWarp landmarks CSV) to the two lists, labels kept; returns the count."""
        from . import landmarks

        if mriLandmarks is None or histologyLandmarks is None:
            raise UserInputError("Select (or create) the MRI and histology point lists to import into.")
        labels, fixed, moving, active = landmarks.readBigWarpLandmarks(path)
        for node, points in ((mriLandmarks, fixed), (histologyLandmarks, moving)):
            for label, point, on in zip(labels, points, active):
                index = node.AddControlPoint(float(point[0]), float(point[1]), float(point[2]), label)
                node.SetNthControlPointSelected(index, bool(on))
        return len(labels)

    def exportPointPairs(self, path: str, mriLandmarks: PointListNode, histologyLandmarks: PointListNode) -> str:
        """Write the pairs (by label; excluded pairs marked inactive) as a BigWarp landmarks CSV; returns the path."""
        from . import landmarks

        pairs = landmarks.pairLandmarks(mriLandmarks, histologyLandmarks)
        if pairs.excluded:
            # excluded pairs are written too (inactive) so nothing the user placed is lost
            labels, fixed, moving, active = [], [], [], []
            # positions as pairing reads them (each list's local coordinates = its own image's space)
            mriPoints, histologyPoints = (
                {label: position for label, position, *_ in landmarks._controlPoints(node)}
                for node in (mriLandmarks, histologyLandmarks)
            )
            for label in list(pairs.labels) + list(pairs.excluded):
                if label not in mriPoints or label not in histologyPoints:  # index-paired names ('a/b', '#3')
                    raise UserInputError(
                        f"Pair '{label}' has no common label in the two lists: label the points (same label in "
                        f"both lists) before exporting excluded pairs."
                    )
                labels.append(label)
                fixed.append(mriPoints[label])
                moving.append(histologyPoints[label])
                active.append(label in pairs.labels)
            return landmarks.writeBigWarpLandmarks(path, labels, fixed, moving, active)
        return landmarks.writeBigWarpLandmarks(path, pairs.labels, pairs.fixed, pairs.moving)

    # --- refine -------------------------------------------------------------------------------------------------

    def refineRegistration(
        self,
        mriVolume: VolumeNode,
        histologyVolume: VolumeNode,
        transformNode: TransformNode,
        preset: str = "elastix B-spline + landmarks",
        outputTransform: Optional[TransformNode] = None,
        mriLandmarks: Optional[PointListNode] = None,
        histologyLandmarks: Optional[PointListNode] = None,
        progress: Optional[ProgressCallback] = None,
        mriLabels: Optional[LabelsNode] = None,
    ) -> RefinementOutcome:
        """Refine the landmark transform by intensity registration (the preset's engine) of the MRI and the
        (downsampled) histology volume, started from `transformNode`.

        With both point lists the result is also checked against the landmarks and rejected if it moves them away.
        With `mriLabels` (the MRI tumour label map or segmentation) an accepted elastix refinement is followed by
        the tumour focus of each label (tumourfocus.py); the report's tumour_focus says what it did.
        An accepted refinement is stored as 'Intensity refinement' (grid transform) and the whole chain
        (refinement, then landmarks) in `outputTransform` (created when None); a rejected one leaves the landmark
        result in use. Returns a RefinementOutcome (its nodes None when rejected)."""
        from . import landmarks, refine, transforms

        if preset not in REFINE_PRESETS:
            raise UserInputError(f"Unknown refinement preset '{preset}': choose one of {', '.join(REFINE_PRESETS)}.")
        if mriVolume is None or histologyVolume is None:
            raise UserInputError("Select the MRI and the (downsampled) histology volume to refine with.")
        if transformNode is None:
            raise UserInputError("Fit the landmarks first: refinement starts from the landmark transform.")
        from . import settings, workflow

        initial = transforms.mappingFromWorldToNode(transformNode)
        pairs = None
        if mriLandmarks is not None and histologyLandmarks is not None:
            pairs = landmarks.pairLandmarks(mriLandmarks, histologyLandmarks)
        fit = workflow.LandmarkFit(initial, transformNode.GetAttribute("MRIHistoReg.landmarkModel") or "",
                                   {}, pairs if pairs is not None and pairs.count else None)
        tumours, labelProblem = None, None
        if mriLabels is not None:
            from . import compare

            try:  # labels the focus cannot use must not cost the refinement
                tumours = workflow.Image(*compare.labelArrayFromNode(mriLabels, mriVolume, self.scene))
            except UserInputError as error:
                labelProblem = str(error)
        refinement = workflow.refine(self._image(mriVolume), self._image(histologyVolume), fit,
                                     settings=settings.refineSettings(preset), progress=progress,
                                     tumourLabels=tumours)
        result = refinement.result
        if labelProblem is not None and result.tumourFocus.get("reason") == workflow.NO_TUMOUR_LABELS:
            from . import tumourfocus

            result.tumourFocus = tumourfocus.notRun(f"the MRI labels could not be used: {labelProblem}", searched=True)
            refinement.summary["tumour_focus"] = result.tumourFocus
        answer = RefinementOutcome(
            accepted=result.accepted,
            reason=result.reason,
            summary=result.summary(),
            report=refinement.summary,
            landmarks=refinement.summary["landmarks"],
        )
        if not result.accepted:
            return answer
        refinementNode = refine.refinementTransformNode(self.scene, result, "Intensity refinement")
        outputTransform = self.composeRefinedTransform(transformNode, refinementNode, outputTransform)
        # the report's refinement section, saved with the scene on the node it describes
        outputTransform.SetAttribute("MRIHistoReg.refinement", json.dumps(outputs.jsonReady(refinement.summary)))
        answer.transformNode, answer.refinementNode = outputTransform, refinementNode
        return answer

    def composeRefinedTransform(
        self,
        transformNode: TransformNode,
        refinementNode: TransformNode,
        outputTransform: Optional[TransformNode] = None,
    ) -> TransformNode:
        """One transform node (no parent) whose world -> child mapping is landmark(refinement(x)): `transformNode`
        with its own parents applied after `refinementNode` (both 'from parent' = MRI -> histology direction), by
        refine.composedTransformNode. The inputs are left as they are; `outputTransform` (created when None)
        receives a copy of the chain."""
        from . import refine

        if outputTransform is not None and outputTransform.IsA("vtkMRMLLinearTransformNode"):
            raise UserInputError(
                f"'{outputTransform.GetName()}' is a linear transform and cannot hold the refined (deformable) "
                f"chain: pick or create a general transform node."
            )
        return refine.composedTransformNode(
            self.scene, refinementNode, transformNode, "MRI to histology (refined)", outputNode=outputTransform
        )

    # --- resample and compare -------------------------------------------------------------------------------

    def resampleHistology(
        self,
        transformNode: TransformNode,
        referenceVolume: VolumeNode,
        stackPath: Optional[str] = None,
        spacingMm: Optional[Sequence[float]] = None,
        histologyVolume: Optional[VolumeNode] = None,
        outputSpacingMm: Optional[float] = None,
        outputNode: Optional[VolumeNode] = None,
        progress: Optional[ProgressCallback] = None,
        channel: Optional[Union[int, str]] = None,
    ) -> VolumeNode:
        """Resample the histology (the stack's `channel`: index or name, None = 0) ONCE through `transformNode` (MRI -> histology, its whole parent chain) onto
        `referenceVolume`'s grid, or with `outputSpacingMm` onto a grid of that spacing covering the histology's
        footprint (axes of the reference). The source is the ORIGINAL stack at `stackPath` (true spacing
        `spacingMm`, streamed) when given, else `histologyVolume`. Returns the output volume node (`outputNode`
        reused when given); the resampling report is in its 'MRIHistoReg.resampling' attribute (JSON)."""
        from . import resample, stacks, transforms

        if transformNode is None:
            raise UserInputError("Fit the landmarks first: resampling needs the MRI-to-histology transform.")
        if referenceVolume is None or referenceVolume.GetImageData() is None:
            raise UserInputError("Select the MRI (reference grid) volume.")
        if not stackPath and histologyVolume is None:
            raise UserInputError("Nothing to resample: open the histology stack file or select the histology volume.")
        mapping = transforms.mappingFromWorldToNode(transformNode)
        referenceIjkToRas = volumes.ijkToRas(referenceVolume)
        opened = self._openSource(stackPath, spacingMm, channel) if stackPath else contextlib.nullcontext(histologyVolume)
        with opened as source:
            if outputSpacingMm:
                isStack = isinstance(source, stacks.StackSource)
                sourceShape = source.shape if isStack else volumes.arrayFromVolume(source).shape
                sourceIjkToRas = source.ijkToRas() if isStack else volumes.ijkToRas(source)
                shape, ijkToRas = resample.referenceGridFromFootprint(
                    sourceShape, sourceIjkToRas, mapping, float(outputSpacingMm), referenceIjkToRas=referenceIjkToRas
                )
            else:
                dims = referenceVolume.GetImageData().GetDimensions()
                shape, ijkToRas = (dims[2], dims[1], dims[0]), referenceIjkToRas
            array, info = resample.resampleToGrid(source, mapping, shape, ijkToRas, progress=progress)
        if outputNode is None:
            outputNode = volumes.createVolumeNode(self.scene, array, ijkToRas, "Histology resampled")
        else:
            volumes.updateVolumeFromArray(outputNode, array)
            volumes.setIjkToRas(outputNode, ijkToRas)
            if outputNode.GetDisplayNode() is None:
                outputNode.CreateDefaultDisplayNodes()
        outputNode.SetAttribute("MRIHistoReg.resampling", json.dumps(info, default=float))
        return outputNode

    def resampleOtherChannels(
        self,
        transformNode: TransformNode,
        referenceVolume: VolumeNode,
        stackPath: Optional[str],
        spacingMm: Optional[Sequence[float]] = None,
        channel: Optional[Union[int, str]] = None,
        outputSpacingMm: Optional[float] = None,
        registrationNode: Optional[VolumeNode] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> List[VolumeNode]:
        """Every channel of the stack besides `channel` (the registration channel) through resampleHistology: the
        same transform, grid and streamed path, one channel at a time. Each node is named after its channel and
        tagged ('MRIHistoReg.channel': index and name; 'MRIHistoReg.channelOf': `registrationNode`'s ID), so the
        next click updates it and exportReport writes it as outputs.channelOnMri. Returns the nodes in channel
        order ([] for a single-channel stack)."""
        from .progress import scaled

        if not stackPath:
            raise UserInputError("Resampling the other channels reads the stack file: choose the histology stack file "
                                 "and press 'Inspect stack' first.")
        info = self.openStack(stackPath, spacingMm, channel=channel)
        others = [index for index in range(len(info.channelNames)) if index != info.channelIndex]
        nodes = []
        for number, index in enumerate(others):
            name = info.channelNames[index]
            existing = dict(self._channelVolumes(registrationNode)).get(index)
            node = self.resampleHistology(transformNode, referenceVolume, stackPath=stackPath, spacingMm=spacingMm,
                                          outputSpacingMm=outputSpacingMm, outputNode=existing, channel=index,
                                          progress=scaled(progress, number / len(others), (number + 1) / len(others)))
            if existing is None:
                node.SetName(f"Histology {name} resampled")
            node.SetAttribute("MRIHistoReg.channel", json.dumps({"index": index, "name": name}))
            if registrationNode is not None:
                node.SetAttribute("MRIHistoReg.channelOf", registrationNode.GetID())
            nodes.append(node)
        return nodes

    def _channelVolumes(self, registrationNode) -> List[Tuple[int, VolumeNode]]:
        """[(channel index, node)] of the other channels resampled with `registrationNode` (resampleOtherChannels)."""
        if registrationNode is None:
            return []
        found = []
        for node in context.nodesByClass(self.scene, "vtkMRMLScalarVolumeNode"):
            if node.GetAttribute("MRIHistoReg.channelOf") == registrationNode.GetID() and node.GetAttribute("MRIHistoReg.channel"):
                found.append((int(json.loads(node.GetAttribute("MRIHistoReg.channel"))["index"]), node))
        return sorted(found, key=lambda item: item[0])

    def storedRegularization(self, landmarkTable: Optional[TableNode], default: float = 0.0) -> float:
        """The TPS regularization the landmark fit used (kept on its table), not the field's current value: the
        interval's refits and the report must refit the transform that exists."""
        stored = landmarkTable.GetAttribute("MRIHistoReg.regularization") if landmarkTable is not None else None
        return float(stored) if stored else float(default)

    def compareLabels(
        self,
        mriLabels: LabelsNode,
        histologyLabels: LabelsNode,
        transformNode: TransformNode,
        tableNode: Optional[TableNode] = None,
        mriVolume: Optional[VolumeNode] = None,
        progress: Optional[ProgressCallback] = None,
        mriLandmarks: Optional[PointListNode] = None,
        histologyLandmarks: Optional[PointListNode] = None,
        landmarkTransform: Optional[TransformNode] = None,
        tpsRegularization: float = 0.0,
    ) -> LabelComparison:
        """Transfer the histology labels onto the MRI labels' grid through `transformNode` and compare per label:
        MRI volume, histology volume (native, transferred, Jacobian-integrated), ratios, Dice, HD95.

        Label maps or segmentations are accepted (compare.labelArrayFromNode: an MRI segmentation is exported on
        `mriVolume`'s grid when given, a histology segmentation on its own geometry).
        With the landmark point lists, the Jacobian-integrated volume gets its interval (uncertainty.py:
        jackknife refits of the model of `landmarkTransform`, default `transformNode`, with `tpsRegularization`);
        `transformNode` counts as refined when it is not the landmark transform.
        Returns the rows ({label: row}), the table node and the transferred label map (LabelComparison)."""
        from . import compare, transforms

        if transformNode is None:
            raise UserInputError("Fit the landmarks first: the comparison needs the MRI-to-histology transform.")
        for node, what in ((mriLabels, "MRI labels"), (histologyLabels, "histology labels")):
            if node is None:
                raise UserInputError(f"Select the {what} (a label map or a segmentation).")
        mriArray, mriIjkToRas = compare.labelArrayFromNode(mriLabels, mriVolume, self.scene)
        histologyArray, histologyIjkToRas = compare.labelArrayFromNode(histologyLabels, None, self.scene)
        mapping = transforms.mappingFromWorldToNode(transformNode)
        rows, transferred = compare.compareTumours(
            mriArray, mriIjkToRas, histologyArray, histologyIjkToRas, mapping, progress=progress
        )
        self._addVolumeIntervals(rows, histologyArray, histologyIjkToRas, mapping, transformNode, mriLandmarks,
                                 histologyLandmarks, landmarkTransform, tpsRegularization)
        transferredNode = volumes.createVolumeNode(
            self.scene, transferred, mriIjkToRas, "Histology labels on MRI", labelmap=True
        )
        tableNode = self._rowsToTable(rows, tableNode, "Label comparison")
        return LabelComparison(rows, tableNode, transferredNode, _intervalSummary(rows))

    def _addVolumeIntervals(self, rows, histologyArray, histologyIjkToRas, mapping, transformNode, mriLandmarks,
                            histologyLandmarks, landmarkTransform, tpsRegularization):
        """uncertainty.addVolumeIntervals from the point lists; without them (or without a landmark model) the
        interval keys are still written, empty, with the reason, so every front reports the same keys."""
        from . import landmarks, uncertainty

        landmarkTransform = landmarkTransform if landmarkTransform is not None else transformNode
        model = landmarkTransform.GetAttribute("MRIHistoReg.landmarkModel")
        reason = None
        if mriLandmarks is None or histologyLandmarks is None:
            reason = "no interval: give the landmark point lists"
        elif not model:
            reason = "no interval: the transform is not from a landmark fit"
        else:
            refined = landmarkTransform.GetID() != transformNode.GetID()  # wrappers may differ for one node
            try:  # the lists may have been edited since the fit: the comparison itself still stands
                pairs = landmarks.pairLandmarks(mriLandmarks, histologyLandmarks)
                uncertainty.addVolumeIntervals(rows, histologyArray, histologyIjkToRas, pairs.fixed, pairs.moving,
                                               model, tpsRegularization, finalMapping=mapping if refined else None)
            except UserInputError as error:
                reason = f"no interval: {error}"
        if reason is None:
            return
        for row in rows.values():
            if row.get(uncertainty.ESTIMATE_KEY):
                uncertainty._insertAfter(row, uncertainty.ESTIMATE_KEY, {
                    uncertainty.INTERVAL_KEY: None, uncertainty.LEVEL_KEY: uncertainty.LEVEL,
                    uncertainty.METHOD_KEY: reason})

    def exportReport(
        self,
        folder: str,
        transformNode: Optional[TransformNode] = None,
        landmarkTable: Optional[TableNode] = None,
        resultsTable: Optional[TableNode] = None,
        resampledVolume: Optional[VolumeNode] = None,
        mriLandmarks: Optional[PointListNode] = None,
        histologyLandmarks: Optional[PointListNode] = None,
        mriVolume: Optional[VolumeNode] = None,
    ) -> str:
        """Write what the panel produced into `folder` in the layout `run` writes (outputs.py; atomically:
        complete or untouched, and an existing folder is replaced only if it is an earlier MRIHistoReg output):
        transform.h5, histology_on_mri.nrrd (the resampled histology, on the MRI grid when `mriVolume` is given),
        the point lists, report.json / report.csv with run's sections (landmark errors refitted from the point
        lists, refinement, resampling and label comparison where done; null otherwise) and the figures.
        Returns the folder's absolute path."""
        if not self.pathOrNone(folder):
            raise UserInputError("Choose a report folder first.")
        if transformNode is None and resampledVolume is None and mriLandmarks is None:
            raise UserInputError("Nothing to export yet: fit the landmarks (and resample/compare) first.")
        with outputs.atomicFolder(folder) as work:
            report = {"name": "panel", "warnings": [], "software": _softwareVersions()}
            fit = self._refitForReport(transformNode, landmarkTable, mriLandmarks, histologyLandmarks, mriVolume)
            figurePaths = self._writePanelFiles(work, transformNode, resampledVolume, mriLandmarks,
                                                histologyLandmarks, mriVolume, fit)
            if fit is not None:
                report.update(landmarks=fit.rows(), landmark_summary=fit.summary(), pairing=fit.pairing(),
                              transform=dict(fit.transformSection(), file=outputs.TRANSFORM), jacobian=fit.jacobian)
            if transformNode is not None and transformNode.GetAttribute("MRIHistoReg.refinement"):
                report["refinement"] = json.loads(transformNode.GetAttribute("MRIHistoReg.refinement"))
            if resampledVolume is not None and resampledVolume.GetAttribute("MRIHistoReg.resampling"):
                report["resampling"] = json.loads(resampledVolume.GetAttribute("MRIHistoReg.resampling"))
                channels = self._writeChannelVolumes(work, resampledVolume)
                if channels:
                    report["resampling"]["other_channels"] = channels
            if resultsTable is not None:
                report["labels"] = {row.pop("label"): row for row in _tableRows(resultsTable)}
            report["figures"] = [os.path.basename(path) for path in figurePaths]
            outputs.writeReport(report, work)
        return os.path.abspath(folder)

    def _writeChannelVolumes(self, work, resampledVolume) -> List[dict]:
        """The other channels resampled with `resampledVolume`, written as `run` names them (outputs.channelOnMri)."""
        rows = []
        for index, node in self._channelVolumes(resampledVolume):
            name = json.loads(node.GetAttribute("MRIHistoReg.channel"))["name"]
            fileName = outputs.channelOnMri(index, name)
            _writeNode(self.scene, node, os.path.join(work, fileName))
            rows.append({"index": index, "name": name, "file": fileName})
        return rows

    def _refitForReport(self, transformNode, landmarkTable, mriLandmarks, histologyLandmarks, mriVolume):
        """The landmark fit the transform came from, recomputed from the point lists (milliseconds) so the report
        carries the same figures `run` writes; None without the lists or a landmark model."""
        from . import landmarks, workflow

        model = transformNode.GetAttribute("MRIHistoReg.landmarkModel") if transformNode is not None else None
        if mriLandmarks is None or histologyLandmarks is None or model is None:
            return None
        regularization = self.storedRegularization(landmarkTable)
        pairs = landmarks.pairLandmarks(mriLandmarks, histologyLandmarks)
        grid = self._image(mriVolume) if mriVolume is not None else None
        return workflow.fitLandmarks(pairs, model, regularization, grid=grid)

    def _writePanelFiles(self, work, transformNode, resampledVolume, mriLandmarks, histologyLandmarks, mriVolume, fit):
        from . import figures, transforms

        if transformNode is not None:
            transforms.saveTransform(transformNode, os.path.join(work, outputs.TRANSFORM))
        for node, name in ((resampledVolume, outputs.HISTOLOGY_ON_MRI), (mriLandmarks, outputs.LANDMARKS_MRI),
                           (histologyLandmarks, outputs.LANDMARKS_HISTOLOGY)):
            if node is not None:
                _writeNode(self.scene, node, os.path.join(work, name))
        figurePaths = []
        if mriVolume is not None and resampledVolume is not None:
            mriArray, histologyArray = volumes.arrayFromVolume(mriVolume), volumes.arrayFromVolume(resampledVolume)
            if mriArray.shape != histologyArray.shape or not np.allclose(
                volumes.ijkToRas(mriVolume), volumes.ijkToRas(resampledVolume), atol=1e-6
            ):
                raise UserInputError(
                    "The resampled histology is not on the MRI grid: resample with reference grid 'MRI' "
                    "for the overlay figures (or export without the MRI)."
                )
            points = None if fit is None else fit.pairs.fixed
            figurePaths.extend(figures.overlayFigures(mriArray, histologyArray, volumes.ijkToRas(mriVolume), work,
                                                      landmarksRas=points))
        if fit is not None:
            figurePaths.append(figures.landmarkErrorChart(fit.rows(), os.path.join(work, outputs.LANDMARK_ERRORS_FIGURE)))
        return figurePaths

    # --- display ----------------------------------------------------------------------------------------------

    def setHistologyAligned(
        self,
        histologyVolume: VolumeNode,
        transformNode: TransformNode,
        aligned: bool,
        histologyLandmarks: Optional[PointListNode] = None,
    ) -> None:
        """Show the histology volume in MRI space (placed under `transformNode`) or in its own space.

        `histologyLandmarks` goes with it: under the same transform its points show on the aligned image, and a
        point clicked there is stored by MRML in the list's local coordinates = histology space (the
        transform's from-parent image of the clicked world position), which is what pairing reads."""
        if histologyVolume is None:
            raise UserInputError("Select the histology volume to align.")
        if aligned and transformNode is None:
            raise UserInputError("Fit the landmarks first (no transform selected).")
        parentID = transformNode.GetID() if aligned else None
        histologyVolume.SetAndObserveTransformNodeID(parentID)
        if histologyLandmarks is not None:
            histologyLandmarks.SetAndObserveTransformNodeID(parentID)

    def setSliceLayers(
        self,
        background: Optional[VolumeNode] = None,
        foreground: Optional[VolumeNode] = None,
        opacity: Optional[float] = None,
    ) -> int:
        """Set background/foreground volumes and foreground opacity in every slice view; returns the view count
        (0 without views, e.g. in an app-less scene)."""
        compositeNodes = context.nodesByClass(self.scene, "vtkMRMLSliceCompositeNode")
        for node in compositeNodes:
            if background is not None:
                node.SetBackgroundVolumeID(background.GetID())
            if foreground is not None:
                node.SetForegroundVolumeID(foreground.GetID())
            if opacity is not None:
                node.SetForegroundOpacity(min(max(float(opacity), 0.0), 1.0))
        return len(compositeNodes)

    def createCheckerboardVolume(
        self, volumeA: VolumeNode, volumeB: VolumeNode, squareMm: float = 1.0, outputNode: Optional[VolumeNode] = None
    ) -> VolumeNode:
        """A checkerboard of two volumes on the same grid (e.g. MRI and histology resampled onto it), squares of
        `squareMm`, each intensity scaled to its 1-99% range so both show."""
        if volumeA is None or volumeB is None:
            raise UserInputError("Select the MRI and the resampled histology (resample first) for the checkerboard.")
        a, b = volumes.arrayFromVolume(volumeA), volumes.arrayFromVolume(volumeB)
        if a.shape != b.shape or not np.allclose(volumes.ijkToRas(volumeA), volumes.ijkToRas(volumeB), atol=1e-6):
            raise UserInputError(
                f"'{volumeA.GetName()}' and '{volumeB.GetName()}' are not on the same grid: resample the "
                f"histology onto the MRI grid first."
            )
        if squareMm <= 0:
            raise UserInputError(f"Checkerboard square size must be positive (mm), got {squareMm}.")
        spacing = volumes.spacingOf(volumes.ijkToRas(volumeA))
        k, j, i = np.indices(a.shape, sparse=True)
        parity = ((i * spacing[0] // squareMm) + (j * spacing[1] // squareMm) + (k * spacing[2] // squareMm)).astype(
            int
        ) % 2
        board = np.where(parity == 0, _normalised(a), _normalised(b)).astype(np.float32)
        if outputNode is None:
            return volumes.createVolumeNode(self.scene, board, volumes.ijkToRas(volumeA), "Checkerboard")
        volumes.updateVolumeFromArray(outputNode, board)
        volumes.setIjkToRas(outputNode, volumes.ijkToRas(volumeA))
        return outputNode

    def createWarpMagnitudeVolume(
        self, transformNode: TransformNode, referenceVolume: VolumeNode, outputNode: Optional[VolumeNode] = None
    ) -> VolumeNode:
        """Displacement magnitude (mm) of `transformNode` sampled on `referenceVolume`'s grid, by Slicer's
        transform logic (the same as Transforms module > Convert > displacement magnitude)."""
        if transformNode is None or referenceVolume is None:
            raise UserInputError("Select a transform (fit the landmarks first) and the MRI as reference grid.")
        transformLogic = context.moduleLogic(self.scene, "Transforms")
        node = transformLogic.CreateDisplacementVolumeFromTransform(transformNode, referenceVolume, True, outputNode)
        if node is None:
            raise UserInputError(
                f"Could not sample transform '{transformNode.GetName()}' on '{referenceVolume.GetName()}'."
            )
        if outputNode is None:
            node.SetName(self.scene.GenerateUniqueName("Warp magnitude (mm)"))
        return node

    # --- helpers ----------------------------------------------------------------------------------------------

    def _rowsToTable(self, rows: dict, tableNode: TableNode, name):
        """A table node with one row per label and one column per quantity of `rows` ({label: {key: value}})."""
        if tableNode is None:
            tableNode = self.scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        columns = _tableColumns(rows)
        table = vtk.vtkTable()
        labelColumn = vtk.vtkStringArray()
        labelColumn.SetName("label")
        table.AddColumn(labelColumn)
        for name, _, isText in columns:
            column = vtk.vtkStringArray() if isText else vtk.vtkDoubleArray()
            column.SetName(name)
            table.AddColumn(column)
        table.SetNumberOfRows(len(rows))
        for r, (label, row) in enumerate(rows.items()):
            table.SetValue(r, 0, vtk.vtkVariant(str(label)))
            for c, (_, value, isText) in enumerate(columns, start=1):
                value = value(row)
                if isText:
                    table.SetValue(r, c, vtk.vtkVariant("" if value is None else str(value)))
                else:
                    table.SetValue(r, c, vtk.vtkVariant(float("nan") if value is None else float(value)))
        tableNode.SetAndObserveTable(table)
        return tableNode

    @staticmethod
    def _image(volumeNode):
        from . import workflow

        return workflow.Image(volumes.arrayFromVolume(volumeNode), volumes.ijkToRas(volumeNode))

    def _openSource(self, path, spacingMm=None, channel=None):
        """A StackSource for `path` with `spacingMm` (opening reads metadata only; use it in a `with` block so its
        file handles are closed). Opened afresh each time, so a file replaced on disk is never read stale."""
        from . import stacks

        if not path or not os.path.exists(os.fspath(path)):
            raise UserInputError(
                f"Histology stack not found: '{path}'. Choose a TIFF file, a folder of TIFF pages or an NRRD file."
            )
        spacing = None if spacingMm is None else list(self.spacingToMm(spacingMm, "mm"))
        return stacks.openStack(os.fspath(path), spacingMm=spacing, channel=channel)


INTERVAL_COLUMNS = (" low", " high")  # a [low, high] value is shown as two numeric columns "<key> low/high"


def _tableColumns(rows) -> list:
    """[(column name, value getter, is text)] for the keys of `rows`: a text column for string values, two
    numeric columns for a [low, high] pair (the interval reads as two numbers in the table), else numeric."""
    keys = []
    for row in rows.values():
        keys.extend(k for k in row if k not in keys)
    columns = []
    for key in keys:
        values = [row.get(key) for row in rows.values()]
        if any(isinstance(v, str) for v in values):
            columns.append((key, lambda row, key=key: row.get(key), True))
        elif any(isinstance(v, (list, tuple)) for v in values) or key.endswith("_interval_mm3"):
            for index, suffix in enumerate(INTERVAL_COLUMNS):
                columns.append((key + suffix, lambda row, key=key, index=index: (row.get(key) or (None, None))[index],
                                False))
        else:
            columns.append((key, lambda row, key=key: row.get(key), False))
    return columns


def _tableRows(tableNode) -> list:
    """Rows as dicts, numbers at full precision (vtkVariant.ToString keeps 6 digits); "<key> low/high" column
    pairs become key: [low, high] again (None when both are empty)."""
    table = tableNode.GetTable()
    columns = [table.GetColumn(c) for c in range(table.GetNumberOfColumns())]
    names = [column.GetName() for column in columns]
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for name, column in zip(names, columns):
            value = column.GetValue(r) if column.IsA("vtkStringArray") else float(column.GetValue(r))
            low, high = INTERVAL_COLUMNS
            if name.endswith(low) and name[:-len(low)] + high in names:
                pair = (value, float(table.GetColumnByName(name[:-len(low)] + high).GetValue(r)))
                row[name[:-len(low)]] = None if all(np.isnan(pair)) else list(pair)
            elif not (name.endswith(high) and name[:-len(high)] + low in names):
                row[name] = value
        rows.append(row)
    return rows


def _intervalSummary(rows) -> str:
    """'label 1: 0.769 mm3 in MRI space (95 % interval 0.600-0.986)' per label with a volume."""
    from . import uncertainty

    parts = []
    for label, row in rows.items():
        estimate, interval = row.get(uncertainty.ESTIMATE_KEY), row.get(uncertainty.INTERVAL_KEY)
        if not estimate:
            continue
        text = f"label {label}: {estimate:.4g} mm3 in MRI space"
        if interval:
            level = round(100 * row.get(uncertainty.LEVEL_KEY, uncertainty.LEVEL))
            text += f" ({level} % interval {interval[0]:.4g}-{interval[1]:.4g})"
        parts.append(text)
    return "; ".join(parts)


def _softwareVersions() -> dict:
    from .pipeline import softwareVersions

    return softwareVersions()


def _listOrNone(values):
    return None if values is None else [float(v) for v in values]


def _normalised(array) -> np.ndarray:
    low, high = np.percentile(array, [1, 99]) if array.size else (0.0, 1.0)
    scale = float(high - low) or 1.0
    return np.clip((array.astype(np.float32) - low) / scale, 0.0, 1.0)


def _writeNode(scene, node, path) -> None:
    """Write `node` to `path` with a temporary storage node (the node's own storage node and file name stay as
    they are, so the scene still points at the user's files)."""
    storage = context.newStorageNode(node)
    scene.AddNode(storage)  # some writers read scene settings (e.g. the markups length unit)
    try:
        storage.SetFileName(os.fspath(path))
        if not storage.WriteData(node):
            raise UserInputError(f"Could not write '{node.GetName()}' to {path}: is the folder writable?")
    finally:
        scene.RemoveNode(storage)
