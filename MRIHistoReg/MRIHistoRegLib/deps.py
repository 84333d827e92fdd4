"""Optional Python packages: imported lazily, installed on demand inside Slicer after asking the user.

Slicer bundles numpy, SimpleITK and vtk; everything else (tifffile, pynrrd, matplotlib, isal) is imported only
inside the functions that need it, through `requirePackage` (isal, a speed-up, through `optionalPackage`: never installed). Which version to install comes from ONE file,
MRIHistoReg/Resources/requirements.txt, whose environment markers pick a release that supports the running
Slicer's Python (5.8 bundles Python 3.9, 5.10 and later 3.12). Installing never replaces Slicer's own numpy,
SimpleITK or vtk: their running versions are passed to pip as constraints. In plain Python the packages come
from the repository's pinned requirements.txt instead.
"""
import importlib
import logging
import os
import platform
import re
import sys
import tempfile
from typing import Dict, List, Optional
from .errors import UserInputError

log = logging.getLogger(__name__)

SLICER_REQUIREMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources",
                                   "requirements.txt")
# import name -> distribution name on PyPI
DISTRIBUTIONS = {"tifffile": "tifffile", "nrrd": "pynrrd", "matplotlib": "matplotlib", "zarr": "zarr", "h5py": "h5py"}
BUNDLED = ("numpy", "SimpleITK", "vtk")  # Slicer's own: pinned to what runs while installing
# Large optional packages: never installed along with the small ones nor by requirePackage; the panel asks for
# each separately, stating the size (the feature that needs one falls back when it is absent).
LARGE_DISTRIBUTIONS = {"itk": "itk-elastix"}  # import name -> distribution
INSTALL_SIZE_MB = {"itk-elastix": 1700}  # installed with its ITK wheels (~300 MB download), measured on Linux


def _markerEnvironment(pythonVersion=None) -> Dict[str, str]:
    version = pythonVersion or "{}.{}".format(*sys.version_info[:2])
    full = version if version.count(".") == 2 else version + ".0"
    return {"python_version": version, "python_full_version": full, "sys_platform": sys.platform,
            "platform_system": platform.system(), "platform_machine": platform.machine(), "os_name": os.name,
            "implementation_name": sys.implementation.name}


_MARKER = re.compile(r"""^\s*(\w+)\s*(==|!=|>=|<=|>|<)\s*["']([^"']*)["']\s*$""")


def _versionTuple(text):
    return tuple(int(part) for part in re.findall(r"\d+", text))


def markerHolds(marker: str, environment: Dict[str, str]) -> bool:
    """Evaluate a PEP 508 marker made of `name op "value"` terms joined by `and` (all requirements.txt uses)."""
    for term in marker.split(" and "):
        match = _MARKER.match(term)
        if not match:
            raise ValueError(f"Unsupported environment marker {term!r} in {SLICER_REQUIREMENTS}")
        name, op, value = match.groups()
        actual = environment[name]
        if name.startswith("python"):
            left, right = _versionTuple(actual), _versionTuple(value)
        else:
            left, right = actual, value
        holds = {"==": left == right, "!=": left != right, ">=": left >= right, "<=": left <= right,
                 ">": left > right, "<": left < right}[op]
        if not holds:
            return False
    return True


