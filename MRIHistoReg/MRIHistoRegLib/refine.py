"""Automatic intensity refinement started from the landmark transform (issue 5).

The landmark fit (affine+TPS) is a guaranteed but coarse start: few points, placed by hand. This module refines
it with SimpleITK (bundled in Slicer): Mattes mutual information (multi-modal: MRI T2 contrast vs light-sheet
autofluorescence), multi-resolution, an affine stage and then a cubic B-spline stage.

Directions (docs/ARCHITECTURE.md section 3). Every mapping here goes from the fixed (MRI) space to the moving (histology)
space in RAS mm, the resampling direction. The refinement R acts *before* the landmark mapping L:

    result.transformPoints(x) = L(R(x))          R(x) = affine(bspline(x)),  both found by the optimiser

which is exactly how ITK's registration composes a moving initial transform with the optimised one
(CompositeTransform [L, R] applies R first). L is given to SimpleITK as its *moving initial transform*, so it is
never dropped (the SlicerANTsPy bug): any mapping object is sampled once on a padded lattice over the fixed grid
and handed over as "least-squares affine of L" o "DisplacementFieldTransform of the residual", so points that
the optimiser pushes beyond the lattice still follow L's affine part instead of snapping to identity.
In Slicer, R becomes a grid transform node that is the *parent* of the landmark transform node; the world->
histology (from-parent) chain is then L_fromParent(R_fromParent(x)), see `refinementTransformNode`.

Three things decide the accuracy, each measured on the sample data (held-out TRE median against the ground
truth, seeds 0-2, 12 / 6 landmarks; bench/refine.py prints the current figures):
- Intensity non-uniformity of the histology (depth attenuation, illumination shading) biases mutual
  information: started from the TRUE mapping, the affine stage drifted to 0.038 mm with 1.6 % compression along
  the depth. The stack is therefore flattened by N4 first (`correctBiasField`, knots ~1 mm apart), unless that
  makes the images much less alike at the start (anatomy that varies as slowly as shading; measured on a smooth
  phantom). From the truth the drift is then 0.011 mm.
- Sampling: the B-spline stage samples every valid voxel at its centre (`_denseSamples`); ITK's random and
  regular strategies jitter samples inside voxels and were measured worse (see there).
- Control-point spacing: 3.5 mm nominal; the mesh has round(extent / 3.5 mm) intervals along each axis (3.3-3.6
  mm apart on the sample). The earlier 4 mm nominal rounded to [2, 5, 3] intervals there, 4.95 mm apart along i,
  and could not follow the sample's ~1 mm-wide non-linear bumps at the tumour: its tumour volumes in MRI space
  leaned low (seeds 0-4, 12 landmarks: -3.9 / +2.0 / -3.5 / -1.1 / +5.8 % vs the truth; 3.5 mm: -1.2 / +0.8 /
  -1.7 / -0.6 / +4.8 %, held-out TRE -33 to -61 %). The volume still scatters by a few % with the mesh's placement (the same 3.3-3.6 mm mesh
  over a 4 mm margin gave -4.9 % on seed 0). Finer meshes over-fit: Mattes MI has no bending-energy term in
  SimpleITK's registration framework (a second 2 mm stage, seeds 0-2: TRE -27 to -38 %, volumes +4 to +8 %;
  started from the true mapping +2.5 %). Every B-spline coefficient is bounded
  by L-BFGS-B to |c| <= 0.4 x control spacing, the sufficient injectivity condition of Choi & Lee (2000, K ~
  2.48 in 3-D, used by Rueckert et al. 2006 for diffeomorphic FFDs): the B-spline stage cannot fold, by
  construction, whatever the data say. (Defaults tuned on the phantom: re-check on real pairs.)
The metric is sampled in MRI space over the voxels the landmark mapping puts inside the histology footprint (a
moving-side mask would let the optimiser gain by pushing bad samples out of the footprint), cropped tightly to
them. The affine stage uses 10 % of those voxels at random (fixed seed) and its last level is at full
resolution; the affine scales are computed here (ITK's estimator samples with a wall-clock seed for a
composite moving transform): results are reproducible.
Guard rails then check the result (Jacobian determinant on the fixed grid, metric change, landmark residuals
through the full composite) and mark it `accepted=False` with a reason when it should not replace the
landmark-only result. Callers keep the landmark-only mapping in that case.
"""
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from MRIHistoRegLib.geometry import (applyMatrix, flipPointsLpsRas, flipTransformLpsRas, gridPoints, ijkToRasPoints,
                                     indexToIndex, rasToIjkPoints, spacingOf)
from MRIHistoRegLib.mapping import ComposedMapping, Mapping, asMapping, asPoints, jacobianOf
from MRIHistoRegLib.progress import Cancelled, report
from MRIHistoRegLib.volumes import sitkImageFromArray
from .errors import UserInputError

_gridPoints = gridPoints  # the private name the refinement (and its tests) have always used

# Default settings. Smoothing sigmas are in voxels of each pyramid level's input (scale-free).
DEFAULT_SETTINGS = {
    "affine": True,  # run the affine stage
    "affineShrinkFactors": (2, 1),  # the last level at full resolution: sub-voxel accuracy needs it
    "affineSmoothingSigmas": (1.0, 0.0),
    "affineIterations": 100,
    "affineStepVoxels": 1.0,  # largest first affine step, in fixed voxels of physical shift
    "bspline": True,  # run the B-spline stage
    "controlPointSpacingMm": 3.5,  # nominal; measured on the sample data (see module docstring)
    "bsplineShrinkFactors": (1,),
    "bsplineSmoothingSigmas": (0.0,),
    "bsplineIterations": 40,  # metric evaluations per level (L-BFGS-B function evaluations)
    "maxCoefficientFraction": 0.4,  # |B-spline coefficient| <= this x control spacing (0.4: fold-free)
    "histogramBins": 32,
    "maxSamples": 300_000,  # B-spline stage: every valid voxel (dense, at voxel centres), or every n-th along each
    # axis when there are more than this many (about 1 s per metric evaluation per 200 000 samples on 2 cores)
    "affineSamplingPercentage": 0.1,  # affine stage: random fraction of the valid voxels (1.0 = all of them, on
    # the grid: measured 1.5-3x slower on the sample data for no consistent TRE gain) ...
    "affineMaxSamples": 1_000_000,  # ... up to this many
    "seed": 1,  # sampling seed: same input + settings = same result (0 would be SimpleITK's wall-clock seed)
    "intensityPercentiles": (0.5, 99.5),  # clip intensities (saturation, hot pixels) before the histogram
    "footprintErosionVoxels": 2,  # automatic histology footprint erosion (partial-volume edges)
    "histologyBiasCorrection": True,  # N4 on the histology first: depth attenuation and shading bias the metric
    "biasFieldSpacingMm": 1.0,  # N4 field knot spacing: shading and depth attenuation vary over millimetres
    "biasCorrectionTolerance": 0.1,  # N4 is skipped when it worsens the start metric by more than this fraction
    "biasCorrectionMaxVoxels": 50_000,  # N4 fits its (smooth) field on a copy shrunk to at most this many voxels
    "minOverlapVoxels": 2000,  # MRI (mask) voxels the start must map into the footprint (a partial stack may
    # cover only a few % of the MRI: the sample's covers 7 %, so no fraction threshold)
    "maxFieldPoints": 3_000_000,  # lattice size cap for the sampled initial / refinement displacement fields
    "initialFieldMarginMm": 1.0,  # lattice margin around the fixed grid for the initial transform
    "jacobianSubsample": 2,  # fold check on every n-th fixed voxel
    "landmarkToleranceMm": 0.2,  # median landmark residual may grow by at most this much
    "metricTolerance": 0.05,  # reject when the full-grid metric worsens by more than this fraction
}


