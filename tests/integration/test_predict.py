"""``tumorseg predict`` end to end: every layout, any orientation and spacing, and every bad input.

The model is a small U-Net checkpoint in the format ``tumorseg train`` writes (state_dict under
``network.`` + the resolved params sections), built from the project's params.yaml with overrides;
its weights are random, so these tests check geometry, label codes and error handling (the
predictor's accuracy on the source grid is tested with an oracle network in tests/unit).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tumorseg.cli import main
from tumorseg.config import apply_overrides, read_params

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("fixtures_nifti", ROOT / "tests" / "fixtures_nifti.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

CONVENTION_CODES = {"brats2021": {0, 1, 2, 4}, "brats2023": {0, 1, 2, 3}, "msd": {0, 1, 2, 3}}


def tiny_params(root: Path, spacing: float = 4.0) -> dict:
    """The project's params.yaml, pointed at ``root`` and shrunk (tiny U-Net at ``spacing`` mm)."""
    return apply_overrides(
        read_params(ROOT / "params.yaml"),
        {
            "paths.mlruns": str(root / "mlruns"),
            "preprocess.target_spacing_mm": [spacing] * 3,
            "data_loader.patch_size": [16, 16, 16],
            "model.unet.channels": [4, 8],
            "model.unet.strides": [2],
            "model.unet.num_res_units": 1,
            "sliding_window.sw_batch_size": 2,
            "sliding_window.overlap": 0.25,
            "sliding_window.threshold": 0.45,
        },
    )


def write_checkpoint(path: Path, params: dict, seed: int = 0) -> Path:
    """A checkpoint as ``tumorseg train`` writes it, with random (seeded) weights."""
    from tumorseg.models.checkpoint import CONFIG_CHECKPOINT_KEY
    from tumorseg.models.networks import build_network
    from tumorseg.training.config import load_training_config

    cfg = load_training_config(params)
    torch.manual_seed(seed)
    network = build_network(
        cfg.model,
        spatial_dims=3,
        patch_size=cfg.data_loader.network_patch,
        spacing=cfg.preprocess.target_spacing_mm,
    )
    state = {f"network.{k}": v for k, v in network.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, CONFIG_CHECKPOINT_KEY: cfg.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    return write_checkpoint(root / "best.ckpt", tiny_params(root))


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(tmp_path)))
    return path


def synth(out: Path, params_file: Path, *args: str) -> Path:
    assert main(["synth", "--out", str(out), "--params", str(params_file), *args]) == 0
    return out


def outputs(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("layout", "reference", "seg"),
    [
        ("brats2021", "{case}/{case}_t1.nii.gz", "{case}/{case}_seg.nii.gz"),
        ("brats2023", "{case}/{case}-t1n.nii.gz", "{case}/{case}-seg.nii.gz"),
        ("msd", "imagesTr/{case}.nii.gz", "labelsTr/{case}.nii.gz"),
    ],
)
def test_every_layout_gets_its_shape_affine_and_label_convention(
    tmp_path: Path,
    params_file: Path,
    checkpoint: Path,
    capsys: pytest.CaptureFixture,
    layout: str,
    reference: str,
    seg: str,
) -> None:
    # reoriented_fraction 1: every case is stored in a non-RAS orientation.
    raw = synth(
        tmp_path / "raw", params_file, "--layout", layout, "--cases", "2", "--spacing", "4",
        "-S", "synth.reoriented_fraction=1.0", "-S", "synth.tumour_free_fraction=0.0",
    )  # fmt: skip
    out = tmp_path / "out"
    rc = main(
        ["predict", str(raw), "--out", str(out), "--model", str(checkpoint), "--params", str(params_file)]
    )
    assert rc == 0
    printed = capsys.readouterr().out.splitlines()
    case_ids = sorted(p.name.removesuffix(".nii.gz") for p in out.glob("*.nii.gz"))
    assert len(case_ids) == 2 and outputs(out) == [f"{c}.nii.gz" for c in case_ids]
    for case_id in case_ids:
        line = next(line for line in printed if line.startswith(f"{case_id}:"))
        assert " ml" in line and "WT" in line and "TC" in line and "ET" in line
        source = nib.load(raw / reference.format(case=case_id))
        pred = nib.load(out / f"{case_id}.nii.gz")
        assert pred.shape == source.shape[:3]
        assert np.array_equal(pred.affine, source.affine)
        assert "".join(nib.aff2axcodes(pred.affine)) != "RAS"
        values = set(np.unique(np.asarray(pred.dataobj)).tolist())
        assert values <= CONVENTION_CODES[layout]
        assert values - {0}, "the random network predicts some tumour"
        # the reference segmentation shares the grid, so `tumorseg evaluate` accepts the pair
        assert np.array_equal(nib.load(raw / seg.format(case=case_id)).affine, pred.affine)


