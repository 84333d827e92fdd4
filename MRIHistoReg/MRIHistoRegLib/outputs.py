"""Atomic output folders: a failed or cancelled run leaves the destination exactly as it was.

Results are written into a hidden sibling folder and moved into place only when complete. An existing
destination is replaced only when it is empty or is itself an MRIHistoReg output (it carries the marker
file); anything else is refused, so nobody's files are ever overwritten.
"""
import contextlib
import math
import os
import shutil
import tempfile
from .errors import UserInputError

MARKER = ".mrihistoreg-output"

# The ONE output layout: every front (run, demo, register, refine, the panel's Export report) writes these names
# (README "What the demo writes", docs/ARCHITECTURE.md section 7).
REPORT_JSON = "report.json"
REPORT_CSV = "report.csv"
TRANSFORM = "transform.h5"  # the whole MRI -> histology mapping (refined chain when accepted), from parent
REFINEMENT_TRANSFORM = "refinement_transform.h5"  # the accepted refinement alone (grid transform)
HISTOLOGY_ON_MRI = "histology_on_mri.nrrd"
OME_ZARR_SUFFIX = ".ome.zarr"  # config ome_zarr_outputs: each resampled image also as <name>.ome.zarr (NGFF 0.4)
LABELS_ON_MRI = "histology_labels_on_mri.nrrd"
# another channel of a multi-channel stack through the same mapping (config resample_channels): index and name
CHANNEL_ON_MRI = "histology_c{index}_{name}_on_mri.nrrd"
HISTOLOGY_SEGMENTATION = "histology_segmentation.nrrd"  # the signal channel's label at native resolution
LANDMARKS_MRI = "landmarks_mri.mrk.json"
LANDMARKS_HISTOLOGY = "landmarks_histology.mrk.json"
LANDMARK_ERRORS_FIGURE = "landmark_errors.png"
JACOBIAN_FIGURE = "jacobian.png"
# every section of report.json, present (null when a step did not run) whichever front wrote it
REPORT_SECTIONS = ("name", "config", "inputs", "histology", "landmarks", "landmark_summary", "pairing", "transform",
                   "jacobian", "refinement", "resampling", "evaluation", "labels", "histology_segmentation", "figures", "warnings", "timing_s",
                   "peak_memory_mb", "software")


def writeReport(report: dict, folder) -> dict:
    """Write report.json and report.csv into `folder` with every section of REPORT_SECTIONS (missing ones null);
    returns the strict-JSON report that was written."""
    import csv
    import json

    unknown = set(report) - set(REPORT_SECTIONS)
    if unknown:
        raise ValueError(f"report sections {sorted(unknown)} are not in outputs.REPORT_SECTIONS")
    report = jsonReady({key: report.get(key) for key in REPORT_SECTIONS})
    with open(os.path.join(folder, REPORT_JSON), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(folder, REPORT_CSV), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["section", "name", "quantity", "value"])
        for row in report.get("landmarks") or []:
            for key in ("residual_mm", "loo_mm", "outlier"):
                writer.writerow(["landmark", row["label"], key, row.get(key)])
        for label, row in (report.get("labels") or {}).items():
            for key, value in row.items():
                writer.writerow(["label", label, key, value])
        if report.get("evaluation"):
            for row in report["evaluation"]["points"]:
                writer.writerow(["evaluation", row["label"], "tre_mm", row["tre_mm"]])
            writer.writerow(["evaluation", "all", "tre_median_mm", report["evaluation"]["tre_median_mm"]])
        for section in ("transform", "jacobian"):
            for key, value in (report.get(section) or {}).items():
                writer.writerow([section, "", key, value])
        if report.get("refinement"):
            for key in ("accepted", "reason", "metric_before", "metric_after", "seconds"):
                writer.writerow(["refinement", "", key, report["refinement"].get(key)])
        if report.get("timing_s"):
            writer.writerow(["run", "", "total_s", report["timing_s"].get("total")])
        writer.writerow(["run", "", "peak_memory_mb", report.get("peak_memory_mb")])
    return report


def channelOnMri(index, name) -> str:
    """The file name of channel `index` (`name`, made file-safe) resampled onto the MRI grid (CHANNEL_ON_MRI)."""
    import re

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "channel"
    return CHANNEL_ON_MRI.format(index=int(index), name=safe)


def omeZarrName(fileName) -> str:
    """histology_on_mri.nrrd -> histology_on_mri.ome.zarr: the OME-Zarr copy of a resampled image."""
    return fileName[:-len(".nrrd")] + OME_ZARR_SUFFIX if fileName.endswith(".nrrd") else fileName + OME_ZARR_SUFFIX


def checkDestination(outDir) -> str:
    """Absolute path of `outDir` if results may be written there, else ValueError naming the fix."""
    outDir = os.path.abspath(os.fspath(outDir))
    if os.path.isfile(outDir):
        raise UserInputError(f"Output folder {outDir} is a file. Choose a folder path.")
    if os.path.isdir(outDir) and os.listdir(outDir) and not os.path.exists(os.path.join(outDir, MARKER)):
        raise UserInputError(f"Output folder {outDir} is not empty and was not written by MRIHistoReg: choose a new or "
                         f"empty folder (nothing there is overwritten).")
    parent = os.path.dirname(outDir)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise UserInputError(f"Cannot create the output folder's parent {parent}: {error.strerror}. Choose a writable location.") from None
    if not os.access(parent, os.W_OK):
        raise UserInputError(f"Output location {parent} is not writable. Choose a writable folder.")
    return outDir


@contextlib.contextmanager
def atomicFolder(outDir):
    """Yield a temporary folder; on success it replaces `outDir`, on any exception it is deleted."""
    outDir = checkDestination(outDir)
    temporary = tempfile.mkdtemp(prefix="." + os.path.basename(outDir) + ".partial-", dir=os.path.dirname(outDir))
    try:
        yield temporary
        with open(os.path.join(temporary, MARKER), "w", encoding="utf-8") as f:
            f.write("written by MRIHistoReg; this folder may be replaced by a new run\n")
        if os.path.exists(outDir):
            previous = outDir + ".previous-" + os.path.basename(temporary)
            os.rename(outDir, previous)
            os.rename(temporary, outDir)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.rename(temporary, outDir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def jsonReady(value):
    """A copy of `value` that strict JSON accepts: NaN/inf -> None, numpy scalars and arrays -> Python numbers
    and lists, tuples -> lists, dict keys -> str (recursively)."""
    import numpy as np

    if isinstance(value, dict):
        return {str(key): jsonReady(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return jsonReady(value.tolist())
    if isinstance(value, (list, tuple)):
        return [jsonReady(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def silentRemove(path) -> None:
    """Remove a file if it is there (temporary files on a failure path); errors are ignored."""
    try:
        os.remove(path)
    except OSError:
        pass
