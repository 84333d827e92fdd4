"""Stack sources: huge 3-D microscopy stacks opened without reading their voxels, then read plane by plane.

`openStack(path, spacingMm=None)` understands
- a multipage TIFF (classic or BigTIFF, compressed or not; OME-XML and ImageJ spacing metadata are read),
- a folder of 2-D TIFF files (natural sort, all slices the same shape and dtype; one file is fine),
- a NRRD file with raw or gzip data, attached or detached (.nhdr + .raw / .raw.gz).

Arrays are [k, j, i]; spacing tuples are (i, j, k) in millimetres. A TIFF stack gets the geometry Slicer/ITK
give it on load: LPS axes along i, j, k with voxel (0, 0, 0) centred at the origin, so RAS = (-i*sx, -j*sy, k*sz).
A NRRD keeps its own directions and origin (converted LPS -> RAS) but with the effective spacing.

Voxels are read into a caller's buffer where possible (`readPlane(k, out=...)`): uncompressed TIFF pages and raw
NRRD planes with one positional read (`os.pread`-like `readinto`), compressed TIFF pages through tifffile, gzip
NRRD with incremental decompression (ISA-L's igzip when installed, the standard zlib otherwise). Raw NRRD is read
with positioned reads rather than a long-lived memory map: mapped file pages count toward the process's resident
memory, and a plane read into a reused buffer is as fast as copying it out of a map.

`checkMemoryFor(nbytes, what)` is the memory guard to call before loading anything whole.
"""
import logging
import os
import re
import threading

import numpy as np

LOG = logging.getLogger(__name__)

