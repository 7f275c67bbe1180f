"""Read the user's CT and vertebra labelmap, refuse unusable input early, and write results atomically.

Every refusal is an ``InputError`` whose one line names the file and the fix: a wrong input found here costs
the user seconds, the same input found after an hour of diffusion sampling costs the hour.

How we decide that an image is a CT in Hounsfield units (``check_hounsfield``), on the voxels above -1500 HU
(scanners pad the corners outside the reconstruction circle with -2000, -3024 or -32768, which says nothing
about the scan itself):

1. at least 0.1 % of the voxels lie at or below -100 HU: air or fat, which every CT of the spine contains
   (outside air, lungs, bowel gas, or at least paravertebral and epidural fat). MR magnitude images, PET,
   intensity-normalised images ([0, 1]), z-scored images (a few units below zero) and CT exported without
   its rescale intercept (air stored as 0) all fail this;
2. at least 0.1 % of the voxels lie at or above +100 HU: bone, which a vertebra image must contain;
3. the median lies below 1500 HU: even a crop of a fully sclerotic vertebra has its median voxel in bone or
   soft tissue, whereas scanner values stored in another unit (e.g. scaled by 1000) do not.

The percentiles come from at most ~2 million voxels taken at a regular stride, which keeps the check well
under a second on a whole-body CT.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import secrets
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError

PADDING_HU = -1500.0
LOW_HU = -100.0
HIGH_HU = 100.0
MAX_MEDIAN_HU = 1500.0
TAIL_FRACTION = 0.001
SAMPLE_VOXELS = 2_000_000

SPACING_RTOL = 1e-4
"""Labelmap and CT spacings may differ by this fraction (float32 round-off in NIfTI headers)."""
ORIGIN_TOL_VOXELS = 1e-3
"""Origins may differ by this fraction of the smallest voxel size."""
DIRECTION_ATOL = 1e-4
SLICE_GAP_RTOL = 0.2
"""DICOM slices may deviate from the median slice distance by this fraction before we call slices missing."""

META_PREFIX = "hideseek_"
"""Prefix of the metadata that ``read_ct`` attaches to the image (source, DICOM series, modality...)."""

SERIES_KEY = "dicom_series_key"

_DICOM_TAGS = {
    "series_uid": "0020|000e",
    "series_description": "0008|103e",
    "modality": "0008|0060",
    "patient_position": "0018|5100",
}


def read_ct(path: str | os.PathLike, *, series_uid: str | None = None, require_hu: bool = True) -> sitk.Image:
    """Read a CT volume (NIfTI, NRRD, MHA, or a folder holding a DICOM series) as float32 Hounsfield units.

    ``series_uid`` picks one series in a DICOM folder that holds several. ``require_hu=False`` skips the
    Hounsfield check for CT crops that were intensity-normalised on purpose (only valid with a model whose
    preprocessing normalises each slice by percentiles). The image carries ``hideseek_*`` metadata (source,
    and for DICOM the series UID, description, modality and patient position) for the report.
    """
    source = Path(path)
    if source.is_dir():
        image, info = _read_dicom_folder(source, series_uid)
    else:
        if series_uid is not None:
            raise InputError(f"--series applies to a DICOM folder only, but CT {source} is a file: omit it")
        image, info = _read_image_file(source, "CT"), {}
    image = _as_scalar_volume(image, source, "CT")
    if not np.issubdtype(sitk.GetArrayViewFromImage(image).dtype, np.integer):
        _check_finite(sitk.GetArrayViewFromImage(image), source, "CT")
    image = sitk.Cast(image, sitk.sitkFloat32)
    if require_hu:
        check_hounsfield(sitk.GetArrayViewFromImage(image), source)
    image.SetMetaData(META_PREFIX + "source", str(source))
    for key, value in info.items():
        image.SetMetaData(META_PREFIX + key, value)
    return image


def dicom_series_files(image: sitk.Image) -> list[str] | None:
    """The files, in slice order, of the DICOM series ``read_ct`` read ``image`` from; None for other inputs."""
    if META_PREFIX + SERIES_KEY not in image.GetMetaDataKeys():
        return None
    series = _dicom_series(Path(image.GetMetaData(META_PREFIX + "source")))
    return series.get(image.GetMetaData(META_PREFIX + SERIES_KEY))


def describe_ct(image: sitk.Image) -> dict[str, object]:
    """What the report says about the CT: grid, axis orientation code (e.g. LPS) and where it came from."""
    info: dict[str, object] = {
        "size": list(image.GetSize()),
        "spacing_mm": [round(s, 4) for s in image.GetSpacing()],
        "orientation": sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()),
    }
    for key in image.GetMetaDataKeys():
        if key.startswith(META_PREFIX) and key != META_PREFIX + SERIES_KEY:
            info[key.removeprefix(META_PREFIX)] = image.GetMetaData(key)
    return info


def check_hounsfield(array: np.ndarray, path: Path) -> None:
    """Refuse intensities that are not CT Hounsfield units (the rule is in the module docstring)."""
    sample = np.asarray(array).reshape(-1)[:: max(1, array.size // SAMPLE_VOXELS)]
    sample = sample[sample > PADDING_HU]
    if sample.size == 0:
        raise InputError(f"CT {path} holds only padding values (all below {PADDING_HU:g}): it is empty")
    low, median, high = np.quantile(sample, [TAIL_FRACTION, 0.5, 1.0 - TAIL_FRACTION])
    found = f"1st permille {low:.4g}, median {median:.4g}, 999th permille {high:.4g}"
    if low > LOW_HU or high < HIGH_HU or median > MAX_MEDIAN_HU:
        raise InputError(
            f"CT {path} does not look like a CT in Hounsfield units ({found}; a CT has air or fat below "
            f"{LOW_HU:g} and bone above {HIGH_HU:g}): give the original CT (MR, PET and intensity-normalised "
            "images are not supported), or pass --allow-non-hu for a CT crop normalised on purpose"
        )


def read_labelmap(path: str | os.PathLike, reference: sitk.Image, *, name: str = "vertebrae") -> sitk.Image:
    """Read an integer labelmap that lies on the CT's voxel grid; returns it as UInt16 with the CT's geometry.

    Float files are accepted when every value is a whole number (some tools save labels as float).
    """
    source = Path(path)
    what = f"{name} labelmap"
    image = _as_scalar_volume(_read_image_file(source, what), source, what)
    array = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        _check_finite(array, source, what)
        if not np.array_equal(array, np.round(array)):
            raise InputError(
                f"{what} {source} holds non-integer values: give a label image (one integer per structure), "
                "not a probability map or a resampled (interpolated) labelmap"
            )
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > np.iinfo(np.uint16).max:
        raise InputError(f"{what} {source} holds labels {low:g}..{high:g}: labels must lie in 0..65535")
    if high == 0:
        raise InputError(f"{what} {source} is empty (all voxels are 0): give the labelmap of the vertebrae")
    check_same_grid(image, reference, source, what)
    labels = sitk.Cast(image, sitk.sitkUInt16)
    labels.CopyInformation(reference)
    return labels


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output folder that cannot be created or would destroy results without ``--overwrite``."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file: give a folder path for the results")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(
            f"output folder {out} exists and is not empty: choose another folder or pass --overwrite to replace it"
        )
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot create output folder {out}: {ancestor} is not writable; choose another place")
    return out


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it replaces ``path``, on failure it vanishes.

    A run stopped mid-write (a 334 MB slice cache takes a minute) must never leave a truncated file that the
    next run reads as complete, nor destroy the previous version before the new one is whole.
    """
    out = Path(path)
    partial = out.with_name(f".{out.name}.partial-{secrets.token_hex(4)}")
    try:
        yield partial
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, on any failure it vanishes.

    An interrupted or failed run therefore never leaves half-written results, and with ``overwrite`` the old
    results are removed only once the new ones are complete.
    """
    out = check_output_dir(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{secrets.token_hex(4)}")
    partial.mkdir()  # plain mkdir, not mkdtemp: the result gets the user's usual permissions
    try:
        yield partial
        _move_into_place(partial, out, overwrite)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _move_into_place(partial: Path, out: Path, overwrite: bool) -> None:
    """Rename ``partial`` to ``out``; an existing ``out`` is set aside first and deleted only afterwards."""
    check_output_dir(out, overwrite)  # the target may have appeared while we computed
    old = None
    if out.is_dir():
        old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
        out.rename(old)
    try:
        partial.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_image_file(path: Path, what: str) -> sitk.Image:
    """Read one image file with SimpleITK, turning its exceptions into a line that names the file."""
    if not path.exists():
        raise InputError(f"{what} {path} not found: check the path")
    image_io = sitk.ImageFileReader.GetImageIOFromFileName(str(path))
    if not image_io:
        raise InputError(
            f"{what} {path} is not a readable image: give a NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) or "
            "MetaImage (.mha/.mhd) file, or a folder of DICOM files"
        )
    if image_io == "GDCMImageIO":
        raise InputError(f"{what} {path} is a single DICOM file: give the folder that holds the whole series")
    if image_io == "NiftiImageIO":
        _check_nifti(path, what)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        return reader.Execute()
    except RuntimeError:
        raise InputError(f"{what} {path} is damaged or truncated: export or copy it again") from None


class _NiftiLayout(NamedTuple):
    offset: int  # byte where the voxels start
    data_bytes: int  # bytes of voxel data the header promises
    float_dtype: np.dtype | None  # the voxel type when it can hold NaN, else None


def _check_nifti(path: Path, what: str) -> None:
    """Catch what ITK's NIfTI reader hides: it zero-fills a truncated file and reads NaN voxels as 0.

    Float files are scanned for NaN/inf in a decompressing stream (never whole in memory). For integer files
    only the length matters; the gzip trailer stores it (modulo 2**32), so the common case costs no
    decompression, and only a mismatch falls back to counting the bytes.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            layout = _nifti_layout(f.read(544))
            if layout is None:  # not a single-file .nii (e.g. an .hdr/.img pair): ITK checks those itself
                return
            if layout.float_dtype is not None:
                bad = _scan_nonfinite(f, layout)
                if bad:
                    raise _nonfinite_error(path, what, bad)
                return
    except (OSError, EOFError, ValueError, struct.error):  # gzip stream cut short, or header cut short
        raise _truncated_error(path, what) from None
    expected = layout.offset + layout.data_bytes
    if opener is open:
        if path.stat().st_size < expected:
            raise _truncated_error(path, what)
        return
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if struct.unpack("<I", f.read(4))[0] == expected % 2**32:
            return
    try:
        with gzip.open(path, "rb") as f:
            total = sum(len(chunk) for chunk in iter(lambda: f.read(1 << 24), b""))
    except (OSError, EOFError):
        raise _truncated_error(path, what) from None
    if total < expected:
        raise _truncated_error(path, what)


