"""One scan under several case ids: find the groups, name their first case, say why.

A copy in train and another in test leaks the test case into training, so copies are flagged in
``duplicate_of`` (never quarantined) and ``tumorseg split`` keeps each group on one side. Two cases
are one scan when any modality of each has an equal ``sha256_<mod>`` (identical file) or
``content_sha256_<mod>`` (identical decoded volume); unreadable or all-zero volumes link nothing.
Links are transitive; a group's *first* case is its smallest case id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from tumorseg.data.conventions import CANONICAL_MODALITIES
from tumorseg.data.split import UnionFind
from tumorseg.validation.cells import cell_text, parse_bool, parse_float

DUPLICATE_COLUMN = "duplicate_of"  # manifest / index column: the group's first case id, else empty

FILE_DIGEST = "file"
CONTENT_DIGEST = "volume"
_DIGEST_COLUMNS: dict[str, str] = {FILE_DIGEST: "sha256_{key}", CONTENT_DIGEST: "content_sha256_{key}"}


@dataclass(frozen=True)
class DuplicateGroup:
    """Cases that hold one scan: the smallest case id, every member sorted (at least two), and what
    links them (``"identical t1/t1ce/t2/flair files: A, B"``, ``"same decoded t2/flair volume: A flair, B t2"``).
    """

    first: str
    case_ids: list[str]
    evidence: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"first": self.first, "case_ids": list(self.case_ids), "evidence": list(self.evidence)}

    def one_line(self) -> str:
        return " = ".join(self.case_ids)


def _has_content(raw: dict[str, str], key: str) -> bool:
    """A volume that may link cases: readable and not all zero (unknown counts as content)."""
    if parse_bool(raw.get(f"{key}_readable", "")) is not True:
        return False
    nonzero = parse_float(raw.get(f"{key}_nonzero_voxels", ""))
    return nonzero is None or nonzero > 0


def _digests(raw: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(kind, digest, modality)`` of every volume of one manifest row that may link cases."""
    found = []
    for key in CANONICAL_MODALITIES:
        if not _has_content(raw, key):
            continue
        for kind, pattern in _DIGEST_COLUMNS.items():
            digest = raw.get(pattern.format(key=key), "")
            if digest:
                found.append((kind, digest, key))
    return found


def find_duplicate_groups(manifest: pd.DataFrame) -> list[DuplicateGroup]:
    """The groups of case ids that hold one scan in a 3-D manifest, sorted by first case (without
    ``content_sha256_<mod>`` columns only identical files are found)."""
    holders: dict[tuple[str, str], dict[str, list[str]]] = {}  # (kind, digest) -> case id -> modalities
    for record in manifest.to_dict(orient="records"):
        raw = {str(k): cell_text(v) for k, v in record.items()}
        case_id = raw.get("case_id", "")
        if not case_id:
            continue
        for kind, digest, key in _digests(raw):
            keys = holders.setdefault((kind, digest), {}).setdefault(case_id, [])
            if key not in keys:
                keys.append(key)

    links = UnionFind()
    shared = [(kind, cases) for (kind, _), cases in holders.items() if len(cases) > 1]
    for _, cases in shared:
        ids = sorted(cases)
        for other in ids[1:]:
            links.union(ids[0], other)

    members: dict[str, list[str]] = {}
    for case_id in list(links.parent):
        members.setdefault(links.find(case_id), []).append(case_id)
    evidence: dict[str, list[str]] = {}
    for case_id, text in _evidence(shared):
        evidence.setdefault(links.find(case_id), []).append(text)
    groups = [
        DuplicateGroup(first=root, case_ids=sorted(ids), evidence=evidence.get(root, []))
        for root, ids in members.items()
        if len(ids) > 1
    ]
    return sorted(groups, key=lambda g: g.first)


def _evidence(shared: list[tuple[str, dict[str, list[str]]]]) -> list[tuple[str, str]]:
    """What links the cases, ``(a linked case id, text)``, files first, then volumes, in modality order:
    one text per set of cases sharing digests under one modality, else each case's modality named;
    decoded-volume matches that identical files explain are left out."""
    order = {key: i for i, key in enumerate(CANONICAL_MODALITIES)}
    files = {
        tuple(sorted((c, tuple(k)) for c, k in cases.items()))
        for kind, cases in shared
        if kind == FILE_DIGEST
    }
    merged: dict[tuple[str, tuple[str, ...]], list[str]] = {}  # (kind, case ids) -> modalities
    mixed: list[tuple[str, tuple[tuple[str, tuple[str, ...]], ...]]] = []
    for kind, cases in shared:
        pairs = tuple(sorted((c, tuple(k)) for c, k in cases.items()))
        if kind == CONTENT_DIGEST and pairs in files:
            continue  # identical files decode to identical volumes: said once, as files
        modality_lists = {keys for _, keys in pairs}
        if len(modality_lists) == 1 and len(next(iter(modality_lists))) == 1:
            merged.setdefault((kind, tuple(c for c, _ in pairs)), []).append(pairs[0][1][0])
        else:
            mixed.append((kind, pairs))

    lines: list[tuple[tuple[int, int], str, str]] = []  # (sort key, first case, text)
    for (kind, ids), keys in merged.items():
        keys = sorted(set(keys), key=order.__getitem__)
        noun = ("file" if kind == FILE_DIGEST else "volume") + ("s" if len(keys) > 1 else "")
        what = "identical" if kind == FILE_DIGEST else "same decoded"
        text = f"{what} {'/'.join(keys)} {noun}: {', '.join(ids)}"
        lines.append(((kind != FILE_DIGEST, order[keys[0]]), ids[0], text))
    for kind, pairs in mixed:
        keys = sorted({k for _, ks in pairs for k in ks}, key=order.__getitem__)
        what = "identical {} file" if kind == FILE_DIGEST else "same decoded {} volume"
        text = f"{what.format('/'.join(keys))}: " + ", ".join(f"{c} {'/'.join(k)}" for c, k in pairs)
        lines.append(((kind != FILE_DIGEST, order[keys[0]]), pairs[0][0], text))
    return [(first, text) for _, first, text in sorted(lines)]


def duplicate_explanation(case_id: str, groups: list[DuplicateGroup]) -> str:
    """``"same scan as B, C (identical t1 file: A, B, C)"`` for a member of a group, else ``""``."""
    for group in groups:
        if case_id in group.case_ids:
            others = ", ".join(c for c in group.case_ids if c != case_id)
            return f"same scan as {others} ({'; '.join(group.evidence)})"
    return ""
