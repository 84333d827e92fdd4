"""Slicer's parameterNodeWrapper rules, written down as facts so the panel's parameter node class can be checked
and used without the Slicer application (which this machine does not have).

Read from Base/Python/slicer/parameterNodeWrapper/ at v5.8.1, v5.10.0, v5.12.x and main; the parts modelled
here are the same at every tag:
- wrapper.py: every annotated class attribute is a parameter; its default is the assigned value, else the
  serializer's default. Wrapping a parameter node (`MyParameterNode(scriptedModuleNode)`, what
  ScriptedLoadableModuleLogic.getParameterNode() is wrapped in) WRITES the default of every parameter the node
  does not hold yet, and a write runs the validators: a default that a validator or the serializer refuses
  raises there, in the widget's setup() and every enter().
- serializers.py: the serializer is chosen by the un-annotated type: bool, int, float, str, the pathlib types,
  any vtkMRMLNode subclass, typing.Union (Optional included) and None (plus enum, list, tuple, dict, Any and
  parameter packs, which this panel does not use and this model refuses). Defaults: False, 0, "",
  pathlib.Path() (= '.'), None for a node, None for Optional[X], the FIRST member's default for other unions.
  Node, str, bool and path serializers refuse None (validator NotNone), except a plain node type, whose
  IsInstance accepts None. A union writes a value through the first member whose serializer can take
  type(value) and whose validators accept it; with no None member, None is refused:
  "TypeError: Unable to write value 'None' of type '<class 'NoneType'>'".
- validators.py: Choice (value in choices), WithinRange (inclusive), Minimum, Maximum run on every write.
- guiConnectors.py: Decimals and SingleStep are GUI annotations (set the widget's decimals / singleStep), not
  validators; any other unknown annotation is only warned about ("Unused annotations").
- Docs/developer_guide/parameter_nodes/gui_connection.md: a node parameter bound to a qMRMLNodeComboBox is
  written `Optional[NodeType]` (the combo box can always hold None); the connector sets the combo box's
  nodeTypes from the annotation (util.getNodeTypes), so the .ui's nodeTypes are overridden.

`parameterNodeWrapper` below applies these rules and stores values in a real vtkMRMLScriptedModuleNode, so a
scene holding it can be saved and reloaded with slicer-core like Slicer saves the panel with the scene.
"""
import ast
import enum
import pathlib
import typing
from pathlib import Path

import slicer

PATH_TYPES = (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath, pathlib.PurePosixPath,
              pathlib.PureWindowsPath)


# ------------------------------------------------------------------------------------------- annotations
class Validator:
    def validate(self, value):
        raise NotImplementedError


class Choice(Validator):
    def __init__(self, choices):
        self.choices = choices

    def validate(self, value):
        if value not in self.choices:
            raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")


class WithinRange(Validator):
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


class Minimum(Validator):
    def __init__(self, minimum):
        self.minimum = minimum

    def validate(self, value):
        if value < self.minimum:
            raise ValueError(f"Value must be at least {self.minimum}, is {value}")


class Maximum(Validator):
    def __init__(self, maximum):
        self.maximum = maximum

    def validate(self, value):
        if value > self.maximum:
            raise ValueError(f"Value must be at most {self.maximum}, is {value}")


class NotNone(Validator):
    def validate(self, value):
        if value is None:
            raise ValueError("Value must not be None")


class IsInstance(Validator):
    def __init__(self, classtype):
        self.classtype = classtype

    def validate(self, value):
        if value is not None and not isinstance(value, self.classtype):
            raise TypeError(f"Value must be of type '{self.classtype}', is type '{type(value)}' value '{value}'")


class Decimals:
    """GUI annotation: the connector sets the spin box's / slider's `decimals`."""

    def __init__(self, value):
        self.value = value


class SingleStep:
    def __init__(self, value):
        self.value = value


def splitAnnotations(annotation):
    if typing.get_origin(annotation) is typing.Annotated:
        args = typing.get_args(annotation)
        return args[0], list(args[1:])
    return annotation, []


def isNodeType(type_) -> bool:
    return isinstance(type_, type) and issubclass(type_, slicer.vtkMRMLNode)


def isOptionalNode(type_) -> bool:
    """Optional[NodeType] or Optional[Union[NodeTypes...]]: only node types and None."""
    if typing.get_origin(type_) is not typing.Union:
        return False
    args = typing.get_args(type_)
    return type(None) in args and all(arg is type(None) or isNodeType(arg) for arg in args)


