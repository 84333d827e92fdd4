"""Spacing correction: units, a plausibility check against a reference size, and geometry-only edits.

Spacing tuples are (i, j, k) in millimetres. Correcting a spacing changes the IJK->RAS matrix only (origin and
directions kept), never the voxels; on disk, a NRRD gets a header-only rewrite (the data file is referenced, not
copied, and the original is never overwritten unless asked).
"""
import logging
import math
import os
from collections import namedtuple

import numpy as np

from MRIHistoRegLib.outputs import silentRemove

LOG = logging.getLogger(__name__)

_UNITS_MM = {
    "mm": 1.0, "millimetre": 1.0, "millimeter": 1.0, "millimetres": 1.0, "millimeters": 1.0,
    "um": 1e-3, "µm": 1e-3, "μm": 1e-3, "micron": 1e-3, "microns": 1e-3, "micrometre": 1e-3, "micrometer": 1e-3,
    "micrometres": 1e-3, "micrometers": 1e-3, "\\u00b5m": 1e-3,
    "nm": 1e-6, "nanometer": 1e-6, "nanometre": 1e-6,
    "cm": 10.0, "centimeter": 10.0, "centimetre": 10.0,
    "m": 1000.0, "meter": 1000.0, "metre": 1000.0,
    "inch": 25.4, "in": 25.4,
}

PlausibilityVerdict = namedtuple("PlausibilityVerdict", "ok message extentMm ratio")

# Above this ratio (either way) between the stack's physical size and the reference's, warn.
PLAUSIBILITY_FACTOR = 5.0


def unitToMillimetres(unit):
    """Millimetres per `unit` ('um', 'µm', 'micron', 'mm', 'nm', 'cm', 'm', ...); ValueError for unknown units."""
    key = str(unit).strip().lower() if unit is not None else ""
    if key in _UNITS_MM:
        return _UNITS_MM[key]
    raise ValueError(f"Unknown spacing unit {unit!r}: use 'um' (micrometres) or 'mm' (millimetres).")


def toMillimetres(values, unit):
    """Spacing value(s) in `unit` ('um'|'µm'|'mm', ...) as a tuple of mm (one value in, one value out as a tuple).

    Zero, negative, NaN or infinite values are refused with a ValueError saying what to give instead."""
    factor = unitToMillimetres(unit)
    array = np.atleast_1d(np.asarray(values, dtype=float)) if not isinstance(values, str) else None
    if array is None:
        raise ValueError(f"Spacing must be numbers, got {values!r}.")
    if array.ndim != 1 or array.size not in (1, 3):
        raise ValueError(f"Spacing must be one value or three (i, j, k), got {values!r}.")
    for value in array:
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"Spacing {list(array)} {unit} is invalid: every value must be a positive, finite number "
                             f"(e.g. 3.25 3.25 5 um for a light-sheet stack).")
    return tuple(float(v) * factor for v in array)


def setVolumeSpacing(volumeNode, spacingMm):
    """Set a volume node's spacing (i, j, k) in mm; origin and directions are kept, voxels untouched."""
    from MRIHistoRegLib.volumes import ijkToRas, setIjkToRas, spacingOf

    spacing = np.broadcast_to(np.asarray(toMillimetres(spacingMm, "mm")), (3,))
    matrix = ijkToRas(volumeNode)
    current = spacingOf(matrix)
    if np.any(current <= 0):
        raise ValueError(f"Volume '{volumeNode.GetName()}' has a degenerate geometry (spacing {current}); reload it.")
    matrix[:3, :3] = matrix[:3, :3] / current[None, :] * spacing[None, :]
    setIjkToRas(volumeNode, matrix)
    LOG.info("spacing of '%s' set to %s mm (was %s)", volumeNode.GetName(), tuple(spacing), tuple(current))


