"""DICOM annotation objects → lesion labels on the CT series they reference: Segmentations (SEG)
and RT Structure Sets (RTSTRUCT).

Public collections and hospitals ship nodule and tumour outlines beside the CT as SEG (LIDC-IDRI's
readers' outlines, NSCLC-Radiomics' GTVs; each frame one segment on one slice) or as RTSTRUCT (radiotherapy
planning: each ROI a stack of closed planar polygons in world mm). ``prepare --dicom`` gives such a
series a label volume, so it is prepared like ``--volume IMG --label LBL``.

Only lesions become nodule pixels. SEG: a segment whose category is "morphologically abnormal
structure" (SCT 49755003) or whose type is a lesion code, or, without codes, whose label names a
nodule, lesion, tumour, mass or GTV. RTSTRUCT: an ROI interpreted as GTV, or, without a type, whose
name says so (never a PTV/CTV/ITV: margins around a tumour are not tumour). Anatomy (lungs, heart,
organs at risk) of the same file is left out and counted: a lung outline labelled as a nodule would
be implausible training data. A frame or contour must lie on a slice of the series (a SEG frame also
on its pixel grid); anything else is one error naming the file. One that names its source image
(SEG: DerivationImageSequence, as highdicom and dcmqi write; RTSTRUCT: ContourImageSequence) goes
to that image; one that does not, to the slice at its position. Contours are filled by pixel
centre, several contours of one ROI on one slice even-odd (a hole is a contour inside another).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import NoduleSynthError
from ..masks.outlines import inside_polygon

log = logging.getLogger(__name__)

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
MARGIN_LABEL = re.compile(r"(^|[^a-z])(ptv|ctv|itv)|ring|shell|margin|expan", re.IGNORECASE)


@dataclass
class LabelRef:
    """One SEG or RTSTRUCT file: the series it annotates and where its lesion pieces lie."""

    path: Path
    series_uid: str
    orientation: tuple[float, ...] | None  # SEG: shared ImageOrientationPatient, if the file states one
    lesion_frames: list[tuple[int, np.ndarray, str, int | None]] = field(default_factory=list)
    # (frame or contour index, a point on its plane (SEG: ImagePositionPatient), source SOPInstanceUID
    # or "", source frame number or None)
    other_segments: list[str] = field(default_factory=list)  # labels of the segments / ROIs left out
    kind: str = "SEG"  # or "RTSTRUCT"
    contours: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)  # RTSTRUCT: index → (ROI, points (N, 3))


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


def read_label_header(path: Path, modality: str) -> LabelRef:
    """A SEG's or an RTSTRUCT's reference (``modality``: the file's Modality tag)."""
    return read_seg_header(path) if modality == "SEG" else read_rtstruct(path)


def read_seg_header(path: Path) -> LabelRef:
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
    ref = LabelRef(path, series, None if ori is None else tuple(float(v) for v in ori.ImageOrientationPatient),
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


def is_lesion_roi(name: str, interpreted_type: str) -> bool:
    """The RTSTRUCT rule in the module docstring for one ROI."""
    if interpreted_type:
        return interpreted_type.upper() == "GTV"
    return bool(LESION_LABEL.search(name)) and not MARGIN_LABEL.search(name)


def read_rtstruct(path: Path) -> LabelRef:
    """An RTSTRUCT's referenced series and its lesion ROIs' closed planar contours."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        try:  # some planning systems leave the series out and name only each contour's image
            series = str(ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
                         .RTReferencedSeriesSequence[0].SeriesInstanceUID)
        except (AttributeError, IndexError, KeyError):
            series = ""
        names = {int(r.ROINumber): str(getattr(r, "ROIName", "") or r.ROINumber) for r in ds.StructureSetROISequence}
        kinds = {int(o.ReferencedROINumber): str(getattr(o, "RTROIInterpretedType", "") or "")
                 for o in getattr(ds, "RTROIObservationsSequence", None) or []}
        rois = list(getattr(ds, "ROIContourSequence", None) or [])
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for broken files
        raise NoduleSynthError(f"{path}: RTSTRUCT without readable ROI sequences ({e})") from e
    lesion = {n for n, name in names.items() if is_lesion_roi(name, kinds.get(n, ""))}
    ref = LabelRef(path, series, None, kind="RTSTRUCT",
                   other_segments=[names[n] for n in sorted(names) if n not in lesion])
    for roi in rois:
        number = int(roi.ReferencedROINumber)
        if number not in lesion:
            continue
        for c in getattr(roi, "ContourSequence", None) or []:
            if str(getattr(c, "ContourGeometricType", "")).upper() != "CLOSED_PLANAR":
                continue  # a POINT or an open line outlines nothing
            pts = np.asarray([float(v) for v in c.ContourData], float).reshape(-1, 3)
            img = getattr(c, "ContourImageSequence", None) or []
            sop = str(img[0].get("ReferencedSOPInstanceUID", "") or "") if img else ""
            i = len(ref.contours)
            ref.contours[i] = (number, pts)
            ref.lesion_frames.append((i, pts.mean(axis=0), sop, None))
    if not series and ref.lesion_frames and not all(f[2] for f in ref.lesion_frames):
        raise NoduleSynthError(f"{path}: RTSTRUCT names neither its CT series (RTReferencedSeriesSequence) nor each "
                               "contour's image (ContourImageSequence); cannot tell which scan it outlines")
    return ref


def forget_unknown_sources(seg: LabelRef, sops: set[str]) -> None:
    """Frames whose source image is not among ``sops`` (the series' images: the CT re-exported with
    new UIDs, say) are placed by their position instead."""
    seg.lesion_frames = [(i, ipp, sop if sop in sops else "", fr if sop in sops else None)
                         for i, ipp, sop, fr in seg.lesion_frames]


def match_frames(seg: LabelRef, slices, orientation) -> dict[int, int]:
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
        if seg.kind == "RTSTRUCT":
            spread = np.ptp(seg.contours[i][1] @ normal)
            if spread > tol:
                raise NoduleSynthError(f"{seg.path}: contour {i + 1} spans {spread:.2f} mm across the slices; "
                                       "only closed planar contours on the CT's own slices are read")
            out[i] = k
            continue
        off = ipp - slices[k].ipp
        if abs(off @ row) > 0.5 * dx or abs(off @ col) > 0.5 * dy:
            raise NoduleSynthError(f"{seg.path}: frame {i + 1} is shifted ({off @ row:.1f}, {off @ col:.1f}) mm in-plane "
                                   "from its CT slice; only segmentations on the CT's own pixel grid are read")
        out[i] = k
    return out


def _fill(poly_yx: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside a polygon (even-odd rule), over its bounding box only."""
    out = np.zeros(shape, bool)
    y0, x0 = np.maximum(np.floor(poly_yx.min(axis=0)).astype(int), 0)
    y1, x1 = np.minimum(np.ceil(poly_yx.max(axis=0)).astype(int) + 1, shape)
    if y0 >= y1 or x0 >= x1:
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(float)
    pts = np.stack([xx.ravel(), yy.ravel()], 1)
    out[y0:y1, x0:x1] = inside_polygon(pts, np.asarray(poly_yx, float)[:, ::-1]).reshape(yy.shape)
    return out


def label_volume(placed: list[tuple[LabelRef, dict[int, int]]], slices, orientation,
                 shape: tuple[int, int]) -> np.ndarray:
    """Boolean (z, y, x) lesion label of one volume run: the union of its SEGs' lesion frames and its
    RTSTRUCTs' lesion contours (each ROI even-odd per slice); ``placed``: each file with its
    {frame or contour: slice} from :func:`match_frames`."""
    import pydicom

    out = np.zeros((len(slices), *shape), bool)
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    for ref, where in placed:
        if ref.kind == "RTSTRUCT":
            per_roi: dict[tuple[int, int], np.ndarray] = {}
            for i, k in where.items():
                roi, pts = ref.contours[i]
                rel = pts - slices[k].ipp
                dy, dx = slices[k].pixel_spacing
                acc = per_roi.setdefault((roi, k), np.zeros(shape, bool))
                acc ^= _fill(np.stack([rel @ col / dy, rel @ row / dx], axis=1), shape)
            for (_, k), m in per_roi.items():
                out[k] |= m
            continue
        ds = pydicom.dcmread(ref.path)
        if (int(ds.Rows), int(ds.Columns)) != tuple(shape):
            raise NoduleSynthError(f"{ref.path}: SEG frames are {ds.Rows}×{ds.Columns}, its CT series "
                                   f"{shape[0]}×{shape[1]}; only segmentations on the CT's own pixel grid are read")
        frames = ds.pixel_array
        frames = frames[None] if frames.ndim == 2 else frames
        if str(getattr(ds, "SegmentationType", "BINARY")).upper() == "FRACTIONAL":
            frames = frames >= 0.5 * float(getattr(ds, "MaximumFractionalValue", 255) or 255)
        for i, k in where.items():
            out[k] |= frames[i].astype(bool)
    return out
