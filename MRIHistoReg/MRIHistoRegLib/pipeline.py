"""The headless main job: one subject from files to a report, every step the panel offers, in order.

    stack + true spacing -> landmark fit (+ optional refinement) -> ONE resampling of the original stack onto
    the MRI grid -> tumour label transfer and volumes -> report folder (written atomically)

`runPipeline` serves `python -m MRIHistoRegLib run`, `demo`, the cohort mode and the module's self-test.
"""
import contextlib
import csv
import hashlib
import json
import logging
import os
import platform
import sys
import time

import numpy as np

from MRIHistoRegLib import context, outputs, progress as progressLib, volumes
from MRIHistoRegLib.config import RunConfig, loadConfig
from MRIHistoRegLib.outputs import jsonReady
from .errors import UserInputError


class _Timer:
    """Wall time per named step: `with timed("load"): ...` records timings["load"] in seconds."""

    def __init__(self):
        self.timings = {}

    @contextlib.contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)


def peakMemoryMb() -> float:
    """Peak resident memory of this process in MB (Linux/macOS), or NaN where the OS does not say."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)
    except (ImportError, AttributeError):
        return float("nan")


def sha256(path, chunkBytes=16 << 20) -> str:
    """Checksum of a file, or of every file of a folder (TIFF series) in sorted order."""
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else [os.path.join(path, n) for n in sorted(os.listdir(path))]
    buffer = bytearray(chunkBytes)
    view = memoryview(buffer)
    for name in files:
        if not os.path.isfile(name):
            continue
        with open(name, "rb") as f:
            while True:
                n = f.readinto(buffer)
                if not n:
                    break
                digest.update(view[:n])
    return digest.hexdigest()


def softwareVersions() -> dict:
    import SimpleITK
    import vtk

    from MRIHistoRegLib import __version__

    versions = {"MRIHistoReg": __version__, "python": platform.python_version(), "numpy": np.__version__,
                "SimpleITK": SimpleITK.Version_VersionString(), "vtk": vtk.vtkVersion.GetVTKVersion(),
                "platform": platform.platform()}
    try:
        from importlib.metadata import version

        versions["slicer-core"] = version("slicer-core")
    except Exception:  # inside Slicer there is no slicer-core distribution
        import slicer

        if hasattr(slicer, "app"):
            versions["Slicer"] = slicer.app.applicationVersion
    return versions


def _extentBox(shapeKji, ijkToRas):
    """Axis-aligned RAS bounding box (min, max) of a grid's voxel centres' corners."""
    nk, nj, ni = shapeKji
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, ni - 0.5) for j in (-0.5, nj - 0.5) for k in (-0.5, nk - 0.5)])
    ras = corners @ np.asarray(ijkToRas).T
    return ras[:, :3].min(axis=0), ras[:, :3].max(axis=0)


def _checkInside(points, labels, shapeKji, ijkToRas, what, toleranceMm=0.0):
    low, high = _extentBox(shapeKji, ijkToRas)
    outside = [label for label, p in zip(labels, points) if np.any(p < low - toleranceMm) or np.any(p > high + toleranceMm)]
    if outside:
        raise UserInputError(f"{what} landmark(s) {outside} lie outside the image (RAS box {np.round(low, 3).tolist()} .. "
                         f"{np.round(high, 3).tolist()} mm). Check the points are in this image's corrected physical "
                         f"space (RAS mm) and that the spacing is right.")


def runPipeline(config: RunConfig, outDir, scene=None, progress=None) -> dict:
    """Run one subject end to end and write its report folder atomically; returns the report dict."""
    with outputs.atomicFolder(outDir) as work:
        report = _runInto(config, work, scene, progress)
    return report


def _runInto(config: RunConfig, work, scene, progress):
    from MRIHistoRegLib import figures, fitting, landmarks, resample, spacing, stacks, transforms

    start = time.perf_counter()
    timed = _Timer()
    scene = context.getScene(scene)
    warnings = []

    progressLib.report(progress, 0.0, "loading inputs")
    with timed("load"):
        mriNode = volumes.loadVolume(scene, config.mri, "MRI")
        mriArray = volumes.arrayFromVolume(mriNode)
        mriIjkToRas = volumes.ijkToRas(mriNode)
        spacingMm = spacing.toMillimetres(config.histologySpacingUm, "um") if config.histologySpacingUm else None
        source = stacks.openStack(config.histology, spacingMm=spacingMm)
        verdict = spacing.checkPlausibility(source, source.spacingMm, referenceExtentMm=mriNode)
        if not verdict.ok:
            warnings.append(verdict.message)
            logging.warning("%s", verdict.message)
        histologyIjkToRas = source.ijkToRas()

    progressLib.report(progress, 0.05, "fitting landmarks")
    with timed("landmarks"):
        fixedNode = landmarks.loadMarkups(scene, config.landmarks["mri"], "MRI landmarks")
        movingNode = landmarks.loadMarkups(scene, config.landmarks["histology"], "Histology landmarks")
        pairs = landmarks.pairLandmarks(fixedNode, movingNode)
        for message in pairs.warnings():
            warnings.append(message)
            logging.warning("%s", message)
        _checkInside(pairs.fixed, pairs.labels, mriArray.shape, mriIjkToRas, "MRI")
        _checkInside(pairs.moving, pairs.labels, source.shape, histologyIjkToRas, "Histology")
        model, evaluation = fitting.evaluateAndFit(pairs.fixed, pairs.moving, pairs.labels, config.model,
                                                   regularization=config.tpsRegularization,
                                                   shapeIjk=mriArray.shape[::-1], ijkToRas=mriIjkToRas)
        jacobian = evaluation.get("jacobian") or fitting.jacobianSummary(model, mriArray.shape[::-1], mriIjkToRas)
        landmarkRows = [{"label": label, "residual_mm": residual, "loo_mm": loo, "outlier": bool(outlier)}
                        for label, residual, loo, outlier in zip(evaluation["labels"], evaluation["residual_mm"],
                                                                 evaluation["loo_mm"], evaluation["outlier"])]
        transformNode = transforms.createTransformNode(scene, model, "MRI to histology")
    mapping = model

    refinement = None
    if config.refine:
        progressLib.report(progress, 0.1, "refining by intensity")
        with timed("refine"):
            refinement, mapping, transformNode = _refine(scene, config, source, mriArray, mriIjkToRas, model, pairs,
                                                         transformNode, warnings, progressLib.scaled(progress, 0.1, 0.5))

    if refinement is not None and refinement["accepted"]:
        # the report describes the transform it ships: the refined chain
        refinement["landmark_jacobian"] = jacobian
        jacobian = fitting.jacobianSummary(mapping, mriArray.shape[::-1], mriIjkToRas)

    progressLib.report(progress, 0.5, "resampling the original stack once")
    with timed("resample"):
        histologyOnMri, resampleInfo = resample.resampleToGrid(source, mapping, mriArray.shape, mriIjkToRas,
                                                               progress=progressLib.scaled(progress, 0.5, 0.8))

    evaluationReport = None
    if config.evaluatePoints:
        with timed("evaluation"):
            evaluationReport = _evaluatePoints(config, mapping)

    labelsReport = None
    transferredLabels = None
    if config.labels:
        progressLib.report(progress, 0.8, "comparing tumour labels")
        with timed("labels"):
            labelsReport, transferredLabels = _compareLabels(scene, config, source, mapping, mriArray.shape, mriIjkToRas)

    progressLib.report(progress, 0.9, "writing the report")
    with timed("write"):
        transforms.saveTransform(transformNode, os.path.join(work, "transform.h5"))
        histologyNode = volumes.createVolumeNode(scene, histologyOnMri, mriIjkToRas, "Histology on MRI grid")
        volumes.saveNode(histologyNode, os.path.join(work, "histology_on_mri.nrrd"))
        if transferredLabels is not None:
            labelNode = volumes.createVolumeNode(scene, transferredLabels, mriIjkToRas, "Histology labels on MRI grid", labelmap=True)
            volumes.saveNode(labelNode, os.path.join(work, "histology_labels_on_mri.nrrd"))
        figurePaths = figures.overlayFigures(mriArray, histologyOnMri, mriIjkToRas, work, landmarksRas=pairs.fixed)
        figurePaths.append(figures.landmarkErrorChart(landmarkRows, os.path.join(work, "landmark_errors.png")))
        figurePaths.append(_jacobianFigure(mapping, mriArray.shape, mriIjkToRas, histologyOnMri, os.path.join(work, "jacobian.png")))

    report = {
        "name": config.name,
        # paths relative to the report folder stay true when the folder is moved into place (or with its inputs)
        "config": os.path.relpath(config.path, work),
        "inputs": {role: {"path": os.path.relpath(path, work), "sha256": sha256(path)}
                   for role, path in config.inputFiles().items()},
        "histology": {"shape_ijk": list(source.shape[::-1]), "dtype": str(source.dtype),
                      "header_spacing_mm": source.headerSpacingMm, "metadata_spacing_mm": source.metadataSpacingMm,
                      "spacing_mm": source.spacingMm, "plausibility": verdict.message},
        "landmarks": landmarkRows,
        "landmark_summary": {k: v for k, v in evaluation.items()
                             if k not in ("labels", "residual_mm", "loo_mm", "outlier")},
        "pairing": {"paired_by_index": pairs.pairedByIndex, "warnings": pairs.warnings()},
        "transform": {"model": config.model, "scale": model.scale(),
                      "shrinkage_volume_percent": float(model.shrinkageVolumePercent()),
                      "file": "transform.h5"},
        "jacobian": jacobian,
        "refinement": refinement,
        "resampling": resampleInfo,
        "evaluation": evaluationReport,
        "labels": labelsReport,
        "figures": [os.path.basename(p) for p in figurePaths],
        "warnings": warnings,
        "timing_s": dict(timed.timings, total=round(time.perf_counter() - start, 3)),
        "peak_memory_mb": peakMemoryMb(),
        "software": softwareVersions(),
    }
    report = jsonReady(report)  # strict JSON: numpy -> Python, NaN -> null (once, for both writers)
    with open(os.path.join(work, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    _writeReportCsv(report, os.path.join(work, "report.csv"))
    progressLib.report(progress, 1.0, "done")
    return report


def _evaluatePoints(config, mapping):
    """Held-out target registration error, measured in MRI space (mm): histology point mapped back vs MRI point."""
    from MRIHistoRegLib import compare, landmarks

    mriLabels, mriPoints = landmarks.readPoints(config.evaluatePoints["mri"])
    histLabels, histPoints = landmarks.readPoints(config.evaluatePoints["histology"])
    byLabel = dict(zip(histLabels, histPoints))
    common = [label for label in mriLabels if label in byLabel]
    if not common:
        raise UserInputError("evaluate_points: no label appears in both point files; pair them by label (label,x,y,z).")
    fixed = np.array([p for label, p in zip(mriLabels, mriPoints) if label in byLabel])
    moving = np.array([byLabel[label] for label in common])
    # started from the inverse of the mapping's linear part, never from the answer; raises if it does not converge
    mapped = compare.InverseMapping(mapping).transformPoints(moving)
    tre = np.linalg.norm(mapped - fixed, axis=1)
    forward = np.linalg.norm(mapping.transformPoints(fixed) - moving, axis=1)
    return {"points": [{"label": label, "tre_mm": float(t), "tre_histology_space_mm": float(f)}
                       for label, t, f in zip(common, tre, forward)],
            "tre_mm": [float(t) for t in tre], "tre_median_mm": float(np.median(tre)),
            "tre_max_mm": float(tre.max()), "count": len(common)}


def _compareLabels(scene, config, source, mapping, mriShape, mriIjkToRas):
    from MRIHistoRegLib import compare, stacks

    mriLabelNode = volumes.loadVolume(scene, config.labels["mri"], "MRI labels", labelmap=True)
    mriLabels = volumes.arrayFromVolume(mriLabelNode)
    if mriLabels.shape != tuple(mriShape):
        raise UserInputError(f"labels.mri has shape {mriLabels.shape[::-1]} (i, j, k) but the MRI has {tuple(mriShape)[::-1]}: "
                         f"the MRI label map must be on the MRI's grid.")
    # The histology label map is on the full-resolution stack's grid: stream it and keep the labelled box only.
    with stacks.openStack(config.labels["histology"]) as labelSource:
        if tuple(labelSource.shape) != tuple(source.shape):
            raise UserInputError(f"labels.histology has shape {tuple(labelSource.shape)[::-1]} (i, j, k) but the histology "
                             f"stack has {tuple(source.shape)[::-1]}: the label map must be on the histology stack's grid.")
        # on the stack's grid, so the stack's corrected geometry applies whatever the label file's header claims
        histLabels, histIjkToRas = compare.readLabelCrop(labelSource, ijkToRas=source.ijkToRas())
    for name, array in (("labels.mri", mriLabels), ("labels.histology", histLabels)):
        if not np.any(array):
            raise UserInputError(f"{name} is empty (no labelled voxel). Check the label file.")
    perLabel, transferred = compare.compareTumours(mriLabels, mriIjkToRas, histLabels, histIjkToRas, mapping)
    return perLabel, transferred


def _jacobianFigure(mapping, mriShape, mriIjkToRas, histologyOnMri, path):
    """det J of the final mapping on the axial MRI slice through the histology footprint (any axis order)."""
    from MRIHistoRegLib import figures
    from MRIHistoRegLib.mapping import jacobianOf

    axis = figures.volumeAxisForView(mriIjkToRas, "axial")  # array axis ([k, j, i]) normal to axial slices
    footprint = histologyOnMri > 0
    index = int(np.round(np.argwhere(footprint)[:, axis].mean())) if footprint.any() else mriShape[axis] // 2
    planeShape = [n for a, n in enumerate(mriShape) if a != axis]
    kji = np.indices(planeShape).reshape(2, -1)
    kji = np.insert(kji, axis, index, axis=0)  # (3, n) array indices with the slice index put back
    ras = (np.c_[kji[::-1].T, np.ones(kji.shape[1])] @ np.asarray(mriIjkToRas).T)[:, :3]
    shape = list(mriShape)
    shape[axis] = 1
    determinant = np.linalg.det(jacobianOf(mapping, ras)).reshape(shape)
    image = figures.orientedSlice(determinant, mriIjkToRas, "axial", 0)[0]
    spacing = volumes.spacingOf(mriIjkToRas)
    return figures.jacobianFigure(image, spacing, path, title="Jacobian determinant (volume ratio), axial slice")


def _refine(scene, config, source, mriArray, mriIjkToRas, model, pairs, transformNode, warnings, progress):
    from MRIHistoRegLib import downsample, refine

    moving, movingIjkToRas = downsample.downsampleStack(source, [config.workingSpacingMm] * 3, progress=progressLib.scaled(progress, 0, 0.3))
    result = refine.refineRegistration(mriArray, mriIjkToRas, moving, movingIjkToRas, model,
                                       progress=progressLib.scaled(progress, 0.3, 1.0))
    check = refine.evaluateAgainstLandmarks(result, pairs.fixed, pairs.moving)
    summary = {"accepted": bool(result.accepted), "reason": result.reason, "metric_before": result.metricBefore,
               "metric_after": result.metricAfter, "iterations": result.iterations, "seconds": result.seconds,
               "histology_bias_corrected": result.biasCorrected,
               "landmarks": check}
    if not result.accepted:
        warnings.append(f"refinement not used: {result.reason}")
        return summary, model, transformNode
    refineNode = refine.refinementTransformNode(scene, result, "Intensity refinement")
    # one node holding landmark(refinement(x)), so transform.h5 is the whole chain (map-points, Slicer)
    composite = refine.composedTransformNode(scene, refineNode, transformNode)
    return summary, result, composite


def _writeReportCsv(report, path):
    """One flat table: landmark rows, then label rows, then summary figures (key, value)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["section", "name", "quantity", "value"])
        for row in report["landmarks"]:
            for key in ("residual_mm", "loo_mm", "outlier"):
                writer.writerow(["landmark", row["label"], key, row.get(key)])
        for label, row in (report.get("labels") or {}).items():
            for key, value in row.items():
                writer.writerow(["label", label, key, value])
        if report.get("evaluation"):
            for row in report["evaluation"]["points"]:
                writer.writerow(["evaluation", row["label"], "tre_mm", row["tre_mm"]])
            writer.writerow(["evaluation", "all", "tre_median_mm", report["evaluation"]["tre_median_mm"]])
        for key, value in report["transform"].items():
            writer.writerow(["transform", "", key, value])
        for key, value in (report.get("jacobian") or {}).items():
            writer.writerow(["jacobian", "", key, value])
        writer.writerow(["run", "", "total_s", report["timing_s"]["total"]])
        writer.writerow(["run", "", "peak_memory_mb", report["peak_memory_mb"]])


