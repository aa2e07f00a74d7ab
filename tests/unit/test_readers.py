"""The format registry: how many spatial dimensions a folder, manifest, input or upload has."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tumorseg.cli import main
from tumorseg.data.readers import (
    IMAGE,
    VOLUME,
    folder_dims,
    image_inputs,
    input_dims,
    manifest_dims,
    name_dims,
    preprocessed_dims,
)
from tumorseg.errors import DataError


def test_a_manifest_is_images_only_when_every_row_is_an_image_layout() -> None:
    assert manifest_dims(pd.DataFrame({"layout": ["figshare", "kaggle"]})) == IMAGE
    assert manifest_dims(pd.DataFrame({"layout": ["figshare", "brats2021"]})) == VOLUME
    assert manifest_dims(pd.DataFrame({"layout": ["msd"]})) == VOLUME
    assert manifest_dims(pd.DataFrame({"case_id": ["a"]})) == VOLUME  # no layout column
    assert manifest_dims(pd.DataFrame(columns=["layout"])) == VOLUME


@pytest.mark.parametrize(
    ("name", "dims"),
    [
        ("scan.PNG", IMAGE),
        ("slice.mat", IMAGE),
        ("x.jpeg", IMAGE),
        ("t1.nii.gz", VOLUME),
        ("notes.txt", VOLUME),
    ],
)
def test_a_file_name_gives_its_dims(name: str, dims: int) -> None:
    assert name_dims(name) == dims


def test_folders_and_inputs(tmp_path: Path) -> None:
    kaggle = tmp_path / "kaggle"
    assert main(["synth", "--layout", "kaggle", "--cases", "4", "--spacing", "4", "--out", str(kaggle)]) == 0
    assert folder_dims(kaggle) == IMAGE and input_dims(kaggle) == IMAGE
    images = image_inputs(kaggle)
    assert images and all(name_dims(p.name) == IMAGE for p in images) and images == sorted(images)
    assert input_dims(images[0]) == IMAGE and image_inputs(images[0]) == [images[0]]

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.png").write_bytes(b"")
    (mixed / "b.nii.gz").write_bytes(b"")
    assert input_dims(mixed) == VOLUME  # a NIfTI among them: the volume path reads the folder
    assert folder_dims(tmp_path / "empty") == VOLUME
    assert input_dims(tmp_path / "missing.png") == IMAGE  # by name, before anything is read

    with pytest.raises(DataError, match="no such file or folder"):
        image_inputs(tmp_path / "nowhere")
    with pytest.raises(DataError, match="not a .mat or image file"):
        image_inputs(mixed / "b.nii.gz")


def test_a_preprocessed_folder_is_images_when_its_manifest_names_npz_and_geometry(tmp_path: Path) -> None:
    assert preprocessed_dims(tmp_path) == VOLUME
    (tmp_path / "manifest.csv").write_text("case_id,npz,geometry,has_tumour\n")
    assert preprocessed_dims(tmp_path) == IMAGE
    (tmp_path / "manifest.csv").write_text("case_id,status\n")
    assert preprocessed_dims(tmp_path) == VOLUME
