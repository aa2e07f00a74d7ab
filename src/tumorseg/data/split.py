"""``tumorseg split``: patient-level train/val/test split, stratified by tumour size.

All time points of a patient (BraTS 2023+ ``BraTS-GLI-00001-000``, ``-001``, ...) go to the same
split, so no patient's anatomy leaks from training into evaluation.

Strata are per patient: ``tumour-free`` (no tumour voxel in any of its labelled cases) and
``size_bins`` quantile bins of the patient's largest ``tumour_volume_ml`` (``q1`` smallest). The
number of val and test patients is fixed globally (``round(n * fraction)``, at least 1 each, train
keeps at least 1) and shared out between strata by largest remainder; a stratum with 3 or more
patients gets at least one val and one test patient whenever the totals allow. Within a stratum,
patients are shuffled by ``seed`` (after sorting, so the result does not depend on file order).

Only labelled cases (``has_label``) are split; unlabelled ones cannot be trained or scored.

Output JSON (written atomically)::

    {"seed": 42, "fractions": {"train": 0.7, "val": 0.15, "test": 0.15},
     "train": [case_id, ...], "val": [...], "test": [...],
     "patients": {"train": [patient_id, ...], "val": [...], "test": [...]},
     "strata": {case_id: "tumour-free" | "q1" | ...}}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tumorseg.config import SplitConfig
from tumorseg.data.manifest import atomic_write_text
from tumorseg.errors import DataError

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
TUMOUR_FREE = "tumour-free"
INDEX_NAME = "index.csv"
_REQUIRED_INDEX_COLUMNS = ("case_id", "patient_id", "tumour_volume_ml", "has_label")


@dataclass(frozen=True)
class Split:
    """A patient-level split.

    Attributes:
        seed: shuffling seed.
        fractions: ``train``/``val``/``test`` -> requested share of patients.
        train, val, test: case ids (sorted).
        patients: split name -> patient ids (sorted).
        strata: case id -> stratum of its patient.
        out_file: where it was written (None when not written).
        unlabelled: case ids left out because they have no segmentation.
    """

    seed: int
    fractions: dict[str, float]
    train: list[str]
    val: list[str]
    test: list[str]
    patients: dict[str, list[str]]
    strata: dict[str, str]
    out_file: Path | None = None
    unlabelled: list[str] = field(default_factory=list)

    def cases(self, name: str) -> list[str]:
        """Case ids of ``train``, ``val`` or ``test``."""
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return list(getattr(self, name))

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "fractions": dict(self.fractions),
            "train": self.train,
            "val": self.val,
            "test": self.test,
            "patients": {name: self.patients[name] for name in SPLITS},
            "strata": dict(sorted(self.strata.items())),
        }

    def one_line(self) -> str:
        counts = {name: len(self.patients[name]) for name in SPLITS}
        parts = ", ".join(
            f"{name} {len(self.cases(name))} ({counts[name]} patient{'' if counts[name] == 1 else 's'})"
            for name in SPLITS
        )
        where = f" -> {self.out_file}" if self.out_file is not None else ""
        skipped = f"; {len(self.unlabelled)} unlabelled cases left out" if self.unlabelled else ""
        return f"split {len(self.strata)} cases (seed {self.seed}){where}: {parts}{skipped}"


def read_split(path: Path) -> Split:
    """Load a split JSON written by :func:`make_split`.

    Raises:
        DataError: missing file or not a split.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return Split(
            seed=int(data["seed"]),
            fractions={k: float(v) for k, v in data["fractions"].items()},
            train=list(data["train"]),
            val=list(data["val"]),
            test=list(data["test"]),
            patients={name: list(data["patients"][name]) for name in SPLITS},
            strata=dict(data["strata"]),
            out_file=path,
        )
    except FileNotFoundError:
        raise DataError(f"{path}: no split file; run `tumorseg split` first") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a tumorseg split file ({type(exc).__name__}: {exc})") from None


