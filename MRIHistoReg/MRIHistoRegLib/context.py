"""The MRML scene the logic works on: Slicer's own inside the application, an app-less one elsewhere.

slicer-core (PyPI) provides MRML and the module logics but no application, so `slicer.mrmlScene` does not
exist there. `createScene()` builds what the application would have set up (crosshair, application logic,
default colour nodes, the module logics we use) so volumes, markups, transforms, tables and storage nodes
behave as they do in Slicer.
"""
import logging
import weakref

import slicer
import vtk

# Module logics registered on the application logic, by the name Slicer registers them under.
_MODULE_LOGICS = (
    ("Volumes", "vtkSlicerVolumesLogic"),
    ("Markups", "vtkSlicerMarkupsLogic"),
    ("Transforms", "vtkSlicerTransformLogic"),
    ("Tables", "vtkSlicerTablesLogic"),
    ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
)


def insideSlicerApplication() -> bool:
    """True when running inside the 3D Slicer application (GUI or --no-main-window)."""
    return hasattr(slicer, "app") and hasattr(slicer, "mrmlScene")


class AppLessContext:
    """A scene with application logic and module logics, for plain-Python use (slicer-core)."""

    def __init__(self, scene):
        # No reference to the scene's Python object is kept here: the context lives exactly as long as it
        # (see _contexts), so a cohort's scenes are freed one by one.
        crosshair = slicer.vtkMRMLCrosshairNode()
        crosshair.SetCrosshairName("default")
        scene.AddNode(crosshair)

        self.applicationLogic = slicer.vtkSlicerApplicationLogic()
        self.applicationLogic.SetMRMLScene(scene)
        self.applicationLogic.GetColorLogic().SetMRMLScene(scene)
        self.applicationLogic.GetColorLogic().AddDefaultColorNodes()
        self.applicationLogic.SetSliceLogics(vtk.vtkCollection())
        self.applicationLogic.SetViewLogics(vtk.vtkCollection())

        self.moduleLogics = {}
        for moduleName, className in _MODULE_LOGICS:
            logic = getattr(slicer, className)()
            logic.SetMRMLApplicationLogic(self.applicationLogic)
            logic.SetMRMLScene(scene)
            self.applicationLogic.SetModuleLogic(moduleName, logic)
            self.moduleLogics[moduleName] = logic
        # Subject hierarchy keeps the scene's data tree consistent when nodes are added/removed.
        self.subjectHierarchyLogic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
        self.subjectHierarchyLogic.SetMRMLScene(scene)
        self.subjectHierarchyLogic.SetMRMLApplicationLogic(self.applicationLogic)


# scene -> its AppLessContext, held only as long as the caller holds the scene (weak key): no process-wide registry
# keeps finished scenes alive.
_contexts = weakref.WeakKeyDictionary()


def createScene() -> "slicer.vtkMRMLScene":
    """A new app-less scene with application and module logics set up (plain Python / tests). The logics live as
    long as the returned scene object is referenced."""
    scene = slicer.vtkMRMLScene()
    _contexts[scene] = AppLessContext(scene)
    return scene


def getScene(scene=None) -> "slicer.vtkMRMLScene":
    """The scene to work on: the one given, Slicer's own inside the application, else a new app-less one."""
    if scene is not None:
        return scene
    if insideSlicerApplication():
        return slicer.mrmlScene
    logging.debug("No Slicer application: creating an app-less MRML scene")
    return createScene()


def applicationLogic(scene):
    """The application logic serving `scene` (what views and displayable managers are built with)."""
    context = _contexts.get(scene)
    if context is not None:
        return context.applicationLogic
    if insideSlicerApplication():
        return slicer.app.applicationLogic()
    raise ValueError("No application logic for this scene: create it with MRIHistoRegLib.context.createScene().")


def moduleLogic(scene, moduleName: str):
    """The module logic (e.g. 'Volumes', 'Markups') serving `scene`."""
    context = _contexts.get(scene)
    if context is not None:
        return context.moduleLogics[moduleName]
    if insideSlicerApplication():
        return getattr(slicer.modules, moduleName.lower()).logic()
    raise ValueError(f"No {moduleName} logic for this scene: create it with MRIHistoRegLib.context.createScene().")


def nodesByClass(scene, className: str) -> list:
    """The scene's nodes of `className` as a list. vtkMRMLScene::GetNodesByClass returns a new collection that
    the caller owns (vtkMRMLScene.h); Python's wrapper adds its own reference, so the caller's is released
    here, as slicer.util.getNodesByClass does."""
    collection = scene.GetNodesByClass(className)
    collection.UnRegister(None)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def newStorageNode(node):
    """node.CreateDefaultStorageNode() with the caller's reference released (the method returns a new object
    the caller owns; Python keeps its own reference)."""
    storage = node.CreateDefaultStorageNode()
    if storage is not None:
        storage.UnRegister(None)
    return storage
