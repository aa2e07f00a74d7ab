"""Helpers for the serving tests: small models, upload builders, temp-dir checks (fixtures: conftest.py).

Models reuse what other test folders already build, loaded by path (tests/ is not a package):

- the *oracle* of tests/unit/test_predictor.py (a 1x1x1 convolution thresholding z-scored FLAIR)
  segments the fixture phantoms almost perfectly and generated cases plausibly, in milliseconds;
- the tiny random U-Net checkpoint of tests/integration/test_predict.py goes through the real
  ``load_model`` path at start-up, as ``tumorseg serve --model best.ckpt`` would.
"""

from __future__ import annotations

import importlib.util
import io
import threading
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from tumorseg.config import apply_overrides, read_params
from tumorseg.registry.loading import LoadedModel

ROOT = Path(__file__).resolve().parents[2]


def load_test_module(relative: str, name: str) -> ModuleType:
    """A module of the tests folder, by path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fx = load_test_module("fixtures_nifti.py", "fixtures_nifti")
predictor_tests = load_test_module("unit/test_predictor.py", "serving_predictor_tests")
predict_tests = load_test_module("integration/test_predict.py", "serving_predict_tests")


class GatedNetwork(nn.Module):
    """Wraps a network so each forward waits for ``gate`` (tests hold predictions open) and counts
    how many forwards run at the same time."""

    def __init__(self, inner: nn.Module, gate: threading.Event) -> None:
        super().__init__()
        self.inner = inner
        self.gate = gate
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if not self.gate.wait(timeout=60):
                raise TimeoutError("test gate never opened")
            return self.inner(x)
        finally:
            with self.lock:
                self.active -= 1


def oracle_model(network: nn.Module | None = None) -> LoadedModel:
    """The oracle (or ``network`` with the oracle's settings) as a loaded model."""
    from tumorseg.data.transforms import DataLoaderConfig

    trained = predictor_tests.trained_oracle(spacing=2.0)
    # a 1x1x1 convolution needs no context: big windows make a 120 x 120 x 78 case take well under a second
    trained.data_loader = DataLoaderConfig(patch_size=(64, 64, 64))
    if network is not None:
        trained.network = network
    return LoadedModel(trained, "oracle", "oracle network (tests)", version="1")


def serve_params(tmp: Path, **serve: Any) -> dict[str, Any]:
    """The project's params.yaml with the serve section shrunk for tests (no demo cases by default)."""
    overrides: dict[str, Any] = {
        "paths.mlruns": str(tmp / "mlruns"),
        "predict.device": "cpu",
        "predict.min_component_mm3": 0.0,
        "serve.demo_cases": 0,
        "serve.tokens_file": str(tmp / "tokens.json"),
        "serve.audit_log": str(tmp / "audit.jsonl"),
    }
    overrides.update({f"serve.{key}": value for key, value in serve.items()})
    return apply_overrides(read_params(ROOT / "params.yaml"), overrides)


def service_of(client: Any) -> Any:
    """The :class:`~tumorseg.serving.app.Service` behind a TestClient."""
    from tumorseg.serving.app import fastapi_app

    return fastapi_app(client.app).state.service


def case_files(folder: Path, *, seg: bool = False) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart ``files`` entries for the NIfTI files of a case folder (the seg only if asked)."""
    entries = []
    for path in sorted(folder.glob("*.nii*")):
        if not seg and ("_seg" in path.name or "-seg" in path.name):
            continue
        entries.append(("files", (path.name, path.read_bytes(), "application/gzip")))
    return entries


def zip_bytes(members: dict[str, bytes], *, symlinks: tuple[str, ...] = ()) -> bytes:
    """A deflated zip of ``members`` (name -> bytes); names in ``symlinks`` are stored as links."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if name in symlinks:
                info.external_attr = 0o120777 << 16
            zf.writestr(info, data)
    return buffer.getvalue()


def leftover_request_dirs(client: Any) -> list[str]:
    """Per-request folders still present under the service's private temp root."""
    root = service_of(client).root
    return sorted(p.name for p in root.iterdir() if p.name.startswith("req-"))


# ---------------------------------------------------------------------------- 2-D models
planar_fx = load_test_module("planar_fixtures.py", "serving_planar_fixtures")
"""tests/planar_fixtures.py: ``head_image`` (a 2-D head with one bright tumour disc) and
``tiny_params`` (the project's params with a tiny 2-D network), shared with the 2-D model tests."""

PLANAR_ORACLE_SIZE = 64


class PlanarOracle(nn.Module):
    """A 2-D network that needs no training, for the service tests (as the 3-D oracle).

    On a z-scored ``(B, 1, S, S)`` image the segmentation logit is ``6 (x - 1.5)``: pixels more than
    1.5 standard deviations above the mean are tumour (the bright disc of ``head_image``, enhancing
    tissue on a T1ce slice). The tumour logit is positive when more than 0.5 % of the pixels are, and
    the type logits always favour glioma.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("type_logits", torch.tensor([0.0, 2.0, 0.0]))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seg = 6.0 * (image - 1.5)
        bright = (image > 1.5).float().flatten(1).mean(dim=1, keepdim=True)
        tumour = 2000.0 * (bright - 0.005)
        return seg, torch.cat([tumour, self.type_logits.expand(image.shape[0], 3)], dim=1)


def planar_oracle_model() -> Any:
    """The :class:`PlanarOracle` as a loaded 2-D model (classifier detector at 0.5, no size filter)."""
    from tumorseg.models.checkpoint import PlanarModel
    from tumorseg.models.planar_detection import DetectorRule

    return PlanarModel(
        PlanarOracle().eval(),
        {"preprocess_2d": {"size": PLANAR_ORACLE_SIZE}},
        DetectorRule("classifier", 0.5),
        {"mask_threshold": 0.5, "min_component_px": 0},
        "2-D oracle network (tests)",
    )


def planar_oracle_slot() -> Any:
    from tumorseg.serving.service import PlanarSlot

    return PlanarSlot("oracle-2d", planar_oracle_model())


def write_tiny_planar_package(folder: Path) -> Path:
    """A randomly initialised tiny 2-D network saved as a 2-D model package (what the 2-D evaluation registers)."""
    from tumorseg.config import section
    from tumorseg.models.checkpoint import PlanarModel
    from tumorseg.models.package import save_package
    from tumorseg.models.planar_detection import DetectorRule
    from tumorseg.models.planar_network import build_planar_network

    params = planar_fx.tiny_params(folder, folder / "preprocessed_2d", folder / "split_2d.json")
    torch.manual_seed(0)
    network = build_planar_network(section("model_2d", params))
    config = {key: params[key] for key in ("preprocess_2d", "model_2d")}
    model = PlanarModel(network, config, DetectorRule("classifier", 0.5), {"min_component_px": 0})
    save_package(model, folder / "package")
    return folder / "package"


def planar_png(image: Any) -> bytes:
    """A float image as 8-bit grayscale PNG bytes (0..255 over its range)."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float32)
    scaled = (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1e-6) * 255.0
    buffer = io.BytesIO()
    Image.fromarray(scaled.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------- other label sets
POST_RC_FLAIR = 3.0
"""Z-scored FLAIR above which the post-treatment oracle predicts RC (the brightest enhancing voxels
of the phantoms: not anatomy, just a non-empty fourth region to report and draw)."""


def post_treatment_network() -> nn.Module:
    """The oracle with a fourth output channel, for label set ``glioma_post`` (WT, TC, ET, RC).

    WT, TC and ET are the 3-D oracle's channels (FLAIR thresholds); RC is FLAIR above
    :data:`POST_RC_FLAIR`. Painted in order, RC overwrites the brightest ET voxels.
    """
    base = predictor_tests.oracle("regions")
    conv = nn.Conv3d(4, 4, 1)
    gain = predictor_tests.GAIN
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:3] = base.weight
        conv.bias[:3] = base.bias
        conv.weight[3, 3] = gain
        conv.bias[3] = -gain * POST_RC_FLAIR
    return conv.eval()


def post_treatment_model() -> LoadedModel:
    """A tiny ``glioma_post`` model (``ModelConfig(label_set="glioma_post")``: 4 output channels)."""
    from tumorseg.models.networks import ModelConfig

    loaded = oracle_model(post_treatment_network())
    loaded.trained.model = ModelConfig(output="regions", label_set="glioma_post")
    assert loaded.trained.model.out_channels == 4
    loaded.description = "post-treatment oracle network (tests)"
    return loaded


def write_post_treatment_case(root: Path, case_id: str = "BraTS-GLI-02001-100", seed: int = 4) -> Path:
    """A BraTS 2024 GLI case (brats2023 layout, 2024 codes 1 NETC, 2 SNFH, 3 ET, 4 RC) of the phantom.

    The phantom's tumour is written as NETC/SNFH/ET (same codes as 2023) and a resection cavity
    (code 4) is added as a small ball beside it, inside the brain.
    """
    import nibabel as nib
    import numpy as np

    folder = fx.write_brats_case(root, case_id, layout="brats2023", seed=seed)
    seg_path = folder / f"{case_id}-seg.nii.gz"
    seg = nib.load(seg_path)
    labels = np.asarray(seg.dataobj).astype(np.uint8)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in labels.shape], indexing="ij"))
    centre = np.array([n * 0.3 for n in labels.shape]).reshape(3, 1, 1, 1)
    cavity = (((grid - centre) ** 2).sum(axis=0) <= 4.0) & (labels == 0)
    labels[cavity] = 4
    nib.save(nib.Nifti1Image(labels, seg.affine), str(seg_path))
    return folder
