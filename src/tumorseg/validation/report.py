"""What ``tumorseg validate`` reports: the result, ``<out>/validation/report.json`` for machines and CI,
and :func:`validation_markdown` for people. Neither holds timestamps or absolute paths, so the report is
byte-identical while the manifest and ``validate`` parameters are unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tumorseg.data.manifest import MANIFEST_NAME, STATUS_OK

REPORT_DIR = "validation"  # under the output folder: report.json, the GX project and Data Docs
REPORT_NAME = "report.json"
DATA_DOCS_DIR = "data_docs"


@dataclass(frozen=True)
class CheckOutcome:
    """How one :class:`~tumorseg.validation.expectations.CaseCheck` fared: rows ``evaluated`` (those
    with a value), ``unexpected_case_ids`` in manifest order, ``severity`` critical or warning."""

    check_id: str
    expectation: str
    kwargs: dict[str, Any]
    success: bool
    evaluated: int
    unexpected_case_ids: list[str]
    severity: str = "critical"


@dataclass(frozen=True)
class CaseVerdict:
    """One case's verdict (``case_id`` ``"row N"`` without one): ``reason`` (ingest's first, empty
    when ok), ``failed_checks`` that quarantine it, ``flagged_checks`` (warnings) reported only."""

    case_id: str
    status: str
    reason: str
    failed_checks: list[str]
    flagged_checks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ValidationResult:
    """Outcome of :func:`~tumorseg.validation.suite.validate_dataset`: a verdict per manifest row, an
    outcome per expectation, ``duplicates`` (:class:`~tumorseg.validation.duplicates.DuplicateGroup` dicts)."""

    out_dir: Path
    cases: list[CaseVerdict]
    checks: list[CheckOutcome]
    max_invalid_fraction: float
    params: dict[str, Any] = field(default_factory=dict)
    gx_version: str = ""
    duplicates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_cases(self) -> int:
        return len(self.cases)

    @property
    def n_valid(self) -> int:
        return sum(c.status == STATUS_OK for c in self.cases)

    @property
    def n_quarantined(self) -> int:
        return self.n_cases - self.n_valid

    @property
    def invalid_fraction(self) -> float:
        return self.n_quarantined / self.n_cases if self.cases else 1.0

    @property
    def passed(self) -> bool:
        return self.n_valid > 0 and self.invalid_fraction <= self.max_invalid_fraction

    @property
    def quarantined(self) -> dict[str, str]:
        return {c.case_id: c.reason for c in self.cases if c.status != STATUS_OK}

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @property
    def report_path(self) -> Path:
        return self.out_dir / REPORT_DIR / REPORT_NAME

    @property
    def data_docs_index(self) -> Path:
        return self.out_dir / REPORT_DIR / DATA_DOCS_DIR / "index.html"

    def one_line(self) -> str:
        """``validated 36 cases: 34 ok, 2 quarantined (5.6%, limit 25%); report: ...``."""
        return (
            f"validated {self.n_cases} cases: {self.n_valid} ok, {self.n_quarantined} quarantined "
            f"({self.invalid_fraction:.1%}, limit {self.max_invalid_fraction:.0%}); "
            f"report: {self.data_docs_index}"
        )

    def failure_message(self) -> str:
        """The one-line error of a run that did not pass (empty when it passed)."""
        if self.passed:
            return ""
        where = f"see {self.report_path} and {self.data_docs_index}"
        if self.n_valid == 0:
            return f"no valid case left: all {self.n_cases} cases in {self.manifest_path} are quarantined; {where}"
        return (
            f"{self.n_quarantined} of {self.n_cases} cases ({self.invalid_fraction:.1%}) failed validation, "
            f"above validate.max_invalid_fraction = {self.max_invalid_fraction:g}; fix the data or raise "
            f"the threshold (--max-invalid-fraction); {where}"
        )

    def to_report(self) -> dict[str, Any]:
        """The content of ``report.json`` (paths relative to ``out_dir``, no timestamps)."""
        by_ingest = sum("ingest.accepted" in c.failed_checks for c in self.cases)
        return {
            "tool": "tumorseg validate",
            "great_expectations_version": self.gx_version,
            "manifest": MANIFEST_NAME,
            "data_docs": f"{REPORT_DIR}/{DATA_DOCS_DIR}/index.html",
            "params": self.params,
            "passed": self.passed,
            "counts": {
                "cases": self.n_cases,
                "valid": self.n_valid,
                "quarantined": self.n_quarantined,
                "quarantined_by_ingest": by_ingest,
                "invalid_fraction": round(self.invalid_fraction, 6),
                "max_invalid_fraction": self.max_invalid_fraction,
            },
            "expectations": [
                {
                    "check": c.check_id,
                    "expectation": c.expectation,
                    "kwargs": c.kwargs,
                    "severity": c.severity,
                    "success": c.success,
                    "evaluated": c.evaluated,
                    "unexpected_count": len(c.unexpected_case_ids),
                    "unexpected_case_ids": c.unexpected_case_ids,
                }
                for c in self.checks
            ],
            "cases": [asdict(c) for c in self.cases],  # case_id, status, reason, failed/flagged checks
            "duplicates": self.duplicates,
        }

    def report_json(self) -> str:
        return json.dumps(self.to_report(), indent=2, sort_keys=False) + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def validation_markdown(result: ValidationResult, max_cases: int = 50) -> str:
    """The verdict, counts, failed expectations and quarantined cases (at most ``max_cases``, the rest
    counted) as Markdown, for a Prefect artifact or a PR comment."""
    verdict = "passed" if result.passed else "FAILED"
    lines = [
        f"## Data validation {verdict}",
        "",
        f"{result.n_cases} cases: **{result.n_valid} ok**, **{result.n_quarantined} quarantined** "
        f"({result.invalid_fraction:.1%}; the run fails above {result.max_invalid_fraction:.0%} "
        "or when no case is left).",
        "",
    ]
    if not result.passed:
        lines += [f"> {result.failure_message()}", ""]
    failed = [c for c in result.checks if not c.success]
    lines += [f"### Expectations: {len(result.checks) - len(failed)} of {len(result.checks)} met", ""]
    if any(c.severity != "critical" for c in failed):
        lines += ["Warning-severity expectations flag cases without quarantining them.", ""]
    if failed:
        lines += ["| check | expectation | failing cases |", "|---|---|---|"]
        for c in failed:
            shown = ", ".join(c.unexpected_case_ids[:10])
            more = f" (+{len(c.unexpected_case_ids) - 10} more)" if len(c.unexpected_case_ids) > 10 else ""
            warning = " (warning)" if c.severity != "critical" else ""
            lines.append(f"| `{c.check_id}`{warning} | `{c.expectation}` | {_md_cell(shown + more)} |")
        lines.append("")
    quarantined = list(result.quarantined.items())
    if quarantined:
        lines += _md_table("### Quarantined cases", "| case | reason |", quarantined, max_cases)
    if result.duplicates:
        groups = [(", ".join(g["case_ids"]), "; ".join(g["evidence"])) for g in result.duplicates]
        title = "### Duplicate scans (valid; the split keeps each group on one side)"
        lines += _md_table(title, "| cases | evidence |", groups, max_cases)
    lines += [f"Reports: `{result.report_path}`, Data Docs `{result.data_docs_index}`.", ""]
    return "\n".join(lines)


def _md_table(title: str, header: str, rows: list[tuple[str, str]], max_rows: int) -> list[str]:
    """A two-column table section of at most ``max_rows`` rows, the rest counted."""
    lines = [title, "", header, "|---|---|"]
    lines += [f"| {_md_cell(a)} | {_md_cell(b)} |" for a, b in rows[:max_rows]]
    if len(rows) > max_rows:
        lines.append(f"| ... | {len(rows) - max_rows} more in report.json |")
    return [*lines, ""]
