"""A trained network as two small files: ``weights.pt`` (a state_dict) and ``config.json``.

This is the self-contained form the model registry stores and ``tumorseg predict`` loads: no
Lightning, no optimiser state and no pickled Python objects. ``weights.pt`` holds tensors only
and is read with ``torch.load(weights_only=True)``; ``config.json`` holds the resolved params
sections of the training run (``model``, ``data_loader``, ``sliding_window``, ``preprocess``, ...),
exactly what a ``best.ckpt`` stores under ``tumorseg_config``. The network is rebuilt with the
same factory as in training, so the two forms give identical outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tumorseg.errors import DataError
from tumorseg.models.checkpoint import TrainedNetwork

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"


def trained_from_state(config: dict[str, Any], state_dict: dict[str, Any]) -> TrainedNetwork:
    """Rebuild a :class:`TrainedNetwork` from resolved params sections and the network's weights.

    Args:
        config: the training run's resolved sections (``model``, ``data_loader``, ``sliding_window``,
            ``preprocess`` at least).
        state_dict: the network's ``state_dict`` (keys without Lightning's ``network.`` prefix).

    Raises:
        DataError: the config lacks a section or the weights do not fit the network it describes.
    """
    from tumorseg.data.transforms import DataLoaderConfig
    from tumorseg.models.inference import SlidingWindowConfig
    from tumorseg.models.networks import ModelConfig, build_network

    missing = [key for key in ("model", "data_loader", "preprocess") if key not in config]
    if missing:
        raise DataError(f"model config lacks the sections {missing}; it was not written by tumorseg")
    model = ModelConfig.model_validate(config["model"])
    loader = DataLoaderConfig.model_validate(config["data_loader"])
    sliding = SlidingWindowConfig.model_validate(config.get("sliding_window", {}))
    spacing = tuple(config["preprocess"].get("target_spacing_mm", (1.0, 1.0, 1.0)))
    network = build_network(
        model, spatial_dims=loader.spatial_dims, patch_size=loader.network_patch, spacing=spacing
    )
    try:
        network.load_state_dict(state_dict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise DataError(f"weights do not fit the {model.name} network of the config ({first})") from None
    network.eval()
    return TrainedNetwork(network, model, loader, sliding, config)


def save_package(trained: TrainedNetwork, folder: str | Path) -> dict[str, Path]:
    """Write ``weights.pt`` and ``config.json`` of a trained network into ``folder``.

    Returns:
        ``{"weights": path, "config": path}`` (the names MLflow pyfunc artifacts use).
    """
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    config = folder / CONFIG_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in trained.network.state_dict().items()}
    torch.save(state, weights)
    config.write_text(json.dumps(trained.config, indent=1, sort_keys=True) + "\n")
    return {"weights": weights, "config": config}


def load_package(weights: str | Path, config: str | Path) -> TrainedNetwork:
    """Load what :func:`save_package` wrote (``weights_only=True``: tensors, never code).

    Raises:
        DataError: a file is missing or unreadable, or the weights do not fit the config.
    """
    import pickle

    import torch

    weights, config = Path(weights), Path(config)
    for path in (weights, config):
        if not path.is_file():
            raise DataError(f"{path}: missing from the model package")
    try:
        cfg = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{config}: not a readable model config ({type(exc).__name__})") from None
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"{weights}: not a readable state_dict ({type(exc).__name__})") from None
    return trained_from_state(cfg, state)
