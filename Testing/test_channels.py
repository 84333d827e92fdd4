"""Multi-channel stacks (issue 14, item 1): files written by tifffile's OME and ImageJ writers."""
import os

import numpy as np
import pytest
import tifffile

from MRIHistoRegLib import stacks
from MRIHistoRegLib.errors import UserInputError


def _czyx(nc=2, nz=4, ny=6, nx=5):
    return np.arange(nc * nz * ny * nx, dtype=np.uint16).reshape(nc, nz, ny, nx)


def _ome(path, data):
    tifffile.imwrite(path, data, ome=True, metadata={
        "axes": "CZYX", "PhysicalSizeX": 3.25, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 3.25,
        "PhysicalSizeYUnit": "µm", "PhysicalSizeZ": 5.0, "PhysicalSizeZUnit": "µm",
        "Channel": {"Name": ["autofluorescence", "tumour"]}})
    return path


def test_ome_czyx_channels_by_index_and_name(tmp_path):
    data = _czyx()
    path = _ome(tmp_path / "two.ome.tif", data)
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "CZYX"
    source = stacks.openStack(path)
    assert source.channelNames == ["autofluorescence", "tumour"]
    assert source.shape == (4, 6, 5) and source.channelIndex == 0
    assert np.allclose(source.spacingMm, (0.00325, 0.00325, 0.005))
    np.testing.assert_array_equal(source.readAll(), data[0])
    for channel in (1, "1", "tumour"):
        np.testing.assert_array_equal(stacks.openStack(path, channel=channel).readAll(), data[1])


def test_imagej_zcyx_channels(tmp_path):
    data = _czyx()
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, np.ascontiguousarray(data.transpose(1, 0, 2, 3)), imagej=True,
                     metadata={"axes": "ZCYX", "Labels": ["a", "b"] * 4})
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "ZCYX"
    source = stacks.openStack(path, channel=1)
    assert source.shape == (4, 6, 5) and len(source.channelNames) == 2
    np.testing.assert_array_equal(source.readAll(), data[1])


def test_wrong_channel_names_the_available_ones(tmp_path):
    path = _ome(tmp_path / "two.ome.tif", _czyx())
    with pytest.raises(UserInputError, match="autofluorescence"):
        stacks.openStack(path, channel="GFP")
    with pytest.raises(UserInputError, match="tumour"):
        stacks.openStack(path, channel=2)


def test_several_time_points_refused(tmp_path):
    path = tmp_path / "t.ome.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 4, 5), np.uint8), ome=True, metadata={"axes": "TZYX"})
    with pytest.raises(UserInputError, match="time point"):
        stacks.openStack(path)


def test_single_channel_tiff_is_c0(tmp_path):
    path = tmp_path / "one.tif"
    tifffile.imwrite(path, np.zeros((3, 4, 5), np.uint8), photometric="minisblack")
    source = stacks.openStack(path)
    assert source.channelNames == ["C0"] or tuple(source.channelNames) == ("C0",)
    with pytest.raises(UserInputError):
        stacks.openStack(path, channel=1)


def test_downsampled_channel_is_its_area_average(tmp_path):
    from MRIHistoRegLib import downsample

    data = np.random.default_rng(0).integers(0, 4000, (2, 4, 6, 8)).astype(np.uint16)
    path = _ome(tmp_path / "two.ome.tif", data)
    source = stacks.openStack(path, channel="tumour")
    out = downsample.downsampleToFile(source.withSpacing((0.01, 0.01, 0.01)), 0.02, tmp_path / "d.nrrd")
    import nrrd

    result, _ = nrrd.read(str(out if isinstance(out, str) else tmp_path / "d.nrrd"), index_order="C")
    expected = data[1].astype(float).reshape(2, 2, 3, 2, 4, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=0.51)