def refinementSettings(settings=None) -> dict:
    """DEFAULT_SETTINGS updated with `settings` (a dict); unknown keys are an error with the valid names."""
    merged = dict(DEFAULT_SETTINGS)
    if settings:
        unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
        if unknown:
            raise UserInputError(f"Unknown refinement setting(s) {unknown}; valid names: {sorted(DEFAULT_SETTINGS)}.")
        merged.update(settings)
    if len(merged["affineShrinkFactors"]) != len(merged["affineSmoothingSigmas"]):
        raise UserInputError("affineShrinkFactors and affineSmoothingSigmas need one entry per level each.")
    if len(merged["bsplineShrinkFactors"]) != len(merged["bsplineSmoothingSigmas"]):
        raise UserInputError("bsplineShrinkFactors and bsplineSmoothingSigmas need one entry per level each.")
    if not merged["controlPointSpacingMm"] > 0:
        raise UserInputError("controlPointSpacingMm must be > 0 (about 1 mm suits a mouse brain).")
    return merged


# ----------------------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------------------

def _geometry(ijkToRas):
    m = np.asarray(ijkToRas, dtype=float)
    if m.shape != (4, 4):
        raise UserInputError(f"Geometry must be a 4x4 IJK->RAS matrix, got shape {m.shape}.")
    spacing = spacingOf(m)
    if np.any(spacing <= 0):
        raise UserInputError("IJK->RAS matrix has a zero-length axis: set the voxel spacing.")
    return m, spacing


def _sitkImage(array, ijkToRas, pixelType=np.float32):
    """A SimpleITK image (LPS) with the voxels of `array` [k, j, i] and the RAS geometry `ijkToRas`."""
    return sitkImageFromArray(array, ijkToRas, dtype=pixelType)


def _coarsenedGrid(shape, ijkToRas, maxPoints, margin=0.0):
    """(shape, ijkToRas) of a lattice covering the grid (+ margin mm), spacing an integer multiple, <= maxPoints."""
    m, spacing = _geometry(ijkToRas)
    shape = np.asarray(shape[::-1], dtype=float)  # i, j, k
    padVoxels = np.ceil(margin / spacing)
    factor = 1
    while True:
        pad = np.ceil(padVoxels / factor)
        count = np.ceil((shape - 1) / factor) + 1 + 2 * pad  # covers the last voxel
        if np.prod(count) <= maxPoints or factor > 64:
            break
        factor += 1
    newMatrix = m.copy()
    newMatrix[:3, :3] = m[:3, :3] * factor
    newMatrix[:3, 3] = m[:3, 3] - m[:3, :3] @ (pad * factor)
    countKji = tuple(int(c) for c in count[::-1])
    return countKji, newMatrix


def _trilinear(field, ijk):
    """Trilinear interpolation of field [k, j, i, C] at continuous (i, j, k), clamped to the grid (as VTK's grid
    transform does outside its grid)."""
    nk, nj, ni = field.shape[:3]
    upper = np.array([ni - 1, nj - 1, nk - 1], dtype=float)
    ijk = np.clip(ijk, 0.0, upper)
    base = np.minimum(np.floor(ijk).astype(np.int64), np.maximum(upper.astype(np.int64) - 1, 0))
    frac = ijk - base
    out = np.zeros((len(ijk), field.shape[3]))
    for dk in (0, 1):
        wk = frac[:, 2] if dk else 1 - frac[:, 2]
        kk = np.minimum(base[:, 2] + dk, nk - 1)
        for dj in (0, 1):
            wj = frac[:, 1] if dj else 1 - frac[:, 1]
            jj = np.minimum(base[:, 1] + dj, nj - 1)
            for di in (0, 1):
                wi = frac[:, 0] if di else 1 - frac[:, 0]
                ii = np.minimum(base[:, 0] + di, ni - 1)
                out += (wk * wj * wi)[:, None] * field[kk, jj, ii]
    return out


class DisplacementFieldMapping(Mapping):
    """x -> x + d(x), d sampled on a grid ([k, j, i, 3] RAS mm, IJK->RAS geometry), trilinear, clamped outside.

    The same function as a Slicer grid transform node holding this field (linear interpolation)."""

    def __init__(self, displacement, ijkToRas):
        self.displacement = np.asarray(displacement, dtype=float)
        if self.displacement.ndim != 4 or self.displacement.shape[3] != 3:
            raise UserInputError(f"A displacement field is a [k, j, i, 3] array, got shape {self.displacement.shape}.")
        self.ijkToRas, _ = _geometry(ijkToRas)
        self._rasToIjk = np.linalg.inv(self.ijkToRas)

    def displacementAt(self, points):
        points = asPoints(points)
        ijk = applyMatrix(self._rasToIjk, points)
        return _trilinear(self.displacement, ijk)

    def transformPoints(self, points):
        points = asPoints(points)
        return points + self.displacementAt(points)


def jacobianDeterminants(displacement, ijkToRas, subsample=1) -> np.ndarray:
    """det(I + grad d) of a displacement field [k, j, i, 3] (RAS mm) on every `subsample`-th voxel.

    Values <= 0 mean the mapping x -> x + d(x) folds there."""
    field = np.asarray(displacement, dtype=float)[::subsample, ::subsample, ::subsample]
    m, _ = _geometry(ijkToRas)
    step = m[:3, :3] * subsample
    # d d / d(i, j, k): np.gradient along axes (k, j, i)
    jac = np.empty(field.shape[:3] + (3, 3))
    for comp in range(3):
        gk, gj, gi = (np.gradient(field[..., comp], axis=a) if field.shape[a] > 1 else np.zeros(field.shape[:3])
                      for a in (0, 1, 2))
        jac[..., comp, 0], jac[..., comp, 1], jac[..., comp, 2] = gi, gj, gk
    jac = jac @ np.linalg.inv(step)  # d d / d x (RAS)
    jac += np.eye(3)
    return np.linalg.det(jac)


