"""A network exported to ONNX (the compressed variants), run by ONNX Runtime behind ``nn.Module``.

Every consumer of a :class:`~tumorseg.models.checkpoint.TrainedNetwork` (the sliding-window
inferer, the predictor, the pyfunc) runs it unchanged: they only call ``network(x)``,
``.to(device)`` and ``.eval()``. A package is ``model.onnx`` plus the run's ``config.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    """An ONNX model as a module: ``(B, 4, X, Y, Z)`` float tensor -> ``(B, C, X, Y, Z)`` float32 logits.

    Inputs go to ONNX Runtime as float32 NumPy arrays; the output comes back on the input's device
    (FP16 models too: their casts are in the graph). DataError if ONNX Runtime cannot load ``path``.
    ``threads`` 0 is ONNX Runtime's default; ``cuda`` needs onnxruntime-gpu (else CPU is used).
    """

    def __init__(self, path: str | Path, *, threads: int = 0, device: str = "cpu") -> None:
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no ONNX model file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # warnings about unused initialisers are noise for users
        # Idle workers sleep instead of spinning: between window batches MONAI blends in torch
        # threads and predict reads and restores; spinning threads would take those cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=session_providers(device)
            )
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise DataError(f"{self.path}: ONNX Runtime cannot load it ({first_line(exc, 10_000)})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits of one batch of windows (the whole batch in one ``session.run``)."""
        array = image.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(logits).to(image.device)


def load_onnx_package(onnx_file: str | Path, config: str | Path, *, threads: int = 0) -> Any:
    """A :class:`~tumorseg.models.checkpoint.TrainedNetwork` of ``onnx_file`` and its ``config.json``."""
    from tumorseg.models.checkpoint import read_package_config, trained_with_network

    trained = trained_with_network(None, read_package_config(config))  # config checked first
    trained.network = OnnxRuntimeNetwork(onnx_file, threads=threads)
    return trained
