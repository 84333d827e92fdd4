"""OME-Zarr (OME-NGFF 0.4: zarr v2 stores with "multiscales" in .zattrs; 0.5: zarr v3 stores with the same
under zarr.json's "ome" attributes): a reader whose levels are the file's pyramid, and a writer.

The metadata say everything the reader needs: the axes (names, types, units), each level's scale and
translation (and the multiscale's own transformations applied after them), the channel names (the "omero"
block's labels, else C0, C1, ...). Axes must be [t] [c] z y x (the order NGFF requires for images); a time axis
must hold one time point. Physical coordinates (x, y, z) = scale * index + translation are taken, like a TIFF
stack's, as LPS axes: RAS = (-x, -y, z).

Voxels are read through zarr's API (zarr 2.18 for Slicer 5.8's Python 3.9 reads NGFF 0.4 only; zarr 3 reads
both), one chunk-deep slab of planes at a time, so a plane-by-plane consumer decodes every chunk once.

The writer (writeOmeZarr) writes NGFF 0.4 - a zarr v2 store that zarr 2 and 3, Fiji (N5/OME-Zarr readers),
BigDataViewer, napari and neuroglancer open - with a 2x mean-pooled pyramid, units in millimetres, and each
level's translation placing its voxel centres at the centres of the boxes it averaged.
"""
import json
import logging
import os
import threading

import numpy as np

from MRIHistoRegLib.stacks.base import StackSource, availableMemoryBytes, checkMemoryFor, chooseChannel
from MRIHistoRegLib.stacks.units import unitToMillimetres
from ..errors import UserInputError

LOG = logging.getLogger(__name__)

OME_ZARR_EXTENSIONS = (".zarr",)  # ".ome.zarr" ends with it too
_EXTRA_UNITS_MM = {"angstrom": 1e-7, "picometer": 1e-9, "decimeter": 100.0}
_OUR_KEY = "mrihistoreg"  # writeOmeZarr's extra attributes: level 0's IJK->RAS (directions NGFF 0.4 cannot hold)
# A chunk-deep slab is cached up to this size, or a quarter of the memory available if that is more; above, planes
# are read one by one and every chunk is decoded once per plane it holds (logged: rechunk the file).
_SLAB_BYTES = 256 << 20


def isOmeZarr(path):
    """True for a folder that is a zarr group (v2 .zgroup/.zattrs or v3 zarr.json)."""
    path = os.fspath(path)
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name))
                                       for name in (".zattrs", ".zgroup", "zarr.json"))


def _unitMm(unit, axis, path):
    key = str(unit).strip().lower()
    if key in _EXTRA_UNITS_MM:
        return _EXTRA_UNITS_MM[key]
    try:
        return unitToMillimetres(key)
    except UserInputError:
        raise UserInputError(f"{path}: axis {axis!r} has unit {unit!r}, which is not a length this reader knows. "
                             f"Use an NGFF space unit (micrometer, millimeter, nanometer, ...) in the multiscales "
                             f"axes, or give the spacing with --spacing-um.") from None


# --------------------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------------------
def _readAttributes(path):
    """(NGFF version, the attributes holding "multiscales"); from the files, before zarr opens anything."""
    if not os.path.isdir(path):
        raise UserInputError(f"Stack not found: {path}. An OME-Zarr image is a folder (image.ome.zarr): select the folder.")
    v3 = os.path.join(path, "zarr.json")
    v2 = os.path.join(path, ".zattrs")
    if os.path.isfile(v2):
        with open(v2, encoding="utf-8") as f:
            attrs = json.load(f)
        multiscales = attrs.get("multiscales") or [{}]
        return str(multiscales[0].get("version", "0.4")), attrs
    if os.path.isfile(v3):
        with open(v3, encoding="utf-8") as f:
            meta = json.load(f)
        attrs = (meta.get("attributes") or {}).get("ome")
        if attrs is None:
            raise UserInputError(f"{path} is a zarr v3 group without OME-NGFF metadata (no 'ome' attributes in zarr.json). "
                                 f"Open an OME-Zarr image folder (the one holding the multiscales), or re-export as OME-Zarr.")
        return str(attrs.get("version", "0.5")), attrs
    raise UserInputError(f"{path} has no .zattrs or zarr.json: not an OME-Zarr image. Select the image folder "
                         f"(e.g. image.ome.zarr or image.ome.zarr/0 of a plate/collection).")