def _scan_nonfinite(f: BinaryIO, layout: _NiftiLayout) -> int:
    """Count NaN/inf voxels in the data section; EOFError if the data ends early."""
    f.seek(layout.offset)
    itemsize = layout.float_dtype.itemsize
    remaining, bad = layout.data_bytes, 0
    while remaining > 0:
        block = f.read(min(remaining, itemsize << 22))  # buffered reads are short only at end of file
        if not block:
            raise EOFError
        remaining -= len(block)
        values = np.frombuffer(block, layout.float_dtype, count=len(block) // itemsize)
        bad += int(values.size - np.count_nonzero(np.isfinite(values)))
    return bad


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """Where the voxels of a single-file NIfTI-1/2 start and how many bytes they take (None if not .nii)."""
    for endian in "<>":
        size = struct.unpack(endian + "i", header[:4])[0]
        if size == 348 and header[344:347] == b"n+1":
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            dims = struct.unpack(endian + "8h", header[40:56])
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if size == 540 and header[4:7] == b"n+2":
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : dims[0] + 1]], dtype=np.int64))
    floats = {16: "f4", 64: "f8"}  # NIfTI codes for float32 and float64
    dtype = np.dtype(endian + floats[datatype]) if datatype in floats else None
    return _NiftiLayout(offset, voxels * bitpix // 8, dtype)


def _truncated_error(path: Path, what: str) -> InputError:
    return InputError(f"{what} {path} is truncated (the file ends before its last voxel): copy it again")


def _nonfinite_error(path: Path, what: str, bad: int) -> InputError:
    return InputError(f"{what} {path} has {bad} NaN or infinite voxels: fix or re-export the image")


def _read_dicom_folder(folder: Path, series_uid: str | None) -> tuple[sitk.Image, dict[str, str]]:
    """Read one DICOM series from ``folder`` (searched recursively); several series need ``series_uid``."""
    series = _dicom_series(folder)
    if not series:
        raise InputError(
            f"CT folder {folder} holds no DICOM series: give a folder of DICOM files of one CT series, "
            "or a NIfTI/NRRD/MHA file"
        )
    if series_uid is None and len(series) > 1:
        listing = "; ".join(_describe_series(uid, files) for uid, files in series.items())
        raise InputError(
            f"CT folder {folder} holds {len(series)} DICOM series: {listing}. Pass --series UID to pick one"
        )
    uid = next(iter(series)) if series_uid is None else series_uid
    if uid not in series:
        raise InputError(f"CT folder {folder} has no DICOM series {uid!r}: use one of {', '.join(map(repr, series))}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series[uid])
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOff()
    try:
        image = reader.Execute()
    except RuntimeError:
        raise InputError(
            f"DICOM series {uid!r} in {folder} cannot be read (damaged files or an unsupported compression): "
            "export the series again, or convert it to NIfTI (e.g. with dcm2niix) and give that file"
        ) from None
    info = {key: _tag(reader, 0, tag) for key, tag in _DICOM_TAGS.items()}
    info["series_uid"] = uid
    modality = info["modality"].upper()
    if modality and modality != "CT":
        raise InputError(f"DICOM series {uid!r} in {folder} is {modality}, not CT: give a CT series")
    _check_slice_spacing(reader, image, folder)
    # GDCM's key of the series (may be empty when the files lack a UID): how dicom_series_files finds them again
    return image, {**{k: v for k, v in info.items() if v}, SERIES_KEY: uid}


def _dicom_series(folder: Path) -> dict[str, list[str]]:
    """Series UID -> sorted file names, over the folder and its subfolders."""
    uids: list[str] = []
    for directory, _, files in os.walk(folder):
        if files:
            uids += [u for u in sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory) if u not in uids]
    return {u: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), u, recursive=True)) for u in uids}


