"""``tumorseg figure-cases``: one axial slice per case, four sequences and labels, reoriented to RAS
(neurological convention: the patient's right on the right, anterior at the top)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.data.conventions import CANONICAL_MODALITIES, LAYOUTS, get_convention
from tumorseg.errors import DataError

_COLUMN_TITLES: dict[str, str] = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}
_LABEL_COLOURS: dict[int, tuple[str, str]] = {
    1: ("NCR (necrotic core)", "#e8373b"),
    2: ("ED (oedema)", "#3cc84b"),
    3: ("ET (enhancing)", "#f5d226"),
}
_COLUMNS: tuple[str, ...] = (*CANONICAL_MODALITIES, "overlay")


def _case_dirs(src_dir: Path, layout: str) -> list[Path]:
    spec = LAYOUTS[layout]
    return sorted(
        d for d in src_dir.iterdir() if d.is_dir() and (d / f"{d.name}{spec.seg_suffix}.nii.gz").is_file()
    )


def _load_ras(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Volume reoriented to RAS, as float32, and its voxel size."""
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(path))
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise DataError(f"{path}: cannot read as NIfTI ({exc}); regenerate or remove the case") from None
    return np.asarray(img.dataobj, dtype=np.float32), tuple(float(z) for z in img.header.get_zooms()[:3])


def plot_synthetic_cases(
    src_dir: str | Path, out_png: str | Path, n_cases: int = 3, layout: str = "brats2021"
) -> Path:
    """A PNG grid of ``n_cases`` cases of a BraTS-layout folder: T1, T1ce, T2, FLAIR, FLAIR + labels.

    Rows: the axial slice through the tumour's centre of mass (tumours first), windowed to the 99.5th
    brain percentile so a hot voxel cannot darken a panel. DataError for no case or an unreadable file.
    """
    plt = _pyplot()
    src_dir, out_png = Path(src_dir), Path(out_png)
    cases = _checked_cases(src_dir, n_cases, layout)
    rows = _pick_rows(cases, layout, n_cases)
    fig, axes = plt.subplots(
        len(rows), len(_COLUMNS), figsize=(2.3 * len(_COLUMNS), 2.6 * len(rows) + 0.5), squeeze=False
    )
    fig.patch.set_facecolor("black")
    for r, (case, labels) in enumerate(rows):
        _draw_row(axes[r], case, labels, layout, first=r == 0)
    _add_legend(fig)
    fig.tight_layout(rect=(0, 0.5 / (2.6 * len(rows) + 0.5), 1, 1), pad=0.4)
    _save_atomically(plt, fig, out_png)
    return out_png


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, imported on first use (slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _checked_cases(src_dir: Path, n_cases: int, layout: str) -> list[Path]:
    if n_cases < 1:
        raise ValueError(f"n_cases must be at least 1 (got {n_cases})")
    if layout not in ("brats2021", "brats2023"):
        raise DataError(f"figure: layout {layout!r} is not a BraTS folder layout; use brats2021 or brats2023")
    if not src_dir.is_dir():
        raise DataError(f"{src_dir}: not a folder; generate one with `tumorseg synth --out {src_dir}`")
    cases = _case_dirs(src_dir, layout)
    if not cases:
        seg_suffix = LAYOUTS[layout].seg_suffix
        raise DataError(f"{src_dir}: no {layout} case folders (expected e.g. */*{seg_suffix}.nii.gz)")
    return cases


def _pick_rows(cases: list[Path], layout: str, n_cases: int) -> list[tuple[Path, np.ndarray]]:
    """``n_cases`` cases and their internal RAS labels, tumours first (read only until enough)."""
    spec = LAYOUTS[layout]
    convention = get_convention(spec.label_convention)
    chosen: list[tuple[Path, np.ndarray]] = []
    spare: list[tuple[Path, np.ndarray]] = []
    for case in cases:
        seg_path = case / f"{case.name}{spec.seg_suffix}.nii.gz"
        seg, _ = _load_ras(seg_path)
        try:
            labels = convention.encode(seg)
        except ValueError as exc:
            raise DataError(f"{seg_path}: {exc}") from None
        (chosen if labels.any() else spare).append((case, labels))
        if len(chosen) == n_cases:
            break
    return (chosen + spare)[:n_cases]


def _draw_row(axes: Any, case: Path, labels: np.ndarray, layout: str, *, first: bool) -> None:
    """One case's row: the axial slice through its tumour, cropped to the brain."""
    spec = LAYOUTS[layout]
    volumes = {}
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
    for m in CANONICAL_MODALITIES:
        volumes[m], spacing = _load_ras(case / f"{case.name}{spec.modality_suffixes[m]}.nii.gz")
    z = int(round(np.argwhere(labels > 0)[:, 2].mean())) if labels.any() else labels.shape[2] // 2
    brain = np.any([v > 0 for v in volumes.values()], axis=0)
    aspect = spacing[1] / spacing[0]
    crop = _brain_crop(brain, z)
    for c, col in enumerate(_COLUMNS):
        ax = axes[c]
        _blank(ax)
        vol = volumes["flair" if col == "overlay" else col]
        inside = vol[brain]
        hi = float(np.percentile(inside, 99.5)) if inside.size else 1.0
        # Transposed with origin "lower": x runs left-right, y (anterior) points up.
        ax.imshow(vol[crop].T, cmap="gray", origin="lower", vmin=0.0, vmax=hi, aspect=aspect)
        if col == "overlay":
            _overlay(ax, labels[crop].T, aspect)
        if first:
            title = "FLAIR + labels" if col == "overlay" else _COLUMN_TITLES[col]
            ax.set_title(title, color="white", fontsize=11)
        if c == 0:
            ax.set_ylabel(f"{case.name}\nz={z}", color="white", fontsize=8)


def _brain_crop(brain: np.ndarray, z: int, pad: int = 3) -> tuple[slice, slice, int]:
    """Slice ``z`` cropped to the brain's in-plane bounding box plus ``pad`` (the BraTS box is mostly empty)."""
    xy = np.argwhere(brain.any(axis=2))
    (x0, y0), (x1, y1) = (xy.min(axis=0), xy.max(axis=0) + 1) if xy.size else ((0, 0), brain.shape[:2])
    return slice(max(x0 - pad, 0), x1 + pad), slice(max(y0 - pad, 0), y1 + pad), z


def _blank(ax: Any) -> None:
    ax.set_facecolor("black")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _overlay(ax: Any, labels: np.ndarray, aspect: float) -> None:
    """Draw internal ``labels`` (transposed like the image) over a panel, background clear."""
    from matplotlib.colors import ListedColormap

    overlay_cmap = ListedColormap([_LABEL_COLOURS[k][1] for k in sorted(_LABEL_COLOURS)])
    ax.imshow(
        np.ma.masked_equal(labels, 0),
        cmap=overlay_cmap,
        vmin=0.5,
        vmax=3.5,
        origin="lower",
        alpha=0.55,
        aspect=aspect,
        interpolation="nearest",
    )


def _add_legend(fig: Any) -> None:
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=colour, label=text)
        for text, colour in (_LABEL_COLOURS[k] for k in sorted(_LABEL_COLOURS))
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, labelcolor="white", fontsize=10)


def _save_atomically(plt: Any, fig: Any, out_png: Path) -> None:
    """Write the figure through a temporary file, and close it whatever happens."""
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110, facecolor=fig.get_facecolor())
        tmp.replace(out_png)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
