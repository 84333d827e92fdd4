"""Streamed, exact, memory-bounded downsampling of a huge stack to a coarser spacing.

The filter is the exact area (volume) average: every output voxel is the mean of the piecewise-constant input
over its box, boxes of the target size tiled from the (cropped) stack's corner, input voxels cut by a box edge
counted with the fraction inside. Non-integer factors (30.77 x 30.77 x 20) are exact; integer factors give the
plain block mean. It is separable, so it runs plane by plane:

- each input plane k is reduced along j first: rows are summed over "segments" (runs of rows wholly inside one
  output box, or a single row cut by a box edge) - one pass over the plane, in float32 where that is exact
  (integers up to 16 bits and short runs) else float64;
- those row sums are accumulated (float64) into the one or two output planes plane k overlaps, with the
  fraction of plane k inside each;
- when an output plane is complete its row sums are summed over column segments (reduceat), the j and i
  fractions applied as sparse weighted sums (no BLAS: exact and in a fixed order), then divided by the box
  volume.

Both cores are used: for sources with positional reads (uncompressed TIFF pages, raw NRRD, TIFF series) two
workers take the work from one queue. Raw planes are read in ~1 MB runs of rows with `pread`, one run of every
plane of a group (the planes wholly inside one output plane) per work item: the runs are added element by
element in the input's own unsigned integer type while a running bound (the sum of the runs' maxima) shows the
sums cannot wrap, and summed along j only when the next run would overflow - for typical 16-bit data about
once per output plane, so the converting sum no longer runs for every input plane. Planes cut by a box edge,
other types and planes read whole (compressed TIFF pages, decoded one at a time by tifffile) are summed along
j plane by plane. For gzip NRRD (one decompression stream) one thread decompresses ahead into rotating plane
buffers while another reduces. For integer data every intermediate sum is an exact integer (below 2^24 where
it is float32), so the result does not depend on the path a plane took.

Memory, whatever the depth: per worker two runs of rows (or one plane buffer; three for gzip), the row sums of
the current item and of the few open output planes (float64, n_segments_j x n_i each), plus the float32
output. Output voxel centres sit at the centres of the averaged boxes; the geometry stays in the stack's frame
(see stacks/).

The last box along an axis is dropped when the stack does not fill it (at most one target voxel's worth of data,
like ITK's BinShrink); an axis shorter than one target voxel gives one output voxel averaging all of it, centred
on it.
"""
import logging
import math
import os
import queue
import threading

import numpy as np

from MRIHistoRegLib.geometry import flipGeometryLpsRas
from MRIHistoRegLib.outputs import silentRemove
from MRIHistoRegLib.progress import Cancelled, report
from .errors import UserInputError

LOG = logging.getLogger(__name__)

_EPS = 1e-9
_CHUNK_BYTES = 2 << 20  # a run of rows per read: bench/downsample.py measured 1, 2 and 4 MB on an idle machine


# --------------------------------------------------------------------------------------------------------------
# Plan: per-axis box edges and weights
# --------------------------------------------------------------------------------------------------------------
class _AxisPlan:
    """Boxes of `factor` input voxels tiled over `length` input voxels (index units from the region start)."""

    def __init__(self, length, factor):
        self.length = int(length)
        self.factor = float(factor)
        if self.length < self.factor * (1 - _EPS):
            edges = np.array([0.0, float(self.length)])
        else:
            count = max(1, int(math.floor(self.length / self.factor + _EPS)))
            edges = np.arange(count + 1, dtype=float) * self.factor
            edges[-1] = min(edges[-1], float(self.length))
        rounded = np.round(edges)
        edges = np.where(np.abs(edges - rounded) < 1e-7, rounded, edges)
        self.edges = edges
        self.count = len(edges) - 1
        self.boxLength = np.diff(edges)
        self.cover = int(math.ceil(edges[-1] - 1e-7))  # input cells touched
        breaks = np.unique(np.concatenate([np.floor(edges), np.ceil(edges)]).astype(np.int64))
        self.breaks = breaks[(breaks >= 0) & (breaks <= self.cover)]
        lo, hi = self.breaks[:-1].astype(float), self.breaks[1:].astype(float)
        overlap = np.clip(np.minimum(hi[None, :], edges[1:, None]) - np.maximum(lo[None, :], edges[:-1, None]), 0, None)
        overlap[overlap < 1e-9] = 0.0
        self.segmentWeights = overlap / (hi - lo)[None, :]  # (count, nSegments): weight of a segment's SUM
        # the same as a sparse list, box by box: entry e adds weight[e] x segment[e] to its box
        boxes, segs = np.nonzero(self.segmentWeights)
        self.entrySegment = segs.astype(np.intp)
        self.entryWeight = self.segmentWeights[boxes, segs]
        self.entryStarts = np.searchsorted(boxes, np.arange(self.count)).astype(np.intp)
        self.unitWeights = bool(np.all(self.entryWeight == 1.0))
        self.maxSegment = int(np.max(hi - lo)) if len(lo) else 1

    def combine(self, sums, axis):
        """Box sums from segment sums along `axis` (exact for integer-valued sums: no BLAS, fixed order)."""
        taken = np.take(sums, self.entrySegment, axis=axis)
        if not self.unitWeights:
            shape = [1] * sums.ndim
            shape[axis] = -1
            taken *= self.entryWeight.reshape(shape)
        return np.add.reduceat(taken, self.entryStarts, axis=axis)

    def cellWeights(self):
        """(count, cover) overlap of each input cell with each box."""
        cells = np.arange(self.cover, dtype=float)
        return np.clip(np.minimum(cells[None, :] + 1, self.edges[1:, None]) - np.maximum(cells[None, :], self.edges[:-1, None]), 0, None)

    def centres(self):
        """Box centres in voxel-centre index coordinates (voxel c spans [c - 0.5, c + 0.5])."""
        return (self.edges[:-1] + self.edges[1:]) / 2.0 - 0.5


