"""Export a network to ONNX with dynamic batch and spatial axes, and check ONNX Runtime against PyTorch.

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
    """``network`` in float16 or bfloat16 with float32 input and output, so callers stay float32.

    The casts are part of the exported graph.
    """

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
    """Write ``network`` as ONNX to ``path`` (via a temporary name); DataError naming ``what`` if it fails.

    ``example`` is the ``(B, 4, *patch)`` input traced by ``exporter``: ``dynamo`` (torch.export +
    onnxscript) or ``torchscript`` (legacy tracer).
    """
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
