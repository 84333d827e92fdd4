"""The pipeline's steps, free of MRML nodes: every front (the panel's logic, `run`, `demo`, `register`, `refine`,
the console) calls these, so one input gives the same numbers under the same names everywhere.

    fitLandmarks -> refine (optional) -> resampleOnto -> evaluatePoints / compareLabels -> report (outputs.py)

Images travel as `Image` (array [k, j, i] + IJK->RAS), mappings as MRI RAS -> histology RAS objects
(fitting models, refinement results; docs/ARCHITECTURE.md section 3), stacks as stack sources.
"""
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import progress as progressLib
from .errors import UserInputError

ProgressCallback = Callable[[float, str], Optional[bool]]
NO_TUMOUR_LABELS = "no MRI tumour labels were given"  # the tumour focus's reason (the panel refines it)


@dataclass
class Image:
    """Voxels indexed [k, j, i] and the grid's IJK->RAS matrix (spacing, directions, origin)."""

    array: np.ndarray
    ijkToRas: np.ndarray

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def shapeIjk(self) -> Tuple[int, int, int]:
        return tuple(self.array.shape[::-1])


@dataclass
class LandmarkFit:
    """A fitted landmark model with its errors (fitting.evaluateAndFit) and the pairing it was fitted on."""

    model: object
    modelName: str
    evaluation: dict
    pairs: object
    jacobian: Optional[dict] = None

    def rows(self) -> List[dict]:
        e = self.evaluation
        return [{"label": label, "residual_mm": residual, "loo_mm": loo, "outlier": bool(outlier)}
                for label, residual, loo, outlier in zip(e["labels"], e["residual_mm"], e["loo_mm"], e["outlier"])]

    def summary(self) -> dict:
        """The evaluation's scalar figures (the per-pair arrays are in rows())."""
        return {k: v for k, v in self.evaluation.items() if k not in ("labels", "residual_mm", "loo_mm", "outlier")}

    def pairing(self) -> dict:
        p = self.pairs
        return {"paired_by_index": p.pairedByIndex, "unmatched_fixed": p.unmatchedFixed,
                "unmatched_moving": p.unmatchedMoving, "duplicates": p.duplicates, "excluded": p.excluded,
                "undefined": p.undefined, "warnings": p.warnings()}

    def transformSection(self) -> dict:
        return {"model": self.modelName, "scale": self.model.scale(),
                "shrinkage_volume_percent": float(self.model.shrinkageVolumePercent()),
                "direction": "from parent = MRI (fixed) RAS mm -> histology (moving) RAS mm"}


@dataclass
class Refinement:
    """The intensity refinement's outcome: `mapping` is the refined chain when accepted, else the landmark model."""

    accepted: bool
    reason: str
    mapping: object
    result: object  # refine.RefinementResult
    summary: dict = field(default_factory=dict)


def fitLandmarks(pairs, modelName: str, regularization: float = 0.0, grid: Optional[Image] = None) -> LandmarkFit:
    """Fit `modelName` to paired landmarks; the Jacobian (folding) is summarised over `grid` when given, else over
    the landmarks' box, so the same pairs give the same numbers whoever asks."""
    from . import fitting

    if modelName not in fitting.MODELS:
        raise UserInputError(f"Unknown model '{modelName}': choose one of {', '.join(fitting.MODELS)}.")
    shapeIjk = ijkToRas = None
    if grid is not None:
        shapeIjk, ijkToRas = grid.shapeIjk, grid.ijkToRas
    model, evaluation = fitting.evaluateAndFit(pairs.fixed, pairs.moving, pairs.labels, modelName, regularization,
                                               shapeIjk=shapeIjk, ijkToRas=ijkToRas)
    jacobian = evaluation.get("jacobian")
    if jacobian is None and grid is not None:
        jacobian = fitting.jacobianSummary(model, grid.shapeIjk, grid.ijkToRas)
    return LandmarkFit(model, modelName, evaluation, pairs, jacobian)