def _shapeIjk(shapeOrSource):
    if hasattr(shapeOrSource, "shape") and hasattr(shapeOrSource, "spacingMm"):
        nk, nj, ni = shapeOrSource.shape
        return (ni, nj, nk)
    if hasattr(shapeOrSource, "GetImageData"):
        dims = shapeOrSource.GetImageData().GetDimensions()
        return tuple(int(d) for d in dims)
    values = tuple(int(n) for n in shapeOrSource)
    if len(values) != 3:
        raise ValueError(f"Shape must have three numbers (i, j, k), got {shapeOrSource!r}.")
    return values


def _referenceExtent(reference):
    if reference is None:
        return None
    if hasattr(reference, "GetImageData"):  # a volume node
        from MRIHistoRegLib.volumes import ijkToRas, spacingOf

        dims = np.asarray(reference.GetImageData().GetDimensions(), float)
        return dims * spacingOf(ijkToRas(reference))
    values = np.atleast_1d(np.asarray(reference, float))
    if values.size == 1:
        values = np.repeat(values, 3)
    return values


def checkPlausibility(shapeOrSource, spacingMm=None, referenceExtentMm=None):
    """Compare a stack's physical extent (voxels x spacing) with a reference size.

    shapeOrSource: a StackSource (shape [k, j, i] and spacing taken from it), a volume node, or a shape (i, j, k).
    referenceExtentMm: the reference's extent in mm (one number or (x, y, z)), or a reference volume node (e.g. the
    MRI); without a reference a mouse brain (~6 x 10 x 8 mm; anything between 1 mm and 50 mm) is assumed.
    Returns PlausibilityVerdict(ok, message, extentMm, ratio) where ratio = largest stack extent / largest
    reference extent; not ok when the ratio is off by more than ~5x either way."""
    shape = np.asarray(_shapeIjk(shapeOrSource), float)
    if spacingMm is None:
        if hasattr(shapeOrSource, "spacingMm"):
            spacingMm = shapeOrSource.spacingMm
        elif hasattr(shapeOrSource, "GetImageData"):
            from MRIHistoRegLib.volumes import ijkToRas, spacingOf

            spacingMm = spacingOf(ijkToRas(shapeOrSource))
        else:
            raise ValueError("checkPlausibility needs spacingMm for a bare shape.")
    spacing = np.broadcast_to(np.asarray(toMillimetres(spacingMm, "mm")), (3,))
    extent = shape * spacing
    reference = _referenceExtent(referenceExtentMm)
    described = "the reference"
    if reference is None:
        reference = np.array([10.0, 10.0, 10.0])
        described = "a mouse brain"
    ratio = float(extent.max() / reference.max())
    axis = int(np.argmax(extent))
    detail = f"{int(shape[axis])} px x {_length(spacing[axis])} = {_length(extent[axis])}"
    if ratio > PLAUSIBILITY_FACTOR:
        hint = " did you mean um?" if spacing.max() >= 0.1 else " check the spacing."
        message = (f"Implausible spacing: {detail}, {ratio:.0f}x larger than {described} "
                   f"({_length(reference.max())});{hint}")
        return PlausibilityVerdict(False, message, tuple(extent), ratio)
    if ratio < 1.0 / PLAUSIBILITY_FACTOR:
        hint = " did you mean mm?" if spacing.max() < 0.01 else " check the spacing."
        message = (f"Implausible spacing: {detail}, {1 / ratio:.0f}x smaller than {described} "
                   f"({_length(reference.max())});{hint}")
        return PlausibilityVerdict(False, message, tuple(extent), ratio)
    message = (f"Plausible: physical size {' x '.join(_length(e) for e in extent)} "
               f"({ratio:.2f}x {described}, {_length(reference.max())}).")
    return PlausibilityVerdict(True, message, tuple(extent), ratio)


def _length(mm):
    mm = float(mm)
    if mm >= 1000:
        return f"{mm / 1000:.3g} m"
    if mm >= 10:
        return f"{mm / 10:.3g} cm" if mm >= 100 else f"{mm:.3g} mm"
    if mm >= 0.1:
        return f"{mm:.3g} mm"
    return f"{mm * 1000:.3g} um"


