"""The `run` configuration: a JSON file describing one subject, validated with messages naming the field.

Relative paths resolve against the config file's folder. Example (the sample data writes one):

    {"mri": "mri.nrrd", "histology": "histology.tif", "histology_spacing_um": [26, 26, 40],
     "landmarks": {"mri": "landmarks_mri.mrk.json", "histology": "landmarks_histology.mrk.json"},
     "model": "affine+tps", "refine": false, "working_spacing_mm": 0.1,
     "labels": {"mri": "mri_tumour_label.nrrd", "histology": "histology_tumour_label.nrrd"},
     "evaluate_points": {"mri": "eval_points_mri.csv", "histology": "eval_points_histology.csv"}}

`histology_spacing_um` is [x, y, z] = [i, j, k] (i the fastest, column axis); it may be omitted when the
stack's metadata carries the true spacing. A multi-channel stack takes "histology_channel": INDEX or "NAME" (the
registration channel) and "resample_channels": [INDEX or "NAME", ...] or "all" (also resampled onto the MRI).
"""
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from .settings import DEFAULT_REFINE_PRESET, MODELS, REFINE_PRESETS  # noqa: E402  (one table each: settings.py)
from .errors import UserInputError
_KNOWN_FIELDS = {"mri", "histology", "histology_spacing_um", "landmarks", "model", "refine", "refine_preset",
                 "mri_mask", "working_spacing_mm", "histology_channel", "resample_channels", "ome_zarr_outputs",
                 "labels", "evaluate_points", "name", "tps_regularization", "tumour_focus"}


@dataclass
class RunConfig:
    path: str
    name: str
    mri: str
    histology: str
    landmarks: Dict[str, str]
    histologySpacingMm: Optional[Tuple[float, float, float]] = None  # converted once, here, from the config's um
    model: str = "affine+tps"
    refine: bool = False
    workingSpacingMm: float = 0.1
    tpsRegularization: float = 0.0
    labels: Dict[str, str] = field(default_factory=dict)
    evaluatePoints: Dict[str, str] = field(default_factory=dict)
    refinePreset: str = "elastix B-spline + landmarks"  # a name of settings.REFINE_PRESETS
    refineOverrides: Dict[str, object] = field(default_factory=dict)  # on top of the preset (CLI options)
    mriMask: Optional[str] = None
    resample: bool = True  # the `refine` command stops before the resampling
    bigWarpFlipXY: bool = True  # BigWarp point files: Fiji x, y -> RAS -x, -y (landmarks module)
    histologyChannel: Optional[object] = None  # index (int) or name (str) of a multi-channel stack's channel
    resampleChannels: Optional[object] = None  # other channels resampled too: a list of indices/names, or "all"
    omeZarrOutputs: bool = False  # the resampled images also as OME-Zarr (Fiji/BigDataViewer, napari, neuroglancer)
    histologySegmentation: Optional[dict] = None  # labels.histology as a segmentation of a signal channel

    @property
    def refineSettings(self) -> dict:
        from .settings import refineSettings

        return refineSettings(self.refinePreset, self.refineOverrides)

    def inputFiles(self) -> Dict[str, str]:
        """Every input path by role (for checksums in the report); steps left out have none."""
        files = {role: path for role, path in (("mri", self.mri), ("histology", self.histology), ("mri_mask", self.mriMask))
                 if path}
        files.update({f"landmarks.{k}": v for k, v in self.landmarks.items()})
        files.update({f"labels.{k}": v for k, v in self.labels.items()})
        files.update({f"evaluate_points.{k}": v for k, v in self.evaluatePoints.items()})
        return files


