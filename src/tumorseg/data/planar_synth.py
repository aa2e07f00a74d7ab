"""Generated 2-D datasets in the Figshare and Kaggle layouts (``tumorseg synth --layout figshare|kaggle``).

Slices are axial T1ce cuts through cases of the 3-D generator (:mod:`tumorseg.data.synth`). Figshare:
a case per patient, 512 x 512 int16 + tumour-core mask in MATLAB v7.3 files as MATLAB writes them.
Kaggle: a case per image, 8-bit on a random black canvas, some RGB or PNG, the real set's file names.
Image ``k`` depends only on ``(seed, k)``; ``synth_meta.json`` records the facts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tumorseg.config import SynthConfig, SynthPlanarConfig
from tumorseg.data.conventions import REGIONS
from tumorseg.data.manifest import atomic_output
from tumorseg.data.parallel import map_cases
from tumorseg.data.planar import FIGSHARE_LABELS, TUMOUR_TYPES
from tumorseg.data.synth import (
    SYNTH_META_NAME,
    file_mode,
    rician_noise,
    seed_word,
    synthesize_case,
    write_json,
)
from tumorseg.errors import DataError

log = logging.getLogger(__name__)

FIGSHARE_SIZE = 512
MAT_HEADER_TEXT = "MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: tumorseg synth HDF5 schema 1.00 ."
"""No date, so the bytes depend only on the content."""
_KAGGLE_OFFSET = 100_000
"""3-D case numbers of Kaggle images start here, so their brains differ from the Figshare patients'."""


def mat_v73_header(text: str = MAT_HEADER_TEXT) -> bytes:
    """The 128-byte MAT-file header of a v7.3 file: text, subsystem offset, version 0x0200, ``IM``."""
    raw = text.encode("ascii")[:116]
    return raw + b" " * (116 - len(raw)) + b"\x00" * 8 + b"\x00\x02" + b"IM"


def write_figshare_mat(
    path: Path,
    image: np.ndarray,
    mask: np.ndarray | None,
    label: float | None,
    pid: str | None,
    border: np.ndarray | None = None,
    *,
    version: Literal["7.3", "5"] = "7.3",
) -> Path:
    """Write one Figshare slice (``cjdata`` struct) as a MATLAB v7.3 or v5 file, atomically.

    ``image`` keeps its dtype (Figshare: int16), ``mask`` is ``logical``, ``label`` ``double``; a None
    field is left out, except ``border`` (written empty).
    """
    path = Path(path)
    border_row = np.zeros((1, 0)) if border is None else np.asarray(border, dtype=np.float64).reshape(1, -1)
    with atomic_output(path) as tmp:
        if version == "5":
            import scipy.io

            fields: dict[str, Any] = {"image": np.asarray(image), "tumorBorder": border_row}
            if mask is not None:
                fields["tumorMask"] = np.asarray(mask, dtype=np.uint8)
            if label is not None:
                fields["label"] = float(label)
            if pid is not None:
                fields["PID"] = pid
            scipy.io.savemat(tmp, {"cjdata": fields}, format="5", do_compression=True)
        else:
            _write_mat_v73(tmp, image, mask, label, pid, border_row)
        os.chmod(tmp, file_mode(0o666))
    return path


_MATLAB_CLASS: dict[str, str] = {"float64": "double", "float32": "single", "bool": "logical"}
"""numpy dtype name -> MATLAB class where they differ (integer classes share their names)."""


