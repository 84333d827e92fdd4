"""Static contract for the results crossing the widget/logic boundary, checked without Slicer (no Qt here).

Every logic method the widget (MRIHistoReg.py) reads a result from returns a dataclass. This checker parses the
widget with `ast`, finds each variable bound to a logic call (`result = self.logic.fitLandmarks(...)`, also
`logic = MRIHistoRegLogic()` then `nodes = logic.loadSampleData(...)`), and checks every `result.<attr>` the same
function reads against the fields of the dataclass named by the method's return annotation (Optional unwrapped).
A string-keyed read (`result["transformNode"]`, `result.get("x")`) on a logic result is a problem too: that is the
kind of access no test can check. The broken-copy tests show the checker rejects a misspelt attribute.
"""
import ast
import dataclasses
import typing
from pathlib import Path

import pytest

WIDGET = Path(__file__).resolve().parents[1] / "MRIHistoReg" / "MRIHistoReg.py"
LOGIC_FACTORIES = {"MRIHistoRegLogic", "MRIHistoRegLogicCore"}  # `logic = MRIHistoRegLogic()` in module functions


def _logicCallMethod(node, logicNames):
    """The facade method name when `node` is `self.logic.<m>(...)` or `<logicName>.<m>(...)`, else None."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return None
    owner = node.func.value
    isSelfLogic = (isinstance(owner, ast.Attribute) and owner.attr == "logic"
                   and isinstance(owner.value, ast.Name) and owner.value.id == "self")
    isLocalLogic = isinstance(owner, ast.Name) and owner.id in logicNames
    return node.func.attr if (isSelfLogic or isLocalLogic) else None


def _functionResultBindings(function):
    """{variable: (method, line)} for the variables of `function` bound to a logic call's result."""
    logicNames, bound = set(), {}
    for node in ast.walk(function):
        if not isinstance(node, ast.Assign) or len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name):
            continue
        name, value = node.targets[0].id, node.value
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in LOGIC_FACTORIES:
            logicNames.add(name)
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            method = _logicCallMethod(node.value, logicNames)
            if method is not None:
                bound[node.targets[0].id] = (method, node.lineno)
    return bound


def resultReads(source):
    """[(method, variable, attribute or '["key"]', line)] for every read of a logic result in `source`."""
    reads = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        bound = _functionResultBindings(function)
        for node in ast.walk(function):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
                reads.append((bound[node.value.id][0], node.value.id, node.attr, node.lineno))
            elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in bound:
                reads.append((bound[node.value.id][0], node.value.id, "[...]", node.lineno))
    return reads


def _resultClass(logicClass, method):
    """The dataclass `method` returns (its return annotation, Optional[...] unwrapped), or None."""
    function = getattr(logicClass, method, None)
    if function is None:
        return None
    annotation = typing.get_type_hints(function).get("return")
    if typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else None
    return annotation if dataclasses.is_dataclass(annotation) else None


def checkResultReads(source, logicClass):
    """Problems (strings) with the widget's reads of logic results; [] when each is a field of the returned dataclass."""
    problems = []
    for method, variable, attribute, line in resultReads(source):
        if attribute in ("get", "[...]"):
            problems.append(f"line {line}: {variable} (from logic.{method}) is read by string key: return a dataclass")
            continue
        resultClass = _resultClass(logicClass, method)
        if resultClass is None:
            problems.append(f"line {line}: logic.{method} is not annotated to return a dataclass, "
                            f"but the widget reads {variable}.{attribute}")
        elif attribute not in {f.name for f in dataclasses.fields(resultClass)}:
            problems.append(f"line {line}: {variable}.{attribute} is not a field of {resultClass.__name__} "
                            f"(returned by logic.{method})")
    return problems


def _facade():
    from MRIHistoRegLib.logic import MRIHistoRegLogicCore

    return MRIHistoRegLogicCore


def test_every_result_the_widget_reads_is_a_dataclass_field():
    source = WIDGET.read_text(encoding="utf-8")
    reads = resultReads(source)
    methods = {method for method, *_ in reads}
    # the checker sees the results the panel actually uses (a parser that finds nothing would pass vacuously)
    assert {"fitLandmarks", "setAutoUpdate", "refineRegistration", "compareLabels", "loadSampleData",
            "openStack"} <= methods, methods
    problems = checkResultReads(source, _facade())
    assert problems == [], "\n".join(problems)


BROKEN = [
    # (old, new, expected problem fragment)
    ("p.landmarkTransform = result.transformNode", "p.landmarkTransform = result.transform",
     "result.transform is not a field of LandmarkFitResult"),
    ("if result.accepted:", "if result.isAccepted:", "result.isAccepted is not a field of RefinementOutcome"),
    ("p.resultsTable = result.tableNode", 'p.resultsTable = result["tableNode"]', "read by string key"),
    ("nodes.transformNode, nodes.tableNode", "nodes.transformNode, nodes.table", "nodes.table is not a field of LiveFitNodes"),
    ("background=nodes.mri, foreground=nodes.histology, foregroundOpacity=0.5,\n",
     "background=nodes.mriVolume, foreground=nodes.histology, foregroundOpacity=0.5,\n",
     "nodes.mriVolume is not a field of SampleNodes"),
    ("p.histologyChannel < len(info.channelNames)", "p.histologyChannel < len(info.channels)",
     "info.channels is not a field of StackInfo"),
]


@pytest.mark.parametrize("old, new, expected", BROKEN)
def test_checker_rejects_a_broken_copy_of_the_widget(old, new, expected):
    source = WIDGET.read_text(encoding="utf-8")
    assert old in source, f"broken-copy setup: {old!r} not found in {WIDGET.name}"
    problems = checkResultReads(source.replace(old, new, 1), _facade())
    assert any(expected in problem for problem in problems), problems


def test_checker_rejects_a_result_method_without_a_dataclass_annotation():
    class Facade:
        def fitLandmarks(self) -> dict:
            return {}

    source = "def onFit(self):\n    result = self.logic.fitLandmarks()\n    return result.transformNode\n"
    problems = checkResultReads(source, Facade)
    assert problems and "not annotated to return a dataclass" in problems[0], problems
