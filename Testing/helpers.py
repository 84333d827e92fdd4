"""Shared test helpers (ground truth built by construction): grids, a smooth analytic warp, random rotations,
random stacks and TIFF files of them, and the elastix point-set reader for the lung landmark test data. The test modules import them as `from helpers import ...` (pytest puts
Testing/ on sys.path: it has no __init__.py)."""
import os

import numpy as np


def grid(shape, spacing, origin=(0.0, 0.0, 0.0)):
    """(shape (nk, nj, ni), IJK->RAS 4x4) of an axis-aligned grid; spacing one value or (i, j, k) in mm."""
    m = np.diag(list(np.broadcast_to(np.asarray(spacing, float), (3,))) + [1.0])
    m[:3, 3] = origin
    return tuple(shape), m


class SineWarp:
    """x -> A x + t + a * sin(2 pi x[perm] / L): smooth, non-folding for small a, analytic Jacobian."""

    def __init__(self, matrix, amplitude=0.15, wavelength=4.0):
        self.matrix = np.asarray(matrix, float)
        self.affineMatrix = self.matrix
        self.amplitude = amplitude
        self.k = 2 * np.pi / wavelength
        self.perm = [1, 2, 0]

    def transformPoints(self, points):
        points = np.atleast_2d(np.asarray(points, float))
        return points @ self.matrix[:3, :3].T + self.matrix[:3, 3] + self.amplitude * np.sin(self.k * points[:, self.perm])

    def jacobian(self, points):
        points = np.atleast_2d(np.asarray(points, float))
        jac = np.broadcast_to(self.matrix[:3, :3], (len(points), 3, 3)).copy()
        for row, col in enumerate(self.perm):
            jac[:, row, col] += self.amplitude * self.k * np.cos(self.k * points[:, col])
        return jac


def ellipsoidOccupancy(shape, ijkToRas, centre, radii, supersample=4):
    """Fraction of each voxel [k, j, i] inside an axis-aligned ellipsoid (RAS centre and radii, mm), from
    supersample^3 sub-voxel samples: partial volume exact to 1/supersample^3."""
    nk, nj, ni = shape
    ijkToRas = np.asarray(ijkToRas, float)
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    covered = np.zeros(shape)
    kk, jj, ii = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    for a in offsets:
        for b in offsets:
            for c in offsets:
                index = np.stack([ii + a, jj + b, kk + c], -1)
                ras = index @ ijkToRas[:3, :3].T + ijkToRas[:3, 3]
                covered += (((ras - centre) / radii) ** 2).sum(-1) <= 1.0
    return covered / supersample ** 3


def randomRotation(rng):
    """A uniformly random proper rotation (3x3, det +1) from `rng`."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def randomStack(shape, seed=0, dtype=np.uint16):
    """A reproducible random integer stack [k, j, i] spanning the dtype's range."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)


def writeTiff(path, array, **kwargs):
    """`array` [k, j, i] as a grayscale multipage TIFF at `path` (tifffile keywords pass through); returns path."""
    import tifffile

    tifffile.imwrite(path, array, photometric="minisblack", **kwargs)
    return path


def readElastixPoints(path):
    """(labels '1'..'N', points) from an elastix point-set file ('point' or 'index', count, then x y z rows), for
    the lung landmark test data. Coordinates are returned as written: physical LPS for 'point' files, voxel
    indices for 'index' files (not mm), so this is a test reader, not a user import."""
    path = os.fspath(path)
    with open(path) as stream:
        lines = [line.split() for line in stream if line.strip()]
    if len(lines) < 2 or lines[0][0] not in ("point", "index"):
        raise ValueError(f"{path} is not an elastix point-set file (line 1 'point' or 'index', line 2 the count).")
    count = int(lines[1][0])
    points = np.array([[float(v) for v in line[:3]] for line in lines[2:2 + count]], float).reshape(-1, 3)
    if len(points) != count:
        raise ValueError(f"{path}: header says {count} points, found {len(points)}.")
    return [str(i + 1) for i in range(count)], points
