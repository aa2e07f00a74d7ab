"""``data.source``: the generator or a read-only folder, and one-line errors before anything is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tumorseg.cli import main
from tumorseg.data.source import source_folder

ROOT = Path(__file__).resolve().parents[2]


def _project(tmp_path: Path, source: str) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = source
    params["synth"].update({"cases": 2, "spacing_mm": 4.0})
    for key in ("ingested", "validated", "preprocessed", "reports"):
        params["paths"][key] = str(tmp_path / key)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def test_synth_generates_into_data_synth_next_to_params(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    params = _project(tmp_path, "synth")
    assert main(["source", "--params", str(params)]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"data.source: {tmp_path / 'data' / 'synth'} (generated, brats2021, 2 cases)"
    assert len(list((tmp_path / "data" / "synth").glob("BraTS2021_*"))) == 2


def test_relative_and_absolute_folders_resolve_alike(tmp_path: Path) -> None:
    relative = yaml.safe_load(_project(tmp_path, "mydata").read_text())
    assert source_folder(relative, tmp_path / "params.yaml") == tmp_path / "data" / "mydata"
    absolute = yaml.safe_load(_project(tmp_path, "/srv/BraTS2021").read_text())
    assert source_folder(absolute, tmp_path / "params.yaml") == Path("/srv/BraTS2021")


def test_a_folder_is_only_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = tmp_path / "mine"
    assert main(["synth", "--out", str(dataset), "--cases", "2", "--spacing", "4", "--layout", "msd"]) == 0
    before = {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()}
    params = _project(tmp_path, str(dataset))
    capsys.readouterr()
    assert main(["source", "--params", str(params)]) == 0
    assert capsys.readouterr().out.strip() == f"data.source: {dataset} (read-only, msd, 2 cases)"
    assert main(["ingest", "--params", str(params)]) == 0
    assert {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()} == before
    assert _files(tmp_path / "data" / "synth") == set()  # the generator did not run


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "is empty"),
        (lambda d: (d.mkdir(), (d / "notes.txt").write_text("x")), "no known dataset layout"),
    ],
    ids=["missing", "empty", "no-layout"],
)
def test_a_bad_source_is_one_line_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, make, message: str
) -> None:
    folder = tmp_path / "dataset"
    make(folder)
    params = _project(tmp_path, str(folder))
    for command in ("source", "ingest"):
        capsys.readouterr()
        assert main([command, "--params", str(params)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert str(folder) in err and message in err and "BraTS" in err and "MSD" in err
    assert not (tmp_path / "ingested").exists() and not (tmp_path / "data").exists()


def test_a_folder_mixing_layouts_names_them_and_their_first_files(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "mixed"
    for layout in ("brats2021", "brats2023"):
        assert (
            main(
                [
                    "synth",
                    "--out",
                    str(tmp_path / layout),
                    "--cases",
                    "1",
                    "--spacing",
                    "4",
                    "--layout",
                    layout,
                ]
            )
            == 0
        )
        case = next(p for p in (tmp_path / layout).iterdir() if p.is_dir())
        shutil.copytree(case, folder / case.name)
    params = _project(tmp_path, str(folder))
    capsys.readouterr()
    assert main(["source", "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mixes dataset layouts" in err
    assert "brats2021 (1, first" in err and "BraTS2021_00001_flair.nii.gz" in err
    assert "brats2023 (1, first" in err and "BraTS-GLI-00001-000" in err


def test_home_shorthand_and_2d_folders_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = _project(tmp_path, "~/BraTS2021")
    assert main(["source", "--params", str(params)]) == 2
    assert "write the absolute path (DVC does not expand ~)" in capsys.readouterr().err
    planar = tmp_path / "slices"
    assert main(["synth", "--layout", "kaggle", "--cases", "4", "--spacing", "4", "--out", str(planar)]) == 0
    capsys.readouterr()
    assert main(["source", "--params", str(_project(tmp_path, str(planar)))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds 2-D data" in err and "data.source_2d" in err


def test_retired_keys_name_their_replacement(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tumorseg.config import without_retired

    params = yaml.safe_load(_project(tmp_path, "synth").read_text())
    params["paths"]["raw"] = "data/raw"
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(params))
    assert main(["ingest", "--params", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "paths.raw: retired" in err and "data.source" in err
    # a model registered before the key was retired still validates
    assert without_retired("data_loader", {"cache_num_workers": 0, "batch_size": 2}) == {"batch_size": 2}
