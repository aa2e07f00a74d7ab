"""Process-wide machine settings: glibc keeps freed memory (inference), precision by CPU (training).

glibc serves big blocks with fresh ``mmap`` calls and returns them on free, so every 240x240x155
case pays the page faults of touching its arrays anew (a quarter of ``predict``'s wall time on a
2-core VM; ``python -m benchmarks.predict --glibc-default-memory``). Keeping freed memory lets the
next case reuse the same pages; the process keeps its peak memory until it exits.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# glibc ``mallopt`` parameters (``<malloc.h>``).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the (reused) heap
TRIM_THRESHOLD = (1 << 31) - 1  # never return freed heap memory (mallopt takes an int)
TOP_PAD = 256 << 20  # grow the heap in 256 MiB steps: fewer system calls
_SETTINGS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse, once per process; whether it is in effect (False
    without ``mallopt``: macOS, Windows, musl)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            _applied = all(mallopt(option, value) == 1 for option, value in _SETTINGS)
    log.debug("keep freed memory for reuse: %s", _applied)
    return _applied


# oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) at or above which bfloat16 matrix instructions exist.
_BF16_ISAS = (
    "ALL",
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10",
)


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX; Arm BF16 through oneDNN).

    Only then is ``bf16-mixed`` faster than float32 on CPU: elsewhere it is emulated and slower. A
    ``ONEDNN_MAX_CPU_ISA`` below those ISAs (used to run as an AVX2-only CPU would) counts as absent.
    """
    import os

    import torch

    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if not cap.startswith(_BF16_ISAS):
        return False
    cpu = torch.cpu
    x86 = any(check() for check in (cpu._is_avx512_bf16_supported, cpu._is_amx_tile_supported))
    return bool(x86 or _arm_bf16())


def _arm_bf16() -> bool:
    """Arm CPUs with the BF16 extension (``bf16`` in /proc/cpuinfo's Features)."""
    import platform

    if platform.machine().lower() not in {"aarch64", "arm64"}:
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            return any(line.startswith("Features") and " bf16" in line for line in fh)
    except OSError:
        return False


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``trainer.precision: auto`` -> a Lightning precision for this machine; other values unchanged.

    ``auto``: ``bf16-mixed`` on a CUDA GPU with bfloat16 and on CPUs with native bfloat16, float32
    (``32-true``) everywhere else, so a default never depends on one CPU's features.
    """
    if precision != "auto":
        return precision
    import torch

    gpu = accelerator in {"auto", "gpu", "cuda"} and torch.cuda.is_available()
    if gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if native_bf16_cpu() else "32-true"


class _HidePydicom:
    """A ``sys.meta_path`` finder that makes ``import pydicom`` fail as if it were not installed."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "pydicom" or name.startswith("pydicom."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden while nibabel imports)", name=name)


def import_nibabel_without_pydicom() -> None:
    """Import nibabel with pydicom hidden, unless either is imported already.

    nibabel.nifti1 imports pydicom (which pulls in gdcm and requests) when nibabel is imported, only
    to parse the DICOM header extensions (code 2) that a few NIfTI files carry; without it such an
    extension stays raw bytes, as on an install without pydicom. That import is a tenth of a cold
    ``tumorseg predict`` on a 2-core CPU. ``import pydicom`` works as usual afterwards.
    """
    if "nibabel" in sys.modules or "pydicom" in sys.modules:
        return
    finder = _HidePydicom()
    sys.meta_path.insert(0, finder)
    try:
        import nibabel  # noqa: F401
    finally:
        sys.meta_path.remove(finder)


def cpu_description() -> dict[str, Any]:
    """The CPU model and the instruction-set flags that decide kernel speed (AVX2, AVX-512, AMX, BF16)."""
    model, flags = platform.processor() or "?", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model in ("?", "", platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return {"cpu_model": model, "cpu_flags": [f for f in wanted if f in flags]}
