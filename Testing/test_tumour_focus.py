"""The tumour focus (tumourfocus.py, issue 15's volume target): its local squared correlation against SimpleITK's
ANTS neighbourhood correlation (an independent implementation) and its exact gradient against finite
differences, on a phantom whose one tissue has inverted contrast between the images; then the stage itself on
the sample: from the TRUE mapping followed by a known scaling of the tumour region it must take most of that
error out, and every way it can fail leaves the refinement as it was, with the reason."""
import numpy as np
import pytest

from MRIHistoRegLib import tumourfocus
from MRIHistoRegLib.geometry import gridPoints

SPACING_MM = 0.1
SHAPE = (40, 44, 48)  # [k, j, i]
CENTRE = np.array([0.15, -0.1, 0.05])


def _matrix():
    m = np.diag([-SPACING_MM, -SPACING_MM, SPACING_MM, 1.0])  # an RAS grid with flipped i and j, as the MRI's
    m[:3, 3] = [SHAPE[2] / 2 * SPACING_MM, SHAPE[1] / 2 * SPACING_MM, -SHAPE[0] / 2 * SPACING_MM]
    return m


def _anatomy(points, contrast):
    """Intensity at RAS points of a tumour (ellipsoid, ~1.2 mm) inside a tissue with two bands around it; the
    bands' contrast differs between the images (`contrast`: their intensities), edges blurred as by a PSF of
    SD 0.05 mm."""
    from scipy.special import erfc

    def occupancy(distance):
        return 0.5 * erfc(distance / (0.05 * np.sqrt(2.0)))

    offsets = points - CENTRE
    tumour = np.linalg.norm(offsets / [0.65, 0.55, 0.5], axis=1)
    band = np.linalg.norm(offsets / [1.3, 1.1, 1.0], axis=1)
    plane = offsets @ np.array([0.6, 0.64, 0.48])
    tumourOcc = occupancy((tumour - 1.0) * 0.55)
    bandOcc = occupancy((band - 1.0) * 1.1) * (1 - tumourOcc)
    sideOcc = occupancy(-plane - 0.2) * (1 - tumourOcc - bandOcc)
    rest = 1 - tumourOcc - bandOcc - sideOcc
    return contrast[0] * tumourOcc + contrast[1] * bandOcc + contrast[2] * sideOcc + contrast[3] * rest


def _images():
    """(fixed, moving, mask of the tumour grown by 0.5 mm, ijkToRas): the band's contrast inverted between the
    two noisy images (darker than the rest in one, brighter in the other)."""
    matrix = _matrix()
    points = gridPoints(SHAPE, matrix)
    rng = np.random.default_rng(0)
    fixed = _anatomy(points, (1.0, 0.6, 0.3, 0.45)) + rng.normal(0, 0.02, len(points))
    moving = _anatomy(points, (0.8, 0.2, 0.9, 0.5)) + rng.normal(0, 0.02, len(points))
    radius = np.linalg.norm((points - CENTRE) / [0.65, 0.55, 0.5], axis=1)
    mask = (radius - 1.0) * 0.55 <= 0.5
    return fixed.reshape(SHAPE), moving.reshape(SHAPE), mask.reshape(SHAPE), matrix


def test_local_correlation_equals_simpleitk_ants_neighbourhood_correlation():
    import SimpleITK as sitk

    from MRIHistoRegLib.volumes import sitkImageFromArray

    fixed, moving, _, matrix = _images()
    mask = np.zeros(SHAPE, bool)
    mask[8:-8, 8:-8, 8:-8] = True  # windows inside the arrays: ITK's edge handling does not enter
    ours, _ = tumourfocus.localCorrelation(fixed, moving, mask.astype(float), radius=2, withGradient=False)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsANTSNeighborhoodCorrelation(2)
    method.SetMetricFixedMask(sitkImageFromArray(mask.astype(np.uint8), matrix, dtype=np.uint8))
    method.SetInitialTransform(sitk.TranslationTransform(3))
    theirs = method.MetricEvaluate(sitkImageFromArray(fixed, matrix, dtype=np.float32),
                                   sitkImageFromArray(moving, matrix, dtype=np.float32))
    assert ours == pytest.approx(theirs, rel=2e-3)


