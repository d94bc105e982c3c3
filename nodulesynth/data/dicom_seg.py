"""DICOM Segmentation objects (SEG) → lesion labels on the CT series they reference.

Public collections ship nodule and tumour outlines as DICOM SEG beside the CT (LIDC-IDRI's readers'
outlines, NSCLC-Radiomics' GTVs): one file per annotation, each frame one segment on one slice,
placed by its ImagePositionPatient. ``prepare --dicom`` gives such a series a label volume, so it is
prepared like ``--volume IMG --label LBL``.

Only lesion segments become nodule pixels: a segment whose category is "morphologically abnormal
structure" (SCT 49755003) or whose type is a lesion code, or, without codes, whose label names a
nodule, lesion, tumour, mass or GTV. Anatomy segments (lungs, heart) of the same file are left out
and counted: a lung outline labelled as a nodule would be implausible training data. A frame must
lie on a slice of the series, on its pixel grid; anything else is one error naming the file. A frame
that names its source image (DerivationImageSequence, as highdicom and dcmqi write) goes to that
image; one that does not, to the slice at its position.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import NoduleSynthError

log = logging.getLogger(__name__)

SEG_HEADER_TAGS = ["Modality", "SOPClassUID", "ReferencedSeriesSequence", "PatientID"]
ABNORMAL_CATEGORY = "49755003"  # SCT "Morphologically abnormal structure": lesions of any kind
LESION_TYPES = {
    "27925004",  # Nodule
    "52988006",  # Lesion
    "108369006",  # Neoplasm / tumour
    "86049000",  # Malignant neoplasm, primary
    "4147007",  # Mass
    "126713003",  # Neoplasm of lung
    "363358000",  # Malignant tumour of lung
}
LESION_LABEL = re.compile(r"nodul|lesion|tumou?r|mass|gtv|neoplas|cancer|carcinom", re.IGNORECASE)


@dataclass
class SegRef:
    """One SEG file (headers only): the series it segments and its lesion frames."""

    path: Path
    series_uid: str
    orientation: tuple[float, ...] | None  # shared ImageOrientationPatient, if the file states one
    lesion_frames: list[tuple[int, np.ndarray, str, int | None]] = field(default_factory=list)
    # (frame index, its ImagePositionPatient, source SOPInstanceUID or "", source frame number or None)
    other_segments: list[str] = field(default_factory=list)  # labels of the segments left out


def _code(seq) -> str:
    return str(getattr(seq[0], "CodeValue", "") or "") if seq else ""


def is_lesion_segment(item) -> bool:
    """The rule in the module docstring for one SegmentSequence item."""
    category = _code(getattr(item, "SegmentedPropertyCategoryCodeSequence", None))
    kind = _code(getattr(item, "SegmentedPropertyTypeCodeSequence", None))
    if category or kind:
        return category == ABNORMAL_CATEGORY or kind in LESION_TYPES
    return bool(LESION_LABEL.search(str(getattr(item, "SegmentLabel", "") or "")))


def frame_macro(ds, i: int | None, name: str):
    """The first item of functional-group macro ``name`` for frame i of a multi-frame file (Enhanced
    CT, SEG): per-frame groups first, then the shared ones (PS3.3 C.7.6.16); None when neither holds
    it, or for a single-slice file (i None)."""
    if i is None:
        return None
    for groups, k in (("PerFrameFunctionalGroupsSequence", i), ("SharedFunctionalGroupsSequence", 0)):
        items = getattr(ds, groups, None) or []
        if len(items) > k and name in items[k] and len(items[k][name].value):
            return items[k][name].value[0]
    return None


def read_seg_header(path: Path) -> SegRef:
    """The series a SEG file references, its lesion segments' frames and where they lie."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        series = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
        segments = list(ds.SegmentSequence)
        n = int(ds.NumberOfFrames)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for broken files
        raise NoduleSynthError(f"{path}: DICOM SEG without a readable ReferencedSeriesSequence, SegmentSequence "
                               f"and NumberOfFrames ({e})") from e
    lesion = {int(item.SegmentNumber) for item in segments if is_lesion_segment(item)}
    ori = frame_macro(ds, 0, "PlaneOrientationSequence")
    ref = SegRef(path, series, None if ori is None else tuple(float(v) for v in ori.ImageOrientationPatient),
                 other_segments=[str(getattr(it, "SegmentLabel", "") or it.SegmentNumber) for it in segments
                                 if int(it.SegmentNumber) not in lesion])
    for i in range(n):
        seg_id, plane = frame_macro(ds, i, "SegmentIdentificationSequence"), frame_macro(ds, i, "PlanePositionSequence")
        if seg_id is None or plane is None or getattr(plane, "ImagePositionPatient", None) is None:
            raise NoduleSynthError(f"{path}: frame {i + 1} has no segment number or no ImagePositionPatient")
        if int(seg_id.ReferencedSegmentNumber) in lesion:
            ref.lesion_frames.append((i, np.asarray([float(v) for v in plane.ImagePositionPatient]), *_source(ds, i)))
    return ref


