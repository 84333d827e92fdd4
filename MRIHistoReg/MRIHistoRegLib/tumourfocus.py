"""Tumour focus: a local strain + shift of each MRI tumour label's region after the elastix refinement, for the
tumour's volume (issue 15).

Why. The refinement's 2 mm control grid cannot represent the warp inside a ~1 mm tumour, and the error it leaves
there is close to an affine one (README, "Intensity refinement": a least-squares affine fit of the tumour
surface's error leaves almost none of its radial offset). A tumour's volume in MRI space is the integral of the
final mapping's Jacobian over it, so that error goes straight into the volume. This stage estimates it as a
Gaussian-weighted field about the label's centre c,

    d(x) = g(x) (E (x - c) + t),    g(x) = exp(-|x - c|^2 / (2 sigma^2)),   E symmetric (6) + t (3),

and the refined mapping M1 becomes M2(x) = M1(x + d(x)), folded into M1's own displacement field (one grid
transform in Slicer, as before).

The cost. Local (windowed) squared correlation over the label grown by a margin: each window near the tumour
holds about two tissues, whose relation is linear whichever way the contrast goes, so it needs neither a joint
histogram (whose binning biased mutual information outward here) nor a global intensity relation (which white
matter, bright in one image and dark in the other, breaks). The histology enters as the LOG of its counts:
light-sheet speckle, striping, shadows and depth attenuation multiply the signal, so on the counts a bright
tumour carries more noise than its neighbours and a window's correlation rises where the mapping takes fewer
bright voxels in (an outward bias); on the log they are additive and of one size. Each image is read on its OWN
grid at points of a virtual grid off the working grid: two images on one grid share their interpolation errors
at d = 0 only, a cusp that holds the search at its start. Value and exact gradient (for windows inside the
arrays) come from box sums, so an L-BFGS search of the nine parameters takes a few dozen evaluations.

Measured figures (volumes against the construction's truth, the real-MRI case, the geometry matrix, time) are in
the README; bench/tumour_focus.py reproduces them. Failures never raise: each label's row says why its focus
was not applied, and the refinement stands without it.
"""
import logging
import time
from typing import NamedTuple, Optional

import numpy as np

from .geometry import gridPoints, ijkToRasPoints, rasToIjkPoints, spacingOf
from .progress import Cancelled, report

METHOD = ("Gaussian-weighted strain + shift per MRI label (sigma tumourFocusSigmaMm) by local squared correlation "
          "of the MRI with the log of the histology, over the label grown by tumourFocusGrowMm where the stack was "
          "imaged")
# the virtual grid's spacing over the working one: not a ratio of small integers, so the samples' fractional
# offsets in both images run through [0, 1) whatever the displacement
VIRTUAL_SPACING_RATIO = 0.7321
WINDOW_RADIUS = 2  # virtual voxels each side: a window of 5 x 0.73 working voxels
# the search's units (1 % of strain moves a ~1 mm tumour's surface by about as much as 10 um of shift, so the
# L-BFGS steps are balanced) and the bounds it may reach: a search that ends on one did not find the error
STRAIN_UNIT = 0.01
SHIFT_UNIT_MM = 0.01
STRAIN_BOUND = 0.10
SHIFT_BOUND_MM = 0.15
MAX_EVALUATIONS = 200
REACH_SIGMAS = 4.5  # beyond this many sigma the field is below 1e-4 of its peak: left out
EDGE_RAMP_MM = 1.0  # the field fades to 0 over this distance inside the refinement grid's faces
MAX_LABELS = 16  # one search per label value (~1 s each); a structure atlas is not a set of tumours
# an MRI coarser than this many working voxels along any axis blurs a ~1 mm tumour's edges along it past what the
# search can use (measured on thick slices: README, "Intensity refinement")
MAX_MRI_SPACING_RATIO = 2.0
MIN_MASK_VOXELS = 27
CROP_MARGIN_MM = 0.5
# A tumour the stack cut cannot be measured; one whose surroundings it cut can, less well (measured on the phantom
# and the geometry matrix: README, "Tumour focus"): the label itself must be imaged, and at least this fraction of
# its grown region must keep its windows inside the stack's imaged footprint
MIN_LABEL_IMAGED_FRACTION = 0.95
MIN_COVERED_FRACTION = 0.5
LOG_FLOOR_FRACTION = 1e-3  # the log's floor, as a fraction of the image's 99.5th percentile