def test_local_correlation_gradient_matches_finite_differences():
    fixed, moving, mask, _ = _images()
    weights = mask.astype(float)
    _, gradient = tumourfocus.localCorrelation(fixed, moving, weights)
    rng = np.random.default_rng(1)
    chosen = [tuple(rng.integers(4, n - 4) for n in SHAPE) for _ in range(6)] + [tuple(np.argwhere(mask)[0])]
    step = 1e-6
    for index in chosen:
        bumped = moving.copy()
        bumped[index] += step
        numeric = (tumourfocus.localCorrelation(fixed, bumped, weights, withGradient=False)[0]
                   - tumourfocus.localCorrelation(fixed, moving, weights, withGradient=False)[0]) / step
        assert gradient[index] == pytest.approx(numeric, rel=1e-3, abs=1e-9)


# --- the stage: a known error put in by construction, and every way it can fail --------------------------------

TRUE_STRAIN = np.array([[0.03, 0.005, 0.0], [0.005, -0.02, 0.0], [0.0, 0.0, 0.01]])
TRUE_SHIFT_MM = np.array([0.02, -0.01, 0.015])


def _trueFocus(points):
    found = tumourfocus.FocusResult(TRUE_STRAIN, TRUE_SHIFT_MM, 0.0, 0, False)
    return tumourfocus.focusField(found, points, CENTRE, 1.0)


def _histologyGrid(spacingMm=0.067, degrees=20.0):
    """A grid of its own for the histology (finer, rotated about two axes, off the MRI's lattice), over the MRI's
    field of view: on one shared grid the two images' interpolation errors agree at d = 0 only, which holds any
    search near its start (tumourfocus.py) - the product never registers on one, nor may its test."""
    a = np.radians(degrees)
    rotation = (np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
                @ np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]]))
    count = int(np.ceil(4.6 / spacingMm))
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * spacingMm
    matrix[:3, 3] = CENTRE - matrix[:3, :3] @ np.full(3, (count - 1) / 2) + 0.013
    return (count, count, count), matrix


def _stage(error=True):
    """(mri, histology, tumour labels, start) with the histology rendered through a known strain + shift of the
    tumour region (the Gaussian field of sigma 1 mm about CENTRE): histology(y) = anatomy(y - d(y)), so the
    mapping MRI -> histology is x + d(x) to first order. The histology is a count image on its own grid; `start`
    is an identity refinement on the MRI's grid (the refined mapping to correct)."""
    from MRIHistoRegLib import refine, workflow
    from MRIHistoRegLib.mapping import AffineMapping

    matrix = _matrix()
    points = gridPoints(SHAPE, matrix)
    rng = np.random.default_rng(2)
    fixed = _anatomy(points, (1.0, 0.6, 0.3, 0.45)) + rng.normal(0, 0.02, len(points))
    histologyShape, histologyMatrix = _histologyGrid()
    at = gridPoints(histologyShape, histologyMatrix)
    counts = 400 * _anatomy(at - _trueFocus(at) if error else at, (0.8, 0.2, 0.9, 0.5))
    tumour = np.linalg.norm((points - CENTRE) / [0.65, 0.55, 0.5], axis=1) <= 1.0
    start = refine.RefinementResult(AffineMapping(np.eye(4)), np.zeros(SHAPE + (3,)), matrix, accepted=True)
    return (workflow.Image(fixed.reshape(SHAPE), matrix),
            workflow.Image(counts.reshape(histologyShape), histologyMatrix),
            workflow.Image(tumour.reshape(SHAPE).astype(np.uint8), matrix), start)


