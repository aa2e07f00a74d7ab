"""A throw-away DVC repository holding the project's real ``dvc.yaml``, for the ``dvc repro`` tests.

Shared by tests/integration/test_dvc_pipeline.py (3-D branch) and tests/integration/test_planar_dvc.py
(2-D branch); test modules load this file by path (the tests folders are not packages).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
"""The venv's bin folder: ``dvc`` and the ``tumorseg`` console script the stages call."""


TINY_3D: dict[str, Any] = {
    "preprocess.target_spacing_mm": [4.0, 4.0, 4.0],
    "data_loader.patch_size": [16, 16, 16],
    "model.unet.channels": [4, 8, 16],
    "model.unet.strides": [2, 2],
    "model.unet.num_res_units": 1,
    "train.max_epochs": 1,
    "train.steps_per_epoch": 3,
    "train.warmup_epochs": 0,
    "train.checkpoint_every_n_steps": 3,
    "sliding_window.sw_batch_size": 2,
    "trainer.accelerator": "cpu",
    "mlflow.overlays": 0,
    "evaluate.bootstrap_resamples": 100,
    "evaluate.plots": False,
    "registry.bootstrap_resamples": 100,
}
"""A 3-D pipeline that trains in seconds on 4 mm data (the ``dvc repro`` tests' params overrides)."""


def run(cmd: list[str], cwd: Path, timeout: float = 600) -> str:
    """Run ``cmd`` in ``cwd`` with the venv first on PATH; fail the test with its output if it fails."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def write_params(repo: Path, params: dict[str, Any]) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvc_repo(tmp_path: Path, params: dict[str, Any]) -> Path:
    """``tmp_path/repo``: git + DVC initialised, the real ``dvc.yaml``, ``params`` as params.yaml.

    ``src`` links to the project's sources, since stage deps name the code they run; the 3-D and 2-D
    report folders hold an empty ``best_params.yaml``, as the project does.
    """
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / "src").symlink_to(ROOT / "src")
    (repo / "data").mkdir()  # the data stages' working directory, in git as data/.gitkeep
    (repo / "data" / ".gitkeep").touch()
    paths = params.get("paths") or {}
    for reports in (paths.get("reports", "reports"), paths.get("reports_2d", "reports/2d")):
        # as in the project: tune's best params per dataset, none yet (a dependency of train@3d/@2d)
        (repo / reports).mkdir(parents=True, exist_ok=True)
        (repo / reports / "best_params.yaml").write_text("{}\n")
    write_params(repo, params)
    run(["git", "init", "-q"], repo)
    run([str(BIN / "dvc"), "init", "-q"], repo)
    return repo
