"""Self-test scenarios shared by pytest (Testing/test_scenarios.py, on slicer-core) and Slicer's module test
(MRIHistoRegTest: "Reload and Test", ctest), so both exercise the same calls on a real MRML scene.

Each scenario takes (scene, workFolder), stands alone (it loads or generates everything it needs), drives the
module's logic facade exactly as the panel does, and checks the result against the sample data's ground truth
(truth.json) or analytic facts with plain `assert` (AssertionError on failure). Tolerances are derived from the
sample's stated noise and voxel sizes, never from a previous run's output.

`SCENARIOS` lists them in workflow order; the module's test class calls exactly these.
"""
import os

import numpy as np

from . import volumes

SAMPLE_SIZE = "small"
SAMPLE_SEED = 0
_samples = {}  # sample folders generated in this process (reused: generating takes a few seconds)


def _logic(scene):
    from .logic import MRIHistoRegLogicCore

    return MRIHistoRegLogicCore(scene)


def _sampleFolder(workFolder) -> str:
    """A folder holding the generated sample: reused from an earlier scenario of this process when intact,
    else generated into workFolder/sample (so every scenario also runs on its own)."""
    previous = _samples.get((SAMPLE_SIZE, SAMPLE_SEED))
    if previous and os.path.isfile(os.path.join(previous, "truth.json")):
        return previous
    from . import sampledata

    folder = os.path.join(os.fspath(workFolder), "sample")
    sampledata.generateSampleData(folder, size=SAMPLE_SIZE, seed=SAMPLE_SEED)
    _samples[(SAMPLE_SIZE, SAMPLE_SEED)] = folder
    return folder


def _loadSample(scene, workFolder):
    return _logic(scene).loadSampleData(_sampleFolder(workFolder), size=SAMPLE_SIZE, seed=SAMPLE_SEED)


def _voxelVolumeMm3(node) -> float:
    return float(np.prod(volumes.spacingOf(volumes.ijkToRas(node))))


def loadSampleScenario(scene, workFolder) -> None:
    """Load the sample: geometry (IJK->RAS) and shapes as truth.json states them, the histology at its TRUE spacing
    with the header's voxels unchanged, both landmark lists paired by label, tumour volumes within voxelisation
    error of the analytic volumes."""
    nodes = _loadSample(scene, workFolder)
    truth = nodes.truth
    for role in ("mri", "histology", "mriLandmarks", "histologyLandmarks", "mriLabels", "histologyLabels"):
        node = getattr(nodes, role)
        assert node is not None and scene.IsNodePresent(node), f"{role} was not loaded into the scene"

    mri, histology = nodes.mri, nodes.histology
    np.testing.assert_allclose(volumes.ijkToRas(mri), truth["mri"]["ijk_to_ras"], atol=1e-9)
    assert list(volumes.arrayFromVolume(mri).shape) == truth["mri"]["array_shape_kji"]
    np.testing.assert_allclose(volumes.ijkToRas(histology), truth["histology"]["true_ijk_to_ras"], atol=1e-9)
    assert list(volumes.arrayFromVolume(histology).shape) == truth["histology"]["array_shape_kji"]
    np.testing.assert_allclose(volumes.spacingOf(volumes.ijkToRas(histology)), truth["histology"]["true_spacing_mm"], rtol=1e-12)
    assert volumes.arrayFromVolume(histology).dtype == np.dtype(truth["histology"]["dtype"])

    labels = truth["landmarks"]["labels"]
    for role in ("mriLandmarks", "histologyLandmarks"):
        node = getattr(nodes, role)
        names = [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())]
        assert names == labels, f"{role}: labels {names} differ from truth {labels}"
    # the landmarks sit within placement noise (4 SD) of their true positions, in each image's corrected space
    for role, key, sd in (("mriLandmarks", "mri_true_ras_mm", truth["landmarks"]["mri_noise_sd_mm"]),
                          ("histologyLandmarks", "histology_true_ras_mm", truth["landmarks"]["histology_noise_sd_mm"])):
        node = getattr(nodes, role)
        placed = np.array([node.GetNthControlPointPosition(i) for i in range(node.GetNumberOfControlPoints())])  # local = own space
        distance = np.linalg.norm(placed - np.array(truth["landmarks"][key]), axis=1)
        assert distance.max() < 4 * np.sqrt(3) * sd, f"{role}: a point lies {distance.max():.3f} mm from its true position"

    # tumour volumes: label voxels x voxel volume vs the analytic volumes (voxelisation error: one voxel shell)
    tumour = truth["tumour"]
    for role, analytic in (("mriLabels", tumour["mri_volume_mm3"]), ("histologyLabels", tumour["histology_volume_mm3"])):
        node = getattr(nodes, role)
        measured = np.count_nonzero(volumes.arrayFromVolume(node) == tumour["label_value"]) * _voxelVolumeMm3(node)
        semiAxes = np.array(tumour["semi_axes_mm"]) * (1.0 if role == "mriLabels" else truth["shrinkage"]["linear_scale"])
        spacing = volumes.spacingOf(volumes.ijkToRas(node))
        # a shell half a voxel thick around the ellipsoid bounds the voxelisation error
        shell = 4 * np.pi * np.mean(semiAxes) ** 2 * 0.5 * spacing.max()
        assert abs(measured - analytic) < shell, f"{role}: {measured:.4f} mm3 vs analytic {analytic:.4f} mm3 (bound {shell:.4f})"
    # the histology label map lies on the histology grid, at the same true spacing
    np.testing.assert_allclose(volumes.ijkToRas(nodes.histologyLabels), truth["histology"]["true_ijk_to_ras"], atol=1e-9)


