"""The headless main job: one subject from files to a report, every step the panel offers, in order.

    stack + true spacing -> landmark fit (+ optional refinement) -> ONE resampling of the original stack onto
    the MRI grid -> tumour label transfer and volumes -> report folder (written atomically)

`runPipeline` serves `python -m MRIHistoRegLib run`, `demo`, the cohort mode and the module's self-test.
"""
import contextlib
import csv
import hashlib
import logging
import os
import platform
import sys
import time

import numpy as np

from MRIHistoRegLib import context, outputs, progress as progressLib, volumes
from MRIHistoRegLib.config import RunConfig, loadConfig
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
    """Checksum of a file, or of every file of a folder (TIFF series; with its sub-folders, one per channel) in
    sorted order."""
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else _folderFiles(path)
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


def _folderFiles(folder) -> list:
    """Every file under `folder`, sorted by name within each folder, sub-folders (sorted) after the folder's own."""
    files = []
    for root, folders, names in os.walk(folder):
        folders.sort()
        files.extend(os.path.join(root, name) for name in sorted(names))
    return files


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


def _checkInside(points, labels, shapeKji, ijkToRas, what, toleranceMm=0.0):
    from MRIHistoRegLib.geometry import cornerBox

    low, high = cornerBox(shapeKji, ijkToRas)
    outside = [label for label, p in zip(labels, points) if np.any(p < low - toleranceMm) or np.any(p > high + toleranceMm)]
    if outside:
        raise UserInputError(f"{what} landmark(s) {outside} lie outside the image (RAS box {np.round(low, 3).tolist()} .. "
                         f"{np.round(high, 3).tolist()} mm). Check the points are in this image's corrected physical "
                         f"space (RAS mm) and that the spacing is right.")


def runPipeline(config: RunConfig, outDir, scene=None, progress=None) -> dict:
    """Run one subject end to end and write its report folder atomically; returns the report dict. Steps whose
    inputs the config leaves out are skipped (`register`: landmarks only; `refine`: no resampling), so every
    command is this one orchestration and writes the same layout (outputs.py)."""
    with outputs.atomicFolder(outDir) as work:
        report = _runInto(config, work, scene, progress)
    return report


def _runInto(config: RunConfig, work, scene, progress):
    run = _Run(config, work, context.getScene(scene), progress)
    inputs = run.loadInputs()
    fit = run.fitLandmarks(inputs)
    refinement = run.refine(inputs, fit) if config.refine else None
    mapping = refinement.mapping if refinement is not None else fit.model
    if refinement is not None and refinement.accepted:  # the report describes the transform it ships
        refinement.summary["landmark_jacobian"] = fit.jacobian
    resampled = run.resample(inputs, mapping) if inputs.mri is not None and config.resample else None
    if resampled is not None and inputs.otherChannels:  # config resample_channels: the same mapping, grid and path
        resampled[1]["other_channels"] = run.resampleOtherChannels(inputs, mapping)
    evaluation = run.evaluatePoints(mapping) if config.evaluatePoints else None
    # labels.mri alone (the refine command's --mri-labels) serves the tumour focus; the comparison needs both sides
    compared = config.labels and ("histology" in config.labels or config.histologySegmentation is not None)
    labels = run.compareLabels(inputs, mapping, fit, refinement) if compared else None
    run.writeFiles(inputs, fit, refinement, resampled, labels)
    report = run.report(inputs, fit, refinement, mapping, resampled, evaluation, labels)
    progressLib.report(progress, 1.0, "done")
    return report


class _Inputs:
    def __init__(self):
        self.mri = self.source = self.verdict = None
        self.mriLabels = None  # workflow.Image of labels.mri, on the MRI's grid (pipeline._mriLabels)
        self.otherChannels = []  # indices of the stack's channels resampled besides the registration channel


