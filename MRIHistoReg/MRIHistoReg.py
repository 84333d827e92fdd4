"""MRIHistoReg: register a mouse-brain MRI to a cleared-tissue light-sheet (LSM) stack, in 3D Slicer.

Sections (Slicer's scripted module layout): module metadata | sample data | parameter node | widget |
logic (a thin facade over MRIHistoRegLib.logic) | self-test (the shared scenarios of MRIHistoRegLib.scenarios).
All computation lives in MRIHistoRegLib (Qt-free, also used headless and by pytest); this file only wires it
to the panel.
"""
import contextlib
import os
import pathlib
from typing import Annotated, Optional, Union

import vtk

import slicer
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
    vtkMRMLTransformNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Decimals, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MRIHistoRegLib import panel, scenarios
from MRIHistoRegLib.logic import MODELS, REFERENCE_GRIDS, REFINE_PRESETS, SPACING_UNITS, MRIHistoRegLogicCore, SampleNodes
from MRIHistoRegLib.panel import SPACING_DECIMALS
from MRIHistoRegLib.progress import Cancelled

SAMPLE_CATEGORY = "MRI Histology Registration"  # shown as is before Slicer 5.12
SAMPLE_NAME = "MRIHistoRegSample"


#
# MRIHistoReg (module metadata only)
#


class MRIHistoReg(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MRI Histology Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["MRIHistoReg developers"]
        self.parent.helpText = _("""
Register a mouse-brain MRI to a cleared-tissue light-sheet microscopy stack of the same brain.
Work down the panel: <b>Inputs</b> (MRI, histology volume or huge stack file, true spacing),
<b>Downsample</b> (streamed exact area averaging), <b>Landmarks</b> (paired points, rigid / similarity /
affine / affine + thin-plate spline, residual and leave-one-out errors, shrinkage),
<b>Refine</b> (optional intensity registration), <b>Resample and compare</b> (one resampling of the original
stack, label volumes, Dice, HD95, report) and <b>Display</b> (fade, flicker, checkerboard, warp magnitude).
Try it with the generated sample data (Sample Data module or the Inputs section).
See the <a href="https://github.com/MRIHistoReg/SlicerMRIHistoReg#readme">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
MRIHistoReg is built on 3D Slicer, VTK, ITK/SimpleITK, numpy and tifffile. The panel follows the Slicer
scripted module template by Jean-Christophe Fillion-Robin (Kitware), Andras Lasso (PerkLab) and Steve Pieper
(Isomics).
""")
        # Sample data can only be registered once the SampleData module exists
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: generated (seeded, with ground truth), not downloaded
#


def sampleDataFolder() -> str:
    """Where the generated sample lives: a folder in Slicer's temporary path (generated once, then reused)."""
    return os.path.join(slicer.app.temporaryPath, "MRIHistoRegSample")


def loadGeneratedSampleData(source=None) -> Optional[SampleNodes]:
    """SampleData 'customDownloader': generate the sample (first time only) and load it into the scene.

    Loads the MRI, the histology volume with its true spacing applied, both landmark lists and both tumour label
    maps, and selects them in the module's parameter node. Returns the SampleNodes (None after a failure, which
    is shown once: SampleData calls this straight from a button's clicked() signal).
    """
    logic = MRIHistoRegLogic()
    runner = panel.ActionRunner(showError=lambda message, details: slicer.util.errorDisplay(message, detailedText=details),
                                waitCursor=slicer.util.WaitCursor)
    nodes = None
    with runner.action(_("Failed to generate or load the MRIHistoReg sample data.")):
        nodes = logic.loadSampleData(sampleDataFolder())
        logic.selectSampleNodes(logic.getParameterNode(), nodes)
        slicer.util.setSliceViewerLayers(background=nodes.mri, foreground=nodes.histology, foregroundOpacity=0.5,
                                          fit=True)
    return nodes


def registerSampleData():
    """Add the generated sample to the Sample Data module (its button runs the generator, nothing is downloaded)."""
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    # Category titles exist from Slicer 5.12 (SampleData.py); before, the category name is what is shown.
    if hasattr(SampleData.SampleDataLogic, "registerCustomSampleDataCategory"):
        SampleData.SampleDataLogic.registerCustomSampleDataCategory(SAMPLE_CATEGORY, _("MRI Histology Registration"))
    # No URI: SampleData's button calls customDownloader(source), which generates the data locally.
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName=SAMPLE_NAME,
        thumbnailFileName=os.path.join(iconsPath, "MRIHistoReg.png"),
        uris=[],
        fileNames=[],
        nodeNames=[],
        customDownloader=loadGeneratedSampleData,
    )