def rewriteNrrdSpacing(path, spacingMm, outPath=None, overwrite=False):
    """Write a NRRD header with the corrected spacing (i, j, k) in mm; the voxels are not copied or touched.

    By default a detached header `<name>.spacing.nhdr` is written next to `path`, pointing at the original data
    (its data file, or the .nrrd itself with a byte skip past its header). `outPath` chooses the new header's
    name (.nhdr). `overwrite=True` rewrites `path` in place (header only, via a temporary file and rename; the
    data bytes are copied only when the header is attached). Returns the path written.
    Directions and origin are kept; only the length of each space direction changes."""
    from MRIHistoRegLib.stacks import NrrdStack

    path = os.fspath(path)
    spacing = np.broadcast_to(np.asarray(toMillimetres(spacingMm, "mm")), (3,))
    with NrrdStack(path) as source:  # header and data location only; closed before anything is written
        header = _headerWithSpacing(dict(source.header), spacing, path)
    if outPath is None and not overwrite:
        base = path[:-5] if path.lower().endswith((".nrrd", ".nhdr")) else path
        outPath = base + ".spacing.nhdr"
    if outPath is not None:
        outPath = os.fspath(outPath)
        if os.path.abspath(outPath) == os.path.abspath(path) and not overwrite:
            raise ValueError(f"Refusing to overwrite the original {path}: choose another outPath or pass overwrite=True.")
        if os.path.abspath(outPath) in (os.path.abspath(path), os.path.abspath(source.dataPath)) and overwrite:
            return _rewriteInPlace(path, header, source)
        if not outPath.lower().endswith(".nhdr"):
            raise ValueError(f"A header-only rewrite writes a detached header: name it .nhdr, not {outPath}.")
        header = _pointAtData(header, source, outPath)
        _writeHeaderAtomically(outPath, header)
        return outPath
    return _rewriteInPlace(path, header, source)


def _headerWithSpacing(header, spacing, path):
    directions = header.get("space directions")
    if directions is not None:
        rows = np.asarray(directions, dtype=float)
        newRows = []
        axis = 0
        for row in rows:
            if np.all(np.isfinite(row)) and axis < 3:
                norm = np.linalg.norm(row)
                newRows.append(row / norm * spacing[axis])
                axis += 1
            else:
                newRows.append(row)
        header["space directions"] = np.array(newRows)
        header.pop("spacings", None)
    else:
        header["spacings"] = np.asarray(spacing, dtype=float)
    return header


def _pointAtData(header, source, outPath):
    outDir = os.path.dirname(os.path.abspath(outPath))
    header = dict(header)
    dataPath = os.path.abspath(source.dataPath)
    try:
        relative = os.path.relpath(dataPath, outDir)
    except ValueError:
        relative = dataPath
    header["data file"] = relative
    header.pop("datafile", None)
    header.pop("line skip", None)
    header.pop("lineskip", None)
    if source.encoding == "raw":
        header["byte skip"] = int(source.dataOffset)
    elif source.dataPath == source.path:  # attached gzip: skip the text header (bytes before the gzip stream)
        header["byte skip"] = 0
        header["line skip"] = _headerLineCount(source.path)
    header.pop("byteskip", None)
    return header


def _headerLineCount(path):
    count = 0
    with open(path, "rb") as f:
        for line in f:
            count += 1
            if line in (b"\n", b"\r\n"):
                return count
    return count


# NRRD header text (pynrrd's public format_* helpers per field type; tested against pynrrd's reader). pynrrd
# has no public header-only writer, and a header-only rewrite must not touch the data.
_INT_FIELDS = {"dimension", "space dimension", "byte skip", "byteskip", "line skip", "lineskip", "blocksize",
               "block size"}