class _Axes:
    """The multiscale's axes: where t, c, z, y, x are, and the unit's millimetres per space axis (x, y, z)."""

    def __init__(self, axes, path):
        names = [a["name"] if isinstance(a, dict) else str(a) for a in axes]
        types = [a.get("type") if isinstance(a, dict) else None for a in axes]
        lowered = [n.lower() for n in names]
        self.time = self.channel = None
        for index, (name, kind) in enumerate(zip(lowered, types)):
            if kind == "time" or (kind is None and name == "t"):
                self.time = index
            elif kind == "channel" or (kind is None and name == "c"):
                self.channel = index
        space = [i for i in range(len(names)) if i not in (self.time, self.channel)]
        if [lowered[i] for i in space] != ["z", "y", "x"] or len(names) != len(space) + (self.time is not None) + (self.channel is not None):
            raise UserInputError(f"{path}: axes {names} are not supported. This reader needs three space axes z, y, x "
                                 f"(optionally after a time axis t and a channel axis c), the order NGFF specifies for "
                                 f"images; re-export the stack as a 3-D OME-Zarr (t, c, z, y, x).")
        self.zyx = space
        self.ndim = len(names)
        self.names = names
        units = []
        for i in space:
            unit = axes[i].get("unit") if isinstance(axes[i], dict) else None
            units.append(None if unit is None else _unitMm(unit, names[i], path))
        self.unitMm = units[::-1]  # (x, y, z)


def _transforms(entries, ndim, path, where):
    """(scale, translation) of one coordinateTransformations list (identity where absent)."""
    scale, translation = np.ones(ndim), np.zeros(ndim)
    for entry in entries or []:
        kind = entry.get("type")
        if kind == "scale" and "scale" in entry:
            scale = scale * np.asarray(entry["scale"], float)
        elif kind == "translation" and "translation" in entry:
            translation = translation + np.asarray(entry["translation"], float)
        elif kind != "identity":
            raise UserInputError(f"{path}: {where} has a coordinate transformation {entry!r} this reader cannot apply "
                                 f"(it reads inline scale and translation). Re-export with inline scale/translation.")
        if len(scale) != ndim or len(translation) != ndim:
            raise UserInputError(f"{path}: {where}'s scale/translation has {len(scale)} values for {ndim} axes. "
                                 f"Fix the multiscales metadata so every transformation has one value per axis.")
    if np.any(~np.isfinite(scale)) or np.any(scale <= 0):
        raise UserInputError(f"{path}: {where} has scale {scale.tolist()}: every scale must be positive. Fix the metadata.")
    return scale, translation


