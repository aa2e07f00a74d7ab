"""``POST /predict`` with one 2-D image: mask PNG, detection JSON, the viewer, the optional 2-D model, junk.

Images are tests/planar_fixtures.py's ``head_image`` (a head with one bright tumour disc),
written as PNG/JPEG/TIFF/BMP and as Figshare MATLAB v7.3 and v5 slices
(:func:`tumorseg.data.planar_synth.write_figshare_mat`). The served model is the untrained
``PlanarOracle`` of serving_support.py, or a tiny random 2-D package loaded at start-up.
"""

from __future__ import annotations

import base64
import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving_support import (
    leftover_request_dirs,
    planar_fx,
    planar_oracle_slot,
    planar_png,
    service_of,
    write_tiny_planar_package,
)

from tumorseg.data.planar_synth import write_figshare_mat

SHAPE = (203, 157)


@pytest.fixture(scope="module")
def head() -> tuple[np.ndarray, np.ndarray]:
    """A float32 ``(203, 157)`` head image with a glioma-placed disc, and its 0/1 mask."""
    return planar_fx.head_image(np.random.default_rng(1), SHAPE, "glioma")


@pytest.fixture(scope="module")
def figshare_mat(head, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The head as a Figshare MATLAB v7.3 slice (int16 image, tumorMask, label 2, PID)."""
    image, mask = head
    path = tmp_path_factory.mktemp("mat") / "7.mat"
    write_figshare_mat(path, np.rint(image * 1000).astype(np.int16), mask, 2.0, "100037")
    return path.read_bytes()


def _png_mask(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# ---------------------------------------------------------------------------- outputs
def test_png_is_the_default_a_0_255_mask_at_the_image_size(make_client, head) -> None:
    image, mask = head
    client = make_client(planar=planar_oracle_slot())
    response = client.post("/predict", files=[("files", ("scan.png", planar_png(image), "image/png"))])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert 'filename="scan_mask.png"' in response.headers["content-disposition"]
    predicted = _png_mask(response.content)
    assert predicted.shape == SHAPE and set(np.unique(predicted)) <= {0, 255}
    assert _dice(predicted, mask) > 0.8
    assert response.headers["x-tumorseg-label"] == "yes"
    assert int(response.headers["x-tumorseg-area-px"]) == np.count_nonzero(predicted)
    assert leftover_request_dirs(client) == []


@pytest.mark.parametrize(("suffix", "pil_format"), [(".jpg", "JPEG"), (".tif", "TIFF"), (".bmp", "BMP")])
def test_other_image_formats_and_rgb_give_a_mask_of_their_size(
    make_client, head, suffix: str, pil_format: str
) -> None:
    image, _ = head
    rgb = Image.open(io.BytesIO(planar_png(image))).convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format=pil_format)
    client = make_client(planar=planar_oracle_slot())
    response = client.post("/predict", files=[("files", (f"scan{suffix}", buffer.getvalue(), "image/x"))])
    assert response.status_code == 200, response.text
    assert _png_mask(response.content).shape == SHAPE


def test_json_reports_probability_label_type_area_and_dice_of_a_figshare_mat(
    make_client, head, figshare_mat: bytes
) -> None:
    _, mask = head
    client = make_client(planar=planar_oracle_slot())
    files = [("files", ("7.mat", figshare_mat, "application/octet-stream"))]
    body = client.post("/predict?format=json&pixel_size_mm=0.5", files=files).json()
    assert body["kind"] == "2d" and body["case_id"] == "figshare-7" and body["file_format"] == "mat-v7.3"
    assert body["shape"] == list(SHAPE)
    assert body["label"] == "yes" and body["probability"] >= body["detector"]["threshold"]
    assert body["tumour_type"] == "glioma"
    assert sum(body["type_probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    png = _png_mask(client.post("/predict?format=png", files=files).content)
    assert body["tumour_area_px"] == np.count_nonzero(png)
    assert body["tumour_area_mm2"] == pytest.approx(body["tumour_area_px"] * 0.25)
    assert (
        body["dice"]["tumour"] == pytest.approx(_dice(png, mask), abs=1e-4) and body["dice"]["tumour"] > 0.8
    )
    assert body["model"]["available"] and body["model"]["uri"] == "oracle-2d"

    without_size = client.post("/predict?format=json", files=files).json()
    assert without_size["pixel_size_mm"] is None and without_size["tumour_area_mm2"] is None


def test_a_tumour_free_image_is_no_with_an_empty_mask(make_client) -> None:
    image, _ = planar_fx.head_image(np.random.default_rng(2), SHAPE, None)
    client = make_client(planar=planar_oracle_slot())
    files = [("files", ("free.png", planar_png(image), "image/png"))]
    body = client.post("/predict?format=json", files=files).json()
    assert body["label"] == "no" and body["tumour_type"] is None and body["tumour_area_px"] == 0
    assert not _png_mask(client.post("/predict", files=files).content).any()


def test_matlab_v5_slices_are_read_too(make_client, head, tmp_path: Path) -> None:
    image, mask = head
    path = write_figshare_mat(
        tmp_path / "8.mat", np.rint(image * 1000).astype(np.int16), mask, 1.0, "P8", version="5"
    )
    client = make_client(planar=planar_oracle_slot())
    body = client.post("/predict?format=json", files=[("files", ("8.mat", path.read_bytes(), "x"))]).json()
    assert body["file_format"] == "mat-v5" and body["dice"]["tumour"] > 0.8


# ---------------------------------------------------------------------------- viewer
def test_viewer_keeps_one_slice_with_mask_reference_and_png_download(make_client, head, figshare_mat) -> None:
    _, mask = head
    client = make_client(planar=planar_oracle_slot())
    summary = client.post("/predict?format=viewer", files=[("files", ("7.mat", figshare_mat, "x"))]).json()
    result_id = summary["result_id"]
    assert summary["kind"] == "2d" and summary["slices"] == {"axial": 1} and summary["focus"] == {"axial": 0}
    assert summary["file_name"] == "figshare-7_mask.png"
    assert client.get(f"/cases/{result_id}").json()["label"] == "yes"

    payload = client.get(f"/cases/{result_id}/slice?index=0").json()
    assert (payload["height"], payload["width"]) == SHAPE
    labels = np.frombuffer(base64.b64decode(payload["labels"]), np.uint8).reshape(SHAPE)
    reference = np.frombuffer(base64.b64decode(payload["reference"]), np.uint8).reshape(SHAPE)
    assert np.array_equal(reference, mask) and _dice(labels, mask) > 0.8
    assert len(base64.b64decode(payload["image"])) == SHAPE[0] * SHAPE[1]

    download = client.get(summary["segmentation_url"])
    assert download.headers["content-type"] == "image/png"
    assert np.array_equal(_png_mask(download.content) > 0, labels > 0)

    assert client.get(f"/cases/{result_id}/slice?index=1").status_code == 400
    assert client.get(f"/cases/{result_id}/slice?index=0&plane=coronal").status_code == 400
    scored = client.post(f"/cases/{result_id}/ground-truth", files={"file": ("m.nii.gz", b"x")})
    assert scored.status_code == 400 and ".mat" in scored.json()["error"]


# ---------------------------------------------------------------------------- the optional 2-D model
def test_without_a_2d_model_the_service_runs_for_3d_and_answers_2d_with_503(
    make_client, head, synth_case: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from serving_support import case_files

    with caplog.at_level(logging.WARNING, logger="tumorseg.serving.app"):
        client = make_client()  # serve.model_2d = models:/tumorseg-2d@champion in an empty store
    warnings = [r for r in caplog.records if r.name == "tumorseg.serving.app" and "2-D" in r.getMessage()]
    assert len(warnings) == 1 and "no 2-D model" in warnings[0].getMessage()
    health = client.get("/health").json()
    assert health["model"]["name"] == "oracle"
    assert health["model_2d"]["available"] is False
    assert "models:/tumorseg-2d@champion" in health["model_2d"]["uri"] and health["model_2d"]["error"]

    image, _ = head
    response = client.post("/predict", files=[("files", ("scan.png", planar_png(image), "image/png"))])
    assert response.status_code == 503
    message = response.json()["error"]
    assert "no 2-D model" in message and "--model-2d" in message and "serve.model_2d" in message
    assert leftover_request_dirs(client) == []
    assert client.post("/predict?format=json", files=case_files(synth_case)).status_code == 200


def test_a_2d_package_named_in_params_loads_at_start_up(make_client, head, tmp_path: Path) -> None:
    package = write_tiny_planar_package(tmp_path / "planar")
    client = make_client(model_2d=str(package))
    info = client.get("/health").json()["model_2d"]
    assert info["available"] and info["uri"] == str(package) and info["name"] == "package"
    assert info["detector"] == {"method": "classifier", "threshold": 0.5}
    image, _ = head
    response = client.post("/predict", files=[("files", ("scan.png", planar_png(image), "image/png"))])
    assert response.status_code == 200 and _png_mask(response.content).shape == SHAPE


# ---------------------------------------------------------------------------- junk
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _huge_png() -> bytes:
    """A 300-byte PNG declaring 100000 x 100000 pixels (a decompression bomb's header)."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(bytes(1000)))
        + _png_chunk(b"IEND", b"")
    )


def _h5_mat(tmp: Path, build) -> bytes:
    """A MATLAB v7.3-style HDF5 file (512-byte user block) with ``build(file)`` as content."""
    import h5py

    path = tmp / "built.mat"
    with h5py.File(path, "w", userblock_size=512) as fh:
        build(fh)
    return path.read_bytes()


def _v5_mat(content: dict) -> bytes:
    import scipy.io

    buffer = io.BytesIO()
    scipy.io.savemat(buffer, content, format="5", do_compression=True)
    return buffer.getvalue()


def _junk(kind: str, tmp: Path, head: tuple[np.ndarray, np.ndarray]) -> list[tuple[str, tuple]]:
    png = planar_png(head[0])
    one = {
        "truncated_png": ("scan.png", png[: len(png) // 2]),
        "text_as_png": ("scan.png", b"this is not an image\n" * 10),
        "huge_png": ("bomb.png", _huge_png()),
        "corrupt_mat": ("1.mat", np.random.default_rng(0).bytes(4096)),
        "mat_v5_without_cjdata": ("2.mat", _v5_mat({"other": np.ones(3)})),
        "mat_v73_without_cjdata": ("3.mat", _h5_mat(tmp, lambda fh: fh.create_group("other"))),
        "mat_v5_inflation_bomb": ("4.mat", _v5_mat({"cjdata": {"image": np.zeros((1500, 1500))}})),
        "mat_v73_huge_image": (
            "5.mat",
            _h5_mat(
                tmp,
                lambda fh: fh.create_group("cjdata").create_dataset(
                    "image", shape=(60_000, 60_000), dtype="int16", chunks=(256, 256), compression="gzip"
                ),
            ),
        ),
        "mat_v73_external_link": (
            "6.mat",
            _h5_mat(tmp, lambda fh: fh.create_group("cjdata").__setitem__("image", _external_link())),
        ),
        "mat_v73_external_storage": (
            "7.mat",
            _h5_mat(
                tmp,
                lambda fh: fh.create_group("cjdata").create_dataset(
                    "image", shape=(4, 4), dtype="uint8", external=[("/etc/hostname", 0, 16)]
                ),
            ),
        ),
        "numpy_file": ("scan.npy", b"\x93NUMPY" + bytes(100)),
        "pickle_file": ("scan.pkl", b"\x80\x04K\x01."),
    }
    if kind in one:
        name, data = one[kind]
        return [("files", (name, data, "application/octet-stream"))]
    if kind == "two_images":
        return [("files", ("a.png", png, "image/png")), ("files", ("b.png", png, "image/png"))]
    if kind == "image_and_nifti":
        return [("files", ("a.png", png, "image/png")), ("files", ("a_t1.nii", b"x", "x"))]
    raise AssertionError(kind)


def _external_link():
    import h5py

    return h5py.ExternalLink("/etc/other.h5", "/image")


JUNK_2D = {
    "truncated_png": 422,
    "text_as_png": 422,
    "huge_png": 413,
    "corrupt_mat": 422,
    "mat_v5_without_cjdata": 422,
    "mat_v73_without_cjdata": 422,
    "mat_v5_inflation_bomb": 413,
    "mat_v73_huge_image": 413,
    "mat_v73_external_link": 400,
    "mat_v73_external_storage": 400,
    "numpy_file": 400,
    "pickle_file": 400,
    "two_images": 400,
    "image_and_nifti": 400,
}


@pytest.mark.parametrize(("kind", "status"), sorted(JUNK_2D.items()))
def test_2d_junk_gets_a_one_line_json_4xx_and_leaves_nothing_behind(
    make_client, head, tmp_path: Path, kind: str, status: int
) -> None:
    client = make_client(planar=planar_oracle_slot(), max_uncompressed_mb=2.0, max_upload_mb=2.0)
    response = client.post("/predict?format=json", files=_junk(kind, tmp_path, head))
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    message = body["error"]
    assert "\n" not in message and "Traceback" not in message
    assert str(service_of(client).root) not in message and "upload/" not in message  # no server paths
    assert leftover_request_dirs(client) == []


def test_pixel_cap_and_format_mismatches_are_4xx(make_client, head, figshare_mat: bytes) -> None:
    client = make_client(planar=planar_oracle_slot(), max_image_pixels=10_000)
    png = planar_png(head[0])
    for name, data in (("scan.png", png), ("7.mat", figshare_mat)):
        response = client.post("/predict", files=[("files", (name, data, "x"))])
        assert response.status_code == 413 and "serve.max_image_pixels" in response.json()["error"], name
    wrong = client.post("/predict?format=nifti", files=[("files", ("scan.png", png, "image/png"))])
    assert wrong.status_code == 400 and "2-D image" in wrong.json()["error"]
    wrong = client.post("/predict?format=png", files=[("files", ("BraTS2021_00001_t1.nii", b"x", "x"))])
    assert wrong.status_code == 400 and "png is the mask of a 2-D image" in wrong.json()["error"]
    size = client.post("/predict?pixel_size_mm=0", files=[("files", ("scan.png", png, "image/png"))])
    assert size.status_code == 422 and size.json()["error"].startswith("pixel_size_mm")
    assert leftover_request_dirs(client) == []
