"""What every benchmark shares: peak memory, a fresh subprocess per measurement, the CPU's description."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
"""The project root: ``benchmarks`` is a top-level folder, not part of the installed package."""


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    Read from ``VmHWM`` in /proc/self/status: unlike ``ru_maxrss``, it is reset by exec,
    so a benchmark subprocess does not inherit its parent's high-water mark.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def in_subprocess(target: str, *args: str) -> dict[str, Any]:
    """Run ``python -m benchmarks --worker TARGET ARGS`` and return its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    try:
        subprocess.run(
            [sys.executable, "-m", "benchmarks", "--worker", target, "--worker-out", out, *args],
            check=True,
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            },
        )
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)


def cpu_text(cpu: dict[str, Any], threads: int) -> str:
    """``CPU: <model> (<flags>), N threads.``: how every figure names the machine it ran on."""
    return f"CPU: {cpu.get('cpu_model', '?')} ({', '.join(cpu.get('cpu_flags', []))}), {threads} threads."


def write_report(out: Path, result: dict[str, Any], markdown: str, name: str) -> None:
    """``out`` (JSON) and its ``.md`` beside it, each atomically, and one line saying where."""
    from tumorseg.data.manifest import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown)
    print(f"{name}: {out} and {out.with_suffix('.md')}")
