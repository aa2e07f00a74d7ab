"""Figshare v7.3 files written without MATLAB's attributes (h5py, other tools), and bad ones: read, ingest, preprocess."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io

from tumorseg.cli import main
from tumorseg.data.ingest import planar_manifest_row
from tumorseg.data.planar import load_planar_raw
from tumorseg.data.planar_synth import write_figshare_mat
from tumorseg.data.readers import PlanarFile

PARAMS = str(Path(__file__).resolve().parents[2] / "params.yaml")
PID = "MR040237"


def _image(height: int = 7, width: int = 5) -> np.ndarray:
    """An int16 image whose every pixel differs, so any transposition shows."""
    return (np.arange(height * width, dtype=np.int16).reshape(height, width) * 3 + 1).astype(np.int16)


def _mask(height: int = 7, width: int = 5) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[1:3, 0:2] = 1
    return mask


BORDER = np.array([1.5, 2.0, 3.5, 4.0])


def _plain_fields(**replace: Any) -> dict[str, Any]:
    """The cjdata datasets as MATLAB lays them out (column-major, so transposed), with no attribute."""
    fields: dict[str, Any] = {
        "image": _image().T,
        "tumorMask": _mask().T,
        "label": np.array([[2.0]]),
        "PID": np.array([[ord(c)] for c in PID], dtype=np.uint16),  # MATLAB char 1x8 -> HDF5 8x1
        "tumorBorder": BORDER.reshape(-1, 1),
    }
    fields.update(replace)
    return {k: v for k, v in fields.items() if v is not None}


def _write_plain(
    path: Path, fields: dict[str, Any], *, userblock: bool = False, group: str = "cjdata"
) -> Path:
    """An HDF5 ``.mat`` written by h5py alone: no MATLAB_class, no MATLAB header unless ``userblock``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", userblock_size=512 if userblock else 0) as fh:
        cjdata = fh.create_group(group)
        for name, value in fields.items():
            if isinstance(value, str) and value == "group":
                cjdata.create_group(name)
            else:
                cjdata.create_dataset(name, data=value)
    return path


def _row(path: Path) -> dict[str, str]:
    return planar_manifest_row(PlanarFile(path=path, layout="figshare", case_id="figshare-x"), "f")


def _comparable(row: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in row.items() if k not in ("path", "sha256", "fingerprint")}


@pytest.mark.parametrize(
    "pid",
    [
        pytest.param(np.array([[ord(c)] for c in PID], dtype=np.uint16), id="uint16-char-column"),
        pytest.param(np.array([ord(c) for c in PID], dtype=np.uint16), id="uint16-vector"),
        pytest.param(np.array([ord(c) for c in PID] + [0, 0], dtype=">u2"), id="uint16-big-endian-padded"),
        pytest.param(np.bytes_(PID.encode()), id="fixed-bytes"),
        pytest.param(PID.encode(), id="vlen-bytes"),
        pytest.param(PID, id="vlen-str"),
        pytest.param(np.array([PID.encode()], dtype=object), id="object-bytes-array"),
        pytest.param(np.frombuffer(PID.encode(), dtype=np.uint8), id="uint8-bytes"),
    ],
)
@pytest.mark.parametrize("userblock", [False, True], ids=["bare-hdf5", "matlab-header"])
def test_unattributed_file_reads_as_the_matlab_one(tmp_path: Path, pid: Any, userblock: bool) -> None:
    tagged = write_figshare_mat(tmp_path / "tagged" / "1.mat", _image(), _mask(), 2, PID, BORDER)
    plain = _write_plain(tmp_path / "plain" / "1.mat", _plain_fields(PID=pid), userblock=userblock)
    with h5py.File(plain, "r") as fh:
        assert not any("MATLAB_class" in item.attrs for item in fh["cjdata"].values())

    expected, got = load_planar_raw(tagged), load_planar_raw(plain)
    np.testing.assert_array_equal(got.image, _image())
    assert got.image.dtype == expected.image.dtype == np.int16
    np.testing.assert_array_equal(got.mask, expected.mask)
    np.testing.assert_array_equal(got.border, expected.border)
    assert (
        (got.label, got.pid, got.fmt)
        == (expected.label, expected.pid, expected.fmt)
        == (2.0, PID, "mat-v7.3")
    )
    assert _comparable(_row(plain)) == _comparable(_row(tagged))
    assert _row(plain)["patient_id"] == PID and _row(plain)["status"] == "ok"


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (np.array([[100360.0]]), "100360"),
        (np.int32(42), "42"),
        (np.array([[ord(c) for c in "Ünï"]], dtype=np.uint16).T, "Ünï"),
        (np.zeros((0,), dtype=np.uint16), ""),  # empty: validation reports the missing PID
    ],
    ids=["double", "int32", "non-ascii-char", "empty"],
)
def test_pid_as_a_number_or_odd_text(tmp_path: Path, stored: Any, expected: str) -> None:
    path = _write_plain(tmp_path / "1.mat", _plain_fields(PID=stored))
    assert load_planar_raw(path).pid == expected
    row = _row(path)
    assert row["status"] == "ok" and row["patient_id"] == expected


