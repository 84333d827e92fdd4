"""Tumour comparison: label transfer between the MRI and histology grids, volumes, Dice and HD95.

Direction conventions (mapping.py): a mapping takes reference-grid RAS points to the space the labels live in
(pull). To bring histology labels onto the MRI grid pass the MRI->histology mapping (the registration result);
to bring MRI labels onto a histology grid pass a histology->MRI mapping (InverseMapping(registration)).

Volumes: native (voxel count x voxel volume), transferred (on the reference grid), and Jacobian-integrated:
the histology label's volume carried into MRI space as sum over native voxels of voxel volume x |det J_{H->M}|,
with det J_{H->M}(y) = 1 / det J_{M->H}(x), x = inverse(y) (Newton, residuals checked).
"""
import numpy as np

from MRIHistoRegLib import progress as progressLib
from MRIHistoRegLib.geometry import applyMatrixElementwise, spacingOf
from MRIHistoRegLib.mapping import AffineMapping, Mapping, asMapping, asPoints, invertPoints, jacobianOf
from MRIHistoRegLib.resample import LatticeMapping, _asMatrix, _asShape, sampleNearest
from .errors import UserInputError

INVERSE_TOLERANCE_MM = 1e-3
_SLAB_VOXELS = 1 << 18


def _voxelVolume(ijkToRas):
    return float(abs(np.linalg.det(np.asarray(ijkToRas, float)[:3, :3])))


class InverseMapping(Mapping):
    """The inverse of a smooth, non-folding mapping by Newton iterations (mapping.invertPoints), started from the
    inverse of its linear part; transformPoints raises ValueError when a residual exceeds `toleranceMm`."""

    def __init__(self, mapping, toleranceMm=INVERSE_TOLERANCE_MM):
        self.forward = mapping
        self.toleranceMm = float(toleranceMm)
        linear = asMapping(mapping).linearMatrix()
        self._start = None if linear is None else AffineMapping(np.linalg.inv(np.asarray(linear, float)))

    def transformPoints(self, points):
        points = asPoints(points)
        guess = None if self._start is None else self._start.transformPoints(points)
        x, residual = invertPoints(self.forward, points, initialGuess=guess, tolerance=self.toleranceMm * 1e-3)
        worst = float(residual.max(initial=0.0))
        if worst > self.toleranceMm:
            raise UserInputError(f"The transform could not be inverted at {int((residual > self.toleranceMm).sum())} of "
                             f"{len(points)} points (residual up to {worst:.3g} mm): it folds or the points lie far "
                             f"outside the landmarks. Use a smoother model (affine, or TPS regularization).")
        return x

    def jacobian(self, points):
        return np.linalg.inv(jacobianOf(self.forward, self.transformPoints(points)))


# ----------------------------------------------------------------------------------------------- volumes
def labelVolumesMm3(labelArray, ijkToRas):
    """{label: volume in mm^3} for every non-zero label of `labelArray` ([k, j, i])."""
    labelArray = np.asarray(labelArray)
    counts = _labelCounts(labelArray)
    volume = _voxelVolume(ijkToRas)
    return {label: count * volume for label, count in counts.items() if label != 0}