def test_cli_wrong_channel_writes_nothing(tmp_path):
    from MRIHistoRegLib import cli

    path = _ome(tmp_path / "two.ome.tif", _czyx())
    out = tmp_path / "out.nrrd"
    assert cli.main(["downsample", str(path), "--channel", "GFP", "--target-mm", "0.02", "--out", str(out)]) == 2
    assert not out.exists()
    assert cli.main(["info", str(path), "--channel", "tumour"]) == 0


BRAINREG = __import__("pathlib").Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "brainreg" / "brain"


@pytest.mark.skipif(not BRAINREG.is_dir(), reason="real light-sheet data ../shared/data/brainreg absent")
def test_real_light_sheet_stack_is_one_channel_c0():
    source = stacks.openStack(BRAINREG)
    assert list(source.channelNames) == ["C0"] and source.channelIndex == 0


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_nrrd_channel_axis(tmp_path, encoding):
    import nrrd

    data = _czyx()  # [c, k, j, i]
    path = tmp_path / "c.nrrd"
    nrrd.write(str(path), np.ascontiguousarray(data.transpose(1, 2, 3, 0)), index_order="C", header={
        "encoding": encoding, "kinds": ["list", "domain", "domain", "domain"], "labels": ["auto,tumour", "", "", ""],
        "space": "left-posterior-superior", "space directions": [[np.nan] * 3, [0.01, 0, 0], [0, 0.01, 0], [0, 0, 0.02]]})
    source = stacks.openStack(path, channel="tumour")
    assert source.channelNames == ["auto", "tumour"] and source.shape == (4, 6, 5)
    assert np.allclose(source.spacingMm, (0.01, 0.01, 0.02))
    np.testing.assert_array_equal(source.readAll(), data[1])
    np.testing.assert_array_equal(stacks.openStack(path).readAll(), data[0])
    with pytest.raises(UserInputError, match="tumour"):
        stacks.openStack(path, channel=5)