def runCohort(configPaths, outDir, progress=None) -> list:
    """Run several subjects (config files, or folders of *.json configs) into outDir/<name>/ plus summary.csv."""
    paths = []
    for path in configPaths:
        if os.path.isdir(path):
            paths.extend(sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".json")))
        else:
            paths.append(path)
    if not paths:
        raise UserInputError("No config files given (or the folder holds no *.json). Pass CONFIG.json files or a folder of them.")
    configs = [loadConfig(p) for p in paths]  # validate all before running any
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise UserInputError(f"Subject names repeat ({names}): give each config a distinct 'name' field or file name.")
    summaries = []
    with outputs.atomicFolder(outDir) as work:
        for index, config in enumerate(configs):
            report = runPipeline(config, os.path.join(work, config.name),
                                 progress=progressLib.scaled(progress, index / len(configs), (index + 1) / len(configs)))
            summaries.append(_summaryRow(report))
        with open(os.path.join(work, "summary.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(summaries[0]))
            writer.writeheader()
            writer.writerows(summaries)
    return summaries


def _summaryRow(report):
    row = {"name": report["name"], "model": report["transform"]["model"],
           "shrinkage_volume_percent": report["transform"]["shrinkage_volume_percent"],
           "landmark_rms_mm": report["landmark_summary"].get("residual_rms_mm"),
           "loo_rms_mm": report["landmark_summary"].get("loo_rms_mm"),
           "tre_median_mm": (report.get("evaluation") or {}).get("tre_median_mm"),
           "folded_fraction": (report.get("jacobian") or {}).get("folded_fraction")}
    for label, values in (report.get("labels") or {}).items():
        for key in ("mri_mm3", "histology_in_mri_resampled_mm3", "dice", "hd95_mm"):
            row[f"label{label}_{key}"] = values.get(key)
    return row


def runDemo(outDir, size="small", seed=0, progress=None) -> dict:
    """Generate the sample data into outDir/sample and run the pipeline on it into outDir/report."""
    from MRIHistoRegLib import sampledata

    outDir = outputs.checkDestination(outDir)
    with outputs.atomicFolder(outDir) as work:
        manifest = sampledata.generateSampleData(os.path.join(work, "sample"), size=size, seed=seed,
                                                 progress=progressLib.scaled(progress, 0.0, 0.3))
        config = loadConfig(os.path.join(manifest["folder"], "config.json"))
        report = runPipeline(config, os.path.join(work, "report"), progress=progressLib.scaled(progress, 0.3, 1.0))
    return report
