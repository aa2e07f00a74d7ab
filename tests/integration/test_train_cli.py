"""``tumorseg train``: bad input is one stderr line (exit 2) before training starts; a tiny run succeeds."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tumorseg.cli import main
from tumorseg.data.case_store import save_case

REPO_ROOT = Path(__file__).resolve().parents[2]
PARAMS = str(REPO_ROOT / "params.yaml")


def _write_cases(root: Path, shapes: dict[str, tuple[int, int, int]], split: dict[str, list[str]]) -> None:
    """Preprocessed-format cases: a bright FLAIR/T1ce sphere (ED shell, ET core) in an ellipsoid brain."""
    rng = np.random.default_rng(1)
    (root / "pre" / "cases").mkdir(parents=True)
    for case_id, shape in shapes.items():
        grid = np.stack(np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij"))
        brain = ((grid / (np.array(shape)[:, None, None, None] * 0.45)) ** 2).sum(0) <= 1
        r = np.sqrt(((grid - 2) ** 2).sum(0))
        label = np.where(r < 7, 2, 0).astype(np.uint8)
        label[r < 4] = 3
        image = rng.normal(0, 0.3, (4, *shape)) + np.stack([label == 0, label == 3, label > 0, label == 2])
        image[:, ~brain] = 0
        save_case(
            root / "pre" / "cases" / f"{case_id}.npz",
            image=image.astype(np.float16),
            label=label,
            brain=brain,
        )
    (root / "split.json").write_text(json.dumps(split))


def _args(root: Path, *sets: str) -> list[str]:
    base = [
        f"paths.preprocessed={root / 'pre'}",
        f"paths.split={root / 'split.json'}",
        f"paths.reports={root / 'reports'}",
        f"paths.mlruns={root / 'mlruns'}",
        f"train.out_dir={root / 'models'}",
        "train.max_epochs=1",
        "train.steps_per_epoch=2",
        "data_loader.patch_size=[16,16,16]",
        "model.unet.channels=[4,8,16]",
        "model.unet.strides=[2,2]",
        "mlflow.enabled=false",
        "train.score_test=true",
        "trainer.accelerator=cpu",
    ]
    out = ["train", "--params", PARAMS]
    for item in [*base, *sets]:
        out += ["-S", item]
    return out


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        (["model.name=vnet"], "model.name"),
        (["loss.name=tversky"], "loss.name"),
        (["train.optimizer=lion"], "train.optimizer"),
        (["data_loader.patch_size=[18,16,16]"], "data_loader.patch_size"),
        (["data_loader.mode=2d", "data_loader.patch_size_2d=[18,16]"], "data_loader.patch_size_2d"),
        (["model.name=swinunetr", "data_loader.patch_size=[32,32,32]"], "data_loader.patch_size"),
    ],
)
def test_bad_params_fail_in_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sets: list[str], key: str
) -> None:
    assert main(_args(tmp_path, *sets)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tumorseg train: error: ") and f": {key}: " in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "models").exists()  # nothing started


def test_patch_larger_than_the_smallest_volume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_cases(
        tmp_path,
        {"A": (24, 24, 24), "B": (40, 40, 12), "C": (24, 24, 24)},
        {"train": ["A", "B"], "val": ["C"]},
    )
    assert main(_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "data_loader.patch_size: [16, 16, 16] is larger than the smallest training volume 24x24x12" in err
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("empty", ["train", "val"])
def test_empty_split_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], empty: str
) -> None:
    split = {"train": ["A"], "val": ["A"], "test": []}
    split[empty] = []
    _write_cases(tmp_path, {"A": (24, 24, 24)}, split)
    assert main(_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"paths.split: {tmp_path / 'split.json'} has no '{empty}' cases" in err


def test_missing_split_file_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(tmp_path)) == 2
    assert "no split file; run `tumorseg split` first" in capsys.readouterr().err


def test_cli_trains_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    shapes = {c: (24, 26, 24) for c in "ABCDE"}
    _write_cases(tmp_path, shapes, {"train": ["A", "B", "C"], "val": ["D"], "test": ["E"]})
    with caplog.at_level(logging.INFO):
        assert main(_args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.startswith("trained 1 epochs (2 steps") and "best.ckpt" in out
    summary = out.splitlines()[0]
    assert not [r for r in caplog.records if r.getMessage() == summary]  # printed once, not logged again
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["dice_WT"] <= 1.0
    assert (tmp_path / "models" / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        (["trainer.strategy=dpp"], "trainer.strategy"),
        (["trainer.accelerator=quantum"], "trainer.accelerator"),
    ],
)
def test_bad_hardware_settings_fail_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sets: list[str], key: str
) -> None:
    _write_cases(tmp_path, {"A": (24, 24, 24), "B": (24, 24, 24)}, {"train": ["A"], "val": ["B"]})
    assert main(_args(tmp_path, *sets)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f": {key}: " in err
    assert not (tmp_path / "models" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cli_ddp_two_processes(tmp_path: Path) -> None:
    """``strategy: ddp`` relaunches the ``tumorseg`` command once per device (what torchrun/SLURM do)."""
    shapes = {c: (24, 26, 24) for c in "ABCDEF"}
    _write_cases(tmp_path, shapes, {"train": ["A", "B", "C"], "val": ["D", "E", "F"], "test": ["F"]})
    script = Path(sys.executable).parent / "tumorseg"
    args = _args(
        tmp_path, "trainer.strategy=ddp", "trainer.devices=2", "train.max_epochs=2", "train.steps_per_epoch=4"
    )
    done = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "rank 1 finished; rank 0 reports the results" in lines
    assert any(line.startswith("trained 2 epochs (4 steps") for line in lines)  # 8 patches/epoch over 2 ranks
    metrics = json.loads((tmp_path / "reports" / "train_metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["global_step"] == 4
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["test"]["n_cases"] == 1
