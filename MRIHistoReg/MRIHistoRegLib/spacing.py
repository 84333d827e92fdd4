"""Spacing correction: units, a plausibility check against a reference size, and geometry-only edits.

Spacing tuples are (i, j, k) in millimetres. Correcting a spacing changes the IJK->RAS matrix only (origin and
directions kept), never the voxels; on disk, a NRRD gets a header-only rewrite (the data file is referenced, not
copied, and the original is never overwritten unless asked).
"""
import logging
from collections import namedtuple

import numpy as np

from MRIHistoRegLib.stacks.base import StackSource
from MRIHistoRegLib.stacks.header import formatNrrdHeader, rewriteNrrdSpacing
from MRIHistoRegLib.stacks.units import toMillimetres, unitToMillimetres
from .errors import UserInputError

# Units and the NRRD header rewrite live with the stack readers (which need them and must not import this
# module); these are still their public names.
__all__ = ["PLAUSIBILITY_FACTOR", "PlausibilityVerdict", "checkPlausibility", "formatNrrdHeader", "rewriteNrrdSpacing",
           "setVolumeSpacing", "toMillimetres", "unitToMillimetres"]

LOG = logging.getLogger(__name__)

PlausibilityVerdict = namedtuple("PlausibilityVerdict", "ok message extentMm ratio")

# Above this ratio (either way) between the stack's physical size and the reference's, warn.
PLAUSIBILITY_FACTOR = 5.0


def setVolumeSpacing(volumeNode, spacingMm):
    """Set a volume node's spacing (i, j, k) in mm; origin and directions are kept, voxels untouched."""
    from MRIHistoRegLib.volumes import ijkToRas, setIjkToRas, spacingOf

    spacing = np.broadcast_to(np.asarray(toMillimetres(spacingMm, "mm")), (3,))
    matrix = ijkToRas(volumeNode)
    current = spacingOf(matrix)
    if np.any(current <= 0):
        raise UserInputError(f"Volume '{volumeNode.GetName()}' has a degenerate geometry (spacing {current}); reload it.")
    matrix[:3, :3] = matrix[:3, :3] / current[None, :] * spacing[None, :]
    setIjkToRas(volumeNode, matrix)
    LOG.info("spacing of '%s' set to %s mm (was %s)", volumeNode.GetName(), tuple(spacing), tuple(current))


# What a shape, a size or a StackSource can be: recognised without importing Slicer, so checkPlausibility on
# them works where Slicer's modules are not installed.
_PLAIN_VALUES = (StackSource, tuple, list, np.ndarray, int, float, np.number)


def _isVolumeNode(value):
    """True for a Slicer volume node (vtkMRMLVolumeNode or a subclass)."""
    if isinstance(value, _PLAIN_VALUES):
        return False
    try:
        import slicer
    except ImportError:  # without Slicer's modules there are no volume nodes
        return False
    return isinstance(value, slicer.vtkMRMLVolumeNode)


def _shapeIjk(shapeOrSource):
    if isinstance(shapeOrSource, StackSource):
        nk, nj, ni = shapeOrSource.shape
        return (ni, nj, nk)
    if _isVolumeNode(shapeOrSource):
        dims = shapeOrSource.GetImageData().GetDimensions()
        return tuple(int(d) for d in dims)
    values = tuple(int(n) for n in shapeOrSource)
    if len(values) != 3:
        raise UserInputError(f"Shape must have three numbers (i, j, k), got {shapeOrSource!r}.")
    return values


def _volumeExtent(volumeNode):
    """A volume node's extent (i, j, k) in mm: voxels x spacing."""
    from MRIHistoRegLib.volumes import ijkToRas, spacingOf

    dims = np.asarray(volumeNode.GetImageData().GetDimensions(), float)
    return dims * spacingOf(ijkToRas(volumeNode))


def _referenceExtent(reference):
    if reference is None:
        return None
    if _isVolumeNode(reference):
        return _volumeExtent(reference)
    values = np.atleast_1d(np.asarray(reference, float))
    if values.size == 1:
        values = np.repeat(values, 3)
    return values


def _ownSpacing(shapeOrSource):
    """The spacing (i, j, k) in mm a StackSource or a volume node carries; ValueError for a bare shape."""
    if isinstance(shapeOrSource, StackSource):
        return shapeOrSource.spacingMm
    if _isVolumeNode(shapeOrSource):
        from MRIHistoRegLib.volumes import ijkToRas, spacingOf

        return spacingOf(ijkToRas(shapeOrSource))
    raise UserInputError("checkPlausibility needs spacingMm for a bare shape.")


def checkPlausibility(shapeOrSource, spacingMm=None, referenceExtentMm=None):
    """Compare a stack's physical extent (voxels x spacing) with a reference size.

    shapeOrSource: a StackSource (shape [k, j, i] and spacing taken from it), a volume node, or a shape (i, j, k).
    referenceExtentMm: the reference's extent in mm (one number or (x, y, z)), or a reference volume node (e.g. the
    MRI); without a reference a mouse brain (~6 x 10 x 8 mm; anything between 1 mm and 50 mm) is assumed.
    Returns PlausibilityVerdict(ok, message, extentMm, ratio) where ratio = largest stack extent / largest
    reference extent; not ok when the ratio is off by more than ~5x either way."""
    shape = np.asarray(_shapeIjk(shapeOrSource), float)
    if spacingMm is None:
        spacingMm = _ownSpacing(shapeOrSource)
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
