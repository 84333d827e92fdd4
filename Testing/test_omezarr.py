"""OME-Zarr (issue 14, items 2 and 4): files written by ome-zarr-py's writer (NGFF 0.4 and 0.5) and by plain zarr
(zarr 3 here, zarr 2.18 on Slicer 5.8's stack); the pyramid-level rule of the downsampler; errors; the writer.

Ground truth comes from construction: the pyramids are numpy block means of a random level 0 (or, to show the
rule refuses them, nearest-neighbour subsamplings), and the expected downsampled volumes are numpy block means
of the data, never our own downsampler's output.
"""
import json
import logging
import os
import shutil

import numpy as np
import pytest
import zarr

from MRIHistoRegLib import downsample, stacks
from MRIHistoRegLib.errors import UserInputError

ZARR3 = int(zarr.__version__.split(".")[0]) >= 3
needsZarr3 = pytest.mark.skipif(not ZARR3, reason=f"NGFF 0.5 is a zarr v3 store; zarr {zarr.__version__} (Slicer 5.8's "
                                "stack) reads v2 stores only, and the reader refuses 0.5 there (tested)")
try:
    import ome_zarr  # noqa: F401 (the independent test-only writer, installed in .venv only)
    OME_ZARR = True
except ImportError:
    OME_ZARR = False
needsOmeZarr = pytest.mark.skipif(not OME_ZARR, reason="ome-zarr (the test-only independent writer) is not installed "
                                  "in this environment (Slicer 5.8's stack has zarr only); the plain-zarr tests cover it")

S0 = np.array([5.0, 3.25, 3.25])  # level-0 scale (z, y, x) in micrometres
AXES = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
NAMES = ["autofluorescence", "tumour"]


def _pool(array, f):
    """Mean pooling of the last three axes by f (exact in float64, stored in the array's dtype)."""
    *lead, z, y, x = array.shape
    shaped = array.reshape(*lead, z // f, f, y // f, f, x // f, f)
    mean = shaped.mean(axis=(-5, -3, -1), dtype=np.float64)
    return (np.round(mean) if array.dtype.kind in "iu" else mean).astype(array.dtype)


def _data(dtype=np.float32, shape=(2, 32, 48, 64), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 4000).astype(dtype)


def _transforms(levels, factor=2, spatialOnly=False):
    result = []
    for n in range(levels):
        f = factor ** n
        result.append([{"type": "scale", "scale": [1.0] + list(S0 * f)},
                       {"type": "translation", "translation": [0.0] + list((f - 1) / 2.0 * S0)}])
    return result


def _omeZarr(path, pyramid, fmt, chunks=(1, 8, 16, 16), transforms=None):
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_multiscale

    store = parse_url(str(path), mode="w", fmt=fmt).store
    root = zarr.group(store=store)
    write_multiscale(pyramid, root, fmt=fmt, axes=AXES, storage_options={"chunks": chunks},
                     coordinate_transformations=transforms or _transforms(len(pyramid)),
                     metadata={"omero": {"channels": [{"label": n} for n in NAMES]}})
    return str(path)


def _plainV2(path, pyramid, axes=None, transforms=None, chunks=(1, 8, 16, 16), omero=True):
    """An NGFF 0.4 image written with zarr's own API (zarr 2 or 3), the metadata as the spec writes them."""
    kwargs = {"zarr_format": 2} if ZARR3 else {}
    group = zarr.open_group(str(path), mode="w", **kwargs)
    for n, level in enumerate(pyramid):
        padded = (1,) * max(0, level.ndim - len(chunks)) + tuple(chunks)
        chunk = tuple(min(c, s) for c, s in zip(padded[-level.ndim:], level.shape))
        create = group.create_array if hasattr(group, "create_array") else group.create_dataset
        array = create(str(n), shape=level.shape, chunks=chunk, dtype=level.dtype)
        array[...] = level
    transforms = transforms or _transforms(len(pyramid))
    datasets = [{"path": str(n), "coordinateTransformations": t} for n, t in enumerate(transforms)]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes or AXES, "datasets": datasets}]
    if omero:
        group.attrs["omero"] = {"channels": [{"label": n} for n in NAMES]}
    return str(path)


def _meanPyramid(data, levels=3):
    return [data] + [_pool(data, 2 ** n) for n in range(1, levels)]