class _Pyramid:
    """What every level of one OME-Zarr image shares: the opened arrays, axes, per-level scale and translation
    (x, y, z, in the file's units) and the channel names."""

    def __init__(self, path, store=None):
        self.path = path
        self.version, attrs = _readAttributes(path)
        image = None
        if not attrs.get("multiscales") and "bioformats2raw.layout" in attrs and os.path.isdir(os.path.join(path, "0")):
            image = "0"  # bioformats2raw's layout (the usual conversion of vendor files): series 0 is the image
            LOG.info("%s is a bioformats2raw collection: reading its image 0/", path)
            self.version, attrs = _readAttributes(os.path.join(path, image))
        self.imagePath = path if image is None else os.path.join(path, image)
        multiscales = attrs.get("multiscales")
        if not multiscales or not multiscales[0].get("datasets"):
            raise UserInputError(f"{path}: no 'multiscales' with datasets in the OME-NGFF metadata. Open the image folder "
                                 f"that holds them (an OME-Zarr image), or re-export the stack as OME-Zarr.")
        meta = multiscales[0]
        if "axes" not in meta:
            raise UserInputError(f"{path}: the multiscales have no 'axes' (NGFF < 0.4). Re-export as NGFF 0.4 or 0.5.")
        self.axes = _Axes(meta["axes"], path)
        group = _openGroup(path, self.version, store)
        if image is not None:
            group = group[image]
        outerScale, outerShift = _transforms(meta.get("coordinateTransformations"), self.axes.ndim, path, "the multiscale")
        self.datasetPaths, self.arrays, self.scales, self.translations = [], [], [], []
        for n, dataset in enumerate(meta["datasets"]):
            where = f"level {n} ({dataset.get('path')!r})"
            scale, shift = _transforms(dataset.get("coordinateTransformations"), self.axes.ndim, path, where)
            scale, shift = scale * outerScale, shift * outerScale + outerShift
            self.datasetPaths.append(str(dataset.get("path")))
            self.arrays.append(_openArray(group, str(dataset.get("path")), path, n, self.axes.ndim))
            zyx = self.axes.zyx
            self.scales.append(scale[zyx][::-1])
            self.translations.append(shift[zyx][::-1])
        self._checkLevels()
        self.channelNames = self._channelNames(attrs)
        self.orientation = _ourOrientation(attrs)

    def _checkLevels(self):
        first = self.arrays[0]
        for n, array in enumerate(self.arrays):
            for axis in (self.axes.time, self.axes.channel):
                if axis is not None and array.shape[axis] != first.shape[axis]:
                    raise UserInputError(f"{self.path}: level {n} has {array.shape[axis]} along {self.axes.names[axis]} but "
                                         f"level 0 has {first.shape[axis]}. The pyramid is inconsistent: re-export it.")
            if np.dtype(array.dtype) != np.dtype(first.dtype):
                raise UserInputError(f"{self.path}: level {n} is {array.dtype} but level 0 is {first.dtype}: re-export the pyramid.")
            expected = np.asarray([first.shape[a] for a in self.axes.zyx][::-1], float) * self.scales[0] / self.scales[n]
            actual = np.asarray([array.shape[a] for a in self.axes.zyx][::-1], float)
            if np.any(np.abs(actual - expected) > np.maximum(1.0, 0.01 * expected)):
                raise UserInputError(
                    f"{self.path}: level {n} ({self.datasetPaths[n]!r}) has shape (x, y, z) {tuple(int(v) for v in actual)} "
                    f"but its scale says about {tuple(round(v, 1) for v in expected)} (level 0's shape x scale ratio). "
                    f"The metadata and the arrays disagree: re-export the OME-Zarr (or fix the level's scale).")
        if self.axes.time is not None and first.shape[self.axes.time] > 1:
            raise UserInputError(f"{self.path} holds {first.shape[self.axes.time]} time points. Export one time point "
                                 f"(e.g. in Fiji: Image > Duplicate with one frame) and open that.")

    def _channelNames(self, attrs):
        count = 1 if self.axes.channel is None else int(self.arrays[0].shape[self.axes.channel])
        labels = [c.get("label") for c in ((attrs.get("omero") or {}).get("channels") or [])]
        if len(labels) == count and all(isinstance(label, str) and label for label in labels):
            return tuple(labels)
        return tuple(f"C{c}" for c in range(count))


def _ourOrientation(attrs):
    """Level 0's IJK->RAS as writeOmeZarr stored it (NGFF 0.4 has no orientation), or None."""
    matrix = (attrs.get(_OUR_KEY) or {}).get("ijk_to_ras")
    if matrix is None:
        return None
    matrix = np.asarray(matrix, float)
    ok = matrix.shape == (4, 4) and np.all(np.isfinite(matrix)) and abs(np.linalg.det(matrix[:3, :3])) > 0
    return matrix if ok else None


def _zarr():
    """zarr, installed on demand inside Slicer (deps.requirePackage: the pinned release for Slicer's Python)."""
    from MRIHistoRegLib.deps import requirePackage

    return requirePackage("zarr")


def _openGroup(path, version, store):
    zarr = _zarr()

    major = int(zarr.__version__.split(".")[0])
    if version.startswith("0.5") and major < 3:
        raise UserInputError(f"{path} is OME-NGFF {version} (zarr v3), which zarr {zarr.__version__} cannot read "
                             f"(Slicer 5.8's Python). Use Slicer 5.10 or later (zarr 3), or re-export the "
                             f"image as NGFF 0.4 (a zarr v2 store).")
    try:
        return zarr.open_group(store if store is not None else path, mode="r")
    except Exception as error:  # zarr's errors differ between versions: all mean "not a readable group"
        raise UserInputError(f"{path}: zarr cannot open the group ({type(error).__name__}: {error}). "
                             f"Check it is a complete OME-Zarr folder (re-copy or re-export it).") from error


def _openArray(group, name, path, n, ndim):
    try:
        array = group[name]
    except KeyError:
        raise UserInputError(f"{path}: level {n} ({name!r}) is listed in the multiscales metadata but missing from the "
                             f"store. The copy is incomplete: re-copy or re-export the OME-Zarr (or remove the level "
                             f"from its metadata).") from None
    if not hasattr(array, "chunks") or len(array.shape) != ndim:
        raise UserInputError(f"{path}: level {n} ({name!r}) has shape {getattr(array, 'shape', None)} but the metadata "
                             f"declare {ndim} axes. Re-export the OME-Zarr.")
    return array


