"""The geometry validation matrix (issue 15, item 5): the whole `run` pipeline, refinement ON with the default
preset, on small sample data sets whose geometry is one a user may bring (a 0.05 mm MRI, a stack coarser than the
MRI along z, an oblique MRI, a stack covering a small part of the MRI, an anisotropic MRI, a flipped MRI axis).

Each case asserts outcomes only, so they hold for any refinement engine:
- the run ends with a report and no traceback logged (a failure inside the registration must become a
  rejected refinement, not an exception);
- the held-out error (noise-free points from construction, exact ground truth) is not worse than the
  landmark-only fit's on the same points;
- the final mapping written to transform.h5, read back through VTK (an independent implementation), has a
  positive Jacobian determinant (central differences) at every MRI voxel the stack covers.

The grids are tiny (a few thousand to tens of thousands of covered MRI voxels) so the matrix stays cheap; the
larger matrix over seeds and landmark counts is bench/refine_matrix.py.
"""
import json
import logging

import numpy as np
import pytest

from MRIHistoRegLib import config as configLib, landmarks, pipeline, sampledata, workflow
from MRIHistoRegLib.sampledata import SampleGeometry, rotationMatrix

LPS = ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0))
OBLIQUE = tuple(map(tuple, rotationMatrix((0.2, 1.0, 0.4), 30.0) @ np.array(LPS)))
FLIPPED = ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0))  # i runs to the right: a left-handed IJK frame
SMALL_STACK = (2.4, 2.4, 1.8)  # mm of histology: holds the tumour and ~10 landmarks, a few mm3 in MRI space

# name -> (geometry, the property of the case that its truth.json must show)
CASES = {
    "mri_0.05mm": SampleGeometry(mriSpacingMm=(0.05, 0.05, 0.05), mriShapeIjk=(56, 56, 46), mriCentreRasMm="stack",
                                 stackSpacingUm=(30.0, 30.0, 40.0), stackExtentMm=(1.7, 1.7, 1.4), landmarkCount=10),
    "stack_coarser_z": SampleGeometry(mriShapeIjk=(44, 44, 36), mriCentreRasMm="stack",
                                      stackSpacingUm=(20.0, 20.0, 150.0), stackExtentMm=SMALL_STACK, landmarkCount=10),
    "oblique_mri": SampleGeometry(mriShapeIjk=(46, 46, 40), mriCentreRasMm="stack", mriDirection=OBLIQUE,
                                  stackSpacingUm=(30.0, 30.0, 40.0), stackExtentMm=SMALL_STACK, landmarkCount=10),
    "partial_coverage": SampleGeometry(mriSpacingMm=(0.15, 0.15, 0.15), mriShapeIjk=(68, 128, 56),
                                       stackSpacingUm=(30.0, 30.0, 40.0), stackExtentMm=(3.0, 3.0, 2.0),
                                       landmarkCount=10),
    "anisotropic_mri": SampleGeometry(mriSpacingMm=(0.08, 0.08, 0.2), mriShapeIjk=(56, 56, 18), mriCentreRasMm="stack",
                                      stackSpacingUm=(26.0, 26.0, 40.0), stackExtentMm=SMALL_STACK, landmarkCount=10),
    "flipped_mri_axis": SampleGeometry(mriShapeIjk=(44, 44, 36), mriCentreRasMm="stack", mriDirection=FLIPPED,
                                       stackSpacingUm=(40.0, 40.0, 25.0), stackExtentMm=SMALL_STACK, landmarkCount=10),
}

# Held-out median may exceed landmark-only by this much and still count as "not worse": the sub-voxel noise of a
# re-interpolated answer, far below the landmark noise (0.05 mm) and any real degradation.
NOT_WORSE_TOLERANCE_MM = 0.002


def _caseProperty(name, truth):
    """The defining property of each case, read from what the generator wrote (truth.json and the MRI header)."""
    mriSpacing = np.array(truth["mri"]["spacing_mm"])
    stackSpacing = np.array(truth["histology"]["true_spacing_mm"])
    direction = np.array(truth["mri"]["ijk_to_ras"])[:3, :3] / mriSpacing
    return {
        "mri_0.05mm": np.allclose(mriSpacing, 0.05),
        "stack_coarser_z": stackSpacing[2] > mriSpacing[2],
        "oblique_mri": np.abs(direction[np.abs(direction) > 1e-9]).min() < 0.99,
        "partial_coverage": truth["coverage"]["mri_fraction"] < 0.3 and truth["coverage"]["brain_fraction"] < 0.3,
        "anisotropic_mri": mriSpacing.max() / mriSpacing.min() > 2,
        "flipped_mri_axis": np.linalg.det(direction) < 0,
    }[name]


