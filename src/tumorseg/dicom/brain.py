"""Brain extraction: a small 3-D U-Net trained inside the pipeline on generated heads only (the
SynthStrip idea: nothing is downloaded), registered in MLflow like the tumour model.

Training (:func:`train_brain_extractor`): ``dicom.brain.train_cases`` generated brains
(:func:`~tumorseg.data.synth.synthesize_case` at ``spacing_mm``, seed ``dicom.brain.seed``) wrapped in
CSF rim, skull, scalp, bias field and background noise (:func:`~tumorseg.dicom.heads.synth_head`).
Every step draws, per head, a rigid pose (Euler angles within +-12 degrees, shifts within +-20 mm,
size within +-8 %, a left-right flip), a field of view of :data:`TRAIN_FOV_MM` around it (zeros beyond
the head's box), per-channel intensity scale and gamma, sometimes extra noise, and sometimes drops one
channel (the heads carry their own bias fields). Loss: soft Dice + binary cross-entropy; AdamW, warm-up
then cosine decay. ``dicom.brain.val_cases`` further heads give the
validation Dice on the network's grid; :func:`heldout_dice` scores other heads at any spacing and pose.

Use (:class:`BrainExtractor`): the four sequences on one grid, each divided by a high percentile of
its head (:func:`normalise`: robust to the background and the field of view), resampled to
``spacing_mm`` (area average; trilinear where the input is coarser), padded to the U-Net's multiple;
the brain probability goes back to the input grid (trilinear), is thresholded, its largest connected
component kept and its holes filled. The network sees the head's bounding box (:func:`head_box`)
only, so a field of view wider than the training samples' does not change what it sees.

Storage: one checkpoint file (:data:`CHECKPOINT_FILE`: the state dict, the settings that rebuild the
network and the validation scores; loadable with ``torch.load(weights_only=True)``), logged to an
MLflow run of ``dicom.brain.experiment`` under :data:`ARTIFACT_PATH`, registered as a version of
``dicom.brain.model_name`` and aliased ``champion``. :func:`load_brain_extractor` takes that alias,
a version, a ``runs:/`` URI or the file.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage as ndi

from tumorseg.dicom.atlas import ATLAS_URI
from tumorseg.dicom.config import MODALITIES_4, BrainConfig
from tumorseg.errors import ConfigError, DataError, first_line

if TYPE_CHECKING:
    import torch

    from tumorseg.config import SynthConfig
    from tumorseg.dicom.heads import Head
    from tumorseg.params import Params

log = logging.getLogger(__name__)

MODALITIES: tuple[str, ...] = tuple(MODALITIES_4)
"""Input channels, in this order."""
CHECKPOINT_FILE = "brain.pt"
METRICS_FILE = "metrics.json"
ARTIFACT_PATH = "brain_extractor"
"""Folder of the MLflow run holding :data:`CHECKPOINT_FILE` and :data:`METRICS_FILE` (what is registered)."""
CHECKPOINT_FORMAT = "tumorseg-brain-extractor/1"
CHAMPION = "champion"
NUM_RES_UNITS = 0
HEAD_PERCENTILE = 99.0
"""Each channel is divided by this percentile of its head (voxels above the mean of its positive voxels)."""
INPUT_CLIP = 4.0
"""Normalised intensities are clipped to ``[0, INPUT_CLIP]``."""
TRAIN_FOV_MM: tuple[float, float, float] = (224.0, 224.0, 160.0)
"""Field of view of a training sample (x, y, z): smaller than the generated head's box in x and y."""
MAX_ROTATION_DEG = 12.0
MAX_SHIFT_MM = 20.0
MAX_LOG_SCALE = 0.08
CHANNEL_DROPOUT = 0.2
HEAD_LEVEL = 0.1
"""Normalised signal (mean of the channels, smoothed over :data:`HEAD_SMOOTH_MM`) above which a voxel is head."""
HEAD_SMOOTH_MM = 4.0
HEAD_MARGIN_MM = 10.0
"""The network sees the head's bounding box plus this margin (the field of view it was trained on)."""
HEAD_SEED_OFFSET = 7919
"""Held-out heads (:func:`heldout_dice`) use ``dicom.brain.seed`` plus this by default."""
FIRST_STEPS = "run `tumorseg train-brain` first (it trains and registers the brain-extraction model)"
MODEL_DESCRIPTION = (
    "Brain extraction (skull stripping) from co-registered T1, T1ce, T2 and FLAIR: a 3-D U-Net trained on "
    "generated heads only. Alias `champion`: what `import-dicom` uses. Not for clinical use."
)


