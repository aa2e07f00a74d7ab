"""2-D files: MATLAB v7.3/v5 Figshare slices, JPEG/PNG images, bad files, and the preprocessing inverse."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from tumorseg.config import PlanarPreprocessConfig
from tumorseg.data.planar import (
    apply_planar_geometry,
    otsu_crop_box,
    preprocess_planar,
    read_planar,
    restore_planar_mask,
)
from tumorseg.data.planar_synth import mat_v73_header, write_figshare_mat
from tumorseg.errors import DataError


def _asymmetric(height: int = 7, width: int = 5) -> np.ndarray:
    """An int16 image whose every pixel differs, so any transposition or flip shows."""
    return (np.arange(height * width, dtype=np.int16).reshape(height, width) * 3 + 1).astype(np.int16)


def _mask(height: int = 7, width: int = 5) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[1:3, 0:2] = 1  # top-left corner only: orientation shows in the mask too
    return mask


def test_v73_file_is_hdf5_behind_a_matlab_header_and_reads_back_in_orientation(tmp_path: Path) -> None:
    image, mask = _asymmetric(), _mask()
    path = write_figshare_mat(tmp_path / "1.mat", image, mask, 3, "MR040237", np.array([1.5, 2.0, 3.5, 4.0]))

    head = path.read_bytes()[:128]
    assert head.startswith(b"MATLAB 7.3 MAT-file") and head == mat_v73_header()
    assert head[124:126] == b"\x00\x02" and head[126:128] == b"IM"  # version 0x0200, little-endian 'IM'
    assert h5py.is_hdf5(path)
    with h5py.File(path, "r") as fh:
        assert fh.userblock_size == 512
        assert fh["cjdata"].attrs["MATLAB_class"] == b"struct"
        assert fh["cjdata/image"].shape == (5, 7)  # column-major: stored transposed
        assert fh["cjdata/image"].attrs["MATLAB_class"] == b"int16"
        assert fh["cjdata/tumorMask"].attrs["MATLAB_class"] == b"logical"
        assert fh["cjdata/PID"].attrs["MATLAB_class"] == b"char"
        assert fh["cjdata/PID"].dtype == np.uint16
        assert fh["cjdata/label"].attrs["MATLAB_class"] == b"double"
    with pytest.raises(NotImplementedError):  # scipy refuses v7.3: the h5py path is the one exercised
        scipy.io.loadmat(path)

    slice_ = read_planar(path)
    np.testing.assert_array_equal(slice_.image, image.astype(np.float32))
    np.testing.assert_array_equal(slice_.mask, mask)
    assert slice_.image.dtype == np.float32 and slice_.mask.dtype == np.uint8
    assert (slice_.label_code, slice_.tumour_type, slice_.has_tumour) == (3, "pituitary", True)
    assert (slice_.patient_id, slice_.case_id, slice_.source, slice_.fmt) == (
        "MR040237",
        "figshare-1",
        "figshare",
        "mat-v7.3",
    )
    np.testing.assert_array_equal(slice_.border, [1.5, 2.0, 3.5, 4.0])


def test_v5_file_is_read_with_scipy(tmp_path: Path) -> None:
    image, mask = _asymmetric(6, 9), _mask(6, 9)
    path = write_figshare_mat(tmp_path / "old.mat", image, mask, 1, "42", version="5")
    assert not h5py.is_hdf5(path)
    slice_ = read_planar(path)
    np.testing.assert_array_equal(slice_.image, image)
    np.testing.assert_array_equal(slice_.mask, mask)
    assert (slice_.tumour_type, slice_.patient_id, slice_.fmt) == ("meningioma", "42", "mat-v5")


@pytest.mark.parametrize("userblock", [False, True], ids=["bare-hdf5", "matlab-header"])
def test_v73_file_without_matlab_attributes_reads_as_the_tagged_one(tmp_path: Path, userblock: bool) -> None:
    """h5py (or another tool) writing cjdata without MATLAB_class: read_planar reads it by content."""
    image, mask, border = _asymmetric(), _mask(), np.array([1.5, 2.0, 3.5, 4.0])
    tagged = write_figshare_mat(tmp_path / "tagged" / "1.mat", image, mask, 3, "MR040237", border)
    plain = tmp_path / "plain" / "1.mat"
    plain.parent.mkdir()
    with h5py.File(plain, "w", userblock_size=512 if userblock else 0) as fh:
        cjdata = fh.create_group("cjdata")
        cjdata["image"], cjdata["tumorMask"] = image.T, mask.T
        cjdata["label"], cjdata["tumorBorder"] = np.array([[3.0]]), border.reshape(-1, 1)
        cjdata["PID"] = np.array([[ord(c)] for c in "MR040237"], dtype=np.uint16)

    expected, got = read_planar(tagged), read_planar(plain)
    for name in ("image", "mask", "border"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))
    keys = ("patient_id", "case_id", "tumour_type", "label_code", "has_tumour", "fmt", "channels")
    assert [getattr(got, k) for k in keys] == [getattr(expected, k) for k in keys]
    assert (got.patient_id, got.label_code, got.fmt) == ("MR040237", 3, "mat-v7.3")


def test_v5_file_with_a_text_image_is_a_data_error_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "text.mat"
    scipy.io.savemat(path, {"cjdata": {"image": "pixels", "label": 1.0, "PID": "7"}})
    with pytest.raises(DataError, match=r"text\.mat: cjdata\.image is text .*, not numbers; store "):
        read_planar(path)


@pytest.mark.parametrize(
    ("name", "mode", "size"),
    [("odd.jpg", "RGB", (371, 293)), ("gray.png", "L", (200, 317)), ("alpha.png", "RGBA", (64, 80))],
)
def test_images_of_any_size_and_mode_become_float32_grayscale(
    tmp_path: Path, name: str, mode: str, size: tuple[int, int]
) -> None:
    height, width = size
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (height, width), dtype=np.uint8)
    pixels = {
        "L": gray,
        "RGB": np.stack([gray] * 3, -1),
        "RGBA": np.dstack([gray] * 3 + [np.full_like(gray, 255)]),
    }
    folder = tmp_path / "yes"
    folder.mkdir()
    Image.fromarray(pixels[mode], mode=mode).save(folder / name, quality=95)
    slice_ = read_planar(folder / name)
    assert slice_.image.shape == (height, width) and slice_.image.dtype == np.float32
    assert slice_.channels == {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    assert (slice_.source, slice_.has_tumour, slice_.mask) == ("kaggle", True, None)
    tolerance = 12 if name.endswith(".jpg") else 1  # JPEG is lossy; PNG exact up to luma rounding
    assert np.abs(slice_.image - gray).mean() < tolerance


def test_bare_image_has_unknown_tumour_status_and_safe_id(tmp_path: Path) -> None:
    Image.fromarray(np.full((20, 30), 7, dtype=np.uint8)).save(tmp_path / "my scan (1).png")
    slice_ = read_planar(tmp_path / "my scan (1).png")
    assert (slice_.source, slice_.has_tumour, slice_.case_id) == ("image", None, "my_scan_1")


def _truncated_jpeg(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 90), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:700])
    return path


@pytest.mark.parametrize(
    "damage", ["random_mat", "truncated_v73", "v73_header_only", "truncated_jpeg", "text_png"]
)
def test_bad_files_are_one_line_data_errors_naming_the_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / (
        "x.jpg" if damage == "truncated_jpeg" else "x.png" if damage == "text_png" else "x.mat"
    )
    if damage == "random_mat":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage in ("truncated_v73", "v73_header_only"):
        write_figshare_mat(path, _asymmetric(64, 64), _mask(64, 64), 2, "7")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncated_v73" else data[:512])
    elif damage == "truncated_jpeg":
        _truncated_jpeg(path)
    else:
        path.write_text("<html>not found</html>")
    with pytest.raises(DataError) as err:
        read_planar(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_mat_mask_of_another_shape_is_a_data_error(tmp_path: Path) -> None:
    path = write_figshare_mat(tmp_path / "9.mat", _asymmetric(8, 8), _mask(7, 5), 2, "1")
    with pytest.raises(DataError, match=r"9\.mat: tumorMask shape 7x5 differs from image 8x8"):
        read_planar(path)


# ---------------------------------------------------------------------------- preprocessing
def _head_image(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An off-centre bright ellipse (the head) on black, with a small 'tumour' inside; RGB uint8."""
    yy, xx = np.mgrid[:height, :width]
    head = ((yy - 0.45 * height) / (0.3 * height)) ** 2 + ((xx - 0.55 * width) / (0.25 * width)) ** 2 < 1
    tumour = ((yy - 0.4 * height) ** 2 + (xx - 0.6 * width) ** 2) < (0.06 * min(height, width)) ** 2
    gray = np.where(head, 120, 0) + np.where(tumour, 90, 0)
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.uint8)
    return rgb, tumour.astype(np.uint8)


