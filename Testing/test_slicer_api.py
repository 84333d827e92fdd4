"""The module against Slicer's own rules, read from its source (Testing/slicer_api.py lists the facts): every
Slicer/Qt API it calls exists in the oldest supported Slicer or is guarded; no call that re-raises out of VTK
observers; VTK objects the caller owns are released; the .ui does not hide child node types or filter path
fields; the self-test builds the panel. Each rule is shown to reject a deliberately broken copy."""
import ast
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import slicer_api
from conftest import REPO

MODULE_DIR = REPO / "MRIHistoReg"
SCANNED = ["MRIHistoReg.py"] + [f"MRIHistoRegLib/{p.name}" for p in sorted((MODULE_DIR / "MRIHistoRegLib").glob("*.py"))]
OWNED_RESULT_CALLS = ("GetNodesByClass", "CreateDefaultStorageNode")  # return a reference the caller must release
OWNERSHIP_HELPERS = "MRIHistoRegLib/context.py"


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _guardedNames(tree):
    """Names X used as hasattr(owner, "X") in an if-test or getattr(owner, "X", default): (line range, name)."""
    guarded = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            for call in ast.walk(node.test):
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "hasattr"
                        and len(call.args) == 2 and isinstance(call.args[1], ast.Constant)):
                    guarded.append((node.lineno, max(getattr(n, "lineno", node.lineno) for n in ast.walk(node)),
                                    call.args[1].value))
    return guarded


def apiProblems(moduleDir):
    """Calls into Slicer/Qt the table does not know, or newer than the oldest supported Slicer without a guard."""
    problems = []
    for relative in SCANNED:
        path = Path(moduleDir) / relative
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded = _guardedNames(tree)
        seen = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            name = _dotted(node)
            if not name or not name.startswith(slicer_api.PREFIXES) or (name, node.lineno) in seen:
                continue
            seen.add((name, node.lineno))
            known = [api for api in slicer_api.APIS if api == name or api.startswith(name + ".")]
            if not known:
                if not any(name.startswith(api + ".") for api in slicer_api.APIS):
                    problems.append(f"{relative}:{node.lineno}: {name} is not in Testing/slicer_api.py: check it in "
                                    f"Slicer's source at the oldest supported release and add it")
                continue
            if name not in slicer_api.APIS:
                continue  # a prefix of known names (e.g. qt.QTimer of qt.QTimer.singleShot)
            since, _ = slicer_api.APIS[name]
            if since > slicer_api.OLDEST_SUPPORTED and not any(
                    first <= node.lineno <= last and guardName == name.split(".")[-1]
                    for first, last, guardName in guarded):
                problems.append(f"{relative}:{node.lineno}: {name} exists from Slicer {since[0]}.{since[1]} only: "
                                f"guard it with hasattr() and keep a fallback")
        for node in ast.walk(tree):  # the parameter node wrapper's methods
            if isinstance(node, ast.Attribute) and node.attr in slicer_api.WRAPPER_METHODS:
                since, _ = slicer_api.WRAPPER_METHODS[node.attr]
                if since > slicer_api.OLDEST_SUPPORTED:
                    problems.append(f"{relative}:{node.lineno}: .{node.attr}() behaves as needed from Slicer "
                                    f"{since[0]}.{since[1]} only ({slicer_api.WRAPPER_METHODS[node.attr][1]})")
    return problems


def ruleProblems(moduleDir):
    """The module's own rules derived from Slicer's behaviour."""
    moduleDir = Path(moduleDir)
    problems = []
    for relative in SCANNED:
        path = moduleDir / relative
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "tryWithErrorDisplay" and relative == "MRIHistoReg.py":
                problems.append(f"{relative}:{node.lineno}: slicer.util.tryWithErrorDisplay re-raises after showing "
                                f"the error (util.py): use panel.ActionRunner")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in OWNED_RESULT_CALLS and relative != OWNERSHIP_HELPERS):
                problems.append(f"{relative}:{node.lineno}: {node.func.attr}() returns a reference the caller owns: "
                                f"use context.nodesByClass / context.newStorageNode")
    root = ET.parse(moduleDir / "Resources" / "UI" / "MRIHistoReg.ui").getroot()
    for widget in root.iter("widget"):
        props = {p.get("name"): p for p in widget.findall("property")}
        if widget.get("class") == "qMRMLNodeComboBox":
            show = props.get("showChildNodeTypes")
            if show is not None and show.findtext("bool") == "false":
                problems.append(f"{widget.get('name')}: showChildNodeTypes=false hides every subclass (grid and "
                                f"B-spline transforms, vector volumes): use hideChildNodeTypes for exclusions")
        if widget.get("class") == "ctkPathLineEdit" and "SlicerParameterName" in props and "nameFilters" in props:
            problems.append(f"{widget.get('name')}: with nameFilters, ctkPathLineEdit emits currentPathChanged only "
                            f"for matching text (case-sensitive), so folders and other names never reach the parameter")
    return problems