def _millimetres(values) -> str:
    """(0.1, 0.1, 0.12): plain numbers, whatever numpy's repr of its scalars."""
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _factors(source, targetSpacingMm):
    from MRIHistoRegLib.spacing import toMillimetres

    target = np.broadcast_to(np.asarray(toMillimetres(targetSpacingMm, "mm")), (3,)).astype(float)
    spacing = np.asarray(source.spacingMm, dtype=float)
    factors = target / spacing
    if np.any(factors < 1 - 1e-6):
        axes = ", ".join(f"{'ijk'[a]}: {target[a]:.6g} < {spacing[a]:.6g} mm" for a in range(3) if factors[a] < 1 - 1e-6)
        raise UserInputError(f"Target spacing {_millimetres(target)} mm is finer than the stack's spacing "
                             f"{_millimetres(spacing)} mm ({axes}). "
                         f"Downsampling only makes voxels bigger: choose a target of at least the stack's spacing "
                         f"(or correct the stack's spacing first if it is wrong).")
    return np.maximum(factors, 1.0), target


def resolveCrop(source, crop):
    """Crop box as voxel ranges ((i0, i1), (j0, j1), (k0, k1)), half-open, from None, voxel ranges, or
    {"mm": ((x0, x1), (y0, y1), (z0, z1))} measured along i, j, k from the stack's corner (outer face of voxel 0),
    rounded to the nearest voxel boundary."""
    nk, nj, ni = source.shape
    sizes = (ni, nj, nk)
    if crop is None:
        return tuple((0, n) for n in sizes)
    if isinstance(crop, dict):
        if set(crop) != {"mm"}:
            raise UserInputError("A crop dict must be {'mm': ((x0, x1), (y0, y1), (z0, z1))}; give voxel ranges as a plain tuple.")
        ranges = []
        for axis, pair in enumerate(crop["mm"]):
            if pair is None:
                ranges.append(None)
                continue
            s = source.spacingMm[axis]
            ranges.append((int(round(float(pair[0]) / s)), int(round(float(pair[1]) / s))))
        crop = ranges
    if len(crop) != 3:
        raise UserInputError(f"Crop must have three ranges (i, j, k), got {crop!r}.")
    result = []
    for axis, (pair, n) in enumerate(zip(crop, sizes)):
        if pair is None:
            result.append((0, n))
            continue
        a, b = (int(pair[0]) if pair[0] is not None else 0), (int(pair[1]) if pair[1] is not None else n)
        if not (0 <= a < b <= n):
            raise UserInputError(f"Crop range {'ijk'[axis]} = [{a}, {b}) is empty or outside the stack (0..{n}). "
                             f"Give increasing ranges within the stack's size {sizes} (i, j, k).")
        result.append((a, b))
    return tuple(result)


def outputGeometry(source, targetSpacingMm, crop=None):
    """(shape [k, j, i], ijkToRas 4x4) of what downsampleStack would return, without reading voxels."""
    factors, _ = _factors(source, targetSpacingMm)
    box = resolveCrop(source, crop)
    plans = [_AxisPlan(b - a, f) for (a, b), f in zip(box, factors)]
    return (plans[2].count, plans[1].count, plans[0].count), _geometry(source, plans, box, factors)


