"""Serving for any label set: a post-treatment (``glioma_post``: WT, TC, ET, RC) model beside glioma.

The API reports the fourth region's volume and Dice, the model info the page reads lists the label
set's regions with their codes and colours (glioma's exactly as the viewer always drew them), the
viewer's display case scores a ground truth on the model's regions, and the MLflow pyfunc keeps its
three fixed volume columns while reporting every region in its JSON ``volumes_ml`` column.
"""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from serving_support import (
    case_files,
    fx,
    leftover_request_dirs,
    oracle_model,
    post_treatment_model,
    write_post_treatment_case,
)

from tumorseg.data.conventions import GLIOMA, get_convention, get_label_set
from tumorseg.models.predictor import region_volumes_ml
from tumorseg.serving.viewer import dice_per_region, label_set_info

GLIOMA_VIEWER = [
    {"name": "WT", "codes": [1, 2, 3], "paint": "ED", "caption": "oedema", "colour": [46, 204, 64]},
    {"name": "TC", "codes": [1, 3], "paint": "NCR", "caption": "necrosis", "colour": [255, 65, 54]},
    {"name": "ET", "codes": [3], "paint": "ET", "caption": "enhancing", "colour": [255, 220, 0]},
]
"""What the viewer drew before label sets: WT green (oedema), TC red (necrosis), ET yellow (enhancing)."""


@pytest.fixture(scope="module")
def post_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_post_treatment_case(tmp_path_factory.mktemp("post"))


def test_label_set_info_keeps_the_glioma_viewer_and_lists_every_region_of_the_others() -> None:
    glioma = label_set_info(GLIOMA)
    assert glioma["name"] == "glioma"
    assert glioma["regions"] == GLIOMA_VIEWER
    assert glioma["overlay_order"] == ["ET", "TC", "WT"]  # innermost first, as the page always drew
    assert glioma["labels"] == {"1": "NCR", "2": "ED", "3": "ET"}

    post = label_set_info(get_label_set("glioma_post"))
    assert [r["name"] for r in post["regions"]] == ["WT", "TC", "ET", "RC"]
    assert post["regions"][:3] == [
        {**GLIOMA_VIEWER[0], "paint": "SNFH", "caption": "FLAIR hyperintensity"},
        {**GLIOMA_VIEWER[1], "paint": "NETC", "caption": "non-enhancing core"},
        GLIOMA_VIEWER[2],
    ]
    assert post["regions"][3]["codes"] == [4] and post["regions"][3]["caption"] == "resection cavity"
    assert post["overlay_order"] == ["RC", "ET", "TC", "WT"]

    pediatric = label_set_info(get_label_set("pediatric"))
    assert [r["name"] for r in pediatric["regions"]] == ["WT", "TC", "CC", "ET"]
    assert {r["name"]: r["codes"] for r in pediatric["regions"]}["ET"] == [1]  # PED codes ET as 1
    colours = [tuple(r["colour"]) for info in (glioma, post, pediatric) for r in info["regions"]]
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in colours)
    assert len({tuple(r["colour"]) for r in pediatric["regions"]}) == 4  # distinct within a set
    json.dumps([glioma, post, pediatric])  # JSON-ready


def test_health_describes_the_label_set_the_page_draws(make_client) -> None:
    glioma = make_client().get("/health").json()["model"]["label_set"]
    assert glioma == label_set_info(GLIOMA)
    assert glioma["regions"] == GLIOMA_VIEWER
    post = make_client(loaded_model=post_treatment_model()).get("/health").json()["model"]["label_set"]
    assert post["name"] == "glioma_post"
    assert [(r["name"], r["codes"]) for r in post["regions"]] == [
        ("WT", [1, 2, 3]),
        ("TC", [1, 3]),
        ("ET", [3]),
        ("RC", [4]),
    ]