def test_tagged_file_reads_by_its_matlab_class(tmp_path: Path) -> None:
    path = write_figshare_mat(tmp_path / "1.mat", _image(), _mask(), 3, PID, BORDER)
    got = load_planar_raw(path)
    np.testing.assert_array_equal(got.image, _image())
    np.testing.assert_array_equal(got.mask, _mask())
    np.testing.assert_array_equal(got.border, BORDER)
    assert (got.label, got.pid, got.fmt, got.image.dtype) == (3.0, PID, "mat-v7.3", np.int16)
    no_mask = write_figshare_mat(tmp_path / "2.mat", _image(), None, None, None)  # empty border: absent
    got = load_planar_raw(no_mask)
    assert (got.mask, got.label, got.pid, got.border) == (None, None, None, None)


def test_label_stored_as_text_or_integer(tmp_path: Path) -> None:
    for i, label in enumerate([np.bytes_(b"3"), np.uint8(3), np.array([[3]], dtype=np.int64)]):
        row = _row(_write_plain(tmp_path / f"{i}.mat", _plain_fields(label=label)))
        assert (row["status"], row["label"], row["tumour_type"]) == ("ok", "3", "pituitary")


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (
            _plain_fields(PID=np.array([[1.5, 2.5]])),
            "cjdata.PID is a float64 array of shape 2x1, not a patient id",
        ),
        (_plain_fields(PID=np.array([True])), "cjdata.PID is a bool array of shape 1, not a patient id"),
        (_plain_fields(PID=np.array([0xD800], dtype=np.uint16)), "cjdata.PID is a uint16 array"),
        (
            _plain_fields(PID=np.array([b"\xff\xfe"])),
            "cjdata.PID is text or objects (dtype S2), not a patient id",
        ),
        (
            _plain_fields(label=np.array([[1.0, 2.0]])),
            "cjdata.label is a float64 array of shape 2x1, not one number",
        ),
        (
            _plain_fields(label=np.bytes_(b"glioma")),
            "cjdata.label is text or objects (dtype S6), not one number",
        ),
        (
            _plain_fields(image=np.bytes_(b"pixels")),
            "cjdata.image is text or objects (dtype S6), not numbers",
        ),
        (_plain_fields(image=np.zeros((0, 4))), "cjdata.image is empty"),
        (_plain_fields(image="group"), "cjdata.image is an HDF5 group, not an array"),
        (
            _plain_fields(tumorMask=np.array([b"0", b"1"])),
            "cjdata.tumorMask is text or objects (dtype S1), not a 0/1",
        ),
        (_plain_fields(tumorBorder=np.bytes_(b"1 2 3")), "cjdata.tumorBorder is text or objects (dtype S5)"),
        (_plain_fields(image=None), "MATLAB struct cjdata has no 'image' field"),
    ],
    ids=[
        "pid-floats",
        "pid-bool",
        "pid-lone-surrogate",
        "pid-bad-utf8",
        "label-two-numbers",
        "label-word",
        "image-text",
        "image-empty",
        "image-group",
        "mask-text",
        "border-text",
        "no-image",
    ],
)
def test_field_that_cannot_be_read_quarantines_the_file_naming_the_field(
    tmp_path: Path, fields: dict[str, Any], reason: str
) -> None:
    path = _write_plain(tmp_path / "1.mat", fields)
    row = _row(path)
    assert row["status"] == "quarantined" and row["image_readable"] == "False"
    assert row["reason"].startswith(reason), row["reason"]
    assert "\n" not in row["reason"] and str(path) not in row["reason"]
    if "cjdata." in reason:
        assert "; store " in row["reason"]  # says what to do