# --------------------------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------------------------
class OmeZarrStack(StackSource):
    """One channel of an OME-Zarr image at one pyramid level (level 0 from openStack); `levels` gives all."""

    kind = "OME-Zarr"

    def __init__(self, path, spacingMm=None, channel=None, store=None, _pyramid=None, _level=0):
        path = os.fspath(path)
        pyramid = _pyramid if _pyramid is not None else _Pyramid(path, store)
        self._pyramid, self.level = pyramid, int(_level)
        self.channelNames = pyramid.channelNames
        self.channelIndex = chooseChannel(channel, self.channelNames, path)
        array = pyramid.arrays[self.level]
        zyx = pyramid.axes.zyx
        shape = tuple(array.shape[a] for a in zyx)
        units = pyramid.axes.unitMm
        metadata = None
        if all(u is not None for u in units):
            metadata = tuple(float(s * u) for s, u in zip(pyramid.scales[self.level], units))
        elif spacingMm is None and self.level == 0:
            raise UserInputError(f"{path}: the axes have no units, so the spacing is unknown. Give it with "
                                 f"--spacing-um X Y Z (or add 'unit': 'micrometer' to the z, y, x axes).")
        super().__init__(path, shape, array.dtype, metadataSpacingMm=metadata,
                         metadataSpacingSource=f"OME-NGFF {pyramid.version} scale" if metadata else None,
                         spacingMm=spacingMm)
        self._resetReader()

    def _resetReader(self):
        self._slab, self._slabStart, self._warnedSlab = None, None, False
        self._lock = threading.Lock()

    @property
    def dataPath(self):
        return os.path.join(self._pyramid.imagePath, self._pyramid.datasetPaths[self.level])

    @property
    def chunkShape(self):
        """(k, j, i) voxels per chunk of this level (what one decode reads)."""
        chunks = self._pyramid.arrays[self.level].chunks
        return tuple(int(chunks[a]) for a in self._pyramid.axes.zyx)

    @property
    def levels(self):
        """The pyramid's levels for this channel; a user spacing on level 0 scales every level alike."""
        if self.level != 0:
            return (self,)
        result = [self]
        base = np.asarray(self._pyramid.scales[0])
        for n in range(1, len(self._pyramid.arrays)):
            user = None
            if self.userSpacingMm is not None:
                user = tuple(np.asarray(self.userSpacingMm) * self._pyramid.scales[n] / base)
            result.append(OmeZarrStack(self.path, spacingMm=user, channel=self.channelIndex, _pyramid=self._pyramid,
                                       _level=n))
        return tuple(result)

    def ijkToRas(self):
        """LPS axes along i, j, k; the origin is the level's translation (measured in level-0 voxels, so that a
        user spacing moves the levels together)."""
        m = super().ijkToRas()
        pyramid = self._pyramid
        spacing0 = np.asarray(pyramid.scales[0])
        effective0 = np.asarray(self.spacingMm) * spacing0 / np.asarray(pyramid.scales[self.level])
        if pyramid.orientation is not None:  # written by writeOmeZarr: its directions and origin, exactly
            directions = pyramid.orientation[:3, :3] / np.linalg.norm(pyramid.orientation[:3, :3], axis=0)
            shift = (np.asarray(pyramid.translations[self.level]) - pyramid.translations[0]) / spacing0
            m[:3, :3] = directions * np.asarray(self.spacingMm)[None, :]
            m[:3, 3] = pyramid.orientation[:3, 3] + directions @ (shift * effective0)
            return m
        origin = np.asarray(pyramid.translations[self.level]) / spacing0 * effective0
        m[:3, 3] = (-origin[0], -origin[1], origin[2])
        return m + 0.0  # no -0.0 in printed matrices

    def _index(self, zs, ys, xs):
        axes = self._pyramid.axes
        index = [0] * axes.ndim
        if axes.channel is not None:
            index[axes.channel] = self.channelIndex
        for axis, part in zip(axes.zyx, (zs, ys, xs)):
            index[axis] = part
        return tuple(index)

    def _read(self, zs, ys, xs):
        array = self._pyramid.arrays[self.level]
        try:
            return np.asarray(array[self._index(zs, ys, xs)])
        except (ValueError, RuntimeError, TypeError, KeyError, OSError) as error:
            raise UserInputError(
                f"{self.dataPath}: a chunk cannot be read ({type(error).__name__}: {error}). The chunk files do not "
                f"match the array's metadata (shape, chunks, dtype or compressor in .zarray / zarr.json): the copy is "
                f"truncated or inconsistent; re-copy or re-export the OME-Zarr.") from error

    def readRegion(self, k0, k1, j0, j1, i0, i1):
        return np.ascontiguousarray(self._read(slice(k0, k1), slice(j0, j1), slice(i0, i1)), dtype=self.dtype)

    @property
    def slabDepth(self):
        """Planes per chunk (or shard) along k: what one read of a plane decodes."""
        array = self._pyramid.arrays[self.level]
        grid = getattr(array, "shards", None) or array.chunks  # a sharded v3 array is read shard by shard
        return int(grid[self._pyramid.axes.zyx[0]])

    def _slabFits(self, depth):
        slabBytes = depth * self.nbytes // max(1, self.shape[0])
        if slabBytes <= _SLAB_BYTES:
            return True
        available = availableMemoryBytes()
        if available is not None and slabBytes <= available // 4:
            return True
        if not self._warnedSlab:
            self._warnedSlab = True
            LOG.warning("%s: a %d-plane chunk slab (%d MB) does not fit in memory: planes are read one by one and "
                        "each chunk is decoded %d times. Rechunk the file with fewer planes per chunk to read it faster.",
                        self.dataPath, depth, slabBytes >> 20, depth)
        return False

    def readAll(self, progress=None):
        """The whole level (after the memory guard), read slab by slab straight into the result."""
        from MRIHistoRegLib.progress import report

        checkMemoryFor(self.nbytes, f"the whole stack {os.path.basename(self.path)} {self.shape}")
        array = np.empty(self.shape, self.dtype)
        depth = self.slabDepth
        for start in range(0, self.shape[0], depth):
            stop = min(start + depth, self.shape[0])
            array[start:stop] = self._read(slice(start, stop), slice(None), slice(None))
            report(progress, stop / self.shape[0], f"reading planes {stop}/{self.shape[0]}")
        return array

    def _readPlaneInto(self, k, out):
        depth = self.slabDepth
        if depth == 1 or not self._slabFits(depth):
            out[...] = self._read(k, slice(None), slice(None))
            return
        with self._lock:
            start = (k // depth) * depth
            if self._slabStart != start:
                self._slab = None  # free the old slab before reading the next
                self._slab = self._read(slice(start, min(start + depth, self.shape[0])), slice(None), slice(None))
                self._slabStart = start
            out[...] = self._slab[k - start]
            if k - start == self._slab.shape[0] - 1:
                self._slab, self._slabStart = None, None  # the slab's last plane: nothing else needs it

    def close(self):
        self._slab, self._slabStart = None, None

    def describe(self):
        lines = super().describe()
        lines.insert(2, f"format: OME-NGFF {self._pyramid.version}, axes {self._pyramid.axes.names}")
        return lines


# --------------------------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------------------------
def _meanPool2(array):
    """2x mean pooling along every axis of length >= 2 (a last odd voxel is dropped, as downsampleStack drops
    a box the data do not fill)."""
    factors = tuple(2 if n >= 2 else 1 for n in array.shape)
    cut = array[tuple(slice(0, (n // f) * f) for n, f in zip(array.shape, factors))]
    shaped = cut.reshape(sum(((n // f, f) for n, f in zip(cut.shape, factors)), ()))
    return shaped.mean(axis=(1, 3, 5), dtype=np.float64).astype(array.dtype), factors


def _ngffGeometry(ijkToRas, path):
    """(spacing (x, y, z), translation (x, y, z)) in mm of a [k, j, i] volume's IJK->RAS for NGFF's LPS-like
    axes (RAS = (-x, -y, z)); NGFF 0.4 holds no rotation, so one is dropped with a warning."""
    matrix = np.asarray(ijkToRas, float)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    expected = np.diag([-1.0, -1.0, 1.0]) * spacing[None, :]
    if not np.allclose(matrix[:3, :3], expected, atol=1e-9 * max(spacing)):
        LOG.info("%s: OME-NGFF 0.4 stores no orientation: other readers see the axes i, j, k along x, y, z; "
                 "MRIHistoReg reads the directions back from the '%s' attributes", path, _OUR_KEY)
    origin = matrix[:3, 3]
    return spacing, np.array([-origin[0], -origin[1], origin[2]])


def checkOmeZarrWritable(outPath):
    """UserInputError (with the fix) when an OME-Zarr folder cannot be created at `outPath`; nothing is created."""
    outPath = os.fspath(outPath).rstrip("/\\")
    if os.path.exists(outPath):
        raise UserInputError(f"{outPath} exists: remove it or choose another output name (nothing is overwritten).")
    folder = os.path.dirname(os.path.abspath(outPath))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise UserInputError(f"Cannot write {outPath}: folder {folder} does not exist or is not writable. "
                             f"Create it or choose another output location.")


def writeOmeZarr(array, ijkToRas, outPath, name=None, minimumSize=16, maxLevels=6, chunk=64):
    """Write a [k, j, i] volume with its IJK->RAS as an OME-NGFF 0.4 image (zarr v2 store) with a 2x mean-pooled
    pyramid (levels while every axis stays >= `minimumSize`, at most `maxLevels`), units millimetres.

    Written to a temporary folder next to `outPath`, renamed when complete: an error leaves nothing. An existing
    `outPath` is refused (nothing is overwritten). Returns outPath."""
    import shutil

    zarr = _zarr()
    outPath = os.fspath(outPath).rstrip("/\\")
    checkOmeZarrWritable(outPath)
    folder = os.path.dirname(os.path.abspath(outPath))
    array = np.asarray(array)
    spacing, translation = _ngffGeometry(ijkToRas, outPath)
    temp = os.path.join(folder, f".tmp{os.getpid()}_{threading.get_ident()}_{os.path.basename(outPath)}")
    try:
        kwargs = {"zarr_format": 2} if int(zarr.__version__.split(".")[0]) >= 3 else {}
        group = zarr.open_group(temp, mode="w-", **kwargs)
        datasets, level, factor = [], array, np.ones(3)
        for n in range(maxLevels):
            _writeLevel(group, str(n), level, chunk)
            scale = spacing * factor
            shift = translation + (factor - 1) / 2.0 * spacing  # voxel centres at the centres of the boxes pooled
            datasets.append({"path": str(n), "coordinateTransformations": [
                {"type": "scale", "scale": [float(v) for v in scale[::-1]]},
                {"type": "translation", "translation": [float(v) for v in shift[::-1]]}]})
            if min(level.shape) < 2 * minimumSize:
                break
            level, factors = _meanPool2(level)
            factor = factor * np.asarray(factors[::-1], float)
        group.attrs["multiscales"] = [{
            "version": "0.4", "name": name or os.path.basename(outPath).split(".")[0],
            "axes": [{"name": a, "type": "space", "unit": "millimeter"} for a in ("z", "y", "x")],
            "datasets": datasets, "type": "mean",
            "metadata": {"method": "2x2x2 mean pooling (MRIHistoReg)"}}]
        group.attrs[_OUR_KEY] = {"ijk_to_ras": np.asarray(ijkToRas, float).tolist()}
        os.replace(temp, outPath)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return outPath


def writeVolumeNodeOmeZarr(volumeNode, outPath, **options):
    """writeOmeZarr of a scalar volume node (e.g. a resampled output on the MRI grid), geometry included."""
    from MRIHistoRegLib import volumes

    return writeOmeZarr(volumes.arrayFromVolume(volumeNode), volumes.ijkToRas(volumeNode), outPath,
                        name=volumeNode.GetName(), **options)


def _writeLevel(group, name, data, chunk):
    chunks = tuple(min(chunk, n) for n in data.shape)
    # NGFF 0.4 wants '/'-separated chunk keys (0/1/2 files in folders), what Fiji's and neuroglancer's readers expect
    if hasattr(group, "create_array"):  # zarr 3
        target = group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype,
                                    chunk_key_encoding={"name": "v2", "separator": "/"})
    else:  # zarr 2
        target = group.create_dataset(name, shape=data.shape, chunks=chunks, dtype=data.dtype, dimension_separator="/")
    target[...] = data


__all__ = ["OME_ZARR_EXTENSIONS", "OmeZarrStack", "checkOmeZarrWritable", "isOmeZarr", "writeOmeZarr",
           "writeVolumeNodeOmeZarr"]
