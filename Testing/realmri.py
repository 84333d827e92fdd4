"""A validation case built from a REAL in-vivo mouse T2 MRI, with ground truth from its construction.

The MRI is real (../shared/data/mouse_mri_dama: two FVB/N mice, 0.15 mm, 38 structure labels, brain masks;
never copied into the repository); only the microscopy is made here. The real brain is carried through a known
mapping (histology RAS y -> MRI RAS x, the sample generator's form, so sampledata.GroundTruthMapping reads it):

    x = A y + t + sum_m a_m exp(-|y - c_m|^2 / (2 s_m^2)),   A = R diag(1 / s)

with s an anisotropic linear shrink (histology / MRI lengths, product 0.6: ~40 % volume loss), R a seeded
rotation of 8-15 degrees, and seeded Gaussian bumps (0.20-0.40 mm, 0.8-1.4 mm wide, centred in tissue) whose Jacobian bound is held
below 0.8 x A's smallest singular value (amplitudes scaled down if needed), so the mapping is a bijection. The stack covers a slab of the brain (a `coverage` fraction of its antero-posterior
length, always holding the whole "tumour"), at a fine anisotropic spacing (tens of um in-plane, coarser in z).

Microscopy contrast (cleared-tissue light-sheet autofluorescence is not T2 contrast): the MRI, normalised to its
99th percentile in tissue and interpolated (cubic B-spline, tissue values extended outward so edges do not
brighten), is remapped through a DECREASING sigmoid (monotone but nonlinear: T2-bright CSF and ventricles become
dark, T2-dark white matter bright, as in autofluorescence), times a linearly interpolated tissue occupancy, times
light-sheet shading (illumination falling off across the sheet's path along i, row stripes and a few shadows
varying along j, attenuation with depth k), voxel-scale gamma speckle, plus background and shot-like noise;
written as a uint16 multipage ImageJ TIFF with its true spacing in the metadata.

Points: structure centroids (MRI RAS, from the real labels; the tumour's own excluded) whose true histology
position lies inside the stack. `landmarkCount` of them, spread by farthest-point sampling, are the landmarks
(placement noise added on both sides); all the others are the held-out evaluation points (noise free). One
structure is the "tumour": its MRI label map is the structure's voxels (value 1) and its histology label map is
every stack voxel whose centre maps into one of those voxels, so the truth in MRI space is exactly the MRI
label's voxel volume; the histology's native volume is integrated (Gauss points per MRI voxel of
det d(histology)/d(MRI)).

Folder layout and config as the generated sample (sampledata.py), so pipeline.runPipeline runs it unchanged:
mri.nrrd, mri_brain_mask.nrrd, mri_tumour_label.nrrd, histology.tif, histology_tumour_label.nrrd,
landmarks_{mri,histology}.mrk.json and .csv, eval_points_{mri,histology}.csv, truth.json, config.json.
"""
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MRIHistoRegLib import sampledata  # read only: the mapping class and rotation helper
from MRIHistoRegLib.geometry import applyMatrix
from MRIHistoRegLib.volumes import sitkImageFromArray

MICE = (1, 2)
SOURCE_FILES = {"mri": "template/FVB_NCrl_in_vivo_{}.nii.gz", "labels": "label/FVB_NCrl_in_vivo_{}.nii.gz",
                "mask": "mask/FVB_NCrl_in_vivo_{}.nii.gz"}
NAMES_FILE = "structure_label_list.csv"

VOLUME_RATIO = 0.6  # histology / MRI volume: clearing shrinkage ~40 %
ANISOTROPY = (1.05, 0.96, 0.99)  # relative linear shrink per histology axis (normalised to keep VOLUME_RATIO)
ROTATION_DEG = (8.0, 15.0)
BUMP_COUNT = 14  # centred on tissue, so every region of the brain is warped
BUMP_AMPLITUDE_MM = (0.20, 0.40)  # scaled down when the warp's Jacobian nears A's smallest singular value
BUMP_SIGMA_MM = (0.8, 1.4)  # local: a 1.5-2 mm control grid can follow them, 12 landmarks cannot
FOLD_MARGIN = 0.7  # max |J_warp| (spectral norm, on a 0.15 mm lattice) <= this x A's smallest singular value
COVERAGE_MARGIN_MM = 0.4  # stack margin around the tissue (more than a bump's displacement)
POINT_MARGIN_MM = 0.3  # landmarks and held-out points at least this far inside the stack
LANDMARK_NOISE_MRI_MM = 0.05  # a third of an MRI voxel
LANDMARK_NOISE_HISTOLOGY_MM = 0.02
DEFAULT_TUMOUR_STRUCTURE = 3  # right caudate putamen: compact, ~18 mm3

