"""DICOM studies in the service: a zipped study is imported as ``tumorseg predict`` imports one
(:mod:`tumorseg.dicom.prepare`: series picked, co-registered to T1ce, brain extracted, written as a
``brats2021`` case), segmented by the served model, and answered as a DICOM Segmentation referencing
its T1ce series (with the labels on the T1ce grid as NIfTI, and the imported case for the viewer).

The brain-extraction network (``dicom.brain.model``) is loaded at the first study and kept, as the
tumour model is; while it cannot be loaded a study gets HTTP 503 saying what to do.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorseg.errors import DataError, TumorsegError, first_line
from tumorseg.serving.uploads import UploadRejected

if TYPE_CHECKING:
    from tumorseg.serving.service import Service

log = logging.getLogger("tumorseg.serving.app")  # one logger name for the whole service

IMPORTED_DIR = "imported"
OUTPUT_DIR = "dicom-out"
DICOM_SEG_MEDIA_TYPE = "application/dicom"


class BrainModelMissing(TumorsegError):
    """A DICOM study while the brain-extraction network cannot be loaded (HTTP 503)."""

    status_code = 503


@dataclass
class BrainSlot:
    """The brain-extraction network ``uri`` names (``dicom.brain.model``), loaded at its first use and
    kept; a failed load is tried again at the next study (a model trained meanwhile is then found)."""

    uri: str
    tracking_uri: str
    extractor: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def require(self) -> Any:
        """The :class:`~tumorseg.dicom.brain.BrainExtractor`, or :class:`BrainModelMissing`."""
        with self.lock:  # pool threads: loaded once
            if self.extractor is None:
                from tumorseg.dicom.brain import load_brain_extractor

                try:
                    self.extractor = load_brain_extractor(self.uri, tracking_uri=self.tracking_uri)
                except DataError as exc:
                    message = first_line(exc, 400)
                    if self.uri not in message:
                        message = f"{self.uri}: {message}"
                    raise BrainModelMissing(
                        f"DICOM studies need the brain-extraction model, which cannot be loaded ({message}); "
                        "run `tumorseg train-brain`, or set dicom.brain.model to a brain.pt checkpoint, "
                        "and send the study again"
                    ) from None
                log.info("DICOM studies: brain extraction by %s", self.extractor.description)
            return self.extractor

    def info(self) -> dict[str, Any]:
        """What ``/health`` reports: the URI and, once loaded, what it is."""
        loaded = self.extractor
        return {
            "brain_model": self.uri,
            "loaded": loaded is not None,
            "description": None if loaded is None else loaded.description,
        }


def one_study(folder: Path, cfg: Any) -> Any:
    """The one study under ``folder`` (its series classified), else :class:`UploadRejected`."""
    from tumorseg.dicom.series import scan

    studies = scan(folder, cfg.classify)
    if len(studies) != 1:
        named = "; ".join(study.label for study in studies[:3])
        raise UploadRejected(
            f"the zip holds {len(studies)} DICOM studies ({named}); zip one study per request"
        )
    return studies[0]


def model_identity(model_info: dict[str, Any]) -> tuple[str, str]:
    """``(name, version)`` of the served model for the SEG's algorithm identification."""
    version = model_info.get("version") or model_info.get("alias") or "unversioned"
    return str(model_info.get("name") or "tumorseg"), str(version)


def predict_study(service: Service, folder: Path, workdir: Path, keep: bool) -> dict[str, Any]:
    """:meth:`~tumorseg.serving.service.Service.run_job` for a DICOM study in ``folder``: imported into
    ``workdir``, segmented like an uploaded case, its labels brought back onto the T1ce series.

    Returns the job's result with ``files`` holding the DICOM-SEG (``dicom-seg``, the default answer)
    and the T1ce-geometry NIfTI (``nifti``); the summary's ``dicom`` names the series used. A study that
    cannot be imported is a one-line :class:`~tumorseg.dicom.series.DicomInputError` naming its series.
    """
    from tumorseg.dicom.outputs import write_reference_outputs
    from tumorseg.dicom.prepare import import_study
    from tumorseg.dicom.series import pick_series

    cfg = service.dicom
    start = time.perf_counter()
    study = one_study(folder, cfg)
    pick_series(study)  # a study without one of the four sequences is refused before any model loads
    scanned = time.perf_counter() - start
    brain = service.brain.require()
    case = import_study(study, workdir / IMPORTED_DIR, cfg, brain, source_root=folder)
    result, prediction = service.predict_volume(workdir / IMPORTED_DIR, workdir, keep)

    start = time.perf_counter()
    name, version = model_identity(service.model_info)
    nifti, seg = write_reference_outputs(
        case,
        prediction.canonical,
        prediction.label_convention,
        workdir / OUTPUT_DIR,
        folder,
        model_name=name,
        model_version=version,
    )
    seg_bytes, nifti_bytes = seg.read_bytes(), nifti.read_bytes()
    steps = {"scan": scanned, **case.seconds, "write_seg": time.perf_counter() - start}

    summary = result["summary"]
    summary["seconds"] = {
        **{f"dicom_{step}": round(value, 3) for step, value in steps.items()},
        **summary["seconds"],
    }
    reference = case.reference
    summary["dicom"] = {
        "series": {modality: series.label for modality, series in case.picked.items()},
        "t1ce_series_uid": case.picked["t1ce"].uid,
        "t1ce_grid": {  # columns, rows, slices (the series' own order)
            "size": [int(n) for n in reference.size],
            "spacing_mm": [round(float(s), 4) for s in reference.spacing],
        },
        "seg_file": seg.name,
        "nifti_file": nifti.name,
    }
    result["files"] = {
        "dicom-seg": (seg_bytes, seg.name, DICOM_SEG_MEDIA_TYPE),
        "nifti": (nifti_bytes, nifti.name, "application/gzip"),
    }
    result.update(
        segmentation=seg_bytes, file_name=seg.name, format="dicom-seg", media_type=DICOM_SEG_MEDIA_TYPE
    )
    if keep:
        result["display"].attach_dicom_seg(seg_bytes, seg.name, case.reference, case.grid)
    log.info(
        "DICOM study %s: %s", case.case_id, ", ".join(f"{k} {v:.1f} s" for k, v in summary["seconds"].items())
    )
    return result