class FocusResult(NamedTuple):
    strain: np.ndarray  # E (3 x 3, RAS)
    shiftMm: np.ndarray  # t (3, RAS)
    gain: float  # cost at the start minus cost at the end (>= 0)
    evaluations: int
    atBound: bool  # a parameter ended on its bound


def _boxSum(values, radius):
    from scipy import ndimage

    size = 2 * radius + 1
    return ndimage.uniform_filter(values, size=size, mode="constant") * float(size ** 3)


def localCorrelation(fixed, moving, weights, radius=WINDOW_RADIUS, withGradient=True):
    """(cost, d cost / d moving) of cost = -sum_c w_c cc_c / sum_c w_c, cc_c the squared correlation of the two
    images over the (2 radius + 1)^3 window centred at c. The gradient is exact where the windows of weighted
    centres stay inside the arrays (the caller pads by the radius)."""
    n = float((2 * radius + 1) ** 3)
    sf, sm = _boxSum(fixed, radius), _boxSum(moving, radius)
    sff = _boxSum(fixed * fixed, radius) - sf * sf / n
    smm = _boxSum(moving * moving, radius) - sm * sm / n
    sfm = _boxSum(fixed * moving, radius) - sf * sm / n
    tiny = 1e-12 * max(float(np.max(sff)), 1e-30) + 1e-30
    denominator = np.maximum(sff, tiny) * np.maximum(smm, tiny)
    cc = sfm * sfm / denominator
    total = float(np.sum(weights))
    cost = -float(np.sum(weights * cc)) / total
    if not withGradient:
        return cost, None
    # d cc_c / d m_i = alpha_c (f_i - mean_f,c) - beta_c (m_i - mean_m,c) for i in window c
    alpha = -2.0 * weights * sfm / denominator / total
    beta = alpha * sfm / np.maximum(smm, tiny)
    gradient = (fixed * _boxSum(alpha, radius) - _boxSum(alpha * sf / n, radius)
                - moving * _boxSum(beta, radius) + _boxSum(beta * sm / n, radius))
    return cost, gradient


class _VirtualGrid:
    """RAS points of a grid VIRTUAL_SPACING_RATIO x the working spacing, along the working grid's axes, over the
    mask's box plus the window radius ([k, j, i] `shape`)."""

    def __init__(self, mask, ijkToRas, radius):
        kk, jj, ii = np.nonzero(mask)
        ratio = VIRTUAL_SPACING_RATIO
        low = np.array([ii.min(), jj.min(), kk.min()], float) - (radius + 1) * ratio
        high = np.array([ii.max(), jj.max(), kk.max()], float) + (radius + 1) * ratio
        counts = np.floor((high - low) / ratio).astype(int) + 1
        axes = [low[a] + ratio * np.arange(counts[a]) for a in range(3)]
        k, j, i = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
        self.shape = k.shape
        self.workingIjk = np.stack([i, j, k], axis=-1).reshape(-1, 3)
        self.ras = ijkToRasPoints(ijkToRas, self.workingIjk)


def _interpolate(array, ijk, order=1):
    from scipy import ndimage

    return ndimage.map_coordinates(array, np.asarray(ijk)[:, ::-1].T, order=order, mode="nearest")


