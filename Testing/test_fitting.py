"""Landmark fits: ground truth by construction, VTK and scipy as independent references, honest error figures."""

import numpy as np
import pytest

from MRIHistoRegLib import fitting
from helpers import randomRotation, readElastixPoints


def _apply(matrix, points):
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def _cloud(rng, count=20, offset=(12.0, -30.0, 250.0), spread=5.0):
    return np.asarray(offset) + rng.normal(size=(count, 3)) * spread


@pytest.fixture
def lung(sharedData):
    folder = sharedData / "lung_landmarks"
    _, fixed = readElastixPoints(folder / "CT_3D_lung_fixed_point_set_corrected.txt")
    _, moving = readElastixPoints(folder / "CT_3D_lung_moving_point_set_corrected.txt")
    assert fixed.shape == moving.shape == (51, 3)
    return fixed, moving


def _vtkTps(source, target):
    import vtk

    tps = vtk.vtkThinPlateSplineTransform()
    tps.SetBasisToR()
    landmarks = []
    for points in (source, target):
        vtkPoints = vtk.vtkPoints()
        vtkPoints.SetDataTypeToDouble()
        for p in points:
            vtkPoints.InsertNextPoint(*p)
        landmarks.append(vtkPoints)
    tps.SetSourceLandmarks(landmarks[0])
    tps.SetTargetLandmarks(landmarks[1])
    return lambda points: np.array([tps.TransformPoint(*p) for p in points])


# --- exact recovery -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["rigid", "similarity", "affine"])
def test_knownLinearTransformRecovered(model):
    rng = np.random.default_rng(1)
    truth = np.eye(4)
    linear = randomRotation(rng)
    if model == "similarity":
        linear = 0.73 * linear
    if model == "affine":
        linear = linear @ np.diag([0.8, 1.3, 0.6]) @ randomRotation(rng)
    truth[:3, :3] = linear
    truth[:3, 3] = [4.0, -7.5, 21.0]
    fixed = _cloud(rng)
    moving = _apply(truth, fixed)
    fitted = fitting.fitLandmarks(fixed, moving, model)
    np.testing.assert_allclose(fitted.affineMatrix, truth, atol=1e-9)
    assert fitted.isLinear and fitted.model == model
    probe = _cloud(rng, 50)
    np.testing.assert_allclose(fitted.transformPoints(probe), _apply(truth, probe), atol=1e-9)
    # exact inverse for linear models
    back, residual = fitted.inverseTransformPoints(_apply(truth, probe))
    np.testing.assert_allclose(back, probe, atol=1e-9)
    assert residual.max() < 1e-9


def test_rigidNeverReflects():
    """A mirrored point set has no rigid fit with zero error; the fit must stay a proper rotation."""
    rng = np.random.default_rng(2)
    fixed = _cloud(rng, 10)
    moving = fixed * [-1, 1, 1]
    fitted = fitting.fitLandmarks(fixed, moving, "rigid")
    rotation = fitted.affineMatrix[:3, :3]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rotation) == pytest.approx(1.0)


def test_tpsOfAffinePointsIsThatAffine():
    rng = np.random.default_rng(3)
    truth = np.eye(4)
    truth[:3, :3] = np.diag([0.8, 0.9, 0.7]) @ randomRotation(rng)
    truth[:3, 3] = [1, 2, 3]
    fixed = _cloud(rng, 12)
    fitted = fitting.fitLandmarks(fixed, _apply(truth, fixed), "affine+tps")
    assert np.abs(fitted.tpsWeights).max() < 1e-9
    probe = _cloud(rng, 30, spread=15)
    np.testing.assert_allclose(fitted.transformPoints(probe), _apply(truth, probe), atol=1e-9)


