"""Score a trained network on a split: sliding-window inference + MONAI Dice per region.

The test-set scoring the training stage runs after fitting (``train.score_test``), kept apart from
training so an evaluation stage can call it as it is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tumorseg.config import read_params
from tumorseg.data.datamodule import case_records, read_split
from tumorseg.data.manifest import atomic_write_text
from tumorseg.data.transforms import load_preprocessed_case
from tumorseg.errors import ConfigError
from tumorseg.models.checkpoint import TrainedNetwork, load_trained_network
from tumorseg.models.inference import labels_to_regions, predict_labels
from tumorseg.models.lightning_module import aggregate_case_dice
from tumorseg.params import Params, as_params

METRICS_FILE = "metrics.json"


def predict_cases(
    trained: TrainedNetwork, records: list[dict[str, Any]], *, device: str | torch.device = "cpu"
) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]]:
    """Yield ``(record, case arrays, predicted canonical labels (X, Y, Z))`` for each case."""
    network = trained.network.to(device).eval()
    inferer = trained.inferer()
    for record in records:
        case = load_preprocessed_case(record["path"])
        image = torch.from_numpy(case["image"])[None].to(device)
        _, labels = predict_labels(
            network,
            image,
            inferer,
            trained.model.output,
            trained.sliding_window.threshold,
            min_component_mm3=trained.sliding_window.min_component_mm3,
            spacing_mm=trained.spacing_mm,
            label_set=trained.label_set,
        )
        yield record, case, labels[0, 0].cpu().numpy()


def score_split(
    model_or_ckpt: TrainedNetwork | str | Path,
    split: str = "test",
    *,
    params: Params | dict[str, Any] = None,
    source: str = "params.yaml",
    ignore_empty: bool | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """``{"dice_<region>", "dice_mean", "n_cases", "cases"}`` of a trained network on one split.

    ``params`` (read from ``source`` when None) gives the data paths. ``ignore_empty`` defaults to
    ``train.dice_ignore_empty`` (False, as BraTS: an empty region predicted empty scores 1).
    """
    params = as_params(params, source)
    from monai.metrics import DiceMetric

    params = read_params(source) if params is None else params
    paths = params.paths
    trained = model_or_ckpt
    if not isinstance(trained, TrainedNetwork):
        trained = load_trained_network(trained)
    if ignore_empty is None:
        ignore_empty = bool(trained.config.get("train", {}).get("dice_ignore_empty", False))
    case_ids = read_split(paths.split).get(split, [])
    if not case_ids:
        raise ConfigError(
            f"{source}: paths.split: {paths.split} has no {split!r} cases; rerun `tumorseg split`"
        )
    records = case_records(paths.preprocessed, case_ids)
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=ignore_empty)
    names = trained.label_set.region_names
    per_case: dict[str, dict[str, float]] = {}
    case_dice: list[torch.Tensor] = []
    for record, case, labels in predict_cases(trained, records, device=device):
        truth = labels_to_regions(torch.from_numpy(case["label"])[None], trained.label_set)
        pred = labels_to_regions(torch.from_numpy(labels)[None, None], trained.label_set)
        dice = metric(y_pred=pred, y=truth)[0]
        case_dice.append(dice)
        per_case[record["case_id"]] = {name: float(dice[i]) for i, name in enumerate(names)}
    # Aggregated here, not with metric.aggregate(): after a DDP fit the process group is still up
    # and MONAI would try to all-gather with ranks that have already finished.
    summary = aggregate_case_dice(torch.stack(case_dice), names=names)
    result: dict[str, Any] = {f"dice_{name}": value for name, value in summary.items()}
    result["n_cases"] = len(records)
    result["cases"] = per_case
    return result


def write_split_metrics(scores: dict[str, Any], reports_dir: str | Path, split: str = "test") -> Path:
    """Merge ``{split: scores less "cases"}`` into ``reports/metrics.json`` atomically, keeping other keys."""
    path = Path(reports_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    current: dict[str, Any] = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text())
        except json.JSONDecodeError:
            current = {}
    current[split] = json_ready({k: v for k, v in scores.items() if k != "cases"})
    atomic_write_text(path, json.dumps(current, indent=2) + "\n")
    return path


def json_ready(value: Any) -> Any:
    """``value`` with every float rounded to 6 places and NaN as None (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    return value