def focusTumour(fixed, moving, start, mask, workingIjkToRas, centreRas, sigmaMm, radius=WINDOW_RADIUS,
                maxEvaluations=MAX_EVALUATIONS):
    """FocusResult of the strain + shift d that maximises the local correlation of fixed(x) with
    moving(start(x + d(x))) over the windows centred in `mask` (on the working grid `workingIjkToRas`, [k, j, i]).
    `fixed` and `moving` are (array [k, j, i], ijkToRas) each on its OWN grid (the MRI's, the working histology's).
    start(x + d) is linearised about start(x) (d stays within tens of um)."""
    from scipy import optimize

    grid = _VirtualGrid(mask, workingIjkToRas, radius)
    fixedArray, fixedMatrix = np.asarray(fixed[0], np.float64), fixed[1]
    movingArray, movingMatrix = np.asarray(moving[0], np.float64), moving[1]
    fixedVirtual = _interpolate(fixedArray, rasToIjkPoints(fixedMatrix, grid.ras)).reshape(grid.shape)
    fixedVirtual = fixedVirtual / (float(np.std(fixedVirtual)) or 1.0)
    # moving indices of start(x) and their derivative by x (forward differences of the start mapping)
    step = 0.01
    base = rasToIjkPoints(movingMatrix, start.transformPoints(grid.ras))
    jacobian = np.empty((len(base), 3, 3))  # d moving-ijk / d RAS
    for axis in range(3):
        bumped = grid.ras.copy()
        bumped[:, axis] += step
        jacobian[:, :, axis] = (rasToIjkPoints(movingMatrix, start.transformPoints(bumped)) - base) / step
    movingArray = movingArray / (float(np.std(_interpolate(movingArray, base))) or 1.0)
    # forward differences along each axis: the exact derivative of the trilinear interpolant inside a cell is
    # the other two axes' interpolation of them at the cell's lower index, so cost and gradient agree
    differences = [np.diff(movingArray, axis=axis, append=np.take(movingArray, [-1], axis=axis))
                   for axis in (2, 1, 0)]  # d/di, d/dj, d/dk
    weights = _interpolate(np.asarray(mask, np.float64), grid.workingIjk, order=0).reshape(grid.shape)
    offsets = grid.ras - np.asarray(centreRas, float)
    g = _gaussianWeight(offsets, sigmaMm)
    # d (RAS mm) per parameter: strain in STRAIN_UNIT, shift in SHIFT_UNIT_MM; then in moving indices
    basis = np.zeros((9,) + offsets.shape)
    for p, (a, b) in enumerate(_STRAIN_PAIRS):
        basis[p][:, a] += offsets[:, b]
        if a != b:
            basis[p][:, b] += offsets[:, a]
        basis[p] *= (g * STRAIN_UNIT)[:, None]
    for p in range(3):
        basis[6 + p][:, p] = g * SHIFT_UNIT_MM
    basisMoving = np.einsum("nab,pnb->pna", jacobian, basis)
    evaluations = [0]

    def cost(parameters):
        evaluations[0] += 1
        ijk = base + np.tensordot(parameters, basisMoving, axes=1)
        sampled = _interpolate(movingArray, ijk).reshape(grid.shape)
        value, dMoving = localCorrelation(fixedVirtual, sampled, weights, radius)
        imageGradient = np.empty((len(ijk), 3))
        for a in range(3):
            cell = ijk.copy()
            cell[:, a] = np.clip(np.floor(cell[:, a]), 0, movingArray.shape[2 - a] - 1)
            imageGradient[:, a] = _interpolate(differences[a], cell)
        chain = dMoving.reshape(-1)[:, None] * imageGradient  # d cost / d moving-ijk of each sample
        return value, np.einsum("pnc,nc->p", basisMoving, chain)

    strainBound, shiftBound = STRAIN_BOUND / STRAIN_UNIT, SHIFT_BOUND_MM / SHIFT_UNIT_MM
    bounds = [(-strainBound, strainBound)] * 6 + [(-shiftBound, shiftBound)] * 3
    zero = np.zeros(9)
    startCost = cost(zero)[0]
    found = optimize.minimize(cost, zero, jac=True, method="L-BFGS-B", bounds=bounds,
                              options=dict(maxfun=int(maxEvaluations), ftol=1e-10, gtol=1e-9))
    improved = bool(np.isfinite(found.fun) and found.fun <= startCost)
    parameters = found.x if improved else zero
    limits = np.array([b[1] for b in bounds])
    strain = np.zeros((3, 3))
    for value, (a, b) in zip(parameters[:6], _STRAIN_PAIRS):
        strain[a, b] = strain[b, a] = value * STRAIN_UNIT
    return FocusResult(strain, parameters[6:] * SHIFT_UNIT_MM,
                       float(startCost - found.fun) if improved else 0.0, evaluations[0],
                       bool(np.any(np.abs(parameters) >= limits * (1 - 1e-6))))


