"""The run configuration refuses bad input with messages naming the field; output folders are atomic."""
import json
import os

import pytest

from MRIHistoRegLib import outputs
from MRIHistoRegLib.config import loadConfig, parseConfig


@pytest.fixture
def subject(tmp_path):
    for name in ("mri.nrrd", "hist.tif", "a.csv", "b.csv"):
        (tmp_path / name).write_bytes(b"x")
    raw = {"mri": "mri.nrrd", "histology": "hist.tif", "histology_spacing_um": [3.25, 3.25, 5],
           "landmarks": {"mri": "a.csv", "histology": "b.csv"}}
    return tmp_path, raw


def write(folder, raw):
    path = folder / "config.json"
    path.write_text(json.dumps(raw))
    return path


def test_relative_paths_resolve_against_the_config_folder(subject, monkeypatch, tmp_path_factory):
    folder, raw = subject
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = loadConfig(write(folder, raw))
    assert config.mri == str(folder / "mri.nrrd")
    assert config.landmarks == {"mri": str(folder / "a.csv"), "histology": str(folder / "b.csv")}
    assert config.histologySpacingMm == pytest.approx((0.00325, 0.00325, 0.005), rel=1e-12)  # mm inside, once
    assert config.model == "affine+tps" and config.refine is False


@pytest.mark.parametrize("change, field", [
    ({"mri": None}, "mri"),
    ({"histology": "missing.tif"}, "histology"),
    ({"histology_spacing_um": [3.25, 0, 5]}, "histology_spacing_um"),
    ({"histology_spacing_um": [3.25, 5]}, "histology_spacing_um"),
    ({"histology_spacing_um": "3.25"}, "histology_spacing_um"),
    ({"model": "tps"}, "model"),
    ({"refine": "yes"}, "refine"),
    ({"working_spacing_mm": -1}, "working_spacing_mm"),
    ({"tumour_focus": "no"}, "tumour_focus"),
    ({"landmarks": {"mri": "a.csv"}}, "landmarks"),
    ({"labels": {"mri": "a.csv", "histology": "nope.nrrd"}}, "labels.histology"),
    ({"spacing": [1, 1, 1]}, "spacing"),
])
def test_bad_fields_are_named(subject, change, field):
    folder, raw = subject
    for key, value in change.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        loadConfig(write(folder, raw))


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        loadConfig(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        loadConfig(bad)


def test_atomic_folder_leaves_nothing_on_failure_and_keeps_foreign_folders(tmp_path):
    out = tmp_path / "report"
    with pytest.raises(RuntimeError):
        with outputs.atomicFolder(out) as work:
            (open(os.path.join(work, "half.json"), "w")).close()
            raise RuntimeError("step failed")
    assert not out.exists() and os.listdir(tmp_path) == []

    with outputs.atomicFolder(out) as work:
        (open(os.path.join(work, "first.json"), "w")).close()
    with outputs.atomicFolder(out) as work:  # a previous MRIHistoReg output is replaced whole
        (open(os.path.join(work, "second.json"), "w")).close()
    assert sorted(os.listdir(out)) == [outputs.MARKER, "second.json"]
    assert sorted(os.listdir(tmp_path)) == ["report"]

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("precious")
    with pytest.raises(ValueError, match="not empty"):
        with outputs.atomicFolder(foreign):
            pass
    assert (foreign / "thesis.docx").read_text() == "precious"


def test_refine_preset_and_mask_are_read_and_checked(tmp_path):
    from MRIHistoRegLib import settings

    for name in ("mri.nrrd", "hist.tif", "a.csv", "b.csv", "mask.nrrd"):
        (tmp_path / name).write_text("x")
    raw = {"mri": "mri.nrrd", "histology": "hist.tif", "landmarks": {"mri": "a.csv", "histology": "b.csv"},
           "refine_preset": "affine", "mri_mask": "mask.nrrd"}
    config = parseConfig(raw, str(tmp_path / "c.json"))
    assert config.refinePreset == "affine" and config.refineSettings == settings.REFINE_PRESETS["affine"]
    assert config.mriMask == str(tmp_path / "mask.nrrd")
    with pytest.raises(ValueError, match="refine_preset"):
        parseConfig(dict(raw, refine_preset="B-spline only"), str(tmp_path / "c.json"))


def test_tumour_focus_is_on_by_default_and_can_be_turned_off_for_any_engine(tmp_path):
    """tumour_focus false reaches the elastix engine's settings; the SimpleITK presets (no focus) still resolve."""
    from MRIHistoRegLib import workflow

    for name in ("mri.nrrd", "hist.tif", "a.csv", "b.csv"):
        (tmp_path / name).write_text("x")
    raw = {"mri": "mri.nrrd", "histology": "hist.tif", "landmarks": {"mri": "a.csv", "histology": "b.csv"}}
    path = str(tmp_path / "c.json")
    assert "tumourFocus" not in parseConfig(raw, path).refineSettings  # the engine's default (on) applies
    assert parseConfig(dict(raw, tumour_focus=False), path).refineSettings["tumourFocus"] is False
    # the elastix engine checks and keeps it; the SimpleITK presets, which have no focus, still resolve
    from MRIHistoRegLib import elastix

    assert elastix.elastixSettings({"tumourFocus": False})["tumourFocus"] is False
    engine, simple, _ = workflow._engineSettings(parseConfig(dict(raw, tumour_focus=False, refine_preset="affine"),
                                                             path).refineSettings)
    assert engine == "simpleitk" and "tumourFocus" not in simple


@pytest.mark.parametrize("channel", [0, 1, "autofluorescence"])
def test_histology_channel_is_read(subject, channel):
    folder, raw = subject
    assert loadConfig(write(folder, dict(raw, histology_channel=channel))).histologyChannel == channel


@pytest.mark.parametrize("channel", [-1, True, "", 1.5, [0]])
def test_a_bad_histology_channel_is_named_with_the_fix(subject, channel):
    folder, raw = subject
    with pytest.raises(ValueError, match="histology_channel.*lists them"):
        loadConfig(write(folder, dict(raw, histology_channel=channel)))
