"""BigDataViewer / BigStitcher HDF5 + XML: one channel (ViewSetup) of one time point, with its resolution pyramid.

The XML (SpimData) says what the .h5 holds: SequenceDescription/ImageLoader format="bdv.hdf5" with the .h5's
path (relative to BasePath, itself relative to the XML's folder); ViewSetups (id, size x y z, voxelSize unit and
size, attributes channel / tile / angle / illumination ids, and the Attributes lists naming them); Timepoints;
ViewRegistrations (per time point and setup, a list of 3 x 4 row-major affines, the first listed applied last:
the model is T0 T1 ... Tn, mapping level-0 voxel indices x, y, z to world coordinates).
The .h5: s<setup:02d>/resolutions (levels x 3, the x y z downsampling factors), s<setup:02d>/subdivisions (the
x y z chunk shape per level) and t<time:05d>/s<setup:02d>/<level>/cells, (z, y, x); BigDataViewer stores 16-bit
voxels as int16 and reads them as unsigned, so int16 cells are read as uint16.

Several setups are channels; several tiles, angles or illuminations (something to fuse first) and several time
points are refused with what to do. Geometry: BigStitcher's world unit is often one x voxel rather than a micron
(a calibration affine diag(1, 1, 3.08) for 0.65 x 0.65 x 2 um), so the world's length unit is fixed by the
voxelSize along i (mm per world unit = voxelSize_i / |affine column i|); the whole affine (rotation, scaling,
translation) is the IJK -> RAS, with the file's x, y, z as L, P, S like a TIFF stack. A shear (non-orthogonal
columns, e.g. after an affine refinement) has no place in a volume's geometry: it is refused unless the user
gives the spacing, which then replaces the registration's (axis-aligned, origin from its translation).
A level's voxel sits at the centre of the level-0 block it covers (BigDataViewer's mipmap transform).
"""
import logging
import os
import re
import xml.etree.ElementTree as ET

import numpy as np

from MRIHistoRegLib.stacks.base import _validSpacing, chooseChannel
from MRIHistoRegLib.stacks.hdf5 import Hdf5Level, checkFilters, describeLevels, flipToRas, openHdf5, requireDataset
from MRIHistoRegLib.stacks.units import unitToMillimetres
from ..errors import UserInputError

LOG = logging.getLogger(__name__)

BDV_EXTENSIONS = (".xml", ".h5", ".hdf5")
_REEXPORT = "Re-copy the files, or save the dataset again (Fiji: Plugins > BigDataViewer > Export Current Image as XML/HDF5)."


def _text(element, path, default=None):
    found = element.find(path) if element is not None else None
    return found.text.strip() if found is not None and found.text is not None else default


def _integerPattern(text):
    """Time point ids of a SpimData integer pattern: '0', '0, 2, 5', '0-9', '0-9:2'."""
    ids = []
    for part in re.split(r"[,\s]+", text.strip()):
        match = re.fullmatch(r"(-?\d+)(?:-(-?\d+)(?::(\d+))?)?", part)
        if not part or not match:
            continue
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        ids.extend(range(first, last + 1, int(match.group(3) or 1)))
    return ids


def _timepoints(sequence, path):
    element = sequence.find("Timepoints")
    if element is None:
        return [0]
    kind = element.get("type", "range")
    if kind == "range":
        first, last = int(_text(element, "first", "0")), int(_text(element, "last", "0"))
        return list(range(first, last + 1))
    return _integerPattern(_text(element, "integerpattern", "0"))


def _attributeNames(setups, attribute):
    """{id: name} of one Attributes list (channel, tile, ...)."""
    names = {}
    for block in setups.findall("Attributes"):
        if block.get("name") == attribute:
            for entry in block:
                key = _text(entry, "id")
                if key is not None:
                    names[int(key)] = _text(entry, "name", key)
    return names


