"""resample.py: one resampling through any mapping, verified lattice, anti-aliasing, streamed stacks.

Ground truth from construction (analytic images and mappings) and from VTK's vtkImageReslice as an
independent implementation."""
import numpy as np
import pytest
import vtk
from vtk.util import numpy_support

from MRIHistoRegLib import resample
from MRIHistoRegLib.mapping import AffineMapping
from helpers import SineWarp, grid


def affine(scale=0.9, angle=0.2, shift=(0.3, -0.2, 0.1)):
    c, s = np.cos(angle), np.sin(angle)
    m = np.eye(4)
    m[:3, :3] = scale * np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    m[:3, 3] = shift
    return m


def rasOfGrid(shape, ijkToRas):
    kk, jj, ii = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    index = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
    return index @ ijkToRas[:3, :3].T + ijkToRas[:3, 3]


def smoothImage(ras):
    x, y, z = ras[:, 0], ras[:, 1], ras[:, 2]
    return np.sin(2 * np.pi * x / 3.0) * np.cos(2 * np.pi * y / 4.0) + 0.5 * np.sin(2 * np.pi * z / 5.0)


def tpsModel(count, seed, extentMm):
    from MRIHistoRegLib import fitting

    rng = np.random.default_rng(seed)
    fixed = rng.uniform(0.1, 0.9, (count, 3)) * extentMm
    moving = fixed @ np.diag([0.9, 0.92, 0.88]) + 0.2 + 0.2 * np.sin(fixed[:, [1, 2, 0]] / 2.0)
    return fitting.fitLandmarks(fixed, moving, "affine+tps")


def test_phantom_through_analytic_warp_matches_the_analytic_image():
    srcShape, srcM = grid((60, 70, 80), 0.1)
    refShape, refM = grid((30, 36, 40), 0.15, origin=(0.6, 0.6, 0.5))
    warp = SineWarp(affine(0.92, 0.15, (0.4, 0.3, 0.2)))
    source = smoothImage(rasOfGrid(srcShape, srcM)).reshape(srcShape).astype(np.float32)
    out, info = resample.resampleToGrid((source, srcM), warp, refShape, refM, antiAlias=False)
    expected = smoothImage(warp.transformPoints(rasOfGrid(refShape, refM))).reshape(refShape)
    srcIndex = (warp.transformPoints(rasOfGrid(refShape, refM)) - srcM[:3, 3]) / 0.1
    inside = np.all((srcIndex >= 1) & (srcIndex <= np.array(srcShape[::-1]) - 2), axis=1).reshape(refShape)
    assert inside.mean() > 0.5
    # trilinear error of this image at 0.1 mm is <= sum h^2 |f''| / 8 ~ 0.02
    assert np.abs(out - expected)[inside].max() < 0.025
    assert info["probe_max_error_voxels"] <= 0.1 and info["probe_p99_error_voxels"] <= 0.02
    assert np.isfinite(out).all()


def _vtkReslice(source, srcM, refShape, refM, transform):
    image = vtk.vtkImageData()
    nk, nj, ni = source.shape
    image.SetDimensions(ni, nj, nk)
    image.SetSpacing(*np.diag(srcM)[:3])
    image.SetOrigin(*srcM[:3, 3])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(source.ravel(), deep=True))
    reslice = vtk.vtkImageReslice()
    reslice.SetInputData(image)
    reslice.SetResliceTransform(transform)
    reslice.SetInterpolationModeToLinear()
    reslice.SetOutputSpacing(*np.diag(refM)[:3])
    reslice.SetOutputOrigin(*refM[:3, 3])
    reslice.SetOutputExtent(0, refShape[2] - 1, 0, refShape[1] - 1, 0, refShape[0] - 1)
    reslice.SetBackgroundLevel(0.0)
    reslice.Update()
    return numpy_support.vtk_to_numpy(reslice.GetOutput().GetPointData().GetScalars()).reshape(refShape)


