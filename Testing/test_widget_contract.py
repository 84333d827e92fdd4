"""Static contract between the module panel's parts, checked without Slicer (no Qt here):

- every `self.ui.<name>` the widget code uses exists in MRIHistoReg.ui, with a class that supports the way it is
  used (attribute, method or signal);
- every SlicerParameterName in the .ui is a field of the @parameterNodeWrapper class, with a type the widget's
  class can represent (the pairs Slicer's parameterNodeWrapper GUI connectors accept, including their extra
  requirements: a str combo box needs Choice, a ctkSliderWidget a bounded range, a push button must be checkable);
- every `self.logic.<method>(...)` call exists on the logic facade and binds to its signature, and a call of a
  method that opens the stack (one with a `channel` parameter) passes `channel=` explicitly, so no action reads
  another channel than the one the panel's selector chose;
- the .ui declares every non-Qt class in <customwidgets> and connects the top-level qMRMLWidget's
  mrmlSceneChanged(vtkMRMLScene*) to setMRMLScene(vtkMRMLScene*) of every MRML widget;
- MRIHistoReg/CMakeLists.txt lists every script and resource (unlisted = not packaged), WITH_GENERIC_TESTS and the
  Python unittest;
- the module's test class calls exactly the shared scenarios, one per test_* method, and runTest runs them all;
- the top-level CMakeLists.txt's icon and screenshot URLs name files the repository tracks.

The checker returns a list of problems; the drift tests run it on deliberately broken copies to show it fails.
"""
import ast
import inspect
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "MRIHistoReg"

# Widget class families (Qt and the CTK/MRML classes Slicer's designer plugins provide).
BUTTONS = {"QPushButton", "QToolButton", "ctkPushButton", "ctkCheckablePushButton", "ctkMenuButton"}
CHECKABLE = {"QCheckBox", "ctkCheckBox", "QRadioButton"}
DOUBLE_VALUE = {"QDoubleSpinBox", "ctkDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider", "qMRMLSpinBox"}
INT_VALUE = {"QSpinBox", "QSlider"}
COMBOS = {"QComboBox", "ctkComboBox"}
PATHS = {"ctkPathLineEdit", "ctkDirectoryButton"}
ANY = None  # any QWidget

# How the widget code may use a widget: attribute or method -> classes supporting it.
USAGE = {
    "enabled": ANY, "toolTip": ANY, "visible": ANY, "setVisible": ANY, "blockSignals": ANY, "setEnabled": ANY,
    "setToolTip": ANY, "show": ANY, "hide": ANY,
    "text": BUTTONS | CHECKABLE | {"QLabel", "QLineEdit"},
    "setText": BUTTONS | CHECKABLE | {"QLabel", "QLineEdit"},
    "checked": BUTTONS | CHECKABLE | {"ctkCollapsibleButton", "QGroupBox", "ctkCollapsibleGroupBox"},
    "click": BUTTONS | CHECKABLE,
    "value": DOUBLE_VALUE | INT_VALUE,
    "currentNode": {"qMRMLNodeComboBox"}, "setCurrentNode": {"qMRMLNodeComboBox"},
    "currentNodeID": {"qMRMLNodeComboBox"}, "setCurrentNodeID": {"qMRMLNodeComboBox"},
    "setMRMLTableNode": {"qMRMLTableView"}, "mrmlTableNode": {"qMRMLTableView"}, "setMRMLScene": {"qMRMLNodeComboBox", "qMRMLTableView", "qMRMLSubjectHierarchyComboBox"},
    "currentPath": PATHS - {"ctkDirectoryButton"}, "directory": {"ctkDirectoryButton"},
    "currentText": COMBOS, "currentIndex": COMBOS,
    # QComboBox.clear() / addItem(str), as Slicer's own QComboBoxToStringableConnector fills a combo box
    # (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py at v5.8.1 and v5.12.3)
    "clear": COMBOS, "addItem": COMBOS,
    "collapsed": {"ctkCollapsibleButton", "ctkCollapsibleGroupBox"},
}
SIGNALS = {
    "clicked()": BUTTONS | CHECKABLE, "clicked(bool)": BUTTONS | CHECKABLE, "toggled(bool)": BUTTONS | CHECKABLE,
    "currentNodeChanged(vtkMRMLNode*)": {"qMRMLNodeComboBox"},
    "valueChanged(double)": DOUBLE_VALUE, "valueChanged(int)": INT_VALUE,
    "currentIndexChanged(int)": COMBOS, "currentPathChanged(QString)": {"ctkPathLineEdit"},
    "directoryChanged(QString)": {"ctkDirectoryButton"}, "contentsCollapsed(bool)": {"ctkCollapsibleButton"},
}
# Signals/uses that need the .ui to make the button checkable.
NEEDS_CHECKABLE = {"toggled(bool)", "checked"}

