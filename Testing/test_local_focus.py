"""The metric of the tumour-focus experiment (bench/local_focus.py, issue 15's volume target): its local squared
correlation against SimpleITK's ANTS neighbourhood correlation (an independent implementation) and its exact
gradient against finite differences, on a phantom whose one tissue has inverted contrast between the images."""
import os
import sys

import numpy as np
import pytest

from MRIHistoRegLib.geometry import gridPoints

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import local_focus  # noqa: E402

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
    ours, _ = local_focus.localCorrelation(fixed, moving, mask.astype(float), radius=2, withGradient=False)
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
    _, gradient = local_focus.localCorrelation(fixed, moving, weights)
    rng = np.random.default_rng(1)
    chosen = [tuple(rng.integers(4, n - 4) for n in SHAPE) for _ in range(6)] + [tuple(np.argwhere(mask)[0])]
    step = 1e-6
    for index in chosen:
        bumped = moving.copy()
        bumped[index] += step
        numeric = (local_focus.localCorrelation(fixed, bumped, weights, withGradient=False)[0]
                   - local_focus.localCorrelation(fixed, moving, weights, withGradient=False)[0]) / step
        assert gradient[index] == pytest.approx(numeric, rel=1e-3, abs=1e-9)
