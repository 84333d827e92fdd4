"""Landmark fits from paired points: rigid, similarity, affine and affine + thin-plate spline (TPS).

Direction (docs/ARCHITECTURE.md section 3): fixed = MRI, moving = histology. Every fitted model maps a fixed point to the
moving point (MRI RAS mm -> histology RAS mm), the resampling direction, i.e. a Slicer transform node's
"from parent" transform when the histology sits under the node.

Models (all plain numpy):
- rigid / similarity: Umeyama's closed form (SVD of the cross-covariance, reflection excluded).
- affine: linear least squares of [x 1] -> y.
- affine+tps: the affine least-squares fit first, then a 3-D thin-plate spline of the affine residual with the
  kernel U(r) = r (the biharmonic Green's function in 3-D, VTK's "R" basis, ITK's 3-D TPS kernel) plus its own
  affine polynomial. Because a TPS reproduces affine functions exactly, affine + TPS(residual) equals the TPS
  of the points themselves: the same function as vtkThinPlateSplineTransform (SetBasisToR, source = fixed,
  target = moving) and scipy's RBFInterpolator(kernel='linear', degree=1).
- regularization lambda >= 0 (TPS only) is a smoothing weight: the spline no longer interpolates the points
  and trades exactness for robustness to placement noise. Kernel r is conditionally *negative* definite, so the
  smoothing system is (K - lambda I) w + P a = y; this is exactly scipy's RBFInterpolator(kernel='linear',
  smoothing=lambda) (scipy writes the kernel as -r). lambda is in mm (units of the kernel).

Shrinkage readout: the fixed->moving linear part A maps MRI volume to histology volume, so |det A| is the
histology / MRI volume ratio: shrinkage (volume %) = 100 (1 - |det A|), linear % = 100 (1 - |det A|^(1/3)).
Positive = the histology is smaller than the MRI.
"""
import logging
import time

import numpy as np

from .geometry import applyMatrix, ijkToRasPoints
from .mapping import Mapping, asPoints, invertPoints

from .settings import MODELS  # noqa: E402  (one table: settings.py)
from .errors import UserInputError
MINIMUM_POINTS = {"rigid": 3, "similarity": 3, "affine": 4, "affine+tps": 5}
DUPLICATE_TOLERANCE_MM = 1e-6
DEGENERACY_TOLERANCE = 1e-6  # singular value ratio below which points count as collinear / coplanar
INVERSE_TOLERANCE_MM = 1e-6  # Newton inverse: residual above this (after iterating) is reported as not converged

log = logging.getLogger(__name__)


def _labelsFor(labels, count):
    if labels is None:
        return [f"#{i}" for i in range(count)]
    labels = [str(label) for label in labels]
    if len(labels) != count:
        raise UserInputError(f"{len(labels)} labels given for {count} point pairs; give one label per pair.")
    return labels


def _names(labels, indices, limit=12):
    names = [labels[i] for i in indices]
    text = ", ".join(names[:limit])
    return text + (f", ... ({len(names)} in all)" if len(names) > limit else "")


OUTLIER_FLOOR_MM = 1e-3  # LOO errors below this are round-off, never outliers


