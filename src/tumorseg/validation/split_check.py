"""Check a train/val/test split against the manifest: no patient, no duplicated scan in two splits.

A patient's scans are strongly correlated; one patient in train and test leaks test data
into training and inflates every reported metric. The same holds for one scan stored under two
case ids (``duplicate_of`` in the validated manifest, :mod:`tumorseg.validation.duplicates`): its
group (with every case of the patients it joins, :func:`tumorseg.data.split.case_groups`) must be
on one side. Unlike a bad case, a bad split cannot be quarantined away, so
:func:`validate_split` raises :class:`~tumorseg.errors.DataError`.

The split file is read with :func:`tumorseg.data.split.read_split` (one parser of the format
``tumorseg split`` writes). Patients are taken from the manifest, not from the split file's
own ``patients`` lists, so a split that disagrees with the data is caught too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tumorseg.data.manifest import STATUS_OK, read_manifest
from tumorseg.errors import DataError
from tumorseg.validation.suite import quiet_great_expectations


@dataclass(frozen=True)
class SplitCheck:
    """A split that passed :func:`validate_split`.

    Attributes:
        cases: split name -> number of cases.
        patients: split name -> number of distinct patients.
    """

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
    from tumorseg.data.split import case_groups

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


def _unexpected(result: Any, column: str) -> list[str]:
    entries = (result.result or {}).get("unexpected_index_list") or []
    return sorted({str(entry[column]) for entry in entries})


def validate_split(split_json_path: Path, manifest: pd.DataFrame | Path) -> SplitCheck:
    """Check that every patient is in one split only and every listed case is valid.

    Runs Great Expectations expectations on two tables derived from the split and the
    manifest (ephemeral GX context, nothing written):

    - per listed case: ``case_id`` unique (a case in one split only), in the manifest, and
      with status ``ok`` (quarantined cases must not be trained or tested on);
    - per distinct (patient, split) pair: ``patient_id`` unique, i.e. no patient in two splits.

    Args:
        split_json_path: the split file written by ``tumorseg split``.
        manifest: the validated manifest (or the folder / file to read it from), or any
            table with ``case_id`` and ``patient_id`` (and optionally ``status``), e.g.
            preprocess's ``index.csv``.

    Returns:
        Case and patient counts per split.

    Raises:
        DataError: naming the split file and the offending patients or cases.
    """
    # Imported here: the split stage may import this module, and must be able to at its top.
    from tumorseg.data.split import SPLITS
    from tumorseg.data.split import read_split as read_split_file

    path = Path(split_json_path)
    if not isinstance(manifest, pd.DataFrame):
        manifest = read_manifest(manifest)
    split = read_split_file(path)
    splits = {name: split.cases(name) for name in SPLITS}
    assignments, patient_splits, group_splits = _split_tables(splits, manifest)
    known = sorted(manifest["case_id"].astype(str).unique())

    with quiet_great_expectations():
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        # In-memory stores and no Data Docs site: nothing of this check is written anywhere.
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            progress_bars=ProgressBarsConfig(globally=False),
        )
        context = gx.get_context(project_config=config, mode="ephemeral")
        source = context.data_sources.add_pandas("split")
        case_batch = (
            source.add_dataframe_asset("assignments")
            .add_batch_definition_whole_dataframe("all")
            .get_batch(batch_parameters={"dataframe": assignments})
        )
        patient_batch = (
            source.add_dataframe_asset("patient_splits")
            .add_batch_definition_whole_dataframe("all")
            .get_batch(batch_parameters={"dataframe": patient_splits})
        )
        group_batch = (
            source.add_dataframe_asset("group_splits")
            .add_batch_definition_whole_dataframe("all")
            .get_batch(batch_parameters={"dataframe": group_splits})
        )
        by_case = {"result_format": "COMPLETE", "unexpected_index_column_names": ["case_id"]}
        by_patient = {"result_format": "COMPLETE", "unexpected_index_column_names": ["patient_id"]}
        leaked = _unexpected(
            patient_batch.validate(
                gx.expectations.ExpectColumnValuesToBeUnique(column="patient_id"), result_format=by_patient
            ),
            "patient_id",
        )
        by_group = {"result_format": "COMPLETE", "unexpected_index_column_names": ["group"]}
        split_groups = _unexpected(
            group_batch.validate(
                gx.expectations.ExpectColumnValuesToBeUnique(column="group"), result_format=by_group
            ),
            "group",
        )
        case_problems = {
            "listed in more than one split": gx.expectations.ExpectColumnValuesToBeUnique(column="case_id"),
            "not in the manifest": gx.expectations.ExpectColumnValuesToBeInSet(
                column="case_id", value_set=known
            ),
            "quarantined in the manifest": gx.expectations.ExpectColumnValuesToBeInSet(
                column="status", value_set=[STATUS_OK]
            ),
        }
        bad_cases = {
            label: _unexpected(case_batch.validate(expectation, result_format=by_case), "case_id")
            for label, expectation in case_problems.items()
        }

    problems: list[str] = []
    if leaked:
        where = {p: sorted(patient_splits.loc[patient_splits["patient_id"] == p, "split"]) for p in leaked}
        shown = ", ".join(f"{p} in {' and '.join(s)}" for p, s in list(where.items())[:5])
        problems.append(f"patient{'s' if len(leaked) > 1 else ''} in more than one split: {shown}")
    # A group that is not one patient's leaked through a scan stored under two case ids.
    duplicated = [
        g for g in split_groups if assignments.loc[assignments["group"] == g, "patient_id"].nunique() > 1
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
    for label, bad in bad_cases.items():
        if bad:
            problems.append(f"case{'s' if len(bad) > 1 else ''} {label}: {', '.join(bad[:5])}")
    if problems:
        raise DataError(f"{path}: {'; '.join(problems)}; rebuild the split with `tumorseg split`")

    counts = assignments.groupby("split", sort=False)
    return SplitCheck(
        cases={name: int(n) for name, n in counts.size().items()},
        patients={name: int(n) for name, n in counts["patient_id"].nunique().items()},
    )
