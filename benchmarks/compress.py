"""``make bench``: the edge model against the fp32 champion, measured side by side in one run.

:func:`bench_compress` runs the same build-measure-gate as ``tumorseg compress``
(:func:`~tumorseg.compression.stage.run_compress_stage`) in a temporary folder, registering nothing and
logging nothing, and returns the figures the README quotes with the issue's targets
(``compress.target_speedup``, ``compress.target_size_ratio``, ``compress.dice_tolerance``): the edge
model predicts a case at least 2x faster on CPU (whole ``predict``, same cases), its file is at least
3x smaller, and its mean Dice is within 0.01 of fp32's.

Usage::

    python -m benchmarks.compress --out benchmarks/compress.json [--model models/checkpoints/best.ckpt]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any


def bench_compress(
    params: dict[str, Any],
    *,
    source: str = "params.yaml",
    model_uri: str | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Build and measure every ``compress.variants`` entry; return the edge-vs-fp32 figures and targets.

    Returns:
        ``{"edge", "speedup", "size_ratio", "dice_drop", "targets": {...: bool}, "variants": {name:
        {"latency_s", "file_mb", "dice_mean", "dice_drop", "accepted"}}, "context": {...}}``.
    """
    from tumorseg.compression.stage import run_compress_stage
    from tumorseg.config import apply_overrides

    with tempfile.TemporaryDirectory(prefix="tumorseg-bench-compress-") as tmp:
        run_params = apply_overrides(
            params,
            {
                "compress.out_dir": str(Path(tmp) / "compressed"),
                "compress.register_edge": False,
                "paths.reports": str(Path(tmp) / "reports"),
                "mlflow.enabled": False,
            },
        )
        result = run_compress_stage(run_params, source=source, tracking_uri=tracking_uri, model_uri=model_uri)
    ratio = result.report["edge_vs_fp32"]
    tolerance = result.report["dice_tolerance"]
    speedup, size = result.report["targets"]["speedup"], result.report["targets"]["size_ratio"]
    return {
        "edge": result.edge.name if result.edge is not None else None,
        **ratio,
        "targets": {
            f"speedup>={speedup:g}": bool(ratio["speedup"] and ratio["speedup"] >= speedup),
            f"size_ratio>={size:g}": bool(ratio["size_ratio"] and ratio["size_ratio"] >= size),
            f"dice_drop<={tolerance:g}": ratio["dice_drop"] is not None and ratio["dice_drop"] <= tolerance,
        },
        "variants": {
            v["name"]: {
                key: v[key]
                for key in (
                    "runtime",
                    "latency_s",
                    "baseline_latency_s",
                    "inference_s",
                    "file_mb",
                    "parameters",
                    "dice_drop",
                    "accepted",
                )
            }
            | {"dice_mean": v["dice"].get("mean")}
            for v in result.report["variants"]
        },
        "context": {
            key: result.report.get(key)
            for key in (
                "source_model",
                "test_cases",
                "latency_case_shape",
                "repeats",
                "threads",
                "build_and_measure_s",
            )
        },
    }


def main(argv: list[str] | None = None) -> int:
    from tumorseg.config import read_params
    from tumorseg.data.manifest import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", help="fp32 model (default: compress.model, then predict.model)")
    parser.add_argument("--out", help="JSON file to write (default: print)")
    args = parser.parse_args(argv)
    figures = bench_compress(read_params(args.params), source=args.params, model_uri=args.model)
    text = json.dumps(figures, indent=2) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