def readLabelCrop(source, ijkToRas=None, progress=None):
    """(labels [k, j, i], ijkToRas) of the box holding every non-zero voxel of a label stack, read plane by plane.

    A histology label map lives on the full-resolution stack's grid (billions of voxels) but labels only a small
    part of it: streaming it once and keeping just the labelled box keeps memory at one plane plus that box.
    The returned geometry is `ijkToRas` (default: the source's; pass the image's corrected geometry for a label
    map whose header repeats the image's wrong spacing) shifted to the box, so volumes, transfer and Jacobian
    integration on the crop equal those on the whole map. An all-zero map gives a 1-voxel crop of 0.
    """
    from MRIHistoRegLib.stacks import checkMemoryFor

    geometry = np.asarray(source.ijkToRas() if ijkToRas is None else ijkToRas, float)
    nk = source.shape[0]
    pieces = []  # (k, j0, i0, cropped plane) for planes holding labels
    for k, plane in source.iterPlanes(0, nk):
        rows = np.flatnonzero(plane.any(axis=1))
        if len(rows):
            cols = np.flatnonzero(plane.any(axis=0))
            pieces.append((k, rows[0], cols[0], plane[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].copy()))
        progressLib.report(progress, (k + 1) / nk, "reading labels")
    if not pieces:
        return np.zeros((1, 1, 1), dtype=source.dtype), geometry
    k0, k1 = pieces[0][0], pieces[-1][0] + 1
    j0 = min(p[1] for p in pieces)
    i0 = min(p[2] for p in pieces)
    j1 = max(p[1] + p[3].shape[0] for p in pieces)
    i1 = max(p[2] + p[3].shape[1] for p in pieces)
    checkMemoryFor((k1 - k0) * (j1 - j0) * (i1 - i0) * np.dtype(source.dtype).itemsize, "the labelled region of the label map")
    crop = np.zeros((k1 - k0, j1 - j0, i1 - i0), dtype=source.dtype)
    for k, j, i, piece in pieces:
        crop[k - k0, j - j0:j - j0 + piece.shape[0], i - i0:i - i0 + piece.shape[1]] = piece
    shift = np.eye(4)
    shift[:3, 3] = (i0, j0, k0)
    return crop, geometry @ shift


