"""Streamed downsampling: values against independent float64 references (rational factors by replicate-then-
block-mean; irrational factors by brute-force box integration), exact block means for integer factors, every
source kind, the real brainreg series, output geometry, crop, cancel and the bad inputs."""
import math
import os

import numpy as np
import pytest

from MRIHistoRegLib import downsample, stacks
from MRIHistoRegLib.progress import Cancelled
from MRIHistoRegLib.volumes import arrayFromVolume, ijkToRas, loadVolume
from helpers import randomStack, writeTiff


def _replicateBlockMean(array, repeat, block):
    """Reference for rational factors repeat/block per axis (i, j, k): replicate each voxel `repeat` times, then
    the float64 block mean of `block` (tail dropped) - exact by construction, shares nothing with the code."""
    data = array.astype(np.float64)
    for axis, r in zip((2, 1, 0), repeat):
        data = np.repeat(data, r, axis=axis)
    n = [data.shape[axis] // b for axis, b in zip((2, 1, 0), block)]
    data = data[: n[2] * block[2], : n[1] * block[1], : n[0] * block[0]]
    return data.reshape(n[2], block[2], n[1], block[1], n[0], block[0]).mean(axis=(1, 3, 5))


def _bruteForce(array, factors):
    """Integrate the piecewise-constant image over each output box, voxel by voxel, in float64."""
    fi, fj, fk = factors
    nk, nj, ni = array.shape
    counts = [max(1, int(math.floor(n / f + 1e-9))) for n, f in ((ni, fi), (nj, fj), (nk, fk))]
    out = np.zeros(counts[::-1])
    for ok in range(counts[2]):
        for oj in range(counts[1]):
            for oi in range(counts[0]):
                total = 0.0
                lo = (oi * fi, oj * fj, ok * fk)
                hi = ((oi + 1) * fi, (oj + 1) * fj, (ok + 1) * fk)
                for k in range(int(lo[2]), min(nk, int(math.ceil(hi[2])))):
                    wk = min(k + 1, hi[2]) - max(k, lo[2])
                    for j in range(int(lo[1]), min(nj, int(math.ceil(hi[1])))):
                        wj = min(j + 1, hi[1]) - max(j, lo[1])
                        row = array[k, j]
                        for i in range(int(lo[0]), min(ni, int(math.ceil(hi[0])))):
                            wi = min(i + 1, hi[0]) - max(i, lo[0])
                            total += wk * wj * wi * float(row[i])
                out[ok, oj, oi] = total / (fi * fj * fk)
    return out


def test_rational_factors_match_replicate_block_mean(tmp_path):
    array = randomStack((23, 31, 37))
    source = stacks.openStack(writeTiff(tmp_path / "a.tif", array), spacingMm=(0.01, 0.01, 0.01))
    # factors i = 5/2, j = 7/3, k = 3/2
    out, _ = downsample.downsampleStack(source, (0.025, 0.07 / 3, 0.015))
    reference = _replicateBlockMean(array, (2, 3, 2), (5, 7, 3))
    assert out.shape == reference.shape == (15, 13, 14)
    assert out.dtype == np.float32
    assert np.max(np.abs(out - reference) / np.abs(reference).max()) <= 1e-6


def test_awkward_factors_match_brute_force_integration(tmp_path):
    array = randomStack((17, 21, 26), seed=3)
    spacing = (0.00325, 0.00325, 0.005)
    factors = (3.077, 2.31, 1.93)
    target = tuple(s * f for s, f in zip(spacing, factors))
    source = stacks.openStack(writeTiff(tmp_path / "b.tif", array), spacingMm=spacing)
    out, _ = downsample.downsampleStack(source, target)
    reference = _bruteForce(array, factors)
    assert out.shape == reference.shape
    assert np.max(np.abs(out - reference) / np.abs(reference)) <= 1e-4
    assert np.max(np.abs(out - reference) / np.abs(reference)) <= 1e-6  # in practice float32 rounding only


def test_integer_factors_equal_block_mean_for_every_source_kind(tmp_path):
    import nrrd
    import tifffile

    array = randomStack((12, 18, 20), seed=4)
    reference = array.astype(np.float64).reshape(4, 3, 6, 3, 5, 4).mean(axis=(1, 3, 5)).astype(np.float32)
    series = tmp_path / "series"
    series.mkdir()
    for k in range(array.shape[0]):
        tifffile.imwrite(series / f"p{k}.tif", array[k])
    paths = [writeTiff(tmp_path / "u.tif", array), writeTiff(tmp_path / "z.tif", array, compression="zlib", bigtiff=True), series]
    for name, encoding, detached in (("r.nrrd", "raw", False), ("g.nrrd", "gzip", False), ("d.nhdr", "gzip", True)):
        nrrd.write(str(tmp_path / name), array, {"encoding": encoding, "spacings": [0.5, 0.5, 0.5]}, index_order="C",
                   detached_header=detached)
        paths.append(tmp_path / name)
    for path in paths:
        source = stacks.openStack(path, spacingMm=(0.5, 0.5, 0.5))
        out, _ = downsample.downsampleStack(source, (2.0, 1.5, 1.5))
        assert np.array_equal(out, reference), path


def test_real_brainreg_series_to_100um(sharedData):
    folder = sharedData / "brainreg" / "brain"
    source = stacks.openStack(folder, spacingMm=(0.04, 0.04, 0.05))
    out, matrix = downsample.downsampleStack(source, 0.1)
    # factors 2.5 x 2.5 x 2: replicate 2x in i and j, block 5 x 5 x 2
    whole = source.readAll()
    reference = _replicateBlockMean(whole, (2, 2, 1), (5, 5, 2))
    assert out.shape == reference.shape == (135, 77, 108)
    assert np.max(np.abs(out - reference)) <= 1e-4 * reference.max()
    np.testing.assert_allclose(np.linalg.norm(matrix[:3, :3], axis=0), (0.1, 0.1, 0.1))
    # brainreg's own 100 um resampling of the same data has the same grid (its intensities are rescaled
    # differently, so only the grid is compared)
    import tifffile

    assert tifffile.TiffFile(sharedData / "brainreg" / "registration_output" / "downsampled.tiff").series[0].shape == out.shape


@pytest.mark.parametrize("kind", ["tiff", "nrrd", "array"])
def test_bright_block_lands_at_its_ras_position(tmp_path, kind):
    import nrrd

    array = np.zeros((40, 36, 50), np.uint16)
    array[20:30, 12:24, 10:20] = 1000  # one whole output voxel of 10 x 12 x 10 input voxels
    spacing = (0.00325, 0.004, 0.005)
    angle = 0.4
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    if kind == "tiff":
        source = stacks.openStack(writeTiff(tmp_path / "g.tif", array), spacingMm=spacing)
    elif kind == "nrrd":
        nrrd.write(str(tmp_path / "g.nrrd"), array, {"space": "left-posterior-superior",
                                                    "space directions": (rotation * spacing).T,
                                                    "space origin": [3.0, -2.0, 1.0]}, index_order="C")
        source = stacks.openStack(tmp_path / "g.nrrd")
    else:  # in memory, any IJK->RAS (here rotated, off the origin)
        matrix = np.eye(4)
        matrix[:3, :3] = rotation * spacing
        matrix[:3, 3] = [-3.0, 2.0, 1.0]
        source = stacks.ArraySource(array, matrix)
    target = (10 * spacing[0], 12 * spacing[1], 10 * spacing[2])
    out, matrix = downsample.downsampleStack(source, target)
    assert out.shape == (4, 3, 5)
    peak = np.unravel_index(np.argmax(out), out.shape)
    assert peak == (2, 1, 1) and out[peak] == 1000.0 and np.count_nonzero(out) == 1
    # the block's centre in input voxel-centre coordinates is (14.5, 17.5, 24.5) (i, j, k)
    expectedRas = source.ijkToRas() @ [14.5, 17.5, 24.5, 1.0]
    np.testing.assert_allclose(matrix @ [peak[2], peak[1], peak[0], 1.0], expectedRas, atol=1e-12)
    if kind == "tiff":  # DESIGN section 3: voxel 0's centre at -sx/2 + T/2 along i (LPS i -> RAS -x)
        np.testing.assert_allclose(matrix[:3, 3], [-(-spacing[0] / 2 + target[0] / 2), -(-spacing[1] / 2 + target[1] / 2),
                                                   -spacing[2] / 2 + target[2] / 2])
    assert np.allclose(downsample.outputGeometry(source, target)[0], out.shape)
    np.testing.assert_allclose(downsample.outputGeometry(source, target)[1], matrix)


def test_crop_in_voxels_and_mm(tmp_path):
    array = randomStack((20, 24, 30), seed=5)
    source = stacks.openStack(writeTiff(tmp_path / "c.tif", array), spacingMm=(0.1, 0.1, 0.2))
    crop = ((6, 26), (3, 21), (4, 16))
    out, matrix = downsample.downsampleStack(source, (0.5, 0.3, 0.4), crop=crop)
    reference = array[4:16, 3:21, 6:26].astype(np.float64).reshape(6, 2, 6, 3, 4, 5).mean(axis=(1, 3, 5))
    assert np.array_equal(out, reference.astype(np.float32))
    np.testing.assert_allclose(matrix @ [0, 0, 0, 1], source.ijkToRas() @ [6 + 2, 3 + 1, 4 + 0.5, 1])
    outMm, matrixMm = downsample.downsampleStack(source, (0.5, 0.3, 0.4), crop={"mm": ((0.6, 2.6), (0.3, 2.1), (0.8, 3.2))})
    assert np.array_equal(outMm, out)
    np.testing.assert_allclose(matrixMm, matrix)
    with pytest.raises(ValueError, match="outside the stack"):
        downsample.downsampleStack(source, 0.5, crop=((0, 31), None, None))
    with pytest.raises(ValueError, match="empty"):
        downsample.downsampleStack(source, 0.5, crop=((5, 5), None, None))


def test_array_source_and_stack_source_of_the_same_data_give_identical_outputs(tmp_path):
    """One box filter for stacks and memory: downsampleStack on stacks.ArraySource (in memory, read-ahead thread)
    and on a file source of the same voxels (raw TIFF: two workers, positional row reads; gzip NRRD: one stream)
    give the same bits and geometry, for whole stacks and crops, integer and float (big-endian too) data."""
    import nrrd

    array = randomStack((17, 21, 26), seed=7)
    spacing = (0.00325, 0.00325, 0.005)
    tiff = stacks.openStack(writeTiff(tmp_path / "a.tif", array), spacingMm=spacing)
    inMemory = stacks.ArraySource(array, tiff.ijkToRas())
    assert inMemory.spacingMm == tiff.spacingMm and np.array_equal(inMemory.ijkToRas(), tiff.ijkToRas())
    for target, crop in (((0.01, 0.0075, 0.00965), None), ((0.0065, 0.0101, 0.0113), ((3, 22), (2, 19), (1, 16)))):
        expected, expectedMatrix = downsample.downsampleStack(tiff, target, crop=crop)
        got, matrix = downsample.downsampleStack(inMemory, target, crop=crop)
        assert got.dtype == np.float32 and np.array_equal(got, expected)
        assert np.array_equal(matrix, expectedMatrix)
        assert downsample.outputGeometry(inMemory, target, crop)[0] == got.shape

    floats = np.random.default_rng(8).normal(5.0, 2.0, (13, 15, 17)).astype(np.float32)
    nrrd.write(str(tmp_path / "f.nrrd"), floats, {"encoding": "gzip", "spacings": [0.01, 0.01, 0.02]}, index_order="C")
    gz = stacks.openStack(tmp_path / "f.nrrd")
    factors = (2.6, 1.7, 1.45)
    target = tuple(s * f for s, f in zip(gz.spacingMm, factors))
    expected, expectedMatrix = downsample.downsampleStack(gz, target)
    for copy in (floats, floats.astype(">f4"), floats.astype(np.float64)):
        got, matrix = downsample.downsampleStack(stacks.ArraySource(copy, gz.ijkToRas()), target)
        assert np.array_equal(got, expected), copy.dtype
        assert np.array_equal(matrix, expectedMatrix)
    assert np.abs(expected - _bruteForce(floats, factors)).max() <= 1e-5


def test_axis_shorter_than_one_target_voxel(tmp_path):
    array = randomStack((1, 9, 12), seed=6)  # e.g. a one-file series
    source = stacks.openStack(writeTiff(tmp_path / "one.tif", array), spacingMm=(0.01, 0.01, 0.01))
    out, matrix = downsample.downsampleStack(source, (0.03, 0.03, 0.03))
    reference = array[0].astype(np.float64).reshape(3, 3, 4, 3).mean(axis=(1, 3))
    assert np.array_equal(out[0], reference.astype(np.float32))
    assert matrix[2, 3] == pytest.approx(0.0)  # centred on the single plane


def test_to_node_and_to_file_round_trip(scene, tmp_path):
    array = randomStack((16, 20, 24), seed=7)
    source = stacks.openStack(writeTiff(tmp_path / "n.tif", array), spacingMm=(0.01, 0.01, 0.02))
    node = downsample.downsampleToNode(scene, source, (0.04, 0.05, 0.08))
    out, matrix = downsample.downsampleStack(source, (0.04, 0.05, 0.08))
    np.testing.assert_array_equal(arrayFromVolume(node), out)
    np.testing.assert_allclose(ijkToRas(node), matrix)
    for name in ("out.nrrd", "out.nii.gz"):
        path = downsample.downsampleToFile(source, (0.04, 0.05, 0.08), tmp_path / name)
        loaded = loadVolume(scene, path)  # read back through MRML's own storage node (LPS handling included)
        np.testing.assert_allclose(arrayFromVolume(loaded), out)
        np.testing.assert_allclose(ijkToRas(loaded), matrix, atol=1e-6)


def test_cancel_leaves_nothing(scene, tmp_path):
    array = randomStack((30, 8, 8), seed=8)
    source = stacks.openStack(writeTiff(tmp_path / "x.tif", array), spacingMm=(0.1, 0.1, 0.1))
    seen = []

    def cancelHalfway(fraction, message=""):
        seen.append(fraction)
        return fraction >= 0.5

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Cancelled):
        downsample.downsampleToFile(source, 0.2, out / "d.nrrd", progress=cancelHalfway)
    assert os.listdir(out) == [] and 0.5 <= max(seen) < 1.0
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(Cancelled):
        downsample.downsampleToNode(scene, source, 0.2, progress=cancelHalfway)
    assert scene.GetNumberOfNodes() == nodes
    # the same source still works afterwards (the reader thread was stopped cleanly)
    result, _ = downsample.downsampleStack(source, 0.2)
    assert result.shape == (15, 4, 4)


