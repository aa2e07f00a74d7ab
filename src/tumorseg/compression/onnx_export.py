"""Export a network with dynamic batch and spatial axes: to ONNX (checked against PyTorch), or as a
``torch.export`` program (``.pt2``) for the bfloat16 variants (ONNX Runtime has no bfloat16 convolution
on CPU, PyTorch's oneDNN has).

The graph maps ``image`` ``(B, 4, X, Y, Z)`` float32 to ``logits`` ``(B, C, X, Y, Z)`` float32; B, X,
Y, Z are dynamic because the sliding window's last batch may be smaller. A 2-D model maps ``(B, 1, S, S)``
preprocessed images to two outputs (segmentation and class logits), S fixed (``preprocess_2d.size``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from tumorseg.data.manifest import atomic_output
from tumorseg.errors import DataError, first_line
from tumorseg.models.onnx_network import INPUT_NAME, OUTPUT_NAME, OnnxRuntimeOutputs

log = logging.getLogger(__name__)

Outputs = torch.Tensor | tuple[torch.Tensor, ...]
"""What a network returns: logits, or several outputs (the 2-D model's segmentation and class logits)."""


def as_tuple(outputs: Outputs) -> tuple[torch.Tensor, ...]:
    """A network's output(s) as a tuple (one tensor: a 1-tuple)."""
    return tuple(outputs) if isinstance(outputs, tuple | list) else (outputs,)


def max_output_difference(got: Outputs, expected: Outputs, what: str = "network") -> float:
    """Largest |difference| over every output of two networks on the same input; DataError when their
    shapes differ."""
    got, expected = as_tuple(got), as_tuple(expected)
    shapes = [tuple(o.shape) for o in got], [tuple(o.shape) for o in expected]
    if shapes[0] != shapes[1]:
        raise DataError(f"{what} output shapes {shapes[0]} differ from PyTorch's {shapes[1]}")
    return max(
        float((g.detach().float() - e.detach().float()).abs().max())
        for g, e in zip(got, expected, strict=True)
    )


class ReducedPrecision(nn.Module):
    """``network`` in float16 or bfloat16 with float32 input and output(s) (casts in the exported graph)."""

    def __init__(self, network: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.network = network.to(dtype)

    def forward(self, image: torch.Tensor) -> Outputs:
        outputs = tuple(o.float() for o in as_tuple(self.network(image.to(self.dtype))))
        return outputs[0] if len(outputs) == 1 else outputs


def export_onnx(
    network: nn.Module,
    path: str | Path,
    example: torch.Tensor,
    *,
    opset: int = 18,
    exporter: str = "dynamo",
    what: str = "network",
    output_names: tuple[str, ...] = (OUTPUT_NAME,),
    dynamic_spatial: bool = True,
) -> Path:
    """Write ``network`` as ONNX to ``path`` atomically; DataError naming ``what`` if it fails. ``example``:
    the ``(B, C, *spatial)`` input traced by ``dynamo`` (torch.export + onnxscript) or ``torchscript``;
    the batch axis is dynamic, the spatial axes too unless ``dynamic_spatial`` is false."""
    path = Path(path)
    network.eval()
    spatial = range(2, example.dim()) if dynamic_spatial else range(0)
    names = dict(input_names=[INPUT_NAME], output_names=list(output_names), opset_version=opset)
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
                    dynamic_axes={name: axes for name in (INPUT_NAME, *output_names)},
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
    """Largest |ONNX Runtime output - PyTorch output| on ``example`` ``(B, C, *spatial)``, over every output."""
    network.eval()
    with torch.no_grad():
        expected = network(example)
    return max_output_difference(OnnxRuntimeOutputs(onnx_file)(example), expected, f"{onnx_file}: ONNX")


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