def test_shrinkageReadout():
    """fixed->moving scale 0.8: histology is 0.8^3 = 51.2% of the MRI volume -> shrinkage 48.8% (linear 20%)."""
    rng = np.random.default_rng(4)
    fixed = _cloud(rng, 15)
    truth = np.eye(4)
    truth[:3, :3] = 0.8 * randomRotation(rng)
    evaluation = fitting.evaluateFit(fixed, _apply(truth, fixed), None, "similarity")
    assert evaluation["scale"] == pytest.approx(0.8, abs=1e-12)
    assert evaluation["volume_ratio"] == pytest.approx(0.512, abs=1e-12)
    assert evaluation["shrinkage_volume_percent"] == pytest.approx(48.8, abs=1e-9)
    assert evaluation["shrinkage_linear_percent"] == pytest.approx(20.0, abs=1e-9)
    rigid = fitting.evaluateFit(fixed, _apply(truth, fixed), None, "rigid")
    assert rigid["shrinkage_volume_percent"] == pytest.approx(0.0, abs=1e-9)


# --- TPS against independent implementations -----------------------------------------------------------------

def test_tpsMatchesVtkAndScipyOnRealLungPairs(lung):
    from scipy.interpolate import RBFInterpolator

    fixed, moving = lung
    fitted = fitting.fitLandmarks(fixed, moving, "affine+tps")
    rng = np.random.default_rng(5)
    probe = np.vstack([fixed, fixed.mean(axis=0) + rng.normal(size=(300, 3)) * fixed.std(axis=0)])
    ours = fitted.transformPoints(probe)
    np.testing.assert_allclose(ours[:51], moving, atol=1e-6)  # interpolates
    assert np.abs(ours - _vtkTps(fixed, moving)(probe)).max() < 1e-6
    scipyTps = RBFInterpolator(fixed, moving, kernel="linear", degree=1)
    assert np.abs(ours - scipyTps(probe)).max() < 1e-6
    # the decomposition: affine least squares + TPS of the residual
    np.testing.assert_allclose(fitted.affineMatrix, fitting.fitLandmarks(fixed, moving, "affine").affineMatrix, atol=1e-12)


def test_tpsRegularizationIsScipySmoothing(lung):
    from scipy.interpolate import RBFInterpolator

    fixed, moving = lung
    rng = np.random.default_rng(6)
    probe = fixed.mean(axis=0) + rng.normal(size=(200, 3)) * fixed.std(axis=0)
    residuals = []
    for smoothing in (0.5, 5.0, 50.0):
        fitted = fitting.fitLandmarks(fixed, moving, "affine+tps", regularization=smoothing)
        reference = RBFInterpolator(fixed, moving, kernel="linear", degree=1, smoothing=smoothing)
        assert np.abs(fitted.transformPoints(probe) - reference(probe)).max() < 1e-6
        residuals.append(np.linalg.norm(fitted.transformPoints(fixed) - moving, axis=1).mean())
    assert residuals[0] < residuals[1] < residuals[2]  # more smoothing, less exact
    with pytest.raises(ValueError, match="regularization"):
        fitting.fitLandmarks(fixed, moving, "affine+tps", regularization=-1)


def test_leaveOneOutMatchesIndependentRefits(lung):
    from scipy.interpolate import RBFInterpolator

    fixed, moving = lung
    loo = fitting.leaveOneOutErrors(fixed, moving, "affine+tps")
    for i in (0, 17, 50):
        keep = np.arange(51) != i
        prediction = RBFInterpolator(fixed[keep], moving[keep], kernel="linear", degree=1)(fixed[i:i + 1])[0]
        assert loo[i] == pytest.approx(np.linalg.norm(prediction - moving[i]), abs=1e-6)


def test_jacobianAnalyticMatchesFiniteDifferences(lung):
    fixed, moving = lung
    fitted = fitting.fitLandmarks(fixed, moving, "affine+tps")
    rng = np.random.default_rng(7)
    probe = fixed.mean(axis=0) + rng.normal(size=(100, 3)) * fixed.std(axis=0)
    h = 1e-4
    numeric = np.stack([(fitted.transformPoints(probe + h * e) - fitted.transformPoints(probe - h * e)) / (2 * h)
                        for e in np.eye(3)], axis=2)
    np.testing.assert_allclose(fitted.jacobian(probe), numeric, atol=1e-6)