#
# MRIHistoRegParameterNode
#


@parameterNodeWrapper
class MRIHistoRegParameterNode:
    """Every selector and setting of the panel (saved with the scene; reopening the scene restores the panel).

    Spacing values are in `spacingUnit` (x, y, z = i, j, k); all other lengths are in mm.
    """

    # Inputs
    mriVolume: Optional[vtkMRMLScalarVolumeNode]
    histologyVolume: Optional[vtkMRMLScalarVolumeNode]
    stackPath: pathlib.Path
    histologyChannel: int = 0  # the registration channel of a multi-channel stack (set from the channel selector)
    spacingI: Annotated[float, WithinRange(0.0, 100000.0), Decimals(SPACING_DECIMALS)] = 1.0
    spacingJ: Annotated[float, WithinRange(0.0, 100000.0), Decimals(SPACING_DECIMALS)] = 1.0
    spacingK: Annotated[float, WithinRange(0.0, 100000.0), Decimals(SPACING_DECIMALS)] = 1.0
    spacingUnit: Annotated[str, Choice(list(SPACING_UNITS))] = "um"
    # Downsample
    targetSpacingFromMri: bool = True
    targetSpacingMm: Annotated[float, WithinRange(0.001, 10.0), Decimals(4)] = 0.1
    cropEnabled: bool = False
    cropRoi: Optional[vtkMRMLMarkupsROINode]
    # Landmarks
    mriLandmarks: Optional[vtkMRMLMarkupsFiducialNode]
    histologyLandmarks: Optional[vtkMRMLMarkupsFiducialNode]
    model: Annotated[str, Choice(list(MODELS))] = "affine+tps"
    tpsRegularization: Annotated[float, WithinRange(0.0, 1000.0), Decimals(3)] = 0.0
    autoUpdate: bool = False
    landmarkTransform: Optional[vtkMRMLTransformNode]
    landmarkTable: Optional[vtkMRMLTableNode]
    pairsPath: pathlib.Path
    # Refine
    refineEnabled: bool = False
    refinePreset: Annotated[str, Choice(list(REFINE_PRESETS))] = "elastix B-spline + landmarks"
    refinedTransform: Optional[vtkMRMLTransformNode]
    # Resample and compare
    referenceGrid: Annotated[str, Choice(list(REFERENCE_GRIDS))] = "MRI"
    resampleOtherChannels: bool = False
    outputSpacingMm: Annotated[float, WithinRange(0.001, 10.0), Decimals(4)] = 0.05
    resampledVolume: Optional[vtkMRMLScalarVolumeNode]
    mriLabels: Optional[Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]]
    histologyLabels: Optional[Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]]
    resultsTable: Optional[vtkMRMLTableNode]
    reportFolder: pathlib.Path
    # Display
    histologyAligned: bool = False
    fade: Annotated[float, WithinRange(0.0, 1.0), Decimals(2)] = 0.5
    flicker: bool = False
    checkerboardSquareMm: Annotated[float, WithinRange(0.01, 100.0), Decimals(2)] = 1.0


#
# MRIHistoRegWidget
#


class MRIHistoRegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: loads the .ui, binds it to the parameter node, turns each button into one logic call."""

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._runner = None  # panel.ActionRunner: every action reports its error once, nothing escapes to Qt/VTK
        self._placement = None  # panel.PairPlacement behind 'Place pair'
        self._spacingUnit = panel.SpacingUnitFollower()
        self._flickerTimer = None
        self._flickerOn = False
        self._stackInfo = None  # logic.StackInfo of the inspected stack
        self._elastixOffered = False  # the itk-elastix install is offered once per session

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)
        import qt

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MRIHistoReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui connects the top-level qMRMLWidget's mrmlSceneChanged(vtkMRMLScene*) to every MRML widget.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MRIHistoRegLogic()
        self._runner = panel.ActionRunner(showError=self._showError, showStatus=self._showStatus,
                                          progressDialog=self._progressDialog, waitCursor=slicer.util.WaitCursor)
        # Slicer's markups widget switches back to view mode right after the first point's event: the histology
        # placement is started from the event loop (panel.PairPlacement).
        self._placement = panel.PairPlacement(slicer.mrmlScene, slicer.modules.markups.logic(),
                                              defer=lambda callback: qt.QTimer.singleShot(0, callback),
                                              showStatus=self._showStatus, onFinished=self._onPlacementFinished)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Inputs
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSample)
        self.ui.openStackButton.connect("clicked(bool)", self.onOpenStack)
        self.ui.browseStackFolderButton.connect("clicked(bool)", self.onBrowseStackFolder)
        self.ui.channelComboBox.connect("currentIndexChanged(int)", self.onChannelChanged)
        self.ui.useMetadataSpacingButton.connect("clicked(bool)", self.onUseMetadataSpacing)
        self.ui.applySpacingButton.connect("clicked(bool)", self.onApplySpacing)
        self.ui.loadFullResolutionButton.connect("clicked(bool)", self.onLoadFullResolution)
        # Downsample
        self.ui.downsampleButton.connect("clicked(bool)", self.onDownsample)
        # Landmarks
        self.ui.createPointListsButton.connect("clicked(bool)", self.onCreatePointLists)
        self.ui.placePairButton.connect("toggled(bool)", self.onPlacePairToggled)
        self.ui.fitButton.connect("clicked(bool)", self.onFit)
        self.ui.importPairsButton.connect("clicked(bool)", self.onImportPairs)
        self.ui.exportPairsButton.connect("clicked(bool)", self.onExportPairs)
        self.ui.browseNewPairsFileButton.connect("clicked(bool)", self.onBrowseNewPairsFile)
        # Refine
        self.ui.refineButton.connect("clicked(bool)", self.onRefine)
        # Resample and compare
        self.ui.resampleButton.connect("clicked(bool)", self.onResample)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.exportReportButton.connect("clicked(bool)", self.onExportReport)
        # Display
        self.ui.checkerboardButton.connect("clicked(bool)", self.onCheckerboard)
        self.ui.warpMagnitudeButton.connect("clicked(bool)", self.onWarpMagnitude)
        self._flickerTimer = qt.QTimer()
        self._flickerTimer.setInterval(500)
        self._flickerTimer.connect("timeout()", self.onFlickerTick)

        # What connectGui(self.ui) would bind; connectParametersToGui returns the tag to disconnect with at every
        # supported Slicer (connectGui returns None before 5.10, so disconnectGui could never undo it).
        self._parameterWidgets = {widget.property("SlicerParameterName"): widget for widget in vars(self.ui).values()
                                  if hasattr(widget, "property") and widget.property("SlicerParameterName")}
        with self._runner.action(_("Failed to set up the panel from its parameter node.")):
            self.initializeParameterNode()
        # the elastix engine's one-time load (10-30 s) happens while the user loads data and places landmarks
        from MRIHistoRegLib import elastix

        elastix.preloadInBackground()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._placement.stop()
        self._observeLandmarkTable(None)
        if self._flickerTimer:
            self._flickerTimer.stop()
        if self.logic:
            self.logic.setAutoUpdate(False)
        self.removeObservers()

    def onReload(self) -> None:
        """Developer mode 'Reload': also re-import MRIHistoRegLib, which Python would otherwise keep cached."""
        import sys

        for name in [n for n in sys.modules if n == "MRIHistoRegLib" or n.startswith("MRIHistoRegLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        """Called each time the user opens this module."""
        with self._runner.action(_("Failed to set up the panel from its parameter node.")):
            self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module. The panel stays bound to its parameter node (each
        binding before Slicer 5.12 leaves an observer on the node that is never removed, so it binds once)."""
        self._placement.stop()
        if self._parameterNode and self._parameterNode.flicker:
            self._parameterNode.flicker = False  # no flicker while another module is shown

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        self._placement.stop()
        self.logic.setAutoUpdate(False)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            with self._runner.action(_("Failed to set up the panel from its parameter node.")):
                self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure the parameter node exists and is observed; preselect the first volume as MRI."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.mriVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.mriVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[MRIHistoRegParameterNode]) -> None:
        """Set and observe the parameter node (the GUI follows it both ways through SlicerParameterName)."""
        current = self._parameterNode
        if current is not None and inputParameterNode is not None and current.parameterNode is inputParameterNode.parameterNode:
            return  # the same MRML node (getParameterNode() wraps it anew each time): keep the binding
        if current is not None:
            current.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(current, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(self._parameterWidgets)
            self._spacingUnit = panel.SpacingUnitFollower(self._parameterNode)  # the node's values are in its unit
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """Keep enabled states, live readouts, tables and display settings in step with the parameter node.
        Runs from a VTK observer: an error is reported once and never raised out of it."""
        p = self._parameterNode
        if p is None:
            return
        with self._runner.action(_("Failed to update the panel.")):
            if self._spacingUnit.follow(p):
                return  # the converted fields re-entered this method already
            for name, enabled in panel.actionStates(p, self._stackInfo).items():
                getattr(self.ui, name).enabled = enabled
            self.ui.physicalSizeLabel.text = panel.physicalSizeText(p, self._stackInfo)
            # setMRMLTableNode rebuilds the view's model every time (qMRMLTableModel): only when the table changes
            if self.ui.landmarkTableView.mrmlTableNode() is not p.landmarkTable:
                self.ui.landmarkTableView.setMRMLTableNode(p.landmarkTable)
            self._observeLandmarkTable(p.landmarkTable)
            if self.ui.resultsTableView.mrmlTableNode() is not p.resultsTable:
                self.ui.resultsTableView.setMRMLTableNode(p.resultsTable)
        with self._runner.action(_("Failed to update the display.")):
            self._applyDisplay()
        with self._runner.action(_("Failed to switch landmark auto-update.")):
            self._applyAutoUpdate()

    def _setStackInfo(self, info) -> None:
        """Remember the inspected stack and show it (its channels in the selector); the buttons that need it follow."""
        self._stackInfo = info
        self.ui.stackInfoLabel.text = self.logic.describeStack(info) if info else ""
        wasBlocked = self.ui.channelComboBox.blockSignals(True)  # filling it is not the user choosing a channel
        self.ui.channelComboBox.clear()
        for index, name in enumerate(info.channelNames if info else []):
            self.ui.channelComboBox.addItem(f"{index}: {name}")
        if info:
            self.ui.channelComboBox.currentIndex = info.channelIndex
        self.ui.channelComboBox.blockSignals(wasBlocked)
        self.onParameterNodeModified()  # panel.actionStates enables the selector and the other-channels option

    # --- helpers: progress, errors ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _progressDialog(self, title: str):
        """Slicer's progress dialog as a progress callback; Cancel raises progress.Cancelled inside the work."""
        import qt

        dialog = slicer.util.createProgressDialog(windowTitle=title, labelText=title, maximum=1000, autoClose=False)

        def progress(fraction, message=""):
            dialog.value = int(round(1000 * fraction))
            if message:
                dialog.labelText = f"{title}: {message}"
            slicer.app.processEvents(qt.QEventLoop.AllEvents)
            if dialog.wasCanceled:
                raise Cancelled(_("{title} cancelled").format(title=title))

        try:
            yield progress
        finally:
            dialog.close()

    def _action(self, errorMessage: str, progressTitle: Optional[str] = None):
        """A panel action (see panel.ActionRunner): one error dialog for one failure, Cancel only logged."""
        return self._runner.action(errorMessage, progressTitle)

    @staticmethod
    def _showError(message: str, details: str) -> None:
        slicer.util.errorDisplay(message, detailedText=details)

    @staticmethod
    def _showStatus(message: str) -> None:
        slicer.util.showStatusMessage(message, 3000)

    def _spacingMm(self):
        return panel.spacingFieldsMm(self._parameterNode)

    def _stackPath(self):
        """The stack file to read from, once inspected (its spacing is then in the spacing fields), else None."""
        stack = panel.inspectedStack(self._parameterNode, self._stackInfo)
        return None if stack is None else stack.path

    def _stackChannel(self):
        """The registration channel every action opens the stack with: the inspected stack's (the selector's)."""
        stack = panel.inspectedStack(self._parameterNode, self._stackInfo)
        return None if stack is None else stack.channelIndex

    # --- Inputs ------------------------------------------------------------------------------------------

    def onLoadSample(self) -> None:
        with self._action(_("Failed to generate or load the sample data."), _("Sample data")) as progress:
            nodes = self.logic.loadSampleData(sampleDataFolder(), progress=progress)
            self.logic.selectSampleNodes(self._parameterNode, nodes)
            info = self.logic.openStack(nodes.stackPath, self._spacingMm(), referenceVolume=nodes.mri, channel=None)
            self._parameterNode.histologyChannel = info.channelIndex  # not a channel of an earlier stack
            self._setStackInfo(info)
            slicer.util.setSliceViewerLayers(background=nodes.mri, foreground=nodes.histology, foregroundOpacity=0.5, fit=True)

    def onOpenStack(self) -> None:
        p = self._parameterNode
        with self._action(_("Failed to open the histology stack.")):
            if self._stackInfo is not None and self._stackInfo.path != str(p.stackPath):
                p.histologyChannel = 0  # another stack: its channels are not the previous one's
            info = self.logic.openStack(str(p.stackPath), referenceVolume=p.mriVolume, channel=None)
            if p.histologyChannel != info.channelIndex and p.histologyChannel < len(info.channelNames):
                # the channel chosen before (saved with the scene) when this stack still has it
                info = self.logic.openStack(str(p.stackPath), referenceVolume=p.mriVolume, channel=p.histologyChannel)
            p.histologyChannel = info.channelIndex
            self.logic.setSpacingFields(p, info.spacingMm)
            self._setStackInfo(info)

    def onChannelChanged(self, index: int) -> None:
        """The user picked another registration channel: describe the stack as that channel (spacing fields kept)."""
        p = self._parameterNode
        if self._stackInfo is None or index < 0 or index == self._stackInfo.channelIndex:
            return
        with self._action(_("Failed to open the chosen channel.")):
            info = self.logic.openStack(self._stackInfo.path, self._spacingMm(), referenceVolume=p.mriVolume,
                                        channel=index)
            p.histologyChannel = info.channelIndex
            self._setStackInfo(info)
        if self._stackInfo is not None and self._stackInfo.channelIndex != index:
            self._setStackInfo(self._stackInfo)  # it failed: the selector shows the channel every action still reads

    def onBrowseStackFolder(self) -> None:
        """A TIFF series is a folder: ctkPathLineEdit's browse button picks files only, so folders come from here."""
        import qt

        p = self._parameterNode
        start = panel.pathOrNone(p.stackPath) or ""
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Folder of TIFF planes"), start)
        if folder:
            p.stackPath = pathlib.Path(folder)

    def onBrowseNewPairsFile(self) -> None:
        """Choose a file to write (it need not exist): ctkPathLineEdit's browse button only opens existing files."""
        import qt

        p = self._parameterNode
        start = panel.pathOrNone(p.pairsPath) or "landmark_pairs.csv"
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Export point pairs"), start,
                                              _("Point pairs (*.csv)"))
        if path:
            p.pairsPath = pathlib.Path(path)

    def onUseMetadataSpacing(self) -> None:
        with self._action(_("Failed to use the metadata spacing.")):
            self.logic.setSpacingFields(self._parameterNode, self._stackInfo.metadataSpacingMm)

    def onApplySpacing(self) -> None:
        p = self._parameterNode
        with self._action(_("Failed to apply the spacing.")):
            self.logic.applySpacing(p.histologyVolume, self._spacingMm())
            slicer.util.resetSliceViews()

    def onLoadFullResolution(self) -> None:
        p = self._parameterNode
        with self._action(_("Failed to load the full-resolution stack."), _("Loading stack")) as progress:
            node = self.logic.loadFullResolution(self._stackPath(), self._spacingMm(), progress=progress,
                                                 channel=self._stackChannel())
            p.histologyVolume = node

    # --- Downsample --------------------------------------------------------------------------------------

    def onDownsample(self) -> None:
        p = self._parameterNode
        with self._action(_("Failed to downsample the stack."), _("Downsampling")) as progress:
            target = self.logic.defaultTargetSpacingMm(p.mriVolume) if p.targetSpacingFromMri else p.targetSpacingMm
            node = self.logic.downsampleStack(self._stackPath(), target, self._spacingMm(),
                                              cropRoi=p.cropRoi if p.cropEnabled else None, progress=progress,
                                              channel=self._stackChannel())
            p.histologyVolume = node
            slicer.util.setSliceViewerLayers(foreground=node, foregroundOpacity=p.fade)

    # --- Landmarks ---------------------------------------------------------------------------------------

    def onCreatePointLists(self) -> None:
        p = self._parameterNode
        with self._action(_("Failed to create the point lists.")):
            p.mriLandmarks, p.histologyLandmarks = self.logic.createPointLists()

    def onPlacePairToggled(self, checked: bool) -> None:
        """'Place pair': place the MRI point, then the histology point; both get the same new label."""
        p = self._parameterNode
        if not checked:
            self._placement.stop()
            return
        with self._action(_("Failed to start placing a pair.")):
            label = self.logic.nextPairLabel(p.mriLandmarks, p.histologyLandmarks)
            self._placement.start(p.mriLandmarks, p.histologyLandmarks, label)
        if not self._placement.active:
            self._onPlacementFinished()

    def _onPlacementFinished(self) -> None:
        """Placing ended (pair done, stopped, or failed to start): release the toggle button quietly."""
        self.ui.placePairButton.blockSignals(True)
        self.ui.placePairButton.checked = False
        self.ui.placePairButton.blockSignals(False)

    def onFit(self) -> None:
        p = self._parameterNode
        with self._action(_("Landmark fit failed.")):
            result = self.logic.fitLandmarks(p.mriLandmarks, p.histologyLandmarks, p.model, p.landmarkTransform,
                                             p.landmarkTable, p.tpsRegularization, referenceVolume=p.mriVolume)
            p.landmarkTransform = result.transformNode
            p.landmarkTable = result.tableNode
            self.ui.shrinkageLabel.text = self.logic.describeFit(result)

    def _applyAutoUpdate(self) -> None:
        """Start/stop live refitting to follow the auto-update checkbox (and the chosen lists and model)."""
        p = self._parameterNode
        wanted = bool(p.autoUpdate and p.mriLandmarks and p.histologyLandmarks)
        key = (wanted, p.mriLandmarks, p.histologyLandmarks, p.model, p.tpsRegularization) if wanted else (False,)
        if key == getattr(self, "_autoUpdateKey", (False,)):
            return
        self._autoUpdateKey = key
        with self._action(_("Failed to switch landmark auto-update.")):
            nodes = self.logic.setAutoUpdate(wanted, p.mriLandmarks, p.histologyLandmarks, p.model, p.landmarkTransform,
                                             p.landmarkTable, p.tpsRegularization)
            if nodes is not None:
                p.landmarkTransform, p.landmarkTable = nodes.transformNode, nodes.tableNode

    def _observeLandmarkTable(self, tableNode) -> None:
        """Follow edits of the table's 'included' column (the include checkbox of each pair)."""
        observed = getattr(self, "_observedTable", None)
        if observed is tableNode:
            return
        if observed is not None:
            self.removeObserver(observed, vtk.vtkCommand.ModifiedEvent, self.onLandmarkTableModified)
        self._observedTable = tableNode
        if tableNode is not None:
            self.addObserver(tableNode, vtk.vtkCommand.ModifiedEvent, self.onLandmarkTableModified)

    def onLandmarkTableModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None or getattr(self, "_syncingTable", False):
            return
        self._syncingTable = True  # a refit rewrites the table: do not react to our own change
        try:
            with self._action(_("Failed to include or exclude a landmark pair.")):
                changed = self.logic.applyIncludedFromTable(p.landmarkTable, p.mriLandmarks, p.histologyLandmarks)
                if changed and not p.autoUpdate:  # auto-update refits by itself when the points change
                    self.onFit()
        finally:
            self._syncingTable = False

    def onImportPairs(self) -> None:
        p = self._parameterNode
        with self._action(_("Failed to import point pairs.")):
            count = self.logic.importPointPairs(str(p.pairsPath), p.mriLandmarks, p.histologyLandmarks)
            slicer.util.showStatusMessage(_("{count} pairs imported").format(count=count), 3000)

    def onExportPairs(self) -> None:
        p = self._parameterNode
        with self._action(_("Failed to export point pairs.")):
            path = self.logic.exportPointPairs(str(p.pairsPath), p.mriLandmarks, p.histologyLandmarks)
            slicer.util.showStatusMessage(_("Pairs written to {path}").format(path=path), 3000)

    # --- Refine ------------------------------------------------------------------------------------------

    def _offerElastixEngine(self, preset) -> None:
        """Once per session, when the preset wants itk-elastix and it is absent: ask (stating the ~1.7 GB size)
        whether to install it; declining (or a self-test) keeps the SimpleITK engine, which the report records."""
        from MRIHistoRegLib import deps, elastix, settings

        if (settings.refineSettings(preset).get("engine") != "elastix" or elastix.available()[0]
                or self._elastixOffered or slicer.app.testingEnabled()):
            return
        self._elastixOffered = True
        if deps.installLargePackage("itk"):
            elastix.preloadInBackground()

    def onRefine(self) -> None:
        p = self._parameterNode
        with self._action(_("Could not install the elastix engine: the SimpleITK engine is used.")):
            self._offerElastixEngine(p.refinePreset)
        with self._action(_("Intensity refinement failed."), _("Refining")) as progress:
            result = self.logic.refineRegistration(p.mriVolume, p.histologyVolume, p.landmarkTransform, p.refinePreset,
                                                   outputTransform=p.refinedTransform, mriLandmarks=p.mriLandmarks,
                                                   histologyLandmarks=p.histologyLandmarks, progress=progress,
                                                   mriLabels=p.mriLabels)
            if result.accepted:
                p.refinedTransform = result.transformNode
            self.ui.refineResultLabel.text = result.summary

    # --- Resample and compare ----------------------------------------------------------------------------

    def _registrationTransform(self):
        p = self._parameterNode
        return p.refinedTransform if (p.refineEnabled and p.refinedTransform is not None) else p.landmarkTransform

    def onResample(self) -> None:
        p = self._parameterNode
        with self._action(_("Resampling failed."), _("Resampling histology")) as progress:
            outputSpacing = None if p.referenceGrid == "MRI" else p.outputSpacingMm
            others = p.resampleOtherChannels and self._stackPath() is not None
            node = self.logic.resampleHistology(self._registrationTransform(), p.mriVolume,
                                                stackPath=self._stackPath(), spacingMm=self._spacingMm(),
                                                histologyVolume=p.histologyVolume,
                                                outputSpacingMm=outputSpacing, outputNode=p.resampledVolume,
                                                progress=panel.scaledProgress(progress, 0.0, 0.5 if others else 1.0),
                                                channel=self._stackChannel())
            p.resampledVolume = node
            if others:  # the same transform and grid, one channel at a time (Export report writes them)
                self.logic.resampleOtherChannels(self._registrationTransform(), p.mriVolume, self._stackPath(),
                                                 spacingMm=self._spacingMm(), channel=self._stackChannel(),
                                                 outputSpacingMm=outputSpacing, registrationNode=node,
                                                 progress=panel.scaledProgress(progress, 0.5, 1.0))
            slicer.util.setSliceViewerLayers(background=p.mriVolume, foreground=node, foregroundOpacity=p.fade)

    def onCompare(self) -> None:
        p = self._parameterNode
        with self._action(_("Label comparison failed."), _("Comparing labels")) as progress:
            # the landmark lists and model give the volume its interval (the table's *_interval_mm3 low/high)
            result = self.logic.compareLabels(p.mriLabels, p.histologyLabels, self._registrationTransform(),
                                              tableNode=p.resultsTable, mriVolume=p.mriVolume, progress=progress,
                                              mriLandmarks=p.mriLandmarks, histologyLandmarks=p.histologyLandmarks,
                                              landmarkTransform=p.landmarkTransform,
                                              tpsRegularization=self.logic.storedRegularization(
                                                  p.landmarkTable, p.tpsRegularization))
            p.resultsTable = result.tableNode
            if result.summary:
                slicer.util.showStatusMessage(result.summary, 10000)

    def onExportReport(self) -> None:
        p = self._parameterNode
        with self._action(_("Failed to export the report.")):
            folder = self.logic.exportReport(str(p.reportFolder), transformNode=self._registrationTransform(),
                                             landmarkTable=p.landmarkTable, resultsTable=p.resultsTable,
                                             resampledVolume=p.resampledVolume,
                                             mriLandmarks=p.mriLandmarks, histologyLandmarks=p.histologyLandmarks,
                                             mriVolume=p.mriVolume if p.referenceGrid == "MRI" else None)
            slicer.util.showStatusMessage(_("Report written to {folder}").format(folder=folder), 5000)

    # --- Display -----------------------------------------------------------------------------------------

    def _applyDisplay(self) -> None:
        """Apply fade, flicker and alignment when they (or the nodes they act on) changed since last time."""
        p = self._parameterNode
        if p.flicker and not self._flickerTimer.isActive():
            self._flickerTimer.start()
        elif not p.flicker and self._flickerTimer.isActive():
            self._flickerTimer.stop()
            self._appliedFade = None  # restore the fade the flicker overrode
        if not p.flicker and p.fade != getattr(self, "_appliedFade", None):
            self._appliedFade = p.fade
            self.logic.setSliceLayers(opacity=p.fade)
        transform = self._registrationTransform()
        alignment = (p.histologyAligned, p.histologyVolume, transform, p.histologyLandmarks)
        previous = getattr(self, "_appliedAlignment", (False, None, None, None))
        if alignment != previous and p.histologyVolume is not None:
            self._appliedAlignment = alignment
            # only undo an alignment this panel made: a parent transform set elsewhere is left alone
            if (p.histologyAligned and transform is not None) or previous[0]:
                with self._action(_("Failed to align the histology display.")):
                    if previous[0] and previous[3] is not None and previous[3] is not p.histologyLandmarks:
                        previous[3].SetAndObserveTransformNodeID(None)  # a list swapped out goes back to its space
                    self.logic.setHistologyAligned(p.histologyVolume, transform,
                                                   p.histologyAligned and transform is not None,
                                                   histologyLandmarks=p.histologyLandmarks)

    def onFlickerTick(self) -> None:
        self._flickerOn = not self._flickerOn
        self.logic.setSliceLayers(opacity=1.0 if self._flickerOn else 0.0)

    def onCheckerboard(self) -> None:
        p = self._parameterNode
        with self._action(_("Failed to create the checkerboard.")):
            node = self.logic.createCheckerboardVolume(p.mriVolume, p.resampledVolume, p.checkerboardSquareMm)
            slicer.util.setSliceViewerLayers(background=node, foreground=None)

    def onWarpMagnitude(self) -> None:
        p = self._parameterNode
        with self._action(_("Failed to compute the warp magnitude.")):
            node = self.logic.createWarpMagnitudeVolume(self._registrationTransform(), p.mriVolume)
            slicer.util.setSliceViewerLayers(foreground=node, foregroundOpacity=p.fade)