def test_otsu_crop_finds_the_head_and_ignores_specks() -> None:
    rgb, _ = _head_image(300, 400)
    gray = rgb[..., 0].astype(np.float32)
    gray[5, 5] = 255.0  # a bright speck in the corner (a burnt-in label)
    top, bottom, left, right = otsu_crop_box(gray, margin=0)
    assert (top, bottom) == pytest.approx((0.15 * 300, 0.75 * 300), abs=3)
    assert (left, right) == pytest.approx((0.3 * 400, 0.8 * 400), abs=3)


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_round_trip_on_an_odd_size_rgb_file(tmp_path: Path, fmt: str) -> None:
    rgb, tumour = _head_image(371, 293)
    folder = tmp_path / "yes"
    folder.mkdir()
    Image.fromarray(rgb).save(folder / f"odd.{fmt}", quality=95)
    slice_ = read_planar(folder / f"odd.{fmt}")
    cfg = PlanarPreprocessConfig(size=128, denoise="median")
    out, geometry = preprocess_planar(slice_.image, cfg)
    assert out.shape == (128, 128) and out.dtype == np.float32
    assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1.0) < 1e-3  # z-score
    assert (geometry.height, geometry.width) == (371, 293)
    assert geometry.side == max(geometry.bottom - geometry.top, geometry.right - geometry.left)

    forward = apply_planar_geometry(tumour, geometry)
    assert forward.shape == (128, 128) and forward.any()
    restored = restore_planar_mask(forward, geometry)
    assert restored.shape == (371, 293) and restored.dtype == np.uint8
    dice = 2 * np.logical_and(restored, tumour).sum() / (restored.sum() + tumour.sum())
    assert dice > 0.93
    # Where the tumour is on the output grid is where it is in the image.
    cy, cx = np.argwhere(restored).mean(axis=0)
    assert (cy, cx) == pytest.approx((0.4 * 371, 0.6 * 293), abs=2.0)