def histologyFootprint(movingArray, erosionVoxels=2) -> np.ndarray:
    """uint8 mask [k, j, i] of the acquired part of a (partial-coverage) histology stack.

    A stack that was cropped or padded holds a constant fill value (its minimum, usually 0) where nothing was
    imaged. When that value covers more than 1% of the voxels, the footprint is everything above it with its
    holes filled (dark structures inside the tissue stay in); otherwise the whole field of view counts. The
    footprint is then eroded by `erosionVoxels` (the box borders too): downsampled voxels at the edges of the
    imaged region are partial averages with the fill value and would pull the MRI toward empty space."""
    array = np.asarray(movingArray)
    low = array.min()
    support = array > low
    if not 0.0 < support.mean() < 0.99:  # no fill value (or a constant stack): the whole field of view
        support = np.ones(array.shape, dtype=bool)
    image = sitk.GetImageFromArray(support.astype(np.uint8))
    if not support.all():
        image = sitk.BinaryFillhole(image, fullyConnected=False, foregroundValue=1)
    if erosionVoxels > 0:
        padded = sitk.ConstantPad(image, [1, 1, 1], [1, 1, 1], 0)  # erode from the box borders as well
        eroded = sitk.BinaryErode(padded, [int(erosionVoxels)] * 3, sitk.sitkBall, 0, 1, False)
        image = sitk.Crop(eroded, [1, 1, 1], [1, 1, 1])
    return sitk.GetArrayFromImage(image).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class RefinementResult(Mapping):
    """A mapping fixed (MRI) RAS -> moving (histology) RAS: transformPoints(x) = initial(refinement(x)).

    Attributes:
      initialMapping      the landmark mapping the refinement started from (kept as-is)
      refinement          DisplacementFieldMapping: the refinement alone, x -> x + d(x)
      displacement, fieldIjkToRas   that displacement field [k, j, i, 3] in RAS mm and its grid geometry
                          (a Slicer grid transform's from-parent transform; see refinementTransformNode)
      metricBefore, metricAfter     Mattes mutual information over the whole fixed grid/mask (negative MI:
                          lower is better) with the landmark mapping alone and with the refinement
      iterations          optimiser iterations over all stages and levels
      seconds             wall time of refineRegistration
      accepted, reason    whether the refinement should replace the landmark-only result, and why (not)
      refinementAffine    4x4 RAS matrix found by the affine stage (identity without it)
      settings            the settings used (refinementSettings)
      minJacobianDeterminant        of the refinement on the (subsampled) fixed grid
      overlapFraction     fraction of the fixed (mask) voxels the landmark mapping puts in the histology footprint
      landmarkResiduals   filled by evaluateAgainstLandmarks: dict of before/after residuals
      region              [k, j, i] (lo, hi) fixed-index box of the B-spline stage
      biasCorrected       True when the histology was registered with its N4-corrected intensities
      timings             wall time (s) of each step refineRegistration ran, and the total

    toDict() is its JSON description: report.json's refinement section, for every front.
    """

    initialMapping: object = field(repr=False)
    displacement: np.ndarray = field(repr=False)
    fieldIjkToRas: np.ndarray = field(repr=False)
    metricBefore: float = float("nan")
    metricAfter: float = float("nan")
    iterations: int = 0
    seconds: float = 0.0
    accepted: bool = False
    reason: str = ""
    refinementAffine: Optional[np.ndarray] = field(default=None, repr=False)
    settings: Optional[dict] = field(default=None, repr=False)
    minJacobianDeterminant: float = float("nan")
    overlapFraction: float = float("nan")
    landmarkResiduals: Optional[dict] = field(default=None, repr=False)
    region: Optional[tuple] = field(default=None, repr=False)
    biasCorrected: bool = False
    timings: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.setDisplacement(self.displacement)
        self.metricBefore, self.metricAfter = float(self.metricBefore), float(self.metricAfter)
        self.iterations, self.seconds = int(self.iterations), float(self.seconds)
        self.accepted, self.reason = bool(self.accepted), str(self.reason)
        self.refinementAffine = (np.eye(4) if self.refinementAffine is None
                                 else np.asarray(self.refinementAffine, float))

    def setDisplacement(self, displacement):
        """A new field on the same grid (the tumour focus folds its correction in): the mapping follows it."""
        # the field is validated (and held as float arrays) once, by the mapping that applies it
        self.refinement = DisplacementFieldMapping(displacement, self.fieldIjkToRas)
        self.displacement, self.fieldIjkToRas = self.refinement.displacement, self.refinement.ijkToRas
        self._composed = ComposedMapping([self.refinement, self.initialMapping])

    def linearMatrix(self):
        """The affine part (initial's affine part after the refinement's affine stage), for inverse initial guesses."""
        initialAffine = asMapping(self.initialMapping).linearMatrix()
        if initialAffine is None:
            return None
        return np.asarray(initialAffine, float) @ self.refinementAffine

    @property
    def affineMatrix(self):
        """linearMatrix() (the name earlier callers used)."""
        return self.linearMatrix()

    def transformPoints(self, points):
        return self._composed.transformPoints(points)

    def jacobian(self, points):
        points = asPoints(points)
        refined = self.refinement.transformPoints(points)
        return jacobianOf(self.initialMapping, refined) @ jacobianOf(self.refinement, points)

    def reject(self, reason):
        self.accepted = False
        self.reason = reason
        logging.warning("refinement not accepted: %s (keeping the landmark-only result)", reason)

    def summary(self) -> str:
        state = "accepted" if self.accepted else "NOT accepted (landmark-only result kept)"
        engine = getattr(self, "engine", "simpleitk")
        if getattr(self, "engineFallback", None):
            engine += f" ({self.engineFallback})"
        return (f"refinement ({engine}) {state}: {self.reason}; metric {self.metricBefore:.4f} -> {self.metricAfter:.4f}, "
                f"{self.iterations} iterations, {self.seconds:.1f} s, min Jacobian det {self.minJacobianDeterminant:.3f}, "
                f"histology shading {'corrected (N4)' if self.biasCorrected else 'not corrected'}"
                + _focusSummary(getattr(self, "tumourFocus", None)))

    def toDict(self, labels: Sequence[str] = ()) -> dict:
        """The refinement as JSON-ready-ish values (numpy arrays as lists; outputs.jsonReady cleans NaN): the keys
        of report.json's refinement section. `labels` name the landmarks evaluateAgainstLandmarks measured."""
        summary = {
            "accepted": bool(self.accepted), "reason": self.reason,
            "metric": "Mattes mutual information (negative: lower is better)",
            "metric_before": self.metricBefore, "metric_after": self.metricAfter, "iterations": self.iterations,
            "seconds": self.seconds, "min_jacobian_determinant": self.minJacobianDeterminant,
            "overlap_fraction": self.overlapFraction, "histology_bias_corrected": self.biasCorrected,
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in (self.settings or {}).items()},
            "landmarks": None,
            # set by the caller that chose the engine (workflow.refine) / by the elastix engine
            "engine": getattr(self, "engine", "simpleitk"),
            "engine_fallback_reason": getattr(self, "engineFallback", None),
            "engine_load_seconds": getattr(self, "engineLoadSeconds", None),
            "working_spacing_mm": getattr(self, "workingSpacingMm", None),
            # set by workflow.refine (tumourfocus: what the focus did, or why not); None outside workflow.refine
            "tumour_focus": getattr(self, "tumourFocus", None),
        }
        check = self.landmarkResiduals
        if check is not None:
            summary["landmarks"] = {"labels": list(labels), "residual_before_mm": np.asarray(check["before"]).tolist(),
                                    "residual_after_mm": np.asarray(check["after"]).tolist(),
                                    "median_before_mm": check["medianBefore"], "median_after_mm": check["medianAfter"],
                                    "tolerance_mm": check["toleranceMm"]}
        return summary


def _focusSummary(section) -> str:
    if not section or not section.get("searched"):  # no labels given, another engine, turned off, not accepted
        return ""
    if section["applied"]:
        return f"; tumour focus {section['reason']}"
    return f"; tumour focus not applied: {section['reason']}"


def _identityResult(initialMapping, fixedShape, fixedIjkToRas, settings, reason, start, metricBefore=float("nan")):
    shape, matrix = _coarsenedGrid(fixedShape, fixedIjkToRas, 8)  # tiny zero field: identity refinement
    result = RefinementResult(initialMapping, np.zeros(shape + (3,)), matrix, metricBefore=metricBefore,
                              seconds=time.perf_counter() - start, settings=settings)
    result.minJacobianDeterminant = 1.0
    result.reject(reason)
    return result


# ----------------------------------------------------------------------------------------------------------
# Conversions between mappings and SimpleITK transforms
# ----------------------------------------------------------------------------------------------------------

def _evaluateChunked(mapping, points, chunk=200_000):
    out = np.empty_like(points)
    for start in range(0, len(points), chunk):
        out[start:start + chunk] = mapping.transformPoints(points[start:start + chunk])
    return out


def initialTransform(mapping, fixedShape, fixedIjkToRas, settings=None):
    """SimpleITK transform (LPS, fixed -> moving) equal to `mapping` on the fixed grid (+ margin).

    A least-squares affine A of the mapping composed with the residual r sampled on a lattice,
    T(p) = A(p + r(p)); outside the lattice r = 0, so T falls back to A (not to identity)."""
    settings = refinementSettings(settings)
    shape, lattice = _coarsenedGrid(fixedShape, fixedIjkToRas, settings["maxFieldPoints"],
                                    margin=settings["initialFieldMarginMm"])
    ras = _gridPoints(shape, lattice)
    mapped = _evaluateChunked(mapping, ras)
    if not np.all(np.isfinite(mapped)):
        raise UserInputError("The initial (landmark) mapping gives non-finite points on the MRI grid: refit the landmarks.")
    lps, mappedLps = flipPointsLpsRas(ras), flipPointsLpsRas(mapped)
    design = np.hstack([lps, np.ones((len(lps), 1))])
    solution, *_ = np.linalg.lstsq(design[::7], mappedLps[::7], rcond=None)
    affineLps = np.eye(4)
    affineLps[:3, :3], affineLps[:3, 3] = solution[:3].T, solution[3]
    if abs(np.linalg.det(affineLps[:3, :3])) < 1e-9:
        raise UserInputError("The initial (landmark) mapping is degenerate (collapses the MRI): refit the landmarks.")
    inverse = np.linalg.inv(affineLps)
    residual = applyMatrix(inverse, mappedLps) - lps
    fieldImage = sitkImageFromArray(residual.reshape(shape + (3,)), lattice, dtype=np.float64, isVector=True)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix([float(v) for v in affineLps[:3, :3].ravel()])
    affine.SetTranslation([float(v) for v in affineLps[:3, 3]])
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(fieldImage)])


