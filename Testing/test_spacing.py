"""Spacing correction: units and bad values, geometry-only edits of a volume node, the plausibility check,
and header-only NRRD rewrites that never touch the original."""
import hashlib
import math
import os

import numpy as np
import pytest

from MRIHistoRegLib import spacing, stacks
from MRIHistoRegLib.volumes import arrayFromVolume, createVolumeNode, ijkToRas


def test_units():
    assert spacing.toMillimetres((3.25, 3.25, 5), "um") == pytest.approx((0.00325, 0.00325, 0.005))
    assert spacing.toMillimetres([50, 40, 40], "µm") == pytest.approx((0.05, 0.04, 0.04))
    assert spacing.toMillimetres(0.1, "mm") == (0.1,)


@pytest.mark.parametrize("values,unit,match", [
    ((0, 1, 1), "um", "positive"),
    ((-3.25, 3.25, 5), "um", "positive"),
    ((math.nan, 1, 1), "mm", "positive"),
    ((math.inf, 1, 1), "mm", "positive"),
    ((1, 1, 1), "furlong", "Unknown spacing unit 'furlong'.*'um'.*'mm'"),
    ((1, 2), "mm", "one value or three"),
])
def test_bad_spacing(values, unit, match):
    with pytest.raises(ValueError, match=match):
        spacing.toMillimetres(values, unit)


def test_bad_user_spacing_on_open(tmp_path):
    import tifffile

    path = tmp_path / "s.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 4), np.uint8), photometric="minisblack")
    with pytest.raises(ValueError, match="positive"):
        stacks.openStack(path, spacingMm=(0.0, 0.1, 0.1))


def test_set_volume_spacing_keeps_voxels_origin_directions(scene):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 1000, (4, 5, 6)).astype(np.int16)
    angle = 0.3
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * [1.0, 1.0, 1.0]
    matrix[:3, 3] = [5.0, -7.0, 9.0]
    node = createVolumeNode(scene, array, matrix, "lsm")
    spacing.setVolumeSpacing(node, (0.00325, 0.00325, 0.005))
    after = ijkToRas(node)
    np.testing.assert_allclose(after[:3, 3], [5.0, -7.0, 9.0])
    np.testing.assert_allclose(np.linalg.norm(after[:3, :3], axis=0), (0.00325, 0.00325, 0.005))
    np.testing.assert_allclose(after[:3, :3] / np.linalg.norm(after[:3, :3], axis=0), rotation, atol=1e-12)
    np.testing.assert_array_equal(arrayFromVolume(node), array)
    with pytest.raises(ValueError):
        spacing.setVolumeSpacing(node, (1, 1, -1))


def test_plausibility_against_reference_node(scene, tmp_path):
    mri = createVolumeNode(scene, np.zeros((120, 200, 100), np.float32), np.diag([0.1, 0.1, 0.1, 1.0]), "mri")
    # the seed's stack: 2160 x 2560 x 472 at the header's 1 mm
    verdict = spacing.checkPlausibility((2560, 2160, 472), (1.0, 1.0, 1.0), mri)
    assert not verdict.ok
    assert "2560 px x 1 mm = 2.56 m" in verdict.message and "did you mean um?" in verdict.message
    assert verdict.ratio == pytest.approx(2560 / 20.0)
    verdict = spacing.checkPlausibility((2560, 2160, 472), (0.00325, 0.00325, 0.005), mri)
    assert verdict.ok, verdict.message
    np.testing.assert_allclose(verdict.extentMm, (8.32, 7.02, 2.36))
    # the other way: a spacing given in mm where um were meant is too small
    verdict = spacing.checkPlausibility((2560, 2160, 472), (0.00325e-3,) * 3, 10.0)
    assert not verdict.ok and "smaller" in verdict.message
    # a StackSource carries its own shape and spacing; no reference: a mouse brain
    import tifffile

    path = tmp_path / "s.tif"
    tifffile.imwrite(path, np.zeros((3, 4, 2000), np.uint8), photometric="minisblack")
    assert not spacing.checkPlausibility(stacks.openStack(path)).ok
    assert spacing.checkPlausibility(stacks.openStack(path, spacingMm=(0.005, 0.005, 0.005))).ok


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_rewrite_nrrd_spacing_header_only(tmp_path, encoding):
    import nrrd

    rng = np.random.default_rng(2)
    array = rng.integers(0, 60000, (5, 6, 7)).astype(np.uint16)
    path = tmp_path / "stack.nrrd"
    directions = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    nrrd.write(str(path), array, {"space": "left-posterior-superior", "space directions": directions,
                                  "space origin": [1.0, 2.0, 3.0], "encoding": encoding}, index_order="C")
    before = _sha(path)
    written = spacing.rewriteNrrdSpacing(path, (0.00325, 0.004, 0.005))
    assert written.endswith(".spacing.nhdr") and _sha(path) == before  # original untouched
    assert os.path.getsize(written) < 2000  # header only, data referenced
    data, header = nrrd.read(written, index_order="C")
    np.testing.assert_array_equal(data, array)
    np.testing.assert_allclose(header["space directions"], directions * np.array([[0.00325], [0.004], [0.005]]))
    np.testing.assert_allclose(header["space origin"], [1.0, 2.0, 3.0])
    source = stacks.openStack(written)
    np.testing.assert_allclose(source.spacingMm, (0.00325, 0.004, 0.005))
    np.testing.assert_array_equal(source.readPlane(4), array[4])

    with pytest.raises(ValueError, match="overwrite"):
        spacing.rewriteNrrdSpacing(path, (1, 1, 1), outPath=path)
    spacing.rewriteNrrdSpacing(path, (0.01, 0.02, 0.03), overwrite=True)
    data, header = nrrd.read(str(path), index_order="C")
    np.testing.assert_array_equal(data, array)
    np.testing.assert_allclose(np.linalg.norm(header["space directions"], axis=1), (0.01, 0.02, 0.03))
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []  # no temporary left