_STRAIN_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def logCounts(array):
    """The log of a microscopy image's intensities (floored at LOG_FLOOR_FRACTION of its 99.5th percentile, so
    counts and intensities scaled to [0, 1] alike): its multiplicative noise made additive."""
    array = np.asarray(array, np.float64)
    floor = max(LOG_FLOOR_FRACTION * float(np.percentile(array, 99.5)), 1e-12) if array.size else 1.0
    return np.log(np.maximum(array, floor))


def _gaussianWeight(offsets, sigmaMm):
    return np.exp(-np.sum(offsets ** 2, axis=1) / (2.0 * sigmaMm ** 2))


def focusField(result, pointsRas, centreRas, sigmaMm):
    """The focus displacement d(x) (RAS mm, [N, 3]) at `pointsRas`."""
    offsets = np.asarray(pointsRas, float) - np.asarray(centreRas, float)
    return _gaussianWeight(offsets, sigmaMm)[:, None] * (offsets @ result.strain.T + result.shiftMm)


def _gaussian(array, sigmaMm, ijkToRas):
    from scipy import ndimage

    sigma = float(sigmaMm) / spacingOf(ijkToRas)[::-1]
    return ndimage.gaussian_filter(array, sigma, mode="nearest") if sigmaMm > 0 else array


def focusImages(mri, histology, start, region, workingSpacingMm, log=True, smoothingWorkingVoxels=0.0):
    """The focus's (fixed, moving) images for `region`, each (array [k, j, i], ijkToRas) on its own grid: the MRI
    near the region (mriNear) and the working histology near where `start` takes it, as the log of its counts.
    `smoothingWorkingVoxels` > 0 (bench/tumour_focus.py --smoothing only) blurs both by the same Gaussian in MRI
    space (SD that many working voxels; in histology mm times the start mapping's local scale): on a phantom with
    per-voxel speckle it took out the noise's outward bias, on the sample it added one (README), so the product
    does not."""
    from .mapping import jacobianOf

    sigmaMm = float(smoothingWorkingVoxels) * float(workingSpacingMm)
    fixedArray, fixedMatrix = mriNear(mri, region.box, workingSpacingMm)
    fixedArray = _gaussian(np.asarray(fixedArray, np.float64), sigmaMm, fixedMatrix)
    scale = abs(float(np.linalg.det(jacobianOf(start, region.centre[None])[0]))) ** (1 / 3) if sigmaMm > 0 else 1.0
    # where the region's whole grid goes (a warped mapping can take interior points beyond its corners' images)
    ijk = rasToIjkPoints(histology.ijkToRas, start.transformPoints(gridPoints(region.shape, region.ijkToRas)))
    spacing = spacingOf(histology.ijkToRas)
    pad = np.ceil(3 * sigmaMm * scale / spacing).astype(int) + 3
    shapeIjk = np.asarray(histology.array.shape[::-1])
    low = np.clip(np.floor(ijk.min(0)).astype(int) - pad, 0, shapeIjk - 1)
    high = np.clip(np.ceil(ijk.max(0)).astype(int) + pad + 1, low + 1, shapeIjk)
    crop = np.asarray(histology.array[low[2]:high[2], low[1]:high[1], low[0]:high[0]], np.float64)
    matrix = np.array(histology.ijkToRas, float)
    matrix[:3, 3] = matrix[:3, :3] @ low + matrix[:3, 3]
    moving = logCounts(crop) if log else crop
    return (fixedArray, fixedMatrix), (_gaussian(moving, sigmaMm * scale, matrix), matrix)


def mriNear(mri, box, workingSpacingMm):
    """(array, ijkToRas) of the MRI cropped to `box` (continuous MRI indices (lo, hi) along i, j, k) and, where it
    is finer than the working spacing, anti-aliased to it."""
    from . import elastix

    low = np.maximum(np.floor(box[0]).astype(int) - 2, 0)
    high = np.minimum(np.ceil(box[1]).astype(int) + 3, np.asarray(mri.shapeIjk))
    crop = np.asarray(mri.array[low[2]:high[2], low[1]:high[1], low[0]:high[0]], np.float64)
    matrix = np.array(mri.ijkToRas, float)
    matrix[:3, 3] = matrix[:3, :3] @ low + matrix[:3, 3]
    return elastix._smoothForGrid(crop, matrix, workingSpacingMm), matrix