def test_matches_vtk_image_reslice_with_affine_and_thin_plate_spline():
    rng = np.random.default_rng(3)
    srcShape, srcM = grid((40, 50, 60), 0.1)
    refShape, refM = grid((36, 44, 52), 0.11, origin=(0.3, 0.3, 0.2))
    source = (smoothImage(rasOfGrid(srcShape, srcM)) + 0.2 * rng.random(int(np.prod(srcShape)))).reshape(srcShape).astype(np.float32)
    interior = np.zeros(refShape, bool)
    interior[3:-3, 3:-3, 3:-3] = True

    m = affine(0.95, 0.1, (0.2, 0.1, 0.15))
    vtkTransform = vtk.vtkTransform()
    vtkTransform.SetMatrix(np.asarray(m).ravel().tolist())
    ours, _ = resample.resampleToGrid((source, srcM), AffineMapping(m), refShape, refM, antiAlias=False)
    theirs = _vtkReslice(source, srcM, refShape, refM, vtkTransform)
    assert np.abs(ours - theirs)[interior].max() < 1e-4

    model = tpsModel(40, 4, np.array([5.5, 4.5, 3.7]))
    tps = vtk.vtkThinPlateSplineTransform()
    tps.SetBasisToR()
    src, dst = vtk.vtkPoints(), vtk.vtkPoints()
    for a, b in zip(model.tpsCentres, model.transformPoints(model.tpsCentres)):
        src.InsertNextPoint(*a)
        dst.InsertNextPoint(*b)
    tps.SetSourceLandmarks(src)
    tps.SetTargetLandmarks(dst)
    ours, info = resample.resampleToGrid((source, srcM), model, refShape, refM, antiAlias=False)
    theirs = _vtkReslice(source, srcM, refShape, refM, tps)
    mapped = (model.transformPoints(rasOfGrid(refShape, refM)) - srcM[:3, 3]) / 0.1
    inside = interior & np.all((mapped >= 1) & (mapped <= np.array(srcShape[::-1]) - 2), axis=1).reshape(refShape)
    assert inside.mean() > 0.4
    # the lattice's coordinate error (<= 0.1 voxel) times the image gradient bounds the difference
    difference = np.abs(ours - theirs)[inside]
    assert difference.max() < 0.1 and np.percentile(difference, 99) < 0.03
    assert info["lattice_step_voxels"][0] > 1  # a real lattice, not the exact map everywhere


def test_lattice_within_target_at_fresh_points_and_on_the_grid():
    refShape, refM = grid((40, 60, 50), 0.1)
    model = tpsModel(60, 7, np.array([5.0, 6.0, 4.0]))
    lattice = resample.LatticeMapping(model, refShape, refM, maxErrorVoxels=0.1)
    assert lattice.maxErrorVoxels <= 0.1 and lattice.p99ErrorVoxels <= 0.02
    rng = np.random.default_rng(99)
    points = rng.uniform(-0.5, np.array(refShape[::-1]) - 0.5, (20000, 3))
    exact = model.transformPoints(points @ refM[:3, :3].T + refM[:3, 3])
    approx = lattice.interpolate(points)
    errorVoxels = np.linalg.norm(approx - exact, axis=1) / np.linalg.svd(lattice.linearPart, compute_uv=False).min()
    assert errorVoxels.max() < 0.12 and np.percentile(errorVoxels, 99) < 0.025
    # the separable grid path (what resampleToGrid uses) agrees with the exact map on whole slabs
    ks = np.arange(10, 18, dtype=float)
    g = lattice.evaluateGrid(ks, np.arange(60.0), np.arange(50.0))
    kk, jj, ii = np.meshgrid(ks, np.arange(60.0), np.arange(50.0), indexing="ij")
    ras = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1) @ refM[:3, :3].T
    exactGrid = model.transformPoints(ras)
    gridError = np.linalg.norm(g.reshape(3, -1).T - exactGrid, axis=1) / np.linalg.svd(lattice.linearPart, compute_uv=False).min()
    assert gridError.max() < 0.12 and np.percentile(gridError, 99) < 0.025
    # without the cone corrections the same lattice errs several times more near the landmarks
    withCones = lattice.maxErrorVoxels
    lattice._cones = None
    lattice._verify()
    assert lattice.maxErrorVoxels > 2 * withCones


