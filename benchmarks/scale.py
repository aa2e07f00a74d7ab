"""``make bench`` (``--only scale``): BraTS-size data at 1 mm, memory and throughput against the dataset size.

Three questions, each answered by a ratio against a baseline measured in the same run:

1. **Data stages** (ingest, validate, preprocess at 1 mm): cases/s with 2 worker processes vs 1,
   vs a plain nibabel load of the same files; peak memory of the whole process tree on 64 cases
   vs 16 (flat: memory is bounded by the worker count, not the dataset).
2. **Training memory**: peak resident memory of the same short ``tumorseg train`` (1 epoch, 2 steps,
   then validation on the val split) on 64 cases vs 16 (target <= 1.3x).
3. **Training throughput**: patches/s of the out-of-core reader vs a true in-memory cache of the
   same cases, in the same process, each side going first in turn (target >= 0.9x); also vs reloading a whole case
   per draw (what the pipeline did before), and whole optimiser steps fed by each reader.

Memory is the peak of the *sum* of the resident memory of a command and all its descendants
(worker processes included), sampled every 50 ms with psutil.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

SMALL, LARGE = 16, 64
TUMORSEG = str(Path(sys.executable).parent / "tumorseg")
"""The console script of this environment (the benchmark may run without the venv on PATH)."""
SPACING = [1.0, 1.0, 1.0]


def _tree_rss(process: Any) -> int:
    import psutil

    total = 0
    for proc in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a worker that just ended
            total += proc.memory_info().rss
    return total


def run_measured(command: list[str], cwd: Path) -> dict[str, float]:
    """Run ``command``; its wall time and the peak RSS (MiB) of its process tree."""
    import psutil

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    handle = psutil.Process(proc.pid)
    peak = 0
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    while proc.poll() is None:
        peak = max(peak, _tree_rss(handle))
        time.sleep(0.05)
    reader.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{''.join(output)[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": peak / 2**20}


def _params(root: Path, source: Path, **overrides: Any) -> Path:
    """The project's params.yaml with every path inside ``root`` and ``data.source`` = ``source``."""
    from tumorseg.config import apply_overrides, read_params

    params = read_params("params.yaml")
    values: dict[str, Any] = {
        "data.source": str(source),
        **{
            f"paths.{k}": str(root / k)
            for k in ("ingested", "validated", "preprocessed", "reports", "mlruns")
        },
        "paths.split": str(root / "split.json"),
        "train.out_dir": str(root / "models"),
        "preprocess.target_spacing_mm": SPACING,
        **overrides,
    }
    path = root / "params.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(apply_overrides(params, values), sort_keys=False))
    return path


def _stage(name: str, params: Path, *args: str) -> dict[str, float]:
    return run_measured([TUMORSEG, name, "--params", str(params), *args], params.parent)


def data_stages(source: Path, root: Path, workers: int) -> dict[str, Any]:
    """ingest, validate, preprocess of ``source`` with ``workers`` processes; seconds and peak MiB of each."""
    params = _params(root, source, **{"ingest.workers": workers, "preprocess.workers": workers})
    stages = {
        "ingest": _stage("ingest", params),
        "validate": _stage("validate", params, str(root / "ingested"), "--out", str(root / "validated")),
        "preprocess": _stage("preprocess", params),
    }
    stored = sum(p.stat().st_size for p in (root / "preprocessed" / "cases").glob("*.npz"))
    return {
        "stages": stages,
        "seconds": sum(s["seconds"] for s in stages.values()),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in stages.values()),
        "stored_mb_per_case": stored / 2**20 / len(list((root / "preprocessed" / "cases").glob("*.npz"))),
        "params": str(params),
    }


def nibabel_load(source: Path) -> dict[str, float]:
    """Baseline: every NIfTI file read into float32 with plain nibabel, in a fresh process."""
    code = (
        "import sys, pathlib, numpy as np, nibabel as nib\n"
        "for f in sorted(pathlib.Path(sys.argv[1]).rglob('*.nii.gz')):\n"
        "    np.asarray(nib.load(f).dataobj, dtype=np.float32)\n"
    )
    return run_measured([sys.executable, "-c", code, str(source)], source)


def train_short(params: Path) -> dict[str, float]:
    """``tumorseg train``: 1 epoch of 2 steps, then validation on the whole val split."""
    overrides = [
        "train.max_epochs=1",
        "train.steps_per_epoch=2",
        "train.warmup_epochs=0",
        "train.checkpoint_every_n_steps=2",
        "mlflow.enabled=false",
    ]
    args = [a for o in overrides for a in ("-S", o)]
    subprocess.run(
        [TUMORSEG, "split", "--params", str(params)], cwd=params.parent, check=True, capture_output=True
    )
    return _stage("train", params, *args)


