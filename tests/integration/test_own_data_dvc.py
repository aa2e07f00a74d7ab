"""A user's own dataset through the real dvc.yaml: `dvc exp run -S data.source=PATH`, read only.

A generated dataset stands in for the user's folder: MSD's layout (4-D images, dataset.json) for the
whole chain, BraTS 2021's for added and removed cases. DVC must train, evaluate and register a model
from that folder alone, never run the generator, and leave the folder byte-identical; a rerun does
nothing; added and removed cases are picked up; a forced rerun reproduces the same outputs. The
BraTS 2023+, nnU-Net, MONAI and MSD layouts' naming and labels go through ingest, training, predict
and scoring in tests/integration/test_conventions_end_to_end.py, BraTS 2021's (the default
dataset's) through the whole DVC chain in tests/integration/test_dvc_pipeline.py; what DVC adds here
(``data.source`` as a dependency, the generator left out) does not depend on the layout.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tumorseg.cli import main
from tumorseg.config import apply_overrides
from tumorseg.data.layouts import discover_cases

_SPEC = importlib.util.spec_from_file_location("dvc_support", Path(__file__).parents[1] / "dvc_support.py")
dvc_support = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(dvc_support)
ROOT, BIN = dvc_support.ROOT, dvc_support.BIN

TINY = dvc_support.TINY_3D
STAGES = ("ingest", "validate", "preprocess", "split", "train", "evaluate", "promote")


def _run(cmd: list[str], cwd: Path) -> str:
    return dvc_support.run(cmd, cwd, timeout=900)


def _tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file (and the names of every folder): the folder byte for byte."""
    digest = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        digest[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return digest


def _users_folder(tmp_path: Path, layout: str, cases: int = 8) -> Path:
    folder = tmp_path / "hospital" / layout
    args = ["--layout", layout, "--cases", str(cases), "--spacing", "4", "--seed", "5"]
    assert main(["synth", "--out", str(folder), *args, "-S", "synth.tumour_free_fraction=0"]) == 0
    return folder


def _repo(tmp_path: Path) -> Path:
    params = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    repo = dvc_support.dvc_repo(tmp_path, params)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run([*git, "add", "-A"], repo)
    _run([*git, "commit", "-qm", "project"], repo)
    return repo


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_exp_run_trains_and_registers_from_the_users_folder_only(tmp_path: Path) -> None:
    folder = _users_folder(tmp_path, "msd")
    before = _tree_digest(folder)
    repo = _repo(tmp_path)

    out = _run([str(BIN / "dvc"), "exp", "run", "-S", f"data.source={folder}", "promote@3d"], repo)
    for stage in STAGES:
        assert f"Running stage '{stage}@3d'" in out, stage
    # the generator's stage is not upstream of a folder of one's own: it never ran
    assert "Running stage 'source@3d'" not in out and not (repo / "data" / "synth").exists()
    assert "compress" not in out
    assert _tree_digest(folder) == before  # never written, moved or deleted

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert str(folder) in [dep["path"] for dep in lock["stages"]["ingest@3d"]["deps"]]
    assert all(
        out_["path"] != str(folder) for stage in lock["stages"].values() for out_ in stage.get("outs", [])
    )
    source_ids = {case.case_id for case in discover_cases(folder)}
    scored = set(pd.read_csv(repo / "reports" / "test_per_case.csv")["case_id"])
    assert scored and scored <= source_ids
    version = json.loads((repo / "reports" / "model_version.json").read_text())
    assert json.loads((repo / "reports" / "promotion.json").read_text())["action"] == "promoted"
    assert int(version["version"]) == 1

    again = _run([str(BIN / "dvc"), "repro", "promote@3d"], repo)
    assert "Running stage" not in again
    assert _tree_digest(folder) == before


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_added_and_removed_cases_are_picked_up_and_force_reproduces(tmp_path: Path) -> None:
    folder = _users_folder(tmp_path, "brats2021", cases=6)
    spare = _users_folder(tmp_path / "more", "brats2021", cases=7)
    repo = _repo(tmp_path)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["source"] = str(folder)
    dvc_support.write_params(repo, params)
    dvc = str(BIN / "dvc")

    _run([dvc, "repro", "split@3d"], repo)
    manifest = repo / "data" / "validated" / "manifest.csv"
    assert len(pd.read_csv(manifest)) == 6

    shutil.copytree(spare / "BraTS2021_00007", folder / "BraTS2021_00007")  # a new case lands
    before = _tree_digest(folder)
    added = _run([dvc, "repro", "split@3d"], repo)
    assert "Running stage 'ingest@3d'" in added
    assert "1 new" in added and "6 reused" in added
    assert sorted(pd.read_csv(manifest)["case_id"])[-1] == "BraTS2021_00007"
    assert len(list((repo / "data" / "preprocessed" / "cases").glob("*.npz"))) == 7

    shutil.rmtree(folder / "BraTS2021_00002")  # a case is withdrawn
    before = _tree_digest(folder)
    removed = _run([dvc, "repro", "split@3d"], repo)
    assert "1 removed" in removed
    assert "BraTS2021_00002" not in set(pd.read_csv(manifest)["case_id"])
    assert not (repo / "data" / "preprocessed" / "cases" / "BraTS2021_00002.npz").exists()
    split = (repo / "data" / "split.json").read_text()
    index = (repo / "data" / "preprocessed" / "index.csv").read_text()

    forced = _run([dvc, "repro", "--force", "split@3d"], repo)
    for stage in ("ingest", "validate", "preprocess", "split"):
        assert f"Running stage '{stage}@3d'" in forced, stage
    assert (repo / "data" / "split.json").read_text() == split
    assert (repo / "data" / "preprocessed" / "index.csv").read_text() == index
    assert _tree_digest(folder) == before