def _write_mat_v73(
    path: Path,
    image: np.ndarray,
    mask: np.ndarray | None,
    label: float | None,
    pid: str | None,
    border_row: np.ndarray,
) -> None:
    import h5py

    with h5py.File(path, "w", userblock_size=512) as fh:
        group = fh.create_group("cjdata")
        group.attrs["MATLAB_class"] = np.bytes_("struct")

        def put(name: str, array: np.ndarray, matlab_class: str, int_decode: int | None = None) -> None:
            # Column-major: MATLAB (m, n) is HDF5 (n, m); an empty array is its uint64 dims + MATLAB_empty.
            if array.size == 0:
                dataset = group.create_dataset(name, data=np.array(array.shape[::-1], dtype=np.uint64))
                dataset.attrs["MATLAB_empty"] = np.uint8(1)
            else:
                # MATLAB's -v7.3 deflates variables (gzip level 3, chunked), as here for the big ones.
                big = array.size >= 1024
                dataset = group.create_dataset(
                    name,
                    data=np.ascontiguousarray(array.T),
                    compression="gzip" if big else None,
                    compression_opts=3 if big else None,
                )
            dataset.attrs["MATLAB_class"] = np.bytes_(matlab_class)
            if int_decode is not None:
                dataset.attrs["MATLAB_int_decode"] = np.int32(int_decode)

        if pid is not None:
            put("PID", np.array([[ord(c) for c in pid]], dtype=np.uint16).reshape(1, -1), "char", 2)
        image = np.asarray(image)
        put("image", image, _MATLAB_CLASS.get(image.dtype.name, image.dtype.name))
        if label is not None:
            put("label", np.array([[float(label)]]), "double")
        put("tumorBorder", border_row, "double")
        if mask is not None:
            put("tumorMask", np.asarray(mask, dtype=np.uint8), "logical", 1)
    with open(path, "r+b") as fh:
        fh.write(mat_v73_header())


def tumour_border(mask: np.ndarray, step: int = 4) -> np.ndarray:
    """Figshare-style ``tumorBorder``: ``[r1, c1, r2, c2, ...]`` (1-based) along the largest outline."""
    from skimage.measure import find_contours

    if not np.asarray(mask).any():
        return np.zeros(0)
    contours = find_contours(np.pad(np.asarray(mask, dtype=np.float32), 1), 0.5)
    # The one-pixel pad shifts every coordinate by +1, which is exactly MATLAB's 1-based indexing.
    longest = max(contours, key=len)[::step]
    return np.round(longest, 2).ravel()


def _display(plane: np.ndarray) -> np.ndarray:
    """An axial RAS plane ``(X, Y)`` in radiological display: anterior up, patient right on the left."""
    return np.ascontiguousarray(plane[::-1, ::-1].T)


def _resample(plane: np.ndarray, shape: tuple[int, int], *, is_mask: bool) -> np.ndarray:
    from skimage.transform import resize

    out = resize(plane.astype(np.float32), shape, order=1, anti_aliasing=not is_mask, preserve_range=True)
    return (out >= 0.5).astype(np.uint8) if is_mask else out.astype(np.float32)


def _add_noise(image: np.ndarray, level: float, reference: float, rng: np.random.Generator) -> np.ndarray:
    """Rician noise of std ``level`` x ``reference`` at the output resolution."""
    return rician_noise(rng, image, np.float32(level * reference)) if level > 0 else image


def _tumour_type(seed: int, patient: int, fractions: dict[str, float]) -> str:
    """Tumour type of a patient: a low-discrepancy draw, so small sets still honour the fractions."""
    names = [t for t in TUMOUR_TYPES if fractions.get(t, 0.0) > 0]
    if not names:
        raise DataError("synth_2d.type_fractions: every tumour type has share 0; give one a positive share")
    weights = np.array([fractions[t] for t in names], dtype=np.float64)
    cumulative = np.cumsum(weights / weights.sum())
    offset = np.random.default_rng([seed_word(seed), 0x2D]).random()
    position = (offset + patient * 0.6180339887498949) % 1.0  # golden-ratio (Weyl) sequence
    return names[int(np.searchsorted(cumulative, position, side="right").clip(0, len(names) - 1))]


