"""Intensity refinement (refine.py): ground truth by construction (known warps), real MRML transform chains.

Synthetic volumes are small smooth phantoms so the suite stays fast; the real-tissue test warps brainreg's
downsampled two-photon volume with a known smooth field and checks the warp is recovered (< 1 voxel)."""
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from MRIHistoRegLib import refine
from MRIHistoRegLib.mapping import AffineMapping
from MRIHistoRegLib.progress import Cancelled

FAST = {"bsplineIterations": 20, "maxSamples": 4000, "affineIterations": 60}


def _phantom(shape=(40, 48, 44), seed=0):
    """Smooth blobs inside an ellipsoidal body, [k, j, i] float32."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=float)
    centre = (np.array(shape) - 1) / 2
    body = (((grid - centre[:, None, None, None]) / (0.42 * np.array(shape))[:, None, None, None]) ** 2).sum(0) < 1
    image = 100.0 * body
    for _ in range(14):
        c = centre + rng.uniform(-0.3, 0.3, 3) * np.array(shape)
        sigma = rng.uniform(2.0, 4.5)
        image += rng.uniform(-80, 120) * np.exp(-((grid - c[:, None, None, None]) ** 2).sum(0) / (2 * sigma**2))
    texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), 1.0)  # tissue-like fine texture
    image += 40.0 * texture / texture.std()
    return (image * body + 5.0).astype(np.float32)


def _geometry(spacing=0.1, origin=(3.0, -2.0, 1.0)):
    """The TIFF-like geometry of docs/ARCHITECTURE.md section 3: LPS axes along i, j, k, i.e. RAS = (-i s, -j s, k s) + origin."""
    m = np.diag([-spacing, -spacing, spacing, 1.0])
    m[:3, 3] = origin
    return m


def _warp(image, ijkToRas, movingToFixed, shape=None, ijkToRasOut=None, order=1):
    """moving(y) = image(movingToFixed(y)) sampled on the output grid (default: the same grid)."""
    shape = image.shape if shape is None else shape
    ijkToRasOut = ijkToRas if ijkToRasOut is None else ijkToRasOut
    points = refine._gridPoints(shape, ijkToRasOut)
    source = movingToFixed(points)
    toIjk = np.linalg.inv(ijkToRas)
    ijk = source @ toIjk[:3, :3].T + toIjk[:3, 3]
    values = ndimage.map_coordinates(image, [ijk[:, 2], ijk[:, 1], ijk[:, 0]], order=order, mode="constant", cval=0.0)
    return values.reshape(shape).astype(np.float32)


def _rotationAffine(degrees, axis, translation, centre):
    angle = math.radians(degrees)
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.eye(3)
    a, b = [x for x in range(3) if x != axis]
    rotation[a, a], rotation[a, b], rotation[b, a], rotation[b, b] = c, -s, s, c
    m = np.eye(4)
    m[:3, :3] = rotation
    m[:3, 3] = centre - rotation @ centre + np.asarray(translation)
    return m


def _centre(shape, ijkToRas):
    return (ijkToRas @ np.r_[(np.array(shape[::-1]) - 1) / 2, 1.0])[:3]


# ------------------------------------------------------------------------------------------------------------


def test_landmarkStartIsKeptAndMultiModalRefinementStaysPut():
    """The initial mapping is the moving initial transform (not dropped): started at the truth (a large affine),
    the refinement stays there; with contrast inverted (multi-modal) and partial coverage."""
    big = _phantom((60, 68, 64))  # anatomy beyond the MRI field of view, as in a real scan
    mBig = _geometry()
    fixed = np.ascontiguousarray(big[10:50, 10:58, 10:54])
    m = mBig.copy()
    m[:3, 3] = (mBig @ np.array([10.0, 10.0, 10.0, 1.0]))[:3]
    truth = _rotationAffine(8.0, 2, (1.2, -0.8, 0.5), _centre(fixed.shape, m))
    mm = mBig.copy()  # the histology grid: the moved anatomy, padded with zeros where it is not imaged
    mm[:3, 3] = truth[:3, 3] + truth[:3, :3] @ mBig[:3, 3]
    moving = _warp(big, mBig, AffineMapping(np.linalg.inv(truth)).transformPoints, big.shape, mm, order=3)
    moving = np.where(moving > 0, 300.0 - moving, 0.0).astype(np.float32)  # other contrast
    moving[:, :, :22] = 0.0  # partial coverage: one side not imaged
    result = refine.refineRegistration(fixed, m, moving, mm, AffineMapping(truth), settings=FAST)
    points = refine._gridPoints(fixed.shape, m)[fixed.ravel() > 50][::7]
    error = np.linalg.norm(result.transformPoints(points) - AffineMapping(truth).transformPoints(points), axis=1)
    # a dropped initial transform would leave errors of ~1.5 mm (the landmark affine's own displacement)
    assert error.mean() < 0.03, error.mean()
    # started at the optimum, the refinement is kept (not rejected) and the metric stays where it was: measured
    # -1.5472 -> -1.5405 (+0.4 %, "similarity unchanged within tolerance"); the rejection threshold is 5 %
    assert result.accepted, result.reason
    assert abs(result.metricAfter - result.metricBefore) < 0.01 * abs(result.metricBefore), result.reason
    # this phantom's anatomy is smooth blobs, which N4 takes for shading: the correction would halve the mutual
    # information at the start (measured -1.547 -> -0.766, then a diverging affine stage), so it is not used
    assert not result.biasCorrected


def test_recoversAffineAndSmoothWarpFromPerturbedStart():
    """Start off the truth (perturbed affine); truth = smooth warp; the composite recovers it below one voxel."""
    fixed = _phantom(seed=1)
    m = _geometry()
    centre = _centre(fixed.shape, m)

    def v(points):  # moving -> fixed offset: a smooth bump of 0.25 mm
        w = np.exp(-((points - centre) ** 2).sum(1) / (2 * 1.2**2))
        return w[:, None] * np.array([0.2, -0.15, 0.12])

    moving = _warp(fixed, m, lambda y: y + v(y), order=3)

    def truth(p):  # fixed -> moving: y with y + v(y) = p
        y = p.copy()
        for _ in range(40):
            y = p - v(y)
        return y

    start = AffineMapping(_rotationAffine(2.0, 0, (0.15, 0.1, -0.1), centre))
    result = refine.refineRegistration(fixed, m, moving, m, start, settings=FAST)
    assert result.accepted, result.reason
    points = refine._gridPoints(fixed.shape, m)[fixed.ravel() > 50][::5]
    before = np.linalg.norm(start.transformPoints(points) - truth(points), axis=1).mean()
    after = np.linalg.norm(result.transformPoints(points) - truth(points), axis=1).mean()
    assert before > 0.15
    assert after < 0.05, (before, after)
    assert result.minJacobianDeterminant > 0.5


def test_realTissueKnownWarpRecovered(sharedData):
    """brainreg's downsampled two-photon brain (100 um) against a copy deformed by a known smooth warp, from a
    perturbed start: mean displacement error in the brain below one voxel (0.1 mm)."""
    tifffile = pytest.importorskip("tifffile")
    path = sharedData / "brainreg" / "registration_output" / "downsampled.tiff"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    fixed = tifffile.imread(str(path)).astype(np.float32)
    assert fixed.shape == (135, 77, 108)
    m = _geometry(0.1, (0.0, 0.0, 0.0))
    centre = _centre(fixed.shape, m)
    bumps = [(centre + (1.0, 0.8, -2.0), (0.25, -0.15, 0.2), 2.0), (centre + (-1.5, -0.5, 2.5), (-0.2, 0.2, 0.1), 2.5),
             (centre + (0.5, 1.5, -4.0), (0.1, 0.2, -0.25), 1.8)]

    def v(points):
        out = np.zeros_like(points)
        for c, amplitude, sigma in bumps:
            out += np.exp(-((points - c) ** 2).sum(1) / (2 * sigma**2))[:, None] * np.array(amplitude)
        return out

    def truth(p):
        y = p.copy()
        for _ in range(40):
            y = p - v(y)
        return y

    moving = _warp(fixed, m, lambda y: y + v(y), order=3)
    start = AffineMapping(_rotationAffine(1.0, 1, (0.1, -0.08, 0.06), centre))
    # measured (mean error after, refineRegistration wall time): these settings, 2.0 mm control spacing and 3000
    # dense samples (every few voxels), 0.021 mm, 8 s (the bumps' sigmas are 1.8-2.5 mm); with 3000 random
    # samples, before dense sampling became the rule, 0.017 mm
    settings = {"controlPointSpacingMm": 2.0, "maxSamples": 3000, "bsplineIterations": 30}
    result = refine.refineRegistration(fixed, m, moving, m, start, settings=settings)
    assert result.accepted, result.reason
    brain = fixed.ravel() > 300  # autofluorescent tissue vs dark background
    points = refine._gridPoints(fixed.shape, m)[brain][::7]
    before = np.linalg.norm(start.transformPoints(points) - truth(points), axis=1)
    after = np.linalg.norm(result.transformPoints(points) - truth(points), axis=1)
    print(f"real tissue: mean error {before.mean():.3f} -> {after.mean():.3f} mm, p95 {np.percentile(after, 95):.3f}, "
          f"{result.seconds:.1f} s")
    assert before.mean() > 0.1
    assert after.mean() < 0.1 and after.mean() < 0.5 * before.mean()


def test_transformNodeChainMatchesResult(scene):
    """Refinement grid node = parent of the landmark node; MRML's GetTransformBetweenNodes(world -> landmark
    node frame) reproduces result.transformPoints, inside and outside the grid."""
    import slicer
    import vtk

    from MRIHistoRegLib.volumes import numpyToMatrix

    shape = (9, 11, 10)
    m = _geometry(0.3, (1.0, 2.0, -1.0))
    m[:3, :3] = _rotationAffine(20.0, 2, (0, 0, 0), np.zeros(3))[:3, :3] @ m[:3, :3]  # oblique grid
    points = refine._gridPoints(shape, m)
    displacement = np.stack([0.2 * np.sin(points[:, 1]), 0.1 * points[:, 0], 0.05 * points[:, 2] ** 2], 1)
    landmark = _rotationAffine(10.0, 0, (0.5, -1.0, 2.0), np.zeros(3))
    result = refine.RefinementResult(AffineMapping(landmark), displacement.reshape(shape + (3,)), m, accepted=True)

    refinementNode = refine.refinementTransformNode(scene, result, "refine")
    assert refinementNode.IsA("vtkMRMLGridTransformNode")
    landmarkNode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "landmarks")
    landmarkNode.SetMatrixTransformFromParent(numpyToMatrix(landmark))
    landmarkNode.SetAndObserveTransformNodeID(refinementNode.GetID())
    worldToHistology = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, landmarkNode, worldToHistology)

    rng = np.random.default_rng(3)
    lo, hi = points.min(0) - 1.0, points.max(0) + 1.0  # includes points outside the grid (clamped)
    probes = rng.uniform(lo, hi, (200, 3))
    mrml = np.array([worldToHistology.TransformPoint(*p) for p in probes])
    assert np.abs(mrml - result.transformPoints(probes)).max() < 1e-6
    # the refinement really is in the chain
    assert np.abs(mrml - AffineMapping(landmark).transformPoints(probes)).max() > 0.05


def test_composedTransformNodeOrder(scene):
    """composedTransformNode = landmark(refinement(x)) as one node, also after a save/load round trip (.h5).
    Documents why it exists: hardening an identity node under landmark-under-refinement gives the reverse order."""
    from MRIHistoRegLib import transforms
    from MRIHistoRegLib.volumes import numpyToMatrix

    shape = (9, 11, 10)
    m = _geometry(0.3, (1.0, 2.0, -1.0))
    points = refine._gridPoints(shape, m)
    displacement = np.stack([0.2 * np.sin(points[:, 1]), 0.1 * points[:, 0], 0.05 * points[:, 2] ** 2], 1)
    landmark = _rotationAffine(10.0, 2, (0.5, -0.3, 0.2), np.zeros(3))
    result = refine.RefinementResult(AffineMapping(landmark), displacement.reshape(shape + (3,)), m, accepted=True)
    refinementNode = refine.refinementTransformNode(scene, result, "refine")
    landmarkNode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "landmarks")
    landmarkNode.SetMatrixTransformFromParent(numpyToMatrix(landmark))
    probes = points[::7] + 0.05
    expected = result.transformPoints(probes)
    composed = refine.composedTransformNode(scene, refinementNode, landmarkNode)
    assert np.abs(transforms.mappingFromTransformNode(composed).transformPoints(probes) - expected).max() < 1e-6
    reloaded = transforms.loadTransform(scene, transforms.saveTransform(composed, str(Path(tempfile.mkdtemp()) / "c.h5")))
    assert np.abs(transforms.mappingFromTransformNode(reloaded).transformPoints(probes) - expected).max() < 5e-3

    hardened = scene.AddNewNodeByClass("vtkMRMLTransformNode", "hardened")
    landmarkNode.SetAndObserveTransformNodeID(refinementNode.GetID())
    hardened.SetAndObserveTransformNodeID(landmarkNode.GetID())
    assert np.abs(transforms.mappingFromWorldToNode(hardened).transformPoints(probes) - expected).max() < 1e-6
    hardened.HardenTransform()
    error = np.abs(transforms.mappingFromTransformNode(hardened).transformPoints(probes) - expected).max()
    if error < 1e-6:
        pytest.fail("HardenTransform now keeps the order: composedTransformNode's workaround can go")
    swapped = result.refinement.transformPoints(AffineMapping(landmark).transformPoints(probes))
    assert np.abs(transforms.mappingFromTransformNode(hardened).transformPoints(probes) - swapped).max() < 1e-6


def test_guardRailsKeepLandmarkOnlyResult():
    fixed = _phantom()
    m = _geometry()
    moving = fixed.copy()
    identity = AffineMapping(np.eye(4))
    with pytest.raises(ValueError, match="resample the mask"):
        refine.refineRegistration(fixed, m, moving, m, identity, fixedMask=np.ones((5, 5, 5)))
    with pytest.raises(ValueError, match="different grid"):
        refine.refineRegistration(fixed, m, moving, m, identity, movingMask=(np.ones(fixed.shape), m + 1.0))
    with pytest.raises(ValueError, match="valid names"):
        refine.refineRegistration(fixed, m, moving, m, identity, settings={"controlPointSpacing": 1})

    far = AffineMapping(np.array([[1, 0, 0, 50.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    result = refine.refineRegistration(fixed, m, moving, m, far, settings=FAST)
    assert not result.accepted and "empty overlap" in result.reason
    probes = refine._gridPoints(fixed.shape, m)[::97]
    assert np.array_equal(result.transformPoints(probes), far.transformPoints(probes))  # landmark-only kept

    broken = moving.copy()
    broken[10:30, 10:30, 10:30] = np.nan
    result = refine.refineRegistration(fixed, m, broken, m, identity, settings=FAST)
    assert not result.accepted and "not a number" in result.reason
    assert np.array_equal(result.transformPoints(probes), probes)


def test_landmarkResidualGuard():
    fixed = _phantom()
    m = _geometry()
    shift = AffineMapping(np.array([[1, 0, 0, 0.3], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]))
    moving = _warp(fixed, m, shift.inverse().transformPoints, order=3)
    result = refine.refineRegistration(fixed, m, moving, m, AffineMapping(np.eye(4)), settings=FAST)
    assert result.accepted, result.reason
    landmarks = refine._gridPoints(fixed.shape, m)[fixed.ravel() > 80][::401][:12]
    good = refine.evaluateAgainstLandmarks(result, landmarks, shift.transformPoints(landmarks))
    assert good["medianBefore"] > 0.25 and good["medianAfter"] < 0.05 and result.accepted
    # landmarks that say "no shift" (the refinement contradicts them by 0.3 mm > 0.2 mm tolerance): rejected
    bad = refine.evaluateAgainstLandmarks(result, landmarks, landmarks)
    assert bad["medianAfter"] > 0.25
    assert not result.accepted and "landmark agreement worsened" in result.reason
    # every step refineRegistration ran is timed; the steps add up to (at most) the total
    assert {"prepare", "affine", "bspline", "field", "guard_rails", "total"} <= set(result.timings)
    assert result.timings["total"] == result.seconds
    assert sum(v for k, v in result.timings.items() if k != "total") <= result.seconds


def test_resultDescribesItselfWithTheSummaryKeys():
    """RefinementResult.toDict(): the keys and values the JSON summaries (report.json's refinement, refinement.json)
    carry, with the landmark residuals once evaluateAgainstLandmarks has measured them."""
    shape = (6, 7, 8)
    m = _geometry(0.3)
    shift = np.array([[1, 0, 0, 0.2], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    result = refine.RefinementResult(AffineMapping(shift), np.zeros(shape + (3,)), m, -0.5, -0.6, 7, 1.5,
                                     accepted=True, reason="test", settings=refine.refinementSettings())
    summary = result.toDict()
    assert list(summary) == ["accepted", "reason", "metric", "metric_before", "metric_after", "iterations", "seconds",
                             "min_jacobian_determinant", "overlap_fraction", "histology_bias_corrected", "settings",
                             "landmarks", "engine", "engine_fallback_reason", "engine_load_seconds",
                             "working_spacing_mm", "tumour_focus"]
    assert summary["engine"] == "simpleitk" and summary["engine_fallback_reason"] is None  # built here, not by elastix
    assert summary["accepted"] is True and summary["metric_after"] == -0.6 and summary["iterations"] == 7
    assert summary["landmarks"] is None and summary["settings"]["affineShrinkFactors"] == [2, 1]
    points = refine._gridPoints(shape, m)[::40]
    refine.evaluateAgainstLandmarks(result, points, points + [0.2, 0.0, 0.0])
    landmarks = result.toDict(labels=[f"L{i}" for i in range(len(points))])["landmarks"]
    assert landmarks["labels"][0] == "L0" and len(landmarks["residual_after_mm"]) == len(points)
    assert landmarks["median_after_mm"] < 1e-12 and landmarks["tolerance_mm"] == 0.2
    # the affine part starts inverse iterations: the landmark affine after the (here identity) affine stage
    assert np.array_equal(result.linearMatrix(), shift)


def test_jacobianDeterminantDetectsFolding():
    shape = (12, 14, 16)
    m = _geometry(0.2)
    points = refine._gridPoints(shape, m).reshape(shape + (3,))
    stretch = np.zeros(shape + (3,))
    stretch[..., 0] = 0.1 * points[..., 0]  # x -> 1.1 x
    assert np.allclose(refine.jacobianDeterminants(stretch, m), 1.1)
    fold = np.zeros(shape + (3,))
    fold[..., 2] = -2.0 * points[..., 2]  # z -> -z: orientation reversed
    assert refine.jacobianDeterminants(fold, m, subsample=2).max() < 0


def test_histologyFootprint():
    stack = np.full((20, 22, 24), 7.0, np.float32)
    stack[:, :, 15:] = 0.0  # not imaged (padding)
    stack[8:10, 8:10, 5:7] = 0.0  # a dark hole inside the tissue stays in
    mask = refine.histologyFootprint(stack, erosionVoxels=2)
    assert mask[:, :, 13:].sum() == 0  # padding + 2 eroded columns
    assert mask[2:-2, 2:-2, 2:13].all() and mask[9, 9, 6] == 1
    assert mask[:2].sum() == 0  # box borders eroded too (partial-volume voxels)
    full = refine.histologyFootprint(np.full((20, 22, 24), 3, np.uint16), erosionVoxels=1)
    assert full.sum() == 18 * 20 * 22


def test_biasFieldCorrectionRemovesAKnownShadingField():
    """Sharp-edged tissue classes times a known smooth field (depth attenuation exp(-z / 6 mm) and a lateral
    gradient, as in light-sheet stacks): after correctBiasField the image is the tissue image up to one constant
    factor. Ground truth by construction: log(corrected / tissue) is flat where the field was not."""
    shape = (30, 60, 64)
    rng = np.random.default_rng(3)
    k, j, i = np.indices(shape, dtype=float)
    tissue = np.full(shape, 400.0)
    for _ in range(25):  # cubes of other tissue classes: edges far sharper than the field
        lo = rng.integers(0, np.array(shape) - 8)
        size = rng.integers(4, 12, 3)
        tissue[lo[0]:lo[0] + size[0], lo[1]:lo[1] + size[1], lo[2]:lo[2] + size[2]] = rng.choice([250.0, 700.0, 1000.0])
    tissue[:, :, 50:] = 0.0  # not imaged: outside the footprint
    spacingMm = 0.1
    field = np.exp(-k * spacingMm / 6.0) * (1.0 + 0.25 * i / shape[2])
    observed = (tissue * field).astype(np.float32)
    footprint = refine.histologyFootprint(observed, 0)
    corrected = refine.correctBiasField(observed, footprint, spacingMm)
    inside = footprint > 0
    before = np.log(observed[inside] / tissue[inside])
    after = np.log(corrected[inside] / tissue[inside])
    assert before.std() > 0.1  # the field spans a factor ~1.6 over the stack
    assert after.std() < 0.25 * before.std(), (before.std(), after.std())


def test_denseSamplesKeepVoxelCentresAndTheBudget():
    """_denseSamples: every n-th voxel with n the smallest keeping the valid samples within the budget, at the
    original voxel centres (physical points checked with SimpleITK's own index -> point mapping)."""
    import SimpleITK as sitk

    m = _geometry(0.1)
    image = refine._sitkImage(np.arange(30 * 40 * 50, dtype=np.float32).reshape(30, 40, 50), m)
    maskArray = np.zeros((30, 40, 50), np.uint8)
    maskArray[5:25, 10:30, 10:40] = 1  # 12 000 valid voxels
    mask = refine._sitkImage(maskArray, m, np.uint8)
    assert refine._denseSamples(image, mask, 12_000)[0].GetSize() == image.GetSize()
    for budget in (11_999, 2_000, 400):
        fixed, fixedMask = refine._denseSamples(image, mask, budget)
        stride = round(fixed.GetSpacing()[0] / image.GetSpacing()[0])
        valid = int(sitk.GetArrayViewFromImage(fixedMask).sum())
        assert valid <= budget
        assert int(maskArray[::stride - 1, ::stride - 1, ::stride - 1].sum()) > budget  # no smaller stride fits
        index = (3, 2, 4)  # i, j, k on the strided grid = stride * index on the original
        assert np.allclose(fixed.TransformIndexToPhysicalPoint(index),
                           image.TransformIndexToPhysicalPoint(tuple(stride * v for v in index)))
        assert fixed[index] == image[tuple(stride * v for v in index)]


def test_progressAndCancel():
    fixed = _phantom()
    m = _geometry()
    moving = _warp(fixed, m, lambda y: y + np.array([0.1, 0.0, 0.0]), order=3)
    seen = []
    refine.refineRegistration(fixed, m, moving, m, AffineMapping(np.eye(4)), settings=FAST,
                              progress=lambda f, msg: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and len(seen) > 10
    assert all(b >= a - 1e-9 for a, b in zip(seen, seen[1:])), "progress goes backwards"
    calls = []
    with pytest.raises(Cancelled):
        refine.refineRegistration(fixed, m, moving, m, AffineMapping(np.eye(4)), settings=FAST,
                                  progress=lambda f, msg: calls.append(f) or len(calls) > 5)
    assert len(calls) == 6  # stopped at the first True


@pytest.fixture(scope="module")
def phantom(sampleData):
    """The generated sample (ground truth; the session's shared seed-0 small sample, read only) with its stack
    downsampled to the 0.1 mm working grid."""
    from MRIHistoRegLib import context, downsample, landmarks, sampledata, stacks, volumes

    folder = sampleData
    truth = sampledata.loadTruth(str(folder))
    scene = context.createScene()
    mriNode = volumes.loadVolume(scene, str(folder / "mri.nrrd"))
    source = stacks.openStack(str(folder / "histology.tif"), truth["histology"]["true_spacing_mm"])
    histology, histologyIjkToRas = downsample.downsampleStack(source, 0.1)
    data = {"folder": folder, "truth": truth,
            "mri": volumes.arrayFromVolume(mriNode).astype(np.float32), "mriIjkToRas": volumes.ijkToRas(mriNode),
            "histology": histology, "histologyIjkToRas": histologyIjkToRas}
    for role, name in (("lmMri", "landmarks_mri.csv"), ("lmHistology", "landmarks_histology.csv"),
                       ("evalMri", "eval_points_mri.csv"), ("evalHistology", "eval_points_histology.csv")):
        data[role] = landmarks.readPoints(str(folder / name))[1]
    data["mriLabels"] = volumes.arrayFromVolume(volumes.loadVolume(scene, str(folder / "mri_tumour_label.nrrd"), labelmap=True)).copy()
    labelNode = volumes.loadVolume(scene, str(folder / "histology_tumour_label.nrrd"), labelmap=True)
    data["histologyLabels"] = volumes.arrayFromVolume(labelNode).copy()
    data["histologyLabelsIjkToRas"] = np.array(truth["histology"]["true_ijk_to_ras"])  # the file claims 1 mm
    return data


def _tumourDice(data, mapping):
    """compareTumours' Dice (the same partial-volume transfer onto the MRI grid and compare.dice), without the
    volumes and HD95 it also computes."""
    from MRIHistoRegLib import compare

    transferred = compare.transferLabels(data["histologyLabels"], data["histologyLabelsIjkToRas"], mapping,
                                         data["mriLabels"].shape, data["mriIjkToRas"])
    return compare.dice(data["mriLabels"] == 1, transferred == 1)


@pytest.mark.bspline_refinement
def test_phantomRefinementAgainstGroundTruth(phantom):
    """Sample data (known truth), default settings: landmark-only affine+TPS vs refined, held-out TRE (30
    noise-free points) and tumour Dice, with the default 12 landmarks and with every other one (6). Issue 5's
    targets: >= 30 % lower TRE median with 12 landmarks, more with 6, and a better Dice; issue 7's: the tumour
    volume carried into MRI space (Jacobian-integrated) within 2 % of the truth with the default 12 landmarks.
    Measured (sample seed 0): 12 landmarks 0.0628 -> 0.0420 mm (-33 %), Dice 0.945 -> 0.979, volume +2.7 % ->
    -1.2 %; 6 landmarks 0.1464 -> 0.033-0.036 mm (-75 to -77 %: ITK's multi-threaded metric sums differ in the
    last bits from run to run and the longer 6-landmark optimisation amplifies that), Dice 0.894 -> 0.94; about
    40 s each on 2 cores. Seeds 1-4, 12 landmarks: TRE -55 / -55 / -54 / -61 %, volume +0.8 / -1.7 / -0.6 / +4.8 %
    (the volume scatters by a few % with the mesh's placement: see refine's module docstring)."""
    from MRIHistoRegLib import compare, fitting

    reduction = {}
    for count in (12, 6):
        chosen = np.arange(12) if count == 12 else np.arange(0, 12, 2)
        fixedPoints, movingPoints = phantom["lmMri"][chosen], phantom["lmHistology"][chosen]
        model = fitting.fitLandmarks(fixedPoints, movingPoints, "affine+tps")
        result = refine.refineRegistration(phantom["mri"], phantom["mriIjkToRas"], phantom["histology"],
                                           phantom["histologyIjkToRas"], model)
        residuals = refine.evaluateAgainstLandmarks(result, fixedPoints, movingPoints)
        assert result.accepted, result.reason
        assert result.biasCorrected  # the stack's depth attenuation and shading are corrected (see correctBiasField)
        assert result.metricAfter < result.metricBefore
        assert result.minJacobianDeterminant > 0
        assert residuals["medianAfter"] < 0.15  # refinement stays consistent with the landmarks (noise 0.05 mm)
        before = np.median(np.linalg.norm(model.transformPoints(phantom["evalMri"]) - phantom["evalHistology"], axis=1))
        after = np.median(np.linalg.norm(result.transformPoints(phantom["evalMri"]) - phantom["evalHistology"], axis=1))
        diceBefore, diceAfter = _tumourDice(phantom, model), _tumourDice(phantom, result)
        print(f"{count} landmarks: TRE median {before:.4f} -> {after:.4f} mm, Dice {diceBefore:.3f} -> {diceAfter:.3f}, "
              f"{result.seconds:.1f} s")
        assert after < 0.7 * before, (count, before, after)  # >= 30 % lower
        assert diceAfter > diceBefore, (count, diceBefore, diceAfter)
        reduction[count] = 1 - after / before
        if count == 12:
            volume = compare.jacobianIntegratedVolumeMm3(phantom["histologyLabels"], phantom["histologyLabelsIjkToRas"],
                                                         result, 1)
            assert volume == pytest.approx(phantom["truth"]["tumour"]["mri_volume_mm3"], rel=0.02)
    assert reduction[6] > reduction[12], reduction  # refinement matters more when the landmarks are fewer

def test_refineCommandWritesTransformsThatMapLikeTheResult(phantom, tmp_path, scene, monkeypatch):
    """`python -m MRIHistoRegLib refine ...` on the sample files: report.json's refinement and, accepted, the
    chained transform.h5, which (read back through MRML) maps held-out points like the in-memory refinement the
    command computed (captured here). --preset affine keeps it cheap (~1.5 s instead of ~40 s): the refinement is
    written as the same grid transform + landmark chain either way; the default B-spline refinement's accuracy
    is test_phantomRefinementAgainstGroundTruth's."""
    import json

    from MRIHistoRegLib import cli, transforms

    computed = []
    realRefine = refine.refineRegistration

    def capture(*args, **kwargs):
        computed.append(realRefine(*args, **kwargs))
        return computed[-1]

    monkeypatch.setattr(refine, "refineRegistration", capture)
    folder, out = phantom["folder"], tmp_path / "refine"
    spacingUm = [str(v) for v in phantom["truth"]["histology"]["true_spacing_um"]]
    code = cli.main(["refine", "--mri", str(folder / "mri.nrrd"), "--histology", str(folder / "histology.tif"),
                     "--spacing-um", *spacingUm, "--fixed-points", str(folder / "landmarks_mri.csv"),
                     "--moving-points", str(folder / "landmarks_histology.csv"), "--out", str(out), "--preset", "affine",
                     "--mri-labels", str(folder / "mri_tumour_label.nrrd")])
    assert code == 0 and len(computed) == 1
    result = computed[0]
    assert result.settings["bspline"] is False and result.accepted, result.reason
    report = json.loads((out / "report.json").read_text())
    summary = report["refinement"]
    # the MRI labels reach the refinement (whose SimpleITK engine has no focus, and says so); alone they start no
    # label comparison
    assert "elastix engine only" in summary["tumour_focus"]["reason"]
    assert not report.get("labels")
    assert summary["accepted"] and summary["metric_after"] < summary["metric_before"]
    assert summary["metric_after"] == pytest.approx(result.metricAfter, rel=1e-12)
    assert len(summary["landmarks"]["labels"]) == 12 and summary["landmarks"]["median_after_mm"] < 0.15
    assert {"transform.h5", "refinement_transform.h5", "report.json", "report.csv"} <= {p.name for p in out.iterdir()}
    assert not (out / "histology_on_mri.nrrd").exists()  # refine stops before the resampling
    evalMri = phantom["evalMri"]
    node = transforms.loadTransform(scene, str(out / "transform.h5"))
    mapped = transforms.mappingFromTransformNode(node).transformPoints(evalMri)
    # the written chain maps like the in-memory refined result (measured 2e-8 mm) and is not the landmark-only
    # mapping (0.068 mm away: the refinement is in it); the refinement grid file alone is result.refinement
    assert np.abs(mapped - result.transformPoints(evalMri)).max() < 1e-5
    assert np.abs(mapped - result.initialMapping.transformPoints(evalMri)).max() > 0.02
    grid = transforms.loadTransform(scene, str(out / "refinement_transform.h5"))
    assert np.abs(transforms.mappingFromTransformNode(grid).transformPoints(evalMri)
                  - result.refinement.transformPoints(evalMri)).max() < 1e-5
    tre = np.median(np.linalg.norm(mapped - phantom["evalHistology"], axis=1))
    assert tre < 0.1, tre  # the written chain is the refined registration (landmark-only: 0.063 mm)
