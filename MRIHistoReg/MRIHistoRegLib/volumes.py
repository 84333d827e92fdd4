"""Volume nodes <-> numpy arrays and files, with geometry as a 4x4 IJK->RAS matrix.

Arrays are indexed [k, j, i] like `slicer.util.arrayFromVolume`. Geometry is always carried as the IJK->RAS
matrix (origin, spacing and directions in one), which is what Slicer's volume nodes hold.
"""
import logging
import os

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support
from .errors import UserInputError
from .geometry import LPS_RAS_SIGNS, flipPointsLpsRas, spacingOf  # noqa: F401 (spacingOf: callers import it from here)


def matrixToNumpy(vtkMatrix) -> np.ndarray:
    return np.array([[vtkMatrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def numpyToMatrix(array) -> "vtk.vtkMatrix4x4":
    vtkMatrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vtkMatrix.SetElement(r, c, float(array[r][c]))
    return vtkMatrix


def ijkToRas(volumeNode) -> np.ndarray:
    """The volume node's IJK->RAS matrix as a numpy 4x4 array."""
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return matrixToNumpy(m)


def setSitkGeometry(image, ijkToRasMatrix):
    """Give a SimpleITK image (LPS physical space) the geometry of a RAS IJK->RAS matrix: spacing = column norms,
    direction and origin with x and y negated (RAS <-> LPS). Returns the image."""
    m = np.asarray(ijkToRasMatrix, float)
    if m.shape != (4, 4):
        raise UserInputError(f"Geometry must be a 4x4 IJK->RAS matrix, got shape {m.shape}.")
    spacing = spacingOf(m)
    if np.any(spacing <= 0):
        raise UserInputError("IJK->RAS matrix has a zero-length axis: set the voxel spacing.")
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in (LPS_RAS_SIGNS[:, None] * (m[:3, :3] / spacing)).ravel()])
    image.SetOrigin([float(v) for v in flipPointsLpsRas(m[:3, 3])])
    return image


def sitkImageFromArray(array, ijkToRasMatrix, dtype=None, isVector=False):
    """A SimpleITK image of `array` ([k, j, i], or [k, j, i, c] with isVector) with the RAS geometry
    `ijkToRasMatrix` (setSitkGeometry); dtype converts the voxels (None: keep the array's type)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=dtype), isVector=isVector)
    return setSitkGeometry(image, ijkToRasMatrix)


def setIjkToRas(volumeNode, ijkToRasMatrix) -> None:
    volumeNode.SetIJKToRASMatrix(numpyToMatrix(ijkToRasMatrix))


def createVolumeNode(scene, array, ijkToRasMatrix, name, labelmap=False):
    """A new scalar (or label map) volume node holding a copy of `array` ([k, j, i]) with the given geometry."""
    array = np.ascontiguousarray(array)
    if array.ndim != 3:
        raise UserInputError(f"Volume '{name}' needs a 3-D array [k, j, i], got shape {array.shape}.")
    className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(className, name)
    updateVolumeFromArray(node, array)
    setIjkToRas(node, ijkToRasMatrix)
    node.CreateDefaultDisplayNodes()
    return node


def updateVolumeFromArray(volumeNode, array) -> None:
    """Replace the voxels of `volumeNode` with a copy of `array` ([k, j, i]); geometry is kept."""
    array = np.ascontiguousarray(array)
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    vtkArray = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    vtkArray.SetName("ImageScalars")
    imageData.GetPointData().SetScalars(vtkArray)
    volumeNode.SetAndObserveImageData(imageData)


def arrayFromVolume(volumeNode) -> np.ndarray:
    """A [k, j, i] numpy view of the node's voxels (no copy)."""
    return slicer.util.arrayFromVolume(volumeNode)


def loadVolume(scene, path, name=None, labelmap=False):
    """Read a volume file (NRRD, NIfTI, MHA, ...) into a new node through MRML's storage node."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserInputError(f"Volume file not found: {path}. Check the path.")
    className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(className, name or baseName(path))
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(path)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise UserInputError(f"Could not read volume '{path}': is it a valid image file?")
    node.CreateDefaultDisplayNodes()
    return node


def saveNode(node, path, useCompression=True) -> None:
    """Write a storable node (volume, transform, markups, table) with its default storage node."""
    path = os.fspath(path)
    storage = node.GetStorageNode()
    if storage is None:
        node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(bool(useCompression))
    if not storage.WriteData(node):
        raise UserInputError(f"Could not write '{node.GetName()}' to {path}: is the folder writable?")
    logging.debug("wrote %s", path)


IMAGE_EXTENSIONS = (".ome.tiff", ".ome.tif", ".nii.gz", ".seg.nrrd", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd",
                    ".tiff", ".tif")


def baseName(path) -> str:
    """A file's or folder's name without its image extension (volume and node names): 'a/histology.ome.tif' ->
    'histology'. Unknown extensions: a file loses its last suffix, a folder (a TIFF series) keeps its name."""
    path = os.fspath(path)
    name = os.path.basename(os.path.normpath(path))
    for ext in IMAGE_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name if os.path.isdir(path) else os.path.splitext(name)[0]