def loadConfig(path) -> RunConfig:
    """Read and validate a run configuration; ValueError names the offending field and the fix."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise UserInputError(f"Config file not found: {path}. Check the path.")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as error:
        raise UserInputError(f"Config {path} is not valid JSON ({error}). Fix the syntax at that line.") from None
    return parseConfig(raw, path)


def parseConfig(raw, path) -> RunConfig:
    """A RunConfig from the decoded JSON `raw` of the config file at `path`; UserInputError names the field."""
    if not isinstance(raw, dict):
        raise UserInputError(f"Config {path}: the top level must be a JSON object with fields mri, histology, landmarks, ...")
    unknown = sorted(set(raw) - _KNOWN_FIELDS)
    if unknown:
        raise UserInputError(f"Config {path}: unknown field(s) {unknown}; known fields are {sorted(_KNOWN_FIELDS)}.")
    spacing = _histologySpacing(raw.get("histology_spacing_um"), path)
    options = _options(raw, path)
    fields = _PathFields(raw, path)
    return RunConfig(
        path=path,
        name=options["name"],
        mri=fields.existingPath("mri", fields.require("mri")),
        histology=fields.existingPath("histology", fields.require("histology")),
        landmarks=fields.pair("landmarks", required=True),
        histologySpacingMm=spacing,
        model=options["model"],
        refine=options["refine"],
        workingSpacingMm=options["workingSpacingMm"],
        tpsRegularization=options["tpsRegularization"],
        labels=fields.pair("labels", required=False, segmentable=True),
        evaluatePoints=fields.pair("evaluate_points", required=False),
        refinePreset=_refinePreset(raw.get("refine_preset", DEFAULT_REFINE_PRESET), path),
        # the elastix engine's tumour focus on labels.mri (tumourfocus.py), on unless turned off
        refineOverrides={} if _flag(raw, "tumour_focus", path, default=True) else {"tumourFocus": False},
        mriMask=fields.existingPath("mri_mask", raw["mri_mask"]) if raw.get("mri_mask") is not None else None,
        histologyChannel=_histologyChannel(raw.get("histology_channel"), path),
        resampleChannels=resampleChannels(raw.get("resample_channels"), f"Config {path}: field 'resample_channels'"),
        omeZarrOutputs=_flag(raw, "ome_zarr_outputs", path),
        histologySegmentation=_segmentation((raw.get("labels") or {}).get("histology"), path),
    )


def _flag(raw, key, path, default=False) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise UserInputError(f"Config {path}: field '{key}' must be true or false, got {value!r}.")
    return value


def resampleChannels(value, what):
    """None, "all" or a list of channel indices / names (the config's resample_channels, the CLI's option);
    whether the stack has them is checked when it is opened, before anything is computed."""
    if value is None or value == "all":
        return value
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (list, tuple)) and value and all(
            (isinstance(v, str) and v.strip()) or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
            for v in value):
        return list(value)
    raise UserInputError(f"{what} must be \"all\" or a list of channel indices (0, 1, ...) or names (`python -m "
                         f"MRIHistoRegLib info STACK` lists them), got {value!r}.")


_SEGMENTATION_FIELDS = {"segment_channel", "threshold", "seed_ijk", "crop_ijk", "fill_holes"}


def _segmentation(spec, path) -> Optional[dict]:
    """labels.histology given as {"segment_channel": INDEX|NAME, "threshold": T|null, "seed_ijk": [i, j, k]|null,
    "crop_ijk": [[i0, i1], [j0, j1], [k0, k1]]|null, "fill_holes": true}: segmentStack's arguments, checked."""
    if not isinstance(spec, dict):
        return None
    where = f"Config {path}: field 'labels.histology'"
    unknown = sorted(set(spec) - _SEGMENTATION_FIELDS)
    if unknown or "segment_channel" not in spec:
        raise UserInputError(f"{where} is either a label map path or a segmentation {{\"segment_channel\": INDEX or "
                             f"NAME, \"threshold\", \"seed_ijk\", \"crop_ijk\", \"fill_holes\"}}; got the field(s) "
                             f"{sorted(spec)}.")
    threshold = spec.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not math.isfinite(threshold)):
        raise UserInputError(f"{where}: 'threshold' must be a number or null (Otsu's threshold), got {threshold!r}.")
    seed = spec.get("seed_ijk")
    if seed is not None and (not isinstance(seed, list) or len(seed) != 3
                             or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in seed)):
        raise UserInputError(f"{where}: 'seed_ijk' must be three voxel indices [i, j, k] of the tumour, got {seed!r}.")
    crop = spec.get("crop_ijk")
    if crop is not None and (not isinstance(crop, list) or len(crop) != 3
                             or not all(isinstance(r, list) and len(r) == 2 for r in crop)):
        raise UserInputError(f"{where}: 'crop_ijk' must be [[i0, i1], [j0, j1], [k0, k1]] (voxels), got {crop!r}.")
    fill = spec.get("fill_holes", True)
    if not isinstance(fill, bool):
        raise UserInputError(f"{where}: 'fill_holes' must be true or false, got {fill!r}.")
    return {"channel": _histologyChannel(spec["segment_channel"], path), "threshold": threshold, "seedIjk": seed,
            "roi": None if crop is None else tuple(tuple(r) for r in crop), "fillHoles": fill}