def test_jacobianSummaryOnGrid():
    rng = np.random.default_rng(8)
    fixed = _cloud(rng, 12)
    truth = np.eye(4)
    truth[:3, :3] = np.diag([0.9, 0.8, 0.7])
    moving = _apply(truth, fixed)
    grid = np.diag([0.5, 0.5, 0.5, 1.0])
    grid[:3, 3] = fixed.min(axis=0)
    smooth = fitting.jacobianSummary(fitting.fitLandmarks(fixed, moving, "affine+tps"), (20, 20, 20), grid, step=2)
    assert smooth["min"] == pytest.approx(0.504, abs=1e-9) and smooth["max"] == pytest.approx(0.504, abs=1e-9)
    assert smooth["folded_fraction"] == 0.0 and smooth["samples"] == 1000
    # swap the targets of two nearby pairs: the interpolating warp must fold between them
    order = np.argsort(np.linalg.norm(fixed - fixed[0], axis=1))
    swapped = moving.copy()
    swapped[[order[0], order[1]]] = swapped[[order[1], order[0]]]
    folded = fitting.fitLandmarks(fixed, swapped, "affine+tps")
    summary = fitting.jacobianSummary(folded, *fitting.defaultJacobianGrid(fixed, samplesPerAxis=40))
    assert summary["min"] < 0 < summary["folded_fraction"] < 0.5


def test_tpsInverseRoundTrip(lung):
    fixed, moving = lung
    fitted = fitting.fitLandmarks(fixed, moving, "affine+tps")
    rng = np.random.default_rng(9)
    probe = fixed.mean(axis=0) + rng.normal(size=(200, 3)) * fixed.std(axis=0) * 0.8
    back, residual = fitted.inverseTransformPoints(fitted.transformPoints(probe))
    assert residual.max() < 1e-6
    np.testing.assert_allclose(back, probe, atol=1e-5)
    back, residual = fitted.inverseTransformPoints(moving)
    np.testing.assert_allclose(back, fixed, atol=1e-5)


# --- error figures -------------------------------------------------------------------------------------------

def test_noisyLeaveOneOutBehaves():
    rng = np.random.default_rng(10)
    fixed = _cloud(rng, 30)
    truth = np.eye(4)
    truth[:3, :3] = 0.75 * randomRotation(rng)
    moving = _apply(truth, fixed) + rng.normal(size=fixed.shape) * 0.2
    labels = [f"L{i}" for i in range(30)]
    for model in fitting.MODELS:
        evaluation = fitting.evaluateFit(fixed, moving, labels, model)
        assert evaluation["labels"] == labels and len(evaluation["loo_mm"]) == 30
        assert evaluation["loo_rms_mm"] > evaluation["residual_rms_mm"], model
        assert np.all(np.array(evaluation["loo_mm"]) >= np.array(evaluation["residual_mm"]) - 1e-12), model
        assert evaluation["loo_max_mm"] >= evaluation["loo_rms_mm"]
        if model == "affine+tps":
            assert evaluation["residual_max_mm"] < 1e-9  # interpolates the noise ...
            assert evaluation["loo_rms_mm"] > 0.15       # ... and pays for it in prediction
            assert 0 <= evaluation["jacobian"]["folded_fraction"] <= 1
        elif model == "rigid":
            assert evaluation["residual_rms_mm"] > 1.0  # cannot shrink: the scale error shows
            assert evaluation["shrinkage_volume_percent"] == pytest.approx(0.0, abs=1e-9)
        else:
            assert 0.2 < evaluation["residual_rms_mm"] < 0.45  # noise: 0.2 mm per axis, 0.35 mm in 3-D
            assert evaluation["shrinkage_volume_percent"] == pytest.approx(100 * (1 - 0.75 ** 3), abs=3.0)


def test_outlierFlagged():
    rng = np.random.default_rng(11)
    fixed = _cloud(rng, 25)
    moving = fixed * 0.9 + rng.normal(size=fixed.shape) * 0.05
    moving[7] += [3.0, -2.0, 1.0]  # a misplaced landmark
    labels = [f"P{i}" for i in range(25)]
    for model in ("rigid", "similarity", "affine", "affine+tps"):
        evaluation = fitting.evaluateFit(fixed, moving, labels, model)
        assert "P7" in evaluation["outliers"], model
        assert evaluation["outlier"][7]
        assert evaluation["loo_mm"][7] == max(evaluation["loo_mm"])


