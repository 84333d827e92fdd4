"""Landmark pairs: pairing two Markups point lists by label, and point-file I/O.

Fixed = MRI, moving = histology. Points are (N, 3) RAS millimetres, each list's in its own image's space: the
markups node's local coordinates (GetNthControlPointPosition), not world. A histology list placed under the
registration transform (so its points display on the aligned histology) still gives histology coordinates;
world coordinates would give MRI ones and corrupt the fit. This matches the point files ("each image's own
corrected physical space").

Pairing (pairLandmarks): by control-point label; when the two lists share no label at all, by index (stated in
the result and logged). Reported and skipped: labels present in one list only, labels used twice in a list,
points not placed (position status other than "defined"), and pairs excluded by the user (a control point
unselected in either list: the pair is kept in the lists but left out of the fit).

Point files (readPoints / writePoints / loadMarkups):
- Slicer markups JSON (.mrk.json / .json), read and written by vtkMRMLMarkupsJsonStorageNode.
- Slicer fiducial CSV (.fcsv, "# Markups fiducial file" header), by vtkMRMLMarkupsFiducialStorageNode.
- Slicer markups CSV (.csv with header "label,l,p,s,defined,selected,..." or "label,r,a,s,...", what the
  Markups module's "Export to CSV" writes): parsed here; LPS columns are converted to RAS.
- Plain CSV "label,x,y,z" in RAS mm (header line optional).
- BigWarp landmarks CSV: no header, one quoted row per pair: name, active ("true"/"false"), moving x, y, z,
  fixed x, y, z. BigWarp's conventions: "moving" is the image BigWarp warps onto the "fixed" (target) image,
  so with histology as BigWarp's moving image the roles match ours. Coordinates are in each image's own
  physical units as Fiji/BigWarp (ImageJ/BigDataViewer) sees a stack: x = i*sx along columns, y = j*sy along
  rows (downwards), z = k*sz along slices, measured at voxel centres (voxel (0,0,0) at the origin), with no
  anatomical orientation. The same orientation-less stack in Slicer/ITK has LPS axes along i, j, k
  (docs/ARCHITECTURE.md section 3), i.e. RAS = (-i*sx, -j*sy, k*sz) = (-x, -y, z). So BigWarp files are converted by
  default (flipXY=True): read (x, y, z) -> RAS (-x, -y, z), and written back the same way. Pass flipXY=False
  to take the coordinates as given (a file whose coordinates are already RAS, or images that carried another
  orientation into BigWarp). Any origin offset between the two programs (e.g. a volume with a non-zero
  origin) is the user's to remove. flipXY affects BigWarp files only; every other format is RAS already.
"""
import csv
import logging
import os
from dataclasses import dataclass, field
from typing import List

import numpy as np
import slicer

from .geometry import flipPointsLpsRas
from .mapping import asPoints
from .errors import UserInputError

log = logging.getLogger(__name__)

FORMATS = ("mrk.json", "fcsv", "slicer-csv", "csv", "bigwarp")


# --- pairing ---------------------------------------------------------------------------------------------------

@dataclass
class LandmarkPairs:
    """Paired landmarks ready for fitting, and everything that was left out (with why)."""

    labels: List[str]
    fixed: np.ndarray
    moving: np.ndarray
    pairedByIndex: bool = False
    unmatchedFixed: List[str] = field(default_factory=list)
    unmatchedMoving: List[str] = field(default_factory=list)
    duplicates: List[str] = field(default_factory=list)
    excluded: List[str] = field(default_factory=list)
    undefined: List[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.labels)

    def messages(self) -> List[str]:
        """Human-readable notes on what was not paired and why."""
        notes = []
        if self.pairedByIndex:
            notes.append("The two point lists share no label: points were paired by their order in the lists.")
        for title, names in (("only in the fixed (MRI) list", self.unmatchedFixed),
                             ("only in the moving (histology) list", self.unmatchedMoving),
                             ("used more than once in a list (ambiguous, skipped)", self.duplicates),
                             ("not placed (position undefined, skipped)", self.undefined),
                             ("excluded (unselected)", self.excluded)):
            if names:
                notes.append(f"Labels {title}: {', '.join(names)}")
        return notes

    def warnings(self) -> List[str]:
        """The notes that point at a problem (all of messages() except the user's own exclusions)."""
        return [note for note in self.messages() if not note.startswith("Labels excluded")]


