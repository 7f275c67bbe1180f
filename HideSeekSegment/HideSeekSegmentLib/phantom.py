"""A small synthetic spine CT built in code, for the module's self-test in Slicer and for the tests without Slicer.

Two lumbar vertebrae (L2 below L1) in a soft-tissue cylinder surrounded by air, 2 mm voxels, in the orientation
DICOM CTs load with (IJK-to-RAS = diag(-2, -2, 2)): each vertebra is a cylindrical body (cancellous bone inside a
dense shell) with a posterior arch, and L1's body holds a round lytic lesion. The vertebrae come as a segmentation
named the way the TotalSegmentator extension names its segments (ID ``vertebrae_L1``, name ``L1 vertebra``), and
as a labelmap with TotalSegmentator's values (31 L1, 30 L2). The scene must have the segmentation converter rules
registered (the Slicer application does this at startup).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import slicer
import vtk

from .volumes import orientedImageFromArray, voxels

SHAPE = (40, 40, 36)
"""(k, j, i): superior-inferior, anterior-posterior, right-left voxels."""
SPACING_MM = 2.0
LEVELS = {"L1": (22, 31), "L2": (8, 17)}
"""Slab (first, last k) of each vertebra; k grows towards superior."""
TOTALSEGMENTATOR_VALUES = {"L1": 31, "L2": 30}
AIR_HU, SOFT_TISSUE_HU, CANCELLOUS_HU, CORTEX_HU, ARCH_HU, LYTIC_HU = -1000, 40, 250, 700, 450, 20


@dataclass
class Phantom:
    """The phantom's nodes (in the scene) and the arrays they were made from, (k, j, i) like Slicer's arrays."""

    ct: object  # vtkMRMLScalarVolumeNode
    vertebrae: object  # vtkMRMLSegmentationNode
    labels: np.ndarray  # uint8 TotalSegmentator values
    lytic: np.ndarray  # bool: the planted lytic lesion (in L1's body)


def makePhantom(scene, name: str = "Phantom CT") -> Phantom:
    """Add the phantom CT and its vertebra segmentation to ``scene``."""
    hu, labels, lytic = _arrays()
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(SHAPE[::-1])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    voxels(image)[:] = hu
    ct.SetAndObserveImageData(image)
    ct.SetSpacing(SPACING_MM, SPACING_MM, SPACING_MM)
    ct.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)
    ct.SetOrigin(35.0, 40.0, -40.0)
    ct.CreateDefaultDisplayNodes()

    vertebrae = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} vertebrae")
    vertebrae.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    for level, value in TOTALSEGMENTATOR_VALUES.items():
        segmentId = vertebrae.GetSegmentation().AddEmptySegment(f"vertebrae_{level}", f"{level} vertebra")
        mask = orientedImageFromArray((labels == value).astype(np.uint8), ct)
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(mask, vertebrae, segmentId)
    return Phantom(ct, vertebrae, labels, lytic)


def _arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k, j, i = np.indices(SHAPE)
    hu = np.full(SHAPE, AIR_HU, np.int16)
    hu[(j - 20) ** 2 / 18**2 + (i - 18) ** 2 / 16**2 <= 1] = SOFT_TISSUE_HU
    labels = np.zeros(SHAPE, np.uint8)
    radial = np.hypot(j - 15, i - 18)  # vertebral body axis; posterior is +j
    for level, (first, last) in LEVELS.items():
        slab = (k >= first) & (k <= last)
        body = slab & (radial <= 7)
        arch = slab & (j >= 23) & (j <= 29) & (np.abs(i - 18) <= 4) & (k >= first + 2) & (k <= last - 2)
        hu[body] = CORTEX_HU
        hu[slab & (radial <= 5.5) & (k > first) & (k < last)] = CANCELLOUS_HU
        hu[arch] = ARCH_HU
        labels[body | arch] = TOTALSEGMENTATOR_VALUES[level]
    first, last = LEVELS["L1"]
    lytic = (k - (first + last) / 2) ** 2 + (j - 14) ** 2 + (i - 18) ** 2 <= 3.2**2
    hu[lytic] = LYTIC_HU
    return hu, labels, lytic
