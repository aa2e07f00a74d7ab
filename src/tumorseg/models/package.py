"""A trained model, 3-D or 2-D, as small files: ``weights.pt`` (a state_dict), ``config.json`` and, for a
2-D model, ``detector.json`` (its DetectorRule and ``predict_2d`` settings).

The self-contained form the registry stores and ``tumorseg predict`` loads: no Lightning, no optimiser
state, nothing pickled (``torch.load(weights_only=True)``). ``config.json`` holds exactly what a
``best.ckpt`` stores under ``tumorseg_config``, and the network is rebuilt with the training factory,
so both forms give identical outputs. ``--model`` may also be a package folder or an ``MLmodel`` folder.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorseg.errors import DataError

if TYPE_CHECKING:  # torch: imported by the functions that load or save weights, not by the file names
    from tumorseg.models.checkpoint import PlanarModel, TrainedNetwork

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"
DETECTOR_FILE = "detector.json"
ARTIFACT_KEYS = {"weights": WEIGHTS_FILE, "config": CONFIG_FILE, "detector": DETECTOR_FILE}
"""Package files by MLflow pyfunc artifact key (a volume model has no ``detector``)."""


def load_artifacts(artifacts: Mapping[str, str | Path]) -> TrainedNetwork:
    """The volume model of registered pyfunc artifacts in the runtime its file needs: ``weights`` (PyTorch),
    ``onnx`` (ONNX Runtime) or ``program`` (``torch.export``), each with ``config``; DataError otherwise."""
    from tumorseg.models.checkpoint import read_package_config, trained_with_network

    if "config" in artifacts and {"onnx", "program"} & set(artifacts):
        trained = trained_with_network(None, read_package_config(artifacts["config"]))  # config checked first
        if "onnx" in artifacts:
            from tumorseg.models.onnx_network import OnnxRuntimeNetwork

            trained.network = OnnxRuntimeNetwork(artifacts["onnx"])
        else:
            from tumorseg.models.program_network import ExportedProgramNetwork

            trained.network = ExportedProgramNetwork(artifacts["program"])
        return trained
    if "config" in artifacts and "weights" in artifacts:
        return load_package(artifacts["weights"], artifacts["config"])  # type: ignore[return-value]
    raise DataError(
        f"model artifacts {sorted(artifacts)}: expected config with weights, onnx or program; "
        "not a tumorseg model"
    )


def save_package(
    model: TrainedNetwork | PlanarModel, folder: str | Path, *, onnx: bool = False
) -> dict[str, Path]:
    """Write the package files of ``model`` into ``folder``; returns them by artifact key. ``onnx``: a
    3-D model also gets ``network.onnx`` (:func:`save_onnx`, key ``network_onnx``) when it exports."""
    import torch

    from tumorseg.models.checkpoint import PlanarModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = (
        ARTIFACT_KEYS if isinstance(model, PlanarModel) else {"weights": WEIGHTS_FILE, "config": CONFIG_FILE}
    )
    paths = {key: folder / name for key, name in keys.items()}
    state = {k: v.detach().cpu().contiguous() for k, v in model.network.state_dict().items()}
    torch.save(state, paths["weights"])
    paths["config"].write_text(json.dumps(model.config, indent=1, sort_keys=True) + "\n")
    if isinstance(model, PlanarModel):
        detector = {"detector": model.detector.to_dict(), "predict_2d": model.predict_settings}
        paths["detector"].write_text(json.dumps(detector, indent=1, sort_keys=True) + "\n")
    elif onnx and (onnx_file := save_onnx(model, folder)) is not None:
        from tumorseg.models.onnx_predictor import ONNX_ARTIFACT

        paths[ONNX_ARTIFACT] = onnx_file
    return paths


def load_package(
    weights: str | Path, config: str | Path, detector: str | Path | None = None, description: str = ""
) -> TrainedNetwork | PlanarModel:
    """Load what :func:`save_package` wrote, a 2-D :class:`PlanarModel` when ``detector`` is given;
    DataError for a missing or unreadable file, or weights that do not fit the config."""
    import torch

    from tumorseg.models.checkpoint import (
        PlanarModel,
        planar_network_from_state,
        read_package_config,
        trained_from_state,
    )
    from tumorseg.models.planar_detection import DetectorRule

    for path in (weights, detector):
        if path is not None and not Path(path).is_file():
            raise DataError(f"{path}: missing from the model package")
    cfg = read_package_config(config)
    extra = read_package_config(detector) if detector is not None else {}
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"{weights}: not a readable state_dict ({type(exc).__name__})") from None
    if detector is None:
        return trained_from_state(cfg, state)
    return PlanarModel(
        planar_network_from_state(cfg, state),
        cfg,
        DetectorRule.from_dict(extra.get("detector") or {"method": "classifier", "threshold": 0.5}),
        dict(extra.get("predict_2d") or {}),
        description,
    )


def from_folder(folder: Path, description: str) -> PlanarModel:
    """A 2-D package folder, or an MLflow model folder whose pyfunc artifacts are a 2-D package."""
    if (folder / "MLmodel").is_file():
        from mlflow.models import Model

        pyfunc = Model.load(str(folder / "MLmodel")).flavors.get("python_function", {}) or {}
        artifacts = pyfunc.get("artifacts") or {}
        if not {"config", "detector"} <= set(artifacts):
            raise DataError(
                f"{description}: not a tumorseg 2-D model (its MLmodel lacks {sorted(ARTIFACT_KEYS)})"
            )
        paths = {key: folder / entry["path"] for key, entry in artifacts.items()}
        model = load_planar_artifacts(paths, description)
        from tumorseg.monitoring.drift import load_profile

        model.drift_profile = load_profile(paths)
        return model
    if (folder / WEIGHTS_FILE).is_file():
        return load_package(*(folder / name for name in ARTIFACT_KEYS.values()), description)
    raise DataError(
        f"{description}: neither a 2-D model package ({WEIGHTS_FILE}...) nor an MLflow model folder"
    )


def save_onnx(model: TrainedNetwork, folder: str | Path) -> Path | None:
    """Write the fp32 network of a 3-D ``model`` as ``folder/network.onnx`` for the torch-free ``predict``
    and return it; None (logged) when the export fails or its logits drift from PyTorch's, so the
    model still registers and ``predict`` takes the torch path."""
    from tumorseg.models.onnx_network import export_fp32_onnx
    from tumorseg.models.onnx_predictor import ONNX_FILE

    if len(model.roi_size) != 3:
        return None
    path = Path(folder) / ONNX_FILE
    try:
        difference = export_fp32_onnx(model.network, path, model.roi_size)
    except DataError as exc:
        log.warning("no ONNX network in the package (predict will use PyTorch): %s", exc)
        return None
    log.info("exported %s (max |ONNX Runtime - PyTorch| logit %.2g)", path.name, difference)
    return path


def planar_edge_model(artifacts: dict[str, Path], description: str = "2-D edge model") -> Any:
    """A registered 2-D edge version as a :class:`~tumorseg.models.checkpoint.PlanarModel` running its
    file: ``onnx`` (ONNX Runtime) or ``program`` (``torch.export``), with ``config`` and ``detector``.
    DataError when one is missing."""
    from tumorseg.models.checkpoint import PlanarModel, read_package_config
    from tumorseg.models.planar_detection import DetectorRule

    runtime = next((key for key in ("onnx", "program") if key in artifacts), None)
    missing = [key for key in ("config", "detector") if key not in artifacts]
    if runtime is None or missing:
        raise DataError(f"{description}: artifacts {sorted(artifacts)} lack {missing or ['onnx or program']}")
    if runtime == "onnx":
        from tumorseg.models.onnx_network import OnnxRuntimeOutputs

        network: Any = OnnxRuntimeOutputs(artifacts["onnx"])
    else:
        from tumorseg.models.program_network import ExportedProgramNetwork

        network = ExportedProgramNetwork(artifacts["program"])
    extra = read_package_config(artifacts["detector"])
    return PlanarModel(
        network,
        read_package_config(artifacts["config"]),
        DetectorRule.from_dict(extra["detector"]),
        dict(extra.get("predict_2d") or {}),
        description,
    )


def load_planar_artifacts(paths: dict[str, Path], description: str) -> PlanarModel:
    """A registered 2-D version from its artifact files: the trained package (``weights``, ``config``,
    ``detector``) or a compressed edge variant (``onnx`` or ``program`` instead of ``weights``)."""
    if "weights" in paths:
        return load_package(*(paths[key] for key in ARTIFACT_KEYS), description)
    return planar_edge_model(paths, description)
