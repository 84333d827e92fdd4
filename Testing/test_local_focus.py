"""The metric of the tumour-focus experiment (bench/local_focus.py, issue 15's volume target): its local squared
correlation against SimpleITK's ANTS neighbourhood correlation (an independent implementation) and its exact
gradient against finite differences, on a phantom whose one tissue has inverted contrast between the images."""
import os
import sys

import numpy as np
import pytest

from MRIHistoRegLib.geometry import gridPoints

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import local_focus as tumourfocus  # noqa: E402

MASK_GROWTH_MM = 0.5
SIGMA_MM = 1.0

SPACING_MM = 0.1
SHAPE = (40, 44, 48)  # [k, j, i]
CENTRE = np.array([0.15, -0.1, 0.05])
TRUE_STRAIN = np.array([[0.030, 0.008, 0.0], [0.008, -0.025, 0.006], [0.0, 0.006, 0.015]])
TRUE_SHIFT_MM = np.array([0.012, -0.008, 0.006])


def _matrix():
    m = np.diag([-SPACING_MM, -SPACING_MM, SPACING_MM, 1.0])  # an RAS grid with flipped i and j, as the MRI's
    m[:3, 3] = [SHAPE[2] / 2 * SPACING_MM, SHAPE[1] / 2 * SPACING_MM, -SHAPE[0] / 2 * SPACING_MM]
    return m


def _anatomy(points, contrast):
    """Intensity at RAS points of a tumour (ellipsoid, ~1.2 mm) inside a tissue with two bands around it; the
    bands' contrast differs between the images (`contrast`: their intensities), edges blurred as by a PSF of
    SD 0.05 mm (a one-voxel linear ramp would make linear interpolation's error, not the warp, the signal)."""
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


def _field(points, strain, shift, sigma=SIGMA_MM):
    offsets = points - CENTRE
    g = np.exp(-np.sum(offsets ** 2, axis=1) / (2 * sigma ** 2))
    return g[:, None] * (offsets @ strain.T + shift)


HISTOLOGY_SPACING_MM = 0.083  # the moving image on its own grid, as the working histology is


def _histologyMatrix():
    m = np.diag([HISTOLOGY_SPACING_MM] * 3 + [1.0])
    m[:3, 3] = [-2.3, -2.17, -2.03]
    return m


def _phantom(noise=0.02, seed=0):
    """(fixed, moving, mask, tumour, ijkToRas): fixed on the working grid, moving (array, ijkToRas) on its own grid
    such that moving(x + d(x)) shows what fixed shows at x, d the known field."""
    matrix = _matrix()
    points = gridPoints(SHAPE, matrix)
    fixed = _anatomy(points, (1.0, 0.6, 0.3, 0.45))
    histologyShape = (56, 60, 64)
    targets = gridPoints(histologyShape, _histologyMatrix())
    # moving at y shows the anatomy at x with x + d(x) = y: a fixed-point iteration (d is small and smooth)
    x = targets.copy()
    for _ in range(30):
        x = targets - _field(x, TRUE_STRAIN, TRUE_SHIFT_MM)
    moving = _anatomy(x, (0.8, 0.2, 0.9, 0.5))  # the band inverted: darker than the rest here, brighter there
    rng = np.random.default_rng(seed)
    fixed = fixed + rng.normal(0, noise, fixed.shape)
    moving = moving + rng.normal(0, noise, moving.shape)
    radius = np.linalg.norm((points - CENTRE) / [0.65, 0.55, 0.5], axis=1)
    mask = (radius - 1.0) * 0.55 <= MASK_GROWTH_MM
    return (fixed.reshape(SHAPE), (moving.reshape(histologyShape), _histologyMatrix()), mask.reshape(SHAPE),
            (radius <= 1.0).reshape(SHAPE), matrix)


def test_local_correlation_equals_simpleitk_ants_neighbourhood_correlation():
    import SimpleITK as sitk

    from MRIHistoRegLib.volumes import sitkImageFromArray

    fixed, _, _, _, matrix = _phantom()
    moving = _anatomy(gridPoints(SHAPE, matrix), (0.8, 0.2, 0.9, 0.5)).reshape(SHAPE)
    moving = moving + np.random.default_rng(4).normal(0, 0.02, SHAPE)
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
    fixed, _, mask, _, matrix = _phantom()
    moving = _anatomy(gridPoints(SHAPE, matrix), (0.8, 0.2, 0.9, 0.5)).reshape(SHAPE)
    moving = moving + np.random.default_rng(4).normal(0, 0.02, SHAPE)
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