def _formats():
    if not OME_ZARR:
        return []
    from ome_zarr.format import FormatV04, FormatV05

    return [pytest.param(FormatV04(), id="ngff04"), pytest.param(FormatV05(), id="ngff05", marks=needsZarr3)]


# ---- reading: shape, spacing, channels, levels --------------------------------------------------------------
@needsOmeZarr
@pytest.mark.parametrize("fmt", _formats())
def test_ome_zarr_writer_shape_spacing_channels_levels(tmp_path, fmt):
    data = _data()
    path = _omeZarr(tmp_path / "image.ome.zarr", _meanPyramid(data), fmt)
    source = stacks.openStack(path, channel="tumour")
    assert source.kind == "OME-Zarr" and source.channelNames == tuple(NAMES) and source.channelIndex == 1
    assert source.shape == (32, 48, 64) and source.dtype == np.float32
    np.testing.assert_allclose(source.spacingMm, (0.00325, 0.00325, 0.005))
    np.testing.assert_array_equal(source.readAll(), data[1])
    assert len(source.levels) == 3
    for n, level in enumerate(source.levels):
        f = 2 ** n
        assert level.shape == (32 // f, 48 // f, 64 // f)
        np.testing.assert_allclose(level.spacingMm, np.array([0.00325, 0.00325, 0.005]) * f)
        # the level's translation (f - 1) / 2 level-0 voxels, seen as LPS axes: RAS = (-x, -y, z)
        shift = (f - 1) / 2.0 * np.array([0.00325, 0.00325, 0.005])
        np.testing.assert_allclose(level.ijkToRas()[:3, 3], (-shift[0], -shift[1], shift[2]), atol=1e-12)
        np.testing.assert_array_equal(level.readPlane(level.shape[0] // 2), _pool(data, f)[1, level.shape[0] // 2])
    np.testing.assert_array_equal(stacks.openStack(path).readAll(), data[0])
    result, _ = downsample.downsampleStack(source, tuple(8 * np.array([0.00325, 0.00325, 0.005])))
    np.testing.assert_allclose(result, data[1].astype(np.float64).reshape(4, 8, 6, 8, 8, 8).mean(axis=(1, 3, 5)), rtol=2e-6)


def test_plain_zarr_v2_store(tmp_path):
    data = _data(np.uint16)
    path = _plainV2(tmp_path / "plain.zarr", _meanPyramid(data))
    source = stacks.openStack(path, channel=1)
    assert source.channelNames == tuple(NAMES) and source.shape == (32, 48, 64)
    np.testing.assert_allclose(source.spacingMm, (0.00325, 0.00325, 0.005))
    np.testing.assert_array_equal(source.readAll(), data[1])
    assert [level.shape for level in source.levels] == [(32, 48, 64), (16, 24, 32), (8, 12, 16)]
    planes = _plainV2(tmp_path / "planes.zarr", [data], transforms=_transforms(1), chunks=(1, 1, 16, 16))
    single = stacks.openStack(planes, channel=1)  # one plane per chunk: read plane by plane, no slab
    assert single.slabDepth == 1
    np.testing.assert_array_equal(np.stack([p for _, p in single.iterPlanes()]), data[1])


def test_bioformats2raw_collection_opens_its_image_0(tmp_path):
    """bioformats2raw (the usual conversion of vendor files to OME-Zarr) writes the image under 0/ of a root
    group whose attributes say 'bioformats2raw.layout'."""
    root = tmp_path / "converted.ome.zarr"
    data = _data()
    _plainV2(root / "0", _meanPyramid(data))
    (root / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (root / ".zattrs").write_text(json.dumps({"bioformats2raw.layout": 3}))
    source = stacks.openStack(root, channel="tumour")
    assert source.shape == (32, 48, 64) and len(source.levels) == 3
    np.testing.assert_array_equal(source.readAll(), data[1])


def test_single_channel_without_omero_is_c0_and_user_spacing_moves_every_level(tmp_path):
    data = _data()[0]
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    transforms = [[{"type": "scale", "scale": list(S0 * 2 ** n)}] for n in range(3)]
    path = _plainV2(tmp_path / "one.zarr", _meanPyramid(data), axes=axes, transforms=transforms, omero=False)
    source = stacks.openStack(path)
    assert source.channelNames == ("C0",)
    corrected = source.withSpacing((0.004, 0.004, 0.006))
    np.testing.assert_allclose(corrected.levels[2].spacingMm, (0.016, 0.016, 0.024))
    assert corrected.spacingSource == "user"


def test_info_lists_the_levels(tmp_path, caplog):
    from MRIHistoRegLib import cli

    path = _plainV2(tmp_path / "plain.zarr", _meanPyramid(_data()))
    caplog.set_level(logging.INFO)
    assert cli.main(["info", path, "--channel", "tumour"]) == 0
    assert "pyramid: 3 levels" in caplog.text and "level 2: shape (k, j, i) (8, 12, 16)" in caplog.text
    assert "1: tumour (read)" in caplog.text


# ---- the downsampler's level rule ---------------------------------------------------------------------------
def test_dividing_factors_equal_the_area_average_of_level0(tmp_path, caplog):
    """Target 8 level-0 voxels along every axis: level 2 (4x) is read, and the result is level 0's block mean."""
    data = _data()
    path = _plainV2(tmp_path / "p.zarr", _meanPyramid(data))
    source = stacks.openStack(path, channel="tumour")
    target = tuple(8 * np.array([0.00325, 0.00325, 0.005]))
    caplog.set_level(logging.INFO)
    result, matrix = downsample.downsampleStack(source, target)
    assert "pyramid level 2 of 3" in caplog.text
    expected = data[1].astype(np.float64).reshape(4, 8, 6, 8, 8, 8).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(result, expected, rtol=2e-6)
    full, fullMatrix = downsample.downsampleStack(source, target, level=0)
    np.testing.assert_allclose(result, full, rtol=2e-6)
    np.testing.assert_allclose(matrix, fullMatrix, atol=1e-12)
    # the output's first voxel centre is the centre of level 0's first 8x8x8 box (voxel 3.5)
    np.testing.assert_allclose(matrix[:3, 3], (-3.5 * 0.00325, -3.5 * 0.00325, 3.5 * 0.005))


def test_levels_without_translations_give_level0_geometry(tmp_path, caplog):
    """Many writers give levels a scale only (ome-zarr-py's write_multiscale without translations): the level's
    own ijkToRas follows the file, the downsampled output keeps level 0's boxes and geometry (with a warning)."""
    data = _data()
    transforms = [[{"type": "scale", "scale": [1.0] + list(S0 * 2 ** n)}] for n in range(3)]
    path = _plainV2(tmp_path / "p.zarr", _meanPyramid(data), transforms=transforms)
    source = stacks.openStack(path)
    np.testing.assert_allclose(source.levels[2].ijkToRas()[:3, 3], 0.0)
    target = tuple(8 * np.array([0.00325, 0.00325, 0.005]))
    caplog.set_level(logging.INFO)
    result, matrix = downsample.downsampleStack(source, target)
    assert "pyramid level 2 of 3" in caplog.text and "keeps level 0's geometry" in caplog.text
    np.testing.assert_allclose(matrix[:3, 3], (-3.5 * 0.00325, -3.5 * 0.00325, 3.5 * 0.005))
    np.testing.assert_allclose(matrix, downsample.outputGeometry(source, target)[1], atol=1e-12)
    np.testing.assert_allclose(result, data[0].astype(np.float64).reshape(4, 8, 6, 8, 8, 8).mean(axis=(1, 3, 5)), rtol=2e-6)


def test_an_xy_only_mean_pyramid_is_used(tmp_path, caplog):
    """Light-sheet pyramids often pool x and y only (z already coarse): level 2 is 4 x 4 x 1 of level 0."""
    data = _data()
    pyramid = [data] + [data.reshape(2, 32, 48 // f, f, 64 // f, f).mean(axis=(3, 5)).astype(np.float32) for f in (2, 4)]
    transforms = [[{"type": "scale", "scale": [1.0, 5.0, 3.25 * f, 3.25 * f]},
                   {"type": "translation", "translation": [0.0, 0.0, (f - 1) / 2 * 3.25, (f - 1) / 2 * 3.25]}] for f in (1, 2, 4)]
    path = _plainV2(tmp_path / "xy.zarr", pyramid, transforms=transforms)
    caplog.set_level(logging.INFO)
    result, _ = downsample.downsampleStack(stacks.openStack(path), (0.013, 0.013, 0.01))
    assert "pyramid level 2 of 3" in caplog.text
    expected = data[0].astype(np.float64).reshape(16, 2, 12, 4, 16, 4).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(result, expected, rtol=2e-6)


def test_rounded_up_levels_with_extent_spacing_are_used(tmp_path, caplog):
    """Levels of ceil(n / f) voxels (the last one averaging what is left, as Imaris writes them) whose scale is
    the extent over that size (66 x 3.25 um over 17 voxels: 3.82x, not 4x): taken as 4x, level 2 is used, and
    the kept boxes (64 of the 66 columns) equal level 0's block mean."""
    data = _data(shape=(2, 32, 48, 66))

    def pooled(f):
        padded = np.full(data.shape[:3] + (-(-66 // f) * f,), np.nan)
        padded[..., :66] = data
        return np.nanmean(padded.reshape(2, 32 // f, f, 48 // f, f, -1, f), axis=(2, 4, 6)).astype(np.float32)

    pyramid = [data, pooled(2), pooled(4)]
    transforms = [[{"type": "scale", "scale": [1.0, 5.0 * f, 3.25 * f, 3.25 * 66 / level.shape[-1]]},
                   {"type": "translation", "translation": [0.0] + list((f - 1) / 2.0 * S0)}]
                  for f, level in zip((1, 2, 4), pyramid)]
    path = _plainV2(tmp_path / "ceil.zarr", pyramid, transforms=transforms)
    source = stacks.openStack(path)
    assert source.levels[2].shape == (8, 12, 17)
    caplog.set_level(logging.INFO)
    result, matrix = downsample.downsampleStack(source, tuple(8 * np.array([0.00325, 0.00325, 0.005])))
    assert "pyramid level 2 of 3" in caplog.text
    expected = data[0, :, :, :64].astype(np.float64).reshape(4, 8, 6, 8, 8, 8).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(result, expected, rtol=2e-6)
    np.testing.assert_allclose(matrix[:3, 3], (-3.5 * 0.00325, -3.5 * 0.00325, 3.5 * 0.005))


def test_integer_pyramid_is_within_its_rounding(tmp_path):
    data = _data(np.uint16)
    path = _plainV2(tmp_path / "p.zarr", _meanPyramid(data))
    result, _ = downsample.downsampleStack(stacks.openStack(path), tuple(4 * np.array([0.00325, 0.00325, 0.005])))
    expected = data[0].astype(np.float64).reshape(8, 4, 12, 4, 16, 4).mean(axis=(1, 3, 5))
    assert np.max(np.abs(result - expected)) <= 0.5 + 1e-3  # level 2's stored means are rounded to integers


def test_crop_on_the_level_grid(tmp_path):
    data = _data()
    path = _plainV2(tmp_path / "p.zarr", _meanPyramid(data))
    crop = ((16, 48), (8, 40), (8, 24))  # multiples of 4: on level 2's grid
    result, _ = downsample.downsampleStack(stacks.openStack(path), tuple(8 * np.array([0.00325, 0.00325, 0.005])), crop=crop)
    expected = data[0, 8:24, 8:40, 16:48].astype(np.float64).reshape(2, 8, 4, 8, 4, 8).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(result, expected, rtol=2e-6)
    # a crop thinner than one target voxel (6 planes, averaged whole): level 2 would add 2 planes, level 1 is exact
    result, _ = downsample.downsampleStack(stacks.openStack(path), tuple(8 * np.array([0.00325, 0.00325, 0.005])),
                                           crop=(None, None, (0, 6)))
    expected = data[0, 0:6].astype(np.float64).reshape(1, 6, 6, 8, 8, 8).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(result, expected, rtol=2e-6)


def test_non_dividing_factor_is_the_area_average_of_its_own_level(tmp_path):
    """Target 6 level-0 voxels: level 2 (4x) is the coarsest finer one; boxes are 1.5 of its voxels, so the
    result is level 2's exact area average - computed here by repeating each level-2 voxel 2x per axis (exact
    for a piecewise-constant volume) and block-averaging 3x."""
    data = _data()
    pyramid = _meanPyramid(data)
    path = _plainV2(tmp_path / "p.zarr", pyramid)
    result, _ = downsample.downsampleStack(stacks.openStack(path), tuple(6 * np.array([0.00325, 0.00325, 0.005])))
    level2 = pyramid[2][0].astype(np.float64)  # (8, 12, 16)
    fine = level2.repeat(2, 0).repeat(2, 1).repeat(2, 2)  # (16, 24, 32), half-voxels of level 2
    expected = fine[:15, :24, :30].reshape(5, 3, 8, 3, 10, 3).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(result, expected, rtol=2e-6)
    assert not np.allclose(result, data[0, :30, :48, :60].astype(float).reshape(5, 6, 8, 6, 10, 6).mean(axis=(1, 3, 5)),
                           rtol=1e-3), "the level-2 and level-0 averages should differ here (else the test proves nothing)"


def test_subsampled_pyramid_is_refused_and_level0_read(tmp_path, caplog):
    """A pyramid made by taking every other voxel fails the mean-pooling check: the result is level 0's."""
    data = _data()
    pyramid = [data, np.ascontiguousarray(data[:, ::2, ::2, ::2]), np.ascontiguousarray(data[:, ::4, ::4, ::4])]
    path = _plainV2(tmp_path / "nearest.zarr", pyramid)
    caplog.set_level(logging.INFO)
    result, _ = downsample.downsampleStack(stacks.openStack(path), tuple(8 * np.array([0.00325, 0.00325, 0.005])))
    assert "level 1 is not the mean of level 0" in caplog.text
    expected = data[0].astype(np.float64).reshape(4, 8, 6, 8, 8, 8).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(result, expected, rtol=2e-6)


@needsOmeZarr
def test_ome_zarr_default_scaler_pyramid_is_not_trusted(tmp_path, caplog):
    """ome-zarr-py's write_image builds its pyramid with its default (nearest-neighbour, x-y only) scaler."""
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image

    data = _data(np.uint16, shape=(16, 64, 64))
    store = parse_url(str(tmp_path / "w.ome.zarr"), mode="w", fmt=FormatV04()).store
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    write_image(data, zarr.group(store=store), axes=axes, fmt=FormatV04(), storage_options={"chunks": (8, 32, 32)},
                coordinate_transformations=[[{"type": "scale", "scale": [5.0, 3.25 * 2 ** n, 3.25 * 2 ** n]}] for n in range(5)])
    source = stacks.openStack(tmp_path / "w.ome.zarr")
    assert len(source.levels) > 2
    caplog.set_level(logging.INFO)
    result, _ = downsample.downsampleStack(source, (0.026, 0.026, 0.02))
    assert "not the mean" in caplog.text
    expected = data.astype(np.float64).reshape(4, 4, 8, 8, 8, 8).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(result, expected, rtol=2e-6)


def _countingSource(path):
    """The image opened through a real zarr store that records the chunk files it reads (zarr 3: LocalStore;
    zarr 2: DirectoryStore)."""
    read = []
    if ZARR3:
        from zarr.storage import LocalStore

        class Counting(LocalStore):
            async def get(self, key, prototype=None, byte_range=None):
                read.append(key)
                return await super().get(key, prototype, byte_range)

        store = Counting(path, read_only=True)
    else:
        class Counting(zarr.storage.DirectoryStore):
            def _fromfile(self, fn):
                read.append(os.path.relpath(fn, path))
                return super()._fromfile(fn)

        store = Counting(path)
    return stacks.OmeZarrStack(path, store=store), read


def test_a_pyramid_read_touches_only_the_level_it_needs(tmp_path):
    data = _data(shape=(1, 128, 96, 128))
    path = _plainV2(tmp_path / "p.zarr", _meanPyramid(data, 4), transforms=_transforms(4))
    source, read = _countingSource(path)
    result, _ = downsample.downsampleStack(source, tuple(16 * np.array([0.00325, 0.00325, 0.005])))
    np.testing.assert_allclose(result, data[0].astype(np.float64).reshape(8, 16, 6, 16, 8, 16).mean(axis=(1, 3, 5)), rtol=2e-6)
    chunks = [key.replace("\\", "/") for key in read if not key.split("/")[-1].startswith((".z", "zarr.json"))]
    byLevel = {n: {key for key in chunks if key.split("/")[0] == str(n)} for n in range(4)}
    levelChunks = {n: int(np.prod([-(-s // c) for s, c in zip(a.shape, a.chunks)])) for n, a in
                   enumerate(source._pyramid.arrays)}
    assert byLevel[3] and len(byLevel[3]) == levelChunks[3]  # level 3 (8x) is read whole
    # finer levels: only the mean-pooling spot check's block, which lies inside one chunk of each (of 768, 96, 16)
    assert {n: len(byLevel[n]) for n in range(3)} == {0: 1, 1: 1, 2: 1}, {n: sorted(v) for n, v in byLevel.items()}


# ---- errors: the fix is named, nothing is written -----------------------------------------------------------
def _cliDownsample(path, out, *extra):
    from MRIHistoRegLib import cli

    return cli.main(["downsample", str(path), "--target-mm", "0.026", "--out", str(out), *extra])


def test_missing_level(tmp_path, caplog):
    path = _plainV2(tmp_path / "p.zarr", _meanPyramid(_data()))
    shutil.rmtree(os.path.join(path, "1"))
    with pytest.raises(UserInputError, match="level 1 .* missing .* re-copy or re-export"):
        stacks.openStack(path)
    assert _cliDownsample(path, tmp_path / "out.nrrd") == 2 and not (tmp_path / "out.nrrd").exists()


def _editZarray(path, level, **changes):
    meta = os.path.join(path, str(level), ".zarray")
    with open(meta) as f:
        content = json.load(f)
    content.update(changes)
    with open(meta, "w") as f:
        json.dump(content, f)


def test_chunk_shape_in_metadata_not_matching_the_chunk_files(tmp_path):
    path = _plainV2(tmp_path / "p.zarr", _meanPyramid(_data()), chunks=(1, 8, 16, 16))
    _editZarray(path, 0, chunks=[1, 8, 16, 32])
    source = stacks.openStack(path)
    with pytest.raises(UserInputError, match="chunk.*re-copy or re-export"):
        source.readAll()
    out = tmp_path / "out.nrrd"
    assert _cliDownsample(path, out, "--level", "0") == 2 and not out.exists()


def test_level_shape_not_matching_its_scale(tmp_path):
    transforms = _transforms(3)
    transforms[1][0]["scale"] = [1.0] + list(S0 * 3)  # level 1 says 3x, its array is 2x
    path = _plainV2(tmp_path / "p.zarr", _meanPyramid(_data()), transforms=transforms)
    with pytest.raises(UserInputError, match="level 1 .* metadata and the arrays disagree"):
        stacks.openStack(path)


def test_wrong_channel_names_the_available_ones(tmp_path):
    path = _plainV2(tmp_path / "p.zarr", _meanPyramid(_data()))
    with pytest.raises(UserInputError, match="autofluorescence.*tumour"):
        stacks.openStack(path, channel="GFP")
    out = tmp_path / "out.ome.zarr"
    assert _cliDownsample(path, out, "--channel", "GFP") == 2 and not out.exists()


@pytest.mark.parametrize("axes, match", [
    ([{"name": n, "type": "space", "unit": "micrometer"} for n in ("c", "y", "x")], "axes"),  # 2-D plus an unnamed one
    ([{"name": "c", "type": "channel"}] + [{"name": a, "type": "space", "unit": "micrometer"} for a in "xyz"], "axes"),
    ([{"name": "c", "type": "channel"}] + [{"name": a, "type": "space", "unit": "furlong"} for a in "zyx"], "furlong"),
])
def test_unsupported_axes_and_units(tmp_path, axes, match):
    path = _plainV2(tmp_path / "p.zarr", _meanPyramid(_data()), axes=axes)
    with pytest.raises(UserInputError, match=match):
        stacks.openStack(path)


def test_no_units_needs_a_spacing(tmp_path):
    axes = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space"} for a in "zyx"]
    path = _plainV2(tmp_path / "p.zarr", _meanPyramid(_data()), axes=axes)
    with pytest.raises(UserInputError, match="--spacing-um"):
        stacks.openStack(path)
    source = stacks.openStack(path, spacingMm=(0.004, 0.004, 0.006))
    np.testing.assert_allclose(source.levels[1].spacingMm, (0.008, 0.008, 0.012))


def test_several_time_points_refused(tmp_path):
    axes = [{"name": "t", "type": "time"}] + AXES
    data = _data(shape=(2, 2, 8, 8, 8))
    transforms = [[{"type": "scale", "scale": [1.0, 1.0] + list(S0)}]]
    path = _plainV2(tmp_path / "t.zarr", [data], axes=axes, transforms=transforms)
    with pytest.raises(UserInputError, match="2 time points. Export one"):
        stacks.openStack(path)


@pytest.mark.skipif(ZARR3, reason="only zarr 2 (Slicer 5.8's stack) cannot read NGFF 0.5")
def test_ngff05_refused_with_the_fix_on_zarr2(tmp_path):
    folder = tmp_path / "v5.ome.zarr"
    folder.mkdir()
    (folder / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
        "ome": {"version": "0.5", "multiscales": [{"axes": AXES, "datasets": [{"path": "0"}]}]}}}))
    with pytest.raises(UserInputError, match="Slicer 5.10"):
        stacks.openStack(folder)


# ---- writing ------------------------------------------------------------------------------------------------
def test_downsample_writes_ome_zarr_that_both_readers_open(tmp_path):
    import tifffile

    data = _data(np.uint16, shape=(64, 96, 128), seed=3)
    tiff = tmp_path / "stack.tif"
    tifffile.imwrite(tiff, data, photometric="minisblack")
    source = stacks.openStack(tiff, spacingMm=(0.00325, 0.00325, 0.005))
    out = tmp_path / "small.ome.zarr"
    target = (0.0065, 0.0065, 0.01)
    downsample.downsampleToFile(source, target, out)
    expected = data.astype(np.float64).reshape(32, 2, 48, 2, 64, 2).mean(axis=(1, 3, 5))
    _, matrix = downsample.downsampleStack(source, target)
    ours = stacks.openStack(out)
    np.testing.assert_allclose(ours.readAll(), expected, rtol=1e-6)
    np.testing.assert_allclose(ours.ijkToRas(), matrix, atol=1e-12)
    assert len(ours.levels) == 2 and ours.levels[1].shape == (16, 24, 32)
    np.testing.assert_allclose(ours.levels[1].readAll(), _pool(expected, 2), rtol=1e-6)
    # a second level's voxel centres sit at the centres of the boxes it averages
    np.testing.assert_allclose(ours.levels[1].ijkToRas() @ [0, 0, 0, 1], matrix @ [0.5, 0.5, 0.5, 1], atol=1e-12)
    with pytest.raises(UserInputError, match="exists"):
        downsample.downsampleToFile(source, target, out)  # nothing is overwritten
    if OME_ZARR:
        from ome_zarr.io import parse_url
        from ome_zarr.reader import Reader

        node = next(iter(Reader(parse_url(str(out)))()))
        meta = node.metadata
        assert [a["unit"] for a in meta["axes"]] == ["millimeter"] * 3
        scale = meta["coordinateTransformations"][0][0]["scale"]
        np.testing.assert_allclose(scale, (0.01, 0.0065, 0.0065))
        np.testing.assert_allclose(np.asarray(node.data[0]), expected, rtol=1e-6)
    else:
        group = zarr.open_group(str(out), mode="r")
        assert group.attrs["multiscales"][0]["axes"][0]["unit"] == "millimeter"
        np.testing.assert_allclose(group["0"][...], expected, rtol=1e-6)


def test_cli_downsample_to_ome_zarr(tmp_path):
    path = _plainV2(tmp_path / "p.zarr", _meanPyramid(_data()))
    out = tmp_path / "d.ome.zarr"
    assert _cliDownsample(path, out, "--channel", "tumour") == 0
    written = stacks.openStack(out)
    np.testing.assert_allclose(written.spacingMm, (0.026, 0.026, 0.026))
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp")]


def test_a_resampled_volume_node_keeps_its_orientation(tmp_path, scene):
    """NGFF 0.4 has no orientation: an MRI-grid volume (RAS axes, rotated) is written axis-aligned for other
    readers and its IJK->RAS kept in our own attributes, which our reader restores exactly (levels included)."""
    from MRIHistoRegLib import volumes
    from MRIHistoRegLib.stacks.omezarr import writeVolumeNodeOmeZarr

    angle = np.deg2rad(20)
    matrix = np.eye(4)
    matrix[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]) @ np.diag([0.1, 0.1, 0.15])
    matrix[:3, 3] = (-5.0, 3.0, 12.0)
    data = _data(shape=(40, 36, 44))
    node = volumes.createVolumeNode(scene, data, matrix, "histology_on_mri")
    out = writeVolumeNodeOmeZarr(node, tmp_path / "on_mri.ome.zarr")
    source = stacks.openStack(out)
    np.testing.assert_allclose(source.ijkToRas(), matrix, atol=1e-12)
    np.testing.assert_array_equal(source.readAll(), data)
    np.testing.assert_allclose(source.levels[1].ijkToRas() @ [0, 0, 0, 1], matrix @ [0.5, 0.5, 0.5, 1], atol=1e-12)
    group = zarr.open_group(str(out), mode="r")  # what another reader sees: mm scales, no rotation
    np.testing.assert_allclose(group.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"],
                               (0.15, 0.1, 0.1))


def test_real_light_sheet_data_as_an_ome_zarr_pyramid(tmp_path, sharedData, caplog):
    """The brainreg whole-brain stack (real autofluorescence, 50 x 40 x 40 um), its first 64 planes written as an
    NGFF 0.4 pyramid of 2x means: a 4x target reads level 2 and equals numpy's block mean of the TIFF planes."""
    import tifffile

    files = sorted((sharedData / "brainreg" / "brain").glob("image_*.tif"))[:64]
    data = np.stack([tifffile.imread(f) for f in files])[:, :192, :264]  # [z, y, x], multiples of 8
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    scale0 = np.array([50.0, 40.0, 40.0])
    transforms = [[{"type": "scale", "scale": list(scale0 * 2 ** n)},
                   {"type": "translation", "translation": list((2 ** n - 1) / 2 * scale0)}] for n in range(3)]
    path = _plainV2(tmp_path / "brain.ome.zarr", _meanPyramid(data.astype(np.float32)), axes=axes,
                    transforms=transforms, chunks=(16, 64, 64), omero=False)
    source = stacks.openStack(path)
    assert source.shape == data.shape and source.channelNames == ("C0",)
    np.testing.assert_allclose(source.spacingMm, (0.04, 0.04, 0.05))
    caplog.set_level(logging.INFO)
    result, _ = downsample.downsampleStack(source, (0.16, 0.16, 0.2))
    assert "pyramid level 2 of 3" in caplog.text
    expected = data.astype(np.float64).reshape(16, 4, 48, 4, 66, 4).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(result, expected, rtol=2e-6)


def test_a_cancelled_downsampling_to_ome_zarr_leaves_nothing(tmp_path):
    from MRIHistoRegLib.progress import Cancelled

    path = _plainV2(tmp_path / "p.zarr", _meanPyramid(_data()))
    out = tmp_path / "d.ome.zarr"
    with pytest.raises(Cancelled):
        downsample.downsampleToFile(stacks.openStack(path), 0.0065, out, progress=lambda f, m="": f >= 0.5, level=0)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["p.zarr"]


def test_the_runs_resampled_images_are_also_written_as_ome_zarr(tmp_path, sampleData):
    """Config ome_zarr_outputs: histology_on_mri.ome.zarr next to the NRRD, holding the same voxels in millimetres,
    read by zarr itself (independent of our reader) and by our reader with the NRRD's exact geometry."""
    import nrrd

    from MRIHistoRegLib import config as configLib
    from MRIHistoRegLib import outputs, pipeline
    from MRIHistoRegLib.geometry import flipGeometryLpsRas

    raw = json.loads((sampleData / "config.json").read_text())
    raw = {key: raw[key] for key in ("mri", "histology", "histology_spacing_um", "landmarks", "model")}
    raw["mri"], raw["histology"] = str(sampleData / raw["mri"]), str(sampleData / raw["histology"])
    raw["landmarks"] = {side: str(sampleData / name) for side, name in raw["landmarks"].items()}
    raw["ome_zarr_outputs"] = True
    pipeline.runPipeline(configLib.parseConfig(raw, str(tmp_path / "c.json")), tmp_path / "out")
    data, header = nrrd.read(str(tmp_path / "out" / outputs.HISTOLOGY_ON_MRI), index_order="C")
    copy = tmp_path / "out" / outputs.omeZarrName(outputs.HISTOLOGY_ON_MRI)
    group = zarr.open_group(str(copy), mode="r")
    assert group.attrs["multiscales"][0]["axes"][-1]["unit"] == "millimeter"
    np.testing.assert_array_equal(np.asarray(group["0"][...]).reshape(data.shape), data)
    ours = stacks.openStack(copy)
    lps = flipGeometryLpsRas(ours.ijkToRas())
    np.testing.assert_allclose(lps[:3, :3].T, header["space directions"], atol=1e-9)
    np.testing.assert_allclose(lps[:3, 3], header["space origin"], atol=1e-9)
    with pytest.raises(UserInputError, match="ome_zarr_outputs"):
        configLib.parseConfig(dict(raw, ome_zarr_outputs="yes"), str(tmp_path / "c.json"))
