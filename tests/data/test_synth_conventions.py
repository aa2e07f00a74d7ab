"""``tumorseg synth`` in every label convention and layout: codes, resection cavities, cysts,
nnU-Net and MONAI layouts, case ids and ``synth_meta.json``.

Datasets are 4 cases at 4 mm generated in this process (``workers=1``), each once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from tumorseg.config import SynthConfig
from tumorseg.data.conventions import CANONICAL_MODALITIES, get_convention
from tumorseg.data.synth import (
    MONAI_DATALIST,
    NNUNET_CHANNEL_NAMES,
    NNUNET_DATASET,
    SYNTH_META_NAME,
    SyntheticCase,
    case_id,
    labels_implied,
    synthesize_case,
    synthesize_dataset,
    write_case,
)
from tumorseg.errors import ConfigError, DataError

N_CASES = 4


def cfg_for(layout: str, labels: str = "auto", **overrides: object) -> SynthConfig:
    base: dict[str, object] = {
        "layout": layout,
        "labels": labels,
        "spacing_mm": 4.0,
        "cases": N_CASES,
        "tumour_free_fraction": 0.0,
        "reoriented_fraction": 0.25,
    }
    base.update(overrides)
    return SynthConfig(**base)


_CACHE: dict[tuple[str, str], tuple[Path, list[str]]] = {}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory):
    """``(layout, labels) -> (root, ids)``, each dataset generated once per module."""

    def make(layout: str, labels: str = "auto") -> tuple[Path, list[str]]:
        key = (layout, labels)
        if key not in _CACHE:
            root = tmp_path_factory.mktemp(f"{layout}-{labels}")
            _CACHE[key] = (root, synthesize_dataset(root, cfg_for(layout, labels), workers=1))
        return _CACHE[key]

    yield make
    _CACHE.clear()


def _seg_files(root: Path, layout: str, ids: list[str]) -> list[Path]:
    if layout == "nnunet":
        return [root / NNUNET_DATASET / "labelsTr" / f"{cid}.nii.gz" for cid in ids]
    if layout == "msd":
        return [root / "labelsTr" / f"{cid}.nii.gz" for cid in ids]
    sep = "_" if ids[0].startswith("BraTS20") else "-"
    return [root / cid / f"{cid}{sep}seg.nii.gz" for cid in ids]


def _values(path: Path) -> set[int]:
    return set(np.unique(np.asarray(nib.load(path).dataobj)).tolist())


# ---------------------------------------------------------------- every layout x conventions
COMBOS = [
    ("brats2023", "brats2023-men", "BraTS-MEN-"),
    ("brats2023", "brats2023-goat", "BraTS-GoAT-"),
    ("brats2023", "brats2024-gli", "BraTS-GLI-"),
    ("brats2023", "brats2024-ped", "BraTS-PED-"),
    ("brats2021", "brats2024-gli", "BraTS2021_"),
    ("msd", "brats2024-ped", "BRATS_"),
    ("nnunet", "auto", "BraTS-GLI-"),
    ("nnunet", "msd", "BRATS_"),
    ("nnunet", "brats2024-gli", "BraTS-GLI-"),
    ("nnunet", "brats2024-ped", "BraTS-PED-"),
    ("monai", "auto", "BraTS-GLI-"),
    ("monai", "brats2021", "BraTS2021_"),
    ("monai", "brats2023-met", "BraTS-MET-"),
    ("monai", "brats2024-gli", "BraTS-GLI-"),
    ("monai", "brats2024-ped", "BraTS-PED-"),
]


@pytest.mark.parametrize(("layout", "labels", "prefix"), COMBOS)
def test_layout_writes_the_conventions_codes_and_records_them(generated, layout, labels, prefix) -> None:
    root, ids = generated(layout, labels)
    name = "brats2023" if labels == "auto" else labels
    convention = get_convention(name)
    assert len(ids) == N_CASES and all(cid.startswith(prefix) for cid in ids)
    values = [_values(path) for path in _seg_files(root, layout, ids)]
    found = set().union(*values)
    assert found <= convention.allowed_values
    codes = convention.source_codes()
    # Every tumour label appears somewhere; RC and CC in some cases, not in all.
    assert found == convention.allowed_values, (found, codes)
    for extra in ("RC", "CC"):
        if extra in codes:
            with_extra = sum(codes[extra] in v for v in values)
            assert 1 <= with_extra < N_CASES, (extra, values)

    meta = json.loads((root / SYNTH_META_NAME).read_text())
    assert meta["label_convention"] == name
    assert meta["label_set"] == convention.label_set.name
    assert meta["params"]["labels"] == labels
    records = meta["cases"]
    assert [r["case_id"] for r in records] == ids
    for record, vals in zip(records, values, strict=True):
        assert record["tumour_type"] == "glioma" and record["tumour_free"] is False
        assert set(record["volume_ml"]) == set(codes)
        for label, code in codes.items():
            assert (record["volume_ml"][label] > 0) == (code in vals), (record["case_id"], label)
        necrosis_label = "NCR" if "NCR" in codes else "NETC"
        assert record["necrosis"] == (codes[necrosis_label] in vals)
        if "RC" in codes:
            assert record["resection_cavity"] == (codes["RC"] in vals)
        if "CC" in codes:
            assert (record["cysts"] > 0) == (codes["CC"] in vals)


def test_nnunet_dataset_folder_and_dataset_json(generated) -> None:
    expected_labels = {
        "auto": {"background": 0, "NCR": 1, "ED": 2, "ET": 3},
        "msd": {"background": 0, "ED": 1, "NCR": 2, "ET": 3},
        "brats2024-gli": {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "RC": 4},
        "brats2024-ped": {"background": 0, "ET": 1, "NETC": 2, "CC": 3, "ED": 4},
    }
    for labels, table in expected_labels.items():
        root, ids = generated("nnunet", labels)
        dataset = root / NNUNET_DATASET
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        assert files == sorted(
            [
                SYNTH_META_NAME,
                f"{NNUNET_DATASET}/dataset.json",
                *(f"{NNUNET_DATASET}/imagesTr/{cid}_{k:04d}.nii.gz" for cid in ids for k in range(4)),
                *(f"{NNUNET_DATASET}/labelsTr/{cid}.nii.gz" for cid in ids),
            ]
        )
        meta = json.loads((dataset / "dataset.json").read_text())
        assert (
            meta["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"} == NNUNET_CHANNEL_NAMES
        )
        assert meta["labels"] == table
        assert list(meta["labels"].values()) == list(range(len(table)))  # nnU-Net: consecutive
        assert meta["numTraining"] == len(ids) and meta["file_ending"] == ".nii.gz"
        assert meta["label_convention"] == ("brats2023" if labels == "auto" else labels)

    # Channel k is modality k of the case, in the case's stored geometry; the label is in codes.
    root, ids = generated("nnunet", "brats2024-gli")
    cfg = cfg_for("nnunet", "brats2024-gli")
    case = synthesize_case(2, cfg)
    dataset = root / NNUNET_DATASET
    seg_img = nib.load(dataset / "labelsTr" / f"{ids[1]}.nii.gz")
    for k, modality in enumerate(CANONICAL_MODALITIES):
        img = nib.load(dataset / "imagesTr" / f"{ids[1]}_{k:04d}.nii.gz")
        assert img.get_data_dtype() == np.int16 and np.allclose(img.affine, seg_img.affine)
        ras = np.asarray(nib.as_closest_canonical(img).dataobj)
        assert np.array_equal(ras, np.clip(np.rint(case.images[modality]), 0, 32767)), modality
    seg = np.asarray(nib.as_closest_canonical(seg_img).dataobj)
    assert np.array_equal(seg, get_convention("brats2024-gli").decode(case.labels))


def test_monai_case_folders_and_datalist(generated, tmp_path: Path) -> None:
    root, ids = generated("monai", "brats2024-ped")
    datalist = json.loads((root / MONAI_DATALIST).read_text())
    assert datalist["channel_names"] == NNUNET_CHANNEL_NAMES
    assert datalist["label_convention"] == "brats2024-ped"
    assert datalist["labels"] == {"1": "ET", "2": "NETC", "3": "CC", "4": "ED"}
    assert datalist["testing"] == []
    assert [e["case_id"] for e in datalist["training"]] == ids
    for entry in datalist["training"]:
        cid = entry["case_id"]
        assert entry["image"] == [f"{cid}/{cid}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f")]
        assert entry["label"] == f"{cid}/{cid}-seg.nii.gz"
        assert all((root / p).is_file() for p in [*entry["image"], entry["label"]])
    # BraTS 2021 names for the brats2021 convention.
    root21, ids21 = generated("monai", "brats2021")
    entry = json.loads((root21 / MONAI_DATALIST).read_text())["training"][0]
    assert entry["image"][1] == f"{ids21[0]}/{ids21[0]}_t1ce.nii.gz"
    assert _values(root21 / entry["label"]) <= {0, 1, 2, 4}
    # Folds round-robin over 5.
    ids7 = synthesize_dataset(tmp_path, cfg_for("monai", cases=7, reoriented_fraction=0.0), workers=1)
    training = json.loads((tmp_path / MONAI_DATALIST).read_text())["training"]
    assert [e["case_id"] for e in training] == ids7
    assert [e["fold"] for e in training] == [0, 1, 2, 3, 4, 0, 1]


# ---------------------------------------------------------------- ids and refusals
def test_case_ids_follow_the_convention() -> None:
    assert case_id("brats2023", 7) == "BraTS-GLI-00007-000"
    assert case_id("brats2023", 7, "brats2023-ssa") == "BraTS-SSA-00007-000"
    assert case_id("brats2023", 7, "brats2023-men") == "BraTS-MEN-00007-000"
    assert case_id("brats2023", 7, "brats2023-met") == "BraTS-MET-00007-000"
    assert case_id("brats2023", 7, "brats2023-goat") == "BraTS-GoAT-00007-000"
    assert case_id("brats2023", 7, "brats2023-ped") == "BraTS-PED-00007-000"
    assert case_id("brats2023", 7, "brats2024-ped") == "BraTS-PED-00007-000"
    assert case_id("brats2023", 7, "brats2024-gli") == "BraTS-GLI-00007-000"
    assert case_id("brats2021", 7, "brats2024-gli") == "BraTS2021_00007"
    assert case_id("msd", 7, "brats2024-gli") == "BRATS_007"
    assert case_id("nnunet", 7) == "BraTS-GLI-00007-000"
    assert case_id("nnunet", 7, "msd") == "BRATS_007"
    assert case_id("monai", 7, "brats2021") == "BraTS2021_00007"
    assert case_id("monai", 7, "brats2024-ped") == "BraTS-PED-00007-000"


def test_refused_combinations_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="synth.labels: nnU-Net needs consecutive"):
        synthesize_dataset(tmp_path, cfg_for("nnunet", "brats2021"), workers=1)
    with pytest.raises(ConfigError, match="synth.labels"):
        synthesize_dataset(tmp_path, cfg_for("msd").model_copy(update={"labels": "nope"}), workers=1)
    assert not any(tmp_path.iterdir())
    case = synthesize_case(1, cfg_for("brats2021"))
    with pytest.raises(ValueError, match="glioma labels; brats2024-gli codes glioma_post"):
        write_case(case, tmp_path, "brats2023", labels="brats2024-gli")
    with pytest.raises(ValueError, match="unknown layout"):
        write_case(case, tmp_path, "nifti")


def test_default_meta_has_no_convention_keys(tmp_path: Path) -> None:
    synthesize_dataset(tmp_path, cfg_for("brats2021", cases=1), workers=1)
    meta = json.loads((tmp_path / SYNTH_META_NAME).read_text())
    assert list(meta) == ["generator", "template", "params", "cases"]
    assert "labels" not in meta["params"]
    assert set(meta["cases"][0]["volume_ml"]) == {"NCR", "ED", "ET"}
    assert "resection_cavity" not in meta["cases"][0] and "cysts" not in meta["cases"][0]


# ---------------------------------------------------------------- what the labels look like
def _twins(labels: str, indices: range) -> list[tuple[SyntheticCase, SyntheticCase]]:
    """(case in ``labels``, the same case as a plain glioma) at 4 mm, stored RAS."""
    kw = {"spacing_mm": 4.0, "tumour_free_fraction": 0.0, "reoriented_fraction": 0.0}
    return [
        (synthesize_case(i, SynthConfig(labels=labels, **kw)), synthesize_case(i, SynthConfig(**kw)))
        for i in indices
    ]


def _mean(case: SyntheticCase, modality: str, mask: np.ndarray) -> float:
    return float(case.images[modality][mask].mean())


def test_glioma_conventions_change_only_the_codes() -> None:
    for case, glioma in _twins("brats2023-men", range(1, 3)):
        assert case.convention == "brats2023-men" and case.label_set.name == "glioma"
        assert np.array_equal(case.labels, glioma.labels)
        assert all(np.array_equal(case.images[m], glioma.images[m]) for m in CANONICAL_MODALITIES)


def test_resection_cavity_is_fluid_apart_from_the_tumour_and_leaves_the_rest_alone() -> None:
    twins = _twins("brats2024-gli", range(1, 7))
    resected = [pair for pair in twins if pair[0].info["resection_cavity"]]
    assert 2 <= len(resected) <= 4  # about half
    for case, glioma in twins:
        rc = case.labels == case.code("RC")
        assert case.code("RC") == 4 and set(np.unique(case.labels).tolist()) <= {0, 1, 2, 3, 4}
        if not case.info["resection_cavity"]:
            assert not rc.any() and np.array_equal(case.labels, glioma.labels)  # same codes 1-3
            assert all(np.array_equal(case.images[m], glioma.images[m]) for m in CANONICAL_MODALITIES)
            continue
        # The cavity replaces tumour: where it is not, labels are the glioma's, and the images
        # are untouched away from it (same anatomy, bias and noise) unless a ghost or motion
        # artefact carries its signal across the field of view or a coarser acquisition blurs it.
        assert np.array_equal(case.labels[~rc], glioma.labels[~rc])
        assert (glioma.labels[rc] > 0).any() and (case.labels > 0)[~rc].any()
        far = ~ndi.binary_dilation(rc, iterations=3)
        for m in CANONICAL_MODALITIES:
            if m not in case.info["artefacts"] and m not in case.info["low_resolution"]:
                assert np.array_equal(case.images[m][far], glioma.images[m][far]), m
        # Free-water contrast, distinct from the tumour parts around it.
        wm = (case.tissue["wm"] > 0.9) & (case.labels == 0) & case.brain_mask
        snfh, et = case.labels == 2, case.labels == 3
        assert _mean(case, "t2", rc) > 2.0 * _mean(case, "t2", wm)
        assert _mean(case, "t1", rc) < 0.5 * _mean(case, "t1", wm)
        assert _mean(case, "t1ce", rc) < 0.5 * _mean(case, "t1ce", et)
        assert _mean(case, "flair", rc) < 0.6 * _mean(case, "flair", wm)
        assert _mean(case, "flair", rc) < 0.5 * _mean(case, "flair", snfh)


def test_paediatric_cases_have_netc_and_cysts_inside_the_core() -> None:
    twins = _twins("brats2024-ped", range(1, 7))
    lut = np.array([0, 2, 4, 1], dtype=np.uint8)  # glioma NCR, ED, ET -> pediatric NETC, ED, ET
    cystic = [pair for pair in twins if pair[0].info["cysts"]]
    assert 2 <= len(cystic) <= 4
    for case, glioma in twins:
        assert (case.code("ET"), case.code("NCR"), case.code("CC"), case.code("ED")) == (1, 2, 3, 4)
        cc = case.labels == 3
        if not case.info["cysts"]:
            assert np.array_equal(case.labels, lut[glioma.labels])
            continue
        assert np.array_equal(case.labels[~cc], lut[glioma.labels][~cc])
        assert np.isin(glioma.labels[cc], (1, 3)).all()  # inside the tumour core only
        assert ndi.label(cc)[1] == case.info["cysts"]
        et, netc = case.labels == 1, case.labels == 2
        assert _mean(case, "t1ce", cc) < 0.5 * _mean(case, "t1ce", et)  # no enhancement
        assert _mean(case, "t2", cc) > _mean(case, "t2", et)
        if netc.sum() >= 5:
            assert _mean(case, "t2", cc) > _mean(case, "t2", netc)
            assert _mean(case, "flair", cc) < 0.85 * _mean(case, "flair", netc)


# ---------------------------------------------------------------- read back by the layouts
READ_BACK = [
    # layout, synth.labels, ingest.labels, convention read back
    ("nnunet", "auto", "auto", "brats2023"),
    ("nnunet", "msd", "auto", "msd"),
    ("nnunet", "brats2024-gli", "auto", "brats2024-gli"),
    ("nnunet", "brats2024-ped", "auto", "brats2024-ped"),
    ("monai", "auto", "auto", "brats2023"),
    ("monai", "brats2021", "auto", "brats2021"),
    ("monai", "brats2023-met", "auto", "brats2023-met"),
    ("monai", "brats2024-gli", "auto", "brats2024-gli"),
    ("monai", "brats2024-ped", "auto", "brats2024-ped"),
    ("brats2023", "brats2023-men", "auto", "brats2023-men"),
    ("brats2023", "brats2024-gli", "brats2024-gli", "brats2024-gli"),
    ("brats2023", "brats2024-ped", "brats2024-ped", "brats2024-ped"),
]


@pytest.mark.parametrize(("layout", "labels", "ingest_labels", "expected"), READ_BACK)
def test_generated_datasets_read_back_with_their_convention(
    generated, layout: str, labels: str, ingest_labels: str, expected: str
) -> None:
    from tumorseg.data import layouts

    root, ids = generated(layout, labels)
    assert labels_implied(layout, expected) == (ingest_labels == "auto")
    try:
        cases = layouts.discover_cases(root, "auto", labels=ingest_labels)  # type: ignore[call-arg]
    except TypeError:
        pytest.skip("layouts.discover_cases has no labels argument yet")
    except DataError as exc:
        if "no known dataset layout" in str(exc):
            pytest.skip(f"layouts does not read {layout} yet")
        raise
    assert {c.layout for c in cases} == {layout}
    assert [c.case_id for c in cases] == sorted(ids)
    assert {c.label_convention for c in cases} == {expected}
    codes = set(get_convention(expected).label_set.labels)
    found: set[int] = set()
    for case in cases:
        volumes = layouts.read_case(case)
        assert volumes.labels is not None
        found |= set(np.unique(volumes.labels).tolist())
    assert found == codes  # every label, RC / CC included, reads back


def test_labels_implied_by_the_layout() -> None:
    assert labels_implied("brats2021", "brats2021") and labels_implied("msd", "msd")
    assert not labels_implied("msd", "brats2023") and not labels_implied("brats2021", "brats2024-gli")
    assert labels_implied("brats2023", "brats2023") and labels_implied("brats2023", "brats2023-goat")
    assert not labels_implied("brats2023", "brats2023-ped") and not labels_implied(
        "brats2023", "brats2024-ped"
    )
    assert not labels_implied("brats2023", "brats2024-gli")
    assert labels_implied("nnunet", "brats2024-ped") and labels_implied("monai", "brats2023-men")
