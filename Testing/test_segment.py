"""Streamed segmentation of a signal channel at native resolution (issue 14, item 3): volumes against analytic
ones, connectivity and hole filling against scipy.ndimage, Otsu against SimpleITK, the written label map read by
pynrrd and by the label transfer's own reader, bounded memory, and errors that leave nothing behind."""
import os
import tracemalloc

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from helpers import ellipsoidOccupancy
from MRIHistoRegLib import progress as progressLib
from MRIHistoRegLib import segment, stacks
from MRIHistoRegLib.compare import readLabelCrop
from MRIHistoRegLib.downsample import resolveCrop
from MRIHistoRegLib.errors import UserInputError
from MRIHistoRegLib.geometry import flipGeometryLpsRas

SPACING = (0.004, 0.004, 0.008)  # (i, j, k) mm: light-sheet-like anisotropy


def _ellipsoidChannel(shape, spacing, centre, semiAxes, background=100.0, signal=1100.0, noise=15.0, seed=0):
    """A uint16 channel: background + signal x (fraction of each voxel inside the ellipsoid) + noise.

    The fraction comes from sub-voxel samples, so a threshold half-way between the levels puts the boundary
    where the true surface is, and the analytic volume 4/3 pi abc is the truth."""
    fraction = ellipsoidOccupancy(shape, np.diag(list(spacing) + [1.0]), np.asarray(centre), np.asarray(semiAxes))
    rng = np.random.default_rng(seed)
    values = background + (signal - background) * fraction + rng.normal(0.0, noise, shape)
    return np.clip(np.round(values), 0, 65535).astype(np.uint16)


def _source(array, spacing=SPACING):
    matrix = np.diag(list(spacing) + [1.0])
    matrix[:3, 3] = (-1.0, 2.0, 0.5)
    return stacks.ArraySource(array, matrix)


