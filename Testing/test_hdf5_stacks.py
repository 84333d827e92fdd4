"""Imaris .ims and BigDataViewer XML + HDF5 stacks (issue 14, item 2), on files written here with h5py in the
layouts the formats document (Imaris 5.5 file format description; BigDataViewer's XML/HDF5 format) and with
real files' conventions: Imaris attributes as arrays of one-character strings, datasets padded up to whole
chunks, BigDataViewer's 16-bit voxels stored as int16, x y z in the metadata and (z, y, x) datasets.

Ground truth comes from construction: the arrays written, the extents and affines written, and pyramids written
as exact mean-pools (float voxels holding small integers, so every mean is exact), whose levels must downsample
to the very area average of level 0."""
import os
import xml.etree.ElementTree as ET

import h5py
import numpy as np
import pytest

from MRIHistoRegLib import stacks
from MRIHistoRegLib.downsample import downsampleStack
from MRIHistoRegLib.errors import UserInputError

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # the file's x, y, z are L, P, S (the TIFF convention)


def _meanPool(array, factors):
    """(z, y, x) array averaged over blocks of `factors` (z, y, x) that divide its shape."""
    fz, fy, fx = factors
    nz, ny, nx = array.shape
    return array.reshape(nz // fz, fz, ny // fy, fy, nx // fx, fx).mean(axis=(1, 3, 5)).astype(array.dtype)


def _integerVolume(shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).integers(0, 200, shape).astype(dtype)


# --------------------------------------------------------------------------------------------------------------
# An Imaris 5.5 writer (h5py)
# --------------------------------------------------------------------------------------------------------------
def _chars(text):
    """An attribute as Imaris writes it: an array of one-character strings."""
    return np.array([c.encode("latin-1") for c in str(text)], dtype="S1")


def writeIms(path, channels, names=None, extMin=(0.0, 0.0, 0.0), extMax=None, unit="um", chunks=(4, 8, 8),
             timepoints=1, imageSizeAttributes=True):
    """channels[c][r]: the (z, y, x) array of channel c at resolution level r (true size; padded with zeros
    to whole chunks in the file)."""
    nz, ny, nx = channels[0][0].shape
    extMax = extMax if extMax is not None else (nx * 3.25, ny * 3.25, nz * 5.0)
    with h5py.File(path, "w") as f:
        for key, value in (("ImarisDataSet", "ImarisDataSet"), ("ImarisVersion", "5.5.0"),
                           ("DataSetDirectoryName", "DataSet"), ("DataSetInfoDirectoryName", "DataSetInfo"),
                           ("ThumbnailDirectoryName", "Thumbnail")):
            f.attrs[key] = _chars(value)
        f.attrs["NumberOfDataSets"] = np.array([1], dtype=np.uint32)
        image = f.create_group("DataSetInfo/Image")
        for key, value in (("X", nx), ("Y", ny), ("Z", nz), ("Unit", unit), ("Noc", len(channels))):
            image.attrs[key] = _chars(value)
        for a in range(3):
            image.attrs[f"ExtMin{a}"] = _chars(f"{extMin[a]:.6f}")
            image.attrs[f"ExtMax{a}"] = _chars(f"{extMax[a]:.6f}")
        for c in range(len(channels)):
            info = f.create_group(f"DataSetInfo/Channel {c}")
            info.attrs["Name"] = _chars(names[c] if names else f"Channel {c}")
            info.attrs["Color"] = _chars("1.000 0.000 0.000")
        for r in range(len(channels[0])):
            for t in range(timepoints):
                for c, levels in enumerate(channels):
                    data = levels[r]
                    group = f.create_group(f"DataSet/ResolutionLevel {r}/TimePoint {t}/Channel {c}")
                    padded = np.zeros([-(-n // k) * k for n, k in zip(data.shape, chunks)], data.dtype)
                    padded[: data.shape[0], : data.shape[1], : data.shape[2]] = data
                    group.create_dataset("Data", data=padded, chunks=chunks, compression="gzip", compression_opts=1)
                    group.create_dataset("Histogram", data=np.zeros(256, np.uint64))
                    if imageSizeAttributes:
                        for key, n in zip("XYZ", data.shape[::-1]):
                            group.attrs[f"ImageSize{key}"] = _chars(n)
    return path


def _imsPyramid(tmp_path, name="a.ims", shape=(16, 24, 32), **kwargs):
    """Two channels, three levels, each level the 2 x 2 x 2 mean-pool of the previous."""
    channels = []
    for c in range(2):
        level0 = _integerVolume(shape, seed=c)
        level1 = _meanPool(level0, (2, 2, 2))
        channels.append([level0, level1, _meanPool(level1, (2, 2, 2))])
    return writeIms(tmp_path / name, channels, names=["autofluorescence", "tumour"], **kwargs), channels


def test_imaris_shape_spacing_channels_and_voxels(tmp_path):
    path, channels = _imsPyramid(tmp_path, extMin=(100.0, -50.0, 20.0), unit="µm",  # one latin-1 byte, as Imaris
                                 extMax=(100.0 + 32 * 3.25, -50 + 24 * 3.25, 20.0 + 16 * 5.0))
    source = stacks.openStack(path, channel="tumour")
    assert source.kind == "imaris" and source.channelNames == ["autofluorescence", "tumour"]
    assert source.shape == (16, 24, 32) and source.channelIndex == 1 and source.dtype == np.float32
    np.testing.assert_allclose(source.spacingMm, (0.00325, 0.00325, 0.005), rtol=1e-9)
    np.testing.assert_array_equal(source.readAll(), channels[1][0])  # the padding is not read
    # voxel 0's centre is half a voxel inside ExtMin (the outer face), the file's x y z being L P S
    centre = np.array([100.0 + 3.25 / 2, -50.0 + 3.25 / 2, 20.0 + 2.5]) * 1e-3
    np.testing.assert_allclose(source.ijkToRas()[:3, 3], LPS[:3, :3] @ centre, atol=1e-12)
    assert any("resolution levels: 3" in line for line in source.describe())


def test_imaris_levels_geometry_and_voxels(tmp_path):
    path, channels = _imsPyramid(tmp_path)
    source = stacks.openStack(path, channel=1)
    levels = source.levels
    assert len(levels) == 3 and levels[0] is source
    for r, level in enumerate(levels):
        f = 2 ** r
        assert level.shape == channels[1][r].shape and level.channelIndex == 1
        np.testing.assert_allclose(level.spacingMm, (0.00325 * f, 0.00325 * f, 0.005 * f), rtol=1e-9)
        # the same physical box at every level: voxel 0 is centred half a level voxel inside ExtMin
        np.testing.assert_allclose(level.ijkToRas()[:3, 3], LPS[:3, :3] @ (np.array(level.spacingMm) / 2), atol=1e-12)
        np.testing.assert_array_equal(level.readAll(), channels[1][r])


def test_imaris_level_downsamples_to_the_area_average_of_level_0(tmp_path):
    path, channels = _imsPyramid(tmp_path)
    source = stacks.openStack(path)
    target = (0.00325 * 8, 0.00325 * 8, 0.005 * 4)  # factors 8 x 8 x 4 of level 0: 4 x 4 x 2 of level 1
    full, fullMatrix = downsampleStack(source, target)
    truth = _meanPool(channels[0][0].astype(np.float64), (4, 8, 8))
    np.testing.assert_allclose(full, truth, rtol=1e-6)
    for level in source.levels[1:]:
        array, matrix = downsampleStack(level, target)
        np.testing.assert_allclose(array, truth, rtol=1e-6)
        np.testing.assert_allclose(matrix, fullMatrix, atol=1e-12)


@pytest.mark.parametrize("fmt", ["imaris", "bdv"])
def test_selected_level_gives_the_level_0_average(tmp_path, fmt):
    if fmt == "imaris":
        path, channels = _imsPyramid(tmp_path)
        truth0 = channels[0][0]
    else:
        path, volumes = _bdvDataset(tmp_path)
        truth0 = volumes[0][0].astype(np.float64)
    source = stacks.openStack(path)
    target = tuple(np.array(source.spacingMm) * (8, 8, 4))
    from MRIHistoRegLib.downsample import resolveCrop
    from MRIHistoRegLib.stacks.pyramid import chooseLevel

    index, _, _ = chooseLevel(source, target, resolveCrop(source, None))  # the rule downsampleStack applies
    assert index == (2 if fmt == "imaris" else 1)
    array, _ = downsampleStack(source, target)  # picks that level itself and area-averages from it
    np.testing.assert_allclose(array, _meanPool(truth0.astype(np.float64), (4, 8, 8)), rtol=1e-6)


def test_imaris_odd_sizes_and_the_halving_rule_without_size_attributes(tmp_path):
    """Without ImageSizeX/Y/Z a level's size follows the writers' rule: halve (rounding up) unless the axis is
    already thin; the level still spans the file's physical box."""
    level0 = _integerVolume((3, 41, 33), seed=3, dtype=np.uint16)
    level1 = np.zeros((3, 21, 17), np.uint16)  # z is thin ((10 x 3)^2 <= 41 x 33): kept; y, x halved up
    path = writeIms(tmp_path / "odd.ims", [[level0, level1]], imageSizeAttributes=False)
    source = stacks.openStack(path)
    level = source.levels[1]
    assert level.shape == (3, 21, 17)
    np.testing.assert_allclose(level.spacingMm, (33 * 0.00325 / 17, 41 * 0.00325 / 21, 0.005), rtol=1e-9)
    np.testing.assert_array_equal(source.readAll(), level0)


def test_imaris_user_spacing_carries_to_the_levels(tmp_path):
    path, _ = _imsPyramid(tmp_path)
    source = stacks.openStack(path, spacingMm=(0.004, 0.004, 0.01))
    assert source.spacingSource == "user"
    np.testing.assert_allclose(source.levels[2].spacingMm, (0.016, 0.016, 0.04), rtol=1e-9)


def test_imaris_uint16_and_the_slab_read(tmp_path):
    """A plane is served from one chunk layer read whole, and planes of the next layer replace it."""
    data = np.random.default_rng(5).integers(0, 65535, (10, 12, 14)).astype(np.uint16)
    path = writeIms(tmp_path / "u16.ims", [[data]], chunks=(4, 8, 8))
    source = stacks.openStack(path)
    assert source.dtype == np.uint16 and len(source.levels) == 1
    np.testing.assert_array_equal(source.readPlane(5), data[5])
    assert source._slab.shape == (4, 12, 14) and source._slabStart == 4
    np.testing.assert_array_equal(source.readPlane(9), data[9])
    assert source._slab.shape == (2, 12, 14)  # the last layer stops at the true size
    source.close()


# ---- Imaris errors -------------------------------------------------------------------------------------------
def test_imaris_wrong_channel_lists_the_channels(tmp_path):
    path, _ = _imsPyramid(tmp_path)
    with pytest.raises(UserInputError, match="autofluorescence.*tumour"):
        stacks.openStack(path, channel="GFP")


def test_imaris_several_time_points_refused(tmp_path):
    path, _ = _imsPyramid(tmp_path, timepoints=2)
    with pytest.raises(UserInputError, match="2 time points"):
        stacks.openStack(path)


def test_imaris_missing_level_named(tmp_path):
    path, _ = _imsPyramid(tmp_path)
    with h5py.File(path, "a") as f:
        del f["DataSet/ResolutionLevel 1/TimePoint 0/Channel 1/Data"]
    stacks.openStack(path, channel=0).close()  # channel 0 is complete
    with pytest.raises(UserInputError, match="ResolutionLevel 1/TimePoint 0/Channel 1/Data is missing"):
        stacks.openStack(path, channel=1)
    with h5py.File(path, "a") as f:
        del f["DataSet/ResolutionLevel 1"]
    with pytest.raises(UserInputError, match="ResolutionLevel 1 is missing"):
        stacks.openStack(path)


def test_imaris_shape_inconsistent_with_the_attributes(tmp_path):
    path, _ = _imsPyramid(tmp_path)
    with h5py.File(path, "a") as f:
        f["DataSet/ResolutionLevel 2/TimePoint 0/Channel 0"].attrs["ImageSizeX"] = _chars(40)
    with pytest.raises(UserInputError, match="cannot hold the image size"):
        stacks.openStack(path)


def test_truncated_imaris_file_refused_and_nothing_written(tmp_path):
    from MRIHistoRegLib.cli import main

    path, _ = _imsPyramid(tmp_path)
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(UserInputError, match="truncated"):
        stacks.openStack(path)
    out = tmp_path / "out" / "d.nrrd"
    out.parent.mkdir()
    assert main(["downsample", str(path), "--target-mm", "0.05", "--out", str(out)]) == 2
    assert os.listdir(out.parent) == []


# --------------------------------------------------------------------------------------------------------------
# A BigDataViewer XML/HDF5 writer (h5py + ElementTree)
# --------------------------------------------------------------------------------------------------------------
def _sub(parent, tag, text=None, **attributes):
    element = ET.SubElement(parent, tag, attributes)
    if text is not None:
        element.text = str(text)
    return element


def writeBdv(folder, volumes, channelNames=("488", "561"), voxel=(0.65, 0.65, 2.0), unit="µm", affines=None,
             factors=((1, 1, 1), (2, 2, 2)), subdivisions=((16, 16, 4), (8, 8, 8)), timepoints=1, tiles=None,
             name="dataset"):
    """volumes[s][r]: setup s's (z, y, x) array at level r; affines[s]: the list of 3 x 4 ViewTransforms
    (default: BigStitcher's calibration, in units of one x voxel)."""
    h5Path = os.path.join(folder, name + ".h5")
    with h5py.File(h5Path, "w") as f:
        for s, levels in enumerate(volumes):
            f[f"s{s:02d}/resolutions"] = np.asarray(factors[: len(levels)], dtype=np.float64)
            f[f"s{s:02d}/subdivisions"] = np.asarray(subdivisions[: len(levels)], dtype=np.int32)
            for t in range(timepoints):
                for r, data in enumerate(levels):
                    chunks = tuple(min(c, n) for c, n in zip(subdivisions[r][::-1], data.shape))
                    stored = data.view(np.int16) if data.dtype == np.uint16 else data  # BDV's unsigned short
                    f.create_dataset(f"t{t:05d}/s{s:02d}/{r}/cells", data=stored, chunks=chunks, compression="gzip")
    root = ET.Element("SpimData", version="0.2")
    _sub(root, "BasePath", ".", type="relative")
    sequence = _sub(root, "SequenceDescription")
    _sub(_sub(sequence, "ImageLoader", format="bdv.hdf5"), "hdf5", name + ".h5", type="relative")
    setups = _sub(sequence, "ViewSetups")
    for s, levels in enumerate(volumes):
        setup = _sub(setups, "ViewSetup")
        _sub(setup, "id", s)
        _sub(setup, "name", f"setup {s}")
        _sub(setup, "size", " ".join(str(n) for n in levels[0].shape[::-1]))
        voxelSize = _sub(setup, "voxelSize")
        _sub(voxelSize, "unit", unit)
        _sub(voxelSize, "size", " ".join(str(v) for v in voxel))
        attributes = _sub(setup, "attributes")
        for key, value in (("illumination", 0), ("channel", s if tiles is None else 0),
                           ("tile", 0 if tiles is None else tiles[s]), ("angle", 0)):
            _sub(attributes, key, value)
    for key, ids in (("illumination", [0]), ("channel", range(len(volumes)) if tiles is None else [0]),
                     ("tile", [0] if tiles is None else sorted(set(tiles))), ("angle", [0])):
        block = _sub(setups, "Attributes", name=key)
        for i in ids:
            entry = _sub(block, key.capitalize())
            _sub(entry, "id", i)
            _sub(entry, "name", channelNames[i] if key == "channel" else i)
    times = _sub(sequence, "Timepoints", type="range")
    _sub(times, "first", 0)
    _sub(times, "last", timepoints - 1)
    registrations = _sub(root, "ViewRegistrations")
    for t in range(timepoints):
        for s in range(len(volumes)):
            registration = _sub(registrations, "ViewRegistration", timepoint=str(t), setup=str(s))
            chain = affines[s] if affines is not None else [np.diag([1.0, 1.0, voxel[2] / voxel[0], 0.0])[:3]]
            for a, matrix in enumerate(chain):
                transform = _sub(registration, "ViewTransform", type="affine")
                _sub(transform, "Name", f"transform {a}")
                _sub(transform, "affine", " ".join(repr(float(v)) for v in np.asarray(matrix).ravel()))
    xmlPath = os.path.join(folder, name + ".xml")
    ET.ElementTree(root).write(xmlPath, encoding="utf-8", xml_declaration=True)
    return xmlPath


def _bdvDataset(tmp_path, dtype=np.uint16, **kwargs):
    volumes = []
    for s in range(2):
        level0 = _integerVolume((16, 24, 32), seed=10 + s, dtype=np.float32)
        levels = [level0, _meanPool(level0, (2, 2, 2))]
        if dtype == np.uint16:
            levels = [(level * 8 + 40000).astype(np.uint16) for level in levels]  # > 32767: BDV's int16 storage
        volumes.append(levels)
    return writeBdv(str(tmp_path), volumes, **kwargs), volumes


def test_bdv_shape_spacing_channels_and_voxels(tmp_path):
    path, volumes = _bdvDataset(tmp_path)
    source = stacks.openStack(path, channel="561")
    assert source.kind == "bdv" and source.channelNames == ["488", "561"] and source.channelIndex == 1
    assert source.shape == (16, 24, 32) and source.dtype == np.uint16
    np.testing.assert_allclose(source.spacingMm, (0.00065, 0.00065, 0.002), rtol=1e-9)
    np.testing.assert_array_equal(source.readAll(), volumes[1][0])
    h5Source = stacks.openStack(tmp_path / "dataset.h5", channel=1)  # the .h5 finds its .xml
    np.testing.assert_array_equal(h5Source.readPlane(3), volumes[1][0][3])
    np.testing.assert_allclose(h5Source.ijkToRas(), source.ijkToRas())


def test_bdv_levels_geometry_and_downsample(tmp_path):
    path, volumes = _bdvDataset(tmp_path, dtype=np.float32)
    source = stacks.openStack(path)
    level = source.levels[1]
    assert level.shape == (8, 12, 16)
    np.testing.assert_allclose(level.spacingMm, (0.0013, 0.0013, 0.004), rtol=1e-9)
    # BigDataViewer's mipmap transform: level voxel 0 sits at the centre of level-0 voxels 0..1
    np.testing.assert_allclose(level.ijkToRas()[:3, 3], LPS[:3, :3] @ (np.array([0.65, 0.65, 2.0]) * 0.5e-3), atol=1e-12)
    np.testing.assert_array_equal(level.readAll(), volumes[0][1])
    target = (0.0026, 0.0026, 0.008)
    truth = _meanPool(volumes[0][0].astype(np.float64), (4, 4, 4))
    for candidate in (source, level):
        array, matrix = downsampleStack(candidate, target)
        np.testing.assert_allclose(array, truth, rtol=1e-6)
    np.testing.assert_allclose(downsampleStack(level, target)[1], downsampleStack(source, target)[1], atol=1e-12)


def test_bdv_registration_rotation_and_translation_in_the_geometry(tmp_path):
    """The ViewTransforms compose T0 T1 (T0 applied last); a rotation and a translation stay in IJK -> RAS."""
    voxel = (0.65, 0.65, 2.0)
    calibration = np.diag([1.0, 1.0, voxel[2] / voxel[0], 1.0])
    rotation = np.array([[0.0, -1.0, 0.0, 10.0], [1.0, 0.0, 0.0, -4.0], [0.0, 0.0, 1.0, 2.0], [0, 0, 0, 1.0]])
    level = [_integerVolume((8, 16, 16), seed=1)]
    path = writeBdv(str(tmp_path), [level], voxel=voxel, factors=((1, 1, 1),),
                    affines=[[rotation[:3], calibration[:3]]])
    source = stacks.openStack(path)
    expected = LPS @ np.diag([0.65e-3] * 3 + [1.0]) @ rotation @ calibration  # one world unit = one x voxel
    expected[3] = (0, 0, 0, 1)
    np.testing.assert_allclose(source.ijkToRas(), expected, atol=1e-12)
    np.testing.assert_allclose(source.spacingMm, (0.00065, 0.00065, 0.002), rtol=1e-9)


def test_bdv_without_registration_takes_the_voxel_size(tmp_path):
    path = writeBdv(str(tmp_path), [[_integerVolume((4, 8, 8), seed=2)]], factors=((1, 1, 1),), affines=[[]],
                    voxel=(2.0, 3.0, 7.0), unit="um")
    np.testing.assert_allclose(stacks.openStack(path).ijkToRas(), LPS @ np.diag([0.002, 0.003, 0.007, 1.0]), atol=1e-15)


def test_bdv_shear_refused_unless_the_spacing_is_given(tmp_path):
    shear = np.array([[1.0, 0.3, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    path = writeBdv(str(tmp_path), [[_integerVolume((4, 8, 8), seed=2)]], factors=((1, 1, 1),), affines=[[shear]])
    with pytest.raises(UserInputError, match="shears.*--spacing"):
        stacks.openStack(path)
    source = stacks.openStack(path, spacingMm=(0.001, 0.001, 0.003))
    np.testing.assert_allclose(source.ijkToRas()[:3, :3], np.diag([-0.001, -0.001, 0.003]), atol=1e-15)


# ---- BigDataViewer errors ------------------------------------------------------------------------------------
def test_bdv_wrong_channel_tiles_and_time_points_refused(tmp_path):
    path, _ = _bdvDataset(tmp_path)
    with pytest.raises(UserInputError, match="488.*561"):
        stacks.openStack(path, channel="GFP")
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    volume = [[_integerVolume((4, 8, 8), seed=s)] for s in range(2)]
    with pytest.raises(UserInputError, match="2 tiles.*Fuse"):
        stacks.openStack(writeBdv(str(tiles), volume, factors=((1, 1, 1),), tiles=[0, 1]))
    times = tmp_path / "times"
    times.mkdir()
    with pytest.raises(UserInputError, match="2 time points"):
        stacks.openStack(writeBdv(str(times), volume, factors=((1, 1, 1),), timepoints=2))


def test_bdv_missing_level_and_inconsistent_files(tmp_path):
    path, _ = _bdvDataset(tmp_path)
    h5Path = tmp_path / "dataset.h5"
    with h5py.File(h5Path, "a") as f:
        f["s01/subdivisions"][1] = (4, 4, 4)
    stacks.openStack(path, channel=0).close()
    with pytest.raises(UserInputError, match="chunks .* subdivisions"):
        stacks.openStack(path, channel=1)
    with h5py.File(h5Path, "a") as f:
        del f["t00000/s00/1/cells"]
    with pytest.raises(UserInputError, match="level 1 is missing"):
        stacks.openStack(path, channel=0)
    text = open(path, encoding="utf-8").read().replace("<size>32 24 16</size>", "<size>32 24 17</size>", 1)
    open(path, "w", encoding="utf-8").write(text)
    with pytest.raises(UserInputError, match="ViewSetup size"):
        stacks.openStack(path, channel=0)


def test_bdv_h5_without_xml_and_truncated_h5(tmp_path):
    path, _ = _bdvDataset(tmp_path)
    os.rename(path, tmp_path / "elsewhere.txt")
    with pytest.raises(UserInputError, match="Open the .xml"):
        stacks.openStack(tmp_path / "dataset.h5")
    os.rename(tmp_path / "elsewhere.txt", path)
    h5Path = tmp_path / "dataset.h5"
    with open(h5Path, "r+b") as fh:
        fh.truncate(os.path.getsize(h5Path) - 4096)
    with pytest.raises(UserInputError, match="truncated"):
        stacks.openStack(path)


# ---- real light-sheet data through an Imaris file ------------------------------------------------------------
def test_real_hemisphere_as_imaris(tmp_path, sharedData):
    """The brainreg light-sheet hemisphere (a TIFF series, 100 um) written into an .ims: the same voxels back."""
    import tifffile

    folder = sharedData / "brainreg" / "hemisphere_l"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    volume = tifffile.imread(sorted(str(p) for p in folder.glob("*.tif")))
    nz, ny, nx = volume.shape
    path = writeIms(tmp_path / "hemisphere.ims", [[volume]], extMax=(nx * 100.0, ny * 100.0, nz * 100.0),
                    chunks=(16, 64, 64))
    source = stacks.openStack(path)
    assert source.shape == volume.shape
    np.testing.assert_allclose(source.spacingMm, (0.1, 0.1, 0.1), rtol=1e-9)
    np.testing.assert_array_equal(source.readAll(), volume)


def test_imaris_non_integer_level_is_the_area_average_of_its_own_voxels(tmp_path):
    """A level whose factor does not divide (odd sizes halved up: 33 -> 17) downsamples as the exact area average
    of its own voxels placed where the file's extents put them."""
    from MRIHistoRegLib.stacks import ArraySource

    level0 = _integerVolume((6, 41, 33), seed=4)
    level1 = _integerVolume((3, 21, 17), seed=5)
    path = writeIms(tmp_path / "odd.ims", [[level0, level1]], extMin=(10.0, 20.0, 30.0),
                    extMax=(10.0 + 33 * 3.25, 20.0 + 41 * 3.25, 30.0 + 6 * 5.0))
    level = stacks.openStack(path).levels[1]
    spacing = np.array([33 * 3.25 / 17, 41 * 3.25 / 21, 6 * 5.0 / 3]) * 1e-3
    expected = np.eye(4)
    expected[:3, :3] = np.diag(spacing)
    expected[:3, 3] = np.array([10.0, 20.0, 30.0]) * 1e-3 + spacing / 2
    expected = LPS @ expected
    np.testing.assert_allclose(level.ijkToRas(), expected, atol=1e-12)
    target = (0.02, 0.02, 0.02)
    ours, oursMatrix = downsampleStack(level, target)
    truth, truthMatrix = downsampleStack(ArraySource(level1, expected), target)
    np.testing.assert_allclose(ours, truth, rtol=1e-6)
    np.testing.assert_allclose(oursMatrix, truthMatrix, atol=1e-12)


def test_cli_downsample_of_a_bdv_channel(tmp_path):
    import nrrd

    from MRIHistoRegLib.cli import main

    path, volumes = _bdvDataset(tmp_path, dtype=np.float32)
    out = tmp_path / "d.nrrd"
    assert main(["downsample", path, "--channel", "561", "--target-mm", "0.0026", "0.0026", "0.008", "--out", str(out)]) == 0
    array, header = nrrd.read(str(out), index_order="C")
    np.testing.assert_allclose(array, _meanPool(volumes[1][0].astype(np.float64), (4, 4, 4)), rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.diag(header["space directions"])), (0.0026, 0.0026, 0.008), rtol=1e-9)


def test_unknown_compression_filter_named_at_open(tmp_path):
    """A dataset compressed with a filter h5py lacks (e.g. LZ4, id 32004, without hdf5plugin) is refused at open
    with the fix, not later as a 'corrupt' chunk."""
    import h5py as h5

    if h5.h5z.filter_avail(32004):
        pytest.skip("an LZ4 filter is installed here: nothing to refuse")
    path, _ = _imsPyramid(tmp_path)
    with h5py.File(path, "a") as f:
        group = f["DataSet/ResolutionLevel 2/TimePoint 0/Channel 0"]
        del group["Data"]
        group.create_dataset("Data", shape=(4, 8, 8), dtype=np.float32, chunks=(4, 8, 8), compression=32004,
                             allow_unknown_filter=True)
    with pytest.raises(UserInputError, match="filter 32004.*hdf5plugin"):
        stacks.openStack(path)


def test_imaris_without_extents_asks_for_the_spacing(tmp_path):
    path, channels = _imsPyramid(tmp_path)
    with h5py.File(path, "a") as f:
        del f["DataSetInfo/Image"].attrs["ExtMin0"]
    source = stacks.openStack(path)
    assert source.metadataSpacingMm is None and source.spacingSource.startswith("default 1 mm")
    given = stacks.openStack(path, spacingMm=(0.002, 0.002, 0.004))
    np.testing.assert_allclose(given.levels[1].spacingMm, (0.004, 0.004, 0.008), rtol=1e-9)
    np.testing.assert_array_equal(given.readPlane(2), channels[0][0][2])


def test_bdv_big_endian_int16_cells_read_as_unsigned(tmp_path):
    """int16 cells stored big-endian (HDF5 keeps the writer's byte order) still read as BigDataViewer's uint16."""
    volume = np.random.default_rng(7).integers(0, 65535, (4, 8, 8)).astype(np.uint16)
    path = writeBdv(str(tmp_path), [[volume]], factors=((1, 1, 1),))
    with h5py.File(tmp_path / "dataset.h5", "a") as f:
        del f["t00000/s00/0/cells"]
        f.create_dataset("t00000/s00/0/cells", data=volume.view(np.int16).astype(">i2"), chunks=(4, 8, 8))
    source = stacks.openStack(path)
    assert source.dtype == np.uint16
    np.testing.assert_array_equal(source.readAll(), volume)


@pytest.mark.parametrize("fmt", ["imaris", "bdv"])
def test_a_region_read_equals_the_planes_it_cuts(tmp_path, fmt):
    """readRegion (one h5py read of the chunks a box touches: what the pyramid's spot check uses) against the
    plane-by-plane reads of the base class, on every level, including a box that crosses chunk borders."""
    from MRIHistoRegLib.stacks.base import StackSource

    path = _imsPyramid(tmp_path)[0] if fmt == "imaris" else _bdvDataset(tmp_path)[0]
    source = stacks.openStack(path)
    for level in source.levels:
        nk, nj, ni = level.shape
        box = (nk // 3, nk, 1, max(2, nj - 1), ni // 4, ni)
        assert np.array_equal(level.readRegion(*box), StackSource.readRegion(level, *box))
        assert level.chunkShape is None or len(level.chunkShape) == 3