def test_bright_block_lands_where_the_mapping_says():
    srcShape, srcM = grid((50, 50, 50), 0.1)
    source = np.zeros(srcShape, np.float32)
    source[20:30, 15:25, 25:35] = 100.0  # block centre at source index (29.5, 19.5, 24.5) (i, j, k)
    m = affine(0.8, 0.3, (0.5, -0.4, 0.3))
    refShape, refM = grid((60, 60, 60), 0.1, origin=(-1.0, -1.0, -1.0))
    out, _ = resample.resampleToGrid((source, srcM), AffineMapping(m), refShape, refM, antiAlias=False)
    weights = out.ravel()
    centroidRef = (rasOfGrid(refShape, refM) * weights[:, None]).sum(0) / weights.sum()
    blockCentre = np.array([29.5, 19.5, 24.5]) * 0.1
    assert np.linalg.norm(AffineMapping(m).transformPoints(centroidRef)[0] - blockCentre) < 0.01
    # mass: the block's volume seen from the reference space is 1 mm^3 / det(A)
    volume = weights.sum() / 100.0 * 0.001
    assert volume == pytest.approx(1.0 / np.linalg.det(m[:3, :3]), rel=0.03)


def _fineCheckerWithRamp(shape):
    kk, jj, ii = np.indices(shape)
    return (((ii + jj + kk) % 2) + 0.01 * ii).astype(np.float32)


def test_anti_aliasing_box_averages_a_fine_pattern_and_does_not_alias():
    fineShape, fineM = grid((60, 60, 60), 0.02, origin=(0.0, 0.0, 0.0))
    source = _fineCheckerWithRamp(fineShape)
    # output voxels of 0.1 mm exactly covering 5x5x5 source voxels: the box average is the truth
    outShape, outM = grid((12, 12, 12), 0.1, origin=(0.04, 0.04, 0.04))
    truth = source.reshape(12, 5, 12, 5, 12, 5).mean(axis=(1, 3, 5))
    out, info = resample.resampleToGrid((source, fineM), AffineMapping(np.eye(4)), outShape, outM)
    assert info["anti_alias_factors"] == pytest.approx([5, 5, 5])
    assert np.abs(out - truth).max() < 1e-4
    aliased, _ = resample.resampleToGrid((source, fineM), AffineMapping(np.eye(4)), outShape, outM, antiAlias=False)
    assert np.abs(aliased - truth).max() > 0.3  # without the box filter the checkerboard aliases


def test_anti_aliasing_under_a_scaling_map_matches_box_average_of_the_footprint():
    # reference 0.1 mm, mapping shrinks by 0.8: one output voxel covers 0.08 mm of a 0.01 mm source = 8 voxels
    fineShape, fineM = grid((8, 400, 400), 0.01)
    rng = np.random.default_rng(5)
    source = rng.random(fineShape).astype(np.float32)
    m = np.diag([0.8, 0.8, 1.0, 1.0])
    m[:3, 3] = [-0.285, -0.285, 0.0]  # output voxel j <-> source voxels 8j..8j+7 (centre 0.035 + 0.08 j mm)
    outShape, outM = grid((1, 50, 50), 0.1, origin=(0.4, 0.4, 0.035))
    out, info = resample.resampleToGrid((source, fineM), AffineMapping(m), outShape, outM)
    assert info["anti_alias_factors"][:2] == pytest.approx([8, 8])
    truth = source.mean(axis=0).reshape(50, 8, 50, 8).mean(axis=(1, 3))
    interior = (slice(None), slice(1, -1), slice(1, -1))
    assert np.abs(out[0][interior[1:]] - truth[1:-1, 1:-1]).max() < 1e-4
    # the output noise has the variance of 8x8x8-voxel means, not of single voxels (no aliasing)
    assert out.std() < 2 * source.std() / np.sqrt(512)


