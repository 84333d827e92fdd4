"""geometry.py against independent references: hand-worked matrices, SimpleITK's index -> physical point (LPS)
and VTK's vtkMatrix4x4 / vtkTransform, so no expectation comes from the module itself."""
import numpy as np
import pytest

from MRIHistoRegLib import geometry

sitk = pytest.importorskip("SimpleITK")
vtk = pytest.importorskip("vtk")

# An oblique IJK->RAS matrix: spacing (0.5, 2, 3) mm along rotated axes, origin (10, -20, 5).
_ROTATION = np.array([[0.0, -1.0, 0.0], [0.8, 0.0, 0.6], [-0.6, 0.0, 0.8]])
_SPACING = np.array([0.5, 2.0, 3.0])
_ORIGIN = np.array([10.0, -20.0, 5.0])
_IJK_TO_RAS = np.eye(4)
_IJK_TO_RAS[:3, :3] = _ROTATION * _SPACING[None, :]
_IJK_TO_RAS[:3, 3] = _ORIGIN


def _vtkMatrix(array):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r][c]))
    return m


def _fromVtk(m):
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtkPoints(matrix, points):
    transform = vtk.vtkTransform()
    transform.SetMatrix(_vtkMatrix(matrix))
    return np.array([transform.TransformPoint([float(v) for v in p]) for p in points])


def _sitkImage(shapeKji, ijkToRas):
    """A SimpleITK image with the LPS geometry of a RAS IJK->RAS matrix, built by hand from its parts."""
    image = sitk.Image([int(n) for n in shapeKji[::-1]], sitk.sitkUInt8)
    spacing = np.linalg.norm(ijkToRas[:3, :3], axis=0)
    lpsDirection = np.diag([-1.0, -1.0, 1.0]) @ (ijkToRas[:3, :3] / spacing)
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in lpsDirection.ravel()])
    image.SetOrigin([float(-ijkToRas[0, 3]), float(-ijkToRas[1, 3]), float(ijkToRas[2, 3])])
    return image


def _randomMatrix(seed):
    rng = np.random.default_rng(seed)
    m = np.eye(4)
    m[:3, :] = rng.normal(size=(3, 4))
    return m


def testApplyMatrixHandWorked():
    # x' = 2x + 1, y' = z - 3, z' = -y + 0.5
    matrix = np.array([[2.0, 0, 0, 1], [0, 0, 1, -3], [0, -1, 0, 0.5], [0, 0, 0, 1]])
    points = np.array([[1.0, 2.0, 3.0], [-1.0, 0.0, 4.0]])
    expected = np.array([[3.0, 0.0, -1.5], [-1.0, 1.0, 0.5]])
    np.testing.assert_array_equal(geometry.applyMatrix(matrix, points), expected)
    np.testing.assert_array_equal(geometry.applyMatrixElementwise(matrix, points), expected)


@pytest.mark.parametrize("function", [geometry.applyMatrix, geometry.applyMatrixElementwise])
def testApplyMatrixMatchesVtkTransform(function):
    matrix = _randomMatrix(1)
    points = np.random.default_rng(2).uniform(-50, 50, size=(20, 3))
    np.testing.assert_allclose(function(matrix, points), _vtkPoints(matrix, points), rtol=0, atol=1e-12)


def testApplyMatrixKeepsLeadingShape():
    matrix = _randomMatrix(3)
    points = np.random.default_rng(4).normal(size=(2, 5, 3))
    expected = _vtkPoints(matrix, points.reshape(-1, 3)).reshape(2, 5, 3)
    np.testing.assert_allclose(geometry.applyMatrix(matrix, points), expected, atol=1e-12)


def testIjkToRasMatchesSimpleItkIndexToPhysicalPoint():
    image = _sitkImage((4, 5, 6), _IJK_TO_RAS)
    ijk = np.array([[0, 0, 0], [5, 4, 3], [2, 1, 3], [1, 4, 0]])
    lps = np.array([image.TransformIndexToPhysicalPoint([int(v) for v in p]) for p in ijk])
    ras = lps * [-1.0, -1.0, 1.0]
    np.testing.assert_allclose(geometry.ijkToRasPoints(_IJK_TO_RAS, ijk), ras, atol=1e-12)


def testRasToIjkMatchesSimpleItkPhysicalPointToIndex():
    image = _sitkImage((4, 5, 6), _IJK_TO_RAS)
    ras = np.array([[10.0, -20.0, 5.0], [3.0, -17.5, 9.25], [-1.0, -12.0, 2.0]])
    index = np.array([image.TransformPhysicalPointToContinuousIndex([float(-p[0]), float(-p[1]), float(p[2])])
                      for p in ras])
    np.testing.assert_allclose(geometry.rasToIjkPoints(_IJK_TO_RAS, ras), index, atol=1e-12)


def testSpacingOfIsTheColumnLengths():
    # hand-worked: the columns are unit axes scaled by the spacing, so their lengths are the spacing
    np.testing.assert_allclose(geometry.spacingOf(_IJK_TO_RAS), _SPACING, rtol=1e-15)
    np.testing.assert_allclose(geometry.spacingOf(np.diag([-0.25, 3.0, 1.5, 1.0])), [0.25, 3.0, 1.5], rtol=0)