def _setups(sequence, path):
    """[(setup id, {attribute: id}, name, size (x, y, z) or None, (unit, voxel size) or None)], sorted by id."""
    setups = sequence.find("ViewSetups")
    if setups is None or not setups.findall("ViewSetup"):
        raise UserInputError(f"{path}: the XML lists no ViewSetup. {_REEXPORT}")
    found = []
    for setup in setups.findall("ViewSetup"):
        attributes = {}
        for child in setup.find("attributes") if setup.find("attributes") is not None else []:
            if child.text is not None and child.text.strip().lstrip("-").isdigit():
                attributes[child.tag] = int(child.text)
        size = _text(setup, "size")
        voxel = setup.find("voxelSize")
        voxelSize = None
        if voxel is not None and _text(voxel, "size"):
            voxelSize = (_text(voxel, "unit", "um"), [float(v) for v in _text(voxel, "size").split()])
        found.append((int(_text(setup, "id")), attributes, _text(setup, "name"),
                      tuple(int(v) for v in size.split()) if size else None, voxelSize))
    return sorted(found), setups


def _refuseViews(setups, path):
    """The setups must differ only by channel: anything else is a multi-view dataset to fuse first."""
    for attribute in ("tile", "angle", "illumination"):
        ids = sorted({a.get(attribute) for _, a, _, _, _ in setups if attribute in a})
        if len(ids) > 1:
            raise UserInputError(f"{path} holds {len(setups)} views with {len(ids)} {attribute}s ({ids}); a stack must "
                                 f"be one volume per channel. Fuse the views first (BigStitcher: Fuse, saving as TIFF "
                                 f"or as a new XML/HDF5) and open the fused result.")
    channels = [a.get("channel", s) for s, a, _, _, _ in setups]
    if len(set(channels)) != len(channels):
        raise UserInputError(f"{path}: several setups share a channel; fuse the views first (BigStitcher: Fuse).")


def _affine(root, timepoint, setup, path):
    """(4 x 4 model of the ViewRegistration of (timepoint, setup): T0 T1 ... Tn, whether there was one); identity
    when absent."""
    model = np.eye(4)
    registrations = root.find("ViewRegistrations")
    for registration in registrations.findall("ViewRegistration") if registrations is not None else []:
        if int(registration.get("timepoint", -1)) == timepoint and int(registration.get("setup", -1)) == setup:
            transforms = registration.findall("ViewTransform")
            for transform in transforms:
                values = (_text(transform, "affine") or "").split()
                if len(values) != 12:
                    raise UserInputError(f"{path}: a ViewTransform of setup {setup} has {len(values)} affine values, "
                                         f"not 12 (3 x 4, row by row). {_REEXPORT}")
                t = np.eye(4)
                t[:3, :] = np.asarray(values, dtype=float).reshape(3, 4)
                model = model @ t
            return model, bool(transforms)
    return model, False


def findXml(h5Path):
    """The SpimData XML describing `h5Path`: <name>.xml next to it, else any XML in its folder whose ImageLoader
    names it."""
    folder, name = os.path.split(os.path.abspath(h5Path))
    stem = os.path.splitext(name)[0]
    candidates = [os.path.join(folder, stem + ".xml")]
    candidates += sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(".xml"))
    for candidate in candidates:
        if not os.path.isfile(candidate):
            continue
        try:
            root = ET.parse(candidate).getroot()
        except ET.ParseError:
            continue
        if root.tag == "SpimData" and _h5Path(root, candidate) == os.path.abspath(h5Path):
            return candidate
    raise UserInputError(f"{h5Path}: no BigDataViewer XML next to it describes it (the voxel size, channels and "
                         f"registration live in the XML). Open the .xml that BigDataViewer / BigStitcher saved with it.")


def _h5Path(root, xmlPath):
    base = root.find("BasePath")
    folder = os.path.dirname(os.path.abspath(xmlPath))
    if base is not None and base.text and base.text.strip():
        folder = os.path.join(folder, base.text.strip()) if base.get("type", "relative") == "relative" else base.text.strip()
    loader = root.find("SequenceDescription/ImageLoader")
    if loader is None:
        return None
    element = loader.find("hdf5")
    if element is None or not (element.text or "").strip():
        return None
    file = element.text.strip()
    return os.path.abspath(file if element.get("type") == "absolute" or os.path.isabs(file) else os.path.join(folder, file))


