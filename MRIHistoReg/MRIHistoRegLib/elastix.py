"""Intensity refinement with itk-elastix: mutual information + bending energy + the landmark pairs in one cost.

Why elastix (measured on two real MRI/microscopy pairs and on the sample, bench/refine.py; /work/shared/DESIGN.md
section 8): SimpleITK's registration framework has no smoothness term for a B-spline, so a mesh fine enough to
follow local shrinkage over-fits; elastix's multi-metric registration adds TransformBendingEnergyPenalty and the
landmark pairs (CorrespondingPointsEuclideanDistanceMetric) to AdvancedMattesMutualInformation.

Composition. The landmark mapping L (MRI RAS -> histology RAS) cannot be elastix's initial transform once bending
energy is in the cost ("AdvancedTransformAdapter: Not implemented"), and elastix would apply its B-spline after it,
in histology space. Instead the histology is resampled through L onto the working grid W (a grid in MRI space)
first, elastix registers the MRI (fixed) to that image (moving) and finds T(x) = x + d(x), and the result is

    M(x) = L(x + d(x))

which is exactly refine.RefinementResult's composition (initial(refinement(x))): the guard rails, the landmark
check, the Slicer grid-transform node and report.json's section work unchanged.

Coordinates. Our arrays are [k, j, i] with a RAS IJK->RAS matrix; ITK (and elastix, and its point-set files)
work in LPS physical space: x and y change sign (geometry.flipPointsLpsRas). transformix's deformation field
holds LPS displacement vectors on the fixed grid; they are flipped back to RAS before they become d(x).

Threads: elastix is left at its default (all cores); number_of_threads > 1 passed explicitly segfaults (upstream
ITKElastix issues). The first elastix call of a process loads its wrapping for 10-30 s: `loadEngine` does it once
(cached), `preloadInBackground` starts it in a thread (the panel calls it when the module opens).
"""
import logging
import math
import os
import tempfile
import threading
import time
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .errors import UserInputError
from .geometry import applyMatrix, flipPointsLpsRas, gridPoints, spacingOf
from .progress import Cancelled, report

ENGINE_NAME = "elastix"
# The working grid's default spacing when the caller gives none (the panel): measured, not the MRI's spacing
# (issue 15: 0.1 mm beat 0.2 mm by 40 % on a real pair, 0.05 mm gained nothing at 3x the cost; bench/refine.py)
DEFAULT_WORKING_SPACING_MM = 0.1

