"""Score predicted segmentations against references, like each BraTS challenge's official evaluator.

:func:`evaluate_case` scores internal label arrays ``(H, W, D)`` held in memory;
:func:`evaluate_folders` pairs two folders of ``<case_id>.nii.gz`` by case id and writes the long
per-case CSV (:data:`EVALUATION_COLUMNS`), a JSON summary (:mod:`.summary`) and figures
(:mod:`.plots`). A reference without a prediction is scored as an empty prediction; predictions
must lie on the reference's grid. Distances use the reference zooms (mm), volumes are in ml. The
label conventions, the ``--labels auto`` rules and every metric rule are in ``docs/evaluation.md``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorseg.config import EvaluateConfig
from tumorseg.data.conventions import LabelConvention, get_convention
from tumorseg.data.manifest import atomic_write_text
from tumorseg.errors import DataError
from tumorseg.evaluation.lesionwise import case_lesion_wise
from tumorseg.evaluation.metrics import bounding_box, confusion_counts, distance_metrics, overlap_metrics
from tumorseg.evaluation.summary import SUMMARY_METRICS as METRIC_COLUMNS
from tumorseg.evaluation.summary import build_summary

logger = logging.getLogger(__name__)

EVALUATION_COLUMNS: tuple[str, ...] = (
    "case_id",
    "region",
    *METRIC_COLUMNS,
    "lesions_ref",
    "lesions_tp",
    "lesions_fn",
    "lesions_fp",
    "prediction_missing",
)
"""Per-case CSV columns (lesion counts as the official Num_TP / Num_FN / Num_FP)."""

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
AUTO_DEFAULT_CONVENTION = "brats2023"
TUMOUR_FREE_TYPE = "tumour-free"


@dataclass
class EvaluationResult:
    """What :func:`evaluate_folders` computed (``per_case``: one row per case and region) and wrote."""

    per_case: pd.DataFrame
    summary: dict[str, Any]
    csv_path: Path
    summary_path: Path
    plot_paths: list[Path] = field(default_factory=list)

    def one_line(self) -> str:
        regions = self.summary["regions"]
        dice = " ".join(f"{r} {regions[r]['dice']['mean']:.3f}" for r in regions)
        lesion = " ".join(f"{r} {regions[r]['lesion_dice']['mean']:.3f}" for r in regions)
        missing = len(self.summary["missing_predictions"])
        note = f"; {missing} missing predictions scored empty" if missing else ""
        return (
            f"evaluated {self.summary['n_cases']} cases ({self.summary['label_convention']}): "
            f"Dice {dice}; lesion-wise Dice {lesion}{note} -> {self.csv_path}"
        )


def evaluate_case(
    pred_canonical: np.ndarray,
    ref_canonical: np.ndarray,
    spacing: tuple[float, float, float] | list[float],
    cfg: EvaluateConfig,
    *,
    convention: LabelConvention | str = AUTO_DEFAULT_CONVENTION,
    case_id: str = "",
    prediction_missing: bool = False,
) -> list[dict[str, Any]]:
    """Every metric of every scored region of one case: one dict per region (:data:`EVALUATION_COLUMNS`).

    ``pred_canonical`` and ``ref_canonical`` are ``(H, W, D)`` in the internal codes of the
    convention's label set (glioma: 0 bg, 1 NCR, 2 ED, 3 ET); spacing in mm.
    """
    convention = get_convention(convention) if isinstance(convention, str) else convention
    if cfg.hd95_penalty_mm is not None:  # a user's override (e.g. nnU-Net's 373.13 diagonal)
        convention = dataclasses.replace(convention, hd95_penalty_mm=float(cfg.hd95_penalty_mm))
    pred, ref = np.asarray(pred_canonical), np.asarray(ref_canonical)
    if pred.shape != ref.shape or ref.ndim != 3:
        raise ValueError(f"expected two 3-D label arrays of one shape, got {pred.shape} and {ref.shape}")
    spacing = tuple(float(s) for s in spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    total_voxels = ref.size
    pred, ref = _labelled_box(pred, ref, convention)
    pred_regions, ref_regions = convention.region_masks(pred), convention.region_masks(ref)
    counts = confusion_counts(pred_regions, ref_regions)
    counts[:, 2] += total_voxels - ref.size
    overlaps = overlap_metrics(counts)
    lesion_scores = case_lesion_wise(
        pred,
        ref,
        spacing,
        convention,
        dilation_connectivity=cfg.lesion_dilation_connectivity,
        connectivity=cfg.lesion_connectivity,
    )

    rows: list[dict[str, Any]] = []
    for index, region in enumerate(convention.region_names):
        distances = distance_metrics(
            ref_regions[index], pred_regions[index], spacing, convention.hd95_penalty_mm
        )
        lesions = lesion_scores[region]
        tp, fp, _tn, fn = (int(v) for v in counts[index])
        rows.append(
            {
                "case_id": case_id,
                "region": region,
                **overlaps[index],
                **distances,
                "lesion_dice": lesions.dice,
                "lesion_hd95": lesions.hd95,
                "volume_ref_ml": (tp + fn) * voxel_ml,
                "volume_pred_ml": (tp + fp) * voxel_ml,
                "lesions_ref": lesions.n_ref,
                "lesions_tp": lesions.n_tp,
                "lesions_fn": lesions.n_fn,
                "lesions_fp": lesions.n_fp,
                "prediction_missing": prediction_missing,
            }
        )
    return rows


def _labelled_box(
    pred: np.ndarray, ref: np.ndarray, convention: LabelConvention
) -> tuple[np.ndarray, np.ndarray]:
    """Both maps cut to their labelled union box grown by the largest dilation reach (outside: all TN)."""
    reach = max((rule.dilation for rule in convention.scored), default=0)
    box = bounding_box((pred > 0) | (ref > 0), margin=reach + 1)
    return (pred, ref) if box is None else (pred[box], ref[box])


def case_id_of(path: Path) -> str | None:
    """``BraTS-GLI-00001-000.nii.gz`` -> ``BraTS-GLI-00001-000``; None for a non-NIfTI or hidden file."""
    if path.name.startswith("."):
        return None
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def list_cases(folder: Path, what: str) -> dict[str, Path]:
    """Case id -> file for every ``<case_id>.nii.gz`` / ``.nii`` directly in ``folder``."""
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder not found")
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        case_id = case_id_of(path)
        if case_id is None or not path.is_file():
            continue
        if case_id in cases:
            raise DataError(
                f"{path}: case {case_id!r} also exists as {cases[case_id].name}; keep one file per case"
            )
        cases[case_id] = path
    return cases


def read_label_volume(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Label array ``(H, W, D)``, affine ``(4, 4)`` and zooms (mm); a singleton 4th axis is dropped."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataError(
            f"{path}: cannot read as NIfTI ({type(exc).__name__}); is the file complete?"
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D label volume, got shape {data.shape}")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return data, np.asarray(image.affine, dtype=np.float64), zooms  # type: ignore[return-value]


def _label_values(labels: np.ndarray) -> set[int]:
    """Distinct (rounded) label values; non-integer values are rejected later by ``encode``."""
    if labels.dtype.kind in "ui" and labels.size and labels.min() >= 0 and labels.max() < 1024:
        return set(np.flatnonzero(np.bincount(labels.ravel())).tolist())  # far faster than np.unique
    return set(np.unique(np.rint(labels)).astype(np.int64).tolist())


def convention_from_dataset_json(path: Path) -> str | None:
    """Convention a ``dataset.json`` names (MSD ``{"1": "edema"}``, nnU-Net v2 ``{"edema": 1}``), or None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path}: not valid JSON ({type(exc).__name__}); fix or remove it, or pass --labels"
        ) from None
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict):
        return None
    names: dict[int, str] = {}
    for key, value in labels.items():
        if str(key).lstrip("-").isdigit():  # MSD: {"1": "edema"}
            names[int(key)] = str(value).lower()
        elif isinstance(value, int):  # nnU-Net v2: {"edema": 1}
            names[value] = str(key).lower()
    label_one = names.get(1, "")
    every = " ".join(names.values())
    if "edema" in label_one or "oedema" in label_one:
        return "msd"
    if names.get(4, "") in ("rc", "resection cavity") or "resection" in every:
        return "brats2024-gli"
    if names.get(3, "") in ("cc", "cyst", "cystic component") or "cyst" in every:
        return "brats2024-ped"
    if 4 in names:
        return "brats2021"
    if any(token in label_one for token in ("necro", "ncr", "netc", "non-enhancing", "core")):
        return "brats2023"
    return None