def _fieldTransform(displacement, ijkToRas):
    """SimpleITK DisplacementFieldTransform (LPS) of a RAS displacement field [k, j, i, 3] on a grid."""
    image = sitkImageFromArray(flipPointsLpsRas(displacement), ijkToRas, dtype=np.float64, isVector=True)
    return sitk.DisplacementFieldTransform(image)


def _affineScales(image, centre):
    """Physical-shift parameter scales of a 3-D AffineTransform about `centre` over `image`'s domain: the squared
    largest displacement of the domain's corners per unit change of each parameter (matrix row-major, then
    translation), as ITK's RegistrationParameterScalesFromPhysicalShift computes with corner sampling."""
    size = np.array(image.GetSize()) - 1
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint([float(c) for c in size * np.array(bits)])
                        for bits in np.ndindex(2, 2, 2)]) - np.asarray(centre)
    matrixScales = [float(np.max(corners[:, column] ** 2)) for row in range(3) for column in range(3)]
    return [max(v, 1e-6) for v in matrixScales] + [1.0, 1.0, 1.0]


def _affineToRas(affine):
    """4x4 RAS matrix of a SimpleITK AffineTransform (LPS)."""
    matrix = np.array(affine.GetMatrix()).reshape(3, 3)
    center, translation = np.array(affine.GetCenter()), np.array(affine.GetTranslation())
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + center - matrix @ center
    return flipTransformLpsRas(lps)


def _transformToField(transform, shape, ijkToRas):
    """Displacement field [k, j, i, 3] in RAS of a SimpleITK (LPS) transform on a grid."""
    reference = _sitkImage(np.zeros(shape, np.uint8), ijkToRas, np.uint8)
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, reference.GetSize(),
                                              reference.GetOrigin(), reference.GetSpacing(), reference.GetDirection())
    return flipPointsLpsRas(sitk.GetArrayFromImage(field))  # flip x, y components back to RAS


# ----------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------

def _checkMask(mask, shape, ijkToRas, which):
    if mask is None:
        return None
    geometry = None
    if isinstance(mask, (tuple, list)) and len(mask) == 2:
        mask, geometry = mask
    mask = np.asarray(mask)
    if mask.shape != tuple(shape) or (geometry is not None and not np.allclose(geometry, ijkToRas, atol=1e-6)):
        raise UserInputError(
            f"The {which} mask is on a different grid (shape {mask.shape}) than the {which} image (shape "
            f"{tuple(shape)}): resample the mask onto the {which} image grid (nearest neighbour) first.")
    if not mask.any():
        raise UserInputError(f"The {which} mask is empty: give a mask with the region to register, or none.")
    return (mask > 0).astype(np.uint8)


def _normalized(array, mask, percentiles):
    array = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(array)
    values = array[(mask > 0) & finite] if mask is not None else array[finite]
    if values.size == 0:
        return array
    low, high = np.percentile(values, percentiles)
    if high <= low:
        return array
    return np.clip(array, low, high)


def _overlap(initialMapping, fixedShape, fixedIjkToRas, fixedMask, movingShape, movingIjkToRas, footprint):
    """(fraction, voxels) over (masked) fixed voxels, subsampled: the fraction the initial mapping puts inside the
    moving footprint and their estimated number (a cheap check before any image is built)."""
    step = max(1, int(round((np.prod(fixedShape) / 50_000) ** (1 / 3))))
    k, j, i = np.meshgrid(*(np.arange(0, n, step) for n in fixedShape), indexing="ij")
    keep = np.ones(k.shape, bool) if fixedMask is None else fixedMask[k, j, i] > 0
    ijk = np.stack([i[keep], j[keep], k[keep]], axis=1).astype(float)
    if len(ijk) == 0:
        return 0.0, 0
    mapped = _evaluateChunked(initialMapping, ijkToRasPoints(fixedIjkToRas, ijk))
    with np.errstate(invalid="ignore"):
        mijk = np.rint(np.nan_to_num(rasToIjkPoints(movingIjkToRas, mapped), nan=-1.0, posinf=-1.0, neginf=-1.0))
    mijk = mijk.astype(np.int64)
    upper = np.array(movingShape[::-1])
    inside = np.all((mijk >= 0) & (mijk < upper), axis=1)
    hits = np.zeros(len(mijk), bool)
    idx = mijk[inside]
    hits[inside] = footprint[idx[:, 2], idx[:, 1], idx[:, 0]] > 0
    return float(hits.mean()), int(hits.sum()) * step**3


def _taper(shape, ijkToRas, fixedIjkToRas, box, rampMm):
    """Weights on a [k, j, i] lattice: 1 inside the fixed-index box, smoothly (cubic smoothstep) down to 0 at
    `rampMm` outside it."""
    toFixed = indexToIndex(ijkToRas, fixedIjkToRas)  # lattice ijk -> fixed ijk
    spacing = spacingOf(fixedIjkToRas)[::-1]  # k, j, i
    weight = np.ones(shape)
    lo, hi = box
    for axis in range(3):  # axis in [k, j, i]; lattice axes are aligned with the fixed axes
        ijkAxis = 2 - axis
        index = np.arange(shape[axis], dtype=float)
        fixedIndex = toFixed[ijkAxis, ijkAxis] * index + toFixed[ijkAxis, 3]
        distance = np.maximum(lo[axis] - fixedIndex, 0) + np.maximum(fixedIndex - hi[axis], 0)
        t = np.clip(1 - distance * spacing[axis] / max(rampMm, 1e-9), 0, 1)
        w = t * t * (3 - 2 * t)
        weight *= w.reshape([-1 if a == axis else 1 for a in range(3)])
    return weight


class _Observer:
    """Iteration observer: progress, cancel, NaN detection (SimpleITK command callbacks)."""

    def __init__(self, method, progress, start, stop, levels, iterationsPerLevel, stage):
        self.method, self.progress, self.start, self.stop = method, progress, start, stop
        self.levels, self.iterationsPerLevel, self.stage = levels, iterationsPerLevel, stage
        self.count = 0
        self.cancelled = None
        self.nan = False
        self.last = start

    def __call__(self):
        self.count += 1
        if self.cancelled is not None or self.nan:
            return
        value = self.method.GetMetricValue()
        if not math.isfinite(value):
            self.nan = True
            self.method.StopRegistration()
            return
        level = self.method.GetCurrentLevel()
        within = min(self.method.GetOptimizerIteration() / max(self.iterationsPerLevel, 1), 1.0)
        fraction = max(self.last, self.start + (self.stop - self.start) * (level + within) / self.levels)
        self.last = fraction
        try:
            report(self.progress, fraction, f"{self.stage} level {level + 1}/{self.levels}, metric {value:.4f}")
        except Cancelled as error:
            self.cancelled = error
            self.method.StopRegistration()


