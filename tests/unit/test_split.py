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


# ---------------------------------------------------------------- groups: patients ∪ duplicated scans
def _groups_of(index: pd.DataFrame) -> dict[str, int]:
    """Reference grouping for the tests: connected components of cases sharing a patient or a duplicate_of."""
    parent = list(range(len(index)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for key in ("patient_id", "duplicate_of"):
        first: dict[str, int] = {}
        for i, value in enumerate(index[key]):
            if value:
                j = first.setdefault(value, i)
                parent[find(i)] = find(j)
    return {c: find(i) for i, c in enumerate(index["case_id"])}


def _with_duplicates(seed: int, patients: int = 30) -> pd.DataFrame:
    """_index with random duplicate groups across patients (chains, and unlabelled cases linking two)."""
    index = _index(patients, tumour_free=4, seed=seed, unlabelled=3, timepoints=3)
    rng = np.random.default_rng(seed + 100)
    index["duplicate_of"] = ""
    ids = index["case_id"].tolist()
    for _ in range(6):
        members = sorted(rng.choice(ids, size=int(rng.integers(2, 4)), replace=False))
        existing = [index.loc[index.case_id == m, "duplicate_of"].iloc[0] for m in members]
        label = next((e for e in existing if e), members[0])
        for member in members:  # merge with a group a member is already in
            old = index.loc[index.case_id == member, "duplicate_of"].iloc[0]
            if old and old != label:
                index.loc[index.duplicate_of == old, "duplicate_of"] = label
            index.loc[index.case_id == member, "duplicate_of"] = label
    return index


@pytest.mark.parametrize("seed", range(12))
def test_duplicate_groups_and_time_points_stay_on_one_side(seed: int) -> None:
    index = _with_duplicates(seed)
    split = split_cases(index, SplitConfig(seed=seed))
    side = {c: name for name in SPLITS for c in split.cases(name)}
    labelled = index[index.has_label == "True"]
    assert sorted(side) == sorted(labelled.case_id), "every labelled case is split once"
    group = _groups_of(index)
    by_group: dict[int, set[str]] = {}
    for case in side:
        by_group.setdefault(group[case], set()).add(side[case])
    assert all(len(sides) == 1 for sides in by_group.values()), "a group is on two sides"
    assert all(split.cases(name) for name in SPLITS)
    # groups that join several patients are recorded, and name a patient of theirs
    patients_of = index.set_index("case_id")["patient_id"]
    for name, patients in split.groups.items():
        assert len(patients) > 1 and name == min(patients) and set(patients) <= set(labelled.patient_id)
        assert len({group[c] for c in labelled.case_id if patients_of[c] in patients}) == 1
    assert split.to_dict()["groups"] == split.groups or not split.groups


def test_without_duplicates_the_split_and_its_json_are_unchanged(tmp_path: Path) -> None:
    index = _index(25, tumour_free=4)
    plain = split_cases(index, SplitConfig(seed=5))
    empty = split_cases(index.assign(duplicate_of="", subset="", fold=""), SplitConfig(seed=5))
    assert plain.to_dict() == empty.to_dict()
    assert list(plain.to_dict()) == ["seed", "fractions", "train", "val", "test", "patients", "strata"]


def test_a_duplicate_merges_two_patients_into_one_group_recorded_in_the_json(tmp_path: Path) -> None:
    index = _index(12, timepoints=1).assign(duplicate_of="")
    index.loc[index.case_id.isin(["BraTS-GLI-00003-000", "BraTS-GLI-00007-000"]), "duplicate_of"] = (
        "BraTS-GLI-00003-000"
    )
    pre = tmp_path / "pre"
    pre.mkdir()
    index.to_csv(pre / "index.csv", index=False)
    for seed in range(8):
        split = make_split(pre, tmp_path / "split.json", SplitConfig(seed=seed))
        sides = {
            name
            for name in SPLITS
            if "BraTS-GLI-00003-000" in split.cases(name) or "BraTS-GLI-00007-000" in split.cases(name)
        }
        assert len(sides) == 1
    data = json.loads((tmp_path / "split.json").read_text())
    assert data["groups"] == {"BraTS-GLI-00003": ["BraTS-GLI-00003", "BraTS-GLI-00007"]}
    assert read_split(tmp_path / "split.json").groups == data["groups"]
    assert "method" not in data
    assert sum(len(data["patients"][n]) for n in SPLITS) == 12


# ---------------------------------------------------------------- datalist
def _datalist_index(patients: int = 20, **columns: object) -> pd.DataFrame:
    index = _index(patients, tumour_free=3, timepoints=2).assign(duplicate_of="", subset="training", fold="")
    for key, value in columns.items():
        index[key] = value
    return index


def _patient_number(case_id: str) -> int:
    return int(case_id.split("-")[2])


def test_datalist_folds_give_val_and_test_is_held_out_stratified() -> None:
    index = _datalist_index(20)
    index["fold"] = [str(_patient_number(c) % 5) for c in index.case_id]  # round robin, by patient
    split = split_cases(index, SplitConfig(method="datalist", val_fold=2))
    assert split.val == sorted(c for c in index.case_id if _patient_number(c) % 5 == 2)
    assert len(split.patients["test"]) == 3  # round(20 * 0.15)
    assert not set(split.test) & set(split.val)
    assert sorted(split.train + split.val + split.test) == sorted(index.case_id)
    data = split.to_dict()
    assert data["method"] == "datalist" and data["val_fold"] == 2
    again = split_cases(index.sample(frac=1.0, random_state=1), SplitConfig(method="datalist", val_fold=2))
    assert again.to_dict() == data, "deterministic, independent of row order"


def test_datalist_validation_and_testing_lists_are_used_as_they_are() -> None:
    index = _datalist_index(12, fold="0")
    index.loc[index.case_id.str.startswith(("BraTS-GLI-00001", "BraTS-GLI-00002")), "subset"] = "validation"
    index.loc[index.case_id.str.startswith("BraTS-GLI-00003"), "subset"] = "testing"
    unlabelled = pd.DataFrame(
        [
            {
                "case_id": "X-000",
                "patient_id": "X",
                "tumour_volume_ml": "0",
                "has_label": "False",
                "subset": "testing",
            }
        ]
    )
    split = split_cases(pd.concat([index, unlabelled]).fillna(""), SplitConfig(method="datalist", val_fold=4))
    assert split.patients["val"] == ["BraTS-GLI-00001", "BraTS-GLI-00002"]
    assert split.patients["test"] == ["BraTS-GLI-00003"]
    assert split.unlabelled == ["X-000"]
    assert "val_fold" not in split.to_dict(), "a validation list makes folds irrelevant"


def test_datalist_without_testing_list_holds_test_out_of_training() -> None:
    index = _datalist_index(20)
    index.loc[index.case_id.str.startswith(("BraTS-GLI-00001", "BraTS-GLI-00002")), "subset"] = "validation"
    split = split_cases(index, SplitConfig(method="datalist"))
    assert split.patients["val"] == ["BraTS-GLI-00001", "BraTS-GLI-00002"]
    assert len(split.patients["test"]) == 3 and not set(split.patients["test"]) & set(split.patients["val"])
    only_training = split_cases(_datalist_index(20), SplitConfig(method="datalist"))
    assert [len(only_training.patients[n]) for n in SPLITS] == [14, 3, 3]  # both held out


def test_datalist_group_on_two_sides_is_moved_whole_to_the_held_out_side(
    caplog: pytest.LogCaptureFixture,
) -> None:
    index = _datalist_index(12)
    index.loc[index.case_id == "BraTS-GLI-00001-000", "subset"] = "validation"  # its -001 is training
    index.loc[index.case_id == "BraTS-GLI-00005-000", "subset"] = "testing"
    index.loc[index.case_id == "BraTS-GLI-00004-000", "duplicate_of"] = "BraTS-GLI-00004-000"
    index.loc[index.case_id == "BraTS-GLI-00005-000", "duplicate_of"] = "BraTS-GLI-00004-000"
    with caplog.at_level("WARNING", logger="tumorseg.data.split"):
        split = split_cases(index, SplitConfig(method="datalist"))
    assert {"BraTS-GLI-00001-000", "BraTS-GLI-00001-001"} <= set(split.val)
    assert {"BraTS-GLI-00004-000", "BraTS-GLI-00005-000", "BraTS-GLI-00005-001"} <= set(split.test)
    warnings = [r.getMessage() for r in caplog.records if "several sides" in r.getMessage()]
    assert len(warnings) == 2 and "BraTS-GLI-00001-001 (train)" in warnings[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"subset": ""}, "no labelled case of index.csv has a datalist subset"),
        ({"subset": "train"}, "has datalist subset 'train'; expected training, validation or testing"),
        ({"fold": "1"}, r"split.val_fold: 0 is not a fold of the datalist in index.csv \(folds 1\)"),
    ],
)
def test_datalist_errors(change: dict[str, str], message: str) -> None:
    with pytest.raises(DataError, match=message):
        split_cases(_datalist_index(10, **change), SplitConfig(method="datalist"))


