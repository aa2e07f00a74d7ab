"""Pruning a trained network: global magnitude (unstructured) and channel (structured).

Unstructured pruning (``torch.nn.utils.prune``) zeroes the smallest conv weights across all layers;
the mask stays attached through the fine-tune and :func:`make_permanent` folds it in. Dense kernels
do not skip zeros: only a compressed file shrinks. Structured pruning (Torch-Pruning's DepGraph)
removes whole channels with every layer depending on them: the network gets smaller and faster.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tumorseg.errors import DataError

log = logging.getLogger(__name__)

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class PruneStats:
    """What pruning did to a network: ``gmacs_*`` are 10^9 multiply-accumulates of one ``(1, 4, *patch)``
    window (dense count: zeros still cost time); ``fine_tune`` holds each round's ``FineTuneResult``."""

    method: str
    parameters_before: int
    parameters_after: int
    nonzero_after: int
    conv_sparsity: float
    gmacs_before: float
    gmacs_after: float
    rounds: int = 1
    fine_tune_steps: int = 0
    fine_tune_loss: float | None = None
    fine_tune: list[dict[str, Any]] = field(default_factory=list)


def count_parameters(network: nn.Module) -> int:
    """All parameters (pruning masks are buffers, not counted)."""
    return sum(p.numel() for p in network.parameters())


def count_nonzero(network: nn.Module) -> int:
    """Parameters that are not exactly zero (after :func:`make_permanent`)."""
    return int(sum(int(torch.count_nonzero(p.detach())) for p in network.parameters()))


def conv_sparsity(network: nn.Module) -> float:
    """Share of exactly-zero weights over every conv and transposed-conv layer."""
    total = zeros = 0
    for module in network.modules():
        if isinstance(module, CONV_TYPES):
            weight = module.weight.detach()
            total += weight.numel()
            zeros += int((weight == 0).sum())
    return zeros / total if total else 0.0


def gmacs(network: nn.Module, example: torch.Tensor) -> float:
    """Multiply-accumulates of one forward pass, in units of 10^9 (Torch-Pruning's counter)."""
    import torch_pruning as tp

    was_training = network.training
    network.eval()
    macs, _ = tp.utils.count_ops_and_params(network, example)
    network.train(was_training)
    return float(macs) / 1e9


def _conv_weights(network: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(module, "weight") for module in network.modules() if isinstance(module, CONV_TYPES)]


def prune_unstructured(network: nn.Module, amount: float) -> None:
    """Zero the ``amount`` smallest-|w| share of all conv weights, globally, in place; the mask stays
    attached (``weight = weight_orig * weight_mask``). DataError without a conv layer."""
    from torch.nn.utils import prune

    targets = _conv_weights(network)
    if not targets:
        raise DataError(f"unstructured pruning: {type(network).__name__} has no conv layer to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)


def make_permanent(network: nn.Module) -> None:
    """Fold every pruning mask into its weight (``prune.remove``): plain tensors, zeros kept."""
    from torch.nn.utils import prune

    for module in network.modules():
        for name in [
            hook._tensor_name for hook in module._forward_pre_hooks.values() if hasattr(hook, "_tensor_name")
        ]:
            prune.remove(module, name)


def expand_shared_prelu(network: nn.Module, example: torch.Tensor) -> int:
    """Replace each single-slope ``PReLU`` in place by a per-channel one with that slope; returns how many.

    Torch-Pruning 1.6 cannot follow MONAI's shared-slope ``PReLU()`` (its graph follows the slope's
    reshape and fails on the skip concatenations); equal per-channel slopes compute the same function
    and prune like a norm layer. ``example`` ``(1, 4, *patch)`` gives the channel counts.
    """
    channels: dict[nn.Module, int] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        channels[module] = int(inputs[0].shape[1])

    hooks = [
        module.register_forward_hook(record)
        for module in network.modules()
        if isinstance(module, nn.PReLU) and module.num_parameters == 1
    ]
    try:
        with torch.no_grad():
            network(example)
    finally:
        for hook in hooks:
            hook.remove()
    replaced = 0
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if child in channels:
                wide = nn.PReLU(channels[child])
                with torch.no_grad():
                    wide.weight.fill_(float(child.weight.reshape(-1)[0]))
                setattr(parent, name, wide)
                replaced += 1
    return replaced


def output_layers(network: nn.Module, out_channels: int) -> list[nn.Module]:
    """Conv layers producing ``out_channels`` maps: the head, which must keep its channels."""
    return [m for m in network.modules() if isinstance(m, CONV_TYPES) and m.out_channels == out_channels]


def prune_channels(
    network: nn.Module, ratio: float, example: torch.Tensor, out_channels: int, *, channel_multiple: int = 1
) -> None:
    """Remove ``ratio`` of the channels of every prunable layer in one shot (see the rounds version)."""
    for _ in prune_channels_in_rounds(
        network, ratio, example, out_channels, rounds=1, channel_multiple=channel_multiple
    ):
        pass


def prune_channels_in_rounds(
    network: nn.Module,
    ratio: float,
    example: torch.Tensor,
    out_channels: int,
    *,
    rounds: int = 1,
    channel_multiple: int = 1,
) -> Iterator[int]:
    """Remove ``ratio`` of the channels in ``rounds`` equal steps; yields the round number after each.

    The caller fine-tunes between rounds, so channel importance (L2 norm of the weights) is re-ranked
    on adapted weights. ``example`` ``(1, 4, *patch)`` traces the dependency graph; the input and the
    head's ``out_channels`` are kept. DataError: the network cannot be traced, or its output shape changed.
    """
    import torch_pruning as tp

    network.eval()
    with torch.no_grad():
        expected = tuple(network(example).shape)
    expand_shared_prelu(network, example)
    for number in range(1, rounds + 1):
        network.eval()
        try:
            if number == 1:
                pruner = tp.pruner.MetaPruner(
                    network,
                    example,
                    importance=tp.importance.MagnitudeImportance(p=2),
                    pruning_ratio=ratio,
                    iterative_steps=rounds,
                    round_to=channel_multiple if channel_multiple > 1 else None,
                    ignored_layers=output_layers(network, out_channels),
                )
            pruner.step()
        except Exception as exc:  # Torch-Pruning raises plain Python errors on graphs it cannot follow
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise DataError(
                f"structured pruning: Torch-Pruning cannot prune {type(network).__name__} "
                f"({type(exc).__name__}: {first}); leave pruned_structured out of compress.variants"
            ) from None
        with torch.no_grad():
            got = tuple(network(example).shape)
        if got != expected:
            raise DataError(
                f"structured pruning changed the output shape of {type(network).__name__} "
                f"from {expected} to {got}"
            )
        yield number