def validateLandmarks(fixedPoints, movingPoints, model, labels=None):
    """Check that the pairs can determine `model`; returns (fixed, moving, labels) as float arrays.

    Raises ValueError naming the offending labels for: unknown model, mismatched counts, NaN/inf coordinates,
    too few pairs, duplicated positions, collinear (rigid/similarity) or coplanar (affine, affine+tps) points.
    """
    if model not in MODELS:
        raise UserInputError(f"Unknown landmark model '{model}'; choose one of {', '.join(MODELS)}.")
    fixed = np.asarray(fixedPoints, dtype=float)
    moving = np.asarray(movingPoints, dtype=float)
    if fixed.ndim == 1 and fixed.size == 0:
        fixed = fixed.reshape(0, 3)
    if moving.ndim == 1 and moving.size == 0:
        moving = moving.reshape(0, 3)
    fixed, moving = asPoints(fixed), asPoints(moving)
    if len(fixed) != len(moving):
        raise UserInputError(f"{len(fixed)} fixed points but {len(moving)} moving points: pair the lists first "
                         "(landmarks.pairLandmarks) so each fixed point has exactly one moving partner.")
    labels = _labelsFor(labels, len(fixed))
    bad = np.flatnonzero(~(np.isfinite(fixed).all(axis=1) & np.isfinite(moving).all(axis=1)))
    if len(bad):
        raise UserInputError(f"Landmark pairs with NaN/infinite coordinates: {_names(labels, bad)}. "
                         "Place these points or exclude them (unselect) before fitting.")
    needed = MINIMUM_POINTS[model]
    if len(fixed) < needed:
        raise UserInputError(f"The {model} model needs at least {needed} point pairs, got {len(fixed)}"
                         f"{' (' + ', '.join(labels) + ')' if labels else ''}. Add more landmark pairs.")
    for name, points in (("fixed (MRI)", fixed), ("moving (histology)", moving)):
        distances = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=2)
        i, j = np.nonzero(np.triu(distances < DUPLICATE_TOLERANCE_MM, k=1))
        if len(i):
            pairs = ", ".join(f"{labels[a]} = {labels[b]}" for a, b in list(zip(i, j))[:12])
            raise UserInputError(f"Duplicate {name} landmark positions: {pairs}. Two labels sit on the same point; "
                             "move or delete one of them.")
    for name, points in (("fixed (MRI)", fixed), ("moving (histology)", moving)):
        singular = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
        scaleOf = max(singular[0], 1e-300)
        if singular[1] / scaleOf < DEGENERACY_TOLERANCE:
            raise UserInputError(f"The {name} landmarks ({_names(labels, range(len(labels)))}) are collinear: a "
                             f"{model} fit is undetermined. Add a landmark off that line.")
        if model in ("affine", "affine+tps") and singular[2] / scaleOf < DEGENERACY_TOLERANCE:
            raise UserInputError(f"The {name} landmarks ({_names(labels, range(len(labels)))}) are coplanar: an "
                             f"{model} fit needs points spread in 3-D. Add a landmark off that plane "
                             "(or use the rigid/similarity model).")
    return fixed, moving, labels


def _umeyama(fixed, moving, withScale):
    """(4x4 matrix, scale) minimising sum |s R x + t - y|^2 with R a proper rotation (Umeyama 1991)."""
    fixedMean, movingMean = fixed.mean(axis=0), moving.mean(axis=0)
    fc, mc = fixed - fixedMean, moving - movingMean
    covariance = mc.T @ fc / len(fixed)
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        signs[2] = -1.0
    rotation = u @ np.diag(signs) @ vt
    scale = 1.0
    if withScale:
        variance = (fc ** 2).sum() / len(fixed)
        scale = float((singular * signs).sum() / variance)
    matrix = np.eye(4)
    matrix[:3, :3] = scale * rotation
    matrix[:3, 3] = movingMean - scale * rotation @ fixedMean
    return matrix


def _affineLeastSquares(fixed, moving):
    centre = fixed.mean(axis=0)
    design = np.hstack([fixed - centre, np.ones((len(fixed), 1))])
    solution, *_ = np.linalg.lstsq(design, moving, rcond=None)
    matrix = np.eye(4)
    matrix[:3, :3] = solution[:3].T
    matrix[:3, 3] = solution[3] - matrix[:3, :3] @ centre
    return matrix


def _distances(points, centres):
    """(N, M) Euclidean distances, computed on differences (no cancellation for far-from-origin points), one
    axis at a time (10x faster than reducing an (N, M, 3) array over its short last axis)."""
    result = np.subtract.outer(points[:, 0], centres[:, 0])
    result *= result
    for axis in (1, 2):
        difference = np.subtract.outer(points[:, axis], centres[:, axis])
        difference *= difference
        result += difference
    return np.sqrt(result, out=result)