BRATS_CHALLENGE_PREFIX = re.compile(r"^BraTS-(?P<challenge>[A-Za-z]+)-\d+", re.IGNORECASE)
"""``BraTS-MEN-00004-000`` -> ``MEN``: the BraTS 2023+ sub-challenge of a case id."""


def resolve_base_convention(ref_dir: Path, labels: str) -> tuple[str, bool]:
    """The convention before per-case rules, and whether it was given or read from ``dataset.json``."""
    if labels != "auto":
        get_convention(labels)  # validates the name
        return labels, True
    for candidate in (ref_dir / "dataset.json", ref_dir.parent / "dataset.json"):
        if candidate.is_file():
            verdict = convention_from_dataset_json(candidate)
            if verdict is not None:
                logger.info("label convention %s from %s", verdict, candidate)
                return verdict, True
    return AUTO_DEFAULT_CONVENTION, False


def case_convention(case_id: str, values: set[int], base: str, explicit: bool, path: Path) -> str:
    """The convention of one case under ``--labels auto``: explicit base, BraTS prefix, then label 4;
    DataError for an ambiguous prefix (``BraTS-PED``) or a label 4 in a prefixed case."""
    from tumorseg.data.conventions import AMBIGUOUS_BRATS_PREFIXES, BRATS_PREFIX_CONVENTIONS

    if explicit:
        return base
    match = BRATS_CHALLENGE_PREFIX.match(case_id)
    if match:
        challenge = match["challenge"].upper()
        if challenge in AMBIGUOUS_BRATS_PREFIXES:
            choices = " or ".join(AMBIGUOUS_BRATS_PREFIXES[challenge])
            raise DataError(
                f"{path}: BraTS-{challenge} cases are coded differently in 2023 and 2024; pass --labels {choices}"
            )
        if 4 in values:
            raise DataError(
                f"{path}: label 4 in a BraTS-{match['challenge']} case (a BraTS 2024 resection cavity?); "
                "pass --labels brats2024-gli, or brats2021 if 4 is enhancing tumour"
            )
        return BRATS_PREFIX_CONVENTIONS.get(challenge, AUTO_DEFAULT_CONVENTION)
    return "brats2021" if 4 in values else base


