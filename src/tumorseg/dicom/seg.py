"""DICOM Segmentation (DICOM-SEG) objects out, and back in, with highdicom.

:func:`write_dicom_seg` stores a case's internal label volume as one BINARY Segmentation instance
referencing the source series: one segment per region of the label set (``WT``, ``TC``, ``ET``, ...),
overlapping as the regions do. :func:`read_dicom_seg` returns each segment's mask in the source's
slice order.

Segment codes (:data:`REGION_CODES`)
------------------------------------
Every segment has the segmented property category SNOMED CT 49755003 "Morphologically Abnormal
Structure" and a property type taken from the DICOM context groups for lesion segmentation (CID 7159
"Lesion Segmentation Types", CID 7168/7169 "Brain Lesion Segmentation Types With/Without Necrosis",
which were drawn up for the BraTS sub-regions). All codes are pydicom's own concepts
(:data:`pydicom.sr.codedict.codes`), none is typed in by hand:

=====  ==============================  =========================================================
name   meaning                         property type
=====  ==============================  =========================================================
WT     whole tumour                    SCT 108369006 Neoplasm
TC     tumour core                     SCT 4147007 Mass (the tumour bulk, without the oedema)
ET     enhancing tumour                NCIt C113842 Enhancing Lesion (CID 7159/7169; SNOMED CT
                                       has no "enhancing" concept)
NCR    necrotic tumour core            SCT 6574001 Necrosis
NETC   non-enhancing tumour core       NCIt C81175 Non-Enhancing Lesion (CID 7159/7169)
ED     peritumoural oedema             SCT 79654002 Edema
SNFH   surrounding non-enhancing       SCT 79654002 Edema (CID 7169 uses the generic oedema
       FLAIR hyperintensity            concept for the peritumoural FLAIR signal)
CC     cystic component                SCT 367643001 Cyst
RC     resection cavity                SCT 245849007 Post-surgical anatomy (neither SNOMED CT
                                       nor DICOM has a "resection cavity" concept; the segment
                                       label says which)
=====  ==============================  =========================================================

WT and TC carry different codes so a reader can tell the nested regions apart by code alone. The
segment label is the region name and its meaning ("WT whole tumour"); :func:`read_dicom_seg` keys
segments by the name before the first space.

What the object holds
---------------------
highdicom copies the patient, study and specimen modules (and the frame of reference and plane
geometry a SEG must repeat) from the source; nothing else of the source is copied. The equipment is
Manufacturer "tumorseg" with tumorseg's version, the algorithm (AUTOMATIC, family "Artificial
Intelligence") is the model's name and version. Every segment has one frame per source slice,
empty frames included: a region absent from the whole case is a described segment whose frames are
all zero (a reader sees "no enhancing tumour", never a missing segment) and a tumour-free case is a
valid SEG of empty frames. At 1 bit per pixel a 240 x 240 x 155 case with 3 regions is about 3.6 MB
(about 1 MB with ``omit_empty_frames``, when the tumour spans some 60 slices).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import tumorseg
from tumorseg.data.conventions import LabelSet

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
"""SOP Class UID of (BINARY and FRACTIONAL) Segmentation Storage."""

MANUFACTURER = "tumorseg"

REGION_CATEGORY: Code = codes.SCT.MorphologicallyAbnormalStructure
"""Segmented property category of every segment (SNOMED CT 49755003)."""

REGION_CODES: dict[str, tuple[Code, Code]] = {
    "WT": (REGION_CATEGORY, codes.SCT.Neoplasm),
    "TC": (REGION_CATEGORY, codes.SCT.Mass),
    "ET": (REGION_CATEGORY, codes.NCIt.EnhancingLesion),
    "NCR": (REGION_CATEGORY, codes.SCT.Necrosis),
    "NETC": (REGION_CATEGORY, codes.NCIt.NonEnhancingLesion),
    "ED": (REGION_CATEGORY, codes.SCT.Edema),
    "SNFH": (REGION_CATEGORY, codes.SCT.Edema),
    "CC": (REGION_CATEGORY, codes.SCT.Cyst),
    "RC": (REGION_CATEGORY, codes.SCT.PostSurgicalAnatomy),
}
"""Region (or label) name -> (segmented property category, segmented property type); the module
docstring says why each was chosen."""

REGION_MEANINGS: dict[str, str] = {
    "WT": "whole tumour",
    "TC": "tumour core",
    "ET": "enhancing tumour",
    "NCR": "necrotic tumour core",
    "NETC": "non-enhancing tumour core",
    "ED": "peritumoural oedema",
    "SNFH": "surrounding non-enhancing FLAIR hyperintensity",
    "CC": "cystic component",
    "RC": "resection cavity",
}
"""Region (or label) name -> the words after it in the segment label."""

# Patient and study attributes highdicom reads from the first source slice (Type 2 in every image
# IOD: present, possibly empty).
_SOURCE_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "Rows",
    "Columns",
)


def software_version() -> str:
    """tumorseg's version: ``tumorseg.__version__``, else the installed distribution's."""
    version = getattr(tumorseg, "__version__", None)
    if version:
        return str(version)
    try:
        return metadata.version("tumorseg")
    except metadata.PackageNotFoundError:
        return "unknown"


def segment_label(name: str) -> str:
    """The segment label of a region: its name and meaning ("WT whole tumour")."""
    meaning = REGION_MEANINGS.get(name)
    return f"{name} {meaning}" if meaning else name


def _check_source(source: Sequence[pydicom.Dataset]) -> tuple[int, int, int]:
    """(slices, rows, cols) of a single-frame source series, or ValueError."""
    if len(source) == 0:
        raise ValueError("the source series has no slices")
    missing = [k for k in _SOURCE_KEYWORDS if k not in source[0]]
    if missing:
        raise ValueError(f"source slice 0 lacks {', '.join(missing)}, which a DICOM-SEG needs")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in source}
    if len(series) != 1:
        raise ValueError(f"the source slices come from {len(series)} series; a SEG references one")
    uids = [str(ds.get("SOPInstanceUID", "")) for ds in source]
    if len(set(uids)) != len(uids):
        raise ValueError("the source slices repeat a SOPInstanceUID")
    if any(int(ds.get("NumberOfFrames", 1) or 1) != 1 for ds in source):
        raise ValueError("the source must be single-frame slices (one instance per slice)")
    return len(source), int(source[0].Rows), int(source[0].Columns)


def _check_labels(labels: np.ndarray, shape: tuple[int, int, int], label_set: LabelSet) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != shape:
        raise ValueError(
            f"labels have shape {labels.shape} but the source series is {shape} (slices, rows, cols)"
        )
    if labels.dtype.kind not in "biu":
        raise ValueError(f"labels must be integer codes, got dtype {labels.dtype}")
    if labels.dtype.kind in "iu" and labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"labels hold values outside 0..255 (min {labels.min()}, max {labels.max()})")
    values = np.flatnonzero(np.bincount(labels.astype(np.uint8, copy=False).ravel(), minlength=256))
    unknown = sorted(set(values.tolist()) - set(label_set.labels))
    if unknown:
        raise ValueError(
            f"labels hold codes {unknown} that label set {label_set.name} does not have "
            f"({sorted(label_set.labels)})"
        )
    return labels


def _segment_descriptions(
    label_set: LabelSet, model_name: str, model_version: str
) -> list[hd.seg.SegmentDescription]:
    unknown = [name for name in label_set.region_names if name not in REGION_CODES]
    if unknown:
        raise ValueError(
            f"label set {label_set.name} has regions {unknown} without DICOM codes; "
            f"REGION_CODES knows {sorted(REGION_CODES)}"
        )
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name, family=codes.DCM.ArtificialIntelligence, version=model_version
    )
    descriptions = []
    for number, region in enumerate(label_set.train_regions, start=1):
        category, prop_type = REGION_CODES[region.name]
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment_label(region.name),
            segmented_property_category=category,
            segmented_property_type=prop_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        members = " + ".join(label_set.labels[c] for c in region.codes)
        description.SegmentDescription = f"{segment_label(region.name)} ({members})"
        descriptions.append(description)
    return descriptions


def write_dicom_seg(
    labels: np.ndarray,
    source: Sequence[pydicom.Dataset],
    out_path: Path,
    *,
    label_set: LabelSet,
    model_name: str,
    model_version: str,
    series_number: int = 900,
    series_description: str = "tumorseg tumour regions",
    omit_empty_frames: bool = False,
) -> Path:
    """Write ``labels`` as a BINARY DICOM-SEG of ``source`` at ``out_path`` (atomically) and return it.

    Args:
        labels: internal label codes of ``label_set``, indexed (slice, row, column) like SimpleITK's
            ``GetArrayFromImage`` of the series read in the order given: ``labels[k]`` is ``source[k]``.
        source: the single-frame slices (pixel data not needed) of one series.
        out_path: the ``.dcm`` written; written beside it first and moved into place, so an
            interrupted write never leaves a complete-looking file.
        label_set: one segment per region (``label_set.regions``), coded as in :data:`REGION_CODES`.
        model_name, model_version: the AlgorithmIdentificationSequence of every segment.
        series_number, series_description: of the new SEG series.
        omit_empty_frames: leave out frames with no pixel of their segment (smaller files; a region
            absent from the whole case is then a segment without frames). Off by default: every
            segment has a frame for every slice.

    Raises:
        ValueError: ``labels`` do not match the source's (slices, rows, cols), hold codes outside the
            label set, or the source is not one series of single-frame slices.
    """
    shape = _check_source(source)
    labels = _check_labels(labels, shape, label_set)
    descriptions = _segment_descriptions(label_set, model_name, model_version)
    # stacked-segments layout: (slices, rows, cols, segments), segment i + 1 in [..., i]
    pixels = np.ascontiguousarray(np.moveaxis(label_set.regions(labels), 0, -1), dtype=np.uint8)
    version = software_version()
    segmentation = hd.seg.Segmentation(
        source_images=list(source),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=version,
        device_serial_number=version,  # Type 1; no hardware: the software build is the device
        content_label="TUMOUR_REGIONS",
        content_description=f"{label_set.name} regions, {model_name} {model_version}"[:64],
        series_description=series_description[:64],
        omit_empty_frames=omit_empty_frames,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL on a unique name (not mkstemp): the file gets the umask's mode, as a plain open would
    temporary = out_path.with_name(f".{out_path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(handle, "wb") as stream:
            segmentation.save_as(stream, enforce_file_format=True)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, out_path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return out_path


def _region_name(label: str) -> str:
    """The region a segment label names: the word before the first space when it is a known region
    ("WT whole tumour" -> "WT"), else the whole label."""
    head = label.split(" ", 1)[0]
    return head if head in REGION_CODES else label


def read_dicom_seg(path: Path, source: Sequence[pydicom.Dataset]) -> dict[str, np.ndarray]:
    """Region name -> bool mask (slices, rows, cols) of the DICOM-SEG at ``path``, slice ``k`` being
    ``source[k]`` (the order the masks were written in need not be the source's).

    Raises:
        ValueError: the file is not a Segmentation, does not reference the source series (or all of
            its slices), or two segments name the same region.
    """
    path = Path(path)
    if len(source) == 0:
        raise ValueError("the source series has no slices")
    try:
        segmentation = hd.seg.segread(path)
    except (ValueError, InvalidDicomError) as exc:
        raise ValueError(f"{path} is not a readable DICOM Segmentation: {exc}") from None
    series_uid = str(source[0].SeriesInstanceUID)
    referenced = {(str(series), str(sop)) for _, series, sop in segmentation.get_source_image_uids()}
    wanted = [str(ds.SOPInstanceUID) for ds in source]
    if not any(series == series_uid for series, _ in referenced):
        series_found = sorted({series for series, _ in referenced})
        raise ValueError(f"{path} references series {series_found}, not the source series {series_uid}")
    unreferenced = [uid for uid in wanted if (series_uid, uid) not in referenced]
    if unreferenced:
        raise ValueError(
            f"{path} does not reference {len(unreferenced)} of the {len(wanted)} source slices "
            f"of series {series_uid} (first: {unreferenced[0]})"
        )
    numbers = list(segmentation.segment_numbers)
    names = [_region_name(str(segmentation.get_segment_description(n).SegmentLabel)) for n in numbers]
    if len(set(names)) != len(names):
        raise ValueError(f"{path} has segments naming the same region: {names}")
    pixels = segmentation.get_pixels_by_source_instance(
        source_sop_instance_uids=wanted,
        segment_numbers=numbers,
        # frames a writer left out (omit_empty_frames) are empty; every slice was checked above
        assert_missing_frames_are_empty=True,
        skip_overlap_checks=True,
    )
    fractional = segmentation.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    masks = pixels >= 0.5 if fractional else pixels > 0
    return {name: np.ascontiguousarray(masks[..., index]) for index, name in enumerate(names)}
