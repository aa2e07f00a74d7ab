"""Benchmark: ``POST /predict`` latency with 1 and 4 concurrent clients against the in-process predictor.

One BraTS-size case (``tumorseg synth --spacing 1``: 240 x 240 x 155, four modalities, about 9 MB
of ``.nii.gz``) is sent to ``tumorseg serve`` running in its own process, with the project's
champion (``models:/tumorseg@champion`` from ./mlruns) when it exists, else the params.yaml network
with seeded random weights (speed does not depend on the weights):

- **1 client**: ``repeats`` requests one after another;
- **4 clients**: ``clients`` threads sending ``per_client`` requests each at the same time; with
  ``serve.workers: 1`` they queue, so their latency includes the wait (that is what a client sees);
- **baseline**: the same case through :class:`~tumorseg.models.predictor.SegmentationPredictor`
  in this process, on one pool thread as the server runs it (read, predict, write
  ``<case_id>.nii.gz``: what ``tumorseg predict`` does per case), ``repeats`` times, alternating
  with the 1-client requests. The ratio API p50 / baseline
  p50 is the cost of HTTP, the multipart upload, staging and the response.

Peak server memory is the server process's ``VmHWM`` (peak resident set) from ``/proc/<pid>/status``.
Every request is counted as an error unless it returns 200 with a NIfTI body.

Usage::

    python -m benchmarks.serve --out benchmarks/serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

SYNTH_SEED = 11


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _peak_rss_mib(pid: int) -> float:
    """``VmHWM`` of a process in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _model(params: dict[str, Any], workdir: Path) -> tuple[str, str, Any]:
    """The champion when the project's store has one; else a seeded random checkpoint.

    Returns:
        ``(uri, what it is, the loaded TrainedNetwork)``: the server loads the URI itself, the
        in-process baseline uses the network loaded here (once).
    """
    from tumorseg.config import section
    from tumorseg.errors import DataError
    from tumorseg.registry.loading import load_model
    from tumorseg.tracking import params_tracking_uri

    uri = section("predict", params).model
    tracking = params_tracking_uri(params)
    try:
        loaded = load_model(uri, tracking_uri=tracking)
        return uri, loaded.description, loaded.trained
    except DataError:
        pass
    path = random_checkpoint(params, workdir / "random.ckpt", seed=0)
    what = "params.yaml network with seeded random weights (no champion in the store)"
    return str(path), what, load_model(str(path), tracking_uri=tracking).trained


def random_checkpoint(params: dict[str, Any], path: Path, *, seed: int) -> Path:
    """The params.yaml network with seeded random weights, as a ``tumorseg train`` checkpoint."""
    import torch

    from tumorseg.models.checkpoint import CONFIG_CHECKPOINT_KEY
    from tumorseg.models.networks import build_network
    from tumorseg.training.config import load_training_config

    cfg = load_training_config(params)
    torch.manual_seed(seed)
    network = build_network(
        cfg.model,
        spatial_dims=3,
        patch_size=cfg.data_loader.network_patch,
        spacing=cfg.preprocess.target_spacing_mm,
    )
    state = {f"network.{k}": v for k, v in network.state_dict().items()}
    torch.save({"state_dict": state, CONFIG_CHECKPOINT_KEY: cfg.to_dict()}, path)
    return path