def _method(settings, fixedMask, movingMask, shrink, sigmas, shape, validFraction=1.0, maxSamples=None,
            percentage=None):
    """A registration method with Mattes MI. percentage >= 1 (the default): every voxel of the fixed image, at
    voxel centres (ITK's dense strategy). Otherwise random samples: `percentage` of the valid voxels of each level
    (those the current mapping puts in the histology footprint: validFraction of the fixed domain), at least 2000
    (small images, coarse levels) and at most maxSamples. Samples falling outside the footprint are discarded by
    ITK, hence the scaling. ITK jitters random (and regular) samples inside their voxels; see _denseSamples."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(settings["histogramBins"]))
    maxSamples = float("inf") if maxSamples is None else maxSamples
    percentage = 1.0 if percentage is None else percentage
    voxels = float(np.prod(shape))
    percentages = []
    for factor in shrink:
        levelVoxels = voxels / factor**3
        validVoxels = max(levelVoxels * validFraction, 1.0)
        samples = min(max(percentage * validVoxels, 2000.0), maxSamples)
        percentages.append(min(samples / validVoxels, 1.0))
    if min(percentages) >= 1.0:  # every voxel, on the grid: no sampling noise at all
        method.SetMetricSamplingStrategy(method.NONE)
    else:
        method.SetMetricSamplingStrategy(method.RANDOM)
        # seed 0 is sitkWallClock in SimpleITK (a different sample set every run): never pass it
        method.SetMetricSamplingPercentagePerLevel(percentages, max(int(settings["seed"]), 1))
    if fixedMask is not None:
        method.SetMetricFixedMask(fixedMask)
    if movingMask is not None:
        method.SetMetricMovingMask(movingMask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel([int(s) for s in shrink])
    method.SetSmoothingSigmasPerLevel([float(s) for s in sigmas])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return method


def _denseSamples(fixed, mask, maxSamples):
    """(fixed, mask) restricted to every n-th voxel along each axis, n the smallest with valid / n^3 <= maxSamples
    (valid: the mask's voxels), for ITK's dense sampling: every sample at a voxel centre of the MRI.

    Why not ITK's random or regular sampling: both jitter each sample inside its voxel, so the fixed image is
    interpolated between noisy voxels. Measured on the sample data (seed 0, 12 landmarks, same 170 000 samples):
    held-out TRE -30 % dense, -15 % random, +4 % regular (jittered); with 40 000 random samples -14 %."""
    valid = max(int(np.count_nonzero(sitk.GetArrayViewFromImage(mask))), 1)
    stride = 1
    while valid / stride**3 > maxSamples:
        stride += 1
    if stride == 1:
        return fixed, mask
    return fixed[::stride, ::stride, ::stride], mask[::stride, ::stride, ::stride]


def correctBiasField(movingArray, mask, spacingMm, fieldSpacingMm=1.0, maxVoxels=50_000) -> np.ndarray:
    """float32 copy of `movingArray` [k, j, i] (voxel size `spacingMm`, [x, y, z] or one number) divided by its
    smooth multiplicative intensity non-uniformity, fitted by N4 (SimpleITK N4BiasFieldCorrection) over `mask`.

    The field is one cubic B-spline level with knots about `fieldSpacingMm` apart (at least one span per axis):
    a physical scale, so a small field of view cannot turn anatomy into "shading" (N4's default levels are
    relative to the image extent). It is fitted on a copy shrunk to at most maxVoxels voxels (the shrink keeps
    this under a second) and evaluated at full resolution.

    Light-sheet stacks darken with depth (scattering, absorption) and carry illumination shading; mutual
    information treats the same tissue at two brightnesses as two tissues and trades geometry for intensity.
    Measured on the sample data (depth attenuation exp(-z / 6 mm), stripes, shadows) started from the TRUE mapping:
    the affine stage drifted to a held-out error of 0.038 mm (1.6 % compression along the depth) without the
    correction, 0.011 mm with it (0.032 mm with 4 mm knots, 0.010 mm with N4's default three levels)."""
    array = np.asarray(movingArray, dtype=np.float32)
    inside = np.asarray(mask) > 0
    if not inside.any():
        return array.copy()
    spacing = np.broadcast_to(np.asarray(spacingMm, dtype=float), (3,))
    offset = max(0.0, 1.0 - float(array[inside].min()))  # N4 works on log intensities: keep them positive
    image = sitk.GetImageFromArray(array + np.float32(offset))
    image.SetSpacing([float(v) for v in spacing])
    maskImage = sitk.GetImageFromArray(inside.astype(np.uint8))
    maskImage.CopyInformation(image)
    shrink = 1
    while array.size / shrink**3 > maxVoxels and min(array.shape) // (shrink + 1) >= 4:
        shrink += 1
    small, smallMask = ((sitk.Shrink(image, [shrink] * 3), sitk.Shrink(maskImage, [shrink] * 3)) if shrink > 1
                        else (image, maskImage))
    if not sitk.GetArrayViewFromImage(smallMask).any():
        return array.copy()
    extent = np.array(image.GetSize()) * spacing  # x, y, z (mm)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([50])
    n4.SetNumberOfControlPoints([int(3 + max(1, math.floor(e / fieldSpacingMm))) for e in extent])
    n4.Execute(small, smallMask)
    logField = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image)).astype(np.float32)
    return (array + np.float32(offset)) / np.exp(logField)

def _run(method, fixed, moving, progress, start, stop, levels, iterations, stage):
    observer = _Observer(method, progress, start, stop, levels, iterations, stage)
    method.AddCommand(sitk.sitkIterationEvent, observer)
    began = time.perf_counter()
    method.Execute(fixed, moving)
    observer.seconds = time.perf_counter() - began
    if observer.cancelled is not None:
        raise observer.cancelled
    logging.info("refine %s: %d iterations in %.1f s, %s", stage, observer.count, observer.seconds,
                 method.GetOptimizerStopConditionDescription())
    return observer


def _metric(settings, fixed, moving, fixedMask, movingMask, movingInitial, transform):
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(settings["histogramBins"]))
    if fixedMask is not None:
        method.SetMetricFixedMask(fixedMask)
    if movingMask is not None:
        method.SetMetricMovingMask(movingMask)
    method.SetInterpolator(sitk.sitkLinear)
    # `transform` rides in the moving initial transform, the optimised one is the identity: ITK requires an
    # optimised displacement field to share the fixed image's grid, and the refinement's field is sampled on a
    # coarser lattice whenever the MRI has more than maxFieldPoints voxels (a 50 um MRI raised "Virtual domain
    # and moving transform displacement field must have the same size").
    method.SetMovingInitialTransform(sitk.CompositeTransform([movingInitial, transform]))
    method.SetInitialTransform(sitk.TranslationTransform(3))
    return method.MetricEvaluate(fixed, moving)


class _Stop(Exception):
    """refineRegistration ends early and keeps the landmark-only result, for `reason`."""

    def __init__(self, reason, metricBefore=float("nan"), overlapFraction=None):
        super().__init__(reason)
        self.reason, self.metricBefore, self.overlapFraction = reason, metricBefore, overlapFraction


@dataclass
class _Inputs:
    """refineRegistration's arguments, checked: 3-D arrays, 4x4 geometries, uint8 masks on their image's grid."""

    fixed: np.ndarray
    fixedIjkToRas: np.ndarray
    moving: np.ndarray
    movingIjkToRas: np.ndarray
    fixedMask: Optional[np.ndarray]
    movingMask: Optional[np.ndarray]  # the caller's; None: the histology footprint is computed


@dataclass
class _Images:
    """The SimpleITK side of a refinement: normalised images, the metric's sampling mask in MRI space, the
    landmark mapping as the moving initial transform, and the metric at the landmark start."""

    fixed: sitk.Image
    moving: sitk.Image
    samplingMask: sitk.Image
    initial: sitk.Transform
    footprint: np.ndarray  # the moving mask the metric uses (the caller's or the eroded footprint)
    overlap: float
    metricBefore: float = float("nan")
    biasCorrected: bool = False


@dataclass
class _Region:
    """Where both stages sample: the fixed-index box of the valid samples (`box`), the fixed image and sampling
    mask cropped to it (+1 voxel), and the B-spline mesh's region (the box + one control spacing)."""

    box: tuple
    croppedFixed: sitk.Image
    croppedMask: sitk.Image
    validFraction: float
    mesh: tuple  # [k, j, i] (lo, hi), RefinementResult.region
    meshImage: sitk.Image
    centre: tuple  # the affine's centre of rotation/scaling: the box's centre


def _checkInputs(fixedArray, fixedIjkToRas, movingArray, movingIjkToRas, fixedMask, movingMask) -> _Inputs:
    fixedArray, movingArray = np.asarray(fixedArray), np.asarray(movingArray)
    if fixedArray.ndim != 3 or movingArray.ndim != 3:
        raise UserInputError(f"Refinement needs 3-D [k, j, i] volumes, got {fixedArray.shape} and {movingArray.shape}.")
    if min(fixedArray.shape) < 4 or min(movingArray.shape) < 4:
        raise UserInputError("Refinement needs volumes at least 4 voxels along every axis.")
    fixedIjkToRas, _ = _geometry(fixedIjkToRas)
    movingIjkToRas, _ = _geometry(movingIjkToRas)
    fixedMask = _checkMask(fixedMask, fixedArray.shape, fixedIjkToRas, "fixed (MRI)")
    movingMask = _checkMask(movingMask, movingArray.shape, movingIjkToRas, "moving (histology)")
    return _Inputs(fixedArray, fixedIjkToRas, movingArray, movingIjkToRas, fixedMask, movingMask)


