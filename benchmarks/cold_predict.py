"""Benchmark: ``tumorseg predict`` as a whole process (what a user waits for from the shell).

Two comparisons, both on BraTS-size cases (240x240x155 at 1 mm, stored LPS as BraTS stores them,
``tumorseg synth --spacing 1``) with the model ``predict`` runs by default (the champion), as
registration now stores it: with ``network.onnx``, so ``predict.engine: auto`` runs it on ONNX
Runtime without importing torch. A registered version without that file is given one in a
temporary model cache (:func:`onnx_model_cache`): the alias is still resolved in the MLflow store.

- **cold vs warm**: ``tumorseg predict CASE`` as a new process (imports, params, resolving and
  loading the model, the case's drift check against the model's training profile, one case) against
  the same case predicted in a process that already holds the model
  (:func:`~tumorseg.models.predictor.predict_dataset` after an untimed first call, no drift check) on
  the same engine (the torch engine's warm time is reported beside it). Target: at most 3x. The same
  command with ``-S monitor.enabled=false`` (the baseline's work) is timed too.
- **against MONAI**: ``tumorseg predict DIR`` on ``cases`` cases against
  ``benchmarks/monai_pipeline.py`` (LoadImaged -> ... -> SaveImaged, the same network and window
  settings), both as whole processes. Target: at most 0.6x.

The runs alternate (the warm predictions, ours on one case with and without the check, MONAI, ours on
the folder) ``repeats`` times after an untimed round (file cache); medians are reported. A CPU's speed
can drift by tens of percent within minutes (shared or throttled machines), so each ratio is the median
of the rounds' own ratios: every round times the warm case just before the one-case commands, and
MONAI just before the folder.

Usage::

    python -m benchmarks.cold_predict --out /tmp/cold.json [--cases 3] [--repeats 5] [--model URI]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_COLD_OVER_WARM = 3.0
TARGET_VS_MONAI = 0.6
ROOT = Path(__file__).resolve().parents[1]


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds and stdout of ``cmd`` run as a new process; RuntimeError with its stderr if it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds, done.stdout


def onnx_model_cache(uri: str, tracking_uri: str, trained: Any, cache: Path) -> Path:
    """A model cache (``TUMORSEG_MODEL_CACHE``) holding the version ``uri`` resolves to as registration
    now stores it, with ``network.onnx``: ``tumorseg predict --model uri`` then resolves the alias in
    the store and runs on ONNX Runtime. Nothing is registered and nothing is written under mlruns/."""
    import os

    import yaml

    from tumorseg.models.onnx_predictor import ONNX_ARTIFACT
    from tumorseg.models.package import save_onnx
    from tumorseg.registry.loading import MODEL_CACHE_ENV, downloaded_model

    previous = os.environ.get(MODEL_CACHE_ENV)
    os.environ[MODEL_CACHE_ENV] = str(cache)
    try:
        with downloaded_model(uri, tracking_uri) as model:
            folder = model.folder
    finally:
        if previous is None:
            os.environ.pop(MODEL_CACHE_ENV)
        else:
            os.environ[MODEL_CACHE_ENV] = previous
    if not str(folder).startswith(str(cache)):
        raise RuntimeError(f"{uri} was not cached under {cache}; only a models:/ URI can be timed this way")
    onnx_file = save_onnx(trained, folder / "artifacts")
    if onnx_file is None:
        raise RuntimeError(f"the network of {uri} did not export to ONNX (see the log)")
    meta = yaml.safe_load((folder / "MLmodel").read_text())
    artifacts = meta["flavors"]["python_function"]["artifacts"]
    artifacts[ONNX_ARTIFACT] = {"path": f"artifacts/{onnx_file.name}", "uri": str(onnx_file)}
    (folder / "MLmodel").write_text(yaml.safe_dump(meta, sort_keys=False))
    return cache


def _warm_seconds(predictor: Any, case: Path, out: Path) -> float:
    """Seconds of one prediction of ``case`` by an already loaded predictor, into ``out`` (then removed)."""
    from tumorseg.models.predictor import predict_dataset

    start = time.perf_counter()
    predict_dataset(case, out, predictor)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def benchmark_cold_predict(
    params: dict[str, Any] | None = None,
    *,
    cases: int = 3,
    repeats: int = 5,
    model: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time the whole-process runs of the module docstring; returns medians, ratios and targets."""
    import os

    import torch

    from benchmarks.predict import BRATS_ORIENTATION, _copies, bench_network
    from tumorseg.config import SynthConfig, read_params
    from tumorseg.data.layouts import discover_cases
    from tumorseg.data.synth import synthesize_case, write_case
    from tumorseg.models.config import PredictConfig
    from tumorseg.models.onnx_predictor import OnnxPackage, OnnxSegmentationPredictor, package_from_artifacts
    from tumorseg.models.predictor import SegmentationPredictor
    from tumorseg.registry.loading import MODEL_CACHE_ENV, model_files
    from tumorseg.tracking import params_tracking_uri

    params = read_params(ROOT / "params.yaml") if params is None else params
    uri = model or params.get("predict", {}).get("model", "models:/tumorseg@champion")
    trained, weights = bench_network(params, uri, seed)
    if weights.startswith("random"):
        raise RuntimeError(f"no trained model to time ({weights}); run `dvc repro` first")
    predictor = SegmentationPredictor(trained, PredictConfig(device="cpu"))
    window = predictor.sliding_window
    with tempfile.TemporaryDirectory(prefix="tumorseg-bench-cold-") as tmp:
        root = Path(tmp)
        tracking_uri = params_tracking_uri(params)
        cache = onnx_model_cache(uri, tracking_uri, trained, root / "model-cache")
        env = {**os.environ, MODEL_CACHE_ENV: str(cache)}
        os.environ[MODEL_CACHE_ENV] = str(cache)
        try:
            files = model_files(uri, tracking_uri=tracking_uri)
        finally:
            os.environ.pop(MODEL_CACHE_ENV)
        package: OnnxPackage | None = package_from_artifacts(files.artifacts) if files else None
        if package is None:
            raise RuntimeError(f"{uri}: the ONNX package was not found in {cache}")
        onnx_predictor = OnnxSegmentationPredictor(package, PredictConfig(device="cpu"))

        synth = SynthConfig(
            cases=1, spacing_mm=1.0, seed=seed, tumour_free_fraction=0.0, reoriented_fraction=0.0
        )
        write_case(synthesize_case(1, synth), root / "raw", "brats2021", orientation=BRATS_ORIENTATION)
        folder = _copies(discover_cases(root / "raw")[0], root / "cases", cases)
        one = sorted(folder.iterdir())[0]
        network_file = root / "network.pt"
        torch.save(trained.network, network_file)

        tumorseg = [str(Path(sys.executable).with_name("tumorseg")), "predict"]  # the console script
        ours_one = [*tumorseg, str(one), "--model", uri, "--device", "cpu", "--out"]
        ours_dir = [*tumorseg, str(folder), "--model", uri, "--device", "cpu", "--out"]
        # the same command without the drift check, which the warm in-process baseline does not run
        unchecked = [*tumorseg, str(one), "--model", uri, "--device", "cpu", "-S", "monitor.enabled=false"]
        monai = [
            sys.executable,
            str(ROOT / "benchmarks" / "monai_pipeline.py"),
            str(folder),
            "OUT",
            str(network_file),
            "--spacing",
            *(str(s) for s in trained.spacing_mm),
            "--roi",
            *(str(r) for r in trained.roi_size),
            "--overlap",
            str(window.overlap),
            "--sw-batch-size",
            str(window.sw_batch_size),
            "--mode",
            window.blend_mode,
            "--threshold",
            str(window.threshold),
        ]
        times: dict[str, list[float]] = {
            "warm_one": [],
            "warm_one_torch": [],
            "monai_dir": [],
            "ours_dir": [],
            "ours_one": [],
            "ours_one_unchecked": [],
        }
        engines: set[str] = set()
        for k in range(repeats + 1):  # round 0, untimed: file cache and the warm predictors' first touch
            out = root / f"run{k}"
            warm_s = {
                "warm_one": _warm_seconds(onnx_predictor, one, out / "warm"),
                "warm_one_torch": _warm_seconds(predictor, one, out / "warm-torch"),
            }
            runs = {  # the one-case commands right after the warm case they are compared with
                "ours_one": [*ours_one, str(out / "ours_one")],
                "ours_one_unchecked": [*unchecked, "--out", str(out / "ours_one_unchecked")],
                "monai_dir": [x if x != "OUT" else str(out / "monai") for x in monai],
                "ours_dir": [*ours_dir, str(out / "ours_dir")],
            }
            for name, cmd in runs.items():
                seconds, stdout = _timed(cmd, env)
                if name != "monai_dir":
                    # the summary line ends "... on ENGINE" or "... on ENGINE; drift: ..."
                    engines.add(stdout.strip().splitlines()[-1].rsplit(" on ", 1)[-1].split(";")[0])
                if k > 0:  # the first round warms the file cache
                    times[name].append(seconds)
            if k > 0:
                for name, seconds in warm_s.items():
                    times[name].append(seconds)
            shutil.rmtree(out, ignore_errors=True)
    median = {name: statistics.median(values) for name, values in times.items()}

    def paired(name: str, baseline: str) -> float:
        """The median over rounds of ``name``'s time over ``baseline``'s in the same round."""
        return statistics.median(a / b for a, b in zip(times[name], times[baseline], strict=True))

    return {
        "model": weights,
        "engine": ", ".join(sorted(engines)),
        "cases": cases,
        "repeats": repeats,
        "warm_one_s": median["warm_one"],
        "warm_one_torch_s": median["warm_one_torch"],
        "cold_one_s": median["ours_one"],
        "cold_over_warm": paired("ours_one", "warm_one"),
        "cold_over_warm_torch": paired("ours_one", "warm_one_torch"),
        "cold_unchecked_s": median["ours_one_unchecked"],
        "cold_unchecked_over_warm": paired("ours_one_unchecked", "warm_one"),
        "target_cold_over_warm": TARGET_COLD_OVER_WARM,
        "ours_dir_s": median["ours_dir"],
        "monai_dir_s": median["monai_dir"],
        "vs_monai": paired("ours_dir", "monai_dir"),
        "target_vs_monai": TARGET_VS_MONAI,
        "runs_s": times,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tumorseg predict as a whole process")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    result = benchmark_cold_predict(cases=args.cases, repeats=args.repeats, model=args.model)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("runs_s")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