def test_round_trip_is_exact_when_no_resize_is_needed() -> None:
    rgb, tumour = _head_image(371, 293)
    cfg = PlanarPreprocessConfig(otsu_crop=False, size=371)
    _, geometry = preprocess_planar(rgb, cfg)
    assert (geometry.pad_left, geometry.pad_right, geometry.side) == (39, 39, 371)
    np.testing.assert_array_equal(
        restore_planar_mask(apply_planar_geometry(tumour, geometry), geometry), tumour
    )


@pytest.mark.parametrize("normalise", ["minmax", "percentile"])
def test_unit_range_normalisations(normalise: str) -> None:
    rgb, _ = _head_image(100, 140)
    out, _ = preprocess_planar(rgb, PlanarPreprocessConfig(size=64, normalise=normalise, denoise="gaussian"))
    assert float(out.min()) == pytest.approx(0.0, abs=1e-6) and float(out.max()) == pytest.approx(
        1.0, abs=1e-6
    )


def test_constant_image_is_not_cropped_and_gives_zeros() -> None:
    out, geometry = preprocess_planar(np.full((40, 60), 5.0), PlanarPreprocessConfig(size=32))
    assert (geometry.top, geometry.bottom, geometry.left, geometry.right) == (0, 40, 0, 60)
    assert not out.any()