@contextmanager
def running_server(
    params_file: str | Path, model_uri: str, log_path: Path, *overrides: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``tumorseg serve`` of ``model_uri`` in its own process on a free port, 3-D only, no demo cases
    (``overrides``: further ``KEY=VALUE``); yields the process and its base URL once /health answers."""
    import httpx

    port = _free_port()
    command = [
        sys.executable, "-m", "tumorseg.cli", "serve", "--params", str(params_file),
        "--model", model_uri, "--host", "127.0.0.1", "--port", str(port),
        "-S", "serve.demo_cases=0", "-S", "predict.device=cpu",
        "-S", "serve.model_2d=null",  # 3-D only: no 2-D model in the peak-memory figure
    ]  # fmt: skip
    for override in overrides:
        command += ["-S", override]
    log_file = log_path.open("w")
    server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not answer /health within 300 s")
            time.sleep(0.5)
        yield server, base
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log_file.close()


def _percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


def benchmark_rows(result: dict[str, Any], *, clients: int) -> list[list[str]]:
    """README rows ``[figure, ours, baseline, ratio]`` from a :func:`bench_serve` result.

    With ``serve.workers: 1`` concurrent requests queue, so a client of ``clients`` waits for the
    others: the fair baseline for that latency is ``clients`` in-process predictions back to back,
    and throughput compares with the in-process rate.
    """
    direct = result["baseline_p50_s"]
    in_process_rate = 60.0 / direct
    return [
        [
            "`POST /predict` latency, 1 client, one 240x240x155 case, CPU (p50 / p95)",
            f"{result['single_p50_s']:.2f} / {result['single_p95_s']:.2f} s",
            f"in-process predictor (read, predict, write): {direct:.2f} s",
            f"{result['single_p50_s'] / direct:.2f}",
        ],
        [
            f"`POST /predict` latency, {clients} concurrent clients, serve.workers={result['workers']} "
            "(p50 / p95, queue wait included)",
            f"{result['concurrent_p50_s']:.2f} / {result['concurrent_p95_s']:.2f} s",
            f"{clients} in-process predictions back to back: {clients * direct:.2f} s",
            f"{result['concurrent_p50_s'] / (clients * direct):.2f}",
        ],
        [
            f"throughput with {clients} concurrent clients",
            f"{result['concurrent_throughput_cases_per_min']:.1f} cases/min",
            f"in-process: {in_process_rate:.1f} cases/min",
            f"{result['concurrent_throughput_cases_per_min'] / in_process_rate:.2f}",
        ],
        ["`POST /predict` errors", f"{result['errors']} of {result['requests']}", "-", "target 0"],
        [
            "peak server memory (VmHWM): model loaded, all requests served",
            f"{result['peak_server_mib']:.0f} MiB",
            "-",
            "-",
        ],
    ]


def bench_serve(
    params: dict[str, Any] | None = None,
    *,
    repeats: int = 5,
    clients: int = 4,
    per_client: int = 3,
    params_file: str | Path = "params.yaml",
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark described in the module docstring.

    Args:
        params: params dict (default: ``params_file``); ``predict`` and ``serve`` settings apply.
        repeats: sequential requests (and baseline runs).
        clients: concurrent clients.
        per_client: requests per concurrent client.
        params_file: the params file the server reads.
        workdir: scratch folder (default: a temporary one).

    Returns:
        Latencies (s), errors, peak server memory (MiB), the model used and ``rows`` for the README.
    """
    import httpx

    from tumorseg.config import SynthConfig, read_params, section
    from tumorseg.data.synth import synthesize_dataset
    from tumorseg.models.predictor import (
        SegmentationPredictor,
        plan_cases,
        reference_header,
        write_prediction,
    )
    from tumorseg.serving.config import ServeConfig

    params = params if params is not None else read_params(params_file)
    with tempfile.TemporaryDirectory(prefix="tumorseg-bench-serve-", dir=workdir) as tmp:
        root = Path(tmp)
        model_uri, model_text, trained = _model(params, root)
        (case_id,) = synthesize_dataset(
            root / "case",
            SynthConfig(
                cases=1, spacing_mm=1.0, seed=SYNTH_SEED, tumour_free_fraction=0.0, reoriented_fraction=0.0
            ),
        )
        case_dir = root / "case" / case_id
        modality_files = sorted(p for p in case_dir.glob("*.nii.gz") if "_seg" not in p.name)
        payload = [("files", (p.name, p.read_bytes(), "application/gzip")) for p in modality_files]

        with running_server(params_file, model_uri, root / "server.log") as (server, base):
            errors = 0
            error_texts: list[str] = []
            lock = threading.Lock()

            def request() -> float:
                nonlocal errors
                start = time.perf_counter()
                try:
                    response = httpx.post(f"{base}/predict", files=payload, timeout=600)
                    ok = response.status_code == 200 and response.content[:2] == b"\x1f\x8b"
                    text = "" if ok else f"HTTP {response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, text = False, f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - start
                if not ok:
                    with lock:
                        errors += 1
                        error_texts.append(text)
                return elapsed

            # baseline: the same predictor in this process
            predict_cfg = section("predict", params).model_copy(update={"device": "cpu"})
            predictor = SegmentationPredictor(trained, predict_cfg)
            (case,) = plan_cases(case_dir)

            baseline_steps: list[dict[str, float]] = []

            def direct() -> float:
                start = time.perf_counter()
                prediction = predictor.predict_case(case)
                write_prediction(prediction, root / "direct", reference_header(case))
                baseline_steps.append(prediction.seconds)
                return time.perf_counter() - start

            # The server predicts on a pool thread; the baseline does too, so that only HTTP, the upload
            # and staging differ (on the shared 2-core machine, torch inference on the main thread
            # measured 1.5-4.7 s against a steady 1.5 s on a pool thread for the same call).
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-direct") as pool:
                request()  # warm-up, untimed
                pool.submit(direct).result()
                single: list[float] = []
                baseline: list[float] = []
                for _ in range(repeats):
                    baseline.append(pool.submit(direct).result())
                    single.append(request())

            # where the server's time goes (the JSON variant reports the predictor's steps)
            server_steps = httpx.post(f"{base}/predict?format=json", files=payload, timeout=600).json()[
                "seconds"
            ]

            concurrent: list[float] = []

            def client_loop() -> None:
                for _ in range(per_client):
                    latency = request()
                    with lock:
                        concurrent.append(latency)

            threads = [threading.Thread(target=client_loop) for _ in range(clients)]
            wall_start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            concurrent_wall = time.perf_counter() - wall_start
            peak_mib = _peak_rss_mib(server.pid)

    single_p50, single_p95 = _percentiles(single)
    many_p50, many_p95 = _percentiles(concurrent)
    direct_p50 = statistics.median(baseline)
    serve_cfg: ServeConfig = section("serve", params)
    total = repeats + 1 + clients * per_client  # the warm-up counts; the one JSON breakdown call does not
    result: dict[str, Any] = {
        "model": model_text,
        "case": "synthetic BraTS 2021 case, 240x240x155 at 1 mm, 4 modalities",
        "workers": serve_cfg.workers,
        "clients": clients,
        "single_s": single,
        "concurrent_s": concurrent,
        "baseline_s": baseline,
        "single_p50_s": single_p50,
        "single_p95_s": single_p95,
        "concurrent_p50_s": many_p50,
        "concurrent_p95_s": many_p95,
        "concurrent_wall_s": concurrent_wall,
        "concurrent_throughput_cases_per_min": 60.0 * len(concurrent) / concurrent_wall,
        "baseline_p50_s": direct_p50,
        "baseline_steps_s": {
            k: statistics.median(s[k] for s in baseline_steps[1:]) for k in baseline_steps[-1]
        },
        "server_steps_s": server_steps,
        "ratio_single": single_p50 / direct_p50,
        "errors": errors,
        "error_samples": error_texts[:3],
        "requests": total,
        "peak_server_mib": peak_mib,
    }
    result["rows"] = benchmark_rows(result, clients=clients)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the result JSON here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--per-client", type=int, default=3)
    args = parser.parse_args(argv)
    result = bench_serve(repeats=args.repeats, per_client=args.per_client)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    for row in result["rows"]:
        print(" | ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