def landmarkFitScenario(scene, workFolder) -> None:
    """Fit the sample's landmarks as the panel does: the fitted transform node carries held-out evaluation points
    (noise-free truth) to their histology positions within landmark-noise accuracy, the similarity fit recovers
    the true shrinkage, affine+TPS interpolates its pairs, and excluding a pair leaves it out of the fit."""
    from . import landmarks, transforms

    nodes = _loadSample(scene, workFolder)
    truth, folder = nodes.truth, nodes.folder
    logic = _logic(scene)
    mriEvalLabels, mriEval = landmarks.readPoints(os.path.join(folder, "eval_points_mri.csv"))
    histEvalLabels, histEval = landmarks.readPoints(os.path.join(folder, "eval_points_histology.csv"))
    assert mriEvalLabels == histEvalLabels

    noise = np.hypot(truth["landmarks"]["mri_noise_sd_mm"], truth["landmarks"]["histology_noise_sd_mm"])
    untransformed = np.median(np.linalg.norm(mriEval - histEval, axis=1))
    for model in ("similarity", "affine+tps"):
        result = logic.fitLandmarks(nodes.mriLandmarks, nodes.histologyLandmarks, model, referenceVolume=nodes.mri)
        transformNode = result.transformNode
        assert scene.IsNodePresent(transformNode) and scene.IsNodePresent(result.tableNode)
        assert result.evaluation["count"] == len(truth["landmarks"]["labels"])
        assert result.tableNode.GetNumberOfRows() == result.evaluation["count"]
        mapped = transforms.mappingFromTransformNode(transformNode).transformPoints(mriEval)
        tre = np.linalg.norm(mapped - histEval, axis=1)
        # 12 noisy pairs over a ~5 mm brain: held-out error a few times the placement noise, far below no-fit
        assert np.median(tre) < 4 * noise, f"{model}: median held-out error {np.median(tre):.3f} mm (noise {noise:.3f} mm)"
        assert np.median(tre) < 0.05 * untransformed
        # shrinkage: the fitted volume ratio vs truth (0.843^3); linear noise ~noise/baseline per axis
        assert abs(result.evaluation["shrinkage_volume_percent"] - truth["shrinkage"]["volume_shrinkage_percent"]) < 5.0
        if model == "affine+tps":
            assert result.evaluation["residual_max_mm"] < 1e-6, "an unregularised TPS interpolates its pairs"
            assert result.evaluation["loo_rms_mm"] > result.evaluation["residual_rms_mm"]
            assert result.evaluation["jacobian"]["folded_fraction"] == 0.0, "the sample's true warp does not fold"

    # excluding a pair (the panel's include checkbox) removes it from the fit and shows it as excluded
    excluded = truth["landmarks"]["labels"][0]
    logic.setPairIncluded(nodes.mriLandmarks, nodes.histologyLandmarks, excluded, False)
    result = logic.fitLandmarks(nodes.mriLandmarks, nodes.histologyLandmarks, "affine+tps")
    evaluation = result.evaluation
    assert evaluation["count"] == len(truth["landmarks"]["labels"]) - 1 and excluded not in evaluation["labels"]
    assert any(excluded in message for message in result.messages)


