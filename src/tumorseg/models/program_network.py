"""A ``torch.export`` program (``.pt2``, the bfloat16 variants) run by PyTorch behind ``nn.Module``.

The file holds the ATen graph and weights, so loading needs neither MONAI nor a pickled module, and a
channel-pruned network loads although its widths no longer match its ``model:`` config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tumorseg.errors import DataError, first_line


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX512-BF16 or AMX on x86)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class ExportedProgramNetwork(nn.Module):
    """A ``.pt2`` program as a module: ``(B, 4, X, Y, Z)`` float32 -> ``(B, C, X, Y, Z)`` float32 logits.

    ``train()``/``eval()`` are no-ops: ``torch.export`` modules refuse to switch modes (it was
    exported in eval mode). DataError if ``path`` is missing or not a ``torch.export`` program.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no exported program file")
        try:
            program = torch.export.load(str(self.path))
        except Exception as exc:  # torch raises several types for foreign or damaged files
            raise DataError(
                f"{self.path}: not a torch.export program PyTorch can load ({first_line(exc, 200)})"
            ) from None
        self.program = program.module()

    def train(self, mode: bool = True) -> ExportedProgramNetwork:
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.program(image)
