"""Evaluation figures: metric box plots and best / median / worst case overlays (PNG).

Drawn on a Figure with an explicit Agg canvas, never ``pyplot``: no global backend, no window, safe
in a headless DVC stage or a Prefect worker thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tumorseg.data.conventions import LabelConvention, get_convention
from tumorseg.data.manifest import atomic_output

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REGION_COLOURS: dict[str, str] = {
    "WT": "#2ca02c",
    "TC": "#ffbf00",
    "ET": "#d62728",
    "RC": "#9467bd",
    "CC": "#17becf",
    "NETC": "#8c564b",
    "SNFH": "#1f77b4",
    "ED": "#1f77b4",
}
FALLBACK_COLOURS: tuple[str, ...] = ("#e377c2", "#7f7f7f", "#bcbd22", "#ff7f0e")


def region_colour(region: str, index: int = 0) -> str:
    """The colour of a region in the evaluation figures."""
    return REGION_COLOURS.get(region, FALLBACK_COLOURS[index % len(FALLBACK_COLOURS)])


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: Path) -> Path:
    """Write a figure as PNG atomically."""
    with atomic_output(path, ".png") as tmp:
        figure.savefig(tmp, format="png")
    return path


def showcase_cases(per_case: pd.DataFrame) -> dict[str, str]:
    """``{"best", "median", "worst"}`` case ids by mean Dice over regions (ties by id, lower median)."""
    mean_dice = per_case.groupby("case_id")["dice"].mean()
    if mean_dice.empty:
        return {}
    ranked = sorted(mean_dice.items(), key=lambda item: (-item[1], item[0]))
    return {"best": ranked[0][0], "median": ranked[(len(ranked) - 1) // 2][0], "worst": ranked[-1][0]}


def plot_boxplots(per_case: pd.DataFrame, path: Path) -> Path:
    """Box plots of Dice and HD95 per region (one box per region, one point per case)."""
    from tumorseg.evaluation.summary import region_order

    regions = region_order(per_case)
    figure = _new_figure(max(9.0, 1.5 * len(regions) + 4.5), 4.0)
    axes = figure.subplots(1, 2)
    for ax, metric, label in zip(axes, ("dice", "hd95"), ("Dice", "HD95 (mm)"), strict=True):
        data = [per_case.loc[per_case["region"] == r, metric].to_numpy(dtype=float) for r in regions]
        boxes = ax.boxplot(data, tick_labels=regions, patch_artist=True, showmeans=True)
        for index, (patch, region) in enumerate(zip(boxes["boxes"], regions, strict=True)):
            patch.set_facecolor(region_colour(region, index))
            patch.set_alpha(0.5)
        ax.set_ylabel(label)
        ax.set_title(f"{label} per region (n = {per_case['case_id'].nunique()} cases)")
        ax.grid(axis="y", alpha=0.3)
    return save_figure(figure, path)


def _best_slice(ref_wt: np.ndarray, pred_wt: np.ndarray) -> int:
    # Axial (last-axis) slice with the most reference tumour; else the most predicted; else the middle.
    for mask in (ref_wt, pred_wt):
        per_slice = mask.sum(axis=(0, 1))
        if per_slice.any():
            return int(np.argmax(per_slice))
    return ref_wt.shape[2] // 2


def plot_overlay(
    path: Path,
    *,
    ref: np.ndarray,
    pred: np.ndarray,
    title: str,
    background: np.ndarray | None = None,
    convention: LabelConvention | None = None,
) -> Path:
    """Reference (solid) and predicted (dashed) outlines of every scored region on one axial slice.

    Args:
        ref: internal reference labels ``(H, W, D)``; ``pred`` likewise.
        background: optional image ``(H, W, D)`` on the same grid (e.g. FLAIR); else a grey
            reference-tumour silhouette.
        convention: whose regions are drawn (default brats2023); its first (WT) picks the slice.
    """
    from matplotlib.lines import Line2D

    convention = convention or get_convention("brats2023")
    ref_regions = convention.region_masks(ref)
    pred_regions = convention.region_masks(pred)
    k = _best_slice(ref_regions[0], pred_regions[0])
    figure = _new_figure(5.5, 5.5)
    ax = figure.subplots()
    if background is not None:
        image = np.asarray(background[:, :, k], dtype=np.float64)
        low, high = np.percentile(image, [1, 99]) if image.any() else (0.0, 1.0)
        ax.imshow(image.T, cmap="gray", origin="lower", vmin=low, vmax=max(high, low + 1e-6))
    else:
        ax.imshow(ref_regions[0][:, :, k].T, cmap="Greys", origin="lower", vmin=0, vmax=4, alpha=1.0)
    handles = []
    for index, region in enumerate(convention.region_names):
        colour = region_colour(region, index)
        for masks, style in ((ref_regions, "solid"), (pred_regions, "dashed")):
            plane = masks[index][:, :, k]
            if plane.any() and not plane.all():
                ax.contour(
                    plane.T.astype(float), levels=[0.5], colors=[colour], linestyles=style, linewidths=1.2
                )
        handles.append(Line2D([], [], color=colour, label=region))
    handles += [
        Line2D([], [], color="black", linestyle="solid", label="reference"),
        Line2D([], [], color="black", linestyle="dashed", label="prediction"),
    ]
    tumour = ref_regions[0][:, :, k] | pred_regions[0][:, :, k]
    if tumour.any():  # zoom on the tumour, keeping some context around it
        xs, ys = np.nonzero(tumour)
        half = max(np.ptp(xs), np.ptp(ys), 20) * 0.75 + 10
        cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
        ax.set_xlim(cx - half, cx + half)
        ax.set_ylim(cy - half, cy + half)
    ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.7)
    ax.set_title(f"{title}\naxial slice {k}", fontsize=9)
    ax.set_axis_off()
    return save_figure(figure, path)
