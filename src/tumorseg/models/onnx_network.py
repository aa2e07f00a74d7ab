"""A network exported to ONNX (the compressed variants), run by ONNX Runtime behind ``nn.Module``: the
inferer, predictor and pyfunc only call ``network(x)``, ``.to(device)`` and ``.eval()``."""

from __future__ import annotations

from pathlib import Path

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
