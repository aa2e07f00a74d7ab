"""The independent generalisation set: determinism, layouts read back, labels that follow the images,
2-D files the 2-D readers accept.

Cases are generated at 2-4 mm (a fraction of a second each) except one 1 mm case that checks the
BraTS grid.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from tumorseg.config import IngestConfig
from tumorseg.data.conventions import GLIOMA, get_convention
from tumorseg.data.independent import (
    CASE_NUMBER_OFFSET,
    INDEPENDENT_LAYOUTS,
    LAYOUT_CONVENTIONS,
    META_NAME,
    REFERENCES_FOLDER,
    STORAGE_DTYPES,
    independent_case,
    synthesize_independent,
    synthesize_independent_2d,
)
from tumorseg.data.ingest import ingest
from tumorseg.data.layouts import detect_layout, discover_cases, orientation_code, read_case
from tumorseg.data.planar import read_planar
from tumorseg.data.readers import find_planar_files
from tumorseg.errors import ConfigError, DataError

NCR, ED, ET = (GLIOMA.code(name) for name in ("NCR", "ED", "ET"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Six 4 mm cases, two per layout (case 3 tumour-free)."""
    out = tmp_path_factory.mktemp("independent")
    return out, synthesize_independent(out, cases=6, seed=11, spacing_mm=4.0, workers=1)


