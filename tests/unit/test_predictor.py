"""The whole-case predictor: source geometry, label conventions, TTA, probabilities, component removal.

An "oracle" network (a 1x1x1 convolution thresholding the z-scored FLAIR channel) segments the
fixture phantoms almost perfectly, so these tests can check that predictions land on the right
voxels of the source grid (any orientation, any spacing) and carry the right label codes: a
geometry or convention bug shows up as a low Dice against the reference written with the case.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from tumorseg.config import PreprocessConfig
from tumorseg.data.conventions import get_convention, regions_from_canonical
from tumorseg.data.layouts import discover_cases
from tumorseg.data.transforms import DataLoaderConfig
from tumorseg.errors import DataError
from tumorseg.models.checkpoint import TrainedNetwork
from tumorseg.models.config import PredictConfig, SlidingWindowConfig
from tumorseg.models.networks import ModelConfig
from tumorseg.models.predictor import (
    SegmentationPredictor,
    decode_labels,
    mirror_sets,
    predict_dataset,
    region_volumes_ml,
)

_spec = importlib.util.spec_from_file_location(
    "fixtures_nifti", Path(__file__).parents[1] / "fixtures_nifti.py"
)
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

# Phantom FLAIR after z-scoring: brain <= 0.01, oedema 0.26-1.17, enhancing 2.7-3.5 (NCR ~1, like oedema).
WT_FLAIR, ET_FLAIR, GAIN = 0.13, 1.9, 20.0


def oracle(output: str = "regions") -> nn.Module:
    """1x1x1 conv on FLAIR (channel 3): WT where FLAIR > 0.13, TC = ET where FLAIR > 1.9."""
    if output == "regions":
        conv = nn.Conv3d(4, 3, 1)
        weights = torch.zeros(3, 4, 1, 1, 1)
        weights[:, 3] = GAIN
        bias = torch.tensor([-GAIN * WT_FLAIR, -GAIN * ET_FLAIR, -GAIN * ET_FLAIR])
    else:  # softmax bg / NCR / ED / ET: ED beats bg above 0.13, ET beats ED above 1.9
        conv = nn.Conv3d(4, 4, 1)
        weights = torch.zeros(4, 4, 1, 1, 1)
        weights[2, 3], weights[3, 3] = GAIN, 2 * GAIN
        bias = torch.tensor([0.0, -100.0, -GAIN * WT_FLAIR, -GAIN * WT_FLAIR - GAIN * ET_FLAIR])
    with torch.no_grad():
        conv.weight.copy_(weights)
        conv.bias.copy_(bias)
    return conv.eval()


def trained_oracle(output: str = "regions", spacing: float = 2.0) -> TrainedNetwork:
    preprocess = PreprocessConfig(target_spacing_mm=(spacing,) * 3).model_dump(mode="json")
    return TrainedNetwork(
        network=oracle(output),
        model=ModelConfig(output=output),
        data_loader=DataLoaderConfig(patch_size=(16, 16, 16)),
        sliding_window=SlidingWindowConfig(overlap=0.25, sw_batch_size=2),
        config={"preprocess": preprocess},
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def reference_canonical(seg_path: Path, convention: str) -> np.ndarray:
    return get_convention(convention).encode(np.asarray(nib.load(seg_path).dataobj))


def check_geometry(pred_path: Path, reference_path: Path) -> nib.Nifti1Image:
    pred, ref = nib.load(pred_path), nib.load(reference_path)
    assert pred.shape == ref.shape[:3]
    assert np.allclose(pred.affine, ref.affine, atol=1e-6)
    assert pred.header.get_data_dtype() == np.uint8
    assert int(pred.header["sform_code"]) == int(ref.header["sform_code"])
    assert int(pred.header["qform_code"]) == int(ref.header["qform_code"])
    return pred


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PIL"])
def test_brats2021_prediction_lands_on_the_source_grid_in_any_orientation(
    tmp_path: Path, orientation: str
) -> None:
    case_dir = fx.write_brats_case(tmp_path / "in", "BraTS2021_00001", orientation=orientation, seed=3)
    predictor = SegmentationPredictor(trained_oracle(), PredictConfig(device="cpu"))
    summary = predict_dataset(tmp_path / "in", tmp_path / "out", predictor)

    out = tmp_path / "out" / "BraTS2021_00001.nii.gz"
    assert summary.files["BraTS2021_00001"] == [out]
    pred = check_geometry(out, case_dir / "BraTS2021_00001_t1.nii.gz")
    labels = np.asarray(pred.dataobj)
    assert set(np.unique(labels).tolist()) == {0, 2, 4}, "BraTS 2021 codes: ED 2, ET 4 (never 3)"
    truth = regions_from_canonical(reference_canonical(case_dir / "BraTS2021_00001_seg.nii.gz", "brats2021"))
    ours = regions_from_canonical(get_convention("brats2021").encode(labels))
    assert dice(ours[0], truth[0]) > 0.95  # WT
    assert dice(ours[2], truth[2]) > 0.95  # ET
    voxel_ml = 8.0 / 1000.0
    assert summary.cases["BraTS2021_00001"]["WT"] == pytest.approx(np.count_nonzero(ours[0]) * voxel_ml)


def test_brats2023_and_msd_keep_their_own_label_codes(tmp_path: Path) -> None:
    fx.write_brats_case(
        tmp_path / "b23", "BraTS-GLI-00001-000", layout="brats2023", orientation="LAS", seed=1
    )
    fx.write_msd_dataset(tmp_path / "msd", ["BRATS_001"], orientation="RPI")
    predictor = SegmentationPredictor(trained_oracle(), PredictConfig(device="cpu"))

    predict_dataset(tmp_path / "b23", tmp_path / "out23", predictor)
    ref23 = tmp_path / "b23" / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-seg.nii.gz"
    pred23 = check_geometry(tmp_path / "out23" / "BraTS-GLI-00001-000.nii.gz", ref23)
    values = np.asarray(pred23.dataobj)
    assert set(np.unique(values).tolist()) == {0, 2, 3}
    assert dice(values == 3, np.asarray(nib.load(ref23).dataobj) == 3) > 0.95

    predict_dataset(tmp_path / "msd", tmp_path / "outmsd", predictor)
    ref_msd = tmp_path / "msd" / "labelsTr" / "BRATS_001.nii.gz"
    pred_msd = nib.load(tmp_path / "outmsd" / "BRATS_001.nii.gz")
    image = nib.load(tmp_path / "msd" / "imagesTr" / "BRATS_001.nii.gz")
    assert pred_msd.shape == image.shape[:3] and np.allclose(pred_msd.affine, image.affine)
    values = np.asarray(pred_msd.dataobj)
    assert set(np.unique(values).tolist()) == {0, 1, 3}, "MSD codes: 1 oedema, 3 enhancing"
    reference = np.asarray(nib.load(ref_msd).dataobj)
    assert dice(values == 3, reference == 3) > 0.95
    assert dice(values > 0, reference > 0) > 0.95


def test_a_fine_input_is_predicted_at_the_models_spacing_and_restored(tmp_path: Path) -> None:
    # 1 mm input, model trained at 4 mm: preprocessing resamples to 4 mm, restoration back to 1 mm.
    case_dir = fx.write_brats_case(
        tmp_path / "in",
        "BraTS2021_00002",
        shape=(80, 96, 64),
        spacing=(1.0, 1.0, 1.0),
        orientation="LPS",
        tumour_radius=14.0,
        seed=2,
    )
    predictor = SegmentationPredictor(trained_oracle(spacing=4.0), PredictConfig(device="cpu"))
    predict_dataset(case_dir, tmp_path / "out", predictor)  # one case folder as input
    pred = check_geometry(tmp_path / "out" / "BraTS2021_00002.nii.gz", case_dir / "BraTS2021_00002_t1.nii.gz")
    truth = reference_canonical(case_dir / "BraTS2021_00002_seg.nii.gz", "brats2021") > 0
    assert dice(np.asarray(pred.dataobj) > 0, truth) > 0.8  # 4 mm voxels blur the boundary a little
    # The volumes (counted on the 4-mm grid) and the canonical map are those of the written labels.
    prediction = predictor.predict_case(discover_cases(case_dir)[0])
    written = np.asarray(pred.dataobj)
    np.testing.assert_array_equal(prediction.labels, written)
    canonical = get_convention("brats2021").encode(written)
    np.testing.assert_array_equal(prediction.canonical, canonical)
    assert prediction.volumes_ml == region_volumes_ml(canonical, pred.affine)
    assert prediction.volumes_ml["ET"] > 0


def test_mirror_tta_undoes_each_flip(tmp_path: Path) -> None:
    # The oracle is a pointwise map, so every mirrored pass must agree exactly once flipped back:
    # averaged probabilities equal the plain ones and the TTA variance is zero.
    fx.write_brats_case(tmp_path / "in", "BraTS2021_00003", orientation="LPS", seed=4)
    case = discover_cases(tmp_path / "in")[0]
    plain = SegmentationPredictor(trained_oracle(), PredictConfig(device="cpu", probabilities=True))
    tta = SegmentationPredictor(
        trained_oracle(), PredictConfig(device="cpu", tta=True, probabilities=True, uncertainty=True)
    )
    a, b = plain.predict_case(case), tta.predict_case(case)
    assert len(mirror_sets((0, 1, 2))) == 8
    assert np.allclose(a.probabilities, b.probabilities, atol=1e-5)
    assert np.array_equal(a.labels, b.labels)
    assert b.uncertainty is not None and b.uncertainty.shape == b.probabilities.shape
    assert float(b.uncertainty.max()) < 1e-6


def test_tta_on_a_non_equivariant_network_averages_mirrored_passes(tmp_path: Path) -> None:
    fx.write_brats_case(tmp_path / "in", "BraTS2021_00004", seed=5)
    case = discover_cases(tmp_path / "in")[0]
    trained = trained_oracle()
    torch.manual_seed(0)
    trained.network = nn.Sequential(nn.Conv3d(4, 3, 3, padding=1), nn.Conv3d(3, 3, 3, padding=1)).eval()
    plain = SegmentationPredictor(trained, PredictConfig(device="cpu", probabilities=True))
    tta = SegmentationPredictor(
        trained, PredictConfig(device="cpu", tta=True, tta_axes=(0,), probabilities=True, uncertainty=True)
    )
    a, b = plain.predict_case(case), tta.predict_case(case)
    assert not np.allclose(a.probabilities, b.probabilities, atol=1e-4)
    assert float(b.uncertainty.max()) > 0


def test_probability_maps_match_the_labels_and_the_source_grid(tmp_path: Path) -> None:
    case_dir = fx.write_brats_case(tmp_path / "in", "BraTS2021_00005", orientation="PIL", seed=6)
    predictor = SegmentationPredictor(trained_oracle(), PredictConfig(device="cpu", probabilities=True))
    summary = predict_dataset(tmp_path / "in", tmp_path / "out", predictor)
    files = summary.files["BraTS2021_00005"]
    assert files[1] == tmp_path / "out" / "probabilities" / "BraTS2021_00005.nii.gz"
    prob = nib.load(files[1])
    t1 = nib.load(case_dir / "BraTS2021_00005_t1.nii.gz")
    assert prob.shape == (*t1.shape, 3) and np.allclose(prob.affine, t1.affine)
    maps = prob.get_fdata(dtype=np.float32)
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    wt = get_convention("brats2021").encode(np.asarray(nib.load(files[0]).dataobj)) > 0
    # Labels are thresholded on the model grid, probabilities interpolated: they agree away from edges.
    assert dice(maps[..., 0] > 0.5, wt) > 0.95


def test_label_mode_probabilities_make_background_certain_outside_the_crop(tmp_path: Path) -> None:
    # A wide field of view: the corner lies outside the brain crop (bounding box + 2 voxels).
    fx.write_brats_case(tmp_path / "in", "BraTS2021_00006", shape=(60, 60, 40), seed=7)
    case = discover_cases(tmp_path / "in")[0]
    predictor = SegmentationPredictor(
        trained_oracle("labels"), PredictConfig(device="cpu", probabilities=True)
    )
    prediction = predictor.predict_case(case)
    assert prediction.channels == ("background", "NCR", "ED", "ET")
    assert np.allclose(prediction.probabilities.sum(axis=0), 1.0, atol=1e-4)
    assert prediction.probabilities[0, 0, 0, 0] == pytest.approx(1.0)  # corner: outside the brain crop
    assert set(np.unique(prediction.labels).tolist()) == {0, 2, 4}


def test_small_components_are_removed_by_volume(tmp_path: Path) -> None:
    case_dir = fx.write_brats_case(tmp_path / "in", "BraTS2021_00007", seed=8)
    flair_path = case_dir / "BraTS2021_00007_flair.nii.gz"
    flair = nib.load(flair_path)
    data = np.asarray(flair.dataobj).copy()
    data[4:6, 12:14, 9:11] = 1400  # a 2x2x2-voxel (64 mm3) bright blob inside the brain, far from the tumour
    nib.save(nib.Nifti1Image(data, flair.affine), flair_path)
    case = discover_cases(tmp_path / "in")[0]
    keep_all = SegmentationPredictor(trained_oracle(), PredictConfig(device="cpu")).predict_case(case)
    cleaned = SegmentationPredictor(
        trained_oracle(), PredictConfig(device="cpu", min_component_mm3=100.0)
    ).predict_case(case)
    assert keep_all.canonical[4:6, 12:14, 9:11].all()
    assert not cleaned.canonical[4:6, 12:14, 9:11].any()
    assert keep_all.volumes_ml["WT"] - cleaned.volumes_ml["WT"] == pytest.approx(0.064)


def test_missing_modality_is_named_before_anything_is_written(tmp_path: Path) -> None:
    fx.write_brats_case(tmp_path / "in", "BraTS2021_00008")
    fx.write_brats_case(tmp_path / "in", "BraTS2021_00009")
    (tmp_path / "in" / "BraTS2021_00009" / "BraTS2021_00009_t1ce.nii.gz").unlink()
    predictor = SegmentationPredictor(trained_oracle(), PredictConfig(device="cpu"))
    with pytest.raises(DataError, match=r"BraTS2021_00009_t1ce\.nii\.gz"):
        predict_dataset(tmp_path / "in", tmp_path / "out", predictor)
    assert not (tmp_path / "out").exists()


def test_a_failing_case_leaves_no_partial_file_and_keeps_other_files(tmp_path: Path) -> None:
    fx.write_brats_case(tmp_path / "in", "BraTS2021_00010")
    bad = fx.write_brats_case(tmp_path / "in", "BraTS2021_00011")
    fx.truncate(bad / "BraTS2021_00011_t2.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    predictor = SegmentationPredictor(trained_oracle(), PredictConfig(device="cpu", probabilities=True))
    with pytest.raises(DataError, match=r"BraTS2021_00011_t2\.nii\.gz.*1 of 2 cases were written") as caught:
        predict_dataset(tmp_path / "in", out, predictor)
    assert "\n" not in str(caught.value)
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == ["BraTS2021_00010.nii.gz", "notes.txt", "probabilities/BraTS2021_00010.nii.gz"]
    assert (out / "notes.txt").read_text() == "mine"


def test_uncertainty_without_tta_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="tta"):
        PredictConfig(uncertainty=True)
    with pytest.raises(ValueError, match="tta_axes"):
        PredictConfig(tta_axes=(0, 0))


def test_decode_and_volumes_helpers() -> None:
    canonical = np.array([[[0, 1], [2, 3]]], dtype=np.uint8)
    assert decode_labels(canonical, "brats2021").tolist() == [[[0, 1], [2, 4]]]
    assert decode_labels(canonical, "msd").tolist() == [[[0, 2], [1, 3]]]
    volumes = region_volumes_ml(canonical, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert volumes == pytest.approx({"WT": 0.024, "TC": 0.016, "ET": 0.008})


@pytest.mark.parametrize("order", ["C", "F"])
def test_written_nifti_holds_exactly_what_nibabel_writes(tmp_path: Path, order: str) -> None:
    """The streamed ISA-L writer produces nibabel's own bytes (header and voxels), gzip-compressed."""
    import gzip

    from tumorseg.models.predictor import _atomic_save, nifti_like

    rng = np.random.default_rng(0)
    labels = np.asarray(rng.integers(0, 5, size=(9, 11, 7)).astype(np.uint8), order=order)
    affine = np.diag([-1.0, -1.0, 1.2, 1.0])
    image = nifti_like(labels, affine, nib.Nifti1Header(), np.uint8)
    path = tmp_path / "case.nii.gz"
    _atomic_save(image, path)
    assert gzip.decompress(path.read_bytes()) == image.to_bytes()
    loaded = nib.load(path)
    assert np.array_equal(np.asanyarray(loaded.dataobj), labels)
    assert np.allclose(loaded.affine, affine)
    assert [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]