def _parseXml(xmlPath):
    try:
        root = ET.parse(xmlPath).getroot()
    except (ET.ParseError, OSError) as error:
        raise UserInputError(f"{xmlPath} is not a readable XML file ({error}). {_REEXPORT}") from error
    if root.tag != "SpimData":
        raise UserInputError(f"{xmlPath} is not a BigDataViewer / BigStitcher dataset (its root is <{root.tag}>, not "
                             f"<SpimData>). Give the dataset's .xml.")
    loader = root.find("SequenceDescription/ImageLoader")
    fmt = loader.get("format") if loader is not None else None
    if fmt != "bdv.hdf5":
        raise UserInputError(f"{xmlPath}: the image loader is {fmt!r}; only BigDataViewer HDF5 (format=\"bdv.hdf5\") is "
                             f"read. Re-save the dataset as XML/HDF5 (BigStitcher: Resave as HDF5), or export TIFF.")
    return root


class BdvStack(Hdf5Level):
    """Level 0 of one channel (ViewSetup) of a BigDataViewer XML/HDF5 dataset; `levels` are its resolutions."""

    kind = "bdv"

    def __init__(self, path, spacingMm=None, channel=None):
        path = os.fspath(path)
        xmlPath = path if path.lower().endswith(".xml") else findXml(path)
        root = _parseXml(xmlPath)
        self.xmlPath = xmlPath
        self.h5Path = _h5Path(root, xmlPath)
        if self.h5Path is None or not os.path.isfile(self.h5Path):
            raise UserInputError(f"{xmlPath} points to the HDF5 file {self.h5Path}, which does not exist. Keep the .xml "
                                 f"next to its .h5 (or fix the <hdf5> path in the XML).")
        sequence = root.find("SequenceDescription")
        times = _timepoints(sequence, xmlPath)
        if len(times) != 1:
            raise UserInputError(f"{xmlPath} holds {len(times)} time points ({times[:5]}...); a stack must be one. "
                                 f"Save one time point as its own dataset (BigStitcher: select it, Resave as HDF5) or "
                                 f"export it as TIFF.")
        setups, setupsElement = _setups(sequence, xmlPath)
        _refuseViews(setups, xmlPath)
        channelNames = _attributeNames(setupsElement, "channel")
        names = [channelNames.get(a.get("channel"), name or str(s)) for s, a, name, _, _ in setups]
        index = chooseChannel(channel, names, xmlPath)
        setupId, _, _, size, voxelSize = setups[index]
        self.setupId, self.timepoint = setupId, times[0]
        user = _validSpacing(spacingMm) if spacingMm is not None else None
        matrix, source = _geometry(root, self.timepoint, setupId, voxelSize, user, xmlPath)
        specs, dtype = self._pyramid(size)
        super().__init__(self.h5Path, specs[0][0], specs[0][1], dtype, matrix, names, index, self.kind,
                         spacingSource=source)
        self._specs = specs[1:]
        self.userSpacingMm = user

    def _pyramid(self, size):
        """([(dataset, shape (k, j, i), factors (i, j, k)) per level], dtype) from the .h5, checked against the XML."""
        h5 = openHdf5(self.h5Path, "BigDataViewer HDF5")
        try:
            group = f"s{self.setupId:02d}"
            fix = f"The file is incomplete or not the one the XML describes: {_REEXPORT}"
            resolutions = np.asarray(requireDataset(h5, f"{group}/resolutions", self.h5Path, fix)[()], dtype=float)
            subdivisions = np.asarray(requireDataset(h5, f"{group}/subdivisions", self.h5Path, fix)[()], dtype=int)
            if resolutions.ndim == 1 and resolutions.size == 3:  # one level written as a plain triple
                resolutions, subdivisions = resolutions.reshape(1, 3), subdivisions.reshape(-1, 3)
            if resolutions.ndim != 2 or resolutions.shape[1] != 3 or len(resolutions) < 1:
                raise UserInputError(f"{self.h5Path}: {group}/resolutions has shape {resolutions.shape}, not (levels, 3). {fix}")
            specs, dtype = [], None
            for r, factors in enumerate(resolutions):
                name = f"t{self.timepoint:05d}/{group}/{r}/cells"
                cells = requireDataset(h5, name, self.h5Path, f"Resolution level {r} is missing. {fix}")
                checkFilters(cells, self.h5Path)
                shape = tuple(int(n) for n in cells.shape)
                self._checkLevel(r, name, shape, cells.chunks, size, factors, subdivisions)
                stored = np.dtype(cells.dtype)
                if r == 0:
                    dtype = np.dtype(np.uint16) if (stored.kind, stored.itemsize) == ("i", 2) else stored  # BDV: unsigned
                elif stored.itemsize != dtype.itemsize or stored.kind not in "uif":
                    raise UserInputError(f"{self.h5Path}: level {r} holds {stored} voxels, level 0 {dtype}. {fix}")
                specs.append((name, shape, tuple(float(f) for f in factors)))
        finally:
            h5.close()
        return specs, dtype

    def _checkLevel(self, r, name, shape, chunks, size, factors, subdivisions):
        fix = f"The file is inconsistent: {_REEXPORT}"
        if len(shape) != 3:
            raise UserInputError(f"{self.h5Path}: {name} has shape {shape}, not 3-D (z, y, x). {fix}")
        if r == 0 and size is not None and shape != tuple(size[::-1]):
            raise UserInputError(f"{self.h5Path}: {name} has shape {shape} (z, y, x) but the XML's ViewSetup size is "
                                 f"{tuple(size)} (x, y, z). {fix}")
        if r > 0:
            base = np.asarray(self._level0Shape[::-1], dtype=float)
            expected = [(max(1, int(np.floor(n / f))), max(1, int(np.ceil(n / f)))) for n, f in zip(base, factors)]
            if any(not lo <= n <= hi for n, (lo, hi) in zip(shape[::-1], expected)):
                raise UserInputError(f"{self.h5Path}: {name} has shape {shape} (z, y, x), which does not fit level 0 "
                                     f"{self._level0Shape} downsampled by {tuple(factors)} (x, y, z). {fix}")
        else:
            self._level0Shape = shape
        if chunks is not None and r < len(subdivisions):
            stated = tuple(int(v) for v in subdivisions[r][::-1])
            if tuple(chunks) != tuple(min(c, n) for c, n in zip(stated, shape)) and tuple(chunks) != stated:
                raise UserInputError(f"{self.h5Path}: {name} is stored in chunks {tuple(chunks)} (z, y, x) but "
                                     f"subdivisions say {stated}. {fix}")

    def describe(self):
        return super().describe() + [f"XML: {self.xmlPath} (setup {self.setupId}, time point {self.timepoint})"] + \
            describeLevels(self.levels)