def reader_throughput(params_file: Path, draws: int = 48, rounds: int = 3, steps: int = 4) -> dict[str, Any]:
    """Patches/s of the out-of-core reader vs an in-memory cache vs a whole-case reload per draw."""
    import numpy as np
    import torch

    from tumorseg.config import read_params
    from tumorseg.data.datamodule import PatchDataset, case_records, read_split
    from tumorseg.data.transforms import load_preprocessed_case, train_transforms
    from tumorseg.models.inference import labels_to_regions
    from tumorseg.models.losses import build_loss
    from tumorseg.models.networks import build_network
    from tumorseg.training.config import load_training_config

    cfg = load_training_config(read_params(params_file))
    split = read_split(cfg.paths.split)
    paths = [r["path"] for r in case_records(cfg.paths.preprocessed, split["train"])]
    loader = cfg.data_loader

    class WholeCaseReload(PatchDataset):
        """The earlier data path: a ``CacheDataset`` whose plain-class loader stopped MONAI's caching,
        so every draw loaded the whole ``.npz`` before cropping."""

        def __getitem__(self, index: int) -> dict[str, Any]:
            load_preprocessed_case(self.readers[index % len(self.readers)].path)
            return super().__getitem__(index)

    def augment() -> Any:  # one per dataset: each is seeded alike and draws the same augmentations
        return train_transforms(loader, cfg.augment)

    datasets = {
        "out_of_core": PatchDataset(paths, loader, augment(), length=draws, cache_bytes=0),
        "in_memory": PatchDataset(paths, loader, augment(), length=draws, cache_bytes=1 << 62),
        "whole_case_reload": WholeCaseReload(paths, loader, augment(), length=draws, cache_bytes=0),
    }
    for dataset in datasets.values():
        dataset.set_random_state(seed=0)
        dataset[0]  # warm-up: page cache and transform set-up on both sides alike
    draws_s: dict[str, list[float]] = {name: [] for name in datasets}
    names = list(datasets)
    for round_ in range(rounds):
        for name in names[round_ % 3 :] + names[: round_ % 3]:  # each goes first once
            dataset = datasets[name]
            dataset.set_random_state(seed=round_)
            start = time.perf_counter()
            for index in range(draws):
                dataset[index]
            draws_s[name].append(draws / (time.perf_counter() - start))

    network = build_network(
        cfg.model, spatial_dims=3, patch_size=loader.network_patch, spacing=cfg.preprocess.target_spacing_mm
    )
    loss_fn = build_loss(cfg.loss, cfg.model.output)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)

    def step_rate(dataset: PatchDataset) -> float:
        start = time.perf_counter()
        for step in range(steps):
            items = [dataset[step * loader.batch_size + k] for k in range(loader.batch_size)]
            image = torch.stack([item["image"] for item in items])
            label = torch.stack([item["label"] for item in items])
            target = labels_to_regions(label) if cfg.model.output == "regions" else label
            optimizer.zero_grad(set_to_none=True)
            loss_fn(network(image), target).backward()
            optimizer.step()
        return steps * loader.batch_size / (time.perf_counter() - start)

    step_rate(datasets["in_memory"])  # warm-up
    steps_s: dict[str, list[float]] = {"out_of_core": [], "in_memory": []}
    for round_ in range(2):
        for name in ("out_of_core", "in_memory") if round_ == 0 else ("in_memory", "out_of_core"):
            steps_s[name].append(step_rate(datasets[name]))
    median = {name: float(np.median(v)) for name, v in draws_s.items()}
    step_median = {name: float(np.median(v)) for name, v in steps_s.items()}
    in_memory_bytes = sum(r.nbytes for r in datasets["in_memory"].readers)
    return {
        "cases": len(paths),
        "draws_per_round": draws,
        "rounds": rounds,
        "patches_per_s": median,
        "patches_per_s_runs": draws_s,
        "out_of_core_vs_in_memory": median["out_of_core"] / median["in_memory"],
        "out_of_core_vs_whole_case_reload": median["out_of_core"] / median["whole_case_reload"],
        "training_patches_per_s": step_median,
        "training_out_of_core_vs_in_memory": step_median["out_of_core"] / step_median["in_memory"],
        "in_memory_cache_mb": in_memory_bytes / 2**20,
        "patch_size": list(loader.patch_size),
        "batch_size": loader.batch_size,
    }