def _volume_cfg(cfg: SynthPlanarConfig, *, tumour: bool, necrosis: bool) -> SynthConfig:
    """The 3-D case a patient's (or image's) slices are cut from; only gliomas (``necrosis``) may
    lack enhancement: meningiomas and pituitary tumours enhance avidly."""
    return SynthConfig(
        cases=1,
        seed=cfg.seed,
        spacing_mm=cfg.spacing_mm,
        tumour_free_fraction=0.0 if tumour else 1.0,
        no_necrosis_fraction=0.25 if necrosis else 1.0,
        non_enhancing_fraction=cfg.glioma_non_enhancing_fraction if necrosis else 0.0,
        net_contrast_min=cfg.net_contrast_min,
        anisotropic_fraction=0.0,
        reoriented_fraction=0.0,
    )


_TYPE_ENHANCEMENT: dict[str, float] = {"meningioma": 1.18, "glioma": 1.0, "pituitary": 1.10}
"""Extra brightness of the tumour on T1ce per type (meningiomas enhance avidly and homogeneously)."""


def figshare_patient_slices(patient: int, cfg: SynthPlanarConfig) -> list[dict[str, Any]]:
    """One Figshare patient's slices: int16 ``image`` and uint8 ``mask`` ``(512, 512)``, ``label``,
    ``tumour_type``, ``pid``, ``z``, ``tumour_pixels``. Gliomas keep their necrotic core; meningiomas
    and pituitary tumours are solid and brighter, pituitary slices nearer the tumour's edge.
    """
    from scipy import ndimage as ndi

    kind = _tumour_type(cfg.seed, patient, cfg.type_fractions)
    case = synthesize_case(patient, _volume_cfg(cfg, tumour=True, necrosis=kind == "glioma"))
    region = np.isin(case.labels, REGIONS[cfg.figshare_mask_region])
    areas = region.sum(axis=(0, 1))
    candidates = np.flatnonzero(areas >= max(1, 0.15 * areas.max()))
    order = candidates[np.argsort(areas[candidates])]  # smallest cross-section first
    n = min(cfg.slices_per_patient, len(order))
    # Pituitary: the smaller cross-sections (towards the tumour's edge); others: the larger ones.
    picked = order[:n] if kind == "pituitary" else order[len(order) - n :]
    rng = np.random.default_rng([seed_word(cfg.seed), 0xF16, patient])
    pid = f"{100000 + patient * 37 % 900000}"
    label = next(code for code, name in FIGSHARE_LABELS.items() if name == kind)
    white_matter = (
        float(np.median(case.images["t1ce"][case.tissue["wm"] > 0.9])) if case.brain_mask.any() else 1.0
    )
    slices = []
    for z in sorted(int(v) for v in picked):
        plane = _display(case.images["t1ce"][:, :, z])
        mask_plane = _display(region[:, :, z].astype(np.uint8))
        image = _resample(plane, (FIGSHARE_SIZE, FIGSHARE_SIZE), is_mask=False)
        mask = _resample(mask_plane, (FIGSHARE_SIZE, FIGSHARE_SIZE), is_mask=True)
        soft = ndi.gaussian_filter(mask.astype(np.float32), 2.0)
        image *= 1.0 + np.float32(_TYPE_ENHANCEMENT[kind] - 1.0) * soft
        image = _add_noise(image, cfg.noise_level, white_matter, rng) * (image > 0)
        slices.append(
            {
                "image": np.clip(np.rint(image), 0, 32767).astype(np.int16),
                "mask": mask,
                "label": label,
                "tumour_type": kind,
                "pid": pid,
                "z": z,
                "tumour_pixels": int(mask.sum()),
            }
        )
    return slices


