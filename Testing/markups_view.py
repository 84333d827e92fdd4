"""An offscreen 3D view in which Slicer's own markups widget places points (no Qt): the C++ chain a click runs
in Slicer - interactor style -> markups displayable manager -> vtkSlicerMarkupsWidget::PlacePoint - driven by
real VTK interactor events, so tests see the interaction-mode rules of the real widget."""
import slicer
import vtk

from MRIHistoRegLib import context


class ThreeDView:
    """Built like qMRMLThreeDView: view node, renderer, offscreen window, interactor, the 3D view interactor style
    and a displayable manager group holding vtkMRMLMarkupsDisplayableManager."""

    def __init__(self, scene):
        self.viewNode = slicer.vtkMRMLViewNode()
        self.viewNode.SetLayoutName("1")
        scene.AddNode(self.viewNode)
        self.renderer = vtk.vtkRenderer()
        self.renderWindow = vtk.vtkRenderWindow()
        self.renderWindow.SetOffScreenRendering(1)
        self.renderWindow.SetSize(400, 400)
        self.renderWindow.AddRenderer(self.renderer)
        self.interactor = vtk.vtkGenericRenderWindowInteractor()  # Qt feeds events to it in Slicer
        self.renderWindow.SetInteractor(self.interactor)
        self.interactor.SetInteractorStyle(vtk.vtkInteractorStyle3D())
        factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory()  # a singleton
        factory.SetMRMLApplicationLogic(context.applicationLogic(scene))
        if not factory.IsDisplayableManagerRegistered("vtkMRMLMarkupsDisplayableManager"):
            factory.RegisterDisplayableManager("vtkMRMLMarkupsDisplayableManager")
        self.group = factory.InstantiateDisplayableManagers(self.renderer)
        self.group.SetMRMLDisplayableNode(self.viewNode)
        self.style = slicer.vtkMRMLThreeDViewInteractorStyle()
        self.style.SetDisplayableManagers(self.group)
        self.style.SetInteractor(self.interactor)
        self.interactor.Initialize()
        self.renderWindow.Render()

    def click(self, x, y):
        """A left click at display position (x, y): the hover puts the active list's widget in its place state,
        the release places the point (as Qt's interactor adapter sends a QMouseEvent)."""
        self.interactor.SetEventInformation(x, y, 0, 0)
        self.interactor.InvokeEvent(vtk.vtkCommand.MouseMoveEvent)
        self.interactor.InvokeEvent(vtk.vtkCommand.LeftButtonPressEvent)
        self.interactor.InvokeEvent(vtk.vtkCommand.LeftButtonReleaseEvent)