def test_bad_inputs(tmp_path):
    import nrrd

    array = randomStack((10, 12, 14), seed=9)
    source = stacks.openStack(writeTiff(tmp_path / "b.tif", array), spacingMm=(0.01, 0.01, 0.02))
    with pytest.raises(ValueError, match=r"finer than the stack's spacing.*k: 0.01 < 0.02"):
        downsample.downsampleStack(source, 0.01)
    with pytest.raises(ValueError, match="positive"):
        downsample.downsampleStack(source, (0.05, -1, 0.05))
    with pytest.raises(ValueError, match="positive"):
        downsample.downsampleStack(source, float("nan"))
    # unwritable output: no file (partial or temporary) left anywhere
    with pytest.raises(ValueError, match="does not exist"):
        downsample.downsampleToFile(source, 0.05, tmp_path / "missing" / "o.nrrd")
    with pytest.raises(ValueError, match="Cannot write"):
        downsample.downsampleToFile(source, 0.05, "/proc/o.nrrd")
    with pytest.raises(ValueError, match="is a folder"):
        downsample.downsampleToFile(source, 0.05, tmp_path)
    # a truncated gzip NRRD fails mid-stream: the error names the file, no output is left
    path = tmp_path / "t.nrrd"
    nrrd.write(str(path), array, {"encoding": "gzip"}, index_order="C")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) * 2 // 3)
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(ValueError, match=r"t\.nrrd"):
        downsample.downsampleToFile(stacks.openStack(path, spacingMm=0.01), 0.02, out / "t_small.nrrd")
    assert os.listdir(out) == []