def _describe_series(uid: str, files: list[str]) -> str:
    """``UID (CT 'description', N slices)`` for the several-series message."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
        modality = _tag(reader, None, _DICOM_TAGS["modality"]) or "?"
        description = _tag(reader, None, _DICOM_TAGS["series_description"])
    except RuntimeError:
        modality, description = "?", ""
    return f"{uid!r} ({modality} {description!r}, {len(files)} slices)"


def _tag(reader: sitk.ImageFileReader | sitk.ImageSeriesReader, index: int | None, tag: str) -> str:
    """A DICOM tag's value without DICOM's padding blanks, '' when absent."""
    args = (tag,) if index is None else (index, tag)
    return reader.GetMetaData(*args).strip() if reader.HasMetaDataKey(*args) else ""


def _check_slice_spacing(reader: sitk.ImageSeriesReader, image: sitk.Image, folder: Path) -> None:
    """Refuse missing or irregular slices, which ITK only warns about (and then averages the spacing)."""
    normal = np.array(image.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    positions = []
    for i in range(image.GetSize()[2]):
        value = _tag(reader, i, "0020|0032")
        if not value:
            return  # no positions to check (e.g. a multi-frame file): trust the reader
        positions.append(float(np.dot(normal, [float(v) for v in value.split("\\")])))
    gaps = np.diff(np.sort(positions))
    if gaps.size == 0:
        return
    typical = float(np.median(gaps))
    if typical <= 0 or np.max(np.abs(gaps - typical)) > SLICE_GAP_RTOL * typical:
        raise InputError(
            f"DICOM series in {folder} has missing or irregularly spaced slices (distances {gaps.min():.3g} to "
            f"{gaps.max():.3g} mm): export the complete series, or resample it to even spacing"
        )


def _as_scalar_volume(image: sitk.Image, path: Path, what: str) -> sitk.Image:
    """Accept a 3-D scalar image (a 4-D one with a single time point is squeezed), refuse anything else."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{what} {path} has {image.GetNumberOfComponentsPerPixel()} values per voxel (a vector or colour "
            "image): give a single-channel 3-D volume"
        )
    size = image.GetSize()
    if image.GetDimension() == 4 and size[3] == 1:
        image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, 0])
        size = image.GetSize()
    if image.GetDimension() != 3:
        raise InputError(
            f"{what} {path} is {image.GetDimension()}-D (size {_size(size)}): give one 3-D volume "
            "(for a 4-D series, extract the time point or phase first)"
        )
    if min(size) < 2:
        raise InputError(f"{what} {path} is a single slice (size {_size(size)}): give a 3-D volume")
    return image