class LandmarkModel(Mapping):
    """A fitted landmark model: fixed (MRI) RAS mm -> moving (histology) RAS mm.

    Attributes: model (name), affineMatrix (4x4: the rigid/similarity/affine fit; for affine+tps the affine
    least-squares part), tpsCentres (N,3) fixed points or None, tpsWeights (N,3) or None, tpsAffine (the TPS's own
    polynomial part, fitted to the affine residual: x -> B x + b stored as the 4x4 [[B, b], [0, 0]], so that
    affineMatrix + tpsAffine is the whole model's affine part) or None, regularization. For affine+tps:
        transformPoints(x) = affineMatrix(x) + tpsAffine(x) + sum_i tpsWeights[i] |x - tpsCentres[i]|.
    """

    def __init__(self, model, affineMatrix, tpsCentres=None, tpsWeights=None, tpsAffine=None, regularization=0.0):
        self.model = model
        self.affineMatrix = np.array(affineMatrix, dtype=float)
        self.tpsCentres = None if tpsCentres is None else np.array(tpsCentres, dtype=float)
        self.tpsWeights = None if tpsWeights is None else np.array(tpsWeights, dtype=float)
        self.tpsAffine = None if tpsAffine is None else np.array(tpsAffine, dtype=float)
        self.regularization = float(regularization)

    @property
    def isLinear(self) -> bool:
        return self.tpsCentres is None

    def linearMatrix(self) -> np.ndarray:
        """The whole model's affine (polynomial) part as a 4x4 matrix (affineMatrix + tpsAffine)."""
        if self.isLinear:
            return self.affineMatrix.copy()
        return self.affineMatrix + self.tpsAffine

    def transformPoints(self, points) -> np.ndarray:
        """Fixed (MRI) RAS -> moving (histology) RAS, (N,3) -> (N,3)."""
        points = asPoints(points)
        matrix = self.linearMatrix()
        result = applyMatrix(matrix, points)
        if not self.isLinear:
            for start in range(0, len(points), 65536):  # bounded memory: 64 k points x N centres at a time
                chunk = points[start:start + 65536]
                result[start:start + 65536] += _distances(chunk, self.tpsCentres) @ self.tpsWeights
        return result

    def jacobian(self, points) -> np.ndarray:
        """(N,3,3) analytic Jacobian d moving / d fixed. At a centre (r = 0) the kernel's cone has no gradient;
        its term is taken as 0 there.

        d/dx sum_i w_i |x - c_i| = sum_i w_i (x - c_i)^T / r_i = (sum_i w_i / r_i) x^T - sum_i w_i c_i^T / r_i:
        two matrix products over the (n, M) matrix of 1/r (coordinates centred on the centres' mean)."""
        points = asPoints(points)
        result = np.broadcast_to(self.linearMatrix()[:3, :3], (len(points), 3, 3)).copy()
        if not self.isLinear:
            origin = self.tpsCentres.mean(axis=0)
            centres = self.tpsCentres - origin
            outer = (self.tpsWeights[:, :, None] * centres[:, None, :]).reshape(len(centres), 9)  # w_ik c_il
            for start in range(0, len(points), 16384):
                chunk = points[start:start + 16384] - origin
                r = _distances(chunk, centres)
                with np.errstate(divide="ignore"):
                    inverse = np.where(r > 0, 1.0 / r, 0.0)
                result[start:start + 16384] += ((inverse @ self.tpsWeights)[:, :, None] * chunk[:, None, :]
                                                - (inverse @ outer).reshape(-1, 3, 3))
        return result

    def inverseTransformPoints(self, points):
        """Moving (histology) RAS -> fixed (MRI) RAS: returns (points, residual_mm per point).

        Exact for linear models (residual = round-off); Newton iterations for affine+tps (mapping.invertPoints,
        started from the inverse of the affine part), with the residual |f(x) - target| reported. Points whose
        residual stays above INVERSE_TOLERANCE_MM are logged as not converged (e.g. outside a folded region).
        """
        points = asPoints(points)
        if self.isLinear:
            inverse = np.linalg.inv(self.affineMatrix)
            result = applyMatrix(inverse, points)
        else:
            inverse = np.linalg.inv(self.linearMatrix())
            start = applyMatrix(inverse, points)
            result, _ = invertPoints(self, points, initialGuess=start, tolerance=1e-9, maxIterations=100)
        residual = np.linalg.norm(self.transformPoints(result) - points, axis=1)
        bad = np.flatnonzero(~(residual < INVERSE_TOLERANCE_MM))
        if len(bad):
            log.warning("Inverse mapping did not converge for %d of %d points (max residual %.3g mm): the warp may "
                        "fold there or the points lie far outside the landmarks.", len(bad), len(points),
                        np.nanmax(residual))
        return result, residual

    def scale(self) -> float:
        """Isotropic linear scale of the linear part: |det A|^(1/3) (similarity: its s; rigid: 1).
        For affine+tps this is the affine least-squares part (the global size change), not the local warp."""
        return float(abs(np.linalg.det(self.affineMatrix[:3, :3])) ** (1.0 / 3.0))

    def principalScales(self) -> np.ndarray:
        """Singular values of the linear part (stretch along the principal axes), largest first."""
        return np.linalg.svd(self.affineMatrix[:3, :3], compute_uv=False)

    def volumeRatio(self) -> float:
        """Histology volume / MRI volume = |det A| of the fixed->moving linear part."""
        return float(abs(np.linalg.det(self.affineMatrix[:3, :3])))

    def shrinkageVolumePercent(self) -> float:
        """How much the histology shrank by volume relative to the MRI: 100 (1 - |det A|). Negative = swelling."""
        return 100.0 * (1.0 - self.volumeRatio())

    def shrinkageLinearPercent(self) -> float:
        """Linear shrinkage: 100 (1 - |det A|^(1/3))."""
        return 100.0 * (1.0 - self.scale())

    def __repr__(self):
        return f"LandmarkModel({self.model}, {0 if self.isLinear else len(self.tpsCentres)} TPS centres)"