# --- bad input -----------------------------------------------------------------------------------------------

def _points(count, seed=13):
    return _cloud(np.random.default_rng(seed), count)


@pytest.mark.parametrize("model,count", [("rigid", 2), ("similarity", 2), ("affine", 3), ("affine+tps", 4)])
def test_tooFewPairs(model, count):
    fixed = _points(count)
    with pytest.raises(ValueError, match=f"at least {fitting.MINIMUM_POINTS[model]} point pairs"):
        fitting.fitLandmarks(fixed, fixed, model)


def test_degenerateConfigurations():
    line = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2], [5, 5, 5.0]]) + 100
    labels = ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match=r"\(a, b, c, d\) are collinear"):
        fitting.fitLandmarks(line, line * 2, "rigid", labels=labels)
    plane = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [3, 2, 0.0]])
    fitting.fitLandmarks(plane, plane + 1, "similarity")  # fine for 3-parameter-free models
    with pytest.raises(ValueError, match="coplanar"):
        fitting.fitLandmarks(plane, plane + 1, "affine")
    with pytest.raises(ValueError, match="coplanar"):
        fitting.fitLandmarks(plane, plane + 1, "affine+tps")


def test_duplicatesNanMismatchUnknownNamed():
    fixed = _points(6)
    labels = [f"L{i}" for i in range(6)]
    duplicated = fixed.copy()
    duplicated[4] = duplicated[1]
    for model in fitting.MODELS:
        with pytest.raises(ValueError, match="Duplicate fixed.*L1 = L4"):
            fitting.fitLandmarks(duplicated, fixed, model, labels=labels)
    with pytest.raises(ValueError, match="Duplicate moving.*L1 = L4"):
        fitting.fitLandmarks(fixed, duplicated, "affine+tps", labels=labels)
    broken = fixed.copy()
    broken[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN.*L3"):
        fitting.fitLandmarks(fixed, broken, "affine", labels=labels)
    with pytest.raises(ValueError, match="6 fixed points but 5 moving"):
        fitting.fitLandmarks(fixed, fixed[:5], "affine")
    with pytest.raises(ValueError, match="Unknown landmark model"):
        fitting.fitLandmarks(fixed, fixed, "bspline")
    with pytest.raises(ValueError, match="labels"):
        fitting.fitLandmarks(fixed, fixed, "affine", labels=["x"])


@pytest.mark.parametrize("model,regularization", [("affine", 0.0), ("affine+tps", 0.0), ("affine+tps", 3.0),
                                                  ("similarity", 0.0)])
def test_closedFormLeaveOneOutEqualsRefits(lung, model, regularization):
    fixed, moving = lung
    fast = fitting.leaveOneOutErrors(fixed, moving, model, regularization)
    slow = fitting.leaveOneOutErrors(fixed, moving, model, regularization, refit=True)
    np.testing.assert_allclose(fast, slow, rtol=1e-7, atol=1e-9)
    assert np.isfinite(fast).all() and fast.min() > 0


def test_leaveOneOutUndeterminedPairIsNan(caplog):
    """Five points, four of them coplanar: without the fifth, an affine fit is undetermined."""
    fixed = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1.5, 0], [0.3, 0.2, 1.0]]) * 10
    moving = fixed * 0.9 + np.array([[0.1, 0, 0], [0, 0.1, 0], [0, 0, 0.1], [0.1, 0.1, 0], [0, 0, 0]])
    with caplog.at_level("WARNING"):
        loo = fitting.leaveOneOutErrors(fixed, moving, "affine", labels=list("abcde"))
    assert np.isnan(loo[4]) and np.isfinite(loo[:4]).all() and "pair e" in caplog.text
    evaluation = fitting.evaluateFit(fixed, moving, list("abcde"), "affine")
    assert np.isfinite(evaluation["loo_rms_mm"])  # NaN pairs are left out of the summary figures


