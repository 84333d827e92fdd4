"""Sample data with ground truth: an MRI-like volume and a light-sheet-like stack of one analytic phantom brain.

No real MRI / light-sheet pair can ship with the project, so this module generates one, deterministically
from a seed (docs/ARCHITECTURE.md section 6). Everything is derived from one *continuous* anatomy defined in MRI RAS
millimetres (brain centre at RAS 0): a brain-shaped ellipsoid (~9 x 17 x 7 mm) with a cortex shell, a
white-matter band, striata, thalamus, hippocampus-like arcs, cerebellum with folia, olfactory bulbs, fissures,
lateral and third ventricles and an ellipsoidal tumour (~1.2 mm across, volume known analytically). Both images
sample that anatomy; edges get analytic partial volume (each structure's occupancy is a linear ramp one
voxel wide across its boundary - the exact box-filtered partial volume of a plane), so they are not binary.

Ground truth (the exact mapping)
    Defined in the direction histology RAS (y) -> MRI RAS (x), so the stack can be rendered voxel by voxel:
        x = A y + t + sum_m a_m exp(-|y - c_m|^2 / (2 s_m^2))
    A = R / 0.843 (R a rotation of 15 degrees about a fixed oblique axis: histology shrank to 0.843^3 ~ 60 %
    of its volume), Gaussian bumps of 0.10-0.25 mm amplitude and 0.9-1.4 mm width (seeded). The bumps'
    Jacobian norm stays below the smallest singular value of A, so the mapping is a bijection (no folding).
    The MRI -> histology direction (the resampling direction, docs/ARCHITECTURE.md section 3) is its Newton inverse.

Public API
    generateSampleData(outDir, size="small", seed=0, progress=None) -> manifest dict ("folder", "files",
        "truth", "seconds", ...)
    loadTruth(folderOrPath) -> the truth.json dict
    groundTruthHistologyToMri(truth, points) / groundTruthMriToHistology(truth, points): (N, 3) RAS mm
    GroundTruthMapping(truth): a mapping (mapping.py protocol) MRI RAS -> histology RAS, with jacobian()

Folder written (see truth.json "files"): mri.nrrd, mri_tumour_label.nrrd, histology.tif, histology.nrrd,
histology_tumour_label.nrrd, landmarks_{mri,histology}.mrk.json and .csv, eval_points_{mri,histology}.csv,
truth.json, config.json. The stack's files claim 1 mm spacing (the seed's mistake): histology.tif through
ImageJ metadata (unit mm, spacing 1, 1 pixel per mm), histology.nrrd through its space directions; truth.json
("histology" -> "file_claims") records what each file says, and truth.json and config.json the true spacing. Histology coordinates everywhere (landmarks, evaluation points,
truth) are in the stack's *corrected* physical frame: RAS = (-i*sx, -j*sy, k*sz) with the true spacing.

Streaming. The stack is rendered and written one page (k) at a time into the TIFF, the NRRD and the label
NRRD together, so memory is bounded by a few pages at any size. The anatomy is evaluated exactly on a lattice
with the "small" size's spacing (26 x 26 x 40 um); at finer sizes ("full": 3.25 x 3.25 x 5 um, lattice every
8 voxels) the page's tissue intensity is interpolated (trilinear) from that lattice and the voxel-level
texture, striping and noise are added per voxel. The tumour label is exact at every size: the lattice only
locates the tumour, and the mapping is evaluated exactly at every voxel near it. At "small" the lattice is the
grid itself (exact evaluation). Page noise is seeded per page, so pages do not depend on slab sizes.
"""
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
import zlib
from dataclasses import asdict, dataclass
from typing import Optional, Tuple, Union

import numpy as np

from . import mapping as mappingLib
from .geometry import applyMatrix
from . import progress as progressLib

# ---------------------------------------------------------------------------------------------------------
# Fixed design constants
# ---------------------------------------------------------------------------------------------------------
MRI_SHAPE_IJK = (100, 200, 120)
MRI_SPACING_MM = 0.1
# LPS-aligned (i -> left, j -> posterior, k -> superior); the volume's centre voxel sits at RAS 0.
MRI_IJK_TO_RAS = np.array([[-0.1, 0.0, 0.0, 4.95],
                           [0.0, -0.1, 0.0, 9.95],
                           [0.0, 0.0, 0.1, -5.95],
                           [0.0, 0.0, 0.0, 1.0]])

FULL_SHAPE_IJK = (2160, 2560, 472)
FULL_SPACING_UM = (3.25, 3.25, 5.0)
SIZE_FACTORS = {"full": 1, "small": 8}
MAX_SIZE_FACTOR = 20  # coarser than this, the tumour would span fewer than ~8 voxels along k
LATTICE_SPACING_UM = (26.0, 26.0, 40.0)  # the anatomy is evaluated exactly at (at most) this spacing
FULL_EXTENT_UM = tuple(n * s for n, s in zip(FULL_SHAPE_IJK, FULL_SPACING_UM))  # the seed's field of view

LINEAR_SHRINK = 0.843  # histology length / MRI length; volume ratio 0.843^3 = 0.599
ROTATION_AXIS = (0.3, -0.2, 1.0)
ROTATION_DEG = 15.0
BUMP_COUNT = 5
BUMP_AMPLITUDE_MM = (0.10, 0.25)
BUMP_SIGMA_MM = (0.9, 1.4)
# Where the tumour centre lands in the (true-spacing) histology frame: mid-depth, inside the field of view.
TUMOUR_CENTRE_HISTOLOGY = (-2.1, -1.9, 1.18)

LANDMARK_COUNT = 12
LANDMARK_NOISE_MRI_MM = 0.05
LANDMARK_NOISE_HISTOLOGY_MM = 0.015
EVAL_POINT_COUNT = 30
COVERAGE_MARGIN_MM = 0.25
TUMOUR_CLEARANCE_MM = 0.2  # tumour surface to the stack's faces, for a reduced field of view

HISTOLOGY_BACKGROUND = 100.0
MRI_SCALE = 2000.0
MRI_NOISE_SD = 0.025  # relative to MRI_SCALE

# Tissue classes: (T2-weighted MRI, relative) and (light-sheet autofluorescence counts above background).
CONTRAST_MRI = {"background": 0.0, "gray": 0.55, "deep": 0.50, "white": 0.28, "striatum": 0.46, "thalamus": 0.42,
                "hippocampus": 0.64, "cerebellumMolecular": 0.60, "cerebellumGranular": 0.40, "olfactory": 0.68,
                "csf": 1.00, "tumour": 0.82}
CONTRAST_LSM = {"background": 0.0, "gray": 500.0, "deep": 430.0, "white": 900.0, "striatum": 560.0, "thalamus": 650.0,
                "hippocampus": 780.0, "cerebellumMolecular": 380.0, "cerebellumGranular": 1000.0, "olfactory": 700.0,
                "csf": 40.0, "tumour": 1600.0}

FILES = ("mri.nrrd", "mri_tumour_label.nrrd", "histology.tif", "histology.nrrd", "histology_tumour_label.nrrd",
         "landmarks_mri.mrk.json", "landmarks_histology.mrk.json", "landmarks_mri.csv", "landmarks_histology.csv",
         "eval_points_mri.csv", "eval_points_histology.csv", "truth.json", "config.json")
CHANNELS_FILE = "histology_channels.ome.tif"  # written only with SampleGeometry.tumourChannel
CHANNEL_NAMES = ("autofluorescence", "tumour")
# The tumour reporter channel: counts above background of labelled tumour cells, of tissue (autofluorescence
# leaking into the reporter's band, a fraction of the registration channel's tissue counts) and the background.
TUMOUR_SIGNAL_COUNTS = 1200.0
TUMOUR_CHANNEL_TISSUE_FRACTION = 0.08
TUMOUR_CHANNEL_BACKGROUND = 60.0

Triple = Tuple[float, float, float]