def make_split(preprocessed_dir: Path, out_file: Path, cfg: SplitConfig) -> Split:
    """Split the labelled cases of ``preprocessed_dir/index.csv`` and write the JSON to ``out_file``.

    Args:
        preprocessed_dir: output folder of ``tumorseg preprocess``.
        out_file: split JSON to write.
        cfg: the ``split`` section of params.yaml.

    Raises:
        DataError: no index, or fewer than 3 labelled patients.
    """
    index_file = Path(preprocessed_dir) / INDEX_NAME
    if not index_file.is_file():
        from tumorseg.data.planar_dataset import is_planar_preprocessed, split_planar

        if is_planar_preprocessed(Path(preprocessed_dir)):  # 2-D data: manifest.csv + <case_id>.npz
            return split_planar(Path(preprocessed_dir), Path(out_file), cfg)
        raise DataError(f"{index_file}: not found; run `tumorseg preprocess` first")
    index = pd.read_csv(index_file, dtype=str, keep_default_na=False)
    missing = [c for c in _REQUIRED_INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise DataError(f"{index_file}: lacks columns {missing}; run `tumorseg preprocess` again")
    split = split_cases(index, cfg)
    out_file = Path(out_file)
    atomic_write_text(out_file, json.dumps(split.to_dict(), indent=1) + "\n")
    split = dataclasses.replace(split, out_file=out_file)
    log.debug(split.one_line())
    return split


def split_cases(index: pd.DataFrame, cfg: SplitConfig) -> Split:
    """The split of an index table (``case_id``, ``patient_id``, ``tumour_volume_ml``, ``has_label``).

    Deterministic for a given table content and ``cfg.seed`` (row order does not matter).

    Raises:
        DataError: fewer than 3 labelled patients, or a tumour volume that is not a number.
    """
    labelled_mask = index["has_label"].astype(str).str.strip().str.lower() == "true"
    unlabelled = sorted(index.loc[~labelled_mask, "case_id"].astype(str))
    if unlabelled:
        log.warning("%d unlabelled cases are left out of the split", len(unlabelled))
    table = index.loc[labelled_mask, ["case_id", "patient_id", "tumour_volume_ml"]].astype(str)
    try:
        volumes = table["tumour_volume_ml"].astype(float)
    except ValueError:
        raise DataError(
            "index.csv: tumour_volume_ml must be numbers; run `tumorseg preprocess` again"
        ) from None
    if table["case_id"].duplicated().any():
        dup = table.loc[table["case_id"].duplicated(), "case_id"].iloc[0]
        raise DataError(f"index.csv: case {dup} appears twice")

    patient_volume = volumes.groupby(table["patient_id"]).max().sort_index()
    return split_by_patient(table, _patient_strata(patient_volume, cfg.size_bins), cfg, unlabelled)


def split_by_patient(
    table: pd.DataFrame, strata: dict[str, str], cfg: SplitConfig, unlabelled: list[str]
) -> Split:
    """The split of labelled cases, given each patient's stratum.

    Shared by the 3-D split (:func:`split_cases`) and the 2-D one
    (:func:`tumorseg.data.planar_dataset.split_planar_cases`): only how the strata are chosen differs.

    Args:
        table: labelled cases, ``case_id`` (unique) and ``patient_id`` columns as text.
        strata: patient id -> stratum, one entry per patient of ``table``.
        cfg: the ``split`` section (fractions, seed).
        unlabelled: case ids left out of the split, recorded in it.

    Raises:
        DataError: fewer patients than splits (each split needs one).
    """
    n = len(strata)
    if n < len(SPLITS):
        raise DataError(
            f"split.train/split.val/split.test: {n} labelled patient(s) cannot fill train, val and test "
            "(each needs one); add cases"
        )
    fractions = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
    assignment = assign_patients(strata, fractions, cfg.seed)

    case_strata = {c: strata[p] for c, p in zip(table["case_id"], table["patient_id"], strict=True)}
    cases: dict[str, list[str]] = {name: [] for name in SPLITS}
    for case_id, patient_id in zip(table["case_id"], table["patient_id"], strict=True):
        cases[assignment[patient_id]].append(case_id)
    patients = {name: sorted(p for p, s in assignment.items() if s == name) for name in SPLITS}
    return Split(
        seed=cfg.seed,
        fractions=fractions,
        train=sorted(cases["train"]),
        val=sorted(cases["val"]),
        test=sorted(cases["test"]),
        patients=patients,
        strata=case_strata,
        unlabelled=unlabelled,
    )


def _patient_strata(patient_volume: pd.Series, size_bins: int) -> dict[str, str]:
    """``tumour-free`` or the size quantile ``q1``..``qK`` of each patient (by rank, ties by id)."""
    strata = {str(p): TUMOUR_FREE for p, v in patient_volume.items() if v <= 0}
    with_tumour = sorted(((float(v), str(p)) for p, v in patient_volume.items() if v > 0))
    bins = min(size_bins, len(with_tumour))
    for rank, (_, patient) in enumerate(with_tumour):
        strata[patient] = f"q{rank * bins // len(with_tumour) + 1}"
    return strata


def _targets(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Patients per split: rounded shares, val and test at least 1, train at least 1."""
    counts = {name: max(1, math.floor(n * fractions[name] + 0.5)) for name in ("val", "test")}
    while n - counts["val"] - counts["test"] < 1:
        larger = max(("val", "test"), key=lambda name: (counts[name], name))
        counts[larger] -= 1
    counts["train"] = n - counts["val"] - counts["test"]
    return counts


def assign_patients(strata: dict[str, str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Which split each patient goes to, stratified, deterministic for a given ``seed``.

    The split rules of the module docstring, independent of what the strata mean: the 3-D split
    stratifies by tumour size (:func:`split_cases`), the 2-D split by source and tumour type
    (:func:`tumorseg.data.planar_dataset.split_planar_cases`).

    Args:
        strata: patient id -> stratum name (at least one patient per split, see :data:`SPLITS`).
        fractions: ``train``/``val``/``test`` -> requested share of patients.
        seed: shuffling seed within each stratum (patients are sorted first, so input order does
            not matter).

    Returns:
        Patient id -> ``"train"``, ``"val"`` or ``"test"``.
    """
    rng = np.random.default_rng(seed)
    members: dict[str, list[str]] = {}
    for patient in sorted(strata):
        members.setdefault(strata[patient], []).append(patient)
    names = sorted(members)
    for name in names:
        order = rng.permutation(len(members[name]))
        members[name] = [members[name][i] for i in order]
    tie_break = dict(zip(names, rng.permutation(len(names)).tolist(), strict=True))

    # Apportion cumulatively (test, then test + val) so that every stratum's train share is also
    # within one patient of its ideal, not only its val and test shares.
    targets = _targets(len(strata), fractions)
    size = {name: len(members[name]) for name in names}
    taken = dict.fromkeys(names, 0)
    quota: dict[str, dict[str, int]] = {name: {} for name in names}
    cumulative_fraction = cumulative_target = 0.0
    for split in ("test", "val"):
        cumulative_fraction += fractions[split]
        cumulative_target += targets[split]
        ideal = {name: size[name] * cumulative_fraction for name in names}
        count = {name: min(max(math.floor(ideal[name]), taken[name]), size[name]) for name in names}
        while sum(count.values()) > cumulative_target:
            over = max(
                (s for s in names if count[s] > taken[s]), key=lambda s: (count[s] - ideal[s], tie_break[s])
            )
            count[over] -= 1

        def priority(name: str, count: dict[str, int] = count, ideal: dict[str, float] = ideal) -> tuple:
            needs_one = count[name] == taken[name] and size[name] >= 3
            return (not needs_one, -(ideal[name] - count[name]), tie_break[name])

        ranked = sorted(names, key=priority)
        remaining = int(cumulative_target) - sum(count.values())
        while remaining > 0:
            progressed = False
            for name in ranked:
                if remaining and count[name] < size[name]:
                    count[name] += 1
                    remaining -= 1
                    progressed = True
            if not progressed:  # cannot happen: _targets leaves every split within the patients left
                raise RuntimeError(f"split: {remaining} {split} patients could not be placed")
        for name in names:
            quota[name][split] = count[name] - taken[name]
            taken[name] = count[name]

    assignment: dict[str, str] = {}
    for name in names:
        patients = members[name]
        n_test, n_val = quota[name]["test"], quota[name]["val"]
        for i, patient in enumerate(patients):
            assignment[patient] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return assignment
