"""A network exported to ONNX, run by ONNX Runtime behind the ``nn.Module`` interface.

The compressed deployment variants (:mod:`tumorseg.compression`: pruned, INT8, FP16) are ONNX
files. Wrapping an ONNX Runtime session as a module mapping ``(B, 4, X, Y, Z)`` to logits
``(B, C, X, Y, Z)`` lets every consumer of a :class:`~tumorseg.models.checkpoint.TrainedNetwork`
(MONAI's sliding-window inferer, :class:`~tumorseg.models.predictor.SegmentationPredictor`, the
registered pyfunc) run it unchanged: they only ever call ``network(x)``, ``.to(device)`` and
``.eval()``.

A packaged ONNX model is two files, like the PyTorch package (:mod:`tumorseg.models.package`):
``model.onnx`` and ``config.json`` (the training run's resolved sections, which give the
preprocessing, the patch size and the output mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tumorseg.errors import DataError, first_line

ONNX_FILE = "model.onnx"
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

    The session is created once; inputs are handed over as float32 NumPy arrays (CPU) and the
    output comes back on the input's device. FP16 models take and return float32 too: the cast
    is part of the exported graph.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (0: ONNX Runtime's default, one per physical core).
        device: ``cpu`` or ``cuda`` (CUDA needs onnxruntime-gpu; CPU is used otherwise).

    Raises:
        DataError: the file is missing or is not a model ONNX Runtime can load.
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
        # Idle worker threads sleep instead of spin-waiting for the next run: between two window
        # batches MONAI blends in torch threads, and the rest of predict (reading, restoring) runs
        # too; spinning threads would take those cores (and distort latency measured in turns).
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
    """A :class:`~tumorseg.models.checkpoint.TrainedNetwork` whose network runs in ONNX Runtime.

    Args:
        onnx_file: the exported model.
        config: the ``config.json`` of the training run it came from.
        threads: ONNX Runtime intra-op threads (0: its default).

    Raises:
        DataError: a missing or unreadable file, or a config without the needed sections.
    """
    from tumorseg.models.checkpoint import read_package_config, trained_with_network

    trained = trained_with_network(None, read_package_config(config))  # config checked first
    trained.network = OnnxRuntimeNetwork(onnx_file, threads=threads)
    return trained
