"""``tumorseg validate``: run the Great Expectations suite on a manifest and quarantine bad cases.

The typed case table (3-D or 2-D, by the manifest's layouts) is checked by a file-mode GX checkpoint
keyed by ``manifest_row``; a failed ``critical`` expectation quarantines its rows, a ``warning`` one
only flags them. GX stamps run times and random ids into its own files, never into ``manifest.csv``
or ``report.json``, so downstream stages should depend on those two.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from tumorseg.config import ValidateConfig
from tumorseg.data.manifest import MANIFEST_NAME, STATUS_OK, STATUS_QUARANTINED, read_manifest, write_manifest
from tumorseg.data.readers import IMAGE, manifest_dims
from tumorseg.errors import DataError
from tumorseg.faults import write_point
from tumorseg.validation.case_table import (
    INGEST_REASON_COLUMN,
    INGEST_STATUS_COLUMN,
    derive_case_table,
    derive_planar_case_table,
)
from tumorseg.validation.duplicates import DUPLICATE_COLUMN, DuplicateGroup, find_duplicate_groups
from tumorseg.validation.expectations import CaseCheck, build_case_checks, build_planar_checks, join_reasons
from tumorseg.validation.report import (
    DATA_DOCS_DIR,
    REPORT_DIR,
    REPORT_NAME,
    CaseVerdict,
    CheckOutcome,
    ValidationResult,
    validation_markdown,
)

if TYPE_CHECKING:
    from great_expectations.data_context import AbstractDataContext

    from tumorseg.config import PlanarValidateConfig

log = logging.getLogger(__name__)

SUITE_NAME = "tumorseg_cases"
DATASOURCE_NAME = "manifest"
ASSET_NAME = "cases"
DOCS_SITE_NAME = "tumorseg"
RUN_NAME = "tumorseg-validate"
INDEX_COLUMNS = ["case_id", "manifest_row"]  # GX lists them per unexpected row; manifest_row is the key
CHECK_META_KEY = "tumorseg_check"


@contextmanager
def quiet_great_expectations() -> Iterator[None]:
    """Import GX and keep its INFO chatter and warnings out of CLI output inside the block.

    Some GX modules pin their own logger to INFO, so every GX logger below WARNING is raised (restored on exit).
    """
    saved: dict[logging.Logger, int] = {}

    def mute(logger: logging.Logger) -> None:
        if logger not in saved:
            saved[logger] = logger.level
            logger.setLevel(logging.WARNING)

    mute(logging.getLogger("great_expectations"))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"great_expectations(\.|$)")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            import great_expectations  # noqa: F401  (registers the module loggers muted below)

            for name, logger in list(logging.root.manager.loggerDict.items()):
                pinned = (
                    isinstance(logger, logging.Logger) and logging.NOTSET < logger.level < logging.WARNING
                )
                if pinned and name.startswith("great_expectations."):
                    mute(logger)
            yield
    finally:
        for logger, level in saved.items():
            logger.setLevel(level)


def _case_label(row: pd.Series) -> str:
    case_id = row["case_id"]
    return str(case_id) if isinstance(case_id, str) and case_id else f"row {row['manifest_row']}"


def _new_file_context(project_dir: Path) -> AbstractDataContext:
    """A fresh file-mode GX project in ``project_dir/gx``, Data Docs (relative, so the folder can move)
    in ``project_dir/data_docs``, progress bars off (they would print for every metric batch)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=project_dir)
    for site in list(context.variables.data_docs_sites or {}):
        context.delete_data_docs_site(site)
    context.add_data_docs_site(
        DOCS_SITE_NAME,
        {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": f"../{DATA_DOCS_DIR}/",
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.variables.save()
    return context


def _unexpected_rows(result: Any) -> list[int]:
    """Manifest rows a failed expectation flagged (from ``unexpected_index_list``)."""
    entries = (result.result or {}).get("unexpected_index_list") or []
    return sorted({int(entry["manifest_row"]) for entry in entries})


def _checkpoint(context: AbstractDataContext, checks: list[CaseCheck]) -> Any:
    """The suite of ``checks`` (each tagged with its check id) behind a checkpoint that renders Data Docs."""
    import great_expectations as gx

    batch = (
        context.data_sources.add_pandas(DATASOURCE_NAME)
        .add_dataframe_asset(ASSET_NAME)
        .add_batch_definition_whole_dataframe("whole_manifest")
    )
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for check in checks:
        expectation_cls = getattr(gx.expectations, check.expectation)
        # GX's default severity is critical; only the others are spelled out (suite JSON unchanged).
        severity = {} if check.quarantines else {"severity": check.severity}
        suite.add_expectation(
            expectation_cls(
                **check.kwargs, meta={CHECK_META_KEY: check.check_id}, notes=check.note, **severity
            )
        )
    suite = context.suites.add(suite)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="cases", data=batch, suite=suite)
    )
    return context.checkpoints.add(
        gx.Checkpoint(
            name="validate",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE_NAME])],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": INDEX_COLUMNS},
        )
    )


