"""The flows' cache keys come from dvc.yaml itself: the same params, dependencies and outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pipelines.stage_cache import PACKAGE_PARENT, ROOT, StageSpec, dvc_stage_specs, interpolate, stage_spec

from tumorseg.config import apply_overrides, read_params
from tumorseg.errors import ConfigError


def test_every_dvc_stage_is_a_flow_stage_with_the_params_deps_and_outs_dvc_resolves() -> None:
    """The flows' specs (``foreach`` expanded by stage_cache) against DVC's own resolution of dvc.yaml."""
    from dvc.repo import Repo
    from pipelines.training_flow import stage_specs

    specs = stage_specs()
    params = read_params(ROOT / "params.yaml")
    resolved = {stage.name: stage for stage in Repo(str(ROOT)).index.stages}
    assert set(resolved) <= set(specs) and set(specs) - set(resolved) == {"tune"}
    assert {"train@3d", "train@2d", "ingest@2d", "compress"} <= set(resolved)
    for name, stage in resolved.items():
        spec = specs[name]
        wdir = Path(stage.wdir).relative_to(ROOT)
        listed = [k for d in stage.deps if type(d).__name__ == "ParamsDependency" for k in d.params]
        assert list(spec.params) == listed, name
        files = [d.def_path for d in stage.deps if type(d).__name__ != "ParamsDependency"]
        files += [
            d.def_path
            for d in stage.deps
            if type(d).__name__ == "ParamsDependency"
            and d.def_path != str(Path(os.path.relpath(ROOT / "params.yaml", stage.wdir)))
        ]
        expected = [os.path.normpath(wdir / f) for f in files]
        got = [
            str(p.relative_to(PACKAGE_PARENT.parent)) if PACKAGE_PARENT in p.parents else str(p)
            for p in spec.dep_paths(params)
        ]
        assert sorted(got) == sorted(expected), name
        assert [str(p) for p in spec.out_paths(params)] == [
            os.path.normpath(wdir / o.def_path) for o in stage.outs
        ], name
        for dep in spec.dep_paths(params):
            if PACKAGE_PARENT in dep.parents:
                assert dep.exists(), f"{name}: code dependency {dep} does not exist"
    # tune's best-params file is a params *file* of train: its content is part of the key
    assert Path("reports/best_params.yaml") in specs["train@3d"].dep_paths(params)


def test_paths_follow_the_run_params_and_wdir() -> None:
    specs = dvc_stage_specs()
    params = apply_overrides(read_params(ROOT / "params.yaml"), {"paths.ingested": "/tmp/elsewhere/ingested"})
    assert Path("/tmp/elsewhere/ingested") in specs["validate@3d"].dep_paths(params)
    # ingest runs in data/: `../${paths.ingested}` is the same folder; `${data.source}` is data/<source>
    assert specs["ingest@3d"].out_paths(params) == [Path("/tmp/elsewhere/ingested")]
    mine = apply_overrides(params, {"data.source": "mydata", "paths.ingested": "data/ingested"})
    assert Path("data/mydata") in specs["ingest@3d"].dep_paths(mine)
    assert specs["ingest@3d"].out_paths(mine) == [Path("data/ingested")]
    assert PACKAGE_PARENT / "tumorseg/data/ingest.py" in specs["ingest@3d"].dep_paths(mine)
    with pytest.raises(ConfigError, match=r"dvc.yaml: \$\{paths.nowhere\}: not set in params.yaml"):
        interpolate("${paths.nowhere}/x", params)


def test_the_key_changes_with_listed_params_and_dependency_contents_only(tmp_path: Path) -> None:
    dep = tmp_path / "manifest.csv"
    dep.write_text("case_id\na\n")
    spec = stage_spec(
        "validate",
        {
            "deps": ["${paths.ingested}/manifest.csv"],
            "params": ["validate.max_invalid_fraction"],
            "outs": ["out"],
        },
    )
    params = {
        "paths": {"ingested": str(tmp_path)},
        "validate": {"max_invalid_fraction": 0.5},
        "train": {"lr": 1},
    }
    key = spec.key(params)
    assert spec.key(apply_overrides(params, {"train.lr": 2})) == key  # not a param of the stage
    assert spec.key(apply_overrides(params, {"validate.max_invalid_fraction": 0.2})) != key
    dep.write_text("case_id\nb\n")
    assert spec.key(params) != key
    assert isinstance(spec, StageSpec) and not spec.outputs_exist(params)


def test_dvc_yaml_is_read_from_the_working_folder_when_a_flow_runs(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "dvc.yaml").write_text("stages:\n  only:\n    cmd: x\n    params: [train.lr]\n")
    monkeypatch.chdir(tmp_path)
    assert list(dvc_stage_specs()) == ["only"] and dvc_stage_specs()["only"].params == ("train.lr",)
