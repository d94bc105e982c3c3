"""NIfTI (.nii.gz) and MetaImage (.mha) export via SimpleITK: images/NAME.ext int16 HU and
labels/NAME.ext uint8 six-class label mask (5 = nodule) beside it.

Geometry, the same in every medical format nodulesynth writes (NIfTI, MHA, DICOM, MONAI datalist):
each slice is a 2-D image with the identity direction (rows along +y, columns along +x of the
patient LPS frame, as ITK and DICOM define it) and the centre of pixel (row 0, col 0) at the world
origin (0, 0). So the centre of pixel (r, c) lies at world (x, y) = (c·dx, r·dy) mm, and a box's
pixel EDGE coordinates x0..x1 (what nodulesynth's boxes are) span world x from (x0 − 0.5)·dx to
(x1 − 0.5)·dx. nibabel reports the NIfTI affine in RAS, i.e. diag(−dx, −dy, 1): the same geometry.
Slices are independent 2-D images, never a volume; spacing (dy, dx) is the model's for synthetic
slices and each real slice's own (after `prepare` resampling).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

EXTENSIONS = {"nifti": ".nii.gz", "mha": ".mha"}


def world_boxes(boxes_px: np.ndarray, spacing_mm: tuple[float, float]) -> np.ndarray:
    """xyxy pixel-edge boxes → xyxy world (LPS) mm boxes under the geometry above."""
    dy, dx = (float(v) for v in spacing_mm)
    b = np.asarray(boxes_px, np.float64).reshape(-1, 4)
    return (b - 0.5) * np.array([dx, dy, dx, dy])


def pixel_boxes(boxes_mm: np.ndarray, spacing_mm: tuple[float, float]) -> np.ndarray:
    """Inverse of ``world_boxes``."""
    dy, dx = (float(v) for v in spacing_mm)
    return np.asarray(boxes_mm, np.float64).reshape(-1, 4) / np.array([dx, dy, dx, dy]) + 0.5


def write_image(path: Path, arr: np.ndarray, spacing_mm: tuple[float, float]) -> None:
    """One 2-D (H, W) array as an ITK image with this module's geometry (format from the suffix)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    dy, dx = (float(v) for v in spacing_mm)
    img.SetSpacing((dx, dy))
    img.SetOrigin((0.0, 0.0))
    img.SetDirection((1.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path), useCompression=True)


def volume_item(root: Path, item, fmt: str) -> dict:
    """Write one ``ExportItem``'s HU image and label mask; return their paths relative to root."""
    ext = EXTENSIONS[fmt]
    image, label = f"images/{item.name}{ext}", f"labels/{item.name}{ext}"
    write_image(Path(root) / image, np.round(np.asarray(item.hu)).astype(np.int16), item.spacing_mm)
    write_image(Path(root) / label, np.asarray(item.mask, np.uint8), item.spacing_mm)
    return {"image": image, "label": label}


def make_folders(root: Path) -> None:
    for d in ("images", "labels"):
        (Path(root) / d).mkdir(parents=True, exist_ok=True)
