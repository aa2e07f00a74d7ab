"""Rebuild a trained network from a training checkpoint, without Lightning.

Every checkpoint written by ``tumorseg train`` stores the resolved params sections under
``tumorseg_config`` next to the LightningModule's ``state_dict``; evaluation, export,
compression and serving rebuild the network with the same factory and load the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tumorseg.data.conventions import LabelSet, get_label_set
from tumorseg.data.transforms import DataLoaderConfig
from tumorseg.errors import DataError
from tumorseg.models.inference import SlidingWindowConfig, make_inferer
from tumorseg.models.lightning_module import CONFIG_CHECKPOINT_KEY
from tumorseg.models.networks import ModelConfig

NETWORK_PREFIX = "network."
"""Prefix of the network's weights in the LightningModule's state_dict."""


@dataclass
class TrainedNetwork:
    """A trained network with the settings needed to run it on whole volumes.

    Attributes:
        network: in eval mode, on CPU; maps ``(B, 4, *patch)`` to ``(B, C, *patch)`` logits.
        model: the ``model:`` section it was built from (``output`` tells regions vs labels).
        data_loader: the ``data_loader:`` section (patch size, 2-D or 3-D).
        sliding_window: the ``sliding_window:`` section used for validation.
        config: all resolved sections stored in the checkpoint.
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
    """Load ``best.ckpt`` / ``last.ckpt`` written by ``tumorseg train``.

    Raises:
        DataError: the file is missing or was not written by ``tumorseg train``.
    """
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
    from tumorseg.models.package import trained_from_state  # the package form: same rebuild

    try:
        return trained_from_state(config, weights)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