def _footprintAndOverlap(inputs, initialMapping, settings, progress):
    """(moving mask, overlap fraction); stops on NaN voxels, an empty footprint or too little overlap."""
    for label, array in (("MRI", inputs.fixed), ("histology", inputs.moving)):
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise _Stop(f"the {label} volume has voxels that are not a number (NaN/inf): the metric "
                        f"would be NaN; fix or mask them")
    footprint = inputs.movingMask
    if footprint is None:
        footprint = histologyFootprint(inputs.moving, settings["footprintErosionVoxels"])
        if not footprint.any():
            raise _Stop("the histology footprint is empty (stack blank or too small to erode)")
    report(progress, 0.0, "refinement: preparing")
    overlap, overlapVoxels = _overlap(initialMapping, inputs.fixed.shape, inputs.fixedIjkToRas, inputs.fixedMask,
                                      inputs.moving.shape, inputs.movingIjkToRas, footprint)
    if overlapVoxels < settings["minOverlapVoxels"]:
        raise _Stop(
            f"empty overlap: the landmark transform maps only ~{overlapVoxels} MRI voxels ({100 * overlap:.1f}%) into "
            f"the histology footprint (needs {settings['minOverlapVoxels']}); check landmarks and stack spacing",
            overlapFraction=overlap)
    return footprint, overlap


def _prepareImages(inputs, initialMapping, settings, progress) -> _Images:
    """The images, the sampling mask and the landmark start's metric; stops when that metric is not a number."""
    footprint, overlap = _footprintAndOverlap(inputs, initialMapping, settings, progress)
    percentiles = settings["intensityPercentiles"]
    fixed = _sitkImage(_normalized(inputs.fixed, inputs.fixedMask, percentiles), inputs.fixedIjkToRas)
    moving = _sitkImage(_normalized(inputs.moving, footprint, percentiles), inputs.movingIjkToRas)
    fixedMaskImage = None if inputs.fixedMask is None else _sitkImage(inputs.fixedMask, inputs.fixedIjkToRas, np.uint8)
    movingMaskImage = _sitkImage(footprint, inputs.movingIjkToRas, np.uint8)
    initial = initialTransform(initialMapping, inputs.fixed.shape, inputs.fixedIjkToRas, settings)
    report(progress, 0.05, "refinement: landmark transform sampled")
    # The metric is sampled in MRI space: the (masked) MRI voxels that the landmark mapping puts in the histology
    # footprint. A mask on the moving side instead would let the optimiser improve the metric by pushing badly
    # matching samples out of the footprint (biasing the deformation near the footprint's edges).
    samplingMask = sitk.Resample(movingMaskImage, fixed, initial, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if fixedMaskImage is not None:
        samplingMask = sitk.And(samplingMask, fixedMaskImage)
    images = _Images(fixed, moving, samplingMask, initial, footprint, overlap)
    images.metricBefore = _metric(settings, fixed, moving, samplingMask, None, initial, sitk.TranslationTransform(3))
    if not math.isfinite(images.metricBefore):
        raise _Stop("the similarity metric is not a number at the start (constant or NaN images?)")
    return images


def _correctHistologyShading(images, inputs, settings, progress):
    """Registers the N4-flattened histology instead (images.moving, metricBefore, biasCorrected) unless that makes
    the images much less alike at the landmark start."""
    report(progress, 0.05, "refinement: correcting the histology's intensity non-uniformity (N4)")
    # fitted over all the imaged tissue (the uneroded footprint, or the caller's mask): measured better than
    # over the eroded metric footprint, whose edges the field would have to extrapolate
    support = histologyFootprint(inputs.moving, 0) if inputs.movingMask is None else inputs.movingMask
    flat = correctBiasField(inputs.moving, support, spacingOf(inputs.movingIjkToRas), settings["biasFieldSpacingMm"],
                            settings["biasCorrectionMaxVoxels"])
    corrected = _sitkImage(_normalized(flat, images.footprint, settings["intensityPercentiles"]), inputs.movingIjkToRas)
    metricBefore = images.metricBefore
    metricCorrected = _metric(settings, images.fixed, corrected, images.samplingMask, None, images.initial,
                              sitk.TranslationTransform(3))
    # Not used when it makes the images much less alike at the landmark start: N4 cannot tell shading from
    # anatomy that varies as slowly (measured: a smooth-blob phantom lost 53 % of its mutual information).
    # Removing real shading changes it little at a rough start and raises it near alignment (sample data,
    # seeds 0-2, 12 and 6 landmarks, measured with N4's default three levels: -1.2 % to +4.5 %), hence a
    # tolerance rather than "must improve".
    if math.isfinite(metricCorrected) and \
            metricCorrected <= metricBefore + settings["biasCorrectionTolerance"] * abs(metricBefore):
        images.moving, images.metricBefore, images.biasCorrected = corrected, metricCorrected, True
    else:
        logging.warning("histology bias correction (N4) not used: it lowers the similarity at the start "
                        "(%.4f -> %.4f; lower is better), so the field it found is probably anatomy",
                        metricBefore, metricCorrected)


def _samplingRegion(images, fixedShape, settings) -> _Region:
    """Both stages sample the metric on the part of the MRI that sees histology, cropped tightly: ITK visits every
    voxel of the fixed image it is given (dense sampling) or draws random ones from it (discarding those outside
    the mask), so a loose crop costs time or valid samples. The B-spline mesh covers that box plus one control
    spacing, so the deformation can reach the box's edges and taper off beyond them."""
    samplingArray = sitk.GetArrayViewFromImage(images.samplingMask)
    if not samplingArray.any():
        raise _Stop("empty overlap: no MRI voxel maps into the histology footprint", images.metricBefore)
    valid = np.argwhere(samplingArray)  # (n, 3) as (k, j, i)
    box = (valid.min(axis=0), valid.max(axis=0))  # inclusive
    lo, hi = np.maximum(box[0] - 1, 0), np.minimum(box[1] + 1, np.array(fixedShape) - 1)
    regionShape = tuple(int(v) for v in hi - lo + 1)
    croppedFixed = sitk.RegionOfInterest(images.fixed, list(regionShape[::-1]), [int(v) for v in lo[::-1]])
    croppedMask = sitk.RegionOfInterest(images.samplingMask, croppedFixed.GetSize(), [int(v) for v in lo[::-1]])
    validFraction = max(float(sitk.GetArrayViewFromImage(croppedMask).mean()), 1e-6)
    spacingMm = float(settings["controlPointSpacingMm"])
    pad = np.ceil(spacingMm / np.array(images.fixed.GetSpacing())[::-1]).astype(int)  # k, j, i
    mesh = (np.maximum(box[0] - pad, 0), np.minimum(box[1] + pad, np.array(fixedShape) - 1))
    meshShape = tuple(int(v) for v in mesh[1] - mesh[0] + 1)
    meshImage = sitk.RegionOfInterest(images.fixed, list(meshShape[::-1]), [int(v) for v in mesh[0][::-1]])
    centre = croppedFixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in croppedFixed.GetSize()])
    return _Region(box, croppedFixed, croppedMask, validFraction, mesh, meshImage, centre)


def _affineStage(images, region, affine, settings, progress, progressRange) -> int:
    """Optimises `affine` in place over the sampled box; returns the iterations. Stops when the metric turns NaN."""
    method = _method(settings, region.croppedMask, None, settings["affineShrinkFactors"],
                     settings["affineSmoothingSigmas"], region.croppedFixed.GetSize()[::-1], region.validFraction,
                     settings["affineMaxSamples"], settings["affineSamplingPercentage"])
    # Regular-step gradient descent with physical-shift scales computed here from the region's corners
    # (ITK's estimator samples randomly, with a wall-clock seed, when the moving transform is not purely
    # affine: results would change from run to run). The first step shifts voxels by at most
    # affineStepVoxels fixed voxels and halves on every change of direction, so a start that is already at
    # the optimum (the landmark fit) stays within a fraction of a voxel of it.
    step = float(settings["affineStepVoxels"] * min(images.fixed.GetSpacing()))
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=step, minStep=step / 200,
                                                    numberOfIterations=int(settings["affineIterations"]),
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScales(_affineScales(region.croppedFixed, region.centre))
    method.SetMovingInitialTransform(images.initial)
    method.SetInitialTransform(affine, inPlace=True)
    observer = _run(method, region.croppedFixed, images.moving, progress, *progressRange,
                    len(settings["affineShrinkFactors"]), settings["affineIterations"], "affine")
    if observer.nan:
        raise _Stop("the affine stage diverged (metric became NaN)", images.metricBefore)
    return observer.count


