"""Two ``dvc repro`` in one checkout: the second is refused with DVC's lock message and changes nothing;
once the first is done, the pipeline runs as usual."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import yaml

_SPEC = importlib.util.spec_from_file_location("dvc_support", Path(__file__).parents[1] / "dvc_support.py")
dvc_support = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(dvc_support)
ROOT, BIN, dvc_repo = dvc_support.ROOT, dvc_support.BIN, dvc_support.dvc_repo


@pytest.mark.slow
def test_a_second_dvc_repro_is_refused_while_one_runs_and_changes_nothing(tmp_path: Path) -> None:
    from dvc.repo import Repo

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synth"].update({"cases": 4, "spacing_mm": 4.0})
    repo = dvc_repo(tmp_path, params)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    repro = [str(BIN / "dvc"), "repro", "source@3d"]
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if ".dvc/tmp" not in str(p))

    with Repo(str(repo)).lock:  # the repository lock a running `dvc repro` holds
        second = subprocess.run(repro, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode != 0
    assert "Unable to acquire lock" in second.stdout + second.stderr
    after = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if ".dvc/tmp" not in str(p))
    assert after == before  # no data, no dvc.lock, nothing else written

    dvc_support.run(repro, repo)  # the lock released: it runs
    assert (repo / "dvc.lock").is_file() and (repo / "data" / "synth").is_dir()