# ---------------------------------------------------------------------------- inputs and outputs
def normalise(image: np.ndarray) -> np.ndarray:
    """``image`` divided by the :data:`HEAD_PERCENTILE` th percentile of its head, float32 clipped to
    ``[0, INPUT_CLIP]`` (non-finite values 0).

    The head is the voxels at or above the mean of the positive ones (each counted at most at their
    99.9th percentile, so a few wild voxels cannot move it), and at least a tenth of that percentile
    (a head in a wide field of view of background noise): the scale is the head's, not the box's. An
    image without positive values comes back as zeros.
    """
    values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    positive = values[values > 0]
    if positive.size == 0:
        return np.zeros(values.shape, dtype=np.float32)
    top = float(np.percentile(positive, 99.9))
    cut = max(float(np.minimum(positive, top).mean(dtype=np.float64)), 0.1 * top)
    head = positive[positive >= cut]
    scale = float(np.percentile(head if head.size else positive, HEAD_PERCENTILE))
    if not scale > 0:
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip(values / np.float32(scale), 0.0, INPUT_CLIP).astype(np.float32)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths (mm) of a 4 x 4 voxel-to-world ``affine``."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def network_shape(shape: Sequence[int], spacing: Sequence[float], spacing_mm: float) -> tuple[int, int, int]:
    """Shape of a volume of ``shape`` voxels of ``spacing`` mm on a ``spacing_mm`` grid over the same extent."""
    return tuple(max(1, round(n * s / spacing_mm)) for n, s in zip(shape, spacing, strict=True))  # type: ignore[return-value]


