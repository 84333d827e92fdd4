"""Spacing units: millimetres per unit name, and spacing values checked and converted to mm.

They live with the stack readers because the readers need them (OME, ImageJ and NRRD metadata state their own
units) and the readers must not import spacing.py, which builds on the readers; spacing.py re-exports both.
"""
import math

import numpy as np

from MRIHistoRegLib.errors import UserInputError

_UNITS_MM = {
    "mm": 1.0, "millimetre": 1.0, "millimeter": 1.0, "millimetres": 1.0, "millimeters": 1.0,
    "um": 1e-3, "µm": 1e-3, "μm": 1e-3, "micron": 1e-3, "microns": 1e-3, "micrometre": 1e-3, "micrometer": 1e-3,
    "micrometres": 1e-3, "micrometers": 1e-3, "\\u00b5m": 1e-3,
    "nm": 1e-6, "nanometer": 1e-6, "nanometre": 1e-6,
    "cm": 10.0, "centimeter": 10.0, "centimetre": 10.0,
    "m": 1000.0, "meter": 1000.0, "metre": 1000.0,
    "inch": 25.4, "in": 25.4,
}


def unitToMillimetres(unit):
    """Millimetres per `unit` ('um', 'µm', 'micron', 'mm', 'nm', 'cm', 'm', ...); ValueError for unknown units."""
    key = str(unit).strip().lower() if unit is not None else ""
    if key in _UNITS_MM:
        return _UNITS_MM[key]
    raise UserInputError(f"Unknown spacing unit {unit!r}: use 'um' (micrometres) or 'mm' (millimetres).")


def toMillimetres(values, unit):
    """Spacing value(s) in `unit` ('um'|'µm'|'mm', ...) as a tuple of mm (one value in, one value out as a tuple).

    Zero, negative, NaN or infinite values are refused with a ValueError saying what to give instead."""
    factor = unitToMillimetres(unit)
    array = np.atleast_1d(np.asarray(values, dtype=float)) if not isinstance(values, str) else None
    if array is None:
        raise UserInputError(f"Spacing must be numbers, got {values!r}.")
    if array.ndim != 1 or array.size not in (1, 3):
        raise UserInputError(f"Spacing must be one value or three (i, j, k), got {values!r}.")
    for value in array:
        if not math.isfinite(value) or value <= 0:
            raise UserInputError(f"Spacing {list(array)} {unit} is invalid: every value must be a positive, finite number "
                             f"(e.g. 3.25 3.25 5 um for a light-sheet stack).")
    return tuple(float(v) * factor for v in array)
