"""``POST /predict`` with one 2-D image: mask PNG, detection JSON, the viewer, the optional 2-D model, junk;
a 2-D ground truth uploaded to a kept prediction, and the 2-D demo images.

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
    case_files,
    leftover_request_dirs,
    planar_fx,
    planar_oracle_slot,
    planar_png,
    service_of,
    write_tiny_planar_package,
)

from polling import wait_until
from tumorseg.data.planar_synth import write_figshare_mat
from tumorseg.evaluation.metrics import overlap_scores, segmentation_scores

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


def _image_bytes(pixels: np.ndarray, pil_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=pil_format)
    return buffer.getvalue()


def _layer(payload: dict, name: str) -> np.ndarray:
    """One uint8 layer of a slice payload as ``(height, width)``."""
    return np.frombuffer(base64.b64decode(payload[name]), np.uint8).reshape(
        payload["height"], payload["width"]
    )


def _assert_evaluation_scores(body: dict, predicted: np.ndarray, truth: np.ndarray) -> None:
    """``body``'s Dice, IoU and HD95 are what the 2-D evaluation computes on the same two masks."""
    dice, hd95 = segmentation_scores(predicted > 0, truth > 0)
    iou = overlap_scores(predicted > 0, truth > 0)["iou"]
    assert body["dice"] == {"tumour": pytest.approx(dice, abs=1e-4)}
    assert body["iou"] == {"tumour": pytest.approx(iou, abs=1e-4)}
    assert body["hd95_px"] == pytest.approx(hd95, abs=1e-3)


def _assert_one_line(response, status: int, client) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    message = body["error"]
    assert "\n" not in message and str(service_of(client).root) not in message and "req-" not in message
    return message


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


# ---------------------------------------------------------------------------- 2-D ground truth
def test_a_2d_ground_truth_mask_gives_the_dice_the_2d_evaluation_computes(
    make_client, head, figshare_mat: bytes
) -> None:
    image, mask = head
    client = make_client(planar=planar_oracle_slot())
    summary = client.post(
        "/predict?format=viewer", files=[("files", ("scan.png", planar_png(image), "image/png"))]
    ).json()
    result_id = summary["result_id"]
    assert summary["kind"] == "2d" and "dice" not in summary  # a PNG holds no mask
    assert "reference" not in client.get(f"/cases/{result_id}/slice?index=0").json()
    predicted = _png_mask(client.get(summary["segmentation_url"]).content)
    url = f"/cases/{result_id}/ground-truth"

    scored = client.post(url, files={"file": ("truth.png", _image_bytes(mask * 255), "image/png")})
    assert scored.status_code == 200, scored.text
    body = scored.json()
    assert body["result_id"] == result_id
    _assert_evaluation_scores(body, predicted, mask)
    assert 0.8 < body["dice"]["tumour"] < 1.0 and body["iou"]["tumour"] < body["dice"]["tumour"]
    kept = client.get(f"/cases/{result_id}").json()
    assert (kept["dice"], kept["iou"], kept["hd95_px"]) == (body["dice"], body["iou"], body["hd95_px"])
    payload = client.get(f"/cases/{result_id}/slice?index=0").json()
    assert np.array_equal(_layer(payload, "reference"), mask)  # the outline the page draws

    # another ground truth replaces it: a mask shifted by 10 pixels scores lower, as the metrics say
    shifted = np.roll(mask, 10, axis=1)
    moved = client.post(url, files={"file": ("moved.png", _image_bytes(shifted * 255), "image/png")}).json()
    _assert_evaluation_scores(moved, predicted, shifted)
    assert moved["dice"]["tumour"] < body["dice"]["tumour"] - 0.1
    assert np.array_equal(
        _layer(client.get(f"/cases/{result_id}/slice?index=0").json(), "reference"), shifted
    )

    # 0/1 8-bit, RGB, BMP and 16-bit masks and the Figshare .mat of the same image are the same truth
    rgb = np.stack([mask * 255, np.zeros_like(mask), np.zeros_like(mask)], axis=-1)
    variants = {
        "ones.png": _image_bytes(mask),
        "red.png": _image_bytes(rgb),
        "truth.bmp": _image_bytes(mask * 255, "BMP"),
        "wide.tif": _image_bytes(mask.astype(np.uint16) * 1000, "TIFF"),
    }
    for name, data in variants.items():
        again = client.post(url, files={"file": (name, data, "application/octet-stream")})
        assert again.status_code == 200 and again.json()["dice"] == body["dice"], (name, again.text)
    from_mat = client.post(url, files={"file": ("7.mat", figshare_mat, "application/octet-stream")})
    assert from_mat.status_code == 200 and from_mat.json()["dice"] == body["dice"], from_mat.text
    assert leftover_request_dirs(client) == []


def test_a_tumour_free_2d_prediction_against_an_empty_mask_is_dice_one(make_client) -> None:
    image, mask = planar_fx.head_image(np.random.default_rng(2), SHAPE, None)
    client = make_client(planar=planar_oracle_slot())
    result_id = client.post(
        "/predict?format=viewer", files=[("files", ("free.png", planar_png(image), "image/png"))]
    ).json()["result_id"]
    empty = client.post(f"/cases/{result_id}/ground-truth", files={"file": ("none.png", _image_bytes(mask))})
    assert empty.status_code == 200 and empty.json()["dice"] == {"tumour": 1.0}  # both empty, as evaluated
    assert empty.json()["hd95_px"] == 0.0
    missed = np.zeros_like(mask)
    missed[50:60, 50:60] = 255
    one_sided = client.post(
        f"/cases/{result_id}/ground-truth", files={"file": ("m.png", _image_bytes(missed))}
    )
    assert one_sided.json()["dice"] == {"tumour": 0.0}
    assert one_sided.json()["hd95_px"] == pytest.approx(np.hypot(*SHAPE), abs=1e-3)  # the image diagonal