def nodeTypesOf(type_) -> tuple:
    """The class names a qMRMLNodeComboBox bound to this parameter offers (util.getNodeTypes)."""
    type_ = splitAnnotations(type_)[0]
    if isNodeType(type_):
        return (type_.__name__,)
    return tuple(arg.__name__ for arg in typing.get_args(type_) if isNodeType(arg))


# ------------------------------------------------------------------------------------------- serializers
class Serializer:
    def __init__(self, type_, default, validators, canTake):
        self.type, self._default, self.validators, self.canTake = type_, default, validators, canTake

    def default(self):
        return self._default

    def validate(self, value):
        for validator in self.validators:
            validator.validate(value)


class UnionSerializer:
    def __init__(self, type_, members):
        self.type, self.members = type_, members
        self.validators = []

    def default(self):
        args = typing.get_args(self.type)
        if len(args) == 2 and args[1] is type(None):
            return None
        return self.members[0].default()

    def validate(self, value):
        error = None
        for member in self.members:
            if member.canTake(type(value)):
                try:
                    member.validate(value)
                    return
                except Exception as exception:  # try the next member, as serializers.UnionSerializer does
                    error = exception
        if error is not None:
            raise error
        raise TypeError(f"Unable to write value '{value}' of type '{type(value)}'")


def createSerializer(annotation):
    """The serializer Slicer would choose for `annotation`, with its validators (Exception when there is none)."""
    type_, extras = splitAnnotations(annotation)
    validators = [e for e in extras if isinstance(e, Validator)]
    unknown = [e for e in extras if not isinstance(e, (Validator, Decimals, SingleStep))]
    if unknown:
        raise TypeError(f"annotations {unknown} are neither validators nor GUI annotations Slicer knows")
    if typing.get_origin(type_) is typing.Union:
        members = [createSerializer(arg) for arg in typing.get_args(type_)]
        serializer = UnionSerializer(type_, members)
        serializer.validators = validators
        return serializer
    if type_ is type(None):
        base = Serializer(type_, None, [], lambda t: t is type(None))
    elif type_ in (int, float):
        base = Serializer(type_, 0, [NotNone(), IsInstance((int, float) if type_ is float else int)],
                          lambda t: t in (int, float) if type_ is float else t is int)
    elif type_ is bool:
        base = Serializer(type_, False, [NotNone(), IsInstance(bool)], lambda t: t is bool)
    elif type_ is str:
        base = Serializer(type_, "", [NotNone(), IsInstance(str)], lambda t: t is str)
    elif type_ in PATH_TYPES:
        base = Serializer(type_, type_(), [NotNone(), IsInstance(type_)], lambda t: t in PATH_TYPES)
    elif isNodeType(type_):
        base = Serializer(type_, None, [IsInstance(type_)], isNodeType)
    elif isinstance(type_, type) and issubclass(type_, enum.Enum):
        raise TypeError(f"{type_}: enum parameters are not modelled here; add them from serializers.py")
    else:
        raise Exception(f"Unable to create serializer for type: {type_}")  # Slicer raises a bare Exception
    base.validators = base.validators + validators
    return base


# ------------------------------------------------------------------------------------------- the wrapper
def _encode(value):
    return "" if value is None else str(value)


class _WrappedParameterNode:
    """What Slicer's wrapper gives the panel: typed attributes backed by a vtkMRMLScriptedModuleNode."""

    def __init__(self, parameterNode):
        object.__setattr__(self, "parameterNode", parameterNode)
        for name, info in type(self)._parameters.items():
            if not parameterNode.GetParameterNames() or name not in parameterNode.GetParameterNames():
                self._write(name, info["default"])

    def _write(self, name, value):
        info = type(self)._parameters[name]
        info["serializer"].validate(value)
        node = self.parameterNode
        node.SetParameter(name, "" if isinstance(value, slicer.vtkMRMLNode) else _encode(value))
        if info["node"]:
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        info["cache"][id(node)] = value

    def __getattr__(self, name):
        parameters = type(self)._parameters
        if name not in parameters:
            raise AttributeError(name)
        info = parameters[name]
        if info["node"]:
            return self.parameterNode.GetNodeReference(name)
        text = self.parameterNode.GetParameter(name)
        type_ = splitAnnotations(info["annotation"])[0]
        if type_ is bool:
            return text == "True"
        if type_ in (int, float):
            return type_(text)
        if type_ in PATH_TYPES:
            return type_(text)
        return text

    def __setattr__(self, name, value):
        if name not in type(self)._parameters:
            raise AttributeError(f"{name} is not a parameter of {type(self).__name__}")
        self._write(name, value)

    def AddObserver(self, event, callback, priority=0.0):
        return self.parameterNode.AddObserver(event, callback, priority)

    def RemoveObserver(self, tag):
        self.parameterNode.RemoveObserver(tag)

    def Modified(self):
        self.parameterNode.Modified()