# Elastix engine settings (names shared with the SimpleITK engine where the meaning is the same). The values are
# measured (bench/refine.py; figures in README): see the module docstring and DESIGN.md section 8.
DEFAULT_SETTINGS = {
    "engine": ENGINE_NAME,
    "metricWeight": 1.0,  # AdvancedMattesMutualInformation
    "bendingWeight": 1.0,  # TransformBendingEnergyPenalty (10 over-smooths, 0.1 under-regularises)
    "pointsWeight": 0.1,  # CorrespondingPointsEuclideanDistanceMetric (1+ makes the spline fit the landmark noise)
    "landmarkSdMm": None,  # stated landmark placement SD (mm, MRI and histology combined); scales pointsWeight
    "landmarkReferenceSdMm": 0.05,  # the SD pointsWeight was tuned for: weight = pointsWeight * ref / sd
    # landmarks per mm3 of the registered footprint pointsWeight was tuned at (the sample: 12 pairs over ~160 mm3);
    # the weight follows (density / reference)^exponent, so dense pairs on a small footprint keep their pull
    "landmarkDensityReference": 0.075,
    "landmarkDensityExponent": 1.0,
    "histogramBins": 32,
    "controlPointSpacingMm": 2.0,  # the B-spline's FINAL grid spacing (mm)
    "affineStage": "auto",  # an affine map (MI + landmarks) first: True, False, or "auto" = with fewer than
    # AFFINE_BELOW_PAIRS landmark pairs (measured: seeds 0-2 with 6 pairs -43/-33/-66 % -> -69/-52/-69 % TRE;
    # with 12 pairs on seed 0 worse, -46 -> -32 %)
    "resolutions": 3,
    "gridSpacingSchedule": (4, 2, 1),  # control grid per resolution, as multiples of the final spacing
    "pyramidSchedule": (4, 2, 1),  # smoothing pyramid per resolution (isotropic factors)
    "iterations": 250,  # ASGD iterations per resolution
    "samples": 3000,  # random coordinates per iteration (new ones every iteration)
    "histologyBiasCorrection": True,  # N4 on the histology (in working space) first: shading biases MI
    "biasFieldSpacingMm": 1.0,
    # N4 on the MRI too (receive-coil shading), with coarser knots than the histology's: the MRI's shading is
    # smooth, and 1 mm knots would start to flatten anatomy (measured 3 / 4 / 6 mm: README)
    "mriBiasCorrection": True,
    "mriBiasFieldSpacingMm": 4.0,
    "footprintErosionVoxels": 2,  # of the histology footprint (partial-volume edges), in working voxels
    "marginMm": 2.0,  # working grid = footprint box under L + this margin; the refinement tapers to 0 across it
    "minOverlapVoxels": 2000,  # working voxels the fixed mask must keep
    "intensityPercentiles": (0.5, 99.5),
    "seed": 1,  # elastix's random sampler seed: same input + settings = same result
    "jacobianSubsample": 2,  # guard rails (as the SimpleITK engine)
    "landmarkToleranceMm": 0.2,
    "metricTolerance": 0.05,
    "parameterOverrides": None,  # {elastix parameter: value or list} written on top of the map (expert use)
    # after an accepted refinement, with MRI tumour labels given: tumourfocus.py's strain + shift of each label's
    # region (measured: README, "Intensity refinement"); its Gaussian's SD and the mask's margin beyond the label
    "tumourFocus": True,
    "tumourFocusSigmaMm": 1.0,
    "tumourFocusGrowMm": 0.5,
}

AFFINE_BELOW_PAIRS = 9  # "auto" affine map below this many landmark pairs (measured at 6: on, 12: off)

_engine = {"module": None, "loadSeconds": None, "error": None}
_engineLock = threading.Lock()


def elastixSettings(settings=None) -> dict:
    """DEFAULT_SETTINGS updated with `settings`; unknown keys and impossible values are the user's to fix."""
    merged = dict(DEFAULT_SETTINGS)
    if settings:
        unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
        if unknown:
            raise UserInputError(f"Unknown elastix refinement setting(s) {unknown}; valid names: "
                                 f"{sorted(DEFAULT_SETTINGS)}.")
        merged.update(settings)
    for name in ("controlPointSpacingMm", "iterations", "samples", "resolutions", "histogramBins",
                 "biasFieldSpacingMm", "mriBiasFieldSpacingMm"):
        if not float(merged[name]) > 0:
            raise UserInputError(f"The elastix setting {name} must be > 0, got {merged[name]}.")
    for name in ("gridSpacingSchedule", "pyramidSchedule"):
        if len(merged[name]) != int(merged["resolutions"]):
            raise UserInputError(f"{name} needs one entry per resolution ({int(merged['resolutions'])}), "
                                 f"got {list(merged[name])}.")
    if merged["affineStage"] not in (True, False, "auto"):
        raise UserInputError(f"affineStage must be true, false or \"auto\", got {merged['affineStage']!r}.")
    from .tumourfocus import settingsProblem

    problem = settingsProblem(merged)
    if problem:
        raise UserInputError(f"The elastix setting {problem}.")
    if not isinstance(merged["tumourFocus"], bool):
        raise UserInputError(f"tumourFocus must be true or false, got {merged['tumourFocus']!r}.")
    sd = merged["landmarkSdMm"]
    if sd is not None and not float(sd) > 0:
        raise UserInputError(f"landmarkSdMm must be a positive number of mm (or null), got {sd}.")
    return merged


# ----------------------------------------------------------------------------------------------------------
# The engine: found, loaded once per process
# ----------------------------------------------------------------------------------------------------------

