"""Brain extraction (tumorseg.dicom.brain): normalisation, grids, masks, checkpoints, URIs, training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tumorseg.dicom import brain
from tumorseg.dicom.heads import Head
from tumorseg.errors import DataError

SEQUENCES = ("t1", "t1ce", "t2", "flair")


def _cube(shape: tuple[int, int, int], lo: tuple[int, int, int], hi: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return mask


def _affine(spacing: float | tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.diag(np.broadcast_to(np.asarray(spacing, dtype=float), (3,)))
    affine[:3, 3] = (-90.0, -120.0, -60.0)
    return affine


def _small_extractor(seed: int = 0) -> brain.BrainExtractor:
    torch.manual_seed(seed)
    network = brain.build_network([4, 8, 8])
    return brain.BrainExtractor(network, channels=[4, 8, 8], spacing_mm=2.0, threshold=0.5)


def _threshold_extractor(spacing_mm: float = 2.0) -> brain.BrainExtractor:
    """A one-voxel convolution whose brain logit is 20 (normalised T1 - 0.5): the mask follows T1."""
    network = torch.nn.Conv3d(4, 1, kernel_size=1)
    with torch.no_grad():
        network.weight.zero_()
        network.weight[0, 0] = 20.0
        network.bias.fill_(-10.0)
    return brain.BrainExtractor(network, channels=[1, 1], spacing_mm=spacing_mm)


# ---------------------------------------------------------------------------- normalisation
def test_normalise_divides_by_the_heads_percentile_whatever_the_background() -> None:
    rng = np.random.default_rng(0)
    head = _cube((40, 40, 30), (10, 10, 5), (30, 30, 25))
    image = np.where(head, rng.uniform(400.0, 1000.0, head.shape), np.abs(rng.normal(0.0, 20.0, head.shape)))
    small = brain.normalise(image.astype(np.float32))
    assert small.dtype == np.float32
    assert np.percentile(small[head], 99) == pytest.approx(1.0, abs=0.02)
    assert small[~head].mean() < 0.05
    # four times the background around the same head: the same scale
    big = np.abs(rng.normal(0.0, 20.0, (80, 80, 60))).astype(np.float32)
    big[20:60, 20:60, 15:45] = image
    scale_small = image[head].max() / small[head].max()
    scale_big = image[head].max() / brain.normalise(big)[20:60, 20:60, 15:45][head].max()
    assert scale_big == pytest.approx(scale_small, rel=0.02)


def test_normalise_cleans_bad_values_and_keeps_an_empty_image_empty() -> None:
    image = np.full((20, 20, 20), 100.0, dtype=np.float32)
    image[0, 0, 0], image[1, 1, 1], image[2, 2, 2] = np.nan, np.inf, -50.0
    image[3, 3, 3] = 1e9  # one wild voxel is clipped; it sets neither the cut nor the scale
    out = brain.normalise(image)
    assert np.isfinite(out).all() and out.min() == 0.0 and out.max() == brain.INPUT_CLIP
    assert out[4, 4, 4] == pytest.approx(1.0)
    assert not brain.normalise(np.zeros((4, 4, 4))).any()


# ---------------------------------------------------------------------------- grids
def test_network_shape_and_padding() -> None:
    assert brain.network_shape((240, 240, 155), (1.0, 1.0, 1.0), 2.0) == (120, 120, 78)
    assert brain.network_shape((100, 80, 40), (1.0, 1.0, 3.0), 2.0) == (50, 40, 60)
    padded = brain.pad_to_multiple(torch.ones(1, 4, 13, 16, 9), 8)
    assert padded.shape == (1, 4, 16, 16, 16)
    assert padded[0, 0, :13, :, :9].all() and not padded[0, 0, 13:].any() and not padded[0, 0, :, :, 9:].any()


def test_resize_down_and_back_keeps_a_blob_in_place() -> None:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (41, 37, 29)], indexing="ij"))
    centre = np.array([17.3, 21.0, 12.6])
    blob = np.exp(-(((grid - centre[:, None, None, None]) / 5.0) ** 2).sum(0)).astype(np.float32)
    small = brain.resize(torch.from_numpy(blob)[None, None], brain.network_shape(blob.shape, (1, 1, 1), 2.0))
    back = brain.resize(small, blob.shape)[0, 0].numpy()
    assert back.shape == blob.shape

    def centroid(v: np.ndarray) -> np.ndarray:
        return (grid * v).reshape(3, -1).sum(1) / v.sum()

    assert np.abs(centroid(back) - centre).max() < 0.3


def test_extract_brings_the_mask_back_to_the_input_grid() -> None:
    shape = (45, 38, 31)  # odd sizes: 1 mm -> 2 mm -> 1 mm does not divide evenly
    truth = _cube(shape, (9, 7, 6), (33, 30, 24))
    images = {m: np.where(truth, 500.0, 3.0).astype(np.float32) for m in SEQUENCES}
    extractor = _threshold_extractor()
    prob = extractor.probability(images, _affine(1.0))
    assert prob.shape == shape and prob.dtype == np.float32
    mask = extractor.extract(images, _affine(1.0))
    assert mask.shape == shape and mask.dtype == bool
    _within_a_voxel(mask, truth)
    # a coarser input (3 mm slices) is upsampled to the network's grid and back
    thick = {m: v[:, :, ::3] for m, v in images.items()}
    mask = extractor.extract(thick, _affine((1.0, 1.0, 3.0)))
    assert mask.shape == thick["t1"].shape
    _within_a_voxel(mask, truth[:, :, ::3])


def _within_a_voxel(mask: np.ndarray, truth: np.ndarray) -> None:
    from scipy import ndimage as ndi

    assert not (ndi.binary_erosion(truth) & ~mask).any()
    assert not (mask & ~ndi.binary_dilation(truth)).any()


def test_inputs_are_checked_in_one_line() -> None:
    extractor = _small_extractor()
    images = {m: np.zeros((8, 8, 8), dtype=np.float32) for m in SEQUENCES}
    with pytest.raises(DataError, match="flair missing"):
        extractor.extract({m: v for m, v in images.items() if m != "flair"}, _affine(1.0))
    with pytest.raises(DataError, match="one 3-D grid") as err:
        extractor.extract({**images, "t2": np.zeros((8, 8, 7))}, _affine(1.0))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="affine"):
        extractor.extract(images, np.zeros((4, 4)))


def test_the_network_sees_the_head_box_whatever_the_field_of_view() -> None:
    rng = np.random.default_rng(1)
    head = _cube((40, 44, 36), (10, 12, 8), (30, 34, 28))
    channels = np.stack([np.where(head, 0.8, 0.0) + np.abs(rng.normal(0.0, 0.03, head.shape))] * 4)
    margin = int(np.ceil(brain.HEAD_MARGIN_MM / 2.0))
    box = brain.head_box(channels, 2.0)
    for found, (lo, hi) in zip(box, ((10, 30), (12, 34), (8, 28)), strict=True):
        # the margin, and up to 3 voxels that the smoothing lifts above the head's level
        assert lo - margin - 3 <= found.start <= lo - margin and hi + margin <= found.stop <= hi + margin + 3
    wide = np.pad(channels, ((0, 0), (25, 25), (25, 25), (20, 20)))  # more background all round
    shifted = tuple(slice(s.start + p, s.stop + p) for s, p in zip(box, (25, 25, 20), strict=True))
    assert brain.head_box(wide, 2.0) == shifted
    cut = channels[:, 14:, :, :20]  # a field of view that cuts the head: the box stops at its edges
    assert brain.head_box(cut, 2.0) == (slice(0, box[0].stop - 14), box[1], slice(box[2].start, 20))
    assert brain.head_box(np.zeros((4, 6, 7, 8)), 2.0) == (slice(0, 6), slice(0, 7), slice(0, 8))


# ---------------------------------------------------------------------------- masks
def test_largest_component_and_holes() -> None:
    mask = _cube((30, 30, 30), (2, 2, 2), (20, 20, 20)) | _cube((30, 30, 30), (24, 24, 24), (28, 28, 28))
    mask[8:12, 8:12, 8:12] = False  # a hole inside the big block
    kept = brain.largest_component(mask)
    assert kept.sum() == 18**3 - 4**3 and not kept[25, 25, 25]
    cleaned = brain.clean_mask(mask)
    assert np.array_equal(cleaned, _cube((30, 30, 30), (2, 2, 2), (20, 20, 20)))
    assert not brain.clean_mask(np.zeros((5, 5, 5), dtype=bool)).any()
    assert brain.dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert brain.dice(np.array([1, 1, 0], bool), np.array([1, 0, 0], bool)) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------- poses and augmentation
def test_moved_head_shifts_and_turns_images_and_masks_together() -> None:
    shape = (24, 24, 24)
    box = _cube(shape, (4, 8, 10), (12, 16, 14))
    head = Head(
        images={m: box.astype(np.float32) * 100 for m in SEQUENCES},
        brain_mask=box,
        head_mask=box,
        affine=_affine(2.0),
    )
    shifted = brain.moved_head(head, np.eye(3), (4.0, 0.0, -2.0))  # mm: 2 voxels along x, -1 along z
    assert np.array_equal(shifted.brain_mask, np.roll(np.roll(box, 2, axis=0), -1, axis=2))
    assert np.array_equal(shifted.images["t2"] >= 50, shifted.brain_mask)
    turned = brain.moved_head(head, brain.rotation_matrix((0.0, 0.0, 90.0)), (0.0, 0.0, 0.0))
    centre = np.argwhere(turned.brain_mask).mean(0) - 11.5
    before = np.argwhere(box).mean(0) - 11.5
    assert np.allclose(centre, [-before[1], before[0], before[2]], atol=0.01)  # +90 degrees about z: x -> y


def test_augmented_images_stay_on_their_mask() -> None:
    shape = (40, 44, 36)
    mask = torch.from_numpy(_cube(shape, (10, 12, 8), (30, 34, 28)).astype(np.float32))
    sample = brain._Sample(torch.stack([mask] * 4 + [mask]))
    rng, gen = np.random.default_rng(3), torch.Generator().manual_seed(3)
    fov = (32, 40, 32)
    for _ in range(4):
        images, target = brain._augmented(sample, fov, rng, gen, 2.0)
        assert images.shape == (4, *fov) and target.shape == (1, *fov)
        assert float(images.min()) >= 0.0 and float(images.max()) <= brain.INPUT_CLIP
        seen = images.max(0).values > 0.4  # at most one channel is dropped
        assert brain.dice(seen.numpy(), (target[0] > 0.5).numpy()) > 0.95


# ---------------------------------------------------------------------------- checkpoints and URIs
def test_checkpoint_round_trip(tmp_path: Path) -> None:
    extractor = _small_extractor(seed=5)
    extractor.metrics = {"val_dice": 0.5}
    path = extractor.save(tmp_path / "out" / brain.CHECKPOINT_FILE)
    assert torch.load(path, weights_only=True)["format"] == brain.CHECKPOINT_FORMAT
    images = {
        m: np.random.default_rng(i).uniform(0, 100, (21, 18, 14)).astype(np.float32)
        for i, m in enumerate(SEQUENCES)
    }
    expected = extractor.probability(images, _affine(1.0))
    for uri in (str(path), str(path.parent)):  # the file, or the folder holding it
        loaded = brain.load_brain_extractor(uri, tracking_uri="sqlite:///unused.db")
        assert (
            loaded.channels == [4, 8, 8] and loaded.spacing_mm == 2.0 and loaded.metrics == {"val_dice": 0.5}
        )
        np.testing.assert_array_equal(loaded.probability(images, _affine(1.0)), expected)


def test_bad_uris_give_one_line_errors_naming_them(tmp_path: Path) -> None:
    from tumorseg.tracking import default_tracking_uri

    tracking_uri = default_tracking_uri(tmp_path / "mlruns")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"format": "something else"}, other)
    cases = {
        str(tmp_path / "missing" / "brain.pt"): "no such brain-extraction checkpoint",
        str(garbage): "not a brain-extraction checkpoint",
        str(other): "not a brain-extraction checkpoint",
        "models:/tumorseg-brain@champion": "no MLflow store",
        "models:/a/b/c": "not a model URI",
    }
    for uri, words in cases.items():
        with pytest.raises(DataError) as err:
            brain.load_brain_extractor(uri, tracking_uri=tracking_uri)
        message = str(err.value)
        assert message.startswith(f"{uri}: ") and words in message and "\n" not in message
    assert not (tmp_path / "mlruns").exists()  # nothing created by a failed look-up


# ---------------------------------------------------------------------------- training and the registry
def _tiny_training_params(steps: int) -> Any:
    from tumorseg.params import load_params

    params = load_params()
    cfg = params.dicom.brain.model_copy(
        update={
            "train_cases": 2,
            "val_cases": 1,
            "steps": steps,
            "spacing_mm": 4.0,
            "channels": [4, 8, 16],
            "seed": 3,
        }
    )
    return params.model_copy(update={"dicom": params.dicom.model_copy(update={"brain": cfg})})


def test_training_without_registering_writes_the_checkpoint_only(tmp_path: Path) -> None:
    from tumorseg.tracking import default_tracking_uri

    torch.set_num_threads(min(2, torch.get_num_threads()))
    report = brain.train_brain_extractor(
        _tiny_training_params(steps=2),
        tracking_uri=default_tracking_uri(tmp_path / "mlruns"),
        out_dir=tmp_path / "brain",
        register=False,
        progress=lambda _: None,
    )
    assert report.run_id is None and report.version is None and "not registered" in report.one_line()
    assert sorted(p.name for p in (tmp_path / "brain").iterdir()) == [
        brain.CHECKPOINT_FILE,
        brain.METRICS_FILE,
    ]
    assert not (tmp_path / "mlruns").exists()
    loaded = brain.load_brain_extractor(str(report.checkpoint), tracking_uri="sqlite:///unused.db")
    assert loaded.metrics["val_dice"] == report.val_dice


def test_short_training_registers_and_loads_back(tmp_path: Path) -> None:
    import mlflow

    from tumorseg.tracking import default_tracking_uri

    torch.set_num_threads(min(2, torch.get_num_threads()))
    params = _tiny_training_params(steps=4)
    cfg = params.dicom.brain
    tracking_uri = default_tracking_uri(tmp_path / "mlruns")
    assert tracking_uri == f"sqlite:///{(tmp_path / 'mlruns' / 'mlflow.db').resolve()}"
    lines: list[str] = []
    report = brain.train_brain_extractor(
        params, tracking_uri=tracking_uri, out_dir=tmp_path / "brain", progress=lines.append
    )

    assert report.checkpoint == tmp_path / "brain" / brain.CHECKPOINT_FILE and report.checkpoint.is_file()
    assert report.version == "1" and report.model_uri == f"models:/{cfg.model_name}/1"
    assert list(report.val_dice_cases) == ["head-003"] and 0.0 <= report.val_dice <= 1.0
    assert any(line.startswith("brain: step 4/4 loss ") and " left" in line for line in lines)
    summary = report.one_line()
    assert (
        "\n" not in summary
        and "validation Dice" in summary
        and "registered models:/tumorseg-brain/1 as champion" in summary
    )
    written = json.loads((tmp_path / "brain" / brain.METRICS_FILE).read_text())
    assert (
        written["val_dice"] == report.val_dice
        and written["version"] == "1"
        and written["run_id"] == report.run_id
    )

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(report.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["val_dice"] == pytest.approx(report.val_dice)
    assert run.data.params["brain.spacing_mm"] == "4.0"
    assert str(client.get_model_version_by_alias(cfg.model_name, brain.CHAMPION).version) == "1"

    # the registered model gives exactly what the trained module gave
    trained = report.extractor
    assert trained is not None
    heads_cfg = brain.head_synth_config(params, cfg.spacing_mm, cfg.seed)
    head = brain.generated_head(3, heads_cfg, cfg.seed)
    expected = trained.probability(head.images, head.affine)
    for uri in (
        f"models:/{cfg.model_name}@champion",
        "models:/tumorseg-brain/1",
        f"runs:/{report.run_id}/brain_extractor",
    ):
        loaded = brain.load_brain_extractor(uri, tracking_uri=tracking_uri)
        np.testing.assert_array_equal(loaded.probability(head.images, head.affine), expected)
    assert loaded.run_id == report.run_id
    assert brain.dice(loaded.extract(head.images, head.affine), head.brain_mask) == pytest.approx(
        report.val_dice
    )
    with pytest.raises(DataError, match=r"^models:/tumorseg-brain@nobody: not found in the MLflow store"):
        brain.load_brain_extractor("models:/tumorseg-brain@nobody", tracking_uri=tracking_uri)
