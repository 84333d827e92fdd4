"""NRRD stacks: raw or gzip voxels, attached to the header or in a detached data file (.nhdr + .raw / .raw.gz).

Raw planes are read with positioned reads rather than a long-lived memory map: mapped file pages count toward
the process's resident memory, and a plane read into a reused buffer is as fast as copying it out of a map
(reducing straight from mapped pages measured slower than reading cache-sized runs and reducing those). The
voxels of the other byte order are swapped in place after each read, while they are still in the CPU cache.
gzip data is one decompression stream (ISA-L's igzip when installed, the standard zlib otherwise), read
forward and restarted for a backward jump. The geometry keeps the header's directions and origin (converted
to RAS) with the effective spacing.
"""
import os
import threading
from collections import namedtuple

import numpy as np

from MRIHistoRegLib.geometry import LPS_RAS_SIGNS, spacingOf
from MRIHistoRegLib.stacks.base import StackSource, _readExactly, chooseChannel
from MRIHistoRegLib.stacks.units import unitToMillimetres
from ..errors import UserInputError

NRRD_EXTENSIONS = (".nrrd", ".nhdr")

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
        raise UserInputError(f"{path}: unsupported NRRD type '{header.get('type')}' (a stack must hold integer or float "
                         "scalars). Re-export it.")
    dtype = np.dtype(code)
    if dtype.itemsize > 1 and str(header.get("encoding", "raw")).lower() not in ("ascii", "text", "txt"):
        endian = str(header.get("endian", "")).strip().lower()
        if endian not in ("little", "big"):
            raise UserInputError(f"{path}: the NRRD header has no valid 'endian' field ({header.get('endian')!r}) for "
                             f"{dtype.itemsize}-byte voxels. Add 'endian: little' (or big) to the header.")
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    return dtype



# The header's geometry: spacing (i, j, k) in mm or None, unit directions (columns i, j, k, in the header's
# space) or None, origin (header space, mm), the flip taking the header's space to RAS, and whether the spacing
# came from space directions (which makes it metadata, not just a header default).
_NrrdGeometry = namedtuple("_NrrdGeometry", "spacing directions origin toRasFlip fromDirections")


def _readHeader(path):
    """(parsed header, offset of the byte after it) of the NRRD at `path`."""
    from MRIHistoRegLib.deps import requirePackage

    nrrd = requirePackage("nrrd")
    try:
        with open(path, "rb") as fh:
            header = nrrd.read_header(fh)
            return header, fh.tell()
    except Exception as error:
        raise UserInputError(f"{path} is not a readable NRRD header ({error}). Check the file.") from error


def _channelAxis(header, path):
    """(number of channels, names) of a NRRD whose first axis is a channel axis (kinds list/vector/...), else
    (1, ["C0"]); the header's sizes are then those of one channel."""
    sizes = [int(n) for n in header["sizes"]]
    kinds = [str(k).lower() for k in (header.get("kinds") or [])]
    if len(sizes) != 4 or not kinds or kinds[0] not in ("list", "vector", "point", "covariant-vector", "normal",
                                                        "rgb-color", "rgba-color", "hsv-color", "xyz-color"):
        return 1, ["C0"]
    labels = list(header.get("labels") or [])
    nc = sizes[0]
    names = [f"C{i}" for i in range(nc)]
    if labels and str(labels[0]).strip():
        parts = [p.strip() for p in str(labels[0]).strip('"').split(",")]
        if len(parts) == nc and len(set(parts)) == nc and all(parts):
            names = parts
    return nc, names


def _stackSizes(header, path, nc=1):
    """The header's sizes (i, j, k); a 2-D image is a stack of one plane."""
    sizes = [int(n) for n in header["sizes"]][(1 if nc > 1 else 0):]
    if len(sizes) == 2:
        sizes = sizes + [1]
    if len(sizes) != 3:
        raise UserInputError(f"{path} has {len(sizes)} dimensions {sizes}; a stack must be 3-D (one channel).")
    return sizes


def _streamableEncoding(header, path):
    """'raw' or 'gzip' (the encodings a plane can be streamed from); ValueError for the others."""
    encoding = header.get("encoding", "raw").lower()
    if encoding in ("gz",):
        encoding = "gzip"
    if encoding not in ("raw", "gzip"):
        raise UserInputError(f"{path}: NRRD encoding '{encoding}' is not supported for streaming; re-save it as raw or gzip.")
    return encoding


