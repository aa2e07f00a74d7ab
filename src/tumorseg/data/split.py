"""``tumorseg split``: group-level train/val/test split: stratified, from a datalist, or your own.

A group (never on two sides) joins one patient's cases (BraTS 2023+ time points) and scans
``tumorseg validate`` found duplicated, transitively. Labelled cases are split by ``split.method``;
the JSON's ``method``, ``groups`` and ``left_out`` keys appear only when they say something.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorseg.config import SplitConfig
from tumorseg.data.manifest import MANIFEST_NAME, STATUS_OK, atomic_write_text
from tumorseg.errors import DataError

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
TUMOUR_FREE = "tumour-free"
INDEX_NAME = "index.csv"
_REQUIRED_INDEX_COLUMNS = ("case_id", "patient_id", "tumour_volume_ml", "has_label")
GROUPING_COLUMNS: tuple[str, ...] = ("duplicate_of", "subset", "fold")
"""Optional ``index.csv`` columns (empty when absent): duplicate group, datalist subset and fold."""
STRATIFIED, DATALIST, FILE = "stratified", "datalist", "file"
DATALIST_SUBSETS: dict[str, str] = {"validation": "val", "testing": "test", "training": "", "": ""}
"""Datalist subset -> the side it fixes ("" = a training case: train unless held out)."""
_HELD_OUT_ORDER: dict[str, int] = {"test": 0, "val": 1, "": 2}
_SPLIT_FILE_METADATA = frozenset(
    ("seed", "fractions", "patients", "strata", "method", "val_fold", "file", "groups", "left_out")
)
"""Keys of a split JSON written by this command, ignored when it is given back as ``split.file``."""


@dataclass(frozen=True)
class Split:
    """A group-level split: sorted case ids per side, ``strata`` per case, ``out_file`` once written."""

    seed: int
    fractions: dict[str, float]
    train: list[str]
    val: list[str]
    test: list[str]
    patients: dict[str, list[str]]
    strata: dict[str, str]
    out_file: Path | None = None
    unlabelled: list[str] = field(default_factory=list)
    method: str = STRATIFIED
    val_fold: int | None = None
    file: str = ""
    groups: dict[str, list[str]] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)

    def cases(self, name: str) -> list[str]:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return list(getattr(self, name))

    def to_dict(self) -> dict:
        data: dict[str, Any] = {
            "seed": self.seed,
            "fractions": dict(self.fractions),
            "train": self.train,
            "val": self.val,
            "test": self.test,
            "patients": {name: self.patients[name] for name in SPLITS},
            "strata": dict(sorted(self.strata.items())),
        }
        if self.method != STRATIFIED:
            data["method"] = self.method
            if self.method == DATALIST and self.val_fold is not None:
                data["val_fold"] = self.val_fold
            if self.method == FILE:
                data["file"] = self.file
        if self.groups:
            data["groups"] = {group: list(p) for group, p in sorted(self.groups.items())}
        if self.left_out:
            data["left_out"] = list(self.left_out)
        return data

    def one_line(self) -> str:
        counts = {name: len(self.patients[name]) for name in SPLITS}
        parts = ", ".join(
            f"{name} {len(self.cases(name))} ({counts[name]} patient{'' if counts[name] == 1 else 's'})"
            for name in SPLITS
        )
        where = f" -> {self.out_file}" if self.out_file is not None else ""
        how = f", {self.method}" if self.method != STRATIFIED else ""
        skipped = f"; {len(self.unlabelled)} unlabelled cases left out" if self.unlabelled else ""
        unlisted = f"; {len(self.left_out)} cases not in {self.file} left out" if self.left_out else ""
        joined = f"; {len(self.groups)} groups join several patients" if self.groups else ""
        return f"split {len(self.strata)} cases (seed {self.seed}{how}){where}: {parts}{skipped}{unlisted}{joined}"


def read_split(path: Path) -> Split:
    """Load a split JSON written by :func:`make_split` (a DataError when missing or not a split)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return Split(
            seed=int(data["seed"]),
            fractions={k: float(v) for k, v in data["fractions"].items()},
            **{name: list(data[name]) for name in SPLITS},
            patients={name: list(data["patients"][name]) for name in SPLITS},
            strata=dict(data["strata"]),
            out_file=path,
            method=str(data.get("method", STRATIFIED)),
            val_fold=int(data["val_fold"]) if data.get("val_fold") is not None else None,
            file=str(data.get("file", "")),
            groups={str(g): list(p) for g, p in dict(data.get("groups", {})).items()},
            left_out=list(data.get("left_out", [])),
        )
    except FileNotFoundError:
        raise DataError(f"{path}: no split file; run `tumorseg split` first") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a tumorseg split file ({type(exc).__name__}: {exc})") from None