# ----------------------------------------------------------------------------------------------------------
# The stage: every label of the MRI tumour label map, folded into the refinement's field
# ----------------------------------------------------------------------------------------------------------

class _Label:
    """One label's region: its centre, the working grid over its box grown by the mask margin, the mask."""

    def __init__(self, labels, value, mri, workingSpacingMm, growMm):
        from scipy import ndimage

        from . import elastix

        kk, jj, ii = np.nonzero(labels.array == value)
        ijk = np.stack([ii, jj, kk], 1).astype(float)
        self.centre = ijkToRasPoints(labels.ijkToRas, ijk.mean(axis=0))
        self.volumeMm3 = float(len(ijk) * np.prod(spacingOf(labels.ijkToRas)))
        # the corners of the label's voxel box in MRI indices, grown by the mask's margin plus a window
        corners = np.array(np.meshgrid(*zip(ijk.min(0) - 0.5, ijk.max(0) + 0.5), indexing="ij")).reshape(3, -1).T
        inMri = rasToIjkPoints(mri.ijkToRas, ijkToRasPoints(labels.ijkToRas, corners))
        # room beyond the mask for the windows and for the MRI crop's anti-aliasing edge (mriNear)
        margin = (float(growMm) + max(CROP_MARGIN_MM, 5 * float(workingSpacingMm))) / spacingOf(mri.ijkToRas)
        self.box = (inMri.min(0) - margin, inMri.max(0) + margin)
        self.shape, self.ijkToRas = elastix.workingGrid(mri.shape, mri.ijkToRas, workingSpacingMm, self.box)
        onLabel = elastix._sample(labels.array == value, labels.ijkToRas, gridPoints(self.shape, self.ijkToRas),
                                  order=0).reshape(self.shape) > 0.5
        if not onLabel.any():  # thinner than the working grid: its nearest working voxel
            nearest = np.round(rasToIjkPoints(self.ijkToRas, self.centre[None])[0]).astype(int)
            onLabel[tuple(np.clip(nearest[::-1], 0, np.array(self.shape) - 1))] = True
        self.onLabel = onLabel
        self.mask = ndimage.distance_transform_edt(~onLabel, sampling=spacingOf(self.ijkToRas)[::-1]) <= growMm


def _edgeWeight(points, fieldShape, fieldIjkToRas):
    """1 deeper than EDGE_RAMP_MM inside the refinement grid, falling smoothly to 0 at its outer faces."""
    ijk = rasToIjkPoints(fieldIjkToRas, points)
    spacing = spacingOf(fieldIjkToRas)
    upper = np.asarray(fieldShape[::-1], float) - 1
    depthMm = np.min(np.minimum(ijk + 0.5, upper + 0.5 - ijk) * spacing, axis=1)
    ramp = np.clip(depthMm / EDGE_RAMP_MM, 0.0, 1.0)
    return ramp * ramp * (3 - 2 * ramp)


def _foldInto(result, found, centre, sigmaMm):
    """result's mapping M1(x) = L(x + d1(x)) becomes M1(x + d(x)) = L(x + d(x) + d1(x + d(x))) on its own grid."""
    shape = result.displacement.shape[:3]
    reach = REACH_SIGMAS * sigmaMm
    # the field's voxels within the reach: its index box first (the field can be far larger than the tumour)
    box = np.array(np.meshgrid(*zip(centre - reach, centre + reach), indexing="ij")).reshape(3, -1).T
    ijk = rasToIjkPoints(result.fieldIjkToRas, box)
    low = np.clip(np.floor(ijk.min(0)).astype(int), 0, np.asarray(shape[::-1]) - 1)
    high = np.clip(np.ceil(ijk.max(0)).astype(int) + 1, low + 1, np.asarray(shape[::-1]))
    kk, jj, ii = np.meshgrid(*(np.arange(low[a], high[a]) for a in (2, 1, 0)), indexing="ij")
    index = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1)
    points = ijkToRasPoints(result.fieldIjkToRas, index.astype(float))
    near = np.sum((points - centre) ** 2, axis=1) <= reach ** 2
    if not near.any():
        return
    index, points = index[near], points[near]
    focus = focusField(found, points, centre, sigmaMm) * _edgeWeight(points, shape, result.fieldIjkToRas)[:, None]
    field = result.displacement.copy()
    field[index[:, 2], index[:, 1], index[:, 0]] = focus + result.refinement.displacementAt(points + focus)
    result.setDisplacement(field)