def _controlPoints(node):
    """[(label, localPosition, selected, defined)] for every control point of a markups node. Local = the node's
    own coordinates, ignoring any parent transform (see the module notes)."""
    records = []
    defined = slicer.vtkMRMLMarkupsNode.PositionDefined
    for i in range(node.GetNumberOfControlPoints()):
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(i, position)
        records.append((node.GetNthControlPointLabel(i).strip(), np.array(position, float),
                        bool(node.GetNthControlPointSelected(i)),
                        node.GetNthControlPointPositionStatus(i) == defined))
    return records


def pairLandmarks(fixedNode, movingNode) -> LandmarkPairs:
    """Pair two markups point lists (fixed = MRI, moving = histology) by label, each in its own local coordinates.

    Falls back to pairing by index when the lists have no label in common (pairedByIndex=True). Nothing is
    raised for unpaired points: they are listed in the result (and logged); fitting checks the count.
    """
    if fixedNode is None or movingNode is None:
        raise UserInputError("Pairing needs two markups point lists: select both the fixed (MRI) and the moving "
                         "(histology) list.")
    fixedRecords, movingRecords = _controlPoints(fixedNode), _controlPoints(movingNode)
    fixedLabels = {r[0] for r in fixedRecords if r[0]}
    movingLabels = {r[0] for r in movingRecords if r[0]}
    result = LandmarkPairs([], np.zeros((0, 3)), np.zeros((0, 3)))
    if fixedLabels & movingLabels:
        pairs = _pairByLabel(result, fixedRecords, movingRecords)
    else:
        pairs = _pairByIndex(result, fixedRecords, movingRecords)
    _keepUsable(result, pairs)
    for message in result.warnings():
        log.warning("Landmark pairing (%s / %s): %s", fixedNode.GetName(), movingNode.GetName(), message)
    return result


def _pairByLabel(result, fixedRecords, movingRecords):
    """[(label, fixedRecord, movingRecord)] of the labels both lists hold once; the rest is noted in `result`
    (labels used twice in a list are ambiguous and skipped on both sides)."""
    for records in (fixedRecords, movingRecords):
        seen = set()
        for label, *_ in records:
            if label and label in seen and label not in result.duplicates:
                result.duplicates.append(label)
            seen.add(label)
    movingByLabel = {r[0]: r for r in movingRecords}
    fixedSet = {r[0] for r in fixedRecords if r[0]}
    pairs = []
    for i, record in enumerate(fixedRecords):
        label = record[0] or f"(unlabelled fixed #{i + 1})"
        if label in result.duplicates:
            continue
        if record[0] and record[0] in movingByLabel:
            pairs.append((label, record, movingByLabel[record[0]]))
        else:
            result.unmatchedFixed.append(label)
    for i, record in enumerate(movingRecords):
        if not (record[0] and (record[0] in fixedSet or record[0] in result.duplicates)):
            result.unmatchedMoving.append(record[0] or f"(unlabelled moving #{i + 1})")
    return pairs


def _pairByIndex(result, fixedRecords, movingRecords):
    """[(label, fixedRecord, movingRecord)] by position in the lists (no label shared); the longer list's tail is
    noted in `result`."""
    result.pairedByIndex = True
    shared = min(len(fixedRecords), len(movingRecords))
    pairs = []
    for i in range(shared):
        fixedLabel, movingLabel = fixedRecords[i][0], movingRecords[i][0]
        label = fixedLabel or movingLabel or f"#{i + 1}"
        if fixedLabel and movingLabel and fixedLabel != movingLabel:
            label = f"{fixedLabel}/{movingLabel}"
        pairs.append((label, fixedRecords[i], movingRecords[i]))
    result.unmatchedFixed = [r[0] or f"#{i + 1}" for i, r in enumerate(fixedRecords) if i >= shared]
    result.unmatchedMoving = [r[0] or f"#{i + 1}" for i, r in enumerate(movingRecords) if i >= shared]
    return pairs