def testVolumesReexportsSpacingOf():
    volumes = pytest.importorskip("MRIHistoRegLib.volumes")
    assert volumes.spacingOf is geometry.spacingOf


def testGridPointsMatchSimpleItkInCOrder():
    shape = (2, 3, 4)  # [k, j, i]
    image = _sitkImage(shape, _IJK_TO_RAS)
    expected = [image.TransformIndexToPhysicalPoint((i, j, k))
                for k in range(shape[0]) for j in range(shape[1]) for i in range(shape[2])]
    expected = np.array(expected) * [-1.0, -1.0, 1.0]
    np.testing.assert_allclose(geometry.gridPoints(shape, _IJK_TO_RAS), expected, atol=1e-12)


def testCornerBoxHandWorked():
    # spacing (1, 2, 4), origin (10, 20, 30), axes flipped on x: voxel i = 0..2 covers x = 10.5 .. 7.5
    matrix = np.diag([-1.0, 2.0, 4.0, 1.0])
    matrix[:3, 3] = [10.0, 20.0, 30.0]
    low, high = geometry.cornerBox((5, 4, 3), matrix)  # nk, nj, ni
    np.testing.assert_allclose(low, [7.5, 19.0, 28.0])
    np.testing.assert_allclose(high, [10.5, 27.0, 48.0])


def testCornerBoxMatchesSimpleItkContinuousCorners():
    shape = (4, 5, 6)
    image = _sitkImage(shape, _IJK_TO_RAS)
    corners = [image.TransformContinuousIndexToPhysicalPoint([i, j, k])
               for i in (-0.5, 5.5) for j in (-0.5, 4.5) for k in (-0.5, 3.5)]
    ras = np.array(corners) * [-1.0, -1.0, 1.0]
    low, high = geometry.cornerBox(shape, _IJK_TO_RAS)
    np.testing.assert_allclose(low, ras.min(axis=0), atol=1e-12)
    np.testing.assert_allclose(high, ras.max(axis=0), atol=1e-12)


def testFlipPointsHandWorked():
    points = np.array([[1.0, -2.0, 3.0], [0.5, 0.25, -4.0]])
    np.testing.assert_array_equal(geometry.flipPointsLpsRas(points), [[-1.0, 2.0, 3.0], [-0.5, -0.25, -4.0]])


def testFlipGeometryGivesSimpleItkLpsGeometry():
    image = _sitkImage((3, 3, 3), _IJK_TO_RAS)
    ijkToLps = geometry.flipGeometryLpsRas(_IJK_TO_RAS)
    for index in ([0, 0, 0], [2, 1, 0], [1, 2, 2]):
        expected = image.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose((ijkToLps @ (index + [1]))[:3], expected, atol=1e-12)
    assert not np.shares_memory(ijkToLps, _IJK_TO_RAS)


def testFlipTransformMatchesVtkConjugation():
    matrix = _randomMatrix(5)
    flip = vtk.vtkMatrix4x4()
    flip.SetElement(0, 0, -1.0)
    flip.SetElement(1, 1, -1.0)
    half, full = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(flip, _vtkMatrix(matrix), half)
    vtk.vtkMatrix4x4.Multiply4x4(half, flip, full)
    np.testing.assert_allclose(geometry.flipTransformLpsRas(matrix), _fromVtk(full), atol=1e-15)


def testComposeMatricesMatchesVtkTransformConcatenation():
    a, b, c = _randomMatrix(6), _randomMatrix(7), _randomMatrix(8)
    transform = vtk.vtkTransform()  # PreMultiply (default): the last concatenated matrix is applied first
    for m in (a, b, c):
        transform.Concatenate(_vtkMatrix(m))
    np.testing.assert_allclose(geometry.composeMatrices(a, b, c), _fromVtk(transform.GetMatrix()), atol=1e-12)
    points = np.random.default_rng(9).normal(size=(6, 3))
    expected = np.array([transform.TransformPoint([float(v) for v in p]) for p in points])
    np.testing.assert_allclose(geometry.applyMatrix(geometry.composeMatrices(a, b, c), points), expected, atol=1e-12)
    np.testing.assert_allclose(geometry.composeMatrices(), np.eye(4))


def testIndexToIndexMatchesSimpleItkRoundTrip():
    coarse = _IJK_TO_RAS.copy()
    coarse[:3, :3] *= 2.0
    coarse[:3, 3] += [1.0, 2.0, -3.0]
    fine, other = _sitkImage((4, 4, 4), _IJK_TO_RAS), _sitkImage((4, 4, 4), coarse)
    toCoarse = geometry.indexToIndex(_IJK_TO_RAS, coarse)
    for index in ([0, 0, 0], [3, 1, 2], [1, 3, 0]):
        expected = other.TransformPhysicalPointToContinuousIndex(fine.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose((toCoarse @ (index + [1]))[:3], expected, atol=1e-12)
