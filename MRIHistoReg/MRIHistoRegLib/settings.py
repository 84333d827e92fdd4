"""Choices and presets as data, one table each, used by the panel, the run configuration and the CLI alike."""
from typing import Dict, Optional

from .errors import UserInputError

MODELS = ("rigid", "similarity", "affine", "affine+tps")
SPACING_UNITS = ("um", "mm")
REFERENCE_GRIDS = ("MRI", "custom spacing")

# Intensity refinement presets by name. "engine" picks the engine: "elastix" (itk-elastix, elastix.DEFAULT_SETTINGS;
# without itk-elastix it falls back to the SimpleITK engine and the report says why) or "simpleitk" (overrides of
# refine.DEFAULT_SETTINGS). The values and why they were chosen: elastix.py, refine.py and bench/refine.py.
REFINE_PRESETS: Dict[str, dict] = {"elastix B-spline + landmarks": {"engine": "elastix"},
                                   "affine + B-spline": {"engine": "simpleitk"},
                                   "affine": {"engine": "simpleitk", "bspline": False}}
DEFAULT_REFINE_PRESET = "elastix B-spline + landmarks"


def refineSettings(preset: str = DEFAULT_REFINE_PRESET, overrides: Optional[dict] = None) -> dict:
    """The settings of a named preset, with `overrides` on top (e.g. a control-point spacing from the CLI)."""
    if preset not in REFINE_PRESETS:
        raise UserInputError(f"Unknown refinement preset '{preset}': choose one of {', '.join(REFINE_PRESETS)}.")
    return dict(REFINE_PRESETS[preset], **(overrides or {}))