def fixSpacingScenario(scene, workFolder) -> None:
    """The stack's header claims 1 mm: inspecting it flags the spacing as implausible against the MRI; with the
    true spacing it is plausible; applying it to the loaded volume changes the geometry to the true one and
    leaves every voxel as it was."""
    from . import sampledata

    folder = _sampleFolder(workFolder)
    truth = sampledata.loadTruth(folder)
    logic = _logic(scene)
    mri = volumes.loadVolume(scene, os.path.join(folder, truth["mri"]["file"]), "MRI")
    trueSpacing = truth["histology"]["true_spacing_mm"]
    shapeIjk = truth["histology"]["shape_ijk"]
    for stackFile in truth["histology"]["files"]:
        info = logic.openStack(os.path.join(folder, stackFile), referenceVolume=mri)
        assert info.shapeIjk == shapeIjk
        # what the file claims (NRRD header, or the TIFF's ImageJ metadata: the seed's 1 mm mistake)
        np.testing.assert_allclose(info.spacingMm, truth["histology"]["header_spacing_mm"])
        # 270 px x 1 mm = 270 mm against a ~20 mm MRI: far outside any plausible brain
        assert not info.plausible, f"{stackFile}: 1 mm spacing judged plausible: {info.verdict}"
        fixed = logic.openStack(os.path.join(folder, stackFile), trueSpacing, referenceVolume=mri)
        assert fixed.plausible, f"{stackFile}: true spacing judged implausible: {fixed.verdict}"
        np.testing.assert_allclose(fixed.physicalSizeMm, np.multiply(shapeIjk, trueSpacing), rtol=1e-12)

    histology = volumes.loadVolume(scene, os.path.join(folder, "histology.nrrd"), "Histology")
    np.testing.assert_allclose(volumes.ijkToRas(histology), truth["histology"]["header_ijk_to_ras"], atol=1e-12)
    before = np.array(volumes.arrayFromVolume(histology))
    # the panel takes the spacing in um
    logic.applySpacing(histology, logic.spacingToMm([v * 1000.0 for v in trueSpacing], "um"))
    np.testing.assert_allclose(volumes.ijkToRas(histology), truth["histology"]["true_ijk_to_ras"], atol=1e-12)
    np.testing.assert_array_equal(volumes.arrayFromVolume(histology), before)