def _geometry(root, timepoint, setup, voxelSize, user, path):
    """(IJK -> RAS, spacing source or None) of level 0 from the registration and the voxel size."""
    model, registered = _affine(root, timepoint, setup, path)
    if voxelSize is not None and not registered:  # no registration: the voxel size, axis-aligned
        model = np.diag(list(voxelSize[1]) + [1.0])
    if voxelSize is not None:
        unit, sizes = voxelSize
        mmPerWorld = unitToMillimetres(unit) * sizes[0] / np.linalg.norm(model[:3, 0])
    else:
        LOG.warning("%s: setup %d has no voxelSize: taking the registration's unit as micrometres (give the "
                    "spacing with --spacing if that is wrong)", path, setup)
        mmPerWorld = 1e-3
    m = np.eye(4)
    m[:3, :] = model[:3, :] * mmPerWorld
    columns = m[:3, :3]
    norms = np.linalg.norm(columns, axis=0)
    gram = (columns / norms).T @ (columns / norms)
    if np.max(np.abs(gram - np.eye(3))) > 1e-6:
        if user is None:
            raise UserInputError(f"{path}: the registration of setup {setup} shears the voxels (affine "
                                 f"{np.round(model[:3], 6).tolist()}), which a volume cannot represent. Give the voxel "
                                 f"size with --spacing X Y Z (um) to ignore the registration, or fuse the dataset first "
                                 f"(BigStitcher: Fuse).")
        m[:3, :3] = np.diag(user)
    if voxelSize is not None:
        stated = np.asarray(voxelSize[1], dtype=float) * unitToMillimetres(voxelSize[0])
        if np.max(np.abs(norms / stated - 1.0)) > 0.01:
            LOG.warning("%s: the registration scales setup %d's voxels to %s mm, not the voxelSize %s mm: using the "
                        "registration's", path, setup, np.round(norms, 6).tolist(), stated.tolist())
    source = None  # neither: the placeholder geometry is not metadata
    if registered:
        source = "BigDataViewer XML registration" + (" (voxelSize unit)" if voxelSize is not None else " (um assumed)")
    elif voxelSize is not None:
        source = "BigDataViewer XML voxelSize"
    return flipToRas(m), source