def _solveTps(centres, values, regularization):
    """Weights (N,3) and polynomial (4x4 [[B, b],[0,0]]) of the TPS with kernel r through (centres, values)."""
    n = len(centres)
    origin = centres.mean(axis=0)
    local = centres - origin
    system = np.zeros((n + 4, n + 4))
    system[:n, :n] = _distances(local, local)
    if regularization:
        system[np.arange(n), np.arange(n)] -= regularization
    system[:n, n:n + 3] = local
    system[:n, n + 3] = 1.0
    system[n:n + 3, :n] = local.T
    system[n + 3, :n] = 1.0
    rhs = np.zeros((n + 4, 3))
    rhs[:n] = values
    try:
        solution = np.linalg.solve(system, rhs)
    except np.linalg.LinAlgError as error:
        raise UserInputError("The thin-plate spline system is singular (duplicate or degenerate landmarks).") from error
    weights = solution[:n]
    polynomial = np.zeros((4, 4))
    polynomial[:3, :3] = solution[n:n + 3].T
    polynomial[:3, 3] = solution[n + 3] - polynomial[:3, :3] @ origin
    return weights, polynomial


def fitLandmarks(fixedPoints, movingPoints, model, regularization=0.0, labels=None) -> LandmarkModel:
    """Fit `model` ('rigid', 'similarity', 'affine', 'affine+tps') mapping fixed (MRI) to moving (histology).

    `labels` (optional, one per pair) only serve error messages. Raises ValueError for too few pairs,
    collinear/coplanar or duplicate points, NaN coordinates (naming the labels).
    """
    fixed, moving, labels = validateLandmarks(fixedPoints, movingPoints, model, labels)
    return _fitValidated(fixed, moving, model, regularization)