def available() -> tuple:
    """(True, "") when itk-elastix can be imported, else (False, why) - without loading it."""
    import importlib.util

    try:
        found = importlib.util.find_spec("itk") is not None and importlib.util.find_spec("itk.ElastixPython") is not None
    except (ImportError, ValueError) as error:
        return False, f"itk-elastix cannot be imported ({error})"
    return (True, "") if found else (False, "itk-elastix is not installed in this Python")


def loadEngine():
    """The itk module with elastix loaded (once per process; later calls return at once). RuntimeError when it
    cannot be loaded; loadSeconds() then says how long the one-time load took."""
    with _engineLock:
        if _engine["module"] is not None:
            return _engine["module"]
        began = time.perf_counter()
        try:
            import itk

            # itk loads its wrappings lazily: touching the classes does the one-time load (10-30 s)
            itk.ParameterObject.New()
            itk.ElastixRegistrationMethod  # noqa: B018
            itk.TransformixFilter  # noqa: B018
        except Exception as error:  # noqa: BLE001 - a broken install is reported, the SimpleITK engine remains
            _engine["error"] = f"itk-elastix could not be loaded: {error}"
            raise RuntimeError(_engine["error"]) from None
        _engine["module"], _engine["loadSeconds"] = itk, time.perf_counter() - began
        logging.getLogger(__name__).info("itk-elastix loaded in %.1f s (once per session)", _engine["loadSeconds"])
        return itk


def loadSeconds() -> Optional[float]:
    """Seconds the one-time engine load took in this process (None before it)."""
    return _engine["loadSeconds"]


def preloadInBackground() -> Optional[threading.Thread]:
    """Start loading the engine in a daemon thread (when it is installed and not loaded yet); returns the thread."""
    if _engine["module"] is not None or not available()[0]:
        return None

    def load():
        try:
            loadEngine()
        except RuntimeError:
            logging.getLogger(__name__).warning("%s", _engine["error"])

    thread = threading.Thread(target=load, name="elastix-preload", daemon=True)
    thread.start()
    return thread


# ----------------------------------------------------------------------------------------------------------
# Working grid and images
# ----------------------------------------------------------------------------------------------------------

def workingGrid(mriShape, mriIjkToRas, spacingMm, box=None):
    """(shape [k, j, i], IJK->RAS) of a grid with the MRI's directions at `spacingMm`, over the MRI's field of view
    or over `box` (RAS-aligned to the MRI axes: (lo, hi) continuous MRI indices along i, j, k)."""
    m = np.asarray(mriIjkToRas, float)
    spacing = spacingOf(m)
    directions = m[:3, :3] / spacing
    shapeIjk = np.asarray(mriShape[::-1], float)
    lo, hi = (np.full(3, -0.5), shapeIjk - 0.5) if box is None else box
    # start on an MRI voxel edge: at the MRI's own spacing the working voxels are the MRI's (no interpolation blur)
    lo = np.floor(np.asarray(lo, float) + 0.5) - 0.5
    extentMm = (np.asarray(hi) - np.asarray(lo)) * spacing
    count = np.maximum(np.ceil(extentMm / spacingMm).astype(int), 2)
    out = np.eye(4)
    out[:3, :3] = directions * spacingMm
    startRas = m[:3, :3] @ np.asarray(lo, float) + m[:3, 3]  # the box's corner (a voxel edge)
    out[:3, 3] = startRas + out[:3, :3] @ np.full(3, 0.5)  # first voxel centre
    return tuple(int(c) for c in count[::-1]), out


def _sample(array, ijkToRas, points, order=1, cval=0.0):
    """array [k, j, i] sampled at RAS `points` (N, 3), linear (order 1) or nearest (0); `cval` outside."""
    from scipy import ndimage

    ijk = applyMatrix(np.linalg.inv(np.asarray(ijkToRas, float)), points)
    return ndimage.map_coordinates(np.asarray(array, np.float32), ijk[:, ::-1].T, order=order, mode="constant",
                                   cval=cval, prefilter=False)


def _smoothForGrid(array, ijkToRas, targetSpacingMm):
    """Gaussian anti-aliasing of an image before sampling it on a coarser grid (none where it is not finer)."""
    from scipy import ndimage

    spacing = spacingOf(ijkToRas)
    sigma = np.sqrt(np.maximum(np.asarray(targetSpacingMm, float) ** 2 - spacing ** 2, 0.0)) / 2.355 / spacing
    if not np.any(sigma > 0.1):
        return np.asarray(array, np.float32)
    return ndimage.gaussian_filter(np.asarray(array, np.float32), sigma[::-1], mode="nearest")


