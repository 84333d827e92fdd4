"""Check MRIHistoReg/Resources/requirements.txt against PyPI for every supported Slicer (run by hand, needs PyPI).

For each Slicer release: the requirement lines that apply to its Python, downloaded as wheels for its platforms
(pip download --only-binary), and each wheel's Requires-Python and numpy bound compared with what that Slicer
bundles. Prints one row per (Slicer, platform, package); exits 1 if any does not resolve or does not admit the
bundled numpy.  Usage: .venv/bin/python tools/resolve_slicer_requirements.py
"""
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MRIHistoReg"))
from MRIHistoRegLib import deps  # noqa: E402

# Slicer release -> (Python, numpy) bundled (CMakeLists.txt, SuperBuild/External_python-numpy.cmake at the tag)
SLICERS = {"5.8.1": ("3.9", "1.26.4"), "5.10.0": ("3.12", "2.0.2"), "5.12.3": ("3.12", "2.4.6"), "main": ("3.12", "2.4.6")}
PLATFORMS = ("manylinux2014_x86_64", "win_amd64", "macosx_11_0_arm64")


def _version(text):
    return tuple(int(v) for v in re.findall(r"\d+", text)[:3])


def main():
    failed = False
    for slicer, (python, numpy) in SLICERS.items():
        for requirement in deps.slicerRequirements(python).values():
            for platform in PLATFORMS:
                folder = tempfile.mkdtemp()
                abi = "cp" + python.replace(".", "")
                command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                           "--python-version", python, "--implementation", "cp", "--abi", abi, "--abi", "none",
                           "--abi", "abi3", "--platform", platform, "--platform", "any", "-d", folder, requirement]
                result = subprocess.run(command, capture_output=True, text=True)
                wheels = list(Path(folder).glob("*.whl"))
                if result.returncode or not wheels:
                    print(f"Slicer {slicer} ({python}) {platform}: {requirement} does NOT resolve")
                    failed = True
                    continue
                metadata = zipfile.ZipFile(wheels[0]).read(
                    next(n for n in zipfile.ZipFile(wheels[0]).namelist() if n.endswith(".dist-info/METADATA"))
                ).decode()
                requires = re.search(r"^Requires-Python: (.*)$", metadata, re.M)
                bound = re.search(r"^Requires-Dist: numpy\s*\(?>=([\d.]+)", metadata, re.M)
                numpyOk = bound is None or _version(numpy) >= _version(bound.group(1))
                failed |= not numpyOk
                print(f"Slicer {slicer} (Python {python}, numpy {numpy}) {platform}: {wheels[0].name} "
                      f"Requires-Python {requires.group(1) if requires else '-'}, numpy >= "
                      f"{bound.group(1) if bound else 'any'}: {'ok' if numpyOk else 'NUMPY TOO OLD'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