def refine(mri: Image, histology, fit: LandmarkFit, settings: Optional[dict] = None,
           workingSpacingMm: Optional[float] = None, mriMask: Optional[Image] = None,
           progress: Optional[ProgressCallback] = None, tumourLabels: Optional[Image] = None) -> Refinement:
    """Intensity refinement started from `fit`: `histology` is a stack source (streamed down to `workingSpacingMm`,
    kept at its own spacing along axes where it is already coarser) or an Image already at a working resolution.
    With `tumourLabels` (the MRI tumour label map, any grid) an accepted elastix refinement is followed by the
    tumour focus (tumourfocus.py) of each label; the summary's "tumour_focus" says what it did or why not.

    A refinement that fails (ITK exception, NaN metric, no overlap, divergence, folding) or that the guard rails
    reject keeps the landmark model: it never raises for the data it is given, only for invalid settings."""
    from . import refine as refineLib

    engine, settings, fallback = _engineSettings(settings)  # invalid settings are the user's to fix: they raise
    if engine == "elastix":
        engine, settings, fallback = _loadedEngine(settings, progress)
    if engine == "elastix":
        workingSpacingMm = _workingSpacing(workingSpacingMm)
    moving = None
    try:
        if engine == "elastix":
            moving = histology if isinstance(histology, Image) else elastixHistology(histology, fit, workingSpacingMm,
                                                                                     progress)
            result = _refineElastix(mri, moving, fit, settings, workingSpacingMm, mriMask, progress)
        else:
            moving = histology if isinstance(histology, Image) else _workingHistology(histology, workingSpacingMm,
                                                                                      progress)
            mask = None if mriMask is None else (mriMask.array, mriMask.ijkToRas)
            result = refineLib.refineRegistration(mri.array, mri.ijkToRas, moving.array, moving.ijkToRas, fit.model,
                                                  fixedMask=mask, settings=settings,
                                                  progress=progressLib.scaled(progress, 0.3, 1.0))
    except progressLib.Cancelled:
        raise
    except Exception as error:  # noqa: BLE001 - whatever breaks, the landmark-only result must still be delivered
        logging.getLogger(__name__).warning("refinement failed; the landmark-only mapping is kept", exc_info=True)
        result = refineLib.failedRefinement(fit.model, mri.shape, mri.ijkToRas,
                                            f"the refinement could not run: {refineLib.failureMessage(error)}",
                                            settings if engine == "simpleitk" else None)
        result.settings = settings
    result.engine = getattr(result, "engine", "simpleitk") if engine == "elastix" else "simpleitk"
    result.engineFallback = fallback
    labels, checkLandmarks = [], None
    if fit.pairs is not None and len(fit.pairs.labels):
        labels = list(fit.pairs.labels)

        def checkLandmarks():
            refineLib.evaluateAgainstLandmarks(result, fit.pairs.fixed, fit.pairs.moving)  # may reject the result

        checkLandmarks()
    # after the landmark check, so the focus can only refine an accepted refinement, and is checked the same way
    result.tumourFocus = _tumourFocus(result, mri, moving, tumourLabels, settings, workingSpacingMm, engine,
                                      progressLib.scaled(progress, 0.95, 1.0), checkLandmarks)
    summary = result.toDict(labels)  # the ONE description of a refinement (report.json, panel, refine command)
    return Refinement(bool(result.accepted), result.reason, result if result.accepted else fit.model, result, summary)


def _engineSettings(settings):
    """(engine, its checked settings, why the SimpleITK engine stands in or None). A preset naming the elastix
    engine falls back to the SimpleITK one (its own defaults, the overrides it knows) when itk-elastix is absent."""
    from . import elastix
    from . import refine as refineLib

    settings = dict(settings or {})
    engine = settings.get("engine", "simpleitk")
    if engine not in ("elastix", "simpleitk"):
        raise UserInputError(f"Unknown refinement engine '{engine}': choose 'elastix' or 'simpleitk'.")
    if engine == "elastix":
        settings = elastix.elastixSettings(settings)
        present, why = elastix.available()
        if present:
            return "elastix", settings, None
        return _simpleItkInstead(settings, why)
    settings.pop("engine", None)
    for key in ("tumourFocus", "tumourFocusSigmaMm", "tumourFocusGrowMm"):  # the focus follows elastix only
        settings.pop(key, None)
    return "simpleitk", refineLib.refinementSettings(settings), None


def _simpleItkInstead(settings, why):
    """The SimpleITK engine standing in for elastix: its own defaults plus the overrides it knows."""
    from . import elastix
    from . import refine as refineLib

    logging.getLogger(__name__).warning("%s: the SimpleITK refinement (affine + B-spline) is used instead", why)
    kept = {k: v for k, v in settings.items() if k in refineLib.DEFAULT_SETTINGS and v != elastix.DEFAULT_SETTINGS.get(k)}
    return "simpleitk", refineLib.refinementSettings(kept), f"{why}; the SimpleITK engine was used instead"