def kaggle_image(index: int, tumour: bool, cfg: SynthPlanarConfig) -> dict[str, Any]:
    """Generated Kaggle image ``index`` (1-based): ``pixels`` uint8 ``(H, W)`` or ``(H, W, 3)`` plus facts."""
    rng = np.random.default_rng([seed_word(cfg.seed), 0xCA6, index])
    case = synthesize_case(_KAGGLE_OFFSET + index, _volume_cfg(cfg, tumour=tumour, necrosis=True))
    brain_area = case.brain_mask.sum(axis=(0, 1))
    if tumour:
        areas = (case.labels > 0).sum(axis=(0, 1))
        candidates = np.flatnonzero(areas >= 0.4 * areas.max())
    else:
        candidates = np.flatnonzero(brain_area >= 0.6 * brain_area.max())
    z = int(rng.choice(candidates))
    names = sorted(cfg.kaggle_sequences)
    shares = np.array([cfg.kaggle_sequences[n] for n in names], dtype=np.float64)
    sequence = names[int(rng.choice(len(names), p=shares / shares.sum()))]
    plane = _display(case.images[sequence][:, :, z])
    tumour_plane = _display((case.labels[:, :, z] > 0).astype(np.uint8))

    low, high = sorted((cfg.kaggle_min_side_px, cfg.kaggle_max_side_px))
    height = int(rng.integers(low, high + 1))
    width = int(np.clip(round(height * rng.uniform(0.8, 1.25)), low, high))
    side = int(min(height, width) * rng.uniform(0.7, 0.95))  # the rest is black border
    brain = _resample(plane, (side, side), is_mask=False)
    brain = _add_noise(brain, cfg.noise_level, float(np.percentile(plane[plane > 0], 60)), rng) * (brain > 0)
    window = float(np.percentile(brain[brain > 0], 99.5)) * rng.uniform(0.9, 1.2)
    gamma = rng.uniform(0.8, 1.25)
    pixels8 = np.clip(np.clip(brain / window, 0.0, 1.0) ** gamma * 255.0, 0, 255)
    canvas = np.zeros((height, width), dtype=np.float32)
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    canvas[top : top + side, left : left + side] = pixels8
    pixels = np.rint(canvas).astype(np.uint8)
    rgb = bool(rng.random() < cfg.kaggle_rgb_fraction)
    if rgb:  # grayscale scans saved as RGB, as many Kaggle files are; a slight tint now and then
        tint = rng.uniform(0.96, 1.04, 3)
        pixels = np.clip(np.rint(canvas[..., None] * tint), 0, 255).astype(np.uint8)
    tumour_pixels = int(_resample(tumour_plane, (side, side), is_mask=True).sum()) if tumour else 0
    return {
        "pixels": pixels,
        "tumour": tumour,
        "rgb": rgb,
        "png": bool(rng.random() < cfg.kaggle_png_fraction),
        "tumour_pixels": tumour_pixels,
        "shape": [height, width],
        "z": z,
        "sequence": sequence,
    }


def kaggle_file_name(index: int, tumour: bool, png: bool) -> str:
    """File name in the real set's styles: ``Y12.jpg`` / ``Y12.png``; ``no 7.jpg`` / ``N8.png``."""
    if tumour:
        return f"Y{index}.{'png' if png else 'jpg'}"
    return f"N{index}.png" if png else f"no {index}.jpg"


def _save_image(path: Path, pixels: np.ndarray, png: bool, quality: int) -> None:
    from PIL import Image

    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            Image.fromarray(pixels).save(fh, format="PNG" if png else "JPEG", quality=quality)
        os.chmod(tmp, file_mode(0o666))


