"""Whole-case prediction in the source geometry: what ``tumorseg predict``, evaluation and serving share.

A case ``(4, X, Y, Z)`` is preprocessed as in training, run through the sliding-window inferer
(optionally averaged over mirrored copies, nnU-Net's TTA, whose variance is the uncertainty map),
post-processed, and mapped back onto the source grid in the input's label convention.
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


class PredictConfig(Section):
    """``predict:`` whole-case inference (``tumorseg predict``, the evaluate stage, the served model).

    Each knob is explained beside its value in params.yaml; ``uncertainty`` (the TTA variance) needs
    ``tta``, and null ``overlap`` / ``sw_batch_size`` keep the model's ``sliding_window`` settings.
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
        axes = self.tta_axes
        if not axes or len(set(axes)) != len(axes) or not set(axes) <= {0, 1, 2}:
            raise ValueError("tta_axes must be distinct axes among 0, 1, 2")
        if self.uncertainty and not self.tta:
            raise ValueError("uncertainty is the variance over TTA passes; set predict.tta: true")
        return self


@dataclass
class CasePrediction:
    """The prediction of one case on its source grid.

    Attributes:
        label_convention: convention of ``labels`` (the input's, when it codes the model's label set).
        labels: uint8 ``(X, Y, Z)`` in ``label_convention``; ``affine`` is the source reference's.
        volumes_ml: predicted volume (ml) of each train region of the label set.
        probabilities: float32 ``(C, X, Y, Z)`` (region sigmoids or label softmax), or None.
        uncertainty: float32 ``(C, X, Y, Z)`` TTA variance of the probabilities, or None.
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
        """``labels`` in the label set's internal codes (glioma: 0 bg, 1 NCR, 2 ED, 3 ET)."""
        return recode_labels(self.labels, get_convention(self.label_convention).to_canonical)

    def volumes_text(self) -> str:
        """``WT 45.21 ml  TC 20.10 ml  ET 10.30 ml``."""
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
    """Train-region volumes (ml) from voxel counts per internal tumour code."""
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

    Otherwise (a post-treatment model on a folder read as 2023 GLI) the label set's only convention;
    DataError when it has several.
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

    Unlike ``LabelConvention.encode``/``decode`` this skips validation (``np.unique`` sorts every
    voxel): a prediction only holds the table's codes.
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


def _check_modalities(case: CaseFiles) -> None:
    if case.missing:
        raise DataError(f"{case.case_id}: missing modality file {case.missing[0]} in {case.case_dir}")


