"""The tumour from a signal channel, at the stack's native resolution, streamed plane by plane (issue 14).

A fluorescent tumour channel is segmented where it was imaged (3.25 x 3.25 x 5 um voxels): the histology ground
truth the MRI volume is checked against. Nothing is held whole; memory is a few planes plus the labelled box.

    threshold     given, or Otsu's on a histogram gathered in one streaming pass (exact bins for 8/16-bit data)
    hole filling  per plane (an enclosed cavity is enclosed in every plane that cuts it)
    component     the 6-connected 3-D component holding the seed (without one: the largest), from one streaming
                  pass that joins each plane's 2-D components with the previous plane's where they overlap (a
                  union-find over plane components, not voxels), then a second pass over the component's planes
    output        a uint8 label map on the stack's own grid (gzip NRRD written plane by plane, atomically) and
                  the labelled box in memory for the label transfer into MRI space

Arrays are [k, j, i]; seeds and ROIs are voxel indices (i, j, k) of the full-resolution stack.
"""
import logging
import os
import zlib
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from MRIHistoRegLib import progress as progressLib
from MRIHistoRegLib.errors import UserInputError

INTEGER_BINS_MAX_BITS = 16  # up to 16-bit integer data the histogram has one bin per value (Otsu is exact)
FLOAT_BINS = 4096


@dataclass
class Segmentation:
    """What segmentStack found: the threshold and how it was chosen, the native voxel count and volume, the
    labelled box [k, j, i] (uint8, 1 = segmented) with its geometry, and the written label map."""

    threshold: float
    thresholdMethod: str  # "given" or "otsu"
    voxelCount: int
    volumeMm3: float
    spacingMm: Tuple[float, float, float]
    crop: np.ndarray = field(repr=False)
    cropIjkToRas: np.ndarray = field(repr=False)
    labelPath: Optional[str] = None
    seedIjk: Optional[Tuple[int, int, int]] = None
    roi: Optional[Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]] = None
    planeComponents: int = 0  # 2-D components joined into 3-D ones (the union-find's size)
    channel: Optional[str] = None

    def toDict(self) -> dict:
        """The report's description (report.json 'histology_segmentation')."""
        return {"threshold": float(self.threshold), "threshold_method": self.thresholdMethod,
                "voxel_count": int(self.voxelCount), "native_volume_mm3": float(self.volumeMm3),
                "spacing_mm": [float(s) for s in self.spacingMm], "label_path": self.labelPath,
                "seed_ijk": None if self.seedIjk is None else [int(v) for v in self.seedIjk],
                "roi_ijk": None if self.roi is None else [[int(a), int(b)] for a, b in self.roi],
                "plane_components": int(self.planeComponents), "channel": self.channel}


# ---- threshold ------------------------------------------------------------------------------------------------
def otsuThreshold(counts, edges) -> float:
    """Otsu's threshold (maximum between-class variance) of a histogram: `counts` per bin, `edges` len+1.

    Returns the lower edge of the first bin of the upper class, so `value >= threshold` is that class."""
    counts = np.asarray(counts, dtype=np.float64)
    centres = 0.5 * (np.asarray(edges[:-1], float) + np.asarray(edges[1:], float))
    total = counts.sum()
    if total <= 0 or np.count_nonzero(counts) < 2:
        raise UserInputError("The channel is constant inside the region: there is nothing to threshold. Check the "
                             "channel and the region of interest, or give a threshold.")
    weightLow = np.cumsum(counts)[:-1]
    sumLow = np.cumsum(counts * centres)[:-1]
    weightHigh = total - weightLow
    with np.errstate(divide="ignore", invalid="ignore"):
        meanLow = sumLow / weightLow
        meanHigh = (np.sum(counts * centres) - sumLow) / weightHigh
        between = weightLow * weightHigh * (meanLow - meanHigh) ** 2
    between[~np.isfinite(between)] = -1.0
    split = int(np.argmax(between))  # class 1 = bins [0, split], class 2 = bins (split, end)
    return float(edges[split + 1])