def downsampleScenario(scene, workFolder) -> None:
    """Downsampling the TIFF stack (true spacing given as in the panel) averages exactly the input voxels each output
    box covers, places each output voxel at its box's centre, and a cancelled run adds nothing to the scene."""
    from . import sampledata
    from .progress import Cancelled

    folder = _sampleFolder(workFolder)
    truth = sampledata.loadTruth(folder)
    logic = _logic(scene)
    stackPath = os.path.join(folder, "histology.tif")
    spacing = np.array(truth["histology"]["true_spacing_mm"])
    stack = volumes.arrayFromVolume(volumes.loadVolume(scene, os.path.join(folder, "histology.nrrd"), "Stack"))
    trueIjkToRas = np.array(truth["histology"]["true_ijk_to_ras"])

    # a target that is a whole multiple of every input spacing (26 um x 20, 40 um x 13): plain block means
    target = 0.52
    factors = np.rint(target / spacing).astype(int)
    assert np.allclose(factors * spacing, target)
    node = logic.downsampleStack(stackPath, target, list(spacing))
    output = volumes.arrayFromVolume(node)
    fi, fj, fk = factors
    full = [n // f for n, f in zip(stack.shape, (fk, fj, fi))]
    blocks = stack[:full[0] * fk, :full[1] * fj, :full[2] * fi].astype(np.float64)
    expected = blocks.reshape(full[0], fk, full[1], fj, full[2], fi).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(output[:full[0], :full[1], :full[2]], expected, rtol=1e-5, atol=1e-3)
    # output voxel (0,0,0) sits at the centre of input voxels [0, f) along each axis
    centreIjk = np.append((factors - 1) / 2.0, 1.0)
    np.testing.assert_allclose(volumes.ijkToRas(node)[:, 3], trueIjkToRas @ centreIjk, atol=1e-9)
    np.testing.assert_allclose(volumes.spacingOf(volumes.ijkToRas(node)), [target] * 3, rtol=1e-12)

    # the working resolution (0.1 mm, non-integer factors 3.85 and 2.5): whole boxes only, each the exact mean of
    # the (fractional) input cells it covers - checked on the first box of each axis by hand
    node = logic.downsampleStack(stackPath, 0.1, list(spacing))
    extent = np.array(truth["histology"]["shape_ijk"]) * spacing
    assert list(volumes.arrayFromVolume(node).shape[::-1]) == [int(np.floor(e / 0.1 + 1e-9)) for e in extent]
    weights = []
    for axis, f in enumerate(0.1 / spacing):  # overlap of input cells [n, n+1) with the box [0, f)
        cells = np.arange(int(np.ceil(f)))
        weights.append(np.clip(np.minimum(cells + 1, f) - cells, 0, None))
    wi, wj, wk = weights
    corner = stack[:len(wk), :len(wj), :len(wi)].astype(np.float64)
    firstBox = np.einsum("kji,k,j,i->", corner, wk, wj, wi) / (wk.sum() * wj.sum() * wi.sum())
    np.testing.assert_allclose(volumes.arrayFromVolume(node)[0, 0, 0], firstBox, rtol=1e-5)

    nodesBefore = scene.GetNumberOfNodes()

    def cancelHalfway(fraction, message=""):
        if fraction > 0.3:
            raise Cancelled("cancelled by the scenario")

    try:
        logic.downsampleStack(stackPath, 0.1, list(spacing), progress=cancelHalfway)
        raise AssertionError("cancelling did not stop the downsampling")
    except Cancelled:
        pass
    assert scene.GetNumberOfNodes() == nodesBefore, "a cancelled downsampling left nodes in the scene"


def _fittedSample(scene, workFolder, model="affine+tps"):
    nodes = _loadSample(scene, workFolder)
    result = _logic(scene).fitLandmarks(nodes.mriLandmarks, nodes.histologyLandmarks, model,
                                        referenceVolume=nodes.mri)
    return nodes, result.transformNode


def refineScenario(scene, workFolder) -> None:
    """Intensity refinement (preset 'affine') started from a landmark fit knocked 0.25 mm off: it is accepted and
    brings the held-out evaluation points (noise-free truth) well back towards their histology positions; the
    refined node keeps the chain (the displaced start sits under a parent transform)."""
    import vtk

    from . import landmarks, transforms

    nodes = _loadSample(scene, workFolder)
    truth, folder, logic = nodes.truth, nodes.folder, _logic(scene)
    _, mriEval = landmarks.readPoints(os.path.join(folder, "eval_points_mri.csv"))
    _, histEval = landmarks.readPoints(os.path.join(folder, "eval_points_histology.csv"))
    histology = logic.downsampleStack(nodes.stackPath, 0.1, truth["histology"]["true_spacing_mm"])
    fit = logic.fitLandmarks(nodes.mriLandmarks, nodes.histologyLandmarks, "affine")
    offset = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "offset")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 0.2)
    matrix.SetElement(1, 3, -0.15)
    offset.SetMatrixTransformToParent(matrix)
    fit.transformNode.SetAndObserveTransformNodeID(offset.GetID())

    def heldOutError(node):
        mapped = transforms.mappingFromWorldToNode(node).transformPoints(mriEval)
        return float(np.median(np.linalg.norm(mapped - histEval, axis=1)))

    start = heldOutError(fit.transformNode)
    assert start > 0.2, f"the displaced start should be ~0.25 mm off, is {start:.3f} mm"
    result = logic.refineRegistration(nodes.mri, histology, fit.transformNode, "affine")
    assert result.accepted, result.summary
    refined = heldOutError(result.transformNode)
    # at least halved (the placement noise of the landmarks, not the 0.25 mm offset, then dominates)
    assert refined < 0.5 * start, f"held-out error {start:.3f} -> {refined:.3f} mm: {result.summary}"
    assert result.transformNode.GetParentTransformNode() is None, "the refined chain is one hardened node"


