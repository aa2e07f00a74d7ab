"""The real dvc.yaml on a tiny dataset: fresh repro works, a second does nothing, one param reruns only its stages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_dvc_repro_is_reproducible_and_incremental(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / "src").symlink_to(ROOT / "src")  # stage deps name the code they run
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synth"].update({"cases": 6, "spacing_mm": 4.0})
    params["preprocess"]["target_spacing_mm"] = [4.0, 4.0, 4.0]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run([str(BIN / "dvc"), "init", "-q"], repo)

    first = _run([str(BIN / "dvc"), "repro", "split"], repo)
    for stage in ("synth", "ingest", "validate", "preprocess", "split"):
        assert f"Running stage '{stage}'" in first
    assert (repo / "data" / "split.json").is_file()

    second = _run([str(BIN / "dvc"), "repro", "split"], repo)
    assert "Running stage" not in second
    assert "up to date" in _run([str(BIN / "dvc"), "status", "split"], repo).lower()

    params["split"]["seed"] = 7
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run([str(BIN / "dvc"), "repro", "split"], repo)
    assert "Running stage 'split'" in third
    for stage in ("synth", "ingest", "validate", "preprocess"):
        assert f"Running stage '{stage}'" not in third

    # A local remote works offline: push the cache, drop it, pull it back.
    remote = tmp_path / "remote"
    _run([str(BIN / "dvc"), "remote", "add", "-d", "local", str(remote)], repo)
    _run([str(BIN / "dvc"), "push"], repo)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data")
    _run([str(BIN / "dvc"), "pull", "split"], repo)
    assert (repo / "data" / "split.json").is_file()
