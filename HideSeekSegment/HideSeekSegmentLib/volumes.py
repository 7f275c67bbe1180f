"""Small helpers between MRML volume nodes, VTK images, numpy arrays and files, shared by the input export and the
result import. They never add nodes to the scene: temporary nodes live outside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from hideseek.errors import InputError

GEOMETRY_TOLERANCE = 1e-4
"""Grids agree when their IJK-to-RAS matrices differ by less than this fraction of the smallest voxel size."""


def voxels(image) -> np.ndarray:
    """A (k, j, i) numpy view of a vtkImageData's scalars (shares memory)."""
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])


def ijkToRas(volumeNode) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrix


def orientedImage(volumeNode):
    """The node's voxels with their IJK-to-RAS geometry, sharing the voxel memory (nothing is copied)."""
    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(volumeNode.GetImageData())
    image.SetImageToWorldMatrix(ijkToRas(volumeNode))
    return image


def orientedImageFromArray(array: np.ndarray, referenceVolume):
    """A uint8 (k, j, i) array as an oriented image on the reference volume's grid (the array is copied)."""
    image = _imageFromArray(array, slicer.vtkOrientedImageData())
    image.SetImageToWorldMatrix(ijkToRas(referenceVolume))
    return image


def _imageFromArray(array: np.ndarray, image):
    image.SetDimensions(array.shape[::-1])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    voxels(image)[:] = array
    return image


def sameGrid(a, b) -> bool:
    """Whether two oriented images have the same voxel grid (dimensions, extent start, IJK-to-RAS)."""
    if a.GetDimensions() != b.GetDimensions() or a.GetExtent()[::2] != b.GetExtent()[::2]:
        return False
    ma, mb = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    a.GetImageToWorldMatrix(ma)
    b.GetImageToWorldMatrix(mb)
    tolerance = GEOMETRY_TOLERANCE * min(b.GetSpacing())
    return all(abs(ma.GetElement(r, c) - mb.GetElement(r, c)) <= tolerance for r in range(3) for c in range(4))


def writeVolumeNode(volumeNode, path: Path) -> None:
    """Write a volume through Slicer's own writer (uncompressed: these are temporary files read once)."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.UseCompressionOff()
    if not storage.WriteData(volumeNode):
        raise InputError(f"could not write {path}: check the free disk space of the temporary folder")


def writeLabelArray(array: np.ndarray, referenceVolume, path: Path) -> None:
    """Write a uint8 (k, j, i) array with the reference volume's geometry."""
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    labelmap.SetAndObserveImageData(_imageFromArray(array, vtk.vtkImageData()))
    labelmap.SetIJKToRASMatrix(ijkToRas(referenceVolume))
    writeVolumeNode(labelmap, path)


def readLabelmap(path: Path):
    """Read a labelmap file into a labelmap node that is not in any scene."""
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not path.is_file() or not storage.ReadData(labelmap):
        raise InputError(f"cannot read the labelmap {path}")
    return labelmap
