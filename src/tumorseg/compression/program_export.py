"""Export a network as a ``torch.export`` program (``.pt2``) with dynamic batch and spatial axes.

For the bfloat16 variants: ONNX Runtime has no bfloat16 convolution on CPU, PyTorch (oneDNN) has.
Loaded by :class:`~tumorseg.models.program_network.ExportedProgramNetwork`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from tumorseg.data.manifest import atomic_output
from tumorseg.errors import DataError, first_line


def export_program(
    network: nn.Module, path: str | Path, example: torch.Tensor, *, what: str = "network"
) -> Path:
    """Write ``network`` to ``path`` with ``torch.export.save``; DataError naming ``what`` if it fails.

    ``example`` is the ``(B, 4, *patch)`` input traced (B >= 2; any batch >= 1 runs later).
    """
    path = Path(path)
    network.eval()
    # The batch may be 1 (the sliding window's last batch); the spatial sizes keep whatever
    # divisibility the network needs, which torch.export infers (Dim.AUTO).
    axes = {
        0: torch.export.Dim("batch", min=1),
        **{axis: torch.export.Dim.AUTO for axis in range(2, example.dim())},
    }
    try:
        with atomic_output(path, ".pt2") as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(network, (example,), dynamic_shapes=(axes,))
            program.example_inputs = None  # not stored: the file holds the graph and weights only
            torch.export.save(program, str(tmp))
    except Exception as exc:  # torch.export raises many types; the user needs the first line of it
        raise DataError(
            f"torch.export of the {what} failed ({type(exc).__name__}: {first_line(exc)}); "
            "leave the variant out of compress.variants"
        ) from None
    return path
