"""ingest -> validate -> preprocess -> split, end to end, through both drivers.

The Prefect flow runs against Prefect's own local ephemeral server (``prefect_test_harness``),
not a mock; the same functions back the ``tumorseg`` commands that ``dvc.yaml`` runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tumorseg.cli import main
from tumorseg.data.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]


def _tiny_params(tmp_path: Path, source: str | None = None, **synth: object) -> Path:
    """The project's params.yaml with paths moved into tmp_path and a tiny synthetic dataset.

    ``data.source`` is ``source``, by default the folder ``tmp_path/raw`` (a user's own folder).
    """
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in ("ingested", "validated", "preprocessed", "reports"):
        params["paths"][key] = str(tmp_path / key)
    params["data"]["source"] = source or str(tmp_path / "raw")
    params["paths"]["split"] = str(tmp_path / "split.json")
    params["synth"].update({"cases": 8, "spacing_mm": 4.0, "tumour_free_fraction": 0.25, **synth})
    params["preprocess"]["target_spacing_mm"] = [4.0, 4.0, 4.0]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_cli_chain_ingest_validate_preprocess_split(tmp_path: Path) -> None:
    params = _tiny_params(tmp_path, reoriented_fraction=0.5)
    p = ["--params", str(params)]
    assert main(["synth", "--out", str(tmp_path / "raw"), *p]) == 0
    raw_before = _snapshot(tmp_path / "raw")

    # One bad case: a truncated FLAIR must be quarantined, not crash the chain.
    bad = sorted((tmp_path / "raw").glob("BraTS2021_*"))[1]
    flair = next(bad.glob("*_flair.nii.gz"))
    flair.write_bytes(flair.read_bytes()[: flair.stat().st_size // 3])
    raw_before = _snapshot(tmp_path / "raw")

    assert main(["ingest", *p]) == 0
    assert main(["validate", str(tmp_path / "ingested"), "--out", str(tmp_path / "validated"), *p]) == 0
    assert main(["preprocess", *p]) == 0
    assert main(["split", *p]) == 0

    manifest = read_manifest(tmp_path / "validated")
    quarantined = manifest[manifest.status == "quarantined"]
    assert quarantined.case_id.tolist() == [bad.name]
    assert "flair" in quarantined.reason.iloc[0].lower()
    assert (tmp_path / "validated" / "validation" / "data_docs" / "index.html").is_file()

    index = pd.read_csv(tmp_path / "preprocessed" / "index.csv")
    assert sorted(index.case_id) == sorted(manifest[manifest.status == "ok"].case_id)
    case = np.load(tmp_path / "preprocessed" / index.npz.iloc[0])
    assert case["image"].shape[0] == 4 and case["image"].shape[1:] == case["label"].shape
    brain = case["brain"]
    means = case["image"][:, brain].astype(np.float32).mean(axis=1)
    assert np.all(np.abs(means) < 0.05), "channels are z-scored on brain voxels"

    split = json.loads((tmp_path / "split.json").read_text())
    ids = split["train"] + split["val"] + split["test"]
    assert sorted(ids) == sorted(index.case_id) and len(ids) == len(set(ids))
    assert all(split[name] for name in ("train", "val", "test"))

    # Source data is never modified, moved or deleted.
    assert _snapshot(tmp_path / "raw") == raw_before

    # Re-running ingest on unchanged data does no work and changes nothing.
    before = (tmp_path / "ingested" / "manifest.csv").read_text()
    assert main(["ingest", *p]) == 0
    assert (tmp_path / "ingested" / "manifest.csv").read_text() == before


def test_prefect_data_flow_matches_cli_outputs(tmp_path: Path) -> None:
    from pipelines.data_flows import data_pipeline_flow
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    params = _tiny_params(tmp_path, source="synth")  # the flow generates into tmp_path/data/synth
    with prefect_test_harness(server_startup_timeout=120):
        summary = data_pipeline_flow(params_path=str(params))

        async def artifact_keys() -> set[str]:
            async with get_client() as client:
                return {a.key for a in await client.read_artifacts() if a.key}

        import asyncio

        keys = asyncio.run(artifact_keys())
    assert {"data-validation", "data-split"} <= keys
    assert "(generated, brats2021, 8 cases)" in summary["source"]
    flow_index = (tmp_path / "preprocessed" / "index.csv").read_text()
    flow_split = (tmp_path / "split.json").read_text()

    # The CLI (what DVC runs) on the same inputs writes the same artefacts.
    cli_root = tmp_path / "cli"
    cli_root.mkdir()
    cli_params = _tiny_params(cli_root)
    shutil.copytree(tmp_path / "data" / "synth", cli_root / "raw", dirs_exist_ok=True)
    p = ["--params", str(cli_params)]
    for cmd in (["ingest"], ["validate", str(cli_root / "ingested"), "--out", str(cli_root / "validated")]):
        assert main([*cmd, *p]) == 0
    assert main(["preprocess", *p]) == 0 and main(["split", *p]) == 0
    assert (cli_root / "split.json").read_text() == flow_split
    cli_index = pd.read_csv(cli_root / "preprocessed" / "index.csv").drop(columns=["npz"], errors="ignore")
    flow_index_df = pd.read_csv(pd.io.common.StringIO(flow_index)).drop(columns=["npz"], errors="ignore")
    pd.testing.assert_frame_equal(cli_index, flow_index_df)


def test_validation_failure_is_one_line_and_keeps_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    params = _tiny_params(tmp_path, cases=4, tumour_free_fraction=0.0)
    p = ["--params", str(params)]
    assert main(["synth", "--out", str(tmp_path / "raw"), *p]) == 0
    for case in sorted((tmp_path / "raw").glob("BraTS2021_*"))[:2]:
        (next(case.glob("*_t1ce.nii.gz"))).unlink()
    assert main(["ingest", *p]) == 0
    capsys.readouterr()
    code = main(["validate", str(tmp_path / "ingested"), "--out", str(tmp_path / "validated"), *p])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "50.0%" in err and "max_invalid_fraction" in err
    assert "Traceback" not in err
    assert (tmp_path / "validated" / "validation" / "report.json").is_file()


def test_prefect_data_flow_reads_a_users_folder_without_generating(tmp_path: Path) -> None:
    from pipelines.data_flows import data_pipeline_flow
    from prefect.testing.utilities import prefect_test_harness

    folder = tmp_path / "mine"
    assert (
        main(["synth", "--out", str(folder), "--cases", "5", "--spacing", "4", "--layout", "brats2023"]) == 0
    )
    before = _snapshot(folder)
    params = _tiny_params(tmp_path, source=str(folder))
    with prefect_test_harness(server_startup_timeout=120):
        summary = data_pipeline_flow(params_path=str(params))
    assert summary["source"] == f"data.source: {folder} (read-only, brats2023, 5 cases)"
    assert sorted(read_manifest(tmp_path / "ingested").case_id) == sorted(
        p.name for p in folder.iterdir() if p.is_dir()
    )
    assert _snapshot(folder) == before
    assert not any((tmp_path / "data" / "synth").glob("*"))  # the generator never ran
