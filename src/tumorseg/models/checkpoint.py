"""Rebuild a trained network from a training checkpoint or a package's config, without Lightning.

Checkpoints store the resolved params sections under ``tumorseg_config`` beside the ``state_dict``;
packages store them as ``config.json``. The network is rebuilt with the training factory
(:func:`trained_from_state`), or another runtime's network is wrapped (:func:`trained_with_network`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
from tumorseg.models.lightning_module import CONFIG_CHECKPOINT_KEY
from tumorseg.models.networks import ModelConfig, build_network

NETWORK_PREFIX = "network."
"""Prefix of the network's weights in the LightningModule's state_dict."""


@dataclass
class TrainedNetwork:
    """A trained network with the settings needed to run it on whole volumes.

    ``network`` is in eval mode, on CPU, mapping ``(B, 4, *patch)`` to ``(B, C, *patch)`` logits;
    ``config`` holds all resolved sections stored with it.
    """

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


def load_trained_network(checkpoint: str | Path) -> TrainedNetwork:
    """Load ``best.ckpt`` / ``last.ckpt`` written by ``tumorseg train`` (DataError if missing or foreign)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise DataError(f"{path}: no checkpoint; run `tumorseg train` first")
    # weights_only=False: Lightning checkpoints hold plain Python objects (callback states);
    # only load checkpoints you produced.
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = state.get(CONFIG_CHECKPOINT_KEY)
    if not isinstance(config, dict) or "model" not in config:
        raise DataError(f"{path}: not a tumorseg training checkpoint (no {CONFIG_CHECKPOINT_KEY})")
    weights = {
        k.removeprefix(NETWORK_PREFIX): v
        for k, v in state["state_dict"].items()
        if k.startswith(NETWORK_PREFIX)
    }
    try:
        return trained_from_state(config, weights)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None


def trained_from_state(config: dict[str, Any], state_dict: dict[str, Any]) -> TrainedNetwork:
    """Rebuild a :class:`TrainedNetwork` from resolved params sections and the network's ``state_dict``.

    ``state_dict`` keys lack Lightning's ``network.`` prefix. DataError if the config lacks a section
    or the weights do not fit the network it describes.
    """
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
    """The ``config.json`` of a model package (DataError if missing or not JSON)."""
    config = Path(config)
    if not config.is_file():
        raise DataError(f"{config}: missing from the model package")
    try:
        return json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{config}: not a readable model config ({type(exc).__name__})") from None
