"""Whole-case prediction in the source geometry: what ``tumorseg predict``, evaluation and serving share.

For one case read from any supported layout (image ``(4, X, Y, Z)`` in its own orientation and
spacing), :class:`SegmentationPredictor`:

1. preprocesses it exactly as training did (:func:`~tumorseg.data.preprocess.preprocess_case` with
   the ``preprocess`` section stored with the model: reorient to RAS, resample to the model's
   training spacing, crop to the brain, z-score), whatever the input's spacing;
2. runs MONAI's sliding-window inferer (the training patch as window, overlap and Gaussian
   blending from the model's ``sliding_window`` settings) on ``(1, 4, x, y, z)``;
3. optionally averages the probabilities over mirrored copies (test-time augmentation: every
   combination of flips along ``predict.tta_axes``, 8 passes for 3 axes, as nnU-Net does); the
   per-voxel variance over those passes is the uncertainty map;
4. thresholds (region sigmoids, nested WT ⊇ TC ⊇ ET) or takes the argmax (label softmax), and
   optionally removes tumour components smaller than ``predict.min_component_mm3``;
5. maps labels (nearest) and probabilities (trilinear) back onto the source voxel grid
   (:func:`~tumorseg.data.preprocess.restore_to_source`) and writes labels in the input's own
   convention (BraTS 2021 1/2/4, BraTS 2023 1/2/3, MSD 1 oedema / 2 non-enhancing / 3 enhancing).

:func:`write_prediction` saves ``<case_id>.nii.gz`` with the reference modality's header (so the
shape, affine, qform/sform codes and units are the input's), each file written to a temporary name
and renamed. :func:`predict_dataset` does this for every case of a folder and never leaves a
partial file behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from tumorseg.config import PreprocessConfig, Section
from tumorseg.data.conventions import GLIOMA, LABEL_CONVENTIONS, REGION_NAMES, LabelSet, get_convention
from tumorseg.data.layouts import CaseFiles, CaseVolumes, discover_cases, read_case
from tumorseg.errors import DataError

if TYPE_CHECKING:
    from tumorseg.data.preprocess import DecodedCase, PreprocessedCase

log = logging.getLogger(__name__)

PROBABILITIES_DIR = "probabilities"
UNCERTAINTY_DIR = "uncertainty"
LABEL_CHANNELS: tuple[str, ...] = GLIOMA.label_names
"""Probability channels of a label-trained glioma network (other label sets name their own)."""


class PredictConfig(Section):
    """``predict:`` whole-case inference (``tumorseg predict``, the evaluate stage, the served model).

    Attributes:
        model: model to use when ``--model`` is not given: an MLflow model URI
            (``models:/tumorseg@champion``, ``models:/tumorseg/3``, ``runs:/<id>/model``) or a
            ``best.ckpt`` path.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        tta: mirror test-time augmentation: average over every combination of flips along ``tta_axes``.
        tta_axes: axes of the RAS preprocessed grid to mirror (0 left-right, 1 posterior-anterior,
            2 inferior-superior).
        min_component_mm3: remove connected tumour components (26-connected, whole tumour) smaller
            than this volume; 0 keeps everything.
        probabilities: also write per-channel probability maps (``probabilities/<case_id>.nii.gz``).
        uncertainty: also write the TTA variance of the probabilities (``uncertainty/<case_id>.nii.gz``);
            needs ``tta: true``.
        overlap: sliding-window overlap; null keeps the model's ``sliding_window.overlap``.
        sw_batch_size: windows per forward pass; null keeps the model's setting.
        keep_freed_memory: keep freed memory in the process for the next case instead of returning
            it to the system (glibc; :mod:`tumorseg.runtime`): no page faults on reused arrays,
            and the process keeps its peak memory.
    """

    model: str = "models:/tumorseg@champion"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tta: bool = False
    tta_axes: tuple[int, ...] = (0, 1, 2)
    min_component_mm3: float = Field(0.0, ge=0.0)
    probabilities: bool = False
    uncertainty: bool = False
    overlap: float | None = Field(None, ge=0.0, lt=1.0)
    sw_batch_size: int | None = Field(None, ge=1)
    keep_freed_memory: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> PredictConfig:
        if (
            not self.tta_axes
            or len(set(self.tta_axes)) != len(self.tta_axes)
            or not set(self.tta_axes) <= {0, 1, 2}
        ):
            raise ValueError("tta_axes must be distinct axes among 0, 1, 2")
        if self.uncertainty and not self.tta:
            raise ValueError("uncertainty is the variance over TTA passes; set predict.tta: true")
        return self


@dataclass
class CasePrediction:
    """The prediction of one case on its source grid.

    Attributes:
        case_id: the case.
        label_convention: convention of ``labels`` (the input's, when it codes the model's label set).
        labels: uint8 ``(X, Y, Z)`` in ``label_convention``.
        canonical: uint8 ``(X, Y, Z)`` internal codes of the model's label set (glioma: 0 bg, 1 NCR,
            2 ED, 3 ET), recoded from ``labels`` when first asked for.
        affine: 4x4 voxel-to-world of the source reference modality.
        volumes_ml: predicted volume in ml of each train region of the label set (WT, TC, ET, ...).
        probabilities: float32 ``(C, X, Y, Z)`` (train-region sigmoids or label softmax), or None.
        uncertainty: float32 ``(C, X, Y, Z)`` TTA variance of the probabilities, or None.
        channels: names of the probability channels.
        seconds: wall time per step (``read``, ``preprocess``, ``inference``, ``restore``).
    """

    case_id: str
    label_convention: str
    labels: np.ndarray
    affine: np.ndarray
    volumes_ml: dict[str, float]
    probabilities: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    channels: tuple[str, ...] = REGION_NAMES
    seconds: dict[str, float] = field(default_factory=dict)

    @cached_property
    def canonical(self) -> np.ndarray:
        """``labels`` in canonical codes (the same array when the convention uses them)."""
        return recode_labels(self.labels, get_convention(self.label_convention).to_canonical)

    def volumes_text(self) -> str:
        """``WT 45.21 ml  TC 20.10 ml  ET 10.30 ml`` (every train region of the model's label set)."""
        return "  ".join(f"{region} {ml:.2f} ml" for region, ml in self.volumes_ml.items())


def resolve_device(name: str) -> Any:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a one-line error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("predict.device: cuda requested but no CUDA device is available; use cpu or auto")
    return torch.device(name)


def mirror_sets(axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every combination of the spatial ``axes`` (identity first): 2**len(axes) flip sets."""
    return [subset for size in range(len(axes) + 1) for subset in combinations(sorted(axes), size)]


def _volumes_ml(counts: dict[int, int], affine: np.ndarray, label_set: LabelSet = GLIOMA) -> dict[str, float]:
    """Train-region volumes (ml; WT, TC, ET for glioma) from voxel counts per internal tumour code."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    return {
        region.name: sum(counts.get(code, 0) for code in region.codes) * voxel_ml
        for region in label_set.train_regions
    }


def region_volumes_ml(
    canonical: np.ndarray, affine: np.ndarray, label_set: LabelSet = GLIOMA
) -> dict[str, float]:
    """Train-region volumes (ml) of an internal label volume with voxel size from ``affine``."""
    # One comparison per tumour code: far cheaper than np.bincount's int64 copy of every voxel.
    counts = {code: int(np.count_nonzero(canonical == code)) for code in label_set.codes}
    return _volumes_ml(counts, affine, label_set)


def output_convention(case_convention: str, label_set: LabelSet) -> str:
    """The convention a prediction is written in: the input's, when it codes the model's label set.

    A case whose folder names another label set (a post-treatment model on a ``BraTS-GLI`` folder
    read as 2023 GLI) is written in the one convention of the model's label set.

    Raises:
        DataError: the model's label set has several conventions and the case's is not one of them.
    """
    if get_convention(case_convention).label_set.name == label_set.name:
        return case_convention
    candidates = [c.name for c in LABEL_CONVENTIONS.values() if c.label_set.name == label_set.name]
    if len(candidates) == 1:
        return candidates[0]
    raise DataError(
        f"the model predicts {label_set.name} labels but the input is read as {case_convention}; "
        f"pass --labels with one of {', '.join(candidates)}"
    )


def recode_labels(labels: np.ndarray, table: dict[int, int]) -> np.ndarray:
    """Rewrite the codes that ``table`` changes; ``labels`` itself when it changes none.

    ``LabelConvention.encode``/``decode`` validate arbitrary input with ``np.unique`` (a sort of
    every voxel); a prediction only holds the table's codes, so only the changing ones are rewritten.
    """
    changes = {old: new for old, new in table.items() if old != new}
    if not changes:
        return labels
    out = labels.copy()
    for old, new in changes.items():
        out[labels == old] = new
    return out


def decode_labels(canonical: np.ndarray, convention_name: str) -> np.ndarray:
    """Canonical codes (0-3, as the predictor produces them) -> the convention's codes."""
    return recode_labels(canonical, get_convention(convention_name).from_canonical)


class SegmentationPredictor:
    """A trained network ready to segment whole cases (see the module docstring for the steps).

    Args:
        trained: network and the settings it was trained with (``config["preprocess"]`` gives the
            preprocessing, ``sliding_window`` the window settings).
        cfg: the ``predict`` section (TTA, component removal, extra outputs, device).
    """

    def __init__(self, trained: Any, cfg: PredictConfig | None = None) -> None:
        from tumorseg.models.inference import make_inferer

        self.trained = trained
        self.cfg = cfg or PredictConfig()
        if self.cfg.keep_freed_memory:
            from tumorseg.runtime import keep_freed_memory

            keep_freed_memory()
        self.device = resolve_device(self.cfg.device)
        self.network = trained.network.to(self.device).eval()
        updates = {
            key: value
            for key, value in (("overlap", self.cfg.overlap), ("sw_batch_size", self.cfg.sw_batch_size))
            if value is not None
        }
        self.sliding_window = trained.sliding_window.model_copy(update=updates)
        self.inferer = make_inferer(self.sliding_window, trained.roi_size)
        self.preprocess_cfg = PreprocessConfig.model_validate(trained.config["preprocess"])
        self.output: str = trained.model.output
        self.label_set: LabelSet = trained.label_set
        self.channels = (
            self.label_set.region_names if self.output == "regions" else self.label_set.label_names
        )

    # ------------------------------------------------------------------ preprocessed grid
    def infer(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities of a preprocessed image, averaged over the TTA mirrorings.

        Args:
            image: ``(4, x, y, z)`` z-scored channels on the model's grid.

        Returns:
            ``(probabilities (C, x, y, z) float32, variance (C, x, y, z) float32 or None)``; the
            variance over TTA passes when ``predict.uncertainty`` is on.
        """
        import torch

        flips = mirror_sets(self.cfg.tta_axes) if self.cfg.tta else [()]
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device, torch.float32)[None]
            total: torch.Tensor | None = None
            total_sq: torch.Tensor | None = None
            for axes in flips:
                dims = [axis + 2 for axis in axes]  # (B, C, X, Y, Z): spatial axes start at 2
                logits = self.inferer(torch.flip(x, dims) if dims else x, self.network)
                if dims:
                    logits = torch.flip(logits, dims)
                prob = (
                    torch.sigmoid(logits.float())
                    if self.output == "regions"
                    else torch.softmax(logits.float(), 1)
                )
                total = prob if total is None else total.add_(prob)
                if self.cfg.uncertainty:
                    total_sq = prob * prob if total_sq is None else total_sq.add_(prob * prob)
            mean = total[0] / len(flips)
            variance = None
            if total_sq is not None:
                variance = (total_sq[0] / len(flips) - mean * mean).clamp_min_(0.0).cpu().numpy()
            return mean.cpu().numpy(), variance

    def labels_from_probabilities(
        self, probabilities: np.ndarray, spacing_mm: tuple[float, ...]
    ) -> np.ndarray:
        """Internal uint8 labels ``(x, y, z)`` from ``(C, x, y, z)`` probabilities, small components removed."""
        import torch

        from tumorseg.models.inference import regions_to_labels

        prob = torch.from_numpy(probabilities)[None]
        if self.output == "regions":
            labels = regions_to_labels(prob > self.sliding_window.threshold, self.label_set)[0, 0].numpy()
        else:
            labels = prob.argmax(dim=1)[0].to(torch.uint8).numpy()
        if self.cfg.min_component_mm3 > 0 and labels.any():
            from monai.transforms import RemoveSmallObjects

            # MONAI wraps skimage's remove_small_objects; by_measure converts mm^3 to voxels.
            remove = RemoveSmallObjects(
                min_size=self.cfg.min_component_mm3, connectivity=3, by_measure=True, pixdim=tuple(spacing_mm)
            )
            with warnings.catch_warnings():
                # skimage 0.26 deprecates the min_size argument MONAI passes; same semantics (< min_size).
                warnings.filterwarnings("ignore", message=".*min_size.*", category=FutureWarning)
                kept = np.asarray(remove((labels > 0)[None]))[0].astype(bool)
            labels = np.where(kept, labels, 0).astype(np.uint8)
        return labels

    # ------------------------------------------------------------------ source grid
    def predict_volumes(self, volumes: CaseVolumes) -> CasePrediction:
        """Segment a case held in memory (source geometry) and map the result back onto it."""
        from tumorseg.data.preprocess import preprocess_case

        start = time.perf_counter()
        case = preprocess_case(dataclasses.replace(volumes, labels=None), self.preprocess_cfg)
        return self.predict_preprocessed(case, {"preprocess": time.perf_counter() - start})

    def predict_case(self, case: CaseFiles) -> CasePrediction:
        """Read a case from disk (its segmentation, if any, is not read) and segment it.

        Raises:
            DataError: a missing modality (naming the file), an unreadable file, wrong dimensionality.
        """
        preprocessed, seconds = self.read_preprocessed(case)
        return self.predict_preprocessed(preprocessed, seconds)

    def decode(self, case: CaseFiles) -> tuple[DecodedCase, dict[str, float]]:
        """The case's modalities read and reoriented, not yet resampled (its segmentation unread).

        :func:`~tumorseg.data.preprocess.decode_case` decodes each file in its own thread and runs no
        torch, so this may run in a reading thread while another case is inferred.

        Returns:
            The decoded case and ``{"read": seconds}``.

        Raises:
            DataError: a missing modality (naming the file), an unreadable file, wrong dimensionality.
        """
        from tumorseg.data.preprocess import decode_case

        if case.missing:
            raise DataError(f"{case.case_id}: missing modality file {case.missing[0]} in {case.case_dir}")
        start = time.perf_counter()
        decoded = decode_case(case, self.preprocess_cfg, labels=False, sha256=False)
        return decoded, {"read": time.perf_counter() - start}

    def preprocess(
        self, decoded: DecodedCase, seconds: dict[str, float]
    ) -> tuple[PreprocessedCase, dict[str, float]]:
        """Resample, crop and z-score a decoded case as the model was trained (torch: call it where inference runs).

        Returns:
            The preprocessed case and ``seconds`` plus ``{"preprocess": seconds}``.
        """
        start = time.perf_counter()
        preprocessed = decoded.preprocess(self.preprocess_cfg)
        return preprocessed, {**seconds, "preprocess": time.perf_counter() - start}

    def read_preprocessed(self, case: CaseFiles) -> tuple[PreprocessedCase, dict[str, float]]:
        """:meth:`decode` then :meth:`preprocess`: exactly ``preprocess_case(read_case(case))``.

        Returns:
            The preprocessed case and ``{"read": seconds, "preprocess": seconds}``.

        Raises:
            DataError: a missing modality (naming the file), an unreadable file, wrong dimensionality.
        """
        return self.preprocess(*self.decode(case))

    def predict_preprocessed(self, case: PreprocessedCase, seconds: dict[str, float]) -> CasePrediction:
        """Segment a preprocessed case and map the result back onto its source grid.

        Args:
            case: from :func:`~tumorseg.data.preprocess.preprocess_case` (its geometry says where
                the source grid is and which label convention to write).
            seconds: time already spent on this case, by step; the steps below are added.
        """
        from tumorseg.data.preprocess import restore_to_source, restored_label_counts

        seconds = dict(seconds)
        start = time.perf_counter()
        probabilities, variance = self.infer(case.image)
        seconds["inference"] = time.perf_counter() - start

        start = time.perf_counter()
        geometry = case.geometry
        convention = output_convention(geometry["label_convention"], self.label_set)
        labels = self.labels_from_probabilities(probabilities, tuple(geometry["resampled_spacing_mm"]))
        # Nearest-neighbour restoration copies values: decoding the small grid before restoring it
        # gives the same voxels as decoding the full-resolution map, and the volumes are counted on
        # the small grid (each voxel weighted by its copies), at a tenth of the work.
        source_labels = restore_to_source(decode_labels(labels, convention), geometry, is_label=True)
        affine = np.asarray(geometry["source_affine"], dtype=np.float64)
        counts = restored_label_counts(labels, geometry, self.label_set.codes)
        restored_prob = restored_var = None
        if self.cfg.probabilities:
            restored_prob = self._restore_probabilities(probabilities, geometry)
        if variance is not None:
            restored_var = restore_to_source(variance, geometry, is_label=False)
        prediction = CasePrediction(
            case_id=geometry["case_id"],
            label_convention=convention,
            labels=source_labels,
            affine=affine,
            volumes_ml=_volumes_ml(counts, affine, self.label_set),
            probabilities=restored_prob,
            uncertainty=restored_var,
            channels=self.channels,
        )
        seconds["restore"] = time.perf_counter() - start
        prediction.seconds = seconds
        return prediction

    def _restore_probabilities(self, probabilities: np.ndarray, geometry: dict[str, Any]) -> np.ndarray:
        """Probabilities on the source grid; outside the brain crop the background class is certain."""
        from tumorseg.data.preprocess import restore_to_source

        if self.output == "regions":
            return restore_to_source(probabilities, geometry, is_label=False)
        # restore_to_source pads with 0: carry 1 - p(background) so the padding means "background".
        flipped = probabilities.copy()
        flipped[0] = 1.0 - flipped[0]
        restored = restore_to_source(flipped, geometry, is_label=False)
        restored[0] = 1.0 - restored[0]
        return restored


def read_volumes(case: CaseFiles) -> tuple[CaseVolumes, float]:
    """The four modalities of a case in its source geometry (not its segmentation), and the read time.

    Raises:
        DataError: a missing modality (naming the file), an unreadable file, wrong dimensionality.
    """
    if case.missing:
        raise DataError(f"{case.case_id}: missing modality file {case.missing[0]} in {case.case_dir}")
    start = time.perf_counter()
    volumes = read_case(dataclasses.replace(case, paths={**case.paths, "seg": None}))
    return volumes, time.perf_counter() - start


# ---------------------------------------------------------------------------- writing
def _atomic_save(image: Any, path: Path) -> None:
    """Write a ``.nii.gz`` to a hidden temp name in the same folder, then rename: never half a file.

    nibabel's own writer (header, scaling, column-major voxel order) streams into python-isal's
    gzip file (ISA-L, level 1): a standard gzip stream any reader opens. Streaming avoids
    ``to_bytes``' growing in-memory copy, and ISA-L deflates several times faster than zlib.
    """
    from isal import igzip
    from nibabel.fileholders import FileHolder

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.nii.gz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh, igzip.IGzipFile(fileobj=fh, mode="wb", compresslevel=1) as gz:
            holder = FileHolder(fileobj=gz)
            image.to_file_map({"image": holder, "header": holder})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def nifti_like(data: np.ndarray, affine: np.ndarray, reference_header: Any, dtype: Any) -> Any:
    """A NIfTI image carrying the reference header (shape, zooms, qform/sform and units updated)."""
    import nibabel as nib

    header = reference_header.copy()
    header.set_data_dtype(dtype)
    header.set_intent("none")
    header["descrip"] = b"tumorseg prediction"
    image = nib.Nifti1Image(data.astype(dtype, copy=False), affine, header=header)
    if data.ndim == 4:
        image.header.set_zooms((*image.header.get_zooms()[:3], 1.0))
    image.header["cal_min"] = 0
    image.header["cal_max"] = float(data.max()) if data.size else 0
    return image


def reference_header(case: CaseFiles) -> Any:
    """Header of the case's reference modality (T1, or the MSD 4-D image): the output's template."""
    import nibabel as nib

    path = case.paths["t1"]
    try:
        header = nib.load(str(path)).header
    except Exception as exc:  # any reading failure names the file; the case was read just before
        raise DataError(f"{path}: cannot read the NIfTI header ({type(exc).__name__})") from None
    if not isinstance(header, nib.Nifti1Header):
        header = nib.Nifti1Header.from_header(header)
    return header


def write_prediction(prediction: CasePrediction, out_dir: str | Path, header: Any) -> list[Path]:
    """Write ``<case_id>.nii.gz`` (and the optional probability / uncertainty maps) atomically.

    Args:
        prediction: from :meth:`SegmentationPredictor.predict_case`.
        out_dir: output folder (created if needed).
        header: the reference modality's NIfTI header (:func:`reference_header`).

    Returns:
        Files written: the label map first, then ``probabilities/<case_id>.nii.gz`` (float32
        ``(X, Y, Z, C)``) and ``uncertainty/<case_id>.nii.gz`` when present.
    """
    out_dir = Path(out_dir)
    name = f"{prediction.case_id}.nii.gz"
    jobs: list[tuple[Path, np.ndarray, Any]] = [(out_dir / name, prediction.labels, np.uint8)]
    for folder, maps in (
        (PROBABILITIES_DIR, prediction.probabilities),
        (UNCERTAINTY_DIR, prediction.uncertainty),
    ):
        if maps is not None:
            jobs.append((out_dir / folder / name, np.moveaxis(maps, 0, -1), np.float32))
    written: list[Path] = []
    try:
        for path, data, dtype in jobs:
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_save(nifti_like(data, prediction.affine, header, dtype), path)
            written.append(path)
    except BaseException:
        for path in written:  # a case is written whole or not at all
            path.unlink(missing_ok=True)
        raise
    return written


# ---------------------------------------------------------------------------- folders
@dataclass
class PredictSummary:
    """What :func:`predict_dataset` wrote.

    Attributes:
        out_dir: the output folder.
        cases: case id -> predicted volumes (ml) per region.
        files: case id -> files written for it.
        seconds: wall time.
    """

    out_dir: Path
    cases: dict[str, dict[str, float]] = field(default_factory=dict)
    files: dict[str, list[Path]] = field(default_factory=dict)
    seconds: float = 0.0

    def one_line(self) -> str:
        return f"predicted {len(self.cases)} cases -> {self.out_dir} in {self.seconds:.1f} s"


def plan_cases(
    input_path: str | Path, layout: str | None = None, labels: str | None = None
) -> list[CaseFiles]:
    """The cases of a folder in any layout (or one case folder), checked for missing modalities.

    Args:
        input_path: dataset folder or one case folder.
        layout: force a layout (None: detect).
        labels: the input's label convention (None: from the layout, BraTS prefix or dataset.json).

    Raises:
        DataError: no known layout, or a case without one of its four modality files (named).
    """
    cases = discover_cases(Path(input_path), layout, labels)
    for case in cases:
        if case.missing:
            raise DataError(f"{case.case_id}: missing modality file {case.missing[0]} in {case.case_dir}")
    return cases


def spare_core(device: Any) -> bool:
    """Whether a reading thread can run beside the inference without taking one of its cores.

    True on GPU (the CPU is idle while the GPU computes) and when this process may use more cores
    than torch's intra-op threads.
    """
    import os

    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores > torch.get_num_threads()


def predict_dataset(
    input_path: str | Path | None,
    out_dir: str | Path,
    predictor: SegmentationPredictor,
    *,
    layout: str | None = None,
    cases: list[CaseFiles] | None = None,
    on_case: Callable[[CasePrediction, list[Path]], None] | None = None,
) -> PredictSummary:
    """Segment every case of ``input_path`` into ``out_dir/<case_id>.nii.gz``.

    Every case is checked for missing modalities before any work starts. Each file is written to a
    temporary name and renamed; if a case fails, whatever this run wrote for it is removed, cases
    finished before it stay (they are complete), and the error says how many there are. Other files
    in ``out_dir`` are never touched.

    Args:
        input_path: a dataset folder in any supported layout, or one case folder (None when
            ``cases`` is given).
        out_dir: output folder (created when the first case is written).
        predictor: the loaded model.
        layout: force a layout (None: detect).
        cases: already planned cases (:func:`plan_cases`); planned here when None.
        on_case: called with each prediction and its files (the CLI prints volumes there).

    Raises:
        DataError: bad input (one line naming the case and file).
    """
    begin = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder; pass a folder for --out")
    if cases is None:
        if input_path is None:
            raise ValueError("predict_dataset needs input_path or cases")
        cases = plan_cases(input_path, layout)
    summary = PredictSummary(out_dir=out_dir)
    # With a core to spare, a thread reads and decodes the next case while this one is inferred
    # (decompression releases the GIL). Resampling uses torch and stays in this thread: torch called
    # from the reading thread would start a second OpenMP team competing with the inference's.
    # Without a spare core the reader would take one from the inference's threads, and every
    # parallel region would wait for it (measured on 2 cores: 4 % slower per case than in turn).
    prefetch = spare_core(predictor.device)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tumorseg-read") as reader:
        pending = reader.submit(predictor.decode, cases[0]) if cases and prefetch else None
        for position, case in enumerate(cases):
            try:
                decoded, seconds = pending.result() if pending is not None else predictor.decode(case)
                if prefetch and position + 1 < len(cases):
                    pending = reader.submit(predictor.decode, cases[position + 1])
                preprocessed, seconds = predictor.preprocess(decoded, seconds)
                del decoded
                prediction = predictor.predict_preprocessed(preprocessed, seconds)
                del preprocessed
                out_dir.mkdir(parents=True, exist_ok=True)
                files = write_prediction(prediction, out_dir, reference_header(case))
            except DataError as exc:
                kept = (
                    f"; {position} of {len(cases)} cases were written to {out_dir} before it"
                    if position
                    else ""
                )
                raise DataError(f"{exc}{kept}") from None
            summary.cases[case.case_id] = prediction.volumes_ml
            summary.files[case.case_id] = files
            log.debug("%s: %s (%s)", case.case_id, prediction.volumes_text(), prediction.seconds)
            if on_case is not None:
                on_case(prediction, files)
    summary.seconds = time.perf_counter() - begin
    return summary