def test_a_post_treatment_model_reports_the_resection_cavity_volume_and_dice(
    make_client, post_case: Path
) -> None:
    client = make_client(loaded_model=post_treatment_model())
    body = client.post("/predict?format=json", files=case_files(post_case, seg=True)).json()
    assert list(body["volumes_ml"]) == ["WT", "TC", "ET", "RC"]
    assert body["volumes_ml"]["RC"] > 0 and body["volumes_ml"]["WT"] > 0
    # the folder reads as 2023 GLI; the model's label set has one convention, so it is written in 2024 GLI
    assert body["label_convention"] == "brats2024-gli"
    assert body["model"]["label_set"]["name"] == "glioma_post"
    assert set(body["dice"]) == {"WT", "TC", "ET", "RC"}
    assert body["dice"]["WT"] > 0.85 and 0.0 <= body["dice"]["RC"] <= 1.0

    # the NIfTI answer: 2024 GLI codes, RC (4) in it, every region's volume in the header
    response = client.post("/predict", files=case_files(post_case))
    assert response.status_code == 200, response.text
    labels = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(response.content)).dataobj)
    assert 4 in np.unique(labels)
    volumes = dict(item.split("=") for item in response.headers["x-tumorseg-volumes-ml"].split(","))
    expected = region_volumes_ml(
        labels, nib.load(post_case / f"{post_case.name}-t1n.nii.gz").affine, get_label_set("glioma_post")
    )
    assert {k: float(v) for k, v in volumes.items()} == pytest.approx(expected, abs=1e-3)

    # Dice is the label set's: recomputed from the answer against the case's mask in 2024 GLI codes
    reference = get_convention("brats2024-gli").encode(
        np.asarray(nib.load(post_case / f"{post_case.name}-seg.nii.gz").dataobj)
    )
    recomputed = dice_per_region(labels, reference, get_label_set("glioma_post"))
    assert body["dice"] == pytest.approx({k: round(v, 4) for k, v in recomputed.items()}, abs=1e-4)


def test_the_viewer_keeps_the_label_set_for_slices_and_ground_truth_dice(
    make_client, post_case: Path
) -> None:
    client = make_client(loaded_model=post_treatment_model())
    summary = client.post("/predict?format=viewer", files=case_files(post_case)).json()
    assert summary["dice"] is None
    assert [r["name"] for r in summary["model"]["label_set"]["regions"]] == ["WT", "TC", "ET", "RC"]
    assert list(summary["volumes_ml"]) == ["WT", "TC", "ET", "RC"]
    result_id = summary["result_id"]
    codes = set()
    for index in range(summary["slices"]["axial"]):
        piece = client.get(f"/cases/{result_id}/slice", params={"plane": "axial", "index": index}).json()
        codes |= set(np.frombuffer(base64.b64decode(piece["labels"]), dtype=np.uint8).tolist())
    assert 4 in codes  # the slices carry internal codes, RC included

    seg = post_case / f"{post_case.name}-seg.nii.gz"
    scored = client.post(
        f"/cases/{result_id}/ground-truth", files={"file": (seg.name, seg.read_bytes(), "application/gzip")}
    )
    assert scored.status_code == 200, scored.text
    dice = scored.json()["dice"]
    assert set(dice) == {"WT", "TC", "ET", "RC"} and dice["WT"] > 0.85
    with_mask = client.post("/predict?format=json", files=case_files(post_case, seg=True)).json()
    assert dice == with_mask["dice"]  # same reference read, same regions, either way
    assert client.get(f"/cases/{result_id}").json()["dice"] == dice
    assert leftover_request_dirs(client) == []


def test_the_glioma_viewer_summary_is_unchanged(make_client, tmp_path: Path) -> None:
    case = fx.write_brats_case(tmp_path, "BraTS2021_00005", seed=5)
    client = make_client()
    summary = client.post("/predict?format=viewer", files=case_files(case)).json()
    assert list(summary["volumes_ml"]) == ["WT", "TC", "ET"]
    assert summary["label_convention"] == "brats2021"
    assert summary["model"]["label_set"]["regions"] == GLIOMA_VIEWER
    seg = case / "BraTS2021_00005_seg.nii.gz"
    dice = client.post(
        f"/cases/{summary['result_id']}/ground-truth",
        files={"file": (seg.name, seg.read_bytes(), "application/gzip")},
    ).json()["dice"]
    assert set(dice) == {"WT", "TC", "ET"} and dice["WT"] > 0.85


