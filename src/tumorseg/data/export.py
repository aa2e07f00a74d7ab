"""``tumorseg export``: the ingested cases as an nnU-Net raw dataset or a MONAI datalist, same split.

``nnunet``: ``OUT/DatasetXXX_Name/`` per nnU-Net v2 ``documentation/dataset_format.md``: float32
``imagesTr/<case>_0000..3`` (T1, T1ce, T2, FLAIR), uint8 internal-code ``labelsTr``, unlabelled cases in
``imagesTs``; ``dataset.json`` labels are the train regions, its ``tumorseg`` key the split. ``monai``:
``OUT/datalist.json`` naming the source files, lists from ``paths.split``. Output is staged beside
the target and renamed into place; an existing one is replaced only with ``--force``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.data.conventions import CANONICAL_MODALITIES, get_convention, label_set_of
from tumorseg.data.layouts import CaseFiles, case_from_manifest_row, read_case
from tumorseg.errors import DataError
from tumorseg.faults import write_point
from tumorseg.params import Params, as_params

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("nnunet", "monai")
CHANNEL_NAMES: dict[str, str] = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
"""nnU-Net ``channel_names`` of the exported channels (:data:`CANONICAL_MODALITIES` order)."""
DATALIST_NAME = "datalist.json"


def export_cases(
    cases: Sequence[CaseFiles],
    out: Path,
    fmt: str,
    *,
    split: dict[str, list[str]] | None = None,
    dataset_id: int = 501,
    name: str = "Tumorseg",
    force: bool = False,
) -> Path:
    """Export ``cases``; the dataset folder or datalist written. DataError for bad options, no cases,
    several label sets, an existing output without ``force`` or an unreadable case."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    if not cases:
        raise DataError("no ingested cases to export; run `tumorseg ingest` (and validate) first")
    if not 1 <= dataset_id <= 999:
        raise DataError(f"--dataset-id {dataset_id}: nnU-Net dataset ids are 1..999")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise DataError(f"--name {name!r}: use letters, digits, - and _ only (it becomes a folder name)")
    try:
        label_set_of((c.label_convention for c in cases), where="the ingested cases")
    except ValueError as exc:
        raise DataError(str(exc)) from None
    out = Path(out)
    target = out / f"Dataset{dataset_id:03d}_{name}" if fmt == "nnunet" else out / DATALIST_NAME
    if target.exists() and not force:
        raise DataError(f"{target}: exists; pass --force to replace it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    old = out / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        if fmt == "nnunet":
            staging.mkdir()
            _write_nnunet(cases, staging, split)
        else:
            staging.write_text(json.dumps(monai_datalist(cases, split), indent=2) + "\n")
        if target.exists():  # moved aside, not deleted first: a kill here leaves the old export whole
            write_point(target)
            os.replace(target, old)
        write_point(target)
        staging.rename(target)
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    except BaseException:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
        if not target.exists() and old.exists():  # interrupted between the two renames: the old one back
            os.replace(old, target)
        raise
    return target


def nnunet_dataset_json(cases: Sequence[CaseFiles], split: dict[str, list[str]] | None) -> dict[str, Any]:
    """nnU-Net v2 ``dataset.json`` of the exported cases (regions from the label set)."""
    label_set = label_set_of(c.label_convention for c in cases)
    labels: dict[str, Any] = {"background": 0}
    for region in label_set.train_regions:
        labels[region.name] = list(region.codes) if len(region.codes) > 1 else int(region.codes[0])
    labelled = [c for c in cases if c.has_seg]
    return {
        "channel_names": dict(CHANNEL_NAMES),
        "labels": labels,
        "regions_class_order": [int(region.paint) for region in label_set.train_regions],
        "numTraining": len(labelled),
        "file_ending": ".nii.gz",
        "name": "tumorseg export",
        "description": f"{label_set.name} labels ({label_set.description}), internal codes "
        + ", ".join(f"{code} {name}" for code, name in sorted(label_set.labels.items()) if code),
        "tumorseg": {
            "label_set": label_set.name,
            "label_names": {str(c): n for c, n in sorted(label_set.labels.items())},
            "source_conventions": sorted({c.label_convention for c in cases}),
            "split": {k: sorted(v) for k, v in (split or {}).items() if k in ("train", "val", "test")},
        },
    }


def _write_nnunet(cases: Sequence[CaseFiles], root: Path, split: dict[str, list[str]] | None) -> None:
    import nibabel as nib

    from tumorseg.data.parallel import Progress

    images_tr, labels_tr, images_ts = root / "imagesTr", root / "labelsTr", root / "imagesTs"
    progress = Progress(len(cases), "export")
    for case in cases:
        volumes = read_case(case)
        labelled = volumes.labels is not None
        folder = images_tr if labelled else images_ts
        folder.mkdir(exist_ok=True)
        affine = np.asarray(volumes.affine, dtype=np.float64)
        for channel in range(len(CANONICAL_MODALITIES)):
            image = np.asarray(volumes.image[channel], dtype=np.float32)
            _save_nifti(nib, image, affine, folder / f"{case.case_id}_{channel:04d}.nii.gz")
        if labelled:
            labels_tr.mkdir(exist_ok=True)
            seg = np.asarray(volumes.labels, dtype=np.uint8)
            _save_nifti(nib, seg, affine, labels_tr / f"{case.case_id}.nii.gz")
        progress.advance()
    progress.close()
    (root / "dataset.json").write_text(json.dumps(nnunet_dataset_json(cases, split), indent=2) + "\n")


def _save_nifti(nib: Any, data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)


def monai_datalist(cases: Sequence[CaseFiles], split: dict[str, list[str]] | None) -> dict[str, Any]:
    """A MONAI datalist naming the source files (``load_decathlon_datalist`` reads it)."""
    by_id = {c.case_id: c for c in cases}
    lists: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "testing": []}
    placed: set[str] = set()
    for key, name in (("train", "training"), ("val", "validation"), ("test", "testing")):
        for case_id in sorted((split or {}).get(key, [])):
            if case_id in by_id:
                lists[name].append(_entry(by_id[case_id]))
                placed.add(case_id)
    for case in (c for c in cases if c.case_id not in placed):
        lists["training" if case.has_seg else "testing"].append(_entry(case))
    conventions = sorted({c.label_convention for c in cases})
    return {
        "name": "tumorseg export",
        "channel_names": dict(CHANNEL_NAMES),
        "label_convention": conventions[0] if len(conventions) == 1 else conventions,
        "labels": {str(v): n for n, v in get_convention(conventions[0]).source_codes().items()},
        **lists,
    }