def _keepUsable(result, pairs):
    """Fills result.labels/fixed/moving with the pairs placed and selected in both lists; notes the others."""
    labels, fixed, moving = [], [], []
    for label, fixedRecord, movingRecord in pairs:
        if not (fixedRecord[3] and movingRecord[3]):
            result.undefined.append(label)
        elif not (fixedRecord[2] and movingRecord[2]):
            result.excluded.append(label)
        else:
            labels.append(label)
            fixed.append(fixedRecord[1])
            moving.append(movingRecord[1])
    result.labels = labels
    result.fixed = np.array(fixed, float).reshape(-1, 3)
    result.moving = np.array(moving, float).reshape(-1, 3)


# --- point files -----------------------------------------------------------------------------------------------

@dataclass
class PointRecords:
    """Points read from a file: labels, (N,3) RAS points, selected and defined flags (both default True)."""

    labels: List[str]
    points: np.ndarray
    selected: List[bool]
    defined: List[bool]


def detectFormat(path) -> str:
    """One of FORMATS, from the extension and, for .csv, the first line."""
    lower = os.fspath(path).lower()
    if lower.endswith(".json"):
        return "mrk.json"
    if lower.endswith(".fcsv"):
        return "fcsv"
    if not os.path.isfile(path):
        return "csv"
    with open(path, newline="", encoding="utf-8-sig") as stream:
        for line in stream:
            if line.strip():
                break
        else:
            return "csv"
    if line.startswith("# Markups fiducial file"):
        return "fcsv"
    fields = [f.strip().lower() for f in next(csv.reader([line]))]
    if len(fields) >= 4 and fields[0] == "label" and fields[1:4] in (["l", "p", "s"], ["r", "a", "s"]):
        return "slicer-csv"
    if len(fields) in (6, 8) and fields[1] in ("true", "false"):
        return "bigwarp"
    return "csv"


def _readWithStorageNode(path, storageClassName) -> PointRecords:
    scene = slicer.vtkMRMLScene()  # a private scene: reading never touches the user's
    scene.AddNode(slicer.vtkMRMLSelectionNode())
    node = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(node)
    storage = getattr(slicer, storageClassName)()
    scene.AddNode(storage)
    storage.SetFileName(os.fspath(path))
    if not storage.ReadData(node):
        raise UserInputError(f"Could not read markups from {path} (expected a Slicer markups file).")
    records = _controlPoints(node)
    return PointRecords([r[0] for r in records], np.array([r[1] for r in records], float).reshape(-1, 3),
                        [r[2] for r in records], [r[3] for r in records])


def _float(text, path, row):
    try:
        return float(text)
    except ValueError:
        raise UserInputError(f"{path}, row {row}: '{text}' is not a number. Expected rows 'label,x,y,z' in mm.") from None


def _readSlicerCsv(path) -> PointRecords:
    with open(path, newline="", encoding="utf-8-sig") as stream:
        rows = [row for row in csv.reader(stream) if row]
    header = [f.strip().lower() for f in rows[0]]
    lps = header[1:4] == ["l", "p", "s"]
    column = {name: header.index(name) for name in ("defined", "selected") if name in header}
    labels, points, selected, defined = [], [], [], []
    for number, row in enumerate(rows[1:], start=2):
        xyz = [_float(row[c], path, number) for c in (1, 2, 3)]
        if lps:
            xyz = [-xyz[0], -xyz[1], xyz[2]]
        labels.append(row[0])
        points.append(xyz)
        selected.append(row[column["selected"]].strip() not in ("0", "false") if "selected" in column else True)
        defined.append(row[column["defined"]].strip() not in ("0", "false") if "defined" in column else True)
    return PointRecords(labels, np.array(points, float).reshape(-1, 3), selected, defined)


def _readPlainCsv(path) -> PointRecords:
    with open(path, newline="", encoding="utf-8-sig") as stream:
        rows = [row for row in csv.reader(stream) if row and not row[0].lstrip().startswith("#")]
    if rows and rows[0] and [f.strip().lower() for f in rows[0][:4]] == ["label", "x", "y", "z"]:
        rows = rows[1:]
    labels, points = [], []
    for number, row in enumerate(rows, start=1):
        if len(row) < 4:
            raise UserInputError(f"{path}, row {number}: expected 'label,x,y,z' (RAS mm), got {','.join(row)}.")
        labels.append(row[0].strip())
        points.append([_float(v, path, number) for v in row[1:4]])
    return PointRecords(labels, np.array(points, float).reshape(-1, 3), [True] * len(labels), [True] * len(labels))