def _histogram(source, box, progress) -> Tuple[np.ndarray, np.ndarray]:
    (i0, i1), (j0, j1), (k0, k1) = box
    dtype = np.dtype(source.dtype)
    exact = dtype.kind in "ub" and dtype.itemsize * 8 <= INTEGER_BINS_MAX_BITS
    if exact:
        counts = np.zeros(1 << (dtype.itemsize * 8), dtype=np.int64)
        for n, k in enumerate(range(k0, k1)):
            region = source.readPlane(k)[j0:j1, i0:i1]
            counts += np.bincount(region.ravel(), minlength=counts.size)
            progressLib.report(progress, (n + 1) / (k1 - k0), "segmentation: histogram")
        return counts, np.arange(counts.size + 1, dtype=np.float64)
    low, high = np.inf, -np.inf  # other types: a range pass first, then fixed bins over it
    for k in range(k0, k1):
        region = source.readPlane(k)[j0:j1, i0:i1]
        low, high = min(low, float(np.nanmin(region))), max(high, float(np.nanmax(region)))
        progressLib.report(progress, 0.5 * (k - k0 + 1) / (k1 - k0), "segmentation: intensity range")
    edges = np.linspace(low, high if high > low else low + 1.0, FLOAT_BINS + 1)
    counts = np.zeros(FLOAT_BINS, dtype=np.int64)
    for k in range(k0, k1):
        counts += np.histogram(source.readPlane(k)[j0:j1, i0:i1], bins=edges)[0]
        progressLib.report(progress, 0.5 + 0.5 * (k - k0 + 1) / (k1 - k0), "segmentation: histogram")
    return counts, edges


# ---- per-plane steps ------------------------------------------------------------------------------------------
def _foreground(source, k, box, threshold, fillHoles) -> np.ndarray:
    """The thresholded, hole-filled ROI of plane k (bool [j, i] of the ROI)."""
    (i0, i1), (j0, j1), _ = box
    mask = source.readPlane(k)[j0:j1, i0:i1] >= threshold
    if fillHoles and mask.any():
        filled = sitk.BinaryFillhole(sitk.GetImageFromArray(mask.view(np.uint8)), fullyConnected=False, foregroundValue=1)
        mask = sitk.GetArrayViewFromImage(filled).astype(bool)
    return mask


def _components(mask) -> np.ndarray:
    """4-connected components of a plane (0 = background), so that with overlap along k they are 6-connected."""
    return sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.view(np.uint8)), False))


def _resolveRoots(count, edges) -> np.ndarray:
    """Connected components of a graph of `count` nodes and (a, b) edge arrays: each node's smallest member id,
    by min-label propagation with pointer jumping (vectorised; a handful of rounds for tumour-like shapes)."""
    roots = np.arange(count, dtype=np.int64)
    if not len(edges[0]):
        return roots
    a, b = np.concatenate(edges[0]), np.concatenate(edges[1])
    while True:
        low = np.minimum(roots[a], roots[b])
        before = roots.copy()
        np.minimum.at(roots, a, low)
        np.minimum.at(roots, b, low)
        while True:  # pointer jumping: every node straight to its current root
            jumped = roots[roots]
            if np.array_equal(jumped, roots):
                break
            roots = jumped
        if np.array_equal(roots, before):
            return roots