def make_split(preprocessed_dir: Path, out_file: Path, cfg: SplitConfig) -> Split:
    """Split the labelled cases of ``preprocessed_dir/index.csv`` (2-D: ``manifest.csv``) into ``out_file``;
    DataError for no index, fewer than 3 labelled groups, or an unusable datalist or split file."""
    index_file = Path(preprocessed_dir) / INDEX_NAME
    if not index_file.is_file():
        from tumorseg.data.readers import IMAGE, preprocessed_dims

        if preprocessed_dims(Path(preprocessed_dir)) == IMAGE:
            if cfg.method != STRATIFIED:
                raise DataError(
                    f"split.method: {cfg.method} is for 3-D datasets; 2-D data ({preprocessed_dir}) is "
                    "split stratified: set split.method: stratified"
                )
            return split_planar(Path(preprocessed_dir), Path(out_file), cfg)
        raise DataError(f"{index_file}: not found; run `tumorseg preprocess` first")
    index = pd.read_csv(index_file, dtype=str, keep_default_na=False)
    missing = [c for c in _REQUIRED_INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise DataError(f"{index_file}: lacks columns {missing}; run `tumorseg preprocess` again")
    user_split = read_user_split(Path(cfg.file)) if cfg.method == FILE else None
    split = _written(split_cases(index, cfg, user_split=user_split, index_name=str(index_file)), out_file)
    log.debug(split.one_line())
    return split


def _written(split: Split, out_file: Path) -> Split:
    out_file = Path(out_file)
    atomic_write_text(out_file, json.dumps(split.to_dict(), indent=1) + "\n")
    return dataclasses.replace(split, out_file=out_file)


class UnionFind:
    """Disjoint sets of strings; a set's root is its smallest member (patient and duplicate groups)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        self.parent.setdefault(item, item)
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def case_groups(table: pd.DataFrame, named_by: pd.Series | None = None) -> dict[str, str]:
    """Case id -> its group (patient ∪ ``duplicate_of``, transitively), named by its smallest patient id
    among the rows ``named_by`` selects (labelled cases; all rows when none does)."""
    links = UnionFind()
    cases = table["case_id"].astype(str).tolist()
    patients = [p or c for p, c in zip(table["patient_id"].astype(str), cases, strict=True)]
    duplicates = (
        table["duplicate_of"].astype(str).tolist() if "duplicate_of" in table.columns else [""] * len(cases)
    )
    for patient, duplicate in zip(patients, duplicates, strict=True):
        links.find(f"p:{patient}")
        if duplicate.strip():
            links.union(f"p:{patient}", f"d:{duplicate.strip()}")
    qualifies = [True] * len(cases) if named_by is None else [bool(v) for v in named_by]
    names: dict[str, str] = {}
    fallback: dict[str, str] = {}
    for patient, ok in zip(patients, qualifies, strict=True):
        root = links.find(f"p:{patient}")
        fallback[root] = min(fallback.get(root, patient), patient)
        if ok:
            names[root] = min(names.get(root, patient), patient)
    return {
        case: names.get(links.find(f"p:{patient}"), fallback[links.find(f"p:{patient}")])
        for case, patient in zip(cases, patients, strict=True)
    }


def split_cases(
    index: pd.DataFrame,
    cfg: SplitConfig,
    *,
    user_split: UserSplit | None = None,
    index_name: str = INDEX_NAME,
) -> Split:
    """The split of preprocess's ``index.csv`` table by ``cfg.method``, independent of row order;
    DataError for fewer than 3 groups, a bad volume, an id twice, an unusable datalist or user split."""
    index, table, unlabelled = _grouped_labelled_cases(index)
    try:
        volumes = table["tumour_volume_ml"].astype(float)
    except ValueError:
        raise DataError(
            "index.csv: tumour_volume_ml must be numbers; run `tumorseg preprocess` again"
        ) from None
    group_volume = volumes.groupby(table["group"]).max().sort_index()
    strata = _patient_strata(group_volume, cfg.size_bins)

    left_out: list[str] = []
    if cfg.method == STRATIFIED:
        _enough_groups(len(strata))
        assignment = assign_patients(strata, _fractions(cfg), cfg.seed)
    elif cfg.method == DATALIST:
        assignment = _datalist_assignment(table, strata, cfg, index_name)
    else:
        if user_split is None:
            raise DataError(f"split.method: file needs split.file ({cfg.file!r}) read; use make_split")
        assignment, kept = _file_assignment(table, index, user_split, index_name)
        left_out = sorted(set(table["case_id"]) - kept)
        table = table[table["case_id"].isin(kept)]
        strata = {g: strata[g] for g in sorted(set(table["group"]))}
    split = _build_split(table, strata, assignment, cfg, unlabelled)
    patients_per_group = table.groupby("group")["patient_id"]
    has_validation = (table["subset"].str.strip().str.lower() == "validation").any()
    fold_is_val = cfg.method == DATALIST and _has_folds(table) and not has_validation
    return dataclasses.replace(
        split,
        method=cfg.method,
        val_fold=cfg.val_fold if fold_is_val else None,
        file=cfg.file if cfg.method == FILE else "",
        groups={g: sorted(set(p)) for g, p in patients_per_group if p.nunique() > 1},
        left_out=left_out,
    )


def _grouped_labelled_cases(index: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The index as text with every grouping column, its labelled cases with ``group``, the unlabelled ids."""
    index = index.astype(str)
    for column in GROUPING_COLUMNS:
        if column not in index.columns:
            index = index.assign(**{column: ""})
    labelled_mask = index["has_label"].str.strip().str.lower() == "true"
    unlabelled = sorted(index.loc[~labelled_mask, "case_id"])
    if unlabelled:
        log.warning("%d unlabelled cases are left out of the split", len(unlabelled))
    if index["case_id"].duplicated().any():
        dup = index.loc[index["case_id"].duplicated(), "case_id"].iloc[0]
        raise DataError(f"index.csv: case {dup} appears twice")
    group_of = case_groups(index, named_by=labelled_mask)
    table = index.loc[labelled_mask, ["case_id", "patient_id", "tumour_volume_ml", *GROUPING_COLUMNS]]
    return index, table.assign(group=[group_of[c] for c in table["case_id"]]), unlabelled


def _fractions(cfg: SplitConfig) -> dict[str, float]:
    return {"train": cfg.train, "val": cfg.val, "test": cfg.test}


def _enough_groups(n: int) -> None:
    if n < len(SPLITS):
        raise DataError(
            f"split.train/split.val/split.test: {n} labelled patient(s) cannot fill train, val and test "
            "(each needs one); add cases"
        )


def _build_split(
    table: pd.DataFrame,
    strata: dict[str, str],
    assignment: Mapping[str, str],
    cfg: SplitConfig,
    unlabelled: list[str],
    unit: str = "group",
) -> Split:
    """The :class:`Split` of ``table``'s cases, given each unit's stratum and side."""
    case_strata = {c: strata[u] for c, u in zip(table["case_id"], table[unit], strict=True)}
    cases: dict[str, list[str]] = {name: [] for name in SPLITS}
    patients: dict[str, set[str]] = {name: set() for name in SPLITS}
    for case_id, patient_id, group in zip(table["case_id"], table["patient_id"], table[unit], strict=True):
        cases[assignment[group]].append(case_id)
        patients[assignment[group]].add(patient_id)
    return Split(
        seed=cfg.seed,
        fractions=_fractions(cfg),
        **{name: sorted(cases[name]) for name in SPLITS},
        patients={name: sorted(patients[name]) for name in SPLITS},
        strata=case_strata,
        unlabelled=unlabelled,
    )


def _has_folds(table: pd.DataFrame) -> bool:
    training = table["subset"].str.strip().str.lower().isin(["training", ""])
    return bool((table.loc[training, "fold"].str.strip() != "").any())


def _datalist_assignment(
    table: pd.DataFrame, strata: dict[str, str], cfg: SplitConfig, index_name: str
) -> dict[str, str]:
    """Group -> side from the datalist's ``validation``/``testing`` lists or fold ``split.val_fold``.

    A group on several sides goes whole to the most held-out (warning: nothing evaluated may have been
    trained on); a side the datalist lacks is held out of training groups by the stratified rule.
    DataError for no subsets, an unknown subset or fold, or an empty side.
    """
    wanted, need_val, need_test = _datalist_wants(table, cfg, index_name)
    sides = _sides_by_group(table, wanted)
    n = len(strata)
    if need_test or need_val:
        pool = {g: strata[g] for g, side in sides.items() if side == ""}
        parts = [name for name, needed in (("val", need_val), ("test", need_test)) if needed]
        targets = _held_out_counts(n, _fractions(cfg), len(pool) - 1, parts)
        held = {}
        if pool:
            held = assign_patients(pool, _pool_fractions(targets, len(pool)), cfg.seed, targets=targets)
        for group, side in held.items():
            sides[group] = "" if side == "train" else side
    assignment = {group: side or "train" for group, side in sides.items()}
    empty = [name for name in SPLITS if name not in assignment.values()]
    if empty:
        raise DataError(
            f"split.method: datalist leaves {' and '.join(empty)} empty ({n} labelled groups in {index_name}); "
            "check the datalist's lists and folds, or use split.method: stratified"
        )
    return assignment


def _datalist_wants(
    table: pd.DataFrame, cfg: SplitConfig, index_name: str
) -> tuple[dict[str, str], bool, bool]:
    """Case -> the side its subset or fold fixes (``""``: train unless held out); whether val and test
    must still be held out."""
    subsets = table["subset"].str.strip().str.lower()
    unknown = sorted(set(subsets) - set(DATALIST_SUBSETS))
    if unknown:
        case = table.loc[subsets == unknown[0], "case_id"].iloc[0]
        raise DataError(
            f"{index_name}: case {case} has datalist subset {unknown[0]!r}; expected training, validation or testing"
        )
    if not (subsets != "").any():
        raise DataError(
            f"split.method: datalist, but no labelled case of {index_name} has a datalist subset (its "
            "subset column is empty: the dataset has no MONAI datalist); use split.method: stratified or file"
        )
    wanted = {case: DATALIST_SUBSETS[subset] for case, subset in zip(table["case_id"], subsets, strict=True)}
    has_validation, has_test = "val" in wanted.values(), "test" in wanted.values()
    has_folds = _has_folds(table)
    if not has_validation and has_folds:
        folds = table["fold"].str.strip()
        training = subsets.isin(["training", ""])
        present = sorted({int(f) for f in folds[training] if f})
        if cfg.val_fold not in present:
            raise DataError(
                f"split.val_fold: {cfg.val_fold} is not a fold of the datalist in {index_name} "
                f"(folds {', '.join(map(str, present))})"
            )
        for case, fold, is_training in zip(table["case_id"], folds, training, strict=True):
            if is_training and fold and int(fold) == cfg.val_fold:
                wanted[case] = "val"
    return wanted, not has_validation and not has_folds, not has_test


def _sides_by_group(table: pd.DataFrame, wanted: dict[str, str]) -> dict[str, str]:
    """Group -> the most held-out side the datalist wants for any of its cases."""
    sides: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for case, group in zip(table["case_id"], table["group"], strict=True):
        members.setdefault(group, []).append(case)
    for group, cases in sorted(members.items()):
        found = sorted({wanted[c] for c in cases}, key=_HELD_OUT_ORDER.__getitem__)
        sides[group] = found[0]
        if len(found) > 1:
            where = ", ".join(f"{c} ({wanted[c] or 'train'})" for c in sorted(cases))
            log.warning(
                "datalist puts one group (%s) on several sides: %s; all of it goes to %s",
                group,
                where,
                found[0],
            )
    return sides


def _pool_fractions(targets: dict[str, int], n: int) -> dict[str, float]:
    """The shares of a pool of ``n`` groups that hold ``targets`` out (per-stratum ideals)."""
    test, val = targets["test"] / n, targets["val"] / n
    return {"train": 1.0 - test - val, "val": val, "test": test}


@dataclass(frozen=True)
class UserSplit:
    """A user's split file: case id -> side in file order, and ``where`` each was named (for messages)."""

    path: str
    sides: dict[str, str]
    where: dict[str, str]


def read_user_split(path: Path) -> UserSplit:
    """Parse ``split.file``: JSON ``{"train": [...], "val": [...], "test": [...]}`` (a split this command
    wrote too) or CSV ``case_id,split``; DataError naming the file and key or line when it is unusable.
    """
    name = str(path)
    if not path.is_file():
        raise DataError(f"split.file: {name} does not exist (paths are relative to the project folder)")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise DataError(f"split.file: {name} must be a .json or .csv file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"split.file: {name} cannot be read ({exc})") from None
    entries = _json_entries(text, name) if suffix == ".json" else _csv_entries(path, name)
    sides: dict[str, str] = {}
    where: dict[str, str] = {}
    for case, side, place in entries:
        if case in sides and sides[case] != side:
            raise DataError(f"{name}: case {case} is in {sides[case]} ({where[case]}) and {side} ({place})")
        sides.setdefault(case, side)
        where.setdefault(case, place)
    for side in SPLITS:
        if side not in sides.values():
            raise DataError(f"{name}: no {side} case; train, val and test each need at least one")
    return UserSplit(path=name, sides=sides, where=where)


def _json_entries(text: str, name: str) -> list[tuple[str, str, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{name}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f'{name}: expected an object {{"train": [...], "val": [...], "test": [...]}}')
    other = sorted(set(data) - set(SPLITS) - _SPLIT_FILE_METADATA)
    if other:
        raise DataError(f"{name}: unknown key {other[0]!r}; use train, val and test (lists of case ids)")
    entries = []
    for side in SPLITS:
        if side not in data:
            raise DataError(f"{name}: no key {side!r}; train, val and test each need a list of case ids")
        cases = data[side]
        if not isinstance(cases, list) or not all(isinstance(c, str) and c.strip() for c in cases):
            raise DataError(f"{name}: key {side!r} must be a list of case ids (non-empty strings)")
        entries += [(c.strip(), side, f"key {side!r}") for c in cases]
    return entries


def _csv_entries(path: Path, name: str) -> list[tuple[str, str, str]]:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{name}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    if "case_id" not in table.columns or "split" not in table.columns:
        raise DataError(f"{name}: needs a header with the columns case_id and split (train, val or test)")
    entries = []
    for line, (case, side) in enumerate(zip(table["case_id"], table["split"], strict=True), start=2):
        case, side = case.strip(), side.strip().lower()
        if not case:
            raise DataError(f"{name}: line {line} has no case_id")
        if side not in SPLITS:
            raise DataError(f"{name}: line {line} ({case}) has split {side!r}; use train, val or test")
        entries.append((case, side, f"line {line}"))
    return entries


def _file_assignment(
    table: pd.DataFrame, index: pd.DataFrame, user: UserSplit, index_name: str
) -> tuple[dict[str, str], set[str]]:
    """Group -> side from a user's split, and the labelled cases it lists; DataError for an unknown id,
    a group on two sides or an empty side."""
    known = set(index["case_id"])
    unknown = [c for c in user.sides if c not in known]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise DataError(
            f"{user.path}: case {unknown[0]} ({user.where[unknown[0]]}) is not in {index_name}{more}: "
            "an unknown id, or a case validation quarantined"
        )
    labelled = set(table["case_id"])
    unlabelled = sorted(c for c in user.sides if c not in labelled)
    if unlabelled:
        log.warning(
            "%s lists %d unlabelled case(s), left out (no segmentation to train or score): %s",
            user.path,
            len(unlabelled),
            _first_five(unlabelled),
        )
    unlisted = sorted(labelled - set(user.sides))
    if unlisted:
        log.warning(
            "%d labelled case(s) of %s are not in %s and are left out of the split: %s",
            len(unlisted),
            index_name,
            user.path,
            _first_five(unlisted),
        )
    listed = table[table["case_id"].isin(user.sides)]
    assignment: dict[str, str] = {}
    first: dict[str, str] = {}
    for case, group in sorted(zip(listed["case_id"], listed["group"], strict=True)):
        side = user.sides[case]
        if assignment.setdefault(group, side) != side:
            other = first[group]
            why = _why_one_group(listed, other, case)
            raise DataError(
                f"{user.path}: cases {other} ({assignment[group]}, {user.where[other]}) and {case} ({side}, "
                f"{user.where[case]}) are one group ({why}); put the whole group on one side"
            )
        first.setdefault(group, case)
    empty = [name for name in SPLITS if name not in assignment.values()]
    if empty:
        raise DataError(f"{user.path}: no labelled {' or '.join(empty)} case; each side needs one")
    return assignment, set(listed["case_id"])


def _first_five(cases: list[str]) -> str:
    return ", ".join(cases[:5]) + (" ..." if len(cases) > 5 else "")


def _why_one_group(table: pd.DataFrame, a: str, b: str) -> str:
    rows = table.set_index("case_id")
    if rows.loc[a, "patient_id"] == rows.loc[b, "patient_id"]:
        return f"patient {rows.loc[a, 'patient_id']}"
    if rows.loc[a, "duplicate_of"] and rows.loc[a, "duplicate_of"] == rows.loc[b, "duplicate_of"]:
        return f"the same scan, duplicate_of {rows.loc[a, 'duplicate_of']}"
    return f"linked through patients and duplicated scans, group {rows.loc[a, 'group']}"


def _patient_strata(patient_volume: pd.Series, size_bins: int) -> dict[str, str]:
    """``tumour-free`` or the size quantile ``q1``..``qK`` of each patient (by rank, ties by id)."""
    strata = {str(p): TUMOUR_FREE for p, v in patient_volume.items() if v <= 0}
    with_tumour = sorted(((float(v), str(p)) for p, v in patient_volume.items() if v > 0))
    bins = min(size_bins, len(with_tumour))
    for rank, (_, patient) in enumerate(with_tumour):
        strata[patient] = f"q{rank * bins // len(with_tumour) + 1}"
    return strata


def _held_out_counts(
    n: int, fractions: Mapping[str, float], room: int, parts: Sequence[str] = ("val", "test")
) -> dict[str, int]:
    """Val and test groups: ``round(n * fraction)``, at least 1, for ``parts`` (others 0), the larger cut
    until at most ``room`` are held out."""
    counts = {
        name: max(1, math.floor(n * fractions[name] + 0.5)) if name in parts else 0
        for name in ("val", "test")
    }
    while 0 < counts["val"] + counts["test"] > room:
        larger = max(("val", "test"), key=lambda name: (counts[name], name))
        counts[larger] -= 1
    return counts


def assign_patients(
    strata: dict[str, str], fractions: dict[str, float], seed: int, *, targets: dict[str, int] | None = None
) -> dict[str, str]:
    """Patient (or group) id -> ``train``/``val``/``test``, stratified, deterministic for ``seed``.

    Val and test get ``targets`` patients (default ``round(n * fraction)``, at least 1 each) shared
    between strata by largest remainder; a stratum of 3+ gets a val and a test patient when possible.
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

    # Cumulatively (test, then test + val): every stratum's train share is within one of its ideal too.
    if targets is None:
        targets = _held_out_counts(len(strata), fractions, len(strata) - 1)
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
            if not progressed:  # cannot happen: the targets leave every split within the patients left
                raise RuntimeError(f"split: {remaining} {split} patients could not be placed")
        for name in names:
            quota[name][split] = count[name] - taken[name]
            taken[name] = count[name]

    assignment: dict[str, str] = {}
    for name in names:
        n_test, n_val = quota[name]["test"], quota[name]["val"]
        for i, patient in enumerate(members[name]):
            assignment[patient] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return assignment


def _patient_stratum(cases: pd.DataFrame) -> str:
    """``<source>/tumour/<type>``, ``<source>/tumour`` (type unknown) or ``<source>/tumour-free``."""
    source = Counter(cases["source"]).most_common(1)[0][0]
    if not (cases["has_tumour"] == "True").any():
        return f"{source}/tumour-free"
    types = [t for t in cases["tumour_type"] if t]
    return f"{source}/tumour/{Counter(types).most_common(1)[0][0]}" if types else f"{source}/tumour"


def split_planar_cases(table: pd.DataFrame, cfg: SplitConfig) -> Split:
    """Patient-level split of a preprocessed 2-D manifest, stratified by source and tumour type; cases
    of unknown tumour status are left out; DataError for fewer than 3 patients or an id twice."""
    table = table.astype(str)
    labelled = table["has_tumour"].isin(["True", "False"])
    unlabelled = sorted(table.loc[~labelled, "case_id"])
    table = table.loc[labelled]
    if table["case_id"].duplicated().any():
        raise DataError(
            f"manifest.csv: case {table.loc[table['case_id'].duplicated(), 'case_id'].iloc[0]} appears twice"
        )
    strata = {str(p): _patient_stratum(cases) for p, cases in table.groupby("patient_id", sort=True)}
    _enough_groups(len(strata))
    assignment = assign_patients(strata, _fractions(cfg), cfg.seed)
    return _build_split(table, strata, assignment, cfg, unlabelled, unit="patient_id")


def split_planar(preprocessed_dir: Path, out_file: Path, cfg: SplitConfig) -> Split:
    path = Path(preprocessed_dir) / MANIFEST_NAME
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table = table[table["status"] == STATUS_OK] if "status" in table.columns else table
    return _written(split_planar_cases(table, cfg), out_file)
