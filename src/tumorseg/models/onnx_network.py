"""A network exported to ONNX (the compressed variants), run by ONNX Runtime behind ``nn.Module``: the
inferer, predictor and pyfunc only call ``network(x)``, ``.to(device)`` and ``.eval()``. Also the fp32
export a model package carries for the torch-free ``predict`` (:mod:`tumorseg.models.onnx_predictor`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tumorseg.errors import DataError, first_line

INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def session_providers(device: str = "cpu") -> list[str]:
    """ONNX Runtime execution providers for ``device`` (CUDA first when asked for and installed)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeNetwork(nn.Module):
    """An ONNX model as a module: ``(B, 4, X, Y, Z)`` float -> ``(B, C, X, Y, Z)`` float32 logits on the
    input's device (FP16 casts are in the graph). DataError if ONNX Runtime cannot load ``path``;
    ``threads`` 0 is its default; ``cuda`` needs onnxruntime-gpu (else CPU)."""

    def __init__(self, path: str | Path, *, threads: int = 0, device: str = "cpu") -> None:
        super().__init__()
        from tumorseg.models.onnx_predictor import open_session

        self.path = Path(path)
        self.session = open_session(self.path, threads=threads, providers=session_providers(device))
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits of one batch of windows (the whole batch in one ``session.run``)."""
        array = image.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(logits).to(image.device)


class OnnxRuntimeOutputs(OnnxRuntimeNetwork):
    """:class:`OnnxRuntimeNetwork` returning every output of the graph: logits when it has one, else a
    tuple in graph order (the 2-D model's segmentation and class logits)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:  # type: ignore[override]
        array = image.detach().to("cpu", torch.float32).contiguous().numpy()
        outputs = [
            torch.from_numpy(o).to(image.device) for o in self.session.run(None, {self.input_name: array})
        ]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def export_fp32_onnx(
    network: nn.Module, path: str | Path, roi_size: tuple[int, ...], *, tolerance: float = 1e-3
) -> float:
    """Write ``network`` as ONNX (opset 18, batch and spatial axes dynamic) to ``path`` atomically and
    return the largest |ONNX Runtime - PyTorch| logit on a random ``(2, 4, *roi_size)`` batch.

    The TorchScript exporter: 2-3 s for a 3-D U-Net where the dynamo exporter takes 10 s, with the
    same parity (4e-5). DataError when the export fails or the difference exceeds ``tolerance``
    (nothing is left at ``path`` then).
    """
    import warnings

    from tumorseg.data.manifest import atomic_output

    path = Path(path)
    was_training = network.training
    network.eval()
    example = torch.randn(2, 4, *roi_size, generator=torch.Generator().manual_seed(0))
    axes = {0: "batch", **{axis: f"spatial_{axis - 2}" for axis in range(2, example.dim())}}
    try:
        with atomic_output(path, ".onnx") as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network,
                (example,),
                str(tmp),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=18,
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
            )
    except Exception as exc:  # the exporter raises many types; the user needs the first line of it
        raise DataError(
            f"{path}: ONNX export of the network failed ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    finally:
        network.train(was_training)
    with torch.no_grad():
        expected = network.eval()(example).float().numpy()
    network.train(was_training)
    difference = float(np.max(np.abs(OnnxRuntimeNetwork(path)(example).numpy() - expected)))
    if difference > tolerance:
        path.unlink(missing_ok=True)
        raise DataError(
            f"{path}: ONNX Runtime logits differ from PyTorch's by {difference:.2g} > {tolerance}"
        )
    return difference