def _fitValidated(fixed, moving, model, regularization):
    """fitLandmarks on arrays validateLandmarks has already checked (no second N^2 / SVD pass)."""
    regularization = float(regularization or 0.0)
    if regularization < 0 or not np.isfinite(regularization):
        raise UserInputError(f"TPS regularization must be a finite number >= 0 (mm), got {regularization}.")
    if model == "rigid":
        return LandmarkModel(model, _umeyama(fixed, moving, withScale=False))
    if model == "similarity":
        return LandmarkModel(model, _umeyama(fixed, moving, withScale=True))
    affine = _affineLeastSquares(fixed, moving)
    if model == "affine":
        return LandmarkModel(model, affine)
    residual = moving - applyMatrix(affine, fixed)
    weights, polynomial = _solveTps(fixed, residual, regularization)
    return LandmarkModel(model, affine, tpsCentres=fixed, tpsWeights=weights, tpsAffine=polynomial,
                         regularization=regularization)


def _leaveOneOutDetermined(fixed, moving, model):
    """Per pair: is the fit without it still determined (enough pairs, not collinear / coplanar)?"""
    count = len(fixed)
    if count - 1 < MINIMUM_POINTS[model]:
        return np.zeros(count, dtype=bool)
    rank = 2 if model in ("rigid", "similarity") else 3
    result = np.ones(count, dtype=bool)
    keep = np.ones(count, dtype=bool)
    for i in range(count):
        keep[i] = False
        for points in (fixed[keep], moving[keep]):
            singular = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
            if singular[rank - 1] / max(singular[0], 1e-300) < DEGENERACY_TOLERANCE:
                result[i] = False
        keep[i] = True
    return result


def leaveOneOutErrors(fixedPoints, movingPoints, model, regularization=0.0, labels=None, refit=False):
    """Per pair: |f_without_i(fixed_i) - moving_i| in mm: the fit without the pair predicting it.

    Closed forms make this cheap (one fit's worth of algebra): for affine, the hat-matrix identity
    e_i / (1 - h_ii); for affine+tps (which equals the TPS of the points, see the module notes) Rippa's formula
    w_i / (L^-1)_ii on the full (smoothing) TPS system; rigid/similarity refit Umeyama N times. refit=True
    refits every model N times instead (the definition; tests check both agree). A pair whose removal leaves an
    undetermined fit (the rest collinear/coplanar, or too few) gets NaN, with a warning.
    """
    fixed, moving, labels = validateLandmarks(fixedPoints, movingPoints, model, labels)
    return _leaveOneOutValidated(fixed, moving, model, regularization, labels, refit)


def _leaveOneOutValidated(fixed, moving, model, regularization, labels, refit=False):
    """leaveOneOutErrors on arrays validateLandmarks has already checked."""
    count = len(fixed)
    errors = np.full(count, np.nan)
    determined = _leaveOneOutDetermined(fixed, moving, model)
    for i in np.flatnonzero(~determined):
        log.warning("Leave-one-out for pair %s: the %s fit without it is undetermined (too few pairs or the "
                    "rest collinear/coplanar); its LOO error is NaN.", labels[i], model)
    if not determined.any():
        return errors
    if refit or model in ("rigid", "similarity"):
        keep = np.ones(count, dtype=bool)
        for i in np.flatnonzero(determined):
            keep[i] = False
            if model in ("rigid", "similarity"):
                matrix = _umeyama(fixed[keep], moving[keep], withScale=model == "similarity")
                prediction = matrix[:3, :3] @ fixed[i] + matrix[:3, 3]
            else:
                prediction = fitLandmarks(fixed[keep], moving[keep], model, regularization).transformPoints(fixed[i])[0]
            errors[i] = np.linalg.norm(prediction - moving[i])
            keep[i] = True
        return errors
    centred = fixed - fixed.mean(axis=0)
    if model == "affine":
        design = np.hstack([centred, np.ones((count, 1))])
        solution, *_ = np.linalg.lstsq(design, moving, rcond=None)
        residual = moving - design @ solution
        leverage = np.einsum("ij,jk,ik->i", design, np.linalg.inv(design.T @ design), design)
        with np.errstate(divide="ignore", invalid="ignore"):
            loo = np.linalg.norm(residual, axis=1) / (1.0 - leverage)
    else:
        system = np.zeros((count + 4, count + 4))
        system[:count, :count] = _distances(centred, centred)
        system[np.arange(count), np.arange(count)] -= float(regularization or 0.0)
        system[:count, count:count + 3] = centred
        system[:count, count + 3] = 1.0
        system[count:, :count] = system[:count, count:].T
        inverse = np.linalg.inv(system)
        weights = inverse[:count, :count] @ moving
        loo = np.linalg.norm(weights, axis=1) / np.abs(np.diag(inverse)[:count])
    errors[determined] = loo[determined]
    return errors


