"""Prediction in the input's own geometry, volumes or images: ``tumorseg predict``, evaluation and serving.

A volume ``(4, X, Y, Z)`` is preprocessed as in training, run through the sliding-window inferer
(optionally averaged over mirrored copies, nnU-Net's TTA, whose variance is the uncertainty map),
post-processed and mapped back onto the source grid in the input's label convention. An image is
segmented and classified by the 2-D model and its mask restored to the input's ``(H, W)``.
:func:`predict` picks the strategy by the input's dimensionality.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorseg.config import PreprocessConfig
from tumorseg.data.conventions import GLIOMA, LABEL_CONVENTIONS, REGION_NAMES, LabelSet, get_convention
from tumorseg.data.layouts import CaseFiles, CaseVolumes, discover_cases, read_case
from tumorseg.data.readers import IMAGE, image_inputs, input_dims
from tumorseg.errors import DataError
from tumorseg.models.config import PredictConfig
from tumorseg.models.postprocess import (
    filter_components,
    min_component_voxels,
    resolve_min_confidence,
    whole_tumour_probability,
)

if TYPE_CHECKING:
    from tumorseg.data.preprocess import DecodedCase, PreprocessedCase
    from tumorseg.models.checkpoint import PlanarModel

log = logging.getLogger(__name__)

PROBABILITIES_DIR = "probabilities"
UNCERTAINTY_DIR = "uncertainty"
DETECT_COLUMNS: tuple[str, ...] = ("case_id", "probability", "label")


@dataclass
class CasePrediction:
    """The prediction of one case on its source grid: uint8 ``labels`` ``(X, Y, Z)`` in
    ``label_convention`` (the input's, when it codes the model's label set) with the source ``affine``,
    ml per train region, optional float32 ``(C, X, Y, Z)`` ``probabilities`` and ``uncertainty`` (TTA
    variance), and ``seconds`` per step (``read``, ``preprocess``, ``inference``, ``restore``)."""

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
    """The convention a prediction is written in: the input's when it codes the model's label set, else
    (a post-treatment model on 2023 GLI input) the label set's only one; DataError when it has several."""
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
    """Rewrite the codes that ``table`` changes (``labels`` itself when none); unlike ``encode``/``decode``
    without validation (``np.unique`` sorts every voxel): a prediction holds only the table's codes."""
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
    """A :class:`~tumorseg.models.checkpoint.TrainedNetwork` ready to segment whole cases with ``cfg``
    (DataError for a missing modality, naming the file, an unreadable file or a wrong dimensionality)."""

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
        self.min_confidence = resolve_min_confidence(self.cfg.min_component_confidence, trained.config)
        """The component-confidence threshold of every case not given its own (``min_confidence`` of
        :meth:`predict_case`): callers that check a case against the training profile pass 0 for one
        flagged by more than its grid, as a threshold chosen on in-distribution validation says nothing
        about how sure the network is elsewhere (decision record 0030)."""
        self.output: str = trained.model.output
        self.label_set: LabelSet = trained.label_set
        self.channels = (
            self.label_set.region_names if self.output == "regions" else self.label_set.label_names
        )

    def can_read_ahead(self) -> bool:
        """Whether :func:`predict_dataset` may decode the next case in a thread during inference."""
        return spare_core(self.device)

    def infer(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Float32 probabilities ``(C, x, y, z)`` of a preprocessed image ``(4, x, y, z)``, averaged over the
        TTA mirrorings, and their variance over the passes (``predict.uncertainty``) or None."""
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
        self, probabilities: np.ndarray, spacing_mm: tuple[float, ...], min_confidence: float | None = None
    ) -> np.ndarray:
        """uint8 internal labels ``(x, y, z)`` of probabilities ``(C, x, y, z)``, small and unconfident
        components dropped (:mod:`tumorseg.models.postprocess`; ``min_confidence`` None: the predictor's)."""
        import torch

        from tumorseg.models.inference import regions_to_labels

        prob = torch.from_numpy(probabilities)[None]
        if self.output == "regions":
            labels = regions_to_labels(prob > self.sliding_window.threshold, self.label_set)
        else:
            labels = prob.argmax(dim=1, keepdim=True).to(torch.uint8)
        return self.filter_components(labels[0, 0].numpy(), probabilities, spacing_mm, min_confidence)

    def filter_components(
        self,
        labels: np.ndarray,
        probabilities: np.ndarray,
        spacing_mm: tuple[float, ...],
        min_confidence: float | None = None,
    ) -> np.ndarray:
        """``labels`` without the tumour components of at most ``min_component_mm3`` or with a mean
        probability below ``min_confidence`` (None: the predictor's), from one labelling
        (:func:`postprocess.filter_components`)."""
        threshold = self.min_confidence if min_confidence is None else min_confidence
        tumour = whole_tumour_probability(probabilities, self.output) if threshold > 0 else None
        return filter_components(
            labels,
            tumour,
            min_voxels=min_component_voxels(self.cfg.min_component_mm3, spacing_mm),
            min_confidence=threshold,
        )

    def predict_volumes(self, volumes: CaseVolumes, *, min_confidence: float | None = None) -> CasePrediction:
        """Segment a case held in memory (source geometry) and map the result back onto it
        (``min_confidence``: as in :meth:`predict_preprocessed`)."""
        from tumorseg.data.preprocess import preprocess_case

        start = time.perf_counter()
        case = preprocess_case(dataclasses.replace(volumes, labels=None), self.preprocess_cfg)
        return self.predict_preprocessed(
            case, {"preprocess": time.perf_counter() - start}, min_confidence=min_confidence
        )

    def predict_case(self, case: CaseFiles, *, min_confidence: float | None = None) -> CasePrediction:
        """Read a case from disk (not its segmentation) and segment it (``min_confidence``: as in
        :meth:`predict_preprocessed`)."""
        return self.predict_preprocessed(*self.read_preprocessed(case), min_confidence=min_confidence)

    def decode(self, case: CaseFiles) -> tuple[DecodedCase, dict[str, float]]:
        """The case's modalities read and reoriented, not resampled, and ``{"read": seconds}``; no torch,
        so it may run in a reading thread while another case is inferred."""
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

    def predict_preprocessed(
        self, case: PreprocessedCase, seconds: dict[str, float], *, min_confidence: float | None = None
    ) -> CasePrediction:
        """Segment a preprocessed case and map the result back onto its source grid (from its geometry,
        as the label convention to write); ``seconds`` so far by step gets ``inference`` and ``restore``.
        ``min_confidence``: this case's component-confidence threshold (None: :attr:`min_confidence`;
        0 drops small components only)."""
        from tumorseg.data.preprocess import restore_to_source, restored_label_counts

        seconds = dict(seconds)
        start = time.perf_counter()
        probabilities, variance = self.infer(case.image)
        seconds["inference"] = time.perf_counter() - start

        start = time.perf_counter()
        geometry = case.geometry
        convention = output_convention(geometry["label_convention"], self.label_set)
        labels = self.labels_from_probabilities(
            probabilities,
            tuple(geometry["resampled_spacing_mm"]),
            min_confidence,
        )
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
    """Write a ``.nii.gz`` to a hidden temp name beside ``path``, then rename: never half a file. nibabel
    streams into ISA-L's gzip writer (level 1): no ``to_bytes`` copy, several times faster than zlib."""
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
    """Write ``<case_id>.nii.gz``, then the optional ``probabilities/`` and ``uncertainty/`` maps (float32
    ``(X, Y, Z, C)``) atomically with the reference ``header``; returns the files in that order."""
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
    """The cases of a dataset folder in any layout (or one case folder); ``layout`` and ``labels`` (the
    input's convention) detected when None. DataError names an unknown layout or a missing modality."""
    cases = discover_cases(Path(input_path), layout, labels)
    for case in cases:
        _check_modalities(case)
    return cases


def spare_core(device: Any) -> bool:
    """Whether a reading thread can run beside the inference without taking one of its cores: on GPU, or
    when this process may use more cores than torch's intra-op threads."""
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
    threshold_for: Callable[[CaseFiles, DecodedCase], float | None] | None = None,
) -> PredictSummary:
    """Segment every case of ``input_path`` (or the planned ``cases``) into ``out_dir/<case_id>.nii.gz``.

    All cases are checked first. A failing case leaves none of its files; cases finished before it stay
    (the error says how many), and other files in ``out_dir`` are never touched. ``on_case`` gets each
    prediction and its files. ``threshold_for(case, decoded)`` is asked for each case's component-confidence
    threshold (None: the predictor's) once the case has decoded (an unreadable file fails first, with its
    own error), in the reading thread when there is one: a drift check on the decoded modalities runs
    beside the previous case's inference, before this case's probabilities exist.
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
    # releases the GIL). Resampling uses torch and stays here: torch in the reader would start a second
    # OpenMP team competing with the inference's.
    prefetch = predictor.can_read_ahead()

    def read(case: CaseFiles) -> tuple[DecodedCase, dict[str, float], float | None]:
        decoded, seconds = predictor.decode(case)
        return decoded, seconds, (threshold_for(case, decoded) if threshold_for is not None else None)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tumorseg-read") as reader:
        pending = reader.submit(read, cases[0]) if cases and prefetch else None
        for position, case in enumerate(cases):
            try:
                decoded, seconds, threshold = pending.result() if pending is not None else read(case)
                if prefetch and position + 1 < len(cases):
                    pending = reader.submit(read, cases[position + 1])
                preprocessed, seconds = predictor.preprocess(decoded, seconds)
                del decoded
                prediction = predictor.predict_preprocessed(preprocessed, seconds, min_confidence=threshold)
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


# ---------------------------------------------------------------- images (2-D)
@dataclass
class PlanarPrediction:
    """The 2-D model's answer for one image: uint8 0/1 ``mask`` ``(H, W)`` at the input's size, ``tumour_type``
    None when ``label`` is false, ``area_px`` tumour pixels on the preprocessed grid (the area rule's)."""

    case_id: str
    mask: np.ndarray
    probability: float
    label: bool
    tumour_type: str | None
    type_probabilities: dict[str, float] = field(default_factory=dict)
    area_px: int = 0


def score_preprocessed(
    model: PlanarModel, images: np.ndarray, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """``(tumour_probability (N, S, S), class_probability (N, 4))`` of preprocessed float32 ``(N, S, S)``;
    class column 0 is the tumour probability (sigmoid), columns 1-3 the types (softmax)."""
    import torch

    maps, classes = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.as_tensor(np.asarray(images[start : start + batch_size], dtype=np.float32))[:, None]
            seg, logits = model.network(batch)
            maps.append(torch.sigmoid(seg[:, 0]).numpy())
            classes.append(
                torch.cat([torch.sigmoid(logits[:, :1]), torch.softmax(logits[:, 1:], dim=1)], dim=1).numpy()
            )
    size = images.shape[-1] if len(images) else 0
    return (
        np.concatenate(maps) if maps else np.zeros((0, size, size), np.float32),
        np.concatenate(classes) if classes else np.zeros((0, 4), np.float32),
    )


def binary_mask(probability: np.ndarray, threshold: float, min_component_px: int) -> np.ndarray:
    """uint8 ``(S, S)``: pixels above ``threshold`` minus 8-connected components < ``min_component_px``."""
    mask = probability > threshold
    if min_component_px > 0 and mask.any():
        from scipy import ndimage as ndi

        labels, n = ndi.label(mask, structure=np.ones((3, 3), dtype=bool))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_component_px
        keep[0] = False
        mask = keep[labels]
    return mask.astype(np.uint8)


def predict_planar(
    image: str | Path | np.ndarray, model: PlanarModel, *, case_id: str | None = None
) -> PlanarPrediction:
    """Segment and classify one 2-D image: a ``.mat``/image file, or an ``(H, W)`` / ``(H, W, 3|4)`` array.

    The mask is cleaned on the preprocessed grid, then restored to the input's ``(H, W)``. DataError
    for an unreadable file or an array that is not a 2-D image.
    """
    from tumorseg.data.planar import TUMOUR_TYPES, preprocess_planar, read_planar, restore_planar_mask

    if isinstance(image, (str, Path)):
        read = read_planar(Path(image))
        pixels, case_id = read.image, case_id or read.case_id
    else:
        pixels = np.asarray(image)
        if pixels.ndim not in (2, 3) or min(pixels.shape[:2]) < 2:
            raise DataError(f"image array of shape {pixels.shape}: expected (H, W) or (H, W, channels)")
        case_id = case_id or "image"
    prepared, geometry = preprocess_planar(pixels, model.preprocess)
    tumour_map, classes = score_preprocessed(model, prepared[None])
    settings = model.settings
    small = binary_mask(tumour_map[0], settings.mask_threshold, settings.min_component_px)
    area = int(small.sum())
    probability = float(model.detector.probability(classes[:, 0], np.array([area]))[0])
    label = probability >= model.detector.threshold
    types = {name: float(p) for name, p in zip(TUMOUR_TYPES, classes[0, 1:], strict=True)}
    tumour_type = max(types, key=types.get) if label else None
    mask = restore_planar_mask(small, geometry)
    return PlanarPrediction(str(case_id), mask, probability, bool(label), tumour_type, types, area)


def mask_png_bytes(mask: np.ndarray) -> bytes:
    """A 0/1 mask as an 8-bit grayscale PNG with values 0 and 255."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def predict_images(
    source: str | Path,
    out_dir: str | Path,
    model: PlanarModel,
    *,
    on_image: Callable[[PlanarPrediction, Path], None] | None = None,
) -> list[PlanarPrediction]:
    """``tumorseg predict`` for 2-D input: ``<out_dir>/<case_id>_mask.png`` (0/255, input size) per image."""
    results = []
    for path in image_inputs(source):
        prediction = predict_planar(path, model)
        target = Path(out_dir) / f"{prediction.case_id}_mask.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(mask_png_bytes(prediction.mask))
        os.replace(tmp, target)
        results.append(prediction)
        if on_image is not None:
            on_image(prediction, target)
    return results


def detect_images(source: str | Path, out_csv: str | Path, model: PlanarModel) -> list[PlanarPrediction]:
    """``tumorseg detect``: one CSV row per image: ``case_id, probability, label`` (``yes``/``no``)."""
    import pandas as pd

    from tumorseg.data.manifest import atomic_write_text

    results = [predict_planar(path, model) for path in image_inputs(source)]
    rows = [(r.case_id, round(r.probability, 6), "yes" if r.label else "no") for r in results]
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, pd.DataFrame(rows, columns=list(DETECT_COLUMNS)).to_csv(index=False))
    return results


def predict(
    input_path: str | Path,
    out_dir: str | Path,
    model: SegmentationPredictor | PlanarModel,
    *,
    layout: str | None = None,
    on_case: Callable[[Any, Any], None] | None = None,
) -> PredictSummary | list[PlanarPrediction]:
    """``tumorseg predict`` of volumes (``model`` a :class:`SegmentationPredictor`) or images (a 2-D model),
    by the input's dimensionality; ``on_case`` gets each prediction and what was written for it."""
    if input_dims(input_path) == IMAGE:
        return predict_images(input_path, out_dir, model, on_image=on_case)  # type: ignore[arg-type]
    return predict_dataset(input_path, out_dir, model, layout=layout, on_case=on_case)  # type: ignore[arg-type]
