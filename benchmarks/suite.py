"""``make bench``: performance figures, each a ratio against a baseline measured in the same run.

Machines here are shared and noisy, so absolute times drift; every figure is paired
with a baseline timed in the same process run (and, for memory, the same kind of
subprocess), and the README quotes the ratios.

Each benchmark runs in its own subprocess (``python -m benchmarks --worker NAME``
internally) so that peak memory (``ru_maxrss``) belongs to that benchmark alone.

Usage::

    python -m benchmarks --out benchmarks/results.json            # all benchmarks
    python -m benchmarks --only data --out /tmp/data.json     # one
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import in_subprocess, peak_rss_mb
from tumorseg.runtime import cpu_description


# ----------------------------------------------------------------------------- data
def _worker_nibabel_load(dataset: str) -> dict[str, Any]:
    """Baseline: read every NIfTI file of the dataset into float32 arrays with plain nibabel."""
    import nibabel as nib
    import numpy as np

    files = sorted(Path(dataset).rglob("*.nii.gz"))
    base_mb = peak_rss_mb()
    start = time.perf_counter()
    voxels = 0
    for f in files:
        arr = np.asarray(nib.load(f).dataobj, dtype=np.float32)
        voxels += arr.size
    return {
        "seconds": time.perf_counter() - start,
        "files": len(files),
        "voxels": voxels,
        "peak_rss_mb": peak_rss_mb(),
        "imports_rss_mb": base_mb,
    }


def _worker_ingest_preprocess(dataset: str, workdir: str) -> dict[str, Any]:
    """Ours: ``ingest`` (read + hash + statistics) then ``preprocess`` (RAS, resample, crop, z-score, store)."""
    t0 = time.perf_counter()
    from tumorseg.config import section
    from tumorseg.data.ingest import ingest
    from tumorseg.data.preprocess import preprocess_dataset

    import_seconds = time.perf_counter() - t0
    base_mb = peak_rss_mb()
    work = Path(workdir)
    # In this process (workers 1), so that its peak memory is all of it; `scale` measures workers.
    params: dict[str, Any] = {"ingest": {"workers": 1}, "preprocess": {"workers": 1}}
    start = time.perf_counter()
    ingest(Path(dataset), work / "ingested", section("ingest", params))
    t_ingest = time.perf_counter() - start
    preprocess_dataset(work / "ingested", work / "preprocessed", section("preprocess", params))
    total = time.perf_counter() - start
    return {
        "seconds": total,
        "ingest_seconds": t_ingest,
        "preprocess_seconds": total - t_ingest,
        "import_seconds": import_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "imports_rss_mb": base_mb,
    }


def bench_data(cases: int = 4, seed: int = 7) -> dict[str, Any]:
    """Ingest + preprocess throughput on BraTS-size cases (240x240x155 x 4 modalities, 1 mm).

    Baseline: a plain nibabel load of the same files in the same run. The figure is the
    ratio of throughputs (ours / plain load): ingest + preprocess necessarily reads every
    file, so 1.0 would mean all the extra work (hashing, statistics, reorientation,
    resampling, cropping, normalisation, storage) were free. Both sides are timed after
    their imports (reported separately: torch's import is a one-off per process), and the
    peak memory of each is that of its own fresh subprocess.
    """
    from tumorseg.config import section
    from tumorseg.data.synth import synthesize_dataset

    with tempfile.TemporaryDirectory(prefix="tumorseg-bench-") as tmp:
        dataset = Path(tmp) / "raw"
        cfg = section("synth", {}).model_copy(
            update={
                "cases": cases,
                "seed": seed,
                "spacing_mm": 1.0,
                "tumour_free_fraction": 0.0,
                "reoriented_fraction": 0.0,
            }
        )
        synthesize_dataset(dataset, cfg)
        baseline = in_subprocess("nibabel_load", str(dataset))
        ours = in_subprocess("ingest_preprocess", str(dataset), str(Path(tmp) / "work"))
    ours_cps = cases / ours["seconds"]
    base_cps = cases / baseline["seconds"]
    rows = [
        [
            "ingest + preprocess throughput, 240x240x155x4 cases (1 mm -> 2 mm), 1 worker",
            f"{ours_cps:.2f} cases/s",
            f"plain nibabel load: {base_cps:.2f} cases/s",
            f"{ours_cps / base_cps:.2f}",
        ],
        [
            "ingest + preprocess peak memory, 1 worker",
            f"{ours['peak_rss_mb']:.0f} MiB",
            f"plain nibabel load: {baseline['peak_rss_mb']:.0f} MiB",
            f"{ours['peak_rss_mb'] / baseline['peak_rss_mb']:.2f}",
        ],
    ]
    return {
        "rows": rows,
        "cases": cases,
        "case_shape": "240x240x155x4 (+seg), 1 mm",
        "baseline_nibabel_load": {**baseline, "cases_per_s": cases / baseline["seconds"]},
        "ingest_preprocess": {**ours, "cases_per_s": cases / ours["seconds"]},
        "throughput_ratio": (cases / ours["seconds"]) / (cases / baseline["seconds"]),
        "peak_memory_ratio": ours["peak_rss_mb"] / baseline["peak_rss_mb"],
    }


# ----------------------------------------------------------------------------- the other layers
def _project_params() -> dict[str, Any]:
    from tumorseg.config import read_params

    return read_params("params.yaml")


def bench_training() -> dict[str, Any]:
    """Training throughput: our DataModule + LightningModule vs a minimal plain PyTorch/MONAI loop."""
    from benchmarks.training import benchmark_training

    result = benchmark_training(_project_params())
    result["rows"] = [
        [
            f"training throughput ({result['network']}, patch {'x'.join(map(str, result['patch_size']))}, "
            f"batch {result['batch_size']}, {result['precision']})",
            f"{result['lightning_patches_per_s']:.2f} patches/s",
            f"plain PyTorch/MONAI loop: {result['plain_patches_per_s']:.2f} patches/s",
            f"{result['ratio']:.2f} (target >= 0.9)",
        ]
    ]
    return result


def bench_predict() -> dict[str, Any]:
    """``predict`` on a 240x240x155 case vs MONAI's sliding_window_inference on the same network and volume."""
    from benchmarks.predict import benchmark_predict

    result = benchmark_predict(_project_params())
    network = "champion" if str(result["weights"]).startswith("models:/") else "random weights"
    result["rows"] = [
        [
            f"`predict` wall time per 240x240x155 case stored {result['case_orientation']} as BraTS stores it "
            f"(read, preprocess, sliding window, restore, write; {network})",
            f"{result['predict_s']:.2f} s",
            f"sliding_window_inference alone: {result['baseline_s']:.2f} s",
            f"{1.0 + result['overhead']:.3f} (target < 1.15; median of {result['repeats']} paired runs)",
        ],
        [
            "`predict` steps other than the sliding window (read, preprocess, restore, write), per case",
            f"{result['outside_inference_s']:.2f} s",
            f"sliding_window_inference alone: {result['baseline_s']:.2f} s",
            f"{result['outside_inference_share']:.2f} of the baseline",
        ],
    ]
    if result.get("folder_predict_s_per_case"):
        result["rows"].append(
            [
                f"`predict` on a folder of {result['folder_cases']} such cases, wall time per case",
                f"{result['folder_predict_s_per_case']:.2f} s",
                f"sliding_window_inference alone: {result['folder_baseline_s']:.2f} s",
                f"{1.0 + result['folder_overhead']:.3f} (target < 1.15; median of {result['folder_repeats']} paired runs)",
            ]
        )
    return result


def bench_cold_predict() -> dict[str, Any]:
    """``tumorseg predict`` as a whole process: one case against the warm in-process time, a folder
    against the MONAI-only pipeline (benchmarks/monai_pipeline.py) with the same network and window."""
    from benchmarks.cold_predict import benchmark_cold_predict

    result = benchmark_cold_predict(_project_params())
    result["rows"] = [
        [
            "`tumorseg predict CASE` from the shell, one 240x240x155 case (imports, model, drift check, case)",
            f"{result['cold_one_s']:.2f} s",
            f"the same case in a warm process: {result['warm_one_s']:.2f} s ({result['engine']}; torch engine "
            f"{result['warm_one_torch_s']:.2f} s)",
            f"{result['cold_over_warm']:.2f}x (target <= {result['target_cold_over_warm']:g}x; median of "
            f"{result['repeats']} paired rounds)",
        ],
        [
            "the same command without the drift check (`-S monitor.enabled=false`, the warm baseline's work)",
            f"{result['cold_unchecked_s']:.2f} s",
            f"the same case in a warm process: {result['warm_one_s']:.2f} s",
            f"{result['cold_unchecked_over_warm']:.2f}x (median of {result['repeats']} paired rounds)",
        ],
        [
            f"`tumorseg predict DIR` from the shell, {result['cases']} such cases",
            f"{result['ours_dir_s']:.2f} s",
            f"MONAI-only pipeline (LoadImaged ... SaveImaged), same network and window: {result['monai_dir_s']:.2f} s",
            f"{result['vs_monai']:.2f} (target <= {result['target_vs_monai']:g}; median of {result['repeats']} "
            "paired rounds)",
        ],
    ]
    return result


def bench_compress() -> dict[str, Any]:
    """The ``edge`` variant vs the fp32 champion: whole-predict speed, file size, Dice."""
    from benchmarks.compress import bench_compress as run

    result = run(_project_params())
    fp32 = result["variants"].get("fp32", {})
    edge = result["variants"].get(result["edge"] or "", {})
    result["rows"] = [
        [
            f"edge model ({result['edge']}) `predict` latency per 240x240x155 case, CPU",
            f"{edge.get('latency_s', float('nan')):.2f} s",
            # The speed-up's own reference time (compression.report.speedup_over), not a second rule.
            f"fp32 champion, timed alternately with it: "
            f"{(result['speedup'] or float('nan')) * edge.get('latency_s', float('nan')):.2f} s",
            f"speed-up {result['speedup']:.2f}x (target >= 2)",
        ],
        [
            "edge model file size",
            f"{edge.get('file_mb', float('nan')):.2f} MiB",
            f"fp32 champion: {fp32.get('file_mb', float('nan')):.2f} MiB",
            f"{result['size_ratio']:.1f}x smaller (target >= 3)",
        ],
        [
            "edge model mean Dice (test split)",
            f"{edge.get('dice_mean', float('nan')):.4f}",
            f"fp32 champion: {fp32.get('dice_mean', float('nan')):.4f}",
            f"drop {result['dice_drop']:+.4f} (target <= 0.01)",
        ],
    ]
    return result


def bench_flow() -> dict[str, Any]:
    """Prefect orchestration overhead of the smoke pipeline vs calling the same functions directly."""
    from benchmarks.flow import bench_flow_overhead

    result = bench_flow_overhead("params.yaml")
    result["rows"] = [
        [
            "smoke pipeline through Prefect (ephemeral server, tasks, artifacts, cache)",
            f"{result['flow_s']:.1f} s",
            f"same functions called directly: {result['direct_s']:.1f} s",
            f"{result['ratio']:.2f}",
        ]
    ]
    return result


def bench_tuning() -> dict[str, Any]:
    """Optuna: wall time of N tiny trials with 2 worker processes vs 1 on the same SQLite study."""
    from benchmarks.flow import bench_tuning_workers

    result = bench_tuning_workers("params.yaml")
    result["rows"] = [
        [
            f"Optuna, {result['n_trials']} small trials (2 epochs x 16 steps) on one SQLite study",
            f"2 workers: {result['two_workers_s']:.1f} s",
            f"1 worker: {result['one_worker_s']:.1f} s",
            f"speed-up {result['speedup']:.2f}x on {result['cpu_count']} cores",
        ]
    ]
    return result


def bench_scale() -> dict[str, Any]:
    """BraTS-size data at 1 mm: data-stage workers, training memory vs dataset size, out-of-core reads."""
    from benchmarks.scale import bench_scale as run

    return run()


def bench_serve() -> dict[str, Any]:
    """``POST /predict`` latency (p50/p95, 1 and 4 clients) and server memory vs the in-process predictor."""
    from benchmarks.serve import bench_serve as run

    return run(_project_params())


def bench_shadow() -> dict[str, Any]:
    """``POST /predict`` latency at 1 client with the shadow model on against off (same run)."""
    from benchmarks.shadow import bench_shadow as run

    return run(_project_params())


def bench_generalisation() -> dict[str, Any]:
    """The champions on the independent set against their own held-out test split (the baseline):
    ``tumorseg generalise`` for 3-D and 2-D, read beside reports/metrics.json and the 2-D test summary."""
    from tumorseg.params import load_params
    from tumorseg.registry.generalise import generalise

    params = load_params("params.yaml")
    work = Path(tempfile.mkdtemp(prefix="tumorseg-bench-generalise-"))
    volumes = generalise(params, dims=3, out_dir=work / "3d")
    images = generalise(params, dims=2, out_dir=work / "2d")
    test = json.loads((Path(params.paths.reports) / "metrics.json").read_text())["test"]
    test_2d = json.loads((Path(params.paths.reports_2d) / "test_summary.json").read_text())
    rows, result = [], {"volumes": volumes, "images": images}
    for region, scores in volumes["regions"].items():
        held_out = test[f"dice_{region}"]
        value = scores["dice"]["value"]
        rows.append(
            [
                f"3-D champion, Dice {region} on the independent set ({volumes['n_cases']} cases)",
                f"{value:.3f} [{scores['dice']['ci_low']:.3f}, {scores['dice']['ci_high']:.3f}]",
                f"its held-out test split: {held_out:.3f}",
                f"{value / held_out:.2f}",
            ]
        )
    dice_2d = test_2d["segmentation"]["dice_tumour"]["value"]
    accuracy_2d = test_2d["detection"]["accuracy"]["value"]
    for label, ours, base in (
        ("Dice", images["dice_tumour"], dice_2d),
        ("detection accuracy", images["detection_accuracy"], accuracy_2d),
    ):
        rows.append(
            [
                f"2-D champion, {label} on the independent set ({images['n_images']} images)",
                f"{ours['value']:.3f} [{ours['ci_low']:.3f}, {ours['ci_high']:.3f}]",
                f"its held-out test split: {base:.3f}",
                f"{ours['value'] / base:.2f}",
            ]
        )
    result["rows"] = rows
    return result


BENCHMARKS: dict[str, Callable[[], dict[str, Any]]] = {
    "data": bench_data,
    "scale": bench_scale,
    "training": bench_training,
    "predict": bench_predict,
    "cold_predict": bench_cold_predict,
    "generalisation": bench_generalisation,
    "compress": bench_compress,
    "flow": bench_flow,
    "tuning": bench_tuning,
    "serve": bench_serve,
    "shadow": bench_shadow,
}


def _worker_reader_throughput(params_file: str) -> dict[str, Any]:
    from benchmarks.scale import reader_throughput

    return reader_throughput(Path(params_file))


WORKERS: dict[str, Callable[..., dict[str, Any]]] = {
    "nibabel_load": _worker_nibabel_load,
    "ingest_preprocess": _worker_ingest_preprocess,
    "reader_throughput": _worker_reader_throughput,
}


def _environment() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        **cpu_description(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def results_table(results: dict[str, Any]) -> str:
    """The README's performance table: one row per figure, ratio against the same-run baseline, and
    the CPU each benchmark ran on (``--only`` reruns mix machines in one file)."""
    lines = [
        "Measured by `make bench`; each row names the CPU it ran on (2 cores each; flags as "
        "recorded in benchmarks/results.json); absolute times drift on shared machines, the ratios are the figures.",
        "",
        "| benchmark | ours | baseline (same run) | ratio | CPU |",
        "|---|---|---|---|---|",
    ]
    default = results.get("environment", {})
    for result in results.values():
        if isinstance(result, dict) and "rows" in result:
            cpu = _cpu_text(result.get("environment", default))
            lines += [f"| {' | '.join(str(c) for c in row)} | {cpu} |" for row in result["rows"]]
    return "\n".join(lines) + "\n"


def _cpu_text(env: dict[str, Any]) -> str:
    """``AMD EPYC (AVX-512, BF16)``: the model and the vector features that move the figures."""
    flags = set(env.get("cpu_flags", []))
    features = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "BF16"), ("amx_bf16", "AMX"))
                if flag in flags] or (["AVX2"] if "avx2" in flags else [])  # fmt: skip
    model = str(env.get("cpu_model", "?")).replace("(R)", "").replace(" Processor", "")
    return f"{model} ({', '.join(features)})" if features else model


def _write_results(results: dict[str, Any], out: Path) -> None:
    """``results.json`` and its table ``results.md``, each written whole (temp file, then rename)."""
    from tumorseg.data.manifest import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), results_table(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results.json")
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), help="run only these")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.worker:
        result = WORKERS[args.worker](*rest)
        Path(args.worker_out).write_text(json.dumps(result))
        return 0
    names = args.only or list(BENCHMARKS)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["environment"] = _environment()
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        start = time.perf_counter()
        results[name] = BENCHMARKS[name]()
        results[name]["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        results[name]["environment"] = results["environment"]
        print(
            f"[bench] {name} done in {time.perf_counter() - start:.0f} s: {json.dumps(results[name], indent=1)[:800]}"
        )
        _write_results(results, out)  # after each benchmark: a later failure keeps the earlier figures
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0