def test_cli_info_and_downsample(tmp_path, caplog):
    import logging

    import nrrd

    from MRIHistoRegLib import cli

    array = randomStack((10, 12, 14), seed=10)
    path = writeTiff(tmp_path / "cli.tif", array)
    wide = writeTiff(tmp_path / "wide.tif", np.zeros((2, 3, 600), np.uint8))
    caplog.set_level(logging.INFO)
    assert cli.main(["info", str(wide)]) == 0
    assert "(2, 3, 600)" in caplog.text and "uint8" in caplog.text
    assert "600 px x 1 mm = 60 cm" in caplog.text and "did you mean um?" in caplog.text
    caplog.clear()
    assert cli.main(["info", str(wide), "--spacing-um", "10"]) == 0
    assert "Plausible" in caplog.text and "(user)" in caplog.text
    out = tmp_path / "small.nrrd"
    assert cli.main(["downsample", str(path), "--spacing-um", "10", "10", "20", "--target-mm", "0.02", "0.02", "0.04",
                     "--out", str(out)]) == 0
    data, header = nrrd.read(str(out), index_order="C")
    reference = array.astype(np.float64).reshape(5, 2, 6, 2, 7, 2).mean(axis=(1, 3, 5)).astype(np.float32)
    np.testing.assert_array_equal(data, reference)
    caplog.clear()
    assert cli.main(["downsample", str(path), "--spacing-um", "0", "10", "20", "--target-mm", "0.02"]) == 2
    assert "positive" in caplog.text


