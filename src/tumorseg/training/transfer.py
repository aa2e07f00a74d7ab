"""Training from an existing model (``train.init_from``, ``tumorseg train --init-from URI``).

The parent is anything ``tumorseg predict --model`` accepts (a registered version, a run's model, an
MLflow model folder, a ``best.ckpt``) that carries PyTorch weights. The new run trains the parent's
network (its ``model:`` section replaces the project's, so the weights fit) and starts from its
weights; tensors whose shape differs (the output layer, when the new data has another label set)
start fresh and are named in the log.

Encoder levels are found by running the network once on a patch with forward hooks: every layer
that runs before the first upsampling one is in the encoder; its level is how many times the
resolution was halved at its output (so a strided convolution and the activation after it share one). ``train.freeze_encoder_stages: k``
keeps levels ``0..k-1`` fixed; ``train.encoder_lr_scale`` scales the learning rate of the other
encoder levels (transferred features change slowly, the decoder and head adapt).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tumorseg.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Parent:
    """The model a run starts from: its network, ``model:`` section and description (with version)."""

    uri: str
    network: nn.Module
    model_config: Any
    description: str
    version: str | None = None


def load_parent(uri: str, tracking_uri: str) -> Parent:
    """The parent model ``uri`` names; DataError when it has no PyTorch weights (ONNX- or
    program-only edge versions) to start from."""
    from tumorseg.registry.loading import load_model

    loaded = load_model(uri, tracking_uri=tracking_uri)
    network = loaded.trained.network
    if not isinstance(network, nn.Module) or not any(True for _ in network.parameters()):
        raise DataError(
            f"train.init_from: {uri} has no PyTorch weights to start from (a compressed edge version?); "
            "use the fp32 version it was made from, e.g. models:/tumorseg@champion"
        )
    return Parent(uri, network, loaded.trained.model, loaded.description, loaded.version)


@dataclass
class Transfer:
    """What :func:`transfer_weights` did: tensors copied and those left at their fresh initialisation."""

    copied: int
    fresh: list[str] = field(default_factory=list)

    def one_line(self, parent: Parent) -> str:
        fresh = (
            f"; {len(self.fresh)} start fresh (other shape: {', '.join(self.fresh[:4])})"
            if self.fresh
            else ""
        )
        return f"init_from {parent.description}: {self.copied} weight tensors copied{fresh}"


def transfer_weights(network: nn.Module, parent: nn.Module) -> Transfer:
    """Copy every parameter and buffer of ``parent`` whose name and shape ``network`` has too."""
    own = network.state_dict()
    theirs = parent.state_dict()
    taken = {k: v for k, v in theirs.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not taken:
        raise DataError(
            "train.init_from: the parent network shares no weight of the same name and shape with this "
            "one; its model: section is used, so this means another network class"
        )
    network.load_state_dict({**own, **taken})
    fresh = sorted(k for k in own if k not in taken)
    return Transfer(len(taken), fresh)


def encoder_levels(network: nn.Module, patch: tuple[int, ...], in_channels: int) -> dict[str, int]:
    """Parameter name -> encoder level (how many times the resolution was halved at the layer's output)
    for the layers that run before the network first upsamples; decoder parameters are absent.

    Only layers with weights and inputs of the patch's dimensionality count: padding layers (EfficientNet
    pads before its strided convolutions) and 2-D layers of a pre-processing stage neither start the
    decoder nor belong to an encoder level; layers on globally pooled features (squeeze and excitation)
    take the level of the block they sit in. The decoder starts at the first such layer whose output
    is larger than the smallest output so far.
    """
    levels: dict[str, int] = {}
    order: list[tuple[nn.Module, int, int]] = []  # leaf module with weights, input size, output size

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        first = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
        if (
            not (isinstance(first, torch.Tensor) and isinstance(output, torch.Tensor))
            or first.dim() != len(patch) + 2
        ):
            return
        order.append((module, math.prod(first.shape[2:]), math.prod(output.shape[2:])))

    leaves = [m for m in network.modules() if not list(m.children()) and list(m.parameters(recurse=False))]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        was_training = network.training
        network.eval()
        with torch.no_grad():
            network(torch.zeros(1, in_channels, *patch))
        network.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    full = math.prod(patch)
    names = {id(m): name for name, m in network.named_modules()}
    smallest = full
    for module, size_in, size_out in order:
        side_branch = size_in < smallest / 2 ** len(patch)  # on pooled features: squeeze-excitation
        if size_out > smallest and not side_branch:  # the first upsampled output: the decoder starts
            break
        if not side_branch:
            smallest = size_out
        level = max(0, round(math.log(full / smallest, 2 ** len(patch))))
        prefix = names.get(id(module))
        for pname, _ in module.named_parameters(recurse=False):
            levels.setdefault(f"{prefix}.{pname}" if prefix else pname, level)
    return levels


def freeze_levels(network: nn.Module, levels: dict[str, int], count: int) -> int:
    """Turn ``requires_grad`` off for the first ``count`` encoder levels (in the network's order);
    returns the number of frozen parameters."""
    ranks = {level: rank for rank, level in enumerate(sorted(set(levels.values())))}
    frozen = 0
    for name, parameter in network.named_parameters():
        level = levels.get(name)
        if level is not None and ranks[level] < count:
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    if count:
        log.info("init_from: the first %d encoder levels frozen (%d parameters)", count, frozen)
    return frozen