def _loadedEngine(settings, progress):
    """elastix loaded (once per process, timed apart from the registration), or the SimpleITK engine with the
    reason when an installed itk-elastix cannot be loaded."""
    from . import elastix

    if elastix.loadSeconds() is None:
        progressLib.report(progress, 0.0, "loading the elastix engine (once per session)")
    try:
        elastix.loadEngine()
    except RuntimeError as error:
        return _simpleItkInstead(settings, str(error))
    return "elastix", settings, None


def _workingSpacing(workingSpacingMm) -> float:
    from . import elastix

    if workingSpacingMm is None:
        return elastix.DEFAULT_WORKING_SPACING_MM
    if not workingSpacingMm > 0:
        raise UserInputError(f"The working spacing must be positive (mm), got {float(workingSpacingMm):g}.")
    return float(workingSpacingMm)


def _refineElastix(mri, moving, fit, settings, workingSpacingMm, mriMask, progress):
    """The elastix engine on the working histology (elastixHistology's, or an Image given as is)."""
    from . import elastix

    return elastix.refineWithElastix(mri, moving, fit, settings, workingSpacingMm, mriMask,
                                     progressLib.scaled(progress, 0.3, 0.95))


def _tumourFocus(result, mri, moving, tumourLabels, settings, workingSpacingMm, engine, progress,
                 checkLandmarks=None) -> dict:
    """tumourfocus.focusOnTumours on an accepted elastix refinement (in place), or why it did not run. The focused
    field must not fold and must pass the landmark check (`checkLandmarks`) the refinement passed; whatever goes
    wrong, the refinement stands as it was."""
    from . import refine as refineLib
    from . import tumourfocus

    if engine != "elastix":
        return tumourfocus.notRun("the tumour focus follows the elastix engine only (measured there)")
    if not settings["tumourFocus"]:
        return tumourfocus.notRun("turned off (tumourFocus false)")
    if tumourLabels is None:
        return tumourfocus.notRun(NO_TUMOUR_LABELS)
    if not result.accepted:
        return tumourfocus.notRun("the refinement was not accepted")
    refined, reason = result.displacement.copy(), result.reason
    try:
        section = tumourfocus.focusOnTumours(result, mri, moving, tumourLabels, workingSpacingMm, settings, progress)
        if section["applied"]:
            determinants = refineLib.jacobianDeterminants(result.displacement, result.fieldIjkToRas,
                                                          settings["jacobianSubsample"])
            if not determinants.min() > 0:
                result.setDisplacement(refined)
                tumourfocus.undo(section, f"the focused mapping folds (Jacobian determinant {determinants.min():.3f})")
                return section
            if checkLandmarks is not None:
                checkLandmarks()
                if not result.accepted:  # the focus moved the landmarks away: the refinement stands without it
                    why = result.reason
                    result.setDisplacement(refined)
                    result.accepted, result.reason = True, reason
                    checkLandmarks()  # the residuals of the mapping that stands
                    tumourfocus.undo(section, f"with the focus {why}")
                    return section
            result.minJacobianDeterminant = float(determinants.min())
    except progressLib.Cancelled:
        result.setDisplacement(refined)
        raise
    except Exception as error:  # noqa: BLE001 - the refinement without the focus is still the answer
        logging.getLogger(__name__).warning("tumour focus failed; the refinement is kept without it", exc_info=True)
        result.setDisplacement(refined)
        result.accepted, result.reason = True, reason
        if checkLandmarks is not None:
            checkLandmarks()
        return tumourfocus.notRun(f"the focus could not run: {refineLib.failureMessage(error)}", searched=True)
    return section


def elastixHistology(source, fit: LandmarkFit, workingSpacingMm: float,
                     progress: Optional[ProgressCallback] = None) -> Image:
    """The stack area-averaged for the elastix engine: to the working spacing in histology units (times the landmark
    mapping's smallest scale), so the resampling through L onto the working grid does not blur it further."""
    linear = fit.model.linearMatrix() if hasattr(fit.model, "linearMatrix") else None
    scale = 1.0 if linear is None else float(np.linalg.svd(np.asarray(linear)[:3, :3], compute_uv=False).min())
    return _workingHistology(source, float(workingSpacingMm) * min(scale, 1.0), progress)


