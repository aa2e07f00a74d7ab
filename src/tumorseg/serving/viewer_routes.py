"""The viewer's endpoints on kept predictions: ``GET /cases/{id}``, its slices and segmentation (and a
DICOM study's DICOM-SEG), and ``POST /cases/{id}/ground-truth`` (a NIfTI mask for a 3-D case, a mask
image or Figshare .mat for a 2-D one); a result the store no longer holds is 404 (:class:`CaseNotFound`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

# FastAPI resolves endpoint annotations from this module's globals, so its names are imported here.
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from tumorseg.data.readers import IMAGE, IMAGE_SUFFIXES, name_dims
from tumorseg.serving.auth import AUDIT_KEY, hash_uploads
from tumorseg.serving.dicom_study import DICOM_SEG_MEDIA_TYPE
from tumorseg.serving.service import score_mask, score_planar_mask, service_of
from tumorseg.serving.uploads import (
    UploadRejected,
    in_request_thread,
    is_nifti_name,
    remove_tree,
    safe_file_name,
)
from tumorseg.serving.viewer import DisplayCase, PlanarDisplay

Modality = Literal["t1", "t1ce", "t2", "flair"]
PlaneName = Literal["axial", "coronal", "sagittal"]


class CaseNotFound(UploadRejected):
    """A viewer request for a prediction the store no longer holds (HTTP 404)."""

    status_code = 404


def viewer_summary(result_id: str, display: DisplayCase | PlanarDisplay) -> dict[str, Any]:
    """What the viewer page needs of a kept prediction: its summary, slice counts, focus and download URLs
    (``dicom_seg_url`` only for a DICOM study)."""
    summary = dict(display.summary)
    if isinstance(display, DisplayCase):
        summary["dice"] = {k: round(v, 4) for k, v in display.dice.items()} if display.dice else None
        spacing = list(display.spacing)
    else:
        summary.update(display.scores or {})
        spacing = [display.pixel_mm, display.pixel_mm]
    answer = {
        **summary,
        "result_id": result_id,
        "slices": display.slices(),
        "focus": display.focus(),
        "display_spacing_mm": spacing,
        "segmentation_url": f"/cases/{result_id}/segmentation",
        "file_name": display.file_name,
    }
    if isinstance(display, DisplayCase) and display.dicom_seg is not None:
        answer["dicom_seg_url"] = f"/cases/{result_id}/dicom-seg"
        answer["dicom_seg_file_name"] = display.dicom_seg_name
    return answer


def display_of(request: Request, result_id: str) -> DisplayCase | PlanarDisplay:
    """The kept prediction ``result_id``; :class:`CaseNotFound` when unknown or expired."""
    display = service_of(request).store.get(result_id)
    if display is None:
        raise CaseNotFound(
            f"case {result_id!r}: unknown or expired (kept serve.result_ttl_s); predict it again"
        )
    return display


def add_case_routes(app: FastAPI) -> None:
    """``GET /cases/{id}``, ``/cases/{id}/slice``, ``/cases/{id}/segmentation`` and
    ``/cases/{id}/dicom-seg``: what the page draws and offers for download."""

    @app.get("/cases/{result_id}", summary="A kept prediction")
    async def case_summary(request: Request, result_id: str) -> dict[str, Any]:
        return viewer_summary(result_id, display_of(request, result_id))

    @app.get("/cases/{result_id}/slice", summary="One slice of a kept prediction, for the viewer")
    async def case_slice(
        request: Request,
        result_id: str,
        index: Annotated[int, Query(ge=0, description="slice number along the plane's axis")],
        plane: PlaneName = "axial",
        modality: Modality = "flair",
    ) -> dict[str, Any]:
        display = display_of(request, result_id)
        count = display.slices().get(plane, 0)
        if count == 0:
            raise UploadRejected(f"plane: case {result_id!r} is a 2-D image; it has only the axial plane")
        if index >= count:
            raise UploadRejected(f"index: {index} is past the last {plane} slice ({count - 1})")
        return display.slice_payload(plane, index, modality)

    @app.get("/cases/{result_id}/segmentation", summary="Download a kept segmentation")
    async def case_segmentation(request: Request, result_id: str) -> Response:
        display = display_of(request, result_id)
        return Response(
            display.segmentation,
            media_type=display.media_type,
            headers={"Content-Disposition": f'attachment; filename="{display.file_name}"'},
        )

    @app.get("/cases/{result_id}/dicom-seg", summary="Download a kept DICOM study's DICOM-SEG")
    async def case_dicom_seg(request: Request, result_id: str) -> Response:
        """The DICOM Segmentation of a kept DICOM study, referencing its T1ce series."""
        display = display_of(request, result_id)
        if not isinstance(display, DisplayCase) or display.dicom_seg is None:
            raise CaseNotFound(
                f"case {result_id!r}: not a DICOM study, so it has no DICOM-SEG; download its segmentation "
                f"(/cases/{result_id}/segmentation)"
            )
        return Response(
            display.dicom_seg,
            media_type=DICOM_SEG_MEDIA_TYPE,
            headers={"Content-Disposition": f'attachment; filename="{display.dicom_seg_name}"'},
        )


GROUND_TRUTH_HELP = (
    "the case's ground-truth mask: .nii or .nii.gz for a 3-D case; for a 2-D image a mask image at its "
    "own size (.png, .jpg, .tif, .bmp; nonzero or, 8-bit 0/255, above 127 is tumour) or its Figshare .mat"
)


def add_ground_truth_route(app: FastAPI) -> None:
    """``POST /cases/{id}/ground-truth``: score a kept prediction against an uploaded mask."""

    @app.post("/cases/{result_id}/ground-truth", summary="Score a kept prediction against a mask")
    async def case_ground_truth(
        request: Request,
        result_id: str,
        file: Annotated[UploadFile, File(description=GROUND_TRUTH_HELP)],
    ) -> dict[str, Any]:
        """3-D: Dice per train region (WT, TC, ET for glioma) against a mask in the case's geometry and
        label convention. 2-D: Dice, IoU and HD95 (pixels) against a mask at the image's own size."""
        service = service_of(request)
        display = display_of(request, result_id)
        name = safe_file_name(file.filename, "file")
        check_mask_name(result_id, display, name)
        audit = request.scope.get(AUDIT_KEY)
        if audit is not None:
            audit["files"] = await run_in_threadpool(hash_uploads, [(name, file.file)])
        workdir = service.request_dir()
        score = score_planar_mask if isinstance(display, PlanarDisplay) else score_mask
        try:
            reference, scores = await in_request_thread(
                workdir, score, service, display, file.file, name, workdir
            )
        finally:
            remove_tree(workdir)
        # kept only now: a request cancelled by serve.request_timeout_s (504) leaves the case as it was
        display.keep_reference(reference, scores)
        return {
            "result_id": result_id,
            **(scores if isinstance(display, PlanarDisplay) else {"dice": scores}),
        }


def check_mask_name(result_id: str, display: DisplayCase | PlanarDisplay, name: str) -> None:
    """Refuse (:class:`UploadRejected`) a mask file of the other dimensionality or an unknown kind."""
    if isinstance(display, DisplayCase):
        if name_dims(name) == IMAGE:
            raise UploadRejected(
                f"{name}: a 2-D image, but case {result_id!r} is a 3-D case; upload its segmentation "
                "mask as NIfTI (.nii, .nii.gz)"
            )
        if not is_nifti_name(name):
            raise UploadRejected(
                f"{name}: not a NIfTI file (.nii, .nii.gz); upload the case's segmentation mask"
            )
        return
    if is_nifti_name(name):
        raise UploadRejected(
            f"{name}: a NIfTI volume, but case {result_id!r} is a 2-D image; upload its mask as .png "
            "(.jpg, .tif, .bmp) at the image's size, or its Figshare .mat with cjdata.tumorMask"
        )
    if name_dims(name) != IMAGE:
        raise UploadRejected(
            f"{name}: not a 2-D mask ({', '.join(IMAGE_SUFFIXES)}); upload the image's tumour mask as .png "
            "at the image's size, or its Figshare .mat with cjdata.tumorMask"
        )