def _settings(**changes):
    from MRIHistoRegLib import elastix

    return elastix.elastixSettings(changes)


def _surfaceAndTruth():
    """400 points spread over the tumour's surface in the MRI, and where the construction maps them."""
    k = np.arange(400) + 0.5
    polar, azimuth = np.arccos(1 - 2 * k / 400), np.pi * (1 + 5 ** 0.5) * k
    surface = CENTRE + np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar),
                                 np.cos(polar)], 1) * [0.65, 0.55, 0.5]
    return surface, surface + _trueFocus(surface)


def test_the_focus_recovers_a_known_strain_and_shift_of_the_tumour_region():
    """Ground truth by construction: the field the histology was rendered through. The error the focus takes out
    is measured where the volume is decided - on the tumour's surface - against the error it started with."""
    mri, histology, labels, start = _stage()
    section = tumourfocus.focusOnTumours(start, mri, histology, labels, SPACING_MM, _settings())
    assert section["applied"], section
    row = section["labels"][0]
    # what decides the volume: the strain's trace (det(I + E) - 1 at the centre)
    trueChange = 100 * (np.linalg.det(np.eye(3) + TRUE_STRAIN) - 1)
    assert row["volume_change_at_centre_percent"] == pytest.approx(trueChange, abs=1.0), row
    assert np.allclose(np.array(row["shift_um"]) / 1000, TRUE_SHIFT_MM, atol=0.004), row
    surface, truth = _surfaceAndTruth()
    before = np.linalg.norm(surface - truth, axis=1).mean()
    after = np.linalg.norm(start.transformPoints(surface) - truth, axis=1).mean()
    assert after < 0.2 * before, (before, after)


def test_without_an_error_the_focus_leaves_the_mapping_nearly_as_it_is():
    mri, histology, labels, start = _stage(error=False)
    row = tumourfocus.focusOnTumours(start, mri, histology, labels, SPACING_MM, _settings())["labels"][0]
    assert "strain_percent" in row, row  # it searched
    assert abs(row["volume_change_at_centre_percent"]) < 0.6, row
    surface = CENTRE + np.eye(3) * [0.65, 0.55, 0.5]
    assert np.abs(start.transformPoints(surface) - surface).max() < 0.004


def _unchangedWithReason(start, section, words):
    assert not section["applied"], section
    reasons = [section.get("reason", "")] + [row.get("reason", "") for row in section["labels"]]
    assert any(words in reason for reason in reasons), reasons
    assert not np.any(start.displacement), "a focus that was not applied must leave the field as it was"


def test_empty_labels_leave_the_refinement_with_the_reason():
    mri, histology, labels, start = _stage()
    labels.array[:] = 0
    _unchangedWithReason(start, tumourfocus.focusOnTumours(start, mri, histology, labels, SPACING_MM, _settings()),
                         "empty")


def test_an_mri_with_thick_slices_is_not_focused():
    mri, histology, labels, start = _stage()
    mri.ijkToRas = mri.ijkToRas.copy()
    mri.ijkToRas[:3, 2] *= 2.5  # 0.25 mm along k
    _unchangedWithReason(start, tumourfocus.focusOnTumours(start, mri, histology, labels, SPACING_MM, _settings()),
                         "coarsest spacing (0.25 mm)")


@pytest.mark.parametrize("side", [-1, 1])
def test_a_tumour_at_the_refined_regions_edge_is_not_focused(side):
    """A refinement field whose grid ends 0.05 mm beyond the tumour's centre (its lower or its upper faces): the
    field cannot carry a correction there."""
    from MRIHistoRegLib import refine
    from MRIHistoRegLib.mapping import AffineMapping

    mri, histology, labels, _ = _stage()
    matrix = np.diag([SPACING_MM] * 3 + [1.0])
    # an 11^3 field grid starting 0.05 mm below the centre (side -1) or ending 0.05 mm above it (side +1)
    matrix[:3, 3] = CENTRE - (0.05 if side < 0 else 0.95)
    start = refine.RefinementResult(AffineMapping(np.eye(4)), np.zeros((11, 11, 11, 3)), matrix, accepted=True)
    _unchangedWithReason(start, tumourfocus.focusOnTumours(start, mri, histology, labels, SPACING_MM, _settings()),
                         "edge")