def _damaged(tmp_path: Path, damage: str) -> Path:
    path = tmp_path / f"{damage}.mat"
    if damage == "no-cjdata":
        return _write_plain(path, _plain_fields(), group="data")
    if damage == "cjdata-dataset":
        with h5py.File(path, "w") as fh:
            fh.create_dataset("cjdata", data=np.zeros((3, 3)))
        return path
    if damage == "not-hdf5":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        return path
    if damage == "truncated-hdf5":
        data = _write_plain(path, _plain_fields(image=np.zeros((300, 300), np.int16))).read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path
    assert damage == "v5-text-label"
    fields = {"image": _image(), "tumorMask": _mask(), "label": "glioma", "PID": PID}
    scipy.io.savemat(path, {"cjdata": fields})
    return path


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("no-cjdata", "MATLAB file has no struct 'cjdata'"),
        ("cjdata-dataset", "MATLAB file has no struct 'cjdata'"),
        ("not-hdf5", "not a readable MATLAB file"),
        ("truncated-hdf5", "corrupt MATLAB v7.3 (HDF5) file"),
        ("v5-text-label", "cjdata.label or cjdata.tumorBorder is not numeric"),
    ],
)
def test_undecodable_files_are_quarantined_with_one_line(tmp_path: Path, damage: str, reason: str) -> None:
    path = _damaged(tmp_path, damage)
    row = _row(path)
    assert row["status"] == "quarantined" and row["reason"].startswith(reason), row["reason"]
    assert "\n" not in row["reason"]


def test_cli_ingest_and_validate_a_folder_of_unattributed_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "figshare"
    image, mask = _image(64, 64), np.zeros((64, 64), np.uint8)
    mask[20:30, 20:30] = 1
    good = {"image": image.T, "tumorMask": mask.T, "tumorBorder": BORDER.reshape(1, -1)}
    for i, pid in enumerate([b"P1", b"P1", b"P2"], start=1):
        _write_plain(raw / f"{i}.mat", {**good, "label": np.array([[float(i)]]), "PID": np.bytes_(pid)})
    _write_plain(raw / "bad" / "11.mat", {**good, "label": np.array([[5.0]]), "PID": np.bytes_(b"P3")})
    _write_plain(raw / "bad" / "12.mat", {**good, "tumorMask": mask[:60].T, "label": 1.0, "PID": b"P3"})
    _write_plain(raw / "bad" / "13.mat", {"image": image.T, "label": 1.0, "PID": b"P3"})  # no tumorMask
    _write_plain(raw / "bad" / "14.mat", {**good, "label": 1.0, "PID": np.array([[1.5, 2.5]])})
    _write_plain(raw / "bad" / "15.mat", {"image": image.T}, group="data")
    (raw / "bad" / "16.mat").write_text("not a MATLAB file")

    ingested, validated = tmp_path / "ingested", tmp_path / "validated"
    assert main(["ingest", "--params", PARAMS, str(raw), "--out", str(ingested)]) == 0
    args = [
        "validate",
        "--params",
        PARAMS,
        str(ingested),
        "--out",
        str(validated),
        "--max-invalid-fraction",
        "1",
    ]
    assert main(args) == 0
    assert "Traceback" not in capsys.readouterr().err

    rows = pd.read_csv(validated / "manifest.csv", dtype=str, keep_default_na=False).set_index("case_id")
    ok = rows.loc[["figshare-1", "figshare-2", "figshare-3"]]
    assert (ok["status"] == "ok").all() and list(ok["patient_id"]) == ["P1", "P1", "P2"]
    assert list(ok["tumour_type"]) == ["meningioma", "glioma", "pituitary"]
    reasons = rows["reason"].to_dict()
    assert "label 5" in reasons["figshare-11"]
    assert reasons["figshare-12"] == "tumorMask shape 60x64 differs from image 64x64"
    assert "no tumorMask" in reasons["figshare-13"]
    assert reasons["figshare-14"].startswith("cjdata.PID is a float64 array of shape 2x1, not a patient id")
    assert "no struct 'cjdata'" in reasons["figshare-15"]
    assert "not a readable MATLAB file" in reasons["figshare-16"]
    bad = rows.drop(index=ok.index)
    assert (bad["status"] == "quarantined").all() and not bad["reason"].str.contains("\n").any()