class _Run:
    """One subject's run: the steps of _runInto with their timings and warnings."""

    def __init__(self, config, work, scene, progress):
        self.config, self.work, self.scene, self.progress = config, work, scene, progress
        self.timed = _Timer()
        self.warnings = []
        self.figures = []
        self.segmentation = None  # segment.Segmentation when labels.histology is a segmentation
        self.start = time.perf_counter()

    def warn(self, message):
        self.warnings.append(message)
        logging.warning("%s", message)

    def loadInputs(self):
        from MRIHistoRegLib import spacing, stacks, workflow

        config, inputs = self.config, _Inputs()
        progressLib.report(self.progress, 0.0, "loading inputs")
        with self.timed("load"):
            if config.mri:
                node = volumes.loadVolume(self.scene, config.mri, "MRI")
                inputs.mri = workflow.Image(volumes.arrayFromVolume(node), volumes.ijkToRas(node))
            if config.histology:
                inputs.source = stacks.openStack(config.histology, spacingMm=config.histologySpacingMm,
                                                 channel=config.histologyChannel)
                reference = None if inputs.mri is None else node
                inputs.verdict = spacing.checkPlausibility(inputs.source, inputs.source.spacingMm,
                                                           referenceExtentMm=reference)
                if not inputs.verdict.ok:
                    self.warn(inputs.verdict.message)
                inputs.otherChannels = self._otherChannels(inputs.source)
        return inputs

    def fitLandmarks(self, inputs):
        from MRIHistoRegLib import landmarks, workflow

        config = self.config
        progressLib.report(self.progress, 0.05, "fitting landmarks")
        with self.timed("landmarks"):
            flip = config.bigWarpFlipXY
            pairs = landmarks.pairLandmarks(
                landmarks.loadMarkups(self.scene, config.landmarks["mri"], "MRI landmarks", role="fixed", flipXY=flip),
                landmarks.loadMarkups(self.scene, config.landmarks["histology"], "Histology landmarks", role="moving",
                                      flipXY=flip))
            for message in pairs.warnings():
                self.warn(message)
            if inputs.mri is not None:
                _checkInside(pairs.fixed, pairs.labels, inputs.mri.shape, inputs.mri.ijkToRas, "MRI")
            if inputs.source is not None:
                _checkInside(pairs.moving, pairs.labels, inputs.source.shape, inputs.source.ijkToRas(), "Histology")
            return workflow.fitLandmarks(pairs, config.model, config.tpsRegularization, grid=inputs.mri)

    def refine(self, inputs, fit):
        from MRIHistoRegLib import workflow

        if inputs.mri is None or inputs.source is None:
            raise UserInputError("Refinement needs the MRI and the histology stack: give both.")
        progressLib.report(self.progress, 0.1, "refining by intensity")
        with self.timed("refine"):
            mask = None
            if self.config.mriMask:
                maskNode = volumes.loadVolume(self.scene, self.config.mriMask, "MRI mask", labelmap=True)
                mask = workflow.Image(volumes.arrayFromVolume(maskNode), volumes.ijkToRas(maskNode))
            tumours = _mriLabels(self.scene, self.config, inputs) if (self.config.labels or {}).get("mri") else None
            refinement = workflow.refine(inputs.mri, inputs.source, fit, settings=self.config.refineSettings,
                                         workingSpacingMm=self.config.workingSpacingMm, mriMask=mask,
                                         progress=progressLib.scaled(self.progress, 0.1, 0.5), tumourLabels=tumours)
        if not refinement.accepted:
            self.warn(f"refinement not used: {refinement.reason}")
        return refinement

    def resample(self, inputs, mapping):
        from MRIHistoRegLib import workflow

        if inputs.source is None:
            return None
        progressLib.report(self.progress, 0.5, "resampling the original stack once")
        with self.timed("resample"):
            return workflow.resampleOnto(inputs.source, mapping, inputs.mri,
                                         progress=progressLib.scaled(self.progress, 0.5, 0.8))

    def _otherChannels(self, source):
        """The indices of config.resampleChannels ("all" or indices / names) other than the registration channel,
        resolved when the stack is opened, so a wrong name stops the run before anything is computed or written."""
        from MRIHistoRegLib.stacks import chooseChannel

        wanted = self.config.resampleChannels
        if not wanted:
            return []
        names = list(source.channelNames)
        indices = range(len(names)) if wanted == "all" else [chooseChannel(c, names, source.path) for c in wanted]
        chosen = []
        for index in indices:
            if index != source.channelIndex and index not in chosen:
                chosen.append(index)
        if not chosen:
            self.warn(f"resample_channels {wanted!r}: {source.path} has no channel besides the registration channel "
                      f"{names[source.channelIndex]} (channels: {', '.join(names)}); nothing more is resampled.")
        return chosen

    def resampleOtherChannels(self, inputs, mapping):
        """Each of inputs.otherChannels through the registration channel's one resampling (workflow.resampleOnto:
        the same mapping and MRI grid, streamed from the original file), each written as outputs.channelOnMri and
        dropped before the next; returns their rows for the report's resampling section."""
        from MRIHistoRegLib import stacks, workflow

        rows, count = [], len(inputs.otherChannels)
        with self.timed("resample_channels"):
            for number, index in enumerate(inputs.otherChannels):
                name = inputs.source.channelNames[index]
                progressLib.report(self.progress, 0.8 + 0.1 * number / count, f"resampling channel {name}")
                with stacks.openStack(self.config.histology, spacingMm=inputs.source.spacingMm, channel=index) as source:
                    if tuple(source.shape) != tuple(inputs.source.shape):
                        raise UserInputError(f"{self.config.histology}: channel {name} has shape {source.shape[::-1]} "
                                             f"(i, j, k) but the registration channel has {inputs.source.shape[::-1]}. "
                                             f"Re-export the channels with the same size.")
                    image, info = workflow.resampleOnto(source, mapping, inputs.mri, progress=progressLib.scaled(
                        self.progress, 0.8 + 0.1 * number / count, 0.8 + 0.1 * (number + 1) / count))
                fileName = outputs.channelOnMri(index, name)
                node = volumes.createVolumeNode(self.scene, image.array, image.ijkToRas, f"Histology {name} on MRI grid")
                volumes.saveNode(node, os.path.join(self.work, fileName))
                self._omeZarrCopy(image.array, image.ijkToRas, fileName)
                # one channel's output in memory at a time: the node goes, with its display and storage nodes
                for owned in (node, node.GetDisplayNode(), node.GetStorageNode()):
                    if owned is not None:
                        self.scene.RemoveNode(owned)
                rows.append({"index": index, "name": name, "file": fileName, "timing_s": info.get("timing_s")})
        return rows

    def _omeZarrCopy(self, array, ijkToRas, fileName):
        """With config ome_zarr_outputs: the resampled image also as OME-Zarr (multiscale, mm units) for Fiji /
        BigDataViewer, napari and neuroglancer; label maps stay NRRD (a mean pyramid would blend label values)."""
        if self.config.omeZarrOutputs:
            from MRIHistoRegLib.stacks.omezarr import writeOmeZarr

            writeOmeZarr(array, ijkToRas, os.path.join(self.work, outputs.omeZarrName(fileName)),
                         name=os.path.splitext(fileName)[0])

    def evaluatePoints(self, mapping):
        from MRIHistoRegLib import landmarks, workflow

        with self.timed("evaluation"):
            mriLabels, mriPoints = landmarks.readPoints(self.config.evaluatePoints["mri"])
            histologyLabels, histologyPoints = landmarks.readPoints(self.config.evaluatePoints["histology"])
            return workflow.evaluatePoints(mriLabels, mriPoints, histologyLabels, histologyPoints, mapping)

    def compareLabels(self, inputs, mapping, fit, refinement):
        progressLib.report(self.progress, 0.8, "comparing tumour labels")
        with self.timed("labels"):
            rows, transferred, self.segmentation = _compareLabels(self.scene, self.config, inputs, mapping, fit,
                                                                  refinement, self.work,
                                                                  progressLib.scaled(self.progress, 0.8, 0.88))
            return rows, transferred

    def writeFiles(self, inputs, fit, refinement, resampled, labels):
        from MRIHistoRegLib import figures, refine, transforms

        work = self.work
        progressLib.report(self.progress, 0.9, "writing the report")
        with self.timed("write"):
            node = transforms.createTransformNode(self.scene, fit.model, "MRI to histology")
            if refinement is not None and refinement.accepted:
                refinementNode = refine.refinementTransformNode(self.scene, refinement.result, "Intensity refinement")
                transforms.saveTransform(refinementNode, os.path.join(work, outputs.REFINEMENT_TRANSFORM))
                # one node holding landmark(refinement(x)), so transform.h5 is the whole chain (map-points, Slicer)
                node = refine.composedTransformNode(self.scene, refinementNode, node)
            transforms.saveTransform(node, os.path.join(work, outputs.TRANSFORM))
            if resampled is not None:
                (histologyOnMri, _), mri = resampled, inputs.mri
                histologyNode = volumes.createVolumeNode(self.scene, histologyOnMri.array, mri.ijkToRas, "Histology on MRI grid")
                volumes.saveNode(histologyNode, os.path.join(work, outputs.HISTOLOGY_ON_MRI))
                self._omeZarrCopy(histologyOnMri.array, mri.ijkToRas, outputs.HISTOLOGY_ON_MRI)
                self.figures += figures.overlayFigures(mri.array, histologyOnMri.array, mri.ijkToRas, work,
                                                       landmarksRas=fit.pairs.fixed)
            if labels is not None:
                labelNode = volumes.createVolumeNode(self.scene, labels[1].array, labels[1].ijkToRas,
                                                     "Histology labels on MRI grid", labelmap=True)
                volumes.saveNode(labelNode, os.path.join(work, outputs.LABELS_ON_MRI))
            self.figures.append(figures.landmarkErrorChart(fit.rows(), os.path.join(work, outputs.LANDMARK_ERRORS_FIGURE)))
            if resampled is not None:
                mapping = refinement.mapping if refinement is not None else fit.model
                self.figures.append(_jacobianFigure(mapping, inputs.mri.shape, inputs.mri.ijkToRas, resampled[0].array,
                                                    os.path.join(work, outputs.JACOBIAN_FIGURE)))

    def report(self, inputs, fit, refinement, mapping, resampled, evaluation, labels):
        from MRIHistoRegLib import fitting

        config, work, source = self.config, self.work, inputs.source
        jacobian = fit.jacobian
        if refinement is not None and refinement.accepted and inputs.mri is not None:
            jacobian = fitting.jacobianSummary(mapping, inputs.mri.shapeIjk, inputs.mri.ijkToRas)
        histology = None
        if source is not None:
            histology = {"shape_ijk": list(source.shape[::-1]), "dtype": str(source.dtype),
                         "header_spacing_mm": source.headerSpacingMm, "metadata_spacing_mm": source.metadataSpacingMm,
                         "spacing_mm": source.spacingMm, "plausibility": inputs.verdict.message}
        report = {
            "name": config.name,
            # paths relative to the report folder stay true when the folder is moved into place (or with its inputs)
            "config": os.path.relpath(config.path, work) if config.path else None,
            "inputs": {role: {"path": os.path.relpath(path, work), "sha256": sha256(path)}
                       for role, path in config.inputFiles().items() if path},
            "histology": histology, "landmarks": fit.rows(), "landmark_summary": fit.summary(),
            "pairing": fit.pairing(), "transform": dict(fit.transformSection(), file=outputs.TRANSFORM),
            "jacobian": jacobian, "refinement": None if refinement is None else refinement.summary,
            "resampling": None if resampled is None else resampled[1], "evaluation": evaluation,
            "labels": None if labels is None else labels[0],
            "histology_segmentation": None if self.segmentation is None else _segmentationSection(self.segmentation, work),
            "figures": [os.path.basename(p) for p in self.figures], "warnings": self.warnings,
            "timing_s": dict(self.timed.timings, total=round(time.perf_counter() - self.start, 3)),
            "peak_memory_mb": peakMemoryMb(), "software": softwareVersions(),
        }
        return outputs.writeReport(report, work)