def slicerRequirements(pythonVersion: Optional[str] = None, path: str = SLICER_REQUIREMENTS) -> Dict[str, str]:
    """{distribution name: requirement} that applies to `pythonVersion` ('3.9'; default the running one)."""
    environment = _markerEnvironment(pythonVersion)
    chosen = {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            requirement, _, marker = (part.strip() for part in line.partition(";"))
            if marker and not markerHolds(marker, environment):
                continue
            name = re.split(r"[<>=!~ \[]", requirement, 1)[0]
            if name in chosen:
                raise ValueError(f"{path}: two requirements for {name} apply to Python {environment['python_version']}")
            chosen[name] = requirement
    return chosen


def requirementFor(importName: str, pythonVersion: Optional[str] = None) -> str:
    distribution = DISTRIBUTIONS.get(importName, LARGE_DISTRIBUTIONS.get(importName, importName))
    return slicerRequirements(pythonVersion).get(distribution, distribution)


def largePackagePrompt(importName: str) -> str:
    """The question the panel asks before installing a large package (its size stated)."""
    requirement = requirementFor(importName)
    size = INSTALL_SIZE_MB.get(LARGE_DISTRIBUTIONS[importName])
    return (f"The recommended refinement engine needs '{requirement}' (about {size / 1000:.1f} GB installed, "
            f"downloaded once; Slicer is restarted afterwards). Without it the SimpleITK engine is used. "
            f"Install it now (internet access needed)?")


def installLargePackage(importName: str) -> bool:
    """Inside Slicer: ask (with the size), then install a LARGE_DISTRIBUTIONS package for Slicer's Python, keeping
    Slicer's own numpy/SimpleITK/vtk. False when the user declines; True when installed."""
    import slicer

    if importName not in LARGE_DISTRIBUTIONS:
        raise ValueError(f"{importName} is not a large optional package ({sorted(LARGE_DISTRIBUTIONS)})")
    if not slicer.util.confirmOkCancelDisplay(largePackagePrompt(importName), "Install the elastix engine?"):
        return False
    requirement = requirementFor(importName)
    with tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", delete=False) as constraints:
        constraints.write("\n".join(bundledConstraints()) + "\n")
    try:
        log.info("installing %s", requirement)
        slicer.util.pip_install([requirement, "-c", constraints.name])
    finally:
        os.remove(constraints.name)
    importlib.invalidate_caches()
    return True


def bundledConstraints() -> List[str]:
    """`name==version` of Slicer's own packages as they run now, so pip keeps them."""
    from importlib import metadata

    constraints = []
    for name in BUNDLED:
        try:
            constraints.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return constraints


def _installInSlicer(requirement: str) -> None:
    """Ask, then install `requirement` for Slicer's Python, keeping Slicer's own numpy/SimpleITK/vtk."""
    import slicer

    with tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", delete=False) as constraints:
        constraints.write("\n".join(bundledConstraints()) + "\n")
    try:
        try:
            import slicer.packaging as packaging  # Slicer 5.12 and later: asks the user itself
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure([requirement], constraints=constraints.name, requester="MRIHistoReg")
            return
        if not slicer.util.confirmOkCancelDisplay(
            f"MRIHistoReg needs the Python package '{requirement}'. Install it now (internet access needed)?",
            "Missing Python package",
        ):
            raise UserInputError(f"The Python package '{requirement}' is needed for this step: install it when asked, "
                             f"or in Slicer's Python console: slicer.util.pip_install('{requirement}').")
        log.info("installing %s", requirement)
        slicer.util.pip_install([requirement, "-c", constraints.name])
    finally:
        os.remove(constraints.name)


def requirePackage(importName: str):
    """Import `importName`; inside Slicer offer to install it when missing, else raise ValueError with the fix."""
    try:
        return importlib.import_module(importName)
    except ImportError:
        pass
    requirement = requirementFor(importName)
    from MRIHistoRegLib.context import insideSlicerApplication

    if insideSlicerApplication():
        import slicer

        if not slicer.app.testingEnabled():  # a self-test never installs (no network, no prompt)
            _installInSlicer(requirement)
            importlib.invalidate_caches()
            try:
                return importlib.import_module(importName)
            except ImportError:
                pass
        raise UserInputError(
            f"The Python package '{requirement}' is required for this step but is not installed. "
            f"Install it in Slicer's Python console: slicer.util.pip_install('{requirement}')."
        )
    raise UserInputError(
        f"The Python package '{requirement}' is required for this step but is not installed. "
        f"Install it with: pip install {requirement}"
    )


def optionalPackage(importName: str):
    """Import `importName` if it is installed, else None (never installs; for speed-ups such as isal)."""
    try:
        return importlib.import_module(importName)
    except ImportError:
        return None