def _slice(pid: str) -> tuple[np.ndarray, np.ndarray]:
    """A 64x64 int16 slice with a bright head and a tumour in it (asymmetric), and its mask."""
    rng = np.random.default_rng(sum(map(ord, pid)))
    image = rng.integers(0, 20, (64, 64)).astype(np.int16)
    image[8:56, 12:50] += 300
    image[20:32, 24:30] += 200
    mask = np.zeros((64, 64), np.uint8)
    mask[20:32, 24:30] = 1
    return image, mask


def test_cli_preprocess_of_unattributed_files_matches_the_matlab_tagged_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attribute-less files go through ingest -> validate -> preprocess as MATLAB's own files do."""
    for i, (pid, label) in enumerate([("P1", 1), ("P1", 2), ("P2", 3)], start=1):
        image, mask = _slice(f"{pid}-{i}")
        write_figshare_mat(tmp_path / "tagged" / f"{i}.mat", image, mask, label, pid, BORDER)
        fields = {"image": image.T, "tumorMask": mask.T, "tumorBorder": BORDER.reshape(-1, 1)}
        pid_codes = np.array([[ord(c)] for c in pid], dtype=np.uint16)
        _write_plain(
            tmp_path / "plain" / f"{i}.mat",
            {**fields, "label": np.array([[float(label)]]), "PID": pid_codes},
            userblock=i % 2 == 1,
        )

    outputs: dict[str, tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]] = {}
    for kind in ("tagged", "plain"):
        ingested, validated, pre = (tmp_path / f"{kind}-{step}" for step in ("in", "val", "pre"))
        assert main(["ingest", "--params", PARAMS, str(tmp_path / kind), "--out", str(ingested)]) == 0
        assert main(["validate", "--params", PARAMS, str(ingested), "--out", str(validated)]) == 0
        assert main(["preprocess", "--params", PARAMS, str(validated), "--out", str(pre)]) == 0
        assert "Traceback" not in capsys.readouterr().err
        rows = pd.read_csv(pre / "manifest.csv", dtype=str, keep_default_na=False).set_index("case_id")
        arrays = {}
        for case_id in rows.index:
            with np.load(pre / f"{case_id}.npz") as data:
                arrays[case_id] = {name: data[name] for name in data.files}
        outputs[kind] = rows, arrays

    (tagged_rows, tagged), (plain_rows, plain) = outputs["tagged"], outputs["plain"]
    assert list(plain_rows.index) == ["figshare-1", "figshare-2", "figshare-3"]
    assert (plain_rows["status"] == "ok").all() and list(plain_rows["patient_id"]) == ["P1", "P1", "P2"]
    assert list(plain_rows["tumour_type"]) == ["meningioma", "glioma", "pituitary"]
    different = [c for c in plain_rows.columns if c in ("path", "sha256", "npz_sha256")]
    pd.testing.assert_frame_equal(plain_rows.drop(columns=different), tagged_rows.drop(columns=different))
    for case_id, expected in tagged.items():
        assert sorted(plain[case_id]) == sorted(expected) == ["image", "mask"]
        for name, array in expected.items():
            assert plain[case_id][name].dtype == array.dtype
            np.testing.assert_array_equal(plain[case_id][name], array)
        assert expected["mask"].any()
