"""Render what a user sees after "Segment metastases": a 3-D view and two slice views of a run's outputs.

No 3D Slicer application runs in CI, so the README figure and the extension screenshot are rendered from the
files a run writes (the same files the module loads): the CT, the vertebra labels and lesions.nii.gz. The 3-D
view uses VTK offscreen (bone and lesion surfaces in the segments' colours); the slice views use matplotlib.

    hideseek demo --out hideseek-demo
    python scripts/render_result_figure.py hideseek-demo Resources/Screenshots/HideSeekSegment-1.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

from hideseek.segfile import LESION_SEGMENTS

BONE_HU = 250


def _vtk_image(array: np.ndarray, image: sitk.Image) -> vtk.vtkImageData:
    """A numpy (k, j, i) array on an axis-aligned LPS grid as vtkImageData in RAS millimetres."""
    data = vtk.vtkImageData()
    data.SetDimensions(*image.GetSize())
    data.SetSpacing(*image.GetSpacing())
    data.SetOrigin(*image.GetOrigin())
    data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    return data


def _surface(data: vtk.vtkImageData, level: float, rgb, opacity: float) -> vtk.vtkActor:
    contour = vtk.vtkFlyingEdges3D()
    contour.SetInputData(data)
    contour.SetValue(0, level)
    smooth = vtk.vtkWindowedSincPolyDataFilter()
    smooth.SetInputConnection(contour.GetOutputPort())
    smooth.SetNumberOfIterations(15)
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(smooth.GetOutputPort())
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputConnection(normals.GetOutputPort())
    mapper.ScalarVisibilityOff()
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(*(c / 255 for c in rgb))
    actor.GetProperty().SetOpacity(opacity)
    return actor


def render_3d(ct: sitk.Image, vertebrae: sitk.Image, lesions: sitk.Image, path: Path, size=(700, 800)) -> None:
    ct, vertebrae, lesions = (sitk.DICOMOrient(im, "LPS") for im in (ct, vertebrae, lesions))
    bone = (sitk.GetArrayFromImage(vertebrae) > 0) & (sitk.GetArrayFromImage(ct) > BONE_HU)
    les = sitk.GetArrayFromImage(lesions)
    ren = vtk.vtkRenderer()
    ren.SetBackground(0.1, 0.1, 0.15)
    ren.AddActor(_surface(_vtk_image(bone.astype(np.float32), ct), 0.5, (241, 214, 145), 0.25))
    for spec in LESION_SEGMENTS:
        if (les == spec.label).any():
            ren.AddActor(_surface(_vtk_image((les == spec.label).astype(np.float32), ct), 0.5, spec.rgb, 1.0))
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.AddRenderer(ren)
    window.SetSize(*size)
    camera = ren.GetActiveCamera()  # patient's left side view (LPS: +x is left), superior up
    camera.SetViewUp(0, 0, 1)
    camera.SetPosition(1, 0, 0)
    camera.SetFocalPoint(0, 0, 0)
    camera.Azimuth(-30)
    ren.ResetCamera()
    camera.Zoom(1.3)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()


def compose(run_dir: Path, out: Path) -> None:
    ct = sitk.ReadImage(str(run_dir / "input" / "ct.nii.gz"))
    vertebrae = sitk.ReadImage(str(run_dir / "input" / "vertebrae.nii.gz"))
    lesions = sitk.ReadImage(str(run_dir / "lesions.nii.gz"))
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        render_3d(ct, vertebrae, lesions, Path(tmp) / "3d.png")
        view = plt.imread(Path(tmp) / "3d.png")
    lps = [sitk.GetArrayFromImage(sitk.DICOMOrient(im, "LPS")) for im in (ct, lesions)]
    ct_a, les_a = lps
    sp = sitk.DICOMOrient(ct, "LPS").GetSpacing()
    x = int(np.argmax((les_a > 0).sum(axis=(0, 1)))) if les_a.any() else ct_a.shape[2] // 2
    z = int(np.argmax((les_a > 0).sum(axis=(1, 2)))) if les_a.any() else ct_a.shape[0] // 2
    fig = plt.figure(figsize=(13, 6.5), facecolor="black")
    grid = fig.add_gridspec(1, 3, width_ratios=[1.1, 1, 1])
    panels = [(view, None, "3-D: bone (translucent), lytic orange, blastic blue", None),
              (ct_a[::-1, :, x], les_a[::-1, :, x], f"sagittal (slice {x})", sp[2] / sp[1]),
              (ct_a[z], les_a[z], f"axial (slice {z})", sp[1] / sp[0])]
    for col, (img, les, title, aspect) in enumerate(panels):
        ax = fig.add_subplot(grid[0, col])
        if les is None:
            ax.imshow(img)
        else:
            ax.imshow(img, cmap="gray", vmin=-250, vmax=1250, aspect=aspect, interpolation="nearest")
            for spec in LESION_SEGMENTS:
                if (les == spec.label).any():
                    ax.contour(les == spec.label, levels=[0.5], colors=[tuple(c / 255 for c in spec.rgb)],
                               linewidths=1.2)
        ax.set_title(title, color="white", fontsize=10)
        ax.axis("off")
    found = ", ".join(f"{v['level']} {v['n_lytic']}L/{v['n_blastic']}B" for v in report["vertebrae"]
                      if v["status"] == "ok")
    fig.suptitle(f"HideSeekSegment result on the demo CT ({report['model']['name']}): {found}", color="white",
                 fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, facecolor="black")
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="output folder of 'hideseek demo'")
    parser.add_argument("out", type=Path, help="PNG to write")
    args = parser.parse_args()
    compose(args.run_dir, args.out)
