"""The torch-free predict path: each numpy step against the MONAI/torch step it replaces, whole-case label
parity of the two engines, the engine choice, alias resolution in MLflow's SQLite store, and a cold
``tumorseg predict`` process that imports no torch, MONAI, Lightning or MLflow.

The network is a tiny U-Net with seeded random weights: its blobby, arbitrary regions exercise
thresholds, nesting and small-component removal better than an oracle would.
"""

from __future__ import annotations

import importlib.util
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from tumorseg.config import apply_overrides, read_params
from tumorseg.errors import ConfigError
from tumorseg.models.config import PredictConfig, SlidingWindowConfig
from tumorseg.models.onnx_predictor import (
    ONNX_ARTIFACT,
    OnnxPackage,
    importance_map,
    onnx_refusal,
    package_from_artifacts,
    resize_linear,
    sliding_window_logits,
    window_starts,
)
from tumorseg.models.postprocess import filter_components, min_component_voxels

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("fixtures_nifti", ROOT / "tests" / "fixtures_nifti.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

MAX_DIFFERING_VOXELS = 5
"""Label voxels the engines may disagree on per case: a logit within ONNX Runtime's 1e-5 of 0."""


def tiny_params(root: Path) -> dict:
    """The project's params.yaml, pointed at ``root``, with a tiny U-Net at 3 mm and small windows."""
    return apply_overrides(
        read_params(ROOT / "params.yaml"),
        {
            "paths.mlruns": str(root / "mlruns"),
            "preprocess.target_spacing_mm": [3.0, 3.0, 3.0],
            "data_loader.patch_size": [16, 16, 16],
            "model.unet.channels": [4, 8],
            "model.unet.strides": [2],
            "model.unet.num_res_units": 1,
            "sliding_window.sw_batch_size": 3,
            "sliding_window.overlap": 0.5,
            "predict.min_component_mm3": 200.0,
            "predict.device": "cpu",
        },
    )


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model package (weights.pt, config.json, network.onnx) of a seeded tiny U-Net."""
    from tumorseg.models.checkpoint import trained_with_network
    from tumorseg.models.networks import build_network
    from tumorseg.models.package import save_package
    from tumorseg.training.config import load_training_config

    root = tmp_path_factory.mktemp("package")
    cfg = load_training_config(tiny_params(root))
    torch.manual_seed(3)
    network = build_network(
        cfg.model,
        spatial_dims=3,
        patch_size=cfg.data_loader.network_patch,
        spacing=cfg.preprocess.target_spacing_mm,
    )
    files = save_package(trained_with_network(network.eval(), cfg.to_dict()), root / "model", onnx=True)
    assert set(files) == {"weights", "config", ONNX_ARTIFACT}
    return root / "model"


# ---------------------------------------------------------------------------- step by step
@pytest.mark.parametrize("shape", [(20, 17, 9), (7, 30, 12), (23, 7, 9)])  # the last: strided views
def test_linear_resize_matches_torch_trilinear(shape: tuple[int, int, int]) -> None:
    volume = np.random.default_rng(0).normal(size=(23, 14, 18)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(volume)[None, None], size=shape, mode="trilinear", align_corners=False
    )[0, 0].numpy()
    got = resize_linear(volume, shape)
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_importance_map_is_monais(mode: str) -> None:
    from monai.data.utils import compute_importance_map

    expected = compute_importance_map((16, 12, 9), mode=mode, sigma_scale=0.125).numpy()
    np.testing.assert_allclose(importance_map((16, 12, 9), mode), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("size", "roi", "overlap"), [(50, 16, 0.5), (16, 16, 0.5), (37, 16, 0.25), (17, 16, 0.9)]
)
def test_window_starts_are_monais(size: int, roi: int, overlap: float) -> None:
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    interval = _get_scan_interval((size,), (roi,), 1, (overlap,))
    assert window_starts(size, roi, overlap) == [
        s[0].start for s in dense_patch_slices((size,), (roi,), interval)
    ]


def test_sliding_window_matches_monai_with_padding_and_a_partial_last_batch() -> None:
    from monai.inferers import sliding_window_inference

    conv = torch.nn.Conv3d(4, 3, 3, padding=1).eval()
    image = np.random.default_rng(1).normal(size=(4, 40, 11, 23)).astype(np.float32)  # 11 < 16: padded
    settings = SlidingWindowConfig(overlap=0.5, sw_batch_size=4, blend_mode="gaussian")
    with torch.no_grad():
        expected = sliding_window_inference(
            torch.from_numpy(image)[None], (16, 16, 16), 4, conv, overlap=0.5, mode="gaussian"
        )[0].numpy()

        def run(windows: np.ndarray) -> np.ndarray:
            return conv(torch.from_numpy(windows)).numpy()

        got = sliding_window_logits(image, run, (16, 16, 16), settings)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def size_rule(labels: np.ndarray, min_mm3: float, spacing: tuple[float, ...]) -> np.ndarray:
    """The predictors' size rule (cc3d), as both engines apply it."""
    return filter_components(labels, min_voxels=min_component_voxels(min_mm3, spacing))


def test_small_components_are_removed_as_monai_removes_them() -> None:
    from tumorseg.models.inference import remove_small_components as monai_remove

    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[2:4, 2:4, 2:4] = 2  # 8 voxels of 8 mm3: 64 mm3
    labels[10:15, 10:15, 10:15] = 1  # 125 voxels
    labels[15, 15, 15] = 3  # touches the block diagonally: 26-connected to it
    labels[18, 2, 2] = 2  # 1 voxel
    for min_mm3 in (0.0, 64.0, 65.0, 2000.0):
        expected = monai_remove(torch.from_numpy(labels)[None, None], min_mm3, (2.0, 2.0, 2.0))[0, 0].numpy()
        np.testing.assert_array_equal(size_rule(labels, min_mm3, (2.0, 2.0, 2.0)), expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_components_match_monai_on_random_blobs(seed: int) -> None:
    """Many components of every size, touching by faces, edges and corners only."""
    from scipy import ndimage

    from tumorseg.models.inference import remove_small_components as monai_remove

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(40, 36, 30)), 1.2)
    labels = ((field > np.quantile(field, 0.8)) * rng.integers(1, 4, field.shape)).astype(np.uint8)
    for min_mm3 in (8.0, 100.0, 1000.0):
        expected = monai_remove(torch.from_numpy(labels)[None, None], min_mm3, (2.0, 2.0, 2.0))[0, 0].numpy()
        got = size_rule(labels, min_mm3, (2.0, 2.0, 2.0))
        assert 0 < (got > 0).sum() < (labels > 0).sum() or min_mm3 == 1000.0
        np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------------------- whole cases