def _geometry(source, plans, box, factors):
    inMatrix = source.ijkToRas()
    out = np.eye(4)
    out[:3, :3] = inMatrix[:3, :3] * np.asarray(factors)[None, :]
    firstCentre = np.array([box[a][0] + plans[a].centres()[0] for a in range(3)] + [1.0])
    out[:3, 3] = (inMatrix @ firstCentre)[:3]
    return out


# --------------------------------------------------------------------------------------------------------------
# Reading planes on a second thread
# --------------------------------------------------------------------------------------------------------------
class _PlanePrefetcher:
    """Reads planes `ks` in order on a background thread into two rotating buffers."""

    def __init__(self, source, ks, buffers=2):
        self.source = source
        self.ks = list(ks)
        self.free = queue.Queue()
        self.full = queue.Queue()
        for _ in range(buffers):
            self.free.put(np.empty(source.planeShape, source.dtype))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="plane-reader", daemon=True)
        self.thread.start()

    def _run(self):
        fh = None
        try:
            fh = self.source.openPositionalHandle()
            for k in self.ks:
                buffer = self.free.get()
                if self.stop.is_set() or buffer is None:
                    return
                self.source.readPlaneWith(k, buffer, fh)
                self.full.put((k, buffer))
        except BaseException as error:  # handed to the consumer
            self.full.put((None, error))
        finally:
            if fh is not None:
                fh.close()

    def __iter__(self):
        for _ in self.ks:
            k, item = self.full.get()
            if k is None:
                raise item
            yield k, item

    def release(self, buffer):
        self.free.put(buffer)

    def close(self):
        self.stop.set()
        self.free.put(None)
        self.thread.join(timeout=30)


# --------------------------------------------------------------------------------------------------------------
# The downsampler
# --------------------------------------------------------------------------------------------------------------
def _segmentDtype(dtype, maxSegment):
    dtype = np.dtype(dtype)
    if dtype.kind in "ub" and dtype.itemsize <= 2 or dtype.kind == "i" and dtype.itemsize <= 2:
        maxAbs = float(max(abs(np.iinfo(dtype).min), np.iinfo(dtype).max)) if dtype.kind != "b" else 1.0
        if maxAbs * maxSegment < 2 ** 24:
            return np.float32
    return np.float64


# A run of rows summed in its own unsigned integer type wraps only when the true sum exceeds the type's maximum:
# with the run's maximum value m, groups of (max // m) rows are exact there. That add needs no conversion, so it
# runs at memory speed; the few group sums are then converted and added. More groups than this and the plain
# converting sum is as fast.
_MAX_WRAP_GROUPS = 3