def resampleScenario(scene, workFolder) -> None:
    """Resampling goes from the ORIGINAL stack through the transform node: a pure whole-voxel shift reproduces the
    stack's voxels exactly, and through the landmark fit onto the MRI grid the tumour (the brightest class in the
    light-sheet contrast) lands inside the MRI's tumour label."""
    import vtk

    nodes, transformNode = _fittedSample(scene, workFolder)
    truth, logic = nodes.truth, _logic(scene)
    spacing = truth["histology"]["true_spacing_mm"]
    stack = volumes.arrayFromVolume(nodes.histology)

    # 1. exact: reference = a block of the stack's own grid, mapping = shift by (3, 2, 1) voxels
    shiftIjk = np.array([3, 2, 1])
    trueIjkToRas = np.array(truth["histology"]["true_ijk_to_ras"])
    shiftRas = trueIjkToRas[:3, :3] @ shiftIjk
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    for axis in range(3):
        matrix.SetElement(axis, 3, float(shiftRas[axis]))
    shift.SetMatrixTransformFromParent(matrix)  # from parent: reference (MRI) point -> histology point
    block = (slice(10, 30), slice(100, 140), slice(120, 160))  # k, j, i
    referenceIjkToRas = trueIjkToRas.copy()
    referenceIjkToRas[:3, 3] = (trueIjkToRas @ np.array([block[2].start, block[1].start, block[0].start, 1.0]))[:3]
    reference = volumes.createVolumeNode(scene, np.zeros((20, 40, 40), np.float32), referenceIjkToRas, "block grid")
    resampled = logic.resampleHistology(shift, reference, stackPath=nodes.stackPath, spacingMm=spacing)
    expected = stack[block[0].start + shiftIjk[2]: block[0].stop + shiftIjk[2],
                     block[1].start + shiftIjk[1]: block[1].stop + shiftIjk[1],
                     block[2].start + shiftIjk[0]: block[2].stop + shiftIjk[0]]
    np.testing.assert_allclose(volumes.arrayFromVolume(resampled), expected, rtol=1e-5, atol=1e-2)

    # 2. realistic: the original stack onto the MRI grid through the landmark TPS
    output = logic.resampleHistology(transformNode, nodes.mri, stackPath=nodes.stackPath, spacingMm=spacing)
    np.testing.assert_allclose(volumes.ijkToRas(output), volumes.ijkToRas(nodes.mri), atol=1e-12)
    histologyOnMri = volumes.arrayFromVolume(output)
    assert histologyOnMri.shape == volumes.arrayFromVolume(nodes.mri).shape
    tumour = volumes.arrayFromVolume(nodes.mriLabels) == truth["tumour"]["label_value"]
    inside = histologyOnMri[tumour]
    covered = histologyOnMri > truth["histology"]["background_counts"] * 1.5  # tissue in the stack's field of view
    elsewhere = histologyOnMri[covered & ~tumour]
    assert inside.size and elsewhere.size
    assert np.median(inside) > np.percentile(elsewhere, 90), (
        f"tumour median {np.median(inside):.0f} not above the 90th percentile of other tissue {np.percentile(elsewhere, 90):.0f}")