@dataclass(frozen=True)
class SampleGeometry:
    """Everything about the sample's geometry that a validation matrix varies; the defaults are the shipped sample.

    mriSpacingMm, mriShapeIjk: the MRI grid (i, j, k). mriDirection: 3x3 rows of the IJK->RAS direction matrix
    (columns are the i, j, k axes in RAS; any orthonormal matrix, flips included). mriCentreRasMm: RAS of the
    grid's centre, or "stack" for the centre of the stack's footprint (a small MRI field around the stack).
    stackSpacingUm: the stack's true spacing (i, j, k); None = from `size` (26 x 26 x 40 um at "small").
    stackExtentMm: the stack's field of view in histology mm (None = the seed's 7.02 x 8.32 x 2.36 mm); smaller
    means partial coverage. linearShrink: histology length / MRI length. rotationAxis / rotationDeg: the
    histology's rotation relative to the MRI. bumpCount, bumpAmplitudeMm, bumpSigmaMm: the non-linear warp
    (Gaussian bumps, amplitude and width ranges). landmarkCount and the noise SDs: the paired landmarks.
    tumourChannel: also write the two-channel OME-TIFF with a tumour reporter channel.
    workingSpacingMm: what config.json asks the refinement for."""

    mriSpacingMm: Triple = (0.1, 0.1, 0.1)
    mriShapeIjk: Tuple[int, int, int] = (100, 200, 120)
    mriDirection: Tuple[Triple, Triple, Triple] = ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0))
    mriCentreRasMm: Union[Triple, str] = (0.0, 0.0, 0.0)
    stackSpacingUm: Optional[Triple] = None
    stackExtentMm: Optional[Triple] = None
    linearShrink: float = 0.843
    rotationAxis: Triple = (0.3, -0.2, 1.0)
    rotationDeg: float = 15.0
    bumpCount: int = 5
    bumpAmplitudeMm: Tuple[float, float] = (0.10, 0.25)
    bumpSigmaMm: Tuple[float, float] = (0.9, 1.4)
    landmarkCount: int = 12
    landmarkNoiseMriMm: float = 0.05
    landmarkNoiseHistologyMm: float = 0.015
    evalPointCount: int = 30
    tumourChannel: bool = False
    workingSpacingMm: float = 0.1

    def toDict(self) -> dict:
        """JSON-ready (truth.json "geometry"); `SampleGeometry.fromDict` reads it back."""
        return {k: (list(map(list, v)) if k == "mriDirection" else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}

    @classmethod
    def fromDict(cls, values) -> "SampleGeometry":
        def tupled(v):
            return tuple(tupled(x) for x in v) if isinstance(v, (list, tuple)) else v
        return cls(**{k: tupled(v) for k, v in dict(values).items()})

    def mriIjkToRas(self, stackCentreRas=None) -> np.ndarray:
        """The MRI's IJK->RAS: direction x spacing, the grid's centre at mriCentreRasMm (or the given stack
        centre when that is "stack")."""
        direction = np.asarray(self.mriDirection, float)
        linear = direction * np.asarray(self.mriSpacingMm, float)[None, :]
        centre = np.asarray(stackCentreRas if isinstance(self.mriCentreRasMm, str) else self.mriCentreRasMm, float)
        origin = centre - linear @ ((np.asarray(self.mriShapeIjk, float) - 1) / 2)
        matrix = np.eye(4)
        matrix[:3, :3] = linear
        # rounded to 1e-9 mm so the default grid's origin is exactly the decimal (4.95, 9.95, -5.95)
        matrix[:3, 3] = [float(f"{v:.9f}") for v in origin]
        return matrix


def checkGeometry(geometry) -> SampleGeometry:
    """The geometry validated (ValueError naming the field and the fix); None = the default sample."""
    g = SampleGeometry() if geometry is None else geometry
    if not isinstance(g, SampleGeometry):
        raise ValueError(f"geometry must be a sampledata.SampleGeometry, got {type(g).__name__}.")
    direction = np.asarray(g.mriDirection, float)
    if direction.shape != (3, 3) or not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
        raise ValueError(f"mriDirection must be an orthonormal 3x3 matrix (rows), got {direction.tolist()}.")
    if len(g.mriSpacingMm) != 3 or not all(0.01 <= s <= 1.0 for s in g.mriSpacingMm):
        raise ValueError(f"mriSpacingMm must be three values between 0.01 and 1 mm, got {list(g.mriSpacingMm)}.")
    if len(g.mriShapeIjk) != 3 or not all(int(n) == n and 8 <= n <= 2000 for n in g.mriShapeIjk):
        raise ValueError(f"mriShapeIjk must be three integers between 8 and 2000, got {list(g.mriShapeIjk)}.")
    if g.stackSpacingUm is not None and (len(g.stackSpacingUm) != 3 or not all(0.5 <= s <= 500 for s in g.stackSpacingUm)):
        raise ValueError(f"stackSpacingUm must be three values between 0.5 and 500 um, got {list(g.stackSpacingUm)}.")
    if g.stackExtentMm is not None and (len(g.stackExtentMm) != 3 or not all(0.5 <= e <= 20 for e in g.stackExtentMm)):
        raise ValueError(f"stackExtentMm must be three values between 0.5 and 20 mm, got {list(g.stackExtentMm)}.")
    if not 0.3 <= g.linearShrink <= 1.5:
        raise ValueError(f"linearShrink must be between 0.3 and 1.5 (histology length / MRI length), got {g.linearShrink}.")
    if not (0 <= g.bumpAmplitudeMm[0] <= g.bumpAmplitudeMm[1] and 0 < g.bumpSigmaMm[0] <= g.bumpSigmaMm[1]):
        raise ValueError(f"bumpAmplitudeMm / bumpSigmaMm must be (low, high) ranges with 0 <= low <= high (sigma > 0), "
                         f"got {list(g.bumpAmplitudeMm)} / {list(g.bumpSigmaMm)}.")
    if not (isinstance(g.bumpCount, int) and g.bumpCount >= 0 and isinstance(g.landmarkCount, int) and g.landmarkCount >= 3):
        raise ValueError(f"bumpCount must be >= 0 and landmarkCount >= 3 (integers), got {g.bumpCount} / {g.landmarkCount}.")
    if not (g.landmarkNoiseMriMm >= 0 and g.landmarkNoiseHistologyMm >= 0 and g.evalPointCount >= 3 and g.workingSpacingMm > 0):
        raise ValueError("landmark noise must be >= 0, evalPointCount >= 3 and workingSpacingMm > 0.")
    return g


def rotationMatrix(axis, degrees) -> np.ndarray:
    """Rotation by `degrees` about `axis` (right-handed, Rodrigues)."""
    axis = np.asarray(axis, float)
    axis = axis / np.linalg.norm(axis)
    angle = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


# ---------------------------------------------------------------------------------------------------------
# The continuous anatomy (MRI RAS mm)
# ---------------------------------------------------------------------------------------------------------
def _ellipsoidDistance(x, y, z, centre, semiAxes, rotation=None):
    """First-order signed distance (mm, negative inside) to an ellipsoid; exact sign everywhere."""
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    if rotation is not None:  # local coordinates = R^T d
        r = rotation
        dx, dy, dz = (r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz, r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz,
                      r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz)
    a, b, c = semiAxes
    f = (dx / a) ** 2 + (dy / b) ** 2 + (dz / c) ** 2 - 1.0
    g = 2.0 * np.sqrt((dx / a ** 2) ** 2 + (dy / b ** 2) ** 2 + (dz / c ** 2) ** 2) + 1e-9
    return f / g


def _ramp(distance, width):
    """Partial-volume occupancy of a voxel `width` wide whose centre is `distance` from a planar boundary."""
    return np.clip(np.float32(0.5) - distance * np.float32(1.0 / width), 0.0, 1.0)


def _inBox(x, y, z, low, high):
    """Indices of the points inside the axis-aligned box [low, high] (z tested first, then x and y)."""
    idx = np.flatnonzero((z >= low[2]) & (z <= high[2]))
    xs, ys = x[idx], y[idx]
    return idx[(xs >= low[0]) & (xs <= high[0]) & (ys >= low[1]) & (ys <= high[1])]


class PhantomAnatomy:
    """The analytic phantom brain in MRI RAS mm. `intensity` paints tissue classes with soft occupancies."""

    body = ((0.0, 0.0, 0.0), (4.5, 8.5, 3.5))
    cortexThickness = 0.55
    whiteOuter = ((0.0, -0.3, 0.1), (3.9, 7.0, 2.85))
    whiteInner = ((0.0, -0.3, 0.1), (3.6, 6.7, 2.55))
    striatumCentres = ((2.0, 2.6, -0.2), (-2.0, 2.6, -0.2))
    striatumAxes = (1.1, 1.7, 1.2)
    thalamus = ((0.0, -1.3, -0.7), (1.8, 1.5, 1.1))
    hippocampusCentres = ((2.0, -2.8, -0.2), (-2.0, -2.8, -0.2))
    hippocampusRadii = (1.3, 0.3)  # arc radius (in the x-z plane), tube radius
    cerebellumFrontY = -5.6
    olfactoryBackY = 6.4
    fissureHalfWidth = 0.075
    transverseFissureY = -5.45
    ventricleCentres = ((1.15, 0.6, 0.75), (-1.15, 0.6, 0.75))
    ventricleAxes = (0.3, 1.6, 0.22)
    ventricleYawDeg = (-15.0, 15.0)  # they diverge anteriorly
    thirdVentricle = ((0.0, -1.0, -0.5), (0.1, 1.1, 0.75))
    tumourCentre = (2.3, 1.6, 1.3)
    tumourAxes = (0.65, 0.55, 0.5)
    tumourRotation = rotationMatrix((1.0, 0.5, 0.3), 25.0)

    def ventricleRotation(self, side):
        return rotationMatrix((0, 0, 1), self.ventricleYawDeg[side])

    def tumourVolumeMm3(self) -> float:
        a, b, c = self.tumourAxes
        return 4.0 / 3.0 * math.pi * a * b * c

    def tumourQuadratic(self, x, y, z):
        """sum((local/semi-axis)^2) of the tumour ellipsoid: <= 1 inside (the label is its centre sample)."""
        r = self.tumourRotation
        c = self.tumourCentre
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        u = r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz
        v = r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz
        w = r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz
        a, b, cc = self.tumourAxes
        return (u / a) ** 2 + (v / b) ** 2 + (w / cc) ** 2

    def bodyQuadratic(self, x, y, z):
        (cx, cy, cz), (a, b, c) = self.body
        return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2

    def intensity(self, x, y, z, contrast, edgeWidth):
        """Image intensity (float32) at RAS points (arrays of any shape) for a contrast table.

        Structures are painted in order with soft occupancies (later ones override earlier ones); each is
        evaluated only inside its bounding box (+ edge), which keeps the cost per point low.
        """
        shape = np.shape(x)
        x, y, z = (np.asarray(v, np.float32).ravel() for v in (x, y, z))
        out = np.full(x.size, contrast["background"], dtype=np.float32)
        cb, ab = self.body
        idx = _inBox(x, y, z, np.subtract(cb, ab) - edgeWidth, np.add(cb, ab) + edgeWidth)
        if idx.size:
            out[idx] = self._paintBrain(x[idx], y[idx], z[idx], contrast, float(edgeWidth))
        return out.reshape(shape)

    def _paintBrain(self, x, y, z, contrast, w):
        out = np.full(x.size, contrast["background"], dtype=np.float32)

        def paint(occupancy, tissue, idx=None):
            if idx is None:
                out[...] += occupancy * (np.float32(contrast[tissue]) - out)
            else:
                out[idx] += occupancy * (np.float32(contrast[tissue]) - out[idx])

        def local(centre, radius, function, tissue):
            """Paint `function(x, y, z)` only inside the box centre +- (radius + w)."""
            lo, hi = np.subtract(centre, radius) - w, np.add(centre, radius) + w
            idx = _inBox(x, y, z, lo, hi)
            if idx.size:
                paint(function(x[idx], y[idx], z[idx]), tissue, idx)

        body = _ramp(_ellipsoidDistance(x, y, z, *self.body), w)
        paint(body, "gray")
        cb, ab = self.body
        innerAxes = tuple(s - self.cortexThickness for s in ab)
        inner = _ramp(_ellipsoidDistance(x, y, z, cb, innerAxes), w)
        paint(inner, "deep")
        local(self.whiteOuter[0], self.whiteOuter[1],
              lambda x, y, z: (_ramp(_ellipsoidDistance(x, y, z, *self.whiteOuter), w)
                               * (1 - _ramp(_ellipsoidDistance(x, y, z, *self.whiteInner), w)) * _ramp(-1.0 - z, w)), "white")
        for centre in self.striatumCentres:
            local(centre, self.striatumAxes, lambda x, y, z, c=centre: _ramp(_ellipsoidDistance(x, y, z, c, self.striatumAxes), w), "striatum")
        local(self.thalamus[0], self.thalamus[1], lambda x, y, z: _ramp(_ellipsoidDistance(x, y, z, *self.thalamus), w), "thalamus")
        arcRadius, tubeRadius = self.hippocampusRadii
        for centre in self.hippocampusCentres:
            def arc(x, y, z, c=centre):
                dx, dy, dz = x - c[0], y - c[1], z - c[2]
                tube = np.sqrt((np.sqrt(dx * dx + dz * dz) - arcRadius) ** 2 + dy * dy) - tubeRadius
                return _ramp(tube, w) * _ramp(-0.5 - dz, w)  # keep the arc above cz - 0.5
            local(centre, (arcRadius + tubeRadius, tubeRadius, arcRadius + tubeRadius), arc, "hippocampus")
        # cerebellum (behind y = cerebellumFrontY) with folia: concentric granular shells
        idx = np.flatnonzero(y < self.cerebellumFrontY + w)
        if idx.size:
            xc, yc, zc = x[idx], y[idx], z[idx]
            cerebellum = body[idx] * _ramp(yc - self.cerebellumFrontY, w)
            paint(cerebellum, "cerebellumMolecular", idx)
            rho = np.sqrt(xc * xc + (yc + 4.8) ** 2 + (zc + 0.8) ** 2)
            folia = np.clip(0.5 + 2.5 * np.sin(np.float32(2 * math.pi / 0.55) * rho), 0.0, 1.0)
            paint(cerebellum * folia * inner[idx], "cerebellumGranular", idx)
        idx = np.flatnonzero(y > self.olfactoryBackY - w)
        if idx.size:
            paint(body[idx] * _ramp(self.olfactoryBackY - y[idx], w), "olfactory", idx)
        # fissures: interhemispheric (dorsal midline) and transverse (cortex | cerebellum), CSF-filled
        half = self.fissureHalfWidth
        idx = np.flatnonzero((np.abs(x) < half + w) & (z > 0.6 - w))
        if idx.size:
            paint(body[idx] * _ramp(np.abs(x[idx]) - half, w) * _ramp(0.6 - z[idx], w), "csf", idx)
        idx = np.flatnonzero((np.abs(y - self.transverseFissureY) < half + w) & (z > -1.5 - w))
        if idx.size:
            paint(body[idx] * _ramp(np.abs(y[idx] - self.transverseFissureY) - half, w) * _ramp(-1.5 - z[idx], w), "csf", idx)
        for side, centre in enumerate(self.ventricleCentres):
            rotation = self.ventricleRotation(side)
            local(centre, [max(self.ventricleAxes)] * 3,
                  lambda x, y, z, c=centre, r=rotation: _ramp(_ellipsoidDistance(x, y, z, c, self.ventricleAxes, r), w), "csf")
        local(self.thirdVentricle[0], self.thirdVentricle[1],
              lambda x, y, z: _ramp(_ellipsoidDistance(x, y, z, *self.thirdVentricle), w), "csf")
        local(self.tumourCentre, [max(self.tumourAxes)] * 3,
              lambda x, y, z: _ramp(_ellipsoidDistance(x, y, z, self.tumourCentre, self.tumourAxes, self.tumourRotation), w), "tumour")
        return out

    def landmarkCandidates(self):
        """Named anatomical spots (MRI RAS mm), in order of preference."""
        tc = np.array(self.tumourCentre)
        spots = [("tumour centre", tc)]
        for side, name in ((0, "right"), (1, "left")):
            c = np.array(self.ventricleCentres[side])
            axis = self.ventricleRotation(side) @ np.array([0.0, self.ventricleAxes[1], 0.0])
            spots.append((f"{name} lateral ventricle, anterior tip", c + axis))
            spots.append((f"{name} lateral ventricle, posterior tip", c - axis))
        arcRadius = self.hippocampusRadii[0]
        for side, name in ((0, "right"), (1, "left")):
            c = np.array(self.hippocampusCentres[side])
            spots.append((f"{name} hippocampal arc, dorsal apex", c + [0.0, 0.0, arcRadius]))
        for side, name in ((0, "right"), (1, "left")):
            c = np.array(self.striatumCentres[side])
            spots.append((f"{name} striatum, dorsal pole", c + [0.0, 0.0, self.striatumAxes[2]]))
        tcen, tax = self.thalamus
        spots.append(("thalamus, dorsal pole", np.array(tcen) + [0.0, 0.0, tax[2]]))
        vcen, vax = self.thirdVentricle
        spots.append(("third ventricle, dorsal tip", np.array(vcen) + [0.0, 0.0, vax[2]]))
        (wc, wa) = self.whiteInner
        yy = 1.0
        zz = wc[2] + wa[2] * math.sqrt(1 - ((yy - wc[1]) / wa[1]) ** 2)
        spots.append(("midline white-matter band, inner surface (y=1)", np.array([0.0, yy, zz])))
        angle = math.radians(20.0)
        for side, name in ((0, "right"), (1, "left")):
            c = np.array(self.hippocampusCentres[side])
            sign = 1.0 if side == 0 else -1.0
            spots.append((f"{name} hippocampal arc, lateral end", c + [sign * arcRadius * math.cos(angle), 0.0, arcRadius * math.sin(angle)]))
        for side, name in ((0, "right"), (1, "left")):
            c = np.array(self.striatumCentres[side])
            spots.append((f"{name} striatum, anterior pole", c + [0.0, self.striatumAxes[1], 0.0]))
        spots.append(("transverse fissure at the midline (z=1.5)", np.array([0.0, self.transverseFissureY, 1.5])))
        for side, name in ((0, "right"), (1, "left")):
            c = np.array(self.hippocampusCentres[side])
            sign = -1.0 if side == 0 else 1.0
            spots.append((f"{name} hippocampal arc, medial end", c + [sign * arcRadius * math.cos(angle), 0.0, arcRadius * math.sin(angle)]))
        spots.append(("tumour, dorsal surface", np.array(self.tumourCentre) + self.tumourRotation @ [0.0, 0.0, self.tumourAxes[2]]))
        return spots


# ---------------------------------------------------------------------------------------------------------
# The ground-truth mapping
# ---------------------------------------------------------------------------------------------------------
class HistologyToMriMapping(mappingLib.Mapping):
    """x = A y + t + sum_m a_m exp(-|y - c_m|^2 / (2 s_m^2)): histology RAS (true spacing) -> MRI RAS."""

    def __init__(self, linear, translation, centres, amplitudes, sigmas):
        self.linear = np.asarray(linear, float).reshape(3, 3)
        self.translation = np.asarray(translation, float).reshape(3)
        self.centres = np.asarray(centres, float).reshape(-1, 3)
        self.amplitudes = np.asarray(amplitudes, float).reshape(-1, 3)
        self.sigmas = np.asarray(sigmas, float).reshape(-1)
        self.affineMatrix = np.eye(4)
        self.affineMatrix[:3, :3] = self.linear
        self.affineMatrix[:3, 3] = self.translation

    @classmethod
    def fromParameters(cls, parameters):
        bumps = parameters["bumps"]
        return cls(parameters["A"], parameters["t_mm"], [b["centre_mm"] for b in bumps],
                   [b["amplitude_mm"] for b in bumps], [b["sigma_mm"] for b in bumps])

    def parameters(self) -> dict:
        return {"A": self.linear.tolist(), "t_mm": self.translation.tolist(),
                "bumps": [{"centre_mm": c.tolist(), "amplitude_mm": a.tolist(), "sigma_mm": float(s)}
                          for c, a, s in zip(self.centres, self.amplitudes, self.sigmas)]}

    def linearMatrix(self):
        return self.affineMatrix

    def warp(self, points):
        points = mappingLib.asPoints(points)
        out = np.zeros_like(points)
        for c, a, s in zip(self.centres, self.amplitudes, self.sigmas):
            g = np.exp(-np.sum((points - c) ** 2, axis=1) / (2 * s * s))
            out += g[:, None] * a
        return out

    def transformPoints(self, points):
        points = mappingLib.asPoints(points)
        return applyMatrix(self.affineMatrix, points) + self.warp(points)

    def transformGridPlane(self, xs, ys, z):
        """Mapped MRI coordinates (3 arrays [len(ys), len(xs)]) of the histology plane grid xs x ys at height z.

        Same values as transformPoints, but each Gaussian factorises over the grid axes (fast for pages).
        """
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        out = []
        for row in range(3):
            a = self.linear[row]
            out.append((a[0] * xs)[None, :] + (a[1] * ys + a[2] * z + self.translation[row])[:, None])
        for c, amp, s in zip(self.centres, self.amplitudes, self.sigmas):
            ex = np.exp(-(xs - c[0]) ** 2 / (2 * s * s))
            ey = np.exp(-(ys - c[1]) ** 2 / (2 * s * s)) * math.exp(-(z - c[2]) ** 2 / (2 * s * s))
            g = ey[:, None] * ex[None, :]
            for row in range(3):
                out[row] += amp[row] * g
        return out

    def jacobian(self, points):
        points = mappingLib.asPoints(points)
        jac = np.broadcast_to(self.linear, (len(points), 3, 3)).copy()
        for c, a, s in zip(self.centres, self.amplitudes, self.sigmas):
            d = points - c
            g = np.exp(-np.sum(d * d, axis=1) / (2 * s * s))
            jac += a[None, :, None] * (-(g / (s * s))[:, None] * d)[:, None, :]
        return jac

    def inverse(self, mriPoints, tolerance=1e-6):
        """Histology points mapping onto `mriPoints` (Newton); raises if the residual exceeds `tolerance` mm."""
        solution, residual = mappingLib.invertPoints(self, mriPoints, tolerance=tolerance * 1e-3, maxIterations=60)
        if len(residual) and residual.max() >= tolerance:
            raise RuntimeError(f"Ground-truth inverse did not converge: residual {residual.max():.3g} mm")
        return solution


def _buildMapping(seed, anatomy, geometry=None, grid=None) -> HistologyToMriMapping:
    """The seeded ground truth: the geometry's rotation and shrinkage, seeded bumps inside the stack's field of
    view, translation placing the tumour (inside that field of view)."""
    g = SampleGeometry() if geometry is None else geometry
    linear = rotationMatrix(g.rotationAxis, g.rotationDeg) / g.linearShrink
    rng = np.random.default_rng([seed, 2])
    if grid is None or g.stackExtentMm is None:
        fovLow = np.array([-FULL_SHAPE_IJK[0] * FULL_SPACING_UM[0], -FULL_SHAPE_IJK[1] * FULL_SPACING_UM[1], 0.0]) * 1e-3
        fovHigh = np.array([0.0, 0.0, FULL_SHAPE_IJK[2] * FULL_SPACING_UM[2] * 1e-3])
    else:
        fovLow, fovHigh = grid.rasLow(), grid.rasHigh()
    count = g.bumpCount
    centres = rng.uniform(fovLow, fovHigh, size=(count, 3))
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    amplitudes = directions * rng.uniform(*g.bumpAmplitudeMm, size=(count, 1))
    sigmas = rng.uniform(*g.bumpSigmaMm, size=count)
    # Bijectivity: |sum of bump Jacobians| <= sum |a|/s * exp(-1/2) < smallest singular value of A.
    bound = float(np.sum(np.linalg.norm(amplitudes, axis=1) / sigmas) * math.exp(-0.5))
    if not bound < np.linalg.svd(linear, compute_uv=False).min():
        raise ValueError(f"The warp could fold: its bumps' gradient bound {bound:.3g} reaches the linear part's "
                         f"smallest stretch {1 / g.linearShrink:.3g}. Lower bumpAmplitudeMm, raise bumpSigmaMm or "
                         f"use fewer bumps.")
    warpOnly = HistologyToMriMapping(np.zeros((3, 3)), np.zeros(3), centres, amplitudes, sigmas)
    anchor = _tumourAnchor(g, grid, fovLow, fovHigh, np.linalg.inv(linear))
    translation = np.array(anatomy.tumourCentre) - linear @ anchor - warpOnly.warp(anchor)[0]
    return HistologyToMriMapping(linear, translation, centres, amplitudes, sigmas)


def _tumourAnchor(geometry, grid, fovLow, fovHigh, inverseLinear):
    """Where the tumour centre lands in histology: the seed's place, scaled with a smaller field of view and kept
    TUMOUR_CLEARANCE_MM clear of the stack's faces (ValueError when the field of view cannot hold it)."""
    anchor = np.array(TUMOUR_CENTRE_HISTOLOGY)
    if grid is None or geometry.stackExtentMm is None:
        return anchor
    default = np.array([-FULL_EXTENT_UM[0], -FULL_EXTENT_UM[1], FULL_EXTENT_UM[2]]) * 1e-3
    anchor = anchor / np.abs(default) * (fovHigh - fovLow)
    # half extents of the tumour ellipsoid under the linear part (the bumps move it by < the clearance)
    semi = inverseLinear @ PhantomAnatomy.tumourRotation @ np.diag(PhantomAnatomy.tumourAxes)
    radius = np.linalg.norm(semi, axis=1) + TUMOUR_CLEARANCE_MM
    low, high = fovLow + radius, fovHigh - radius
    if np.any(low > high):
        raise ValueError(f"The stack's field of view {np.round(fovHigh - fovLow, 3).tolist()} mm cannot hold the "
                         f"tumour ({np.round(2 * radius, 2).tolist()} mm across with clearance): enlarge stackExtentMm.")
    return np.clip(anchor, low, high)


class GroundTruthMapping(mappingLib.Mapping):
    """The exact MRI RAS -> histology RAS mapping (resampling direction; a mapping.Mapping).

    `truth` is the truth.json dict (or a path to it / its folder). `histologyToMri` is the analytic forward
    direction; `transformPoints` solves it by Newton iterations to < 1e-6 mm.
    """

    def __init__(self, truth):
        truth = loadTruth(truth) if not isinstance(truth, dict) else truth
        self.forward = HistologyToMriMapping.fromParameters(truth["mapping"])
        self.affineMatrix = np.linalg.inv(self.forward.affineMatrix)

    def linearMatrix(self):
        return self.affineMatrix

    def transformPoints(self, points):
        return self.forward.inverse(points)

    def histologyToMri(self, points):
        return self.forward.transformPoints(points)

    def jacobian(self, points):
        return np.linalg.inv(self.forward.jacobian(self.transformPoints(points)))


def groundTruthHistologyToMri(truth, points) -> np.ndarray:
    """Exact histology RAS (true spacing) -> MRI RAS for (N, 3) points."""
    return GroundTruthMapping(truth).histologyToMri(points)


def groundTruthMriToHistology(truth, points) -> np.ndarray:
    """Exact MRI RAS -> histology RAS (true spacing) for (N, 3) points (Newton inverse, residual < 1e-6 mm)."""
    return GroundTruthMapping(truth).transformPoints(points)


def loadTruth(folderOrPath) -> dict:
    """The truth.json of a sample data folder (the folder or the file itself)."""
    path = os.fspath(folderOrPath)
    if os.path.isdir(path):
        path = os.path.join(path, "truth.json")
    if not os.path.isfile(path):
        raise ValueError(f"Ground truth file not found: {path}. Generate the sample data first (python -m MRIHistoRegLib sample).")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _histologyVolumeByQuadrature(forward, anatomy, radial=16, polar=16, azimuthal=32) -> float:
    """Native histology volume of the tumour: integral over the MRI tumour of det d(histology)/d(MRI).

    Gauss-Legendre in radius and cos(polar angle), trapezoid (spectrally exact) in azimuth, over the unit ball
    mapped onto the ellipsoid; det of the MRI->histology Jacobian = 1 / det of the forward Jacobian at the
    inverse point. Independent of any voxelisation.
    """
    rNodes, rWeights = np.polynomial.legendre.leggauss(radial)
    rNodes, rWeights = 0.5 * (rNodes + 1), 0.5 * rWeights
    mu, muWeights = np.polynomial.legendre.leggauss(polar)
    phi = np.arange(azimuthal) * 2 * math.pi / azimuthal
    r, m, p = np.meshgrid(rNodes, mu, phi, indexing="ij")
    weights = (rWeights[:, None, None] * rNodes[:, None, None] ** 2) * muWeights[None, :, None] * (2 * math.pi / azimuthal)
    weights = np.broadcast_to(weights, r.shape).ravel()
    s = np.sqrt(1 - m * m)
    unit = np.stack([(r * s * np.cos(p)).ravel(), (r * s * np.sin(p)).ravel(), (r * m).ravel()], axis=1)
    semi = np.diag(anatomy.tumourAxes)
    toMri = anatomy.tumourRotation @ semi
    mriPoints = unit @ toMri.T + np.array(anatomy.tumourCentre)
    histologyPoints = forward.inverse(mriPoints)
    det = np.linalg.det(forward.jacobian(histologyPoints))
    return float(abs(np.linalg.det(toMri)) * np.sum(weights / det))


# ---------------------------------------------------------------------------------------------------------
# Sizes and grids
# ---------------------------------------------------------------------------------------------------------
class HistologyGrid:
    """The stack's voxel grid at a size factor (1 = the seed's full stack, 8 = "small")."""

    def __init__(self, factor, spacingUm=None, extentMm=None):
        self.factor = float(factor)
        if spacingUm is None and extentMm is None:
            self.shapeIjk = tuple(int(round(n / self.factor)) for n in FULL_SHAPE_IJK)
            self.spacingUm = tuple(s * self.factor for s in FULL_SPACING_UM)
        else:  # a geometry's own spacing and/or field of view
            if spacingUm is None:
                spacingUm = [s * self.factor for s in FULL_SPACING_UM]
            self.spacingUm = tuple(float(s) for s in spacingUm)
            extentUm = (FULL_EXTENT_UM if extentMm is None else [float(e) * 1000.0 for e in extentMm])
            self.shapeIjk = tuple(max(2, int(round(e / s))) for e, s in zip(extentUm, self.spacingUm))
        self.spacingMm = np.array(self.spacingUm) * 1e-3
        sx, sy, sz = self.spacingMm
        self.ijkToRas = np.array([[-sx, 0, 0, 0], [0, -sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1.0]])
        # lattice step (voxels) so the lattice spacing is at most the "small" spacing along every axis
        ratio = min(lattice / spacing for lattice, spacing in zip(LATTICE_SPACING_UM, self.spacingUm))
        self.latticeStep = max(1, int(math.floor(ratio + 1e-9)))

    def voxelCount(self):
        return int(np.prod(self.shapeIjk))

    def rasLow(self):
        ni, nj, nk = self.shapeIjk
        return np.array([-(ni - 1) * self.spacingMm[0], -(nj - 1) * self.spacingMm[1], 0.0])

    def rasHigh(self):
        return np.array([0.0, 0.0, (self.shapeIjk[2] - 1) * self.spacingMm[2]])

    def contains(self, points, margin=0.0):
        points = mappingLib.asPoints(points)
        return np.all((points >= self.rasLow() + margin) & (points <= self.rasHigh() - margin), axis=1)


def _sizeFactor(size):
    """Size name or factor -> (name, factor); ValueError naming the problem."""
    if isinstance(size, str) and size.strip().lower() in SIZE_FACTORS:
        name = size.strip().lower()
        return name, float(SIZE_FACTORS[name])
    try:
        factor = float(size)
    except (TypeError, ValueError):
        raise ValueError(f"Unknown sample data size {size!r}: use 'small' (default), 'full' (the seed's 2160x2560x472 "
                         f"stack, 5.2 GB) or a number N = spacing factor relative to full (8 = small).") from None
    if not math.isfinite(factor) or factor < 1:
        raise ValueError(f"Sample data size factor {size!r} must be >= 1 (1 = the seed's full 2160x2560x472 stack; "
                         f"finer would exceed it). Use 'full', 'small' or a factor between 1 and {MAX_SIZE_FACTOR}.")
    if factor > MAX_SIZE_FACTOR:
        grid = HistologyGrid(factor)
        raise ValueError(f"Sample data size factor {size!r} is too small to hold the anatomy: the stack would be "
                         f"{'x'.join(map(str, grid.shapeIjk))} voxels of {grid.spacingUm[0]:.0f} x {grid.spacingUm[1]:.0f} x "
                         f"{grid.spacingUm[2]:.0f} um and the ~1 mm tumour would span fewer than 8 slices. "
                         f"Use a factor <= {MAX_SIZE_FACTOR} or 'small'.")
    return f"factor{factor:g}", factor


# ---------------------------------------------------------------------------------------------------------
# MRI
# ---------------------------------------------------------------------------------------------------------
def _renderMri(anatomy, seed, progress=None, ijkToRas=MRI_IJK_TO_RAS, shapeIjk=MRI_SHAPE_IJK):
    """(int16 MRI [k, j, i], uint8 tumour label [k, j, i]) on the MRI grid (any direction matrix)."""
    ni, nj, nk = shapeIjk
    m = np.asarray(ijkToRas, float)
    edgeWidth = float(np.linalg.norm(m[:3, :3], axis=0).max())  # the coarsest voxel side
    image = np.empty((nk, nj, ni), np.int16)
    label = np.empty((nk, nj, ni), np.uint8)
    rng = np.random.default_rng([seed, 1])
    jj, ii = np.meshgrid(np.arange(nj), np.arange(ni), indexing="ij")
    # each RAS coordinate as (in-plane part + origin) + k part: for an axis-aligned grid the zero terms add
    # exactly nothing, so the default grid's voxels are bit for bit those of the axis-aligned formula
    plane = [m[r, 0] * ii + m[r, 1] * jj + m[r, 3] for r in range(3)]
    slab = max(1, min(20, int(4_000_000 // max(1, ni * nj))))  # about 4 M voxels (a few hundred MB) per slab
    for k0 in range(0, nk, slab):
        ks = np.arange(k0, min(nk, k0 + slab))
        xs, ys, zs = (plane[r][None] + (m[r, 2] * ks)[:, None, None] for r in range(3))
        signal = anatomy.intensity(xs, ys, zs, CONTRAST_MRI, edgeWidth)
        bias = 1.0 + 0.06 * xs / 4.5 - 0.05 * (zs / 3.5) ** 2
        signal = signal * bias * MRI_SCALE
        sd = MRI_NOISE_SD * MRI_SCALE
        real = signal + rng.normal(0.0, sd, signal.shape)
        imaginary = rng.normal(0.0, sd, signal.shape)
        image[ks] = np.clip(np.rint(np.hypot(real, imaginary)), 0, 32767).astype(np.int16)  # Rician magnitude
        label[ks] = (anatomy.tumourQuadratic(xs, ys, zs) <= 1.0).astype(np.uint8)
        progressLib.report(progress, (k0 + len(ks)) / nk, "MRI")
    return image, label


# ---------------------------------------------------------------------------------------------------------
# Histology stack (streamed)
# ---------------------------------------------------------------------------------------------------------
def _nrrdHeader(dtypeName, shapeIjk, encoding):
    ni, nj, nk = shapeIjk
    return ("NRRD0004\n"
            "# Complete NRRD file format specification at:\n"
            "# http://teem.sourceforge.net/nrrd/format.html\n"
            "# MRIHistoReg sample data: the spacing below (1 mm) is WRONG on purpose; see truth.json\n"
            f"type: {dtypeName}\n"
            "dimension: 3\n"
            "space: left-posterior-superior\n"
            f"sizes: {ni} {nj} {nk}\n"
            "space directions: (1,0,0) (0,1,0) (0,0,1)\n"
            "kinds: domain domain domain\n"
            "endian: little\n"
            f"encoding: {encoding}\n"
            "space origin: (0,0,0)\n"
            "\n").encode("ascii")


class _StackRenderer:
    """Renders the stack page by page from lattice planes of the exact mapping and anatomy."""

    def __init__(self, anatomy, forward, grid, seed, latticeStep=None, linearShrink=LINEAR_SHRINK):
        self.anatomy = anatomy
        self.forward = forward
        self.grid = grid
        self.seed = seed
        self.step = int(latticeStep or grid.latticeStep)
        ni, nj, nk = grid.shapeIjk
        if self.step == 1:
            self.latticeI, self.latticeJ = np.arange(ni), np.arange(nj)
        else:
            self.latticeI = np.arange((ni - 1) // self.step + 2) * self.step
            self.latticeJ = np.arange((nj - 1) // self.step + 2) * self.step
        latticeSpacing = self.grid.spacingMm * self.step
        self.edgeWidth = float(latticeSpacing.max() / linearShrink)  # a lattice voxel, in MRI mm
        self._planes = {}
        stripeRng = np.random.default_rng([seed, 3])
        count = 14
        self.stripePeriods = stripeRng.uniform(0.02, 0.25, count)  # mm along j (rows); stripes run along i
        self.stripeAmplitudes = stripeRng.uniform(0.01, 0.035, count)
        self.stripePhases = stripeRng.uniform(0, 2 * math.pi, count)
        self.stripeDrift = stripeRng.uniform(-3.0, 3.0, count)  # radians per mm of depth
        self.shadowCentres = stripeRng.uniform(0.0, nj * grid.spacingMm[1], 6)
        self.shadowWidths = stripeRng.uniform(0.01, 0.04, 6)
        self.shadowDepths = stripeRng.uniform(0.15, 0.35, 6)

    def _plane(self, kl):
        if kl not in self._planes:
            if len(self._planes) > 2:
                self._planes.pop(min(self._planes))
            sx, sy, sz = self.grid.spacingMm
            xs, ys, zs = self.forward.transformGridPlane(-self.latticeI * sx, -self.latticeJ * sy, kl * self.step * sz)
            value = self.anatomy.intensity(xs, ys, zs, CONTRAST_LSM, self.edgeWidth).astype(np.float32)
            quadratic = self.anatomy.tumourQuadratic(xs, ys, zs).astype(np.float32)
            self._planes[kl] = (value, quadratic)
        return self._planes[kl]

    def _upsample(self, plane):
        if self.step == 1:
            return plane
        ni, nj, _ = self.grid.shapeIjk
        s = self.step
        i = np.arange(ni)
        i0, fi = i // s, ((i % s) / s).astype(np.float32)
        plane = plane[:, i0] * (1 - fi) + plane[:, i0 + 1] * fi
        j = np.arange(nj)
        j0, fj = j // s, ((j % s) / s).astype(np.float32)[:, None]
        return plane[j0] * (1 - fj) + plane[j0 + 1] * fj

    def tissue(self, k):
        """Tissue intensity of page k (float32 [j, i]), interpolated from the lattice planes around it."""
        kl, remainder = divmod(k, self.step)
        value = self._plane(kl)[0]
        if remainder:
            f = remainder / self.step
            value = value * (1 - f) + self._plane(kl + 1)[0] * f
        return self._upsample(value)

    def tumourLabel(self, k):
        """Exact tumour label of page k (uint8 [j, i]): the mapping is evaluated exactly at every voxel of the
        page region whose lattice neighbourhood comes near the tumour (quadratic form < 2 on the lattice)."""
        ni, nj, _ = self.grid.shapeIjk
        label = np.zeros((nj, ni), np.uint8)
        region = self._tumourRegion(k)
        if region is None:
            return label
        (j0, j1, i0, i1), (xs, ys, zs) = region
        label[j0:j1, i0:i1] = self.anatomy.tumourQuadratic(xs, ys, zs) <= 1.0
        return label

    def tumourOccupancy(self, k):
        """Partial-volume tumour occupancy of page k (float32 [j, i], 0..1): a ramp one voxel (in MRI mm) wide
        across the ellipsoid's surface, evaluated exactly where the label is (what a reporter's signal looks like)."""
        ni, nj, _ = self.grid.shapeIjk
        occupancy = np.zeros((nj, ni), np.float32)
        region = self._tumourRegion(k)
        if region is None:
            return occupancy
        (j0, j1, i0, i1), (xs, ys, zs) = region
        a = self.anatomy
        width = float(self.grid.spacingMm.max() * np.linalg.norm(self.forward.linear, 2))
        distance = _ellipsoidDistance(xs, ys, zs, a.tumourCentre, a.tumourAxes, a.tumourRotation)
        occupancy[j0:j1, i0:i1] = _ramp(distance.astype(np.float32), width)
        return occupancy

    def _tumourRegion(self, k):
        """((j0, j1, i0, i1), MRI RAS planes xs, ys, zs) of the page region near the tumour, or None."""
        ni, nj, _ = self.grid.shapeIjk
        sx, sy, sz = self.grid.spacingMm
        kl, remainder = divmod(k, self.step)
        near = self._plane(kl)[1] < 2.0
        if remainder:
            near = near | (self._plane(kl + 1)[1] < 2.0)
        if not near.any():
            return None
        rows, columns = np.nonzero(near)
        last = len(self.latticeI) - 1, len(self.latticeJ) - 1
        i0 = int(self.latticeI[max(columns.min() - 1, 0)])
        i1 = min(ni, int(self.latticeI[min(columns.max() + 1, last[0])]) + 1)
        j0 = int(self.latticeJ[max(rows.min() - 1, 0)])
        j1 = min(nj, int(self.latticeJ[min(rows.max() + 1, last[1])]) + 1)
        xs, ys, zs = self.forward.transformGridPlane(-np.arange(i0, i1) * sx, -np.arange(j0, j1) * sy, k * sz)
        return (j0, j1, i0, i1), (xs, ys, zs)

    def page(self, k):
        """(uint16 image page, uint8 tumour label page) for page k, each [j, i]."""
        ni, nj, _ = self.grid.shapeIjk
        sx, sy, sz = self.grid.spacingMm
        value = self.tissue(k)
        rng = np.random.default_rng([self.seed, 7, k])
        speckle = rng.standard_gamma(4.0, size=(nj, ni), dtype=np.float32) * np.float32(0.25)  # mean 1, sd 0.5
        rowMm = np.arange(nj) * sy
        depth = k * sz
        stripe = 1.0 + np.sum(self.stripeAmplitudes[:, None] * np.sin(
            2 * math.pi * rowMm[None, :] / self.stripePeriods[:, None] + self.stripePhases[:, None]
            + self.stripeDrift[:, None] * depth), axis=0)
        for centre, width, strength in zip(self.shadowCentres, self.shadowWidths, self.shadowDepths):
            stripe *= 1.0 - strength * np.exp(-0.5 * ((rowMm - centre) / width) ** 2)
        stripe *= math.exp(-depth / 6.0)  # attenuation with depth
        signal = value * (np.float32(0.6) + np.float32(0.4) * speckle) * stripe.astype(np.float32)[:, None]
        signal += np.float32(HISTOLOGY_BACKGROUND)
        noise = rng.standard_normal(size=(nj, ni), dtype=np.float32)
        signal += noise * np.sqrt(np.float32(2.0) * signal)  # shot-noise-like, gain 2
        image = np.clip(np.rint(signal), 0, 65535).astype("<u2")
        return image, self.tumourLabel(k)


def _writeHistology(folder, anatomy, forward, grid, seed, latticeStep=None, progress=None, linearShrink=LINEAR_SHRINK):
    """Stream the stack into histology.tif, histology.nrrd (raw) and histology_tumour_label.nrrd (gzip).

    One page at a time: memory is a few pages whatever the size. Returns statistics (label voxel count,
    intensity range).
    """
    from .deps import requirePackage

    tifffile = requirePackage("tifffile")

    renderer = _StackRenderer(anatomy, forward, grid, seed, latticeStep, linearShrink)
    ni, nj, nk = grid.shapeIjk
    bigTiff = grid.voxelCount() * 2 > 2 ** 32 - 2 ** 25
    stats = {"label_voxels": 0, "min": 65535, "max": 0, "lattice_step": renderer.step}
    with open(os.path.join(folder, "histology.nrrd"), "wb") as nrrdFile, \
            open(os.path.join(folder, "histology_tumour_label.nrrd"), "wb") as labelFile:
        nrrdFile.write(_nrrdHeader("uint16", grid.shapeIjk, "raw"))
        labelFile.write(_nrrdHeader("uint8", grid.shapeIjk, "gzip"))
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # gzip container

        def pages():
            for k in range(nk):
                image, label = renderer.page(k)
                nrrdFile.write(image.tobytes())
                labelFile.write(compressor.compress(label.tobytes()))
                stats["label_voxels"] += int(np.count_nonzero(label))
                stats["min"] = min(stats["min"], int(image.min()))
                stats["max"] = max(stats["max"], int(image.max()))
                progressLib.report(progress, (k + 1) / nk, "light-sheet stack")
                yield image

        # The seed's mistake (issue 2: "headers claim 1 mm spacing"): ImageJ metadata claiming 1 mm voxels, as Fiji
        # writes for an uncalibrated stack saved with unit "mm": unit=mm, slice spacing 1, and XResolution =
        # YResolution = 1 pixel per unit (ResolutionUnit NONE, ImageJ's convention: the unit is in the metadata).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nonconformant BigTIFF ImageJ")  # "full" size: > 4 GB
            with tifffile.TiffWriter(os.path.join(folder, "histology.tif"), bigtiff=bigTiff, imagej=True) as tiff:
                tiff.write(pages(), shape=(nk, nj, ni), dtype="uint16", photometric="minisblack",
                           resolution=(1.0, 1.0), metadata={"spacing": 1.0, "unit": "mm", "axes": "ZYX"})
        labelFile.write(compressor.flush())
    return stats


def _writeChannels(folder, anatomy, forward, grid, seed, linearShrink, progress=None) -> dict:
    """histology_channels.ome.tif: C=0 the registration channel (the voxels of histology.tif, read back from the
    raw histology.nrrd), C=1 a tumour reporter (tumour bright with partial-volume edges, tissue bleed-through
    and background dim, shot noise), CZYX through tifffile's OME writer with channel names and the TRUE
    spacing (an OME file from a microscope carries it). Streamed page by page; returns its statistics."""
    from .deps import requirePackage

    tifffile = requirePackage("tifffile")
    renderer = _StackRenderer(anatomy, forward, grid, seed, linearShrink=linearShrink)
    ni, nj, nk = grid.shapeIjk
    header, pageBytes = len(_nrrdHeader("uint16", grid.shapeIjk, "raw")), ni * nj * 2
    stats = {"occupancy_voxels": 0.0, "tumour_min": 65535, "tumour_max": 0}

    def registration(k):
        nrrdFile.seek(header + k * pageBytes)
        return np.frombuffer(nrrdFile.read(pageBytes), "<u2").reshape(nj, ni)

    def pages():
        for k in range(nk):
            yield registration(k)
            progressLib.report(progress, 0.5 * (k + 1) / nk, "tumour channel")
        for k in range(nk):
            occupancy = renderer.tumourOccupancy(k)
            stats["occupancy_voxels"] += float(occupancy.sum(dtype=np.float64))
            tissue = registration(k).astype(np.float32) - np.float32(HISTOLOGY_BACKGROUND)
            signal = (np.float32(TUMOUR_CHANNEL_BACKGROUND) + np.float32(TUMOUR_CHANNEL_TISSUE_FRACTION) * tissue
                      + np.float32(TUMOUR_SIGNAL_COUNTS) * occupancy)
            noise = np.random.default_rng([seed, 8, k]).standard_normal(size=(nj, ni), dtype=np.float32)
            signal += noise * np.sqrt(np.float32(2.0) * np.maximum(signal, np.float32(1.0)))
            page = np.clip(np.rint(signal), 0, 65535).astype("<u2")
            stats["tumour_min"] = min(stats["tumour_min"], int(page.min()))
            stats["tumour_max"] = max(stats["tumour_max"], int(page.max()))
            progressLib.report(progress, 0.5 + 0.5 * (k + 1) / nk, "tumour channel")
            yield page

    sx, sy, sz = grid.spacingUm
    with open(os.path.join(folder, "histology.nrrd"), "rb") as nrrdFile, \
            tifffile.TiffWriter(os.path.join(folder, CHANNELS_FILE), bigtiff=grid.voxelCount() * 4 > 2 ** 32 - 2 ** 25,
                                ome=True) as tiff:
        tiff.write(pages(), shape=(2, nk, nj, ni), dtype="uint16", photometric="minisblack",
                   metadata={"axes": "CZYX", "Channel": {"Name": list(CHANNEL_NAMES)},
                             "PhysicalSizeX": sx, "PhysicalSizeXUnit": "\u00b5m", "PhysicalSizeY": sy,
                             "PhysicalSizeYUnit": "\u00b5m", "PhysicalSizeZ": sz, "PhysicalSizeZUnit": "\u00b5m"})
    return stats


def _channelsTruth(grid, stats, tumour) -> dict:
    """truth.json's 'channels': the multi-channel file and the tumour channel's ground truth."""
    voxelMm3 = float(np.prod(grid.spacingMm))
    return {"file": CHANNELS_FILE, "format": "OME-TIFF, CZYX, uint16", "names": list(CHANNEL_NAMES),
            "registration_channel": 0, "tumour_channel": 1, "spacing_um": list(grid.spacingUm),
            "file_claims": {"spacing_um": list(grid.spacingUm), "metadata": "OME PhysicalSizeX/Y/Z (true)"},
            "tumour_signal": {"background_counts": TUMOUR_CHANNEL_BACKGROUND,
                              "tissue_bleed_through": TUMOUR_CHANNEL_TISSUE_FRACTION,
                              "tumour_counts_above_tissue": TUMOUR_SIGNAL_COUNTS,
                              "noise": "shot-noise-like, variance 2 x counts",
                              "edges": "linear partial-volume ramp one voxel wide across the tumour surface",
                              "intensity_range": [stats["tumour_min"], stats["tumour_max"]]},
            # the native (histology-space) volume of the tumour region: the analytic truth a segmentation of
            # this channel at the stack's resolution should find, and the voxelised forms of it
            "tumour_native_volume_mm3": tumour["histology_volume_mm3"],
            "tumour_native_volume_method": tumour["histology_volume_method"],
            "tumour_label_volume_mm3": tumour["histology_label_volume_mm3"],
            "tumour_occupancy_volume_mm3": stats["occupancy_voxels"] * voxelMm3}


# ---------------------------------------------------------------------------------------------------------
# Points
# ---------------------------------------------------------------------------------------------------------
class _MriBox:
    """Which RAS points lie inside the MRI grid (any direction matrix), `margin` mm inside its voxel centres."""

    def __init__(self, ijkToRas, shapeIjk):
        self.rasToIjk = np.linalg.inv(np.asarray(ijkToRas, float))
        self.spacing = np.linalg.norm(np.asarray(ijkToRas, float)[:3, :3], axis=0)
        self.high = np.asarray(shapeIjk, float) - 1

    def contains(self, points, margin=0.0):
        ijk = applyMatrix(self.rasToIjk, mappingLib.asPoints(points))
        pad = margin / self.spacing
        return np.all((ijk >= pad) & (ijk <= self.high - pad), axis=1)


def _landmarks(anatomy, forward, grid, seed, geometry=None, mriBox=None):
    """Noisy landmark pairs: the named anatomical spots inside the coverage (and the MRI), in order; where a
    small field of view holds fewer than the geometry asks for, seeded spread-out points inside the covered
    brain fill the rest ("covered brain point n", as a user would click any recognisable spot there)."""
    g = SampleGeometry() if geometry is None else geometry
    candidates = anatomy.landmarkCandidates()
    mriTrue = np.array([p for _, p in candidates])
    histologyTrue = forward.inverse(mriTrue)
    inside = grid.contains(histologyTrue, COVERAGE_MARGIN_MM)
    if mriBox is not None:
        inside &= mriBox.contains(mriTrue, COVERAGE_MARGIN_MM)
    chosen = [n for n in range(len(candidates)) if inside[n]][:g.landmarkCount]
    names = [candidates[c][0] for c in chosen]
    mriTrue, histologyTrue = mriTrue[chosen], histologyTrue[chosen]
    if len(chosen) < g.landmarkCount:
        extraHistology = _spreadPoints(anatomy, forward, grid, mriBox, seed, g.landmarkCount - len(chosen), histologyTrue)
        names += [f"covered brain point {n + 1}" for n in range(len(extraHistology))]
        histologyTrue = np.concatenate([histologyTrue.reshape(-1, 3), extraHistology])
        mriTrue = np.concatenate([mriTrue.reshape(-1, 3), forward.transformPoints(extraHistology)])
    rng = np.random.default_rng([seed, 5])
    mri = mriTrue + rng.normal(0.0, g.landmarkNoiseMriMm, mriTrue.shape)
    histology = histologyTrue + rng.normal(0.0, g.landmarkNoiseHistologyMm, histologyTrue.shape)
    labels = [f"L{n + 1:02d}" for n in range(len(names))]
    return labels, dict(zip(labels, names)), mri, histology, mriTrue, histologyTrue


def _spreadPoints(anatomy, forward, grid, mriBox, seed, count, existing):
    """`count` histology points inside the brain and the coverage, far from each other and from `existing`
    (greedy farthest-point choice among seeded candidates)."""
    rng = np.random.default_rng([seed, 6])
    low, high = grid.rasLow() + COVERAGE_MARGIN_MM, grid.rasHigh() - COVERAGE_MARGIN_MM
    candidates = rng.uniform(low, high, size=(4000, 3))
    mri = forward.transformPoints(candidates)
    keep = anatomy.bodyQuadratic(mri[:, 0], mri[:, 1], mri[:, 2]) < 0.85
    if mriBox is not None:
        keep &= mriBox.contains(mri, COVERAGE_MARGIN_MM)
    candidates = candidates[keep]
    if len(candidates) < count:
        raise ValueError(f"The stack covers too little of the brain inside the MRI for {count} more landmarks: "
                         f"enlarge stackExtentMm or the MRI, or lower landmarkCount.")
    chosen = []
    reference = np.asarray(existing, float).reshape(-1, 3)
    distance = (np.min(np.linalg.norm(candidates[:, None] - reference[None], axis=2), axis=1) if len(reference)
                else np.full(len(candidates), np.inf))
    for _ in range(count):
        best = int(np.argmax(distance))
        chosen.append(candidates[best])
        distance = np.minimum(distance, np.linalg.norm(candidates - candidates[best], axis=1))
    return np.array(chosen)


def _evalPoints(anatomy, forward, grid, seed, geometry=None, mriBox=None):
    """Noise-free held-out points inside the brain and the coverage (and the MRI)."""
    g = SampleGeometry() if geometry is None else geometry
    rng = np.random.default_rng([seed, 4])
    low, high = grid.rasLow() + 0.2, grid.rasHigh() - 0.2
    histology, mri = np.zeros((0, 3)), np.zeros((0, 3))
    for _ in range(25):  # a small coverage keeps few of each draw: draw again (the first draw is the sample's)
        drawn = rng.uniform(low, high, size=(4000, 3))
        mapped = forward.transformPoints(drawn)
        keep = anatomy.bodyQuadratic(mapped[:, 0], mapped[:, 1], mapped[:, 2]) < 0.85
        if mriBox is not None:
            keep &= mriBox.contains(mapped, 0.0)
        histology, mri = np.concatenate([histology, drawn[keep]]), np.concatenate([mri, mapped[keep]])
        if len(histology) >= g.evalPointCount:
            break
    if len(histology) < 3:
        raise ValueError("The stack covers (almost) no brain inside the MRI: move mriCentreRasMm or enlarge the fields of view.")
    histology, mri = histology[:g.evalPointCount], mri[:g.evalPointCount]
    labels = [f"E{n + 1:02d}" for n in range(len(histology))]
    return labels, mri, histology


def _writeCsv(path, labels, points):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("label,x,y,z\n")
        for label, p in zip(labels, points):
            f.write(f"{label},{p[0]:.6f},{p[1]:.6f},{p[2]:.6f}\n")


def _writeMarkups(scene, path, name, labels, points):
    import vtk

    from .volumes import saveNode

    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for label, p in zip(labels, points):
        node.AddControlPoint(vtk.vtkVector3d(*map(float, p)), label)
    saveNode(node, path, useCompression=False)


# ---------------------------------------------------------------------------------------------------------
# Output folder handling
# ---------------------------------------------------------------------------------------------------------
def _prepareDestination(outDir, neededBytes):
    """(absolute outDir, temporary sibling folder, parent folders created) or ValueError naming the problem."""
    outDir = os.path.abspath(os.fspath(outDir))
    if os.path.exists(outDir) and not os.path.isdir(outDir):
        raise ValueError(f"Sample data output {outDir} is a file. Choose a new or empty folder.")
    if os.path.isdir(outDir) and os.listdir(outDir):
        raise ValueError(f"Sample data output folder {outDir} is not empty. Choose a new or empty folder "
                         f"(nothing is overwritten).")
    parent = os.path.dirname(outDir)
    created = []
    probe = parent
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        created.append(probe)
        probe = os.path.dirname(probe)
    try:
        os.makedirs(parent, exist_ok=True)
        temporary = tempfile.mkdtemp(prefix="." + os.path.basename(outDir) + ".partial-", dir=parent)
    except OSError as error:
        _removeCreated(created)
        raise ValueError(f"Cannot write the sample data to {outDir}: {error.strerror or error}. "
                         f"Choose a writable folder.") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o777 & ~umask)
    free = shutil.disk_usage(parent).free
    if free < neededBytes:
        shutil.rmtree(temporary, ignore_errors=True)
        _removeCreated(created)
        raise ValueError(f"Not enough free disk space at {parent} for the sample data: needs {neededBytes / 1e9:.1f} GB, "
                         f"{free / 1e9:.1f} GB free. Choose another folder or a smaller size.")
    return outDir, temporary, created


def _removeCreated(created):
    for path in created:  # deepest first
        try:
            os.rmdir(path)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------
def generateSampleData(outDir, size="small", seed=0, progress=None, geometry: Optional[SampleGeometry] = None) -> dict:
    """Write the sample data set (MRI, light-sheet stack, labels, landmarks, ground truth) into `outDir`.

    size: "small" (default; stack 270x320x59 at 26x26x40 um, seconds), "full" (the seed's 2160x2560x472 stack
    at 3.25x3.25x5 um, 5.2 GB per copy, streamed) or a number N >= 1 (spacing N times the full size's).
    geometry: a SampleGeometry (None = the shipped sample's); its stackSpacingUm, when set, replaces `size`.
    `outDir` must not exist or be empty; everything is written into a temporary sibling folder that replaces
    it at the end, so a failure or cancel (progress callback raising/returning True) leaves nothing behind.
    Returns a manifest: {"folder", "files", "size", "seed", "seconds", "truth"}.
    """
    started = time.perf_counter()
    geometry = checkGeometry(geometry)
    sizeName, factor = _sizeFactor(size)
    if geometry.stackSpacingUm is not None:
        sizeName, factor = "custom", float(geometry.stackSpacingUm[0]) / FULL_SPACING_UM[0]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"Sample data seed must be a non-negative integer, got {seed!r}.")
    seed = int(seed)
    if geometry.stackSpacingUm is None and geometry.stackExtentMm is None:
        grid = HistologyGrid(factor)
    else:
        grid = HistologyGrid(factor, geometry.stackSpacingUm, geometry.stackExtentMm)
    copies = 3 if geometry.tumourChannel else 2
    needed = int(grid.voxelCount() * 2 * copies * 1.02 + 50e6 + np.prod(geometry.mriShapeIjk) * 3)
    outDir, temporary, created = _prepareDestination(outDir, needed)
    try:
        truth = _generateInto(temporary, grid, sizeName, factor, seed, progress, geometry)
        if os.path.isdir(outDir):
            os.rmdir(outDir)  # empty (checked above)
        os.rename(temporary, outDir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        _removeCreated(created)
        raise
    seconds = time.perf_counter() - started
    logging.info("sample data (%s, seed %d) written to %s in %.1f s", sizeName, seed, outDir, seconds)
    return {"folder": outDir, "files": list(truth["files"]), "size": sizeName, "seed": seed, "seconds": seconds,
            "truth": truth}


def _generateInto(folder, grid, sizeName, factor, seed, progress, geometry):
    from . import context

    g = geometry
    anatomy = PhantomAnatomy()
    forward = _buildMapping(seed, anatomy, g, grid)
    centre = forward.transformPoints((grid.rasLow() + grid.rasHigh()) / 2)[0]
    mriIjkToRas = g.mriIjkToRas(centre)
    mriBox = _MriBox(mriIjkToRas, g.mriShapeIjk)
    progressLib.report(progress, 0.0, "MRI")
    scene = context.createScene()
    # the points first: a geometry whose coverage cannot hold them fails before the big files are written
    points = _writePointFiles(folder, scene, anatomy, forward, grid, seed, g, mriBox)
    mriLabelVoxels = _writeMriVolumes(folder, scene, anatomy, seed, progressLib.scaled(progress, 0.0, 0.15),
                                      mriIjkToRas, g.mriShapeIjk)
    stats = _writeHistology(folder, anatomy, forward, grid, seed, progress=progressLib.scaled(progress, 0.2, 0.9),
                            linearShrink=g.linearShrink)
    files = list(FILES)
    if g.tumourChannel:
        stats["channel"] = _writeChannels(folder, anatomy, forward, grid, seed, g.linearShrink,
                                          progressLib.scaled(progress, 0.9, 0.95))
        files.insert(files.index("histology_tumour_label.nrrd") + 1, CHANNELS_FILE)
    progressLib.report(progress, 0.97, "ground truth")

    truth = {
        "description": "MRIHistoReg sample data: ground truth. Histology coordinates are RAS mm in the stack's "
                       "corrected frame RAS = (-i*sx, -j*sy, k*sz) with the TRUE spacing; the stack files claim 1 mm.",
        "seed": seed,
        "size": sizeName,
        "size_factor": factor,
        "mri": {"file": "mri.nrrd", "label_file": "mri_tumour_label.nrrd", "shape_ijk": list(g.mriShapeIjk),
                "array_shape_kji": list(g.mriShapeIjk[::-1]), "spacing_mm": list(g.mriSpacingMm),
                "ijk_to_ras": mriIjkToRas.tolist(), "dtype": "int16", "contrast": "T2-like (CSF bright), Rician noise"},
        "histology": _histologyTruth(grid, stats),
        "mapping": dict(forward.parameters(), **{
            "direction": "histology RAS (true spacing) -> MRI RAS",
            "formula": "x = A y + t_mm + sum_m amplitude_m * exp(-|y - centre_m|^2 / (2 sigma_m^2))",
            "rotation_axis": list(g.rotationAxis), "rotation_deg": g.rotationDeg,
            "linear_expansion": 1.0 / g.linearShrink}),
        "shrinkage": {"linear_scale": g.linearShrink, "volume_ratio": g.linearShrink ** 3,
                      "volume_shrinkage_percent": 100.0 * (1 - g.linearShrink ** 3)},
        "tumour": _tumourTruth(anatomy, forward, grid, stats, mriLabelVoxels, g),
        "landmarks": {"labels": points["labels"], "names": points["names"], "mri_noise_sd_mm": g.landmarkNoiseMriMm,
                      "histology_noise_sd_mm": g.landmarkNoiseHistologyMm,
                      "mri_true_ras_mm": points["mriTrue"].tolist(),
                      "histology_true_ras_mm": points["histologyTrue"].tolist(),
                      "files": ["landmarks_mri.mrk.json", "landmarks_histology.mrk.json", "landmarks_mri.csv",
                                "landmarks_histology.csv"]},
        "eval_points": {"count": points["evalCount"], "noise_free": True,
                        "files": ["eval_points_mri.csv", "eval_points_histology.csv"]},
        "files": files,
        "geometry": g.toDict(),
        "coverage": _coverage(anatomy, forward, grid, mriBox, g),
    }
    if g.tumourChannel:
        truth["channels"] = _channelsTruth(grid, stats["channel"], truth["tumour"])
    with open(os.path.join(folder, "truth.json"), "w", encoding="utf-8") as f:
        json.dump(truth, f, indent=1)
    _writeRunConfig(folder, grid, g)
    progressLib.report(progress, 1.0, "done")
    return truth


def _writeMriVolumes(folder, scene, anatomy, seed, progress, ijkToRas=MRI_IJK_TO_RAS, shapeIjk=MRI_SHAPE_IJK) -> int:
    """mri.nrrd and mri_tumour_label.nrrd; returns the label's voxel count."""
    from .volumes import createVolumeNode, saveNode

    mri, mriLabel = _renderMri(anatomy, seed, progress, ijkToRas, shapeIjk)
    saveNode(createVolumeNode(scene, mri, ijkToRas, "mri"), os.path.join(folder, "mri.nrrd"))
    saveNode(createVolumeNode(scene, mriLabel, ijkToRas, "mri_tumour_label", labelmap=True),
             os.path.join(folder, "mri_tumour_label.nrrd"))
    return int(np.count_nonzero(mriLabel))


def _coverage(anatomy, forward, grid, mriBox, geometry, points=40) -> dict:
    """How much of the MRI and of the brain the stack covers, in MRI space: midpoint-rule integral of the
    forward Jacobian determinant over the stack's box (points^3 cells), split by where the points land."""
    low, high = grid.rasLow(), grid.rasHigh()
    axes = [low[a] + (np.arange(points) + 0.5) * (high[a] - low[a]) / points for a in range(3)]
    y = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    cell = float(np.prod((high - low) / points))
    volume = np.abs(np.linalg.det(forward.jacobian(y))) * cell
    x = forward.transformPoints(y)
    inMri = mriBox.contains(x)
    inBrain = anatomy.bodyQuadratic(x[:, 0], x[:, 1], x[:, 2]) <= 1.0
    mriVolume = float(np.prod(geometry.mriShapeIjk) * np.prod(geometry.mriSpacingMm))
    (_, (a, b, c)) = anatomy.body
    brainVolume = 4.0 / 3.0 * math.pi * a * b * c
    return {"method": f"midpoint rule over the stack's box ({points}^3 cells) of |det d(MRI)/d(histology)|",
            "stack_footprint_mm3": float(volume.sum()),
            "mri_fraction": float(volume[inMri].sum() / mriVolume),
            "brain_fraction": float(volume[inMri & inBrain].sum() / brainVolume),
            "mri_volume_mm3": mriVolume, "brain_volume_mm3": brainVolume}


def _writePointFiles(folder, scene, anatomy, forward, grid, seed, geometry=None, mriBox=None) -> dict:
    """The landmark files (noisy, both formats) and the noise-free evaluation points; returns what truth.json
    records of them."""
    labels, names, lmMri, lmHistology, lmMriTrue, lmHistologyTrue = _landmarks(anatomy, forward, grid, seed,
                                                                               geometry, mriBox)
    _writeMarkups(scene, os.path.join(folder, "landmarks_mri.mrk.json"), "landmarks_mri", labels, lmMri)
    _writeMarkups(scene, os.path.join(folder, "landmarks_histology.mrk.json"), "landmarks_histology", labels, lmHistology)
    _writeCsv(os.path.join(folder, "landmarks_mri.csv"), labels, lmMri)
    _writeCsv(os.path.join(folder, "landmarks_histology.csv"), labels, lmHistology)
    evalLabels, evalMri, evalHistology = _evalPoints(anatomy, forward, grid, seed, geometry, mriBox)
    _writeCsv(os.path.join(folder, "eval_points_mri.csv"), evalLabels, evalMri)
    _writeCsv(os.path.join(folder, "eval_points_histology.csv"), evalLabels, evalHistology)
    return {"labels": labels, "names": names, "mriTrue": lmMriTrue, "histologyTrue": lmHistologyTrue,
            "evalCount": len(evalLabels)}


def _histologyTruth(grid, stats) -> dict:
    """truth.json's 'histology': the true geometry and what each file claims instead."""
    return {"files": ["histology.tif", "histology.nrrd"], "label_file": "histology_tumour_label.nrrd",
            "shape_ijk": list(grid.shapeIjk), "array_shape_kji": list(grid.shapeIjk[::-1]), "dtype": "uint16",
            "true_spacing_um": list(grid.spacingUm), "true_spacing_mm": grid.spacingMm.tolist(),
            "header_spacing_mm": [1.0, 1.0, 1.0],
            "file_claims": {
                "histology.tif": {"metadata": "ImageJ", "unit": "mm", "spacing_mm": [1.0, 1.0, 1.0],
                                  "resolution_px_per_unit": [1.0, 1.0], "slice_spacing": 1.0},
                "histology.nrrd": {"metadata": "NRRD space directions", "space": "left-posterior-superior",
                                   "spacing_mm": [1.0, 1.0, 1.0]},
                "histology_tumour_label.nrrd": {"metadata": "NRRD space directions",
                                                "space": "left-posterior-superior",
                                                "spacing_mm": [1.0, 1.0, 1.0]}},
            "true_ijk_to_ras": grid.ijkToRas.tolist(),
            "header_ijk_to_ras": [[-1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]],
            "background_counts": HISTOLOGY_BACKGROUND, "striping": "along i (rows vary along j)",
            "lattice_step_voxels": stats["lattice_step"], "intensity_range": [stats["min"], stats["max"]]}


def _tumourTruth(anatomy, forward, grid, stats, mriLabelVoxels, geometry=None) -> dict:
    """truth.json's 'tumour': the analytic volumes in both spaces and the labels' voxel counts."""
    voxelMm3 = float(np.prod(grid.spacingMm))
    mriVoxelMm3 = MRI_SPACING_MM ** 3 if geometry is None else float(np.prod(geometry.mriSpacingMm))
    return {"label_value": 1, "centre_mri_ras_mm": list(anatomy.tumourCentre),
            "semi_axes_mm": list(anatomy.tumourAxes), "rotation": anatomy.tumourRotation.tolist(),
            "mri_volume_mm3": anatomy.tumourVolumeMm3(),
            "histology_volume_mm3": _histologyVolumeByQuadrature(forward, anatomy),
            "histology_volume_method": "Gauss quadrature over the MRI ellipsoid of det(d histology / d MRI)",
            "mri_label_voxels": mriLabelVoxels, "mri_label_volume_mm3": mriLabelVoxels * mriVoxelMm3,
            "histology_label_voxels": stats["label_voxels"],
            "histology_label_volume_mm3": stats["label_voxels"] * voxelMm3}


def _writeRunConfig(folder, grid, geometry=None):
    """config.json: the `run` command's configuration for this sample (refinement on)."""
    working = 0.1 if geometry is None else geometry.workingSpacingMm
    config = {"mri": "mri.nrrd", "histology": "histology.tif", "histology_spacing_um": list(grid.spacingUm),
              "landmarks": {"mri": "landmarks_mri.mrk.json", "histology": "landmarks_histology.mrk.json"},
              "model": "affine+tps", "refine": True, "working_spacing_mm": working,
              "labels": {"mri": "mri_tumour_label.nrrd", "histology": "histology_tumour_label.nrrd"},
              "evaluate_points": {"mri": "eval_points_mri.csv", "histology": "eval_points_histology.csv"}}
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