def test_stack_source_is_streamed_and_matches_the_array_path(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    from MRIHistoRegLib import stacks

    rng = np.random.default_rng(2)
    array = (rng.random((30, 80, 90)) * 1000).astype(np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, array)
    stack = stacks.openStack(str(path), spacingMm=(0.02, 0.02, 0.03))
    srcM = stack.ijkToRas()
    refShape, refM = grid((8, 20, 20), 0.08, origin=(-1.5, -1.4, 0.1))
    warp = SineWarp(np.eye(4), amplitude=0.05, wavelength=3.0)
    viaStack, infoStack = resample.resampleToGrid(stack, warp, refShape, refM)
    viaArray, infoArray = resample.resampleToGrid((array, srcM), warp, refShape, refM)
    assert infoStack["anti_alias_factors"][0] > 3
    # one box filter (downsample.downsampleStack) for both: the array goes through stacks.ArraySource
    assert infoStack["level_by"] == infoArray["level_by"] == "downsample.downsampleStack"
    assert infoStack["level_shape_kji"] == infoArray["level_shape_kji"]
    assert np.abs(viaStack - viaArray).max() < 0.01
    assert np.array_equal(viaStack, viaArray)  # the same data, the same filter: the same output
    plain, _ = resample.resampleToGrid(stack, warp, refShape, refM, antiAlias=False)
    plainArray, _ = resample.resampleToGrid((array, srcM), warp, refShape, refM, antiAlias=False)
    assert np.abs(plain - plainArray).max() < 1e-3


def test_resample_to_reference_node_has_the_reference_geometry(scene):
    from MRIHistoRegLib import volumes

    refShape, refM = grid((10, 12, 14), 0.2, origin=(1.0, 2.0, 3.0))
    reference = volumes.createVolumeNode(scene, np.zeros(refShape, np.float32), refM, "MRI")
    srcShape, srcM = grid((20, 20, 20), 0.2)
    source = smoothImage(rasOfGrid(srcShape, srcM)).reshape(srcShape).astype(np.float32)
    node = resample.resampleToReference(scene, (source, srcM), AffineMapping(affine(1.0, 0.0, (-1.0, -2.0, -3.0))),
                                        reference, "Histology on MRI")
    assert np.allclose(volumes.ijkToRas(node), refM)
    out = volumes.arrayFromVolume(node)
    assert out.shape == refShape
    assert np.abs(out[:, :, :] - source[:10, :12, :14]).max() < 1e-5  # pure translation by whole voxels


def test_volume_node_source_takes_the_same_box_filter_as_an_array(scene):
    from MRIHistoRegLib import volumes

    fineShape, fineM = grid((30, 40, 50), 0.02, origin=(0.5, -0.3, 0.2))
    source = _fineCheckerWithRamp(fineShape)
    node = volumes.createVolumeNode(scene, source, fineM, "histology")
    outShape, outM = grid((5, 7, 9), 0.1, origin=(0.54, -0.26, 0.24))
    viaNode, infoNode = resample.resampleToGrid(node, AffineMapping(np.eye(4)), outShape, outM)
    viaArray, infoArray = resample.resampleToGrid((source, fineM), AffineMapping(np.eye(4)), outShape, outM)
    assert infoNode["level_by"] == infoArray["level_by"] == "downsample.downsampleStack"
    assert np.array_equal(viaNode, viaArray)
    truth = source[:25, :35, :45].reshape(5, 5, 7, 5, 9, 5).mean(axis=(1, 3, 5))  # 5x5x5 boxes from the corner
    assert np.abs(viaNode - truth).max() < 1e-4


def test_reference_grid_from_footprint_covers_the_mapped_stack():
    srcShape, srcM = grid((20, 40, 30), 0.05)
    m = np.diag([0.8, 0.8, 0.8, 1.0])
    m[:3, 3] = [0.1, 0.2, 0.3]
    shape, ijkToRas = resample.referenceGridFromFootprint(srcShape, srcM, AffineMapping(m), 0.03)
    # footprint of the stack [-0.025, n*0.05 - 0.025] mapped back by the inverse affine
    low = (np.array([-0.025] * 3) - m[:3, 3]) / 0.8
    high = (np.array([30, 40, 20]) * 0.05 - 0.025 - m[:3, 3]) / 0.8
    gridLow = ijkToRas[:3, 3] - 0.015
    gridHigh = gridLow + np.array(shape[::-1]) * 0.03
    assert np.all(gridLow <= low + 1e-9) and np.all(gridHigh >= high - 1e-9)
    assert np.all(gridHigh - high < 0.03 + 1e-9)
    assert np.allclose(np.diag(ijkToRas)[:3], 0.03)


def test_nearest_interpolation_and_fill_outside_the_source():
    srcShape, srcM = grid((10, 12, 14), 0.1)
    rng = np.random.default_rng(8)
    source = rng.integers(0, 5, srcShape).astype(np.uint8)
    shift = np.eye(4)
    shift[:3, 3] = [0.2, 0.1, 0.3]  # whole voxels: output (i, j, k) <- source (i + 2, j + 1, k + 3)
    refShape, refM = grid((10, 12, 14), 0.1)
    out, info = resample.resampleToGrid((source, srcM), AffineMapping(shift), refShape, refM,
                                        interpolation="nearest", antiAlias=False, fill=-1.0)
    assert np.array_equal(out[:7, :11, :12], source[3:, 1:, 2:])
    assert np.all(out[7:] == -1.0) and np.all(out[:, 11:] == -1.0) and np.all(out[:, :, 12:] == -1.0)
    with pytest.raises(ValueError, match="interpolation"):
        resample.resampleToGrid((source, srcM), AffineMapping(shift), refShape, refM, interpolation="cubic")


def test_every_mapping_class_derives_from_the_mapping_interface():
    """Code asks mapping.Mapping for the affine part and the Jacobian: a mapping class that is not one would
    silently lose its affine start and analytic Jacobian. Objects of the older duck-typed convention are wrapped
    by asMapping (with their own Jacobian and affine part); anything else is refused."""
    import inspect

    from MRIHistoRegLib import compare, fitting, mapping, refine, sampledata, transforms

    found = [cls for module in (mapping, fitting, refine, resample, compare, sampledata, transforms)
             for _, cls in inspect.getmembers(module, inspect.isclass)
             if cls.__module__ == module.__name__ and hasattr(cls, "transformPoints")]
    assert len(found) >= 10
    assert [cls for cls in found if not issubclass(cls, mapping.Mapping)] == []
    warp = SineWarp(affine())
    wrapped = mapping.asMapping(warp)
    assert isinstance(wrapped, mapping.Mapping) and np.array_equal(wrapped.linearMatrix(), affine())
    points = np.random.default_rng(0).uniform(0, 2, (5, 3))
    assert np.array_equal(mapping.jacobianOf(warp, points), warp.jacobian(points))
    assert mapping.asMapping(AffineMapping(affine())).isLinear
    with pytest.raises(ValueError, match="transformPoints"):
        mapping.asMapping(np.eye(4))


def test_sitkImageGeometryIsTheRasMatrixInLps():
    """volumes.sitkImageFromArray: every voxel's SimpleITK (LPS) physical point is its RAS position, x/y negated."""
    from MRIHistoRegLib.volumes import sitkImageFromArray

    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    m = np.eye(4)
    m[:3, :3] = q * [0.3, 0.5, 2.0]
    m[:3, 3] = [4.0, -7.0, 1.5]
    array = rng.random((3, 4, 5))
    image = sitkImageFromArray(array, m, dtype=np.float32)
    assert image.GetSize() == (5, 4, 3) and image.GetPixelIDTypeAsString() == "32-bit float"
    for ijk in ([0, 0, 0], [4, 3, 2], [1, 2, 1]):
        ras = m[:3, :3] @ ijk + m[:3, 3]
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(ijk), ras * [-1, -1, 1], atol=1e-12)
    vector = sitkImageFromArray(rng.random((3, 4, 5, 3)), m, isVector=True)
    assert vector.GetNumberOfComponentsPerPixel() == 3 and vector.GetSize() == (5, 4, 3)
    with pytest.raises(ValueError, match="zero-length"):
        sitkImageFromArray(array, np.diag([1.0, 0.0, 1.0, 1.0]))