def _workingHistology(source, workingSpacingMm, progress) -> Image:
    """The stack area-averaged down to the working spacing; along an axis where the stack is already coarser it
    keeps its own spacing (the registration interpolates it there), so no stack spacing can refuse a refinement."""
    from . import downsample

    if not workingSpacingMm or workingSpacingMm <= 0:
        raise UserInputError(f"The working spacing must be positive (mm), got {workingSpacingMm}.")
    target = [max(float(workingSpacingMm), float(s)) for s in source.spacingMm]
    array, matrix = downsample.downsampleStack(source, target, progress=progressLib.scaled(progress, 0.0, 0.3))
    return Image(array, matrix)


def resampleOnto(source, mapping, grid: Image, progress: Optional[ProgressCallback] = None) -> Tuple[Image, dict]:
    """The ORIGINAL stack (or an Image's volume node) resampled once through `mapping` onto `grid`."""
    from . import resample

    array, info = resample.resampleToGrid(source, mapping, grid.shape, grid.ijkToRas, progress=progress)
    return Image(array, np.asarray(grid.ijkToRas)), info


def evaluatePoints(mriLabels: Sequence[str], mriPoints, histologyLabels: Sequence[str], histologyPoints,
                   mapping) -> dict:
    """Held-out target registration error (mm), measured in MRI space: each histology point mapped back to MRI
    space (inverse started from the mapping's linear part, never from the answer) against its MRI point."""
    from . import compare

    byLabel = dict(zip(histologyLabels, histologyPoints))
    common = [label for label in mriLabels if label in byLabel]
    if not common:
        raise UserInputError("evaluate_points: no label appears in both point files; pair them by label (label,x,y,z).")
    fixed = np.array([p for label, p in zip(mriLabels, mriPoints) if label in byLabel])
    moving = np.array([byLabel[label] for label in common])
    mapped = compare.InverseMapping(mapping).transformPoints(moving)
    tre = np.linalg.norm(mapped - fixed, axis=1)
    forward = np.linalg.norm(mapping.transformPoints(fixed) - moving, axis=1)
    return {"points": [{"label": label, "tre_mm": float(t), "tre_histology_space_mm": float(f)}
                       for label, t, f in zip(common, tre, forward)],
            "tre_mm": [float(t) for t in tre], "tre_median_mm": float(np.median(tre)),
            "tre_max_mm": float(tre.max()), "count": len(common)}


def compareLabels(mriLabels: Image, histologyLabels: Image, mapping,
                  progress: Optional[ProgressCallback] = None) -> Tuple[Dict[object, dict], Image]:
    """Per label: volumes (MRI, histology native, in MRI space resampled and Jacobian-integrated), Dice, HD95; and
    the histology labels carried onto the MRI labels' grid."""
    from . import compare

    for name, image in (("MRI labels", mriLabels), ("histology labels", histologyLabels)):
        if not np.any(image.array):
            raise UserInputError(f"The {name} are empty (no labelled voxel). Check the label file or segmentation.")
    rows, transferred = compare.compareTumours(mriLabels.array, mriLabels.ijkToRas, histologyLabels.array,
                                               histologyLabels.ijkToRas, mapping, progress=progress)
    return rows, Image(transferred, np.asarray(mriLabels.ijkToRas))


def mapPointFile(transformPath, pointsPath, direction: str, outPath, bigWarpFlipXY: bool = True) -> dict:
    """Points from any point file mapped through a transform file (fixed-to-moving = MRI -> histology, or back),
    written as plain CSV label,x,y,z with their labels. Returns {count, max_residual_mm}."""
    import logging

    from .context import createScene
    from .landmarks import readPoints, writePoints
    from .transforms import loadTransform, mapPoints

    labels, points = readPoints(pointsPath, flipXY=bigWarpFlipXY)
    node = loadTransform(createScene(), transformPath)
    mapped, residual = mapPoints(node, points, direction)
    if len(residual) and not (residual < 1e-3).all():
        bad = [labels[i] for i in np.flatnonzero(~(residual < 1e-3))]
        logging.getLogger(__name__).warning("Points whose inverse mapping did not converge (residual > 1e-3 mm): %s",
                                            ", ".join(bad))
    writePoints(outPath, labels, mapped, format="csv")
    return {"count": len(labels), "max_residual_mm": float(residual.max()) if len(residual) else 0.0}
