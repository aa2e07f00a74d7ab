"""Export a network with dynamic batch and spatial axes: to ONNX (checked against PyTorch), or as a
``torch.export`` program (``.pt2``) for the bfloat16 variants (ONNX Runtime has no bfloat16 convolution
on CPU, PyTorch's oneDNN has).

The graph maps ``image`` ``(B, 4, X, Y, Z)`` float32 to ``logits`` ``(B, C, X, Y, Z)`` float32; B, X,
Y, Z are dynamic because the sliding window's last batch may be smaller.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tumorseg.data.manifest import atomic_output
from tumorseg.errors import DataError, first_line
from tumorseg.models.onnx_network import INPUT_NAME, OUTPUT_NAME, OnnxRuntimeNetwork

log = logging.getLogger(__name__)


class ReducedPrecision(nn.Module):
    """``network`` in float16 or bfloat16 with float32 input and output (casts in the exported graph)."""

    def __init__(self, network: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.network = network.to(dtype)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image.to(self.dtype)).float()


def export_onnx(
    network: nn.Module,
    path: str | Path,
    example: torch.Tensor,
    *,
    opset: int = 18,
    exporter: str = "dynamo",
    what: str = "network",
) -> Path:
    """Write ``network`` as ONNX to ``path`` atomically; DataError naming ``what`` if it fails. ``example``:
    the ``(B, 4, *patch)`` input traced by ``dynamo`` (torch.export + onnxscript) or ``torchscript``."""
    path = Path(path)
    network.eval()
    spatial = range(2, example.dim())
    names = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    try:
        with atomic_output(path, ".onnx") as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                dim = torch.export.Dim.DYNAMIC
                program = torch.onnx.export(
                    network,
                    (example,),
                    dynamo=True,
                    dynamic_shapes=({0: dim, **{axis: dim for axis in spatial}},),
                    external_data=False,
                    verbose=False,
                    **names,
                )
                program.save(str(tmp), external_data=False)
            else:
                axes = {0: "batch", **{axis: f"spatial_{axis - 2}" for axis in spatial}}
                torch.onnx.export(
                    network,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                    **names,
                )
    except Exception as exc:  # the exporters raise many types; the user needs the first line of it
        raise DataError(
            f"ONNX export of the {what} failed with the {exporter} exporter ({type(exc).__name__}: "
            f"{first_line(exc)}); try compress.exporter: "
            f"{'torchscript' if exporter == 'dynamo' else 'dynamo'} or leave the variant out"
        ) from None
    return path


def max_abs_difference(network: nn.Module, onnx_file: str | Path, example: torch.Tensor) -> float:
    """Largest |ONNX Runtime logits - PyTorch logits| on ``example`` ``(B, 4, *patch)``."""
    network.eval()
    with torch.no_grad():
        expected = network(example).float().numpy()
    got = OnnxRuntimeNetwork(onnx_file)(example).numpy()
    if got.shape != expected.shape:
        raise DataError(f"{onnx_file}: ONNX output shape {got.shape} differs from PyTorch's {expected.shape}")
    return float(np.max(np.abs(got - expected)))


def export_program(
    network: nn.Module, path: str | Path, example: torch.Tensor, *, what: str = "network"
) -> Path:
    """Write ``network`` to ``path`` with ``torch.export.save``; DataError naming ``what`` if it fails.

    ``example`` is the ``(B, 4, *patch)`` input traced (B >= 2; any batch >= 1 runs later). Loaded by
    :class:`~tumorseg.models.program_network.ExportedProgramNetwork`.
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
