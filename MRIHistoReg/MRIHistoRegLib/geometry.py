"""Slicer-free matrix and point helpers shared by the registration modules (numpy only, so every module and the
tests can use them without Slicer, VTK or SimpleITK).

Conventions: a 4x4 IJK->RAS matrix maps a continuous voxel index (i, j, k) to RAS mm (Slicer's space); grids are
numpy arrays indexed [k, j, i]; SimpleITK / ITK / NRRD use LPS, which is RAS with x and y negated.

Two point transforms exist on purpose: `applyMatrix` is the matrix-product form most modules used and
`applyMatrixElementwise` the per-row form resample.py used (numpy's matmul with an inner size of 3 is slow on
large arrays). They can differ in the last bit (BLAS may fuse or reorder the sums), so each caller keeps the form
it had and its results stay bit-for-bit what they were.
"""

import numpy as np

# RAS <-> LPS sign per axis (x and y negated); the flip is its own inverse.
LPS_RAS_SIGNS = np.array([-1.0, -1.0, 1.0])


def applyMatrix(matrix, points) -> np.ndarray:
    """Points (..., 3) through a 4x4 affine matrix: points @ A.T + t (any leading shape)."""
    m = np.asarray(matrix, float)
    return np.asarray(points) @ m[:3, :3].T + m[:3, 3]


def applyMatrixElementwise(matrix, points) -> np.ndarray:
    """(N, 3) points through a 4x4 affine matrix, one output row at a time (faster than matmul for large N)."""
    points = np.asarray(points, float)
    result = np.empty(points.shape)
    for row in range(3):
        result[:, row] = (points[:, 0] * matrix[row, 0] + points[:, 1] * matrix[row, 1]
                          + points[:, 2] * matrix[row, 2] + matrix[row, 3])
    return result


def ijkToRasPoints(ijkToRas, ijk) -> np.ndarray:
    """RAS mm of continuous voxel indices (..., 3) in (i, j, k) order."""
    return applyMatrix(ijkToRas, ijk)


def rasToIjkPoints(ijkToRas, ras) -> np.ndarray:
    """Continuous voxel indices (i, j, k) of RAS points (..., 3): the inverse of ijkToRasPoints."""
    return applyMatrix(np.linalg.inv(np.asarray(ijkToRas, float)), ras)


def spacingOf(ijkToRasMatrix) -> np.ndarray:
    """Voxel spacing (i, j, k) in mm from an IJK->RAS matrix (column norms)."""
    return np.linalg.norm(np.asarray(ijkToRasMatrix, float)[:3, :3], axis=0)


def gridPoints(shape, ijkToRas) -> np.ndarray:
    """RAS points of every voxel centre of a [k, j, i] grid, in C order, (N, 3)."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)
    return applyMatrix(ijkToRas, ijk)


def cornerBox(shapeKji, ijkToRas):
    """Axis-aligned RAS bounding box (low, high) of the outer corners of a [k, j, i] grid's voxels (indices -0.5
    and n - 0.5), so a point anywhere inside a boundary voxel is inside the box."""
    nk, nj, ni = shapeKji
    corners = np.array([[i, j, k] for i in (-0.5, ni - 0.5) for j in (-0.5, nj - 0.5) for k in (-0.5, nk - 0.5)])
    ras = applyMatrix(ijkToRas, corners)
    return ras.min(axis=0), ras.max(axis=0)


def flipPointsLpsRas(points) -> np.ndarray:
    """Points or vectors (..., 3) from LPS to RAS or back (x and y negated; exact)."""
    return np.asarray(points, float) * LPS_RAS_SIGNS


def flipGeometryLpsRas(ijkToXyz) -> np.ndarray:
    """An IJK->RAS matrix as IJK->LPS or back: the first two rows negated (the index side is unchanged)."""
    m = np.array(ijkToXyz, dtype=float)
    m[:2, :] *= -1
    return m


def flipTransformLpsRas(matrix) -> np.ndarray:
    """A 4x4 point transform within LPS as the same transform within RAS, or back: F @ M @ F with F = diag(-1, -1,
    1, 1). Written as a sign pattern, which is exact (F @ M @ F only moves signs)."""
    signs = np.append(LPS_RAS_SIGNS, 1.0)
    return np.asarray(matrix, float) * np.outer(signs, signs)


def composeMatrices(*matrices) -> np.ndarray:
    """The 4x4 product of matrices, left to right: composeMatrices(A, B)(p) = A(B(p)) (B applied first)."""
    result = np.eye(4)
    for matrix in matrices:
        result = result @ np.asarray(matrix, float)
    return result


def indexToIndex(fromIjkToRas, toIjkToRas) -> np.ndarray:
    """4x4 matrix from one grid's continuous voxel index to another's: inv(toIjkToRas) @ fromIjkToRas."""
    return np.linalg.inv(np.asarray(toIjkToRas, float)) @ np.asarray(fromIjkToRas, float)