class _Reduction:
    """The per-plane work (row-segment sums along j, weighted accumulation over k) and the per-output-plane
    finish (fractions along j, exact reduction along i, division by the box volume)."""

    def __init__(self, source, plans, box):
        pi, pj, pk = plans
        (i0, _), (j0, _), (k0, _) = box
        self.k0 = k0
        self.segments = [(j0 + int(a), j0 + int(b)) for a, b in zip(pj.breaks[:-1], pj.breaks[1:])]
        self.colSlice = slice(i0, i0 + pi.cover)
        self.segDtype = _segmentDtype(source.dtype, pj.maxSegment)
        self.rowShape = (len(self.segments), pi.cover)
        self.breaksI = pi.breaks[:-1].astype(np.intp)  # reduceat starts; the last segment runs to the end
        self.planI, self.planJ = pi, pj
        self.norm = pj.boxLength[:, None] * pi.boxLength[None, :]
        self.normK = pk.boxLength
        planeWeights = pk.cellWeights()  # (count_k, cover_k)
        self.planeOutputs = [[(int(o), float(planeWeights[o, local])) for o in np.flatnonzero(planeWeights[:, local])]
                             for local in range(pk.cover)]
        dtype = np.dtype(source.dtype)
        self.wrapMax = int(np.iinfo(dtype).max) if dtype.kind == "u" and dtype.itemsize <= 2 and dtype.isnative else None
        # runs of whole segments of ~_CHUNK_BYTES of input rows, read and summed while they sit in the CPU cache
        rowBytes = source.planeShape[1] * source.dtype.itemsize
        self.rowChunks = []
        first = 0
        for s in range(len(self.segments)):
            row0 = self.segments[first][0]
            if s + 1 == len(self.segments) or (self.segments[s + 1][1] - row0) * rowBytes > _CHUNK_BYTES:
                self.rowChunks.append((row0, self.segments[s][1], first, s + 1))
                first = s + 1
        self.chunkRows = max(b - a for a, b, _, _ in self.rowChunks)
        self.chunkSegments = max(end - first for _, _, first, end in self.rowChunks)

    def newScratch(self):
        """One worker's buffer for the wrapped group sums of one run of rows (None when the type has no such path)."""
        if self.wrapMax is None:
            return None
        return np.empty((_MAX_WRAP_GROUPS, self.chunkSegments, self.rowShape[1]), np.dtype(f"u{self.segItem}"))

    @property
    def segItem(self):
        return 1 if self.wrapMax == 255 else 2

    def rowSums(self, plane, out, scratch=None):
        """Row-segment sums of a whole plane into `out` (rowShape, segDtype)."""
        for row0, row1, first, end in self.rowChunks:
            self.sumRun(plane[row0:row1], row0, first, end, out, scratch)
        return out

    def rowSumsStreamed(self, source, handle, offset, chunkBuffer, out, scratch=None):
        """rowSums reading the plane in cache-sized runs of rows (each summed while it is still in cache)."""
        for row0, row1, first, end in self.rowChunks:
            rows = source.readRowsAt(handle, offset, row0, row1, chunkBuffer)
            self.sumRun(rows, row0, first, end, out, scratch)
        return out

    def sumRun(self, rows, row0, first, end, out, scratch):
        """Sums of segments [first, end) into out[first:end] from `rows` (input rows row0, row0 + 1, ...)."""
        group = self._wrapGroup(rows, first, end) if scratch is not None else None
        cols = self.colSlice
        if group is None:
            dtype = self.segDtype
            for s in range(first, end):
                a, b = self.segments[s]
                if b - a == 1:
                    out[s] = rows[a - row0, cols]
                else:
                    np.add.reduce(rows[a - row0:b - row0, cols], axis=0, dtype=dtype, out=out[s])
            return
        longest = max(b - a for a, b in self.segments[first:end])
        groups = -(-longest // group)
        for s in range(first, end):
            a, b = self.segments[s]
            q = 0
            for c in range(a - row0, b - row0, group):
                c1 = min(c + group, b - row0)
                if c1 - c == 1:
                    np.copyto(scratch[q, s - first], rows[c, cols])
                else:
                    np.add.reduce(rows[c:c1, cols], axis=0, out=scratch[q, s - first])
                q += 1
            if q < groups:
                scratch[q:groups, s - first] = 0
        block = scratch[:groups, : end - first]
        if groups == 1:
            np.copyto(out[first:end], block[0], casting="unsafe")
        else:
            np.add.reduce(block, axis=0, dtype=self.segDtype, out=out[first:end])

    def _wrapGroup(self, rows, first, end):
        """Rows per exactly-wrapping group for this run (see _MAX_WRAP_GROUPS), or None for the converting sum."""
        peak = int(rows.max())
        longest = max(b - a for a, b in self.segments[first:end])
        group = self.wrapMax // peak if peak else longest
        if group < 2 or -(-longest // group) > _MAX_WRAP_GROUPS:
            return None
        return min(group, longest)

    def accumulate(self, outputs, sums, first, end, accumulators, scratch):
        """Add the sums of segments [first, end) (in sums[first:end]) with each (output plane, weight) of
        `outputs` into this worker's float64 `accumulators`."""
        values = sums[first:end]
        for o, w in outputs:
            acc = accumulators.get(o)
            if acc is None:
                acc = accumulators[o] = np.zeros(self.rowShape, np.float64)
            rows = acc[first:end]
            if w == 1.0:
                np.add(rows, values, out=rows)
            else:
                weighted = scratch[first:end]
                np.multiply(values, w, out=weighted)
                np.add(rows, weighted, out=rows)

    def finish(self, o, partials):
        acc = partials[0]
        for other in partials[1:]:
            acc += other
        segmentSums = np.add.reduceat(acc, self.breaksI, axis=1)  # (nSegJ, nSegI), exact for integer data
        plane = self.planI.combine(self.planJ.combine(segmentSums, axis=0), axis=1)
        plane /= self.norm * self.normK[o]
        return plane

    def units(self, byRuns):
        """The work items, in plane order: (planes, their (output plane, weight) list, run of rows or None).

        byRuns (raw planes read in runs of rows): consecutive planes wholly inside one output plane form one
        group, handed out run by run, so a run's rows can be added over the group's planes before they are
        summed along j; a plane cut by a box edge is a group of its own. Otherwise: one plane per item."""
        groups = []
        for local, outputs in enumerate(self.planeOutputs):
            whole = len(outputs) == 1 and outputs[0][1] == 1.0
            if byRuns and whole and groups and groups[-1][2] and groups[-1][1] == outputs:
                groups[-1][0].append(self.k0 + local)
            else:
                groups.append(([self.k0 + local], outputs, whole))
        groups = [(tuple(ks), outputs) for ks, outputs, _ in groups]
        if not byRuns:
            return [(ks, outputs, None) for ks, outputs in groups]
        return [(ks, outputs, r) for ks, outputs in groups for r in range(len(self.rowChunks))]


def _workerCount(source, workers):
    if workers is not None:
        return max(1, int(workers))
    if not source.parallelReads:
        return 1
    return max(1, min(2, os.cpu_count() or 1))


# --------------------------------------------------------------------------------------------------------------
# One run: the state its threads share, how a worker gets its planes, the worker, the caller's collecting loop
# --------------------------------------------------------------------------------------------------------------
class _PlaneQueue:
    """Plane indices 0..total-1 handed to the workers in order. A worker may not run ahead of the oldest plane
    still being reduced by more than `window` planes, which bounds the number of open output planes (and so
    the memory) even when the other worker stalls."""

    def __init__(self, total, window, stop):
        self.total = total
        self.window = window
        self.stop = stop
        self.nextIndex = 0
        self.inFlight = set()
        self.slot = threading.Condition()

    def take(self):
        """The next index, or None when every index is taken or the run is stopping."""
        with self.slot:
            while self.inFlight and self.nextIndex - min(self.inFlight) >= self.window and not self.stop.is_set():
                self.slot.wait(0.1)
            index = self.nextIndex
            if index >= self.total or self.stop.is_set():
                return None
            self.nextIndex += 1
            self.inFlight.add(index)
            return index

    def release(self, index):
        with self.slot:
            self.inFlight.discard(index)
            self.slot.notify_all()


class _Run:
    """What one downsampleStack call shares between its workers and the caller's thread: the plan, the output,
    the per-worker partial sums, the plane queue, the event queue (workers -> caller) and the stop flag.

    How planes are read follows the source's capabilities only: with positional reads (or several workers)
    every worker reads its own planes, raw ones in runs of rows; without, one read-ahead thread feeds one
    worker."""

    def __init__(self, source, targetSpacingMm, crop, workers):
        factors, _ = _factors(source, targetSpacingMm)
        box = resolveCrop(source, crop)
        plans = [_AxisPlan(b - a, f) for (a, b), f in zip(box, factors)]
        pi, pj, pk = plans
        self.source = source
        self.geometry = _geometry(source, plans, box, factors)
        self.output = np.empty((pk.count, pj.count, pi.count), np.float32)
        self.reduction = _Reduction(source, plans, box)
        self.k0 = box[2][0]
        self.ks = list(range(self.k0, self.k0 + pk.cover))
        self.count = _workerCount(source, workers)
        positional = self.count > 1 or source.parallelReads
        self.streamed = positional and source.rawPlaneOffset(self.k0) is not None
        self.units = self.reduction.units(byRuns=self.streamed)
        self.total = len(self.units)
        self.planesDone = 0.0
        self.runsPerPlane = len(self.reduction.rowChunks) if self.streamed else 1
        LOG.debug("downsample %s -> %s (factors %s), %d planes in %d items, %d worker(s)", source.shape,
                  self.output.shape, tuple(factors), len(self.ks), self.total, self.count)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.events = queue.Queue()
        self.remaining = [0] * pk.count
        for _, outputs, _ in self.units:
            for o, _ in outputs:
                self.remaining[o] += 1
        self.partials = [dict() for _ in range(self.count)]
        # how far a worker may run ahead of the oldest item in flight - about one output plane's planes, or two
        # groups' runs - which bounds the open output planes (and so the memory) even when the other worker stalls
        window = 2 * self.runsPerPlane if self.streamed else max(2, int(math.ceil(factors[2])))
        self.planes = _PlaneQueue(self.total, window, self.stop)
        self.prefetch = None if positional else _PlanePrefetcher(source, self.ks, buffers=3)
        self.prefetched = iter(self.prefetch) if self.prefetch is not None else None  # one consumer: count is 1

    def planeReader(self):
        """How a worker gets its planes (see the classes below)."""
        if self.prefetch is not None:
            return _PrefetchedPlanes(self)
        if self.streamed:
            return _StreamedRows(self)
        return _WholePlanes(self)

    def completed(self, index):
        """The output planes whose last missing item was item `index`."""
        done = []
        with self.lock:
            for o, _ in self.units[index][1]:
                self.remaining[o] -= 1
                if self.remaining[o] == 0:
                    done.append(o)
        return done

    def collect(self, progress):
        """On the caller's thread: finish output planes as workers complete them, until every worker has exited.
        Returns (planes reduced, the first worker error or None). A cancel (an exception from `progress`) stops
        the workers and waits for them to exit before it propagates."""
        error, finished, exits = None, 0, 0
        try:
            while exits < self.count:
                kind, a, b = self.events.get()
                if kind == "exit":
                    exits += 1
                elif kind == "error":
                    self.stop.set()
                    error = error or a
                elif error is None:
                    finished += 1
                    for o in b:
                        self.output[o] = self.reduction.finish(o, [p.pop(o) for p in self.partials if o in p])
                    self.planesDone += len(self.units[a][0]) / self.runsPerPlane
                    report(progress, finished / self.total, f"plane {int(self.planesDone)}/{len(self.ks)}")
        except BaseException:
            self.stop.set()
            while exits < self.count:  # let the workers stop before returning
                if self.events.get()[0] == "exit":
                    exits += 1
            raise
        return finished, error

    def close(self, threads):
        self.stop.set()
        if self.prefetch is not None:
            self.prefetch.close()
        for thread in threads:
            thread.join(timeout=30)


class _PrefetchedPlanes:
    """Planes from the read-ahead thread (a source without positional reads, e.g. one gzip stream)."""

    def __init__(self, run):
        self.run = run
        self.scratch = run.reduction.newScratch()

    def reduceNext(self, sums, accumulators, weighted):
        """Reduce the next item into this worker's `accumulators`; its index, or None when there is none left."""
        item = next(self.run.prefetched, None)
        if item is None:
            return None
        k, plane = item
        reduction = self.run.reduction
        reduction.rowSums(plane, sums, self.scratch)
        self.run.prefetch.release(plane)
        index = k - self.run.k0  # one item per plane, in plane order
        reduction.accumulate(self.run.units[index][1], sums, 0, len(sums), accumulators, weighted)
        return index

    def close(self):
        pass


class _PositionalPlanes:
    """Items a worker takes from the run's queue and reads itself, through its own positional handle (None
    when the source has none: then through readPlane)."""

    def __init__(self, run):
        self.run = run
        self.handle = run.source.openPositionalHandle()
        self.scratch = run.reduction.newScratch()

    def close(self):
        if self.handle is not None:
            self.handle.close()


class _WholePlanes(_PositionalPlanes):
    """Each plane read whole into this worker's buffer."""

    def __init__(self, run):
        super().__init__(run)
        self.buffer = np.empty(run.source.planeShape, run.source.dtype)

    def reduceNext(self, sums, accumulators, weighted):
        index = self.run.planes.take()
        if index is None:
            return None
        (k,), outputs, _ = self.run.units[index]
        reduction = self.run.reduction
        reduction.rowSums(self.run.source.readPlaneWith(k, self.buffer, self.handle), sums, self.scratch)
        reduction.accumulate(outputs, sums, 0, len(sums), accumulators, weighted)
        return index


class _StreamedRows(_PositionalPlanes):
    """One run of rows (~_CHUNK_BYTES) of each plane of a group, read with one positional read per plane.

    Where the type allows (see _MAX_WRAP_GROUPS), the group's runs are added element by element in the input's
    own integer type while the running bound (the sum of each run's maximum) stays within it, and summed
    along j only when the next would overflow and at the end: for typical data once per output plane instead
    of once per input plane. A plane stored otherwise (e.g. one compressed page in an otherwise raw TIFF) is
    read whole."""

    def __init__(self, run):
        super().__init__(run)
        shape = (run.reduction.chunkRows, run.source.planeShape[1])
        self.chunk = np.empty(shape, run.source.dtype)
        self.total = np.empty(shape, run.source.dtype)
        self.groupPlanes, self.groupOffsets = None, None

    def reduceNext(self, sums, accumulators, weighted):
        index = self.run.planes.take()
        if index is None:
            return None
        ks, outputs, r = self.run.units[index]
        source, reduction = self.run.source, self.run.reduction
        row0, row1, first, end = reduction.rowChunks[r]
        n = row1 - row0
        limit = reduction.wrapMax
        bound = 0  # an upper bound of every element of self.total[:n] (with limit), else the count of planes in it
        if ks is not self.groupPlanes:  # a group's items come one after another: locate its planes once
            self.groupPlanes, self.groupOffsets = ks, [source.rawPlaneOffset(k) for k in ks]
        for k, offset in zip(ks, self.groupOffsets):
            target = self.total if bound == 0 else self.chunk
            if offset is not None:
                rows = source.readRowsAt(self.handle, offset, row0, row1, target)
            else:
                rows = target[:n]
                np.copyto(rows, source.readPlane(k)[row0:row1])
            peak = int(rows.max()) if limit is not None else 0
            if bound and (limit is None or bound + peak > limit):
                self._flush(n, row0, first, end, sums, outputs, accumulators, weighted)
                self.total, self.chunk = self.chunk, self.total
                bound = 0
            elif bound:
                np.add(self.total[:n], rows, out=self.total[:n])
            bound += peak if limit is not None else 1
        self._flush(n, row0, first, end, sums, outputs, accumulators, weighted)
        return index

    def _flush(self, n, row0, first, end, sums, outputs, accumulators, weighted):
        reduction = self.run.reduction
        reduction.sumRun(self.total[:n], row0, first, end, sums, self.scratch)
        reduction.accumulate(outputs, sums, first, end, accumulators, weighted)


def _work(run, w):
    """Worker thread `w`: reduce items until none is left or the run stops. Everything it has to say (an item
    done, an error, its exit) goes to the caller's thread as an event."""
    reader = None
    try:
        reader = run.planeReader()
        sums = np.empty(run.reduction.rowShape, run.reduction.segDtype)
        weighted = np.empty(run.reduction.rowShape, np.float64)
        while not run.stop.is_set():
            index = reader.reduceNext(sums, run.partials[w], weighted)
            if index is None:
                break
            run.planes.release(index)
            run.events.put(("plane", index, run.completed(index)))
    except BaseException as error:  # handed to the caller's thread
        run.events.put(("error", error, None))
    finally:
        if reader is not None:
            reader.close()
        run.events.put(("exit", w, None))


def _levelToRead(source, targetSpacingMm, crop, level):
    """(the pyramid level's source, the crop on its grid, the output geometry or None) a downsampling reads:
    the source itself when it has one level or level 0 is asked for, else stacks.pyramid.chooseLevel's pick
    (rule in its docstring). A level picked by that rule was checked to be a corner-aligned mean pooling of
    level 0, so the output's boxes are level 0's and so is its geometry (outputGeometry): the result does not
    depend on the level read, even where a file's level translations say otherwise (many writers omit them)."""
    if level == 0 or (level is None and len(source.levels) < 2):
        return source, crop, None
    from MRIHistoRegLib.stacks.pyramid import chooseLevel

    _, target = _factors(source, targetSpacingMm)  # validates the target against level 0
    index, chosen, box = chooseLevel(source, target, resolveCrop(source, crop), level)
    LOG.info("downsampling %s from pyramid level %d of %d: shape %s, spacing %s mm", source.path, index,
             len(source.levels), chosen.shape, _millimetres(chosen.spacingMm))
    if index == 0 or level is not None:
        return chosen, box, None
    shape, geometry = outputGeometry(source, target, crop)
    levelShape, levelGeometry = outputGeometry(chosen, target, box)
    if levelShape != shape:  # not expected (pyramid.chooseLevel maps the kept boxes exactly): keep the level's
        LOG.warning("%s: level %d gives %s output voxels, level 0 %s: using level %d's geometry", source.path, index,
                    levelShape, shape, index)
        return chosen, box, None
    if np.max(np.abs(levelGeometry[:3, 3] - geometry[:3, 3])) > 1e-3 * min(source.spacingMm):
        LOG.warning("%s: level %d's translation in the file does not place its voxels at the centres of the level-0 "
                    "boxes they average (the data do): the output keeps level 0's geometry", source.path, index)
    return chosen, box, geometry


def downsampleStack(source, targetSpacingMm, crop=None, progress=None, workers=None, level=None):
    """Exact area-weighted downsampling of `source` (a StackSource) to `targetSpacingMm` (one value or (i, j, k)).

    crop: None, voxel ranges ((i0, i1), (j0, j1), (k0, k1)) (half-open, None = whole axis), or
    {"mm": ((x0, x1), (y0, y1), (z0, z1))} along i, j, k from the stack's corner (always level 0's voxels).
    workers: threads reading + reducing planes (default: 2 when the source allows positional reads, else one
    reducer fed by a read-ahead thread).
    level: for a source with a pyramid (`source.levels`), None reads the coarsest level still finer than the
    target that passes stacks.pyramid's mean-pooling check; an int reads that level; 0 the full resolution.
    Returns (array float32 [k, j, i], ijkToRas 4x4). Cancel by raising progress.Cancelled (or returning True)
    from the progress callback."""
    source, crop, geometry = _levelToRead(source, targetSpacingMm, crop, level)
    run = _Run(source, targetSpacingMm, crop, workers)
    threads = [threading.Thread(target=_work, args=(run, w), name=f"downsample-{w}", daemon=True)
               for w in range(run.count)]
    for thread in threads:
        thread.start()
    try:
        finished, error = run.collect(progress)
    finally:
        run.close(threads)
    if error is not None:
        raise error
    if finished != run.total:
        raise RuntimeError(f"downsampling stopped after {finished} of {run.total} planes")
    return run.output, run.geometry if geometry is None else geometry


def downsampleToNode(scene, source, targetSpacingMm, name=None, crop=None, progress=None, level=None):
    """downsampleStack into a new scalar volume node in `scene` (nothing is added when cancelled)."""
    from MRIHistoRegLib.volumes import baseName, createVolumeNode

    array, matrix = downsampleStack(source, targetSpacingMm, crop=crop, progress=progress, level=level)
    if name is None:
        name = f"{baseName(source.path)}_{_spacingLabel(targetSpacingMm)}"
    return createVolumeNode(scene, array, matrix, name)


def _spacingLabel(targetSpacingMm):
    values = np.atleast_1d(np.asarray(targetSpacingMm, float))
    if np.allclose(values, values[0]):
        return f"{values[0]:g}mm"
    return "x".join(f"{v:g}" for v in values) + "mm"


def checkWritable(outPath):
    """ValueError (with the fix) when `outPath` cannot be created; nothing is left behind by the check."""
    outPath = os.fspath(outPath)
    folder = os.path.dirname(os.path.abspath(outPath))
    if not os.path.isdir(folder):
        raise UserInputError(f"Cannot write {outPath}: folder {folder} does not exist. Create it or choose another --out.")
    if os.path.isdir(outPath):
        raise UserInputError(f"Cannot write {outPath}: it is a folder. Give a file name such as {os.path.join(outPath, 'downsampled.nrrd')}.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserInputError(f"Cannot write {outPath}: folder {folder} is not writable. Choose another output location.")
    if os.path.exists(outPath) and not os.access(outPath, os.W_OK):
        raise UserInputError(f"Cannot write {outPath}: the file exists and is read-only. Remove it or choose another name.")


def writeVolumeFile(array, ijkToRasMatrix, outPath, compress=True):
    """Write [k, j, i] `array` with its geometry atomically (temporary file in the same folder, then rename).

    .nrrd goes through pynrrd (LPS space directions, gzip unless compress=False); other extensions (.nii.gz, .mha, ...)
    through SimpleITK."""
    outPath = os.fspath(outPath)
    checkWritable(outPath)
    folder = os.path.dirname(os.path.abspath(outPath))
    base = os.path.basename(outPath)
    temp = os.path.join(folder, f".tmp{os.getpid()}_{threading.get_ident()}_{base}")
    lps = flipGeometryLpsRas(ijkToRasMatrix)  # IJK -> LPS, as NRRD's space directions and origin want
    if outPath.lower().endswith(".nrrd"):
        from MRIHistoRegLib.deps import requirePackage

        nrrd = requirePackage("nrrd")  # missing: ValueError with the fix (in Slicer: offer to install), nothing written
    try:
        if outPath.lower().endswith(".nrrd"):
            header = {
                "space": "left-posterior-superior",
                "space directions": lps[:3, :3].T,  # one row per axis i, j, k
                "space origin": lps[:3, 3],
                "kinds": ["domain", "domain", "domain"],
                "encoding": "gzip" if compress else "raw",
            }
            nrrd.write(temp, np.ascontiguousarray(array), header, index_order="C")
        else:
            import SimpleITK as sitk

            from MRIHistoRegLib.volumes import sitkImageFromArray

            sitk.WriteImage(sitkImageFromArray(array, ijkToRasMatrix), temp, useCompression=compress)
        os.replace(temp, outPath)
    except (OSError, RuntimeError) as error:
        silentRemove(temp)
        raise UserInputError(f"Cannot write {outPath} ({error}). Check the folder is writable and has free space.") from error
    except BaseException:
        silentRemove(temp)
        raise
    return outPath


def downsampleToFile(source, targetSpacingMm, outPath, crop=None, progress=None, compress=True, level=None):
    """downsampleStack written to `outPath` (.nrrd, any SimpleITK format, or an OME-Zarr folder *.zarr /
    *.ome.zarr: NGFF 0.4 with a mean-pooled pyramid), atomically: on error or cancel no file (partial or
    temporary) is left. The destination is checked before the (long) streaming starts."""
    omeZarr = os.fspath(outPath).lower().rstrip("/\\").endswith(".zarr")
    if omeZarr:
        from MRIHistoRegLib.stacks.omezarr import checkOmeZarrWritable, writeOmeZarr

        checkOmeZarrWritable(outPath)
    else:
        checkWritable(outPath)
    array, matrix = downsampleStack(source, targetSpacingMm, crop=crop, progress=progress, level=level)
    if omeZarr:
        return writeOmeZarr(array, matrix, outPath)
    return writeVolumeFile(array, matrix, outPath, compress=compress)




__all__ = ["downsampleStack", "downsampleToNode", "downsampleToFile", "outputGeometry", "resolveCrop",
           "writeVolumeFile", "checkWritable", "Cancelled"]
