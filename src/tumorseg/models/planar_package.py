"""A trained 2-D model as a self-contained folder, and loading it from any ``--model`` form.

Package files, nothing pickled: ``weights.pt`` (state_dict, ``weights_only=True``), ``config.json``
(resolved sections) and ``detector.json`` (DetectorRule, predict_2d). ``--model`` is this folder, a
``train --dims 2`` checkpoint (classifier detector at 0.5), an ``MLmodel`` folder or an MLflow URI.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from tumorseg.config import Section
from tumorseg.errors import DataError, first_line
from tumorseg.models.planar_detection import DetectorRule

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"
DETECTOR_FILE = "detector.json"
ARTIFACT_KEYS = {"weights": WEIGHTS_FILE, "config": CONFIG_FILE, "detector": DETECTOR_FILE}


class PredictPlanarConfig(Section):
    """``predict_2d:`` inference settings, stored with the registered models.

    Attributes:
        model, detect_model: default ``--model`` of ``tumorseg predict`` (2-D input) and ``tumorseg detect``.
        min_component_px: drop smaller predicted components (preprocessed grid pixels); 0 keeps all.
    """

    model: str = "models:/tumorseg-2d@champion"
    detect_model: str = "models:/tumorseg-detect@champion"
    mask_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    min_component_px: int = Field(20, ge=0)


@dataclass
class PlanarModel:
    """A trained 2-D network (eval mode, CPU) with everything prediction needs: the training sections
    (``preprocess_2d`` prepares an image), the detector, ``predict_2d`` settings and its origin in words."""

    network: Any
    config: dict[str, Any]
    detector: DetectorRule = field(default_factory=lambda: DetectorRule("classifier", 0.5))
    predict_settings: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def preprocess(self) -> Any:
        """The ``preprocess_2d`` section the network was trained on."""
        from tumorseg.data.planar import PlanarPreprocessConfig

        return PlanarPreprocessConfig.model_validate(self.config.get("preprocess_2d", {}))

    @property
    def settings(self) -> Any:
        return PredictPlanarConfig.model_validate(self.predict_settings)


def network_from_state(config: dict[str, Any], state: dict[str, Any]) -> Any:
    """Rebuild the PlanarNetwork of ``config`` and load ``state``; DataError when they do not fit."""
    from tumorseg.models.config import PlanarModelConfig
    from tumorseg.models.planar_network import build_planar_network

    if "model_2d" not in config:
        raise DataError(
            "model config lacks the model_2d section; it was not written by tumorseg train --dims 2"
        )
    network = build_planar_network(PlanarModelConfig.model_validate(config["model_2d"]))
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(
            f"weights do not fit the 2-D network of the config ({first_line(exc, 10_000)})"
        ) from None
    return network.eval()


def load_planar_checkpoint(checkpoint: str | Path) -> PlanarModel:
    """A ``tumorseg train --dims 2`` checkpoint's network (classifier detector at 0.5 until evaluated)."""
    import torch

    from tumorseg.models.lightning_module import CONFIG_CHECKPOINT_KEY

    path = Path(checkpoint)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise DataError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    config = state.get(CONFIG_CHECKPOINT_KEY) or {}
    weights = {
        k.removeprefix("network."): v for k, v in state["state_dict"].items() if k.startswith("network.")
    }
    return PlanarModel(network_from_state(config, weights), config, description=f"checkpoint {path}")


def save_planar_package(model: PlanarModel, folder: str | Path) -> dict[str, Path]:
    """Write ``weights.pt``, ``config.json``, ``detector.json`` to ``folder``; return them by artifact key."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: folder / name for key, name in ARTIFACT_KEYS.items()}
    weights = {k: v.detach().cpu().contiguous() for k, v in model.network.state_dict().items()}
    torch.save(weights, paths["weights"])
    paths["config"].write_text(json.dumps(model.config, indent=1, sort_keys=True) + "\n")
    detector = {"detector": model.detector.to_dict(), "predict_2d": model.predict_settings}
    paths["detector"].write_text(json.dumps(detector, indent=1, sort_keys=True) + "\n")
    return paths


def load_planar_package(
    weights: str | Path, config: str | Path, detector: str | Path, description: str = ""
) -> PlanarModel:
    """Load what :func:`save_planar_package` wrote; DataError for a missing or unreadable file."""
    import torch

    for path in (Path(weights), Path(config), Path(detector)):
        if not path.is_file():
            raise DataError(f"{path}: missing from the 2-D model package")
    try:
        cfg = json.loads(Path(config).read_text())
        extra = json.loads(Path(detector).read_text())
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{Path(weights).parent}: not a readable 2-D model package ({type(exc).__name__})"
        ) from None
    return PlanarModel(
        network_from_state(cfg, state),
        cfg,
        DetectorRule.from_dict(extra.get("detector") or {"method": "classifier", "threshold": 0.5}),
        dict(extra.get("predict_2d") or {}),
        description,
    )


def from_folder(folder: Path, description: str) -> PlanarModel:
    """A package folder, or an MLflow model folder whose pyfunc artifacts are a package."""
    if (folder / "MLmodel").is_file():
        from mlflow.models import Model

        pyfunc = Model.load(str(folder / "MLmodel")).flavors.get("python_function", {}) or {}
        artifacts = pyfunc.get("artifacts") or {}
        if not set(ARTIFACT_KEYS) <= set(artifacts):
            raise DataError(
                f"{description}: not a tumorseg 2-D model (its MLmodel lacks {sorted(ARTIFACT_KEYS)})"
            )
        return load_planar_package(*(folder / artifacts[key]["path"] for key in ARTIFACT_KEYS), description)
    if (folder / WEIGHTS_FILE).is_file():
        return load_planar_package(*(folder / name for name in ARTIFACT_KEYS.values()), description)
    raise DataError(
        f"{description}: neither a 2-D model package ({WEIGHTS_FILE}...) nor an MLflow model folder"
    )
