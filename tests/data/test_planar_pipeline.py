"""2-D data through the CLI: synth (figshare, kaggle) -> ingest -> validate -> preprocess -> split."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tumorseg.cli import main
from tumorseg.config import SplitConfig
from tumorseg.data import parallel
from tumorseg.data.ingest import PLANAR_MANIFEST_COLUMNS
from tumorseg.data.planar_synth import write_figshare_mat
from tumorseg.data.preprocess import PREPROCESSED_COLUMNS
from tumorseg.data.readers import find_planar_files
from tumorseg.data.split import read_split, split_planar_cases

PARAMS = str(Path(__file__).resolve().parents[2] / "params.yaml")
SMALL = ["--params", PARAMS, "--spacing", "3", "-S", "synth_2d.slices_per_patient=2"]


def _run(*argv: str) -> None:
    assert main([*argv[:1], "--params", PARAMS, *argv[1:]]) == 0


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``raw_2d/figshare`` (3 patients x 2 slices, v7.3) + ``raw_2d/kaggle`` (5 images), made by the CLI."""
    root = tmp_path_factory.mktemp("planar") / "raw_2d"
    assert (
        main(["synth", *SMALL, "--layout", "figshare", "--cases", "3", "--out", str(root / "figshare")]) == 0
    )
    assert main(["synth", *SMALL, "--layout", "kaggle", "--cases", "5", "--out", str(root / "kaggle")]) == 0
    return root