def _check_finite(array: np.ndarray, path: Path, what: str) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        raise _nonfinite_error(path, what, int(finite.size - np.count_nonzero(finite)))


def check_same_grid(image: sitk.Image, reference: sitk.Image, path: Path, what: str) -> None:
    """The labelmap must share the CT's voxel grid; name the first property that differs."""
    spacing = np.array(reference.GetSpacing())
    differences = (
        ("size", image.GetSize() != reference.GetSize(), image.GetSize(), reference.GetSize()),
        (
            "spacing",
            not np.allclose(image.GetSpacing(), spacing, rtol=SPACING_RTOL, atol=0),
            image.GetSpacing(),
            reference.GetSpacing(),
        ),
        (
            "origin",
            not np.allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0, atol=ORIGIN_TOL_VOXELS * spacing.min()),
            image.GetOrigin(),
            reference.GetOrigin(),
        ),
        (
            "direction",
            not np.allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=DIRECTION_ATOL),
            image.GetDirection(),
            reference.GetDirection(),
        ),
    )
    for prop, differs, mine, theirs in differences:
        if differs:
            raise InputError(
                f"{what} {path} has a different geometry than the CT ({prop} {_size(mine)} vs {_size(theirs)}): "
                "resample it onto the CT (e.g. in Slicer: Resample Scalar/Vector/DWI Volume with nearest-"
                "neighbour interpolation) or export it from the same series"
            )


def _size(values) -> str:
    return "×".join(f"{v:g}" for v in values)
