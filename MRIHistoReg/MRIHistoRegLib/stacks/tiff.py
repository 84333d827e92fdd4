"""TIFF stacks: a multipage TIFF (classic or BigTIFF, compressed or not) and a folder of 2-D TIFF files.

Uncompressed pages stored as one contiguous run are read with one positional read (also by several threads,
each through its own handle); compressed pages go through tifffile's decoders. OME-XML and ImageJ spacing
metadata are read.
"""
import logging
import os
import re

import numpy as np

from MRIHistoRegLib.stacks.base import StackSource, _readExactly, chooseChannel
from MRIHistoRegLib.stacks.units import unitToMillimetres
from ..errors import UserInputError

LOG = logging.getLogger(__name__)

TIFF_EXTENSIONS = (".tif", ".tiff")
# TIFF compression 1 = none; anything else goes through tifffile's decoders.
_TIFF_NO_COMPRESSION = 1


def _firstPage(tif):
    # A tifffile-version guard, not a protocol: newer tifffile has pages.first (the page already loaded),
    # older releases only pages[0].
    return tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]


class _TiffPlaneReader:
    """Reads 2-D pages of one TIFF file: uncompressed contiguous pages with one read, others with tifffile."""

    def __init__(self, path):
        from MRIHistoRegLib.deps import requirePackage

        tifffile = requirePackage("tifffile")

        self.path = path
        try:
            self.tif = tifffile.TiffFile(path)
        except Exception as error:  # tifffile raises TiffFileError, struct.error, ...
            raise UserInputError(f"{path} is not a readable TIFF file ({error}). Check the file or re-export it.") from error
        self.byteorder = self.tif.byteorder
        self.size = os.path.getsize(path)

    def pageInfo(self, page):
        """(shape, dtype) of a 2-D grayscale page; ValueError for colour/multi-sample pages."""
        # a tifffile guard, not a protocol: a page type without samplesperpixel holds one sample
        if getattr(page, "samplesperpixel", 1) != 1 or len(page.shape) != 2:
            raise UserInputError(f"{self.path}: page shape {page.shape} is not a 2-D grayscale image (colour or multi-sample "
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
            raise UserInputError(f"{self.path}: page {pageIndex} is corrupt or unreadable ({type(error).__name__}: {error}). "
                             f"Re-export the stack or remove that page.") from error
        if data.shape != shape:
            raise UserInputError(f"{self.path}: page {pageIndex} has shape {data.shape}, expected {shape}. Re-export the stack.")
        np.copyto(out, data, casting="unsafe")
        return out

    def close(self):
        self.tif.close()


class TiffStack(StackSource):
    """A multipage TIFF (classic or BigTIFF); pages are the k planes."""

    kind = "tiff"

    def __init__(self, path, spacingMm=None, channel=None):
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
            raise UserInputError(f"{path}: cannot read the TIFF page index ({error}). The file may be truncated.") from error
        if problems.messages:
            raise UserInputError(f"{path} is truncated or corrupt: {problems.messages[0]} after {count} readable pages. "
                             f"Re-copy or re-export the stack.")
        declared = _declaredPlanes(tif)
        if declared is not None and declared > count:
            raise UserInputError(f"{path} is truncated: its metadata declares {declared} planes but only {count} pages are "
                             f"readable. Re-copy or re-export the stack.")
        if count == 0:
            raise UserInputError(f"{path} has no image pages.")
        first = _firstPage(tif)
        planeShape, dtype = self._reader.pageInfo(first)
        self._pageOf, nz, self.channelNames = _channelLayout(tif, path, count)
        self.channelIndex = chooseChannel(channel, self.channelNames, path)
        self._pages = [first] + [None] * (count - 1)
        metadata, source = _tiffMetadataSpacing(tif, first)
        super().__init__(path, (nz,) + planeShape, dtype, metadataSpacingMm=metadata, metadataSpacingSource=source,
                         spacingMm=spacingMm)
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
        if self._contiguousOffset is not None and self._contiguousOffset + self.nbytes * len(self.channelNames) > self._reader.size:
            raise UserInputError(f"{path} is truncated: its {count} planes need {self.nbytes} bytes from offset "
                             f"{self._contiguousOffset} but the file has {self._reader.size} bytes. Re-copy or re-export it.")

    def _page(self, k):
        k = self._pageOf(k, self.channelIndex)
        page = self._pages[k]
        if page is None:
            with self._lock:
                try:
                    page = self._reader.tif.pages[k]
                except Exception as error:
                    raise UserInputError(f"{self.path}: page {k} is corrupt or unreadable ({error}). Re-export the stack.") from error
                if tuple(page.shape) != self.planeShape or np.dtype(page.dtype) != self.dtype:
                    raise UserInputError(f"{self.path}: page {k} has shape {page.shape} {page.dtype}, expected "
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
            return self._contiguousOffset + self._pageOf(int(k), self.channelIndex) * self.planeShape[0] * self.planeShape[1] * self.dtype.itemsize
        return self.pageOffset(k)

    @property
    def parallelReads(self):
        return True

    def openPositionalHandle(self):
        return open(self.path, "rb", buffering=0)

    def readPlaneWith(self, k, out, handle):
        """readPlane through the caller's own file handle (one per thread) for uncompressed pages."""
        if handle is None:
            return self.readPlane(k, out=out)
        page = self._page(k)
        if self._reader.fastLayout(page, out.nbytes) is not None:
            return self._reader.read(page, out, fh=handle, pageIndex=k)
        with self._lock:  # tifffile's decoders share the TiffFile
            return self._reader.read(page, out, pageIndex=k)

    def close(self):
        self._reader.close()


class TiffSeries(StackSource):
    """A folder of 2-D TIFF files, one plane each, in natural sort order; one channel of a per-channel series.

    Light-sheet software writes channels as one sub-folder each (the user points at the parent) or as one file per
    plane per channel in one folder (a `C00` / `C01` token in the name, e.g. LaVision's `..._C00_xyz-Table Z0000
    .ome.tif`): see _seriesChannels. The chosen channel's files are all checked at opening, the others by their
    plane list and first file (each is checked in full when it is opened itself)."""

    kind = "tiff-series"

    def __init__(self, folder, spacingMm=None, files=None, channel=None):
        from MRIHistoRegLib.deps import requirePackage

        tifffile = requirePackage("tifffile")

        folder = os.fspath(folder)
        channels = _seriesChannels(folder, files)
        self.channelNames = [name for name, _ in channels]
        self.channelIndex = chooseChannel(channel, self.channelNames, folder)
        files = channels[self.channelIndex][1]
        self.files = files
        reference = None
        metadata, source = None, None
        for index, name in enumerate(files):
            info, spacing = _seriesFileInfo(tifffile, name, withSpacing=index == 0)
            if index == 0:
                metadata, source = spacing
            if reference is None:
                reference = info
            elif info != reference:
                raise UserInputError(
                    f"TIFF series {folder} is inconsistent: {os.path.basename(name)} is {info[0][1]}x{info[0][0]} {info[1]} "
                    f"but {os.path.basename(files[0])} is {reference[0][1]}x{reference[0][0]} {reference[1]}. "
                    f"All slices must have the same size and type: remove or re-export the odd file.")
        for name, others in channels:
            if others is not files:
                info, _ = _seriesFileInfo(tifffile, others[0], withSpacing=False)
                if info != reference:
                    raise UserInputError(
                        f"TIFF series {folder}: channel {name}'s {others[0]} is {info[0][1]}x{info[0][0]} {info[1]} but "
                        f"channel {self.channelNames[self.channelIndex]}'s planes are {reference[0][1]}x{reference[0][0]} "
                        f"{reference[1]}. All channels must have the same plane size and type: re-export that channel.")
        super().__init__(folder, (len(files),) + reference[0], reference[1], metadataSpacingMm=metadata,
                         metadataSpacingSource=source, spacingMm=spacingMm)

    def _readPlaneInto(self, k, out):
        reader = _TiffPlaneReader(self.files[k])
        try:
            page = _firstPage(reader.tif)
            if tuple(page.shape) != self.planeShape or np.dtype(page.dtype) != self.dtype:
                raise UserInputError(f"{self.files[k]} changed since the series was opened (now {page.shape} {page.dtype}).")
            reader.read(page, out, pageIndex=0)
        finally:
            reader.close()

    @property
    def parallelReads(self):
        return True  # every plane is its own file: threads share nothing (no positional handle needed)


def _seriesFileInfo(tifffile, name, withSpacing):
    """((plane shape, dtype), (metadata spacing, source)) of one file of a series; the spacing only when asked."""
    spacing = (None, None)
    try:
        with tifffile.TiffFile(name) as tif:
            page = _firstPage(tif)
            if len(tif.pages) != 1:
                raise UserInputError(f"{name} has {len(tif.pages)} pages; a TIFF series needs one 2-D image per file. "
                                     f"Open a multipage TIFF as a file, not as a folder.")
            if getattr(page, "samplesperpixel", 1) != 1 or len(page.shape) != 2:
                raise UserInputError(f"{name} is not a 2-D grayscale image (shape {page.shape}).")
            info = (tuple(page.shape), np.dtype(page.dtype))
            if withSpacing:
                spacing = _tiffMetadataSpacing(tif, page, planar=True)
    except ValueError:
        raise
    except Exception as error:
        raise UserInputError(f"{name} is not a readable TIFF file ({error}). Remove it from the folder or re-export it.") from error
    return info, spacing


# A channel token as light-sheet software writes it: LaVision/Miltenyi UltraMicroscope and Blaze '..._C00_xyz-Table
# Z0000.ome.tif', Fiji's Split Channels 'C1-name': a C and digits, not inside a word. The plane token: 'Z0000'.
_CHANNEL_TOKEN = re.compile(r"(?<![A-Za-z0-9])C(\d+)(?![A-Za-z])")
_PLANE_TOKEN = re.compile(r"(?<![A-Za-z0-9])[Zz](\d+)(?![A-Za-z])")
_TILE_TOKEN = re.compile(r"\[\s*(\d+)\s*x\s*(\d+)\s*\]")


def _tiffFiles(folder):
    return sorted((os.path.join(folder, name) for name in os.listdir(folder)
                   if name.lower().endswith(TIFF_EXTENSIONS) and not name.startswith(".")
                   and os.path.isfile(os.path.join(folder, name))), key=naturalSortKey)


def _seriesChannels(folder, files=None):
    """[(channel name, its files in plane order)] of a TIFF series folder: the folder's own TIFFs (split by their
    C token when they carry several), else one channel per sub-folder holding TIFFs (named after it). Every
    channel must have the same planes: a missing plane is an error naming it and the file the others have."""
    if files is None:
        files = _tiffFiles(folder)
    files = sorted((os.fspath(f) for f in files), key=naturalSortKey)
    if files:
        channels = _splitByChannelToken(folder, files)
    else:
        subfolders = sorted((os.path.join(folder, n) for n in os.listdir(folder)
                             if not n.startswith(".") and os.path.isdir(os.path.join(folder, n))), key=naturalSortKey)
        channels = [(os.path.basename(sub), _tiffFiles(sub)) for sub in subfolders]
        channels = [(name, names) for name, names in channels if names]
        if not channels:
            raise UserInputError(f"{folder} holds no .tif/.tiff files (nor sub-folders of them, one per channel). "
                                 f"Point to a TIFF file, a folder of TIFF slices or a NRRD.")
        if len(channels) > 1:
            LOG.info("%s: one channel per sub-folder: %s", folder, ", ".join(name for name, _ in channels))
    _checkSamePlanes(folder, channels)
    return channels


def _splitByChannelToken(folder, files):
    tiles = {m.groups() for m in (_TILE_TOKEN.search(os.path.basename(f)) for f in files) if m}
    if len(tiles) > 1:
        raise UserInputError(f"{folder} holds {len(tiles)} mosaic tiles ([{' x '.join(sorted(tiles)[0])}], "
                             f"[{' x '.join(sorted(tiles)[1])}], ...): stitch them first (e.g. Fiji's Grid/Collection "
                             f"stitching or BigStitcher) and open the stitched stack.")
    tokens = [_CHANNEL_TOKEN.findall(os.path.basename(f)) for f in files]
    values = {t[-1] for t in tokens if t}
    if len(values) <= 1:
        name = f"C{values.pop()}" if values and all(tokens) else "C0"
        return [(name, files)]
    untagged = [f for f, t in zip(files, tokens) if not t]
    if untagged:
        raise UserInputError(f"{folder}: {os.path.basename(untagged[0])} has no channel token (C00, C01, ...) but "
                             f"other files do ({len(values)} channels). Move the odd file out of the folder.")
    byValue = {}
    for f, t in zip(files, tokens):
        byValue.setdefault(t[-1], []).append(f)
    order = sorted(byValue, key=int)
    LOG.info("%s: %d channels by file name: %s", folder, len(order), ", ".join(f"C{v}" for v in order))
    return [(f"C{v}", byValue[v]) for v in order]


def _planeNumbers(names):
    """The Z token of each file name, or None when some name has none or all share one (then it is part of the
    series' name, e.g. 'run_Z1_0001.tif', not a plane number)."""
    numbers = []
    for name in names:
        found = _PLANE_TOKEN.findall(os.path.basename(name))
        if not found:
            return None
        numbers.append(int(found[-1]))
    return None if len(names) > 1 and len(set(numbers)) == 1 else numbers


def _checkSamePlanes(folder, channels):
    """Every channel has the same planes (by Z token where all names have one, else by count); no Z repeats."""
    numbered = []
    for name, names in channels:
        numbers = _planeNumbers(names)
        if numbers is not None and len(set(numbers)) != len(numbers):
            repeated = sorted(n for n in set(numbers) if numbers.count(n) > 1)[0]
            clash = [os.path.basename(f) for f, n in zip(names, numbers) if n == repeated]
            raise UserInputError(f"{folder}: channel {name} has plane Z{repeated} twice ({clash[0]}, {clash[1]}). "
                                 f"Remove the duplicate (or the other tile) from the folder.")
        numbered.append(numbers)
    if len(channels) < 2:
        return
    if all(n is not None for n in numbered):
        union = set().union(*map(set, numbered))
        for (name, names), numbers in zip(channels, numbered):
            missing = sorted(union - set(numbers))
            if missing:
                z = missing[0]
                other = next((f for (_, fs), ns in zip(channels, numbered) for f, n in zip(fs, ns) if n == z))
                raise UserInputError(f"{folder}: channel {name} has no plane Z{z} (there is {other} in another "
                                     f"channel); {len(missing)} plane(s) missing in {name}. Re-export that channel "
                                     f"or remove the extra planes, so every channel has the same planes.")
        return
    counts = [len(names) for _, names in channels]
    if len(set(counts)) > 1:
        reference = max(counts)
        name, names = next(c for c in channels if len(c[1]) != reference)
        raise UserInputError(f"{folder}: channel {name} has {len(names)} planes but others have {reference} (its last "
                             f"file is {names[-1]}). Every channel needs the same planes: re-export the channel or "
                             f"remove the extra files.")


def _channelLayout(tif, path, count):
    """(page index of (z, c), number of z planes, channel names) of a TIFF, from tifffile's series axes: OME
    CZYX has page c*nz + z, ImageJ ZCYX z*nc + c. Several time points (or samples) are refused."""
    try:
        series = tif.series[0]
        axes, shape = str(series.axes), tuple(int(n) for n in series.shape)
    except Exception:
        axes, shape = "", ()
    outer = [(axis, size) for axis, size in zip(axes, shape) if axis not in "YX"]
    extra = [f"{axis}={size}" for axis, size in outer if axis not in "CZQI" and size > 1]
    if extra:
        raise UserInputError(f"{path} holds a {axes} {shape} image with {', '.join(extra)}: several time points (or "
                             f"samples) are not supported. Export one time point (e.g. in Fiji: Image > Duplicate, "
                             f"one frame) and open that.")
    nc = dict(outer).get("C", 1)
    if nc <= 1 or int(np.prod([size for _, size in outer])) != count:
        return (lambda k, c: k), count, ["C0"]
    nz = count // nc
    cFirst = [axis for axis, size in outer if size > 1 or axis == "C"][0] == "C"
    names = _channelNames(tif, nc)
    if cFirst:
        return (lambda k, c: c * nz + k), nz, names
    return (lambda k, c: k * nc + c), nz, names


def _channelNames(tif, nc):
    """Channel names from OME Channel Name or ImageJ Labels, else C0, C1, ..."""
    names = [None] * nc
    try:
        ome = tif.ome_metadata
        if ome:
            import xml.etree.ElementTree as ET

            found = [e.get("Name") for e in ET.fromstring(ome).iter() if e.tag.split("}")[-1] == "Channel"]
            if len(found) == nc:
                names = found
        ij = tif.imagej_metadata
        labels = (ij or {}).get("Labels")
        if labels and all(n is None for n in names) and len(labels) >= nc:
            names = list(labels[:nc])
    except Exception:
        pass
    names = [str(n) if n else f"C{i}" for i, n in enumerate(names)]
    return names if len(set(names)) == nc else [f"C{i}" for i in range(nc)]


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
                raise UserInputError(f"non-positive PhysicalSize {values}")
            return (sx, sy, sz)
    return None
