"""An in-memory array behind the StackSource interface."""
import numpy as np

from MRIHistoRegLib.geometry import spacingOf
from MRIHistoRegLib.stacks.base import StackSource
from ..errors import UserInputError


class ArraySource(StackSource):
    """An in-memory [k, j, i] array with its IJK->RAS 4x4, behind the StackSource interface, so that what serves
    stacks (downsample.downsampleStack's exact box filter, resample.resampleToGrid) serves arrays and volume
    nodes too. The array is kept, not copied; readPlane copies a plane like any source. The geometry keeps the
    matrix's directions and origin; `spacingMm` is its column norms (withSpacing changes only the spacing).
    No positional reads: the capability defaults apply (one reader, fed by a read-ahead thread)."""

    kind = "array"

    def __init__(self, array, ijkToRas, name="<array>"):
        array = np.asarray(array)
        if array.ndim != 3 or min(array.shape) < 1:
            raise UserInputError(f"A source array must be 3-D [k, j, i] and not empty, got shape {array.shape}.")
        matrix = np.asarray(ijkToRas, dtype=float)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
            raise UserInputError(f"A source's ijkToRas must be a finite 4x4 matrix, got {matrix.shape}.")
        spacing = spacingOf(matrix)
        if abs(np.linalg.det(matrix[:3, :3])) < 1e-12 or np.any(spacing <= 0):
            raise UserInputError(f"The source's ijkToRas is singular (spacing {spacing.tolist()}): fix its spacing/directions.")
        super().__init__(name, array.shape, array.dtype, headerSpacingMm=spacing)
        self.array = array
        self._matrix = matrix.copy()
        self._directions = matrix[:3, :3] / spacing[None, :]
        self._origin = matrix[:3, 3].copy()

    def ijkToRas(self):
        if self.userSpacingMm is None:
            return self._matrix.copy()  # exactly the matrix given
        m = np.eye(4)
        m[:3, :3] = self._directions * np.asarray(self.spacingMm)[None, :]
        m[:3, 3] = self._origin
        return m

    def _readPlaneInto(self, k, out):
        np.copyto(out, self.array[k])  # the buffer is in native byte order; the array may not be