def test_a_1mm_brats_size_case_with_a_model_trained_at_4mm(
    tmp_path: Path, params_file: Path, checkpoint: Path
) -> None:
    raw = synth(
        tmp_path / "raw", params_file, "--cases", "1", "--spacing", "1", "-S", "synth.tumour_free_fraction=0"
    )
    case = next(raw.glob("BraTS2021_*"))
    out = tmp_path / "out"
    volumes = tmp_path / "volumes.csv"
    rc = main(
        ["predict", str(case), "--out", str(out), "--model", str(checkpoint), "--params", str(params_file),
         "--volumes", str(volumes)]
    )  # fmt: skip
    assert rc == 0
    source = nib.load(case / f"{case.name}_t1.nii.gz")
    pred = nib.load(out / f"{case.name}.nii.gz")
    assert source.shape == (240, 240, 155) and pred.shape == source.shape
    assert np.array_equal(pred.affine, source.affine)
    labels = np.asarray(pred.dataobj)
    table = volumes.read_text().splitlines()
    assert table[0] == "case_id,WT_ml,TC_ml,ET_ml"
    wt_ml = float(table[1].split(",")[1])
    assert wt_ml == pytest.approx(np.count_nonzero(labels) / 1000.0, abs=1e-3)


def test_probability_and_uncertainty_maps_from_the_cli(
    tmp_path: Path, params_file: Path, checkpoint: Path
) -> None:
    case = fx.write_brats_case(
        tmp_path / "raw", "BraTS2021_00001", orientation="LPS", spacing=(4.0, 4.0, 4.0)
    )
    out = tmp_path / "out"
    rc = main(
        ["predict", str(case), "--out", str(out), "--model", str(checkpoint), "--params", str(params_file),
         "--tta", "--probabilities", "--uncertainty"]
    )  # fmt: skip
    assert rc == 0
    assert outputs(out) == [
        "BraTS2021_00001.nii.gz",
        "probabilities/BraTS2021_00001.nii.gz",
        "uncertainty/BraTS2021_00001.nii.gz",
    ]
    t1 = nib.load(case / "BraTS2021_00001_t1.nii.gz")
    for name in ("probabilities", "uncertainty"):
        image = nib.load(out / name / "BraTS2021_00001.nii.gz")
        assert image.shape == (*t1.shape, 3) and np.array_equal(image.affine, t1.affine)
    variance = nib.load(out / "uncertainty" / "BraTS2021_00001.nii.gz").get_fdata()
    assert variance.min() >= 0 and variance.max() <= 0.25  # variance of values in [0, 1]


