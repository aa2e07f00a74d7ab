"""Run artefacts for humans: learning curves and validation overlays (PNG), drawn on an Agg
canvas so no global backend is switched and nothing needs a display."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from tumorseg.data.conventions import GLIOMA, LabelSet

REGION_COLOURS = {"WT": "#f1c40f", "TC": "#e74c3c", "ET": "#3498db", "RC": "#9b59b6", "CC": "#1abc9c"}
FALLBACK_COLOURS = ("#e67e22", "#2ecc71", "#34495e", "#e84393")


def region_colour(name: str, index: int = 0) -> str:
    """The colour of a region in the training figures (a fixed one for the common names)."""
    return REGION_COLOURS.get(name, FALLBACK_COLOURS[index % len(FALLBACK_COLOURS)])


def _save(fig: object, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    tmp.replace(path)
    return path


def epoch_metrics(metrics_csv: str | Path) -> pd.DataFrame:
    """Lightning's CSVLogger ``metrics.csv`` collapsed to one row per epoch."""
    frame = pd.read_csv(metrics_csv)
    if "epoch" not in frame.columns:
        return pd.DataFrame()
    return frame.drop(columns=["step"], errors="ignore").groupby("epoch").last().reset_index()


def plot_learning_curves(metrics_csv: str | Path, out: str | Path) -> Path:
    """Loss (train/val) and validation Dice per region against epochs."""
    from matplotlib.figure import Figure

    frame = epoch_metrics(metrics_csv)
    fig = Figure(figsize=(10, 4))
    loss_ax, dice_ax = fig.subplots(1, 2)
    for column, style in (("train_loss", "-"), ("val_loss", "--")):
        if column in frame:
            rows = frame[["epoch", column]].dropna()
            loss_ax.plot(rows["epoch"], rows[column], style, label=column)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_ax.legend()
    names = [str(c).removeprefix("val_dice_") for c in frame.columns if str(c).startswith("val_dice_")]
    for index, name in enumerate([n for n in names if n != "mean"] + ["mean"] * ("mean" in names)):
        column = f"val_dice_{name}"
        if column in frame:
            rows = frame[["epoch", column]].dropna()
            colour = "black" if name == "mean" else region_colour(name, index)
            dice_ax.plot(rows["epoch"], rows[column], color=colour, label=name, lw=2 if name == "mean" else 1)
    dice_ax.set(xlabel="epoch", ylabel="Dice", title="Validation Dice", ylim=(0, 1))
    dice_ax.legend()
    return _save(fig, Path(out))


def plot_overlay(
    image: np.ndarray,
    truth: np.ndarray,
    prediction: np.ndarray,
    out: str | Path,
    *,
    title: str = "",
    label_set: LabelSet = GLIOMA,
) -> Path:
    """FLAIR and T1ce slices with truth and predicted region contours, on the axial slice with most
    truth tumour (the middle one without); ``image`` ``(4, X, Y, Z)`` (t1, t1ce, t2, flair),
    ``truth`` and ``prediction`` internal labels ``(X, Y, Z)``."""
    from matplotlib.figure import Figure

    tumour_per_slice = (truth > 0).sum(axis=(0, 1))
    z = int(tumour_per_slice.argmax()) if tumour_per_slice.any() else truth.shape[2] // 2
    fig = Figure(figsize=(12, 4.4))
    axes = fig.subplots(1, 3)
    panels = (("FLAIR + truth", 3, truth), ("T1ce + truth", 1, truth), ("FLAIR + prediction", 3, prediction))
    for ax, (label, channel, labels) in zip(axes, panels, strict=True):
        ax.imshow(image[channel, :, :, z].T, cmap="gray", origin="lower")
        masks = label_set.regions(labels[:, :, z])
        for index, (name, mask) in enumerate(zip(label_set.region_names, masks, strict=True)):
            if mask.any():
                ax.contour(
                    mask.T.astype(float), levels=[0.5], colors=region_colour(name, index), linewidths=1.2
                )
        ax.set_title(label)
        ax.axis("off")
    fig.suptitle(f"{title}  (axial slice z={z})".strip())
    return _save(fig, Path(out))


def format_dice(dice: dict[str, float]) -> str:
    """``WT 0.91 TC 0.82 ET 0.77`` (``nan`` where a region was skipped)."""
    return " ".join(f"{k} {v:.3f}" if not math.isnan(v) else f"{k} nan" for k, v in dice.items())
