"""Point mappings between the MRI (fixed) and histology (moving) spaces, in RAS millimetres.

Every registration result in MRIHistoReg is a *mapping* in the resampling direction: it takes points of the
fixed space (MRI / reference grid) to the moving space (histology), like a Slicer transform node's
"from parent" transform (docs/ARCHITECTURE.md section 3). Every mapping class derives from `Mapping`:

    transformPoints(points: (N, 3) array) -> (N, 3) array          # fixed RAS -> moving RAS
    isLinear -> bool, linearMatrix() -> 4x4 or None                 # its affine part, when it has one
    jacobian(points) -> (N, 3, 3)                                   # d moving / d fixed (default: differences)

Code that needs one of these asks the interface (`asMapping(m).linearMatrix()`), never probes for attributes:
a mapping without an affine part says so by returning None. Objects written for the older duck-typed
convention (a class with transformPoints and perhaps jacobian / linearMatrix / matrix / affineMatrix, as in
test helpers or user scripts) are wrapped once by `asMapping`. This module also holds affine mappings,
composition, the numerical Jacobian and an iterative inverse for any smooth mapping.
"""
import abc

import numpy as np

from .errors import UserInputError
from .geometry import applyMatrix

FINITE_DIFFERENCE_STEP_MM = 1e-3


def asPoints(points) -> np.ndarray:
    """(N, 3) float64 array from anything point-like; a single point becomes (1, 3)."""
    array = np.asarray(points, dtype=float)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != 3:
        raise UserInputError(f"Points must be an (N, 3) array of RAS coordinates in mm, got shape {array.shape}.")
    return array


def finiteDifferenceJacobian(mapping, points, stepMm=FINITE_DIFFERENCE_STEP_MM) -> np.ndarray:
    """(N, 3, 3) Jacobian of `mapping` at `points` by central differences of its transformPoints."""
    points = asPoints(points)
    result = np.empty((len(points), 3, 3))
    for axis in range(3):
        offset = np.zeros(3)
        offset[axis] = stepMm
        result[:, :, axis] = (mapping.transformPoints(points + offset) - mapping.transformPoints(points - offset)) / (2 * stepMm)
    return result


class Mapping(abc.ABC):
    """A point mapping fixed (MRI) RAS mm -> moving (histology) RAS mm, the resampling direction.

    Subclasses implement transformPoints; they override isLinear / linearMatrix when they have an affine part
    and jacobian when they have an analytic one (the default differentiates transformPoints numerically)."""

    @abc.abstractmethod
    def transformPoints(self, points) -> np.ndarray:
        """(N, 3) fixed RAS points -> (N, 3) moving RAS points."""

    @property
    def isLinear(self) -> bool:
        """True when the whole mapping is the affine matrix linearMatrix()."""
        return False

    def linearMatrix(self):
        """The mapping's affine part as a 4x4 matrix (all of it when isLinear; a thin-plate spline's polynomial,
        a refinement's affine start), or None when it has none. Inverse iterations start from its inverse."""
        return None

    def jacobian(self, points) -> np.ndarray:
        """(N, 3, 3) d moving / d fixed at `points`."""
        return finiteDifferenceJacobian(self, points)


class _DuckTypedMapping(Mapping):
    """The Mapping interface over an object that follows the older duck-typed convention: transformPoints and,
    optionally, jacobian(points) and an affine part as linearMatrix(), `matrix` or `affineMatrix`. The one place
    where attributes are probed, so the rest of the code can rely on the interface."""

    def __init__(self, wrapped):
        self.wrapped = wrapped
        self._jacobian = getattr(wrapped, "jacobian", None)
        linear = getattr(wrapped, "linearMatrix", None)
        if callable(linear):
            self._linear = linear
        else:
            matrix = next((m for m in (getattr(wrapped, name, None) for name in ("matrix", "affineMatrix"))
                           if m is not None), None)
            self._linear = lambda: matrix

    def transformPoints(self, points):
        return self.wrapped.transformPoints(points)

    def linearMatrix(self):
        linear = self._linear()
        return None if linear is None else np.asarray(linear, float)

    def jacobian(self, points):
        if callable(self._jacobian):
            return self._jacobian(points)
        return finiteDifferenceJacobian(self.wrapped, points)


def asMapping(mapping) -> Mapping:
    """`mapping` itself when it is a Mapping, else the object (anything with transformPoints) behind the Mapping
    interface; ValueError for anything else."""
    if isinstance(mapping, Mapping):
        return mapping
    if not callable(getattr(mapping, "transformPoints", None)):
        raise UserInputError("mapping must have transformPoints(points) (fixed RAS -> moving RAS); see mapping.py.")
    return _DuckTypedMapping(mapping)


class AffineMapping(Mapping):
    """x -> A x + t given as a 4x4 homogeneous matrix."""

    def __init__(self, matrix):
        self.matrix = np.array(matrix, dtype=float)
        if self.matrix.shape != (4, 4):
            raise UserInputError(f"An affine mapping needs a 4x4 matrix, got {self.matrix.shape}.")

    @property
    def isLinear(self) -> bool:
        return True

    def linearMatrix(self):
        return self.matrix.copy()

    def transformPoints(self, points):
        points = asPoints(points)
        return applyMatrix(self.matrix, points)

    def jacobian(self, points):
        return np.broadcast_to(self.matrix[:3, :3], (len(asPoints(points)), 3, 3)).copy()

    def inverse(self):
        return AffineMapping(np.linalg.inv(self.matrix))


class ComposedMapping(Mapping):
    """Apply `steps` in order: transformPoints(x) = steps[-1](...steps[0](x))."""

    def __init__(self, steps):
        self.steps = list(steps)

    def transformPoints(self, points):
        points = asPoints(points)
        for step in self.steps:
            points = step.transformPoints(points)
        return points

    def jacobian(self, points):
        points = asPoints(points)
        total = np.broadcast_to(np.eye(3), (len(points), 3, 3)).copy()
        for step in self.steps:
            total = jacobianOf(step, points) @ total  # chain rule: J_n ... J_1
            points = step.transformPoints(points)
        return total


def jacobianOf(mapping, points) -> np.ndarray:
    """(N, 3, 3) Jacobian of `mapping` at `points`: analytic when the mapping has one, else central differences."""
    return np.asarray(asMapping(mapping).jacobian(asPoints(points)), dtype=float)


def invertPoints(mapping, targets, initialGuess=None, tolerance=1e-6, maxIterations=50):
    """Solve mapping(x) = targets for x by Newton iterations; returns (x, residual_mm per point).

    Converges for smooth, non-folding mappings from a guess inside the basin (by default the inverse of the
    mapping's affine part when it has one (`linearMatrix()`), else the targets themselves). The residual
    |mapping(x) - target| is returned so callers can check convergence instead of trusting it.
    """
    targets = asPoints(targets)
    mapping = asMapping(mapping)
    linear = None if initialGuess is not None else mapping.linearMatrix()
    if initialGuess is not None:
        x = asPoints(initialGuess).copy()
    elif linear is not None:
        x = AffineMapping(linear).inverse().transformPoints(targets)
    else:
        x = targets.copy()
    for _ in range(maxIterations):
        error = mapping.transformPoints(x) - targets
        residual = np.linalg.norm(error, axis=1)
        if residual.max(initial=0.0) < tolerance:
            break
        step = np.linalg.solve(jacobianOf(mapping, x), error[:, :, None])[:, :, 0]
        x -= step
    residual = np.linalg.norm(mapping.transformPoints(x) - targets, axis=1)
    return x, residual