def test_gzip_cancel_and_worker_counts_agree(tmp_path):
    import nrrd

    array = randomStack((24, 30, 28), seed=11)
    nrrd.write(str(tmp_path / "c.nrrd"), array, {"encoding": "gzip"}, index_order="C")
    gz = stacks.openStack(tmp_path / "c.nrrd", spacingMm=0.01)
    with pytest.raises(Cancelled):
        downsample.downsampleStack(gz, 0.025, progress=lambda fraction, message="": fraction > 0.3)
    reference, _ = downsample.downsampleStack(gz, 0.025)  # the stream restarts cleanly after a cancel
    tif = stacks.openStack(writeTiff(tmp_path / "c.tif", array), spacingMm=0.01)
    for workers in (1, 2, 3):
        out, _ = downsample.downsampleStack(tif, 0.025, workers=workers)
        assert np.array_equal(out, reference)


def test_memory_does_not_grow_with_depth(tmp_path):
    """numpy reports its buffers to tracemalloc: the peak must stay a few planes' worth, for 2x the depth too."""
    import tracemalloc

    import tifffile

    peaks = []
    for depth in (40, 80):
        path = tmp_path / f"d{depth}.tif"
        with tifffile.TiffWriter(path) as writer:
            for plane in randomStack((depth, 256, 320), seed=depth):
                writer.write(plane, contiguous=True, photometric="minisblack")
        for kind in ("raw", "gzip"):
            if kind == "gzip":
                import nrrd

                nrrd.write(str(tmp_path / f"d{depth}.nrrd"), tifffile.imread(path), {"encoding": "gzip"}, index_order="C")
                source = stacks.openStack(tmp_path / f"d{depth}.nrrd", spacingMm=0.001)
            else:
                source = stacks.openStack(path, spacingMm=0.001)
            downsample.downsampleStack(source, 0.0101, crop=((0, 320), (0, 256), (0, 11)))  # imports, caches
            for workers in (1, None):  # one worker: deterministic, for the growth check; default: the bound
                tracemalloc.start()
                out, _ = downsample.downsampleStack(source, 0.0101, workers=workers)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                peaks.append((kind, depth, peak, workers))
    planeBytes = 256 * 320 * 2
    for kind, depth, peak, _ in peaks:
        # two workers, each: a run of rows, its row sums, the open output planes (the stack is 40 or 80 planes)
        assert peak < 16 * planeBytes, (kind, depth, peak)
    for kind in ("raw", "gzip"):
        small, large = [peak for k, _, peak, workers in peaks if k == kind and workers == 1]
        assert large < small * 1.25 + planeBytes, peaks


