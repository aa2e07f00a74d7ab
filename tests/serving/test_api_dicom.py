"""DICOM studies through the service: ``POST /predict`` with a zipped study answers a DICOM-SEG that
references the study's T1ce series (and lands on the tumour), ``format=nifti`` the labels on the T1ce
grid, ``format=viewer`` the imported case with the DICOM-SEG to download (and the viewer page shows
it, in headless Chromium); two studies, a missing sequence, missing slices, stray files and a missing
brain model get one-line 4xx/503 errors.

Studies are generated (:func:`~tumorseg.dicom.study_synth.write_study`: a 3 mm case in its head,
series 2.5 x coarser than a scanner's); the brain extractor is a tiny network trained for a few dozen
steps in the module fixture (about 25 s on 2 cores) and served from its checkpoint; the tumour model
is the serving tests' oracle with its thresholds set for these heads (:func:`study_oracle`). Imports
run at 2 mm without N4 to keep each request to a few seconds.
"""

from __future__ import annotations

import gzip
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from serving_support import (
    fx,
    leftover_request_dirs,
    load_test_module,
    oracle_model,
    serve_params,
    zip_bytes,
)

from tumorseg.config import SynthConfig, apply_overrides
from tumorseg.serving.app import ServeSettings, create_app

SCALE = 2.5
SEED = 5
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
WT_FLAIR_Z, TC_FLAIR_Z, GAIN = 1.8, 3.0, 20.0
"""The generated heads' z-scored FLAIR: brain below about 1 (95th percentile), oedema about 4."""


# ---------------------------------------------------------------------------- studies and zips
@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two generated studies of one head: ``STUDY_0001`` with distractor series, ``STUDY_0002`` without."""
    from tumorseg.data.synth import synthesize_case
    from tumorseg.dicom.config import StudiesConfig
    from tumorseg.dicom.heads import synth_head
    from tumorseg.dicom.study_synth import write_study

    out = tmp_path_factory.mktemp("studies")
    case = synthesize_case(1, SynthConfig(spacing_mm=3.0, seed=11, tumour_free_fraction=0.0))
    head = synth_head(case, seed=SEED)
    write_study(case, head, out, 1, StudiesConfig(), SEED, spacing_scale=SCALE)
    write_study(case, head, out, 2, StudiesConfig(distractors=False), SEED, spacing_scale=SCALE)
    return out


def _series(study: Path, modality: str) -> Any:
    from tumorseg.dicom.study_synth import read_truth

    _, series = read_truth(study)
    return next(s for s in series if s.modality == modality)


def study_zip(
    *studies: Path, leave_out: tuple[str, ...] = (), extra: dict[str, bytes] | None = None
) -> bytes:
    """A deflated zip of study folders (members ``STUDY_0001/S101/IM0001.dcm``...), leaving out the
    members whose path relative to the study starts with one of ``leave_out``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for study in studies:
            for path in sorted(study.rglob("*.dcm")):
                inside = path.relative_to(study).as_posix()
                if not inside.startswith(leave_out):
                    zf.write(path, f"{study.name}/{inside}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buffer.getvalue()


def as_upload(data: bytes, name: str = "study.zip") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/zip"))]


def t1ce_source(study: Path) -> list[pydicom.Dataset]:
    """The study's T1ce slices (headers), in slice order."""
    folder = study / _series(study, "t1ce").folder
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]


# ---------------------------------------------------------------------------- the service
def study_oracle() -> Any:
    """The oracle's 1x1x1 convolution on z-scored FLAIR (channel 3) with thresholds for the generated
    heads: WT above :data:`WT_FLAIR_Z`, TC = ET above :data:`TC_FLAIR_Z`."""
    import torch
    from torch import nn

    conv = nn.Conv3d(4, 3, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 3] = GAIN
        conv.bias.copy_(torch.tensor([-GAIN * WT_FLAIR_Z, -GAIN * TC_FLAIR_Z, -GAIN * TC_FLAIR_Z]))
    return conv.eval()