def selfTestProblems(moduleDir):
    """The self-test builds the panel (widget and parameter node) through Slicer, not only the logic."""
    tree = ast.parse((Path(moduleDir) / "MRIHistoReg.py").read_text(encoding="utf-8"))
    testClass = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Test"))
    source = ast.unparse(testClass)
    problems = []
    if "getModuleWidget" not in source:
        problems.append("the self-test never builds the module widget (slicer.util.getModuleWidget)")
    if "getParameterNode" not in source or "panelScenario" not in source:
        problems.append("the self-test never builds the panel's parameter node (panelScenario with getParameterNode)")
    return problems


def test_every_slicer_api_exists_in_the_oldest_supported_slicer_or_is_guarded():
    assert apiProblems(MODULE_DIR) == []


def test_the_module_follows_the_rules_slicer_imposes():
    assert ruleProblems(MODULE_DIR) == []


def test_the_self_test_builds_the_panel():
    assert selfTestProblems(MODULE_DIR) == []


BROKEN = [
    # (checker, file, old, new, expected fragment)
    (apiProblems, "MRIHistoReg.py", 'if hasattr(SampleData.SampleDataLogic, "registerCustomSampleDataCategory"):\n        ',
     "if True:\n        ", "registerCustomSampleDataCategory exists from Slicer 5.12 only"),
    (apiProblems, "MRIHistoReg.py", "slicer.util.showStatusMessage(message, 3000)",
     "slicer.util.showStatusMessageLater(message, 3000)", "showStatusMessageLater is not in Testing/slicer_api.py"),
    (apiProblems, "MRIHistoReg.py", "connectParametersToGui(self._parameterWidgets)", "connectGui(self.ui)",
     ".connectGui() behaves as needed from Slicer 5.10 only"),
    (ruleProblems, "MRIHistoReg.py", "        return self._runner.action(errorMessage, progressTitle)",
     "        return slicer.util.tryWithErrorDisplay(errorMessage)", "tryWithErrorDisplay re-raises"),
    (ruleProblems, "MRIHistoRegLib/logic.py", 'context.nodesByClass(self.scene, "vtkMRMLSliceCompositeNode")',
     'self.scene.GetNodesByClass("vtkMRMLSliceCompositeNode")', "GetNodesByClass() returns a reference"),
    (ruleProblems, "Resources/UI/MRIHistoReg.ui", '<property name="showChildNodeTypes"><bool>true</bool></property>',
     '<property name="showChildNodeTypes"><bool>false</bool></property>', "showChildNodeTypes=false hides"),
    (ruleProblems, "Resources/UI/MRIHistoReg.ui", '<property name="SlicerParameterName" stdset="0"><string>stackPath',
     '<property name="nameFilters"><stringlist notr="true"><string>Stacks (*.tif)</string></stringlist></property>'
     '<property name="SlicerParameterName" stdset="0"><string>stackPath', "with nameFilters, ctkPathLineEdit"),
    (selfTestProblems, "MRIHistoReg.py", "slicer.util.getModuleWidget(", "slicer.util.getModuleLogic(",
     "never builds the module widget"),
]


