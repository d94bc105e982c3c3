"""DICOM export: one CT Image Storage file per slice (images/NAME.dcm) and, where the slice has
nodules and highdicom is installed, a DICOM SEG of its nodule pixels (seg/NAME.dcm).

Unmistakably synthetic and never a real patient's: every UID is new, derived (pydicom
``generate_uid`` with entropy) from the dataset key (model revision, seed, conditions) and the
slice name, so a rerun or a sharded run writes the same UIDs, and nothing is copied from the real
data. ImageType DERIVED\\SECONDARY, BurnedInAnnotation NO, PatientIdentityRemoved YES, and
PatientName (SYNTHETIC^nodulesynth) and SeriesDescription say "SYNTHETIC nodulesynth";
DeidentificationMethod names the model and its revision. Real slices mixed in are labelled as real
(PatientName REAL^<patient>), keep their own pixel spacing and carry their provenance (source, series, z) in
ImageComments; a real slice carrying nodules the model placed stays its patient's and says so
(DeidentificationMethod, SeriesDescription, DerivationDescription; its SEG is AUTOMATIC). Pixels are int16 HU (RescaleSlope 1, RescaleIntercept 0); geometry as in
``export.volume`` (identity orientation, pixel (0, 0) centre at the origin). Every slice is its own
series (SeriesNumber = its position + 1, shared by its SEG) in one study per source or real patient.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..hu import LUNG_WINDOW
from ..masks.classes import MaskClass

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SYNTHETIC_NAME = "SYNTHETIC^nodulesynth"  # PersonName: family SYNTHETIC, given nodulesynth
SYNTHETIC_TEXT = "SYNTHETIC nodulesynth"
DESCRIBE = {"synthetic": "SYNTHETIC: generated", "real": "REAL slice exported", "real+nodules": "REAL slice + SYNTHETIC nodules"}


@dataclass(frozen=True)
class DicomContext:
    """What every file of one dataset shares (picklable: it travels to the export workers)."""

    dataset_key: str  # model revision + seed + conditions: the UIDs' entropy
    model: str
    revision: str
    version: str
    date: str = ""  # YYYYMMDD of the run (StudyDate); "" → today

    def uid(self, *parts: str) -> str:
        from pydicom.uid import generate_uid

        return str(generate_uid(entropy_srcs=["nodulesynth", self.dataset_key, *map(str, parts)]))


def _kind(item) -> str:
    """"synthetic" (generated or mask-in), "real", or "real+nodules": a real patient's slice carrying
    nodules the model placed (`generate --real --add-nodules`, `--synthetic inserted`)."""
    if item.provenance.get("source") == "real+lidc-nodules":
        return "real+nodules"
    return "real" if item.source == "real" else "synthetic"


def _group(item) -> tuple[str, str, str]:
    """(uid group, PatientName, PatientID) of an item: synthetic, mask-in, or one real patient (whose
    slices with inserted nodules are that patient's too: their pixels are)."""
    if _kind(item) != "synthetic":
        patient = str(item.provenance.get("patient") or item.provenance.get("series_uid") or "unknown")
        return f"real:{patient}", f"REAL^{patient}"[:64], f"REAL-{patient}"[:64]
    return item.source, SYNTHETIC_NAME, f"NODULESYNTH-{item.source.upper()}"


def ct_dataset(item, ctx: DicomContext):
    """The pydicom FileDataset of one ``ExportItem``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    group, patient_name, patient_id = _group(item)
    sop = ctx.uid("sop", item.name)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    date = ctx.date or _dt.date.today().strftime("%Y%m%d")
    kind = _kind(item)
    synthetic = kind == "synthetic"
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
    ds.Modality = "CT"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [  # LO values (≤ 64 chars each): what made it, and from which weights
        f"{DESCRIBE[kind]} by nodulesynth {ctx.version}"[:64],
        f"model revision {ctx.revision}"[:64], f"model {ctx.model}"[:64]]
    ds.BurnedInAnnotation = "NO"
    # one study per group; every slice its own series and frame of reference: the slices are separate
    # images, not a volume, and tools that stack a series (dcm2niix, Slicer, SimpleITK's series
    # reader) would otherwise make one "volume" of unrelated slices all at position 0
    ds.StudyInstanceUID = ctx.uid("study", group)
    ds.SeriesInstanceUID = ctx.uid("series", item.name)
    ds.FrameOfReferenceUID = ctx.uid("frame", item.name)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", ""
    ds.StudyDescription = SYNTHETIC_TEXT if synthetic else "REAL slices via nodulesynth"
    ds.SeriesDescription = (f"{SYNTHETIC_TEXT} {item.source}" if synthetic
                            else f"REAL {item.provenance.get('real_source', item.provenance.get('source', ''))} slice"
                            + (" + SYNTHETIC nodules via nodulesynth" if kind == "real+nodules" else "s via nodulesynth"))[:64]
    ds.SeriesNumber = int(item.position) + 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "nodulesynth"
    ds.ManufacturerModelName = f"TSGAN {ctx.model}"[:64]
    ds.SoftwareVersions = f"nodulesynth {ctx.version}"
    ds.PositionReferenceIndicator = ""
    ds.ImageComments = "; ".join(f"{k}={v}" for k, v in item.provenance.items())[:10240]
    if not synthetic:
        ds.DerivationDescription = "real CT slice resampled to the dataset grid by nodulesynth prepare" + (
            "; LIDC nodule outlines placed and drawn by nodulesynth" if kind == "real+nodules" else "")
    dy, dx = (float(v) for v in item.spacing_mm)
    ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]  # DICOM order: row spacing, column spacing
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.SliceThickness = ""
    ds.KVP, ds.AcquisitionNumber = "", ""
    lo, hi = LUNG_WINDOW
    ds.WindowCenter, ds.WindowWidth = f"{(lo + hi) / 2:g}", f"{hi - lo:g}"
    hu = np.round(np.asarray(item.hu)).astype(np.int16)
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
    ds.PixelData = hu.tobytes()
    return ds


SEG_DESCRIPTION = {"synthetic": f"{SYNTHETIC_TEXT} nodule SEG", "real": "REAL nodule SEG",
                   "real+nodules": "REAL nodule SEG (model-placed nodules)"}


def seg_dataset(ct, mask: np.ndarray, ctx: DicomContext, name: str, kind: str):
    """A highdicom binary SEG of the nodule pixels referencing ``ct`` (None when highdicom is absent);
    ``kind`` (:func:`_kind`): any but "real" holds nodules the model placed, an automatic segmentation."""
    try:
        import highdicom as hd
    except ImportError:
        return None
    from pydicom.sr.codedict import codes

    if kind != "real":  # a nodule is the model's: an automatic segmentation
        how = dict(algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                   algorithm_identification=hd.AlgorithmIdentificationSequence(
                       name="nodulesynth TSGAN", version=ctx.revision[:64], family=codes.DCM.ArtificialIntelligence))
    else:  # a real slice's nodule comes from the readers' annotations
        how = dict(algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="nodule", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule, **how)
    seg = hd.seg.Segmentation(
        source_images=[ct], pixel_array=(np.asarray(mask) == MaskClass.NODULE)[None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[desc],
        series_instance_uid=ctx.uid("seg-series", str(ct.SeriesInstanceUID)), series_number=int(ct.SeriesNumber),
        sop_instance_uid=ctx.uid("seg", name), instance_number=int(ct.InstanceNumber),
        manufacturer="nodulesynth", manufacturer_model_name=f"TSGAN {ctx.model}"[:64],
        software_versions=f"nodulesynth {ctx.version}", device_serial_number="none",
        series_description=SEG_DESCRIPTION[kind],
    )
    # highdicom stamps the wall clock and a random dimension-organisation UID; pin them so reruns and
    # sharded runs write identical files (the CT slices' dates are pinned the same way)
    date = ctx.date or str(ct.ContentDate)
    seg.InstanceCreationDate = seg.ContentDate = date
    seg.InstanceCreationTime = seg.ContentTime = "000000"
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + "000000"
    dim_uid = ctx.uid("dimension-organisation", name)
    for seq in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in seg.get(seq, []):
            item.DimensionOrganizationUID = dim_uid
    return seg


def dicom_item(root: Path, item, ctx: DicomContext) -> dict:
    """Write one ``ExportItem`` as images/NAME.dcm (+ seg/NAME.dcm); return the relative paths."""
    root = Path(root)
    ct = ct_dataset(item, ctx)
    image = f"images/{item.name}.dcm"
    ct.save_as(root / image, enforce_file_format=True)
    rec = {"image": image, "seg": None}
    if len(np.asarray(item.boxes).reshape(-1, 4)):
        seg = seg_dataset(ct, item.mask, ctx, item.name, _kind(item))
        if seg is not None:
            rec["seg"] = f"seg/{item.name}.dcm"
            seg.save_as(root / rec["seg"])
    return rec


def make_folders(root: Path) -> None:
    for d in ("images", "seg"):
        (Path(root) / d).mkdir(parents=True, exist_ok=True)