def _compareLabels(scene, config, inputs, mapping, fit, refinement, work, progress=None):
    """The label maps from the config: the MRI's on the MRI grid, the histology's streamed from the stack's grid
    (only the labelled box is kept). Each label's volume in MRI space gets its landmark jackknife interval
    (uncertainty.py), through the refined mapping when a refinement was accepted."""
    from MRIHistoRegLib import compare, stacks, uncertainty, workflow

    mriImage = _mriLabels(scene, config, inputs)
    mriLabels = mriImage.array
    source, segmentation = inputs.source, None
    if config.histologySegmentation is not None:
        segmentation = _segmentHistology(config, inputs, work, progress)
        histologyLabels, histologyIjkToRas = segmentation.crop, segmentation.cropIjkToRas
    else:
        with stacks.openStack(config.labels["histology"]) as labelSource:
            if tuple(labelSource.shape) != tuple(source.shape):
                raise UserInputError(f"labels.histology has shape {tuple(labelSource.shape)[::-1]} (i, j, k) but the "
                                     f"histology stack has {tuple(source.shape)[::-1]}: the label map must be on the "
                                     f"histology stack's grid.")
            # on the stack's grid, so the stack's corrected geometry applies whatever the label file's header claims
            histologyLabels, histologyIjkToRas = compare.readLabelCrop(labelSource, ijkToRas=source.ijkToRas())
    for name, array in (("labels.mri", mriLabels), ("labels.histology", histologyLabels)):
        if not np.any(array):
            raise UserInputError(f"{name} is empty (no labelled voxel). Check the label file.")
    rows, transferred = workflow.compareLabels(mriImage, workflow.Image(histologyLabels, histologyIjkToRas), mapping)
    refined = refinement is not None and refinement.accepted
    uncertainty.addVolumeIntervals(rows, histologyLabels, histologyIjkToRas, fit.pairs.fixed, fit.pairs.moving,
                                   fit.modelName, fit.model.regularization, finalMapping=mapping if refined else None)
    return rows, transferred, segmentation


