"""Incremental manifests: reuse the rows of unchanged cases, read the rest, write ``manifest.csv``.

Shared by the volume ingest (:mod:`tumorseg.data.ingest`, cases of several files) and the image
ingest (:mod:`tumorseg.data.planar_ingest`, one file a case).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import pandas as pd

from tumorseg.data.manifest import STATUS_QUARANTINED, write_manifest
from tumorseg.data.parallel import map_cases

log = logging.getLogger(__name__)

T = TypeVar("T")

INGEST_STATUS_COLUMN = "ingest_status"
INGEST_REASON_COLUMN = "ingest_reason"
"""Columns validation adds to keep ingest's own verdict; preferred when a validated manifest is reused."""


@dataclass(frozen=True)
class IngestSummary:
    """What one ingest run did: rows ``ok`` and ``quarantined``; cases ``new``, ``changed`` (both read),
    ``reused`` (no file read) and ``removed`` (gone from the source) since the previous manifest."""

    manifest: Path
    layout: str
    cases: int
    ok: int
    quarantined: int
    new: int
    changed: int
    reused: int
    removed: int
    seconds: float

    def one_line(self) -> str:
        return (
            f"ingested {self.cases} {self.layout} cases -> {self.manifest}: {self.ok} ok, "
            f"{self.quarantined} quarantined ({self.new} new, {self.changed} changed, {self.reused} reused, "
            f"{self.removed} removed) in {self.seconds:.1f} s"
        )


def write_incrementally(
    items: Sequence[T],
    previous: dict[str, dict[str, str]],
    out_dir: Path,
    *,
    fingerprint: Callable[[T], str],
    reusable: Callable[[dict[str, str], T, str], bool],
    read: Callable[[T, str], dict[str, str]],
    columns: Sequence[str],
    layout: str,
    workers: int,
    start: float,
    refresh: Callable[[dict[str, str], T], dict[str, str]] | None = None,
) -> IngestSummary:
    """Reuse unchanged rows of the previous manifest, read the rest, write ``out_dir/manifest.csv``.

    Args:
        items: the cases found in the source, each with a ``case_id`` attribute.
        previous: the previous manifest's rows by case id, with ingest's own verdict.
        fingerprint: cheap change marker of an item (sizes and modification times).
        reusable: whether a previous row still describes an item with this fingerprint.
        read: reads an item once into its manifest row (all text); module-level (or a partial of
            one), since it runs in ``workers`` processes.
        start: ``time.perf_counter()`` when the run began.
        refresh: updates a reused row with what may change without any file changing (the 3-D
            datalist subset and fold); None keeps reused rows as they were.
    """
    rows: dict[str, dict[str, str]] = {}
    to_read: list[tuple[T, str]] = []
    new = changed = 0
    for item in items:
        item_fingerprint = fingerprint(item)
        old = previous.get(item.case_id)  # type: ignore[attr-defined]
        if old is not None and reusable(old, item, item_fingerprint):
            rows[item.case_id] = refresh(old, item) if refresh is not None else old  # type: ignore[attr-defined]
        else:
            to_read.append((item, item_fingerprint))
            new += old is None
            changed += old is not None
    reused = len(rows)

    for row in map_cases(partial(_read_pair, read), to_read, workers=workers, what="ingest"):
        if row["status"] == STATUS_QUARANTINED:
            log.warning("quarantined %s: %s", row["case_id"], row["reason"])
        rows[row["case_id"]] = row

    current = {item.case_id for item in items}  # type: ignore[attr-defined]
    removed = sum(1 for case_id in previous if case_id not in current)
    manifest = write_manifest(pd.DataFrame(list(rows.values()), columns=list(columns)), out_dir)
    quarantined = sum(1 for row in rows.values() if row["status"] == STATUS_QUARANTINED)
    summary = IngestSummary(
        manifest=manifest,
        layout=layout,
        cases=len(rows),
        ok=len(rows) - quarantined,
        quarantined=quarantined,
        new=new,
        changed=changed,
        reused=reused,
        removed=removed,
        seconds=time.perf_counter() - start,
    )
    log.debug(summary.one_line())
    return summary


def _read_pair(read: Callable[[T, str], dict[str, str]], pair: tuple[T, str]) -> dict[str, str]:
    return read(*pair)


def rows_with_ingest_verdict(df: pd.DataFrame, columns: Sequence[str]) -> dict[str, dict[str, str]]:
    """A previous manifest's rows (all text, ``columns`` only) by case id, as ingest wrote them.

    Validation keeps ingest's own verdict in ``ingest_status``/``ingest_reason``; only that may be reused.
    """
    rows: dict[str, dict[str, str]] = {}
    for record in df.to_dict(orient="records"):
        row = {column: str(record[column]) for column in columns}
        if record.get(INGEST_STATUS_COLUMN):
            row["status"] = str(record[INGEST_STATUS_COLUMN])
            row["reason"] = str(record.get(INGEST_REASON_COLUMN, ""))
        rows[row["case_id"]] = row
    return rows


def number_text(value: float) -> str:
    """Integers without a decimal point, other values with 6 significant digits (3-D and 2-D manifests)."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6g}"
