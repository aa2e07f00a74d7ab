"""The real dvc.yaml on a tiny dataset: fresh repro works, a second does nothing, one param reruns only its stages."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml

_SPEC = importlib.util.spec_from_file_location("dvc_support", Path(__file__).parents[1] / "dvc_support.py")
dvc_support = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(dvc_support)
ROOT, BIN, _run, dvc_repo = dvc_support.ROOT, dvc_support.BIN, dvc_support.run, dvc_support.dvc_repo


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dvc_repro_is_reproducible_and_incremental(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synth"].update({"cases": 6, "spacing_mm": 4.0})
    params["preprocess"]["target_spacing_mm"] = [4.0, 4.0, 4.0]
    repo = dvc_repo(tmp_path, params)

    first = _run([str(BIN / "dvc"), "repro", "split@3d"], repo)
    for stage in ("source", "ingest", "validate", "preprocess", "split"):
        assert f"Running stage '{stage}@3d'" in first
    assert (repo / "data" / "split.json").is_file()

    second = _run([str(BIN / "dvc"), "repro", "split@3d"], repo)
    assert "Running stage" not in second
    assert "up to date" in _run([str(BIN / "dvc"), "status", "split@3d"], repo).lower()

    params["split"]["seed"] = 7
    dvc_support.write_params(repo, params)
    third = _run([str(BIN / "dvc"), "repro", "split@3d"], repo)
    assert "Running stage 'split@3d'" in third
    for stage in ("source", "ingest", "validate", "preprocess"):
        assert f"Running stage '{stage}@3d'" not in third

    # A local remote works offline: push the cache, drop it, pull it back.
    remote = tmp_path / "remote"
    _run([str(BIN / "dvc"), "remote", "add", "-d", "local", str(remote)], repo)
    _run([str(BIN / "dvc"), "push"], repo)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data")
    _run([str(BIN / "dvc"), "pull", "split@3d"], repo)
    assert (repo / "data" / "split.json").is_file()


def test_bytecode_caches_are_not_part_of_a_stages_code() -> None:
    """A checkout where Python wrote ``__pycache__/`` beside the sources hashes a stage's code folder
    (``src/tumorseg/compression``, a dependency of compress) as a clean clone does, so dvc.lock is the
    same on both and ``dvc status`` of a fresh clone is clean."""
    import subprocess

    def ignored(path: str) -> bool:
        done = subprocess.run(
            [str(BIN / "dvc"), "check-ignore", path], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode in (0, 1), done.stderr
        return done.returncode == 0

    assert ignored("src/tumorseg/compression/__pycache__/stage.cpython-311.pyc")
    assert ignored("src/tumorseg/dicom/brain.cpython-311.pyc")
    assert not ignored("src/tumorseg/compression/stage.py")