class _Components:
    """The 6-connected 3-D components of the foreground, from one streaming pass: the 4-connected components of
    each plane (ids offset per plane) joined where they overlap the previous plane's. Memory: one id per plane
    component, one edge per overlapping pair, two planes of labels."""

    def __init__(self, source, box, threshold, fillHoles, progress):
        k0, k1 = box[2]
        self.source, self.box, self.threshold, self.fillHoles = source, box, threshold, fillHoles
        self.offsets = {}  # k -> global id of the plane's component 1
        sizes, edgesA, edgesB, nextId, previous = [], [], [], 0, None
        for k in range(k0, k1):
            labels = self.planeLabels(k)
            count = int(labels.max()) if labels.size else 0
            self.offsets[k] = nextId
            if count:
                sizes.append(np.bincount(labels.ravel(), minlength=count + 1)[1:])
                if previous is not None:
                    both = (labels > 0) & (previous[0] > 0)
                    if both.any():
                        pairs = np.unique(np.stack([previous[0][both].astype(np.int64) + previous[1] - 1,
                                                    labels[both].astype(np.int64) + nextId - 1]), axis=1)
                        edgesA.append(pairs[0])
                        edgesB.append(pairs[1])
            previous = (labels, nextId) if count else None
            nextId += count
            progressLib.report(progress, (k - k0 + 1) / (k1 - k0), "segmentation: connected components")
        self.count = nextId
        self.roots = _resolveRoots(nextId, (edgesA, edgesB))
        self.sizes = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)

    def planeLabels(self, k) -> np.ndarray:
        return _components(_foreground(self.source, k, self.box, self.threshold, self.fillHoles))

    def rootAt(self, seed) -> int:
        si, sj, sk = seed
        i0, j0 = self.box[0][0], self.box[1][0]
        label = int(self.planeLabels(sk)[sj - j0, si - i0])
        if label == 0:
            value = self.source.readPlane(sk)[sj, si]
            raise UserInputError(f"The seed (i, j, k) = ({si}, {sj}, {sk}) is not in the foreground (value {value} < "
                                 f"threshold {self.threshold:.6g}): place the seed inside the tumour or lower the "
                                 f"threshold.")
        return int(self.roots[self.offsets[sk] + label - 1])

    def largestRoot(self) -> Optional[int]:
        if not self.sizes.size:
            return None
        return int(np.argmax(np.bincount(self.roots, weights=self.sizes)))

    def mask(self, k, root) -> Optional[np.ndarray]:
        """Plane k's part of the component `root` (ROI-shaped bool), None when it has none there."""
        first = self.offsets.get(k)
        if first is None:
            return None
        following = self.offsets.get(k + 1, self.count)
        members = self.roots[first:following] == root
        if not members.any():
            return None
        return np.concatenate([[False], members])[self.planeLabels(k)]


# ---- output ---------------------------------------------------------------------------------------------------
class _StreamedLabelNrrd:
    """A uint8 gzip NRRD on the stack's grid, written one plane at a time into a temporary file that replaces
    `path` only when complete (a failed or cancelled segmentation leaves nothing)."""

    def __init__(self, path, shapeKji, ijkToRas):
        from MRIHistoRegLib.geometry import flipGeometryLpsRas
        from MRIHistoRegLib.stacks import formatNrrdHeader

        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        self.temp = os.path.join(folder, f".tmp{os.getpid()}_{os.path.basename(self.path)}")
        lps = flipGeometryLpsRas(np.asarray(ijkToRas, float))
        header = {"type": "uint8", "dimension": 3, "space": "left-posterior-superior",
                  "sizes": np.array(shapeKji[::-1]), "space directions": lps[:3, :3].T, "kinds": ["domain"] * 3,
                  "encoding": "gzip", "space origin": lps[:3, 3]}
        self.file = open(self.temp, "wb")
        self.file.write(formatNrrdHeader(header))
        self.compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip container, as NRRD's gzip encoding wants

    def write(self, plane):
        self.file.write(self.compressor.compress(np.ascontiguousarray(plane, dtype=np.uint8).tobytes()))

    def finish(self):
        self.file.write(self.compressor.flush())
        self.file.close()
        os.replace(self.temp, self.path)

    def abandon(self):
        from MRIHistoRegLib.outputs import silentRemove

        self.file.close()
        silentRemove(self.temp)