def _imagedUpTo(histology, planeMm):
    """The stack imaged only up to a plane planeMm along +x past the tumour's centre (filled with 0 beyond)."""
    points = gridPoints(histology.array.shape, histology.ijkToRas)
    histology.array[((points - CENTRE)[:, 0] > planeMm).reshape(histology.array.shape)] = 0


@pytest.mark.parametrize("planeMm", [0.3, 0.5])
def test_a_tumour_the_stack_cut_is_not_focused(planeMm):
    """The footprint's edge through the tumour (x semi-axis 0.65 mm): part of its boundary unseen."""
    mri, histology, labels, start = _stage()
    _imagedUpTo(histology, planeMm)
    _unchangedWithReason(start, tumourfocus.focusOnTumours(start, mri, histology, labels, SPACING_MM, _settings()),
                         "cut by the stack's edge")


def test_a_tumour_whose_surroundings_the_stack_cut_is_focused_without_harm():
    """The footprint's edge through the tumour's grown region only (the stack's slabs of the geometry matrix): the
    surface error must still come mostly out, and the volume must not end up much further off than it started -
    with one side of the surroundings unseen the strain is less well measured (README, "Tumour focus")."""
    mri, histology, labels, start = _stage()
    _imagedUpTo(histology, 0.9)
    section = tumourfocus.focusOnTumours(start, mri, histology, labels, SPACING_MM, _settings())
    assert section["applied"], section
    row = section["labels"][0]
    assert tumourfocus.MIN_COVERED_FRACTION * 100 <= row["region_imaged_percent"] < 99, row
    trueChange = 100 * (np.linalg.det(np.eye(3) + TRUE_STRAIN) - 1)
    assert abs(row["volume_change_at_centre_percent"] - trueChange) < 1.2 * abs(trueChange), row
    surface, truth = _surfaceAndTruth()
    before = np.linalg.norm(surface - truth, axis=1).mean()
    after = np.linalg.norm(start.transformPoints(surface) - truth, axis=1).mean()
    assert after < 0.35 * before, (before, after)


def test_too_little_of_the_surroundings_imaged_is_not_focused(monkeypatch):
    """The footprint's edge 0.2 mm past the centre leaves under half of the region's windows; the label rule is
    relaxed here so that the region rule alone decides."""
    monkeypatch.setattr(tumourfocus, "MIN_LABEL_IMAGED_FRACTION", 0.0)
    mri, histology, labels, start = _stage()
    _imagedUpTo(histology, 0.2)
    _unchangedWithReason(start, tumourfocus.focusOnTumours(start, mri, histology, labels, SPACING_MM, _settings()),
                         "too little of the tumour's surroundings")


def test_a_footprint_edge_beyond_the_region_leaves_the_focus_as_on_a_full_stack():
    mri, histology, labels, start = _stage()
    full = tumourfocus.focusOnTumours(start, mri, histology, labels, SPACING_MM, _settings())["labels"][0]
    mri, histology, labels, start = _stage()
    _imagedUpTo(histology, 1.5)
    row = tumourfocus.focusOnTumours(start, mri, histology, labels, SPACING_MM, _settings())["labels"][0]
    assert row["applied"], row
    assert row["volume_change_at_centre_percent"] == pytest.approx(full["volume_change_at_centre_percent"], abs=0.1)


def test_a_label_too_small_for_the_working_grid_is_not_focused():
    mri, histology, labels, start = _stage()
    labels.array[:] = 0
    labels.array[20, 22, 24] = 1
    section = tumourfocus.focusOnTumours(start, mri, histology, labels, SPACING_MM, _settings(tumourFocusGrowMm=0.0))
    _unchangedWithReason(start, section, "too small")


