"""Imaris .ims (Imaris 5.5 file format, HDF5): one channel of one time point, with its resolution pyramid.

Layout read (Bitplane's format description): /DataSet/ResolutionLevel r/TimePoint t/Channel c/Data, a (z, y, x)
chunked dataset padded beyond the image up to whole chunks; /DataSetInfo/Image attributes X, Y, Z (the true
size of level 0), ExtMin0-2 / ExtMax0-2 (the physical box, outer faces of the voxels) and Unit;
/DataSetInfo/Channel c attribute Name. Imaris writes every attribute as an array of one-character strings
('5', '1', '2' for 512): they are joined before being parsed.

Levels: ResolutionLevel 0, 1, ... of the chosen channel. A coarser level's true size is the ImageSizeX/Y/Z
attributes of its Channel group (Imaris writes them); without them, the halving rule of Imaris's writers is
applied to the previous level (an axis is halved, rounding up, unless it is already much thinner than the other
two: (10 n)^2 <= the product of the other two sizes). Every level spans the same physical box, so a level's
voxel size is the extent over its size. The file's x, y, z map to RAS as a TIFF stack's do (stacks/hdf5.py).
"""
import logging
import os
import re

import numpy as np

from MRIHistoRegLib.stacks.base import _validSpacing, chooseChannel
from MRIHistoRegLib.stacks.hdf5 import Hdf5Level, checkFilters, describeLevels, flipToRas, openHdf5
from MRIHistoRegLib.stacks.units import unitToMillimetres
from ..errors import UserInputError

LOG = logging.getLogger(__name__)

IMARIS_EXTENSIONS = (".ims",)
_RECONVERT = "Re-copy the file, or convert the original again with Imaris File Converter."


