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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tumorseg.errors import DataError, first_line
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
    from tumorseg.models.networks import build_network

    shell = trained_with_network(None, config)
    network = build_network(
        shell.model,
        spatial_dims=shell.data_loader.spatial_dims,
        patch_size=shell.data_loader.network_patch,
        spacing=shell.spacing_mm,
    )
    try:
        network.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise DataError(
            f"weights do not fit the {shell.model.name} network of the config ({first_line(exc, 10_000)})"
        ) from None
    network.eval()
    shell.network = network
    return shell


def trained_with_network(network: Any, config: dict[str, Any]) -> TrainedNetwork:
    """A :class:`TrainedNetwork` of ``network`` (any module mapping windows to logits) and its run's config.

    Raises:
        DataError: the config lacks the ``model``, ``data_loader`` or ``preprocess`` section.
    """
    from tumorseg.config import without_retired
    from tumorseg.data.transforms import DataLoaderConfig
    from tumorseg.models.inference import SlidingWindowConfig
    from tumorseg.models.networks import ModelConfig

    missing = [key for key in ("model", "data_loader", "preprocess") if key not in config]
    if missing:
        raise DataError(f"model config lacks the sections {missing}; it was not written by tumorseg")
    return TrainedNetwork(
        network,
        ModelConfig.model_validate(config["model"]),
        # models registered before a key was retired still load
        DataLoaderConfig.model_validate(without_retired("data_loader", config["data_loader"])),
        SlidingWindowConfig.model_validate(config.get("sliding_window", {})),
        config,
    )


def read_package_config(config: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a model package.

    Raises:
        DataError: the file is missing or is not JSON.
    """
    config = Path(config)
    if not config.is_file():
        raise DataError(f"{config}: missing from the model package")
    try:
        return json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{config}: not a readable model config ({type(exc).__name__})") from None


def load_artifacts(artifacts: Mapping[str, str | Path]) -> TrainedNetwork:
    """The network of a registered model from its pyfunc artifacts, in the runtime its file needs.

    ``weights`` (``weights.pt``: the fp32 model, rebuilt and run in PyTorch), ``onnx`` (a compressed
    variant run by ONNX Runtime) or ``program`` (a ``torch.export`` program, e.g. the bfloat16
    variants), each with ``config``.

    Raises:
        DataError: none of those files, or one that is missing or unreadable.
    """
    if "config" in artifacts:
        if "onnx" in artifacts:
            from tumorseg.models.onnx_network import load_onnx_package

            return load_onnx_package(artifacts["onnx"], artifacts["config"])
        if "program" in artifacts:
            from tumorseg.models.program_network import load_program_package

            return load_program_package(artifacts["program"], artifacts["config"])
        if "weights" in artifacts:
            return load_package(artifacts["weights"], artifacts["config"])
    raise DataError(
        f"model artifacts {sorted(artifacts)}: expected config with weights, onnx or program; "
        "not a tumorseg model"
    )


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

    weights = Path(weights)
    if not weights.is_file():
        raise DataError(f"{weights}: missing from the model package")
    cfg = read_package_config(config)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"{weights}: not a readable state_dict ({type(exc).__name__})") from None
    return trained_from_state(cfg, state)