def readBigWarpLandmarks(path, flipXY=True):
    """(labels, fixed (N,3), moving (N,3), active list) from a BigWarp landmarks CSV. flipXY=True (default):
    Fiji (x, y, z) -> Slicer RAS (-x, -y, z); False: as given (see module notes)."""
    path = os.fspath(path)
    with open(path, newline="", encoding="utf-8-sig") as stream:
        rows = [row for row in csv.reader(stream) if row]
    labels, fixed, moving, active = [], [], [], []
    for number, row in enumerate(rows, start=1):
        if len(row) != 8:
            raise UserInputError(f"{path}, row {number}: a 3-D BigWarp landmark row has 8 fields (name, active, moving "
                             f"x y z, fixed x y z), got {len(row)}.")
        labels.append(row[0])
        active.append(row[1].strip().lower() == "true")
        moving.append([_float(v, path, number) for v in row[2:5]])
        fixed.append([_float(v, path, number) for v in row[5:8]])
    fixed, moving = np.array(fixed, float).reshape(-1, 3), np.array(moving, float).reshape(-1, 3)
    if flipXY:
        fixed, moving = flipPointsLpsRas(fixed), flipPointsLpsRas(moving)  # Fiji's x, y are LPS-like
    return labels, fixed, moving, active


def writeBigWarpLandmarks(path, labels, fixedPoints, movingPoints, active=None, flipXY=True) -> str:
    """Write a BigWarp landmarks CSV (all fields quoted, as BigWarp writes them) from RAS points. flipXY=True
    (default): RAS (r, a, s) -> Fiji (-r, -a, s); False: as given (see module notes)."""
    fixed, moving = asPoints(fixedPoints), asPoints(movingPoints)
    if not (len(labels) == len(fixed) == len(moving)):
        raise UserInputError(f"BigWarp export needs one label per pair: {len(labels)} labels, {len(fixed)} fixed, "
                         f"{len(moving)} moving points.")
    if flipXY:
        fixed, moving = flipPointsLpsRas(fixed), flipPointsLpsRas(moving)  # Fiji's x, y are LPS-like
    active = [True] * len(labels) if active is None else list(active)
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream, quoting=csv.QUOTE_ALL, lineterminator="\n")
        for label, on, m, f in zip(labels, active, moving, fixed):
            writer.writerow([label, "true" if on else "false"] + [repr(float(v)) for v in m] + [repr(float(v)) for v in f])
    return os.fspath(path)