def imarisText(value):
    """An Imaris attribute as text: an array of one-character byte strings joined, bytes decoded."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "S":
            value = b"".join(value.ravel().tolist())
        elif value.dtype.kind == "U":
            value = "".join(value.ravel().tolist())
        else:
            return " ".join(str(v) for v in value.ravel().tolist())
    if isinstance(value, (bytes, np.bytes_)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            value = bytes(value).decode("latin-1")  # Imaris's own "µm" is one latin-1 byte
    return str(value).strip().rstrip("\x00")


def _number(attrs, name, path, where, kind=float, required=True):
    text = imarisText(attrs.get(name))
    if text is None or text == "":
        if required:
            raise UserInputError(f"{path}: {where} has no attribute {name}. The file is not a complete Imaris file: "
                                 f"{_RECONVERT}")
        return None
    try:
        return kind(float(text)) if kind is int else kind(text)
    except ValueError as error:
        raise UserInputError(f"{path}: {where} attribute {name} = {text!r} is not a number. {_RECONVERT}") from error


def _numbered(group, prefix):
    """{index: name} of the members named '<prefix> <index>'."""
    found = {}
    for name in group.keys():
        match = re.fullmatch(re.escape(prefix) + r" (\d+)", name)
        if match:
            found[int(match.group(1))] = name
    return found


def _contiguous(found, what, path):
    count = len(found)
    if sorted(found) != list(range(count)):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise UserInputError(f"{path}: {what} {missing[0]} is missing (the file has {sorted(found)}). The file is "
                             f"incomplete: {_RECONVERT}")
    return count


def _halved(size):
    """The next level's (x, y, z) size by the writers' halving rule."""
    x, y, z = size
    out = []
    for n, a, b in ((x, y, z), (y, x, z), (z, x, y)):
        out.append(-(-n // 2) if (10 * n) ** 2 > a * b else n)
    return tuple(out)


def _imageInfo(h5, path):
    """(size (x, y, z), extent min (x, y, z) in mm or None, extent max or None, unit text) from DataSetInfo/Image."""
    try:
        image = h5["DataSetInfo/Image"]
    except KeyError as error:
        raise UserInputError(f"{path} has no /DataSetInfo/Image group: it is not an Imaris 5.5 file (or it is "
                             f"incomplete). {_RECONVERT}") from error
    where = "/DataSetInfo/Image"
    size = tuple(_number(image.attrs, axis, path, where, int) for axis in "XYZ")
    unit = imarisText(image.attrs.get("Unit")) or "um"
    lo = [_number(image.attrs, f"ExtMin{a}", path, where, required=False) for a in range(3)]
    hi = [_number(image.attrs, f"ExtMax{a}", path, where, required=False) for a in range(3)]
    if None in lo or None in hi:
        return size, None, None, unit
    try:
        factor = unitToMillimetres(unit)
    except UserInputError:
        LOG.warning("%s: unknown length unit %r in /DataSetInfo/Image: the voxel size is unknown", path, unit)
        return size, None, None, unit
    return size, np.asarray(lo) * factor, np.asarray(hi) * factor, unit


class ImarisStack(Hdf5Level):
    """Level 0 of one channel of an Imaris .ims file (time point 0, the only one allowed); `levels` are its
    resolution levels."""

    kind = "imaris"

    def __init__(self, path, spacingMm=None, channel=None):
        path = os.fspath(path)
        h5 = openHdf5(path, "an Imaris .ims file")
        try:
            size, lo, hi, self.unit = _imageInfo(h5, path)
            names, channelIndex, specs = self._layout(h5, path, channel, size)
            dtype = specs[0][3]
        finally:
            h5.close()
        matrix, spacingSource = self._geometry(path, size, lo, hi)
        super().__init__(path, specs[0][0], specs[0][1], dtype, matrix, names, channelIndex, self.kind,
                         spacingSource=spacingSource)
        self._specs = [(name, shape, tuple(s0 / n for s0, n in zip(size, level))) for name, shape, level, _ in specs[1:]]
        if spacingMm is not None:
            self.userSpacingMm = _validSpacing(spacingMm)

    @staticmethod
    def _geometry(path, size, lo, hi):
        if lo is None or np.any(hi - lo <= 0):
            LOG.warning(
                "%s: /DataSetInfo/Image has no usable ExtMin/ExtMax (%s .. %s): the voxel size is unknown; give it "
                "with --spacing", path, lo, hi)
            return flipToRas(np.eye(4)), None
        spacing = (hi - lo) / np.asarray(size, dtype=float)
        m = np.eye(4)
        m[:3, :3] = np.diag(spacing)
        m[:3, 3] = lo + spacing / 2.0  # ExtMin is the outer face of voxel 0
        return flipToRas(m), "Imaris DataSetInfo/Image extents"

    def _layout(self, h5, path, channel, size):
        """(channel names, chosen index, [(dataset name, shape (k, j, i), size (x, y, z), dtype) per level])."""
        try:
            dataset = h5["DataSet"]
        except KeyError as error:
            raise UserInputError(f"{path} has no /DataSet group: it holds no image. {_RECONVERT}") from error
        levelNames = _numbered(dataset, "ResolutionLevel")
        if not levelNames:
            raise UserInputError(f"{path}: /DataSet holds no 'ResolutionLevel 0' group. {_RECONVERT}")
        nLevels = _contiguous(levelNames, "ResolutionLevel", path)
        level0 = dataset[levelNames[0]]
        times = _numbered(level0, "TimePoint")
        if len(times) > 1:
            raise UserInputError(f"{path} holds {len(times)} time points; a stack must be one. Save one time point "
                                 f"as its own .ims (in Imaris: Edit > Crop Time, then File > Save as), or export it "
                                 f"as TIFF.")
        if 0 not in times:
            raise UserInputError(f"{path}: /DataSet/ResolutionLevel 0 has no 'TimePoint 0'. {_RECONVERT}")
        channels = _numbered(level0[times[0]], "Channel")
        if not channels:
            raise UserInputError(f"{path}: /DataSet/ResolutionLevel 0/TimePoint 0 holds no channel. {_RECONVERT}")
        nChannels = _contiguous(channels, "Channel", path)
        names = [self._channelName(h5, c) for c in range(nChannels)]
        index = chooseChannel(channel, names, path)
        specs, previous = [], None
        for r in range(nLevels):
            spec = self._level(h5, path, r, index, size if r == 0 else None, previous)
            specs.append(spec)
            previous = spec[2]
        return names, index, specs

    @staticmethod
    def _channelName(h5, c):
        try:
            name = imarisText(h5[f"DataSetInfo/Channel {c}"].attrs.get("Name"))
        except KeyError:
            name = None
        return name if name else f"C{c}"

    @staticmethod
    def _level(h5, path, r, c, size0, previous):
        where = f"/DataSet/ResolutionLevel {r}/TimePoint 0/Channel {c}"
        try:
            group = h5[where]
            data = group["Data"]
        except KeyError as error:
            raise UserInputError(f"{path}: {where}/Data is missing (resolution level {r} of channel {c}). The file is "
                                 f"incomplete: {_RECONVERT}") from error
        stated = [_number(group.attrs, f"ImageSize{a}", path, where, int, required=False) for a in "XYZ"]
        if None not in stated:
            size = tuple(stated)
            if size0 is not None and size != tuple(size0):
                raise UserInputError(f"{path}: {where} says its size is {size} (x, y, z) but /DataSetInfo/Image says "
                                     f"{tuple(size0)}. The file is inconsistent: {_RECONVERT}")
        else:
            size = tuple(size0) if size0 is not None else _halved(previous)
        if len(data.shape) != 3 or any(n > s for n, s in zip(size[::-1], data.shape)) or min(size) < 1:
            raise UserInputError(f"{path}: {where}/Data has shape {tuple(data.shape)} (z, y, x), which cannot hold the "
                                 f"image size {size} (x, y, z) the attributes give. The file is inconsistent: "
                                 f"{_RECONVERT}")
        checkFilters(data, path)
        if data.dtype.kind not in "uif":
            raise UserInputError(f"{path}: {where}/Data holds {data.dtype} voxels, not scalars. Export it as TIFF.")
        return f"{where}/Data", size[::-1], size, np.dtype(data.dtype)

    def describe(self):
        return super().describe() + describeLevels(self.levels)