def test_a_search_that_fails_or_ends_on_its_bound_leaves_the_refinement(monkeypatch):
    mri, histology, labels, start = _stage()

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(tumourfocus, "focusTumour", broken)
    _unchangedWithReason(start, tumourfocus.focusOnTumours(start, mri, histology, labels, SPACING_MM, _settings()),
                         "injected failure")
    bounded = tumourfocus.FocusResult(np.eye(3) * tumourfocus.STRAIN_BOUND, np.zeros(3), 0.1, 5, True)
    monkeypatch.setattr(tumourfocus, "focusTumour", lambda *args, **kwargs: bounded)
    _unchangedWithReason(start, tumourfocus.focusOnTumours(start, mri, histology, labels, SPACING_MM, _settings()),
                         "bound")


def test_only_the_first_labels_are_searched():
    mri, histology, labels, start = _stage(error=False)
    labels.array[:] = 0
    count = tumourfocus.MAX_LABELS + 2
    for n in range(count):  # small labels in a row along i (each too small to search at grow 0: fast)
        labels.array[20, 22, 2 + 2 * n] = n + 1
    section = tumourfocus.focusOnTumours(start, mri, histology, labels, SPACING_MM, _settings(tumourFocusGrowMm=0.0))
    rows = section["labels"]
    assert len(rows) == count
    assert all("only the first" in row["reason"] for row in rows[tumourfocus.MAX_LABELS:])
    assert not any("only the first" in row["reason"] for row in rows[:tumourfocus.MAX_LABELS])


def test_a_focused_mapping_that_folds_is_undone_by_the_workflow(monkeypatch):
    """workflow._tumourFocus checks the folded-in field's Jacobian; a fold (injected) restores the refinement."""
    from MRIHistoRegLib import workflow

    mri, histology, labels, start = _stage()

    def folding(result, found, centre, sigmaMm):
        field = np.zeros(result.displacement.shape)
        field[..., 0] = -2.0 * gridPoints(SHAPE, _matrix())[:, 0].reshape(SHAPE)  # x -> -x: det < 0
        result.setDisplacement(field)

    monkeypatch.setattr(tumourfocus, "_foldInto", folding)
    section = workflow._tumourFocus(start, mri, histology, labels, _settings(), SPACING_MM, "elastix", None)
    _unchangedWithReason(start, section, "folds")


@pytest.mark.parametrize("settings, engine, accepted, words", [
    ({"tumourFocus": False}, "elastix", True, "turned off"),
    ({}, "simpleitk", True, "elastix engine only"),
    ({}, "elastix", False, "not accepted"),
])
def test_the_workflow_says_why_the_focus_did_not_run(settings, engine, accepted, words):
    from MRIHistoRegLib import workflow

    mri, histology, labels, start = _stage()
    start.accepted = accepted
    section = workflow._tumourFocus(start, mri, histology, labels, _settings(**settings), SPACING_MM, engine, None)
    _unchangedWithReason(start, section, words)
    assert "no MRI tumour labels" in workflow._tumourFocus(start, mri, histology, None, _settings(), SPACING_MM,
                                                             "elastix", None)["reason"]


@pytest.mark.parametrize("changes, words", [({"tumourFocusSigmaMm": 0}, "tumourFocusSigmaMm"),
                                            ({"tumourFocusGrowMm": -1}, "tumourFocusGrowMm"),
                                            ({"tumourFocus": "yes"}, "tumourFocus")])
def test_impossible_focus_settings_are_the_users_to_fix(changes, words):
    from MRIHistoRegLib import elastix
    from MRIHistoRegLib.errors import UserInputError

    with pytest.raises(UserInputError, match=words):
        elastix.elastixSettings(changes)