def read_tumour_types(case_info: Path | None, ref_dir: Path) -> dict[str, str] | None:
    """Case id -> tumour type from ``--case-info`` (CSV ``case_id,tumour_type``), else ``synth_meta.json``
    beside the references (records, ``{"cases": [...]}`` or ``{case_id: record}``; a null type with
    ``tumour_free: true`` is :data:`TUMOUR_FREE_TYPE`)."""
    if case_info is not None:
        if not case_info.is_file():
            raise DataError(f"{case_info}: case-info CSV not found")
        try:
            table = pd.read_csv(case_info, dtype=str, keep_default_na=False)
        except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise DataError(f"{case_info}: cannot read as CSV ({type(exc).__name__})") from None
        missing = [c for c in ("case_id", "tumour_type") if c not in table.columns]
        if missing:
            raise DataError(f"{case_info}: needs columns case_id,tumour_type (missing {missing})")
        return dict(zip(table["case_id"], table["tumour_type"], strict=True))
    meta = ref_dir / "synth_meta.json"
    if not meta.is_file():
        return None
    try:
        data = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        logger.warning("%s: not valid JSON; no per-tumour-type summary", meta)
        return None
    records: Any = data.get("cases", data) if isinstance(data, dict) else data
    if isinstance(records, dict):
        records = [{"case_id": k, **v} for k, v in records.items() if isinstance(v, dict)]
    types: dict[str, str] = {}
    for record in records if isinstance(records, list) else []:
        if isinstance(record, dict) and "case_id" in record:
            kind = record.get("tumour_type", record.get("tumor_type"))
            if kind is None and record.get("tumour_free"):
                kind = TUMOUR_FREE_TYPE  # tumorseg synth writes tumour_type null for these
            if kind is not None:
                types[str(record["case_id"])] = str(kind)
    if not types:
        logger.warning("%s: no case_id/tumour_type records; no per-tumour-type summary", meta)
    return types or None