def _mappedPoints(mapping, points, chunk=200_000):
    out = np.empty_like(points)
    for start in range(0, len(points), chunk):
        out[start:start + chunk] = mapping.transformPoints(points[start:start + chunk])
    return out


def footprintBox(mriShape, mriIjkToRas, histologyShape, histologyIjkToRas, mapping, marginMm):
    """(lo, hi) continuous MRI indices (i, j, k) of the MRI voxels L maps inside the histology's field of view,
    grown by marginMm; None when none does."""
    from .refine import _coarsenedGrid

    shape, lattice = _coarsenedGrid(mriShape, mriIjkToRas, 200_000)
    points = gridPoints(shape, lattice)
    mapped = _mappedPoints(mapping, points)
    ijk = applyMatrix(np.linalg.inv(np.asarray(histologyIjkToRas, float)), mapped)
    inside = np.all((ijk >= -0.5) & (ijk <= np.asarray(histologyShape[::-1]) - 0.5), axis=1)
    if not inside.any():
        return None
    mriIjk = applyMatrix(np.linalg.inv(np.asarray(mriIjkToRas, float)), points[inside])
    step = spacingOf(lattice) / spacingOf(mriIjkToRas)
    margin = marginMm / spacingOf(mriIjkToRas) + step
    return mriIjk.min(axis=0) - margin, mriIjk.max(axis=0) + margin


class WorkingImages:
    """The MRI and the histology (through L) on the working grid, the fixed mask and the taper of the refinement."""

    def __init__(self, fixed, moving, mask, ijkToRas, taper):
        self.fixed, self.moving, self.mask, self.ijkToRas, self.taper = fixed, moving, mask, ijkToRas, taper


def prepareImages(mri, histology, mapping, spacingMm, settings, mriMask=None) -> WorkingImages:
    """MRI and histology (`workflow.Image`s; the histology already area-averaged near the working resolution)
    sampled onto the working grid: the MRI anti-aliased where it is finer, the histology through `mapping`.
    The fixed mask is the histology footprint carried by the mapping (eroded), within `mriMask` when given."""
    from .refine import histologyFootprint

    box = footprintBox(mri.shape, mri.ijkToRas, histology.shape, histology.ijkToRas, mapping, settings["marginMm"])
    if box is None:
        raise _Rejected("the landmark mapping puts no MRI voxel inside the histology stack (no overlap)")
    box = (np.maximum(box[0], -0.5), np.minimum(box[1], np.asarray(mri.shapeIjk) - 0.5))
    shape, matrix = workingGrid(mri.shape, mri.ijkToRas, spacingMm, box)
    points = gridPoints(shape, matrix)
    fixedSmooth = _smoothForGrid(mri.array, mri.ijkToRas, spacingMm)
    fixed = _sample(fixedSmooth, mri.ijkToRas, points).reshape(shape)
    mapped = _mappedPoints(mapping, points)
    if not np.all(np.isfinite(mapped)):
        raise _Rejected("the landmark mapping gives non-finite points on the working grid")
    background = float(np.min(histology.array))
    moving = _sample(histology.array, histology.ijkToRas, mapped, cval=background).reshape(shape)
    footprint = histologyFootprint(histology.array, 0)
    inside = _sample(footprint, histology.ijkToRas, mapped, order=0).reshape(shape) > 0.5
    if mriMask is not None:
        inside &= _sample(mriMask.array > 0, mriMask.ijkToRas, points, order=0).reshape(shape) > 0.5
    if inside.any():
        from .refine import correctBiasField

        # both images are flattened over the same footprint, the only region mutual information sees
        if settings["histologyBiasCorrection"]:
            moving = correctBiasField(moving, inside, spacingMm, settings["biasFieldSpacingMm"])
        if settings["mriBiasCorrection"]:
            fixed = correctBiasField(fixed, inside, spacingMm, settings["mriBiasFieldSpacingMm"])
    mask = _erode(inside, int(settings["footprintErosionVoxels"]))
    return WorkingImages(fixed, moving, mask, matrix, _taper(shape, matrix, mri, box, settings["marginMm"]))


