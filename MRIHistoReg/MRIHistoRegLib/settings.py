"""Choices and presets as data, one table each, used by the panel, the run configuration and the CLI alike."""
from typing import Dict, Optional

from .errors import UserInputError

MODELS = ("rigid", "similarity", "affine", "affine+tps")
SPACING_UNITS = ("um", "mm")
REFERENCE_GRIDS = ("MRI", "custom spacing")

# Intensity refinement presets by name: overrides of refine.DEFAULT_SETTINGS (the values and why they were chosen
# are in refine.py and bench/refine.py).
REFINE_PRESETS: Dict[str, dict] = {"affine + B-spline": {}, "affine": {"bspline": False}}
DEFAULT_REFINE_PRESET = "affine + B-spline"


def refineSettings(preset: str = DEFAULT_REFINE_PRESET, overrides: Optional[dict] = None) -> dict:
    """The settings of a named preset, with `overrides` on top (e.g. a control-point spacing from the CLI)."""
    if preset not in REFINE_PRESETS:
        raise UserInputError(f"Unknown refinement preset '{preset}': choose one of {', '.join(REFINE_PRESETS)}.")
    return dict(REFINE_PRESETS[preset], **(overrides or {}))