def find_background_image(images_dir: Path, case_id: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """A FLAIR-like image of a case (any layout) for overlays, else None: FLAIR (``flair``, ``t2f``), then
    T2, then anything; a 4-D image gives its first channel (FLAIR in MSD Task01)."""
    import nibabel as nib

    def belongs(path: Path) -> bool:
        cid = case_id_of(path)
        if cid is None or "seg" in cid.lower() or "label" in cid.lower():
            return False
        return path.parent.name == case_id or cid == case_id or cid[len(case_id) :][:1] in {"_", "-", "."}

    def rank(path: Path) -> int:
        name = path.name.lower()
        return 0 if "flair" in name or "t2f" in name else 1 if "t2" in name else 2

    candidates = sorted((p for p in images_dir.rglob(f"*{case_id}*") if p.is_file() and belongs(p)), key=rank)
    for path in candidates:
        try:
            data = np.asanyarray(nib.load(path).dataobj)
        except Exception as exc:  # a background is optional: any unreadable file is skipped, not fatal
            logger.warning("%s: skipped as overlay background (%s)", path, type(exc).__name__)
            continue
        if data.ndim == 4:
            data = data[..., 0]
        if data.shape == tuple(shape):
            return data
    return None


@dataclass
class _CaseSource:
    ref_path: Path
    pred_path: Path | None
    convention: str

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        ref, _, _ = read_label_volume(self.ref_path)
        pred = read_label_volume(self.pred_path)[0] if self.pred_path else np.zeros_like(ref)
        convention = get_convention(self.convention)
        return convention.encode(pred), convention.encode(ref)


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    out_csv: str | Path,
    *,
    labels: str | None = None,
    cfg: EvaluateConfig | None = None,
    summary_path: str | Path | None = None,
    case_info: str | Path | None = None,
    images_dir: str | Path | None = None,
    make_plots: bool | None = None,
    case_conventions: dict[str, str] | None = None,
) -> EvaluationResult:
    """Evaluate a folder of predictions against a folder of references (module docstring).

    Args:
        labels: ``auto`` or a convention name; None means ``cfg.labels`` (as ``make_plots``: ``cfg.plots``).
        summary_path: default ``<out_csv stem>.summary.json``; plots go to ``<out_csv stem>_plots/``.
        case_info: CSV ``case_id,tumour_type`` for per-type statistics (else ``synth_meta.json``).
        images_dir: images (any layout) to draw overlays on.
        case_conventions: case id -> convention known from ingest; these cases skip the auto rules.
    """
    cfg = cfg or EvaluateConfig()
    pred_dir, ref_dir, out_csv = Path(pred_dir), Path(ref_dir), Path(out_csv)
    summary_path = Path(summary_path) if summary_path else out_csv.with_name(f"{out_csv.stem}.summary.json")
    pairs = _FolderPairs.of(pred_dir, ref_dir)
    tumour_types = read_tumour_types(Path(case_info) if case_info else None, ref_dir)
    conventions = _FolderConventions(
        *resolve_base_convention(ref_dir, labels or cfg.labels), case_conventions
    )

    rows: list[dict[str, Any]] = []
    sources: dict[str, _CaseSource] = {}
    for number, case_id in enumerate(sorted(pairs.ref), start=1):
        ref_path, pred_path = pairs.ref[case_id], pairs.pred.get(case_id)
        ref, pred, spacing = _read_pair(ref_path, pred_path, cfg)
        convention_name, convention = conventions.resolve(case_id, ref, pred, ref_path)
        pred, ref = _encode_pair(convention, ref, pred, ref_path, pred_path)
        missing = pred_path is None
        rows += evaluate_case(
            pred, ref, spacing, cfg, convention=convention, case_id=case_id, prediction_missing=missing
        )
        sources[case_id] = _CaseSource(ref_path, pred_path, convention_name)
        logger.debug("evaluated %s (%d/%d)", case_id, number, len(pairs.ref))

    per_case = pd.DataFrame(rows, columns=list(EVALUATION_COLUMNS))
    conventions.settle(sources)
    summary = _folder_summary(per_case, cfg, tumour_types, sources, pairs, pred_dir, ref_dir)
    atomic_write_text(out_csv, per_case.to_csv(index=False))
    atomic_write_text(summary_path, json.dumps(summary, indent=2, allow_nan=False) + "\n")

    plot_paths: list[Path] = []
    if cfg.plots if make_plots is None else make_plots:
        plot_paths = _write_plots(per_case, sources, out_csv, Path(images_dir) if images_dir else None)
    return EvaluationResult(per_case, summary, out_csv, summary_path, plot_paths)