def _histologyChannel(channel, path):
    """None, a channel index >= 0 or a channel name; whether the stack has it is checked when it is opened."""
    if channel is None or (isinstance(channel, str) and channel.strip()):
        return channel
    if isinstance(channel, int) and not isinstance(channel, bool) and channel >= 0:
        return channel
    raise UserInputError(f"Config {path}: field 'histology_channel' must be a channel index (0, 1, ...) or a channel "
                         f"name (`python -m MRIHistoRegLib info STACK` lists them), got {channel!r}.")


def _refinePreset(name, path) -> str:
    if name not in REFINE_PRESETS:
        raise UserInputError(f"Config {path}: field 'refine_preset' must be one of {list(REFINE_PRESETS)}, got {name!r}.")
    return name


class _PathFields:
    """The config's path fields: required ones, relative paths resolved against the config's folder, and the
    {"mri": ..., "histology": ...} pairs; every path must exist."""

    def __init__(self, raw, path):
        self.raw, self.path = raw, path
        self.folder = os.path.dirname(os.path.abspath(path))

    def require(self, key):
        if key not in self.raw:
            raise UserInputError(f"Config {self.path}: required field '{key}' is missing.")
        return self.raw[key]

    def existingPath(self, key, value):
        if not isinstance(value, str) or not value:
            raise UserInputError(f"Config {self.path}: field '{key}' must be a path string, got {value!r}.")
        full = value if os.path.isabs(value) else os.path.join(self.folder, value)
        if not os.path.exists(full):
            raise UserInputError(f"Config {self.path}: field '{key}' points to {full}, which does not exist. Fix the path "
                                 f"(relative paths resolve against the config's folder).")
        return os.path.normpath(full)

    def pair(self, key, required, segmentable=False):
        value = self.raw.get(key)
        if value is None:
            if required:
                raise UserInputError(f"Config {self.path}: required field '{key}' is missing; it needs {{\"mri\": ..., \"histology\": ...}}.")
            return {}
        if not isinstance(value, dict) or set(value) != {"mri", "histology"}:
            raise UserInputError(f"Config {self.path}: field '{key}' must be an object with exactly the keys 'mri' and 'histology', got {value!r}.")
        sides = ("mri",) if segmentable and isinstance(value["histology"], dict) else ("mri", "histology")
        return {side: self.existingPath(f"{key}.{side}", value[side]) for side in sides}


def _histologySpacing(spacing, path) -> Optional[Tuple[float, float, float]]:
    if spacing is None:
        return None
    if (not isinstance(spacing, list) or len(spacing) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spacing)
            or not all(math.isfinite(v) and v > 0 for v in spacing)):
        raise UserInputError(f"Config {path}: field 'histology_spacing_um' must be three positive numbers [x, y, z] in "
                             f"micrometres (i, j, k order), got {spacing!r}.")
    return tuple(float(v) / 1000.0 for v in spacing)


def _options(raw, path) -> dict:
    """The config's scalar fields, checked in the order the file documents them (the first bad one is named)."""
    model = raw.get("model", "affine+tps")
    if model not in MODELS:
        raise UserInputError(f"Config {path}: field 'model' must be one of {list(MODELS)}, got {model!r}.")
    refine = raw.get("refine", False)
    if not isinstance(refine, bool):
        raise UserInputError(f"Config {path}: field 'refine' must be true or false, got {refine!r}.")
    working = _positiveNumber(raw.get("working_spacing_mm", 0.1), "working_spacing_mm", path)
    regularization = raw.get("tps_regularization", 0.0)
    if not isinstance(regularization, (int, float)) or isinstance(regularization, bool) or not (regularization >= 0):
        raise UserInputError(f"Config {path}: field 'tps_regularization' must be a number >= 0, got {regularization!r}.")
    name = raw.get("name") or os.path.splitext(os.path.basename(path))[0]
    if not isinstance(name, str):
        raise UserInputError(f"Config {path}: field 'name' must be a string, got {name!r}.")
    return {"model": model, "refine": refine, "workingSpacingMm": working,
            "tpsRegularization": float(regularization), "name": name}


def _positiveNumber(value, key, path):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserInputError(f"Config {path}: field '{key}' must be a positive number (mm), got {value!r}.")
    return float(value)