# light-sheet-like contrast (counts)
BACKGROUND = 100.0
TISSUE_DARK, TISSUE_BRIGHT = 150.0, 1600.0
SIGMOID_CENTRE, SIGMOID_WIDTH = 0.68, 0.07  # normalised T2 (99th percentile = 1); white matter ~0.6, CSF ~0.8
ILLUMINATION_LENGTH_MM = 12.0  # falloff along i (the sheet's path)
DEPTH_ATTENUATION_MM = 8.0  # falloff along k

FILES = ("mri.nrrd", "mri_brain_mask.nrrd", "mri_tumour_label.nrrd", "histology.tif", "histology_tumour_label.nrrd",
         "landmarks_mri.mrk.json", "landmarks_histology.mrk.json", "landmarks_mri.csv", "landmarks_histology.csv",
         "eval_points_mri.csv", "eval_points_histology.csv", "truth.json", "config.json")


def defaultDataFolder() -> Path:
    """../shared/data/mouse_mri_dama next to the repository (MRIHISTOREG_SHARED_DATA overrides ../shared/data, as
    in conftest.py)."""
    shared = os.environ.get("MRIHISTOREG_SHARED_DATA")
    root = Path(shared) if shared else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return root / "mouse_mri_dama"


def missingData(dataFolder=None):
    """None when the real MRI data is there, else the reason it is not (for pytest.skip / the bench)."""
    folder = Path(dataFolder) if dataFolder else defaultDataFolder()
    missing = [str(folder / p.format(m)) for m in MICE for p in SOURCE_FILES.values() if not (folder / p.format(m)).is_file()]
    if not (folder / NAMES_FILE).is_file():
        missing.append(str(folder / NAMES_FILE))
    if missing:
        return f"real mouse MRI data absent (a fresh clone has no ../shared): {missing[0]} not found"
    return None


# ---------------------------------------------------------------------------------------------------------
# Reading the real MRI
# ---------------------------------------------------------------------------------------------------------
def _ijkToRas(image) -> np.ndarray:
    """IJK->RAS of a SimpleITK image (its physical space is LPS)."""
    flip = np.diag([-1.0, -1.0, 1.0])
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = flip @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = flip @ np.asarray(image.GetOrigin(), float)
    return matrix


def structureNames(dataFolder) -> dict:
    """{label value: name} for 1-40 from the data's CSV (1-20 right hemisphere, 21-40 left; 2, 10 and 17 hold
    both sides: 22, 30 and 37 were merged into them)."""
    names = {}
    with open(Path(dataFolder) / NAMES_FILE, encoding="utf-8") as f:
        for line in f:
            head, _, tail = line.partition(",")
            if head.strip().isdigit() and 1 <= int(head) <= 20:
                names[int(head)] = tail.strip()
    out = {}
    for value, name in names.items():
        if value in (2, 10, 17):
            out[value] = f"{name} (both sides)"
        else:
            out[value], out[value + 20] = f"right {name}", f"left {name}"
    return out


