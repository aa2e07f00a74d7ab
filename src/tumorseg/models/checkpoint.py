"""The trained-model containers, 3-D and 2-D, rebuilt from a training checkpoint without Lightning.

Checkpoints store the resolved params sections under ``tumorseg_config`` beside the ``state_dict``;
packages (:mod:`tumorseg.models.package`) store them as ``config.json``. A config with a ``model_2d``
section is a 2-D model (:class:`PlanarModel`), any other a volume model (:class:`TrainedNetwork`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tumorseg.config import without_retired
from tumorseg.data.conventions import LabelSet, get_label_set
from tumorseg.data.transforms import DataLoaderConfig
from tumorseg.errors import DataError, first_line
from tumorseg.models.config import SlidingWindowConfig
from tumorseg.models.inference import make_inferer
from tumorseg.models.networks import ModelConfig, build_network
from tumorseg.models.planar_detection import DetectorRule

CONFIG_CHECKPOINT_KEY = "tumorseg_config"
"""Key of the resolved params sections in a training checkpoint (written by the LightningModule)."""
NETWORK_PREFIX = "network."
"""Prefix of the network's weights in the LightningModule's state_dict."""


@dataclass
class TrainedNetwork:
    """A trained volume network (eval mode, CPU: ``(B, 4, *patch)`` -> ``(B, C, *patch)`` logits) with the
    settings to run it on whole volumes; ``config`` holds all resolved sections stored with it."""

    network: nn.Module
    model: ModelConfig
    data_loader: DataLoaderConfig
    sliding_window: SlidingWindowConfig
    config: dict[str, Any]

    @property
    def spacing_mm(self) -> tuple[float, ...]:
        """Voxel spacing the network was trained at (``preprocess.target_spacing_mm``)."""
        return tuple(self.config.get("preprocess", {}).get("target_spacing_mm", (1.0, 1.0, 1.0)))

    @property
    def roi_size(self) -> tuple[int, ...]:
        return self.data_loader.network_patch

    @property
    def label_set(self) -> LabelSet:
        """The label space it was trained in (``glioma`` for models saved before label sets)."""
        return get_label_set(self.model.label_set)

    def inferer(self, sliding_window: SlidingWindowConfig | None = None) -> Any:
        """MONAI inferer for whole volumes (the stored sliding-window settings unless overridden)."""
        return make_inferer(sliding_window or self.sliding_window, self.roi_size)


@dataclass
class PlanarModel:
    """A trained 2-D network (eval mode, CPU) with everything prediction needs: the training sections
    (``preprocess_2d`` prepares an image), the detector, ``predict_2d`` settings and its origin in words."""

    network: Any
    config: dict[str, Any]
    detector: DetectorRule = field(default_factory=lambda: DetectorRule("classifier", 0.5))
    predict_settings: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    drift_profile: Any = None
    """The training images' :class:`~tumorseg.monitoring.drift.Profile` (registered models only)."""

    @property
    def preprocess(self) -> Any:
        """The ``preprocess_2d`` section the network was trained on."""
        from tumorseg.config import PlanarPreprocessConfig

        return PlanarPreprocessConfig.model_validate(self.config.get("preprocess_2d", {}))

    @property
    def settings(self) -> Any:
        from tumorseg.models.config import PredictPlanarConfig

        return PredictPlanarConfig.model_validate(self.predict_settings)


def load_checkpoint(checkpoint: str | Path, dims: int | None = None) -> TrainedNetwork | PlanarModel:
    """A ``tumorseg train`` checkpoint (``best.ckpt``/``last.ckpt``) of either dimensionality.

    ``dims`` None lets the stored config decide; a 2-D model gets the classifier detector at 0.5
    until the 2-D evaluation chooses one. DataError if missing, unreadable or foreign.
    """
    path = Path(checkpoint)
    if not path.is_file() and dims != 2:
        raise DataError(f"{path}: no checkpoint; run `tumorseg train` first")
    try:
        # weights_only=False: Lightning checkpoints hold plain Python objects (callback states);
        # only load checkpoints you produced.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise DataError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    config = state.get(CONFIG_CHECKPOINT_KEY)
    dims = dims or (2 if isinstance(config, dict) and "model_2d" in config else 3)
    if dims == 3 and (not isinstance(config, dict) or "model" not in config):
        raise DataError(f"{path}: not a tumorseg training checkpoint (no {CONFIG_CHECKPOINT_KEY})")
    weights = {
        k.removeprefix(NETWORK_PREFIX): v
        for k, v in state["state_dict"].items()
        if k.startswith(NETWORK_PREFIX)
    }
    if dims == 2:
        config = config or {}
        return PlanarModel(
            planar_network_from_state(config, weights), config, description=f"checkpoint {path}"
        )
    try:
        return trained_from_state(config, weights)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None


def load_trained_network(checkpoint: str | Path) -> TrainedNetwork:
    """A volume model's checkpoint (:func:`load_checkpoint`)."""
    return load_checkpoint(checkpoint, dims=3)  # type: ignore[return-value]


def load_planar_checkpoint(checkpoint: str | Path) -> PlanarModel:
    """A ``tumorseg train --dims 2`` checkpoint (:func:`load_checkpoint`)."""
    return load_checkpoint(checkpoint, dims=2)  # type: ignore[return-value]


def _load_weights(network: nn.Module, state_dict: dict[str, Any], what: str) -> None:
    try:
        network.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise DataError(
            f"weights do not fit the {what} network of the config ({first_line(exc, 10_000)})"
        ) from None
    network.eval()


def trained_from_state(config: dict[str, Any], state_dict: dict[str, Any]) -> TrainedNetwork:
    """Rebuild a :class:`TrainedNetwork` from resolved params sections and the network's ``state_dict``
    (keys without Lightning's ``network.`` prefix); DataError for a missing section or unfit weights."""
    shell = trained_with_network(None, config)
    network = build_network(
        shell.model,
        spatial_dims=shell.data_loader.spatial_dims,
        patch_size=shell.data_loader.network_patch,
        spacing=shell.spacing_mm,
    )
    _load_weights(network, state_dict, shell.model.name)
    shell.network = network
    return shell


def planar_network_from_state(config: dict[str, Any], state: dict[str, Any]) -> Any:
    """Rebuild the PlanarNetwork of ``config`` and load ``state``; DataError when they do not fit."""
    from tumorseg.models.config import PlanarModelConfig
    from tumorseg.models.planar_network import build_planar_network

    if "model_2d" not in config:
        raise DataError(
            "model config lacks the model_2d section; it was not written by tumorseg train --dims 2"
        )
    network = build_planar_network(PlanarModelConfig.model_validate(config["model_2d"]))
    _load_weights(network, state, "2-D")
    return network


def trained_with_network(network: Any, config: dict[str, Any]) -> TrainedNetwork:
    """A :class:`TrainedNetwork` of ``network`` (any module mapping windows to logits) and its config."""
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
    """The ``config.json`` (or ``detector.json``) of a model package (DataError if missing or not JSON)."""
    config = Path(config)
    if not config.is_file():
        raise DataError(f"{config}: missing from the model package")
    try:
        return json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{config}: not a readable model config ({type(exc).__name__})") from None