def _entry(case: CaseFiles) -> dict[str, Any]:
    images = [str(Path(case.paths[m]).resolve()) for m in CANONICAL_MODALITIES if case.paths.get(m)]
    if len(set(images)) == 1:  # MSD: one 4-D file holds every channel
        images = images[:1]
    entry: dict[str, Any] = {"case_id": case.case_id, "image": images}
    if case.has_seg:
        entry["label"] = str(Path(case.paths["seg"]).resolve())
    return entry


def export_from_params(
    params: Params | dict[str, Any],
    out: Path,
    fmt: str,
    *,
    source: str = "params.yaml",
    dataset_id: int = 501,
    name: str = "Tumorseg",
    force: bool = False,
) -> Path:
    """Export the validated manifest's ``ok`` cases (the ingested manifest when not validated yet)."""
    params = as_params(params, source)
    from tumorseg.data.manifest import STATUS_OK, read_manifest

    paths = params.paths
    folder = (
        Path(paths.validated) if (Path(paths.validated) / "manifest.csv").is_file() else Path(paths.ingested)
    )
    manifest = read_manifest(folder)
    rows = manifest.to_dict(orient="records")
    if "status" in manifest.columns:
        rows = [row for row in rows if row["status"] == STATUS_OK]
    cases = [case_from_manifest_row({k: ("" if v != v else str(v)) for k, v in row.items()}) for row in rows]
    split = None
    split_file = Path(paths.split)
    if split_file.is_file():
        split = {k: v for k, v in json.loads(split_file.read_text()).items() if k in ("train", "val", "test")}
    target = export_cases(cases, out, fmt, split=split, dataset_id=dataset_id, name=name, force=force)
    log.info("exported %d cases (%s) -> %s", len(cases), fmt, target)
    return target
