"""NRRD header writing: a header-only spacing correction (the voxels are referenced, never copied or touched,
unless the original is rewritten in place) and the header text formatter it uses.

It lives with the NRRD reader because it rewrites what the reader parsed (header, data file, data offset);
spacing.py re-exports rewriteNrrdSpacing and formatNrrdHeader as its public names.
"""
import os

import numpy as np

from MRIHistoRegLib.outputs import silentRemove
from MRIHistoRegLib.stacks.nrrd import NRRD_EXTENSIONS, NrrdStack
from MRIHistoRegLib.stacks.units import toMillimetres
from ..errors import UserInputError


def rewriteNrrdSpacing(path, spacingMm, outPath=None, overwrite=False):
    """Write a NRRD header with the corrected spacing (i, j, k) in mm; the voxels are not copied or touched.

    By default a detached header `<name>.spacing.nhdr` is written next to `path`, pointing at the original data
    (its data file, or the .nrrd itself with a byte skip past its header). `outPath` chooses the new header's
    name (.nhdr). `overwrite=True` rewrites `path` in place (header only, via a temporary file and rename; the
    data bytes are copied only when the header is attached). Returns the path written.
    Directions and origin are kept; only the length of each space direction changes."""
    path = os.fspath(path)
    spacing = np.broadcast_to(np.asarray(toMillimetres(spacingMm, "mm")), (3,))
    with NrrdStack(path) as source:  # header and data location only; closed before anything is written
        header = _headerWithSpacing(dict(source.header), spacing, path)
    if outPath is None and not overwrite:
        base = path[:-5] if path.lower().endswith(NRRD_EXTENSIONS) else path
        outPath = base + ".spacing.nhdr"
    if outPath is not None:
        outPath = os.fspath(outPath)
        if os.path.abspath(outPath) == os.path.abspath(path) and not overwrite:
            raise UserInputError(f"Refusing to overwrite the original {path}: choose another outPath or pass overwrite=True.")
        if os.path.abspath(outPath) in (os.path.abspath(path), os.path.abspath(source.dataPath)) and overwrite:
            return _rewriteInPlace(path, header, source)
        if not outPath.lower().endswith(".nhdr"):
            raise UserInputError(f"A header-only rewrite writes a detached header: name it .nhdr, not {outPath}.")
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
        raise UserInputError(f"Cannot write {outPath} ({error}): is the folder writable?") from error


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
        raise UserInputError(f"Cannot rewrite {path} ({error}): is the folder writable?") from error
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
