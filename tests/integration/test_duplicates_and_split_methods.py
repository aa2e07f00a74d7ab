"""ingest -> validate -> preprocess -> split through the CLI: duplicated scans and the split methods.

- One scan copied (identical files) and one re-saved as uncompressed ``.nii`` under new case ids
  are flagged in ``duplicate_of`` (not quarantined), carried into ``index.csv``, and every split
  keeps each group on one side.
- A MONAI datalist (``tumorseg synth --layout monai``: 5 folds round-robin, no validation list, an
  empty testing list) split with ``split.method: datalist``: fold ``val_fold`` is val, test is held
  out of the other folds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import yaml

from tumorseg.cli import main
from tumorseg.data.manifest import read_manifest
from tumorseg.validation.split_check import validate_split

ROOT = Path(__file__).resolve().parents[2]


def _params(tmp_path: Path, split: dict | None = None, **synth: object) -> list[str]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in ("ingested", "validated", "preprocessed", "reports"):
        params["paths"][key] = str(tmp_path / key)
    params["paths"]["split"] = str(tmp_path / "split.json")
    params["data"]["source"] = str(tmp_path / "raw")
    params["synth"].update({"cases": 8, "spacing_mm": 4.0, "tumour_free_fraction": 0.25, **synth})
    params["preprocess"]["target_spacing_mm"] = [4.0, 4.0, 4.0]
    params["split"].update(split or {})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return ["--params", str(path)]


def test_duplicated_scans_are_flagged_carried_and_kept_together(tmp_path: Path) -> None:
    p = _params(tmp_path)
    raw = tmp_path / "raw"
    assert main(["synth", "--out", str(raw), *p]) == 0
    first, second = sorted(c for c in raw.iterdir() if c.is_dir())[:2]
    copy = raw / "BraTS2021_00101"  # the same files under another id
    copy.mkdir()
    for path in first.iterdir():
        shutil.copyfile(path, copy / path.name.replace(first.name, copy.name))
    resaved = raw / "BraTS2021_00102"  # the same volumes re-saved as uncompressed .nii
    resaved.mkdir()
    for path in second.iterdir():
        image = nib.load(path)
        name = path.name.replace(second.name, resaved.name).removesuffix(".gz")
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine), resaved / name)

    assert main(["ingest", *p]) == 0
    assert main(["validate", str(tmp_path / "ingested"), "--out", str(tmp_path / "validated"), *p]) == 0
    manifest = read_manifest(tmp_path / "validated").set_index("case_id")
    assert set(manifest["status"]) == {"ok"}, "duplicates are valid cases"
    flagged = manifest.loc[manifest["duplicate_of"] != "", "duplicate_of"].to_dict()
    assert flagged == {
        first.name: first.name,
        second.name: second.name,
        "BraTS2021_00101": first.name,
        "BraTS2021_00102": second.name,
    }
    report = json.loads((tmp_path / "validated" / "validation" / "report.json").read_text())
    assert report["passed"] and len(report["duplicates"]) == 2

    assert main(["preprocess", *p]) == 0
    index = pd.read_csv(tmp_path / "preprocessed" / "index.csv", dtype=str, keep_default_na=False)
    assert index.set_index("case_id").loc["BraTS2021_00102", "duplicate_of"] == second.name

    for seed in range(4):
        params = yaml.safe_load(Path(p[1]).read_text())
        params["split"]["seed"] = seed
        Path(p[1]).write_text(yaml.safe_dump(params))
        assert main(["split", *p]) == 0
        split = json.loads((tmp_path / "split.json").read_text())
        side = {case: name for name in ("train", "val", "test") for case in split[name]}
        assert side[first.name] == side["BraTS2021_00101"] and side[second.name] == side["BraTS2021_00102"]
        assert split["groups"] == {
            first.name: [first.name, "BraTS2021_00101"],
            second.name: [second.name, "BraTS2021_00102"],
        }
        validate_split(tmp_path / "split.json", tmp_path / "validated")


def test_monai_datalist_folds_split(tmp_path: Path) -> None:
    p = _params(tmp_path, split={"method": "datalist", "val_fold": 1}, layout="monai", cases=10)
    assert main(["synth", "--out", str(tmp_path / "raw"), *p]) == 0
    assert main(["ingest", *p]) == 0
    manifest = read_manifest(tmp_path / "ingested")
    assert set(manifest["subset"]) == {"training"} and set(manifest["fold"]) == {"0", "1", "2", "3", "4"}
    assert main(["validate", str(tmp_path / "ingested"), "--out", str(tmp_path / "validated"), *p]) == 0
    assert main(["preprocess", *p]) == 0
    assert main(["split", *p]) == 0

    split = json.loads((tmp_path / "split.json").read_text())
    folds = manifest.set_index("case_id")["fold"]
    assert split["method"] == "datalist" and split["val_fold"] == 1
    assert split["val"] == sorted(c for c, f in folds.items() if f == "1")
    assert len(split["test"]) == 2 and not {folds[c] for c in split["test"]} & {"1"}  # round(10 * 0.15)
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(folds.index)
    validate_split(tmp_path / "split.json", tmp_path / "validated")
