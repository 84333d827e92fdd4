"""The itk-elastix refinement engine (issue 15): its coordinate conventions (RAS vs ITK's LPS, the point-set files,
transformix's field), the composition M(x) = L(x + d(x)), failures inside elastix as rejected refinements, the
SimpleITK fallback when itk-elastix is absent, and (long, bspline_refinement) the issue's targets on the sample.

Ground truth by construction: a blob phantom shifted by a known amount; the sample's known mapping."""
import numpy as np
import pytest

from MRIHistoRegLib import elastix, landmarks, refine, settings, workflow
from MRIHistoRegLib.mapping import AffineMapping
from helpers import readElastixPoints

HAS_ELASTIX = elastix.available()[0]
needsElastix = pytest.mark.skipif(not HAS_ELASTIX, reason="itk-elastix is not installed in this Python (the "
                                  "oldest Slicer stack has none): the SimpleITK fallback is tested instead")
# issue 15 asks for a held-out TRE median 55 % below landmark-only with 12 landmarks and the tumour volume within
# 2 %; the engine reaches -57 to -71 % (seed 0: -57 %) and -3.6 to +6.0 % over seeds 0-4 (bench/refine.py,
# README): the test holds the TRE to the issue's bar and the volume to what seed 0 reaches (-3.5 %), so that a
# regression fails and the gap to the volume target stays visible.
ISSUE_TRE_REDUCTION, VOLUME_TOLERANCE = 0.55, 0.02  # the issue's targets (issue 15)
FAST = {"resolutions": 2, "gridSpacingSchedule": (2, 1), "pyramidSchedule": (2, 1), "iterations": 60,
        "samples": 2000, "controlPointSpacingMm": 1.5, "histologyBiasCorrection": False, "marginMm": 0.6,
        "minOverlapVoxels": 500}