def _source(ds, i: int) -> tuple[str, int | None]:
    """(SOPInstanceUID, frame number or None) of the CT image frame i was derived from; ("", None)
    when the SEG does not say."""
    der = frame_macro(ds, i, "DerivationImageSequence")
    src = getattr(der, "SourceImageSequence", None) if der is not None else None
    if not src:
        return "", None
    from pydicom.multival import MultiValue

    n = src[0].get("ReferencedFrameNumber")
    n = None if n in (None, "") else int(n[0] if isinstance(n, MultiValue) else n)
    return str(src[0].get("ReferencedSOPInstanceUID", "") or ""), n


def forget_unknown_sources(seg: SegRef, sops: set[str]) -> None:
    """Frames whose source image is not among ``sops`` (the series' images: the CT re-exported with
    new UIDs, say) are placed by their position instead."""
    seg.lesion_frames = [(i, ipp, sop if sop in sops else "", fr if sop in sops else None)
                         for i, ipp, sop, fr in seg.lesion_frames]


def match_frames(seg: SegRef, slices, orientation) -> dict[int, int]:
    """{SEG frame index: slice index} for the lesion frames of ``seg`` that lie on one of ``slices``
    (a volume run's ``_Slice`` list along the normal, oriented ``orientation``) and on its pixel grid;
    a frame on a slice but off its grid, or oriented otherwise, is an error naming the file."""
    if seg.orientation is not None and not np.allclose(seg.orientation, orientation, atol=1e-3):
        raise NoduleSynthError(f"{seg.path}: SEG frames are oriented {list(seg.orientation)}, its CT series "
                               f"{list(orientation)}; only segmentations on the CT's own slices are read")
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    pos = np.asarray([s.position for s in slices])
    tol = 0.1 * float(np.median(np.diff(pos))) if len(pos) > 1 else max(0.1 * (slices[0].thickness or 1.0), 0.05)
    dy, dx = slices[0].pixel_spacing
    by_sop = {(s.sop, None if s.frame is None else s.frame + 1): k for k, s in enumerate(slices) if s.sop}
    out = {}
    for i, ipp, sop, frame in seg.lesion_frames:
        if sop:  # the frame names its source image: that slice, else another run's (or stack's)
            k = by_sop.get((sop, frame))
            if k is None:
                continue
            if abs(pos[k] - ipp @ normal) > tol:
                raise NoduleSynthError(f"{seg.path}: frame {i + 1} lies {ipp @ normal - pos[k]:+.2f} mm off its source image "
                                       f"{sop}; only segmentations on the CT's own slices are read")
        else:
            k = int(np.argmin(np.abs(pos - ipp @ normal)))
            if abs(pos[k] - ipp @ normal) > tol:
                continue
        off = ipp - slices[k].ipp
        if abs(off @ row) > 0.5 * dx or abs(off @ col) > 0.5 * dy:
            raise NoduleSynthError(f"{seg.path}: frame {i + 1} is shifted ({off @ row:.1f}, {off @ col:.1f}) mm in-plane "
                                   "from its CT slice; only segmentations on the CT's own pixel grid are read")
        out[i] = k
    return out


def seg_label(segs: list[SegRef], slices, orientation, shape: tuple[int, int]) -> np.ndarray:
    """Boolean (z, y, x) lesion label of one volume run: the union of its SEGs' lesion frames."""
    import pydicom

    out = np.zeros((len(slices), *shape), bool)
    for seg in segs:
        where = match_frames(seg, slices, orientation)
        if not where:
            continue
        ds = pydicom.dcmread(seg.path)
        if (int(ds.Rows), int(ds.Columns)) != tuple(shape):
            raise NoduleSynthError(f"{seg.path}: SEG frames are {ds.Rows}×{ds.Columns}, its CT series "
                                   f"{shape[0]}×{shape[1]}; only segmentations on the CT's own pixel grid are read")
        frames = ds.pixel_array
        frames = frames[None] if frames.ndim == 2 else frames
        if str(getattr(ds, "SegmentationType", "BINARY")).upper() == "FRACTIONAL":
            frames = frames >= 0.5 * float(getattr(ds, "MaximumFractionalValue", 255) or 255)
        for i, k in where.items():
            out[k] |= frames[i].astype(bool)
    return out
