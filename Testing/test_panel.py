"""The panel against Slicer's rules, without Qt: its parameter node class under the parameterNodeWrapper's rules
(Testing/slicer_rules.py, written from Slicer's source), and the Qt-free panel behaviour (MRIHistoRegLib.panel)
on a real MRML scene: which buttons are usable, the spacing fields' unit and decimals, one error report per
failed action, placing a landmark pair the way Slicer's markups widget places points, no leaked VTK objects."""
import shutil
import typing

import pytest
import slicer
import vtk

import slicer_rules
from conftest import REPO
from MRIHistoRegLib import context, panel
from MRIHistoRegLib.logic import MRIHistoRegLogicCore
from MRIHistoRegLib.progress import Cancelled

MODULE = REPO / "MRIHistoReg" / "MRIHistoReg.py"


@pytest.fixture
def parameters(scene):
    """The panel's own parameter node class, wrapped by Slicer's rules, on a scripted module node of `scene`."""
    return slicer_rules.newParameterNode(scene, slicer_rules.loadParameterNodeClass(MODULE))


# ------------------------------------------------------------------------------------ parameter node rules
def test_parameter_node_class_obeys_the_wrappers_rules(scene):
    wrapper = slicer_rules.loadParameterNodeClass(MODULE)
    parameters = slicer_rules.newParameterNode(scene, wrapper)  # writes every default, as Slicer's setup() does
    assert slicer_rules.guidelineProblems(slicer_rules.rawParameterNodeClass(MODULE)) == []
    assert parameters.mriLabels is None and parameters.spacingUnit == "um" and parameters.model == "affine+tps"


def _brokenCopy(tmp_path, old, new):
    copy = tmp_path / "MRIHistoReg.py"
    text = MODULE.read_text(encoding="utf-8")
    assert old in text, f"test setup: {old!r} not in MRIHistoReg.py"
    copy.write_text(text.replace(old, new, 1), encoding="utf-8")
    return copy


BROKEN = [
    # (what Slicer's wrapper does with it, old text, new text, exception, message fragment)
    ("a Union of nodes without None cannot hold the default None: TypeError when the panel opens",
     "mriLabels: Optional[Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]]",
     "mriLabels: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]", TypeError, "Unable to write value 'None'"),
    ("a Choice default outside the choices", 'refinePreset: Annotated[str, Choice(list(REFINE_PRESETS))] = "elastix B-spline + landmarks"',
     'refinePreset: Annotated[str, Choice(list(REFINE_PRESETS))] = "B-spline"', ValueError, "must be in one of"),
    ("a default outside WithinRange", "targetSpacingMm: Annotated[float, WithinRange(0.001, 10.0), Decimals(4)] = 0.1",
     "targetSpacingMm: Annotated[float, WithinRange(0.001, 10.0), Decimals(4)]", ValueError, "within range"),
    ("a parameter named like the wrapper's own attributes", "    fade: Annotated[float, WithinRange(0.0, 1.0), Decimals(2)] = 0.5",
     "    default: Annotated[float, WithinRange(0.0, 1.0), Decimals(2)] = 0.5", ValueError, "reserved name"),
    ("a type no serializer takes", "    flicker: bool = False", "    flicker: complex = 0j", Exception,
     "Unable to create serializer"),
]


@pytest.mark.parametrize("why, old, new, error, fragment", BROKEN, ids=[b[0][:40] for b in BROKEN])
def test_rules_reject_a_broken_parameter_node_class(scene, tmp_path, why, old, new, error, fragment):
    copy = _brokenCopy(tmp_path, old, new)
    with pytest.raises(error, match=fragment):
        slicer_rules.newParameterNode(scene, slicer_rules.loadParameterNodeClass(copy))


def test_rules_flag_a_node_parameter_that_is_not_optional(tmp_path):
    copy = _brokenCopy(tmp_path, "mriVolume: Optional[vtkMRMLScalarVolumeNode]", "mriVolume: vtkMRMLScalarVolumeNode")
    problems = slicer_rules.guidelineProblems(slicer_rules.rawParameterNodeClass(copy))
    assert problems and problems[0].startswith("mriVolume: node parameters must be Optional")


def test_label_selectors_offer_label_maps_and_segmentations():
    """The node connector sets a combo box's nodeTypes from the annotation (guiConnectors.py, util.getNodeTypes)."""
    raw = slicer_rules.rawParameterNodeClass(MODULE)
    hints = typing.get_type_hints(raw, include_extras=True)
    for name in ("mriLabels", "histologyLabels"):
        assert slicer_rules.nodeTypesOf(hints[name]) == ("vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode")