def test_display_case_scores_its_own_label_set() -> None:
    from tumorseg.serving.viewer import build_display_case

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    predicted = np.zeros((6, 6, 6), dtype=np.uint8)
    predicted[1:3, 1:3, 1:3] = 2
    predicted[4:6, 4:6, 4:6] = 4  # RC
    image = np.random.default_rng(0).random((4, 6, 6, 6)).astype(np.float32)
    post = get_label_set("glioma_post")
    display = build_display_case("c", image, predicted, affine, "brats2024-gli", {}, b"", post)
    assert display.label_set is post
    reference = predicted.copy()
    reference[5, 5, 5] = 0
    dice = display.set_reference(reference)
    assert list(dice) == ["WT", "TC", "ET", "RC"]
    assert dice["WT"] == 1.0 and dice["RC"] == pytest.approx(2 * 7 / 15)
    glioma = build_display_case("c", image, predicted.clip(0, 3), affine, "brats2023", {}, b"")
    assert glioma.label_set is GLIOMA
    assert list(glioma.set_reference(predicted.clip(0, 3))) == ["WT", "TC", "ET"]


# ---------------------------------------------------------------------------- MLflow pyfunc
def pyfunc_of(loaded) -> object:
    """The registered pyfunc around a loaded model, without MLflow logging (load_context's state)."""
    from tumorseg.models.config import PredictConfig
    from tumorseg.registry.pyfunc import TumorsegSegmentationModel, VolumeStrategy

    model = TumorsegSegmentationModel()
    model._strategy = VolumeStrategy(loaded.trained, PredictConfig(device="cpu", min_component_mm3=0.0))
    return model


def test_the_pyfunc_keeps_its_volume_columns_and_adds_every_region_as_json(
    post_case: Path, tmp_path: Path
) -> None:
    from tumorseg.registry.pyfunc import OUTPUT_COLUMNS, model_signature

    original = ["case_id", "label_convention", "shape", "volume_wt_ml", "volume_tc_ml", "volume_et_ml",
                "output_path", "segmentation"]  # fmt: skip
    assert list(OUTPUT_COLUMNS[:8]) == original  # old clients: same names, same order
    outputs = model_signature(False, 0.0).outputs.to_dict()
    assert [c["name"] for c in outputs] == [*original, "label_set", "volumes_ml"]
    assert [c.get("required", True) for c in outputs[8:]] == [False, False]
    assert all(c["type"] == "double" for c in outputs[3:6])

    import pandas as pd

    frame = pd.DataFrame({"case_dir": [str(post_case)]})
    post = pyfunc_of(post_treatment_model()).predict(None, frame, {"return_segmentation": False})
    assert list(post.columns) == list(OUTPUT_COLUMNS)
    row = post.iloc[0]
    assert row["label_set"] == "glioma_post" and row["label_convention"] == "brats2024-gli"
    volumes = json.loads(row["volumes_ml"])
    assert list(volumes) == ["WT", "TC", "ET", "RC"] and volumes["RC"] > 0
    assert (row["volume_wt_ml"], row["volume_tc_ml"], row["volume_et_ml"]) == (
        volumes["WT"],
        volumes["TC"],
        volumes["ET"],
    )

    glioma_case = fx.write_brats_case(tmp_path, "BraTS2021_00002", seed=2)
    glioma = pyfunc_of(oracle_model()).predict(None, pd.DataFrame({"case_dir": [str(glioma_case)]}), {})
    row = glioma.iloc[0]
    assert row["label_set"] == "glioma" and list(json.loads(row["volumes_ml"])) == ["WT", "TC", "ET"]
    assert json.loads(row["volumes_ml"])["WT"] == row["volume_wt_ml"] > 0
    assert row["segmentation"]  # still returned by default