#
# MRIHistoRegLogic
#


class MRIHistoRegLogic(ScriptedLoadableModuleLogic, MRIHistoRegLogicCore):
    """Slicer's logic class: the Qt-free facade (MRIHistoRegLib.logic) plus the module's parameter node.

    Usable from the Python console without the panel: `MRIHistoRegLogic().fitLandmarks(...)`.
    """

    def __init__(self) -> None:
        """Works on slicer.mrmlScene."""
        ScriptedLoadableModuleLogic.__init__(self)
        MRIHistoRegLogicCore.__init__(self, slicer.mrmlScene)

    def getParameterNode(self):
        return MRIHistoRegParameterNode(super().getParameterNode())


#
# MRIHistoRegTest
#


class MRIHistoRegTest(ScriptedLoadableModuleTest):
    """Slicer's self-test ("Reload and Test", ctest): the scenarios pytest runs, on Slicer's own scene."""

    def setUp(self):
        """Each test starts from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run every scenario, each on a cleared scene."""
        for test in (self.test_Panel, self.test_LoadSample, self.test_FixSpacing, self.test_Downsample, self.test_LandmarkFit,
                     self.test_Refine, self.test_Resample, self.test_Compare):
            self.setUp()
            test()

    def _workFolder(self, name: str) -> str:
        import shutil

        folder = os.path.join(slicer.app.temporaryPath, "MRIHistoRegTest", name)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        return folder

    def test_Panel(self):
        self.delayDisplay("Scenario: the panel and its parameter node")
        widget = slicer.util.getModuleWidget("MRIHistoReg")  # builds the panel: setup() binds the parameter node
        if slicer.util.mainWindow():
            slicer.util.selectModule("MRIHistoReg")  # enter(), as a user opening the module
        else:
            widget.enter()  # --no-main-window: selectModule needs the module selector
        assert widget._parameterNode is not None, "the panel has no parameter node after setup() and enter()"
        scenarios.panelScenario(slicer.mrmlScene, self._workFolder("panel"),
                                lambda scene: MRIHistoRegLogic().getParameterNode())
        self.delayDisplay("Test passed")

    def test_LoadSample(self):
        self.delayDisplay("Scenario: load the sample data")
        scenarios.loadSampleScenario(slicer.mrmlScene, self._workFolder("loadSample"))
        self.delayDisplay("Test passed")

    def test_FixSpacing(self):
        self.delayDisplay("Scenario: fix the stack's spacing")
        scenarios.fixSpacingScenario(slicer.mrmlScene, self._workFolder("fixSpacing"))
        self.delayDisplay("Test passed")

    def test_Downsample(self):
        self.delayDisplay("Scenario: downsample the stack")
        scenarios.downsampleScenario(slicer.mrmlScene, self._workFolder("downsample"))
        self.delayDisplay("Test passed")

    def test_LandmarkFit(self):
        self.delayDisplay("Scenario: landmark fit")
        scenarios.landmarkFitScenario(slicer.mrmlScene, self._workFolder("landmarkFit"))
        self.delayDisplay("Test passed")

    def test_Refine(self):
        self.delayDisplay("Scenario: intensity refinement from a displaced landmark fit")
        scenarios.refineScenario(slicer.mrmlScene, self._workFolder("refine"))
        self.delayDisplay("Test passed")

    def test_Resample(self):
        self.delayDisplay("Scenario: resample the original stack onto the MRI")
        scenarios.resampleScenario(slicer.mrmlScene, self._workFolder("resample"))
        self.delayDisplay("Test passed")

    def test_Compare(self):
        self.delayDisplay("Scenario: compare tumour labels")
        scenarios.compareScenario(slicer.mrmlScene, self._workFolder("compare"))
        self.delayDisplay("Test passed")