def _landmarkOnlyMedian(config, scene):
    """Held-out median TRE of the landmark fit alone on the same pairs and points (the baseline)."""
    pairs = landmarks.pairLandmarks(landmarks.loadMarkups(scene, config.landmarks["mri"], "MRI", role="fixed"),
                                    landmarks.loadMarkups(scene, config.landmarks["histology"], "histology",
                                                          role="moving"))
    fit = workflow.fitLandmarks(pairs, config.model, config.tpsRegularization)
    mriLabels, mriPoints = landmarks.readPoints(config.evaluatePoints["mri"])
    histologyLabels, histologyPoints = landmarks.readPoints(config.evaluatePoints["histology"])
    return workflow.evaluatePoints(mriLabels, mriPoints, histologyLabels, histologyPoints, fit.model)["tre_median_mm"]


def _coveredMriPoints(truth, maxPoints=20000):
    """RAS of MRI voxel centres (every n-th) whose exact histology point lies in the stack, 1 voxel inside."""
    shape = truth["mri"]["shape_ijk"]
    ijkToRas = np.array(truth["mri"]["ijk_to_ras"])
    step = max(1, int(np.ceil((np.prod(shape) / maxPoints) ** (1 / 3))))
    ijk = np.stack(np.meshgrid(*[np.arange(0, n, step) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    ras = ijk @ ijkToRas[:3, :3].T + ijkToRas[:3, 3]
    # cheap pre-selection through the linear part, then the exact inverse
    forward = sampledata.HistologyToMriMapping.fromParameters(truth["mapping"])
    spacing = np.array(truth["histology"]["true_spacing_mm"])
    shapeH = np.array(truth["histology"]["shape_ijk"])
    low, high = np.array([-(shapeH[0] - 1) * spacing[0], -(shapeH[1] - 1) * spacing[1], 0.0]), \
        np.array([0.0, 0.0, (shapeH[2] - 1) * spacing[2]])
    rough = (ras - forward.translation) @ np.linalg.inv(forward.linear).T
    ras = ras[np.all((rough > low - 1.0) & (rough < high + 1.0), axis=1)]
    histology = sampledata.groundTruthMriToHistology(truth, ras)
    return ras[np.all((histology > low + spacing) & (histology < high - spacing), axis=1)]


def _jacobianDeterminants(transformPath, points, scene, h):
    """det of the central-difference Jacobian of transform.h5's MRI -> histology map, through VTK."""
    import vtk

    from MRIHistoRegLib import transforms

    node = transforms.loadTransform(scene, str(transformPath))
    transform = node.GetTransformFromParent()
    offsets = np.vstack([np.eye(3) * h, -np.eye(3) * h])
    stencil = (points[:, None, :] + offsets[None]).reshape(-1, 3)
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p in stencil:
        source.InsertNextPoint(*p)
    transform.TransformPoints(source, target)
    mapped = np.array([target.GetPoint(n) for n in range(target.GetNumberOfPoints())]).reshape(len(points), 6, 3)
    jac = (mapped[:, :3] - mapped[:, 3:]).transpose(0, 2, 1) / (2 * h)  # [n, output, input]
    return np.linalg.det(jac)


@pytest.mark.bspline_refinement
@pytest.mark.parametrize("name", list(CASES))
def test_geometry_case_runs_refines_and_does_not_fold(name, tmp_path, caplog, scene):
    manifest = sampledata.generateSampleData(tmp_path / "sample", seed=0, geometry=CASES[name])
    truth = manifest["truth"]
    assert _caseProperty(name, truth), f"{name}: the generated geometry does not have the case's property"
    config = configLib.loadConfig(tmp_path / "sample" / "config.json")
    assert config.refine and config.refinePreset == configLib.DEFAULT_REFINE_PRESET

    with caplog.at_level(logging.WARNING):
        report = pipeline.runPipeline(config, tmp_path / "report")
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert not tracebacks, f"{name}: a traceback was logged: {tracebacks}"
    written = json.loads((tmp_path / "report" / "report.json").read_text())["refinement"]
    assert written is not None
    refinement = report["refinement"]
    # the MRI tumour label reaches the refinement: every accepted one searched it, or says why it could not
    focus = written["tumour_focus"]
    assert focus["reason"], focus
    if refinement["accepted"] and "coarsest spacing" not in focus["reason"]:
        assert len(focus["labels"]) == 1 and focus["labels"][0]["reason"], focus

    baseline = _landmarkOnlyMedian(config, scene)
    refined = report["evaluation"]["tre_median_mm"]
    assert refined <= baseline + NOT_WORSE_TOLERANCE_MM, (
        f"{name}: refinement made the held-out median worse: {baseline:.4f} -> {refined:.4f} mm "
        f"(accepted={refinement['accepted']}: {refinement['reason']})")

    points = _coveredMriPoints(truth)
    assert len(points) > 100, f"{name}: only {len(points)} covered MRI voxels sampled"
    h = 0.5 * min(truth["mri"]["spacing_mm"])
    det = _jacobianDeterminants(tmp_path / "report" / "transform.h5", points, scene, h)
    assert det.min() > 0, f"{name}: the final mapping folds at {np.count_nonzero(det <= 0)} of {len(det)} covered voxels"
