"""Tiny NIfTI cases in the three public layouts, for data tests.

Each case is a small ellipsoid "brain" with a different contrast per modality and, optionally, a
spherical tumour (NCR core, ET rim, ED halo), written with nibabel in any axis orientation so the
same physical image can be stored as RAS, LPS, LAS, ...

Test files load this module by path (``load_fixtures()`` in each), as the tests folder is not a
package.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from tumorseg.data.conventions import CANONICAL_MODALITIES, MSD_CHANNEL_ORDER, get_convention

BRATS2021_SUFFIX = {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"}
BRATS2023_SUFFIX = {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"}
MODALITY_CONTRAST = {"t1": 600.0, "t1ce": 700.0, "t2": 900.0, "flair": 800.0}


def phantom(
    shape: tuple[int, int, int] = (24, 28, 20),
    *,
    tumour_radius: float = 4.0,
    tumour_centre: tuple[float, float, float] | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A RAS phantom: float32 modality volumes ``(X, Y, Z)`` and canonical uint8 labels ``(X, Y, Z)``.

    ``tumour_radius=0`` gives a tumour-free case.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    centre = np.array([(n - 1) / 2 for n in shape]).reshape(3, 1, 1, 1)
    radii = np.array([0.42 * n for n in shape]).reshape(3, 1, 1, 1)
    brain = (((grid - centre) / radii) ** 2).sum(axis=0) <= 1.0

    labels = np.zeros(shape, dtype=np.uint8)
    if tumour_radius > 0:
        tc = np.array(tumour_centre if tumour_centre is not None else [c + 2 for c in centre.ravel()])
        dist = np.sqrt(((grid - tc.reshape(3, 1, 1, 1)) ** 2).sum(axis=0))
        labels[(dist <= tumour_radius * 1.6) & brain] = 2
        labels[(dist <= tumour_radius) & brain] = 3
        labels[(dist <= tumour_radius * 0.5) & brain] = 1

    images: dict[str, np.ndarray] = {}
    for index, modality in enumerate(CANONICAL_MODALITIES):
        base = MODALITY_CONTRAST[modality] * (1.0 + 0.1 * np.sin(grid[0] / 3.0 + index))
        tumour_gain = 1.0 + 0.3 * (labels > 0) + 0.2 * index * (labels == 3)
        noise = rng.normal(0.0, 10.0, size=shape)
        images[modality] = np.where(brain, base * tumour_gain + noise, 0.0).astype(np.float32)
    return images, labels


def blob_probabilities() -> np.ndarray:
    """Region probabilities ``(3, 12, 12, 12)``: WT over two blobs, sure (0.95) and unsure (0.6)."""
    probabilities = np.full((3, 12, 12, 12), 0.01, dtype=np.float32)
    probabilities[0, 1:4, 1:4, 1:4] = 0.95
    probabilities[0, 7:10, 7:10, 7:10] = 0.6
    return probabilities


def ras_affine(spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)) -> np.ndarray:
    """The affine of every fixture volume stored as RAS."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10.0, -12.0, -8.0]
    return affine


def oriented(
    volume: np.ndarray, spacing: tuple[float, float, float], orientation: str
) -> tuple[np.ndarray, np.ndarray]:
    """Store a RAS volume ``(X, Y, Z, ...)`` in another axis orientation.

    Returns:
        The array as stored and its affine (same physical image, origin at the RAS array's first voxel).
    """
    transform = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(orientation)))
    stored = apply_orientation(volume, transform)
    affine = ras_affine(spacing) @ inv_ornt_aff(transform, volume.shape[:3])
    return np.ascontiguousarray(stored), affine


def save(volume: np.ndarray, affine: np.ndarray, path: Path, dtype: type | None = None) -> Path:
    """Write a volume with nibabel (``.nii.gz`` or ``.nii`` by the path's suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = volume.astype(dtype) if dtype is not None else volume
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def write_brats_case(
    root: Path,
    case_id: str,
    *,
    layout: str = "brats2021",
    shape: tuple[int, int, int] = (24, 28, 20),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    orientation: str = "RAS",
    tumour_radius: float = 4.0,
    with_seg: bool = True,
    seed: int = 0,
    image_dtype: type = np.int16,
) -> Path:
    """Write one BraTS 2021 (``_t1``) or BraTS 2023 (``-t1n``) case folder; returns the folder."""
    suffix = BRATS2021_SUFFIX if layout == "brats2021" else BRATS2023_SUFFIX
    images, labels = phantom(shape, tumour_radius=tumour_radius, seed=seed)
    folder = root / case_id
    for modality, volume in images.items():
        stored, affine = oriented(volume, spacing, orientation)
        save(stored, affine, folder / f"{case_id}{suffix[modality]}.nii.gz", image_dtype)
    if with_seg:
        source = get_convention(layout).decode(labels)
        stored, affine = oriented(source, spacing, orientation)
        save(stored, affine, folder / f"{case_id}{suffix['seg']}.nii.gz", np.uint8)
    return folder


def write_msd_dataset(
    root: Path,
    case_ids: list[str],
    *,
    test_ids: tuple[str, ...] = (),
    shape: tuple[int, int, int] = (24, 28, 20),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    orientation: str = "RAS",
) -> Path:
    """Write an MSD Task01 folder (``imagesTr``/``labelsTr``/``imagesTs``/``dataset.json``); returns it."""
    import json

    for split, ids in (("Tr", case_ids), ("Ts", test_ids)):
        for seed, case_id in enumerate(ids):
            images, labels = phantom(shape, seed=seed)
            stacked = np.stack([images[m] for m in MSD_CHANNEL_ORDER], axis=-1)
            stored, affine = oriented(stacked, spacing, orientation)
            save(stored, affine, root / f"images{split}" / f"{case_id}.nii.gz", np.float32)
            if split == "Tr":
                source = get_convention("msd").decode(labels)
                stored, affine = oriented(source, spacing, orientation)
                save(stored, affine, root / "labelsTr" / f"{case_id}.nii.gz", np.uint8)
    meta = {
        "name": "BRATS",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def truncate(path: Path, keep_fraction: float = 0.5) -> None:
    """Cut a file short (a partial download)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Size, mtime_ns and content of every file below ``folder`` (to prove nothing changed)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
