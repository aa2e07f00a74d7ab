"""Label conventions per case, nnU-Net v2 raw datasets and MONAI datalists (tumorseg.data.layouts)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tumorseg.data.conventions import CANONICAL_MODALITIES
from tumorseg.data.layouts import (
    LAYOUT_NAMES,
    case_from_manifest_row,
    conventions_matching_labels,
    declared_labels,
    detect_layout,
    discover_cases,
    label_meaning,
    load_case,
    read_case,
)
from tumorseg.errors import DataError

SHAPE = (8, 8, 8)
VALUE = {"t1": 10.0, "t1ce": 20.0, "t2": 30.0, "flair": 40.0}
"""Each modality is written as a constant volume, so a swapped channel shows."""


def _save(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def _image(modality: str) -> np.ndarray:
    return np.full(SHAPE, VALUE[modality], dtype=np.float32)


def _seg(values: tuple[int, ...] = (1, 2, 3)) -> np.ndarray:
    seg = np.zeros(SHAPE, dtype=np.uint8)
    for i, value in enumerate(values):
        seg[2 + i, 2:6, 2:6] = value
    return seg


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def _brats23_case(root: Path, case_id: str, seg: tuple[int, ...] = (1, 2, 3)) -> Path:
    suffixes = {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f"}
    for modality, suffix in suffixes.items():
        _save(root / case_id / f"{case_id}{suffix}.nii.gz", _image(modality))
    _save(root / case_id / f"{case_id}-seg.nii.gz", _seg(seg))
    return root / case_id


# ---------------------------------------------------------------------------- BraTS 2023+ prefixes
@pytest.mark.parametrize(
    ("case_id", "convention"),
    [
        ("BraTS-GLI-00001-000", "brats2023"),
        ("BraTS-SSA-00002-000", "brats2023-ssa"),
        ("BraTS-MEN-00003-000", "brats2023-men"),
        ("BraTS-MET-00004-000", "brats2023-met"),
        ("BraTS-GoAT-00005-000", "brats2023-goat"),
        ("BraTS-GOAT-00006-000", "brats2023-goat"),
        ("BraTS-XYZ-00007-000", "brats2023"),
    ],
)
def test_brats2023_prefix_names_the_convention(tmp_path: Path, case_id: str, convention: str) -> None:
    _brats23_case(tmp_path, case_id)
    (case,) = discover_cases(tmp_path)
    assert case.layout == "brats2023" and case.label_convention == convention
    assert case.subset == "" and case.fold is None
    assert discover_cases(tmp_path, labels="auto")[0].label_convention == convention


def test_brats_ped_needs_labels_and_explicit_labels_win(tmp_path: Path) -> None:
    _brats23_case(tmp_path, "BraTS-GLI-00001-000")
    folder = _brats23_case(tmp_path, "BraTS-PED-00002-000", seg=(1, 2, 3, 4))
    with pytest.raises(DataError) as excinfo:
        discover_cases(tmp_path)
    message = _one_line(excinfo)
    assert message.startswith(f"{folder}: BraTS-PED cases use different codes in 2023 and 2024")
    assert "ingest.labels (or --labels) to brats2023-ped or brats2024-ped" in message

    cases = discover_cases(tmp_path, labels="brats2024-ped")
    assert {c.label_convention for c in cases} == {"brats2024-ped"}
    assert (
        discover_cases(tmp_path, "brats2023", labels="brats2023-ped")[1].label_convention == "brats2023-ped"
    )
    assert discover_cases(tmp_path, "auto", "brats2023-ped")[0].label_convention == "brats2023-ped"

    with pytest.raises(DataError) as excinfo:
        discover_cases(tmp_path, labels="brats2099")
    message = _one_line(excinfo)
    assert "ingest.labels" in message and "brats2099" in message and "brats2024-gli" in message


def test_time_points_share_a_patient_across_prefixes(tmp_path: Path) -> None:
    for case_id in ("BraTS-MET-00010-000", "BraTS-MET-00010-001", "BraTS-GoAT-00011-000"):
        _brats23_case(tmp_path, case_id)
    cases = discover_cases(tmp_path)
    assert [(c.case_id, c.patient_id, c.label_convention) for c in cases] == [
        ("BraTS-GoAT-00011-000", "BraTS-GoAT-00011", "brats2023-goat"),
        ("BraTS-MET-00010-000", "BraTS-MET-00010", "brats2023-met"),
        ("BraTS-MET-00010-001", "BraTS-MET-00010", "brats2023-met"),
    ]


def test_post_treatment_gli_reads_as_brats2023_and_label_4_is_left_to_validation(tmp_path: Path) -> None:
    # BraTS 2024 GLI has the 2023 names; its label 4 (RC) must reach ingest/validation untouched.
    _brats23_case(tmp_path, "BraTS-GLI-02000-100", seg=(1, 2, 3, 4))
    (case,) = discover_cases(tmp_path)
    assert case.label_convention == "brats2023"
    loaded = load_case(case)
    assert loaded.problems == [] and "seg" in loaded.volumes
    assert discover_cases(tmp_path, labels="brats2024-gli")[0].label_convention == "brats2024-gli"


# ---------------------------------------------------------------------------- nnU-Net v2
NNUNET_CHANNELS = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
GLIOMA_LABELS = {"background": 0, "NCR": 1, "ED": 2, "ET": 3}


def _nnunet(
    root: Path,
    cases: tuple[str, ...] = ("BraTS2021_00001", "BraTS2021_00002"),
    *,
    channels: dict[str, str] | None = None,
    labels: object = None,
    test_cases: tuple[str, ...] = (),
    seg: tuple[int, ...] = (1, 2, 3),
    extra: dict[str, object] | None = None,
) -> Path:
    """An nnU-Net v2 raw dataset folder; channel i holds the modality ``channels[i]`` names."""
    channels = channels or NNUNET_CHANNELS
    spelled = {
        "t1": ("t1", "t1n", "t1w", "t1native"),
        "t1ce": ("t1ce", "t1c", "t1gd", "t1post", "t1contrast"),
    }
    spelled |= {"t2": ("t2", "t2w"), "flair": ("flair", "t2f", "t2flair")}
    modality_of = {
        index: next(m for m, names in spelled.items() if name.lower().replace("-", "") in names)
        for index, name in channels.items()
    }
    for folder, ids in (("imagesTr", cases), ("imagesTs", test_cases)):
        for case_id in ids:
            for index, modality in modality_of.items():
                _save(root / folder / f"{case_id}_{int(index):04d}.nii.gz", _image(modality))
            if folder == "imagesTr":
                _save(root / "labelsTr" / f"{case_id}.nii.gz", _seg(seg))
    meta = {
        "channel_names": channels,
        "labels": GLIOMA_LABELS if labels is None else labels,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        **(extra or {}),
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_nnunet_dataset_folder_parent_and_images_folders(tmp_path: Path) -> None:
    root = _nnunet(tmp_path / "Dataset101_Glioma", test_cases=("BraTS2021_00099",))
    (root / "labelsTr" / "BraTS2021_09999.nii.gz").write_bytes(b"not in imagesTr: ignored")
    assert detect_layout(root) == "nnunet"
    assert detect_layout(tmp_path) == "nnunet"
    assert detect_layout(root / "imagesTr") == "nnunet"
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00099"]
    train, _, test = cases
    assert train.layout == "nnunet" and train.label_convention == "brats2023"
    assert train.paths["t1ce"] == root / "imagesTr" / "BraTS2021_00001_0001.nii.gz"
    assert train.paths["seg"] == root / "labelsTr" / "BraTS2021_00001.nii.gz"
    assert train.missing == [] and train.channel_order == () and train.patient_id == train.case_id
    assert test.paths["seg"] is None and test.missing == [] and test.case_dir == root / "imagesTs"
    assert [c.case_id for c in discover_cases(root / "imagesTs")] == ["BraTS2021_00099"]
    assert len(discover_cases(root / "imagesTr", "nnunet")) == 2
    with pytest.raises(DataError, match="no brats2021 cases found"):
        discover_cases(root, "brats2021")


@pytest.mark.parametrize(
    "channels",
    [
        {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
        {"0": "FLAIR", "1": "T1w", "2": "T1Gd", "3": "T2w"},
        {"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"},
        {"0": "T2-FLAIR", "1": "t1-native", "2": "T1post", "3": "T2"},
        {"0": "T1-contrast", "1": "Flair", "2": "T1", "3": "t2"},
    ],
)
def test_nnunet_channel_names_in_every_spelling_reach_the_right_channel(
    tmp_path: Path, channels: dict[str, str]
) -> None:
    _nnunet(tmp_path, ("case_001",), channels=channels)
    volumes = read_case(discover_cases(tmp_path)[0])
    for channel, modality in enumerate(CANONICAL_MODALITIES):
        assert float(volumes.image[channel].mean()) == VALUE[modality]
    assert sorted(np.unique(volumes.labels).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("labels", "seg", "expected"),
    [
        (GLIOMA_LABELS, (1, 2, 3), "brats2023"),
        (
            {"background": 0, "necrotic tumor core": 1, "peritumoral edema": 2, "enhancing tumour": 3},
            (1, 2, 3),
            "brats2023",
        ),
        ({"background": 0, "NCR/NET": 1, "ED": 2, "ET": 4}, (1, 2, 4), "brats2021"),
        # Dataset137_BraTS2021: regions in MSD codes (1 ED, 2 NCR, 3 ET), regions_class_order (1, 2, 3)
        (
            {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
            (1, 2, 3),
            "msd",
        ),
        ({"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}, (1, 2, 3), "msd"),
        (
            {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            (1, 2, 3),
            "msd",
        ),
        ({"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "RC": 4}, (1, 2, 3, 4), "brats2024-gli"),
        (
            {"background": 0, "WT": [1, 2, 3], "TC": [1, 3], "ET": 3, "resection cavity": 4},
            (1, 2, 3, 4),
            "brats2024-gli",
        ),
        ({"background": 0, "ET": 1, "NETC": 2, "CC": 3, "ED": 4}, (1, 2, 3, 4), "brats2024-ped"),
    ],
)
def test_nnunet_labels_select_the_convention(
    tmp_path: Path, labels: dict[str, object], seg: tuple[int, ...], expected: str
) -> None:
    extra = {"regions_class_order": [1, 2, 3]} if "whole tumor" in labels else {}
    _nnunet(tmp_path, ("case_001",), labels=labels, seg=seg, extra=extra)
    (case,) = discover_cases(tmp_path)
    assert case.label_convention == expected
    assert read_case(case).labels is not None  # every value of the file is in the convention


def test_nnunet_brats_prefix_narrows_twin_conventions_and_keeps_time_points(tmp_path: Path) -> None:
    _nnunet(tmp_path, ("BraTS-PED-00001-000", "BraTS-PED-00001-001", "BraTS-MEN-00002-000"))
    cases = discover_cases(tmp_path)
    assert [(c.case_id, c.patient_id, c.label_convention) for c in cases] == [
        ("BraTS-MEN-00002-000", "BraTS-MEN-00002", "brats2023-men"),
        ("BraTS-PED-00001-000", "BraTS-PED-00001", "brats2023-ped"),
        ("BraTS-PED-00001-001", "BraTS-PED-00001", "brats2023-ped"),
    ]
    other = _nnunet(
        tmp_path / "ped24",
        ("BraTS-PED-00003-000",),
        labels={"background": 0, "ET": 1, "NETC": 2, "CC": 3, "ED": 4},
    )
    assert discover_cases(other)[0].label_convention == "brats2024-ped"


def test_nnunet_unmappable_channel_name_is_an_error_naming_dataset_json(tmp_path: Path) -> None:
    _nnunet(tmp_path, ("case_001",))
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T1", "1": "PD", "2": "T2", "3": "FLAIR"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError) as excinfo:
        discover_cases(tmp_path)
    message = _one_line(excinfo)
    assert message.startswith(f"{tmp_path / 'dataset.json'}: channel_names")
    assert "'PD'" in message and "rename" in message

    meta["channel_names"] = {"0": "T1", "1": "T1ce", "2": "T2"}  # three channels
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"dataset.json: channel_names .* one each"):
        discover_cases(tmp_path, "nnunet")


@pytest.mark.parametrize(
    ("labels", "why"),
    [
        ({"background": 0, "tumour": 1}, "match no known convention (unknown name 'tumour')"),
        ({"background": 0, "NCR": 2, "ED": 1, "ET": 4}, "match no known convention"),
        ({"background": 0, "ET": 3}, "match several conventions (brats2023, brats2024-gli, msd)"),
        ({"background": 0, "NCR": "one"}, "must be a label value or a list of them"),
    ],
)
def test_nnunet_labels_that_match_no_single_convention_are_errors(
    tmp_path: Path, labels: dict[str, object], why: str
) -> None:
    _nnunet(tmp_path, ("case_001",), labels=labels)
    with pytest.raises(DataError) as excinfo:
        discover_cases(tmp_path)
    message = _one_line(excinfo)
    assert message.startswith(f"{tmp_path / 'dataset.json'}: labels")
    assert why in message
    if "match" in why:
        assert "set ingest.labels" in message
    # An explicit convention settles it when it has every declared value.
    if why.startswith("match several"):
        assert discover_cases(tmp_path, labels="brats2024-gli")[0].label_convention == "brats2024-gli"


def test_nnunet_explicit_labels_must_agree_with_dataset_json(tmp_path: Path) -> None:
    _nnunet(tmp_path, ("case_001",), labels={"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "RC": 4})
    with pytest.raises(DataError) as excinfo:
        discover_cases(tmp_path, labels="brats2023")
    message = _one_line(excinfo)
    assert message.startswith(f"{tmp_path / 'dataset.json'}: labels")
    assert "declare values [4] that convention brats2023 (ingest.labels) does not have" in message
    assert discover_cases(tmp_path, labels="brats2024-gli")[0].label_convention == "brats2024-gli"
    # Same codes, other name: allowed (the user knows the cohort).
    _nnunet(tmp_path / "b", ("case_001",))
    assert discover_cases(tmp_path / "b", labels="brats2023-met")[0].label_convention == "brats2023-met"


def test_nnunet_missing_channel_file_is_listed_for_quarantine(tmp_path: Path) -> None:
    _nnunet(tmp_path, ("case_001", "case_002"))
    (tmp_path / "imagesTr" / "case_002_0002.nii.gz").unlink()
    ok, broken = discover_cases(tmp_path)
    assert ok.missing == []
    assert broken.missing == ["case_002_0002.nii.gz"] and broken.paths["t2"] is None
    assert load_case(broken).problems == ["missing modality file case_002_0002.nii.gz"]


def test_nnunet_other_bad_inputs(tmp_path: Path) -> None:
    root = _nnunet(tmp_path / "Dataset001_A", ("case_001",))
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".mha"}))
    with pytest.raises(DataError) as excinfo:
        discover_cases(root)
    assert "dataset.json: file_ending '.mha' is not NIfTI" in _one_line(excinfo)
    (root / "dataset.json").write_text(json.dumps(meta))

    _nnunet(tmp_path / "Dataset002_B", ("case_001",))
    with pytest.raises(DataError) as excinfo:
        discover_cases(tmp_path)
    assert "several nnU-Net datasets (Dataset001_A, Dataset002_B)" in _one_line(excinfo)

    (root / "dataset.json").write_text('{"channel_names": {"0": "T1",}')
    with pytest.raises(DataError) as excinfo:
        discover_cases(root)
    message = _one_line(excinfo)
    assert message.startswith(f"{root / 'dataset.json'}: not valid JSON (line 1")


def test_nnunet_v1_task_folder_with_modality_is_not_read_as_msd(tmp_path: Path) -> None:
    _nnunet(tmp_path, ("BRATS_001",))
    meta = json.loads((tmp_path / "dataset.json").read_text())
    v1 = {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}}
    v1["labels"] = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    del meta["channel_names"]
    (tmp_path / "dataset.json").write_text(json.dumps({**meta, **v1}))
    assert detect_layout(tmp_path) == "nnunet"
    (case,) = discover_cases(tmp_path)
    assert case.label_convention == "msd" and case.paths["flair"].name == "BRATS_001_0000.nii.gz"


def test_label_name_helpers() -> None:
    assert label_meaning("Non-Enhancing Tumour Core") == "core"
    assert label_meaning("Surrounding non-enhancing FLAIR hyperintensity (SNFH)") == "edema"
    assert label_meaning("whole tumour") == "WT" and label_meaning("tumor") is None
    dataset137 = declared_labels(
        {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}, "x"
    )
    assert conventions_matching_labels(dataset137) == [["msd"]]
    (group,) = conventions_matching_labels(declared_labels(GLIOMA_LABELS, "x"))
    assert group[0] == "brats2023" and {"brats2023-men", "brats2023-ped", "brats2023-goat"} <= set(group)


# ---------------------------------------------------------------------------- MONAI datalists
def _monai_files(root: Path, case_id: str, *, seg: bool = True) -> dict[str, object]:
    names = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}
    images = []
    for modality in ("flair", "t1", "t1ce", "t2"):  # not canonical order: the names decide
        rel = f"TrainingData/{case_id}/{case_id}_{names[modality]}.nii.gz"
        _save(root / rel, _image(modality))
        images.append(rel)
    entry: dict[str, object] = {"image": images}
    if seg:
        rel = f"TrainingData/{case_id}/{case_id}_seg.nii.gz"
        _save(root / rel, _seg((1, 2, 4)))
        entry["label"] = rel
    return entry


def _datalist(root: Path, data: dict[str, object], name: str = "brats21_folds.json") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(data))
    return root / name


def test_monai_datalist_with_file_lists_folds_and_testing(tmp_path: Path) -> None:
    training = [{"fold": i % 2, **_monai_files(tmp_path, f"BraTS2021_0000{i}")} for i in range(1, 4)]
    validation = [_monai_files(tmp_path, "BraTS2021_00010")]
    testing = [_monai_files(tmp_path, "BraTS2021_00020", seg=False)]
    path = _datalist(tmp_path, {"training": training, "validation": validation, "testing": testing})
    # The datalist describes the BraTS folders beside it: monai wins, --layout reads the folders.
    assert detect_layout(tmp_path) == "monai" and detect_layout(path) == "monai"
    cases = discover_cases(tmp_path)
    assert [(c.case_id, c.subset, c.fold) for c in cases] == [
        ("BraTS2021_00001", "training", 1),
        ("BraTS2021_00002", "training", 0),
        ("BraTS2021_00003", "training", 1),
        ("BraTS2021_00010", "validation", None),
        ("BraTS2021_00020", "testing", None),
    ]
    assert {c.layout for c in cases} == {"monai"} and {c.label_convention for c in cases} == {"brats2021"}
    first = cases[0]
    assert first.paths["t1ce"] == tmp_path / "TrainingData/BraTS2021_00001/BraTS2021_00001_t1ce.nii.gz"
    assert first.case_dir == tmp_path and first.missing == []
    assert cases[-1].paths["seg"] is None and not cases[-1].missing
    volumes = read_case(first)
    for channel, modality in enumerate(CANONICAL_MODALITIES):
        assert float(volumes.image[channel].mean()) == VALUE[modality]
    assert sorted(np.unique(volumes.labels).tolist()) == [0, 1, 2, 3]
    assert [c.case_id for c in discover_cases(tmp_path / "TrainingData", "brats2021")][:1] == [
        "BraTS2021_00001"
    ]
    assert len(discover_cases(path)) == 5


def test_monai_4d_images_absolute_paths_labels_dict_and_manifest_round_trip(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    order = ("flair", "t1", "t1ce", "t2")
    entries = []
    for case_id in ("img_001", "img_002"):
        image = _save(data_dir / f"{case_id}.nii.gz", np.stack([_image(m) for m in order], axis=-1))
        label = _save(data_dir / f"lab_{case_id}.nii.gz", _seg((1, 2, 3)))
        entries.append({"image": str(image), "label": str(label), "fold": 0})
    meta = {
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "training": entries,
    }
    _datalist(tmp_path / "lists", meta, "dataset_0.json")
    cases = discover_cases(tmp_path / "lists")
    assert [(c.case_id, c.label_convention, c.fold) for c in cases] == [
        ("lab_img_001", "msd", 0),
        ("lab_img_002", "msd", 0),
    ]
    case = cases[0]
    assert case.channel_order == order and len({case.paths[m] for m in CANONICAL_MODALITIES}) == 1
    volumes = read_case(case)
    for channel, modality in enumerate(CANONICAL_MODALITIES):
        assert float(volumes.image[channel].mean()) == VALUE[modality]

    row = {
        "case_id": case.case_id,
        "patient_id": case.patient_id,
        "layout": case.layout,
        "label_convention": case.label_convention,
        "case_dir": str(case.case_dir),
        "subset": case.subset,
        "fold": str(case.fold),
        **{f"path_{k}": str(p) if p else "" for k, p in case.paths.items()},
    }
    rebuilt = case_from_manifest_row(row)
    assert rebuilt == case
    assert (
        case_from_manifest_row({**row, "channel_order": "t1;t1ce;t2;flair"}).channel_order
        == CANONICAL_MODALITIES
    )
    legacy = {k: v for k, v in row.items() if k not in ("subset", "fold")}
    assert (case_from_manifest_row(legacy).subset, case_from_manifest_row(legacy).fold) == ("", None)

    meta.pop("modality")
    _datalist(tmp_path / "lists", meta, "dataset_0.json")
    with pytest.raises(DataError) as excinfo:
        discover_cases(tmp_path / "lists")
    message = _one_line(excinfo)
    assert "dataset_0.json: training[0].image is one 4-D file" in message and "'modality'" in message


def test_nnunet_manifest_row_round_trip(tmp_path: Path) -> None:
    _nnunet(tmp_path, ("BraTS-GLI-00001-000",))
    (case,) = discover_cases(tmp_path)
    row = {
        "case_id": case.case_id,
        "patient_id": case.patient_id,
        "layout": case.layout,
        "label_convention": case.label_convention,
        "case_dir": str(case.case_dir),
        "subset": "",
        "fold": "",
        **{f"path_{k}": str(p) if p else "" for k, p in case.paths.items()},
    }
    assert case_from_manifest_row(row) == case


def test_monai_missing_file_is_listed_with_its_key(tmp_path: Path) -> None:
    training = [_monai_files(tmp_path, "BraTS2021_00001"), _monai_files(tmp_path, "BraTS2021_00002")]
    gone = tmp_path / training[1]["image"][1]  # type: ignore[index]
    gone.unlink()
    absent_images = [p.replace("00001", "00003") for p in training[0]["image"]]  # type: ignore[union-attr]
    training.append({"image": absent_images, "label": "nowhere/BraTS2021_00003_seg.nii.gz"})
    _datalist(tmp_path, {"training": training})
    ok, broken, absent = discover_cases(tmp_path)
    assert ok.missing == []
    assert broken.missing == [f"training[1].image[1]: {gone} does not exist"] and broken.paths["t1"] is None
    assert load_case(broken).problems == [f"training[1].image[1]: {gone} does not exist"]
    assert len(absent.missing) == 5 and absent.missing[-1].startswith("training[2].label: ")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"training": [{"image": ["a_t1.nii.gz"], ', "not valid JSON (line 1"),
        (
            '{"training": [{"image": ["a_t1.nii.gz", "a_t2.nii.gz", "a_flair.nii.gz"], "label": "a.nii.gz"}]}',
            "training[0].image must be 4 files",
        ),
        (
            '{"training": [{"image": ["a_t1.nii.gz", "a_t2.nii.gz", "a_flair.nii.gz", "a_pd.nii.gz"], "label": "a.nii.gz"}]}',
            "training[0].image: cannot tell t1, t1ce, t2 and flair apart",
        ),
        (
            '{"training": [{"image": ["a_t1.nii.gz", "a_t1ce.nii.gz", "a_t2.nii.gz", "a_flair.nii.gz"], "label": 3}]}',
            "training[0].label must be a file path",
        ),
        (
            '{"training": [{"image": ["a_t1.nii.gz", "a_t1ce.nii.gz", "a_t2.nii.gz", "a_flair.nii.gz"]}]}',
            "training[0] has no 'label'",
        ),
        (
            '{"training": [{"image": ["a_t1.nii.gz", "a_t1ce.nii.gz", "a_t2.nii.gz", "a_flair.nii.gz"], "label": "a.nii.gz", "fold": "x"}]}',
            "training[0].fold must be a whole number",
        ),
        (
            '{"training": [{"image": ["a_t1.nii.gz", "a_t1ce.nii.gz", "a_t2.nii.gz", "a_flair.nii.gz"], "label": "a.nii.gz"}], "validation": {"image": 1}}',
            "validation must be a list",
        ),
        (
            '{"training": [{"image": ["a_t1.nii.gz", "a_t1ce.nii.gz", "a_t2.nii.gz", "a_flair.nii.gz"], "label": "a.nii.gz"}, 7]}',
            "training[1] must be an object with 'image'",
        ),
    ],
)
def test_monai_malformed_json_or_entry_names_the_file_and_key(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "datalist.json"
    path.write_text(content)
    with pytest.raises(DataError) as excinfo:
        discover_cases(tmp_path, "monai", labels="brats2023")
    message = _one_line(excinfo)
    assert message.startswith(f"{path}: ") and expected in message
    if "not valid JSON" in expected:  # also when detecting: the only JSON of the folder is broken
        with pytest.raises(DataError, match="not valid JSON"):
            discover_cases(tmp_path)


def test_monai_case_ids_conventions_and_duplicates(tmp_path: Path) -> None:
    images = ["x/case7_T1.nii.gz", "x/case7_T1Gd.nii.gz", "x/case7_T2w.nii.gz", "x/case7_FLAIR.nii.gz"]
    for rel, modality in zip(images, CANONICAL_MODALITIES, strict=True):
        _save(tmp_path / rel, _image(modality))
    _save(tmp_path / "x/case7_mask.nii.gz", _seg())
    _datalist(tmp_path, {"training": [{"image": images, "label": "x/case7_mask.nii.gz"}]})
    with pytest.raises(DataError) as excinfo:
        discover_cases(tmp_path)
    message = _one_line(excinfo)
    assert "brats21_folds.json: training[0]: case case7_mask is not BraTS-named" in message
    assert "set ingest.labels (or --labels)" in message
    (case,) = discover_cases(tmp_path, labels="brats2023")
    assert case.case_id == "case7_mask" and case.paths["t1ce"].name == "case7_T1Gd.nii.gz"

    entry = {"image": images, "label": "x/case7_mask.nii.gz"}
    _datalist(tmp_path, {"training": [entry], "validation": [entry]})
    with pytest.raises(DataError) as excinfo:
        discover_cases(tmp_path, labels="brats2023")
    assert "case id case7_mask appears twice (training[0] and validation[0])" in _one_line(excinfo)

    ped = ["BraTS-PED-00001-000/BraTS-PED-00001-000-" + s + ".nii.gz" for s in ("t1n", "t1c", "t2w", "t2f")]
    _datalist(tmp_path, {"training": [{"image": ped, "label": "BraTS-PED-00001-000/seg.nii.gz"}]})
    with pytest.raises(DataError) as excinfo:
        discover_cases(tmp_path)
    message = _one_line(excinfo)
    assert "training[0]: BraTS-PED-00001-000: BraTS-PED cases use different codes" in message
    (case,) = discover_cases(tmp_path, labels="brats2024-ped")
    assert case.case_id == "BraTS-PED-00001-000" and case.patient_id == "BraTS-PED-00001"
    assert case.missing and all("does not exist" in m for m in case.missing)


def test_two_datalists_are_an_error_naming_both(tmp_path: Path) -> None:
    entry = _monai_files(tmp_path, "BraTS2021_00001")
    _datalist(tmp_path, {"training": [entry]}, "a.json")
    _datalist(tmp_path, {"training": [entry]}, "b.json")
    (tmp_path / "notes.json").write_text('{"training": "not a datalist"}')
    with pytest.raises(DataError) as excinfo:
        discover_cases(tmp_path)
    message = _one_line(excinfo)
    assert "several MONAI datalists (a.json, b.json); keep one" in message
    assert len(discover_cases(tmp_path / "a.json")) == 1


def test_msd_dataset_json_with_a_training_list_stays_msd_and_hints_list_every_layout(tmp_path: Path) -> None:
    _save(
        tmp_path / "imagesTr" / "BRATS_001.nii.gz",
        np.stack([_image(m) for m in ("flair", "t1", "t1ce", "t2")], -1),
    )
    _save(tmp_path / "labelsTr" / "BRATS_001.nii.gz", _seg())
    meta = {
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
        "test": [],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    assert detect_layout(tmp_path) == "msd"
    assert discover_cases(tmp_path)[0].label_convention == "msd"
    assert discover_cases(tmp_path, labels="brats2023")[0].label_convention == "brats2023"
    # ... and the same file read as a MONAI datalist.
    (case,) = discover_cases(tmp_path, "monai")
    assert (case.case_id, case.layout, case.subset) == ("BRATS_001", "monai", "training")

    empty = tmp_path / "other"
    (empty / "x").mkdir(parents=True)
    (empty / "x" / "a.txt").write_text("x")
    with pytest.raises(DataError) as excinfo:
        detect_layout(empty)
    message = _one_line(excinfo)
    assert "nnU-Net dataset" in message and "MONAI datalist" in message
    with pytest.raises(
        DataError, match="unknown layout 'kaggle'; use one of auto, brats2021, brats2023, msd, nnunet, monai"
    ):
        discover_cases(empty, "kaggle")
    assert LAYOUT_NAMES == ("brats2021", "brats2023", "msd", "nnunet", "monai")