def test_writeVolumeFileWithoutPynrrdSaysHowToInstall(tmp_path, monkeypatch):
    """pynrrd missing: the ValueError from deps (with the pip command) reaches the caller and nothing is written."""
    import sys

    monkeypatch.setitem(sys.modules, "nrrd", None)  # makes `import nrrd` raise ImportError
    with pytest.raises(ValueError, match="pip install pynrrd"):
        downsample.writeVolumeFile(np.zeros((2, 2, 2), np.uint8), np.eye(4), tmp_path / "out.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_baseNameStripsImageExtensions(tmp_path):
    """volumes.baseName: the one extension stripper (volume names, downsampled node names)."""
    from MRIHistoRegLib.volumes import baseName

    assert baseName("/x/histology.ome.tif") == "histology" and baseName("a/MRI.nii.gz") == "MRI"
    assert baseName("b/seg.seg.nrrd") == "seg" and baseName("c/Stack.TIFF") == "Stack"
    assert baseName("d/other.xyz") == "other"
    (tmp_path / "series.v2").mkdir()
    assert baseName(tmp_path / "series.v2") == "series.v2" and baseName(str(tmp_path / "series.v2") + "/") == "series.v2"


def _rawNrrd(path, array, detached=False, content="x"):
    """`array` written by pynrrd as raw NRRD (odd header length by default: the voxels start at an odd
    offset), read back by pynrrd to check the file holds what the reference is computed from."""
    import nrrd

    nrrd.write(str(path), array, {"encoding": "raw", "content": content}, index_order="C", detached_header=detached)
    if not detached and stacks.openStack(path).dataOffset % 2 == 0:
        nrrd.write(str(path), array, {"encoding": "raw", "content": content + "x"}, index_order="C")
    data, _ = nrrd.read(str(path), index_order="C")
    np.testing.assert_array_equal(data, array)
    return path


def _wrapStack(dtype, shape=(45, 31, 40), seed=5):
    """Values that make the integer run sums of the streamed path flush at every kind of place: a range
    whose running bound overflows after a few planes, planes of zeros, saturated voxels, and two columns whose
    sums over a box land exactly on and just past the type's maximum."""
    top = np.iinfo(dtype).max
    rng = np.random.default_rng(seed)
    array = rng.integers(0, top // 7, shape).astype(dtype)
    array[3:6] = 0
    array[10, 4, 9] = top
    array[20] = top
    array[:, 5, 7] = (top + 1) // 4  # four planes sum to top + 1: must not be added in the input type
    array[:, 6, 8] = top // 5  # five planes sum to top exactly
    return array


@pytest.mark.parametrize("dtype,target,crop", [
    (np.uint16, (0.025, 0.03, 0.08), None),  # whole planes inside boxes of 8: groups summed in uint16
    (np.uint16, (0.025, 0.03, 0.075), None),  # k factor 7.5: planes cut by box edges (two outputs each)
    (np.uint16, (0.025, 0.03, 0.08), ((3, 37), (2, 29), (4, 41))),
    (np.uint8, (0.025, 0.03, 0.08), None),
    (">u2", (0.025, 0.03, 0.075), None),  # big-endian: runs swapped after each read
    (np.int16, (0.025, 0.03, 0.08), None),  # types without the integer run sums
    (np.float32, (0.025, 0.03, 0.075), None),
])
def test_streamed_raw_nrrd_matches_replicate_block_mean(tmp_path, monkeypatch, dtype, target, crop):
    """The raw NRRD path (runs of rows, integer run sums over a group of planes, flushes) against the
    independent replicate-then-block-mean reference of the array pynrrd reads back; small runs of rows
    (a few rows each) so that every plane is read in many runs; one and two workers; odd data offset and a
    detached .raw file."""
    monkeypatch.setattr(downsample, "_CHUNK_BYTES", 300)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        array = np.random.default_rng(6).normal(100.0, 30.0, (45, 31, 40)).astype(dtype)
    else:
        array = _wrapStack(dtype.newbyteorder("="))
        if dtype.kind == "i":
            array = (array.astype(np.int32) - 12000).astype(dtype)
        array = array.astype(dtype)
    region = array
    if crop is not None:
        (i0, i1), (j0, j1), (k0, k1) = crop
        region = array[k0:k1, j0:j1, i0:i1]
    kFactor = round(target[2] / 0.01, 6)
    repeatK, blockK = (2, 15) if kFactor == 7.5 else (1, 8)
    reference = _replicateBlockMean(region.astype(np.float64), (2, 1, repeatK), (5, 3, blockK))
    for detached in (False, True):
        path = _rawNrrd(tmp_path / ("s.nhdr" if detached else "s.nrrd"), array, detached=detached)
        source = stacks.openStack(path, spacingMm=0.01)
        assert source.rawPlaneOffset(0) is not None  # the streamed path
        if not detached:
            assert source.dataOffset % 2 == 1
        outs = [downsample.downsampleStack(source, target, crop=crop, workers=w)[0] for w in (1, 2)]
        assert outs[0].shape == reference.shape
        np.testing.assert_array_equal(outs[0], outs[1])
        scale = max(1.0, float(np.abs(reference).max()))
        assert np.max(np.abs(outs[0] - reference)) / scale <= 1e-6, (dtype, target, crop, detached)


@pytest.mark.parametrize("order", ["<", ">"])
def test_streamed_raw_nrrd_with_a_channel_axis(tmp_path, monkeypatch, order):
    """A raw NRRD with a leading channel axis streams in runs of rows too (each run's interleaved voxels read
    once, one channel kept): every channel against the replicate-block-mean reference of pynrrd's array."""
    import nrrd

    monkeypatch.setattr(downsample, "_CHUNK_BYTES", 500)
    channels = np.stack([_wrapStack(np.uint16, (24, 19, 25), seed=s) for s in (7, 8, 9)])  # [c, k, j, i]
    path = tmp_path / "c.nrrd"
    nrrd.write(str(path), np.ascontiguousarray(channels.transpose(1, 2, 3, 0)).astype(order + "u2"), index_order="C",
               header={"encoding": "raw", "kinds": ["list", "domain", "domain", "domain"], "content": "x"})
    data, _ = nrrd.read(str(path), index_order="C")  # [k, j, i, c]
    for c in range(3):
        np.testing.assert_array_equal(data[..., c], channels[c])
        source = stacks.openStack(path, spacingMm=0.01, channel=c)
        assert source.rawPlaneOffset(0) is not None
        reference = _replicateBlockMean(data[..., c].astype(np.float64), (2, 1, 1), (5, 3, 8))
        for workers in (1, 2):
            out, _ = downsample.downsampleStack(source, (0.025, 0.03, 0.08), workers=workers)
            assert out.shape == reference.shape
            assert np.max(np.abs(out - reference)) / reference.max() <= 1e-6, (c, workers)
