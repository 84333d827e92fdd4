"""What the HDF5 pyramid readers (Imaris .ims, BigDataViewer .h5) share: opening the file with h5py, errors that
name the fix, and one resolution level read plane by plane through a slab of whole chunk layers.

Why slabs: an HDF5 dataset is stored in compressed 3-D chunks (Imaris writes e.g. 256 x 256 x 16, BigDataViewer
32 x 32 x 4 or 16 x 16 x 16), so reading plane k alone decompresses every chunk it crosses, and the next plane
decompresses them again. A reader therefore reads the chunk layer holding k (chunk-depth planes, cut to the true
size) in one h5py call and serves the following planes from it: each chunk is decompressed once, and memory is
one chunk layer - capped at SLAB_BYTES, beyond which fewer planes are read at a time (a chunk is then
decompressed more than once, never more memory). h5py serialises its calls, so a source reads from one thread
(parallelReads False: the downsampler's read-ahead thread feeds one reducer).
"""
import logging
import os

import numpy as np

from MRIHistoRegLib.stacks.base import StackSource
from ..errors import UserInputError

LOG = logging.getLogger(__name__)

SLAB_BYTES = 256 << 20


def openHdf5(path, what):
    """An h5py.File opened read-only; a file HDF5 cannot open (truncated, not HDF5) is a UserInputError."""
    from MRIHistoRegLib.deps import requirePackage

    h5py = requirePackage("h5py")
    from MRIHistoRegLib.deps import optionalPackage

    optionalPackage("hdf5plugin")  # when installed, registers LZ4, Blosc, ... (some Imaris versions write LZ4)
    try:
        return h5py.File(os.fspath(path), "r")
    except OSError as error:  # h5py: "truncated file", "file signature not found", ...
        raise UserInputError(f"{path} cannot be opened as {what} ({error}). The file is truncated or not HDF5: "
                             f"re-copy it or export it again.") from error


def requireDataset(h5, name, path, fix):
    """The dataset `name` of `h5`, or a UserInputError saying it is missing and how to fix it."""
    try:
        item = h5[name]
    except (KeyError, OSError, ValueError) as error:
        raise UserInputError(f"{path}: {name} is missing ({error}). {fix}") from error
    if not hasattr(item, "shape") or not hasattr(item, "dtype"):
        raise UserInputError(f"{path}: {name} is not a dataset. {fix}")
    return item


def checkFilters(dataset, path):
    """A UserInputError at open, naming the fix, when `dataset` is compressed with an HDF5 filter this h5py cannot
    decode (otherwise the first chunk read would fail as if the file were corrupt)."""
    import h5py

    plist = dataset.id.get_create_plist()
    for index in range(plist.get_nfilters()):
        code, _, _, label = plist.get_filter(index)
        if not h5py.h5z.filter_avail(code):
            name = label.decode("latin-1", "replace") if isinstance(label, bytes) else str(label)
            raise UserInputError(f"{path}: {dataset.name} is compressed with HDF5 filter {code} ({name or 'unnamed'}), "
                                 f"which this h5py cannot decode. Install the filters (pip install hdf5plugin, in "
                                 f"Slicer: slicer.util.pip_install('hdf5plugin')) or re-save the file with gzip "
                                 f"compression.")


def flipToRas(matrix):
    """A voxel -> (x, y, z) matrix in the file's frame as IJK -> RAS, with the TIFF convention: the file's x, y,
    z are L, P, S (so a stack exported to TIFF and the same stack in the pyramid file land in the same frame, up
    to the origin)."""
    out = np.array(matrix, dtype=float)
    out[:2, :] *= -1.0
    return out


