"""A DICOM study in, the segmentation out in the T1ce series' own geometry: a NIfTI and a DICOM
Segmentation referencing the T1ce series (``tumorseg predict`` on a DICOM folder or zip).

The study is imported (:mod:`tumorseg.dicom.prepare`) into ``<out>/imported/<case_id>/``, predicted
on like any case (``<out>/<case_id>.nii.gz`` on the 1 mm grid), and each prediction is brought back
onto the T1ce series' grid: per label, the one-hot map is resampled linearly and the largest wins
(as ``preprocess.label_resampling: onehot_linear``), then written as
``<out>/<case_id>_t1ce.nii.gz`` and ``<out>/<case_id>_seg.dcm``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.dicom.prepare import Geometry, ImportedCase, matrix_transform

IMPORTED_DIR = "imported"
_DICM_OFFSET = 128


def looks_like_dicom(path: str | Path) -> bool:
    """Whether ``path`` is a zip, or a folder holding DICOM files (a ``DICM`` preamble or ``.dcm``),
    looking at no more than a few hundred files."""
    import zipfile

    p = Path(path)
    if p.is_file():
        return zipfile.is_zipfile(p)
    if not p.is_dir():
        return False
    for n, f in enumerate(x for x in p.rglob("*") if x.is_file()):
        if n >= 300:
            break
        if f.suffix.lower() in (".nii", ".gz", ".npz", ".json", ".csv", ".mat", ".png", ".jpg"):
            return False
        if f.suffix.lower() == ".dcm" or f.name.upper() == "DICOMDIR":
            return True
        try:
            with f.open("rb") as fh:
                fh.seek(_DICM_OFFSET)
                if fh.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False


def resample_labels(
    canonical: np.ndarray, source: Geometry, target: Geometry, transform: np.ndarray | None = None
) -> np.ndarray:
    """Labels on ``source`` (RAS-ordered ``(X, Y, Z)`` when ``source`` is RAS-aligned; in general
    indexed ``(i, j, k)``) -> ``target``, indexed ``(slice, row, column)`` (SimpleITK's array order).
    ``transform`` (4x4 LPS, target point -> source point) defaults to the identity. Per label the
    one-hot map is resampled linearly; the largest share wins, background when it is larger."""
    import SimpleITK as sitk

    ref = target.image(sitk.sitkFloat32)
    t = sitk.Transform(3, sitk.sitkIdentity) if transform is None else matrix_transform(transform)
    shape = tuple(reversed(target.size))
    best = np.zeros(shape, dtype=np.float32)
    out = np.zeros(shape, dtype=np.uint8)
    background = np.ones(shape, dtype=np.float32)
    for code in (int(c) for c in np.unique(canonical) if c != 0):
        onehot = source.image_of((canonical == code).astype(np.float32))
        prob = sitk.GetArrayFromImage(sitk.Resample(onehot, ref, t, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        background -= prob
        win = prob > best
        out[win] = code
        best[win] = prob[win]
    out[best <= background] = 0
    return out


def labels_to_reference(canonical: np.ndarray, case: ImportedCase) -> np.ndarray:
    """Internal-code labels on the case's grid -> the T1ce series' grid, indexed ``(slice, row,
    column)`` like the series' files in slice order (the case lives in the T1ce frame)."""
    return resample_labels(canonical, case.grid, case.reference)


def _atomic_sitk_write(image: Any, path: Path) -> None:
    import SimpleITK as sitk

    from tumorseg.data.synth import file_mode

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".nii.gz", dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, useCompression=True)
        os.chmod(tmp, file_mode(0o666))  # mkstemp's file is private; an output is not
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_reference_outputs(
    case: ImportedCase,
    canonical: np.ndarray,
    convention: str,
    out_dir: Path,
    source_root: Path,
    *,
    model_name: str,
    model_version: str,
) -> list[Path]:
    """``<case_id>_t1ce.nii.gz`` (labels in ``convention``, T1ce geometry) and ``<case_id>_seg.dcm``."""
    import pydicom
    import SimpleITK as sitk

    from tumorseg.data.conventions import get_convention
    from tumorseg.dicom.seg import write_dicom_seg

    labels = labels_to_reference(canonical, case)
    conv = get_convention(convention)
    image = case.reference.place(sitk.GetImageFromArray(conv.decode(labels).astype(np.uint8)))
    nifti = out_dir / f"{case.case_id}_t1ce.nii.gz"
    _atomic_sitk_write(image, nifti)
    source = [pydicom.dcmread(p) for p in case.t1ce_files]
    seg = write_dicom_seg(
        labels,
        source,
        out_dir / f"{case.case_id}_seg.dcm",
        label_set=conv.label_set,
        model_name=model_name,
        model_version=model_version,
    )
    return [nifti, seg]