@dataclass(frozen=True)
class _FolderPairs:
    """Case id -> file of both folders; ``missing``: references without prediction, ``extra``: the reverse."""

    ref: dict[str, Path]
    pred: dict[str, Path]
    missing: list[str]
    extra: list[str]

    @classmethod
    def of(cls, pred_dir: Path, ref_dir: Path) -> _FolderPairs:
        ref_cases = list_cases(ref_dir, "reference")
        pred_cases = list_cases(pred_dir, "prediction")
        if not ref_cases:
            raise DataError(f"{ref_dir}: no reference <case_id>.nii.gz files")
        if not set(ref_cases) & set(pred_cases):
            example = next(iter(ref_cases))
            raise DataError(
                f"{pred_dir}: no prediction matches a reference case of {ref_dir} (expected e.g. {example}.nii.gz)"
            )
        missing = sorted(set(ref_cases) - set(pred_cases))
        extra = sorted(set(pred_cases) - set(ref_cases))
        if missing:
            logger.warning(
                "%d reference cases have no prediction, scored as empty: %s", len(missing), ", ".join(missing)
            )
        if extra:
            logger.warning(
                "%d predictions have no reference and are ignored: %s", len(extra), ", ".join(extra)
            )
        return cls(ref_cases, pred_cases, missing, extra)


