"""A network saved as a ``torch.export`` program, run by PyTorch behind the ``nn.Module`` interface.

The bfloat16 deployment variants (:mod:`tumorseg.compression`) are ``.pt2`` files written by
``torch.export.save``: the graph of ATen operators and its weights, float32 in and out with the
bfloat16 casts inside the graph. Loading one needs neither MONAI's classes nor a pickled module,
and a channel-pruned network (whose layer widths no longer match its ``model:`` config) loads as
it is. On CPUs with native bfloat16 (AVX512-BF16, AMX, Arm BF16) oneDNN runs its convolutions
about twice as fast as float32; elsewhere PyTorch emulates bfloat16, correctly but slowly.

A packaged program is two files, like the other packages (:mod:`tumorseg.models.package`):
``model.pt2`` and ``config.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tumorseg.errors import DataError, first_line

PROGRAM_FILE = "model.pt2"


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX512-BF16 or AMX on x86)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class ExportedProgramNetwork(nn.Module):
    """A ``.pt2`` program as a module: ``(B, 4, X, Y, Z)`` float32 -> ``(B, C, X, Y, Z)`` float32 logits.

    The program was exported in eval mode; ``train()``/``eval()`` leave it as it is (modules that
    ``torch.export`` rebuilds refuse to switch modes).

    Raises:
        DataError: the file is missing or is not a ``torch.export`` program.
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


def load_program_package(program_file: str | Path, config: str | Path) -> Any:
    """A :class:`~tumorseg.models.checkpoint.TrainedNetwork` whose network is a ``torch.export`` program.

    Raises:
        DataError: a missing or unreadable file, or a config without the needed sections.
    """
    from tumorseg.models.checkpoint import read_package_config, trained_with_network

    trained = trained_with_network(None, read_package_config(config))  # config checked first
    trained.network = ExportedProgramNetwork(program_file)
    return trained
