"""Resample the ORIGINAL histology once onto any reference grid through any mapping (docs/ARCHITECTURE.md sections 2, 3, 5).

The composite from a reference voxel to a source voxel is

    reference ijk --referenceIjkToRas--> fixed RAS --mapping--> moving RAS --inv(sourceIjkToRas)--> source ijk

where `mapping` is a mapping.Mapping (fixed/MRI RAS -> moving/histology RAS; mapping.py).

Speed: the mapping (e.g. a thin-plate spline, cost voxels x landmarks) is evaluated exactly only on a coarse
lattice of reference positions and the resulting source coordinates are interpolated (tensor-product linear,
separable, slab by slab). The lattice step is chosen from a target error (max and p99, in output voxels) and
*verified at run time* against the exact mapping at random probe points (plus points at and next to every TPS
centre, where the kernel's cone |x - c| makes the error largest); the step is refined until the target holds.
For a thin-plate spline (fitting.LandmarkModel) the cone inside the 2x2x2 lattice cells nearest to each centre
is corrected exactly (w (|x - c| - its trilinear interpolant)), which is what lets the lattice stay coarse.
Interpolating the source coordinates instead of displacements is the same thing (trilinear interpolation
reproduces the affine part exactly) and saves a step.

Anti-aliasing: when one output voxel covers many source voxels (local scale from the lattice's Jacobian times
the output spacing), the source is first area-averaged (exact box filter, streamed plane by plane) to an
intermediate level whose spacing is close to the output voxel's footprint, and that level is interpolated ONCE.
An interpolated image is never interpolated again. The box filter is downsample.downsampleStack's, for every
kind of source (arrays and volume nodes go through it as stacks.ArraySource).

Memory: the output, the intermediate level (or, without one, the source planes one output slab needs) and one
slab of coordinates.
"""
import logging
import time

import numpy as np

from MRIHistoRegLib import progress as progressLib
from MRIHistoRegLib.fitting import LandmarkModel
from MRIHistoRegLib.geometry import applyMatrix, applyMatrixElementwise, indexToIndex, spacingOf
from MRIHistoRegLib.mapping import ComposedMapping, Mapping, asMapping, asPoints
from .errors import UserInputError

_SLAB_VOXELS = 1 << 18          # output voxels processed at a time (fits the CPU caches well)
_MAX_REFINEMENTS = 8
_INTERPOLATIONS = ("linear", "nearest")


# --------------------------------------------------------------------------------------------------- geometry
def _asMatrix(matrix, what):
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (4, 4):
        raise UserInputError(f"{what} must be a 4x4 IJK->RAS matrix, got shape {matrix.shape}.")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise UserInputError(f"{what} is singular (zero spacing?): fix the volume's spacing/directions.")
    return matrix


def _asShape(shape, what="referenceShape"):
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise UserInputError(f"{what} must be three positive sizes (nk, nj, ni), got {shape}.")
    return shape


# ------------------------------------------------------------------------------------------------- the source
class _Source:
    """A source as a StackSource (`stack`): stacks.openStack's as it is, an (array [k, j, i], ijkToRas) tuple or a
    volume node as a stacks.ArraySource, so one box filter (downsample.downsampleStack) serves them all. Also its
    `shape`, its IJK->RAS matrix `ijkToRas` and, for in-memory sources, the `array` itself (interpolated directly
    when no anti-aliasing level is needed)."""

    def __init__(self, source):
        from MRIHistoRegLib.stacks import ArraySource, StackSource

        if isinstance(source, (tuple, list)) and len(source) == 2:
            source = ArraySource(source[0], _asMatrix(source[1], "The source's ijkToRas"))
        elif not isinstance(source, StackSource):
            if not _isVolumeNode(source):
                raise UserInputError("source must be a StackSource (stacks.openStack), an (array [k, j, i], ijkToRas) "
                                 f"tuple or a scalar volume node, got {type(source).__name__}.")
            from MRIHistoRegLib import volumes

            source = ArraySource(volumes.arrayFromVolume(source), volumes.ijkToRas(source), name=source.GetName())
        self.stack = source
        self.array = source.array if isinstance(source, ArraySource) else None
        self.shape = _asShape(source.shape, "the stack's shape")
        geometry = source.ijkToRas() if callable(source.ijkToRas) else source.ijkToRas
        self.ijkToRas = _asMatrix(geometry, "The stack's ijkToRas")


def _isVolumeNode(source) -> bool:
    try:
        import slicer  # only here: the rest of the module runs without MRML
    except ImportError:
        return False
    return isinstance(source, slicer.vtkMRMLVolumeNode)


# ------------------------------------------------------------------------------------------- lattice mapping
def _axisWeights(coordinates, origin, step, count):
    """Cell index and fractional weight of 1-D `coordinates` on a lattice origin + m*step, m in [0, count)."""
    u = (np.asarray(coordinates, dtype=np.float64) - origin) / step
    if count < 2:
        return np.zeros(len(u), np.intp), np.zeros(len(u))
    cell = np.clip(np.floor(u), 0, count - 2).astype(np.intp)
    return cell, u - cell  # outside the lattice: linear extrapolation


def _thinPlateSpline(mapping):
    """`mapping` when it is a thin-plate spline (a fitting.LandmarkModel with kernels), else None."""
    if isinstance(mapping, LandmarkModel) and mapping.tpsCentres is not None and mapping.tpsWeights is not None:
        return mapping
    return None


def _tpsCentres(mapping):
    """Fixed-space TPS centres of a mapping (or of the first step of a composed one), else None."""
    candidates = [mapping] + (mapping.steps[:1] if isinstance(mapping, ComposedMapping) else [])
    for candidate in candidates:
        if isinstance(candidate, LandmarkModel) and candidate.tpsCentres is not None:
            return np.asarray(candidate.tpsCentres, float).reshape(-1, 3)
    return None


