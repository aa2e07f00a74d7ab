"""Benchmark: ``POST /predict`` latency at 1 client with a shadow model (``serve.shadow``) off and on.

The same BraTS-size case as :mod:`benchmarks.serve` (240 x 240 x 155, 1 mm) is sent ``repeats`` times,
one request after another, to ``tumorseg serve`` in its own process: first without a shadow model
(the baseline), then with one; ``rounds`` times, each with fresh servers (one server process alone
was measured 15 % apart from the next with the same settings). The served model is the project's champion (else the params.yaml
network with seeded random weights); the shadow model is the params.yaml network with other random
weights, so it costs what a retrained challenger of the default recipe costs. The shadow model runs
after each answer in its own process at idle CPU priority, stopped while a request is served: with
requests back to back it gets little time, and jobs beyond ``serve.shadow_queue`` are skipped. After
the last request the benchmark waits until the shadow queue is empty and reports how many shadow
runs finished and how many were skipped.

Usage::

    python -m benchmarks.shadow --out benchmarks/shadow.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.serve import SYNTH_SEED, _model, random_checkpoint, running_server


def bench_shadow(
    params: dict[str, Any] | None = None,
    *,
    repeats: int = 6,
    rounds: int = 3,
    params_file: str | Path = "params.yaml",
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark in the module docstring; latencies in seconds, ``ratio`` = p50 on / p50 off."""
    import httpx

    from tumorseg.config import SynthConfig, read_params
    from tumorseg.data.synth import synthesize_dataset

    params = params if params is not None else read_params(params_file)
    with tempfile.TemporaryDirectory(prefix="tumorseg-bench-shadow-", dir=workdir) as tmp:
        root = Path(tmp)
        model_uri, model_text, _ = _model(params, root)
        shadow_uri = str(random_checkpoint(params, root / "shadow.ckpt", seed=1))
        (case_id,) = synthesize_dataset(
            root / "case",
            SynthConfig(
                cases=1, spacing_mm=1.0, seed=SYNTH_SEED, tumour_free_fraction=0.0, reoriented_fraction=0.0
            ),
        )
        case_dir = root / "case" / case_id
        files = sorted(p for p in case_dir.glob("*.nii.gz") if "_seg" not in p.name)
        payload = [("files", (p.name, p.read_bytes(), "application/gzip")) for p in files]
        latencies: dict[str, list[float]] = {"off": [], "on": []}
        shadow_info: dict[str, Any] = {"cases": 0, "skipped": 0, "errors": 0}
        modes = (
            ("off", ()),
            ("on", (f"serve.shadow={shadow_uri}", "serve.shadow_experiment=tumorseg-bench-shadow")),
        )
        for round_ in range(rounds):  # fresh servers each round: one server's luck does not decide
            for mode, overrides in modes:
                log_path = root / f"server-{mode}-{round_}.log"
                with running_server(params_file, model_uri, log_path, *overrides) as (_, base):

                    def request(base: str = base) -> float:
                        start = time.perf_counter()
                        response = httpx.post(f"{base}/predict", files=payload, timeout=600)
                        if response.status_code != 200:
                            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
                        return time.perf_counter() - start

                    request()  # warm-up, untimed
                    if mode == "on":  # the shadow worker has loaded its model
                        _wait_for(base, lambda info: bool(info["model"]) or bool(info["error"]))
                    latencies[mode] += [request() for _ in range(repeats)]
                    if mode == "on":  # the worker finishes what it queued once the requests stop
                        info = _wait_for(base, lambda info: info["pending"] == 0)
                        for key in ("cases", "skipped", "errors"):
                            shadow_info[key] += info[key]
                        shadow_info.update(
                            {k: info[k] for k in ("priority", "error", "mean_dice", "time_ratio", "model")}
                        )
    off = statistics.median(latencies["off"])
    on = statistics.median(latencies["on"])
    result: dict[str, Any] = {
        "model": model_text,
        "shadow_model": "params.yaml network, seeded random weights (seed 1)",
        "case": "synthetic BraTS 2021 case, 240x240x155 at 1 mm, 4 modalities",
        "repeats": repeats,
        "rounds": rounds,
        "off_s": latencies["off"],
        "on_s": latencies["on"],
        "off_p50_s": off,
        "on_p50_s": on,
        "ratio": on / off,
        "shadow": shadow_info,
    }
    done, skipped = shadow_info.get("cases", 0), shadow_info.get("skipped", 0)
    result["rows"] = [
        [
            "`POST /predict` latency, 1 client, shadow model on (p50; its own process at idle priority, stopped while a request is served)",
            f"{on:.2f} s",
            f"shadow off: {off:.2f} s",
            f"{on / off:.2f} (target <= 1.10)",
        ],
        [
            f"shadow runs of {rounds * (repeats + 1)} requests (back to back, {rounds} rounds)",
            f"{done} done, {skipped} skipped (queue full), {shadow_info.get('errors', 0)} errors",
            "-",
            f"agreement with served model: {shadow_info.get('mean_dice', {})}",
        ],
    ]
    return result


def _wait_for(base: str, done: Any, timeout_s: float = 900) -> dict[str, Any]:
    """``/health``'s shadow section once ``done(it)`` holds (or after ``timeout_s``)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        info = httpx.get(f"{base}/health", timeout=10).json()["shadow"]
        if done(info) or time.monotonic() > deadline:
            return info
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the result JSON here")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args(argv)
    result = bench_shadow(repeats=args.repeats)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    for row in result["rows"]:
        print(" | ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