def write_cases(root: Path) -> Path:
    """Three cases that take every preprocessing branch: resampled (2 and 1.5 mm to 3 mm), reoriented
    (LPS, PIL), an axis shorter than the window, float and integer files."""
    fx.write_brats_case(root, "BraTS2021_00001", orientation="LPS", seed=1, with_seg=False)
    fx.write_brats_case(
        root,
        "BraTS2021_00002",
        orientation="PIL",
        shape=(40, 36, 30),
        spacing=(1.5, 1.5, 1.5),
        seed=2,
        with_seg=False,
        image_dtype=np.float32,
    )
    fx.write_brats_case(root, "BraTS2021_00003", shape=(48, 44, 14), seed=4, tumour_radius=6, with_seg=False)
    return root


def test_onnx_engine_writes_the_torch_engines_label_maps(tmp_path: Path, package: Path) -> None:
    from tumorseg.registry.predict import predict_folder

    cases = write_cases(tmp_path / "in")
    params = tiny_params(tmp_path)
    runs = {}
    for engine in ("torch", "onnx"):
        overridden = apply_overrides(params, {"predict.engine": engine})
        runs[engine] = predict_folder(cases, tmp_path / engine, overridden, model_uri=str(package))
    assert (runs["torch"].engine, runs["onnx"].engine) == ("torch", "onnxruntime")
    tumour = 0
    for case in sorted(p.name for p in cases.iterdir()):
        a = nib.load(tmp_path / "torch" / f"{case}.nii.gz")
        b = nib.load(tmp_path / "onnx" / f"{case}.nii.gz")
        assert a.shape == b.shape and np.array_equal(a.affine, b.affine)
        differing = int(np.count_nonzero(np.asarray(a.dataobj) != np.asarray(b.dataobj)))
        assert differing <= MAX_DIFFERING_VOXELS, f"{case}: {differing} voxels differ"
        tumour += int(np.count_nonzero(np.asarray(a.dataobj)))
    assert tumour > 0  # the comparison covered tumour voxels, not only background
    for case, volumes in runs["torch"].summary.cases.items():
        assert runs["onnx"].summary.cases[case] == pytest.approx(volumes, abs=0.05)