class SegmentationPredictor:
    """A :class:`~tumorseg.models.checkpoint.TrainedNetwork` ready to segment whole cases with ``cfg``.

    Reading a case raises DataError for a missing modality (naming the file), an unreadable file or
    a wrong dimensionality.
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

    def infer(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities of a preprocessed image ``(4, x, y, z)``, averaged over the TTA mirrorings.

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
                logits = logits.float()
                prob = torch.sigmoid(logits) if self.output == "regions" else torch.softmax(logits, 1)
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
        """uint8 internal labels ``(x, y, z)`` of probabilities ``(C, x, y, z)``, small components dropped."""
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

    def predict_volumes(self, volumes: CaseVolumes) -> CasePrediction:
        """Segment a case held in memory (source geometry) and map the result back onto it."""
        from tumorseg.data.preprocess import preprocess_case

        start = time.perf_counter()
        case = preprocess_case(dataclasses.replace(volumes, labels=None), self.preprocess_cfg)
        return self.predict_preprocessed(case, {"preprocess": time.perf_counter() - start})

    def predict_case(self, case: CaseFiles) -> CasePrediction:
        """Read a case from disk (not its segmentation) and segment it."""
        return self.predict_preprocessed(*self.read_preprocessed(case))

    def decode(self, case: CaseFiles) -> tuple[DecodedCase, dict[str, float]]:
        """The case's modalities read and reoriented, not yet resampled, and ``{"read": seconds}``.

        Runs no torch, so it may run in a reading thread while another case is inferred.
        """
        from tumorseg.data.preprocess import decode_case

        _check_modalities(case)
        start = time.perf_counter()
        decoded = decode_case(case, self.preprocess_cfg, labels=False, sha256=False)
        return decoded, {"read": time.perf_counter() - start}

    def preprocess(
        self, decoded: DecodedCase, seconds: dict[str, float]
    ) -> tuple[PreprocessedCase, dict[str, float]]:
        """Resample, crop and z-score as in training; torch, so call it where inference runs."""
        start = time.perf_counter()
        preprocessed = decoded.preprocess(self.preprocess_cfg)
        return preprocessed, {**seconds, "preprocess": time.perf_counter() - start}

    def read_preprocessed(self, case: CaseFiles) -> tuple[PreprocessedCase, dict[str, float]]:
        """:meth:`decode` then :meth:`preprocess`: exactly ``preprocess_case(read_case(case))``."""
        return self.preprocess(*self.decode(case))

    def predict_preprocessed(self, case: PreprocessedCase, seconds: dict[str, float]) -> CasePrediction:
        """Segment a preprocessed case and map the result back onto its source grid.

        Args:
            case: from :func:`~tumorseg.data.preprocess.preprocess_case` (its geometry gives the
                source grid and the label convention to write).
            seconds: time already spent on this case, by step; ``inference`` and ``restore`` are added.
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
    """The four modalities of a case in its source geometry (not its segmentation), and the read time."""
    _check_modalities(case)
    start = time.perf_counter()
    volumes = read_case(dataclasses.replace(case, paths={**case.paths, "seg": None}))
    return volumes, time.perf_counter() - start


def _atomic_save(image: Any, path: Path) -> None:
    """Write a ``.nii.gz`` to a hidden temp name in the same folder, then rename: never half a file.

    nibabel streams into python-isal's gzip writer (ISA-L, level 1; a standard gzip stream): no
    in-memory copy as with ``to_bytes``, and several times faster than zlib.
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
    """Write ``<case_id>.nii.gz`` and the optional maps atomically, with the reference ``header``.

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


@dataclass
class PredictSummary:
    """What :func:`predict_dataset` wrote: volumes (ml) per region and files, by case id; wall time."""

    out_dir: Path
    cases: dict[str, dict[str, float]] = field(default_factory=dict)
    files: dict[str, list[Path]] = field(default_factory=dict)
    seconds: float = 0.0

    def one_line(self) -> str:
        return f"predicted {len(self.cases)} cases -> {self.out_dir} in {self.seconds:.1f} s"


def plan_cases(
    input_path: str | Path, layout: str | None = None, labels: str | None = None
) -> list[CaseFiles]:
    """The cases of a dataset folder in any layout (or one case folder), checked for missing modalities.

    ``layout`` and ``labels`` (the input's label convention) are detected when None; DataError
    names an unknown layout or a missing modality file.
    """
    cases = discover_cases(Path(input_path), layout, labels)
    for case in cases:
        _check_modalities(case)
    return cases


def spare_core(device: Any) -> bool:
    """Whether a reading thread can run beside the inference without taking one of its cores.

    True on GPU (the CPU is idle meanwhile) and when this process may use more cores than torch's
    intra-op threads.
    """
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
    """Segment every case of ``input_path`` (or the planned ``cases``) into ``out_dir/<case_id>.nii.gz``.

    All cases are checked before any work starts. If a case fails, whatever was written for it is
    removed; cases finished before it stay, and the error says how many. Other files in ``out_dir``
    are never touched. ``on_case`` gets each prediction and its files (the CLI prints volumes).
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
    # With a core to spare, a thread decodes the next case while this one is inferred (decompression
    # releases the GIL). Resampling uses torch and stays here: torch in the reading thread would start
    # a second OpenMP team competing with the inference's. Without a spare core the reader would
    # slow every parallel region of the inference.
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