def _read_pair(
    ref_path: Path, pred_path: Path | None, cfg: EvaluateConfig
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """``(ref, pred, spacing)`` as stored (empty prediction when missing), the prediction checked on-grid."""
    ref, ref_affine, spacing = read_label_volume(ref_path)
    if pred_path is None:
        return ref, np.zeros_like(ref), spacing
    pred, pred_affine, _ = read_label_volume(pred_path)
    if pred.shape != ref.shape:
        raise DataError(f"{pred_path}: shape {pred.shape} differs from the reference {ref_path} {ref.shape}")
    deviation = float(np.max(np.abs(pred_affine - ref_affine)))
    if deviation > cfg.affine_tolerance_mm:
        raise DataError(
            f"{pred_path}: affine differs from the reference {ref_path} by {deviation:.3g} mm; "
            "predictions must be on the reference grid"
        )
    return ref, pred, spacing


@dataclass
class _FolderConventions:
    """The label convention of each case of a folder, checking the folder is read as one.

    ``known``: case id -> convention from ingest (no auto rules); ``first_of``: scored regions -> the
    first (convention, reference) read with them; ``with_3``/``with_4``: unprefixed references with 3 / 4.
    """

    base: str
    explicit: bool
    known: dict[str, str] | None = None
    first_of: dict[tuple[str, ...], tuple[str, Path]] = field(default_factory=dict)
    with_3: list[Path] = field(default_factory=list)
    with_4: list[Path] = field(default_factory=list)

    def resolve(
        self, case_id: str, ref: np.ndarray, pred: np.ndarray, ref_path: Path
    ) -> tuple[str, LabelConvention]:
        """The name and the convention of one case; DataError when the folder mixes conventions."""
        if self.known and case_id in self.known:
            name = self.known[case_id]
        else:
            name = self._auto(case_id, ref, pred, ref_path)
        convention = get_convention(name)
        self.first_of.setdefault(convention.region_names, (name, ref_path))
        if len(self.first_of) > 1:
            (name_a, path_a), (name_b, path_b) = list(self.first_of.values())[:2]
            raise DataError(
                f"{path_b}: read as {name_b} but {path_a.name} as {name_a}, which score other regions; "
                "the folder mixes conventions: pass --labels"
            )
        return name, convention

    def _auto(self, case_id: str, ref: np.ndarray, pred: np.ndarray, ref_path: Path) -> str:
        """The convention by the ``--labels auto`` rules, recording labels 3 and 4 of unprefixed cases."""
        values = set() if self.explicit else _label_values(ref) | _label_values(pred)
        name = case_convention(case_id, values, self.base, self.explicit, ref_path)
        if not self.explicit and not BRATS_CHALLENGE_PREFIX.match(case_id):
            # BraTS 2021 and 2023 agree on 0, 1, 2: a folder is one or the other as a whole
            for value, seen in ((3, self.with_3), (4, self.with_4)):
                if value in values:
                    seen.append(ref_path)
            if self.with_3 and self.with_4:
                raise DataError(
                    f"{ref_path}: label 3 in {self.with_3[0].name} but label 4 (BraTS 2021 ET) in "
                    f"{self.with_4[0].name}; the folder mixes conventions: pass --labels"
                )
        return name

    def settle(self, sources: dict[str, _CaseSource]) -> None:
        """With a label 4 anywhere the folder is BraTS 2021; cases without 3 or 4 only change name."""
        if self.with_4:
            for source in sources.values():
                if source.convention == AUTO_DEFAULT_CONVENTION:
                    source.convention = "brats2021"


def _encode_pair(
    convention: LabelConvention, ref: np.ndarray, pred: np.ndarray, ref_path: Path, pred_path: Path | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(pred, ref)`` in internal codes, the reference checked first; DataError names the bad file."""
    encoded: list[np.ndarray] = []
    for volume, path in ((ref, ref_path), (pred, pred_path or ref_path)):
        try:
            encoded.append(convention.encode(volume))
        except ValueError as exc:
            raise DataError(f"{path}: {exc}; pass --labels if the folder uses another convention") from None
    return encoded[1], encoded[0]


def _folder_summary(
    per_case: pd.DataFrame,
    cfg: EvaluateConfig,
    tumour_types: dict[str, str] | None,
    sources: dict[str, _CaseSource],
    pairs: _FolderPairs,
    pred_dir: Path,
    ref_dir: Path,
) -> dict[str, Any]:
    """The JSON summary: what was compared and with which parameters, then the statistics."""
    summary = build_summary(
        per_case,
        resamples=cfg.bootstrap_resamples,
        ci_level=cfg.ci_level,
        seed=cfg.seed,
        detection_min_volume_ml=cfg.detection_min_volume_ml,
        tumour_types=tumour_types,
    )
    used = sorted({source.convention for source in sources.values()})
    return {
        "label_convention": used[0] if len(used) == 1 else "+".join(used),
        "pred_dir": str(pred_dir),
        "ref_dir": str(ref_dir),
        "missing_predictions": pairs.missing,
        "extra_predictions": pairs.extra,
        "params": cfg.model_dump(),
        **summary,
    }


def _write_plots(
    per_case: pd.DataFrame, sources: dict[str, _CaseSource], out_csv: Path, images_dir: Path | None
) -> list[Path]:
    from tumorseg.evaluation.plots import plot_boxplots, plot_overlay, showcase_cases

    folder = out_csv.with_name(f"{out_csv.stem}_plots")
    written = [plot_boxplots(per_case, folder / "boxplots.png")]
    for tag, case_id in showcase_cases(per_case).items():
        pred, ref = sources[case_id].load()
        background = find_background_image(images_dir, case_id, ref.shape) if images_dir else None
        scores = per_case[per_case["case_id"] == case_id].set_index("region")["dice"]
        title = f"{tag}: {case_id}  Dice " + " ".join(f"{r} {v:.2f}" for r, v in scores.items())
        written.append(
            plot_overlay(
                folder / f"overlay_{tag}.png",
                ref=ref,
                pred=pred,
                title=title,
                background=background,
                convention=get_convention(sources[case_id].convention),
            )
        )
    return written