def _writeAndCrop(source, box, planeMask, outPath, progress) -> Tuple[np.ndarray, np.ndarray, int]:
    """Stream the label map (when `outPath`) and collect the labelled box; planeMask(k) -> ROI mask or None."""
    (i0, i1), (j0, j1), (k0, k1) = box
    nk = source.shape[0]
    writer = None if outPath is None else _StreamedLabelNrrd(outPath, source.shape, source.ijkToRas())
    pieces = []  # (k, j, i, cropped mask) in stack indices
    try:
        for k in range(nk):
            mask = planeMask(k) if k0 <= k < k1 else None
            rows = np.flatnonzero(mask.any(axis=1)) if mask is not None else ()
            if len(rows):
                cols = np.flatnonzero(mask.any(axis=0))
                pieces.append((k, j0 + rows[0], i0 + cols[0], mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].copy()))
            if writer is not None:
                plane = np.zeros(source.planeShape, dtype=np.uint8)
                if len(rows):
                    plane[j0:j1, i0:i1] = mask
                writer.write(plane)
            progressLib.report(progress, (k + 1) / nk, "segmentation: writing the label map")
        if writer is not None:
            writer.finish()
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    geometry = np.asarray(source.ijkToRas(), float)
    if not pieces:
        return np.zeros((1, 1, 1), np.uint8), geometry, 0
    ka, kb = pieces[0][0], pieces[-1][0] + 1
    ja, ia = min(p[1] for p in pieces), min(p[2] for p in pieces)
    jb, ib = max(p[1] + p[3].shape[0] for p in pieces), max(p[2] + p[3].shape[1] for p in pieces)
    crop = np.zeros((kb - ka, jb - ja, ib - ia), np.uint8)
    for k, j, i, piece in pieces:
        crop[k - ka, j - ja:j - ja + piece.shape[0], i - ia:i - ia + piece.shape[1]] = piece
    shift = np.eye(4)
    shift[:3, 3] = (ia, ja, ka)
    return crop, geometry @ shift, int(np.count_nonzero(crop))


# ---- the step -------------------------------------------------------------------------------------------------
def _checkSeed(source, seedIjk, box):
    seed = tuple(int(round(float(v))) for v in seedIjk)
    nk, nj, ni = source.shape
    if len(seed) != 3 or not all(a <= s < b for s, (a, b) in zip(seed, box)):
        raise UserInputError(f"The seed (i, j, k) = {seed} is outside the stack or its region of interest "
                             f"{[list(b) for b in box]} (size {ni} x {nj} x {nk}): give a voxel inside the tumour.")
    return seed


def segmentStack(source, threshold: Optional[float] = None, seedIjk: Optional[Sequence[float]] = None, roi=None,
                 fillHoles: bool = True, outPath=None, progress=None) -> Segmentation:
    """Segment `source` (a StackSource of the signal channel) at its native resolution.

    threshold: foreground is `value >= threshold`; None: Otsu's on the ROI's histogram. seedIjk: a voxel (i, j, k)
    of the tumour; its 6-connected component is kept (None: all foreground). roi: voxel ranges ((i0, i1), (j0, j1),
    (k0, k1)) or {"mm": ...} as downsample's crop. outPath: a .nrrd for the full-grid label map (None: not written).
    """
    if outPath is not None:
        from MRIHistoRegLib.downsample import checkWritable

        outPath = os.fspath(outPath)
        if not outPath.lower().endswith(".nrrd"):
            raise UserInputError(f"Cannot write {outPath}: the label map is written as NRRD; give a .nrrd name.")
        checkWritable(outPath)
    from MRIHistoRegLib.downsample import resolveCrop

    box = resolveCrop(source, roi)
    seed = None if seedIjk is None else _checkSeed(source, seedIjk, box)
    method = "given"
    if threshold is None:
        counts, edges = _histogram(source, box, progressLib.scaled(progress, 0.0, 0.3))
        threshold, method = otsuThreshold(counts, edges), "otsu"
    threshold = float(threshold)
    components = _Components(source, box, threshold, fillHoles, progressLib.scaled(progress, 0.3, 0.6))
    root = components.largestRoot() if seed is None else components.rootAt(seed)
    planeMask = lambda k: None if root is None else components.mask(k, root)  # noqa: E731
    crop, cropIjkToRas, count = _writeAndCrop(source, box, planeMask, outPath,
                                              progressLib.scaled(progress, 0.6, 1.0))
    if count == 0:
        logging.getLogger(__name__).warning("segmentation found no voxel at threshold %.6g", threshold)
    spacing = tuple(float(s) for s in source.spacingMm)
    voxelVolume = abs(float(np.linalg.det(np.asarray(source.ijkToRas(), float)[:3, :3])))
    names = getattr(source, "channelNames", None)
    channel = None if not names else str(names[getattr(source, "channelIndex", 0)])
    return Segmentation(threshold, method, count, count * voxelVolume, spacing, crop, cropIjkToRas,
                        None if outPath is None else outPath, seed, None if roi is None else box, components.count, channel)