# --- the generated phantom (sampledata.py): landmarks with realistic noise, exact ground truth ------------------

@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from MRIHistoRegLib import sampledata

    folder = tmp_path_factory.mktemp("phantom") / "sample"
    manifest = sampledata.generateSampleData(folder, size=20, seed=0)  # the coarsest stack: ~1 s, same landmarks
    return folder, manifest["truth"]


def test_phantomHeldOutPointsAndShrinkage(phantom):
    from MRIHistoRegLib import landmarks, sampledata

    folder, truth = phantom
    labels, fixed = landmarks.readPoints(folder / "landmarks_mri.mrk.json")
    movingLabels, moving = landmarks.readPoints(folder / "landmarks_histology.mrk.json")
    assert labels == movingLabels and len(labels) >= 10
    evalLabels, evalMri = landmarks.readPoints(folder / "eval_points_mri.csv")
    _, evalHistology = landmarks.readPoints(folder / "eval_points_histology.csv")
    errors = {}
    for model in fitting.MODELS:
        fitted, evaluation = fitting.evaluateAndFit(fixed, moving, labels, model)
        errors[model] = np.linalg.norm(fitted.transformPoints(evalMri) - evalHistology, axis=1)
        if model != "rigid":  # shrinkage readout near the truth (40.1 % by volume), from 12 noisy landmarks
            assert evaluation["shrinkage_volume_percent"] == pytest.approx(truth["shrinkage"]["volume_shrinkage_percent"], abs=4.0)
            assert evaluation["shrinkage_linear_percent"] == pytest.approx(100 * (1 - truth["shrinkage"]["linear_scale"]), abs=2.0)
        if model == "affine+tps":
            tps, tpsEvaluation = fitted, evaluation
    # held-out accuracy: landmark noise is 0.05 mm (MRI) / 0.015 mm (histology) per axis
    assert np.median(errors["affine+tps"]) < 0.1 and errors["affine+tps"].max() < 0.25
    assert np.median(errors["affine+tps"]) < np.median(errors["rigid"]) / 3  # the rigid model cannot shrink
    # LOO predicts the held-out error honestly (same order), the residual does not (TPS residual is 0)
    heldOutRms = np.sqrt(np.mean(errors["affine+tps"] ** 2))
    assert tpsEvaluation["residual_max_mm"] < 1e-9
    assert heldOutRms / 3 < tpsEvaluation["loo_rms_mm"] < heldOutRms * 3
    # the TPS Jacobian determinant (local volume ratio) against the true mapping's, at the held-out points
    trueDet = np.linalg.det(sampledata.GroundTruthMapping(truth).jacobian(evalMri))
    assert np.median(np.abs(np.linalg.det(tps.jacobian(evalMri)) - trueDet)) < 0.1
    assert tpsEvaluation["jacobian"]["folded_fraction"] == 0.0


def test_jacobianSummaryForVolumeUsesIjkOrder(scene):
    """A volume node's grid is (ni, nj, nk); a stretched non-cubic grid tells the axis order apart."""
    from MRIHistoRegLib.volumes import createVolumeNode

    rng = np.random.default_rng(14)
    fixed = _cloud(rng, 12, offset=(0, 0, 0))
    moving = fixed * 0.9 + rng.normal(size=fixed.shape) * 0.3
    fitted = fitting.fitLandmarks(fixed, moving, "affine+tps")
    geometry = np.diag([0.7, 0.5, 0.3, 1.0])
    geometry[:3, 3] = [-5.0, -6.0, -7.0]
    volume = createVolumeNode(scene, np.zeros((9, 7, 5), np.float32), geometry, "mri")  # [k, j, i]: ni=5, nj=7, nk=9
    summary = fitting.jacobianSummaryForVolume(fitted, volume, step=1)
    assert summary == fitting.jacobianSummary(fitted, (5, 7, 9), geometry, step=1)
    assert summary["samples"] == 315 and summary != fitting.jacobianSummary(fitted, (9, 7, 5), geometry, step=1)