@pytest.fixture(scope="module")
def brain_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A brain extractor trained for a few steps at 4 mm on two generated heads (not registered)."""
    import torch

    from tumorseg.dicom.brain import train_brain_extractor
    from tumorseg.params import load_params
    from tumorseg.tracking import default_tracking_uri

    torch.set_num_threads(min(2, torch.get_num_threads()))
    tmp = tmp_path_factory.mktemp("brain")
    params = load_params()
    cfg = params.dicom.brain.model_copy(
        update={
            "train_cases": 2,
            "val_cases": 1,
            "steps": 30,
            "spacing_mm": 4.0,
            "channels": [4, 8, 16],
            "seed": 3,
        }
    )
    params = params.model_copy(update={"dicom": params.dicom.model_copy(update={"brain": cfg})})
    report = train_brain_extractor(
        params,
        tracking_uri=default_tracking_uri(tmp / "mlruns"),
        out_dir=tmp / "out",
        register=False,
        progress=lambda line: None,
    )
    return report.checkpoint


def dicom_settings(tmp: Path, brain_model: str, **serve: Any) -> ServeSettings:
    """The tests' serve settings with quick imports (2 mm, no N4, a short registration)."""
    params = apply_overrides(
        serve_params(tmp, **serve),
        {
            "dicom.brain.model": brain_model,
            "dicom.spacing_mm": 2.0,
            "dicom.bias.enabled": False,
            "dicom.registration.iterations": 40,
        },
    )
    return ServeSettings.from_params(params, model_uri="oracle")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, brain_checkpoint: Path) -> Iterator[Any]:
    """The app on :func:`study_oracle`, with the trained brain extractor as ``dicom.brain.model``."""
    from fastapi.testclient import TestClient

    settings = dicom_settings(tmp_path_factory.mktemp("serve"), str(brain_checkpoint))
    app = create_app(settings, loaded_model=oracle_model(study_oracle()))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def assert_one_line_error(response: Any, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    message = body["error"]
    assert "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert word in message, message
    return message


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


# ---------------------------------------------------------------------------- answers
def test_a_study_zip_is_answered_with_a_dicom_seg_of_its_t1ce_series(
    client: Any, studies: Path, tmp_path: Path
) -> None:
    from tumorseg.dicom.seg import read_dicom_seg
    from tumorseg.dicom.study_synth import SEG_NAME, read_truth, truth_dir

    study = studies / "STUDY_0001"
    response = client.post("/predict", files=as_upload(study_zip(study)))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="study-') and disposition.endswith('_seg.dcm"')
    assert response.headers["x-tumorseg-volumes-ml"].startswith("WT=")

    path = tmp_path / "seg.dcm"
    path.write_bytes(response.content)
    seg = pydicom.dcmread(path)
    t1ce = _series(study, "t1ce")
    record, _ = read_truth(study)
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == record["study_instance_uid"]
    assert seg.FrameOfReferenceUID == record["frame_of_reference_uid"]
    assert [item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence] == [t1ce.series_uid]

    source = t1ce_source(study)
    masks = read_dicom_seg(path, source)  # raises unless every T1ce slice is referenced
    assert set(masks) == {"WT", "TC", "ET"}
    assert masks["WT"].shape == (len(source), int(source[0].Rows), int(source[0].Columns))
    # on the T1ce grid, the predicted whole tumour lies on the study's true tumour
    truth = np.asarray(nib.load(truth_dir(study) / SEG_NAME).dataobj).transpose(2, 1, 0) > 0
    assert masks["WT"].any() and dice(masks["WT"], truth) > 0.6
    assert leftover_request_dirs(client) == []


def test_format_nifti_gives_the_labels_on_the_t1ce_grid(client: Any, studies: Path) -> None:
    study = studies / "STUDY_0002"
    response = client.post("/predict?format=nifti", files=as_upload(study_zip(study)))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    assert response.headers["content-disposition"].endswith('_t1ce.nii.gz"')
    image = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
    source = t1ce_source(study)
    assert image.shape == (int(source[0].Columns), int(source[0].Rows), len(source))
    assert set(np.unique(np.asarray(image.dataobj))) <= {0, 1, 2, 4}  # BraTS 2021 labels
    # the affine is the T1ce series' own: the first slice's corner where the header puts it (RAS)
    corner = image.affine @ [0, 0, 0, 1]
    lps = np.asarray(source[0].ImagePositionPatient, dtype=float)
    np.testing.assert_allclose(corner[:3], [-lps[0], -lps[1], lps[2]], atol=1e-3)


def test_the_viewer_shows_the_imported_study_and_offers_its_dicom_seg(
    client: Any, studies: Path, tmp_path: Path
) -> None:
    from tumorseg.dicom.seg import read_dicom_seg

    study = studies / "STUDY_0001"
    response = client.post("/predict?format=viewer", files=as_upload(study_zip(study)))
    assert response.status_code == 200, response.text
    summary = response.json()
    result_id = summary["result_id"]
    assert summary["kind"] == "3d" and summary["case_id"].startswith("study-")
    assert summary["layout"] == "brats2021" and summary["spacing_mm"] == [2.0, 2.0, 2.0]
    t1ce = _series(study, "t1ce")
    assert summary["dicom"]["t1ce_series_uid"] == t1ce.series_uid
    assert t1ce.description in summary["dicom"]["series"]["t1ce"]
    assert set(summary["dicom"]["series"]) == {"t1", "t1ce", "t2", "flair"}
    assert {"dicom_scan", "dicom_register", "dicom_brain_extraction", "dicom_write_seg"} <= set(
        summary["seconds"]
    )
    assert summary["dicom_seg_url"] == f"/cases/{result_id}/dicom-seg"
    assert summary["dicom_seg_file_name"] == f"{summary['case_id']}_seg.dcm"
    assert summary["slices"] == dict(zip(("sagittal", "coronal", "axial"), summary["shape"], strict=True))

    # the imported T1ce, on the imported grid, with the predicted mask over it
    index = summary["focus"]["axial"]
    drawn = client.get(
        f"/cases/{result_id}/slice", params={"plane": "axial", "index": index, "modality": "t1ce"}
    )
    assert drawn.status_code == 200, drawn.text
    payload = drawn.json()
    assert (payload["height"], payload["width"]) == (summary["shape"][1], summary["shape"][0])

    seg = client.get(summary["dicom_seg_url"])
    assert seg.status_code == 200 and seg.headers["content-type"] == "application/dicom"
    assert summary["dicom_seg_file_name"] in seg.headers["content-disposition"]
    path = tmp_path / "viewer_seg.dcm"
    path.write_bytes(seg.content)
    assert read_dicom_seg(path, t1ce_source(study))["WT"].any()

    nifti = client.get(summary["segmentation_url"])  # the imported grid's segmentation, as shown
    assert nifti.status_code == 200
    assert nib.Nifti1Image.from_bytes(gzip.decompress(nifti.content)).shape == tuple(summary["shape"])
    health = client.get("/health").json()["dicom"]
    assert health["loaded"] is True and health["brain_model"].endswith("brain.pt")
    assert leftover_request_dirs(client) == []


def test_a_ground_truth_on_the_t1ce_series_is_brought_onto_the_imported_case(
    client: Any, studies: Path, tmp_path: Path
) -> None:
    """A study's ground truth comes from the hospital on the T1ce series' grid (as the prediction's
    ``_t1ce.nii.gz``): it is brought onto the imported grid and scored; on the imported grid it is
    taken as it is; any other grid, or the T1ce size at another position, is one line."""
    from tumorseg.data.conventions import get_convention
    from tumorseg.dicom.study_synth import SEG_NAME, truth_dir

    study = studies / "STUDY_0002"
    shown = client.post("/predict?format=viewer", files=as_upload(study_zip(study)))
    assert shown.status_code == 200, shown.text
    url = f"/cases/{shown.json()['result_id']}/ground-truth"

    def upload(image: Any, name: str = "truth.nii.gz") -> Any:
        return client.post(url, files={"file": (name, gzip.compress(image.to_bytes()), "application/gzip")})

    # the prediction's own T1ce-geometry labels back as the ground truth: two resamplings apart
    own = client.post("/predict?format=nifti", files=as_upload(study_zip(study)))
    scored = upload(nib.Nifti1Image.from_bytes(gzip.decompress(own.content)))
    assert scored.status_code == 200, scored.text
    assert scored.json()["dice"]["WT"] > 0.9

    # the true labels (internal codes on the T1ce grid, written in BraTS 2021 codes as a site would)
    truth = nib.load(truth_dir(study) / SEG_NAME)
    codes = get_convention("brats2021").decode(np.asarray(truth.dataobj).astype(np.uint8))
    scored = upload(nib.Nifti1Image(codes, truth.affine))
    assert scored.status_code == 200, scored.text
    assert scored.json()["dice"]["WT"] > 0.5  # the oracle model on 2 mm imports of coarse series

    moved = truth.affine.copy()
    moved[:3, 3] += 5.0
    wrong_place = upload(nib.Nifti1Image(codes, moved))
    assert wrong_place.status_code == 422 and "not its position or orientation" in wrong_place.json()["error"]
    # the imported case's own segmentation (the viewer's download) is taken on its grid as it is
    shown_seg = client.get(shown.json()["segmentation_url"])
    case_grid = nib.Nifti1Image.from_bytes(gzip.decompress(shown_seg.content))
    scored = upload(case_grid)
    assert scored.status_code == 200, scored.text
    assert scored.json()["dice"]["WT"] == 1.0
    wrong_grid = upload(nib.Nifti1Image(codes[:-2], truth.affine))
    assert wrong_grid.status_code == 422
    assert "neither the T1ce series' grid" in wrong_grid.json()["error"]


# ---------------------------------------------------------------------------- refusals
def test_a_zip_of_two_studies_asks_for_one(client: Any, studies: Path) -> None:
    response = client.post(
        "/predict", files=as_upload(study_zip(studies / "STUDY_0001", studies / "STUDY_0002"))
    )
    assert_one_line_error(response, 400, "2 DICOM studies", "one study per request")
    assert leftover_request_dirs(client) == []


def test_a_study_without_flair_names_what_it_has(client: Any, studies: Path) -> None:
    study = studies / "STUDY_0002"
    flair = _series(study, "flair")
    response = client.post("/predict", files=as_upload(study_zip(study, leave_out=(flair.folder,))))
    assert_one_line_error(response, 422, "no FLAIR series", _series(study, "t1ce").description)
    assert leftover_request_dirs(client) == []


def test_a_series_with_missing_slices_is_named(client: Any, studies: Path) -> None:
    study = studies / "STUDY_0002"
    t1ce = _series(study, "t1ce")
    slices = sorted((study / t1ce.folder).glob("*.dcm"))
    hole = f"{t1ce.folder}/{slices[len(slices) // 2].name}"
    response = client.post("/predict", files=as_upload(study_zip(study, leave_out=(hole,))))
    assert_one_line_error(response, 422, f"series {t1ce.series_number}", "missing")
    assert leftover_request_dirs(client) == []


def test_what_a_dicom_zip_may_not_hold(client: Any, studies: Path) -> None:
    study = studies / "STUDY_0002"
    stray = client.post("/predict", files=as_upload(study_zip(study, extra={"STUDY_0002/notes.txt": b"hi"})))
    assert_one_line_error(stray, 400, "notes.txt", "not a DICOM file")
    escaping = client.post("/predict", files=as_upload(study_zip(study, extra={"/etc/IM9999.dcm": b"x"})))
    assert_one_line_error(escaping, 400, "absolute path")
    climbing = client.post("/predict", files=as_upload(study_zip(study, extra={"S1/../../IM9999.dcm": b"x"})))
    assert_one_line_error(climbing, 400, "points outside the archive")
    junk = client.post("/predict", files=as_upload(zip_bytes({"IM0001": b"not dicom", "IM0002.dcm": b"x"})))
    assert_one_line_error(junk, 400, "holds no DICOM file")
    one_file = sorted((study / _series(study, "t1ce").folder).glob("*.dcm"))[0]
    loose = client.post(
        "/predict", files=[("files", (one_file.name, one_file.read_bytes(), "application/dicom"))]
    )
    assert_one_line_error(loose, 400, "one .zip")
    assert leftover_request_dirs(client) == []


def test_dicom_seg_is_only_for_dicom_studies(client: Any, tmp_path: Path) -> None:
    case = fx.write_brats_case(tmp_path / "nifti", "BraTS2021_00001", seed=1)
    members = {p.name: p.read_bytes() for p in sorted(case.glob("*.nii.gz")) if "_seg" not in p.name}
    response = client.post("/predict?format=dicom-seg", files=as_upload(zip_bytes(members), "case.zip"))
    assert_one_line_error(response, 400, "dicom-seg", "not of a NIfTI case")
    kept = client.post("/predict?format=viewer", files=as_upload(zip_bytes(members), "case.zip"))
    assert kept.status_code == 200, kept.text
    assert "dicom_seg_url" not in kept.json()
    result_id = kept.json()["result_id"]
    assert_one_line_error(client.get(f"/cases/{result_id}/dicom-seg"), 404, "not a DICOM study")
    assert leftover_request_dirs(client) == []


def test_without_a_brain_model_a_study_gets_503_saying_what_to_do(
    make_client: Any, studies: Path, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    missing = tmp_path / "nowhere" / "brain.pt"
    settings = dicom_settings(tmp_path, str(missing))
    with TestClient(
        create_app(settings, loaded_model=oracle_model()), raise_server_exceptions=False
    ) as local:
        response = local.post("/predict", files=as_upload(study_zip(studies / "STUDY_0002")))
        assert_one_line_error(response, 503, str(missing), "tumorseg train-brain", "dicom.brain.model")
        assert local.get("/health").json()["dicom"]["loaded"] is False
        assert leftover_request_dirs(local) == []


def test_a_study_with_more_files_than_the_cap_is_413(make_client: Any, studies: Path) -> None:
    client = make_client(max_dicom_files=50)
    response = client.post("/predict", files=as_upload(study_zip(studies / "STUDY_0002")))
    assert_one_line_error(response, 413, "serve.max_dicom_files")
    assert leftover_request_dirs(client) == []


def test_stage_upload_flattens_a_dicom_zip_whatever_its_folder_names(studies: Path, tmp_path: Path) -> None:
    from tumorseg.serving.uploads import (
        DICOM_STUDY_DIR,
        UploadLimits,
        UploadRejected,
        is_dicom_study,
        stage_upload,
    )

    study = studies / "STUDY_0002"
    files = sorted(study.rglob("*.dcm"))
    members = {f"Patient X/MR Brain (1)/{p.parent.name} T1 +C/{p.name}": p.read_bytes() for p in files}
    members["Patient X/DICOMDIR"] = b"an index the import does not need"
    limits = UploadLimits(
        max_files=6, max_members=8, max_uncompressed_bytes=200 << 20, max_dicom_files=len(files) + 5
    )
    (tmp_path / "work").mkdir()
    folder = stage_upload([("study.zip", io.BytesIO(zip_bytes(members)))], tmp_path / "work", limits)
    assert folder == tmp_path / "work" / DICOM_STUDY_DIR and is_dicom_study(folder)
    stored = sorted(folder.iterdir())
    assert [p.name for p in stored] == [f"{n:05d}.dcm" for n in range(1, len(files) + 1)]
    assert sorted(p.read_bytes() for p in stored) == sorted(p.read_bytes() for p in files)
    # a NIfTI case zip keeps its safe-name rule
    (tmp_path / "work2").mkdir()
    with pytest.raises(UploadRejected, match="has characters other than"):
        stage_upload(
            [("c.zip", io.BytesIO(zip_bytes({"my case/x_t1.nii.gz": b"x"})))], tmp_path / "work2", limits
        )


# ---------------------------------------------------------------------------- the viewer page
@pytest.mark.browser
def test_the_viewer_page_uploads_a_study_zip_and_offers_its_dicom_seg(
    brain_checkpoint: Path, studies: Path, tmp_path: Path
) -> None:
    browser_tests = load_test_module("serving/test_viewer_browser.py", "dicom_viewer_browser")
    if not browser_tests.CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    import httpx
    from playwright.sync_api import sync_playwright

    study = studies / "STUDY_0001"
    archive = tmp_path / "study.zip"
    archive.write_bytes(study_zip(study))
    app = create_app(
        dicom_settings(tmp_path, str(brain_checkpoint)), loaded_model=oracle_model(study_oracle())
    )
    server = browser_tests.serve_in_thread(app)
    url = next(server)
    problems: list[str] = []
    try:
        with sync_playwright() as playwright:
            browser = browser_tests.launch_chromium(playwright)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
                page.on("console", lambda message: message.type == "error" and problems.append(message.text))
                page.goto(url + "/")
                page.wait_for_function("document.querySelector('#model').textContent.includes('oracle')")
                page.set_input_files("#files", str(archive))
                page.click("#upload-button")
                page.wait_for_selector('#viewer[data-state="ready"]', timeout=120_000)
                assert int(page.get_attribute("#viewer", "data-overlay-pixels")) > 0
                assert "DICOM-SEG" in page.inner_text("#status")
                info = page.inner_text("#case-info")
                assert info.startswith("study-") and "From DICOM: T1CE series" in info
                assert _series(study, "t1ce").description in info
                assert not page.is_hidden("#dicom-seg")
                href = page.get_attribute("#download-dicom-seg", "href")
                assert page.get_attribute("#download-dicom-seg", "download").endswith("_seg.dcm")
                seg = httpx.get(url + href, timeout=30)
                assert seg.status_code == 200 and seg.headers["content-type"] == "application/dicom"
                assert "imported 2 mm grid" in page.inner_text("#download")
                page.select_option("#modality", "t1ce")
                page.wait_for_selector('#viewer[data-state="ready"]')
            finally:
                browser.close()
    finally:
        next(server, None)
    assert problems == [], problems