def test_both_engines_drop_the_components_below_the_models_confidence_threshold(package: Path) -> None:
    import dataclasses

    from tumorseg.models.onnx_predictor import OnnxSegmentationPredictor
    from tumorseg.models.package import load_package
    from tumorseg.models.predictor import SegmentationPredictor

    probabilities = fx.blob_probabilities()
    onnx_package = package_from_artifacts(
        {ONNX_ARTIFACT: package / "network.onnx", "config": package / "config.json"}
    )
    stored = {**onnx_package.config, "postprocess": {"min_component_confidence": 0.8}}
    trained = load_package(package / "weights.pt", package / "config.json")
    trained.config = stored
    cfg = PredictConfig(device="cpu")
    engines = {
        "onnx": OnnxSegmentationPredictor(dataclasses.replace(onnx_package, config=stored), cfg),
        "torch": SegmentationPredictor(trained, cfg),
    }
    for engine, predictor in engines.items():
        labels = predictor.labels_from_probabilities(probabilities.copy(), (3.0, 3.0, 3.0))
        assert labels[1:4, 1:4, 1:4].all() and not labels[6:].any(), engine
        # a case given threshold 0 (outside the training profile) keeps its unconfident components
        kept = predictor.labels_from_probabilities(probabilities.copy(), (3.0, 3.0, 3.0), 0.0)
        assert kept[1:4, 1:4, 1:4].all() and kept[7:10, 7:10, 7:10].all(), engine
    keep_all = OnnxSegmentationPredictor(onnx_package, cfg)  # no stored threshold: every component kept
    assert keep_all.labels_from_probabilities(probabilities.copy(), (3.0, 3.0, 3.0))[7:10, 7:10, 7:10].all()


def test_engine_choice_falls_back_to_torch_and_onnx_says_why(tmp_path: Path, package: Path) -> None:
    from tumorseg.registry.predict import onnx_predictor

    onnx_package = package_from_artifacts(
        {ONNX_ARTIFACT: package / "network.onnx", "config": package / "config.json"}
    )
    assert isinstance(onnx_package, OnnxPackage)
    assert onnx_refusal(PredictConfig(device="cpu"), onnx_package) is None
    assert "tta" in onnx_refusal(PredictConfig(device="cpu", tta=True), onnx_package)
    assert "cuda" in onnx_refusal(PredictConfig(device="cuda"), onnx_package)
    assert "network.onnx" in onnx_refusal(PredictConfig(), None)
    torch_only = tmp_path / "torch-only"
    torch_only.mkdir()
    for name in ("weights.pt", "config.json"):
        (torch_only / name).write_bytes((package / name).read_bytes())
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    assert onnx_predictor(str(torch_only), uri, PredictConfig(device="cpu")) is None  # auto: torch
    with pytest.raises(ConfigError, match=r"predict.engine: onnx .*network.onnx"):
        onnx_predictor(str(torch_only), uri, PredictConfig(device="cpu", engine="onnx"))
    with pytest.raises(ConfigError, match=r"predict.engine: onnx .*found only by loading it"):
        onnx_predictor(str(tmp_path / "best.ckpt"), uri, PredictConfig(device="cpu", engine="onnx"))