def test_same_seed_gives_the_same_bytes_and_another_seed_other_images(
    dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    out, ids = dataset
    again = synthesize_independent(tmp_path / "again", cases=6, seed=11, spacing_mm=4.0, workers=2)
    assert again == ids
    assert _files(tmp_path / "again") == _files(out)
    other = synthesize_independent(tmp_path / "other", cases=1, seed=12, spacing_mm=4.0)
    name = f"brats2023/{other[0]}/{other[0]}-t1c.nii.gz"
    assert (tmp_path / "other" / name).read_bytes() != (out / name).read_bytes()


@pytest.mark.parametrize("layout", INDEPENDENT_LAYOUTS)
def test_each_sub_folder_is_read_with_its_layout_and_convention(
    dataset: tuple[Path, list[str]], layout: str, tmp_path: Path
) -> None:
    out, _ = dataset
    folder = out / layout
    assert detect_layout(folder) == layout
    cases = discover_cases(folder)
    assert len(cases) == 2
    assert {c.label_convention for c in cases} == {LAYOUT_CONVENTIONS[layout]}
    summary = ingest(folder, tmp_path / "ingested", IngestConfig(workers=1))
    manifest = pd.read_csv(summary.manifest, dtype=str)
    assert summary.quarantined == 0
    assert set(manifest["label_convention"]) == {LAYOUT_CONVENTIONS[layout]}
    assert set(manifest["shape"]) == {"60x60x39"}
    for case in cases:  # internal labels read back equal the generator's, whatever the file codes
        number = re.search(r"8\d{4}", case.case_id)
        assert number is not None
        index = int(number.group()) - CASE_NUMBER_OFFSET
        volumes = read_case(case)
        generated = independent_case(index, 11, 4.0)
        assert np.array_equal(volumes.labels, generated.labels)
        assert np.allclose(volumes.image[1], generated.images["t1ce"].astype(np.float32))
        assert volumes.orientation == "LPS"


def test_file_codes_and_references_follow_each_layouts_convention(dataset: tuple[Path, list[str]]) -> None:
    out, ids = dataset
    meta = json.loads((out / META_NAME).read_text())
    assert [c["case_id"] for c in meta["cases"]] == ids
    for facts in meta["cases"]:
        layout, cid = facts["layout"], facts["case_id"]
        reference = out / REFERENCES_FOLDER / layout / f"{cid}.nii.gz"
        stored = np.asarray(nib.load(reference).dataobj)
        internal = independent_case(facts["index"], 11, 4.0).labels
        assert np.array_equal(stored, get_convention(LAYOUT_CONVENTIONS[layout]).decode(internal))
        assert facts["tumour_free"] == (not internal.any())
    assert sum(c["tumour_free"] for c in meta["cases"]) == 1
    dataset_json = json.loads((out / "nnunet" / "dataset.json").read_text())
    assert dataset_json["numTraining"] == 2
    assert dataset_json["channel_names"]["0"] == "FLAIR"


def test_labels_follow_what_the_images_show() -> None:
    """ET enhances on T1ce above oedema and necrosis; oedema is bright on FLAIR and T2 against the
    healthy brain; the non-enhancing core is dark on T1ce."""
    checked = 0
    for index in (1, 2, 4, 5, 7, 8):
        case = independent_case(index, 5, 2.0)
        images = {k: v.astype(np.float32) for k, v in case.images.items()}
        healthy = (case.labels == 0) & (images["t1"] > 0)
        if not (case.labels == ED).sum() > 20:
            continue
        flair_healthy = np.median(images["flair"][healthy])
        assert np.median(images["flair"][case.labels == ED]) > 1.3 * flair_healthy
        assert np.median(images["t2"][case.labels == ED]) > np.median(images["t2"][healthy])
        if (case.labels == ET).sum() > 5:
            et = np.median(images["t1ce"][case.labels == ET])
            assert et > 1.5 * np.median(images["t1ce"][case.labels == ED])
            if (case.labels == NCR).sum() > 5:
                assert et > 1.5 * np.median(images["t1ce"][case.labels == NCR])
            checked += 1
    assert checked >= 2


def test_a_case_is_a_skull_stripped_brats_volume_at_1_mm() -> None:
    case = independent_case(2, 3, 1.0)
    assert case.labels.shape == (240, 240, 155)
    assert orientation_code(case.affine) == "LPS"
    brain = case.images["t1"] > 0
    assert 1.0e6 < brain.sum() < 1.9e6  # 1-1.9 litres
    assert not case.labels[~brain].any()
    for image in case.images.values():
        assert image.dtype == np.dtype(case.storage)
        assert image.shape == (240, 240, 155) and not image[0].any() and not image[:, :, -1].any()
    assert {independent_case(k, 3, 4.0).storage for k in (1, 4, 7)} == set(STORAGE_DTYPES)


def test_tumour_free_cases_have_no_lesion_and_others_have_one() -> None:
    assert not independent_case(3, 0, 4.0).labels.any()
    assert not independent_case(1, 0, 4.0, tumour=False).labels.any()
    assert independent_case(9, 0, 4.0, tumour=True).labels.any()


def test_2d_files_are_read_by_the_2d_readers(tmp_path: Path) -> None:
    written = synthesize_independent_2d(
        tmp_path / "a", patients=2, slices_per_patient=2, kaggle_images=4, seed=5, spacing_mm=4.0, workers=1
    )
    found = find_planar_files(tmp_path / "a")
    assert len(found) == len(written) and {f.layout for f in found} == {"figshare", "kaggle"}
    for item in found:
        image = read_planar(item.path)
        if item.layout == "figshare":
            assert image.image.shape == (512, 512) and image.mask is not None and image.mask.any()
            assert image.tumour_type == "glioma" and image.has_tumour
        else:
            assert image.has_tumour == ("/yes/" in str(item.path))
            assert min(image.image.shape[:2]) >= 170 and max(image.image.shape[:2]) <= 640
    again = synthesize_independent_2d(  # two worker processes write the same files
        tmp_path / "b", patients=2, slices_per_patient=2, kaggle_images=4, seed=5, spacing_mm=4.0, workers=2
    )
    assert again == written and _files(tmp_path / "a") == _files(tmp_path / "b")
    summary = ingest(tmp_path / "a", tmp_path / "ingested", IngestConfig(workers=1))
    assert summary.quarantined == 0 and summary.cases == len(written)


def test_bad_options_and_outputs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="layouts"):
        synthesize_independent(tmp_path / "x", cases=1, layouts=("msd",), spacing_mm=4.0)
    with pytest.raises(ConfigError, match="spacing_mm"):
        synthesize_independent(tmp_path / "x", cases=1, spacing_mm=8.0)
    with pytest.raises(ConfigError, match="cases"):
        synthesize_independent(tmp_path / "x", cases=0)
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="not a folder"):
        synthesize_independent(tmp_path / "file", cases=1, spacing_mm=4.0)
