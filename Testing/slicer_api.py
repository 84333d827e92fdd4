"""The Slicer, CTK and PythonQt APIs the module calls, each with the first release that has it and the file where it
was read (Slicer's repository at the tags v5.8.1, v5.10.0, v5.12.3 and main; CTK at the commits those tags pin).

OLDEST_SUPPORTED is the oldest Slicer the README and the extension metadata name. An API first present in a later
release may be used only behind a guard (`if hasattr(owner, "name")` or `getattr(owner, "name", None)`) that keeps
the feature on older releases. Adding a call to the module means checking it in Slicer's source and adding it
here: the contract test refuses a call it does not know.
"""

OLDEST_SUPPORTED = (5, 8)

# dotted name as written in the module -> (first release that has it; (5, 8) = read at v5.8.1, file)
APIS = {
    # Base/Python/slicer/util.py (v5.8.1)
    "slicer.util.loadUI": ((5, 8), "Base/Python/slicer/util.py"),
    "slicer.util.childWidgetVariables": ((5, 8), "Base/Python/slicer/util.py"),
    "slicer.util.errorDisplay": ((5, 8), "Base/Python/slicer/util.py"),
    "slicer.util.showStatusMessage": ((5, 8), "Base/Python/slicer/util.py"),
    "slicer.util.setSliceViewerLayers": ((5, 8), "Base/Python/slicer/util.py"),
    "slicer.util.resetSliceViews": ((5, 8), "Base/Python/slicer/util.py"),
    "slicer.util.createProgressDialog": ((5, 8), "Base/Python/slicer/util.py"),
    "slicer.util.WaitCursor": ((5, 8), "Base/Python/slicer/util.py"),
    "slicer.util.mainWindow": ((5, 8), "Base/Python/slicer/util.py"),
    "slicer.util.confirmOkCancelDisplay": ((5, 8), "Base/Python/slicer/util.py"),
    "slicer.util.pip_install": ((5, 8), "Base/Python/slicer/util.py (a str is shlex-split, a list passed as is)"),
    "slicer.util.arrayFromVolume": ((5, 8), "Base/Python/slicer/util.py"),
    "slicer.util.VTKObservationMixin": ((5, 8), "Base/Python/slicer/util.py"),
    "slicer.util.getModuleWidget": ((5, 8), "Base/Python/slicer/util.py"),
    "slicer.util.selectModule": ((5, 8), "Base/Python/slicer/util.py"),
    # Base/Python/slicer/packaging.py: added in 5.12 (commit 2cf12e60e4)
    "slicer.packaging.pip_ensure": ((5, 12), "Base/Python/slicer/packaging.py"),
    # the application (Base/QTGUI/qSlicerApplication.h, qSlicerCoreApplication.h)
    "slicer.app.connect": ((5, 8), "PythonQt QObject.connect"),
    "slicer.app.temporaryPath": ((5, 8), "Base/QTCore/qSlicerCoreApplication.h"),
    "slicer.app.processEvents": ((5, 8), "QCoreApplication"),
    "slicer.app.applicationLogic": ((5, 8), "Base/QTCore/qSlicerCoreApplication.h"),
    "slicer.app.applicationVersion": ((5, 8), "Base/QTCore/qSlicerCoreApplication.h"),
    "slicer.app.testingEnabled": ((5, 8), "Base/QTCore/qSlicerCoreApplication.h"),
    "slicer.modules.markups.logic": ((5, 8), "Modules/Loadable/Markups/Logic/vtkSlicerMarkupsLogic.h"),
    "slicer.mrmlScene.StartCloseEvent": ((5, 8), "Libs/MRML/Core/vtkMRMLScene.h"),
    "slicer.mrmlScene.EndCloseEvent": ((5, 8), "Libs/MRML/Core/vtkMRMLScene.h"),
    "slicer.mrmlScene.GetFirstNodeByClass": ((5, 8), "Libs/MRML/Core/vtkMRMLScene.h"),
    "slicer.mrmlScene.Clear": ((5, 8), "Libs/MRML/Core/vtkMRMLScene.h"),
    # Modules/Scripted/SampleData/SampleData.py
    "SampleData.SampleDataLogic.registerCustomSampleDataSource": ((5, 8), "Modules/Scripted/SampleData/SampleData.py"),
    "SampleData.SampleDataLogic.registerCustomSampleDataCategory": ((5, 12), "Modules/Scripted/SampleData/SampleData.py (c8fecf22b5)"),
    # PythonQt / Qt (Slicer replaces QTimer.singleShot: Base/Python/slicer/slicerqt.py at 5.8.1)
    "qt.QTimer.singleShot": ((5, 8), "Base/Python/slicer/slicerqt.py"),
    "qt.QTimer": ((5, 8), "Qt"),
    "qt.QEventLoop.AllEvents": ((5, 8), "Qt"),
    "qt.QFileDialog.getExistingDirectory": ((5, 8), "Qt"),
    "qt.QFileDialog.getSaveFileName": ((5, 8), "Qt"),
}

# Parameter node wrapper methods the widget calls (Base/Python/slicer/parameterNodeWrapper/wrapper.py). connectGui
# returns no tag before 5.10 (b5a65a49a0), so disconnectGui cannot undo it there: the widget uses
# connectParametersToGui, which returns one at every release.
WRAPPER_METHODS = {
    "connectParametersToGui": ((5, 8), "parameterNodeWrapper/wrapper.py"),
    "disconnectGui": ((5, 8), "parameterNodeWrapper/wrapper.py"),
    "connectGui": ((5, 10), "parameterNodeWrapper/wrapper.py: returns None before 5.10"),
}

PREFIXES = ("slicer.util.", "slicer.app.", "slicer.packaging.", "slicer.modules.", "slicer.mrmlScene.", "SampleData.",
            "qt.", "ctk.")

# What the oldest supported Slicer (5.8.1) bundles: CMakeLists.txt (Python), SuperBuild/External_python-numpy.cmake,
# SuperBuild/External_SimpleITK.cmake ("slicer-v2.3.1-2024-05-20-bc4449e"), SuperBuild/External_VTK.cmake.
OLDEST_BUNDLED = {"python": "3.9.10", "numpy": "1.26.4", "SimpleITK": "2.3.1", "vtk": "9.2.20230607"}
