"""``POST /predict`` (one 3-D case, DICOM study or 2-D image) and the demo cases (``GET /demo``,
``POST /demo/{id}``).

Uploads are staged on a threadpool thread and predicted on the service's bounded pool; whoever holds the
request's folder removes it: the pool job once started, the route when the job never ran."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

# FastAPI resolves endpoint annotations from this module's globals, so its names are imported here.
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from tumorseg.data.readers import IMAGE, VOLUME, input_dims
from tumorseg.serving.auth import AUDIT_KEY, hash_uploads
from tumorseg.serving.error_handlers import error_response
from tumorseg.serving.service import Service, service_of
from tumorseg.serving.uploads import (
    UploadRejected,
    in_request_thread,
    is_dicom_study,
    remove_tree,
    safe_file_name,
    stage_upload,
    upload_dims,
)
from tumorseg.serving.viewer import DisplayCase, PlanarDisplay
from tumorseg.serving.viewer_routes import viewer_summary

if TYPE_CHECKING:
    import numpy as np

OutputFormat = Literal["nifti", "png", "json", "viewer", "dicom-seg"]
FILES_HELP = (
    "the modality files of one 3-D case (named as in any supported layout) or one .zip of its folder; "
    "or one .zip of a DICOM study (its T1, T1ce, T2 and FLAIR series; other series are left out); "
    "or one 2-D image (.mat, .png, .jpg, .jpeg, .tif, .tiff, .bmp)"
)
FORMAT_HELP = (
    "nifti (3-D default): the .nii.gz segmentation (for a DICOM study on the T1ce series' grid); "
    "dicom-seg (DICOM study default): the DICOM Segmentation referencing the study's T1ce series; "
    "png (2-D default): the 0/255 mask at the image's size; "
    "json: volumes per region (3-D) or tumour probability, yes/no, type and area (2-D); "
    "viewer: also keep it for /cases"
)
DICOM_SEG_ONLY = (
    "format: dicom-seg is the DICOM Segmentation of a DICOM study, not of {what}; upload the study as one "
    ".zip of its DICOM files, or ask for {others}"
)
PIXEL_SIZE_HELP = "2-D only: pixel side in mm, to report the tumour area in mm² (the files do not store it)"


async def run_prediction(
    service: Service,
    workdir: Path,
    output: OutputFormat | None,
    *,
    source: Path | None = None,
    stage: Callable[[], Path] | None = None,
    pixel_size_mm: float | None = None,
    reference: np.ndarray | None = None,
    audit: dict[str, Any] | None = None,
) -> Response:
    """Predict ``source`` (or what ``stage`` writes, on a threadpool thread) on the pool; answer in ``output``
    (None: the input's default, known once staged); the model and what it found go to the request's
    ``audit`` line. ``reference``: a 2-D image's ground truth its file does not hold."""
    future: Future[Any] | None = None
    try:
        if stage is not None:
            source = await in_request_thread(workdir, stage)
        assert source is not None
        output = _staged_output(source, output)
        keep = output == "viewer"
        future = service.pool.submit(service.run_job, source, workdir, keep, pixel_size_mm, reference)
        result = await asyncio.wrap_future(future)
    finally:
        # A job that never started (staging failed, busy, or cancelled by the timeout) leaves its folder to us.
        if future is None or future.cancel():
            remove_tree(workdir)
    if audit is not None:
        note_result(audit, result["summary"], service)
    return _answer(service, result, output)


def _staged_output(source: Path, output: OutputFormat | None) -> OutputFormat:
    """The answer's format for a staged ``source``: ``output``, else the input's default (``dicom-seg``
    for a DICOM study, ``png`` for a 2-D image, ``nifti`` for a 3-D case); a DICOM-SEG only of a study."""
    dicom = is_dicom_study(source)
    if output == "dicom-seg" and not dicom:
        if input_dims(source) == IMAGE:
            raise UploadRejected(DICOM_SEG_ONLY.format(what="a 2-D image", others="png, json or viewer"))
        raise UploadRejected(DICOM_SEG_ONLY.format(what="a NIfTI case", others="nifti, json or viewer"))
    if output is not None:
        return output
    if dicom:
        return "dicom-seg"
    return "png" if input_dims(source) == IMAGE else "nifti"


def _answer(service: Service, result: dict[str, Any], output: OutputFormat) -> Response:
    files = result.get("files") or {
        result["format"]: (result["segmentation"], result["file_name"], result["media_type"])
    }
    if output in files:
        data, file_name, media_type = files[output]
        headers = {"Content-Disposition": f'attachment; filename="{file_name}"', **result["headers"]}
        return Response(data, media_type=media_type, headers=headers)
    if output == "viewer":
        display: DisplayCase | PlanarDisplay = result["display"]
        return JSONResponse(viewer_summary(service.store.add(display), display))
    return JSONResponse(result["summary"])


AUDITED_2D = ("probability", "label", "tumour_type", "tumour_area_px", "tumour_area_mm2")
"""What a 2-D prediction's audit line keeps (3-D: ``volumes_ml``); never image data."""


def note_result(audit: dict[str, Any], summary: dict[str, Any], service: Service) -> None:
    """The serving model and the predicted volumes (3-D) or detection (2-D) for the audit line."""
    info = summary.get("model") or service.model_info
    audit["model"] = {key: info.get(key) for key in ("name", "version", "alias")}
    if "volumes_ml" in summary:
        audit["volumes_ml"] = summary["volumes_ml"]
        if summary.get("drift") is not None:
            audit["drift"] = summary["drift"]["flagged"]
    else:
        audit["result"] = {key: summary.get(key) for key in AUDITED_2D}
        if summary.get("drift") is not None:
            audit["drift"] = summary["drift"]["flagged"]


def _check_output(dims: int, output: OutputFormat | None, name: str) -> None:
    """Refuse the file format of the other dimensionality, from the names alone (whether a zip holds a
    DICOM study is known once it is unzipped: :func:`_staged_output`)."""
    if dims == IMAGE and output in ("nifti", "dicom-seg"):
        raise UploadRejected(
            f"format: {output} is for 3-D cases; {name} is a 2-D image: ask for png (the mask), json or "
            "viewer"
        )
    if dims == VOLUME and output == "png":
        raise UploadRejected(
            "format: png is the mask of a 2-D image; a 3-D case gives nifti (default), json or viewer"
        )


def add_predict_route(app: FastAPI) -> None:
    """``POST /predict``: one 3-D case (its modality files or one .zip) or one 2-D image."""

    @app.post(
        "/predict",
        summary="Segment one case",
        responses={
            200: {
                "content": {
                    "application/gzip": {},
                    "application/dicom": {},
                    "image/png": {},
                    "application/json": {},
                }
            }
        },
    )
    async def predict(
        request: Request,
        files: Annotated[list[UploadFile], File(description=FILES_HELP)],
        format: Annotated[OutputFormat | None, Query(description=FORMAT_HELP)] = None,
        pixel_size_mm: Annotated[float | None, Query(gt=0, le=100, description=PIXEL_SIZE_HELP)] = None,
    ) -> Response:
        """The segmentation in the input's geometry and label convention (or its volumes as JSON).

        A zipped DICOM study is imported first (series picked, co-registered to T1ce, brain extracted, 1 mm)
        and answered as a DICOM Segmentation referencing its T1ce series (or, as nifti, the labels on the
        T1ce grid; as viewer, the imported case with the DICOM-SEG to download).

        One 2-D image instead gives its tumour mask at the image's own size (or the detection as JSON).
        """
        service = service_of(request)
        names = [safe_file_name(upload.filename) for upload in files]
        dims = upload_dims(names)
        output = format
        _check_output(dims, output, names[0])
        if dims == IMAGE:
            service.planar.require()  # 503 before reading the upload when there is no 2-D model
        uploads = [(upload.filename, upload.file) for upload in files]
        audit = request.scope.get(AUDIT_KEY)
        if audit is not None:
            audit["files"] = await run_in_threadpool(hash_uploads, uploads)
        # Made after the last await before run_prediction, whose finally removes it: a timeout that
        # cancels the request while the uploads are hashed leaves no folder behind.
        workdir = service.request_dir()
        stage = partial(stage_upload, uploads, workdir, service.limits)
        return await run_prediction(
            service, workdir, output, stage=stage, pixel_size_mm=pixel_size_mm, audit=audit
        )


def add_demo_routes(app: FastAPI) -> None:
    """``GET /demo`` (the synthetic 3-D cases and 2-D images, once generated) and ``POST /demo/{case_id}``."""

    @app.get("/demo", summary="Demo cases")
    async def demo_list(request: Request) -> dict[str, Any]:
        service = service_of(request)
        demo, planar = service.demo, service.demo_2d
        return {
            "ready": demo.ready.is_set(),
            "cases": demo.case_ids,
            "error": demo.error,
            "ready_2d": planar.ready.is_set(),
            "cases_2d": planar.case_ids,
            "error_2d": planar.error,
        }

    @app.post("/demo/{case_id}", summary="Segment a demo case")
    async def demo_predict(
        request: Request,
        case_id: str,
        format: Annotated[OutputFormat, Query(description=FORMAT_HELP)] = "viewer",
    ) -> Response:
        """A 3-D demo case, or a 2-D demo image (with the 2-D model), scored against its ground truth."""
        service = service_of(request)
        demo = service.demo_2d if case_id in service.demo_2d.case_ids else service.demo
        if case_id not in demo.case_ids:
            return error_response(404, f"demo case {case_id!r}: unknown; {_demo_ids(service)}")
        dims = IMAGE if demo is service.demo_2d else VOLUME
        _check_output(dims, format, case_id)
        if dims == IMAGE:
            service.planar.require()
        audit = request.scope.get(AUDIT_KEY)
        return await run_prediction(
            service,
            service.request_dir(),
            format,
            source=demo.path(case_id),
            reference=demo.reference(case_id),
            audit=audit,
        )


def _demo_ids(service: Service) -> str:
    """What the demo cases are, for a 404."""
    if not (service.demo.ready.is_set() and service.demo_2d.ready.is_set()):
        return "demo cases are still being generated"
    return f"demo cases are one of {service.demo.case_ids}, 2-D images one of {service.demo_2d.case_ids}"