def _erode(mask, voxels):
    if voxels <= 0 or not mask.any():
        return mask.astype(np.uint8)
    image = sitk.ConstantPad(sitk.GetImageFromArray(mask.astype(np.uint8)), [1] * 3, [1] * 3, 0)
    eroded = sitk.BinaryErode(image, [voxels] * 3, sitk.sitkBall, 0, 1, False)
    return sitk.GetArrayFromImage(sitk.Crop(eroded, [1] * 3, [1] * 3)).astype(np.uint8)


def _taper(shape, matrix, mri, box, marginMm):
    """1 inside the box shrunk by the margin, falling linearly to 0 at the working grid's border: the refinement is
    continuous and is the identity outside the working grid (where a grid transform would clamp its edge)."""
    spacing = spacingOf(matrix)
    distance = np.full(shape, np.inf)
    for axis in range(3):  # array axis k, j, i <- ijk axis 2 - axis
        n = shape[axis]
        index = np.arange(n, dtype=float)
        edge = np.minimum(index, n - 1 - index) * spacing[2 - axis]
        view = [1, 1, 1]
        view[axis] = n
        distance = np.minimum(distance, edge.reshape(view))
    return np.clip(distance / max(float(marginMm), 1e-6), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Elastix
# ----------------------------------------------------------------------------------------------------------

class _Rejected(Exception):
    """The refinement cannot be done for this data: it is rejected with this reason (landmark-only kept)."""


def _itkImage(itk, array, ijkToRas, pixel=np.float32):
    """itk.Image of `array` [k, j, i] with the RAS geometry in ITK's LPS physical space."""
    image = itk.image_from_array(np.ascontiguousarray(array, dtype=pixel))
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(ijkToRas, float)[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in lps[:, 3]])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(lps[:, :3] / spacing)))
    return image


def writePointSet(path, rasPoints):
    """An elastix point-set file of RAS points: 'point', the count, one 'x y z' row per point in LPS mm."""
    lps = flipPointsLpsRas(np.asarray(rasPoints, float).reshape(-1, 3))
    with open(path, "w") as f:
        f.write(f"point\n{len(lps)}\n")
        for x, y, z in lps:
            f.write(f"{x:.6f} {y:.6f} {z:.6f}\n")


def pointsWeight(settings, density=None) -> float:
    """The landmark term's weight: pointsWeight, scaled by reference SD / stated SD when an SD is given (a sloppier
    placement pulls less; elastix takes one weight for the whole point set), and by the pairs' density over the
    registered footprint (`density`, pairs per mm3) relative to the density it was tuned at.

    Why the density: elastix averages the mutual information over its samples, so the image term's pull on each
    control point shrinks as the footprint (and the number of control points) grows, while the landmark term is a
    mean over the pairs; with a fixed weight, 10 pairs on a 8 mm3 footprint were outweighed by the image noise
    (held-out error worse than landmark-only, bench/refine_matrix.py) where 12 pairs on 160 mm3 were not."""
    weight = float(settings["pointsWeight"])
    if settings["landmarkSdMm"] is not None:
        weight *= float(settings["landmarkReferenceSdMm"]) / float(settings["landmarkSdMm"])
    if density is not None and density > 0 and settings["landmarkDensityReference"]:
        weight *= (float(density) / float(settings["landmarkDensityReference"])) ** float(settings["landmarkDensityExponent"])
    return weight