def _bsplineStage(images, region, affine, settings, progress, progressRange):
    """(B-spline transform, iterations) optimised after `affine`, each coefficient bounded so the B-spline cannot
    fold. Stops when the metric turns NaN."""
    # The mesh covers the region only: control points elsewhere would get no image force, and their
    # number sets the cost of every metric evaluation (ITK's B-spline metric is samples x parameters).
    spacingMm = float(settings["controlPointSpacingMm"])
    physicalSize = np.array(region.meshImage.GetSpacing()) * (np.array(region.meshImage.GetSize()) - 1)
    meshSize = [max(1, int(round(size / spacingMm))) for size in physicalSize]
    bspline = sitk.BSplineTransformInitializer(region.meshImage, meshSize, order=3)
    controlSpacing = np.maximum(physicalSize, 1e-6) / np.array(meshSize)
    logging.info("refine B-spline mesh: %s control intervals, %s mm apart", meshSize,
                 np.array2string(controlSpacing, precision=2))
    bound = float(settings["maxCoefficientFraction"] * controlSpacing.min())
    bsplineFixed, bsplineMask = _denseSamples(region.croppedFixed, region.croppedMask, settings["maxSamples"])
    method = _method(settings, bsplineMask, None, settings["bsplineShrinkFactors"],
                     settings["bsplineSmoothingSigmas"], bsplineFixed.GetSize()[::-1], percentage=1.0)
    iterationsPerLevel = int(settings["bsplineIterations"])
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=iterationsPerLevel,
                                maximumNumberOfCorrections=5,
                                maximumNumberOfFunctionEvaluations=iterationsPerLevel,
                                costFunctionConvergenceFactor=1e7, lowerBound=-bound, upperBound=bound)
    method.SetMovingInitialTransform(sitk.CompositeTransform([images.initial, affine]))
    method.SetInitialTransform(bspline, inPlace=True)
    observer = _run(method, bsplineFixed, images.moving, progress, *progressRange,
                    len(settings["bsplineShrinkFactors"]), iterationsPerLevel, "B-spline")
    if observer.nan:
        raise _Stop("the B-spline stage diverged (metric became NaN)", images.metricBefore)
    return bspline, observer.count


def _optimise(images, region, settings, progress, timings):
    """(affine, B-spline or None, iterations) of the enabled stages; an ITK failure stops the refinement."""
    affine = sitk.AffineTransform(3)
    affine.SetCenter(region.centre)
    stages = [s for s in ("affine", "bspline") if settings[s]]
    ranges = {s: (0.05 + 0.85 * n / len(stages), 0.05 + 0.85 * (n + 1) / len(stages)) for n, s in enumerate(stages)}
    bspline, iterations = None, 0
    try:
        if settings["affine"]:
            began = time.perf_counter()
            iterations += _affineStage(images, region, affine, settings, progress, ranges["affine"])
            timings["affine"] = time.perf_counter() - began
        if settings["bspline"]:
            began = time.perf_counter()
            bspline, count = _bsplineStage(images, region, affine, settings, progress, ranges["bspline"])
            iterations += count
            timings["bspline"] = time.perf_counter() - began
    except RuntimeError as error:  # ITK exceptions: e.g. all samples map outside the moving image
        raise _Stop(f"SimpleITK registration failed: {failureMessage(error)}", images.metricBefore) from None
    return affine, bspline, iterations


def _refinementField(region, affine, bspline, fixedShape, fixedIjkToRas, settings):
    """(displacement [k, j, i, 3] RAS mm, its grid's IJK->RAS, the affine stage's RAS matrix): the refinement
    affine(bspline(x)) sampled on a lattice over the fixed grid."""
    fieldShape, fieldMatrix = _coarsenedGrid(fixedShape, fixedIjkToRas, settings["maxFieldPoints"])
    points = _gridPoints(fieldShape, fieldMatrix).reshape(fieldShape + (3,))
    if bspline is not None:
        # ITK's B-spline is zero outside its domain: taper it to zero over the control spacing beyond the
        # histology region so the refinement stays continuous (landmark-only + affine where there is no data).
        taper = _taper(fieldShape, fieldMatrix, fixedIjkToRas, region.box, float(settings["controlPointSpacingMm"]))
        points = points + taper[..., None] * _transformToField(bspline, fieldShape, fieldMatrix)
    affineRas = _affineToRas(affine)
    displacement = applyMatrix(affineRas, points) - _gridPoints(fieldShape, fieldMatrix).reshape(fieldShape + (3,))
    return displacement, fieldMatrix, affineRas


def _applyGuardRails(result, settings):
    """Rejects a refinement that diverged, folds or makes the images less alike; else says how the metric moved."""
    determinants = jacobianDeterminants(result.displacement, result.fieldIjkToRas, settings["jacobianSubsample"])
    result.minJacobianDeterminant = float(determinants.min())
    metricBefore, metricAfter = result.metricBefore, result.metricAfter
    if not (math.isfinite(metricAfter) and np.all(np.isfinite(result.displacement))):
        result.reject("the refinement diverged (metric or displacement not finite)")
    elif result.minJacobianDeterminant <= 0:
        result.reject(f"the refinement folds: Jacobian determinant down to {result.minJacobianDeterminant:.3f} "
                      f"on {int((determinants <= 0).sum())} grid points")
    elif metricAfter > metricBefore + settings["metricTolerance"] * abs(metricBefore):
        result.reject(f"the similarity got worse (metric {metricBefore:.4f} -> {metricAfter:.4f}; lower is better)")
    elif metricAfter < metricBefore:
        result.reason = f"similarity improved ({metricBefore:.4f} -> {metricAfter:.4f})"
    else:  # a start at the optimum: tiny changes of a sharply peaked full-resolution metric
        result.reason = f"similarity unchanged within tolerance ({metricBefore:.4f} -> {metricAfter:.4f})"


def refineRegistration(fixedArray, fixedIjkToRas, movingArray, movingIjkToRas, initialMapping, fixedMask=None,
                       movingMask=None, settings=None, progress=None) -> RefinementResult:
    """Refine `initialMapping` (fixed/MRI RAS -> moving/histology RAS) by intensity registration.

    fixedArray [k, j, i] with fixedIjkToRas: the MRI (or any reference grid). movingArray/movingIjkToRas: the
    downsampled histology. fixedMask: optional MRI brain mask on the fixed grid. movingMask: optional; when
    None the histology footprint is computed (`histologyFootprint`). Masks may also be (array, ijkToRas)
    pairs; a mask on another grid is a ValueError (the caller still holds the landmark result).
    settings: dict overriding DEFAULT_SETTINGS. progress: callable(fraction, message), may cancel.

    Returns a RefinementResult. Failures during the optimisation (empty overlap, NaN metric, divergence,
    folding, no improvement) do not raise: the result has accepted=False, a reason, and callers keep the
    landmark-only mapping. Cancelling raises progress.Cancelled.
    """
    start = time.perf_counter()
    settings = refinementSettings(settings)
    inputs = _checkInputs(fixedArray, fixedIjkToRas, movingArray, movingIjkToRas, fixedMask, movingMask)
    timings = {}
    try:
        result = _refineChecked(inputs, initialMapping, settings, progress, timings, start)
    except _Stop as stop:
        result = _identityResult(initialMapping, inputs.fixed.shape, inputs.fixedIjkToRas, settings, stop.reason,
                                 start, stop.metricBefore)
        if stop.overlapFraction is not None:
            result.overlapFraction = stop.overlapFraction
    except (RuntimeError, FloatingPointError, MemoryError, np.linalg.LinAlgError) as error:
        # ITK exceptions reach Python as RuntimeError, wherever they happen (metric evaluation, resampling, the
        # optimisers): the refinement is then rejected with ITK's message and the landmark-only result stands.
        logging.warning("refinement failed", exc_info=True)
        result = _identityResult(initialMapping, inputs.fixed.shape, inputs.fixedIjkToRas, settings,
                                 f"the registration failed: {failureMessage(error)}", start)
    result.seconds = time.perf_counter() - start
    result.timings = dict(timings, total=result.seconds)
    logging.info("%s", result.summary())
    return result