def _labelCounts(labelArray):
    if labelArray.dtype.kind in "ub" and labelArray.dtype.itemsize <= 2:
        counts = np.bincount(labelArray.ravel().astype(np.int64))
        return {int(label): int(counts[label]) for label in np.nonzero(counts)[0]}
    values, counts = np.unique(labelArray, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def labelQuadrature(labelArray, labelIjkToRas, label, blockVoxels=None, maxEvaluations=100000):
    """(points (n, 3) RAS mm, weights (n,) mm^3) integrating over the voxels of `label`: each voxel, or for large
    labels each block of blockVoxels^3 voxels at its label centroid weighted by its labelled volume (det J is
    smooth, so evaluating a block at its centroid is second-order accurate). blockVoxels defaults to the smallest
    block giving <= maxEvaluations points. UserInputError when the label is empty."""
    labelArray = np.asarray(labelArray)
    geometry = _asMatrix(labelIjkToRas, "labelIjkToRas")
    voxels = np.argwhere(labelArray == label)  # (n, 3) as (k, j, i)
    if len(voxels) == 0:
        raise UserInputError(f"Label {label} is empty in the histology label map: check the label value.")

    def blocksOf(size):
        key = voxels // size
        key = (key[:, 0] * (1 << 21) + key[:, 1]) * (1 << 21) + key[:, 2]
        return np.unique(key, return_inverse=True, return_counts=True)

    if blockVoxels is None:
        blockVoxels = 1 if len(voxels) <= maxEvaluations else max(2, int(np.ceil((len(voxels) / maxEvaluations) ** (1 / 3))))
        while blockVoxels > 1 and len(blocksOf(blockVoxels)[0]) > maxEvaluations:
            blockVoxels += 1
    if blockVoxels > 1:
        keys, inverse, counts = blocksOf(int(blockVoxels))
        inverse = inverse.ravel()
        centroid = np.zeros((len(keys), 3))
        for axis in range(3):
            centroid[:, axis] = np.bincount(inverse, weights=voxels[:, axis], minlength=len(keys)) / counts
        voxels, weights = centroid, counts.astype(float)
    else:
        weights = np.ones(len(voxels))
    ras = applyMatrixElementwise(geometry, voxels[:, ::-1].astype(float))
    return ras, weights * _voxelVolume(geometry)


def volumeInMriMm3(points, weights, mapping, inverseMapping=None):
    """sum of weights / |det J_{M->H}(x)| with x = inverse(points): the volume in MRI space of the histology
    region the quadrature (labelQuadrature) covers. UserInputError where the mapping folds."""
    inverter = inverseMapping if inverseMapping is not None else InverseMapping(mapping)
    total = 0.0
    for start in range(0, len(points), 50000):
        fixed = asPoints(inverter.transformPoints(points[start:start + 50000]))
        determinant = np.abs(np.linalg.det(jacobianOf(mapping, fixed)))
        if np.any(determinant < 1e-12):
            raise UserInputError("The transform's Jacobian determinant vanishes inside the label (the mapping folds): "
                             "use a smoother model.")
        total += float(np.sum(weights[start:start + 50000] / determinant))
    return total


def jacobianIntegratedVolumeMm3(labelArray, labelIjkToRas, mapping, label, inverseMapping=None, blockVoxels=None,
                                maxEvaluations=100000):
    """Volume (mm^3) in MRI space of histology label `label`: sum over its native voxels y of
    voxelVolume / |det J_{M->H}(x)| with x = inverse(y).

    mapping: MRI RAS -> histology RAS (the registration result). inverseMapping: optional histology -> MRI
    mapping; by default Newton iterations from the inverse of the mapping's linear part (residuals checked,
    ValueError when they do not converge). Large labels are integrated over blocks (labelQuadrature)."""
    points, weights = labelQuadrature(labelArray, labelIjkToRas, label, blockVoxels, maxEvaluations)
    return volumeInMriMm3(points, weights, mapping, inverseMapping)


# ------------------------------------------------------------------------------------------ label transfer
def _compactLabels(labelArray):
    values = np.unique(labelArray)
    if values[0] != 0:
        values = np.concatenate([[0], values])
    return values


def _outputDtype(labelArray):
    dtype = np.asarray(labelArray).dtype
    if dtype.kind == "u":
        return dtype
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    high = int(np.max(labelArray)) if np.size(labelArray) else 0
    if int(np.min(labelArray)) < 0:
        raise UserInputError("Label maps must hold non-negative label values.")
    return np.dtype(np.uint8 if high < 256 else np.uint16 if high < 65536 else np.uint32)


def _boundaryBand(labels):
    """Voxels whose label differs from a 6-neighbour's, dilated by one voxel (6-neighbourhood)."""
    edge = np.zeros(labels.shape, bool)
    for axis in range(3):
        differs = np.diff(labels, axis=axis) != 0
        low = [slice(None)] * 3
        high = [slice(None)] * 3
        low[axis] = slice(0, -1)
        high[axis] = slice(1, None)
        edge[tuple(low)] |= differs
        edge[tuple(high)] |= differs
    return _dilate6(edge)


def _dilate6(mask):
    out = mask.copy()
    for axis in range(3):
        low = [slice(None)] * 3
        high = [slice(None)] * 3
        low[axis] = slice(0, -1)
        high[axis] = slice(1, None)
        out[tuple(low)] |= mask[tuple(high)]
        out[tuple(high)] |= mask[tuple(low)]
    return out


def transferLabels(labelArray, labelIjkToRas, mapping, referenceShape, referenceIjkToRas, method="partial-volume",
                   supersample=3, maxErrorVoxels=0.05, progress=None, sink=None, lattice=None, volumesMm3=None):
    """Labels of `labelArray` ([k, j, i], geometry labelIjkToRas) pulled onto a reference grid through `mapping`
    (reference RAS -> label RAS): histology labels onto the MRI grid with the MRI->histology registration, or
    MRI labels onto a histology grid with a histology->MRI mapping (InverseMapping(registration)).

    method 'nearest': the label at each reference voxel's centre. 'partial-volume': each voxel near a label
    boundary is sampled at supersample^3 sub-points (nearest lookup each) and takes the label covering most of it
    (majority; ties go to the centre's label), so a label's volume is preserved (no blur of label values).

    The mapping is evaluated through a verified coarse lattice (resample.LatticeMapping, maxErrorVoxels). Streamed
    over slabs of the reference grid; with `sink` (callable sink(kStart, slab)) each finished slab is handed
    over instead of assembling the whole output (full-resolution histology grids). Returns the uint label
    array on the reference grid (or None with a sink).

    volumesMm3: a dict to fill with each label's partial-volume volume on the reference grid (mm^3): voxels away
    from boundaries count whole, boundary voxels by the fraction of their sub-points inside. Unlike the voxel
    count of the hard labels this has no curvature bias (a 50% threshold shrinks convex shapes by ~1-2% at
    5-voxel radii), so it is the resampled volume to compare with the Jacobian-integrated one.
    """
    if method not in ("partial-volume", "nearest"):
        raise UserInputError(f"method must be 'partial-volume' or 'nearest', got {method!r}.")
    labelArray = np.asarray(labelArray)
    if labelArray.ndim != 3:
        raise UserInputError(f"A label map must be 3-D [k, j, i], got shape {labelArray.shape}.")
    shape = _asShape(referenceShape)
    reference = _asMatrix(referenceIjkToRas, "referenceIjkToRas")
    labelGeometry = _asMatrix(labelIjkToRas, "labelIjkToRas")
    dtype = _outputDtype(labelArray)
    if lattice is None:
        # a nearest lookup needs the mapping to within a fraction of the LABEL's voxel: on a reference grid finer
        # than the label map (MRI labels onto full-resolution histology) the target is relaxed accordingly
        relax = max(1.0, float(spacingOf(labelGeometry).min() / spacingOf(reference).min()))
        lattice = LatticeMapping(mapping, shape, reference, targetRasToIjk=np.linalg.inv(labelGeometry),
                                 maxErrorVoxels=maxErrorVoxels * relax)
    nk, nj, ni = shape
    output = None if sink is not None else np.zeros(shape, dtype)
    js = np.arange(nj, dtype=float)
    is_ = np.arange(ni, dtype=float)
    slab = max(1, _SLAB_VOXELS // (nj * ni))
    halo = 2 if method == "partial-volume" else 0
    n = int(supersample)
    offsets = (np.arange(n) + 0.5) / n - 0.5
    voxelVolume = _voxelVolume(reference)
    partial = {}
    for k0 in range(0, nk, slab):
        k1 = min(nk, k0 + slab)
        h0, h1 = max(0, k0 - halo), min(nk, k1 + halo)
        c = lattice.evaluateGrid(np.arange(h0, h1, dtype=float), js, is_)
        centre = sampleNearest(labelArray, c[0], c[1], c[2], fill=0)
        if method == "partial-volume" and n > 1:
            band = _boundaryBand(centre)[k0 - h0:k1 - h0]
            centre = centre[k0 - h0:k1 - h0]
            where = np.nonzero(band)
            if len(where[0]):
                inner = centre[~band]
                majority, fractions = _majority(labelArray, lattice, where, k0, offsets, centre[where])
                centre[where] = majority
            else:
                inner, fractions = centre.ravel(), {}
        else:
            centre = centre[k0 - h0:k1 - h0]
            inner, fractions = centre.ravel(), {}
        for label, count in _labelCounts(np.asarray(inner)).items():
            partial[label] = partial.get(label, 0.0) + count
        for label, fraction in fractions.items():
            partial[label] = partial.get(label, 0.0) + fraction
        result = centre.astype(dtype, copy=False)
        if sink is not None:
            sink(k0, result)
        else:
            output[k0:k1] = result
        progressLib.report(progress, k1 / nk, "transferring labels")
    if volumesMm3 is not None:
        volumesMm3.update({label: count * voxelVolume for label, count in partial.items() if label != 0})
    return output


def _majority(labelArray, lattice, where, k0, offsets, centreLabels):
    """Majority label over sub-points of the voxels `where` (slab indices, k relative to k0)."""
    base = np.stack([where[2], where[1], where[0] + k0], axis=1).astype(float)  # (i, j, k)
    subs = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), axis=-1).reshape(-1, 3)
    values = _compactLabels(np.concatenate([np.unique(centreLabels), [0]]))
    collected = []
    for offset in subs:
        c = lattice.interpolate(base + offset).T
        collected.append(sampleNearest(labelArray, c[0], c[1], c[2], fill=0))
    samples = np.stack(collected, axis=1)  # (voxels, sub-points)
    values = np.unique(np.concatenate([values, np.unique(samples)]))
    index = np.searchsorted(values, samples)
    votes = np.zeros((len(base), len(values)))
    rows = np.repeat(np.arange(len(base)), samples.shape[1])
    np.add.at(votes, (rows, index.ravel()), 1.0)
    fractions = {int(v): float(votes[:, i].sum()) / samples.shape[1] for i, v in enumerate(values)}
    votes[np.arange(len(base)), np.searchsorted(values, centreLabels)] += 0.5  # ties -> the centre's label
    return values[np.argmax(votes, axis=1)], fractions


