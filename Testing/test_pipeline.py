"""The headless main job end to end on the generated sample, checked against its ground truth."""
import csv
import hashlib
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from MRIHistoRegLib import cli, pipeline, sampledata
from MRIHistoRegLib.config import loadConfig


def _checksums(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def sample(sampleData):
    """The session's shared seed-0 small sample (conftest.sampleData): inputs only, never written to."""
    return sampleData


@pytest.fixture(scope="module")
def demoRun(sample, tmp_path_factory):
    before = _checksums(sample)
    out = tmp_path_factory.mktemp("run") / "report"
    assert cli.main(["run", str(sample / "config.json"), "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text()), sampledata.loadTruth(sample), before


@pytest.mark.bspline_refinement
def test_report_figures_match_ground_truth(demoRun, sample):
    out, report, truth, before = demoRun
    voxel = 0.1  # MRI spacing (mm)
    assert report["evaluation"]["count"] == truth["eval_points"]["count"]
    assert report["evaluation"]["tre_median_mm"] <= voxel, "held-out TRE median must be within one MRI voxel"
    # shrinkage from the fit is near the construction's 40 % by volume
    assert abs(report["transform"]["shrinkage_volume_percent"] - truth["shrinkage"]["volume_shrinkage_percent"]) < 5
    assert report["jacobian"]["folded_fraction"] == 0.0
    row = report["labels"]["1"]
    trueMri = truth["tumour"]["mri_volume_mm3"]
    # native histology volume with the corrected spacing, vs the analytic native volume
    assert row["histology_native_mm3"] == pytest.approx(truth["tumour"]["histology_volume_mm3"], rel=0.02)
    # two independent ways of carrying the histology tumour into MRI space agree
    assert row["histology_in_mri_jacobian_mm3"] == pytest.approx(row["histology_in_mri_resampled_mm3"], rel=0.01)
    # the sample's config refines the landmark fit (default engine): the tumour volume in MRI space from histology
    # within 4 % of the truth (measured -3.5 % with elastix, -1.3 % with SimpleITK; landmark-only +2.7 %; issue 15's
    # 2 % on 5 of 5 seeds is not reached yet: bench/refine.py), and the truth inside the reported 95 % interval
    assert report["refinement"]["accepted"], report["refinement"]["reason"]
    assert row["histology_in_mri_jacobian_mm3"] == pytest.approx(trueMri, rel=0.04)
    low, high = row["histology_in_mri_interval_mm3"]
    assert low <= trueMri <= high
    assert row["dice"] > 0.85 and row["hd95_mm"] <= 2 * voxel
    assert _checksums(sample) == before, "the pipeline must never modify its inputs"


@pytest.mark.bspline_refinement
def test_report_folder_contents_and_consistency(demoRun):
    out, report, truth, _ = demoRun
    for name in ("report.json", "report.csv", "transform.h5", "histology_on_mri.nrrd", "histology_labels_on_mri.nrrd",
                 "overlay_axial.png", "overlay_coronal.png", "overlay_sagittal.png", "landmark_errors.png", "jacobian.png"):
        assert (out / name).stat().st_size > 0, name
    labels = [row["label"] for row in report["landmarks"]]
    assert labels == sorted(labels) and len(labels) == 12
    assert all(row["loo_mm"] > row["residual_mm"] for row in report["landmarks"]), "TPS interpolates; LOO does not"
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    tre = [float(r["value"]) for r in rows if r["section"] == "evaluation" and r["quantity"] == "tre_mm"]
    np.testing.assert_allclose(sorted(tre), sorted(report["evaluation"]["tre_mm"]))
    # the resampled histology sits on the MRI grid (read back with SimpleITK, an independent reader)
    mri = sitk.ReadImage(str(out / ".." / "report" / "histology_on_mri.nrrd"))
    assert mri.GetSize() == (100, 200, 120)
    np.testing.assert_allclose(mri.GetSpacing(), (0.1, 0.1, 0.1), atol=1e-6)


@pytest.mark.bspline_refinement
def test_transform_file_maps_points_like_the_report(demoRun, sample, tmp_path):
    out, report, truth, _ = demoRun
    mapped = tmp_path / "mapped.csv"
    assert cli.main(["map-points", "--transform", str(out / "transform.h5"), "--points", str(sample / "eval_points_mri.csv"),
                     "--direction", "fixed-to-moving", "--out", str(mapped)]) == 0
    from MRIHistoRegLib import landmarks

    labels, points = landmarks.readPoints(mapped)
    truthLabels, truthPoints = landmarks.readPoints(sample / "eval_points_histology.csv")
    assert labels == truthLabels
    error = np.linalg.norm(points - truthPoints, axis=1)
    byLabel = {p["label"]: p["tre_histology_space_mm"] for p in report["evaluation"]["points"]}
    np.testing.assert_allclose(error, [byLabel[label] for label in labels], atol=1e-3)


def _configWith(sample, tmp_path, **changes):
    raw = json.loads((sample / "config.json").read_text())
    raw = {k: (os.path.join(sample, v) if isinstance(v, str) and os.path.exists(os.path.join(sample, v)) else v)
           for k, v in raw.items()}
    for key in ("landmarks", "labels", "evaluate_points"):
        raw[key] = {side: os.path.join(sample, path) for side, path in raw[key].items()}
    raw["refine"] = False  # these runs test other steps (or fail before any): no 45 s refinement unless asked
    raw.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return loadConfig(path)


def _expectFailureLeavesNothing(config, tmp_path, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        pipeline.runPipeline(config, out)
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")], "no partial report folder may remain"


def test_label_on_wrong_grid_is_refused(sample, tmp_path):
    config = _configWith(sample, tmp_path, labels={"mri": str(sample / "histology_tumour_label.nrrd"),
                                                   "histology": str(sample / "histology_tumour_label.nrrd")})
    _expectFailureLeavesNothing(config, tmp_path, "MRI label map must be on the MRI's grid")


def test_empty_label_is_refused(sample, tmp_path):
    import nrrd

    data, header = nrrd.read(str(sample / "mri_tumour_label.nrrd"))
    nrrd.write(str(tmp_path / "empty.nrrd"), np.zeros_like(data), header)
    config = _configWith(sample, tmp_path, labels={"mri": str(tmp_path / "empty.nrrd"),
                                                   "histology": str(sample / "histology_tumour_label.nrrd")})
    _expectFailureLeavesNothing(config, tmp_path, "labels.mri is empty")


def test_landmarks_outside_the_image_are_refused(sample, tmp_path):
    from MRIHistoRegLib import landmarks

    labels, points = landmarks.readPoints(sample / "landmarks_histology.csv")
    points = points * 1000.0  # the classic mm/um mix-up
    landmarks.writePoints(tmp_path / "far.csv", labels, points)
    config = _configWith(sample, tmp_path, landmarks={"mri": str(sample / "landmarks_mri.csv"),
                                                      "histology": str(tmp_path / "far.csv")})
    _expectFailureLeavesNothing(config, tmp_path, "outside the image")


def test_cohort_mode_writes_one_summary(sample, tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    for name in ("mouseA", "mouseB"):
        raw = json.loads((sample / "config.json").read_text())
        raw["name"] = name
        raw["refine"] = False  # the summary table is under test here, not the refinement (demoRun has it)
        raw.pop("labels")
        for key in ("mri", "histology"):
            raw[key] = str(sample / raw[key])
        for key in ("landmarks", "evaluate_points"):
            raw[key] = {side: str(sample / p) for side, p in raw[key].items()}
        (folder / f"{name}.json").write_text(json.dumps(raw))
    assert cli.main(["run", str(folder), "--out", str(tmp_path / "cohort")]) == 0
    with open(tmp_path / "cohort" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["mouseA", "mouseB"]
    assert rows[0]["tre_median_mm"] == rows[1]["tre_median_mm"]  # same inputs, deterministic result
    assert (tmp_path / "cohort" / "mouseA" / "report.json").exists()


@pytest.mark.bspline_refinement
def test_refined_run_saves_the_whole_chain_in_transform_h5(sample, demoRun, tmp_path):
    """refine: true (the sample's config, demoRun) composes landmark(refinement(x)) into the one saved transform;
    figures stay truthful."""
    from MRIHistoRegLib import landmarks

    out, report, truth, _ = demoRun
    landmarkOnlyOut = tmp_path / "landmark-only"
    pipeline.runPipeline(_configWith(sample, tmp_path, refine=False), landmarkOnlyOut)
    landmarkOnly = json.loads((landmarkOnlyOut / "report.json").read_text())
    assert landmarkOnly["refinement"] is None
    assert report["refinement"]["accepted"], report["refinement"]["reason"]
    assert report["jacobian"]["folded_fraction"] == 0.0
    # ground truth: the refined chain must not be worse than the landmark-only result on held-out points
    assert report["evaluation"]["tre_median_mm"] <= landmarkOnly["evaluation"]["tre_median_mm"] * 1.05
    # the saved transform IS the chain the report measured (independent path: MRML storage + VTK)
    mapped = tmp_path / "mapped.csv"
    assert cli.main(["map-points", "--transform", str(out / "transform.h5"), "--points", str(sample / "eval_points_mri.csv"),
                     "--direction", "fixed-to-moving", "--out", str(mapped)]) == 0
    labels, points = landmarks.readPoints(mapped)
    _, truthPoints = landmarks.readPoints(sample / "eval_points_histology.csv")
    byLabel = {p["label"]: p["tre_histology_space_mm"] for p in report["evaluation"]["points"]}
    np.testing.assert_allclose(np.linalg.norm(points - truthPoints, axis=1), [byLabel[label] for label in labels], atol=1e-3)


def test_the_cli_tells_a_user_error_from_a_bug(tmp_path, caplog, monkeypatch):
    """A user error prints its fix and exits 2; an internal error (here a ValueError raised inside a step, as a bug
    would) prints a traceback and exits 1 instead of being passed off as the user's mistake."""
    import logging

    from MRIHistoRegLib import cli, pipeline

    caplog.set_level(logging.INFO)
    assert cli.main(["run", str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")]) == 2
    assert "Traceback" not in caplog.text

    def broken(*args, **kwargs):
        raise ValueError("internal: shapes (3,) and (4,) not aligned")

    monkeypatch.setattr(pipeline, "runPipeline", broken)
    config = tmp_path / "c.json"
    config.write_text("{}")
    monkeypatch.setattr("MRIHistoRegLib.config.loadConfig", lambda path: None)
    caplog.clear()
    assert cli.main(["run", str(config), "--out", str(tmp_path / "out")]) == 1
    assert "Traceback" in caplog.text and "internal: shapes" in caplog.text


def test_the_panel_and_run_write_the_same_files_under_the_same_names(sample, tmp_path, scene):
    """Two fronts, one input (the sample, landmark-only): `run` and the panel's path through the logic facade
    (fit, resample from the original stack, compare, export) write the same files with the same report keys and
    the same numbers."""
    from MRIHistoRegLib import outputs
    from MRIHistoRegLib.logic import MRIHistoRegLogicCore

    config = json.loads((sample / "config.json").read_text())
    config["refine"] = False
    configPath = tmp_path / "config.json"
    for key in ("mri", "histology"):
        config[key] = str(sample / config[key])
    for group in ("landmarks", "labels", "evaluate_points"):
        config[group] = {role: str(sample / path) for role, path in config[group].items()}
    configPath.write_text(json.dumps(config))
    assert cli.main(["run", str(configPath), "--out", str(tmp_path / "run")]) == 0

    logic = MRIHistoRegLogicCore(scene)
    nodes = logic.loadSampleData(str(tmp_path / "panelSample"))  # the same seed-0 sample, generated for the panel
    truthSpacing = nodes.truth["histology"]["true_spacing_mm"]
    fit = logic.fitLandmarks(nodes.mriLandmarks, nodes.histologyLandmarks, config["model"],
                             referenceVolume=nodes.mri)
    resampled = logic.resampleHistology(fit.transformNode, nodes.mri, stackPath=nodes.stackPath,
                                        spacingMm=truthSpacing)
    compared = logic.compareLabels(nodes.mriLabels, nodes.histologyLabels, fit.transformNode,
                                   mriVolume=nodes.mri, mriLandmarks=nodes.mriLandmarks,
                                   histologyLandmarks=nodes.histologyLandmarks)
    logic.exportReport(str(tmp_path / "panel"), fit.transformNode, fit.tableNode, compared.tableNode,
                       resampled, nodes.mriLandmarks, nodes.histologyLandmarks, nodes.mri)

    runFiles, panelFiles = set(os.listdir(tmp_path / "run")), set(os.listdir(tmp_path / "panel"))
    shared = {outputs.TRANSFORM, outputs.HISTOLOGY_ON_MRI, outputs.REPORT_JSON, outputs.REPORT_CSV,
              outputs.LANDMARK_ERRORS_FIGURE, "overlay_axial.png"}
    assert shared <= runFiles and shared <= panelFiles, (runFiles, panelFiles)
    run = json.loads((tmp_path / "run" / "report.json").read_text())
    panel = json.loads((tmp_path / "panel" / "report.json").read_text())
    assert list(run) == list(panel) == list(outputs.REPORT_SECTIONS)
    assert [sorted(row) for row in run["landmarks"]] == [sorted(row) for row in panel["landmarks"]]
    for a, b in zip(run["landmarks"], panel["landmarks"]):
        assert a["label"] == b["label"] and a["loo_mm"] == pytest.approx(b["loo_mm"], abs=1e-9)
    assert sorted(run["transform"]) == sorted(panel["transform"])
    assert run["transform"]["shrinkage_volume_percent"] == pytest.approx(panel["transform"]["shrinkage_volume_percent"], abs=1e-9)
    assert sorted(run["landmark_summary"]) == sorted(panel["landmark_summary"])
    assert sorted(run["labels"]["1"]) == sorted(panel["labels"]["1"])
    assert run["labels"]["1"]["dice"] == pytest.approx(panel["labels"]["1"]["dice"], abs=1e-9)
    # the volume's interval: the same jackknife refits from the same point lists (uncertainty.py)
    assert run["labels"]["1"]["histology_in_mri_interval_mm3"] == pytest.approx(
        panel["labels"]["1"]["histology_in_mri_interval_mm3"], rel=1e-4)
    runImage = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "run" / outputs.HISTOLOGY_ON_MRI)))
    panelImage = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "panel" / outputs.HISTOLOGY_ON_MRI)))
    # run maps through the fitted model, the panel through the transform node's VTK thin-plate spline: the same
    # mapping in two float representations, each evaluated on resample's lattice within its stated tolerance (max
    # 0.1, p99 0.02 stack voxel; both runs measured 0.07 / 0.01). Where the stack's texture is steep that shows:
    # measured, 0.09 % of the voxels differ by more than 1e-4 of the intensity range, none at the footprint's edge.
    differs = np.abs(runImage - panelImage) > 1e-4 * float(runImage.max())
    assert differs.mean() < 0.002, differs.mean()


@pytest.mark.bspline_refinement
def test_report_volume_interval_holds_the_truth(demoRun):
    """The refined run's tumour volume in MRI space carries its landmark jackknife interval (uncertainty.py),
    and the analytic truth lies inside it (README: Volume uncertainty)."""
    _, report, truth, _ = demoRun
    row = report["labels"]["1"]
    low, high = row["histology_in_mri_interval_mm3"]
    assert low < row["histology_in_mri_jacobian_mm3"] < high
    assert low <= truth["tumour"]["mri_volume_mm3"] <= high
    assert row["histology_in_mri_interval_level"] == 0.95
    assert "refinement's correction held fixed" in row["histology_in_mri_interval_method"]
