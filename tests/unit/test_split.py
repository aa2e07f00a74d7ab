"""Patient-level, size-stratified train/val/test split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tumorseg.config import SplitConfig
from tumorseg.data.split import SPLITS, TUMOUR_FREE, make_split, read_split, split_cases
from tumorseg.errors import DataError


def _index(
    patients: int, *, tumour_free: int = 0, timepoints: int = 2, seed: int = 0, unlabelled: int = 0
) -> pd.DataFrame:
    """An index.csv table of BraTS 2023 style cases: several time points per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        patient = f"BraTS-GLI-{p:05d}"
        volume = 0.0 if p < tumour_free else float(rng.lognormal(3.5, 1.0))
        for t in range(1 + p % timepoints):
            rows.append(
                {
                    "case_id": f"{patient}-{t:03d}",
                    "patient_id": patient,
                    "tumour_volume_ml": f"{volume * (1 + 0.1 * t):g}",
                    "has_label": "True",
                }
            )
    for u in range(unlabelled):
        rows.append(
            {
                "case_id": f"BraTS-GLI-9{u:04d}-000",
                "patient_id": f"BraTS-GLI-9{u:04d}",
                "tumour_volume_ml": "0",
                "has_label": "False",
            }
        )
    return pd.DataFrame(rows)


def test_every_patient_is_in_exactly_one_split_with_all_its_time_points() -> None:
    index = _index(40, tumour_free=6)
    split = split_cases(index, SplitConfig())
    patients_of = index.set_index("case_id")["patient_id"]
    seen: dict[str, str] = {}
    for name in SPLITS:
        for case_id in split.cases(name):
            patient = patients_of[case_id]
            assert seen.setdefault(patient, name) == name, f"{patient} is in two splits"
    assert sorted(c for name in SPLITS for c in split.cases(name)) == sorted(index["case_id"])
    assert sorted(seen) == sorted(set(index["patient_id"]))
    for name in SPLITS:
        assert split.patients[name] == sorted({patients_of[c] for c in split.cases(name)})
    assert {len(split.patients[n]) for n in ("val", "test")} == {6}  # round(40 * 0.15)


def test_split_is_deterministic_and_independent_of_row_order() -> None:
    index = _index(30, tumour_free=5)
    first = split_cases(index, SplitConfig(seed=7))
    again = split_cases(index.sample(frac=1.0, random_state=3), SplitConfig(seed=7))
    assert first.to_dict() == again.to_dict()
    other = split_cases(index, SplitConfig(seed=8))
    assert other.patients != first.patients


def test_strata_are_spread_over_the_splits() -> None:
    index = _index(60, tumour_free=9)
    cfg = SplitConfig(size_bins=3)
    split = split_cases(index, cfg)
    by_patient = {split.strata[c]: None for c in split.strata}
    assert set(by_patient) == {TUMOUR_FREE, "q1", "q2", "q3"}
    patient_stratum = {p: split.strata[c] for c, p in zip(index["case_id"], index["patient_id"], strict=True)}
    totals = Counter(patient_stratum.values())
    for name, fraction in (("train", cfg.train), ("val", cfg.val), ("test", cfg.test)):
        counts = Counter(patient_stratum[p] for p in split.patients[name])
        for stratum, total in totals.items():
            assert abs(counts[stratum] - total * fraction) <= 1.0, (name, stratum, counts, totals)
        assert counts[TUMOUR_FREE] >= 1  # tumour-free patients in every split


def test_size_bins_follow_tumour_volume() -> None:
    index = _index(30, timepoints=1)
    split = split_cases(index, SplitConfig(size_bins=3))
    volume = index.set_index("case_id")["tumour_volume_ml"].astype(float)
    largest = {s: volume[[c for c, st in split.strata.items() if st == s]].max() for s in ("q1", "q2")}
    smallest = {s: volume[[c for c, st in split.strata.items() if st == s]].min() for s in ("q2", "q3")}
    assert largest["q1"] < smallest["q2"] and largest["q2"] < smallest["q3"]


def test_three_patients_fill_each_split_and_two_are_an_error() -> None:
    split = split_cases(_index(3, timepoints=1), SplitConfig())
    assert [len(split.patients[n]) for n in SPLITS] == [1, 1, 1]
    with pytest.raises(DataError) as excinfo:
        split_cases(_index(2, timepoints=1), SplitConfig())
    assert "split.val" in str(excinfo.value) and "2 labelled patient" in str(excinfo.value)


def test_large_val_and_test_fractions_still_leave_a_training_patient() -> None:
    split = split_cases(_index(4, timepoints=1), SplitConfig(train=0.02, val=0.49, test=0.49))
    assert [len(split.patients[n]) for n in SPLITS] == [1, 2, 1] or [
        len(split.patients[n]) for n in SPLITS
    ] == [1, 1, 2]


def test_unlabelled_cases_are_left_out() -> None:
    split = split_cases(_index(10, unlabelled=2), SplitConfig())
    assert len(split.unlabelled) == 2
    assert not set(split.unlabelled) & set(split.strata)
    assert "2 unlabelled" in split.one_line()


def test_make_split_writes_the_json_contract(tmp_path: Path) -> None:
    pre = tmp_path / "pre"
    pre.mkdir()
    _index(12, tumour_free=3).to_csv(pre / "index.csv", index=False)
    out = tmp_path / "data" / "split.json"
    split = make_split(pre, out, SplitConfig(seed=3))
    data = json.loads(out.read_text())
    assert list(data) == ["seed", "fractions", "train", "val", "test", "patients", "strata"]
    assert data["seed"] == 3 and data["fractions"] == {"train": 0.7, "val": 0.15, "test": 0.15}
    assert set(data["patients"]) == set(SPLITS)
    assert read_split(out).to_dict() == split.to_dict()
    assert [p.name for p in out.parent.iterdir()] == ["split.json"]  # no temp file left
    assert "\n" not in split.one_line() and str(out) in split.one_line()


def test_missing_or_malformed_inputs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run `tumorseg preprocess` first"):
        make_split(tmp_path, tmp_path / "split.json", SplitConfig())
    (tmp_path / "index.csv").write_text("case_id,shape\na,1x1x1\n")
    with pytest.raises(DataError, match="lacks columns"):
        make_split(tmp_path, tmp_path / "split.json", SplitConfig())
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="not a tumorseg split file"):
        read_split(tmp_path / "bad.json")