# ------------------------------------------------------------------------------------------- overlap measures
def dice(a, b):
    """Dice coefficient 2|A & B| / (|A| + |B|) of two boolean masks (non-zero = inside); NaN when both are empty."""
    a = np.asarray(a) != 0
    b = np.asarray(b) != 0
    if a.shape != b.shape:
        raise UserInputError(f"Dice needs masks on the same grid, got shapes {a.shape} and {b.shape}.")
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _surface(mask):
    """Voxels of `mask` with a 6-neighbour outside it (the grid's border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for shift in (-1, 1):
            interior &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~interior


def _distanceTo(mask, spacing):
    """Euclidean distance (mm) from every voxel to the nearest voxel of `mask` (SimpleITK's exact Maurer EDT)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing([float(s) for s in spacing])
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    return np.maximum(sitk.GetArrayViewFromImage(distance), 0.0)


def surfaceDistancesMm(a, b, ijkToRas):
    """Distances (mm) from each surface voxel of A to the nearest surface voxel of B, and from B to A."""
    a = np.asarray(a) != 0
    b = np.asarray(b) != 0
    if a.shape != b.shape:
        raise UserInputError(f"Surface distances need masks on the same grid, got shapes {a.shape} and {b.shape}.")
    spacing = spacingOf(_asMatrix(ijkToRas, "ijkToRas"))
    surfaceA, surfaceB = _surface(a), _surface(b)
    fromA = _distanceTo(surfaceB, spacing)[surfaceA]
    fromB = _distanceTo(surfaceA, spacing)[surfaceB]
    return fromA, fromB


def hausdorffMm(a, b, ijkToRas, percentile=95.0):
    """Symmetric Hausdorff distance between the surfaces of masks A and B in mm (spacing-aware): the larger of
    the two directed `percentile`-th percentiles of surface-to-surface distances (100 = classic Hausdorff).
    NaN when a mask is empty."""
    fromA, fromB = surfaceDistancesMm(a, b, ijkToRas)
    if len(fromA) == 0 or len(fromB) == 0:
        return float("nan")
    return float(max(np.percentile(fromA, percentile), np.percentile(fromB, percentile)))


def hausdorff95Mm(a, b, ijkToRas):
    """95% Hausdorff distance (mm) between masks A and B (see hausdorffMm)."""
    return hausdorffMm(a, b, ijkToRas, 95.0)


def compareLabels(mriLabels, histologyLabelsInMri, ijkToRas, labels=None, histologyVolumesMm3=None):
    """Per label (default: every non-zero label of either map): {mri_mm3, histology_in_mri_resampled_mm3, dice,
    hd95_mm} between the MRI labels and the histology labels transferred onto the same (MRI) grid (hd95_mm None
    when the label is missing from one of the maps; dice is then 0). histologyVolumesMm3: the partial-volume
    volumes from transferLabels(volumesMm3=...) to report as histology_in_mri_resampled_mm3 (default: voxel
    counts of the transferred labels)."""
    mriLabels = np.asarray(mriLabels)
    histologyLabelsInMri = np.asarray(histologyLabelsInMri)
    if mriLabels.shape != histologyLabelsInMri.shape:
        raise UserInputError(f"The label maps must share the MRI grid: shapes {mriLabels.shape} and "
                         f"{histologyLabelsInMri.shape}. Transfer the histology labels first (transferLabels).")
    mriVolumes = labelVolumesMm3(mriLabels, ijkToRas)
    histologyVolumes = labelVolumesMm3(histologyLabelsInMri, ijkToRas)
    countedVolumes = histologyVolumes
    if histologyVolumesMm3 is not None:
        histologyVolumes = {int(k): float(v) for k, v in histologyVolumesMm3.items() if k != 0}
    if labels is None:
        labels = sorted(set(mriVolumes) | set(histologyVolumes))
    result = {}
    for label in labels:
        a = mriLabels == label
        b = histologyLabelsInMri == label
        result[int(label)] = {
            "mri_mm3": mriVolumes.get(label, 0.0),
            "histology_in_mri_resampled_mm3": histologyVolumes.get(label, 0.0),
            "histology_in_mri_label_voxels_mm3": countedVolumes.get(label, 0.0),
            "dice": dice(a, b),
            "hd95_mm": hausdorff95Mm(a, b, ijkToRas),
        }
        if not np.isfinite(result[int(label)]["hd95_mm"]):
            result[int(label)]["hd95_mm"] = None  # the label is missing from one map: no surface distance
    return result


def compareTumours(mriLabels, mriIjkToRas, histologyLabels, histologyIjkToRas, mapping, inverseMapping=None,
                   method="partial-volume", progress=None):
    """The whole comparison in one call. Returns (per-label dict, histology labels on the MRI grid); each row:
    mri_mm3, histology_native_mm3, histology_in_mri_resampled_mm3, histology_in_mri_jacobian_mm3,
    resampled_over_jacobian (should be ~1), histology_in_mri_over_mri (shrinkage-corrected ratio), dice, hd95_mm."""
    mriLabels = np.asarray(mriLabels)
    partial = {}
    transferred = transferLabels(histologyLabels, histologyIjkToRas, mapping, mriLabels.shape, mriIjkToRas,
                                 method=method, progress=progressLib.scaled(progress, 0.0, 0.6), volumesMm3=partial)
    rows = compareLabels(mriLabels, transferred, mriIjkToRas,
                         histologyVolumesMm3=partial if method == "partial-volume" else None)
    native = labelVolumesMm3(histologyLabels, histologyIjkToRas)
    for label, row in rows.items():
        row["histology_native_mm3"] = native.get(label, 0.0)
        row["histology_in_mri_jacobian_mm3"] = (
            jacobianIntegratedVolumeMm3(histologyLabels, histologyIjkToRas, mapping, label, inverseMapping)
            if label in native else 0.0)
        resampled = row["histology_in_mri_resampled_mm3"]
        row["resampled_over_jacobian"] = (resampled / row["histology_in_mri_jacobian_mm3"]
                                          if row["histology_in_mri_jacobian_mm3"] else None)
        row["histology_in_mri_over_mri"] = (row["histology_in_mri_jacobian_mm3"] / row["mri_mm3"]
                                            if row["mri_mm3"] else None)
    progressLib.report(progress, 1.0, "labels compared")
    return rows, transferred


def labelArrayFromNode(node, referenceNode=None, scene=None):
    """(uint label array [k, j, i], ijkToRas) from a label map volume node or a segmentation node.

    A segmentation is exported with vtkSlicerSegmentationsModuleLogic onto `referenceNode`'s grid (the image the
    labels belong to; default: the segmentation's own geometry); label values follow the segment order (1, 2,
    ...), or the segments' "label value" where the segmentation was imported from a label map."""
    from MRIHistoRegLib import volumes

    if node is None:
        raise UserInputError("No label node given: pick a label map volume or a segmentation.")
    if node.IsA("vtkMRMLSegmentationNode"):
        import slicer

        scene = scene or node.GetScene()
        labelNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", node.GetName() + " labels")
        try:
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(node, labelNode, 0) \
                if referenceNode is None else \
                slicer.vtkSlicerSegmentationsModuleLogic.ExportVisibleSegmentsToLabelmapNode(node, labelNode, referenceNode)
            if not ok or labelNode.GetImageData() is None:
                raise UserInputError(f"Segmentation '{node.GetName()}' could not be exported to a label map: does it have "
                                 f"segments with a binary labelmap representation?")
            array = np.array(volumes.arrayFromVolume(labelNode))
            geometry = volumes.ijkToRas(labelNode)
        finally:
            scene.RemoveNode(labelNode)
    elif node.IsA("vtkMRMLVolumeNode"):
        if node.GetImageData() is None:
            raise UserInputError(f"Label map '{node.GetName()}' has no voxels: load it first.")
        array = np.array(volumes.arrayFromVolume(node))
        geometry = volumes.ijkToRas(node)
    else:
        raise UserInputError(f"'{node.GetName()}' is a {node.GetClassName()}: labels must be a label map volume or a "
                         f"segmentation node.")
    if array.dtype.kind not in "ub":
        if np.any(array < 0) or np.any(array != np.round(array)):
            raise UserInputError(f"Label map '{node.GetName()}' holds negative or fractional values: labels must be "
                             f"non-negative integers.")
        array = array.astype(_outputDtype(array.astype(np.int64)))
    return array, geometry