# ---------------------------------------------------------------- a user's split file
@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder (the working directory) with data/preprocessed/index.csv of 8 patients."""
    monkeypatch.chdir(tmp_path)
    pre = tmp_path / "data" / "preprocessed"
    pre.mkdir(parents=True)
    index = _index(8, timepoints=2, unlabelled=1).assign(duplicate_of="")
    index.loc[index.case_id.isin(["BraTS-GLI-00002-000", "BraTS-GLI-00006-000"]), "duplicate_of"] = (
        "BraTS-GLI-00002-000"
    )
    index.to_csv(pre / "index.csv", index=False)
    return tmp_path


def _cases_of(patients: list[int]) -> list[str]:
    return [
        c for p in patients for c in (f"BraTS-GLI-{p:05d}-000", f"BraTS-GLI-{p:05d}-001") if _exists(p, c)
    ]


def _exists(p: int, case: str) -> bool:
    return case.endswith("-000") or p % 2 == 1  # _index(timepoints=2): odd patients have two time points


SIDES = {"train": [0, 1, 2, 3, 6], "val": [4, 5], "test": [7]}


def test_file_method_reads_json_and_csv(project: Path) -> None:
    lists = {name: _cases_of(p) for name, p in SIDES.items()}
    Path("my_split.json").write_text(json.dumps(lists))
    rows = [f"{c},{name}" for name, cases in lists.items() for c in cases]
    Path("splits").mkdir()
    Path("splits/my_split.csv").write_text("case_id,split\n" + "\n".join(rows) + "\n")
    for file in ("my_split.json", "splits/my_split.csv"):
        split = make_split(
            Path("data/preprocessed"), Path("data/split.json"), SplitConfig(method="file", file=file)
        )
        assert {name: split.cases(name) for name in SPLITS} == {name: sorted(c) for name, c in lists.items()}
        data = json.loads(Path("data/split.json").read_text())
        assert data["method"] == "file" and data["file"] == file and "left_out" not in data
        assert data["groups"] == {"BraTS-GLI-00002": ["BraTS-GLI-00002", "BraTS-GLI-00006"]}
    # A split JSON written by `tumorseg split` is a valid split file too.
    stratified = make_split(Path("data/preprocessed"), Path("data/strat.json"), SplitConfig())
    again = make_split(
        Path("data/preprocessed"), Path("out.json"), SplitConfig(method="file", file="data/strat.json")
    )
    assert {n: again.cases(n) for n in SPLITS} == {n: stratified.cases(n) for n in SPLITS}


def test_file_method_warns_and_leaves_out_unlisted_and_unlabelled_cases(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lists = {name: _cases_of(p) for name, p in SIDES.items()}
    lists["train"].remove("BraTS-GLI-00001-001")
    lists["train"].append("BraTS-GLI-90000-000")  # unlabelled
    Path("s.json").write_text(json.dumps(lists))
    with caplog.at_level("WARNING", logger="tumorseg.data.split"):
        split = make_split(
            Path("data/preprocessed"), Path("split.json"), SplitConfig(method="file", file="s.json")
        )
    assert split.left_out == ["BraTS-GLI-00001-001"] and "BraTS-GLI-00001-001" not in split.strata
    assert json.loads(Path("split.json").read_text())["left_out"] == ["BraTS-GLI-00001-001"]
    assert "BraTS-GLI-90000-000" not in split.train
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "1 labelled case(s) of data/preprocessed/index.csv are not in s.json" in messages
    assert "s.json lists 1 unlabelled case(s)" in messages


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "s.json",
            {"train": ["ghost-000"], "val": ["BraTS-GLI-00004-000"], "test": ["BraTS-GLI-00007-000"]},
            r"s.json: case ghost-000 \(key 'train'\) is not in",
        ),
        (
            "s.json",
            {"train": ["BraTS-GLI-00000-000"], "validation": [], "test": []},
            "s.json: unknown key 'validation'",
        ),
        (
            "s.json",
            {"train": ["BraTS-GLI-00000-000"], "test": ["BraTS-GLI-00001-000"]},
            "s.json: no key 'val'",
        ),
        ("s.json", {"train": "BraTS-GLI-00000-000", "val": [], "test": []}, "key 'train' must be a list"),
        ("s.json", "[1, 2]", "s.json: expected an object"),
        ("s.json", "{not json", "s.json: not valid JSON"),
        (
            "s.json",
            {"train": ["BraTS-GLI-00000-000"], "val": ["BraTS-GLI-00000-000"], "test": []},
            r"s.json: case BraTS-GLI-00000-000 is in train \(key 'train'\) and val \(key 'val'\)",
        ),
        (
            "s.json",
            {"train": ["BraTS-GLI-00000-000"], "val": ["BraTS-GLI-00001-000"], "test": []},
            "s.json: no test case",
        ),
        (
            "s.csv",
            "case_id,split\nBraTS-GLI-00000-000,training\n",
            r"s.csv: line 2 \(BraTS-GLI-00000-000\) has split 'training'",
        ),
        ("s.csv", "case,side\na,train\n", "s.csv: needs a header with the columns case_id and split"),
        ("s.txt", "x", "split.file: s.txt must be a .json or .csv file"),
        ("missing.json", None, "split.file: missing.json does not exist"),
    ],
)
def test_bad_user_split_files_are_one_line_errors(
    project: Path, name: str, content: object, message: str
) -> None:
    if content is not None:
        Path(name).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError, match=message) as excinfo:
        make_split(Path("data/preprocessed"), Path("split.json"), SplitConfig(method="file", file=name))
    assert "\n" not in str(excinfo.value)
    assert not Path("split.json").exists()


@pytest.mark.parametrize(
    ("moved", "why"),
    [
        ("BraTS-GLI-00001-001", "patient BraTS-GLI-00001"),  # a time point of a train patient in test
        ("BraTS-GLI-00006-000", "the same scan, duplicate_of BraTS-GLI-00002-000"),  # a duplicate in test
    ],
)
def test_a_user_split_that_cuts_a_group_is_an_error(project: Path, moved: str, why: str) -> None:
    lists = {name: _cases_of(p) for name, p in SIDES.items()}
    lists["train"].remove(moved)
    lists["test"].append(moved)
    Path("s.json").write_text(json.dumps(lists))
    with pytest.raises(DataError) as excinfo:
        make_split(Path("data/preprocessed"), Path("split.json"), SplitConfig(method="file", file="s.json"))
    text = str(excinfo.value)
    assert text.startswith("s.json: cases ") and f"{moved} (test, key 'test')" in text
    assert f"one group ({why})" in text and "\n" not in text


def test_split_config_needs_a_file_exactly_with_method_file() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="method: file needs file"):
        SplitConfig(method="file")
    with pytest.raises(ValidationError, match="is read only with method: file"):
        SplitConfig(file="s.json")
    assert SplitConfig(method="datalist", val_fold=3).val_fold == 3


def test_datalist_and_file_methods_are_for_3d_data(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("case_id,npz,geometry,has_tumour\n")
    with pytest.raises(DataError, match="split.method: datalist is for 3-D datasets"):
        make_split(tmp_path, tmp_path / "split.json", SplitConfig(method="datalist"))