def write_figshare_slices(
    folder: Path, patients: Iterable[list[dict[str, Any]]]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Write each patient's slices (``image``, ``mask``, ``label``, ``pid``), in order, as ``folder/1.mat``,
    ``2.mat``...; yields ``(file name, slice)`` as each is written. Shared by every 2-D generator."""
    number = 0
    for items in patients:
        for item in items:
            number += 1
            name = f"{number}.mat"
            write_figshare_mat(
                folder / name,
                item["image"],
                item["mask"],
                item["label"],
                item["pid"],
                tumour_border(item["mask"]),
            )
            yield name, item


def tumour_first(
    index: int, n_yes: int, make: Callable[..., dict[str, Any]], **options: Any
) -> dict[str, Any]:
    """``make(index, tumour, **options)`` for a yes/no image set whose first ``n_yes`` images have a tumour
    (module-level, so a worker process can run it)."""
    return make(index, index <= n_yes, **options)


def write_kaggle_images(
    folder: Path, images: Iterable[dict[str, Any]], indices: Iterable[int], quality: Callable[[int], int]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Write each image (``pixels``, ``tumour``, ``png``) as ``folder/yes/Y<index>.jpg`` or
    ``folder/no/N<index>.png``..., JPEGs at ``quality(index)``; yields ``("yes/Y1.jpg", image)`` as each is
    written. Shared by every 2-D generator."""
    for index, item in zip(indices, images, strict=True):
        sub = folder / ("yes" if item["tumour"] else "no")
        sub.mkdir(parents=True, exist_ok=True)
        name = kaggle_file_name(index, item["tumour"], item["png"])
        _save_image(sub / name, item["pixels"], item["png"], quality=quality(index))
        yield f"{sub.name}/{name}", item


def synthesize_figshare(out: Path, cfg: SynthPlanarConfig, workers: int = 2) -> list[str]:
    """Write ``figshare_patients x slices_per_patient`` v7.3 slices ``1.mat``, ``2.mat``... to ``out``;
    patients are drawn in ``workers`` processes (0: one per core), which does not change the output."""
    out = Path(out)
    patients = range(1, cfg.figshare_patients + 1)
    draw = partial(figshare_patient_slices, cfg=cfg)
    drawn = map_cases(draw, patients, workers=workers, what="synth figshare", unit="patients")
    facts = [
        {k: item[k] for k in ("label", "tumour_type", "pid", "z", "tumour_pixels")} | {"file": name}
        for name, item in write_figshare_slices(out, drawn)
    ]
    _write_meta(out, "figshare", cfg, facts)
    return [fact["file"] for fact in facts]


def synthesize_kaggle(out: Path, cfg: SynthPlanarConfig, workers: int = 2) -> list[str]:
    """Write ``kaggle_images`` images into ``out/yes`` (the first ``round(n * fraction)``) and ``out/no``,
    drawn in ``workers`` processes (0: one per core; the output does not change); returns their paths
    relative to ``out`` (``yes/Y1.jpg``...)."""
    out = Path(out)
    n_yes = int(round(cfg.kaggle_images * cfg.kaggle_tumour_fraction))
    indices = range(1, cfg.kaggle_images + 1)
    draw = partial(tumour_first, n_yes=n_yes, make=kaggle_image, cfg=cfg)
    items = map_cases(draw, indices, workers=workers, what="synth kaggle", unit="images")
    facts = [
        {"file": relative} | {k: item[k] for k in ("tumour", "rgb", "png", "tumour_pixels", "shape", "z")}
        for relative, item in write_kaggle_images(out, items, indices, quality=lambda index: 85 + index % 11)
    ]
    _write_meta(out, "kaggle", cfg, facts)
    return [fact["file"] for fact in facts]


def _write_meta(out: Path, layout: str, cfg: SynthPlanarConfig, facts: list[dict[str, Any]]) -> None:
    meta = {
        "generator": "tumorseg synth",
        "layout": layout,
        "template": "axial T1ce slices of MNI152-based synthetic cases (tumorseg.data.synth)",
        "params": cfg.model_dump(mode="json"),
        "files": facts,
    }
    write_json(out / SYNTH_META_NAME, meta, indent=1)


def synthesize_planar_dataset(out: Path, layout: str, cfg: SynthPlanarConfig, workers: int = 2) -> list[str]:
    """The ``synth`` stage for a 2-D layout (``workers`` processes, 0: one per core); a DataError when
    ``out`` is not a writable folder."""
    writers = {"figshare": synthesize_figshare, "kaggle": synthesize_kaggle}
    if layout not in writers:
        raise DataError(f"unknown 2-D layout {layout!r}; use figshare or kaggle")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; pass another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = writers[layout](out, cfg, workers)
    except OSError as exc:
        raise DataError(
            f"{exc.filename or out}: cannot write ({exc.strerror}); choose a writable --out"
        ) from None
    log.info("synth: %d %s files in %s", len(written), layout, out)
    return written