_INT_LIST_FIELDS = {"sizes"}
_DOUBLE_LIST_FIELDS = {"spacings", "thicknesses", "axis mins", "axismins", "axis maxs", "axismaxs"}
_QUOTED_LIST_FIELDS = {"labels", "units", "space units"}
_STRING_LIST_FIELDS = {"kinds", "centerings", "centers"}
_NRRD_FIELD_ORDER = ["type", "dimension", "space dimension", "space", "sizes", "space directions", "kinds", "endian",
                     "encoding", "min", "max", "oldmin", "old min", "oldmax", "old max", "content",
                     "sample units", "spacings", "thicknesses", "axis mins", "axismins", "axis maxs", "axismaxs",
                     "centerings", "labels", "units", "space units", "space origin", "measurement frame",
                     "byte skip", "line skip", "data file"]
_NRRD_FIELDS = set(_NRRD_FIELD_ORDER) | _INT_FIELDS | {"datafile", "centers", "block size", "blocksize"}


def _formatNrrdValue(nrrd, field, value):
    if field in _INT_FIELDS:
        return str(int(value))
    if field in _INT_LIST_FIELDS:
        return nrrd.format_number_list(np.asarray(value, dtype=int))
    if field in _DOUBLE_LIST_FIELDS:
        return nrrd.format_number_list(np.asarray(value, dtype=float))
    if field in _QUOTED_LIST_FIELDS:
        return " ".join(f'"{item}"' for item in value)
    if field in _STRING_LIST_FIELDS:
        return " ".join(str(item) for item in value)
    if field == "space directions":
        return nrrd.format_optional_matrix(np.asarray(value, dtype=float))
    if field == "space origin":
        return nrrd.format_vector(np.asarray(value, dtype=float))
    if field == "measurement frame":
        return nrrd.format_optional_matrix(np.asarray(value, dtype=float))
    if field in ("data file", "datafile") and not isinstance(value, str):
        return " ".join(str(item) for item in value)  # rarely a list; LIST form is not rewritten here
    if isinstance(value, (float, np.floating)):
        return nrrd.format_number(value)
    return str(value)


def formatNrrdHeader(header) -> bytes:
    """The text of a NRRD header (magic line, fields in the usual order, custom `key:=value` pairs, blank line)
    for a header dict as pynrrd's read_header returns it."""
    from MRIHistoRegLib.deps import requirePackage

    nrrd = requirePackage("nrrd")
    ordered = [field for field in _NRRD_FIELD_ORDER if field in header]
    ordered += [field for field in header if field not in ordered]
    lines = ["NRRD0005", "# written by MRIHistoReg (header-only spacing correction)"]
    for field in ordered:
        text = _formatNrrdValue(nrrd, field, header[field])
        lines.append(f"{field}: {text}" if field in _NRRD_FIELDS else f"{field}:={text}")
    return ("\n".join(lines) + "\n\n").encode("ascii")


def _writeHeaderAtomically(outPath, header):
    folder = os.path.dirname(os.path.abspath(outPath))
    temp = os.path.join(folder, f".{os.path.basename(outPath)}.tmp{os.getpid()}")
    try:
        with open(temp, "wb") as f:
            f.write(formatNrrdHeader(header))
        os.replace(temp, outPath)
    except OSError as error:
        silentRemove(temp)
        raise ValueError(f"Cannot write {outPath} ({error}): is the folder writable?") from error


def _rewriteInPlace(path, header, source):
    """Replace `path` by a copy with the new header (attached data copied in chunks) via temp file + rename."""
    folder = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(temp, "wb") as out:
            out.write(formatNrrdHeader(header))
            if source.dataPath == source.path:  # attached: copy the data bytes after the old header
                start = source.dataOffset if source.encoding == "raw" else _offsetAfterBlankLine(path)
                with open(path, "rb") as f:
                    f.seek(start)
                    while True:
                        chunk = f.read(16 << 20)
                        if not chunk:
                            break
                        out.write(chunk)
        os.replace(temp, path)
    except OSError as error:
        silentRemove(temp)
        raise ValueError(f"Cannot rewrite {path} ({error}): is the folder writable?") from error
    return path


def _offsetAfterBlankLine(path):
    with open(path, "rb") as f:
        offset = 0
        while True:
            line = f.readline()
            if not line:
                return offset
            offset += len(line)
            if line in (b"\n", b"\r\n"):
                return offset
