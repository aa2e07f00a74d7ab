"""Benchmark: ``tumorseg predict`` on one BraTS-size case against MONAI's bare sliding window.

Both sides run the same network with the same window, overlap, blending and batch settings, in
the same process, on the same 240x240x155 1-mm case (``tumorseg synth --spacing 1``), stored in
LPS voxel order as BraTS stores its volumes (``--orientation``; RAS files skip the reorienting
copy and read faster, so they understate what a BraTS user sees). The network
is the model ``predict`` runs by default (``predict.model``: the registered champion), so the
label map that is cleaned, restored and written looks like a real prediction; without one (before
``make run``), the ``model:`` section of params.yaml with seeded random weights, which labels about
a third of the volume as tumour and so makes those steps slower (``weights`` in the result says
which ran):

- **baseline**: ``monai.inferers.sliding_window_inference`` on the already preprocessed volume
  ``(1, 4, x, y, z)`` (the model's grid), nothing else;
- **predict**: what ``tumorseg predict`` does per case: read the four NIfTI files and preprocess
  them (each file decoded, reoriented and resampled to the training spacing in its own thread, then
  crop and z-score), sliding-window inference, thresholding, label decoding, restoration to the
  1-mm source grid and writing the NIfTI.

The measurements alternate (baseline, predict, baseline, ...) after an untimed warm-up of each,
because the machines are shared and noisy. The figure of merit is ``overhead``: the median over
the ``repeats`` pairs of ``predict / baseline - 1``, each predict run against the baseline run just
before it (target: under 0.15). ``overhead_of_medians`` and ``overhead_min`` (fastest run of each
side) are the other ways to read the same runs; ``breakdown_s`` says where predict's time goes and
``outside_inference_share`` is its steps other than the sliding window over the baseline (the
overhead without the inference's own noise). ``folder_overhead`` is the ratio per case for a folder
of ``folder_cases`` cases (median of ``folder_repeats`` runs) through :func:`~tumorseg.models.predictor.predict_dataset` (what
``tumorseg predict DIR`` runs; with a core to spare, the next case is read while the current one
is inferred).

Usage::

    python -m benchmarks.predict --out benchmarks/predict.json [--repeats 9] [--device cpu] [--model URI|random]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_OVERHEAD = 0.15
BRATS_ORIENTATION = "LPS"  # voxel order of the BraTS challenge files


def trained_network(params: dict[str, Any], seed: int) -> Any:
    """The params.yaml network with seeded random weights, as a TrainedNetwork."""
    import torch

    from tumorseg.models.checkpoint import TrainedNetwork
    from tumorseg.models.networks import build_network
    from tumorseg.training.config import load_training_config

    cfg = load_training_config(params)
    torch.manual_seed(seed)
    network = build_network(
        cfg.model,
        spatial_dims=cfg.data_loader.spatial_dims,
        patch_size=cfg.data_loader.network_patch,
        spacing=cfg.preprocess.target_spacing_mm,
    ).eval()
    return TrainedNetwork(network, cfg.model, cfg.data_loader, cfg.sliding_window, cfg.to_dict())


def bench_network(params: dict[str, Any], model: str | None, seed: int) -> tuple[Any, str]:
    """``(TrainedNetwork, what it is)``: ``model`` (None: ``predict.model``), else seeded random weights.

    ``model="random"`` asks for the random weights; a model that does not load (none registered
    yet) falls back to them, and the description says why.
    """
    from tumorseg.config import section
    from tumorseg.errors import DataError
    from tumorseg.models.config import PredictConfig
    from tumorseg.registry.loading import load_model
    from tumorseg.tracking import params_tracking_uri

    if model != "random":
        predict_cfg: PredictConfig = section("predict", params)
        uri = model or predict_cfg.model
        try:
            loaded = load_model(uri, tracking_uri=params_tracking_uri(params))
        except DataError as exc:
            return trained_network(params, seed), f"random weights ({uri} did not load: {exc})"
        return loaded.trained, loaded.description
    return trained_network(params, seed), "random weights (--model random)"


def _copies(case: Any, folder: Path, n: int) -> Path:
    """``n`` BraTS 2021 case folders with the files of ``case`` under new case ids (real reads, no synthesis)."""
    import shutil

    for k in range(n):
        case_id = f"BraTS2021_{90001 + k:05d}"
        target = folder / case_id
        target.mkdir(parents=True, exist_ok=True)
        for path in case.case_dir.iterdir():
            shutil.copyfile(path, target / path.name.replace(case.case_id, case_id))
    return folder


def benchmark_predict(
    params: dict[str, Any] | None = None,
    *,
    repeats: int = 9,
    folder_cases: int = 3,
    folder_repeats: int = 3,
    device: str = "cpu",
    keep_freed_memory: bool = True,
    model: str | None = None,
    orientation: str = BRATS_ORIENTATION,
    seed: int = 0,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Time ``predict`` and the bare MONAI sliding window on one 240x240x155 case (module docstring).

    Args:
        params: params.yaml dict (read from ./params.yaml when None): ``model``, ``data_loader``,
            ``sliding_window`` and ``preprocess`` define the network and the settings.
        repeats: timed (baseline, predict) pairs; medians are reported.
        folder_cases: cases (copies of the synthetic case under other ids) in the folder measurement;
            0 skips it.
        folder_repeats: folder runs, each paired with the baselines around it; the median is reported.
        device: ``cpu`` or ``cuda``.
        keep_freed_memory: ``predict.keep_freed_memory`` (:mod:`tumorseg.runtime`); it applies to the
            whole process, so to both sides (False: glibc's default, for comparison in a new process).
        model: the network: MLflow URI or checkpoint; None: ``predict.model`` (the champion);
            ``"random"``: the params.yaml network with seeded random weights (also the fallback).
        orientation: voxel order the case's files are stored in (``LPS``: BraTS's own).
        seed: seeds the synthetic case and the random weights.
        workdir: where the case and the prediction are written (a temporary folder when None).

    Returns:
        ``{"baseline_s", "predict_s", "overhead", "target_overhead", "meets_target", "breakdown_s",
        "folder_predict_s_per_case", "folder_overhead", "case_shape", "model_grid_shape", "device",
        "threads", ...}``.
    """
    import torch
    from monai.inferers import sliding_window_inference

    from tumorseg.config import SynthConfig, read_params
    from tumorseg.data.layouts import discover_cases, read_case
    from tumorseg.data.preprocess import preprocess_case
    from tumorseg.data.synth import synthesize_case, write_case
    from tumorseg.models.config import PredictConfig
    from tumorseg.models.predictor import (
        SegmentationPredictor,
        predict_dataset,
        reference_header,
        write_prediction,
    )

    params = read_params() if params is None else params
    trained, weights = bench_network(params, model, seed)
    predictor = SegmentationPredictor(
        trained, PredictConfig(device=device, keep_freed_memory=keep_freed_memory)
    )
    window = predictor.sliding_window
    with tempfile.TemporaryDirectory(prefix="tumorseg-bench-predict-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        synth = SynthConfig(
            cases=1, spacing_mm=1.0, seed=seed, tumour_free_fraction=0.0, reoriented_fraction=0.0
        )
        write_case(synthesize_case(1, synth), root / "raw", "brats2021", orientation=orientation)
        case = discover_cases(root / "raw")[0]
        volumes = read_case(case)
        image = preprocess_case(volumes, predictor.preprocess_cfg).image.astype("float32")
        x = torch.from_numpy(image)[None].to(predictor.device)

        def baseline() -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                sliding_window_inference(
                    x,
                    roi_size=trained.roi_size,
                    sw_batch_size=window.sw_batch_size,
                    predictor=predictor.network,
                    overlap=window.overlap,
                    mode=window.blend_mode,
                    padding_mode="constant",
                )
            if predictor.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        breakdowns: list[dict[str, float]] = []

        def predict() -> float:
            start = time.perf_counter()
            prediction = predictor.predict_case(case)
            written = time.perf_counter()
            write_prediction(prediction, root / "pred", reference_header(case))
            prediction.seconds["write"] = time.perf_counter() - written
            breakdowns.append(prediction.seconds)
            return time.perf_counter() - start

        baseline()
        predict()  # warm-up: allocator, thread pools, first-call kernels
        breakdowns.clear()
        base_times, predict_times = [], []
        for _ in range(repeats):
            base_times.append(baseline())
            predict_times.append(predict())

        folder_per_case = folder_baseline = folder_overhead = None
        if folder_cases > 0:
            # Paired in time: each folder run against the mean of the baselines just before and just
            # after it; the median over folder_repeats such pairs.
            folder = _copies(case, root / "folder", folder_cases)
            folder_runs, folder_bases = [], []
            for _ in range(folder_repeats):
                before = baseline()
                start = time.perf_counter()
                predict_dataset(folder, root / "pred_folder", predictor)
                folder_runs.append((time.perf_counter() - start) / folder_cases)
                folder_bases.append((before + baseline()) / 2.0)
            folder_per_case = statistics.median(folder_runs)
            folder_baseline = statistics.median(folder_bases)
            folder_overhead = (
                statistics.median(r / b for r, b in zip(folder_runs, folder_bases, strict=True)) - 1.0
            )

    baseline_s = statistics.median(base_times)
    predict_s = statistics.median(predict_times)
    # Each predict run is paired with the baseline run just before it (the same load, mostly): the
    # median of the pair ratios is steadier on a shared machine than the ratio of two medians.
    overhead = statistics.median(p / b for p, b in zip(predict_times, base_times, strict=True)) - 1.0
    breakdown = {step: statistics.median(b[step] for b in breakdowns) for step in breakdowns[0]}
    outside_inference_s = sum(seconds for step, seconds in breakdown.items() if step != "inference")
    return {
        "device": str(predictor.device),
        "threads": torch.get_num_threads(),
        "network": trained.model.name,
        "weights": weights,
        "parameters": sum(p.numel() for p in trained.network.parameters()),
        "case_shape": list(volumes.image.shape[1:]),
        "case_orientation": orientation,
        "model_grid_shape": list(image.shape[1:]),
        "training_spacing_mm": list(predictor.preprocess_cfg.target_spacing_mm),
        "roi_size": list(trained.roi_size),
        "overlap": window.overlap,
        "sw_batch_size": window.sw_batch_size,
        "blend_mode": window.blend_mode,
        "keep_freed_memory": keep_freed_memory,
        "repeats": repeats,
        "baseline_s": round(baseline_s, 3),
        "predict_s": round(predict_s, 3),
        "baseline_runs_s": [round(t, 3) for t in base_times],
        "predict_runs_s": [round(t, 3) for t in predict_times],
        "overhead": round(overhead, 4),
        "overhead_of_medians": round(predict_s / baseline_s - 1.0, 4),
        # predict's own steps other than the sliding window, against the baseline: the overhead
        # without the run-to-run noise of the inference itself.
        "outside_inference_s": round(outside_inference_s, 3),
        "outside_inference_share": round(outside_inference_s / baseline_s, 4),
        # Contention only ever adds time: the fastest run of each side is the least disturbed pair.
        "overhead_min": round(min(predict_times) / min(base_times) - 1.0, 4),
        "target_overhead": TARGET_OVERHEAD,
        "meets_target": overhead < TARGET_OVERHEAD,
        "folder_cases": folder_cases,
        "folder_predict_s_per_case": None if folder_per_case is None else round(folder_per_case, 3),
        "folder_baseline_s": None if folder_baseline is None else round(folder_baseline, 3),
        "folder_repeats": folder_repeats if folder_cases > 0 else 0,
        "folder_overhead": None if folder_overhead is None else round(folder_overhead, 4),
        "breakdown_s": {step: round(seconds, 3) for step, seconds in breakdown.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--folder-cases", type=int, default=3)
    parser.add_argument("--folder-repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--glibc-default-memory",
        action="store_true",
        help="leave glibc's allocator as it is (predict.keep_freed_memory: false), to compare",
    )
    parser.add_argument(
        "--model",
        help="network: MLflow URI or checkpoint (default: predict.model, the champion); 'random': seeded random weights",
    )
    parser.add_argument(
        "--orientation",
        choices=["RAS", "LPS", "LAS"],
        default=BRATS_ORIENTATION,
        help="voxel order of the case's files (default LPS, as BraTS stores them; RAS reads faster)",
    )
    parser.add_argument("--out", help="write the result JSON here (printed otherwise)")
    args = parser.parse_args(argv)
    from tumorseg.config import read_params

    result = benchmark_predict(
        read_params(args.params),
        repeats=args.repeats,
        folder_cases=args.folder_cases,
        folder_repeats=args.folder_repeats,
        device=args.device,
        keep_freed_memory=not args.glibc_default_memory,
        model=args.model,
        orientation=args.orientation,
    )
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
