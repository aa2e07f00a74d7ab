"""The threaded case reader of ``predict`` and ``preprocess``: decode each file in its own thread.

Same bits as ``preprocess_case(read_case(case), cfg)`` without ever holding a case's full-resolution
float image: each modality is inflated, decoded and reoriented in its own thread (no torch), then the
torch thread resamples the channels one by one. Prediction decodes the next case meanwhile.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from tumorseg.config import PreprocessConfig
from tumorseg.data.conventions import CANONICAL_MODALITIES
from tumorseg.data.grid import SourceGrid, resize
from tumorseg.data.layouts import (
    CaseFiles,
    CaseVolumes,
    encode_labels,
    orientation_code,
    read_case,
    read_nifti,
    spacing_from_affine,
    squeeze_trailing,
)
from tumorseg.data.preprocessed_case import (
    PreprocessedCase,
    crop_and_normalise,
    preprocess_case,
    ras_float32,
    source_fields,
)
from tumorseg.errors import DataError


@dataclass
class DecodedCase:
    """A case read from disk and reoriented, not yet resampled (no torch, so any thread may decode it).

    Attributes:
        grid: the source grid (T1 header), or None when the case went through :func:`read_case`.
        channels: modality -> RAS float32 volume at full resolution.
        source: the geometry entries describing where the case came from.
        volumes: the :func:`read_case` result for the cases the threaded path declines (else None).
    """

    grid: SourceGrid | None
    channels: dict[str, np.ndarray]
    source: dict[str, Any]
    labels: np.ndarray | None = None
    volumes: CaseVolumes | None = None

    def preprocess(self, cfg: PreprocessConfig) -> PreprocessedCase:
        """Resample (torch: call it from the torch thread; each full-resolution channel is released once
        resampled), crop and z-score; :class:`DataError` on NaN/inf voxels or no brain."""
        if self.volumes is not None:
            return preprocess_case(self.volumes, cfg)
        assert self.grid is not None
        shape, order = self.grid.resampled_shape, cfg.image_interpolation_order
        channels = [resize(self.channels.pop(modality), shape, order) for modality in CANONICAL_MODALITIES]
        return crop_and_normalise(np.stack(channels), self.grid, self.source, self.labels, cfg)


def decode_case(
    case: CaseFiles, cfg: PreprocessConfig, *, labels: bool = True, sha256: bool = True
) -> DecodedCase:
    """Read a case's files, each inflated, decoded, reoriented and converted to float32 in its own thread.

    Cases this path does not take (an MSD 4-D image, a file that does not decode, a wrong
    dimensionality, differing shapes) go through :func:`read_case`, which reads them or raises its
    one-line :class:`DataError`. Arguments and errors as :func:`read_preprocessed`.
    """
    if not labels and case.has_seg:
        case = dataclasses.replace(case, paths={**case.paths, "seg": None})
    files = case.unique_files()

    def fallback() -> DecodedCase:
        return DecodedCase(None, {}, {}, volumes=read_case(case))

    if case.missing or case.layout == "msd" or any(len(keys) != 1 for keys in files.values()):
        return fallback()
    try:
        header = nib.load(str(case.paths["t1"])).header
        grid = SourceGrid.of(header.get_best_affine(), header.get_data_shape(), cfg)
    except Exception:  # noqa: BLE001 - read_case names the file and the problem
        return fallback()

    def decode(key: str) -> tuple[str, np.ndarray, str] | None:
        """``(key, RAS float32 channel or source labels, sha256)``; None when read_case must decide."""
        try:
            nifti = read_nifti(case.paths[key], sha256=sha256)
        except DataError:
            return None
        data = squeeze_trailing(nifti.data, 3)
        if data.shape != grid.shape or (key == "t1" and not np.array_equal(nifti.affine, grid.affine)):
            return None
        if key == "seg":
            return key, data, nifti.sha256
        return key, ras_float32(data, grid, case_id=case.case_id, modality=key), nifti.sha256

    keys = [keys[0] for keys in files.values()]
    with ThreadPoolExecutor(max_workers=len(keys), thread_name_prefix="tumorseg-read") as pool:
        results = list(pool.map(decode, keys))
    if any(result is None for result in results):
        return fallback()
    decoded = {key: array for key, array, _ in results}  # type: ignore[misc]
    digests = {key: digest for key, _, digest in results}  # type: ignore[misc]
    del results
    source_labels = None
    if "seg" in decoded:
        try:
            source_labels = encode_labels(decoded.pop("seg"), case.label_convention)
        except ValueError as exc:
            raise DataError(f"{case.case_id}: {case.paths['seg'].name}: {exc}") from None
    source = source_fields(case, orientation_code(grid.affine), spacing_from_affine(grid.affine), digests)
    return DecodedCase(grid, decoded, source, source_labels)


def read_preprocessed(
    case: CaseFiles, cfg: PreprocessConfig, *, labels: bool = True, sha256: bool = True
) -> PreprocessedCase:
    """Read a case from disk and preprocess it, never holding its full-resolution float image.

    Decoding (:func:`decode_case`, none of it holds the GIL for long) and torch's resampling
    (:meth:`DecodedCase.preprocess`) stay in separate threads: torch called from the reading threads
    would start an OpenMP team per thread, which slows down the resampling and the inference after it.

    Args:
        labels: also read ``seg`` when the case has one (False: prediction, the image alone).
        sha256: hash the files into ``source_sha256`` (False leaves it empty, as prediction does).

    Raises:
        DataError: missing/unreadable file, wrong dimensionality, differing shapes, label values
            outside the convention, NaN/inf voxels, no brain.
    """
    return decode_case(case, cfg, labels=labels, sha256=sha256).preprocess(cfg)