def test_rewrite_detached_nrrd(tmp_path):
    import nrrd

    array = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    path = tmp_path / "d.nhdr"
    nrrd.write(str(path), array, {"spacings": [1.0, 1.0, 1.0]}, index_order="C", detached_header=True)
    out = tmp_path / "sub"
    out.mkdir()
    written = spacing.rewriteNrrdSpacing(path, (0.1, 0.2, 0.3), outPath=out / "fixed.nhdr")
    source = stacks.openStack(written)
    np.testing.assert_allclose(source.spacingMm, (0.1, 0.2, 0.3))
    np.testing.assert_array_equal(source.readPlane(1), array[1])
    with pytest.raises(ValueError, match="nhdr"):
        spacing.rewriteNrrdSpacing(path, (0.1, 0.2, 0.3), outPath=out / "fixed.nrrd")


def test_format_nrrd_header_read_back_by_pynrrd(tmp_path):
    """Our header formatter (used instead of pynrrd's private writer) gives back the same header through pynrrd's
    public reader, for every field type a stack header carries, custom fields included."""
    import nrrd

    header = {"type": "unsigned short", "dimension": 3, "space": "left-posterior-superior", "sizes": np.array([7, 6, 5]),
              "space directions": np.array([[0.0, 0.00325, 0.0], [-0.004, 0.0, 0.0], [0.0, 0.0, 0.005]]),
              "kinds": ["domain", "domain", "domain"], "endian": "little", "encoding": "raw",
              "space origin": np.array([1.5, -2.25, 3.0]), "measurement frame": np.eye(3),
              "labels": ["x axis", "y", "z"], "space units": ["mm", "mm", "mm"], "content": "a stack",
              "thicknesses": np.array([0.1, 0.2, 0.3]), "data file": "stack.raw", "byte skip": 12,
              "my custom key": "some value"}
    path = tmp_path / "h.nhdr"
    path.write_bytes(spacing.formatNrrdHeader(header))
    with open(path, "rb") as fh:
        read = nrrd.read_header(fh)
    assert set(read) == set(header)
    for key, value in header.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_allclose(read[key], value, rtol=1e-15, err_msg=key)
        else:
            assert read[key] == value, key
    # a full-precision float survives (pynrrd writes 17 significant digits)
    header2 = {"type": "float", "dimension": 3, "sizes": [2, 2, 2], "spacings": np.array([1 / 3, 0.1, 2e-7]),
               "encoding": "raw"}
    path.write_bytes(spacing.formatNrrdHeader(header2))
    with open(path, "rb") as fh:
        np.testing.assert_array_equal(nrrd.read_header(fh)["spacings"], header2["spacings"])