def parameterMap(settings, withPoints=True, density=None) -> dict:
    """The elastix parameter map (name -> list of strings) of `settings`."""
    n = int(settings["resolutions"])
    metrics = ["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"]
    weights = [settings["metricWeight"], settings["bendingWeight"]]
    if withPoints:
        metrics.append("CorrespondingPointsEuclideanDistanceMetric")
        weights.append(pointsWeight(settings, density))
    pyramid = [str(int(f)) for f in settings["pyramidSchedule"] for _ in range(3)]
    values = {
        "Registration": ["MultiMetricMultiResolutionRegistration"], "Metric": metrics,
        "FixedImagePyramid": ["FixedSmoothingImagePyramid"], "MovingImagePyramid": ["MovingSmoothingImagePyramid"],
        "NumberOfResolutions": [str(n)], "FixedImagePyramidSchedule": pyramid, "MovingImagePyramidSchedule": pyramid,
        "Transform": ["BSplineTransform"], "FinalGridSpacingInPhysicalUnits": [str(float(settings["controlPointSpacingMm"]))],
        "GridSpacingSchedule": [str(float(g)) for g in settings["gridSpacingSchedule"]],
        "NumberOfHistogramBins": [str(int(settings["histogramBins"]))],
        "Optimizer": ["AdaptiveStochasticGradientDescent"], "AutomaticParameterEstimation": ["true"],
        "MaximumNumberOfIterations": [str(int(settings["iterations"]))],
        "ImageSampler": ["RandomCoordinate"], "NumberOfSpatialSamples": [str(int(settings["samples"]))],
        "NewSamplesEveryIteration": ["true"], "RandomSeed": [str(int(settings["seed"]))],
        "Interpolator": ["BSplineInterpolator"], "BSplineInterpolationOrder": ["1"],
        "ResampleInterpolator": ["FinalBSplineInterpolator"], "FinalBSplineInterpolationOrder": ["1"],
        "Resampler": ["DefaultResampler"], "WriteResultImage": ["false"], "ErodeMask": ["false"],
        "HowToCombineTransforms": ["Compose"], "AutomaticTransformInitialization": ["false"],
        "ResultImagePixelType": ["float"], "DefaultPixelValue": ["0"],
    }
    for i, w in enumerate(weights):
        values[f"Metric{i}Weight"] = [str(float(w))]
    for key, value in (settings.get("parameterOverrides") or {}).items():
        values[str(key)] = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return values


def useAffineStage(settings, pairCount) -> bool:
    """Whether the affine map runs: as set, or ("auto") when the landmark fit rests on few pairs."""
    if settings["affineStage"] == "auto":
        return pairCount < AFFINE_BELOW_PAIRS
    return bool(settings["affineStage"])


def affineMap(settings, withPoints=True, density=None) -> dict:
    """The optional first map: an affine transform on MI (+ the landmark pairs), same pyramid and optimiser."""
    values = parameterMap(settings, withPoints, density)
    values["Transform"] = ["AffineTransform"]
    values["Metric"] = [m for m in values["Metric"] if m != "TransformBendingEnergyPenalty"]
    weights = [settings["metricWeight"]] + ([pointsWeight(settings, density)] if withPoints else [])
    for key in [k for k in values if k.startswith("Metric") and k.endswith("Weight")]:
        del values[key]
    for i, w in enumerate(weights):
        values[f"Metric{i}Weight"] = [str(float(w))]
    values["AutomaticScalesEstimation"] = ["true"]
    for key in ("FinalGridSpacingInPhysicalUnits", "GridSpacingSchedule"):
        values.pop(key)
    return values