@dataclass
class DicomPredictRun:
    """What ``predict`` on DICOM did: the imported cases, the prediction run, files and step times."""

    cases: list[ImportedCase] = field(default_factory=list)
    run: Any = None
    files: dict[str, list[Path]] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)

    def one_line(self) -> str:
        return f"predicted {len(self.cases)} DICOM studies -> DICOM-SEG and T1ce-geometry NIfTI"


def predict_dicom(
    input_path: str | Path,
    out_dir: str | Path,
    params: Any,
    *,
    model_uri: str | None = None,
    source: str = "params.yaml",
    tracking_uri: str | None = None,
    on_case: Callable[[Any, list[Path]], None] | None = None,
    progress: Callable[[str], None] = print,
) -> DicomPredictRun:
    """Import every study of ``input_path`` (folder or zip), segment it, write its T1ce-geometry
    outputs. Nothing is written for a study that fails to import (the error names its series)."""
    from tumorseg.dicom.brain import load_brain_extractor
    from tumorseg.dicom.prepare import import_studies
    from tumorseg.dicom.series import DicomInputError, dicom_folder
    from tumorseg.registry.predict import predict_folder
    from tumorseg.tracking import params_tracking_uri

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DicomInputError(f"{out}: exists and is not a folder; pass a folder for --out")
    uri = params_tracking_uri(params, tracking_uri, source=source)
    brain = load_brain_extractor(params.dicom.brain.model, tracking_uri=uri)
    result = DicomPredictRun()
    out.mkdir(parents=True, exist_ok=True)
    # This run's studies are imported into a private folder (earlier runs' cases in OUT/imported are
    # not predicted again) and moved into OUT/imported once their outputs are written.
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=out))
    try:
        with dicom_folder(input_path) as root:
            cases = import_studies(root, staging, params.dicom, brain, progress=progress)
            by_id = {c.case_id: c for c in cases}
            result.cases = cases
            name, version = _model_identity(model_uri or params.predict.model)

            def written(prediction: Any, files: list[Path]) -> None:
                case = by_id[prediction.case_id]
                start = time.perf_counter()
                try:
                    extra = write_reference_outputs(
                        case,
                        prediction.canonical,
                        prediction.label_convention,
                        out,
                        root,
                        model_name=name,
                        model_version=version,
                    )
                except BaseException:  # a case's outputs are written whole or not at all
                    for path in (*files, out / f"{case.case_id}_t1ce.nii.gz"):
                        Path(path).unlink(missing_ok=True)
                    raise
                seconds = dict(case.seconds)
                seconds["predict"] = float(sum(prediction.seconds.values()))
                seconds["write_seg"] = time.perf_counter() - start
                result.seconds[case.case_id] = seconds
                result.files[case.case_id] = [*files, *extra]
                if on_case is not None:
                    on_case(prediction, [*files, *extra])

            result.run = predict_folder(
                staging,
                out,
                params,
                model_uri=model_uri,
                layout="brats2021",
                source=source,
                tracking_uri=uri,
                on_case=written,
            )
        kept = out / IMPORTED_DIR
        kept.mkdir(exist_ok=True)
        for case in cases:
            target = kept / case.case_id
            if target.exists():
                shutil.rmtree(target)
            os.rename(case.case_dir, target)
            case.case_dir = target
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _model_identity(uri: str) -> tuple[str, str]:
    """``(name, version)`` for the SEG's algorithm identification from a model URI or path."""
    if uri.startswith("models:/"):
        rest = uri[len("models:/") :]
        name, _, version = rest.replace("@", "/").partition("/")
        return name or "tumorseg", version or "latest"
    return "tumorseg", Path(uri).name or "checkpoint"