def test_cold_predict_imports_no_torch_monai_lightning_mlflow_pydicom_or_scipy_ndimage(
    tmp_path: Path, package: Path
) -> None:
    cases = write_cases(tmp_path / "in")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(tmp_path)))
    script = (
        "import sys\n"
        "from tumorseg.cli import main\n"
        f"code = main(['predict', {str(cases)!r}, '--model', {str(package)!r}, '--out', {str(tmp_path / 'out')!r},"
        f" '--params', {str(params)!r}])\n"
        "heavy = ('torch', 'monai', 'lightning', 'mlflow', 'pydicom', 'scipy.ndimage')\n"
        "print('HEAVY', ','.join(sorted(m for m in heavy if m in sys.modules)))\n"
        "import pydicom, nibabel.nifti1\n"  # hidden from nibabel only, while it imported
        "print('LATER', pydicom.Dataset.__name__, nibabel.nifti1.have_dicom)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on onnxruntime" in done.stdout
    assert "HEAVY \n" in done.stdout, done.stdout
    assert "LATER Dataset False" in done.stdout, done.stdout
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 3


# ---------------------------------------------------------------------------- the registry without MLflow
def mlflow_like_store(
    path: Path, rows: list[tuple[str, int, str]], aliases: list[tuple[str, str, int]]
) -> str:
    """A SQLite file with MLflow 3's two registry tables (the columns read), ``(name, version, status)``
    versions and ``(name, alias, version)`` aliases; returns its tracking URI."""
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE model_versions (name VARCHAR(256), version INTEGER, run_id VARCHAR(32), "
            "status VARCHAR(20), current_stage VARCHAR(20), workspace VARCHAR(63))"
        )
        connection.execute(
            "CREATE TABLE registered_model_aliases (alias VARCHAR(256), version INTEGER, name VARCHAR(256), "
            "workspace VARCHAR(63))"
        )
        connection.executemany(
            "INSERT INTO model_versions VALUES (?, ?, ?, ?, 'None', 'default')",
            [(name, version, f"run{version}", status) for name, version, status in rows],
        )
        connection.executemany(
            "INSERT INTO registered_model_aliases VALUES (?, ?, ?, 'default')",
            [(alias, version, name) for name, alias, version in aliases],
        )
    return f"sqlite:///{path}"


def test_aliases_resolve_in_sqlite_each_call_and_anything_odd_defers_to_mlflow(tmp_path: Path) -> None:
    from tumorseg.registry.loading import resolve_in_sqlite

    db = tmp_path / "mlflow.db"
    uri = mlflow_like_store(
        db,
        [("m", 1, "READY"), ("m", 2, "READY"), ("m", 3, "PENDING_REGISTRATION")],
        [("m", "champion", 1), ("m", "new", 3)],
    )
    assert resolve_in_sqlite("models:/m@champion", uri).version == "1"
    assert resolve_in_sqlite("models:/m/2", uri).run_id == "run2"
    with sqlite3.connect(db) as connection:  # a promotion takes effect on the next call
        connection.execute("UPDATE registered_model_aliases SET version = 2 WHERE alias = 'champion'")
    assert resolve_in_sqlite("models:/m@champion", uri).version == "2"
    for odd in ("models:/m@missing", "models:/m@new", "models:/m/9", "runs:/abc/model"):
        assert resolve_in_sqlite(odd, uri) is None
    assert resolve_in_sqlite("models:/m@champion", "http://localhost:5000") is None
    (tmp_path / "other.db").write_bytes(b"not a database")
    assert resolve_in_sqlite("models:/m@champion", f"sqlite:///{tmp_path / 'other.db'}") is None


def test_a_cached_registered_version_is_found_without_mlflow(
    tmp_path: Path, package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tumorseg.registry.loading import MODEL_CACHE_ENV, cache_folder, model_files

    uri = mlflow_like_store(tmp_path / "mlflow.db", [("m", 4, "READY")], [("m", "champion", 4)])
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "cache"))
    folder = cache_folder(uri, "m", "4", "run4")
    (folder / "artifacts").mkdir(parents=True)
    artifacts = {}
    for key, name in (("config", "config.json"), ("weights", "weights.pt"), (ONNX_ARTIFACT, "network.onnx")):
        (folder / "artifacts" / name).write_bytes((package / name).read_bytes())
        artifacts[key] = {"path": f"artifacts/{name}"}
    (folder / "MLmodel").write_text(
        yaml.safe_dump({"flavors": {"python_function": {"artifacts": artifacts}}})
    )
    files = model_files("models:/m@champion", tracking_uri=uri)
    assert files is not None and files.description == "models:/m@champion (version 4, run run4)"
    assert files.artifacts[ONNX_ARTIFACT] == folder / "artifacts" / "network.onnx"
    # The store rebuilt at the same place: its version 4 is another run's model, downloaded anew (here
    # a stand-in for MLflow's download) instead of served from the cache.
    import mlflow

    from tumorseg.registry import loading

    with sqlite3.connect(tmp_path / "mlflow.db") as connection:
        connection.execute("UPDATE model_versions SET run_id = 'other' WHERE version = 4")
    downloads = []

    def download(tracking_uri: str, name: str, version: str, run_id: str, client: object) -> Path:
        downloads.append((name, version, run_id))
        fresh = cache_folder(tracking_uri, name, version, run_id)
        shutil.copytree(folder, fresh)
        return fresh

    monkeypatch.setattr(mlflow, "MlflowClient", lambda *args, **kwargs: None)
    monkeypatch.setattr(loading, "cached_version", download)
    files = model_files("models:/m@champion", tracking_uri=uri)
    assert downloads == [("m", "4", "other")] and files is not None
    assert files.description == "models:/m@champion (version 4, run other)"
    assert (
        files.artifacts[ONNX_ARTIFACT] == cache_folder(uri, "m", "4", "other") / "artifacts" / "network.onnx"
    )
