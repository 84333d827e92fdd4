"""Point mappings between the MRI (fixed) and histology (moving) spaces, in RAS millimetres.

Every registration result in MRIHistoReg is a *mapping* in the resampling direction: it takes points of the
fixed space (MRI / reference grid) to the moving space (histology), like a Slicer transform node's
"from parent" transform (docs/ARCHITECTURE.md section 3). A mapping is any object with

    transformPoints(points: (N, 3) array) -> (N, 3) array          # fixed RAS -> moving RAS

and optionally `jacobian(points) -> (N, 3, 3)` (d moving / d fixed). This module holds the generic pieces:
affine mappings, composition, a numerical Jacobian and an iterative inverse for any smooth mapping.
"""
import numpy as np


def asPoints(points) -> np.ndarray:
    """(N, 3) float64 array from anything point-like; a single point becomes (1, 3)."""
    array = np.asarray(points, dtype=float)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"Points must be an (N, 3) array of RAS coordinates in mm, got shape {array.shape}.")
    return array


class AffineMapping:
    """x -> A x + t given as a 4x4 homogeneous matrix."""

    def __init__(self, matrix):
        self.matrix = np.array(matrix, dtype=float)
        if self.matrix.shape != (4, 4):
            raise ValueError(f"An affine mapping needs a 4x4 matrix, got {self.matrix.shape}.")

    def transformPoints(self, points):
        points = asPoints(points)
        return points @ self.matrix[:3, :3].T + self.matrix[:3, 3]

    def jacobian(self, points):
        return np.broadcast_to(self.matrix[:3, :3], (len(asPoints(points)), 3, 3)).copy()

    def inverse(self):
        return AffineMapping(np.linalg.inv(self.matrix))


class ComposedMapping:
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


def jacobianOf(mapping, points, stepMm=1e-3) -> np.ndarray:
    """(N, 3, 3) Jacobian of `mapping` at `points`: analytic when the mapping has one, else central differences."""
    points = asPoints(points)
    if hasattr(mapping, "jacobian"):
        return np.asarray(mapping.jacobian(points), dtype=float)
    result = np.empty((len(points), 3, 3))
    for axis in range(3):
        offset = np.zeros(3)
        offset[axis] = stepMm
        result[:, :, axis] = (mapping.transformPoints(points + offset) - mapping.transformPoints(points - offset)) / (2 * stepMm)
    return result


def invertPoints(mapping, targets, initialGuess=None, tolerance=1e-6, maxIterations=50):
    """Solve mapping(x) = targets for x by Newton iterations; returns (x, residual_mm per point).

    Converges for smooth, non-folding mappings from a guess inside the basin (by default the inverse of the
    mapping's affine part when it has one (`affineMatrix`), else the targets themselves). The residual
    |mapping(x) - target| is returned so callers can check convergence instead of trusting it.
    """
    targets = asPoints(targets)
    if initialGuess is not None:
        x = asPoints(initialGuess).copy()
    elif getattr(mapping, "affineMatrix", None) is not None:
        x = AffineMapping(mapping.affineMatrix).inverse().transformPoints(targets)
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