def _blobs(shape=(36, 40, 44), seed=3):
    """Smooth random blobs [k, j, i] (structure at ~0.3 mm on a 0.1 mm grid): MI has something to lock on."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5)
    return (1000 * (noise - noise.min()) / np.ptp(noise) + 100).astype(np.float32)


def _grid(shape, spacing=0.1):
    """An oblique-free but flipped RAS grid (i -> -x, j -> -y as Slicer reads LPS files), centred near 0."""
    m = np.diag([-spacing, -spacing, spacing, 1.0])
    m[:3, 3] = [spacing * shape[2] / 2, spacing * shape[1] / 2, -spacing * shape[0] / 2]
    return m


def _fit(model, fixed=None, moving=None):
    if fixed is None:
        return workflow.LandmarkFit(model, "affine", {}, None)
    pairs = landmarks.LandmarkPairs([f"P{i}" for i in range(len(fixed))], np.asarray(fixed), np.asarray(moving))
    return workflow.LandmarkFit(model, "affine", {}, pairs)


def test_mattes_off_the_grid_peaks_at_the_true_alignment():
    """Two noisy copies of one phantom on one grid: the truth is d = 0. Sampled off the grid (mattesValue's virtual
    grid) the metric is best there and worsens with the shift; at the grid's voxel centres it is NOT - linear
    interpolation's blur makes every sub-voxel shift look better than d = 0 (the cusp bench/tumour_focus.py
    --off-grid avoids), so the on-grid evaluation is the broken copy this test tells apart."""
    base = _blobs()
    rng = np.random.default_rng(1)
    noisy = [base + rng.normal(0, 60, base.shape).astype(np.float32) for _ in range(2)]
    mask = np.zeros(base.shape, np.uint8)
    mask[4:-4, 4:-4, 4:-4] = 1
    images = elastix.WorkingImages(noisy[0], noisy[1], mask, _grid(base.shape), None)

    def metric(shiftMm, ratio):
        d = np.zeros(base.shape + (3,))
        d[..., 0] = shiftMm
        return elastix.mattesValue(images, d, 32, ratio)

    offGrid = [metric(t, 0.7321) for t in (-0.01, -0.005, 0.0, 0.005, 0.01)]
    assert offGrid[2] < min(offGrid[1], offGrid[3]) and max(offGrid[1], offGrid[3]) < min(offGrid[0], offGrid[4])
    onGrid = [metric(t, None) for t in (-0.005, 0.0, 0.005)]
    assert onGrid[1] > max(onGrid[0], onGrid[2])


def test_point_set_files_are_lps_millimetres(tmp_path):
    ras = np.array([[1.5, -2.25, 3.0], [-0.1, 0.2, -0.3]])
    path = tmp_path / "points.txt"
    elastix.writePointSet(path, ras)
    _, written = readElastixPoints(path)  # an independent reader of the elastix format
    assert np.allclose(written, ras * [-1, -1, 1], atol=1e-6)


def test_the_working_grid_covers_the_footprint_at_the_requested_spacing():
    """A stack coarser than the working spacing along z, smaller than the MRI: the working grid is the MRI's
    directions at the requested spacing over the part L maps into the stack (plus the margin), never refused."""
    mriShape, mriM = (60, 80, 100), _grid((60, 80, 100), 0.05)
    histShape, histM = (10, 40, 40), _grid((10, 40, 40), 0.1)
    histM[2, 2] = 0.3  # 0.3 mm along z: coarser than the 0.1 mm working grid
    histM[2, 3] = -1.5
    box = elastix.footprintBox(mriShape, mriM, histShape, histM, AffineMapping(np.eye(4)), 0.2)
    shape, m = elastix.workingGrid(mriShape, mriM, 0.1, box)
    assert np.allclose(np.linalg.norm(m[:3, :3], axis=0), 0.1)
    corners = refine._gridPoints(shape, m)
    histCorners = refine._gridPoints(histShape, histM)
    for axis in range(3):  # the histology's extent (+ margin) lies within the working grid, clipped to the MRI
        mriPoints = refine._gridPoints(mriShape, mriM)
        lo = max(histCorners[:, axis].min() - 0.2, mriPoints[:, axis].min())
        hi = min(histCorners[:, axis].max() + 0.2, mriPoints[:, axis].max())
        assert corners[:, axis].min() <= lo + 0.1 and corners[:, axis].max() >= hi - 0.1


def test_the_mri_shading_is_flattened_before_registration():
    """The MRI seen through a known receive-coil shading (a 20 % linear ramp across the field of view, as a surface
    coil gives), the histology without it, L = identity: the working MRI divided by the corrected one is the ramp
    (up to N4's constant), so the correction found the construction's shading; switched off, the working MRI is
    the MRI as sampled, shading included."""
    tissue = _blobs(shape=(40, 48, 56))
    m = _grid(tissue.shape)
    points = refine._gridPoints(tissue.shape, m)
    x = points[:, 0].reshape(tissue.shape)
    shading = 1.0 + 0.2 * (x - x.min()) / np.ptp(x)
    mri, histology = workflow.Image(tissue * shading, m), workflow.Image(tissue, m)
    base = dict(elastix.elastixSettings(), marginMm=0.0, histologyBiasCorrection=False)
    plain = elastix.prepareImages(mri, histology, AffineMapping(np.eye(4)), 0.1, dict(base, mriBiasCorrection=False))
    corrected = elastix.prepareImages(mri, histology, AffineMapping(np.eye(4)), 0.1, base)
    assert np.array_equal(plain.ijkToRas, corrected.ijkToRas)  # one working grid: compare voxel by voxel
    inside = corrected.mask > 0
    onGrid = refine._gridPoints(corrected.fixed.shape, corrected.ijkToRas)
    ratio = plain.fixed[inside] / corrected.fixed[inside]
    truth = elastix._sample(shading, m, onGrid).reshape(corrected.fixed.shape)[inside]
    assert np.corrcoef(ratio, truth)[0, 1] > 0.95
    # the ramp itself within 2 % (uncorrected, ratio / truth would vary as the 20 % ramp: ~5 % SD)
    assert np.std(ratio / truth) / np.mean(ratio / truth) < 0.02
    # switched off, the fixed image keeps the shading: its ratio to the tissue is the ramp itself
    tissueOnGrid = elastix._sample(tissue, m, onGrid).reshape(plain.fixed.shape)
    assert np.allclose(plain.fixed[inside] / tissueOnGrid[inside], truth, rtol=1e-3)


@needsElastix
def test_a_known_shift_is_recovered_in_ras():
    """Histology = MRI content moved by t (RAS) and L = identity: the truth is M(x) = x + t, so elastix must find
    d = t inside the footprint - a sign error anywhere in RAS/LPS (images, field) would give -t or a mirrored
    component. The landmark pairs (consistent with t) are in the cost too."""
    from scipy import ndimage

    fixed = _blobs()
    m = _grid(fixed.shape)
    shift = np.array([0.15, -0.1, 0.08])  # mm, RAS
    shiftIjk = np.linalg.solve(m[:3, :3], shift)  # moving(y) = fixed(y - t): same content displaced by +t
    moving = ndimage.shift(fixed, shiftIjk[::-1], order=3, mode="nearest").astype(np.float32)
    pts = refine._gridPoints(fixed.shape, m)[::4001][:8]
    mri = workflow.Image(fixed, m)
    histology = workflow.Image(moving, m)
    result = workflow.refine(mri, histology, _fit(AffineMapping(np.eye(4)), pts, pts + shift),
                             settings=dict(FAST, engine="elastix", controlPointSpacingMm=2.0), workingSpacingMm=0.1)
    assert result.accepted, result.reason
    assert result.summary["engine"] == "elastix"
    centre = refine._gridPoints(fixed.shape, m).mean(axis=0, keepdims=True)
    probe = centre + np.array([[0, 0, 0], [0.5, 0.3, -0.3], [-0.4, -0.5, 0.2]])
    found = result.mapping.transformPoints(probe) - probe
    assert np.allclose(found, shift, atol=0.03), found


@needsElastix
def test_the_composition_is_landmark_after_refinement():
    """M(x) = L(x + d(x)): with L a pure translation u and the same shifted pair as above, M(x) = x + t + u,
    i.e. the refinement found t in MRI space and L was applied after it (the reverse order would be identical for
    translations, so L here also scales: M(x) = S (x + t) + u)."""
    from scipy import ndimage

    fixed = _blobs(seed=5)
    m = _grid(fixed.shape)
    shift = np.array([0.1, 0.12, -0.06])
    shiftIjk = np.linalg.solve(m[:3, :3], shift)
    inMri = ndimage.shift(fixed, shiftIjk[::-1], order=3, mode="nearest").astype(np.float32)
    scale, u = 1.25, np.array([3.0, -1.0, 2.0])
    L = np.eye(4)
    L[:3, :3] *= scale
    L[:3, 3] = u
    histM = L @ m  # the histology grid is the MRI grid carried by L: the stack's content = inMri seen through L
    result = workflow.refine(workflow.Image(fixed, m), workflow.Image(inMri, histM), _fit(AffineMapping(L)),
                             settings=dict(FAST, engine="elastix", controlPointSpacingMm=2.0), workingSpacingMm=0.1)
    assert result.accepted, result.reason
    probe = refine._gridPoints(fixed.shape, m).mean(axis=0, keepdims=True)
    assert np.allclose(result.mapping.transformPoints(probe), scale * (probe + shift) + u, atol=0.04 * scale)


@needsElastix
def test_an_invalid_parameter_reaching_elastix_is_a_rejected_refinement():
    fixed = _blobs()
    m = _grid(fixed.shape)
    fit = _fit(AffineMapping(np.eye(4)))
    result = workflow.refine(workflow.Image(fixed, m), workflow.Image(fixed, m), fit,
                             settings=dict(FAST, engine="elastix", parameterOverrides={"Transform": "NoSuchTransform"}),
                             workingSpacingMm=0.1)
    assert not result.accepted
    assert "elastix failed" in result.reason
    assert result.mapping is fit.model  # the landmark-only mapping is delivered
    assert result.summary["engine"] == "elastix" and result.summary["accepted"] is False


@needsElastix
def test_a_constant_stack_and_no_overlap_are_rejected_refinements():
    fixed = _blobs()
    m = _grid(fixed.shape)
    fit = _fit(AffineMapping(np.eye(4)))
    constant = workflow.Image(np.full(fixed.shape, 7.0, np.float32), m)
    result = workflow.refine(workflow.Image(fixed, m), constant, fit, settings=dict(FAST, engine="elastix"),
                             workingSpacingMm=0.1)
    assert not result.accepted and "constant" in result.reason, result.reason
    far = np.eye(4)
    far[:3, 3] = 100.0  # L maps the MRI 100 mm away from the stack
    result = workflow.refine(workflow.Image(fixed, m), workflow.Image(fixed, m), _fit(AffineMapping(far)),
                             settings=dict(FAST, engine="elastix"), workingSpacingMm=0.1)
    assert not result.accepted and "overlap" in result.reason, result.reason


def test_the_default_preset_names_an_engine_that_runs_here():
    """With itk-elastix the default preset runs elastix; without it (the oldest stack) it falls back to the
    SimpleITK engine and says why - the report carries the reason."""
    chosen = settings.refineSettings()
    assert chosen["engine"] == "elastix"
    engine, checked, fallback = workflow._engineSettings(chosen)
    if HAS_ELASTIX:
        assert engine == "elastix" and fallback is None
    else:
        assert engine == "simpleitk" and "itk-elastix" in fallback
        assert set(checked) == set(refine.DEFAULT_SETTINGS)


def test_invalid_elastix_settings_are_the_users_to_fix():
    from MRIHistoRegLib.errors import UserInputError

    with pytest.raises(UserInputError, match="resolution"):
        elastix.elastixSettings({"resolutions": 2})  # schedules still have 3 entries
    with pytest.raises(UserInputError, match="Unknown elastix"):
        elastix.elastixSettings({"bsplineIterations": 3})
    with pytest.raises(UserInputError, match="mriBiasFieldSpacingMm"):  # N4's knot count would divide by it
        elastix.elastixSettings({"mriBiasFieldSpacingMm": 0})


def test_a_stated_landmark_uncertainty_scales_the_landmark_term():
    base = elastix.elastixSettings()
    sloppy = elastix.elastixSettings({"landmarkSdMm": 2 * base["landmarkReferenceSdMm"]})
    assert elastix.pointsWeight(sloppy) == pytest.approx(elastix.pointsWeight(base) / 2)
    assert elastix.parameterMap(sloppy)["Metric2Weight"] == [str(elastix.pointsWeight(sloppy))]


@needsElastix
@pytest.mark.bspline_refinement
def test_the_default_refinement_meets_the_targets_on_the_sample(sampleData):
    """The default preset through workflow.refine on the seed-0 sample, 12 landmarks, against the construction's
    truth (30 noise-free held-out pairs, the tumour's analytic volume in MRI space): held-out TRE median in MRI
    space at least ISSUE_TRE_REDUCTION below landmark-only, tumour
    volume (Jacobian-integrated) within VOLUME_TOLERANCE of the truth, no fold.
    Figures for five seeds and 6 landmarks: bench/refine.py and README."""
    from MRIHistoRegLib import compare, context, sampledata, stacks, volumes

    truth = sampledata.loadTruth(sampleData)
    scene = context.createScene()
    node = volumes.loadVolume(scene, str(sampleData / "mri.nrrd"))
    mri = workflow.Image(volumes.arrayFromVolume(node).astype(np.float32), volumes.ijkToRas(node))
    source = stacks.openStack(str(sampleData / "histology.tif"), truth["histology"]["true_spacing_mm"])
    read = lambda name: landmarks.readPoints(str(sampleData / name))  # noqa: E731
    labels, lmMri = read("landmarks_mri.csv")
    lmHist, evalMri, evalHist = (read(n)[1] for n in ("landmarks_histology.csv", "eval_points_mri.csv",
                                                       "eval_points_histology.csv"))
    fit = workflow.fitLandmarks(landmarks.LandmarkPairs(labels, lmMri, lmHist), "affine+tps")
    mriLabels = workflow.Image(volumes.arrayFromVolume(volumes.loadVolume(scene, str(sampleData / "mri_tumour_label.nrrd"),
                                                                          labelmap=True)), mri.ijkToRas)
    refinement = workflow.refine(mri, source, fit, settings=settings.refineSettings(), workingSpacingMm=0.1,
                                 tumourLabels=mriLabels)
    assert refinement.accepted, refinement.reason
    assert refinement.summary["engine"] == "elastix" and refinement.summary["min_jacobian_determinant"] > 0
    assert refinement.summary["tumour_focus"]["applied"], refinement.summary["tumour_focus"]

    def tre(mapping):
        return np.median(np.linalg.norm(compare.InverseMapping(mapping).transformPoints(evalHist) - evalMri, axis=1))

    before, after = tre(fit.model), tre(refinement.mapping)
    assert after < (1 - ISSUE_TRE_REDUCTION) * before, (before, after)
    histLabels = workflow.Image(volumes.arrayFromVolume(volumes.loadVolume(
        scene, str(sampleData / "histology_tumour_label.nrrd"), labelmap=True)), np.array(truth["histology"]["true_ijk_to_ras"]))
    rows, _ = workflow.compareLabels(mriLabels, histLabels, refinement.mapping)
    assert rows[1]["histology_in_mri_jacobian_mm3"] == pytest.approx(truth["tumour"]["mri_volume_mm3"], rel=VOLUME_TOLERANCE)


def test_the_landmark_weight_follows_the_pairs_density_over_the_footprint():
    """Twice the pairs per mm3 of footprint, twice the landmark term's weight (the image term is a mean over its
    samples, the landmark term a mean over the pairs); the reference density leaves the weight as set."""
    import numpy as np

    settings = elastix.elastixSettings()
    reference = settings["landmarkDensityReference"]
    assert elastix.pointsWeight(settings, reference) == pytest.approx(settings["pointsWeight"])
    assert elastix.pointsWeight(settings, 2 * reference) == pytest.approx(2 * settings["pointsWeight"])
    assert elastix.parameterMap(settings, density=3 * reference)["Metric2Weight"] == [
        str(elastix.pointsWeight(settings, 3 * reference))]
    # the density is pairs over the fixed mask's volume on the working grid (0.2 mm voxels: 0.008 mm3 each)
    images = elastix.WorkingImages(None, None, np.ones((10, 10, 10), np.uint8), np.diag([0.2, 0.2, 0.2, 1.0]), None)
    assert elastix.landmarkDensity(images, np.zeros((4, 3))) == pytest.approx(4 / 8.0)
    assert elastix.landmarkDensity(images, None) is None


def test_the_optional_affine_map_has_no_bending_term_and_one_weight_per_metric():
    values = elastix.affineMap(elastix.elastixSettings({"affineStage": True}))
    assert values["Transform"] == ["AffineTransform"]
    assert "TransformBendingEnergyPenalty" not in values["Metric"]
    assert sorted(k for k in values if k.startswith("Metric") and k.endswith("Weight")) == [
        f"Metric{i}Weight" for i in range(len(values["Metric"]))]


def test_the_affine_map_runs_when_the_landmark_fit_rests_on_few_pairs():
    auto = elastix.elastixSettings()
    assert elastix.useAffineStage(auto, elastix.AFFINE_BELOW_PAIRS - 1)
    assert not elastix.useAffineStage(auto, elastix.AFFINE_BELOW_PAIRS)
    assert elastix.useAffineStage(elastix.elastixSettings({"affineStage": True}), 50)
