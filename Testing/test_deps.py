"""On-demand packages for Slicer: one requirements file (MRIHistoReg/Resources/requirements.txt) whose markers pick
one release per supported Slicer Python, the same pins as requirements.txt where the Python is the same kind, and
an install that keeps Slicer's own numpy / SimpleITK / vtk."""
import re
from importlib import metadata

import pytest

from conftest import REPO
from MRIHistoRegLib import deps

DEVELOPMENT_ONLY = {"itk-elastix", "ome-zarr"}
SLICER_PYTHONS = {"5.8": "3.9", "5.10": "3.12", "5.12": "3.12"}  # CMakeLists.txt at v5.8.1, v5.10.0, v5.12.3


def _installed(name):
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def _pins(path):
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and ";" not in line:
            name, _, version = line.partition("==")
            pins[name.strip()] = version.strip()
    return pins


@pytest.mark.parametrize("slicer, python", SLICER_PYTHONS.items())
def test_one_release_per_package_for_each_slicer_python(slicer, python):
    chosen = deps.slicerRequirements(python)
    assert set(chosen) == set(deps.DISTRIBUTIONS.values()) | set(deps.LARGE_DISTRIBUTIONS.values()), \
        f"Slicer {slicer}: {chosen}"
    assert all(re.fullmatch(r"[\w.-]+==[\w.]+", r) for r in chosen.values()), chosen


def test_slicer_pins_are_requirements_txts_pins_for_the_same_python():
    """The environment that runs this suite (Python 3.11-3.13) takes the same lines as Slicer 5.10+ (Python 3.12)."""
    development = _pins(REPO / "requirements.txt")
    for name, requirement in deps.slicerRequirements().items():
        assert requirement == f"{name}=={development[name]}", (requirement, development.get(name))
    assert deps.slicerRequirements() == deps.slicerRequirements("3.12")


def test_installed_pins_admit_the_python_their_line_is_for():
    """The installed release of each package (either environment of ./run.sh test) is one of the Slicer file's lines,
    and its Requires-Python (its own metadata) admits the Python that line is chosen for."""
    for python in ("3.9", "3.12"):
        for name, requirement in deps.slicerRequirements(python).items():
            if name in DEVELOPMENT_ONLY and not _installed(name):  # itk-elastix: not in the oldest stack
                continue
            if metadata.version(name) != requirement.split("==")[1]:
                continue
            requires = metadata.metadata(name).get("Requires-Python") or ""
            floor = re.search(r">=\s*([\d.]+)", requires)
            assert floor is None or tuple(int(v) for v in floor.group(1).split(".")) <= tuple(
                int(v) for v in python.split(".")), (name, requires, python)
    installed = {name: metadata.version(name) for name in deps.DISTRIBUTIONS.values()}
    lines = {r for python in ("3.9", "3.12") for r in deps.slicerRequirements(python).values()}
    assert all(f"{name}=={version}" in lines for name, version in installed.items()), installed


def test_the_slicer_stack_environment_is_the_oldest_slicers():
    """requirements-slicer-stack.txt: Slicer 5.8's numpy and SimpleITK, its on-demand (Python 3.9) lines, and
    requirements.txt's pins for the rest (scipy excepted: it follows numpy)."""
    import slicer_api

    stack, development = _pins(REPO / "requirements-slicer-stack.txt"), _pins(REPO / "requirements.txt")
    # numcodecs: zarr 2's codecs, pinned to a release built for numpy 1.x (zarr 3 brings its own pin); the elastix
    # engine and the test-only OME-Zarr writer are not in the oldest stack: there the SimpleITK fallback runs
    assert set(stack) - {"numcodecs"} == set(development) - DEVELOPMENT_ONLY
    for name in ("numpy", "SimpleITK"):
        assert stack[name] == slicer_api.OLDEST_BUNDLED[name], name
    for name, requirement in deps.slicerRequirements("3.9").items():
        if name in DEVELOPMENT_ONLY:  # the on-demand elastix engine: the oldest stack tests the fallback
            continue
        assert f"{name}=={stack[name]}" == requirement
    others = set(stack) - {"numpy", "SimpleITK", "scipy", "numcodecs"} - set(deps.slicerRequirements("3.9"))
    assert {name: stack[name] for name in others} == {name: development[name] for name in others}


def test_markers_are_evaluated_like_pep_508():
    environment = deps._markerEnvironment("3.9")
    assert deps.markerHolds('python_version < "3.11"', environment)
    assert not deps.markerHolds('python_version >= "3.11"', environment)
    assert deps.markerHolds('python_version >= "3.9" and python_version < "3.10"', environment)
    assert not deps.markerHolds('python_version < "3.10"', deps._markerEnvironment("3.10"))  # not a string compare
    with pytest.raises(ValueError, match="Unsupported environment marker"):
        deps.markerHolds('python_version < "3.11" or os_name == "nt"', environment)


def test_a_requirements_file_with_two_lines_for_one_python_is_refused(tmp_path):
    broken = tmp_path / "requirements.txt"
    broken.write_text('tifffile==2024.8.30; python_version < "3.12"\ntifffile==2026.3.3; python_version >= "3.11"\n')
    with pytest.raises(ValueError, match="two requirements for tifffile apply to Python 3.11"):
        deps.slicerRequirements("3.11", path=str(broken))


def test_installing_keeps_slicers_own_packages():
    constraints = deps.bundledConstraints()
    assert f"numpy=={metadata.version('numpy')}" in constraints
    assert f"SimpleITK=={metadata.version('SimpleITK')}" in constraints
    assert f"vtk=={metadata.version('vtk')}" in constraints


def test_a_missing_package_names_the_pinned_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tifffile", None)  # import tifffile now raises ImportError
    pinned = _pins(REPO / "requirements.txt")["tifffile"]
    with pytest.raises(ValueError, match=re.escape(f"pip install tifffile=={pinned}")):
        deps.requirePackage("tifffile")


def test_the_large_engine_is_asked_for_separately_with_its_size():
    """itk-elastix has a line for every Slicer Python (0.23.0 is the newest with cp39 wheels) and is never what
    requirePackage installs with the small packages; the panel's question states its size."""
    assert deps.slicerRequirements("3.9")["itk-elastix"] == "itk-elastix==0.23.0"
    assert deps.slicerRequirements("3.12")["itk-elastix"] == f"itk-elastix=={_pins(REPO / 'requirements.txt')['itk-elastix']}"
    assert "itk-elastix" not in deps.DISTRIBUTIONS.values()
    assert "GB" in deps.largePackagePrompt("itk") and "SimpleITK" in deps.largePackagePrompt("itk")