def evaluateExact(mapping, points, blockPoints=256, precision=np.float64):
    """mapping.transformPoints(points), with a fast exact path for thin-plate splines exposing tpsCentres,
    tpsWeights and linearMatrix() (fitting.LandmarkModel: linear(x) + sum_i w_i |x - c_i|): distances through
    |x|^2 + |c|^2 - 2 x.c on centred coordinates (one matrix product per block of points), bounded memory.
    precision=np.float32 halves the cost (kernel round-off ~1e-5 mm; the lattice uses it, its verification
    does not)."""
    points = asPoints(points)
    tps = _thinPlateSpline(mapping)
    if tps is None:
        return asPoints(mapping.transformPoints(points))
    matrix = np.asarray(tps.linearMatrix(), float)
    centres, weights = np.asarray(tps.tpsCentres, float), tps.tpsWeights
    shift = centres.mean(axis=0)  # centred coordinates keep the expansion's round-off small
    c = (centres - shift).astype(precision)
    minusTwoCt = (-2.0 * c.T).astype(precision)
    cc = (c * c).sum(axis=1)
    weights = np.asarray(weights, float).astype(precision)
    result = applyMatrixElementwise(matrix, points)
    for start in range(0, len(points), blockPoints):
        x = (points[start:start + blockPoints] - shift).astype(precision)
        squared = x @ minusTwoCt
        squared += (x * x).sum(axis=1)[:, None]
        squared += cc[None, :]
        np.maximum(squared, 0.0, out=squared)
        np.sqrt(squared, out=squared)
        result[start:start + blockPoints] += squared @ weights
    return result


