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

from tumorseg.errors import DataError
from tumorseg.models.checkpoint import TrainedNetwork, read_package_config, trained_from_state

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"


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