def notRun(reason, searched=False) -> dict:
    """The tumour_focus section of a focus that did not run, with why (`searched`: labels reached it)."""
    return {"applied": False, "searched": bool(searched), "reason": reason, "method": METHOD, "labels": []}


def undo(section, reason):
    """Mark a section whose focus was taken back out of the field (its rows kept, for what they found)."""
    section["applied"], section["reason"] = False, reason
    for row in section["labels"]:
        if row["applied"]:
            row["applied"], row["reason"] = False, f"{row['reason']}; undone: {reason}"


def focusOnTumours(result, mri, histology, labels, workingSpacingMm, settings, progress=None) -> dict:
    """Apply the tumour focus of every label value of `labels` (an Image on any grid) to the accepted refinement
    `result` in place (its displacement field); `histology` is the working histology the refinement registered.
    Returns report.json's refinement.tumour_focus section: per label whether it was applied, why (not), the
    strain (%) and shift (um) found. Never raises for the data (each label's failure is its row's reason);
    cancelling raises progress.Cancelled."""
    from .refine import histologyFootprint

    sigma, grow = float(settings["tumourFocusSigmaMm"]), float(settings["tumourFocusGrowMm"])
    section = {"applied": False, "searched": True, "method": METHOD, "sigma_mm": sigma, "grow_mm": grow,
               "labels": []}
    coarsest = float(spacingOf(mri.ijkToRas).max())
    if coarsest > MAX_MRI_SPACING_RATIO * float(workingSpacingMm):
        section["reason"] = (f"the MRI's coarsest spacing ({coarsest:g} mm) is over {MAX_MRI_SPACING_RATIO:g} x the "
                             f"working grid's ({float(workingSpacingMm):g} mm): the tumour's edges along it are too "
                             f"blurred for the focus, so the refinement stands as it is")
        return section
    values = [v for v in np.unique(np.asarray(labels.array)) if v != 0]
    if not values:
        section["reason"] = "the MRI tumour labels are empty"
        return section
    footprint = histologyFootprint(histology.array, int(settings.get("footprintErosionVoxels", 2)))
    for number, value in enumerate(values):
        report(progress, number / len(values), f"tumour focus: label {value:g}")
        row = {"label": float(value) if np.issubdtype(type(value), np.floating) else int(value), "applied": False}
        section["labels"].append(row)
        if number >= MAX_LABELS:
            row["reason"] = (f"not searched: only the first {MAX_LABELS} label values are (a map of many structures "
                             f"is not a set of tumours; give the tumour labels only)")
            continue
        began = time.perf_counter()
        try:
            _focusOneLabel(row, result, mri, (histology, footprint), labels, value, workingSpacingMm, sigma, grow)
        except Cancelled:
            raise
        except Exception as error:  # noqa: BLE001 - the refinement stands without this label's focus
            logging.getLogger(__name__).warning("tumour focus of label %s failed", value, exc_info=True)
            row["applied"] = False
            row["reason"] = f"the focus could not run: {type(error).__name__}: {error}"
        row["seconds"] = time.perf_counter() - began
    section["applied"] = any(row["applied"] for row in section["labels"])
    section["reason"] = ("applied to " + ", ".join(str(r["label"]) for r in section["labels"] if r["applied"])
                         if section["applied"] else "no label's focus was applied (see each label's reason)")
    report(progress, 1.0, "tumour focus: done")
    return section