# Parameter type -> widget classes a parameterNodeWrapper GUI connector accepts at the OLDEST supported Slicer
# (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py at v5.8.1; canRepresent compares the exact widget
# class). Later releases add ctkCheckablePushButton for bool and float widgets for int (5.10): not usable here.
CONNECTORS = {
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton"},
    "int": INT_VALUE | COMBOS,
    "float": DOUBLE_VALUE | COMBOS,
    "str": {"QLineEdit", "QLabel", "QTextEdit"} | COMBOS,
    "Path": PATHS,
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}
NODE_TYPE = re.compile(r"^vtkMRML\w+Node$")


# ------------------------------------------------------------------------------------------------ parsing
def parseUi(uiPath):
    root = ET.parse(uiPath).getroot()
    top = root.find("widget")
    widgets, params = {}, {}
    for element in root.iter("widget"):
        name, cls = element.get("name"), element.get("class")
        widgets[name] = {"class": cls, "props": {}}
        for prop in element.findall("property"):
            value = prop[0] if len(prop) else None
            text = value.text if value is not None else None
            widgets[name]["props"][prop.get("name")] = text
            if prop.get("name") == "SlicerParameterName":
                params.setdefault(text, []).append(name)
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    connections = [(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
                   for c in root.iter("connection")]
    return {"top": top.get("name"), "topClass": top.get("class"), "widgets": widgets, "params": params,
            "custom": custom, "connections": connections}


def _classDefs(tree):
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _decoratorNames(classDef):
    return {d.id if isinstance(d, ast.Name) else getattr(d, "attr", None) for d in classDef.decorator_list}


def _baseNames(classDef):
    return {b.id if isinstance(b, ast.Name) else getattr(b, "attr", None) for b in classDef.bases}


def _typeKind(annotation):
    """(kind, hasChoice, bounded) of a parameter annotation: kind in bool/int/float/str/Path/node/enum/other."""
    if isinstance(annotation, ast.Subscript):
        outer = ast.unparse(annotation.value)
        inner = annotation.slice
        elements = list(inner.elts) if isinstance(inner, ast.Tuple) else [inner]
        if outer.endswith("Annotated"):
            kind, _, _ = _typeKind(elements[0])
            extras = [ast.unparse(e) for e in elements[1:]]
            return (kind, any(e.startswith("Choice(") for e in extras),
                    any(e.startswith("WithinRange(") for e in extras) or
                    (any(e.startswith("Minimum(") for e in extras) and any(e.startswith("Maximum(") for e in extras)))
        if outer.endswith(("Union", "Optional")):
            kinds = {_typeKind(e)[0] for e in elements if ast.unparse(e) != "None"}
            return (kinds.pop() if len(kinds) == 1 else "other"), False, False
        return "other", False, False
    name = ast.unparse(annotation).split(".")[-1]
    if name in ("bool", "int", "float", "str"):
        return name, False, False
    if name in ("Path", "PosixPath", "WindowsPath"):
        return "Path", False, False
    if NODE_TYPE.match(name):
        return "node", False, False
    return "other", False, False


def parseModule(modulePath):
    tree = ast.parse(Path(modulePath).read_text(encoding="utf-8"))
    classes = _classDefs(tree)
    parameterClass = next((c for c in classes.values() if "parameterNodeWrapper" in _decoratorNames(c)), None)
    fields = {}
    if parameterClass is not None:
        for statement in parameterClass.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                fields[statement.target.id] = _typeKind(statement.annotation)
    widgetClass = next((c for c in classes.values() if "ScriptedLoadableModuleWidget" in _baseNames(c)), None)
    logicClass = next((c for c in classes.values() if "ScriptedLoadableModuleLogic" in _baseNames(c)), None)
    testClass = next((c for c in classes.values() if "ScriptedLoadableModuleTest" in _baseNames(c)), None)
    return {"tree": tree, "fields": fields, "parameterClass": parameterClass, "widgetClass": widgetClass,
            "logicClass": logicClass, "testClass": testClass}


def _isSelfAttr(node, attr):
    return (isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name)
            and node.value.id == "self")


