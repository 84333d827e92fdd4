"""The uncertainty of the tumour volume carried into MRI space, from the landmarks.

Method: jackknife over the landmark pairs. The landmark model is refitted N times, each time without one pair
(fitting's own models: rigid, similarity, affine, affine+TPS with the run's regularization), and the histology
label's Jacobian-integrated volume in MRI space (compare.volumeInMriMm3) is recomputed through each refit. The
jackknife standard error of log(volume), se = sqrt((m - 1) / m * sum (l_i - mean l)^2) over the m determined
refits, gives the interval

    [V exp(-t se), V exp(+t se)],   t = Student's t quantile (1 + level) / 2 with m - 1 degrees of freedom,

around the reported point estimate V. The log scale keeps the interval positive and makes it a relative
statement (volumes are ratios of det J). Why the jackknife: it needs no noise model (the landmarks' placement
error is never given), it sees both the placement noise and how strongly the answer leans on single landmarks
near the tumour (the misfit of a smooth model to a local warp), it is deterministic, and it costs N refits of
milliseconds. A parametric bootstrap with the noise taken from the leave-one-out errors was measured too wide
(the LOO errors include the model's misfit once more); README ("Volume uncertainty") has the coverage numbers.

Refined mappings: an accepted intensity refinement M = L o r (landmark mapping L after the refinement's
correction r = L^-1 o M) is not re-run per replicate (minutes each). Each refit L_i replaces L in the chain,
M_i = L_i o L^-1 o M, i.e. the refinement's correction is held fixed and the landmark part varies. Only the
Mapping interface is used (transformPoints, jacobian, the inverse by Newton iterations), so this holds for any
engine. Because the refinement would in truth re-adapt to each refit, the interval is conservative there
(it is about as wide as the landmark-only one around a more accurate estimate; README gives the measurement).

The volume ratio of refit i over the full fit needs only det J at the label's points:
    V_i = sum_q w_q det J_L(z_q) / (det J_{L_i}(z_q) det J_M(x_q)),  z_q = L_i^-1(y_q),  x_q = M^-1(L(z_q)),
(for landmark-only, M = L: V_i = sum_q w_q / det J_{L_i}(z_q)), on a coarse quadrature of the label (its
relative error cancels in V_i / V_full).
"""
import logging

import numpy as np

from .errors import UserInputError

LEVEL = 0.95
QUADRATURE_POINTS = 3000  # det J is smooth over a tumour: the ratio V_i / V_full converges with few points
MINIMUM_REPLICATES = 3

INTERVAL_KEY = "histology_in_mri_interval_mm3"
LEVEL_KEY = "histology_in_mri_interval_level"
METHOD_KEY = "histology_in_mri_interval_method"
ESTIMATE_KEY = "histology_in_mri_jacobian_mm3"

log = logging.getLogger(__name__)