class Hdf5Level(StackSource):
    """One resolution level: a (z, y, x) dataset, of which the leading `shape` is the image (Imaris pads its
    datasets up to whole chunks), with a fixed IJK -> RAS computed by the file's reader.

    `fileDtype` is how the dataset stores voxels, `dtype` how they are meant (BigDataViewer stores unsigned 16-bit
    voxels as int16: the bytes are reinterpreted, not converted)."""

    def __init__(self, path, datasetName, shape, dtype, ijkToRas, channelNames, channelIndex, kind, index=0,
                 spacingSource=None):
        matrix = np.asarray(ijkToRas, dtype=float)
        spacing = tuple(np.linalg.norm(matrix[:3, :3], axis=0))
        stated = spacing if spacingSource is not None else None  # None: no voxel size in the file, 1 mm placeholder
        super().__init__(path, shape, dtype, headerSpacingMm=stated, metadataSpacingMm=stated,
                         metadataSpacingSource=spacingSource)
        self.kind = kind
        self.datasetName = datasetName
        self.levelIndex = int(index)
        self.channelNames = list(channelNames)
        self.channelIndex = int(channelIndex)
        self._matrix = matrix.copy()
        self._resetReader()

    def ijkToRas(self):
        if self.userSpacingMm is None:
            return self._matrix.copy()
        m = self._matrix.copy()  # the file's directions and origin, the user's spacing
        norms = np.linalg.norm(m[:3, :3], axis=0)
        m[:3, :3] = m[:3, :3] / norms[None, :] * np.asarray(self.spacingMm)[None, :]
        return m

    _specs = ()  # the coarser levels: [(dataset name, shape (k, j, i), factors (i, j, k))], set by a file's reader

    @property
    def levels(self):
        """(this level, the coarser ones...): built once per source (a withSpacing copy builds its own)."""
        if self._levels is None:
            self._levels = pyramidLevels(self, self._specs) if self._specs else (self,)
        return self._levels

    # ---- voxels ---------------------------------------------------------------------------------------------
    def _dataset(self):
        if self._h5 is None:
            self._h5 = openHdf5(self.path, self.kind)
            self._ds = requireDataset(self._h5, self.datasetName, self.path, "Re-copy or re-export the file.")
        return self._ds

    def _slabDepth(self, ds):
        chunks = ds.chunks or (1,) + tuple(ds.shape[1:])
        planeBytes = self.planeShape[0] * self.planeShape[1] * self.dtype.itemsize
        depth = max(1, min(int(chunks[0]), SLAB_BYTES // max(planeBytes, 1)))
        if depth < chunks[0]:
            LOG.info("%s: a chunk layer (%d planes) exceeds %d MB: reading %d planes at a time (chunks are "
                     "decompressed %d times)", self.path, chunks[0], SLAB_BYTES >> 20, depth, -(-chunks[0] // depth))
        return depth

    def _readPlaneInto(self, k, out):
        with self._lock:
            if self._slab is None or not self._slabStart <= k < self._slabStart + len(self._slab):
                self._loadSlab(k)
            np.copyto(out, self._slab[k - self._slabStart])

    def _loadSlab(self, k):
        ds = self._dataset()
        if self._depth is None:
            self._depth = self._slabDepth(ds)
        k0 = k - k % self._depth
        k1 = min(k0 + self._depth, self.shape[0])
        nj, ni = self.planeShape
        self._slab = None  # the old slab's memory is free before the next is read
        try:
            slab = ds[k0:k1, :nj, :ni]
        except (OSError, RuntimeError, ValueError) as error:  # h5py: "Can't read data", a failed filter, ...
            raise UserInputError(f"{self.path}: planes {k0}..{k1 - 1} of {self.datasetName} cannot be read ({error}). "
                                 f"The file is truncated or corrupt: re-copy it or export it again.") from error
        if not slab.dtype.isnative:  # native order first, so that a reinterpretation below sees native bytes
            slab = slab.astype(slab.dtype.newbyteorder("="))
        if slab.dtype != self.dtype:
            slab = slab.view(self.dtype) if slab.dtype.itemsize == self.dtype.itemsize else slab.astype(self.dtype)
        self._slab, self._slabStart = slab, k0

    @property
    def chunkShape(self):
        """(k, j, i) voxels per chunk (what one decode reads); the pyramid's spot check stays inside one."""
        chunks = self._dataset().chunks
        return None if chunks is None else tuple(int(c) for c in chunks)

    def readRegion(self, k0, k1, j0, j1, i0, i1):
        """Voxels [k0:k1, j0:j1, i0:i1] in one h5py read: only the chunks the box touches are decompressed."""
        with self._lock:
            try:
                box = self._dataset()[k0:k1, j0:j1, i0:i1]
            except (OSError, RuntimeError, ValueError) as error:
                raise UserInputError(f"{self.path}: voxels of {self.datasetName} cannot be read ({error}). The file "
                                     f"is truncated or corrupt: re-copy it or export it again.") from error
        if not box.dtype.isnative:
            box = box.astype(box.dtype.newbyteorder("="))
        if box.dtype != self.dtype:
            box = box.view(self.dtype) if box.dtype.itemsize == self.dtype.itemsize else box.astype(self.dtype)
        return box

    def _resetReader(self):
        self._h5 = None
        self._ds = None
        self._slab = None
        self._slabStart = 0
        self._depth = None
        self._levels = None

    def close(self):
        h5, levels = self._h5, self._levels
        self._resetReader()
        if h5 is not None:
            h5.close()
        for level in (levels or ())[1:]:
            level.close()

    def describe(self):
        lines = super().describe()
        lines.append(f"dataset: {self.datasetName} (level {self.levelIndex})")
        return lines


def levelMatrix(baseMatrix, factors):
    """IJK -> RAS of a level whose voxel p covers level-0 voxels [f p, f (p + 1)) along each axis (factors f,
    i, j, k; not necessarily integers): its centre is level-0 index f p + (f - 1) / 2, as BigDataViewer's mipmap
    transform and Imaris's extents (the same physical box at every level) both say."""
    f = np.asarray(factors, dtype=float)
    toBase = np.eye(4)
    toBase[:3, :3] = np.diag(f)
    toBase[:3, 3] = (f - 1.0) / 2.0
    return np.asarray(baseMatrix, dtype=float) @ toBase


def pyramidLevels(base, specs):
    """(base, level 1, ...) for a level-0 Hdf5Level `base` and specs [(dataset name, shape (k, j, i), factors
    (i, j, k)), ...] of the coarser levels; their geometry follows base's (also a user-given spacing)."""
    matrix = base.ijkToRas()
    source = base.spacingSource if base.metadataSpacingMm is not None or base.userSpacingMm is not None else None
    levels = [base]
    for index, (name, shape, factors) in enumerate(specs, start=1):
        levels.append(Hdf5Level(base.path, name, shape, base.dtype, levelMatrix(matrix, factors), base.channelNames,
                                base.channelIndex, base.kind, index=index, spacingSource=source))
    return tuple(levels)


def describeLevels(levels):
    """`info` lines, one per resolution level: index, shape, spacing."""
    lines = [f"resolution levels: {len(levels)}"]
    for index, level in enumerate(levels):
        spacing = " x ".join(f"{v * 1000:.4g}" for v in level.spacingMm)
        lines.append(f"  level {index}: shape (k, j, i) {level.shape}, spacing (i, j, k) {spacing} um")
    return lines
