"""Check a train/val/test split against the manifest: no patient, no duplicated scan in two splits.

One patient (or scan) in train and test leaks test data into training; a bad split cannot be
quarantined away, so it is a DataError. Patients come from the manifest, not the split file's own
``patients`` lists, so a split that disagrees with the data is caught too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tumorseg.data.manifest import STATUS_OK, read_manifest
from tumorseg.data.split import SPLITS, case_groups, read_split
from tumorseg.errors import DataError
from tumorseg.validation.suite import quiet_great_expectations


@dataclass(frozen=True)
class SplitCheck:
    """A split that passed :func:`validate_split`: split name -> number of cases, of distinct patients."""

    cases: dict[str, int]
    patients: dict[str, int]

    def one_line(self) -> str:
        parts = ", ".join(
            f"{name} {self.cases[name]} cases/{self.patients[name]} patients" for name in self.cases
        )
        return f"split ok (no patient in two splits): {parts}"


def _split_tables(
    splits: dict[str, list[str]], manifest: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(assignments, patient_splits, group_splits)``: one row per listed case; one row per
    (patient, split) pair; one row per (group, split) pair, a group being patient ∪ duplicated scan."""
    group_of = case_groups(manifest.drop_duplicates("case_id").astype(str))
    cases = manifest.drop_duplicates("case_id").set_index("case_id")
    has_status = "status" in cases.columns
    rows = [
        {
            "split": name,
            "case_id": case,
            "patient_id": cases["patient_id"].get(case),
            # A table without status (preprocess's index.csv) lists valid cases only.
            "status": cases["status"].get(case)
            if has_status
            else (STATUS_OK if case in cases.index else None),
        }
        for name, members in splits.items()
        for case in members
    ]
    assignments = pd.DataFrame(rows, columns=["split", "case_id", "patient_id", "status"])
    assignments["patient_id"] = assignments["patient_id"].fillna(assignments["case_id"])
    patient_splits = assignments[["patient_id", "split"]].drop_duplicates().reset_index(drop=True)
    assignments["group"] = [
        group_of.get(c, p) for c, p in zip(assignments["case_id"], assignments["patient_id"], strict=True)
    ]
    group_splits = assignments[["group", "split"]].drop_duplicates().reset_index(drop=True)
    return assignments, patient_splits, group_splits


def _unexpected(batch: Any, expectation: Any, column: str) -> list[str]:
    """The ``column`` values of every row of ``batch`` that ``expectation`` fails on, sorted."""
    complete = {"result_format": "COMPLETE", "unexpected_index_column_names": [column]}
    result = batch.validate(expectation, result_format=complete)
    entries = (result.result or {}).get("unexpected_index_list") or []
    return sorted({str(entry[column]) for entry in entries})


def validate_split(split_json_path: Path, manifest: pd.DataFrame | Path) -> SplitCheck:
    """Check with GX (ephemeral) that every patient and duplicate group is in one split and every listed
    case is unique, in ``manifest`` (a table with ``case_id``, ``patient_id``, optionally ``status``, or
    the folder / file to read it from) and ``ok``; else a DataError."""
    path = Path(split_json_path)
    if not isinstance(manifest, pd.DataFrame):
        manifest = read_manifest(manifest)
    split = read_split(path)
    splits = {name: split.cases(name) for name in SPLITS}
    assignments, patient_splits, group_splits = _split_tables(splits, manifest)
    known = sorted(manifest["case_id"].astype(str).unique())
    findings = _expectation_findings(assignments, patient_splits, group_splits, known)
    problems = _problems(findings, assignments, patient_splits)
    if problems:
        raise DataError(f"{path}: {'; '.join(problems)}; rebuild the split with `tumorseg split`")

    counts = assignments.groupby("split", sort=False)
    return SplitCheck(
        cases={name: int(n) for name, n in counts.size().items()},
        patients={name: int(n) for name, n in counts["patient_id"].nunique().items()},
    )


@dataclass(frozen=True)
class _Findings:
    """Patients, and groups (patient ∪ duplicated scan), in more than one split, and problem
    (``not in the manifest`` ...) -> the case ids that have it."""

    leaked: list[str]
    split_groups: list[str]
    bad_cases: dict[str, list[str]]


def _expectation_findings(
    assignments: pd.DataFrame, patient_splits: pd.DataFrame, group_splits: pd.DataFrame, known: list[str]
) -> _Findings:
    """Run the expectations on the three tables of :func:`_split_tables` (``known``: the manifest's case ids)."""
    with quiet_great_expectations():
        # Imported inside the quiet block: GX is slow to import and logs INFO chatter as it loads.
        import great_expectations as gx

        source = _ephemeral_context().data_sources.add_pandas("split")
        case_batch = _whole_frame_batch(source, "assignments", assignments)
        patient_batch = _whole_frame_batch(source, "patient_splits", patient_splits)
        group_batch = _whole_frame_batch(source, "group_splits", group_splits)
        unique = gx.expectations.ExpectColumnValuesToBeUnique
        leaked = _unexpected(patient_batch, unique(column="patient_id"), "patient_id")
        split_groups = _unexpected(group_batch, unique(column="group"), "group")
        case_problems = {
            "listed in more than one split": unique(column="case_id"),
            "not in the manifest": gx.expectations.ExpectColumnValuesToBeInSet(
                column="case_id", value_set=known
            ),
            "quarantined in the manifest": gx.expectations.ExpectColumnValuesToBeInSet(
                column="status", value_set=[STATUS_OK]
            ),
        }
        bad_cases = {
            label: _unexpected(case_batch, expectation, "case_id")
            for label, expectation in case_problems.items()
        }
    return _Findings(leaked, split_groups, bad_cases)


def _ephemeral_context() -> Any:
    """A GX context with in-memory stores and no Data Docs site (call it inside ``quiet_great_expectations``)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _whole_frame_batch(source: Any, name: str, frame: pd.DataFrame) -> Any:
    """A GX batch of the whole of ``frame``, as asset ``name`` of a pandas data source."""
    return (
        source.add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )


def _problems(findings: _Findings, assignments: pd.DataFrame, patient_splits: pd.DataFrame) -> list[str]:
    """One message per kind of problem found, each naming at most five offenders."""
    problems: list[str] = []
    leaked = findings.leaked
    if leaked:
        where = {p: sorted(patient_splits.loc[patient_splits["patient_id"] == p, "split"]) for p in leaked}
        shown = ", ".join(f"{p} in {' and '.join(s)}" for p, s in list(where.items())[:5])
        problems.append(f"patient{'s' if len(leaked) > 1 else ''} in more than one split: {shown}")
    # A group that is not one patient's leaked through a scan stored under two case ids.
    duplicated = [
        g
        for g in findings.split_groups
        if assignments.loc[assignments["group"] == g, "patient_id"].nunique() > 1
    ]
    if duplicated:
        shown = "; ".join(
            ", ".join(
                f"{r.case_id} ({r.split})"
                for r in assignments[assignments["group"] == g].sort_values("case_id").itertuples()
            )
            for g in duplicated[:5]
        )
        problems.append(f"duplicated scans (duplicate_of) in more than one split: {shown}")
    for label, bad in findings.bad_cases.items():
        if bad:
            problems.append(f"case{'s' if len(bad) > 1 else ''} {label}: {', '.join(bad[:5])}")
    return problems