def _rms(values):
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    return float(np.sqrt(np.mean(values ** 2))) if len(values) else float("nan")


def _max(values):
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    return float(values.max()) if len(values) else float("nan")


def defaultJacobianGrid(points, samplesPerAxis=20, marginFraction=0.1):
    """(shapeIjk, ijkToRas) of a lattice over the points' bounding box (padded), for a Jacobian summary when no
    fixed image is given."""
    points = asPoints(points)
    low, high = points.min(axis=0), points.max(axis=0)
    pad = (high - low) * marginFraction
    low, high = low - pad, high + pad
    shape = (samplesPerAxis,) * 3
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag((high - low) / (samplesPerAxis - 1))
    matrix[:3, 3] = low
    return shape, matrix


def jacobianSummary(model, shapeIjk, ijkToRas, step=None, maxSamples=250000) -> dict:
    """Jacobian determinant of `model` over a fixed-image grid: {min, max, mean, folded_fraction, samples, step}.

    shapeIjk = (ni, nj, nk) voxels; ijkToRas = the grid's 4x4 IJK->RAS matrix. Voxel centres are sampled every
    `step` voxels along each axis (default: the smallest step giving <= maxSamples samples). folded_fraction =
    fraction of samples with det <= 0 (the warp folds there). det is the local histology/MRI volume ratio.
    """
    shape = [int(s) for s in shapeIjk]
    if len(shape) != 3 or min(shape) < 1:
        raise UserInputError(f"shapeIjk must be three positive voxel counts (ni, nj, nk), got {shapeIjk}.")
    if step is None:
        step = max(1, int(np.ceil((np.prod(shape, dtype=float) / maxSamples) ** (1.0 / 3.0))))
    axes = [np.arange(step // 2 if s > step else 0, s, step) for s in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3).astype(float)
    points = ijkToRasPoints(ijkToRas, grid)
    determinants = np.empty(len(points))
    for start in range(0, len(points), 16384):
        determinants[start:start + 16384] = np.linalg.det(model.jacobian(points[start:start + 16384]))
    return {
        "min": float(determinants.min()),
        "max": float(determinants.max()),
        "mean": float(determinants.mean()),
        "folded_fraction": float(np.mean(determinants <= 0)),
        "samples": int(len(points)),
        "step": int(step),
    }


def jacobianSummaryForVolume(model, volumeNode, step=None, maxSamples=250000) -> dict:
    """jacobianSummary over a volume node's voxel grid (its image dimensions are (ni, nj, nk), unlike a numpy
    array's (nk, nj, ni) shape, which is an easy mistake to make with jacobianSummary)."""
    from .volumes import ijkToRas

    imageData = volumeNode.GetImageData()
    if imageData is None:
        raise UserInputError(f"Volume '{volumeNode.GetName()}' has no voxels; load it before summarising the Jacobian.")
    return jacobianSummary(model, imageData.GetDimensions(), ijkToRas(volumeNode), step, maxSamples)


def evaluateFit(fixedPoints, movingPoints, labels, model, regularization=0.0, shapeIjk=None, ijkToRas=None,
                outlierFactor=3.0, jacobianMaxSamples=250000) -> dict:
    """Fit `model` and measure it; returns a plain (JSON-ready) dict.

    Keys: model, regularization, count, labels, residual_mm / loo_mm / outlier (lists, per pair),
    residual_rms_mm, residual_max_mm, loo_rms_mm, loo_max_mm, loo_median_mm, outliers (labels with LOO error >
    outlierFactor x the median LOO error), scale, principal_scales, volume_ratio, shrinkage_linear_percent,
    shrinkage_volume_percent, affine_matrix (4x4 nested list), fit_ms, loo_ms, and for affine+tps `jacobian` (see
    jacobianSummary; over the given fixed-image grid, else over the landmarks' padded bounding box, stated in
    `jacobian_region`; at most jacobianMaxSamples grid samples). The fitted LandmarkModel is not in the dict: use fitLandmarks for it, or
    evaluateAndFit to get both.
    """
    return evaluateAndFit(fixedPoints, movingPoints, labels, model, regularization, shapeIjk, ijkToRas,
                          outlierFactor, jacobianMaxSamples)[1]


def evaluateAndFit(fixedPoints, movingPoints, labels, model, regularization=0.0, shapeIjk=None, ijkToRas=None,
                   outlierFactor=3.0, jacobianMaxSamples=250000):
    """(LandmarkModel, evaluation dict): see evaluateFit. The landmarks are validated once (the live update calls
    this on every end of interaction: the N^2 duplicate check and the SVDs are not repeated for the fit and LOO)."""
    fixed, moving, labels = validateLandmarks(fixedPoints, movingPoints, model, labels)
    started = time.perf_counter()
    fitted = _fitValidated(fixed, moving, model, regularization)
    fitMs = 1000 * (time.perf_counter() - started)
    residual = np.linalg.norm(fitted.transformPoints(fixed) - moving, axis=1)
    started = time.perf_counter()
    loo = _leaveOneOutValidated(fixed, moving, model, regularization, labels)
    looMs = 1000 * (time.perf_counter() - started)
    finite = loo[np.isfinite(loo)]
    median = float(np.median(finite)) if len(finite) else float("nan")
    # the absolute floor (1 um) keeps round-off of an exact fit from being called an outlier
    outlier = np.isfinite(loo) & (loo > outlierFactor * median) & (loo > OUTLIER_FLOOR_MM)
    result = {
        "model": model,
        "regularization": float(regularization or 0.0),
        "count": int(len(fixed)),
        "labels": list(labels),
        "residual_mm": [float(v) for v in residual],
        "loo_mm": [float(v) for v in loo],
        "outlier": [bool(v) for v in outlier],
        "residual_rms_mm": _rms(residual),
        "residual_max_mm": _max(residual),
        "loo_rms_mm": _rms(loo),
        "loo_max_mm": _max(loo),
        "loo_median_mm": median,
        "outlier_factor": float(outlierFactor),
        "outliers": [labels[i] for i in np.flatnonzero(outlier)],
        "scale": fitted.scale(),
        "principal_scales": [float(v) for v in fitted.principalScales()],
        "volume_ratio": fitted.volumeRatio(),
        "shrinkage_linear_percent": fitted.shrinkageLinearPercent(),
        "shrinkage_volume_percent": fitted.shrinkageVolumePercent(),
        "affine_matrix": fitted.affineMatrix.tolist(),
        "fit_ms": fitMs,
        "loo_ms": looMs,
    }
    if not fitted.isLinear:
        if shapeIjk is None or ijkToRas is None:
            shapeIjk, ijkToRas = defaultJacobianGrid(fixed)
            result["jacobian_region"] = "landmark bounding box (+10%), 20^3 samples"
        else:
            result["jacobian_region"] = f"fixed image grid {tuple(int(s) for s in shapeIjk)} (ijk)"
        result["jacobian"] = jacobianSummary(fitted, shapeIjk, ijkToRas, maxSamples=jacobianMaxSamples)
    if len(result["outliers"]):
        log.info("Landmark pairs with leave-one-out error > %.1f x median (%.3g mm): %s", outlierFactor, median,
                 ", ".join(result["outliers"]))
    return fitted, result