def test_reading_the_next_case_ahead_only_with_a_spare_core_gives_the_same_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tumorseg.models import predictor as predictor_module

    for number, orientation in enumerate(("RAS", "LPS", "PIL"), start=1):
        fx.write_brats_case(tmp_path / "in", f"BraTS2021_0000{number}", orientation=orientation, seed=number)
    predictor = SegmentationPredictor(trained_oracle(), PredictConfig(device="cpu"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # every core busy inferring: read in turn
        assert not predictor_module.spare_core(predictor.device)
        in_turn = predict_dataset(tmp_path / "in", tmp_path / "in_turn", predictor)
        if len(os.sched_getaffinity(0)) > 1:
            torch.set_num_threads(1)
            assert predictor_module.spare_core(predictor.device)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(predictor_module, "spare_core", lambda device: True)
    ahead = predict_dataset(tmp_path / "in", tmp_path / "ahead", predictor)
    assert in_turn.cases == ahead.cases
    for name in sorted(p.name for p in (tmp_path / "in_turn").iterdir()):
        a, b = nib.load(tmp_path / "in_turn" / name), nib.load(tmp_path / "ahead" / name)
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.array_equal(
            a.affine, b.affine
        )


def test_the_models_stored_confidence_threshold_drops_unsure_components() -> None:
    trained = trained_oracle()
    trained.config = {**trained.config, "postprocess": {"min_component_confidence": 0.8}}
    spacing = (2.0, 2.0, 2.0)
    stored = SegmentationPredictor(trained, PredictConfig(device="cpu"))
    assert stored.min_confidence == 0.8
    labels = stored.labels_from_probabilities(fx.blob_probabilities(), spacing)
    assert labels[1:4, 1:4, 1:4].all() and not labels[6:].any()
    keep_all = SegmentationPredictor(trained, PredictConfig(device="cpu", min_component_confidence=0.0))
    assert keep_all.labels_from_probabilities(fx.blob_probabilities(), spacing)[7:10, 7:10, 7:10].all()
    unset = SegmentationPredictor(trained_oracle(), PredictConfig(device="cpu"))
    assert unset.min_confidence == 0.0


@pytest.mark.parametrize("ahead", [False, True])
def test_each_case_gets_its_own_confidence_threshold_asked_once_it_has_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ahead: bool
) -> None:
    from tumorseg.models import predictor as predictor_module

    for number in (1, 2):
        fx.write_brats_case(tmp_path / "in", f"BraTS2021_0000{number}", seed=number)
    # no component of the oracle's tumour is this sure: the predictor's own threshold drops it whole
    predictor = SegmentationPredictor(
        trained_oracle(), PredictConfig(device="cpu", min_component_confidence=0.9999)
    )
    monkeypatch.setattr(predictor_module, "spare_core", lambda device: ahead)
    events: list[str] = []
    decode = predictor.decode

    def decoding(case):  # noqa: ANN001, ANN202
        events.append(f"decode {case.case_id}")
        return decode(case)

    def threshold(case, decoded):  # noqa: ANN001, ANN202
        events.append(f"ask {case.case_id}")
        return 0.0 if case.case_id == "BraTS2021_00001" else None  # the first as if flagged for drift

    monkeypatch.setattr(predictor, "decode", decoding)
    summary = predict_dataset(tmp_path / "in", tmp_path / "out", predictor, threshold_for=threshold)
    assert events == [
        "decode BraTS2021_00001",
        "ask BraTS2021_00001",
        "decode BraTS2021_00002",
        "ask BraTS2021_00002",
    ]
    assert summary.cases["BraTS2021_00001"]["WT"] > 1.0  # threshold 0: only small components go
    assert summary.cases["BraTS2021_00002"]["WT"] == 0.0  # the predictor's threshold


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PIL"])
def test_drift_features_of_the_decoded_case_equal_those_of_its_files_as_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, orientation: str
) -> None:
    """The drift check reads the modalities the predictor decoded (reoriented to RAS) instead of the files
    again: every feature, subsampled percentiles included, must be the stored volume's exactly."""
    from tumorseg.monitoring import drift

    fx.write_brats_case(tmp_path / "in", "BraTS2021_00001", orientation=orientation, shape=(25, 28, 19))
    fx.write_msd_dataset(tmp_path / "msd", ["BRATS_001"], orientation=orientation)  # read_case's path
    predictor = SegmentationPredictor(trained_oracle(), PredictConfig(device="cpu"))
    for max_voxels in (10**9, 1000):  # all voxels; every 2nd voxel of odd-sized axes
        monkeypatch.setattr(drift, "MAX_PERCENTILE_VOXELS", max_voxels)
        for root, threaded in ((tmp_path / "in", True), (tmp_path / "msd", False)):
            (case,) = discover_cases(root)
            decoded, _ = predictor.decode(case)
            assert (decoded.volumes is None) is threaded
            assert drift.decoded_features(case.case_id, decoded) == drift.case_features(case)