def resize(volume: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(N, C, X, Y, Z)`` ``volume`` stretched over the same extent to ``size`` voxels: an area
    average where every axis shrinks (no aliasing), trilinear otherwise (``align_corners=False``: voxel
    centres map as on a grid of the same extent, so a volume resized and back lines up)."""
    import torch.nn.functional as F

    size = tuple(int(n) for n in size)
    if tuple(volume.shape[2:]) == size:
        return volume
    if all(o <= i for o, i in zip(size, volume.shape[2:], strict=True)):
        return F.interpolate(volume, size=size, mode="area")
    return F.interpolate(volume, size=size, mode="trilinear", align_corners=False)


def pad_to_multiple(volume: torch.Tensor, multiple: int) -> torch.Tensor:
    """``(N, C, X, Y, Z)`` ``volume`` padded with zeros at the end of each axis to a multiple of ``multiple``."""
    import torch.nn.functional as F

    pads: list[int] = []
    for n in reversed(volume.shape[2:]):
        pads += [0, (-int(n)) % multiple]
    return F.pad(volume, pads) if any(pads) else volume


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of ``mask`` (bool; empty stays empty)."""
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndi.label(mask)
    if n <= 1:
        return mask.copy()
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(counts.argmax())


def head_box(channels: np.ndarray, spacing_mm: float) -> tuple[slice, slice, slice]:
    """The bounding box of the head in normalised ``(C, X, Y, Z)`` ``channels`` on a ``spacing_mm`` grid,
    plus :data:`HEAD_MARGIN_MM` (within the volume): the largest connected region where the channels'
    mean, smoothed, is above :data:`HEAD_LEVEL`. The whole volume when nothing is.

    The network normalises its features over what it sees, so a wide field of view of background
    would change them; cropped to the head, every field of view looks like the training samples.
    """
    signal = ndi.gaussian_filter(np.asarray(channels, dtype=np.float32).mean(0), HEAD_SMOOTH_MM / spacing_mm)
    head = largest_component(signal > HEAD_LEVEL)
    shape = signal.shape
    if not head.any():
        return tuple(slice(0, n) for n in shape)  # type: ignore[return-value]
    found = np.argwhere(head)
    margin = int(math.ceil(HEAD_MARGIN_MM / spacing_mm))
    lo = np.maximum(found.min(0) - margin, 0)
    hi = np.minimum(found.max(0) + 1 + margin, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask`` with its holes filled."""
    return ndi.binary_fill_holes(largest_component(mask))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(pred, truth).sum()) / total


def _check_inputs(images: Mapping[str, np.ndarray], affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """The common 3-D shape of the four sequences and the voxel spacing; DataError (one line) otherwise."""
    missing = [m for m in MODALITIES if m not in images]
    if missing:
        raise DataError(f"brain extraction needs {', '.join(MODALITIES)}: {', '.join(missing)} missing")
    shapes = {m: tuple(np.shape(images[m])) for m in MODALITIES}
    shape = shapes[MODALITIES[0]]
    if len(shape) != 3 or any(s != shape for s in shapes.values()):
        listed = ", ".join(f"{m} {'x'.join(map(str, s))}" for m, s in shapes.items())
        raise DataError(f"brain extraction needs the four sequences on one 3-D grid; got {listed}")
    matrix = np.asarray(affine, dtype=np.float64)
    spacing = voxel_spacing(matrix) if matrix.shape == (4, 4) else np.zeros(3)
    if not np.all(np.isfinite(matrix)) or not np.all(spacing > 0):
        raise DataError(f"brain extraction needs a 4 x 4 voxel-to-world affine; got {matrix.tolist()}")
    return shape, spacing


# ---------------------------------------------------------------------------- the network
def build_network(channels: Sequence[int], num_res_units: int = NUM_RES_UNITS) -> torch.nn.Module:
    """The U-Net: four input channels (:data:`MODALITIES`), one output (brain logit)."""
    from monai.networks.nets import UNet

    channels = tuple(int(c) for c in channels)
    if len(channels) < 2 or min(channels) < 1:
        raise ConfigError(f"dicom.brain.channels: at least two positive widths needed, got {list(channels)}")
    return UNet(
        spatial_dims=3,
        in_channels=len(MODALITIES),
        out_channels=1,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=num_res_units,
    )


class BrainExtractor:
    """A trained brain-extraction network with the settings it was trained with.

    ``description`` says where it came from (a file, ``models:/...`` with its version and run).
    """

    modalities: tuple[str, ...] = MODALITIES  # what extract() reads

    def __init__(
        self,
        network: torch.nn.Module,
        *,
        channels: Sequence[int],
        spacing_mm: float,
        threshold: float = 0.5,
        num_res_units: int = NUM_RES_UNITS,
        description: str = "brain extractor",
        version: str | None = None,
        run_id: str | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        self.network = network.eval()
        self.channels = [int(c) for c in channels]
        self.spacing_mm = float(spacing_mm)
        self.threshold = float(threshold)
        self.num_res_units = int(num_res_units)
        self.description = description
        self.version = version
        self.run_id = run_id
        self.metrics = dict(metrics or {})

    @property
    def multiple(self) -> int:
        """Network-grid sizes are padded to a multiple of this (one halving per level)."""
        return 2 ** (len(self.channels) - 1)

    def network_input(self, images: Mapping[str, np.ndarray], affine: np.ndarray) -> torch.Tensor:
        """``(1, 4, x, y, z)`` normalised channels on the network's grid (not padded)."""
        import torch

        shape, spacing = _check_inputs(images, affine)
        stacked = np.stack([normalise(images[m]) for m in MODALITIES])[None]
        return resize(torch.from_numpy(stacked), network_shape(shape, spacing, self.spacing_mm))

    def network_probability(self, x: torch.Tensor) -> torch.Tensor:
        """Brain probability ``(N, 1, x, y, z)`` of normalised ``(N, 4, x, y, z)`` inputs on the network's grid."""
        import torch

        size = x.shape[2:]
        with torch.inference_mode():
            logits = self.network(pad_to_multiple(x.float(), self.multiple))
        return torch.sigmoid(logits[:, :, : size[0], : size[1], : size[2]])

    def probability(self, images: Mapping[str, np.ndarray], affine: np.ndarray) -> np.ndarray:
        """Brain probability on the input grid (float32, the images' shape); 0 outside the head's box
        (:func:`head_box`)."""
        import torch

        shape, _ = _check_inputs(images, affine)
        x = self.network_input(images, affine)
        box = (slice(None), slice(None), *head_box(x[0].numpy(), self.spacing_mm))
        prob = torch.zeros((1, 1, *x.shape[2:]), dtype=torch.float32)
        prob[box] = self.network_probability(x[box])
        return resize(prob, shape)[0, 0].numpy().astype(np.float32)

    def extract(self, images: Mapping[str, np.ndarray], affine: np.ndarray) -> np.ndarray:
        """The brain mask (bool, the images' shape) of ``images`` (t1, t1ce, t2, flair on one grid,
        ``(X, Y, Z)`` arrays, ``affine`` voxel-to-world in mm): the probability above ``threshold``, its
        largest connected component, holes filled. Empty when no voxel passes the threshold."""
        return clean_mask(self.probability(images, affine) > self.threshold)

    def checkpoint(self) -> dict[str, Any]:
        """What :func:`load_checkpoint` rebuilds this extractor from (tensors and plain values only)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()},
            "network": {
                "channels": list(self.channels),
                "num_res_units": self.num_res_units,
                "modalities": list(MODALITIES),
            },
            "spacing_mm": self.spacing_mm,
            "threshold": self.threshold,
            "normalisation": {"percentile": HEAD_PERCENTILE, "clip": INPUT_CLIP},
            "run_id": self.run_id,
            "metrics": dict(self.metrics),
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`checkpoint` to ``path`` atomically; returns the path."""
        import torch

        from tumorseg.data.manifest import atomic_output

        path = Path(path)
        with atomic_output(path) as tmp:
            torch.save(self.checkpoint(), tmp)
        return path

    def __repr__(self) -> str:
        return f"BrainExtractor({self.description}, channels={self.channels}, spacing_mm={self.spacing_mm})"


def load_checkpoint(
    path: str | Path, *, description: str | None = None, version: str | None = None
) -> BrainExtractor:
    """The extractor saved in ``path`` (:meth:`BrainExtractor.save`); DataError (one line) for anything else."""
    import pickle

    import torch

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise DataError(f"{path}: not a brain-extraction checkpoint ({first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a brain-extraction checkpoint (no format {CHECKPOINT_FORMAT!r})")
    settings = state["network"]
    if list(settings.get("modalities", MODALITIES)) != list(MODALITIES):
        raise DataError(f"{path}: trained on channels {settings['modalities']}, not {list(MODALITIES)}")
    network = build_network(settings["channels"], int(settings["num_res_units"]))
    try:
        network.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise DataError(f"{path}: weights do not fit its network ({first_line(exc)})") from None
    return BrainExtractor(
        network,
        channels=settings["channels"],
        spacing_mm=float(state["spacing_mm"]),
        threshold=float(state["threshold"]),
        num_res_units=int(settings["num_res_units"]),
        description=description or f"checkpoint {path}",
        version=version,
        run_id=state.get("run_id"),
        metrics=state.get("metrics") or {},
    )


def load_brain_extractor(uri: str, *, tracking_uri: str) -> BrainExtractor:
    """The extractor ``uri`` names: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, a
    ``runs:/<run_id>/brain_extractor`` URI, a checkpoint file or a folder holding :data:`CHECKPOINT_FILE`;
    ``mni152`` gives :class:`~tumorseg.dicom.atlas.AtlasBrainExtractor` (nilearn's MNI152 mask, registered).

    Only the store ``tracking_uri`` is read; DataError (one line naming ``uri``) when there is no such
    model.
    """
    from tumorseg.registry.loading import is_mlflow_uri

    if uri == ATLAS_URI:
        from tumorseg.dicom.atlas import AtlasBrainExtractor

        return AtlasBrainExtractor()  # type: ignore[return-value]
    if not is_mlflow_uri(uri):
        path = Path(uri).expanduser()
        if path.is_dir() and (path / CHECKPOINT_FILE).is_file():
            path = path / CHECKPOINT_FILE
        if path.is_file():
            return load_checkpoint(path)
        raise DataError(
            f"{uri}: no such brain-extraction checkpoint or MLflow model; pass a {CHECKPOINT_FILE} path "
            "or a URI such as models:/tumorseg-brain@champion"
        )
    return _from_mlflow(uri, tracking_uri)


def _from_mlflow(uri: str, tracking_uri: str) -> BrainExtractor:
    from tumorseg.registry.loading import MODELS_URI, prepare_mlflow
    from tumorseg.tracking import sqlite_path

    prepare_mlflow()
    import mlflow
    from mlflow.exceptions import MlflowException

    match = MODELS_URI.match(uri)
    if uri.startswith("models:/") and match is None:
        raise DataError(f"{uri}: not a model URI; use models:/<name>@<alias> or models:/<name>/<version>")
    db = sqlite_path(tracking_uri)
    store = db if db is not None else tracking_uri
    if uri.startswith(("models:/", "runs:/")) and db is not None and not db.is_file():
        raise DataError(f"{uri}: no MLflow store at {db}; {FIRST_STEPS}")
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    version, description = None, uri
    try:
        if match:
            name, alias, number = match["name"], match["alias"], match["version"]
            found = (
                client.get_model_version_by_alias(name, alias)
                if alias
                else client.get_model_version(name, number)
            )
            version = str(found.version)
            description = f"{uri} (version {version}, run {found.run_id})"
            artifact_uri = client.get_model_version_download_uri(name, version)
        else:
            artifact_uri = uri
        with tempfile.TemporaryDirectory(prefix="tumorseg-brain-") as tmp:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=artifact_uri, dst_path=tmp, tracking_uri=tracking_uri
                )
            )
            file = local / CHECKPOINT_FILE if local.is_dir() else local
            if not file.is_file():
                raise DataError(f"{uri}: no {CHECKPOINT_FILE} in it; not a brain-extraction model")
            return load_checkpoint(file, description=description, version=version)
    except MlflowException as exc:
        message = first_line(exc.message)
        if match:
            raise DataError(
                f"{uri}: not found in the MLflow store {store} ({message}); {FIRST_STEPS}"
            ) from None
        raise DataError(f"{uri}: cannot be loaded from {store} ({message})") from None
    except OSError as exc:
        raise DataError(f"{uri}: cannot be loaded from {store} ({first_line(exc)})") from None