def bench_scale(small: int = SMALL, large: int = LARGE, seed: int = 11) -> dict[str, Any]:
    """All three measurements on one generated 1 mm dataset (see the module docstring)."""
    from benchmarks.common import in_subprocess
    from tumorseg.config import section
    from tumorseg.data.synth import synthesize_dataset

    with tempfile.TemporaryDirectory(prefix="tumorseg-bench-scale-") as tmp:
        root = Path(tmp)
        full, part = root / f"raw{large}", root / f"raw{small}"
        synth = section("synth", {}).model_copy(update={"cases": large, "seed": seed, "spacing_mm": 1.0})
        started = time.perf_counter()
        synthesize_dataset(full, synth)
        synth_s = time.perf_counter() - started
        part.mkdir()
        for case in sorted(p for p in full.iterdir() if p.is_dir())[:small]:
            shutil.copytree(case, part / case.name)

        plain = nibabel_load(part)
        one = data_stages(part, root / "w1", workers=1)
        two = data_stages(part, root / "w2", workers=2)
        big = data_stages(full, root / "w2_large", workers=2)
        train_small = train_short(Path(two["params"]))
        train_large = train_short(Path(big["params"]))
        throughput = in_subprocess("reader_throughput", two["params"])

    per_case = {name: s["seconds"] / large for name, s in big["stages"].items()}
    result: dict[str, Any] = {
        "case_shape": "240x240x155x4 (+seg), 1 mm; preprocessed at 1 mm",
        "small_cases": small,
        "large_cases": large,
        "synth_seconds": synth_s,
        "nibabel_load": plain,
        "data_workers_1": one,
        "data_workers_2": two,
        "data_workers_2_large": big,
        "seconds_per_100_cases": {name: 100 * s for name, s in per_case.items()},  # from the large run
        "hours_for_1251_cases_workers_2": big["seconds"] / large * 1251 / 3600,
        "data_speedup_2_vs_1_worker": one["seconds"] / two["seconds"],
        "data_vs_nibabel_load": plain["seconds"] / two["seconds"],
        "data_peak_memory_large_vs_small": big["peak_rss_mb"] / two["peak_rss_mb"],
        "train_small": train_small,
        "train_large": train_large,
        "train_peak_memory_large_vs_small": train_large["peak_rss_mb"] / train_small["peak_rss_mb"],
        "reader": throughput,
    }
    result["rows"] = rows(result)
    return result


def rows(r: dict[str, Any]) -> list[list[str]]:
    small, large = r["small_cases"], r["large_cases"]
    two, one, big, plain = (
        r["data_workers_2"],
        r["data_workers_1"],
        r["data_workers_2_large"],
        r["nibabel_load"],
    )
    reader = r["reader"]
    return [
        [
            f"ingest + validate + preprocess, {small} cases 240x240x155x4 at 1 mm, 2 worker processes",
            f"{small / two['seconds']:.2f} cases/s",
            f"1 worker: {small / one['seconds']:.2f} cases/s",
            f"{r['data_speedup_2_vs_1_worker']:.2f}x",
        ],
        [
            "ingest + validate + preprocess vs reading the same files with plain nibabel",
            f"{small / two['seconds']:.2f} cases/s",
            f"nibabel load: {small / plain['seconds']:.2f} cases/s",
            f"{r['data_vs_nibabel_load']:.2f}",
        ],
        [
            f"data stages peak memory (process tree), {large} vs {small} cases",
            f"{big['peak_rss_mb']:.0f} MiB",
            f"{small} cases: {two['peak_rss_mb']:.0f} MiB",
            f"{r['data_peak_memory_large_vs_small']:.2f} (flat)",
        ],
        [
            f"`tumorseg train` peak memory (1 epoch x 2 steps + validation), {large} vs {small} cases at 1 mm",
            f"{r['train_large']['peak_rss_mb']:.0f} MiB",
            f"{small} cases: {r['train_small']['peak_rss_mb']:.0f} MiB",
            f"{r['train_peak_memory_large_vs_small']:.2f} (target <= 1.3)",
        ],
        [
            f"patch draws/s, out-of-core reader vs in-memory cache ({reader['cases']} cases, patch "
            f"{'x'.join(map(str, reader['patch_size']))})",
            f"{reader['patches_per_s']['out_of_core']:.1f} patches/s",
            f"in memory: {reader['patches_per_s']['in_memory']:.1f} patches/s",
            f"{reader['out_of_core_vs_in_memory']:.2f} (target >= 0.9)",
        ],
        [
            "training patches/s (optimiser steps), out-of-core reader vs in-memory cache",
            f"{reader['training_patches_per_s']['out_of_core']:.2f} patches/s",
            f"in memory: {reader['training_patches_per_s']['in_memory']:.2f} patches/s",
            f"{reader['training_out_of_core_vs_in_memory']:.2f} (target >= 0.9)",
        ],
        [
            "patch draws/s, out-of-core reader vs reloading the whole case per draw (decision 0002)",
            f"{reader['patches_per_s']['out_of_core']:.1f} patches/s",
            f"whole-case reload: {reader['patches_per_s']['whole_case_reload']:.1f} patches/s",
            f"{reader['out_of_core_vs_whole_case_reload']:.1f}x",
        ],
    ]


if __name__ == "__main__":  # python -m benchmarks.scale: print the figures
    print(json.dumps(bench_scale(), indent=1))