def test_parameter_node_is_saved_with_the_scene(scene, tmp_path):
    """Saving the scene saves the panel (nodes by reference, values as text); reopening restores it."""
    wrapper = slicer_rules.loadParameterNodeClass(MODULE)
    parameters = slicer_rules.newParameterNode(scene, wrapper)
    mri = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MRI")
    labels = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Tumour")
    parameters.mriVolume, parameters.mriLabels = mri, labels
    parameters.spacingUnit, parameters.spacingI, parameters.model = "mm", 0.00325, "affine"
    sceneFile = tmp_path / "scene.mrml"
    scene.SetURL(str(sceneFile))
    assert scene.Commit()

    reopened = slicer.vtkMRMLScene()
    reopened.SetURL(str(sceneFile))
    assert reopened.Import()
    node = reopened.GetFirstNodeByClass("vtkMRMLScriptedModuleNode")
    restored = wrapper(node)
    assert restored.mriVolume.GetName() == "MRI" and restored.mriLabels.GetName() == "Tumour"
    assert (restored.spacingUnit, restored.spacingI, restored.model) == ("mm", 0.00325, "affine")


# ------------------------------------------------------------------------------------ spacing fields
def test_spacing_fields_hold_light_sheet_and_mri_voxels_in_either_unit():
    """A QDoubleSpinBox keeps `decimals` digits (Decimals sets them). 0.00325 mm at 4 decimals was 0.0033 (1.5 %)."""
    hints = typing.get_type_hints(slicer_rules.rawParameterNodeClass(MODULE), include_extras=True)
    for name in panel.SPACING_FIELDS:
        decimals = [a.value for a in typing.get_args(hints[name]) if isinstance(a, slicer_rules.Decimals)]
        assert decimals, f"{name} has no Decimals annotation"
        for spacingUm in (0.1, 0.65, 3.25, 5.0, 200.0, 300000.0 / 1000):
            for unit, value in (("um", spacingUm), ("mm", spacingUm / 1000)):
                shown = round(value, decimals[0])
                assert abs(shown - value) <= 1e-3 * value, f"{name}: {value} {unit} is shown as {shown}"


def test_switching_the_unit_converts_the_fields(parameters):
    follower = panel.SpacingUnitFollower(parameters)
    parameters.spacingI, parameters.spacingJ, parameters.spacingK = 3.25, 3.25, 5.0
    before = panel.spacingFieldsMm(parameters)
    assert not follower.follow(parameters)  # no unit change, no conversion
    parameters.spacingUnit = "mm"
    assert follower.follow(parameters)
    assert (parameters.spacingI, parameters.spacingK) == pytest.approx((0.00325, 0.005))
    assert panel.spacingFieldsMm(parameters) == pytest.approx(before, rel=1e-12)
    parameters.spacingUnit = "um"
    assert follower.follow(parameters) and parameters.spacingK == pytest.approx(5.0)


# ------------------------------------------------------------------------------------ which actions are possible
def test_every_action_state_names_a_widget_of_the_ui(parameters):
    from test_widget_contract import parseUi

    widgets = parseUi(REPO / "MRIHistoReg" / "Resources" / "UI" / "MRIHistoReg.ui")["widgets"]
    states = panel.actionStates(parameters, None)
    assert states and set(states) <= set(widgets), sorted(set(states) - set(widgets))


def test_after_loading_the_sample_the_stack_steps_are_ready(scene, parameters, sampleData, tmp_path):
    """Load sample data selects the nodes and inspects the stack: Downsample, Load full resolution and Use metadata
    spacing are usable and the physical size is shown at once (they stayed off until another field changed)."""
    folder = tmp_path / "sample"
    shutil.copytree(sampleData, folder)
    logic = MRIHistoRegLogicCore(scene)
    nodes = logic.loadSampleData(str(folder))
    before = panel.actionStates(parameters, None)
    assert not before["downsampleButton"]
    logic.selectSampleNodes(parameters, nodes)
    info = logic.openStack(nodes.stackPath, panel.spacingFieldsMm(parameters), referenceVolume=nodes.mri)
    states = panel.actionStates(parameters, info)
    for name in ("downsampleButton", "loadFullResolutionButton", "useMetadataSpacingButton", "fitButton",
                 "placePairButton", "applySpacingButton"):
        assert states[name], f"{name} is disabled after loading the sample"
    truthSize = [n * s for n, s in zip(info.shapeIjk, nodes.truth["histology"]["true_spacing_mm"])]
    assert panel.physicalSizeText(parameters, info) == (
        "Physical size at this spacing: " + " x ".join(f"{v:.3g}" for v in truthSize) + " mm")
    parameters.stackPath = type(parameters.stackPath)(str(folder / "histology.nrrd"))  # another stack: not inspected
    assert not panel.actionStates(parameters, info)["downsampleButton"]


# ------------------------------------------------------------------------------------ errors: one report, no escape
def test_a_failure_inside_nested_actions_is_reported_once():
    errors = []
    runner = panel.ActionRunner(showError=lambda message, details: errors.append((message, details)))
    with runner.action("Refit failed."):
        with runner.action("Include pair failed."):
            raise ValueError("pair P3 has no histology point: place it")
    assert len(errors) == 1 and errors[0][0] == "Refit failed.\n\npair P3 has no histology point: place it"
    assert "ValueError" in errors[0][1]  # the traceback goes into the details


