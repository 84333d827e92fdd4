"""The one reader interface every stack source implements (StackSource), the memory guard, and the helpers
the readers share.

A consumer (downsample, resample, the pipeline) uses only the names defined here: shape, dtype, planeShape,
nbytes, spacingMm, headerSpacingMm, metadataSpacingMm, spacingSource, ijkToRas(), readPlane(k, out=None),
iterPlanes, readAll, withSpacing, close / `with`, and `levels` (the resolution pyramid, (self,) without one). What a streaming reader may exploit is asked through explicit
capability methods with safe defaults (parallelReads, rawPlaneOffset, openPositionalHandle, readPlaneWith,
readRowsAt), so no caller needs to know the file format or probe attributes.
"""
import logging
import os
import threading

import numpy as np

from MRIHistoRegLib.stacks.units import toMillimetres
from ..errors import UserInputError

LOG = logging.getLogger(__name__)

# os.preadv (a positional read that moves no file position) is POSIX-only: a platform guard, not a protocol.
# Without it a thread seeks its own handle, which no other thread uses, so the read is just as safe.
_PREADV = getattr(os, "preadv", None)


# --------------------------------------------------------------------------------------------------------------
# Memory guard
# --------------------------------------------------------------------------------------------------------------
def availableMemoryBytes():
    """Bytes the OS says it can give this process now (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # other POSIX systems: free physical pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def checkMemoryFor(nbytes, what, availableBytes=None):
    """Refuse (ValueError) to load `nbytes` for `what` when that exceeds the memory available now.

    The message suggests the streamed downsampling, which needs only one plane plus the output. When the
    available memory cannot be determined the check passes (with a debug log)."""
    available = availableBytes if availableBytes is not None else availableMemoryBytes()
    if available is None:
        LOG.debug("available memory unknown: not checking %s (%d bytes)", what, nbytes)
        return
    if nbytes > available:
        raise UserInputError(
            f"Loading {what} needs {_human(nbytes)} but only {_human(available)} of memory is available. "
            f"Use the streamed downsampling instead (MRIHistoRegLib.downsample.downsampleToNode, or "
            f"`python -m MRIHistoRegLib downsample INPUT --target-mm 0.05`), which needs one plane plus the output, "
            f"or crop the stack first.")


def _human(nbytes):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000.0


# --------------------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------------------
class StackSource:
    """A 3-D stack: shape (nk, nj, ni), dtype, spacing and geometry; voxels read plane by plane.

    A subclass implements `_readPlaneInto(k, out)` and, when its file allows more, overrides the capability
    methods (parallelReads, rawPlaneOffset, openPositionalHandle, readPlaneWith)."""

    kind = None
    channelNames = ("C0",)  # the file's channels (names from its metadata, else C0, C1, ...)
    channelIndex = 0  # the channel whose planes this source reads

    def __init__(self, path, shape, dtype, headerSpacingMm=None, metadataSpacingMm=None, metadataSpacingSource=None,
                 spacingMm=None):
        self.path = os.fspath(path)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype).newbyteorder("=")
        self.headerSpacingMm = _tupleOrNone(headerSpacingMm)
        self.metadataSpacingMm = _tupleOrNone(metadataSpacingMm)
        self.metadataSpacingSource = metadataSpacingSource
        self.userSpacingMm = None
        if spacingMm is not None:
            self.userSpacingMm = _validSpacing(spacingMm)
        self._lock = threading.Lock()

    # ---- spacing and geometry -------------------------------------------------------------------------------
    @property
    def spacingMm(self):
        """Effective spacing (i, j, k) in mm: user-given > metadata > header > 1 mm."""
        for candidate in (self.userSpacingMm, self.metadataSpacingMm, self.headerSpacingMm):
            if candidate is not None:
                return candidate
        return (1.0, 1.0, 1.0)

    @property
    def spacingSource(self):
        if self.userSpacingMm is not None:
            return "user"
        if self.metadataSpacingMm is not None:
            return self.metadataSpacingSource or "metadata"
        if self.headerSpacingMm is not None:
            return "header"
        return "default 1 mm (nothing in the file)"

    @property
    def nbytes(self):
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def planeShape(self):
        return self.shape[1:]

    def ijkToRas(self):
        """4x4 IJK->RAS: LPS axes along i, j, k, voxel 0 centred at the origin (TIFF convention)."""
        sx, sy, sz = self.spacingMm
        m = np.eye(4)
        m[0, 0], m[1, 1], m[2, 2] = -sx, -sy, sz
        return m

    def withSpacing(self, spacingMm):
        """A copy of this source with the user-given spacing (i, j, k) in mm (None: back to the file's)."""
        import copy

        other = copy.copy(self)
        other.userSpacingMm = None if spacingMm is None else _validSpacing(spacingMm)
        other._lock = threading.Lock()
        other._resetReader()
        return other

    # ---- voxels ---------------------------------------------------------------------------------------------
    def readPlane(self, k, out=None):
        """Plane k as a 2-D [j, i] array in native byte order (into `out` when given: shape planeShape, dtype)."""
        k = int(k)
        if not 0 <= k < self.shape[0]:
            raise IndexError(f"plane {k} outside 0..{self.shape[0] - 1} of {self.path}")
        if out is None:
            out = np.empty(self.planeShape, self.dtype)
        elif out.shape != self.planeShape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise UserInputError(f"readPlane: `out` must be a C-contiguous {self.dtype} array of shape {self.planeShape}")
        self._readPlaneInto(k, out)
        return out

    def _readPlaneInto(self, k, out):
        raise NotImplementedError(f"{type(self).__name__} must implement _readPlaneInto(k, out)")

    def iterPlanes(self, start=0, stop=None):
        """Yield (k, plane) for k in [start, stop); each plane is a new array."""
        stop = self.shape[0] if stop is None else min(int(stop), self.shape[0])
        for k in range(int(start), stop):
            yield k, self.readPlane(k)

    def readAll(self, progress=None):
        """The whole stack as one [k, j, i] array (after the memory guard)."""
        from MRIHistoRegLib.progress import report

        checkMemoryFor(self.nbytes, f"the whole stack {os.path.basename(self.path)} {self.shape}")
        array = np.empty(self.shape, self.dtype)
        for k in range(self.shape[0]):
            self.readPlane(k, out=array[k])
            report(progress, (k + 1) / self.shape[0], f"reading plane {k + 1}/{self.shape[0]}")
        return array

    # ---- pyramid: the resolution levels a multi-resolution file holds -------------------------------------
    @property
    def levels(self):
        """The file's resolution levels, finest first, each a StackSource with its own shape, dtype, spacingMm
        and ijkToRas (same channel, same frame); index 0 is this full-resolution source. A file without a
        pyramid has one level: (self,). The downsampler picks one of them (stacks/pyramid.py); everything
        that needs full resolution reads level 0, i.e. this source."""
        return (self,)

    def readRegion(self, k0, k1, j0, j1, i0, i1):
        """Voxels [k0:k1, j0:j1, i0:i1] as a new array. This default reads the planes whole; a chunked source
        reads only the chunks the box touches."""
        out = np.empty((k1 - k0, j1 - j0, i1 - i0), self.dtype)
        for k in range(k0, k1):
            out[k - k0] = self.readPlane(k)[j0:j1, i0:i1]
        return out

    # ---- capabilities: safe defaults, overridden where the file allows more ---------------------------------
    @property
    def parallelReads(self):
        """True when planes can be read concurrently from several threads (positional reads)."""
        return False

    @property
    def dataPath(self):
        """The file holding the voxels (a detached NRRD's data file; the stack's own path otherwise)."""
        return self.path

    def rawPlaneOffset(self, k):
        """Byte offset of plane k's voxels in `dataPath` when they are stored uncompressed and contiguous (so
        any run of rows can be read with one positional read by readRowsAt, which returns them in native byte
        order), else None. A source that gives an offset also gives a handle from openPositionalHandle."""
        return None

    def openPositionalHandle(self):
        """A new unbuffered handle on `dataPath` for one thread's readPlaneWith / readRowsAt (positional reads
        share no file position with other threads), or None when the source has none (in memory, one
        decompression stream, one file per plane). The caller closes it."""
        return None

    def readPlaneWith(self, k, out, handle):
        """Plane k into `out` (planeShape, dtype) through the calling thread's `handle` from openPositionalHandle.
        This default, for sources without positional reads (handle None), is readPlane."""
        return self.readPlane(k, out=out)

    def readRowsAt(self, handle, offset, j0, j1, out):
        """Rows [j0, j1) of the plane stored raw at `offset` (see rawPlaneOffset) into out[:j1 - j0] through the
        calling thread's `handle` (openPositionalHandle), with one positional read. This default reads bytes
        as they are: a source whose raw offsets are of the other byte order swaps them in its override."""
        rows = out[: j1 - j0]
        rowBytes = rows.shape[1] * rows.itemsize
        view = memoryview(rows.reshape(-1).view(np.uint8))
        start = offset + j0 * rowBytes
        if _PREADV is None:
            _readExactly(handle, start, view, self.dataPath, f"rows {j0}..{j1}")
            return rows
        fd = handle.fileno()
        got = _PREADV(fd, [view], start)
        while 0 < got < len(view):
            more = _PREADV(fd, [view[got:]], start + got)
            if more <= 0:
                break
            got += more
        if got != len(view):
            raise UserInputError(f"{self.dataPath} is truncated: rows {j0}..{j1} need {len(view)} bytes "
                             f"at offset {start} but the file has only {max(got, 0)} there. Re-copy or re-export the file.")
        return rows

    # ---- life cycle -----------------------------------------------------------------------------------------
    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _resetReader(self):
        """Forget open readers after a copy (withSpacing), so the copy opens its own."""

    def describe(self):
        """Human-readable summary lines (used by the `info` command)."""
        extent = [n * s for n, s in zip(self.shape[::-1], self.spacingMm)]
        return [
            f"path: {self.path}",
            f"kind: {self.kind}",
            "channels: " + ", ".join(f"{i}: {n}" + (" (read)" if i == self.channelIndex else "")
                                     for i, n in enumerate(self.channelNames)),
            f"shape (k, j, i): {self.shape}   dtype: {self.dtype}   size: {_human(self.nbytes)}",
            f"header spacing (i, j, k) mm: {_fmt(self.headerSpacingMm)}",
            f"metadata spacing (i, j, k) mm: {_fmt(self.metadataSpacingMm)}"
            + (f" from {self.metadataSpacingSource}" if self.metadataSpacingMm is not None else ""),
            f"effective spacing (i, j, k) mm: {_fmt(self.spacingMm)} ({self.spacingSource})",
            f"physical size (i, j, k) mm: {_fmt(extent)}",
        ] + self._describeLevels()

    def _describeLevels(self):
        levels = self.levels
        if len(levels) < 2:
            return []
        return [f"pyramid: {len(levels)} levels (the downsampler reads the coarsest one finer than the target)"] + [
            f"  level {n}: shape (k, j, i) {level.shape}, spacing (i, j, k) mm {_fmt(level.spacingMm)}, "
            f"{_human(level.nbytes)}" for n, level in enumerate(levels)]

    def __repr__(self):
        return f"<{type(self).__name__} {self.kind} {self.shape} {self.dtype} spacing {self.spacingMm} mm: {self.path}>"


# --------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------
def _fmt(values):
    return "none" if values is None else " x ".join(f"{v:.6g}" for v in values)


def _tupleOrNone(values):
    return None if values is None else tuple(float(v) for v in values)


def _validSpacing(spacingMm):
    values = np.broadcast_to(np.asarray(spacingMm, dtype=float).ravel(), (3,)) if np.size(spacingMm) in (1, 3) else None
    if values is None:
        raise UserInputError(f"Spacing must be one value or three (i, j, k), got {spacingMm!r}.")
    return tuple(toMillimetres(values, "mm"))


def _readExactly(fh, offset, view, path, what):
    """Positional read of len(view) bytes at `offset` into `view`; a short read is a ValueError naming the file."""
    fh.seek(offset)
    got = fh.readinto(view)
    while got is not None and got < len(view):
        more = fh.readinto(view[got:])
        if not more:
            break
        got += more
    if got != len(view):
        raise UserInputError(f"{path} is truncated: {what} needs {len(view)} bytes at offset {offset} but the file has only "
                         f"{got} there. Re-export or re-copy the file.")


def chooseChannel(channel, names, path):
    """Index of `channel` (an index, a numeric string or a name) among `names`; None means 0 (logged when there
    are several). A wrong channel is a UserInputError listing the available ones."""
    available = ", ".join(f"{i}: {n}" for i, n in enumerate(names))
    if channel is None:
        if len(names) > 1:
            LOG.info("%s has %d channels (%s): reading channel 0 (%s); choose another with --channel / "
                     "histology_channel", path, len(names), available, names[0])
        return 0
    if isinstance(channel, str) and channel in names:
        return list(names).index(channel)
    if isinstance(channel, str) and channel.strip().lstrip("-").isdigit():
        channel = int(channel)
    if isinstance(channel, int) and not isinstance(channel, bool) and 0 <= channel < len(names):
        return channel
    raise UserInputError(f"{path}: no channel {channel!r}. Available channels (index: name): {available}. "
                         f"Give one of these indices or names.")