def _mriLabels(scene, config, inputs):
    """labels.mri as an Image on the MRI's grid (loaded once: the refinement's tumour focus and the comparison
    both read it)."""
    from MRIHistoRegLib import workflow

    if inputs.mriLabels is None:
        node = volumes.loadVolume(scene, config.labels["mri"], "MRI labels", labelmap=True)
        array = volumes.arrayFromVolume(node)
        if inputs.mri is not None and array.shape != inputs.mri.shape:
            raise UserInputError(f"labels.mri has shape {array.shape[::-1]} (i, j, k) but the MRI has "
                                 f"{inputs.mri.shapeIjk}: the MRI label map must be on the MRI's grid.")
        inputs.mriLabels = workflow.Image(array, inputs.mri.ijkToRas if inputs.mri is not None
                                          else volumes.ijkToRas(node))
    return inputs.mriLabels


def _segmentHistology(config, inputs, work, progress):
    """labels.histology from a segmentation of a signal channel at the stack's native resolution, written into the
    report folder (outputs.HISTOLOGY_SEGMENTATION) on the stack's grid with its corrected geometry."""
    from MRIHistoRegLib import segment, stacks

    spec = config.histologySegmentation
    signal = stacks.openStack(config.histology, spacingMm=inputs.source.spacingMm, channel=spec["channel"])
    with signal:
        return segment.segmentStack(signal, threshold=spec["threshold"], seedIjk=spec["seedIjk"], roi=spec["roi"],
                                    fillHoles=spec["fillHoles"], outPath=os.path.join(work, outputs.HISTOLOGY_SEGMENTATION),
                                    progress=progress)


def _segmentationSection(segmentation, work) -> dict:
    section = segmentation.toDict()
    section["label_path"] = os.path.relpath(segmentation.labelPath, work) if segmentation.labelPath else None
    return section


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
        for key in ("mri_mm3", "histology_in_mri_resampled_mm3", "histology_in_mri_jacobian_mm3", "dice", "hd95_mm"):
            row[f"label{label}_{key}"] = values.get(key)
        interval = values.get("histology_in_mri_interval_mm3") or (None, None)  # one number per CSV cell
        row[f"label{label}_histology_in_mri_interval_low_mm3"] = interval[0]
        row[f"label{label}_histology_in_mri_interval_high_mm3"] = interval[1]
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
