"""Optional Python packages: imported lazily, installed on demand inside Slicer after asking the user.

Slicer bundles numpy, SimpleITK and vtk; everything else (tifffile, pynrrd, matplotlib, isal) is imported
only inside the functions that need it, through `requirePackage`. In plain Python the packages come from the
pinned requirements.txt; inside Slicer the user is asked once and `slicer.util.pip_install` installs the
version pinned here.
"""
import importlib
import logging

# import name -> pip requirement (kept in step with requirements.txt)
PINNED = {
    "tifffile": "tifffile==2026.3.3",
    "nrrd": "pynrrd==1.1.3",
    "matplotlib": "matplotlib==3.11.2",
    "isal": "isal==1.9.1",
}


def requirePackage(importName: str):
    """Import `importName`; inside Slicer offer to install it when missing, else raise ValueError with the fix."""
    try:
        return importlib.import_module(importName)
    except ImportError:
        pass
    requirement = PINNED.get(importName, importName)
    from MRIHistoRegLib.context import insideSlicerApplication

    if insideSlicerApplication():
        import slicer

        if slicer.util.confirmOkCancelDisplay(
            f"MRIHistoReg needs the Python package '{requirement}'. Install it now (internet access needed)?",
            "Missing Python package",
        ):
            logging.info("installing %s", requirement)
            slicer.util.pip_install(requirement)
            return importlib.import_module(importName)
    raise ValueError(
        f"The Python package '{requirement}' is required for this step but is not installed. "
        f"Install it with: pip install {requirement} (in Slicer: slicer.util.pip_install('{requirement}'))."
    )


def optionalPackage(importName: str):
    """Import `importName` if it is installed, else None (never installs; for speed-ups such as isal)."""
    try:
        return importlib.import_module(importName)
    except ImportError:
        return None