def _focusOneLabel(row, result, mri, histologyAndFootprint, labels, value, workingSpacingMm, sigma, grow):
    from . import elastix

    histology, footprint = histologyAndFootprint
    region = _Label(labels, value, mri, workingSpacingMm, grow)
    row["centre_ras_mm"] = region.centre.tolist()
    row["mri_volume_mm3"] = region.volumeMm3
    # the footprint's edge through the tumour hides part of its boundary: its volume cannot be measured (on the
    # phantom such a cut misread +1.9 % as -4.8 %); through its surroundings it costs some of their windows only
    from scipy import ndimage

    mapped = result.transformPoints(gridPoints(region.shape, region.ijkToRas))
    imaged = elastix._sample(footprint, histology.ijkToRas, mapped, order=0).reshape(region.shape) > 0.5
    labelImaged = float(imaged[region.onLabel].mean())
    if labelImaged < MIN_LABEL_IMAGED_FRACTION:
        row["reason"] = (f"the stack's imaged footprint holds {100 * labelImaged:.1f} % of the tumour (under "
                         f"{100 * MIN_LABEL_IMAGED_FRACTION:g} %): a tumour cut by the stack's edge cannot be measured")
        return
    # window centres far enough inside that no window (nor its interpolation) reaches past the footprint
    reachMm = (WINDOW_RADIUS * VIRTUAL_SPACING_RATIO + 1) * float(workingSpacingMm)
    inside = ndimage.distance_transform_edt(imaged, sampling=spacingOf(region.ijkToRas)[::-1]) > reachMm
    covered = float(inside[region.mask].mean())
    if covered < MIN_COVERED_FRACTION:
        row["reason"] = (f"the stack's imaged footprint holds the windows of {100 * covered:.1f} % of its region "
                         f"(under {100 * MIN_COVERED_FRACTION:g} %): too little of the tumour's surroundings was "
                         f"imaged")
        return
    row["region_imaged_percent"] = 100 * covered
    region.mask &= inside
    if int(region.mask.sum()) < MIN_MASK_VOXELS:
        row["reason"] = (f"its region covers {int(region.mask.sum())} working voxels (fewer than {MIN_MASK_VOXELS}): "
                         f"too small to measure at a {float(workingSpacingMm):g} mm working grid")
        return
    weight = _edgeWeight(region.centre[None], result.displacement.shape[:3], result.fieldIjkToRas)[0]
    if weight < 1.0:
        row["reason"] = (f"its centre lies within {EDGE_RAMP_MM:g} mm of the refined region's edge (or outside it): "
                         f"the refinement's field cannot carry a correction there")
        return
    fixed, moving = focusImages(mri, histology, result, region, workingSpacingMm)
    found = focusTumour(fixed, moving, result, region.mask, region.ijkToRas, region.centre, sigma)
    row.update({"strain_percent": (100 * found.strain).tolist(), "shift_um": (1000 * found.shiftMm).tolist(),
                "volume_change_at_centre_percent": 100 * (float(np.linalg.det(np.eye(3) + found.strain)) - 1),
                "correlation_gain": found.gain, "evaluations": found.evaluations})
    if found.atBound:
        row["reason"] = (f"the search ended on its bound (strain {100 * STRAIN_BOUND:g} % or shift "
                         f"{1000 * SHIFT_BOUND_MM:g} um): the refinement's error there is larger than this focus "
                         f"corrects, so it is left as refined")
        return
    if not found.gain > 0:
        row["reason"] = "the local correlation is already at its best at the refined mapping"
        return
    _foldInto(result, found, region.centre, sigma)
    row["applied"], row["reason"] = True, f"local correlation improved by {found.gain:.4f}"


def settingsProblem(settings) -> Optional[str]:
    """Why the focus settings are impossible (for elastix.elastixSettings' message), or None."""
    if not float(settings["tumourFocusSigmaMm"]) > 0:
        return f"tumourFocusSigmaMm must be > 0 mm, got {settings['tumourFocusSigmaMm']}"
    if not float(settings["tumourFocusGrowMm"]) >= 0:
        return f"tumourFocusGrowMm must be >= 0 mm, got {settings['tumourFocusGrowMm']}"
    return None