def _dataLocation(header, path, headerEnd):
    """(data file, offset after the header's line skip) of the voxels: the NRRD itself or its detached data."""
    dataFile = header.get("data file", header.get("datafile"))
    lineSkip = int(header.get("line skip", header.get("lineskip", 0)))
    if dataFile is None:
        dataPath, start = path, headerEnd
    else:
        if isinstance(dataFile, (list, tuple)):
            raise UserInputError(f"{path}: multi-file NRRD data is not supported; save it as one data file.")
        dataPath = dataFile if os.path.isabs(dataFile) else os.path.join(os.path.dirname(path), dataFile)
        if not os.path.isfile(dataPath):
            raise UserInputError(f"{path} points to data file {dataPath}, which does not exist. Keep the .nhdr next to its data.")
        start = 0
    if lineSkip:
        with open(dataPath, "rb") as fh:
            fh.seek(start)
            for _ in range(lineSkip):
                fh.readline()
            start = fh.tell()
    return dataPath, start


def _rawDataOffset(dataPath, start, byteSkip, sizes, fileDtype):
    """Offset of the first raw voxel (byte skip applied; -1 = the voxels end the file); ValueError when the file
    is shorter than the header promises."""
    total = sizes[0] * sizes[1] * sizes[2] * fileDtype.itemsize
    fileSize = os.path.getsize(dataPath)
    start = fileSize - total if byteSkip == -1 else start + byteSkip
    if start < 0 or fileSize - start < total:
        raise UserInputError(f"{dataPath} is truncated: the NRRD header promises {total} bytes of voxels "
                         f"({sizes[0]}x{sizes[1]}x{sizes[2]} {fileDtype}) but the file holds {max(fileSize - max(start, 0), 0)}. "
                         f"Re-copy or re-export the file.")
    return start


def _unitFactor(header):
    """Millimetres per the header's first space unit (1 when absent or unknown)."""
    units = header.get("space units")
    if units is None or not len(units):
        return 1.0
    try:
        return unitToMillimetres(str(units[0]).strip('"'))
    except ValueError:
        return 1.0


def _directionsAndSpacing(header, unitFactor):
    """(direction matrix in mm, columns i, j, k, or None; spacing (i, j, k) or None) from space directions, else
    from spacings."""
    directions = header.get("space directions")
    if directions is not None:
        rows = [d for d in np.asarray(directions, dtype=float) if np.all(np.isfinite(d))]
        if len(rows) < 3:
            return None, None
        matrix = np.array(rows[:3], dtype=float).T * unitFactor  # columns = i, j, k axes
        return matrix, tuple(spacingOf(matrix))
    if header.get("spacings") is not None:
        values = [float(v) for v in header["spacings"]][:3]
        if all(np.isfinite(values)):
            return None, tuple(abs(v) * unitFactor for v in values)
    return None, None


def _toRasFlip(header):
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("right-anterior-superior", "ras", "scanner-xyz", "3d-right-handed"):
        return np.ones(3)
    if space in ("left-anterior-superior", "las"):
        return np.array([-1.0, 1.0, 1.0])
    return LPS_RAS_SIGNS.copy()


def _nrrdGeometry(header):
    """The header's _NrrdGeometry (space directions or spacings, origin, space), lengths in mm."""
    unitFactor = _unitFactor(header)
    matrix, spacing = _directionsAndSpacing(header, unitFactor)
    origin = np.zeros(3)
    if header.get("space origin") is not None:
        origin = np.asarray(header["space origin"], dtype=float)[:3] * unitFactor
    directions = None
    if matrix is not None and min(spacing) > 0:
        directions = matrix / np.asarray(spacing)
    if spacing is not None and min(spacing) <= 0:
        spacing = None
    return _NrrdGeometry(spacing, directions, origin, _toRasFlip(header), header.get("space directions") is not None)