def loadMouse(mouse=1, dataFolder=None, shrink=1) -> dict:
    """The real MRI, labels and mask of one mouse: arrays [k, j, i] and the shared IJK->RAS. `shrink` > 1 makes
    the MRI coarser (area average over shrink^3 voxels; labels and mask nearest-neighbour on that grid): fewer
    voxels for fast tests, and the coarse grid is then the case's MRI, truth included."""
    folder = Path(dataFolder) if dataFolder else defaultDataFolder()
    if mouse not in MICE:
        raise ValueError(f"mouse must be one of {MICE}, got {mouse!r}")
    images = {role: sitk.ReadImage(str(folder / pattern.format(mouse))) for role, pattern in SOURCE_FILES.items()}
    if shrink > 1:
        images["mri"] = sitk.BinShrink(images["mri"], [int(shrink)] * 3)
        for role in ("labels", "mask"):
            images[role] = sitk.Resample(images[role], images["mri"], sitk.Transform(), sitk.sitkNearestNeighbor)
    matrix = _ijkToRas(images["mri"])
    for role in ("labels", "mask"):
        if not np.allclose(_ijkToRas(images[role]), matrix, atol=1e-4):
            raise ValueError(f"{role} of mouse {mouse} is not on the MRI's grid")
    arrays = {role: sitk.GetArrayFromImage(image) for role, image in images.items()}
    return {"mri": arrays["mri"].astype(np.float32), "labels": np.rint(arrays["labels"]).astype(np.int16),
            "mask": (arrays["mask"] > 0.5).astype(np.uint8), "ijkToRas": matrix, "names": structureNames(folder),
            "mouse": mouse, "folder": str(folder), "shrink": int(shrink)}


# ---------------------------------------------------------------------------------------------------------
# The known mapping and the stack's grid
# ---------------------------------------------------------------------------------------------------------
def _linearPart(rng):
    anisotropy = np.array(ANISOTROPY) / np.prod(ANISOTROPY) ** (1.0 / 3.0)
    scales = VOLUME_RATIO ** (1.0 / 3.0) * anisotropy
    axis = rng.normal(size=3)
    angle = float(rng.uniform(*ROTATION_DEG))
    rotation = sampledata.rotationMatrix(axis, angle)
    return rotation @ np.diag(1.0 / scales), scales, axis / np.linalg.norm(axis), angle


def stackGrid(shapeIjk, spacingMm):
    """The stack's voxel grid of this shape (ni, nj, nk) and true spacing: the sample's own HistologyGrid, with
    RAS = (-i*sx, -j*sy, k*sz)."""
    spacing = np.asarray(spacingMm, float)
    grid = sampledata.HistologyGrid(1.0, spacingUm=spacing * 1000.0, extentMm=np.asarray(shapeIjk, float) * spacing)
    assert grid.shapeIjk == tuple(int(n) for n in shapeIjk), (grid.shapeIjk, shapeIjk)
    return grid


def _slab(pre, tumourPre, coverage):
    """The histology-y window (low, high) of the slab: `coverage` of the tissue's extent, centred on the tumour,
    widened to hold the whole tumour."""
    low, high = pre[:, 1].min(), pre[:, 1].max()
    width = coverage * (high - low)
    centre = 0.5 * (tumourPre[:, 1].min() + tumourPre[:, 1].max())
    y0 = min(max(centre - 0.5 * width, low), high - width)
    y0 = min(y0, tumourPre[:, 1].min() - COVERAGE_MARGIN_MM)
    y1 = max(y0 + width, tumourPre[:, 1].max() + COVERAGE_MARGIN_MM)
    return y0, y1