def test_inverseReportsNonConvergence(caplog):
    """Inside a fold the forward map is not invertible: the residual says so instead of a silent wrong answer."""
    rng = np.random.default_rng(17)
    fixed = _cloud(rng, 12, offset=(0, 0, 0))
    moving = fixed.copy()
    order = np.argsort(np.linalg.norm(fixed - fixed[0], axis=1))
    moving[[order[0], order[1]]] = moving[[order[1], order[0]]]
    folded = fitting.fitLandmarks(fixed, moving, "affine+tps")
    targets = np.vstack([moving, fixed.mean(axis=0) + rng.normal(size=(400, 3)) * 8])
    with caplog.at_level("WARNING"):
        points, residual = folded.inverseTransformPoints(targets)
    converged = residual < fitting.INVERSE_TOLERANCE_MM
    np.testing.assert_allclose(folded.transformPoints(points[converged]), targets[converged], atol=1e-6)
    assert 0 < (~converged).sum() < 20 and residual[~converged].min() > 1e-3  # seed 17: a few fail, visibly
    assert "did not converge for %d of 412 points" % (~converged).sum() in caplog.text


@pytest.mark.parametrize("model", ["similarity", "affine", "affine+tps"])
def test_evaluateAndFitValidatesOnce(model, monkeypatch):
    """The live update's evaluateAndFit validates the pairs once (N^2 duplicate check + SVDs), and gives the same
    fit and LOO errors as the public functions that validate on their own."""
    rng = np.random.default_rng(5)
    fixed = _cloud(rng, 30)
    moving = _apply(np.diag([0.9, 0.95, 1.0, 1.0]), fixed) + rng.normal(scale=0.05, size=fixed.shape)
    labels = [f"P{i}" for i in range(30)]
    calls = []
    original = fitting.validateLandmarks
    monkeypatch.setattr(fitting, "validateLandmarks", lambda *a, **k: calls.append(1) or original(*a, **k))
    fitted, evaluation = fitting.evaluateAndFit(fixed, moving, labels, model)
    assert len(calls) == 1
    monkeypatch.setattr(fitting, "validateLandmarks", original)
    np.testing.assert_allclose(fitted.transformPoints(fixed), fitting.fitLandmarks(fixed, moving, model).transformPoints(fixed))
    np.testing.assert_allclose(evaluation["loo_mm"], fitting.leaveOneOutErrors(fixed, moving, model, labels=labels))


def test_exact_fit_flags_no_outliers():
    """Round-off LOO errors (~1e-15 mm) of an exact affine fit are not outliers, however they compare to the median."""
    rng = np.random.default_rng(5)
    fixed = rng.uniform(-5, 5, (10, 3))
    matrix = np.array([[0.8, 0.1, 0.0, 1.0], [-0.1, 0.85, 0.05, -2.0], [0.02, 0.0, 0.9, 0.5], [0, 0, 0, 1]])
    moving = fixed @ matrix[:3, :3].T + matrix[:3, 3]
    evaluation = fitting.evaluateFit(fixed, moving, [f"P{i}" for i in range(10)], "affine")
    assert max(evaluation["loo_mm"]) < 1e-9
    assert evaluation["outliers"] == []
    # a genuinely displaced pair is still flagged
    moving[3] += [0.5, 0.0, 0.0]
    assert fitting.evaluateFit(fixed, moving, [f"P{i}" for i in range(10)], "affine")["outliers"] == ["P3"]


def test_results_table_included_column_is_a_checkbox_column(scene):
    """Slicer's table view shows a cell as a checkbox only for vtkBitArray columns (qMRMLTableModel)."""
    from MRIHistoRegLib import transforms

    rng = np.random.default_rng(6)
    fixed = rng.uniform(-5, 5, (8, 3))
    evaluation = fitting.evaluateFit(fixed, fixed + 0.01 * rng.normal(size=fixed.shape), [f"P{i}" for i in range(8)], "affine")
    table = transforms.resultsTable(scene, evaluation, "errors")
    assert table.GetTable().GetColumnByName("included").IsA("vtkBitArray")