_TIFF_EXTENSIONS = (".tif", ".tiff")
_NRRD_EXTENSIONS = (".nrrd", ".nhdr")
# TIFF compression 1 = none; anything else goes through tifffile's decoders.
_TIFF_NO_COMPRESSION = 1


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
        raise ValueError(
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
# Sources
# --------------------------------------------------------------------------------------------------------------
class StackSource:
    """A 3-D stack on disk: shape (nk, nj, ni), dtype, spacing and geometry; voxels read plane by plane."""

    kind = None

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
            raise ValueError(f"readPlane: `out` must be a C-contiguous {self.dtype} array of shape {self.planeShape}")
        self._readPlaneInto(k, out)
        return out

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

    @property
    def parallelReads(self):
        """True when planes can be read concurrently from several threads (positional reads)."""
        return False

    def rawPlaneOffset(self, k):
        """Byte offset of plane k's voxels in `dataPath` when they are stored uncompressed, contiguous and in
        native byte order (so any run of rows can be read with one positional read), else None."""
        return None

    def readRowsAt(self, fd, offset, j0, j1, out):
        """Rows [j0, j1) of the plane stored raw at `offset` (see rawPlaneOffset) into out[:j1 - j0], one pread."""
        rows = out[: j1 - j0]
        rowBytes = rows.shape[1] * rows.itemsize
        view = memoryview(rows.reshape(-1).view(np.uint8))
        start = offset + j0 * rowBytes
        got = os.preadv(fd, [view], start)
        while 0 < got < len(view):
            more = os.preadv(fd, [view[got:]], start + got)
            if more <= 0:
                break
            got += more
        if got != len(view):
            raise ValueError(f"{getattr(self, 'dataPath', self.path)} is truncated: rows {j0}..{j1} need {len(view)} bytes "
                             f"at offset {start} but the file has only {max(got, 0)} there. Re-copy or re-export the file.")
        return rows

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _resetReader(self):
        pass

    def describe(self):
        """Human-readable summary lines (used by the `info` command)."""
        extent = [n * s for n, s in zip(self.shape[::-1], self.spacingMm)]
        return [
            f"path: {self.path}",
            f"kind: {self.kind}",
            f"shape (k, j, i): {self.shape}   dtype: {self.dtype}   size: {_human(self.nbytes)}",
            f"header spacing (i, j, k) mm: {_fmt(self.headerSpacingMm)}",
            f"metadata spacing (i, j, k) mm: {_fmt(self.metadataSpacingMm)}"
            + (f" from {self.metadataSpacingSource}" if self.metadataSpacingMm is not None else ""),
            f"effective spacing (i, j, k) mm: {_fmt(self.spacingMm)} ({self.spacingSource})",
            f"physical size (i, j, k) mm: {_fmt(extent)}",
        ]

    def __repr__(self):
        return f"<{type(self).__name__} {self.kind} {self.shape} {self.dtype} spacing {self.spacingMm} mm: {self.path}>"


def _fmt(values):
    return "none" if values is None else " x ".join(f"{v:.6g}" for v in values)


def _tupleOrNone(values):
    return None if values is None else tuple(float(v) for v in values)


def _validSpacing(spacingMm):
    from MRIHistoRegLib.spacing import toMillimetres

    values = np.broadcast_to(np.asarray(spacingMm, dtype=float).ravel(), (3,)) if np.size(spacingMm) in (1, 3) else None
    if values is None:
        raise ValueError(f"Spacing must be one value or three (i, j, k), got {spacingMm!r}.")
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
        raise ValueError(f"{path} is truncated: {what} needs {len(view)} bytes at offset {offset} but the file has only "
                         f"{got} there. Re-export or re-copy the file.")


# ---- in memory -------------------------------------------------------------------------------------------------
class ArraySource(StackSource):
    """An in-memory [k, j, i] array with its IJK->RAS 4x4, behind the StackSource interface, so that what serves
    stacks (downsample.downsampleStack's exact box filter, resample.resampleToGrid) serves arrays and volume
    nodes too. The array is kept, not copied; readPlane copies a plane like any source. The geometry keeps the
    matrix's directions and origin; `spacingMm` is its column norms (withSpacing changes only the spacing)."""

    kind = "array"

    def __init__(self, array, ijkToRas, name="<array>"):
        array = np.asarray(array)
        if array.ndim != 3 or min(array.shape) < 1:
            raise ValueError(f"A source array must be 3-D [k, j, i] and not empty, got shape {array.shape}.")
        matrix = np.asarray(ijkToRas, dtype=float)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
            raise ValueError(f"A source's ijkToRas must be a finite 4x4 matrix, got {matrix.shape}.")
        from MRIHistoRegLib.volumes import spacingOf

        spacing = spacingOf(matrix)
        if abs(np.linalg.det(matrix[:3, :3])) < 1e-12 or np.any(spacing <= 0):
            raise ValueError(f"The source's ijkToRas is singular (spacing {spacing.tolist()}): fix its spacing/directions.")
        super().__init__(name, array.shape, array.dtype, headerSpacingMm=spacing)
        self.array = array
        self._matrix = matrix.copy()
        self._directions = matrix[:3, :3] / spacing[None, :]
        self._origin = matrix[:3, 3].copy()

    def ijkToRas(self):
        if self.userSpacingMm is None:
            return self._matrix.copy()  # exactly the matrix given
        m = np.eye(4)
        m[:3, :3] = self._directions * np.asarray(self.spacingMm)[None, :]
        m[:3, 3] = self._origin
        return m

    def _readPlaneInto(self, k, out):
        np.copyto(out, self.array[k])  # the buffer is in native byte order; the array may not be


# ---- TIFF ------------------------------------------------------------------------------------------------------
class _TiffPlaneReader:
    """Reads 2-D pages of one TIFF file: uncompressed contiguous pages with one read, others with tifffile."""

    def __init__(self, path):
        from .deps import requirePackage

        tifffile = requirePackage("tifffile")

        self.path = path
        try:
            self.tif = tifffile.TiffFile(path)
        except Exception as error:  # tifffile raises TiffFileError, struct.error, ...
            raise ValueError(f"{path} is not a readable TIFF file ({error}). Check the file or re-export it.") from error
        self.byteorder = self.tif.byteorder
        self.size = os.path.getsize(path)

    def pageInfo(self, page):
        """(shape, dtype) of a 2-D grayscale page; ValueError for colour/multi-sample pages."""
        if getattr(page, "samplesperpixel", 1) != 1 or len(page.shape) != 2:
            raise ValueError(f"{self.path}: page shape {page.shape} is not a 2-D grayscale image (colour or multi-sample "
                             f"TIFF pages are not supported). Export one channel as grayscale.")
        return tuple(page.shape), np.dtype(page.dtype)

    def fastLayout(self, page, nbytes):
        """The file offset of an uncompressed page's data when it is one contiguous run, else None."""
        try:
            if page.compression != _TIFF_NO_COMPRESSION or page.fillorder != 1 or page.predictor not in (1, None):
                return None
            offsets, counts = page.dataoffsets, page.databytecounts
        except AttributeError:
            return None
        if not offsets:
            return None
        for a, n, b in zip(offsets[:-1], counts[:-1], offsets[1:]):
            if a + n != b:
                return None
        if sum(counts) != nbytes:
            return None  # strips that do not hold exactly one plane: let tifffile decode (and complain)
        return offsets[0]

    def read(self, page, out, fh=None, pageIndex=0):
        shape, dtype = out.shape, out.dtype
        offset = self.fastLayout(page, out.nbytes)
        if offset is not None:
            handle = fh if fh is not None else self.tif.filehandle
            view = memoryview(out.reshape(-1).view(np.uint8))
            if fh is None:
                with self.tif.filehandle.lock:
                    _readExactly(handle, offset, view, self.path, f"page {pageIndex}")
            else:
                _readExactly(handle, offset, view, self.path, f"page {pageIndex}")
            if self.byteorder == ">" and dtype.itemsize > 1:
                out.byteswap(inplace=True)
            return out
        try:
            data = page.asarray()
        except Exception as error:
            raise ValueError(f"{self.path}: page {pageIndex} is corrupt or unreadable ({type(error).__name__}: {error}). "
                             f"Re-export the stack or remove that page.") from error
        if data.shape != shape:
            raise ValueError(f"{self.path}: page {pageIndex} has shape {data.shape}, expected {shape}. Re-export the stack.")
        np.copyto(out, data, casting="unsafe")
        return out

    def close(self):
        self.tif.close()


class TiffStack(StackSource):
    """A multipage TIFF (classic or BigTIFF); pages are the k planes."""

    kind = "tiff"

    def __init__(self, path, spacingMm=None):
        path = os.fspath(path)
        self._reader = _TiffPlaneReader(path)
        tif = self._reader.tif
        pages = tif.pages
        pages.useframes = False
        problems = _TiffLogCapture()
        try:
            with problems:
                count = len(pages)
        except Exception as error:
            raise ValueError(f"{path}: cannot read the TIFF page index ({error}). The file may be truncated.") from error
        if problems.messages:
            raise ValueError(f"{path} is truncated or corrupt: {problems.messages[0]} after {count} readable pages. "
                             f"Re-copy or re-export the stack.")
        declared = _declaredPlanes(tif)
        if declared is not None and declared > count:
            raise ValueError(f"{path} is truncated: its metadata declares {declared} planes but only {count} pages are "
                             f"readable. Re-copy or re-export the stack.")
        if count == 0:
            raise ValueError(f"{path} has no image pages.")
        first = pages.first if hasattr(pages, "first") else pages[0]
        planeShape, dtype = self._reader.pageInfo(first)
        _refuseMultiChannel(tif, path)
        self._pages = [first] + [None] * (count - 1)
        metadata, source = _tiffMetadataSpacing(tif, first)
        super().__init__(path, (count,) + planeShape, dtype, metadataSpacingMm=metadata, metadataSpacingSource=source,
                         spacingMm=spacingMm)
        self._fh = None
        # tifffile/ImageJ-written stacks store all planes as one contiguous run: plane k is at offset + k x plane
        self._contiguousOffset = None
        try:
            series = tif.series[0]
            offset = series.dataoffset
            if (offset is not None and int(np.prod(series.shape)) == count * planeShape[0] * planeShape[1]
                    and np.dtype(series.dtype) == dtype
                    and self._reader.fastLayout(first, planeShape[0] * planeShape[1] * dtype.itemsize) is not None):
                self._contiguousOffset = int(offset)
        except Exception:  # no usable series description: pages are located one by one
            self._contiguousOffset = None
        if self._contiguousOffset is not None and self._contiguousOffset + self.nbytes > self._reader.size:
            raise ValueError(f"{path} is truncated: its {count} planes need {self.nbytes} bytes from offset "
                             f"{self._contiguousOffset} but the file has {self._reader.size} bytes. Re-copy or re-export it.")

    def _page(self, k):
        page = self._pages[k]
        if page is None:
            with self._lock:
                try:
                    page = self._reader.tif.pages[k]
                except Exception as error:
                    raise ValueError(f"{self.path}: page {k} is corrupt or unreadable ({error}). Re-export the stack.") from error
                if tuple(page.shape) != self.planeShape or np.dtype(page.dtype) != self.dtype:
                    raise ValueError(f"{self.path}: page {k} has shape {page.shape} {page.dtype}, expected "
                                     f"{self.planeShape} {self.dtype}. Re-export the stack as one 2-D image per page.")
                self._pages[k] = page
        return page

    def _readPlaneInto(self, k, out):
        self._reader.read(self._page(k), out, pageIndex=k)

    def pageOffset(self, k):
        """File offset of plane k's data when it can be read with one positional read, else None."""
        return self._reader.fastLayout(self._page(k), self.planeShape[0] * self.planeShape[1] * self.dtype.itemsize)

    def rawPlaneOffset(self, k):
        if self._reader.byteorder == ">" and self.dtype.itemsize > 1:
            return None
        if self._contiguousOffset is not None:
            return self._contiguousOffset + int(k) * self.planeShape[0] * self.planeShape[1] * self.dtype.itemsize
        return self.pageOffset(k)

    @property
    def dataPath(self):
        return self.path

    @property
    def parallelReads(self):
        return True

    def readPlaneWith(self, k, out, fh):
        """readPlane through the caller's own file handle (one per thread) for uncompressed pages."""
        page = self._page(k)
        if self._reader.fastLayout(page, out.nbytes) is not None:
            return self._reader.read(page, out, fh=fh, pageIndex=k)
        with self._lock:  # tifffile's decoders share the TiffFile
            return self._reader.read(page, out, pageIndex=k)

    def close(self):
        self._reader.close()


class TiffSeries(StackSource):
    """A folder of 2-D TIFF files, one plane each, in natural sort order."""

    kind = "tiff-series"

    def __init__(self, folder, spacingMm=None, files=None):
        from .deps import requirePackage

        tifffile = requirePackage("tifffile")

        folder = os.fspath(folder)
        if files is None:
            files = [os.path.join(folder, name) for name in os.listdir(folder)
                     if name.lower().endswith(_TIFF_EXTENSIONS) and not name.startswith(".")]
        files = sorted(files, key=naturalSortKey)
        if not files:
            raise ValueError(f"{folder} holds no .tif/.tiff files. Point to a TIFF file, a folder of TIFF slices or a NRRD.")
        self.files = files
        reference = None
        metadata, source = None, None
        for index, name in enumerate(files):
            try:
                with tifffile.TiffFile(name) as tif:
                    page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
                    if len(tif.pages) != 1:
                        raise ValueError(f"{name} has {len(tif.pages)} pages; a TIFF series needs one 2-D image per file. "
                                         f"Open a multipage TIFF as a file, not as a folder.")
                    if getattr(page, "samplesperpixel", 1) != 1 or len(page.shape) != 2:
                        raise ValueError(f"{name} is not a 2-D grayscale image (shape {page.shape}).")
                    info = (tuple(page.shape), np.dtype(page.dtype))
                    if index == 0:
                        metadata, source = _tiffMetadataSpacing(tif, page, planar=True)
            except ValueError:
                raise
            except Exception as error:
                raise ValueError(f"{name} is not a readable TIFF file ({error}). Remove it from the folder or re-export it.") from error
            if reference is None:
                reference = info
            elif info != reference:
                raise ValueError(
                    f"TIFF series {folder} is inconsistent: {os.path.basename(name)} is {info[0][1]}x{info[0][0]} {info[1]} "
                    f"but {os.path.basename(files[0])} is {reference[0][1]}x{reference[0][0]} {reference[1]}. "
                    f"All slices must have the same size and type: remove or re-export the odd file.")
        super().__init__(folder, (len(files),) + reference[0], reference[1], metadataSpacingMm=metadata,
                         metadataSpacingSource=source, spacingMm=spacingMm)

    def _readPlaneInto(self, k, out):
        reader = _TiffPlaneReader(self.files[k])
        try:
            page = reader.tif.pages.first if hasattr(reader.tif.pages, "first") else reader.tif.pages[0]
            if tuple(page.shape) != self.planeShape or np.dtype(page.dtype) != self.dtype:
                raise ValueError(f"{self.files[k]} changed since the series was opened (now {page.shape} {page.dtype}).")
            reader.read(page, out, pageIndex=0)
        finally:
            reader.close()

    @property
    def parallelReads(self):
        return True

    def readPlaneWith(self, k, out, fh):
        return self.readPlane(k, out=out)


def _refuseMultiChannel(tif, path):
    """Pages of a multi-channel (or multi-time-point) OME/ImageJ file are not one z stack: refuse, naming the axes."""
    try:
        series = tif.series[0]
        axes, shape = series.axes, series.shape
    except Exception:
        return
    extra = [f"{axis}={size}" for axis, size in zip(axes, shape) if axis in "CTS" and size > 1]
    if extra:
        raise ValueError(f"{path} holds a {axes} {tuple(shape)} image with {', '.join(extra)}: its pages are not one "
                         f"z stack. Export a single channel and time point (e.g. in Fiji: Image > Duplicate, one "
                         f"channel) and open that.")


class _TiffLogCapture(logging.Handler):
    """Collects tifffile's ERROR log records (it logs, rather than raises, a bad page offset)."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("tifffile").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("tifffile").removeHandler(self)
        return False


def _declaredPlanes(tif):
    """Number of 2-D planes the file's own metadata (tifffile 'shaped' or ImageJ 'images') declares, if any."""
    try:
        shaped = tif.shaped_metadata
        if shaped:
            shape = shaped[0].get("shape")
            if shape and len(shape) >= 3:
                return int(np.prod(shape[:-2]))
        ij = tif.imagej_metadata
        if ij and ij.get("images"):
            return int(ij["images"])
    except Exception:
        return None
    return None


def naturalSortKey(path):
    """'image_2.tif' before 'image_10.tif'."""
    name = os.path.basename(os.fspath(path)).lower()
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _tiffMetadataSpacing(tif, page, planar=False):
    """Spacing (i, j, k) in mm from OME-XML or ImageJ metadata, with its source; (None, None) when absent."""
    from MRIHistoRegLib.spacing import unitToMillimetres

    ome = None
    try:
        ome = tif.ome_metadata
    except Exception:
        ome = None
    if ome:
        try:
            spacing = _omeSpacing(ome)
        except ValueError as error:
            LOG.warning("%s: ignoring OME spacing (%s)", tif.filehandle.path, error)
            spacing = None
        if spacing is not None:
            return spacing, "OME PhysicalSizeX/Y/Z"
    ij = None
    try:
        ij = tif.imagej_metadata
    except Exception:
        ij = None
    if ij:
        unit = ij.get("unit")
        if unit is not None:
            unit = str(unit).replace("\\u00B5", "µ")
        try:
            factor = unitToMillimetres(unit) if unit is not None else None
        except ValueError:
            factor = None
        xres = _resolution(page, "XResolution")
        yres = _resolution(page, "YResolution")
        z = ij.get("spacing")
        if factor is not None and xres and yres:
            sx, sy = factor / xres, factor / yres
            sz = float(z) * factor if z is not None else (sx if planar else None)
            if sz is not None and sz > 0:
                return (sx, sy, sz), "ImageJ spacing/resolution" + (" (z assumed = x)" if z is None else "")
    return None, None


def _resolution(page, name):
    tag = page.tags.get(name)
    if tag is None:
        return None
    value = tag.value
    if isinstance(value, tuple):
        if value[1] == 0:
            return None
        value = value[0] / value[1]
    value = float(value)
    return value if value > 0 else None


def _omeSpacing(xml):
    import xml.etree.ElementTree as ET

    from MRIHistoRegLib.spacing import unitToMillimetres

    root = ET.fromstring(xml)
    for element in root.iter():
        if element.tag.endswith("}Pixels") or element.tag == "Pixels":
            values = []
            for axis in "XYZ":
                size = element.get(f"PhysicalSize{axis}")
                if size is None:
                    values.append(None)
                    continue
                unit = element.get(f"PhysicalSize{axis}Unit", "µm")
                values.append(float(size) * unitToMillimetres(unit))
            if values[0] is None and values[1] is None:
                return None
            sx = values[0] if values[0] is not None else values[1]
            sy = values[1] if values[1] is not None else sx
            sz = values[2] if values[2] is not None else sx
            if min(sx, sy, sz) <= 0:
                raise ValueError(f"non-positive PhysicalSize {values}")
            return (sx, sy, sz)
    return None


# ---- NRRD ------------------------------------------------------------------------------------------------------
# NRRD "type" names (the NRRD0005 spec's list) -> numpy type codes; byte order from "endian" (needed above 1 byte).
_NRRD_TYPES = {}
for _names, _code in ((("signed char", "int8", "int8_t"), "i1"), (("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
                      (("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
                      (("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
                      (("int", "signed int", "int32", "int32_t"), "i4"), (("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
                      (("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                        "int64_t"), "i8"),
                      (("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"),
                      (("float",), "f4"), (("double",), "f8")):
    _NRRD_TYPES.update(dict.fromkeys(_names, _code))


def nrrdDtype(header, path="NRRD") -> np.dtype:
    """The numpy dtype (with byte order) of a NRRD's voxels from its parsed header; ValueError when unsupported."""
    code = _NRRD_TYPES.get(str(header.get("type", "")).strip().lower())
    if code is None:
        raise ValueError(f"{path}: unsupported NRRD type '{header.get('type')}' (a stack must hold integer or float "
                         "scalars). Re-export it.")
    dtype = np.dtype(code)
    if dtype.itemsize > 1 and str(header.get("encoding", "raw")).lower() not in ("ascii", "text", "txt"):
        endian = str(header.get("endian", "")).strip().lower()
        if endian not in ("little", "big"):
            raise ValueError(f"{path}: the NRRD header has no valid 'endian' field ({header.get('endian')!r}) for "
                             f"{dtype.itemsize}-byte voxels. Add 'endian: little' (or big) to the header.")
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    return dtype


class NrrdStack(StackSource):
    """A NRRD (attached or detached data; raw or gzip encoding)."""

    kind = "nrrd"

    def __init__(self, path, spacingMm=None):
        from .deps import requirePackage

        nrrd = requirePackage("nrrd")

        path = os.fspath(path)
        try:
            with open(path, "rb") as fh:
                header = nrrd.read_header(fh)
                headerEnd = fh.tell()
        except Exception as error:
            raise ValueError(f"{path} is not a readable NRRD header ({error}). Check the file.") from error
        self.header = header
        sizes = [int(n) for n in header["sizes"]]
        if len(sizes) == 2:
            sizes = sizes + [1]
        if len(sizes) != 3:
            raise ValueError(f"{path} has {len(sizes)} dimensions {sizes}; a stack must be 3-D (one channel).")
        fileDtype = nrrdDtype(header, path)
        self.fileDtype = fileDtype
        encoding = header.get("encoding", "raw").lower()
        if encoding in ("gz",):
            encoding = "gzip"
        if encoding not in ("raw", "gzip"):
            raise ValueError(f"{path}: NRRD encoding '{encoding}' is not supported for streaming; re-save it as raw or gzip.")
        self.encoding = encoding
        dataFile = header.get("data file", header.get("datafile"))
        lineSkip = int(header.get("line skip", header.get("lineskip", 0)))
        byteSkip = int(header.get("byte skip", header.get("byteskip", 0)))
        if dataFile is None:
            self.dataPath = path
            start = headerEnd
        else:
            if isinstance(dataFile, (list, tuple)):
                raise ValueError(f"{path}: multi-file NRRD data is not supported; save it as one data file.")
            self.dataPath = dataFile if os.path.isabs(dataFile) else os.path.join(os.path.dirname(path), dataFile)
            if not os.path.isfile(self.dataPath):
                raise ValueError(f"{path} points to data file {self.dataPath}, which does not exist. Keep the .nhdr next to its data.")
            start = 0
        if lineSkip:
            with open(self.dataPath, "rb") as fh:
                fh.seek(start)
                for _ in range(lineSkip):
                    fh.readline()
                start = fh.tell()
        shape = (sizes[2], sizes[1], sizes[0])
        planeBytes = sizes[0] * sizes[1] * fileDtype.itemsize
        total = planeBytes * sizes[2]
        fileSize = os.path.getsize(self.dataPath)
        if encoding == "raw":
            if byteSkip == -1:
                start = fileSize - total
            else:
                start += byteSkip
            if start < 0 or fileSize - start < total:
                raise ValueError(f"{self.dataPath} is truncated: the NRRD header promises {total} bytes of voxels "
                                 f"({sizes[0]}x{sizes[1]}x{sizes[2]} {fileDtype}) but the file holds {max(fileSize - max(start, 0), 0)}. "
                                 f"Re-copy or re-export the file.")
            self.decompressedSkip = 0
        else:
            self.decompressedSkip = max(byteSkip, 0)
        self.dataOffset = start
        self.planeBytes = planeBytes

        # geometry: space directions (or spacings) with the space's frame
        space = str(header.get("space", "left-posterior-superior")).lower()
        directions = header.get("space directions")
        units = header.get("space units")
        unitFactor = 1.0
        if units is not None and len(units):
            from MRIHistoRegLib.spacing import unitToMillimetres

            try:
                unitFactor = unitToMillimetres(str(units[0]).strip('"'))
            except ValueError:
                unitFactor = 1.0
        headerSpacing = None
        matrix = None
        if directions is not None:
            rows = [d for d in np.asarray(directions, dtype=float) if np.all(np.isfinite(d))]
            if len(rows) >= 3:
                matrix = np.array(rows[:3], dtype=float).T * unitFactor  # columns = i, j, k axes
                from MRIHistoRegLib.volumes import spacingOf

                headerSpacing = tuple(spacingOf(matrix))
        elif header.get("spacings") is not None:
            values = [float(v) for v in header["spacings"]][:3]
            if all(np.isfinite(values)):
                headerSpacing = tuple(abs(v) * unitFactor for v in values)
        origin = np.zeros(3)
        if header.get("space origin") is not None:
            origin = np.asarray(header["space origin"], dtype=float)[:3] * unitFactor
        self._directions = None
        if matrix is not None and min(headerSpacing) > 0:
            self._directions = matrix / np.asarray(headerSpacing)
        self._origin = origin
        self._toRasFlip = np.array([-1.0, -1.0, 1.0])
        if space in ("right-anterior-superior", "ras", "scanner-xyz", "3d-right-handed"):
            self._toRasFlip = np.ones(3)
        elif space in ("left-anterior-superior", "las"):
            self._toRasFlip = np.array([-1.0, 1.0, 1.0])
        if headerSpacing is not None and min(headerSpacing) <= 0:
            headerSpacing = None
        super().__init__(path, shape, fileDtype, headerSpacingMm=headerSpacing,
                         metadataSpacingMm=headerSpacing if directions is not None else None,
                         metadataSpacingSource="NRRD space directions" if directions is not None else None,
                         spacingMm=spacingMm)
        self._stream = None
        self._streamPlane = 0

    def ijkToRas(self):
        spacing = np.asarray(self.spacingMm)
        m = np.eye(4)
        if self._directions is None:
            directions = np.diag([1.0, 1.0, 1.0])  # LPS axes along i, j, k, like ITK without directions
            flip = np.array([-1.0, -1.0, 1.0])
        else:
            directions = self._directions
            flip = self._toRasFlip
        m[:3, :3] = (flip[:, None] * directions) * spacing[None, :]
        m[:3, 3] = flip * self._origin
        return m

    @property
    def parallelReads(self):
        return self.encoding == "raw"

    def rawPlaneOffset(self, k):
        if self.encoding != "raw" or not self.fileDtype.isnative and self.fileDtype.itemsize > 1:
            return None
        return self.dataOffset + int(k) * self.planeBytes

    def _readPlaneInto(self, k, out):
        view = memoryview(out.reshape(-1).view(np.uint8))
        if self.encoding == "raw":
            with self._lock:
                if getattr(self, "_fh", None) is None:
                    self._fh = open(self.dataPath, "rb", buffering=0)
                _readExactly(self._fh, self.dataOffset + k * self.planeBytes, view, self.dataPath, f"plane {k}")
        else:
            with self._lock:
                self._readGzipPlane(k, view)
        if not self.fileDtype.isnative:
            out.byteswap(inplace=True)

    def readPlaneWith(self, k, out, fh):
        view = memoryview(out.reshape(-1).view(np.uint8))
        _readExactly(fh, self.dataOffset + k * self.planeBytes, view, self.dataPath, f"plane {k}")
        if not self.fileDtype.isnative:
            out.byteswap(inplace=True)
        return out

    def _openGzip(self):
        raw = open(self.dataPath, "rb")
        raw.seek(self.dataOffset)
        from .deps import optionalPackage

        igzip = optionalPackage("isal.igzip")  # faster gunzip when installed
        if igzip is not None:
            stream = igzip.IGzipFile(fileobj=raw, mode="rb")
        else:
            import gzip

            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        self._raw = raw
        self._stream = stream
        self._streamPlane = 0
        if self.decompressedSkip:
            self._gzipRead(memoryview(bytearray(self.decompressedSkip)), "the header's byte skip")

    def _gzipRead(self, view, what):
        got = 0
        try:
            while got < len(view):
                n = self._stream.readinto(view[got:])
                if not n:
                    break
                got += n
        except (EOFError, OSError, Exception) as error:  # zlib.error, isal_zlib.error, BadGzipFile
            self._closeStream()
            raise ValueError(f"{self.dataPath}: the gzip data is corrupt or truncated while reading {what} "
                             f"({type(error).__name__}: {error}). Re-copy or re-export the file.") from error
        if got < len(view):
            self._closeStream()
            raise ValueError(f"{self.dataPath} is truncated: the NRRD header promises {self.shape[0]} planes of "
                             f"{self.planeBytes} bytes but the gzip data ends in {what}. Re-copy or re-export the file.")

    def _readGzipPlane(self, k, view):
        if self._stream is None or k < self._streamPlane:
            self._closeStream()
            self._openGzip()
        while self._streamPlane < k:  # skip forward
            self._gzipRead(view, f"plane {self._streamPlane}")
            self._streamPlane += 1
        self._gzipRead(view, f"plane {k}")
        self._streamPlane = k + 1

    def _closeStream(self):
        if self._stream is not None:
            try:
                self._stream.close()
            finally:
                self._raw.close()
        self._stream = None
        self._streamPlane = 0

    def _resetReader(self):
        self._stream = None
        self._streamPlane = 0
        self._fh = None

    def close(self):
        self._closeStream()
        if getattr(self, "_fh", None) is not None:
            self._fh.close()
            self._fh = None


def openStack(path, spacingMm=None):
    """Open a multipage TIFF, a folder of 2-D TIFFs or a NRRD (.nrrd/.nhdr) without reading voxels.

    spacingMm: (i, j, k) in mm (or one value), overriding whatever the file says."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return TiffSeries(path, spacingMm=spacingMm)
    if not os.path.isfile(path):
        raise ValueError(f"Stack not found: {path}. Give a TIFF file, a folder of TIFF slices or a NRRD file.")
    lower = path.lower()
    if lower.endswith(_NRRD_EXTENSIONS):
        return NrrdStack(path, spacingMm=spacingMm)
    if lower.endswith(_TIFF_EXTENSIONS) or lower.endswith((".btf", ".tf8", ".ome.tif")):
        return TiffStack(path, spacingMm=spacingMm)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"NRRD":
        return NrrdStack(path, spacingMm=spacingMm)
    if magic[:2] in (b"II", b"MM"):
        return TiffStack(path, spacingMm=spacingMm)
    raise ValueError(f"{path}: unknown stack format. Supported: .tif/.tiff (multipage), a folder of TIFF slices, .nrrd/.nhdr.")