# ---------------------------------------------------------------------------- generated heads
def head_synth_config(params: Params, spacing_mm: float, seed: int) -> SynthConfig:
    """``synth`` settings of the brains inside the training heads: isotropic ``spacing_mm``, ``seed``."""
    return params.synth.model_copy(
        update={
            "spacing_mm": float(spacing_mm),
            "seed": int(seed),
            "layout": "brats2021",
            "anisotropic_fraction": 0.0,
        }
    )


def generated_head(index: int, synth_cfg: SynthConfig, head_seed: int) -> Head:
    """Head ``index`` (from 1): generated brain ``index`` of ``synth_cfg`` inside its skull and scalp."""
    from tumorseg.data.synth import synthesize_case
    from tumorseg.dicom.heads import synth_head

    return synth_head(synthesize_case(index, synth_cfg), head_seed)


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """``Rz @ Ry @ Rx`` of Euler angles (degrees) about x, y and z."""
    a, b, c = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def moved_head(head: Head, rotation: np.ndarray, shift_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> Head:
    """``head`` rotated by ``rotation`` about its box's centre and shifted by ``shift_mm`` (world
    axes), on the same grid: images trilinear (zeros from outside the box), masks at half."""
    from dataclasses import replace

    spacing = voxel_spacing(head.affine)
    shape = np.asarray(head.brain_mask.shape)
    centre = (shape - 1) / 2.0
    # output voxel o -> input voxel i = S^-1 R^T (S (o - c) - t) + c  (R maps the head's old pose to its new one)
    inverse = np.diag(1.0 / spacing) @ rotation.T @ np.diag(spacing)
    offset = (
        centre
        - inverse @ centre
        - np.diag(1.0 / spacing) @ rotation.T @ np.asarray(shift_mm, dtype=np.float64)
    )

    def move(volume: np.ndarray, order: int) -> np.ndarray:
        return ndi.affine_transform(
            np.asarray(volume, dtype=np.float32), inverse, offset, order=order, mode="constant", cval=0.0
        )

    return replace(
        head,
        images={m: move(v, 1) for m, v in head.images.items()},
        brain_mask=move(head.brain_mask, 1) >= 0.5,
        head_mask=move(head.head_mask, 1) >= 0.5,
    )


def heldout_dice(
    extractor: BrainExtractor,
    params: Params,
    *,
    cases: int = 4,
    spacing_mm: float = 1.0,
    seed: int | None = None,
    rotation_deg: float = 0.0,
    shift_mm: float = 0.0,
    first_index: int = 1,
) -> list[float]:
    """Dice of ``extractor`` on ``cases`` generated heads at ``spacing_mm`` (seed ``seed``; default
    ``dicom.brain.seed`` + :data:`HEAD_SEED_OFFSET`, heads never trained on), each turned by Euler
    angles drawn within ``+-rotation_deg`` and shifted within ``+-shift_mm`` (images and true mask
    alike), against its true brain mask."""
    cfg = params.dicom.brain
    seed = cfg.seed + HEAD_SEED_OFFSET if seed is None else int(seed)
    synth_cfg = head_synth_config(params, spacing_mm, seed)
    rng = np.random.default_rng([seed, 0xB2A1])
    scores = []
    for index in range(first_index, first_index + cases):
        head = generated_head(index, synth_cfg, seed)
        angles, shift = rng.uniform(-1.0, 1.0, 3) * rotation_deg, rng.uniform(-1.0, 1.0, 3) * shift_mm
        if rotation_deg or shift_mm:
            head = moved_head(head, rotation_matrix(angles), shift)
        scores.append(dice(extractor.extract(head.images, head.affine), head.brain_mask))
    return scores


# ---------------------------------------------------------------------------- training
@dataclass
class BrainTrainingReport:
    """What :func:`train_brain_extractor` did: validation Dice on its own heads at ``spacing_mm``
    (mean, and by head index), at 1 mm on held-out heads where measured, the optimisation, the MLflow
    run and registered version, the checkpoint."""

    val_dice: float
    val_dice_cases: dict[str, float]
    steps: int
    seconds: float
    checkpoint: Path
    run_id: str | None = None
    version: str | None = None
    model_uri: str | None = None
    val_dice_1mm: float | None = None
    val_dice_1mm_cases: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    final_loss: float = float("nan")
    spacing_mm: float = 2.0
    extractor: BrainExtractor | None = field(default=None, repr=False, compare=False)
    """The trained network, ready to use (not written)."""

    def one_line(self) -> str:
        """What training gave, in one line (the command's summary)."""
        at_1mm = f", {self.val_dice_1mm:.4f} at 1 mm (held-out)" if self.val_dice_1mm is not None else ""
        where = (
            f"registered {self.model_uri} as {CHAMPION} (run {self.run_id})"
            if self.version is not None
            else f"run {self.run_id}, not registered"
        )
        return (
            f"brain extraction: validation Dice {self.val_dice:.4f} at {self.spacing_mm:g} mm{at_1mm}; "
            f"{self.steps} steps in {_duration(self.train_seconds)} ({_duration(self.seconds)} in all); "
            f"{self.checkpoint}; {where}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values (without the extractor)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extractor"}
        out["checkpoint"] = str(self.checkpoint)
        out["val_dice_cases"] = dict(self.val_dice_cases)
        out["val_dice_1mm_cases"] = list(self.val_dice_1mm_cases)
        return out


@dataclass
class _Sample:
    """A training head on the network's grid: ``(5, X, Y, Z)`` float32, the normalised channels and the mask."""

    volume: torch.Tensor


def _prepare(head: Head, spacing_mm: float) -> _Sample:
    import torch

    extractor_input = np.stack([normalise(head.images[m]) for m in MODALITIES])[None]
    spacing = voxel_spacing(head.affine)
    size = network_shape(head.brain_mask.shape, spacing, spacing_mm)
    images = resize(torch.from_numpy(extractor_input), size)[0]
    mask = resize(torch.from_numpy(head.brain_mask.astype(np.float32))[None, None], size)[0]
    return _Sample(torch.cat([images, mask]).contiguous())


def train_fov(spacing_mm: float, multiple: int) -> tuple[int, int, int]:
    """Voxels of a training sample: :data:`TRAIN_FOV_MM` at ``spacing_mm``, rounded up to ``multiple``."""
    return tuple(int(math.ceil(mm / spacing_mm / multiple) * multiple) for mm in TRAIN_FOV_MM)  # type: ignore[return-value]


def _augmented(
    sample: _Sample,
    fov: tuple[int, int, int],
    rng: np.random.Generator,
    gen: torch.Generator,
    spacing_mm: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One randomly posed, cropped and re-contrasted copy of ``sample``: ``(4, *fov)``, ``(1, *fov)``."""
    import torch
    import torch.nn.functional as F

    n_in = np.asarray(sample.volume.shape[1:], dtype=np.float64)
    n_out = np.asarray(fov, dtype=np.float64)
    rotation = rotation_matrix(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3))
    flip = np.diag([-1.0 if rng.random() < 0.5 else 1.0, 1.0, 1.0])
    scale = math.exp(rng.uniform(-MAX_LOG_SCALE, MAX_LOG_SCALE))
    shift_vox = rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 3) / spacing_mm
    # output voxel o -> input voxel i:  i - c_in = A (o - c_out) + t, in grid_sample's [-1, 1] units
    a = rotation @ flip / scale
    d_in, d_out = np.diag((n_in - 1) / 2.0), np.diag((n_out - 1) / 2.0)
    theta = np.concatenate(
        [np.linalg.inv(d_in) @ a @ d_out, (np.linalg.inv(d_in) @ shift_vox)[:, None]], axis=1
    )
    reverse = np.eye(3)[::-1]  # grid_sample's coordinates run (z, y, x) for (N, C, X, Y, Z) tensors
    theta = np.concatenate([reverse @ theta[:, :3] @ reverse, reverse @ theta[:, 3:]], axis=1)
    grid = F.affine_grid(torch.as_tensor(theta, dtype=torch.float32)[None], [1, 5, *fov], align_corners=True)
    moved = F.grid_sample(
        sample.volume[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )[0]
    images, mask = moved[:4], moved[4:]

    # intensities: per channel gamma and scale, sometimes noise, sometimes one channel lost (the heads
    # carry their own bias fields and noise already)
    gamma = torch.as_tensor(np.exp(rng.uniform(-0.35, 0.35, 4)), dtype=torch.float32)[:, None, None, None]
    gain = torch.as_tensor(np.exp(rng.uniform(-0.25, 0.25, 4)), dtype=torch.float32)[:, None, None, None]
    images = gain * images.clamp(min=0.0).pow(gamma)
    if rng.random() < 0.5:
        images = images + float(rng.uniform(0.0, 0.04)) * torch.randn(images.shape, generator=gen)
    if rng.random() < CHANNEL_DROPOUT:
        images[int(rng.integers(4))] = 0.0
    return images.clamp(0.0, INPUT_CLIP), mask


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + soft Dice over the batch."""
    import torch
    import torch.nn.functional as F

    prob = torch.sigmoid(logits)
    overlap = (prob * target).sum()
    soft_dice = (2.0 * overlap + 1.0) / (prob.sum() + target.sum() + 1.0)
    return F.binary_cross_entropy_with_logits(logits, target) + (1.0 - soft_dice)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def fit_network(
    samples: Sequence[_Sample],
    cfg: BrainConfig,
    *,
    progress: Callable[[str], None] = print,
    num_res_units: int = NUM_RES_UNITS,
) -> tuple[torch.nn.Module, float]:
    """Train the U-Net on ``samples`` for ``cfg.steps`` steps; returns it (eval mode) and the final
    smoothed loss. One progress line per ~10 % of the steps."""
    import torch

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 0xB7A1])
    network = build_network(cfg.channels, num_res_units).train()
    fov = train_fov(cfg.spacing_mm, 2 ** (len(cfg.channels) - 1))
    optimiser = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=1e-4)
    warmup = max(1, cfg.steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, cfg.steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * done))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_factor)
    report_at = {max(1, round(cfg.steps * k / 10)) for k in range(1, 11)}
    smoothed, start = float("nan"), time.perf_counter()
    for step in range(1, cfg.steps + 1):
        pairs = [
            _augmented(samples[int(rng.integers(len(samples)))], fov, rng, gen, cfg.spacing_mm)
            for _ in range(cfg.batch_size)
        ]
        x = torch.stack([p[0] for p in pairs])
        target = torch.stack([p[1] for p in pairs])
        loss = _loss(network(x), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        value = float(loss.detach())
        smoothed = value if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * value
        if step in report_at:
            elapsed = time.perf_counter() - start
            rate = step / elapsed
            progress(
                f"brain: step {step}/{cfg.steps} loss {smoothed:.4f} {rate:.2f} steps/s "
                f"{_duration(elapsed)} elapsed, {_duration((cfg.steps - step) / rate)} left"
            )
    return network.eval(), smoothed


def _generate(
    indices: Sequence[int], synth_cfg: SynthConfig, seed: int, what: str, progress: Callable[[str], None]
) -> list[Head]:
    start = time.perf_counter()
    heads = [generated_head(i, synth_cfg, seed) for i in indices]
    progress(
        f"brain: {len(heads)} {what} heads at {synth_cfg.spacing_mm:g} mm in {_duration(time.perf_counter() - start)}"
    )
    return heads


def train_brain_extractor(
    params: Params | Mapping[str, Any],
    *,
    tracking_uri: str,
    out_dir: Path | None = None,
    register: bool = True,
    progress: Callable[[str], None] = print,
    heldout_1mm: int = 0,
) -> BrainTrainingReport:
    """Train the brain-extraction network on generated heads (``params.dicom.brain``), validate it and
    write ``out_dir/brain.pt`` and ``out_dir/metrics.json`` (atomically; ``out_dir`` defaults to
    ``dicom.brain.out_dir``). With ``register`` (and ``mlflow.enabled``), also log one MLflow run in
    ``dicom.brain.experiment`` of ``tracking_uri`` (parameters, validation Dice, the checkpoint under
    :data:`ARTIFACT_PATH`), register it as a new version of ``dicom.brain.model_name`` and alias it
    ``champion``; otherwise MLflow is not touched.

    Heads ``1..train_cases`` of seed ``dicom.brain.seed`` are trained on, the next ``val_cases`` score
    it on the network's grid; ``heldout_1mm`` > 0 also scores that many heads of another seed at 1 mm
    (``val_dice_1mm``, about 10 s each on 2 cores).
    """
    from tumorseg.params import as_params

    params = as_params(params)
    cfg = params.dicom.brain
    build_network(cfg.channels)  # a bad width list fails before minutes of head generation
    out = Path(out_dir if out_dir is not None else cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tracked = _TrackedRun.start(tracking_uri, cfg) if register and params.mlflow.enabled else None
    try:
        report = _train(params, out, progress, heldout_1mm, run_id=tracked.run_id if tracked else None)
        if tracked is not None:
            tracked.log(report, out)
    except BaseException:
        if tracked is not None:
            tracked.client.set_terminated(tracked.run_id, status="FAILED")
        raise
    if tracked is not None:
        tracked.client.set_terminated(tracked.run_id)
        report.version = register_brain_model(tracked.client, tracked.run_id, cfg, tracked.metrics)
        report.model_uri = f"models:/{cfg.model_name}/{report.version}"
        progress(
            f"brain: registered {cfg.model_name} version {report.version} as {CHAMPION} (run {report.run_id})"
        )
    report.seconds = time.perf_counter() - started
    _write_metrics(out, report)
    return report


def _write_metrics(out: Path, report: BrainTrainingReport) -> None:
    from tumorseg.data.manifest import atomic_write_text

    atomic_write_text(out / METRICS_FILE, json.dumps(report.to_dict(), indent=1) + "\n")


def _train(
    params: Params, out: Path, progress: Callable[[str], None], heldout_1mm: int, *, run_id: str | None
) -> BrainTrainingReport:
    """Generate the heads, train, validate, save the checkpoint and ``metrics.json``."""
    cfg = params.dicom.brain
    started = time.perf_counter()
    synth_cfg = head_synth_config(params, cfg.spacing_mm, cfg.seed)
    train_heads = _generate(range(1, cfg.train_cases + 1), synth_cfg, cfg.seed, "training", progress)
    samples = [_prepare(head, cfg.spacing_mm) for head in train_heads]
    del train_heads
    train_start = time.perf_counter()
    network, final_loss = fit_network(samples, cfg, progress=progress)
    train_seconds = time.perf_counter() - train_start
    del samples
    extractor = BrainExtractor(
        network,
        channels=cfg.channels,
        spacing_mm=cfg.spacing_mm,
        threshold=cfg.threshold,
        description=f"run {run_id}" if run_id else "trained brain extractor",
        run_id=run_id,
    )
    first_val = cfg.train_cases + 1
    val_heads = _generate(
        range(first_val, first_val + cfg.val_cases), synth_cfg, cfg.seed, "validation", progress
    )
    val_cases = {
        f"head-{first_val + k:03d}": dice(extractor.extract(h.images, h.affine), h.brain_mask)
        for k, h in enumerate(val_heads)
    }
    del val_heads
    val_dice = float(np.mean(list(val_cases.values())))
    progress(
        f"brain: validation Dice {val_dice:.4f} at {cfg.spacing_mm:g} mm (min {min(val_cases.values()):.4f})"
    )
    scores_1mm = heldout_dice(extractor, params, cases=heldout_1mm, spacing_mm=1.0) if heldout_1mm > 0 else []
    dice_1mm = float(np.mean(scores_1mm)) if scores_1mm else None
    if dice_1mm is not None:
        progress(f"brain: held-out Dice {dice_1mm:.4f} at 1 mm ({len(scores_1mm)} heads)")
    extractor.metrics = {
        "val_dice": val_dice,
        "val_dice_min": float(min(val_cases.values())),
        "final_loss": final_loss,
        "train_seconds": train_seconds,
        **({"val_dice_1mm": dice_1mm} if dice_1mm is not None else {}),
    }
    report = BrainTrainingReport(
        val_dice=val_dice,
        val_dice_cases=val_cases,
        steps=cfg.steps,
        seconds=time.perf_counter() - started,
        checkpoint=extractor.save(out / CHECKPOINT_FILE),
        run_id=run_id,
        val_dice_1mm=dice_1mm,
        val_dice_1mm_cases=scores_1mm,
        train_seconds=train_seconds,
        final_loss=final_loss,
        spacing_mm=cfg.spacing_mm,
        extractor=extractor,
    )
    _write_metrics(out, report)
    return report


@dataclass
class _TrackedRun:
    """The MLflow run of one training: opened before the heads are generated (a failure is recorded)."""

    client: Any
    run_id: str
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, tracking_uri: str, cfg: BrainConfig) -> _TrackedRun:
        import torch
        from mlflow import MlflowClient
        from mlflow.entities import Param

        from tumorseg.registry.loading import prepare_mlflow
        from tumorseg.tracking import create_run, ensure_experiment, flatten, reap_orphaned_runs

        prepare_mlflow()
        client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        experiment_id = ensure_experiment(tracking_uri, cfg.experiment)
        reap_orphaned_runs(tracking_uri, cfg.experiment)
        run_id = create_run(
            client, experiment_id, run_name="train-brain", tags={"tumorseg.stage": "train-brain"}
        )
        settings = {
            **flatten(cfg.model_dump(), "brain."),
            "num_res_units": NUM_RES_UNITS,
            "train_fov_mm": list(TRAIN_FOV_MM),
            "max_rotation_deg": MAX_ROTATION_DEG,
            "max_shift_mm": MAX_SHIFT_MM,
            "torch_threads": torch.get_num_threads(),
        }
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in settings.items()])
        return cls(client, run_id, cfg.steps)

    def log(self, report: BrainTrainingReport, out: Path) -> None:
        """The validation scores as metrics, the checkpoint and ``metrics.json`` under :data:`ARTIFACT_PATH`."""
        from mlflow.entities import Metric

        self.metrics = dict(report.extractor.metrics) if report.extractor is not None else {}
        logged = {**self.metrics, **{f"val_dice_{k}": v for k, v in report.val_dice_cases.items()}}
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, self.steps) for k, v in logged.items()]
        )
        self.client.log_artifact(self.run_id, str(report.checkpoint), artifact_path=ARTIFACT_PATH)
        self.client.log_artifact(self.run_id, str(out / METRICS_FILE), artifact_path=ARTIFACT_PATH)


def register_brain_model(client: Any, run_id: str, cfg: BrainConfig, metrics: Mapping[str, float]) -> str:
    """Register run ``run_id``'s :data:`ARTIFACT_PATH` as a new version of ``cfg.model_name`` with its
    scores as tags and alias it ``champion``; returns the version."""
    from mlflow.exceptions import MlflowException

    from tumorseg.tracking import registry_lock

    tags = {
        "run_id": run_id,
        "spacing_mm": f"{cfg.spacing_mm:g}",
        "channels": ",".join(str(c) for c in cfg.channels),
        **{k: f"{v:.6f}" for k, v in metrics.items() if k.startswith("val_dice")},
    }
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ARTIFACT_PATH}"
    with registry_lock(client.tracking_uri):
        try:
            client.get_registered_model(cfg.model_name)
        except MlflowException:
            client.create_registered_model(cfg.model_name, description=MODEL_DESCRIPTION)
        version = str(client.create_model_version(cfg.model_name, source, run_id=run_id, tags=tags).version)
        client.set_registered_model_alias(cfg.model_name, CHAMPION, version)
    log.info("registered %s version %s (run %s) as %s", cfg.model_name, version, run_id, CHAMPION)
    return version
