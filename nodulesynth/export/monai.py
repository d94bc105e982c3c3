"""MONAI detection datalist: datalist.json in the decathlon layout MONAI's detection workflow reads
with ``monai.data.load_decathlon_datalist(path, data_list_key="training")``.

Each entry: ``image`` (a NIfTI slice, path relative to the json), ``box`` (world mm boxes, mode
``xyxy`` = [x_min, y_min, x_max, y_max], 2-D), ``label`` (0 = nodule for every box), plus
``mask`` (the six-class label NIfTI), ``spacing_mm`` and ``name``. World coordinates are LPS as
ITK/DICOM define them, with the geometry of ``export.volume``. MONAI loads NIfTI with an RAS
affine that is 4×4 even for 2-D slices, so ``AffineBoxToImageCoordinated`` (built for 3-D) does not
apply as is: flip x and y (LPS → RAS) and apply the inverse of the affine's 2-D part (rows/columns
0, 1, 3) with ``box_ops.apply_affine_to_boxes``; image coordinates then have pixel centres on
integers (our pixel-edge boxes minus 0.5). tests/test_formats.py does exactly this. ``validation`` holds the real held-out patients' slices, and is
absent when there is no validation split.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..io import write_json
from .volume import world_boxes

BOX_MODE = "xyxy"
COORDINATES = ("LPS world mm (ITK/DICOM); to MONAI image coordinates: negate x, y (LPS->RAS), then the inverse "
               "of the 2-D part (rows/cols 0,1,3) of the loaded RAS affine via box_ops.apply_affine_to_boxes")


def monai_entry(item, image: str, mask: str) -> dict:
    """One datalist entry for an ``ExportItem`` whose NIfTI files are at ``image`` / ``mask``."""
    boxes = world_boxes(item.boxes, item.spacing_mm)
    return {"image": image, "mask": mask, "box": [[round(float(v), 4) for v in b] for b in boxes],
            "label": [0] * len(boxes), "name": item.name, "source": item.source, "split": item.split,
            "spacing_mm": [float(v) for v in item.spacing_mm]}


def write_datalist(root: Path, entries: list[dict], info: dict) -> Path:
    """datalist.json: ``training`` / ``validation`` lists by each entry's split (dataset order)."""
    data = {"description": "nodulesynth lung-nodule slices for MONAI detection (2-D)", "box_mode": BOX_MODE,
            "coordinates": COORDINATES, "spatial_dims": 2, "labels": {"0": "nodule"}, **info,
            "training": [e for e in entries if e["split"] == "train"]}
    val = [e for e in entries if e["split"] == "val"]
    if val:
        data["validation"] = val
    path = Path(root) / "datalist.json"
    write_json(path, data)
    return path


def read_datalist_records(root: str | os.PathLike) -> dict[str, dict]:
    """name → entry of a written datalist.json (used by merge)."""
    data = json.loads((Path(root) / "datalist.json").read_text())
    return {e["name"]: e for key in ("training", "validation") for e in data.get(key, [])}


def boxes_of(entry: dict) -> np.ndarray:
    return np.asarray(entry["box"], np.float64).reshape(-1, 4)