def normalQuantile(probability):
    """Standard normal quantile (Acklam's rational approximation refined by one Halley step: ~1e-15)."""
    import math

    p = float(probability)
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability must lie in (0, 1), got {p}")
    a = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02, 1.383577518672690e+02,
         -3.066479806614716e+01, 2.506628277459239e+00)
    b = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02, 6.680131188771972e+01,
         -1.328068155288572e+01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00, -2.549732539343734e+00,
         4.374664141464968e+00, 2.938163982698783e+00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00)
    low = 0.02425
    if p < low or p > 1 - low:
        q = math.sqrt(-2 * math.log(p if p < low else 1 - p))
        x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
        x = x if p < low else -x
    else:
        q = p - 0.5
        r = q * q
        x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / \
            (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    error = 0.5 * math.erfc(-x / math.sqrt(2)) - p
    u = error * math.sqrt(2 * math.pi) * math.exp(x * x / 2)
    return x - u / (1 + x * u / 2)


def tQuantile(probability, degreesOfFreedom):
    """Student's t quantile by the Cornish-Fisher expansion around the normal quantile (four terms; relative
    error at 95 %: 1.2e-3 at 3 degrees of freedom, 1e-4 from 5 on; at 99 %: 0.8 % at 3, 3e-4 from 6 on - far
    below the jackknife's own sampling error); no scipy needed (Slicer's Python may lack it). Exact closed forms
    for 1 and 2 degrees of freedom."""
    import math

    nu = float(degreesOfFreedom)
    if nu < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {degreesOfFreedom}")
    if nu == 1:
        return math.tan(math.pi * (float(probability) - 0.5))
    if nu == 2:
        alpha = 4 * float(probability) * (1 - float(probability))
        return 2 * (float(probability) - 0.5) * math.sqrt(2 / alpha)
    z = normalQuantile(probability)
    terms = ((z ** 3 + z) / 4,
             (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    return z + sum(term / nu ** (n + 1) for n, term in enumerate(terms))


def jackknifeModels(fixed, moving, modelName, regularization=0.0):
    """[(index left out, LandmarkModel)] for every pair whose removal leaves a determined fit."""
    from . import fitting

    fixed, moving, _ = fitting.validateLandmarks(fixed, moving, modelName)
    determined = fitting._leaveOneOutDetermined(fixed, moving, modelName)
    keep = np.ones(len(fixed), dtype=bool)
    models = []
    for i in np.flatnonzero(determined):
        keep[i] = False
        models.append((int(i), fitting._fitValidated(fixed[keep], moving[keep], modelName, regularization)))
        keep[i] = True
    return models


def _logDeterminant(mapping, points):
    from .mapping import jacobianOf

    determinant = np.abs(np.linalg.det(jacobianOf(mapping, points)))
    if np.any(determinant < 1e-12):
        raise UserInputError("A landmark refit folds inside the label: the volume interval is undefined. Use a "
                             "smoother model (TPS regularization) or check the landmarks near the tumour.")
    return np.log(determinant)


class _ReplicateVolumes:
    """log(V_i / V_full) of each refit on one label's quadrature (see the module notes)."""

    def __init__(self, points, weights, landmarkModel, finalMapping=None):
        from .compare import InverseMapping

        self.points, self.weights = points, weights
        self.landmark = landmarkModel
        self.final = finalMapping
        self.finalInverse = None if finalMapping is None else InverseMapping(finalMapping)
        self.fullLog = self._logVolume(landmarkModel)

    def _logVolume(self, replicate):
        from .compare import InverseMapping
        from .geometry import applyMatrix
        from .mapping import asMapping

        if asMapping(replicate).isLinear:  # exact; Newton would spend a Jacobian per point to find the same
            z = applyMatrix(np.linalg.inv(asMapping(replicate).linearMatrix()), self.points)
        else:
            z = InverseMapping(replicate).transformPoints(self.points)
        logWeights = np.log(self.weights) - _logDeterminant(replicate, z)
        if self.final is not None:
            x = self.finalInverse.transformPoints(self.landmark.transformPoints(z))
            logWeights += _logDeterminant(self.landmark, z) - _logDeterminant(self.final, x)
        top = logWeights.max()
        return float(top + np.log(np.sum(np.exp(logWeights - top))))

    def logRatio(self, replicate):
        return self._logVolume(replicate) - self.fullLog


def intervalFromLogRatios(estimate, logRatios, level=LEVEL):
    """[low, high] = estimate exp(-/+ t se) from the jackknife replicates' log(V_i / V_full)."""
    values = np.asarray(logRatios, float)
    m = len(values)
    se = float(np.sqrt((m - 1) / m * np.sum((values - values.mean()) ** 2)))
    t = tQuantile(0.5 + level / 2, m - 1)
    return [float(estimate * np.exp(-t * se)), float(estimate * np.exp(t * se))]


def methodText(modelName, count, refined, level=LEVEL):
    text = (f"jackknife: {count} leave-one-landmark-out refits of the {modelName} fit, log-volume standard error, "
            f"Student t, {round(100 * level)} %")
    if refined:
        text += "; refined mapping: each refit replaces the landmark part, the refinement's correction held fixed"
    return text


def addVolumeIntervals(rows, histologyLabels, histologyIjkToRas, fixed, moving, modelName, regularization=0.0,
                       finalMapping=None, level=LEVEL, quadraturePoints=QUADRATURE_POINTS):
    """Add the interval keys (INTERVAL_KEY, LEVEL_KEY, METHOD_KEY) to each label row of compare.compareTumours'
    `rows` that has a Jacobian-integrated volume, right after that point estimate; returns `rows`.

    fixed / moving: the landmark pairs (MRI / histology RAS mm) the model `modelName` was fitted on.
    finalMapping: the accepted refined mapping (MRI -> histology), None for landmark-only. A label without
    enough determined refits gets a None interval and the reason as its method."""
    import time

    from . import compare, fitting

    started = time.perf_counter()
    landmarkModel = fitting.fitLandmarks(fixed, moving, modelName, regularization)
    models = jackknifeModels(fixed, moving, modelName, regularization)
    for label, row in rows.items():
        estimate = row.get(ESTIMATE_KEY)
        if not estimate:
            continue
        points, weights = compare.labelQuadrature(histologyLabels, histologyIjkToRas, label,
                                                  maxEvaluations=quadraturePoints)
        interval, method = volumeInterval(points, weights, estimate, landmarkModel, models, modelName,
                                          len(fixed), finalMapping, level)
        _insertAfter(row, ESTIMATE_KEY, {INTERVAL_KEY: interval, LEVEL_KEY: float(level), METHOD_KEY: method})
    log.info("volume intervals: %d landmark refits, %d label(s), %.2f s", len(models), len(rows),
             time.perf_counter() - started)
    return rows


def volumeInterval(points, weights, estimate, landmarkModel, models, modelName, pairCount, finalMapping=None,
                   level=LEVEL):
    """([low, high] or None, method text) for the volume `estimate` of the histology region integrated by
    (points, weights) (compare.labelQuadrature), from the jackknife refits `models` (jackknifeModels) of
    `landmarkModel` (the fit on all `pairCount` pairs)."""
    if len(models) < MINIMUM_REPLICATES:
        return None, (f"no interval: the {modelName} fit is determined without a pair for only {len(models)} of "
                      f"{pairCount} pairs (needs {MINIMUM_REPLICATES}); add landmark pairs")
    try:
        volumes = _ReplicateVolumes(points, weights, landmarkModel, finalMapping)
        logRatios = [volumes.logRatio(m) for _, m in models]
    except UserInputError as error:  # a refit that folds or cannot be inverted: the report is still written
        log.warning("no volume interval: %s", error)
        return None, f"no interval: {error}"
    return intervalFromLogRatios(estimate, logRatios, level), methodText(modelName, len(models),
                                                                          finalMapping is not None, level)


def _insertAfter(row, key, entries):
    items = [(k, v) for k, v in row.items() if k not in entries]
    row.clear()
    for k, v in items:
        row[k] = v
        if k == key:
            row.update(entries)