def test_the_focus_is_folded_in_as_the_refined_mapping_after_the_focus_field():
    """M2(x) = M1(x + w(x) d(x)) from a refinement with a field of its own and a non-identity landmark mapping:
    checked against M1 (a copy taken before) at points near the tumour, where w = 1."""
    import copy

    from MRIHistoRegLib import refine
    from MRIHistoRegLib.mapping import AffineMapping

    matrix = _matrix()
    points = gridPoints(SHAPE, matrix)
    field = 0.03 * np.sin(points[:, [1, 2, 0]] * 2.0)  # a smooth field of up to 30 um
    landmark = np.array([[0.7, 0.1, 0.0, 0.3], [-0.05, 0.65, 0.02, -0.2], [0.0, 0.03, 0.6, 0.1], [0, 0, 0, 1.0]])
    result = refine.RefinementResult(AffineMapping(landmark), field.reshape(SHAPE + (3,)), matrix, accepted=True)
    before = copy.deepcopy(result)
    found = tumourfocus.FocusResult(TRUE_STRAIN, TRUE_SHIFT_MM, 0.1, 1, False)
    tumourfocus._foldInto(result, found, CENTRE, 1.0)
    rng = np.random.default_rng(3)
    near = CENTRE + rng.uniform(-0.6, 0.6, (200, 3))
    expected = before.transformPoints(near + tumourfocus.focusField(found, near, CENTRE, 1.0))
    # the folded field is sampled on the refinement's 0.1 mm grid: trilinear error of a smooth field only
    assert np.abs(result.transformPoints(near) - expected).max() < 1e-3
    assert np.abs(before.transformPoints(near) - expected).max() > 0.01  # the focus moved them


def test_a_label_map_on_a_grid_of_its_own_gives_the_same_focus():
    """The MRI tumour label resampled (nearest) onto a finer grid with permuted axes: the same region, so about
    the same correction as on the MRI's own grid."""
    mri, histology, labels, start = _stage()
    onMri = tumourfocus.focusOnTumours(start, mri, histology, labels, SPACING_MM, _settings())["labels"][0]
    matrix = np.zeros((4, 4))
    matrix[:3, :3] = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]]) * 0.05  # i along A, j along S, k along R
    matrix[:3, 3], matrix[3, 3] = CENTRE - 0.05 * 30, 1.0
    shape = (61, 61, 61)
    fine = gridPoints(shape, matrix)
    inside = np.linalg.norm((fine - CENTRE) / [0.65, 0.55, 0.5], axis=1) <= 1.0
    from MRIHistoRegLib import workflow

    _, _, _, other = _stage()
    row = tumourfocus.focusOnTumours(other, mri, histology, workflow.Image(inside.reshape(shape).astype(np.uint8),
                                                                          matrix), SPACING_MM, _settings())["labels"][0]
    assert row["applied"], row
    assert row["volume_change_at_centre_percent"] == pytest.approx(onMri["volume_change_at_centre_percent"], abs=0.3)
    assert np.allclose(row["centre_ras_mm"], onMri["centre_ras_mm"], atol=0.01)


def test_a_focus_that_moves_the_landmarks_away_is_undone_by_the_workflow():
    """The refinement's landmark check applies to the focused mapping too: landmarks on the tumour's surface that
    the refinement maps exactly (tolerance 1 um) reject the focused mapping, and the refinement stands as it was."""
    from MRIHistoRegLib import refine, workflow

    mri, histology, labels, start = _stage()
    surface = CENTRE + np.vstack([np.eye(3), -np.eye(3)]) * [0.65, 0.55, 0.5]
    start.reason = "similarity improved"

    def check():
        refine.evaluateAgainstLandmarks(start, surface, surface, toleranceMm=0.001)

    check()
    assert start.accepted
    section = workflow._tumourFocus(start, mri, histology, labels, _settings(), SPACING_MM, "elastix", None, check)
    _unchangedWithReason(start, section, "with the focus")
    assert start.accepted and start.reason == "similarity improved"
    assert section["labels"][0]["strain_percent"], "the rows keep what the search found"