def test_a_failure_in_a_vtk_observer_does_not_escape(scene):
    """An observer of a real MRML node whose action fails: Modified() returns normally, one report."""
    errors = []
    runner = panel.ActionRunner(showError=lambda message, details: errors.append(message))
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    after = []

    def onModified(caller, event):
        with runner.action("Auto-update failed."):
            raise RuntimeError("broken display")
        after.append(True)  # the observer goes on after a failed action

    node.AddObserver(vtk.vtkCommand.ModifiedEvent, onModified)
    node.Modified()
    assert errors == ["Auto-update failed.\n\nbroken display"] and after == [True]


def test_cancel_is_a_status_message_not_an_error():
    errors, status = [], []
    runner = panel.ActionRunner(showError=lambda m, d: errors.append(m), showStatus=status.append)
    with runner.action("Downsampling failed."):
        raise Cancelled("Downsampling cancelled")
    assert errors == [] and status == ["Downsampling cancelled"]


# ------------------------------------------------------------------------------------ VTK ownership
def test_collections_the_caller_owns_are_released(scene):
    """vtkMRMLScene::GetNodesByClass hands the caller a reference (vtkMRMLScene.h): in Python the collection
    holds 2 (the caller's and the wrapper's); nodesByClass leaves only the wrapper's, freed with the object."""
    for _ in range(3):
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    raw = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    assert raw.GetReferenceCount() == 2, "premise: the caller owns a reference"
    raw.UnRegister(None)
    collections = []
    original = scene.GetNodesByClass

    class SpyScene:
        def GetNodesByClass(self, name):
            collection = original(name)
            collections.append(collection)
            return collection

    nodes = context.nodesByClass(SpyScene(), "vtkMRMLSliceCompositeNode")
    assert len(nodes) == 3 and collections[0].GetReferenceCount() == 1
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    raw = volume.CreateDefaultStorageNode()
    assert raw.GetReferenceCount() == 2, "premise: CreateDefaultStorageNode hands the caller a reference"
    raw.UnRegister(None)
    storage = context.newStorageNode(volume)
    assert storage.GetReferenceCount() == 1


# ------------------------------------------------------------------------------------ place pair, real widget
def _placePairWithClicks(scene, defer, unplacedMriLabel=None):
    from markups_view import ThreeDView

    view = ThreeDView(scene)
    lists = []
    for name in ("MRI landmarks", "Histology landmarks"):
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.CreateDefaultDisplayNodes()
        lists.append(node)
    if unplacedMriLabel:  # a point in the list that is not placed yet: the widget fills it instead of adding one
        lists[0].AddControlPoint(1.0, 2.0, 3.0, "A")
        index = lists[0].AddControlPoint(0.0, 0.0, 0.0, unplacedMriLabel)
        lists[0].UnsetNthControlPointPosition(index)
        lists[0].AddControlPoint(4.0, 5.0, 6.0, "C")
    finished = []
    placement = panel.PairPlacement(scene, context.moduleLogic(scene, "Markups"), defer=defer,
                                    onFinished=lambda: finished.append(True))
    placement.start(lists[0], lists[1], "P7")
    return view, lists, placement, finished


def test_place_pair_takes_the_histology_click(scene):
    """Slicer's markups widget (run for real here) switches to view mode right after the MRI point's event;
    the histology placement, deferred to the event loop, still gets the second click."""
    queued = []
    view, (mri, histology), placement, finished = _placePairWithClicks(scene, defer=queued.append)
    view.click(200, 200)
    assert mri.GetNumberOfControlPoints() == 1 and mri.GetNthControlPointLabel(0) == "P7"
    for callback in queued:  # the event loop runs what was deferred
        callback()
    view.click(120, 150)
    assert histology.GetNumberOfControlPoints() == 1 and histology.GetNthControlPointLabel(0) == "P7"
    assert histology.GetNthControlPointPositionStatus(0) == histology.PositionDefined
    assert not placement.active and finished == [True]
    interaction = scene.GetFirstNodeByClass("vtkMRMLInteractionNode")
    assert interaction.GetCurrentInteractionMode() == interaction.ViewTransform


def test_place_pair_started_inside_the_event_loses_the_click(scene):
    """The rule the deferral is for: started from inside the event (no deferral), the widget's switch to view
    mode wins and the histology click places nothing."""
    view, (mri, histology), placement, finished = _placePairWithClicks(scene, defer=lambda callback: callback())
    view.click(200, 200)
    view.click(120, 150)
    assert mri.GetNumberOfControlPoints() == 1 and histology.GetNumberOfControlPoints() == 0


def test_place_pair_labels_the_point_the_widget_filled(scene):
    """With an unplaced point in the MRI list the widget fills that one, not the last: the event's index says so."""
    queued = []
    view, (mri, histology), placement, finished = _placePairWithClicks(scene, defer=queued.append,
                                                                       unplacedMriLabel="B")
    view.click(200, 200)
    labels = [mri.GetNthControlPointLabel(i) for i in range(mri.GetNumberOfControlPoints())]
    assert labels == ["A", "P7", "C"] and mri.GetNthControlPointPositionStatus(1) == mri.PositionDefined
