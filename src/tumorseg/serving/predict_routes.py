"""``POST /predict`` and the demo cases (``GET /demo``, ``POST /demo/{case_id}``).

Uploads are staged on a threadpool thread (the event loop never reads files) and predicted on the
service's bounded pool. Whoever holds the request's folder removes it: the pool job once it has
started, the route when the job never ran (pool full, or cancelled by the request time limit).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from pathlib import Path
from typing import Annotated, Any, Literal

# FastAPI resolves endpoint annotations from this module's globals, so its names are imported here.
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from tumorseg.data.readers import IMAGE, name_dims
from tumorseg.serving.error_handlers import error_response
from tumorseg.serving.service import Service, service_of
from tumorseg.serving.uploads import UploadRejected, remove_tree, safe_file_name, stage_upload
from tumorseg.serving.viewer import DisplayCase, PlanarDisplay
from tumorseg.serving.viewer_routes import viewer_summary

OutputFormat = Literal["nifti", "png", "json", "viewer"]
FILES_HELP = (
    "the modality files of one 3-D case (named as in any supported layout) or one .zip of its folder; "
    "or one 2-D image (.mat, .png, .jpg, .jpeg, .tif, .tiff, .bmp)"
)
FORMAT_HELP = (
    "nifti (3-D default): the .nii.gz segmentation; png (2-D default): the 0/255 mask at the image's size; "
    "json: volumes per region (3-D) or tumour probability, yes/no, type and area (2-D); "
    "viewer: also keep it for /cases"
)
PIXEL_SIZE_HELP = "2-D only: pixel side in mm, to report the tumour area in mm² (the files do not store it)"


async def run_prediction(
    service: Service, folder: Path, workdir: Path, output: OutputFormat, remove_workdir: bool
) -> Response:
    """Predict the 3-D case in ``folder`` on the pool and answer in ``output``'s format."""
    future: Future[Any] | None = None
    try:
        future = service.pool.submit(service.run_job, folder, workdir, output == "viewer", remove_workdir)
        result = await asyncio.wrap_future(future)
    finally:
        # A job that never started (busy, or cancelled by the timeout) leaves its folder to us.
        if remove_workdir and (future is None or future.cancel()):
            remove_tree(workdir)
    summary = result["summary"]
    if output == "nifti":
        return Response(
            result["segmentation"],
            media_type="application/gzip",
            headers={
                "Content-Disposition": f'attachment; filename="{result["file_name"]}"',
                "X-Tumorseg-Volumes-Ml": ",".join(f"{k}={v}" for k, v in summary["volumes_ml"].items()),
            },
        )
    if output == "viewer":
        display: DisplayCase = result["display"]
        return JSONResponse(viewer_summary(service.store.add(display), display))
    return JSONResponse(summary)


async def run_planar_prediction(
    service: Service, name: str, stream: Any, output: OutputFormat, pixel_size_mm: float | None
) -> Response:
    """Stage and predict one 2-D image with the 2-D model; answer the mask PNG, JSON or a viewer summary."""
    if output == "nifti":
        raise UploadRejected(
            f"format: nifti is for 3-D cases; {name} is a 2-D image: ask for png (the mask), json or viewer"
        )
    service.planar.require()  # 503 before reading the upload when there is no 2-D model
    workdir = service.request_dir()
    future: Future[Any] | None = None
    try:
        path = await run_in_threadpool(service.stage_planar, name, stream, workdir)
        future = service.pool.submit(service.run_planar_job, path, workdir, output == "viewer", pixel_size_mm)
        result = await asyncio.wrap_future(future)
    finally:
        if future is None or future.cancel():  # the job never ran: its folder is ours to remove
            remove_tree(workdir)
    summary = result["summary"]
    if output == "png":
        headers = {
            "Content-Disposition": f'attachment; filename="{result["file_name"]}"',
            "X-Tumorseg-Probability": str(summary["probability"]),
            "X-Tumorseg-Label": summary["label"],
            "X-Tumorseg-Area-Px": str(summary["tumour_area_px"]),
        }
        if summary["tumour_type"]:
            headers["X-Tumorseg-Tumour-Type"] = summary["tumour_type"]
        return Response(result["mask_png"], media_type="image/png", headers=headers)
    if output == "viewer":
        display: PlanarDisplay = result["display"]
        return JSONResponse(viewer_summary(service.store.add(display), display))
    return JSONResponse(summary)


def add_predict_route(app: FastAPI) -> None:
    """``POST /predict``: one 3-D case (its modality files or one .zip) or one 2-D image."""

    @app.post(
        "/predict",
        summary="Segment one case",
        responses={200: {"content": {"application/gzip": {}, "application/json": {}}}},
    )
    async def predict(
        request: Request,
        files: Annotated[list[UploadFile], File(description=FILES_HELP)],
        format: Annotated[OutputFormat | None, Query(description=FORMAT_HELP)] = None,
        pixel_size_mm: Annotated[float | None, Query(gt=0, le=100, description=PIXEL_SIZE_HELP)] = None,
    ) -> Response:
        """The segmentation in the input's geometry and label convention (or its volumes as JSON).

        One 2-D image instead gives its tumour mask at the image's own size (or the detection as JSON).
        """
        service = service_of(request)
        names = [safe_file_name(upload.filename) for upload in files]
        planar = [name for name in names if name_dims(name) == IMAGE]
        if planar:
            if len(files) != 1:
                raise UploadRejected(
                    f"{planar[0]}: a 2-D image comes alone; upload one image per request ({len(files)} files sent)"
                )
            return await run_planar_prediction(
                service, names[0], files[0].file, format or "png", pixel_size_mm
            )
        if format == "png":
            raise UploadRejected(
                "format: png is the mask of a 2-D image; a 3-D case gives nifti (default), json or viewer"
            )
        format = format or "nifti"
        workdir = service.request_dir()
        try:
            uploads = [(upload.filename, upload.file) for upload in files]
            folder = await run_in_threadpool(stage_upload, uploads, workdir, service.limits)
        except BaseException:
            remove_tree(workdir)
            raise
        return await run_prediction(service, folder, workdir, format, remove_workdir=True)


def add_demo_routes(app: FastAPI) -> None:
    """``GET /demo`` (the synthetic cases, once generated) and ``POST /demo/{case_id}`` (predict one)."""

    @app.get("/demo", summary="Demo cases")
    async def demo_list(request: Request) -> dict[str, Any]:
        demo = service_of(request).demo
        return {"ready": demo.ready.is_set(), "cases": demo.case_ids, "error": demo.error}

    @app.post("/demo/{case_id}", summary="Segment a demo case")
    async def demo_predict(
        request: Request,
        case_id: str,
        format: Annotated[OutputFormat, Query(description=FORMAT_HELP)] = "viewer",
    ) -> Response:
        service = service_of(request)
        demo = service.demo
        if case_id not in demo.case_ids:
            state = "still being generated" if not demo.ready.is_set() else f"one of {demo.case_ids}"
            return error_response(404, f"demo case {case_id!r}: unknown; demo cases are {state}")
        workdir = service.request_dir()
        return await run_prediction(service, demo.folder / case_id, workdir, format, remove_workdir=True)