def compareScenario(scene, workFolder) -> None:
    """Comparing the tumour labels through the landmark fit: the histology tumour's native volume is the analytic
    histology volume, its Jacobian-integrated volume in MRI space the analytic MRI volume (the fit undoes the
    shrinkage), overlap with the MRI label is high and the 95% surface distance a fraction of the tumour radius;
    a segmentation gives the same numbers as the label map."""
    nodes, transformNode = _fittedSample(scene, workFolder)
    truth, logic = nodes.truth, _logic(scene)
    tumour = truth["tumour"]
    result = logic.compareLabels(nodes.mriLabels, nodes.histologyLabels, transformNode)
    row = result.rows[tumour["label_value"]]
    assert result.tableNode.GetNumberOfRows() == len(result.rows)
    np.testing.assert_allclose(row["mri_mm3"], tumour["mri_label_volume_mm3"], rtol=1e-9)
    np.testing.assert_allclose(row["histology_native_mm3"], tumour["histology_label_volume_mm3"], rtol=1e-9)
    # registration error ~0.06 mm at a ~0.57 mm radius: ~10% in volume, Dice above 0.8
    assert abs(row["histology_in_mri_jacobian_mm3"] / tumour["mri_volume_mm3"] - 1) < 0.1, row
    assert row["dice"] > 0.8, row
    meanRadius = float(np.mean(tumour["semi_axes_mm"]))
    assert row["hd95_mm"] < 0.5 * meanRadius, row

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MRI tumour segmentation")
    from . import context

    segmentationLogic = context.moduleLogic(scene, "Segmentations")
    assert segmentationLogic.ImportLabelmapToSegmentationNode(nodes.mriLabels, segmentation)
    fromSegmentation = logic.compareLabels(segmentation, nodes.histologyLabels, transformNode, mriVolume=nodes.mri)
    rowSegmentation = fromSegmentation.rows[tumour["label_value"]]
    np.testing.assert_allclose(rowSegmentation["mri_mm3"], row["mri_mm3"], rtol=1e-9)
    np.testing.assert_allclose(rowSegmentation["dice"], row["dice"], rtol=1e-9)  # the same voxels on the MRI grid


def panelScenario(scene, workFolder, newParameterNode=None) -> None:
    """The panel's parameter node, made by `newParameterNode(scene)` (Slicer: the module logic's getParameterNode(),
    i.e. Slicer's parameterNodeWrapper around the module's own class): creating it writes every default; after
    'Load sample data' (nodes selected, stack inspected) the stack steps are usable at once, the node parameters
    hold the loaded nodes, and switching the spacing unit keeps the spacing."""
    from . import panel

    if newParameterNode is None:
        raise ValueError("panelScenario needs newParameterNode(scene): the panel's parameter node factory")
    parameters = newParameterNode(scene)
    assert parameters.mriLabels is None and parameters.histologyLabels is None, "node parameters default to None"
    assert panel.pathOrNone(parameters.stackPath) is None and not panel.actionStates(parameters, None)["downsampleButton"]

    logic = _logic(scene)
    nodes = _loadSample(scene, workFolder)
    logic.selectSampleNodes(parameters, nodes)
    for role in ("mriLabels", "histologyLabels", "mriLandmarks", "histologyLandmarks"):
        assert getattr(parameters, role) is getattr(nodes, role), f"{role} is not the loaded node"
    info = logic.openStack(nodes.stackPath, panel.spacingFieldsMm(parameters), referenceVolume=nodes.mri)
    states = panel.actionStates(parameters, info)
    ready = ("downsampleButton", "loadFullResolutionButton", "useMetadataSpacingButton", "placePairButton", "fitButton")
    assert all(states[name] for name in ready), {name: states[name] for name in ready}
    assert panel.physicalSizeText(parameters, info), "the physical size is shown after loading"

    trueSpacing = nodes.truth["histology"]["true_spacing_mm"]
    np.testing.assert_allclose(panel.spacingFieldsMm(parameters), trueSpacing, rtol=1e-9)
    follower = panel.SpacingUnitFollower(parameters)
    for unit in ("mm", "um"):
        parameters.spacingUnit = unit
        follower.follow(parameters)
        np.testing.assert_allclose(panel.spacingFieldsMm(parameters), trueSpacing, rtol=1e-9, err_msg=unit)


SCENARIOS = (panelScenario, loadSampleScenario, fixSpacingScenario, downsampleScenario, landmarkFitScenario, refineScenario,
             resampleScenario, compareScenario)