def uiUses(widgetClass):
    """[(widgetName, use, signal, line)] for every `self.ui.<name>.<use>` in the widget class."""
    uses = []
    parents = {}
    for node in ast.walk(widgetClass):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(widgetClass):
        if isinstance(node, ast.Attribute) and _isSelfAttr(node.value, "ui"):
            parent = parents.get(node)
            use = parent.attr if isinstance(parent, ast.Attribute) and parent.value is node else None
            signal = None
            if use == "connect":
                call = parents.get(parent)
                if isinstance(call, ast.Call) and call.args and isinstance(call.args[0], ast.Constant):
                    signal = call.args[0].value
            uses.append((node.attr, use, signal, node.lineno))
    return uses


def logicUses(widgetClass):
    """[(method, call or None, line)] for every `self.logic.<method>` in the widget class."""
    parents = {}
    for node in ast.walk(widgetClass):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    uses = []
    for node in ast.walk(widgetClass):
        if isinstance(node, ast.Attribute) and _isSelfAttr(node.value, "logic"):
            parent = parents.get(node)
            call = parent if isinstance(parent, ast.Call) and parent.func is node else None
            uses.append((node.attr, call, node.lineno))
    return uses


def _signatureFromAst(functionDef):
    """inspect.Signature of a method parsed from source (self dropped)."""
    args = functionDef.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    parameters = []
    for arg, default in list(zip(positional, defaults))[1:]:
        parameters.append(inspect.Parameter(arg.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            default=inspect.Parameter.empty if default is None else 0))
    if args.vararg:
        parameters.append(inspect.Parameter(args.vararg.arg, inspect.Parameter.VAR_POSITIONAL))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        parameters.append(inspect.Parameter(arg.arg, inspect.Parameter.KEYWORD_ONLY,
                                            default=inspect.Parameter.empty if default is None else 0))
    if args.kwarg:
        parameters.append(inspect.Parameter(args.kwarg.arg, inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(parameters)


def parseCMake(cmakePath):
    text = Path(cmakePath).read_text(encoding="utf-8")

    def listing(variable):
        match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
        if not match:
            return []
        return [item.replace("${MODULE_NAME}", "MRIHistoReg") for item in match.group(1).split()]

    return {"text": text, "scripts": listing("MODULE_PYTHON_SCRIPTS"), "resources": listing("MODULE_PYTHON_RESOURCES")}


def _trackedLibScripts(moduleDir):
    """MRIHistoRegLib/*.py known to git (what a clone packages); the folder's files outside a git checkout."""
    libDir = Path(moduleDir) / "MRIHistoRegLib"
    try:
        output = subprocess.run(["git", "ls-files", "--", "*.py"], cwd=libDir, capture_output=True, text=True,
                                check=True).stdout.split()
        names = set(output)  # sub-packages too (stacks/...): a module missing there breaks its package in Slicer
        if names:
            return names
    except (OSError, subprocess.CalledProcessError):
        pass
    return {p.relative_to(libDir).as_posix() for p in libDir.rglob("*.py")}


def handlerProblems(widgetClass):
    """connect(signal, self.<handler>) where the widget class defines no <handler>."""
    methods = {n.name for n in widgetClass.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    problems = []
    for node in ast.walk(widgetClass):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
                and len(node.args) >= 2):
            target = node.args[1]
            if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
                    and target.attr not in methods):
                problems.append(f"line {node.lineno}: connect(..., self.{target.attr}): the widget has no method "
                                f"{target.attr}")
    return problems


def _isParameterNode(expression, aliases):
    if isinstance(expression, ast.Name):
        return expression.id in aliases
    return (isinstance(expression, ast.Attribute) and expression.attr == "_parameterNode"
            and isinstance(expression.value, ast.Name) and expression.value.id == "self")


def parameterAttributeProblems(widgetClass, fields):
    """p.<name> / self._parameterNode.<name> where <name> is neither a field of the parameter node class nor one
    of the wrapper's own names (slicer_rules.RESERVED_NAMES): the wrapper raises AttributeError on it."""
    from slicer_rules import RESERVED_NAMES

    problems = []
    for function in (n for n in widgetClass.body if isinstance(n, ast.FunctionDef)):
        aliases = {target.id for node in ast.walk(function) if isinstance(node, ast.Assign)
                   and _isParameterNode(node.value, set()) for target in node.targets if isinstance(target, ast.Name)}
        for node in ast.walk(function):
            if (isinstance(node, ast.Attribute) and _isParameterNode(node.value, aliases)
                    and node.attr not in fields and node.attr not in RESERVED_NAMES):
                problems.append(f"line {node.lineno}: the parameter node has no field {node.attr!r}")
    return problems


# ------------------------------------------------------------------------------------------------ checker
def checkContract(moduleDir, logicClass, scenarioNames, libScripts=None):
    """All contract problems (strings) of the module folder `moduleDir` against the facade `logicClass`.
    libScripts: the MRIHistoRegLib/*.py names that must be packaged (default: those git tracks there)."""
    moduleDir = Path(moduleDir)
    problems = []
    ui = parseUi(moduleDir / "Resources" / "UI" / "MRIHistoReg.ui")
    module = parseModule(moduleDir / "MRIHistoReg.py")
    widgets = ui["widgets"]

    # 1. widgets the code uses exist, with a class supporting the use
    if module["widgetClass"] is None:
        problems.append("MRIHistoReg.py has no ScriptedLoadableModuleWidget subclass")
    else:
        for name, use, signal, line in uiUses(module["widgetClass"]):
            if name not in widgets:
                problems.append(f"line {line}: self.ui.{name} is not a widget in MRIHistoReg.ui")
                continue
            cls = widgets[name]["class"]
            if use == "connect":
                allowed = SIGNALS.get(signal, set())
                if cls not in allowed:
                    problems.append(f"line {line}: self.ui.{name} ({cls}) has no signal {signal!r} the contract knows")
                key = signal
            elif use is None:
                continue  # passed as a whole (e.g. to a helper)
            elif use not in USAGE:
                problems.append(f"line {line}: self.ui.{name}.{use}: use not in the contract table (add it to USAGE)")
                continue
            else:
                allowed = USAGE[use]
                if allowed is not ANY and cls not in allowed:
                    problems.append(f"line {line}: self.ui.{name}.{use} but {name} is a {cls}")
                key = use
            if key in NEEDS_CHECKABLE and cls in BUTTONS and widgets[name]["props"].get("checkable") != "true":
                problems.append(f"line {line}: self.ui.{name} is used as checkable ({key}) but is not checkable in the .ui")

    # 1b. every connected handler is a method of the widget (Slicer would raise AttributeError in setup())
    if module["widgetClass"] is not None:
        problems += handlerProblems(module["widgetClass"])
        # 1c. every attribute read or written on the parameter node is one of its fields (or the wrapper's own)
        problems += parameterAttributeProblems(module["widgetClass"], set(module["fields"]))

    # 2. parameter names match fields of the parameter node class, with a connector for the pair
    if module["parameterClass"] is None:
        problems.append("MRIHistoReg.py has no @parameterNodeWrapper class")
    for param, names in ui["params"].items():
        if len(names) > 1:
            problems.append(f"SlicerParameterName {param!r} is on several widgets: {names}")
        if param not in module["fields"]:
            problems.append(f"SlicerParameterName {param!r} ({names[0]}) is not a field of the parameter node class")
            continue
        kind, hasChoice, bounded = module["fields"][param]
        cls = widgets[names[0]]["class"]
        if cls not in CONNECTORS.get(kind, set()):
            problems.append(f"parameter {param!r} ({kind}) cannot be bound to {names[0]} ({cls}): no GUI connector")
        if cls in COMBOS and kind in ("str", "int", "float") and not hasChoice:
            problems.append(f"parameter {param!r} on combo box {names[0]} needs a Choice annotation")
        if cls in ("ctkSliderWidget", "qMRMLSliderWidget") and not bounded:
            problems.append(f"parameter {param!r} on slider {names[0]} needs WithinRange (or Minimum and Maximum)")
        if cls == "QPushButton" and widgets[names[0]]["props"].get("checkable") != "true":
            problems.append(f"parameter {param!r} on push button {names[0]} needs a checkable button")

    # 3. logic calls exist and bind
    ownMethods = {}
    if module["logicClass"] is not None:
        ownMethods = {f.name: f for f in module["logicClass"].body if isinstance(f, ast.FunctionDef)}
    if module["widgetClass"] is not None:
        for method, call, line in logicUses(module["widgetClass"]):
            if method in ownMethods:
                signature = _signatureFromAst(ownMethods[method])
            elif hasattr(logicClass, method):
                attribute = inspect.getattr_static(logicClass, method)
                if isinstance(attribute, property):
                    if call is not None:
                        problems.append(f"line {line}: self.logic.{method} is a property, not a method")
                    continue
                function = getattr(logicClass, method)
                signature = inspect.signature(function)
                if not isinstance(attribute, (staticmethod, classmethod)):
                    signature = signature.replace(parameters=list(signature.parameters.values())[1:])
            else:
                problems.append(f"line {line}: self.logic.{method} does not exist on {logicClass.__name__}")
                continue
            if call is None:
                continue
            if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
                continue  # *args / **kwargs: cannot bind statically
            try:
                signature.bind(*[None] * len(call.args), **{k.arg: None for k in call.keywords})
            except TypeError as error:
                problems.append(f"line {line}: self.logic.{method}(...) does not match {method}{signature}: {error}")
            if "channel" in signature.parameters and "channel" not in {k.arg for k in call.keywords}:
                problems.append(f"line {line}: self.logic.{method}(...) opens the stack without channel= (the "
                                f"registration channel the panel's selector chose)")

    # 4. custom widgets declared; MRML widgets get the scene
    for name, widget in widgets.items():
        cls = widget["class"]
        if not cls.startswith("Q") and cls not in ui["custom"]:
            problems.append(f"{name}: class {cls} is not declared in <customwidgets>")
    sceneReceivers = {receiver for sender, signal, receiver, slot in ui["connections"]
                      if sender == ui["top"] and signal == "mrmlSceneChanged(vtkMRMLScene*)"
                      and slot == "setMRMLScene(vtkMRMLScene*)"}
    if ui["topClass"] != "qMRMLWidget":
        problems.append(f"the .ui's top-level widget is a {ui['topClass']}, not a qMRMLWidget")
    for name, widget in widgets.items():
        if widget["class"].startswith("qMRML") and name != ui["top"] and name not in sceneReceivers:
            problems.append(f"{name} ({widget['class']}) does not receive mrmlSceneChanged -> setMRMLScene")

    # 5. CMake lists every script and resource
    cmake = parseCMake(moduleDir / "CMakeLists.txt")
    listed = set(cmake["scripts"])
    libScripts = _trackedLibScripts(moduleDir) if libScripts is None else libScripts
    expected = {"MRIHistoReg.py"} | {f"MRIHistoRegLib/{name}" for name in libScripts}
    for missing in sorted(expected - listed):
        problems.append(f"CMakeLists.txt: script {missing} is not listed in MODULE_PYTHON_SCRIPTS (it would not be packaged)")
    for item in cmake["scripts"] + cmake["resources"]:
        if not (moduleDir / item).is_file():
            problems.append(f"CMakeLists.txt lists {item}, which does not exist")
    resources = {str(p.relative_to(moduleDir)) for p in (moduleDir / "Resources").rglob("*") if p.is_file()}
    for missing in sorted(resources - set(cmake["resources"])):
        problems.append(f"CMakeLists.txt: resource {missing} is not listed in MODULE_PYTHON_RESOURCES")
    if "WITH_GENERIC_TESTS" not in cmake["text"]:
        problems.append("CMakeLists.txt: slicerMacroBuildScriptedModule without WITH_GENERIC_TESTS")
    if not re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", cmake["text"], re.S):
        problems.append("CMakeLists.txt: no slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py) under BUILD_TESTING")

    # 6a. `_` is slicer.i18n.tr in the module: assigning it anywhere would break the translations of that scope
    for node in ast.walk(module["tree"]):
        if isinstance(node, ast.Name) and node.id == "_" and isinstance(node.ctx, ast.Store):
            problems.append(f"line {node.lineno}: '_' is assigned, shadowing slicer.i18n.tr (use another name)")

    # 6. the test class calls exactly the scenarios, one per test_*, and runTest runs every test_*
    testClass = module["testClass"]
    if testClass is None:
        problems.append("MRIHistoReg.py has no ScriptedLoadableModuleTest subclass")
    else:
        methods = {f.name: f for f in testClass.body if isinstance(f, ast.FunctionDef)}
        called = []
        for name, function in methods.items():
            if not name.startswith("test_"):
                continue
            calls = [c.func.attr for c in ast.walk(function) if isinstance(c, ast.Call)
                     and isinstance(c.func, ast.Attribute) and isinstance(c.func.value, ast.Name) and c.func.value.id == "scenarios"]
            if len(calls) != 1:
                problems.append(f"{testClass.name}.{name} calls {len(calls)} scenario functions (expected exactly one)")
            called.extend(calls)
        for extra in sorted(set(called) - set(scenarioNames)):
            problems.append(f"{testClass.name} calls scenarios.{extra}, which is not in scenarios.SCENARIOS")
        for missing in sorted(set(scenarioNames) - set(called)):
            problems.append(f"{testClass.name} does not call scenarios.{missing}")
        if "runTest" not in methods or "setUp" not in methods:
            problems.append(f"{testClass.name} needs setUp (clearing the scene) and runTest")
        else:
            run = {n.attr for n in ast.walk(methods["runTest"]) if isinstance(n, ast.Attribute) and _isSelfAttr(n, n.attr)}
            for name in methods:
                if name.startswith("test_") and name not in run:
                    problems.append(f"{testClass.name}.runTest does not run {name}")
            setUpCalls = {ast.unparse(c.func) for c in ast.walk(methods["setUp"]) if isinstance(c, ast.Call)}
            if "slicer.mrmlScene.Clear" not in setUpCalls:
                problems.append(f"{testClass.name}.setUp does not clear the scene")
    return problems


# ------------------------------------------------------------------------------------------------ tests
def _facade():
    from MRIHistoRegLib.logic import MRIHistoRegLogicCore

    return MRIHistoRegLogicCore


def _scenarioNames():
    from MRIHistoRegLib import scenarios

    return [function.__name__ for function in scenarios.SCENARIOS]


def test_contract_holds():
    problems = checkContract(MODULE_DIR, _facade(), _scenarioNames())
    assert problems == [], "\n".join(problems)


def test_ui_is_designer_xml_with_the_six_sections_in_order():
    ui = parseUi(MODULE_DIR / "Resources" / "UI" / "MRIHistoReg.ui")
    root = ET.parse(MODULE_DIR / "Resources" / "UI" / "MRIHistoReg.ui").getroot()
    assert root.tag == "ui" and root.get("version") == "4.0" and root.findtext("class") == ui["top"]
    titles = [w.find("property[@name='text']/string").text for w in root.iter("widget") if w.get("class") == "ctkCollapsibleButton"]
    assert titles == ["Inputs", "Downsample", "Landmarks", "Refine", "Resample and compare", "Display"]


def test_parameter_fields_are_all_bound_or_known_outputs():
    """A field nobody binds is either an output node the code sets, or a leftover (state the panel cannot show)."""
    module = parseModule(MODULE_DIR / "MRIHistoReg.py")
    ui = parseUi(MODULE_DIR / "Resources" / "UI" / "MRIHistoReg.ui")
    source = (MODULE_DIR / "MRIHistoReg.py").read_text(encoding="utf-8")
    for field in module["fields"]:
        if field not in ui["params"]:
            assert re.search(r"\.\s*" + field + r"\s*=[^=]", source), f"field {field} is neither bound in the .ui nor set by the code"


def _copyModule(tmp_path):
    target = tmp_path / "MRIHistoReg"
    shutil.copytree(MODULE_DIR, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def _edit(path, old, new):
    text = path.read_text(encoding="utf-8")
    assert old in text, f"drift test setup: {old!r} not found in {path.name}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


DRIFTS = [
    # (file, old, new, expected problem fragment)
    ("Resources/UI/MRIHistoReg.ui", 'name="fitButton"', 'name="fitLandmarksButton"', "self.ui.fitButton is not a widget"),
    ("Resources/UI/MRIHistoReg.ui", "<string>tpsRegularization</string>", "<string>tpsSmoothing</string>",
     "'tpsSmoothing' (tpsRegularizationSpinBox) is not a field"),
    ("MRIHistoReg.py", "    autoUpdate: bool = False", "    autoUpdate: float = 0.0", "parameter 'autoUpdate' (float) cannot be bound"),
    ("MRIHistoReg.py", 'model: Annotated[str, Choice(list(MODELS))] = "affine+tps"', 'model: str = "affine+tps"', "needs a Choice annotation"),
    ("MRIHistoReg.py", "self.logic.nextPairLabel(p.mriLandmarks, p.histologyLandmarks)",
     "self.logic.nextPairLabel(p.mriLandmarks, p.histologyLandmarks, p.model)", "self.logic.nextPairLabel(...) does not match"),
    ("MRIHistoReg.py", "self.logic.describeFit(result)", "self.logic.describeResult(result)", "self.logic.describeResult does not exist"),
    ("MRIHistoReg.py", 'self.ui.placePairButton.connect("toggled(bool)"', 'self.ui.shrinkageLabel.connect("toggled(bool)"',
     "self.ui.shrinkageLabel (QLabel) has no signal 'toggled(bool)'"),
    ("Resources/UI/MRIHistoReg.ui", "<class>ctkPathLineEdit</class>", "<class>ctkPathLineEditX</class>",
     "class ctkPathLineEdit is not declared"),
    ("Resources/UI/MRIHistoReg.ui", "<receiver>mriSelector</receiver>", "<receiver>histologySelector</receiver>",
     "mriSelector (qMRMLNodeComboBox) does not receive mrmlSceneChanged"),
    ("CMakeLists.txt", "  MRIHistoRegLib/volumes.py\n", "", "script MRIHistoRegLib/volumes.py is not listed"),
    ("CMakeLists.txt", "  Resources/UI/${MODULE_NAME}.ui\n", "", "resource Resources/UI/MRIHistoReg.ui is not listed"),
    ("MRIHistoReg.py", "scenarios.landmarkFitScenario(", "scenarios.loadSampleScenario(", "does not call scenarios.landmarkFitScenario"),
    ("MRIHistoReg.py", "        stack = panel.inspectedStack(self._parameterNode, self._stackInfo)",
     "        stack = _ = panel.inspectedStack(self._parameterNode, self._stackInfo)", "shadowing slicer.i18n.tr"),
    # the channel selector (issue 14): a wrong signal, a missing or retyped widget, an action without the channel
    ("MRIHistoReg.py", 'self.ui.channelComboBox.connect("currentIndexChanged(int)"',
     'self.ui.channelComboBox.connect("currentChanged(int)"', "has no signal 'currentChanged(int)'"),
    ("Resources/UI/MRIHistoReg.ui", 'name="channelComboBox"', 'name="channelSelector"',
     "self.ui.channelComboBox is not a widget"),
    ("Resources/UI/MRIHistoReg.ui", '<widget class="QComboBox" name="channelComboBox">',
     '<widget class="QLabel" name="channelComboBox">', "self.ui.channelComboBox.addItem but channelComboBox is a QLabel"),
    ("MRIHistoReg.py", "cropRoi=p.cropRoi if p.cropEnabled else None, progress=progress,\n"
     "                                              channel=self._stackChannel())",
     "cropRoi=p.cropRoi if p.cropEnabled else None, progress=progress)",
     "self.logic.downsampleStack(...) opens the stack without channel="),
    ("MRIHistoReg.py", "                                                channel=self._stackChannel())\n            p.resampledVolume = node",
     "                                                )\n            p.resampledVolume = node",
     "self.logic.resampleHistology(...) opens the stack without channel="),
    ("MRIHistoReg.py", 'connect("currentIndexChanged(int)", self.onChannelChanged)',
     'connect("currentIndexChanged(int)", self.onChannelChangedX)', "the widget has no method onChannelChangedX"),
    ("MRIHistoReg.py", "others = p.resampleOtherChannels and", "others = p.resampleChannels and",
     "the parameter node has no field 'resampleChannels'"),
    ("Resources/UI/MRIHistoReg.ui", "<string>resampleOtherChannels</string>", "<string>resampleChannels</string>",
     "'resampleChannels' (resampleChannelsCheckBox) is not a field"),
]


@pytest.mark.parametrize("relative, old, new, expected", DRIFTS, ids=[d[3][:40] for d in DRIFTS])
def test_checker_catches_drift(tmp_path, relative, old, new, expected):
    copy = _copyModule(tmp_path)
    libScripts = _trackedLibScripts(MODULE_DIR)  # the copy is outside git: require what the repository tracks
    assert checkContract(copy, _facade(), _scenarioNames(), libScripts) == [], "the unbroken copy must pass"
    _edit(copy / relative, old, new)
    problems = checkContract(copy, _facade(), _scenarioNames(), libScripts)
    assert any(expected in problem for problem in problems), f"expected {expected!r} among {problems}"


def test_checker_catches_a_facade_signature_change(tmp_path):
    """The facade drifting (a parameter renamed) breaks the widget's keyword call."""
    facade = _facade()

    class Drifted(facade):
        def downsampleStack(self, path, targetSpacingMm, spacingMm=None, roi=None, name=None, progress=None):
            raise AssertionError("never called")

    problems = checkContract(MODULE_DIR, Drifted, _scenarioNames())
    assert any("self.logic.downsampleStack(...) does not match" in p for p in problems), problems

    class NoChannel(facade):  # a facade that lost its channel argument: the panel's channel= no longer binds
        def loadFullResolution(self, path, spacingMm=None, name=None, progress=None):
            raise AssertionError("never called")

    problems = checkContract(MODULE_DIR, NoChannel, _scenarioNames())
    assert any("self.logic.loadFullResolution(...) does not match" in p for p in problems), problems


# ------------------------------------------------------------------------------------ extension metadata URLs
def extensionUrlProblems(repoRoot, tracked=None):
    """Problems with the files the top-level CMakeLists.txt's EXTENSION_ICONURL / EXTENSION_SCREENSHOTURLS name:
    each URL must point into the repository's main branch ('.../main/<path>') and <path> must exist (and, when
    `tracked` is given, be among those git-tracked paths: an untracked file is not on GitHub)."""
    repoRoot = Path(repoRoot)
    text = (repoRoot / "CMakeLists.txt").read_text(encoding="utf-8")
    problems, urls = [], []
    for variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        match = re.search(r"set\(\s*" + variable + r'\s+"([^"]*)"', text)
        if not match or not match.group(1).split():
            problems.append(f"CMakeLists.txt: {variable} is not set")
            continue
        urls.extend((variable, url) for url in match.group(1).split())
    for variable, url in urls:
        if "/main/" not in url:
            problems.append(f"CMakeLists.txt: {variable} URL {url} does not point at the main branch ('/main/<path>')")
            continue
        relative = url.split("/main/", 1)[1]
        if not (repoRoot / relative).is_file():
            problems.append(f"CMakeLists.txt: {variable} names {relative}, which does not exist in the repository")
        elif tracked is not None and relative not in tracked:
            problems.append(f"CMakeLists.txt: {variable} names {relative}, which git does not track (not on GitHub)")
    return problems


def _trackedPaths(repoRoot):
    try:
        return set(subprocess.run(["git", "ls-files"], cwd=repoRoot, capture_output=True, text=True,
                                  check=True).stdout.split("\n")) - {""} or None
    except (OSError, subprocess.CalledProcessError):
        return None


def test_extension_icon_and_screenshot_urls_name_repository_files():
    problems = extensionUrlProblems(REPO, _trackedPaths(REPO))
    assert problems == [], "\n".join(problems)


def test_url_checker_catches_a_missing_file(tmp_path):
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    (tmp_path / "Resources" / "Screenshots").mkdir(parents=True)
    for name in ("MRIHistoReg.png", "Screenshots/overlay_axial.png", "Screenshots/landmark_errors.png"):
        (tmp_path / "Resources" / name).write_bytes(b"png")
    (tmp_path / "CMakeLists.txt").write_text(text, encoding="utf-8")
    assert extensionUrlProblems(tmp_path) == [], "the copy with every file must pass"
    (tmp_path / "CMakeLists.txt").write_text(text.replace("overlay_axial.png", "overlay_coronal.png"), encoding="utf-8")
    problems = extensionUrlProblems(tmp_path)
    assert any("Resources/Screenshots/overlay_coronal.png, which does not exist" in p for p in problems), problems
    assert any("not track" in p for p in extensionUrlProblems(tmp_path, tracked={"Resources/MRIHistoReg.png"})), "untracked"