def readPointRecords(path, role="fixed", flipXY=True) -> PointRecords:
    """All points of a point file with their flags. For a BigWarp file (a pair file) `role` picks 'fixed' or
    'moving', inactive pairs come back unselected and flipXY (default True) converts Fiji x, y to RAS (module
    notes); other formats ignore flipXY."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserInputError(f"Point file not found: {path}. Check the path.")
    kind = detectFormat(path)
    if kind == "mrk.json":
        return _readWithStorageNode(path, "vtkMRMLMarkupsJsonStorageNode")
    if kind == "fcsv":
        return _readWithStorageNode(path, "vtkMRMLMarkupsFiducialStorageNode")
    if kind == "slicer-csv":
        return _readSlicerCsv(path)
    if kind == "bigwarp":
        if role not in ("fixed", "moving"):
            raise UserInputError(f"{path} is a BigWarp pair file: choose role='fixed' or role='moving'.")
        labels, fixed, moving, active = readBigWarpLandmarks(path, flipXY)
        return PointRecords(labels, fixed if role == "fixed" else moving, active, [True] * len(labels))
    return _readPlainCsv(path)


def readPoints(path, role="fixed", flipXY=True):
    """(labels, points (N,3) RAS mm) from any supported point file; see readPointRecords."""
    records = readPointRecords(path, role, flipXY)
    return records.labels, records.points


def _checkLabelledPoints(labels, points):
    points = np.asarray(points, float).reshape(-1, 3)
    labels = [str(label) for label in labels]
    if len(labels) != len(points):
        raise UserInputError(f"{len(labels)} labels for {len(points)} points: give one label per point.")
    return labels, points


def writePoints(path, labels, points, format=None, selected=None) -> str:
    """Write labelled points (RAS mm). format: None = from the extension (.mrk.json/.json, .fcsv, else plain
    CSV 'label,x,y,z'), or one of 'mrk.json', 'fcsv', 'slicer-csv' (Slicer's markups CSV, RAS columns), 'csv'."""
    path = os.fspath(path)
    labels, points = _checkLabelledPoints(labels, points)
    if format is None:
        lower = path.lower()
        format = "mrk.json" if lower.endswith(".json") else "fcsv" if lower.endswith(".fcsv") else "csv"
    if format not in FORMATS or format == "bigwarp":
        raise UserInputError(f"Unknown point format '{format}': use 'mrk.json', 'fcsv', 'slicer-csv' or 'csv' "
                         "(writeBigWarpLandmarks for BigWarp pairs).")
    selected = [True] * len(labels) if selected is None else [bool(s) for s in selected]
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if format in ("mrk.json", "fcsv"):
        scene = slicer.vtkMRMLScene()
        scene.AddNode(slicer.vtkMRMLSelectionNode())  # the JSON writer looks up the length unit there
        node = slicer.vtkMRMLMarkupsFiducialNode()
        scene.AddNode(node)
        _fillNode(node, labels, points, selected)
        storage = slicer.vtkMRMLMarkupsJsonStorageNode() if format == "mrk.json" else slicer.vtkMRMLMarkupsFiducialStorageNode()
        scene.AddNode(storage)
        storage.SetFileName(path)
        if not storage.WriteData(node):
            raise UserInputError(f"Could not write {path}; check the folder is writable.")
        return path
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        if format == "slicer-csv":
            writer.writerow(["label", "r", "a", "s", "defined", "selected", "visible", "locked", "description"])
            for label, p, on in zip(labels, points, selected):
                writer.writerow([label] + [repr(float(v)) for v in p] + [1, int(on), 1, 0, ""])
        else:
            writer.writerow(["label", "x", "y", "z"])
            for label, p in zip(labels, points):
                writer.writerow([label] + [repr(float(v)) for v in p])
    return path


def _fillNode(node, labels, points, selected=None, defined=None):
    wasModifying = node.StartModify()
    try:
        for i, (label, p) in enumerate(zip(labels, points)):
            index = node.AddControlPoint(float(p[0]), float(p[1]), float(p[2]), label)
            if selected is not None and not selected[i]:
                node.SetNthControlPointSelected(index, False)
            if defined is not None and not defined[i]:
                node.UnsetNthControlPointPosition(index)
    finally:
        node.EndModify(wasModifying)


def markupsFromPoints(scene, labels, points, name="Landmarks", selected=None):
    """A new vtkMRMLMarkupsFiducialNode with one labelled control point per row of `points` (RAS mm)."""
    labels, points = _checkLabelledPoints(labels, points)
    if not np.isfinite(points).all():
        bad = [labels[i] for i in np.flatnonzero(~np.isfinite(points).all(axis=1))]
        raise UserInputError(f"Points with NaN/infinite coordinates: {', '.join(bad)}. Fix or drop them first.")
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    _fillNode(node, labels, points, selected)
    node.CreateDefaultDisplayNodes()
    return node


def loadMarkups(scene, path, name=None, role="fixed", flipXY=True):
    """Read a point file (any supported format) into a new markups point list; selected/defined flags kept.
    The file is fully read before the scene is touched."""
    records = readPointRecords(path, role, flipXY)
    if name is None:
        base = os.path.basename(os.fspath(path))
        for suffix in (".mrk.json", ".json", ".fcsv", ".csv", ".txt"):
            if base.lower().endswith(suffix):
                base = base[: -len(suffix)]
                break
        name = base
    points = np.where(np.isfinite(records.points), records.points, 0.0)
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    _fillNode(node, records.labels, points, records.selected, records.defined)
    node.CreateDefaultDisplayNodes()
    return node