# Attributes the wrapper sets on the class or instance (wrapper.py _processClass, _initMethod): a parameter of that
# name raises "Cannot use reserved name" or is overwritten.
RESERVED_NAMES = ("allParameters", "default", "isCached", "dataType", "getValue", "setValue", "connectGui",
                  "connectParametersToGui", "disconnectGui", "StartModify", "EndModify", "AddObserver",
                  "RemoveObserver", "Modified", "parameterNode")


def parameterNodeWrapper(classtype):
    """Applies the rules above to `classtype` (raising as Slicer would) and returns a wrapper class."""
    hints = typing.get_type_hints(classtype, include_extras=True)
    parameters = {}
    for name, annotation in hints.items():
        if name in RESERVED_NAMES:
            raise ValueError(f"Cannot use reserved name '{name}' in a parameterNodeWrapper")
        serializer = createSerializer(annotation)
        default = classtype.__dict__.get(name, serializer.default())
        type_ = splitAnnotations(annotation)[0]
        isNode = isNodeType(type_) or (typing.get_origin(type_) is typing.Union
                                        and any(isNodeType(a) for a in typing.get_args(type_)))
        parameters[name] = {"annotation": annotation, "serializer": serializer, "default": default,
                            "node": isNode, "cache": {}}
    return type(classtype.__name__, (_WrappedParameterNode,), {"_parameters": parameters, "__doc__": classtype.__doc__})


def guidelineProblems(classtype) -> list:
    """Rules from Slicer's guide beyond what raises: node parameters are Optional[...]."""
    problems = []
    for name, annotation in typing.get_type_hints(classtype, include_extras=True).items():
        type_ = splitAnnotations(annotation)[0]
        nodeLike = isNodeType(type_) or (typing.get_origin(type_) is typing.Union
                                          and any(isNodeType(a) for a in typing.get_args(type_)))
        if nodeLike and not isOptionalNode(type_):
            problems.append(f"{name}: node parameters must be Optional[...] (gui_connection.md), got {type_}")
    return problems


# ------------------------------------------------------------------------------------------- loading
SLICER_APP_ONLY = ("slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule", "slicer.i18n", "slicer.util", "qt",
                   "ctk", "SampleData")


def parameterNodeClassSource(modulePath) -> typing.Tuple[str, str]:
    """(name, source) of the @parameterNodeWrapper class in a scripted module file, plus the imports it needs."""
    text = Path(modulePath).read_text(encoding="utf-8")
    tree = ast.parse(text)
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)
               and any(ast.unparse(d).endswith("parameterNodeWrapper") for d in node.decorator_list)]
    if len(classes) != 1:
        raise AssertionError(f"{modulePath}: expected one @parameterNodeWrapper class, found {len(classes)}")
    kept = []
    for node in imports:
        module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
        if module and not any(module == m or module.startswith(m + ".") for m in SLICER_APP_ONLY):
            kept.append(ast.unparse(node))
    return classes[0].name, "\n".join(kept) + "\n\n" + ast.unparse(classes[0])


def loadParameterNodeClass(modulePath):
    """The module's parameter node class, wrapped by the rules above (raises what Slicer would raise)."""
    name, source = parameterNodeClassSource(modulePath)
    namespace = {"parameterNodeWrapper": parameterNodeWrapper, "Choice": Choice, "WithinRange": WithinRange,
                 "Minimum": Minimum, "Maximum": Maximum, "Decimals": Decimals, "SingleStep": SingleStep}
    exec(compile(source, str(modulePath), "exec"), namespace)
    return namespace[name]


def rawParameterNodeClass(modulePath):
    """The module's parameter node class as written (not wrapped), for the guideline checks."""
    name, source = parameterNodeClassSource(modulePath)
    namespace = {"parameterNodeWrapper": lambda cls: cls, "Choice": Choice, "WithinRange": WithinRange,
                 "Minimum": Minimum, "Maximum": Maximum, "Decimals": Decimals, "SingleStep": SingleStep}
    exec(compile(source, str(modulePath), "exec"), namespace)
    return namespace[name]


def newParameterNode(scene, wrapperClass, moduleName="MRIHistoReg"):
    """A scripted module node in `scene`, wrapped like ScriptedLoadableModuleLogic.getParameterNode() + the
    module's wrapper class do in Slicer."""
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", moduleName)
    node.SetAttribute("ModuleName", moduleName)
    return wrapperClass(node)
