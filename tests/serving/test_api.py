"""``POST /predict`` and the viewer endpoints: the CLI's segmentation over HTTP, in every input form.

The oracle network segments the phantoms almost perfectly, so Dice against the case's own mask is
a real check that the served labels land on the input's voxels in the input's label codes.
"""

from __future__ import annotations

import base64
import gzip
import io
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from serving_support import case_files, fx, leftover_request_dirs, service_of, zip_bytes

from polling import wait_until
from tumorseg.data.conventions import get_convention
from tumorseg.models.predictor import region_volumes_ml


def load_nifti(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def test_health_names_the_model_loaded_once_at_start_up(make_client, tiny_checkpoint: Path) -> None:
    client = make_client(model_uri=str(tiny_checkpoint))
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["model"]["name"] == "best.ckpt"
    assert body["model"]["alias"] is None
    assert body["model"]["description"] == f"checkpoint {tiny_checkpoint}"
    assert body["pending"] == 0
    # the same network object serves every request: loaded in the lifespan, not per request
    network = service_of(client).predictor.network
    client.get("/health")
    assert service_of(client).predictor.network is network


def test_an_unknown_model_stops_start_up_with_the_loaders_message(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient
    from serving_support import serve_params

    from tumorseg.errors import DataError
    from tumorseg.serving.app import ServeSettings, create_app

    settings = ServeSettings.from_params(serve_params(tmp_path), model_uri=str(tmp_path / "missing.ckpt"))
    with pytest.raises(DataError, match="missing.ckpt: no such checkpoint"), TestClient(create_app(settings)):
        pass


def test_predict_returns_the_segmentation_in_the_input_geometry_and_convention(
    make_client, tmp_path: Path
) -> None:
    case = fx.write_brats_case(tmp_path, "BraTS2021_00001", orientation="LPS", seed=2)
    client = make_client()
    response = client.post("/predict", files=case_files(case))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    assert 'filename="BraTS2021_00001.nii.gz"' in response.headers["content-disposition"]
    prediction = load_nifti(response.content)
    reference = nib.load(case / "BraTS2021_00001_seg.nii.gz")
    assert prediction.shape == reference.shape
    assert np.allclose(prediction.affine, reference.affine)
    labels = np.asarray(prediction.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 4}  # BraTS 2021 codes, not canonical 3
    truth = get_convention("brats2021").encode(np.asarray(reference.dataobj))
    predicted = get_convention("brats2021").encode(labels)
    wt = (predicted > 0), (truth > 0)
    assert 2 * np.count_nonzero(wt[0] & wt[1]) / (np.count_nonzero(wt[0]) + np.count_nonzero(wt[1])) > 0.85
    volumes = dict(item.split("=") for item in response.headers["x-tumorseg-volumes-ml"].split(","))
    expected = region_volumes_ml(predicted, prediction.affine)
    assert {k: float(v) for k, v in volumes.items()} == pytest.approx(expected, abs=1e-3)


def test_json_variant_gives_volumes_and_dice_when_the_mask_is_uploaded_too(
    make_client, tmp_path: Path
) -> None:
    case = fx.write_brats_case(tmp_path, "BraTS-GLI-00007-000", layout="brats2023", seed=4)
    client = make_client()
    body = client.post("/predict?format=json", files=case_files(case, seg=True)).json()
    assert body["case_id"] == "BraTS-GLI-00007-000"
    assert body["layout"] == body["label_convention"] == "brats2023"
    assert set(body["volumes_ml"]) == {"WT", "TC", "ET"}
    assert body["volumes_ml"]["WT"] > 0
    assert body["dice"]["WT"] > 0.85 and body["dice"]["ET"] > 0.5
    assert body["model"]["description"] == "oracle network (tests)"
    without_mask = client.post("/predict?format=json", files=case_files(case)).json()
    assert "dice" not in without_mask
    assert without_mask["volumes_ml"] == body["volumes_ml"]


def test_a_zip_of_the_case_folder_or_of_its_files_gives_the_same_segmentation(
    make_client, synth_case: Path
) -> None:
    client = make_client()
    loose = client.post("/predict", files=case_files(synth_case))
    assert loose.status_code == 200, loose.text
    members = {p.name: p.read_bytes() for p in synth_case.glob("*.nii.gz")}
    for archive in (
        zip_bytes({f"{synth_case.name}/{name}": data for name, data in members.items()}),
        zip_bytes({f"upload/{synth_case.name}/{name}": data for name, data in members.items()}),
        zip_bytes({**members, "__MACOSX/._x": b"junk"}),
    ):
        zipped = client.post("/predict", files=[("files", ("case.zip", archive, "application/zip"))])
        assert zipped.status_code == 200, zipped.text
        assert np.array_equal(load_nifti(zipped.content).get_fdata(), load_nifti(loose.content).get_fdata())
    assert leftover_request_dirs(client) == []


def test_one_4d_msd_image_is_predicted_in_msd_codes(make_client, tmp_path: Path) -> None:
    task = fx.write_msd_dataset(tmp_path / "Task01", ["BRATS_001"])
    client = make_client()
    image = task / "imagesTr" / "BRATS_001.nii.gz"
    response = client.post(
        "/predict?format=json",
        files=[
            ("files", (image.name, image.read_bytes(), "application/gzip")),
            ("files", ("dataset.json", (task / "dataset.json").read_bytes(), "application/json")),
        ],
    )
    assert response.status_code == 200, response.text
    assert response.json()["label_convention"] == "msd"
    assert response.json()["shape"] == list(nib.load(image).shape[:3])


# ---------------------------------------------------------------------------- junk input
def _nifti_bytes(data: np.ndarray, spacing: float = 2.0) -> bytes:
    image = nib.Nifti1Image(data, np.diag([spacing, spacing, spacing, 1.0]))
    return gzip.compress(image.to_bytes(), compresslevel=1)


def _case_members(case: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(case.glob("*.nii.gz")) if "_seg" not in p.name}


def _junk(case: Path, kind: str) -> list:
    members = _case_members(case)
    as_zip = lambda data: [("files", ("case.zip", data, "application/zip"))]  # noqa: E731
    if kind == "not_a_zip":
        return as_zip(b"PK\x03\x04 this is not really a zip archive")
    if kind == "zip_parent_path":
        return as_zip(zip_bytes({f"../{name}": data for name, data in members.items()}))
    if kind == "zip_absolute_path":
        return as_zip(zip_bytes({f"/tmp/{name}": data for name, data in members.items()}))
    if kind == "zip_backslash_parent":
        return as_zip(zip_bytes({f"..\\..\\{name}": data for name, data in members.items()}))
    if kind == "zip_symlink":
        return as_zip(zip_bytes({**members, "link.nii.gz": b"/etc/passwd"}, symlinks=("link.nii.gz",)))
    if kind == "zip_member_count":
        return as_zip(zip_bytes({**members, **{f"extra_{i}.nii": b"" for i in range(40)}}))
    if kind == "zip_bomb":  # 3 MB of zeros declared and inflated: over the 2 MB test cap
        return as_zip(zip_bytes({"BraTS2021_00001_t1.nii": bytes(3 << 20)}))
    if kind == "gzip_bomb":  # a small .nii.gz that inflates past the cap
        return [("files", ("BraTS2021_00001_t1.nii.gz", gzip.compress(bytes(3 << 20)), "application/gzip"))]
    if kind == "zip_with_other_files":
        return as_zip(zip_bytes({**members, "model.pkl": b"\x80\x04."}))
    if kind == "pickle":
        return [("files", ("weights.pt", b"\x80\x04K\x01.", "application/octet-stream"))]
    if kind == "odd_file_name":
        return [("files", ("case t1;rm.nii.gz", b"x", "application/gzip"))]
    if kind == "two_cases":
        return [
            (
                "files",
                ("BraTS2021_00001_t1.nii.gz", members["BraTS2021_00001_t1.nii.gz"], "application/gzip"),
            ),
            (
                "files",
                ("BraTS2021_00002_t2.nii.gz", members["BraTS2021_00001_t2.nii.gz"], "application/gzip"),
            ),
        ]
    if kind == "unnamed_layout":
        return [
            ("files", (f"scan_{i}.nii.gz", data, "application/gzip"))
            for i, data in enumerate(members.values())
        ]
    if kind == "corrupt_gzip":
        return [("files", ("BraTS2021_00001_t1.nii.gz", b"\x1f\x8b\x08\x00garbage", "application/gzip"))]
    if kind == "missing_modality":
        return [
            ("files", (n, d, "application/gzip")) for n, d in members.items() if not n.endswith("_t2.nii.gz")
        ]
    if kind == "not_nifti":
        return [
            ("files", (n, b"hello" * 100 if n.endswith("_t1.nii.gz") else d, "application/gzip"))
            for n, d in members.items()
        ]
    if kind == "truncated":
        return [
            ("files", (n, gzip.compress(gzip.decompress(d)[:1000]) if n.endswith("_t1.nii.gz") else d, "x"))
            for n, d in members.items()
        ]
    if kind == "wrong_dimensionality":
        flat = _nifti_bytes(np.zeros((24, 28), dtype=np.int16))
        return [("files", (n, flat if n.endswith("_flair.nii.gz") else d, "x")) for n, d in members.items()]
    if kind == "single_slice":
        thin = _nifti_bytes(np.ones((24, 28, 1, 1, 2), dtype=np.int16)[..., 0, 0:1, 0])
        return [("files", (n, thin, "x")) for n in members]
    if kind == "nan_image":
        nan = _nifti_bytes(np.full((24, 28, 20), np.nan, dtype=np.float32))
        return [("files", (n, nan, "x")) for n in members]
    if kind == "empty_files":
        return [("files", (n, b"", "x")) for n in members]
    if kind == "absurd_voxel_size":
        big = _nifti_bytes(np.ones((8, 8, 8), dtype=np.int16), spacing=500.0)
        return [("files", (n, big, "x")) for n in members]
    raise AssertionError(kind)


JUNK = {
    "not_a_zip": 400,
    "zip_parent_path": 400,
    "zip_absolute_path": 400,
    "zip_backslash_parent": 400,
    "zip_symlink": 400,
    "zip_member_count": 413,
    "zip_bomb": 413,
    "gzip_bomb": 413,
    "zip_with_other_files": 400,
    "pickle": 400,
    "odd_file_name": 400,
    "two_cases": 400,
    "unnamed_layout": 400,
    "corrupt_gzip": 400,
    "missing_modality": 422,
    "not_nifti": 422,
    "truncated": 422,
    "wrong_dimensionality": 422,
    "single_slice": 422,
    "absurd_voxel_size": 422,
    "nan_image": 422,
    "empty_files": 422,
}


@pytest.fixture(scope="module")
def junk_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.write_brats_case(tmp_path_factory.mktemp("junk"), "BraTS2021_00001", seed=1)


@pytest.mark.parametrize(("kind", "status"), sorted(JUNK.items()))
def test_junk_input_gets_a_one_line_json_4xx_and_leaves_nothing_behind(
    make_client, junk_case: Path, kind: str, status: int
) -> None:
    client = make_client(max_uncompressed_mb=2.0, max_upload_mb=2.0, max_members=16)
    response = client.post("/predict?format=json", files=_junk(junk_case, kind))
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    message = body["error"]
    assert "\n" not in message and "Traceback" not in message
    assert str(service_of(client).root) not in message  # no server paths
    assert leftover_request_dirs(client) == []


@pytest.mark.parametrize(
    ("kwargs", "status", "pattern"),
    [
        ({}, 422, "files: Field required"),
        ({"data": {"other": "1"}}, 422, "files: Field required"),
        ({"content": b"not a form", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 4, None),
        ({"json": {"files": "x"}}, 422, "files"),
    ],
)
def test_an_empty_or_malformed_form_is_a_4xx_json_error(
    make_client, kwargs: dict, status: int, pattern: str
) -> None:
    client = make_client()
    response = client.post("/predict", **kwargs)
    if status == 4:
        assert 400 <= response.status_code < 500, response.text
    else:
        assert response.status_code == status, response.text
    assert list(response.json()) == ["error"]
    if pattern:
        assert pattern in response.json()["error"]


def test_an_oversized_upload_is_refused_before_it_is_read(make_client, junk_case: Path) -> None:
    client = make_client(max_upload_mb=0.05, max_uncompressed_mb=1.0)
    files = [("files", ("BraTS2021_00001_t1.nii", bytes(200_000), "application/octet-stream"))]
    response = client.post("/predict", files=files)
    assert response.status_code == 413
    assert "serve.max_upload_mb" in response.json()["error"]

    # without Content-Length (chunked): the streamed bytes are counted
    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.nii"\r\n\r\n'
        for _ in range(20):
            yield bytes(10_000)
        yield b"\r\n--b--\r\n"

    streamed = client.post(
        "/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert streamed.status_code == 413, streamed.text
    assert leftover_request_dirs(client) == []


def test_bad_query_values_are_4xx_json(make_client) -> None:
    client = make_client()
    response = client.post("/predict?format=pdf", files=[("files", ("a.nii", b"x", "x"))])
    assert response.status_code == 422
    assert response.json()["error"].startswith("format:")
    assert client.get("/cases/nope/slice?index=0").status_code == 404
    assert client.post("/demo/nope").status_code == 404
    assert client.get("/nowhere").json() == {"error": "Not Found"}


# ---------------------------------------------------------------------------- viewer endpoints
def test_viewer_flow_slices_download_and_ground_truth_dice(make_client, tmp_path: Path) -> None:
    case = fx.write_brats_case(tmp_path, "BraTS2021_00003", orientation="PIL", seed=5)
    client = make_client(max_results=2)
    summary = client.post("/predict?format=viewer", files=case_files(case)).json()
    result_id = summary["result_id"]
    assert summary["dice"] is None
    shape = nib.load(case / "BraTS2021_00003_t1.nii.gz").shape
    assert sorted(summary["slices"].values()) == sorted(shape)  # RAS display grid: same voxels, permuted

    focus = summary["focus"]["axial"]
    piece = client.get(
        f"/cases/{result_id}/slice", params={"plane": "axial", "index": focus, "modality": "t1ce"}
    )
    assert piece.status_code == 200
    body = piece.json()
    labels = np.frombuffer(base64.b64decode(body["labels"]), dtype=np.uint8)
    image = np.frombuffer(base64.b64decode(body["image"]), dtype=np.uint8)
    assert labels.size == image.size == body["width"] * body["height"]
    assert np.count_nonzero(labels) > 0 and image.max() > 100
    assert "reference" not in body

    download = client.get(f"/cases/{result_id}/segmentation")
    direct = client.post("/predict", files=case_files(case))
    assert gzip.decompress(download.content) == gzip.decompress(direct.content)  # gzip headers carry a time

    seg = case / "BraTS2021_00003_seg.nii.gz"
    scored = client.post(
        f"/cases/{result_id}/ground-truth", files={"file": (seg.name, seg.read_bytes(), "application/gzip")}
    )
    assert scored.status_code == 200, scored.text
    assert scored.json()["dice"]["WT"] > 0.85
    assert client.get(f"/cases/{result_id}").json()["dice"] == scored.json()["dice"]
    with_reference = client.get(f"/cases/{result_id}/slice", params={"plane": "coronal", "index": 3}).json()
    assert "reference" in with_reference

    wrong = fx.write_brats_case(tmp_path / "other", "BraTS2021_00009", shape=(20, 20, 20), seed=1)
    mismatch = client.post(
        f"/cases/{result_id}/ground-truth",
        files={"file": ("m.nii.gz", (wrong / "BraTS2021_00009_seg.nii.gz").read_bytes(), "application/gzip")},
    )
    assert mismatch.status_code == 422 and "differs from the image shape" in mismatch.json()["error"]
    out_of_range = client.get(f"/cases/{result_id}/slice", params={"plane": "axial", "index": 999})
    assert out_of_range.status_code == 400

    # the store is bounded: two more predictions push the first out
    for _ in range(2):
        client.post("/predict?format=viewer", files=case_files(case))
    assert client.get(f"/cases/{result_id}").status_code == 404
    assert len(service_of(client).store) == 2
    assert leftover_request_dirs(client) == []


def test_kept_predictions_expire(make_client, tmp_path: Path) -> None:
    case = fx.write_brats_case(tmp_path, "BraTS2021_00004", seed=6)
    client = make_client(result_ttl_s=2.0)
    result_id = client.post("/predict?format=viewer", files=case_files(case)).json()["result_id"]
    assert client.get(f"/cases/{result_id}").status_code == 200
    store = service_of(client).store
    # len() drops expired results without touching the others (a GET would keep the result alive)
    wait_until(lambda: len(store) == 0, "the kept result expired (serve.result_ttl_s = 2 s)")
    assert client.get(f"/cases/{result_id}").status_code == 404


def test_demo_cases_are_generated_at_start_up_and_scored_against_their_masks(make_client) -> None:
    client = make_client(demo_cases=1, demo_spacing_mm=4.0)
    wait_until(
        lambda: client.get("/demo").json()["ready"], "the demo cases are ready", timeout_s=60, every_s=0.2
    )
    listing = client.get("/demo").json()
    assert listing["cases"] == ["BraTS2021_00001"] and listing["error"] is None
    summary = client.post("/demo/BraTS2021_00001").json()
    assert set(summary["dice"]) == {"WT", "TC", "ET"}
    assert summary["slices"] == {"sagittal": 60, "coronal": 60, "axial": 39}


def test_page_docs_and_static_files_are_served_without_external_resources(make_client) -> None:
    client = make_client()
    page = client.get("/")
    assert page.status_code == 200 and "viewer.js" in page.text
    for name in ("viewer.js", "viewer.css"):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200
        assert not re.search(r"https?://", asset.text), name
    assert not re.search(r"(src|href)=\"https?://", page.text)
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/health", "/cases/{result_id}/slice"} <= set(paths)


def test_display_grid_is_the_ras_reorientation_of_the_source() -> None:
    from tumorseg.serving.viewer import to_ras

    rng = np.random.default_rng(0)
    volume = rng.integers(0, 5, size=(6, 7, 8)).astype(np.uint8)
    affine = np.array(
        [[0, 0, -3.0, 0], [-1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]]
    )  # axes: S? no: P, S, L
    ras, spacing = to_ras(volume, affine)
    expected = nib.as_closest_canonical(nib.Nifti1Image(volume, affine))
    assert np.array_equal(ras, np.asarray(expected.dataobj))
    assert spacing == pytest.approx(expected.header.get_zooms()[:3])
    stacked, _ = to_ras(np.stack([volume, volume]), affine)
    assert stacked.shape == (2, *ras.shape) and np.array_equal(stacked[1], ras)


def test_describe_model_reads_name_and_alias_from_a_registry_uri() -> None:
    from serving_support import oracle_model

    from tumorseg.serving.app import describe_model

    loaded = oracle_model()
    loaded.uri = "models:/tumorseg@champion"
    loaded.version = "3"
    info = describe_model(loaded)
    assert (info["name"], info["version"], info["alias"]) == ("tumorseg", "3", "champion")
    loaded.uri = "models:/tumorseg/3"
    assert describe_model(loaded)["alias"] is None


def test_uploads_are_staged_privately(make_client) -> None:
    client = make_client()
    root = service_of(client).root
    assert (root.stat().st_mode & 0o777) == 0o700
    request_dir = service_of(client).request_dir()
    assert (request_dir.stat().st_mode & 0o777) == 0o700
    request_dir.rmdir()


def test_a_service_that_fails_to_start_leaves_no_temp_folder(
    make_client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from tumorseg.serving import shadow

    def broken(*args: object) -> None:
        raise RuntimeError("shadow model: cannot start")

    monkeypatch.setattr(shadow, "ShadowRunner", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.raises(RuntimeError, match="shadow model"):
        make_client(shadow="models:/tumorseg@challenger")
    assert list((tmp_path / "tmp").iterdir()) == []


def test_stage_upload_unit(tmp_path: Path) -> None:
    from tumorseg.serving.uploads import UploadLimits, UploadRejected, member_parts, stage_upload

    assert member_parts("a/./b/c.nii.gz", "z.zip") == ("a", "b", "c.nii.gz")
    for bad in ("../x.nii", "a/../../x.nii", "/etc/passwd", "C:/x.nii", "a\\..\\x.nii", "a/b c.nii"):
        with pytest.raises(UploadRejected):
            member_parts(bad, "z.zip")
    case = fx.write_brats_case(tmp_path / "src", "BraTS2021_00001", seed=0)
    limits = UploadLimits(max_files=6, max_members=8, max_uncompressed_bytes=10 << 20)
    streams = [(f"../../{p.name}", io.BytesIO(p.read_bytes())) for p in sorted(case.glob("*.nii.gz"))]
    (tmp_path / "work").mkdir()
    folder = stage_upload(streams, tmp_path / "work", limits)
    stored = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.nii"))
    assert stored == [
        f"BraTS2021_00001/BraTS2021_00001_{m}.nii" for m in ("flair", "seg", "t1", "t1ce", "t2")
    ]
    # stored inflated: the bytes are the NIfTI itself
    original = gzip.decompress((case / "BraTS2021_00001_t1.nii.gz").read_bytes())
    assert (folder / "BraTS2021_00001" / "BraTS2021_00001_t1.nii").read_bytes() == original