def test_a_2d_ground_truth_of_the_wrong_size_or_kind_is_refused_with_one_line(
    make_client, head, tmp_path: Path, synth_case: Path
) -> None:
    image, mask = head
    client = make_client(planar=planar_oracle_slot(), max_image_pixels=100_000)
    result_id = client.post(
        "/predict?format=viewer", files=[("files", ("scan.png", planar_png(image), "image/png"))]
    ).json()["result_id"]
    url = f"/cases/{result_id}/ground-truth"

    def send(name: str, data: bytes):
        return client.post(url, files={"file": (name, data, "application/octet-stream")})

    wrong_size = _assert_one_line(send("small.png", _image_bytes(mask[:100] * 255)), 422, client)
    assert (
        wrong_size.startswith("small.png:") and "100x157 differs from the image shape 203x157" in wrong_size
    )
    transposed = _assert_one_line(
        send("t.png", _image_bytes(np.ascontiguousarray(mask.T) * 255)), 422, client
    )
    assert "157x203" in transposed
    nifti = _assert_one_line(send("mask.nii.gz", b"\x1f\x8b" + bytes(100)), 400, client)
    assert nifti.startswith("mask.nii.gz:") and "2-D image" in nifti and ".png" in nifti and ".mat" in nifti
    assert ".png" in _assert_one_line(send("mask.npy", b"\x93NUMPY" + bytes(64)), 400, client)
    png = _image_bytes(mask * 255)
    assert "truncated.png" in _assert_one_line(send("truncated.png", png[: len(png) // 2]), 422, client)
    no_mask = write_figshare_mat(tmp_path / "9.mat", np.rint(image * 1000).astype(np.int16), None, 2.0, "P9")
    assert "no tumorMask" in _assert_one_line(send("9.mat", no_mask.read_bytes()), 422, client)
    assert "serve.max_image_pixels" in _assert_one_line(send("huge.png", _huge_png()), 413, client)
    assert client.get(f"/cases/{result_id}").json().get("dice") is None  # nothing kept from a refusal
    gone = client.post("/cases/gone/ground-truth", files={"file": ("m.png", png)})
    assert "predict it again" in _assert_one_line(gone, 404, client)

    # and a 2-D mask for a 3-D case
    volume_id = client.post("/predict?format=viewer", files=case_files(synth_case)).json()["result_id"]
    refused = client.post(f"/cases/{volume_id}/ground-truth", files={"file": ("m.png", png, "image/png")})
    assert "3-D case" in _assert_one_line(refused, 400, client)
    assert leftover_request_dirs(client) == []


# ---------------------------------------------------------------------------- 2-D demo images
def test_2d_demo_images_are_listed_and_predicted_with_their_ground_truth(make_client) -> None:
    from tumorseg.config import SynthPlanarConfig
    from tumorseg.data.planar_synth import figshare_patient_slices

    client = make_client(planar=planar_oracle_slot(), demo_cases=1, demo_spacing_mm=4.0)
    wait_until(
        lambda: client.get("/demo").json()["ready_2d"],
        "the 2-D demo images are ready",
        timeout_s=120,
        every_s=0.2,
    )
    listing = client.get("/demo").json()
    assert listing["cases_2d"] == ["figshare-1", "image-2"] and listing["error_2d"] is None
    assert {"ready", "cases", "error"} <= set(listing)

    # a PNG demo image: its mask is kept by the service, so the prediction comes scored
    summary = client.post("/demo/image-2").json()
    assert summary["kind"] == "2d" and summary["case_id"] == "image-2" and summary["file_format"] == "png"
    predicted = _png_mask(client.get(summary["segmentation_url"]).content)
    (generated,) = figshare_patient_slices(2, SynthPlanarConfig(seed=7, spacing_mm=4.0, slices_per_patient=1))
    truth = generated["mask"]
    assert predicted.shape == truth.shape == (512, 512)
    _assert_evaluation_scores(summary, predicted, truth)
    payload = client.get(f"/cases/{summary['result_id']}/slice?index=0").json()
    assert np.array_equal(_layer(payload, "reference"), truth)

    # a Figshare demo slice: scored against the tumorMask it holds
    body = client.post("/demo/figshare-1?format=json").json()
    assert body["case_id"] == "figshare-1" and body["file_format"] == "mat-v7.3" and "dice" in body
    nifti = client.post("/demo/figshare-1?format=nifti")
    assert nifti.status_code == 400 and "2-D image" in nifti.json()["error"]
    missing = client.post("/demo/image-9")
    assert missing.status_code == 404 and "image-2" in missing.json()["error"]
    assert leftover_request_dirs(client) == []


def test_2d_demo_images_without_a_2d_model_are_503(make_client) -> None:
    client = make_client(demo_cases=1, demo_spacing_mm=4.0)  # no 2-D model in the test's empty store
    wait_until(
        lambda: client.get("/demo").json()["ready_2d"],
        "the 2-D demo images are ready",
        timeout_s=120,
        every_s=0.2,
    )
    response = client.post("/demo/figshare-1")
    assert response.status_code == 503 and list(response.json()) == ["error"]
    assert "no 2-D model" in response.json()["error"]
    assert leftover_request_dirs(client) == []