@pytest.fixture(scope="module")
def pipeline(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The generated data plus one file per kind of damage, run through ingest -> validate -> preprocess -> split."""
    work = tmp_path_factory.mktemp("planar_run")
    raw = work / "raw_2d"
    shutil.copytree(generated, raw)
    image = np.full((64, 64), 100, dtype=np.int16)
    image[20:40, 20:40] = 300
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[25:35, 25:35] = 1
    write_figshare_mat(raw / "figshare" / "extra" / "901.mat", image, mask[:60], 2, "900001")  # mask shape
    write_figshare_mat(raw / "figshare" / "extra" / "902.mat", image, mask, 5, "900002")  # label 5
    write_figshare_mat(
        raw / "figshare" / "extra" / "903.mat", image, np.zeros_like(mask), 1, "900003"
    )  # empty
    (raw / "figshare" / "904.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))  # corrupt
    before = _hashes(raw)
    paths = {name: work / name for name in ("ingested", "validated", "preprocessed")}
    _run("ingest", str(raw), "--out", str(paths["ingested"]))
    _run(
        "validate", str(paths["ingested"]), "--out", str(paths["validated"]), "--max-invalid-fraction", "0.5"
    )
    _run("preprocess", str(paths["validated"]), "--out", str(paths["preprocessed"]))
    _run("split", str(paths["preprocessed"]), "--out", str(work / "split.json"))
    return {**paths, "raw": raw, "split": work / "split.json", "before": before}  # type: ignore[dict-item]


def test_synth_writes_both_layouts_deterministically(
    generated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert sorted(p.name for p in (generated / "figshare").glob("*.mat")) == [f"{i}.mat" for i in range(1, 7)]
    yes = sorted(p.name for p in (generated / "kaggle" / "yes").iterdir())
    no = sorted(p.name for p in (generated / "kaggle" / "no").iterdir())
    assert [Path(n).stem for n in yes] == ["Y1", "Y2", "Y3"]  # round(5 * 0.6) tumour images
    assert {Path(n).stem for n in no} <= {"no 4", "N4", "no 5", "N5"} and len(no) == 2
    meta = json.loads((generated / "figshare" / "synth_meta.json").read_text())
    assert {f["pid"] for f in meta["files"]} and len({f["pid"] for f in meta["files"]}) == 3
    assert all(f["tumour_pixels"] > 0 for f in meta["files"])
    again = tmp_path / "again"
    assert main(["synth", *SMALL, "--layout", "figshare", "--cases", "1", "--out", str(again)]) == 0
    assert (again / "1.mat").read_bytes() == (generated / "figshare" / "1.mat").read_bytes()
    # The fixture drew its patients and images in two worker processes; one process writes the same bytes.
    monkeypatch.setattr(parallel, "worker_count", lambda requested: 1)
    serial = tmp_path / "serial"
    assert (
        main(["synth", *SMALL, "--layout", "figshare", "--cases", "3", "--out", str(serial / "figshare")])
        == 0
    )
    assert main(["synth", *SMALL, "--layout", "kaggle", "--cases", "5", "--out", str(serial / "kaggle")]) == 0
    assert {str(Path(k).relative_to(serial)): v for k, v in _hashes(serial).items()} == {
        str(Path(k).relative_to(generated)): v for k, v in _hashes(generated).items()
    }


def test_detection_finds_figshare_and_kaggle_under_one_folder(generated: Path) -> None:
    files = find_planar_files(generated)
    assert {f.layout for f in files} == {"figshare", "kaggle"}
    assert [f.case_id for f in files if f.layout == "figshare"] == sorted(
        f"figshare-{i}" for i in range(1, 7)
    )
    assert all(f.case_id.startswith(("kaggle-yes-", "kaggle-no-")) for f in files if f.layout == "kaggle")
    assert find_planar_files(generated / "kaggle") and find_planar_files(generated / "figshare")


def test_ingest_manifest_of_a_mixed_folder(pipeline: dict[str, Path]) -> None:
    manifest = pd.read_csv(pipeline["ingested"] / "manifest.csv", dtype=str, keep_default_na=False)
    assert set(PLANAR_MANIFEST_COLUMNS) <= set(manifest.columns)
    rows = manifest.set_index("case_id")
    assert len(manifest) == 6 + 5 + 4
    figshare = rows[rows["layout"] == "figshare"].drop(
        index=["figshare-901", "figshare-902", "figshare-903", "figshare-904"]
    )
    assert figshare["patient_id"].nunique() == 3 and (figshare["patient_id"].value_counts() == 2).all()
    assert set(figshare["format"]) == {"mat-v7.3"} and set(figshare["shape"]) == {"512x512"}
    assert set(figshare["tumour_type"]) <= {"meningioma", "glioma", "pituitary"}
    kaggle = rows[rows["layout"] == "kaggle"]
    assert (kaggle.index == kaggle["patient_id"]).all()  # one image = one patient
    assert (kaggle["has_mask"] == (kaggle["has_tumour"] == "False").astype(str)).all()
    assert rows.loc["figshare-904", "status"] == "quarantined"
    assert "904.mat" not in rows.loc["figshare-904", "reason"] and rows.loc["figshare-904", "reason"]
    assert rows.loc["figshare-901", "status"] == "ok"  # measured by ingest, judged by validation


def test_validation_quarantines_bad_files_with_reasons(pipeline: dict[str, Path]) -> None:
    manifest = pd.read_csv(pipeline["validated"] / "manifest.csv", dtype=str, keep_default_na=False)
    rows = manifest.set_index("case_id")
    assert rows.loc["figshare-901", "reason"] == "tumorMask shape 60x64 differs from image 64x64"
    assert "label 5" in rows.loc["figshare-902", "reason"]
    assert "labelled tumour but only 0 mask pixels" in rows.loc["figshare-903", "reason"]
    assert rows.loc["figshare-904", "status"] == "quarantined"
    good = rows.drop(index=["figshare-901", "figshare-902", "figshare-903", "figshare-904"])
    assert (good["status"] == "ok").all()
    report = json.loads((pipeline["validated"] / "validation" / "report.json").read_text())
    assert report["counts"] == {**report["counts"], "cases": 15, "quarantined": 4}
    failed = {e["check"] for e in report["expectations"] if not e["success"]}
    assert {
        "mask.shape_matches_image",
        "label.known",
        "mask.not_empty_when_tumour",
        "ingest.accepted",
    } <= failed
    assert (pipeline["validated"] / "validation" / "data_docs" / "index.html").is_file()


def test_preprocessed_npz_and_manifest_contract(pipeline: dict[str, Path]) -> None:
    out = pipeline["preprocessed"]
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(manifest.columns) == PREPROCESSED_COLUMNS
    assert len(manifest) == 11 and (manifest["status"] == "ok").all()
    for row in manifest.to_dict(orient="records"):
        with np.load(out / f"{row['case_id']}.npz") as data:
            assert data["image"].shape == (256, 256) and data["image"].dtype == np.float32
            if row["source"] == "figshare":
                assert data["mask"].dtype == np.uint8 and 0 < data["mask"].sum() == int(row["tumour_pixels"])
                assert row["tumour_type"] and row["has_mask"] == "True"
            elif row["has_tumour"] == "True":
                assert "mask" not in data.files and row["has_mask"] == "False"
            else:
                assert not data["mask"].any() and row["has_mask"] == "True"
        geometry = json.loads(row["geometry"])
        assert (geometry["height"], geometry["width"]) == (int(row["height"]), int(row["width"]))


def test_split_is_patient_level_and_in_the_3d_format(pipeline: dict[str, Path]) -> None:
    split = read_split(pipeline["split"])
    manifest = pd.read_csv(pipeline["preprocessed"] / "manifest.csv", dtype=str, keep_default_na=False)
    patient = dict(zip(manifest["case_id"], manifest["patient_id"], strict=True))
    seen: dict[str, str] = {}
    for name in ("train", "val", "test"):
        for case_id in split.cases(name):
            assert seen.setdefault(patient[case_id], name) == name  # no patient in two splits
    assert sorted(split.train + split.val + split.test) == sorted(manifest["case_id"])
    assert set(split.strata.values()) <= {
        "figshare/tumour/meningioma",
        "figshare/tumour/glioma",
        "figshare/tumour/pituitary",
        "kaggle/tumour",
        "kaggle/tumour-free",
    }


def test_sources_are_never_modified(pipeline: dict[str, Path]) -> None:
    assert _hashes(pipeline["raw"]) == pipeline["before"]


def test_a_source_broken_after_validation_is_a_one_line_cli_error(
    pipeline: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    validated = tmp_path / "validated"
    shutil.copytree(pipeline["validated"], validated)
    manifest = pd.read_csv(validated / "manifest.csv", dtype=str, keep_default_na=False)
    jpeg = next(Path(p) for p in manifest["path"] if p.endswith(".jpg"))
    copy = tmp_path / "yes" / jpeg.name
    copy.parent.mkdir()
    copy.write_bytes(jpeg.read_bytes()[:600])  # truncated JPEG
    manifest.loc[manifest["path"] == str(jpeg), "path"] = str(copy)
    manifest.to_csv(validated / "manifest.csv", index=False)
    capsys.readouterr()
    assert main(["preprocess", "--params", PARAMS, str(validated), "--out", str(tmp_path / "pre")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tumorseg preprocess: error: {copy}: cannot decode the image") and "\n" not in err
    assert "Traceback" not in err


def test_split_of_many_slices_per_patient_keeps_every_pid_together() -> None:
    rows = []
    for p in range(30):
        kind = ("meningioma", "glioma", "pituitary")[p % 3]
        rows += [
            {
                "case_id": f"figshare-{p}-{s}",
                "patient_id": f"P{p}",
                "source": "figshare",
                "has_tumour": "True",
                "tumour_type": kind,
            }
            for s in range(1 + p % 4)
        ]
    rows += [
        {
            "case_id": f"kaggle-no-{i}",
            "patient_id": f"kaggle-no-{i}",
            "source": "kaggle",
            "has_tumour": "False",
            "tumour_type": "",
        }
        for i in range(10)
    ]
    split = split_planar_cases(pd.DataFrame(rows), SplitConfig(seed=3))
    where = {p: name for name in ("train", "val", "test") for p in split.patients[name]}
    for row in rows:
        assert row["case_id"] in split.cases(where[row["patient_id"]])
    for stratum in ("figshare/tumour/glioma", "kaggle/tumour-free"):
        members = {c for c, s in split.strata.items() if s == stratum}
        assert all(members & set(split.cases(name)) for name in ("train", "val", "test"))