def run_case_suite(
    table: pd.DataFrame, checks: list[CaseCheck], project_dir: Path
) -> tuple[dict[str, list[int]], dict[str, dict[str, Any]], str]:
    """Run the checks as a GX checkpoint on the case table in the empty ``project_dir``; build Data Docs.

    Returns:
        ``(failed_rows, summaries, gx_version)``: check id -> manifest rows it failed on;
        check id -> ``{"success", "evaluated", "expectation"}``; the GX version.

    Raises:
        RuntimeError: an expectation raised inside GX (a bug in the suite, not bad data).
    """
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    started = time.perf_counter()
    checkpoint = _checkpoint(_new_file_context(project_dir), checks)
    set_up = time.perf_counter()
    outcome = checkpoint.run(batch_parameters={"dataframe": table}, run_id=RunIdentifier(run_name=RUN_NAME))
    log.debug(
        "GX project set up in %.2f s, checkpoint + Data Docs in %.2f s",
        set_up - started,
        time.perf_counter() - set_up,
    )
    failed_rows: dict[str, list[int]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for validation in outcome.run_results.values():
        for result in validation.results:
            check_id = (result.expectation_config.meta or {}).get(CHECK_META_KEY)
            if check_id is None:
                continue
            if result.exception_info and result.exception_info.get("raised_exception"):
                message = result.exception_info.get("exception_message")
                raise RuntimeError(f"GX expectation for check {check_id} raised: {message}")
            failed_rows[check_id] = _unexpected_rows(result) if not result.success else []
            counts = result.result or {}
            summaries[check_id] = {
                "success": bool(result.success),
                # Map expectations skip missing values: those rows were not evaluated.
                "evaluated": int(counts.get("element_count", len(table)))
                - int(counts.get("missing_count") or 0),
                "expectation": result.expectation_config.type,
            }
    missing = [c.check_id for c in checks if c.check_id not in summaries]
    if missing:
        raise RuntimeError(f"GX returned no result for checks {missing}")
    return failed_rows, summaries, gx.__version__


def _verdicts(
    table: pd.DataFrame, checks: list[CaseCheck], failed_rows: dict[str, list[int]]
) -> tuple[list[CaseVerdict], dict[str, list[str]]]:
    """One verdict per case-table row, and check id -> failing case ids; only ``critical`` checks
    quarantine a case and word its reason (ingest's first), ``warning`` ones are ``flagged_checks``."""
    failed_by_row: dict[int, list[CaseCheck]] = {}
    for check in checks:
        for row in failed_rows.get(check.check_id, []):
            failed_by_row.setdefault(row, []).append(check)
    verdicts: list[CaseVerdict] = []
    labels: dict[int, str] = {}
    for _, row in table.iterrows():
        index = int(row["manifest_row"])
        labels[index] = _case_label(row)
        flagged = [c.check_id for c in failed_by_row.get(index, []) if not c.quarantines]
        failed = [c for c in failed_by_row.get(index, []) if c.quarantines]
        by_ingest = row[INGEST_STATUS_COLUMN] != STATUS_OK
        reason = join_reasons(*(c.explain(row) for c in failed if not (c.ingest_decides and by_ingest)))
        status = STATUS_QUARANTINED if failed else STATUS_OK
        verdicts.append(CaseVerdict(labels[index], status, reason, [c.check_id for c in failed], flagged))
    unexpected_ids = {check_id: [labels[r] for r in rows] for check_id, rows in failed_rows.items()}
    return verdicts, unexpected_ids


def _replace_dir(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target`` so readers see the old or the new folder, never a mix."""
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        write_point(target)
        os.replace(target, old)
    write_point(target)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def _validated_manifest(
    manifest: pd.DataFrame, table: pd.DataFrame, verdicts: list[CaseVerdict]
) -> pd.DataFrame:
    """The manifest with status/reason set, ingest's verdict kept alongside, (3-D) ``duplicate_of``."""
    out = manifest.copy()
    out[INGEST_STATUS_COLUMN] = table[INGEST_STATUS_COLUMN].astype(str).to_numpy()
    out[INGEST_REASON_COLUMN] = table[INGEST_REASON_COLUMN].astype(str).to_numpy()
    out["status"] = [v.status for v in verdicts]
    out["reason"] = [v.reason for v in verdicts]
    if DUPLICATE_COLUMN in table.columns:
        out[DUPLICATE_COLUMN] = [v if isinstance(v, str) else "" for v in table[DUPLICATE_COLUMN]]
    return out


def _warn_duplicates(groups: list[DuplicateGroup], source: str) -> None:
    """One log line naming every duplicate group (valid cases, so a warning, not a quarantine)."""
    if not groups:
        return
    cases = sum(len(g.case_ids) for g in groups)
    shown = "; ".join(g.one_line() for g in groups[:10]) + (
        f"; {len(groups) - 10} more" if len(groups) > 10 else ""
    )
    log.warning(
        "%s: %d cases hold %d scan%s stored under several case ids (not quarantined; duplicate_of names "
        "each group, which the split keeps on one side): %s",
        source,
        cases,
        len(groups),
        "" if len(groups) == 1 else "s",
        shown,
    )


def _table_and_checks(
    manifest: pd.DataFrame, source: str, cfg: ValidateConfig, planar_cfg: PlanarValidateConfig | None
) -> tuple[pd.DataFrame, list[CaseCheck], dict[str, Any], list[DuplicateGroup]]:
    """The case table, checks, reported params and duplicate groups of a 2-D or a 3-D manifest."""
    params = cfg.model_dump()
    if manifest_dims(manifest) != IMAGE:
        table, checks = derive_case_table(manifest, source=source), build_case_checks(cfg)
        return table, checks, params, find_duplicate_groups(manifest)
    from tumorseg.config import PlanarValidateConfig

    planar_cfg = planar_cfg or PlanarValidateConfig()
    params["validate_2d"] = planar_cfg.model_dump()
    return derive_planar_case_table(manifest, source=source), build_planar_checks(planar_cfg), params, []


def validate_dataset(
    src_dir: Path,
    out_dir: Path,
    cfg: ValidateConfig,
    *,
    raise_on_failure: bool = True,
    planar_cfg: PlanarValidateConfig | None = None,
) -> ValidationResult:
    """Validate ``src_dir/manifest.csv``, quarantine failing cases, write reports and the manifest.

    ``out_dir/validation/`` is replaced in one rename, then ``out_dir/manifest.csv`` (may be in
    ``src_dir``) written atomically. ``raise_on_failure=False`` lets a caller publish the result first
    (a Prefect artifact) and raise ``DataError(result.failure_message())`` itself. ``planar_cfg``:
    ``validate_2d`` (defaults when None), for 2-D manifests.

    Raises:
        DataError: no or malformed manifest; too many cases quarantined or none left (after writing
            the reports and the manifest, so the reasons can be read).
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    started = time.perf_counter()
    manifest = read_manifest(src_dir)
    source = str(src_dir / MANIFEST_NAME)
    table, checks, params, duplicates = _table_and_checks(manifest, source, cfg, planar_cfg)
    if table.empty:
        raise DataError(
            f"{source}: the manifest lists no cases; check the dataset folder given to `tumorseg ingest`"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{REPORT_DIR}.", dir=out_dir))
    try:
        with quiet_great_expectations():
            failed_rows, summaries, gx_version = run_case_suite(table, checks, staging)
        verdicts, unexpected_ids = _verdicts(table, checks, failed_rows)
        outcomes = [
            CheckOutcome(
                check_id=c.check_id,
                expectation=summaries[c.check_id]["expectation"],
                kwargs=c.kwargs,
                success=summaries[c.check_id]["success"],
                evaluated=summaries[c.check_id]["evaluated"],
                unexpected_case_ids=unexpected_ids.get(c.check_id, []),
                severity=c.severity,
            )
            for c in checks
        ]
        result = ValidationResult(
            out_dir=out_dir,
            cases=verdicts,
            checks=outcomes,
            max_invalid_fraction=cfg.max_invalid_fraction,
            params=params,
            gx_version=gx_version,
            duplicates=[group.to_dict() for group in duplicates],
        )
        (staging / REPORT_NAME).write_text(result.report_json())
        _replace_dir(staging, out_dir / REPORT_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_manifest(_validated_manifest(manifest, table, verdicts), out_dir)
    _warn_duplicates(duplicates, source)
    log.debug("validated %d cases in %.2f s", result.n_cases, time.perf_counter() - started)
    if raise_on_failure and not result.passed:
        raise DataError(result.failure_message())
    return result


__all__ = [
    "ValidationResult",
    "quiet_great_expectations",
    "run_case_suite",
    "validate_dataset",
    "validation_markdown",
]