def _normalised(array, mask, percentiles):
    """Intensities clipped to the masked percentiles and scaled to [0, 1] (saturation, hot pixels)."""
    values = array[mask > 0] if mask is not None and mask.any() else array
    lo, hi = np.percentile(values, percentiles)
    if not hi > lo:
        raise _Rejected(f"an image is constant over the overlap (intensity {float(lo):g}): nothing to register")
    return np.clip((array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def landmarkDensity(images, fixedPoints) -> Optional[float]:
    """Landmark pairs per mm3 of the registered footprint (the fixed mask on the working grid), or None."""
    if fixedPoints is None or not len(fixedPoints) or not images.mask.any():
        return None
    return len(fixedPoints) / (float(images.mask.sum()) * abs(float(np.linalg.det(images.ijkToRas[:3, :3]))))


def runElastix(images, fixedPoints, movingPoints, settings):
    """d(x) (RAS mm, [k, j, i, 3] on the working grid) registering images.fixed to images.moving with the landmark
    pairs (RAS, both in MRI space) in the cost. elastix's exceptions reach the caller as RuntimeError."""
    itk = loadEngine()
    fixed = _itkImage(itk, _normalised(images.fixed, images.mask, settings["intensityPercentiles"]), images.ijkToRas)
    moving = _itkImage(itk, _normalised(images.moving, images.mask, settings["intensityPercentiles"]), images.ijkToRas)
    mask = _itkImage(itk, images.mask, images.ijkToRas, np.uint8)
    withPoints = fixedPoints is not None and len(fixedPoints) > 0
    density = landmarkDensity(images, fixedPoints)
    parameters = itk.ParameterObject.New()
    if useAffineStage(settings, 0 if fixedPoints is None else len(fixedPoints)):
        parameters.AddParameterMap(affineMap(settings, withPoints, density))
    parameters.AddParameterMap(parameterMap(settings, withPoints, density))
    with tempfile.TemporaryDirectory(prefix="mrihistoreg-elastix-") as work:
        kwargs = {}
        if withPoints:
            kwargs["fixed_point_set_file_name"] = os.path.join(work, "fixed.txt")
            kwargs["moving_point_set_file_name"] = os.path.join(work, "moving.txt")
            writePointSet(kwargs["fixed_point_set_file_name"], fixedPoints)
            writePointSet(kwargs["moving_point_set_file_name"], movingPoints)
        _, transform = itk.elastix_registration_method(fixed, moving, parameter_object=parameters, fixed_mask=mask,
                                                       log_to_console=False, output_directory=work, **kwargs)
        field = itk.transformix_deformation_field(moving, transform, output_directory=work)
    displacement = np.asarray(itk.array_from_image(field), dtype=float)
    if displacement.shape != tuple(images.fixed.shape) + (3,):
        raise RuntimeError(f"transformix returned a field of shape {displacement.shape} for a working grid of "
                           f"{tuple(images.fixed.shape)}")
    return flipPointsLpsRas(displacement.reshape(-1, 3)).reshape(displacement.shape)


def _mattes(images, displacement, settings):
    """Mattes MI (SimpleITK, negative: lower is better) of the working images over the fixed mask, for d = 0 and
    for `displacement`: the guard rails' before/after figures, measured the same way as the SimpleITK engine's."""
    bins = int(settings["histogramBins"])
    return [mattesValue(images, np.zeros_like(displacement), bins), mattesValue(images, displacement, bins)]


def mattesValue(images, displacement, bins, virtualSpacingRatio=None):
    """Mattes MI (negative) of the working images over the fixed mask under `displacement` (RAS mm, [k, j, i, 3]),
    sampled at the working grid's voxel centres, or with virtualSpacingRatio on a grid of that many times the
    working spacing, off the grid for both images: at the voxel centres d = 0 reads the moving image without
    interpolation and any d != 0 blurs it, a cusp that favours small corrections' start (bench/tumour_focus.py)."""
    from .volumes import sitkImageFromArray

    fixed = sitkImageFromArray(images.fixed, images.ijkToRas, dtype=np.float32)
    moving = sitkImageFromArray(images.moving, images.ijkToRas, dtype=np.float32)
    field = sitkImageFromArray(flipPointsLpsRas(displacement.reshape(-1, 3)).reshape(displacement.shape),
                               images.ijkToRas, dtype=np.float64, isVector=True)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    method.SetMetricFixedMask(sitkImageFromArray(images.mask, images.ijkToRas, dtype=np.uint8))
    method.SetInterpolator(sitk.sitkLinear)
    if virtualSpacingRatio is not None:
        ratio = float(virtualSpacingRatio)
        method.SetVirtualDomain([int(np.ceil(n / ratio)) for n in fixed.GetSize()], fixed.GetOrigin(),
                                [s * ratio for s in fixed.GetSpacing()], fixed.GetDirection())
    method.SetMovingInitialTransform(sitk.DisplacementFieldTransform(field))
    method.SetInitialTransform(sitk.TranslationTransform(3))
    return method.MetricEvaluate(fixed, moving)


def refineWithElastix(mri, histology, fit, settings, workingSpacingMm, mriMask=None, progress=None):
    """A refine.RefinementResult for M(x) = L(x + d(x)), L = fit.model. `histology` is an Image near the working
    resolution. Failures become a rejected result with the reason; cancelling raises progress.Cancelled."""
    from . import refine as refineLib

    start = time.perf_counter()
    timings = {}
    try:
        result = _refineChecked(mri, histology, fit, settings, workingSpacingMm, mriMask, progress, timings, start)
    except Cancelled:
        raise
    except _Rejected as error:
        result = refineLib.failedRefinement(fit.model, mri.shape, mri.ijkToRas, str(error), _legacy(settings))
        result.settings = settings
    except Exception as error:  # noqa: BLE001 - ITK/elastix errors: the landmark-only result must still stand
        logging.getLogger(__name__).warning("elastix refinement failed", exc_info=True)
        result = refineLib.failedRefinement(fit.model, mri.shape, mri.ijkToRas,
                                            f"elastix failed: {refineLib.failureMessage(error)}", _legacy(settings))
        result.settings = settings
    total = time.perf_counter() - start
    result.seconds = total - timings.get("engine_load", 0.0)  # the registration alone; the load is reported apart
    result.timings = dict(timings, total=total)
    result.biasCorrected = bool(settings["histologyBiasCorrection"]) and result.accepted
    result.engine = ENGINE_NAME
    result.engineLoadSeconds = loadSeconds()
    result.workingSpacingMm = float(workingSpacingMm)
    return result


def _legacy(settings):
    """The guard-rail settings the shared RefinementResult helpers read."""
    from .refine import refinementSettings

    return refinementSettings({k: settings[k] for k in ("jacobianSubsample", "landmarkToleranceMm",
                                                        "metricTolerance")})


def _refineChecked(mri, histology, fit, settings, spacingMm, mriMask, progress, timings, start):
    from . import refine as refineLib
    from .compare import InverseMapping

    report(progress, 0.0, f"refinement (elastix): working grid {float(spacingMm):g} mm")
    images = prepareImages(mri, histology, fit.model, float(spacingMm), settings, mriMask)
    if int(images.mask.sum()) < int(settings["minOverlapVoxels"]):
        raise _Rejected(f"the histology footprint covers {int(images.mask.sum())} working voxels under the landmark "
                        f"mapping (fewer than {int(settings['minOverlapVoxels'])}): too little overlap to register")
    timings["prepare"] = time.perf_counter() - start
    fixedPoints = movingPoints = None
    if fit.pairs is not None and len(fit.pairs.labels):
        fixedPoints = np.asarray(fit.pairs.fixed, float)
        movingPoints = InverseMapping(fit.model).transformPoints(np.asarray(fit.pairs.moving, float))
    began = time.perf_counter()
    if loadSeconds() is None:
        report(progress, 0.05, "refinement (elastix): loading the engine (once per session)")
        loadEngine()
        timings["engine_load"] = time.perf_counter() - began
        began = time.perf_counter()
    report(progress, 0.1, f"refinement (elastix): registering {images.fixed.shape[::-1]} working voxels, "
                          f"{int(settings['resolutions'])} resolutions")
    displacement = runElastix(images, fixedPoints, movingPoints, settings)
    timings["elastix"] = time.perf_counter() - began
    report(progress, 0.85, "refinement (elastix): checking the result")
    if not np.all(np.isfinite(displacement)):
        raise _Rejected("elastix diverged (the displacement is not finite)")
    displacement *= images.taper[..., None]
    began = time.perf_counter()
    metricBefore, metricAfter = _mattes(images, displacement, settings)
    timings["metric"] = time.perf_counter() - began
    result = refineLib.RefinementResult(fit.model, displacement, images.ijkToRas, metricBefore, metricAfter,
                                        iterations=int(settings["iterations"]) * int(settings["resolutions"]),
                                        seconds=time.perf_counter() - start, accepted=True, reason="",
                                        settings=settings, overlapFraction=float(images.mask.mean()))
    if not math.isfinite(metricBefore):
        raise _Rejected("the similarity cannot be measured at the start (no overlap)")
    refineLib._applyGuardRails(result, settings)
    report(progress, 1.0, "refinement (elastix): done")
    return result