class LatticeMapping(Mapping):
    """A smooth mapping approximated on a reference grid: exact on a coarse lattice, tensor-product linear
    in between, verified against the exact mapping at probe points.

    Positions are continuous reference indices p = (i, j, k) (voxel centres at integers); values are the
    mapped points expressed through `targetRasToIjk` (default identity: moving RAS mm; resampleToGrid passes the
    source's RAS->IJK so values are source voxel coordinates). The lattice covers [-0.5, n-0.5] on each axis
    (whole voxels, so sub-voxel samples are covered too).

    After construction: `step` (lattice step in reference voxels, (i, j, k)), `maxErrorMm`, `p99ErrorMm`
    (moving space), `maxErrorVoxels`, `p99ErrorVoxels` (pulled back to the reference grid: output voxels),
    `probeCount`, `refinements`, `evaluationSeconds`.
    """

    def __init__(self, mapping, referenceShape, referenceIjkToRas, targetRasToIjk=None, maxErrorVoxels=0.1,
                 step=None, probes=4096, seed=0, progress=None, p99ErrorVoxels=None):
        self.mapping = mapping
        self.shape = _asShape(referenceShape)
        self.referenceIjkToRas = _asMatrix(referenceIjkToRas, "referenceIjkToRas")
        self.targetRasToIjk = np.eye(4) if targetRasToIjk is None else np.asarray(targetRasToIjk, float)
        self.targetIjkToRas = np.linalg.inv(self.targetRasToIjk)
        if not maxErrorVoxels > 0:
            raise UserInputError(f"maxErrorVoxels must be > 0 (e.g. 0.1 output voxel), got {maxErrorVoxels}.")
        self.maxErrorTarget = float(maxErrorVoxels)
        self.p99ErrorTarget = float(p99ErrorVoxels) if p99ErrorVoxels is not None else self.maxErrorTarget / 5.0
        started = time.perf_counter()
        sizes = np.array(self.shape[::-1], float)  # (ni, nj, nk)
        if step is None:
            # uniform in mm, 8 voxels along the finest axis to start with (coarser on huge grids: <= ~250 k nodes)
            spacing = spacingOf(self.referenceIjkToRas)
            first = max(8.0, (float(np.prod(sizes)) / 250000.0) ** (1.0 / 3.0))
            step = first * spacing.min() / spacing
            fixedStep = False
        else:
            fixedStep = True
        step = np.minimum(np.broadcast_to(np.asarray(step, float), (3,)), np.maximum(sizes, 1.0))
        self._probePositions = self._makeProbes(int(probes), seed)
        self._probeExact = self._exactAt(self._probePositions)
        self.refinements = 0
        while True:
            self._build(np.maximum(np.round(step), 1.0))
            self._verify()
            progressLib.report(progress, 0.5, f"lattice step {self.step.round(2).tolist()} voxels, "
                                              f"max error {self.maxErrorVoxels:.3g} voxel")
            if fixedStep or self._targetMet() or np.all(self.step <= 1.0) or self.refinements >= _MAX_REFINEMENTS:
                break
            # interpolation error ~ step^2 for smooth maps (~step near a kernel's cone): aim at 80% of the target
            ratio = max(self.maxErrorVoxels / self.maxErrorTarget, self.p99ErrorVoxels / self.p99ErrorTarget)
            factor = np.clip(np.sqrt(0.7 / ratio), 0.25, 0.85)
            step = np.maximum(np.minimum(np.round(self.step * factor), self.step - 1), 1.0)
            self.refinements += 1
        if not self._targetMet():
            # at a step of one voxel every voxel centre is a node, evaluated exactly: the error left is that of
            # interpolating between voxel centres (sub-voxel samples of the label transfer), nothing to refine
            atEveryVoxel = bool(np.all(self.step <= 1.0))
            (logging.info if atEveryVoxel else logging.warning)(
                "Lattice approximation misses its target: max / p99 error %.3g / %.3g output voxel (target %.3g / "
                "%.3g) at step %s%s", self.maxErrorVoxels, self.p99ErrorVoxels, self.maxErrorTarget,
                self.p99ErrorTarget, self.step.tolist(),
                " (exact at every voxel centre; between centres the mapping is not smooth at the voxel scale)"
                if atEveryVoxel else ": the mapping is not smooth at the voxel scale?")
        self.evaluationSeconds = time.perf_counter() - started
        logging.debug("LatticeMapping: step %s, %d nodes, max %.4f / p99 %.4f output voxel, %.3f s",
                      self.step.tolist(), self.nodeCount, self.maxErrorVoxels, self.p99ErrorVoxels,
                      self.evaluationSeconds)

    # -- construction
    def _targetMet(self):
        return self.maxErrorVoxels <= self.maxErrorTarget and self.p99ErrorVoxels <= self.p99ErrorTarget

    def _exactAt(self, positions, precision=np.float64):
        ras = applyMatrixElementwise(self.referenceIjkToRas, positions)
        moving = evaluateExact(self.mapping, ras, precision=precision)
        return applyMatrixElementwise(self.targetRasToIjk, moving)

    def _makeProbes(self, count, seed):
        rng = np.random.default_rng(seed)
        sizes = np.array(self.shape[::-1], float)
        positions = rng.uniform(-0.5, sizes - 0.5, size=(count, 3))
        centres = _tpsCentres(self.mapping)
        if centres is not None and len(centres):
            # the worst places for a piecewise-linear approximation: at and right around the kernels' cones
            index = applyMatrixElementwise(np.linalg.inv(self.referenceIjkToRas), centres)
            index = index[np.all((index >= -0.5) & (index <= sizes - 0.5), axis=1)]
            near = np.concatenate([index, index + rng.uniform(-1.0, 1.0, size=index.shape)])
            positions = np.concatenate([positions, np.clip(near, -0.5, sizes - 0.5)])
        return positions

    def _build(self, step):
        sizes = np.array(self.shape[::-1], float)
        counts = np.maximum(np.ceil(sizes / step).astype(int) + 1, 2)   # from -0.5 to >= n - 0.5
        self.step = np.asarray(step, float)
        self.origin = np.full(3, -0.5)
        self.counts = counts  # (Li, Lj, Lk)
        axes = [self.origin[a] + self.step[a] * np.arange(counts[a]) for a in range(3)]
        kk, jj, ii = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
        nodes = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
        values = self._exactAt(nodes, precision=np.float32)  # (Lk*Lj*Li, 3); verified in float64 below
        self.values64 = values.T.reshape(3, counts[2], counts[1], counts[0])
        self.values = self.values64.astype(np.float32)
        self.nodeCount = int(len(nodes))
        self._prepareCones()
        # global linear part (reference index -> target index) for pulling errors back to output voxels
        every = max(1, len(nodes) // 4096)
        design = np.concatenate([nodes[::every], np.ones((len(nodes[::every]), 1))], axis=1)
        solution = np.linalg.lstsq(design, values[::every], rcond=None)[0]
        self.linearPart = solution[:3].T  # target = linearPart @ p + offset

    # -- thin-plate spline cones
    def _prepareCones(self):
        """A TPS kernel |x - c| has a cone at its centre: piecewise-linear interpolation errs by ~|w| h there and
        by ~|w| h^2 / (4 d) at distance d. Within the 2x2x2 lattice cells nearest to each centre the exact
        correction w (|x - c| - I_h[|x - c|](x)) is added (I_h = the lattice's own trilinear interpolant), which
        leaves an error <= ~|w| h / 2 right outside those cells and much less further out."""
        self._cones = None
        self._gridCorrections = None
        tps = _thinPlateSpline(self.mapping)
        if tps is None:
            return
        centres, weights = np.asarray(tps.tpsCentres, float).reshape(-1, 3), tps.tpsWeights
        if len(centres) == 0:
            return
        index = applyMatrixElementwise(np.linalg.inv(self.referenceIjkToRas), centres)
        cell = np.floor((index - self.origin) / self.step)
        frac = (index - self.origin) / self.step - cell
        boxStart = (cell - (frac < 0.5)).astype(np.int64)  # first of the two cells nearest to the centre
        targetWeights = np.asarray(weights, float) @ self.targetRasToIjk[:3, :3].T  # (n, 3) in target units
        self._cones = (centres, boxStart, targetWeights)

    def _coneCorrectionPoints(self, positions, cells):
        """Corrections (N, 3) at arbitrary positions whose lattice cells are `cells` (N, 3: i, j, k)."""
        centres, boxStart, targetWeights = self._cones
        correction = np.zeros((len(positions), 3))
        ras = applyMatrixElementwise(self.referenceIjkToRas, positions)
        for di in (0, 1):
            for dj in (0, 1):
                for dk in (0, 1):
                    key = boxStart + np.array([di, dj, dk])
                    keyId = self._cellId(key)
                    order = np.argsort(keyId, kind="stable")
                    sortedIds = keyId[order]
                    pointIds = self._cellId(cells)
                    low = np.searchsorted(sortedIds, pointIds, "left")
                    high = np.searchsorted(sortedIds, pointIds, "right")
                    counts = high - low
                    if not counts.any():
                        continue
                    point = np.repeat(np.arange(len(positions)), counts)
                    starts = np.repeat(low, counts)
                    within = np.arange(len(point)) - np.repeat(np.cumsum(counts) - counts, counts)
                    centre = order[starts + within]
                    exact = np.linalg.norm(ras[point] - centres[centre], axis=1)
                    nodesAt = cells[point]
                    u = (positions[point] - self.origin) / self.step - nodesAt
                    interpolated = np.zeros(len(point))
                    for ci in (0, 1):
                        for cj in (0, 1):
                            for ck in (0, 1):
                                corner = self.origin + (nodesAt + np.array([ci, cj, ck])) * self.step
                                value = np.linalg.norm(applyMatrixElementwise(self.referenceIjkToRas, corner) - centres[centre], axis=1)
                                weight = ((u[:, 0] if ci else 1 - u[:, 0]) * (u[:, 1] if cj else 1 - u[:, 1])
                                          * (u[:, 2] if ck else 1 - u[:, 2]))
                                interpolated += weight * value
                    np.add.at(correction, point, targetWeights[centre] * (exact - interpolated)[:, None])
        return correction

    def _cellId(self, cells):
        big = 1 << 20
        cells = np.asarray(cells, np.int64) + 2  # boxes may start one cell before the lattice
        return (cells[:, 2] * big + cells[:, 1]) * big + cells[:, 0]

    def _gridConeCorrections(self):
        """Corrections on the reference grid's voxels, per centre box: (first voxel of each box (n, 3: i, j, k),
        cone residuals (n, Bk, Bj, Bi) float32, the centres' weights in target units (n, 3) float32, box sizes
        (i, j, k)), computed once (batched, separable over the boxes); _applyGridCorrections scatters them."""
        if self._gridCorrections is not None:
            return self._gridCorrections
        centres, boxStart, targetWeights = self._cones
        h = self.step.astype(np.int64)
        sizes = 2 * h  # voxels per box along i, j, k
        # local trilinear weights from the box's 3 nodes to its 2h voxels (same for every box)
        def localMatrix(count, step):
            u = (np.arange(count) + 0.5) / step
            cell = np.minimum(np.floor(u).astype(int), 1)
            matrix = np.zeros((count, 3))
            matrix[np.arange(count), cell] = 1 - (u - cell)
            matrix[np.arange(count), cell + 1] = u - cell
            return matrix
        mi, mj, mk = (localMatrix(int(sizes[a]), float(h[a])) for a in range(3))
        A = self.referenceIjkToRas[:3, :3]
        t = [np.arange(int(sizes[a]), dtype=float) for a in range(3)]
        nodeOffsets = np.stack(np.meshgrid(np.arange(3), np.arange(3), np.arange(3), indexing="ij"), -1)  # (k, j, i, 3)
        voxelStart = boxStart * h  # first voxel of the box (nodes at -0.5 + m h)
        entries = []
        chunk = max(1, int(2e6 // np.prod(sizes)))
        for first in range(0, len(centres), chunk):
            sl = slice(first, first + chunk)
            c = centres[sl]
            start = boxStart[sl]
            # cone values at the 27 local nodes
            nodePos = self.origin + (start[:, None, None, None, :] + nodeOffsets[None, ..., ::-1]) * self.step
            nodeRas = applyMatrix(self.referenceIjkToRas, nodePos)
            nodeValues = np.linalg.norm(nodeRas - c[:, None, None, None, :], axis=-1)  # (n, 3k, 3j, 3i)
            interpolated = np.einsum("nabc,ka,jb,ic->nkji", nodeValues, mk, mj, mi, optimize=True)
            # exact cone on the box's voxels
            d0 = applyMatrix(self.referenceIjkToRas, voxelStart[sl]) - c  # (n, 3)
            squared = 0.0
            for axis in range(3):
                component = (d0[:, axis][:, None, None, None]
                             + A[axis, 0] * t[0][None, None, None, :]
                             + A[axis, 1] * t[1][None, None, :, None]
                             + A[axis, 2] * t[2][None, :, None, None])
                squared = squared + component * component
            delta = (np.sqrt(squared) - interpolated).astype(np.float32)  # (n, Bk, Bj, Bi)
            entries.append(delta)
        self._gridCorrections = (voxelStart, np.concatenate(entries), targetWeights.astype(np.float32), sizes)
        return self._gridCorrections

    def _verify(self):
        approx = self.interpolate(self._probePositions, exactPrecision=True)
        difference = approx - self._probeExact
        errorMm = np.linalg.norm(difference @ self.targetIjkToRas[:3, :3].T, axis=1)
        errorVoxels = np.linalg.norm(np.linalg.solve(self.linearPart, difference.T).T, axis=1)
        self.probeCount = int(len(difference))
        self.maxErrorMm = float(errorMm.max(initial=0.0))
        self.p99ErrorMm = float(np.percentile(errorMm, 99)) if len(errorMm) else 0.0
        self.maxErrorVoxels = float(errorVoxels.max(initial=0.0))
        self.p99ErrorVoxels = float(np.percentile(errorVoxels, 99)) if len(errorVoxels) else 0.0

    # -- evaluation
    def interpolate(self, positions, exactPrecision=False):
        """(N, 3) continuous reference indices (i, j, k) -> (N, 3) target coordinates (trilinear)."""
        positions = asPoints(positions)
        values = self.values64 if exactPrecision else self.values
        cells, weights = [], []
        for axis in range(3):
            c, w = _axisWeights(positions[:, axis], self.origin[axis], self.step[axis], self.counts[axis])
            cells.append(c)
            weights.append(w.astype(values.dtype))
        ci, cj, ck = cells
        wi, wj, wk = weights  # float64 for the verification, float32 otherwise
        result = np.zeros((3, len(positions)), values.dtype)
        for dk, fk in ((0, 1 - wk), (1, wk)):
            for dj, fj in ((0, 1 - wj), (1, wj)):
                for di, fi in ((0, 1 - wi), (1, wi)):
                    result += values[:, ck + dk, cj + dj, ci + di] * (fk * fj * fi)
        result = result.T.astype(np.float64)
        if self._cones is not None:
            result += self._coneCorrectionPoints(positions, np.stack([ci, cj, ck], axis=1))
        return result

    def transformPoints(self, points):
        """The mapping's protocol (fixed RAS -> target space), through the lattice."""
        index = applyMatrixElementwise(np.linalg.inv(self.referenceIjkToRas), asPoints(points))
        return applyMatrixElementwise(self.targetIjkToRas, self.interpolate(index))

    def evaluateGrid(self, ks, js, is_):
        """Target coordinates on the tensor grid ks x js x is_ (1-D continuous reference indices):
        (3, len ks, len js, len is_) float32, separable (cost ~ 2 gathers per output value and component)."""
        ck, wk = _axisWeights(ks, self.origin[2], self.step[2], self.counts[2])
        cj, wj = _axisWeights(js, self.origin[1], self.step[1], self.counts[1])
        ci, wi = _axisWeights(is_, self.origin[0], self.step[0], self.counts[0])
        wk, wj, wi = (w.astype(np.float32) for w in (wk, wj, wi))
        v = self.values
        a = v[:, ck] * (1 - wk)[None, :, None, None] + v[:, ck + 1] * wk[None, :, None, None]
        b = a[:, :, cj] * (1 - wj)[None, None, :, None] + a[:, :, cj + 1] * wj[None, None, :, None]
        low = np.take(b, ci, axis=3)
        slope = np.take(np.diff(b, axis=3), np.minimum(ci, b.shape[3] - 2), axis=3) if b.shape[3] > 1 else 0 * low
        low += slope * wi
        if self._cones is not None:
            self._applyGridCorrections(low, ks, js, is_)
        return low

    def _applyGridCorrections(self, out, ks, js, is_):
        nk, nj, ni = self.shape
        ks, js, is_ = (np.asarray(a, float) for a in (ks, js, is_))
        standard = (len(js) == nj and len(is_) == ni and np.array_equal(js, np.arange(nj))
                    and np.array_equal(is_, np.arange(ni)) and len(ks) > 0
                    and np.array_equal(ks, np.arange(ks[0], ks[0] + len(ks))) and ks[0] >= 0 and ks[-1] < nk)
        if standard:
            voxelStart, delta, weights, sizes = self._gridConeCorrections()
            k0, k1 = int(ks[0]), int(ks[0]) + len(ks)
            hit = np.nonzero((voxelStart[:, 2] < k1) & (voxelStart[:, 2] + sizes[2] > k0))[0]
            if len(hit):
                ti, tj, tk = (np.arange(int(sizes[a])) for a in range(3))
                vi = voxelStart[hit, 0][:, None, None, None] + ti[None, None, None, :]
                vj = voxelStart[hit, 1][:, None, None, None] + tj[None, None, :, None]
                vk = voxelStart[hit, 2][:, None, None, None] + tk[None, :, None, None]
                valid = (vi >= 0) & (vi < ni) & (vj >= 0) & (vj < nj) & (vk >= k0) & (vk < k1)
                local = ((vk - k0) * nj + vj) * ni + vi
                valid = np.broadcast_to(valid, (len(hit),) + tuple(int(x) for x in sizes[::-1]))
                local = np.broadcast_to(local, valid.shape)[valid]
                part = delta[hit][valid]
                owner = np.broadcast_to(np.arange(len(hit))[:, None, None, None], valid.shape)[valid]
                size = len(ks) * nj * ni
                view = out.reshape(3, -1)
                for axis in range(3):
                    view[axis] += np.bincount(local, weights=part * weights[hit, axis][owner],
                                              minlength=size).astype(np.float32)
        else:  # any other grid: the general per-point correction
            kk, jj, ii = np.meshgrid(ks, js, is_, indexing="ij")
            positions = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
            cells = np.stack([_axisWeights(positions[:, a], self.origin[a], self.step[a], self.counts[a])[0]
                              for a in range(3)], axis=1)
            out += self._coneCorrectionPoints(positions, cells).T.reshape(out.shape).astype(np.float32)

    def jacobians(self):
        """Per lattice cell (forward differences) d target / d reference index: (cells, 3 targets, 3 axes)."""
        v = self.values64
        d = []
        for axis, arrayAxis in ((0, 3), (1, 2), (2, 1)):
            diff = np.diff(v, axis=arrayAxis) / self.step[axis]
            slicer = [slice(None)] * 4
            for other in (1, 2, 3):
                if other != arrayAxis:
                    slicer[other] = slice(0, v.shape[other] - 1)
            d.append(diff[tuple(slicer)].reshape(3, -1))
        return np.stack(d, axis=2).transpose(1, 0, 2)  # (cells, 3, 3)

    def cellCentres(self):
        """Target coordinates at the lattice cells' centres (same order as jacobians())."""
        v = self.values64
        centre = (v[:, :-1, :-1, :-1] + v[:, 1:, 1:, 1:]) / 2 if min(v.shape[1:]) > 1 else v
        return centre.reshape(3, -1).T

    def info(self):
        return {"lattice_step_voxels": [round(float(s), 4) for s in self.step],
                "lattice_nodes": self.nodeCount,
                "lattice_refinements": self.refinements,
                "probe_count": self.probeCount,
                "probe_max_error_mm": self.maxErrorMm, "probe_p99_error_mm": self.p99ErrorMm,
                "probe_max_error_voxels": self.maxErrorVoxels, "probe_p99_error_voxels": self.p99ErrorVoxels,
                "target_max_error_voxels": self.maxErrorTarget, "target_p99_error_voxels": self.p99ErrorTarget}


# ------------------------------------------------------------------------------------------------- sampling
def sampleLinear(volume, ci, cj, ck, bounds=None, fill=0.0):
    """Trilinear samples of `volume` [k, j, i] at continuous indices (ci, cj, ck) (same-shape float arrays).

    A point is inside when it lies within the volume's voxels: -0.5 <= c <= n - 0.5 on each axis (or within
    `bounds` ((lo_i, hi_i), (lo_j, hi_j), (lo_k, hi_k)) in these index units); within the outer half voxel the
    edge value is used; outside -> `fill`."""
    nk, nj, ni = volume.shape
    flat = volume.reshape(-1)
    if bounds is None:
        bounds = ((-0.5, ni - 0.5), (-0.5, nj - 0.5), (-0.5, nk - 0.5))
    inside = ((ci >= bounds[0][0]) & (ci <= bounds[0][1]) & (cj >= bounds[1][0]) & (cj <= bounds[1][1])
              & (ck >= bounds[2][0]) & (ck <= bounds[2][1]))
    ci = np.clip(ci, 0, ni - 1)
    cj = np.clip(cj, 0, nj - 1)
    ck = np.clip(ck, 0, nk - 1)
    indexType = np.int32 if flat.size < 2 ** 31 - 1 else np.int64
    i0 = np.minimum(ci.astype(indexType), max(ni - 2, 0))
    j0 = np.minimum(cj.astype(indexType), max(nj - 2, 0))
    k0 = np.minimum(ck.astype(indexType), max(nk - 2, 0))
    fi = (ci - i0).astype(np.float32)
    fj = (cj - j0).astype(np.float32)
    fk = (ck - k0).astype(np.float32)
    di = 1 if ni > 1 else 0
    dj = ni if nj > 1 else 0
    dk = ni * nj if nk > 1 else 0
    base = (k0 * nj + j0) * ni + i0
    def lerpI(offset):
        low = np.take(flat, base + offset)
        high = np.take(flat, base + (offset + di))
        return low + (high - low) * fi
    c00 = lerpI(0)
    c01 = lerpI(dj)
    c0 = c00 + (c01 - c00) * fj
    c10 = lerpI(dk)
    c11 = lerpI(dk + dj)
    c1 = c10 + (c11 - c10) * fj
    result = c0 + (c1 - c0) * fk
    if not inside.all():
        result[~inside] = fill
    return result


def sampleNearest(volume, ci, cj, ck, bounds=None, fill=0):
    """Nearest-voxel samples of `volume` [k, j, i] (same inside rule as sampleLinear)."""
    nk, nj, ni = volume.shape
    if bounds is None:
        bounds = ((-0.5, ni - 0.5), (-0.5, nj - 0.5), (-0.5, nk - 0.5))
    inside = ((ci >= bounds[0][0]) & (ci <= bounds[0][1]) & (cj >= bounds[1][0]) & (cj <= bounds[1][1])
              & (ck >= bounds[2][0]) & (ck <= bounds[2][1]))
    indexType = np.int32 if volume.size < 2 ** 31 - 1 else np.int64
    i = np.clip(np.floor(ci + 0.5), 0, ni - 1).astype(indexType)
    j = np.clip(np.floor(cj + 0.5), 0, nj - 1).astype(indexType)
    k = np.clip(np.floor(ck + 0.5), 0, nk - 1).astype(indexType)
    result = np.take(volume.reshape(-1), (k * nj + j) * ni + i)
    if not inside.all():
        fits = result.dtype.kind == "f" or (result.dtype.kind in "iu" and float(fill) == int(fill)
                                              and np.iinfo(result.dtype).min <= int(fill) <= np.iinfo(result.dtype).max)
        if not fits:
            result = result.astype(np.float32)
        result = np.where(inside, result, np.asarray(fill, result.dtype))
    return result


# ------------------------------------------------------------------------------------- area-averaged levels
def _areaAveragedLevel(src, factors, crop, progress):
    """The intermediate level: the source's crop ((k0, k1), (j0, j1), (i0, i1)) box-filtered by real factors
    (fi, fj, fk) >= 1 through downsample.downsampleStack (the exact, streamed, fractional-overlap box filter, for
    stacks and in-memory sources alike). Level voxel centres sit at the box centres, in the source's frame; a
    last box the crop does not fill is dropped (downsampleStack's rule), so within one box of the source's far
    edge the samples clamp to the last whole box. Returns (float32 array [k, j, i], level IJK->RAS)."""
    from MRIHistoRegLib import downsample

    target = np.asarray(src.stack.spacingMm, float) * np.asarray(factors, float)
    cropIjk = tuple(crop[::-1])  # downsampleStack takes voxel ranges in (i, j, k) order
    array, geometry = downsample.downsampleStack(src.stack, target, crop=cropIjk, progress=progress)
    return array, np.asarray(geometry, float)


# ---------------------------------------------------------------------------------------------- resampling
def _antiAliasFactors(lattice, sourceShape, threshold):
    """Per source axis (i, j, k): the smallest footprint (in source voxels) of one output voxel over the
    lattice cells that land in the source; 1 where that is below `threshold`."""
    jac = lattice.jacobians()                 # d source index / d reference index
    centres = lattice.cellCentres()
    sizes = np.array(sourceShape[::-1], float)
    inside = np.all((centres >= -0.5) & (centres <= sizes - 0.5), axis=1)
    if not inside.any():
        return np.ones(3), np.ones(3)
    extent = np.abs(jac[inside]).sum(axis=2)  # (cells, 3): footprint along each source axis
    smallest = extent.min(axis=0)
    factors = np.where(smallest >= threshold, smallest, 1.0)
    return factors, np.median(extent, axis=0)


def _footprintCrop(lattice, sourceShape, margin):
    """Source index box ((k0, k1), (j0, j1), (i0, i1)) the mapped reference grid touches (+ margin voxels)."""
    values = lattice.values64.reshape(3, -1)
    lows = np.floor(values.min(axis=1) - margin)
    highs = np.ceil(values.max(axis=1) + margin) + 1
    crop = []
    for axis in (2, 1, 0):
        n = sourceShape[2 - axis]
        low = int(np.clip(lows[axis], 0, n))
        high = int(np.clip(highs[axis], 0, n))
        crop.append((low, max(high, low)))
    return tuple(crop)


def resampleToGrid(source, mapping, referenceShape, referenceIjkToRas, interpolation="linear", antiAlias=True,
                   progress=None, maxErrorVoxels=0.1, fill=0.0, antiAliasThreshold=1.5, lattice=None):
    """Resample `source` ONCE onto the reference grid through `mapping` (fixed RAS -> moving RAS).

    source: a StackSource (stacks.openStack: the ORIGINAL data, streamed), an (array [k, j, i], ijkToRas) tuple
    or a volume node; its ijkToRas is the corrected geometry. referenceShape (nk, nj, ni), referenceIjkToRas 4x4.
    interpolation: 'linear' or 'nearest'. antiAlias: area-average the source first to the output voxel's
    footprint where it covers >= antiAliasThreshold source voxels along an axis. maxErrorVoxels: target of the
    lattice approximation (output voxels, verified at probe points). `lattice`: a LatticeMapping built for this
    grid and source to reuse (its target must be the source's RAS->IJK).

    Returns (float32 array [k, j, i] on the reference grid, info dict: lattice step and probe errors, the
    intermediate level's spacing and shape, timings in seconds). Outside the source: `fill`.
    """
    if interpolation not in _INTERPOLATIONS:
        raise UserInputError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}.")
    asMapping(mapping)  # ValueError now for an object that is no mapping, not deep inside the lattice
    shape = _asShape(referenceShape)
    reference = _asMatrix(referenceIjkToRas, "referenceIjkToRas")
    started = time.perf_counter()
    src = source if isinstance(source, _Source) else _Source(source)
    sourceRasToIjk = np.linalg.inv(src.ijkToRas)
    progressLib.report(progress, 0.0, "evaluating the mapping on a lattice")
    if lattice is None:
        lattice = LatticeMapping(mapping, shape, reference, targetRasToIjk=sourceRasToIjk,
                                 maxErrorVoxels=maxErrorVoxels, progress=progressLib.scaled(progress, 0.0, 0.05))
    elif lattice.shape != shape or not np.allclose(lattice.targetRasToIjk, sourceRasToIjk):
        raise UserInputError("The lattice given was built for another grid or source: build it with "
                         "LatticeMapping(mapping, referenceShape, referenceIjkToRas, inv(source ijkToRas)).")
    timings = {"lattice": time.perf_counter() - started}

    levelStart = time.perf_counter()
    level = _interpolationLevel(src, lattice, interpolation, antiAlias, antiAliasThreshold, progress)
    timings["level"] = time.perf_counter() - levelStart

    sampleStart = time.perf_counter()
    output = _interpolateOnce(src, lattice, level, shape, interpolation, fill, progress)
    timings["resample"] = time.perf_counter() - sampleStart
    timings["total"] = time.perf_counter() - started

    info = _resamplingInfo(src, lattice, level, reference, interpolation, antiAlias, timings)
    logging.info("Resampled onto %s: lattice step %s voxels (max error %.3g voxel), level spacing %s mm, %.2f s",
                 shape[::-1], info["lattice_step_voxels"], lattice.maxErrorVoxels, info["level_spacing_mm"],
                 timings["total"])
    return output, info


class _Level:
    """The image resampleToGrid interpolates once: `array` (None: read the stack's planes as needed), its IJK->RAS
    `geometry`, the affine `toLevel` from continuous source to level indices, the source's own footprint in level
    indices (`bounds`), and how it was made (`by`, `factors`, `medianFootprint`)."""

    def __init__(self, array, geometry, toLevel, bounds, by, factors, medianFootprint):
        self.array, self.geometry, self.toLevel, self.bounds = array, geometry, toLevel, bounds
        self.by, self.factors, self.medianFootprint = by, factors, medianFootprint


def _interpolationLevel(src, lattice, interpolation, antiAlias, antiAliasThreshold, progress) -> _Level:
    """The source itself or, where one output voxel covers many source voxels, an area-averaged level of it."""
    factors, medianFootprint = (_antiAliasFactors(lattice, src.shape, antiAliasThreshold) if antiAlias
                                else (np.ones(3), None))
    level, levelGeometry, levelBy = None, src.ijkToRas, None
    if np.any(factors > 1.0):
        crop = _footprintCrop(lattice, src.shape, margin=2 * float(factors.max()) + 2)
        if min(b - a for a, b in crop) > 0:
            level, levelGeometry = _areaAveragedLevel(src, factors, crop, progressLib.scaled(progress, 0.05, 0.5))
            levelBy = "downsample.downsampleStack"
    elif src.array is not None:
        level = src.array
    # continuous source index -> continuous level index (affine, applied to the lattice's coordinates)
    toLevel = indexToIndex(src.ijkToRas, levelGeometry)
    bounds = None
    if level is not None:
        # the inside test uses the source's own footprint, expressed in level indices
        corners = np.array([[-0.5, -0.5, -0.5], np.array(src.shape[::-1], float) - 0.5])
        cornersLevel = applyMatrixElementwise(toLevel, corners)
        bounds = tuple((float(min(cornersLevel[:, a])), float(max(cornersLevel[:, a]))) for a in range(3))
        if level.dtype.kind not in "fc" or level.dtype.itemsize > 4:
            level = level.astype(np.float32) if interpolation == "linear" else level
    return _Level(level, levelGeometry, toLevel, bounds, levelBy, factors, medianFootprint)


def _interpolateOnce(src, lattice, level, shape, interpolation, fill, progress):
    """One interpolation of the level (or the stack's planes), slab by slab over the output grid."""
    nk, nj, ni = shape
    output = np.empty(shape, np.float32)
    slab = max(1, _SLAB_VOXELS // (nj * ni))
    js = np.arange(nj, dtype=float)
    is_ = np.arange(ni, dtype=float)
    toLevel = level.toLevel
    identity = np.allclose(toLevel, np.eye(4))
    sampler = sampleLinear if interpolation == "linear" else sampleNearest
    planeCache = {}
    for k0 in range(0, nk, slab):
        k1 = min(nk, k0 + slab)
        coords = lattice.evaluateGrid(np.arange(k0, k1, dtype=float), js, is_)  # (3, s, nj, ni) source index
        if not identity:
            flatCoords = coords.reshape(3, -1)
            flatCoords[:] = (toLevel[:3, :3].astype(np.float32) @ flatCoords
                             + toLevel[:3, 3].astype(np.float32)[:, None])
        ci, cj, ck = coords[0], coords[1], coords[2]
        if level.array is not None:
            output[k0:k1] = sampler(level.array, ci, cj, ck, bounds=level.bounds, fill=fill)
        else:
            output[k0:k1] = _sampleFromStack(src, sampler, ci, cj, ck, planeCache, fill)
        progressLib.report(progress, 0.5 + 0.5 * k1 / nk, "resampling")
    return output


def _resamplingInfo(src, lattice, level, reference, interpolation, antiAlias, timings) -> dict:
    info = dict(lattice.info())
    info.update({
        "interpolation": interpolation,
        "anti_alias": bool(antiAlias),
        "anti_alias_factors": [round(float(f), 4) for f in level.factors],
        "median_footprint_source_voxels": (None if level.medianFootprint is None
                                           else [round(float(f), 3) for f in level.medianFootprint]),
        "level_spacing_mm": [round(float(s), 6) for s in spacingOf(level.geometry)],
        "level_shape_kji": list(level.array.shape) if level.array is not None and level.array is not src.array else None,
        "level_by": level.by,
        "source_spacing_mm": [round(float(s), 6) for s in spacingOf(src.ijkToRas)],
        "output_spacing_mm": [round(float(s), 6) for s in spacingOf(reference)],
        "timing_s": {key: round(value, 4) for key, value in timings.items()},
    })
    return info


def _sampleFromStack(src, sampler, ci, cj, ck, planeCache, fill):
    """Sample a stack without a level: read the planes this slab touches (kept for the next slab)."""
    nk = src.shape[0]
    inRange = (ck >= -0.5) & (ck <= nk - 0.5)
    if not inRange.any():
        return np.full(ci.shape, fill, np.float32)
    low = int(np.clip(np.floor(ck[inRange].min()), 0, nk - 1))
    high = int(np.clip(np.floor(ck[inRange].max()) + 2, 1, nk))
    for k in list(planeCache):
        if k < low or k >= high:
            del planeCache[k]
    block = np.empty((high - low,) + src.shape[1:], np.float32)
    for index, k in enumerate(range(low, high)):
        if k not in planeCache:
            planeCache[k] = src.stack.readPlane(k)
        block[index] = planeCache[k]
    bounds = ((-0.5, src.shape[2] - 0.5), (-0.5, src.shape[1] - 0.5), (-0.5 - low, nk - 0.5 - low))
    return sampler(block, ci, cj, ck - low, bounds=bounds, fill=fill)


def resampleToReference(scene, source, mapping, referenceNode, name, **options):
    """Resample `source` onto `referenceNode`'s grid (see resampleToGrid) into a new scalar volume node with the
    reference's geometry. Returns the node; the resampling info is stored as the node attribute
    'MRIHistoReg.resampling' (JSON)."""
    import json

    from MRIHistoRegLib import volumes

    imageData = referenceNode.GetImageData() if referenceNode is not None else None
    if imageData is None:
        raise UserInputError("referenceNode has no image data: pick a loaded volume as the reference grid.")
    dims = imageData.GetDimensions()
    geometry = volumes.ijkToRas(referenceNode)
    array, info = resampleToGrid(source, mapping, (dims[2], dims[1], dims[0]), geometry, **options)
    node = volumes.createVolumeNode(scene, array, geometry, name)
    node.SetAttribute("MRIHistoReg.resampling", json.dumps(info))
    return node


def referenceGridFromFootprint(sourceShape, sourceIjkToRas, mapping, spacingMm, referenceIjkToRas=None,
                               inverseMapping=None, marginMm=0.0, samplesPerEdge=9, maxVoxels=2e9):
    """A reference grid covering the source's (histology's) footprint mapped into fixed (MRI) space.

    The source box's surface (samplesPerEdge^2 points per face) is carried histology -> MRI by `inverseMapping`
    (histology RAS -> MRI RAS) or, without it, by inverting `mapping` (MRI -> histology) with Newton iterations
    (mapping.invertPoints; residuals checked). The grid's axes are those of `referenceIjkToRas` (e.g. the MRI's;
    default RAS axes), its spacing `spacingMm` (scalar or (i, j, k)). Returns (shape (nk, nj, ni), ijkToRas 4x4).
    """
    from MRIHistoRegLib.mapping import invertPoints

    sourceShape = _asShape(sourceShape, "sourceShape")
    sourceIjkToRas = _asMatrix(sourceIjkToRas, "sourceIjkToRas")
    spacing = np.broadcast_to(np.asarray(spacingMm, float), (3,)).copy()
    if np.any(spacing <= 0):
        raise UserInputError(f"spacingMm must be > 0, got {spacingMm}.")
    directions = np.eye(3)
    if referenceIjkToRas is not None:
        matrix = _asMatrix(referenceIjkToRas, "referenceIjkToRas")
        directions = matrix[:3, :3] / spacingOf(matrix)
    sizes = np.array(sourceShape[::-1], float)
    t = np.linspace(0.0, 1.0, int(samplesPerEdge))
    faces = []
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        u, v = np.meshgrid(t, t, indexing="ij")
        for side in (0.0, 1.0):
            points = np.empty((u.size, 3))
            points[:, axis] = side
            points[:, others[0]] = u.ravel()
            points[:, others[1]] = v.ravel()
            faces.append(points)
    unit = np.concatenate(faces)
    index = -0.5 + unit * sizes[None, :]
    moving = applyMatrixElementwise(sourceIjkToRas, index)
    if inverseMapping is not None:
        fixed = asPoints(inverseMapping.transformPoints(moving))
    else:
        linear = asMapping(mapping).linearMatrix()
        initial = None if linear is None else applyMatrixElementwise(np.linalg.inv(linear), moving)
        fixed, residual = invertPoints(mapping, moving, initialGuess=initial)
        if residual.max(initial=0.0) > 1e-3:
            raise UserInputError(f"Could not carry the histology footprint into MRI space (inverse residual "
                             f"{residual.max():.3g} mm): the transform folds near the stack's border; pass an "
                             f"explicit reference grid instead.")
    local = fixed @ directions  # coordinates along the grid's axes
    low = local.min(axis=0) - marginMm
    high = local.max(axis=0) + marginMm
    counts = np.maximum(np.ceil((high - low) / spacing).astype(int), 1)
    if float(np.prod(counts.astype(float))) > maxVoxels:
        raise UserInputError(f"The footprint grid would have {np.prod(counts.astype(float)):.3g} voxels at {spacing.tolist()} mm: "
                         f"choose a coarser spacing.")
    ijkToRas = np.eye(4)
    ijkToRas[:3, :3] = directions * spacing[None, :]
    firstCentre = low + 0.5 * spacing  # voxel boxes tile [low, low + counts * spacing]
    ijkToRas[:3, 3] = directions @ firstCentre
    return (int(counts[2]), int(counts[1]), int(counts[0])), ijkToRas