class NrrdStack(StackSource):
    """A NRRD (attached or detached data; raw or gzip encoding)."""

    kind = "nrrd"

    def __init__(self, path, spacingMm=None, channel=None):
        path = os.fspath(path)
        header, headerEnd = _readHeader(path)
        self.header = header
        self.nChannels, self.channelNames = _channelAxis(header, path)
        self.channelIndex = chooseChannel(channel, self.channelNames, path)
        sizes = _stackSizes(header, path, self.nChannels)
        self.fileDtype = nrrdDtype(header, path)
        self.encoding = _streamableEncoding(header, path)
        byteSkip = int(header.get("byte skip", header.get("byteskip", 0)))
        self._dataPath, start = _dataLocation(header, path, headerEnd)
        if self.encoding == "raw":
            self.dataOffset = _rawDataOffset(self._dataPath, start, byteSkip, sizes[:2] + [sizes[2] * self.nChannels],
                                             self.fileDtype)
            self.decompressedSkip = 0
        else:  # the byte skip counts decompressed bytes
            self.dataOffset = start
            self.decompressedSkip = max(byteSkip, 0)
        self.planeBytes = sizes[0] * sizes[1] * self.fileDtype.itemsize * self.nChannels  # all channels' voxels
        geometry = _nrrdGeometry(header)
        self._directions, self._origin, self._toRasFlip = geometry.directions, geometry.origin, geometry.toRasFlip
        metadataSpacing = geometry.spacing if geometry.fromDirections else None
        super().__init__(path, (sizes[2], sizes[1], sizes[0]), self.fileDtype, headerSpacingMm=geometry.spacing,
                         metadataSpacingMm=metadataSpacing,
                         metadataSpacingSource="NRRD space directions" if geometry.fromDirections else None,
                         spacingMm=spacingMm)
        self._resetReader()

    def ijkToRas(self):
        spacing = np.asarray(self.spacingMm)
        m = np.eye(4)
        if self._directions is None:
            directions = np.diag([1.0, 1.0, 1.0])  # LPS axes along i, j, k, like ITK without directions
            flip = LPS_RAS_SIGNS
        else:
            directions = self._directions
            flip = self._toRasFlip
        m[:3, :3] = (flip[:, None] * directions) * spacing[None, :]
        m[:3, 3] = flip * self._origin
        return m

    @property
    def dataPath(self):
        return self._dataPath

    @property
    def parallelReads(self):
        return self.encoding == "raw"  # a gzip stream has one position: its planes are read in order by one thread

    def rawPlaneOffset(self, k):
        if self.encoding != "raw":
            return None
        return self.dataOffset + int(k) * self.planeBytes

    def readRowsAt(self, handle, offset, j0, j1, out):
        if self.nChannels == 1:
            rows = super().readRowsAt(handle, offset, j0, j1, out)
        else:  # the channel axis is the fastest: read the run's interleaved voxels, keep one channel
            interleaved = getattr(self._threadRows, "buffer", None)
            ni = self.planeShape[1]
            if interleaved is None or interleaved.shape[0] < j1 - j0:
                interleaved = self._threadRows.buffer = np.empty((j1 - j0, ni * self.nChannels), out.dtype)
            both = super().readRowsAt(handle, offset, j0, j1, interleaved)
            rows = out[: j1 - j0]
            np.copyto(rows, both.reshape(j1 - j0, ni, self.nChannels)[..., self.channelIndex])
        if not self.fileDtype.isnative:  # swapped while the run is still in the CPU cache
            rows.byteswap(inplace=True)
        return rows

    def _readPlaneInto(self, k, out):
        if self.nChannels > 1:  # the channel axis is the fastest: read the interleaved plane, keep one channel
            both = np.empty(self.planeShape + (self.nChannels,), out.dtype)
            self._readRawPlane(k, both)
            np.copyto(out, both[..., self.channelIndex])
            return
        self._readRawPlane(k, out)

    def _readRawPlane(self, k, out):
        view = memoryview(out.reshape(-1).view(np.uint8))
        if self.encoding == "raw":
            with self._lock:
                if self._fh is None:
                    self._fh = open(self.dataPath, "rb", buffering=0)
                _readExactly(self._fh, self.dataOffset + k * self.planeBytes, view, self.dataPath, f"plane {k}")
        else:
            with self._lock:
                self._readGzipPlane(k, view)
        if not self.fileDtype.isnative:
            out.byteswap(inplace=True)

    def openPositionalHandle(self):
        return open(self.dataPath, "rb", buffering=0) if self.encoding == "raw" else None

    def readPlaneWith(self, k, out, handle):
        if handle is None or self.nChannels > 1:  # gzip: the one shared stream
            return self.readPlane(k, out=out)
        view = memoryview(out.reshape(-1).view(np.uint8))
        _readExactly(handle, self.dataOffset + k * self.planeBytes, view, self.dataPath, f"plane {k}")
        if not self.fileDtype.isnative:
            out.byteswap(inplace=True)
        return out

    def _openGzip(self):
        raw = open(self.dataPath, "rb")
        raw.seek(self.dataOffset)
        from MRIHistoRegLib.deps import optionalPackage

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
            raise UserInputError(f"{self.dataPath}: the gzip data is corrupt or truncated while reading {what} "
                             f"({type(error).__name__}: {error}). Re-copy or re-export the file.") from error
        if got < len(view):
            self._closeStream()
            raise UserInputError(f"{self.dataPath} is truncated: the NRRD header promises {self.shape[0]} planes of "
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
        self._threadRows = threading.local()  # each worker thread's buffer of interleaved channels
        self._stream = None
        self._raw = None
        self._streamPlane = 0
        self._fh = None

    def close(self):
        self._closeStream()
        if self._fh is not None:
            self._fh.close()
            self._fh = None