def test_refine_and_the_run_config_open_the_channel_they_name(tmp_path, capsys, caplog):
    """The pipeline opens the stack with the channel of `refine --channel` / `histology_channel`: a name the stack
    does not have stops the run at loading, with the available channels, before anything is written."""
    import json

    import SimpleITK as sitk

    from MRIHistoRegLib import cli

    stack = _ome(tmp_path / "two.ome.tif", _czyx())
    mri = tmp_path / "mri.nrrd"
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkFloat32), str(mri))
    points = tmp_path / "points.csv"
    points.write_text("label,x,y,z\nA,0,0,0\nB,1,0,0\nC,0,1,0\nD,0,0,1\n")
    out = tmp_path / "refined"
    assert cli.main(["refine", "--mri", str(mri), "--histology", str(stack), "--fixed-points", str(points),
                     "--moving-points", str(points), "--channel", "GFP", "--out", str(out)]) == 2
    assert not out.exists()
    said = capsys.readouterr().err + caplog.text
    assert "GFP" in said and "autofluorescence" in said and "tumour" in said, said
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"mri": "mri.nrrd", "histology": "two.ome.tif", "histology_channel": "GFP",
                                  "landmarks": {"mri": "points.csv", "histology": "points.csv"}}))
    assert cli.main(["run", str(config), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
    said = capsys.readouterr().err + caplog.text
    assert "GFP" in said and "autofluorescence" in said, said


# ---- per-channel TIFF series, as light-sheet software writes them (files written by tifffile) ----------------
def _planes(nc=2, nz=12, ny=5, nx=7):
    # channel c's plane z is constant per row block but different per channel, so a mix-up of channels or of
    # plane order (Z10 before Z2) shows
    return np.arange(nc * nz * ny * nx, dtype=np.uint16).reshape(nc, nz, ny, nx) * 3


def _lavisionSeries(folder, data, prefix="16-17-27_0_8X-autofluo_UltraII"):
    # LaVision / Miltenyi UltraMicroscope names: one file per plane per channel in one folder
    folder.mkdir()
    for c in range(data.shape[0]):
        for z in range(data.shape[1]):
            tifffile.imwrite(folder / f"{prefix}_C{c:02d}_xyz-Table Z{z:04d}.ome.tif", data[c, z])
    return folder


def test_lavision_one_folder_channels_by_c_token(tmp_path):
    data = _planes()
    folder = _lavisionSeries(tmp_path / "scan", data)
    source = stacks.openStack(folder)
    assert source.channelNames == ["C00", "C01"] and source.channelIndex == 0 and source.shape == (12, 5, 7)
    np.testing.assert_array_equal(source.readAll(), data[0])
    for channel in (1, "C01"):
        np.testing.assert_array_equal(stacks.openStack(folder, channel=channel).readAll(), data[1])
    with pytest.raises(UserInputError, match="C00.*C01"):
        stacks.openStack(folder, channel="C02")


def test_one_sub_folder_per_channel(tmp_path):
    data = _planes(nz=11)
    for c, name in enumerate(["Ex_639_Em_690", "Ex_488_Em_525"]):  # 488 sorts first
        (tmp_path / "scan" / name).mkdir(parents=True)
        for z in range(data.shape[1]):
            tifffile.imwrite(tmp_path / "scan" / name / f"plane_{z}.tif", data[c, z])
    source = stacks.openStack(tmp_path / "scan", channel="Ex_639_Em_690")
    assert source.channelNames == ["Ex_488_Em_525", "Ex_639_Em_690"] and source.channelIndex == 1
    np.testing.assert_array_equal(source.readAll(), data[0])
    np.testing.assert_array_equal(stacks.openStack(tmp_path / "scan").readAll(), data[1])
    from MRIHistoRegLib import cli

    assert cli.main(["info", str(tmp_path / "scan"), "--channel", "Ex_639_Em_690"]) == 0
    assert cli.main(["info", str(tmp_path / "scan"), "--channel", "Ex_561_Em_600"]) == 2


def test_missing_plane_in_one_channel_names_it_and_writes_nothing(tmp_path):
    from MRIHistoRegLib import cli

    folder = _lavisionSeries(tmp_path / "scan", _planes())
    (folder / "16-17-27_0_8X-autofluo_UltraII_C01_xyz-Table Z0007.ome.tif").unlink()
    with pytest.raises(UserInputError, match=r"channel C01 has no plane Z7 .*C00_xyz-Table Z0007\.ome\.tif"):
        stacks.openStack(folder)
    out = tmp_path / "out.nrrd"
    assert cli.main(["downsample", str(folder), "--target-mm", "0.02", "--spacing-mm", "0.01", "--out", str(out)]) == 2
    assert not out.exists()


def test_per_folder_channels_with_different_plane_counts_or_sizes(tmp_path):
    data = _planes(nz=4)
    for name in ("Ex_488_Em_525", "Ex_639_Em_690"):
        (tmp_path / name).mkdir()
        for z in range(4):
            tifffile.imwrite(tmp_path / name / f"image_{z:04d}.tif", data[0, z])
    (tmp_path / "Ex_639_Em_690" / "image_0003.tif").unlink()
    with pytest.raises(UserInputError, match=r"channel Ex_639_Em_690 has 3 planes but others have 4"):
        stacks.openStack(tmp_path)
    tifffile.imwrite(tmp_path / "Ex_639_Em_690" / "image_0003.tif", data[0, 3])
    tifffile.imwrite(tmp_path / "Ex_639_Em_690" / "image_0000.tif", data[0, 0, :4])
    with pytest.raises(UserInputError, match=r"Ex_639_Em_690.*image_0000\.tif is 7x4"):
        stacks.openStack(tmp_path)  # the other channel's first file is checked when opening channel 0
    with pytest.raises(UserInputError, match=r"image_0000\.tif is 7x4"):
        stacks.openStack(tmp_path, channel=1)


def test_a_constant_z_token_is_part_of_the_name_and_a_repeated_plane_is_refused(tmp_path):
    data = _planes(nc=1, nz=3)[0]
    (tmp_path / "one").mkdir()
    for z in range(3):
        tifffile.imwrite(tmp_path / "one" / f"run_Z1_{z:04d}.tif", data[z])  # Z1 in every name: not a plane index
    np.testing.assert_array_equal(stacks.openStack(tmp_path / "one").readAll(), data)
    folder = _lavisionSeries(tmp_path / "scan", _planes(nz=3))
    tifffile.imwrite(folder / "16-17-27_0_8X-autofluo_UltraII_C01_xyz-Table Z0001 copy.ome.tif", data[0])
    with pytest.raises(UserInputError, match="channel C01 has plane Z1 twice"):
        stacks.openStack(folder)


def test_mosaic_tiles_and_untagged_files_are_refused(tmp_path):
    folder = tmp_path / "blaze"
    folder.mkdir()
    for tile in ("[00 x 00]", "[00 x 01]"):
        tifffile.imwrite(folder / f"11-14-17_Alg_Blaze{tile}_C00_xyz-Table Z0000.ome.tif", np.zeros((4, 5), np.uint16))
    with pytest.raises(UserInputError, match="tiles.*stitch"):
        stacks.openStack(folder)
    other = _lavisionSeries(tmp_path / "scan", _planes(nz=2))
    tifffile.imwrite(other / "overview.tif", np.zeros((5, 7), np.uint16))
    with pytest.raises(UserInputError, match="overview.tif has no channel token"):
        stacks.openStack(other)


# ---- other channels resampled onto the MRI grid through the same mapping (resample_channels) -----------------
def _runSubject(tmp_path, nc=3):
    """An 8 mm cube MRI and a 3-channel OME-TIFF (1 mm voxels, the TIFF's RAS = the MRI's) whose channels are
    0.5 x, 1 x and 3 x one smooth random pattern, paired by points through a non-trivial affine: resampling is
    linear in the voxel values, so each channel's output is that multiple of the others'."""
    import json

    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    base = (rng.integers(0, 400, (10, 12, 11)) * 2).astype(np.uint16)  # even: 0.5 x is exact in uint16
    data = np.stack([base // 2, base, base * 3])[:nc]
    tifffile.imwrite(tmp_path / "three.ome.tif", data, ome=True, metadata={
        "axes": "CZYX", "PhysicalSizeX": 1000.0, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 1000.0,
        "PhysicalSizeYUnit": "µm", "PhysicalSizeZ": 1000.0, "PhysicalSizeZUnit": "µm",
        "Channel": {"Name": ["half", "auto", "tumour"][:nc]}})
    mri = sitk.GetImageFromArray(rng.random((9, 9, 9)).astype(np.float32))
    sitk.WriteImage(mri, str(tmp_path / "mri.nrrd"))
    fixed = np.array([[-1, -1, 1], [-6, -2, 3], [-2, -6, 2], [-3, -3, 6], [-6, -6, 7], [-4, -1, 4]], float)
    matrix = np.array([[0.95, 0.05, 0.0], [-0.04, 1.05, 0.02], [0.0, 0.03, 0.9]])
    moving = fixed @ matrix.T + [-0.6, -0.4, 0.7]
    for name, points in (("mri.csv", fixed), ("histology.csv", moving)):
        (tmp_path / name).write_text("label,x,y,z\n" + "".join(f"P{i},{p[0]},{p[1]},{p[2]}\n" for i, p in enumerate(points)))
    config = {"mri": "mri.nrrd", "histology": "three.ome.tif", "histology_channel": "auto", "model": "affine",
              "landmarks": {"mri": "mri.csv", "histology": "histology.csv"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return config


def _nrrd(path):
    import nrrd

    return nrrd.read(str(path), index_order="C")[0]


def test_other_channels_resampled_through_the_same_mapping(tmp_path):
    import json

    from MRIHistoRegLib import cli, outputs

    config = _runSubject(tmp_path)
    config["resample_channels"] = "all"
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert cli.main(["run", str(tmp_path / "config.json"), "--out", str(out)]) == 0
    registration = _nrrd(out / outputs.HISTOLOGY_ON_MRI)
    assert registration.shape == (9, 9, 9) and np.count_nonzero(registration) > 200
    half, tumour = _nrrd(out / outputs.channelOnMri(0, "half")), _nrrd(out / outputs.channelOnMri(2, "tumour"))
    np.testing.assert_allclose(half, registration / 2, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(tumour, registration * 3, rtol=1e-5, atol=1e-3)
    rows = json.loads((out / "report.json").read_text())["resampling"]["other_channels"]
    assert [(r["index"], r["name"], r["file"]) for r in rows] == [
        (0, "half", "histology_c0_half_on_mri.nrrd"), (2, "tumour", "histology_c2_tumour_on_mri.nrrd")]


def test_wrong_resample_channel_stops_the_run_before_writing(tmp_path, caplog):
    import json

    from MRIHistoRegLib import cli

    config = _runSubject(tmp_path, nc=2)
    config["resample_channels"] = ["tumour"]  # this stack has half and auto only
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert cli.main(["run", str(tmp_path / "config.json"), "--out", str(out)]) == 2
    assert not out.exists() and not list(tmp_path.glob(".run*"))
    assert "tumour" in caplog.text and "half" in caplog.text and "auto" in caplog.text
    # the CLI option overrides the config (whose "half" alone would run)
    config["resample_channels"] = ["half"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    caplog.clear()
    assert cli.main(["run", str(tmp_path / "config.json"), "--out", str(out), "--resample-channels", "1", "tumour"]) == 2
    assert "'tumour'" in caplog.text and not out.exists()
    config["resample_channels"] = [True]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert cli.main(["run", str(tmp_path / "config.json"), "--out", str(out)]) == 2
    assert "resample_channels" in caplog.text and not out.exists()


def test_panel_logic_opens_and_resamples_the_chosen_channel(tmp_path, scene):
    """The panel's facade: every stack-opening action takes the channel; the other channels go through the same
    resampling as the registration channel and Export report writes them under run's names."""
    import json

    import vtk

    from MRIHistoRegLib import outputs, volumes
    from MRIHistoRegLib.logic import MRIHistoRegLogicCore

    _runSubject(tmp_path)
    logic, stack = MRIHistoRegLogicCore(scene), str(tmp_path / "three.ome.tif")
    data = tifffile.imread(stack)
    info = logic.openStack(stack, channel="auto")
    assert info.channelNames == ["half", "auto", "tumour"] and info.channelIndex == 1
    assert "channel 1 (auto) of 3" in logic.describeStack(info)
    with pytest.raises(UserInputError, match="half"):
        logic.openStack(stack, channel="GFP")
    full = logic.loadFullResolution(stack, [1, 1, 1], channel=2)
    np.testing.assert_array_equal(volumes.arrayFromVolume(full), data[2])
    auto = volumes.arrayFromVolume(logic.downsampleStack(stack, 2.0, [1, 1, 1], channel=1))
    tumour = volumes.arrayFromVolume(logic.downsampleStack(stack, 2.0, [1, 1, 1], channel="tumour"))
    np.testing.assert_allclose(tumour, 3 * auto, rtol=1e-5)

    mri = volumes.loadVolume(scene, str(tmp_path / "mri.nrrd"), "MRI")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    for row, values in enumerate([[0.95, 0.05, 0, -0.6], [-0.04, 1.05, 0.02, -0.4], [0, 0.03, 0.9, 0.7]]):
        for column, value in enumerate(values):
            matrix.SetElement(row, column, value)
    transform.SetMatrixTransformToParent(matrix)
    resampled = logic.resampleHistology(transform, mri, stackPath=stack, spacingMm=[1, 1, 1], channel=1)
    registration = volumes.arrayFromVolume(resampled).copy()
    assert np.count_nonzero(registration) > 200
    others = logic.resampleOtherChannels(transform, mri, stack, spacingMm=[1, 1, 1], channel=1, registrationNode=resampled)
    assert [n.GetName() for n in others] == ["Histology half resampled", "Histology tumour resampled"]
    np.testing.assert_allclose(volumes.arrayFromVolume(others[0]), registration / 2, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(volumes.arrayFromVolume(others[1]), registration * 3, rtol=1e-5, atol=1e-3)
    again = logic.resampleOtherChannels(transform, mri, stack, spacingMm=[1, 1, 1], channel=1, registrationNode=resampled)
    assert [n.GetID() for n in again] == [n.GetID() for n in others]  # a second click updates, adds no nodes
    folder = logic.exportReport(str(tmp_path / "report"), transformNode=transform, resampledVolume=resampled,
                                mriVolume=mri)
    np.testing.assert_allclose(_nrrd(os.path.join(folder, outputs.channelOnMri(2, "tumour"))), registration * 3,
                               rtol=1e-5, atol=1e-3)
    rows = json.loads(open(os.path.join(folder, "report.json")).read())["resampling"]["other_channels"]
    assert [(r["index"], r["file"]) for r in rows] == [(0, "histology_c0_half_on_mri.nrrd"),
                                                       (2, "histology_c2_tumour_on_mri.nrrd")]


def test_report_checksum_covers_per_channel_sub_folders(tmp_path):
    import hashlib

    from MRIHistoRegLib import pipeline

    for name, value in (("Ex_488_Em_525", 1), ("Ex_639_Em_690", 2)):
        (tmp_path / name).mkdir()
        tifffile.imwrite(tmp_path / name / "plane_0.tif", np.full((3, 4), value, np.uint16))
    expected = hashlib.sha256()
    for name in ("Ex_488_Em_525", "Ex_639_Em_690"):
        expected.update((tmp_path / name / "plane_0.tif").read_bytes())
    assert pipeline.sha256(str(tmp_path)) == expected.hexdigest()


@pytest.mark.skipif(not BRAINREG.is_dir(), reason="real light-sheet data ../shared/data/brainreg absent")
def test_real_planes_as_channel_folders(tmp_path):
    """The real brainreg planes linked (not copied) into two channel folders read back as the series itself; the
    real hemisphere planes (another size) as the second channel are refused, naming the file."""
    brain = sorted(BRAINREG.glob("image_*.tif"))[:12]
    hemisphere = sorted((BRAINREG.parent / "hemisphere_l").glob("*.tif"))[:12]
    for name, files in (("Ex_488_Em_525", brain), ("Ex_639_Em_690", brain)):
        (tmp_path / "scan" / name).mkdir(parents=True)
        for f in files:
            (tmp_path / "scan" / name / f.name).symlink_to(f)
    expected = np.stack([tifffile.imread(f) for f in brain])
    source = stacks.openStack(tmp_path / "scan", channel="Ex_639_Em_690")
    assert source.channelNames == ["Ex_488_Em_525", "Ex_639_Em_690"] and source.shape == expected.shape
    np.testing.assert_array_equal(source.readAll(), expected)
    (tmp_path / "mixed" / "Ex_488_Em_525").mkdir(parents=True)
    (tmp_path / "mixed" / "Ex_639_Em_690").mkdir()
    for f, g in zip(brain, hemisphere):
        (tmp_path / "mixed" / "Ex_488_Em_525" / f.name).symlink_to(f)
        (tmp_path / "mixed" / "Ex_639_Em_690" / g.name).symlink_to(g)
    with pytest.raises(UserInputError, match=hemisphere[0].name + " is 193x104"):
        stacks.openStack(tmp_path / "mixed")


@pytest.mark.parametrize("value, expected", [("all", "all"), ("tumour", ["tumour"]), (2, [2]), ([0, "tumour"], [0, "tumour"]),
                                             (None, None), (-1, UserInputError), ([], UserInputError),
                                             ({"a": 1}, UserInputError), ([" "], UserInputError), (True, UserInputError)])
def test_resample_channels_config_values(value, expected):
    from MRIHistoRegLib.config import resampleChannels

    if expected is UserInputError:
        with pytest.raises(UserInputError, match="resample_channels.*all"):
            resampleChannels(value, "field 'resample_channels'")
    else:
        assert resampleChannels(value, "field 'resample_channels'") == expected