def test_uncertainty_without_tta_is_a_one_line_error(
    tmp_path: Path, params_file: Path, checkpoint: Path, capsys: pytest.CaptureFixture
) -> None:
    case = fx.write_brats_case(tmp_path / "raw", "BraTS2021_00001")
    rc = main(["predict", str(case), "--out", str(tmp_path / "out"), "--model", str(checkpoint),
               "--params", str(params_file), "--uncertainty"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "uncertainty" in err and "predict.tta: true" in err
    assert not (tmp_path / "out").exists()


def _run_failing(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2
    err = captured.err.strip()
    assert err.startswith("tumorseg predict: error:") and "\n" not in err and "Traceback" not in captured.err
    return err


def test_bad_inputs_are_one_line_errors_and_leave_no_partial_files(
    tmp_path: Path, params_file: Path, checkpoint: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.nii.gz").write_bytes(b"not touched")
    common = ["--out", str(out), "--model", str(checkpoint), "--params", str(params_file)]

    missing = fx.write_brats_case(tmp_path / "missing", "BraTS2021_00001")
    (missing / "BraTS2021_00001_flair.nii.gz").unlink()
    assert "BraTS2021_00001_flair.nii.gz" in _run_failing(["predict", str(missing), *common], capsys)

    four_d = fx.write_brats_case(tmp_path / "fourd", "BraTS2021_00002")
    t1 = four_d / "BraTS2021_00002_t1.nii.gz"
    image = nib.load(t1)
    nib.save(nib.Nifti1Image(np.stack([image.get_fdata()] * 2, axis=-1), image.affine), t1)
    err = _run_failing(["predict", str(four_d), *common], capsys)
    assert "BraTS2021_00002_t1.nii.gz" in err and "4-D" in err

    truncated = fx.write_brats_case(tmp_path / "trunc", "BraTS2021_00003")
    fx.truncate(truncated / "BraTS2021_00003_t2.nii.gz")
    assert "BraTS2021_00003_t2.nii.gz" in _run_failing(["predict", str(truncated), *common], capsys)

    not_nifti = fx.write_brats_case(tmp_path / "text", "BraTS2021_00004")
    (not_nifti / "BraTS2021_00004_t1ce.nii.gz").write_text("hello")
    assert "BraTS2021_00004_t1ce.nii.gz" in _run_failing(["predict", str(not_nifti), *common], capsys)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty" in _run_failing(["predict", str(empty), *common], capsys)

    # A dataset whose second case is unreadable: the first case is complete, nothing else is left.
    mixed = tmp_path / "mixed"
    fx.write_brats_case(mixed, "BraTS2021_00005")
    bad = fx.write_brats_case(mixed, "BraTS2021_00006")
    fx.truncate(bad / "BraTS2021_00006_t1.nii.gz")
    err = _run_failing(["predict", str(mixed), *common], capsys)
    assert "BraTS2021_00006_t1.nii.gz" in err and "1 of 2 cases were written" in err
    assert outputs(out) == ["BraTS2021_00005.nii.gz", "keep.nii.gz"]
    assert (out / "keep.nii.gz").read_bytes() == b"not touched"
    assert nib.load(out / "BraTS2021_00005.nii.gz").shape == (24, 28, 20)


def test_unknown_models_are_one_line_errors_that_say_what_to_run(
    tmp_path: Path, params_file: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = fx.write_brats_case(tmp_path / "raw", "BraTS2021_00001")
    out = tmp_path / "out"
    store = tmp_path / "store" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    base = ["predict", str(case), "--out", str(out), "--params", str(params_file)]

    err = _run_failing(base, capsys)  # default models:/tumorseg@champion, no store yet
    assert "models:/tumorseg@champion" in err and "dvc repro" in err and "tumorseg promote" in err
    assert not store.exists(), "looking for a model must not create an empty store"

    import mlflow

    mlflow.MlflowClient(f"sqlite:///{store}").search_registered_models()  # an empty store
    capsys.readouterr()  # MLflow's own log lines about creating the store
    err = _run_failing(base, capsys)
    assert "not found" in err and "dvc repro" in err
    err = _run_failing([*base, "--model", "models:/tumorseg/7"], capsys)
    assert "models:/tumorseg/7" in err and "dvc repro" in err
    err = _run_failing([*base, "--model", "runs:/0123456789abcdef/model"], capsys)
    assert "runs:/0123456789abcdef/model" in err
    err = _run_failing([*base, "--model", str(tmp_path / "nope.ckpt")], capsys)
    assert "nope.ckpt" in err and "no such checkpoint" in err
    not_ckpt = tmp_path / "not.ckpt"
    torch.save({"state_dict": {}}, not_ckpt)
    assert "not a tumorseg training checkpoint" in _run_failing([*base, "--model", str(not_ckpt)], capsys)
    assert not out.exists()