@pytest.fixture(scope="module")
def tumour():
    semi = (0.15, 0.11, 0.09)
    shape = (36, 70, 90)
    centre = (0.5 * shape[2] * SPACING[0], 0.5 * shape[1] * SPACING[1], 0.5 * shape[0] * SPACING[2])
    array = _ellipsoidChannel(shape, SPACING, centre, semi)
    return array, 4.0 / 3.0 * np.pi * np.prod(semi), (shape[2] // 2, shape[1] // 2, shape[0] // 2)


def test_native_volume_of_an_ellipsoid_is_within_one_percent(tumour):
    array, truth, seed = tumour
    for kwargs in ({"threshold": 600.0}, {"threshold": 600.0, "seedIjk": seed}, {"seedIjk": seed}, {}):
        result = segment.segmentStack(_source(array), **kwargs)
        assert abs(result.volumeMm3 / truth - 1.0) < 0.01, (kwargs, result.volumeMm3, truth)
        assert result.voxelCount == int(np.count_nonzero(result.crop))


def test_otsu_threshold_agrees_with_simpleitk(tumour):
    array, _, _ = tumour
    ours = segment.otsuThreshold(*segment._histogram(_source(array), resolveCrop(_source(array), None), None))
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(int(array.max()) - int(array.min()) + 1)
    otsu.SetInsideValue(0)
    otsu.SetOutsideValue(1)
    otsu.Execute(sitk.GetImageFromArray(array))
    binWidth = (int(array.max()) - int(array.min()) + 1) / otsu.GetNumberOfHistogramBins()
    assert abs(ours - otsu.GetThreshold()) <= 2 * binWidth + 1, (ours, otsu.GetThreshold())


def _tangle(shape, seed):
    """Smoothed noise thresholded into a tangle of blobs, plus a snake that goes up, down and up again along k
    (its far end is reachable from the seed only through two reversals)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    blobs = field > 0.12
    snake = np.zeros(shape, bool)
    snake[2:20, 5, 5] = True          # up
    snake[19, 5, 5:15] = True
    snake[3:20, 5, 14] = True         # down
    snake[3, 5, 14:24] = True
    snake[3:22, 5, 23] = True         # up again
    blobs[:, 3:8, :] = False          # keep the snake's plane j = 5 apart from the blobs
    blobs |= snake
    return blobs


@pytest.mark.parametrize("seed", [0, 1])
def test_the_seeded_component_is_scipys_6_connected_component(seed):
    mask = _tangle((24, 30, 32), seed)
    array = np.where(mask, 1000, 10).astype(np.uint16)
    labels, _ = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 1))
    for start in ((5, 5, 2), tuple(int(v) for v in np.argwhere(labels == np.bincount(labels.ravel())[1:].argmax() + 1)[0][::-1])):
        expected = labels == labels[start[2], start[1], start[0]]
        result = segment.segmentStack(_source(array), threshold=500, seedIjk=start, fillHoles=False)
        placed = np.zeros(mask.shape, bool)
        offset = np.rint(np.linalg.solve(_source(array).ijkToRas()[:3, :3],
                                         result.cropIjkToRas[:3, 3] - _source(array).ijkToRas()[:3, 3])).astype(int)
        ci, cj, ck = offset
        placed[ck:ck + result.crop.shape[0], cj:cj + result.crop.shape[1], ci:ci + result.crop.shape[2]] = result.crop > 0
        assert np.array_equal(placed, expected), start
        if start == (5, 5, 2):
            assert expected[21, 5, 23]  # the snake's far end: two reversals along k


def test_planewise_hole_filling_matches_scipy():
    rng = np.random.default_rng(3)
    mask = ndimage.binary_opening(rng.random((10, 40, 40)) > 0.35)
    array = np.where(mask, 900, 50).astype(np.uint16)
    result = segment.segmentStack(_source(array), threshold=500)
    filled = np.stack([ndimage.binary_fill_holes(plane) for plane in mask])
    labels, _ = ndimage.label(filled, structure=ndimage.generate_binary_structure(3, 1))
    largest = np.bincount(labels.ravel())[1:].max()  # no seed: the largest 6-connected component
    assert result.voxelCount == int(largest)


def test_the_label_map_is_written_on_the_stacks_grid(tmp_path, tumour):
    import nrrd

    array, _, seed = tumour
    source = _source(array)
    out = tmp_path / "tumour_native.nrrd"
    result = segment.segmentStack(source, threshold=600.0, seedIjk=seed, outPath=out)
    data, header = nrrd.read(str(out), index_order="C")  # pynrrd: an independent reader
    assert data.shape == array.shape and data.dtype == np.uint8
    lps = flipGeometryLpsRas(source.ijkToRas())
    assert np.allclose(header["space directions"], lps[:3, :3].T) and np.allclose(header["space origin"], lps[:3, 3])
    assert int(np.count_nonzero(data)) == result.voxelCount
    crop, matrix = readLabelCrop(stacks.openStack(out))  # what the label transfer into MRI space reads
    assert np.array_equal(crop, result.crop) and np.allclose(matrix, result.cropIjkToRas)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []


def _writeTiff(path, planes, count):
    import tifffile

    with tifffile.TiffWriter(str(path), bigtiff=False) as writer:
        for k in range(count):
            writer.write(planes(k), contiguous=True)


def test_memory_stays_at_a_few_planes_whatever_the_stack_length(tmp_path):
    """Peak traced memory for 40 and 160 planes of 512 x 512 (uint16, 0.5 MB each) differs by less than one plane:
    nothing but the labelled box (here 60 x 60 voxels a plane) accumulates with the stack's length."""
    base = np.full((512, 512), 100, np.uint16)
    base[200:260, 200:260] = 3000
    peaks = []
    for count in (40, 160):
        path = tmp_path / f"channel{count}.tif"
        _writeTiff(path, lambda k: base, count)
        source = stacks.openStack(path, spacingMm=SPACING)
        tracemalloc.start()
        segment.segmentStack(source, threshold=1000, outPath=tmp_path / f"label{count}.nrrd")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    plane, boxGrowth = base.nbytes, 60 * 60 * (160 - 40)  # the uint8 labelled box grows by 120 planes of 60 x 60
    assert peaks[1] - peaks[0] < plane + boxGrowth, (peaks, plane)
    assert peaks[1] < 20 * plane, (peaks, plane)  # the stack is 160 planes


def test_bad_seeds_constant_channels_and_cancel_leave_nothing(tmp_path, tumour):
    array, _, seed = tumour
    source = _source(array)
    out = tmp_path / "label.nrrd"
    with pytest.raises(UserInputError, match="outside the stack"):
        segment.segmentStack(source, seedIjk=(1000, 0, 0), outPath=out)
    with pytest.raises(UserInputError, match="not in the foreground"):
        segment.segmentStack(source, threshold=600.0, seedIjk=(0, 0, 0), outPath=out)
    with pytest.raises(UserInputError, match="nothing to threshold"):
        segment.segmentStack(_source(np.full((3, 4, 5), 7, np.uint16)), outPath=out)

    def cancel(fraction, message=""):
        return "writing" in message and fraction > 0.8

    with pytest.raises(progressLib.Cancelled):
        segment.segmentStack(source, threshold=600.0, seedIjk=seed, outPath=out, progress=cancel)
    assert os.listdir(tmp_path) == []


def test_a_region_of_interest_restricts_the_segmentation(tumour):
    array, truth, seed = tumour
    nk, nj, ni = array.shape
    half = ((0, ni // 2), (0, nj), (0, nk))
    result = segment.segmentStack(_source(array), threshold=600.0, roi=half)
    # the part of the ellipsoid before the ROI's face at i = ni / 2 - 1/2 (voxel centres at i * spacing):
    # V(u) = 3/4 V (u - u^3 / 3 + 2 / 3) / (4 / 3) for the normalised cut position u
    u = ((ni // 2 - 0.5) * SPACING[0] - 0.5 * ni * SPACING[0]) / 0.15
    expected = truth * 0.75 * (u - u ** 3 / 3 + 2.0 / 3) / 1.0
    assert abs(result.volumeMm3 / expected - 1.0) < 0.01, (result.volumeMm3, expected)
    assert result.roi == half


def test_the_segment_command_writes_the_label_and_refuses_a_bad_seed(tmp_path, tumour):
    import tifffile

    from MRIHistoRegLib import cli

    array, truth, seed = tumour
    path = tmp_path / "tumour_channel.tif"
    tifffile.imwrite(str(path), array)
    spacing = [f"{1000 * s:g}" for s in SPACING]
    out = tmp_path / "tumour.nrrd"
    assert cli.main(["segment", str(path), "--spacing-um", *spacing, "--seed", *map(str, seed), "--out", str(out)]) == 0
    crop, matrix = readLabelCrop(stacks.openStack(out))
    assert abs(np.count_nonzero(crop) * np.prod(SPACING) / truth - 1.0) < 0.01
    bad = tmp_path / "bad.nrrd"
    assert cli.main(["segment", str(path), "--spacing-um", *spacing, "--seed", "0", "0", "0", "--threshold", "600",
                     "--out", str(bad)]) == 2
    assert not bad.exists()


@pytest.fixture(scope="module")
def tumourChannelSample(tmp_path_factory):
    """The seed-0 small sample with its tumour reporter channel (sampledata.SampleGeometry(tumourChannel=True)):
    a two-channel OME-TIFF whose native tumour volume is known analytically (truth.json 'channels')."""
    from MRIHistoRegLib import sampledata

    folder = tmp_path_factory.mktemp("tumourChannel") / "sample"
    sampledata.generateSampleData(folder, size="small", seed=0, geometry=sampledata.SampleGeometry(tumourChannel=True))
    return folder


def test_the_samples_tumour_channel_gives_its_native_volume_within_one_percent(tumourChannelSample):
    import json

    truth = json.loads((tumourChannelSample / "truth.json").read_text())["channels"]
    source = stacks.openStack(tumourChannelSample / truth["file"], channel="tumour")
    result = segment.segmentStack(source)  # Otsu's threshold, the largest component
    assert result.thresholdMethod == "otsu" and result.channel == "tumour"
    assert abs(result.volumeMm3 / truth["tumour_native_volume_mm3"] - 1) < 0.01, result.volumeMm3


def test_the_run_segments_the_tumour_channel_and_carries_it_into_mri_space(tmp_path, tumourChannelSample):
    """labels.histology as a segmentation of the sample's tumour channel: the run writes the native label map,
    reports its volume (within 1 % of the analytic truth), and carries it into MRI space like the given label
    map (same Dice within the label maps' own voxel differences)."""
    import json

    from MRIHistoRegLib import config as configLib
    from MRIHistoRegLib import outputs, pipeline

    folder = tumourChannelSample
    truth = json.loads((folder / "truth.json").read_text())
    raw = json.loads((folder / "config.json").read_text())
    raw.update(histology=truth["channels"]["file"], refine=False, histology_channel="autofluorescence")
    given = pipeline.runPipeline(configLib.parseConfig(dict(raw), str(folder / "config.json")), tmp_path / "given")
    raw["labels"] = dict(raw["labels"], histology={"segment_channel": "tumour"})
    report = pipeline.runPipeline(configLib.parseConfig(raw, str(folder / "config.json")), tmp_path / "segmented")

    section = report["histology_segmentation"]
    assert section["channel"] == "tumour" and section["threshold_method"] == "otsu"
    assert abs(section["native_volume_mm3"] / truth["channels"]["tumour_native_volume_mm3"] - 1) < 0.01
    written = tmp_path / "segmented" / outputs.HISTOLOGY_SEGMENTATION
    assert section["label_path"] == outputs.HISTOLOGY_SEGMENTATION and written.is_file()
    (label, rows), = report["labels"].items()
    assert rows["histology_native_mm3"] == pytest.approx(section["native_volume_mm3"])
    assert rows["dice"] == pytest.approx(given["labels"][label]["dice"], abs=0.01)
    assert abs(rows["histology_in_mri_jacobian_mm3"] / given["labels"][label]["histology_in_mri_jacobian_mm3"] - 1) < 0.01
    low, high = rows["histology_in_mri_interval_mm3"]
    assert low < rows["histology_in_mri_jacobian_mm3"] < high


@pytest.mark.parametrize("spec, message", [
    ({"channel": "tumour"}, "segment_channel"),
    ({"segment_channel": "tumour", "threshold": "high"}, "'threshold' must be a number"),
    ({"segment_channel": "tumour", "seed_ijk": [1, 2]}, "'seed_ijk' must be three voxel indices"),
    ({"segment_channel": "tumour", "crop_ijk": [1, 2, 3]}, "'crop_ijk' must be"),
    ({"segment_channel": "tumour", "fill_holes": "yes"}, "'fill_holes' must be true or false"),
    ({"segment_channel": -1}, "'histology_channel' must be a channel index"),
])
def test_a_bad_segmentation_in_the_config_names_the_field(tmp_path, spec, message):
    from MRIHistoRegLib import config as configLib

    for name in ("mri.nrrd", "stack.tif", "a.csv", "b.csv", "label.nrrd"):
        (tmp_path / name).write_bytes(b"x")
    raw = {"mri": "mri.nrrd", "histology": "stack.tif", "landmarks": {"mri": "a.csv", "histology": "b.csv"},
           "labels": {"mri": "label.nrrd", "histology": spec}}
    with pytest.raises(UserInputError, match=message):
        configLib.parseConfig(raw, str(tmp_path / "config.json"))
    raw["labels"]["histology"] = {"segment_channel": "tumour", "seed_ijk": [1, 2, 3], "crop_ijk": [[0, 4], [0, 5], [0, 6]]}
    parsed = configLib.parseConfig(raw, str(tmp_path / "config.json"))
    assert parsed.labels == {"mri": str(tmp_path / "label.nrrd")}
    assert parsed.histologySegmentation == {"channel": "tumour", "threshold": None, "seedIjk": [1, 2, 3],
                                            "roi": ((0, 4), (0, 5), (0, 6)), "fillHoles": True}