def buildMapping(mouseData, seed, spacingMm, coverage, tumourStructure):
    """(HistologyToMriMapping, the stack grid, description dict) for a seed: the tissue's linear image sets the grid
    (the slab along histology y), then the bumps are placed inside it."""
    rng = np.random.default_rng([seed, 11])
    linear, scales, axis, angle = _linearPart(rng)
    inverse = np.linalg.inv(linear)
    tissue = np.argwhere(mouseData["mri"] > 0)[::3][:, ::-1]  # (i, j, k)
    tumour = np.argwhere(mouseData["labels"] == tumourStructure)[:, ::-1]
    if not len(tumour):
        raise ValueError(f"structure {tumourStructure} is not in the labels of mouse {mouseData['mouse']}")
    toPre = inverse @ mouseData["ijkToRas"][:3, :3]
    offset = inverse @ mouseData["ijkToRas"][:3, 3]
    pre, tumourPre = tissue @ toPre.T + offset, tumour @ toPre.T + offset
    y0, y1 = _slab(pre, tumourPre, coverage)
    low = np.array([pre[:, 0].min() - COVERAGE_MARGIN_MM, y0, pre[:, 2].min() - COVERAGE_MARGIN_MM])
    high = np.array([pre[:, 0].max() + COVERAGE_MARGIN_MM, y1, pre[:, 2].max() + COVERAGE_MARGIN_MM])
    spacingMm = np.asarray(spacingMm, float)
    grid = stackGrid(np.ceil((high - low) / spacingMm).astype(int) + 1, spacingMm)
    origin = np.array([high[0], high[1], low[2]])  # histology y = pre - origin puts the box at x, y <= 0, z >= 0
    centres = pre[rng.choice(len(pre), BUMP_COUNT, replace=False)] - origin
    directions = rng.normal(size=(BUMP_COUNT, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    amplitudes = directions * rng.uniform(*BUMP_AMPLITUDE_MM, size=(BUMP_COUNT, 1))
    sigmas = rng.uniform(*BUMP_SIGMA_MM, size=BUMP_COUNT)
    warp = sampledata.HistologyToMriMapping(np.zeros((3, 3)), np.zeros(3), centres, amplitudes, sigmas)
    bound = _maxWarpJacobianNorm(warp, grid)
    smallest = float(np.linalg.svd(linear, compute_uv=False).min())
    if bound > FOLD_MARGIN * smallest:  # |J_w| < sigma_min(A) everywhere: x = A y + t + w(y) is a bijection
        amplitudes = amplitudes * (FOLD_MARGIN * smallest / bound)
        bound = FOLD_MARGIN * smallest
    mapping = sampledata.HistologyToMriMapping(linear, linear @ origin, centres, amplitudes, sigmas)
    description = {"linear_scale_histology_over_mri": scales.tolist(), "volume_ratio": VOLUME_RATIO,
                   "rotation_axis": axis.tolist(), "rotation_deg": angle, "bijectivity_bound": bound,
                   "smallest_singular_value": smallest, "slab_axis": "histology y (j)", "coverage_of_length": coverage}
    return mapping, grid, description


# ---------------------------------------------------------------------------------------------------------
# The microscopy-like stack
# ---------------------------------------------------------------------------------------------------------
def _maxWarpJacobianNorm(warp, grid, stepMm=0.15):
    """Largest spectral norm of the bumps' Jacobian on a lattice over the stack (bumps >= 0.8 mm wide: 0.15 mm
    sampling finds the maximum to well under 1 %)."""
    axes = [np.arange(lo, hi + stepMm, stepMm) for lo, hi in zip(grid.rasLow() - 0.5, grid.rasHigh() + 0.5)]
    largest = 0.0
    for z in axes[2]:
        x, y = np.meshgrid(axes[0], axes[1], indexing="ij")
        points = np.stack([x.ravel(), y.ravel(), np.full(x.size, z)], axis=1)
        largest = max(largest, float(np.linalg.norm(warp.jacobian(points), ord=2, axis=(1, 2)).max()))
    return largest


class _Renderer:
    """Stack pages from the real MRI through the mapping: contrast remap, occupancy, shading, speckle, noise."""

    def __init__(self, mouseData, mapping, grid, tumourStructure, seed):
        from scipy import ndimage

        self.ndimage = ndimage
        self.mapping, self.grid, self.seed = mapping, grid, seed
        mri = mouseData["mri"]
        tissue = mri > 0
        scale = float(np.percentile(mri[tissue], 99.0))
        # tissue values extended outward (nearest tissue voxel), so the spline does not ring or darken at edges
        nearest = ndimage.distance_transform_edt(~tissue, return_distances=False, return_indices=True)
        self.coefficients = ndimage.spline_filter(mri[tuple(nearest)] / scale, order=3, output=np.float32)
        self.tissue = tissue.astype(np.float32)
        self.tumour = (mouseData["labels"] == tumourStructure).astype(np.uint8)
        self.rasToIjk = np.linalg.inv(mouseData["ijkToRas"])
        rng = np.random.default_rng([seed, 13])
        count = 10
        self.stripePeriods = rng.uniform(0.03, 0.3, count)
        self.stripeAmplitudes = rng.uniform(0.01, 0.035, count)
        self.stripePhases = rng.uniform(0, 2 * math.pi, count)
        self.stripeDrift = rng.uniform(-3.0, 3.0, count)  # radians per mm of depth
        rows = grid.shapeIjk[1] * grid.spacingMm[1]
        self.shadows = list(zip(rng.uniform(0.0, rows, 4), rng.uniform(0.02, 0.06, 4), rng.uniform(0.15, 0.35, 4)))

    def _mriIndices(self, k):
        ni, nj, _ = self.grid.shapeIjk
        sx, sy, sz = self.grid.spacingMm
        xs, ys, zs = self.mapping.transformGridPlane(-np.arange(ni) * sx, -np.arange(nj) * sy, k * sz)
        m = self.rasToIjk
        ijk = [m[r, 0] * xs + m[r, 1] * ys + m[r, 2] * zs + m[r, 3] for r in range(3)]
        return np.stack([ijk[2].ravel(), ijk[1].ravel(), ijk[0].ravel()])  # array order (k, j, i)

    def _shading(self, k):
        ni, nj, _ = self.grid.shapeIjk
        sx, sy, sz = self.grid.spacingMm
        rowMm, depth = np.arange(nj) * sy, k * sz
        stripe = 1.0 + np.sum(self.stripeAmplitudes[:, None] * np.sin(
            2 * math.pi * rowMm[None, :] / self.stripePeriods[:, None] + self.stripePhases[:, None]
            + self.stripeDrift[:, None] * depth), axis=0)
        for centre, width, strength in self.shadows:
            stripe *= 1.0 - strength * np.exp(-0.5 * ((rowMm - centre) / width) ** 2)
        illumination = np.exp(-np.arange(ni) * sx / ILLUMINATION_LENGTH_MM)
        return (stripe[:, None] * illumination[None, :] * math.exp(-depth / DEPTH_ATTENUATION_MM)).astype(np.float32)

    def page(self, k):
        """(uint16 image [j, i], uint8 tumour label [j, i]) of page k."""
        ni, nj, _ = self.grid.shapeIjk
        coordinates = self._mriIndices(k)
        sample = self.ndimage.map_coordinates
        t2 = sample(self.coefficients, coordinates, order=3, prefilter=False, mode="nearest").reshape(nj, ni)
        occupancy = sample(self.tissue, coordinates, order=1, mode="constant", cval=0.0).reshape(nj, ni)
        label = sample(self.tumour, coordinates, order=0, mode="constant", cval=0).reshape(nj, ni).astype(np.uint8)
        brightness = TISSUE_DARK + (TISSUE_BRIGHT - TISSUE_DARK) / (1.0 + np.exp((t2 - SIGMOID_CENTRE) / SIGMOID_WIDTH))
        rng = np.random.default_rng([self.seed, 17, k])
        speckle = rng.standard_gamma(4.0, size=(nj, ni)).astype(np.float32) * np.float32(0.25)  # mean 1, sd 0.5
        signal = occupancy * brightness * (0.6 + 0.4 * speckle) * self._shading(k) + np.float32(BACKGROUND)
        signal += rng.standard_normal(size=(nj, ni)).astype(np.float32) * np.sqrt(2.0 * signal)  # shot-like, gain 2
        return np.clip(np.rint(signal), 0, 65535).astype("<u2"), label


def _writeStack(folder, renderer, grid):
    """histology.tif (streamed page by page, ImageJ metadata with the true spacing) and the tumour label NRRD."""
    import tifffile

    ni, nj, nk = grid.shapeIjk
    labels = np.zeros((nk, nj, ni), np.uint8)
    stats = {"min": 65535, "max": 0}

    def pages():
        for k in range(nk):
            image, labels[k] = renderer.page(k)
            stats["min"], stats["max"] = min(stats["min"], int(image.min())), max(stats["max"], int(image.max()))
            yield image

    sx, sy, sz = grid.spacingMm * 1000.0
    with tifffile.TiffWriter(os.path.join(folder, "histology.tif"), imagej=True) as tiff:
        tiff.write(pages(), shape=(nk, nj, ni), dtype="uint16", photometric="minisblack",
                   resolution=(1.0 / sx, 1.0 / sy), metadata={"spacing": float(sz), "unit": "um", "axes": "ZYX"})
    sitk.WriteImage(sitkImageFromArray(labels, grid.ijkToRas), os.path.join(folder, "histology_tumour_label.nrrd"), True)
    stats["label_voxels"] = int(np.count_nonzero(labels))
    return stats


# ---------------------------------------------------------------------------------------------------------
# Points and volumes
# ---------------------------------------------------------------------------------------------------------
def _centroids(mouseData, exclude):
    from scipy import ndimage

    labels = mouseData["labels"]
    values = [int(v) for v in np.unique(labels) if v > 0 and v != exclude]
    kji = np.array(ndimage.center_of_mass(np.ones_like(labels, np.float32), labels, values))
    return values, applyMatrix(mouseData["ijkToRas"], kji[:, ::-1])


def _spread(points, count, rng):
    """Farthest-point sampling from a seeded start: `count` indices of well-spread points."""
    chosen = [int(rng.integers(len(points)))]
    distance = np.linalg.norm(points - points[chosen[0]], axis=1)
    while len(chosen) < count:
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(points - points[chosen[-1]], axis=1))
    return chosen


def _points(mouseData, mapping, grid, tumourStructure, landmarkCount, seed):
    values, mriTrue = _centroids(mouseData, tumourStructure)
    histologyTrue = mapping.inverse(mriTrue)
    inside = np.flatnonzero(grid.contains(histologyTrue, POINT_MARGIN_MM))
    if len(inside) < landmarkCount + 5:
        raise ValueError(f"only {len(inside)} structure centroids lie inside the stack's coverage; need "
                         f"{landmarkCount} landmarks + 5 held-out points: raise the coverage")
    rng = np.random.default_rng([seed, 19])
    chosen = inside[_spread(mriTrue[inside], landmarkCount, rng)]
    held = np.array([n for n in inside if n not in set(chosen)])
    names = mouseData["names"]
    return {"landmarkStructures": [values[n] for n in chosen], "evalStructures": [values[n] for n in held],
            "landmarkNames": [names.get(values[n], str(values[n])) for n in chosen],
            "evalNames": [names.get(values[n], str(values[n])) for n in held],
            "lmMriTrue": mriTrue[chosen], "lmHistologyTrue": histologyTrue[chosen],
            "lmMri": mriTrue[chosen] + rng.normal(0.0, LANDMARK_NOISE_MRI_MM, (len(chosen), 3)),
            "lmHistology": histologyTrue[chosen] + rng.normal(0.0, LANDMARK_NOISE_HISTOLOGY_MM, (len(chosen), 3)),
            "evalMri": mriTrue[held], "evalHistology": histologyTrue[held]}


def _histologyVolume(mouseData, mapping, tumourStructure):
    """Native histology volume of the tumour: 2x2x2 Gauss points per MRI voxel of det d(histology)/d(MRI)."""
    matrix = mouseData["ijkToRas"]
    voxels = np.argwhere(mouseData["labels"] == tumourStructure)[:, ::-1].astype(float)
    g = 0.5 / math.sqrt(3.0)
    offsets = np.array([[a, b, c] for a in (-g, g) for b in (-g, g) for c in (-g, g)])
    ijk = (voxels[:, None, :] + offsets[None]).reshape(-1, 3)
    histology = mapping.inverse(applyMatrix(matrix, ijk))
    det = np.linalg.det(mapping.jacobian(histology))
    voxelMm3 = abs(float(np.linalg.det(matrix[:3, :3])))
    return float(np.sum(voxelMm3 / len(offsets) / det)), len(voxels) * voxelMm3, len(voxels)


def _writePoints(folder, points):
    from MRIHistoRegLib.landmarks import writePoints

    labels = [f"L{n + 1:02d}" for n in range(len(points["lmMri"]))]
    for side, key in (("mri", "lmMri"), ("histology", "lmHistology")):
        writePoints(os.path.join(folder, f"landmarks_{side}.mrk.json"), labels, points[key])
        writePoints(os.path.join(folder, f"landmarks_{side}.csv"), labels, points[key], format="csv")
    evalLabels = [f"E{n + 1:02d}" for n in range(len(points["evalMri"]))]
    writePoints(os.path.join(folder, "eval_points_mri.csv"), evalLabels, points["evalMri"], format="csv")
    writePoints(os.path.join(folder, "eval_points_histology.csv"), evalLabels, points["evalHistology"], format="csv")
    return labels, evalLabels


def _writeMriFiles(folder, mouseData, tumourStructure):
    matrix = mouseData["ijkToRas"]
    sitk.WriteImage(sitkImageFromArray(mouseData["mri"], matrix), os.path.join(folder, "mri.nrrd"), True)
    sitk.WriteImage(sitkImageFromArray(mouseData["mask"], matrix), os.path.join(folder, "mri_brain_mask.nrrd"), True)
    tumour = (mouseData["labels"] == tumourStructure).astype(np.uint8)
    sitk.WriteImage(sitkImageFromArray(tumour, matrix), os.path.join(folder, "mri_tumour_label.nrrd"), True)


# ---------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------
def buildRealMriCase(outDir, mouse=1, seed=0, spacingUm=(40.0, 40.0, 80.0), coverage=0.6,
                     tumourStructure=DEFAULT_TUMOUR_STRUCTURE, landmarkCount=12, workingSpacingMm=None,
                     useMask=True, mriShrink=1, dataFolder=None) -> dict:
    """Write the validation case into `outDir` (must not exist or be empty; written into a temporary sibling
    first, so a failure leaves nothing). Returns {"folder", "truth", "seconds"}. `workingSpacingMm` None leaves
    the run config's default; `useMask` puts the data's brain mask in the config as `mri_mask`; `mriShrink` > 1 a
    coarser MRI (loadMouse)."""
    started = time.perf_counter()
    reason = missingData(dataFolder)
    if reason:
        raise FileNotFoundError(reason)
    if not 0.1 <= coverage <= 1.0:
        raise ValueError(f"coverage must be in [0.1, 1], got {coverage!r}")
    outDir = os.path.abspath(os.fspath(outDir))
    if os.path.isdir(outDir) and os.listdir(outDir):
        raise ValueError(f"{outDir} is not empty: choose a new or empty folder")
    os.makedirs(os.path.dirname(outDir), exist_ok=True)
    temporary = tempfile.mkdtemp(prefix="." + os.path.basename(outDir) + ".partial-", dir=os.path.dirname(outDir))
    try:
        truth = _buildInto(temporary, loadMouse(mouse, dataFolder, mriShrink), seed, np.asarray(spacingUm, float) / 1000.0,
                           coverage, tumourStructure, landmarkCount, workingSpacingMm, useMask)
        if os.path.isdir(outDir):
            os.rmdir(outDir)
        os.rename(temporary, outDir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return {"folder": outDir, "truth": truth, "seconds": time.perf_counter() - started}


def _buildInto(folder, mouseData, seed, spacingMm, coverage, tumourStructure, landmarkCount, workingSpacingMm, useMask):
    mapping, grid, description = buildMapping(mouseData, seed, spacingMm, coverage, tumourStructure)
    tumourVoxels = np.argwhere(mouseData["labels"] == tumourStructure)[:, ::-1]
    if not grid.contains(mapping.inverse(applyMatrix(mouseData["ijkToRas"], tumourVoxels))).all():
        raise RuntimeError("the tumour is not wholly inside the stack")  # the slab is built around it
    _writeMriFiles(folder, mouseData, tumourStructure)
    stats = _writeStack(folder, _Renderer(mouseData, mapping, grid, tumourStructure, seed), grid)
    points = _points(mouseData, mapping, grid, tumourStructure, landmarkCount, seed)
    labels, evalLabels = _writePoints(folder, points)
    histologyMm3, mriMm3, mriVoxels = _histologyVolume(mouseData, mapping, tumourStructure)
    tissue = np.argwhere(mouseData["mri"] > 0)[::5][:, ::-1]
    covered = float(grid.contains(mapping.inverse(applyMatrix(mouseData["ijkToRas"], tissue))).mean())
    voxelMm3 = float(np.prod(grid.spacingMm))
    truth = {
        "description": "MRIHistoReg real-MRI validation case (Testing/realmri.py): a real in-vivo mouse T2 MRI seen "
                       "through a known mapping as a light-sheet-like stack. Histology RAS = (-i*sx, -j*sy, k*sz).",
        "source": {"data": "dama-lab/mouse-brain-atlas FVB/N in-vivo T2 (GPL-3.0)", "mouse": mouseData["mouse"],
                   "files": [p.format(mouseData["mouse"]) for p in SOURCE_FILES.values()],
                   "mri_shrink": mouseData["shrink"]},
        "seed": seed,
        "mri": {"file": "mri.nrrd", "shape_ijk": list(mouseData["mri"].shape[::-1]),
                "ijk_to_ras": mouseData["ijkToRas"].tolist(), "spacing_mm": np.linalg.norm(mouseData["ijkToRas"][:3, :3], axis=0).tolist()},
        "histology": {"file": "histology.tif", "shape_ijk": list(grid.shapeIjk), "true_spacing_mm": grid.spacingMm.tolist(),
                      "true_ijk_to_ras": grid.ijkToRas.tolist(), "intensity_range": [stats["min"], stats["max"]],
                      "brain_fraction_covered": covered,
                      "contrast": "decreasing sigmoid of normalised T2 x tissue occupancy x shading x gamma speckle "
                                  "+ background + shot-like noise"},
        "mapping": dict(mapping.parameters(), direction="histology RAS (true spacing) -> MRI RAS", **description),
        "tumour": {"label_value": 1, "structure_label": tumourStructure,
                   "structure": mouseData["names"].get(tumourStructure, str(tumourStructure)),
                   "mri_volume_mm3": mriMm3, "mri_label_voxels": mriVoxels, "histology_volume_mm3": histologyMm3,
                   "histology_label_voxels": stats["label_voxels"],
                   "histology_label_volume_mm3": stats["label_voxels"] * voxelMm3},
        "landmarks": {"labels": labels, "structures": points["landmarkStructures"], "names": points["landmarkNames"],
                      "mri_noise_sd_mm": LANDMARK_NOISE_MRI_MM, "histology_noise_sd_mm": LANDMARK_NOISE_HISTOLOGY_MM,
                      "mri_true_ras_mm": points["lmMriTrue"].tolist(),
                      "histology_true_ras_mm": points["lmHistologyTrue"].tolist()},
        "eval_points": {"labels": evalLabels, "structures": points["evalStructures"], "names": points["evalNames"],
                        "count": len(evalLabels), "noise_free": True},
        "files": list(FILES),
    }
    with open(os.path.join(folder, "truth.json"), "w", encoding="utf-8") as f:
        json.dump(truth, f, indent=1)
    _writeConfig(folder, grid, workingSpacingMm, useMask)
    return truth


def _writeConfig(folder, grid, workingSpacingMm, useMask):
    """config.json as the sample's: refinement on, the default preset and (unless given) working spacing."""
    config = {"mri": "mri.nrrd", "histology": "histology.tif",
              "histology_spacing_um": [round(float(s) * 1000.0, 6) for s in grid.spacingMm],
              "landmarks": {"mri": "landmarks_mri.mrk.json", "histology": "landmarks_histology.mrk.json"},
              "model": "affine+tps", "refine": True,
              "labels": {"mri": "mri_tumour_label.nrrd", "histology": "histology_tumour_label.nrrd"},
              "evaluate_points": {"mri": "eval_points_mri.csv", "histology": "eval_points_histology.csv"}}
    if workingSpacingMm is not None:
        config["working_spacing_mm"] = float(workingSpacingMm)
    if useMask:
        config["mri_mask"] = "mri_brain_mask.nrrd"
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