def failureMessage(error) -> str:
    """The last line of an exception's text (ITK's messages end with the description), or its type."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def failedRefinement(initialMapping, fixedShape, fixedIjkToRas, reason, settings=None) -> RefinementResult:
    """A rejected refinement (identity field) that keeps `initialMapping`, for a failure outside the optimiser."""
    return _identityResult(initialMapping, tuple(fixedShape), fixedIjkToRas, refinementSettings(settings), reason,
                           time.perf_counter())


def _refineChecked(inputs, initialMapping, settings, progress, timings, start) -> RefinementResult:
    images = _prepareImages(inputs, initialMapping, settings, progress)
    timings["prepare"] = time.perf_counter() - start
    if settings["histologyBiasCorrection"]:
        began = time.perf_counter()
        _correctHistologyShading(images, inputs, settings, progress)
        timings["bias_correction"] = time.perf_counter() - began
    region = _samplingRegion(images, inputs.fixed.shape, settings)
    affine, bspline, iterations = _optimise(images, region, settings, progress, timings)

    report(progress, 0.9, "refinement: sampling the displacement field")
    began = time.perf_counter()
    displacement, fieldMatrix, affineRas = _refinementField(region, affine, bspline, inputs.fixed.shape,
                                                            inputs.fixedIjkToRas, settings)
    metricAfter = _metric(settings, images.fixed, images.moving, images.samplingMask, None, images.initial,
                          _fieldTransform(displacement, fieldMatrix))
    timings["field"] = time.perf_counter() - began
    result = RefinementResult(initialMapping, displacement, fieldMatrix, images.metricBefore, metricAfter, iterations,
                              time.perf_counter() - start, accepted=True, reason="", settings=settings,
                              refinementAffine=affineRas, overlapFraction=images.overlap, region=region.mesh,
                              biasCorrected=images.biasCorrected)
    began = time.perf_counter()
    _applyGuardRails(result, settings)
    timings["guard_rails"] = time.perf_counter() - began
    report(progress, 1.0, "refinement: done")
    return result


# ----------------------------------------------------------------------------------------------------------
# Guard rail: landmarks through the full composite
# ----------------------------------------------------------------------------------------------------------

def evaluateAgainstLandmarks(result, fixedPoints, movingPoints, toleranceMm=None) -> dict:
    """Landmark residuals (mm) before (initial mapping) and after (full composite); may reject the result.

    fixedPoints/movingPoints: (N, 3) paired RAS points (MRI, histology). The refinement is rejected
    (accepted=False, reason) when the median residual grows by more than `toleranceMm` (default: the
    `landmarkToleranceMm` setting). The same call measures held-out points (TRE) without rejecting when
    toleranceMm=float('inf'). Returns and stores (result.landmarkResiduals) a dict with per-point arrays and
    summary numbers."""
    fixedPoints, movingPoints = asPoints(fixedPoints), asPoints(movingPoints)
    if len(fixedPoints) != len(movingPoints):
        raise UserInputError(f"Landmark lists differ in length ({len(fixedPoints)} vs {len(movingPoints)}): pair them by label first.")
    if toleranceMm is None:
        toleranceMm = (result.settings or DEFAULT_SETTINGS)["landmarkToleranceMm"]
    before = np.linalg.norm(result.initialMapping.transformPoints(fixedPoints) - movingPoints, axis=1)
    after = np.linalg.norm(result.transformPoints(fixedPoints) - movingPoints, axis=1)
    summary = {
        "before": before, "after": after,
        "medianBefore": float(np.median(before)), "medianAfter": float(np.median(after)),
        "meanBefore": float(before.mean()), "meanAfter": float(after.mean()),
        "maxBefore": float(before.max()), "maxAfter": float(after.max()),
        "toleranceMm": float(toleranceMm),
    }
    result.landmarkResiduals = summary
    if result.accepted and summary["medianAfter"] > summary["medianBefore"] + toleranceMm:
        result.reject(f"landmark agreement worsened: median residual {summary['medianBefore']:.3f} -> "
                      f"{summary['medianAfter']:.3f} mm (tolerance +{toleranceMm:.2f} mm)")
    return summary


# ----------------------------------------------------------------------------------------------------------
# MRML
# ----------------------------------------------------------------------------------------------------------

def refinementTransformNode(scene, result, name="Refinement"):
    """A vtkMRMLGridTransformNode holding result's refinement displacement as its FROM-PARENT transform (RAS).

    Put it as the parent of the landmark transform node (landmarkNode.SetAndObserveTransformNodeID(node.GetID()))
    and the world -> histology chain is landmark_fromParent(refinement_fromParent(x)) = result.transformPoints(x);
    hardening or the single-resampling step then use the composite without a second resampling."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    from MRIHistoRegLib.volumes import numpyToMatrix

    m, spacing = _geometry(result.fieldIjkToRas)
    field = np.ascontiguousarray(result.displacement, dtype=np.float64)
    image = vtk.vtkImageData()
    image.SetDimensions(field.shape[2], field.shape[1], field.shape[0])
    image.SetOrigin(*m[:3, 3])
    image.SetSpacing(*spacing)
    vectors = numpy_support.numpy_to_vtk(field.reshape(-1, 3), deep=True)
    vectors.SetNumberOfComponents(3)
    vectors.SetName("DisplacementField")
    image.GetPointData().SetScalars(vectors)
    direction = np.eye(4)
    direction[:3, :3] = m[:3, :3] / spacing
    grid = slicer.vtkOrientedGridTransform()
    grid.SetDisplacementGridData(image)
    grid.SetGridDirectionMatrix(numpyToMatrix(direction))
    grid.SetInterpolationModeToLinear()
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    node.SetAndObserveTransformFromParent(grid)
    node.SetAttribute("MRIHistoReg.refinementAccepted", "true" if result.accepted else "false")
    node.SetAttribute("MRIHistoReg.refinementReason", result.reason)
    return node


def composedTransformNode(scene, refinementNode, landmarkNode, name="MRI to histology (refined)", outputNode=None):
    """A transform node (no parent) whose FROM-PARENT transform is landmarkChain(refinement_fromParent(x)), built
    explicitly as one vtkGeneralTransform (refinement first). landmarkChain is world -> landmarkNode, i.e. the
    landmark node's own from-parent transform after those of its parents (the mapping the refinement started
    from: refineRegistration's initial = transforms.mappingFromWorldToNode(landmarkNode)); the refinement node is
    used by its own from-parent transform (its parents are ignored). Every piece is copied, so the result does
    not follow later refits of the inputs, which are left unchanged. `outputNode` (a vtkMRMLTransformNode, not
    one of the inputs) is filled instead of creating a new node.

    Not via HardenTransform: hardening an identity node placed under landmark-under-refinement was measured (slicer-
    core 5.13) to give the reversed order refinement(landmark(x)) (test_composedTransformNodeOrder)."""
    import slicer
    import vtk

    if outputNode is not None and outputNode in (refinementNode, landmarkNode):
        raise UserInputError("The refined transform must be a separate node: pick or create another output transform.")
    landmarkChain = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, landmarkNode, landmarkChain)
    general = vtk.vtkGeneralTransform()
    general.PostMultiply()  # each Concatenate applies after the previous ones
    for transform in (refinementNode.GetTransformFromParent(), landmarkChain):
        pieces = vtk.vtkCollection()  # flattened in order, inverses resolved
        slicer.vtkMRMLTransformNode.FlattenGeneralTransform(pieces, transform)
        for i in range(pieces.GetNumberOfItems()):
            piece = pieces.GetItemAsObject(i)
            copy = piece.MakeTransform()
            copy.DeepCopy(piece)
            general.Concatenate(copy)
    node = outputNode if outputNode is not None else scene.AddNewNodeByClass("vtkMRMLTransformNode", name)
    node.SetAndObserveTransformNodeID(None)
    node.SetAndObserveTransformFromParent(general)
    return node