@pytest.mark.parametrize("checker, relative, old, new, expected", BROKEN, ids=[b[4][:40] for b in BROKEN])
def test_checkers_reject_a_broken_copy(tmp_path, checker, relative, old, new, expected):
    copy = tmp_path / "MRIHistoReg"
    shutil.copytree(MODULE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert checker(copy) == [], "the unbroken copy must pass"
    path = copy / relative
    text = path.read_text(encoding="utf-8")
    assert old in text, f"test setup: {old!r} not in {relative}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    problems = checker(copy)
    assert any(expected in p for p in problems), f"expected {expected!r} in {problems}"


def test_every_python_file_runs_on_python_3_9(tmp_path):
    """Slicer 5.8 bundles Python 3.9.10 (CMakeLists.txt at v5.8.1): vermin, an independent tool, finds the minimum
    version each file needs (syntax, standard library, annotations evaluated at run time)."""
    import subprocess
    import sys

    files = [str(MODULE_DIR / f) for f in SCANNED]

    def violations(paths):
        result = subprocess.run([str(Path(sys.executable).parent / "vermin"), "-t=3.9-", "--violations", "--eval-annotations",
                                 "--no-tips", "--no-parse-comments", *paths], capture_output=True, text=True)
        return result.returncode, result.stdout + result.stderr

    code, output = violations(files)
    assert code == 0, output
    broken = tmp_path / "broken.py"
    broken.write_text("from typing import Optional\n\ndef f(x: int | None) -> None:\n    match x:\n        case _:\n"
                      "            pass\n", encoding="utf-8")
    code, output = violations([str(broken)])
    assert code != 0 and re.search(r"3\.10", output), output


# ------------------------------------------------------------------------------------ extension metadata
TEMPLATE_CMAKE_RANGES = {(5, 8): ((3, 16, 3), (3, 19, 7)), (5, 10): ((3, 20, 6), (3, 22, 6)), (5, 12): ((3, 28, 0), (3, 28, 0))}
# Utilities/Templates/Extensions/Default/CMakeLists.txt at v5.8.1, v5.10.0, v5.12.3 (main as 5.12)
TEMPLATE_VARIABLES = ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                      "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS")
# Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json: required keys, every allowed key and its type
CATALOG_REQUIRED = ("$schema", "category", "scm_url")
CATALOG_TYPES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                 "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}


def extensionMetadataProblems(repoRoot):
    import json

    repoRoot = Path(repoRoot)
    text = (repoRoot / "CMakeLists.txt").read_text(encoding="utf-8")
    problems = []
    match = re.search(r"cmake_minimum_required\(VERSION\s+([\d.]+)\.\.\.([\d.]+)", text)
    if not match:
        problems.append("CMakeLists.txt: cmake_minimum_required(VERSION min...max) range missing")
    else:
        low, high = (tuple(int(v) for v in g.split(".")) for g in match.groups())
        for release, (floor, policies) in TEMPLATE_CMAKE_RANGES.items():
            if low > floor:
                problems.append(f"CMakeLists.txt: CMake {match.group(1)} is newer than Slicer {release}'s template floor")
        if high < max(p for _, p in TEMPLATE_CMAKE_RANGES.values()):
            problems.append("CMakeLists.txt: the policy version is older than the current template's")
    for variable in TEMPLATE_VARIABLES:
        if not re.search(r"set\(\s*" + variable + r"\s", text):
            problems.append(f"CMakeLists.txt: {variable} is not set")
    if re.search(r"set\(\s*EXTENSION_CATEGORY\s", text):
        problems.append("CMakeLists.txt sets EXTENSION_CATEGORY: the catalog entry's category is used instead")
    if "Slicer 5.8" not in text:
        problems.append("CMakeLists.txt: EXTENSION_DESCRIPTION does not name the oldest supported Slicer (5.8)")
    entry = json.loads((repoRoot / "Resources" / "MRIHistoReg.json").read_text(encoding="utf-8"))
    for key in CATALOG_REQUIRED:
        if key not in entry:
            problems.append(f"catalog entry: '{key}' is required")
    for key, value in entry.items():
        if key not in CATALOG_TYPES:
            problems.append(f"catalog entry: '{key}' is not allowed (additionalProperties: false)")
        elif not isinstance(value, CATALOG_TYPES[key]):
            problems.append(f"catalog entry: '{key}' must be a {CATALOG_TYPES[key].__name__}")
    module = (repoRoot / "MRIHistoReg" / "MRIHistoReg.py").read_text(encoding="utf-8")
    category = entry.get("category")
    if f'translate("qSlicerAbstractCoreModule", "{category}")' not in module:
        problems.append(f"catalog category {category!r} is not the module's category")
    return problems


def test_extension_metadata_follows_the_current_template_and_catalog_schema():
    assert extensionMetadataProblems(REPO) == []


def test_metadata_checker_rejects_a_broken_copy(tmp_path):
    for name in ("CMakeLists.txt", "Resources/MRIHistoReg.json", "MRIHistoReg/MRIHistoReg.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    assert extensionMetadataProblems(tmp_path) == []
    cmake = tmp_path / "CMakeLists.txt"
    cmake.write_text(cmake.read_text().replace("3.16.3...3.28.0", "3.20.6...3.28.0") +
                     'set(EXTENSION_CATEGORY "Registration")\n')
    entry = tmp_path / "Resources" / "MRIHistoReg.json"
    entry.write_text(entry.read_text().replace('"tier": 1', '"tier": "1", "s4ext": true'))
    problems = " | ".join(extensionMetadataProblems(tmp_path))
    for fragment in ("newer than Slicer (5, 8)", "sets EXTENSION_CATEGORY", "'tier' must be a int", "'s4ext' is not allowed"):
        assert fragment in problems, problems
