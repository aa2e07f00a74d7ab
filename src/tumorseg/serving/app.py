"""The HTTP service: ``POST /predict`` for one case, a browser viewer, health and OpenAPI docs.

``create_app(settings)`` builds the FastAPI application; nothing happens at import time. The model
is loaded once, when the application starts (FastAPI lifespan), with
:func:`tumorseg.registry.loading.load_model` (checkpoint, MLflow model folder, ``models:/`` or
``runs:/`` URI, ONNX edge variants alike), and wrapped in the same
:class:`~tumorseg.models.predictor.SegmentationPredictor` ``tumorseg predict`` uses, so a served
segmentation is byte-for-byte the CLI's: same preprocessing, sliding window, post-processing, the
input's geometry and label convention.

A 2-D model (``serve.model_2d``, ``--model-2d``; :mod:`tumorseg.serving.planar`) is loaded too
when it can be; without it the service runs for 3-D cases and 2-D uploads get 503.

Endpoints:

- ``GET /health``: the models (name, version, alias, origin, and the 3-D model's ``label_set``: its
  train regions with internal codes, caption and overlay colour, which the viewer draws; ``model_2d``
  says why it is missing) and the queue.
- ``POST /predict``: multipart field ``files``: the modality files of one 3-D case or one ``.zip``;
  ``?format=nifti`` (default) returns ``<case_id>.nii.gz``; ``json`` the tumour volumes per train
  region of the model's label set (WT, TC, ET for glioma; RC or CC too for the 2024 label sets);
  ``viewer`` also keeps the case for the viewer and returns its id. Or one 2-D image (``.mat``,
  ``.png``, ``.jpg``/``.jpeg``, ``.tif``, ``.bmp``): ``?format=png`` (default) returns
  ``<case_id>_mask.png`` (0/255, the input's size); ``json`` the tumour probability, yes/no, type
  and area (``?pixel_size_mm=`` adds mm²); ``viewer`` keeps it for the viewer.
- ``GET /demo``, ``POST /demo/{case_id}``: synthetic demo cases generated at start-up.
- ``GET /cases/{id}``, ``GET /cases/{id}/slice``, ``GET /cases/{id}/segmentation``,
  ``POST /cases/{id}/ground-truth``: what the viewer page (``GET /``) draws.
- ``/docs``: OpenAPI.

Every error is JSON ``{"error": "<one line naming the file or field and what to do>"}``: upload
problems are 400 or 413, unreadable cases 422, a full queue 503, a request over the time limit
504, a 2-D upload without a 2-D model 503. Uploads go into a private per-request folder (mode 0700)
that is removed when the request ends, and only NIfTI, ``dataset.json``, zip archives, MATLAB
slices and images are read (nothing is unpickled).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

# FastAPI resolves endpoint annotations from this module's globals, so its names are imported here;
# this module is only imported by ``tumorseg serve`` and the tests, never at CLI parse time.
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tumorseg.errors import DataError, TumorsegError
from tumorseg.serving.config import ServeConfig
from tumorseg.serving.limits import InferencePool, PoolBusy, RequestLimits
from tumorseg.serving.planar import (
    PlanarSlot,
    check_planar_file,
    is_planar_name,
    load_planar_slot,
    predict_planar_file,
    stage_planar_upload,
)
from tumorseg.serving.uploads import (
    ByteBudget,
    UploadLimits,
    UploadRejected,
    copy_inflated,
    is_nifti_name,
    remove_tree,
    safe_file_name,
    stage_upload,
)
from tumorseg.serving.viewer import (
    DisplayCase,
    PlanarDisplay,
    ResultStore,
    build_display_case,
    build_planar_display,
    label_set_info,
)

log = logging.getLogger(__name__)

OutputFormat = Literal["nifti", "png", "json", "viewer"]
Modality = Literal["t1", "t1ce", "t2", "flair"]
PlaneName = Literal["axial", "coronal", "sagittal"]
DEMO_SEED = 7
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


class CaseNotFound(UploadRejected):
    """A viewer request for a prediction the store no longer holds (HTTP 404)."""

    status_code = 404


@dataclass(frozen=True)
class ServeSettings:
    """Everything the application needs, resolved from params.yaml by the CLI (or built by tests).

    Attributes:
        serve: the ``serve`` section (limits, pool, demo cases).
        predict: the ``predict`` section (TTA, component removal, device).
        model_uri: the model to load at start-up.
        tracking_uri: MLflow store for ``models:/`` and ``runs:/`` URIs.
        model_2d: the optional 2-D model (``serve.model_2d``); None: no 2-D model.
    """

    serve: ServeConfig
    predict: Any
    model_uri: str
    tracking_uri: str
    model_2d: str | None = None

    @classmethod
    def from_params(
        cls, params: dict[str, Any], *, model_uri: str | None = None, source: str = "params.yaml"
    ) -> ServeSettings:
        """``serve``, ``predict``, ``paths`` and ``mlflow`` sections -> settings.

        The model is ``model_uri``, else ``serve.model``, else ``predict.model``; the tracking store
        is resolved as ``tumorseg predict`` does (``mlflow.tracking_uri``, ``$MLFLOW_TRACKING_URI``,
        else ``<paths.mlruns>/mlflow.db``).
        """
        from tumorseg.config import section
        from tumorseg.models.predictor import PredictConfig
        from tumorseg.tracking import params_tracking_uri

        serve: ServeConfig = section("serve", params, source=source)
        predict: PredictConfig = section("predict", params, source=source)
        uri = model_uri or serve.model or predict.model
        tracking = params_tracking_uri(params, source=source)
        return cls(
            serve=serve,
            predict=predict,
            model_uri=uri,
            tracking_uri=tracking,
            model_2d=serve.model_2d or None,
        )


def describe_model(loaded: Any) -> dict[str, Any]:
    """Name, version, alias, origin and label set of a :class:`~tumorseg.registry.loading.LoadedModel`.

    ``label_set`` is :func:`~tumorseg.serving.viewer.label_set_info` of the model's label set: the
    regions the volumes and Dice are reported for, and what the viewer draws.
    """
    from tumorseg.data.conventions import get_label_set
    from tumorseg.registry.loading import MODELS_URI

    match = MODELS_URI.match(loaded.uri)
    version = loaded.version
    if match:
        name, alias = match["name"], match["alias"]
    else:
        name, alias = Path(loaded.uri.rstrip("/")).name or loaded.uri, None
        registered = _registered_meta(Path(loaded.uri))
        name = registered.get("model_name", name)
        version = version or registered.get("model_version")
    return {
        "name": str(name),
        "version": None if version is None else str(version),
        "alias": alias,
        "uri": loaded.uri,
        "description": loaded.description,
        "output": loaded.trained.model.output,
        "label_set": label_set_info(get_label_set(loaded.trained.model.label_set)),
    }


def _registered_meta(folder: Path) -> dict[str, Any]:
    """``registered_model_meta`` of a model folder downloaded from the registry (name and version), if any."""
    import yaml

    meta = folder / "registered_model_meta"
    try:
        data = yaml.safe_load(meta.read_text()) if meta.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------- service state
@dataclass
class DemoCases:
    """Synthetic cases for the viewer, generated in a background thread at start-up."""

    folder: Path
    count: int
    spacing_mm: float
    ready: threading.Event = field(default_factory=threading.Event)
    case_ids: list[str] = field(default_factory=list)
    error: str | None = None

    def generate(self) -> None:
        from tumorseg.config import SynthConfig
        from tumorseg.data.synth import synthesize_dataset

        try:
            cfg = SynthConfig(
                cases=self.count,
                seed=DEMO_SEED,
                spacing_mm=self.spacing_mm,
                tumour_free_fraction=0.0,
                reoriented_fraction=0.0,
            )
            self.case_ids = synthesize_dataset(self.folder, cfg)
        except Exception as exc:  # the demo list is optional: the service runs without it
            log.exception("demo cases could not be generated")
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ready.set()


class Service:
    """The loaded models, the pool, the result store and the private temp folder of one app."""

    def __init__(self, settings: ServeSettings, loaded: Any, planar: PlanarSlot | None = None) -> None:
        from tumorseg.models.predictor import SegmentationPredictor

        self.settings = settings
        self.loaded = loaded
        self.planar = planar or PlanarSlot(None)
        self.model_info = describe_model(loaded)
        self.predictor = SegmentationPredictor(loaded.trained, settings.predict)
        self.pool = InferencePool(settings.serve.workers, settings.serve.queue_size)
        self.store = ResultStore(settings.serve.max_results, settings.serve.result_ttl_s)
        self.limits = UploadLimits(
            max_files=settings.serve.max_files,
            max_members=settings.serve.max_members,
            max_uncompressed_bytes=settings.serve.max_uncompressed_bytes,
        )
        self.root = Path(tempfile.mkdtemp(prefix="tumorseg-serve-"))  # mode 0700: private to this user
        self.demo = DemoCases(self.root / "demo", settings.serve.demo_cases, settings.serve.demo_spacing_mm)
        self.started = time.time()
        if self.demo.count:
            threading.Thread(target=self.demo.generate, name="tumorseg-demo", daemon=True).start()
        else:
            self.demo.ready.set()

    def request_dir(self) -> Path:
        """A new private folder for one request's files."""
        return Path(tempfile.mkdtemp(prefix="req-", dir=self.root))

    def scrub(self, message: str) -> str:
        """Drop the server's temp folders from a message (clients need the file name, not our layout)."""
        return re.sub(re.escape(str(self.root)) + r"/(?:[^/\s]+/)+", "", message)

    def close(self) -> None:
        """Finish the running jobs, then remove the temp folder (after the demo writer is done with it)."""
        self.pool.shutdown()
        self.demo.ready.wait(timeout=60)
        remove_tree(self.root)

    # ------------------------------------------------------------------ prediction (worker thread)
    def predict_folder(self, folder: Path, workdir: Path, keep: bool) -> dict[str, Any]:
        """Segment the one case in ``folder``; runs on a pool thread.

        Args:
            folder: a folder holding exactly one case in a supported layout.
            workdir: this request's folder (the output is written there).
            keep: also build a :class:`DisplayCase` for the viewer.

        Returns:
            ``summary`` (JSON-ready), ``segmentation`` (the ``.nii.gz`` bytes), ``file_name`` and,
            with ``keep``, ``display``.

        Raises:
            DataError: not exactly one case, a missing or unreadable modality, an absurd grid.
        """
        from tumorseg.models.predictor import plan_cases, read_volumes, reference_header, write_prediction

        cases = plan_cases(folder)
        if len(cases) != 1:
            raise UploadRejected(
                f"the upload holds {len(cases)} cases ({', '.join(c.case_id for c in cases[:3])}...); "
                "upload one case per request"
            )
        case = cases[0]
        shape, spacing = _header_grid(case)
        self._check_grid(case.case_id, shape, spacing)
        volumes = None
        if keep:  # the viewer shows the modalities: read them whole
            volumes, read_s = read_volumes(case)
            prediction = self.predictor.predict_volumes(volumes)
            prediction.seconds = {"read": read_s, **prediction.seconds}
        else:  # each file read and resampled in its own thread, no full-resolution float image
            prediction = self.predictor.predict_case(case)
        out_dir = workdir / "prediction"
        written = write_prediction(prediction, out_dir, reference_header(case))
        segmentation = written[0].read_bytes()
        # The convention the segmentation is written in: the input's, or the one convention of the
        # model's label set (a post-treatment model on a folder read as 2023 GLI writes 2024 GLI codes).
        # A ground truth of the case is read in it, so its codes are the model's label set's.
        convention = prediction.label_convention
        summary: dict[str, Any] = {
            "kind": "3d",
            "case_id": case.case_id,
            "layout": case.layout,
            "label_convention": convention,
            "shape": [int(n) for n in prediction.labels.shape],
            "spacing_mm": [round(float(s), 4) for s in spacing],
            "volumes_ml": {region: round(value, 3) for region, value in prediction.volumes_ml.items()},
            "seconds": {step: round(value, 3) for step, value in prediction.seconds.items()},
            "model": self.model_info,
        }
        reference = _read_reference(case, convention) if case.has_seg else None
        if reference is not None:
            from tumorseg.serving.viewer import dice_per_region

            _check_same_shape(reference.shape, prediction.canonical.shape, case.paths["seg"].name)
            summary["dice"] = {
                k: round(v, 4)
                for k, v in dice_per_region(prediction.canonical, reference, self.predictor.label_set).items()
            }
        result: dict[str, Any] = {
            "summary": summary,
            "segmentation": segmentation,
            "file_name": written[0].name,
        }
        if keep:
            display = build_display_case(
                case.case_id,
                volumes.image,
                prediction.canonical,
                volumes.affine,
                convention,
                summary,
                segmentation,
                self.predictor.label_set,
            )
            if reference is not None:
                display.set_reference(reference)
            result["display"] = display
        return result

    def _check_grid(self, case_id: str, shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
        """Refuse a case whose grid would be absurdly large on the model's grid (voxel sizes in the header).

        Checked on the reference header, before any volume is inflated or resampled.
        """
        target = self.predictor.preprocess_cfg.target_spacing_mm
        physical_mm3 = float(np.prod(np.asarray(shape, dtype=np.float64) * np.asarray(spacing)))
        model_voxels = physical_mm3 / float(np.prod(target))
        limit = self.settings.serve.max_model_voxels
        if not np.isfinite(model_voxels) or model_voxels > limit:
            raise DataError(
                f"{case_id}: voxel sizes {tuple(round(s, 3) for s in spacing)} mm x shape "
                f"{tuple(shape)} make {model_voxels:.3g} voxels at the model's spacing, more than "
                f"{limit} (serve.max_model_voxels); check the NIfTI header's pixdim"
            )
        if min(shape) < 2:
            raise DataError(
                f"{case_id}: volume shape {tuple(shape)} is a single slice; upload the 3-D volumes"
            )

    def run_job(self, folder: Path, workdir: Path, keep: bool, remove_workdir: bool) -> dict[str, Any]:
        """The pool's job: predict, then always remove this request's folder."""
        try:
            return self.predict_folder(folder, workdir, keep)
        finally:
            if remove_workdir:
                remove_tree(workdir)

    # ------------------------------------------------------------------ 2-D (worker thread)
    def stage_planar(self, name: str, stream: Any, workdir: Path) -> Path:
        """Copy one 2-D upload into ``workdir`` and check its header against the caps (before decoding)."""
        budget = ByteBudget(self.limits.max_uncompressed_bytes)
        path = stage_planar_upload(name, stream, workdir, budget)
        check_planar_file(path, self.settings.serve.max_image_pixels, budget)
        return path

    def run_planar_job(
        self, path: Path, workdir: Path, keep: bool, pixel_size_mm: float | None
    ) -> dict[str, Any]:
        """The pool's 2-D job: segment and classify one image, then always remove this request's folder.

        Returns:
            :func:`~tumorseg.serving.planar.predict_planar_file`'s result, the summary with the model
            added, and with ``keep`` a :class:`~tumorseg.serving.viewer.PlanarDisplay`.
        """
        try:
            result = predict_planar_file(
                path,
                self.planar.require(),
                max_pixels=self.settings.serve.max_image_pixels,
                pixel_size_mm=pixel_size_mm,
            )
            result["summary"]["model"] = self.planar.info()
            if keep:
                result["display"] = build_planar_display(result)
            return result
        finally:
            remove_tree(workdir)


def _header_grid(case: Any) -> tuple[tuple[int, ...], tuple[float, float, float]]:
    """Shape and voxel sizes (mm) of a case's reference file from its header alone (nothing inflated).

    Raises:
        DataError: the header cannot be read (naming the file).
    """
    from tumorseg.data.layouts import spacing_from_affine
    from tumorseg.models.predictor import reference_header

    header = reference_header(case)
    shape = tuple(int(n) for n in header.get_data_shape()[:3])
    return shape, spacing_from_affine(header.get_best_affine())


def _check_same_shape(reference: tuple[int, ...], expected: tuple[int, ...], name: str) -> None:
    if tuple(reference) != tuple(expected):
        raise DataError(
            f"{name}: ground truth shape {tuple(reference)} differs from the image shape {tuple(expected)}; "
            "upload the mask of this case"
        )


def _read_reference(case: Any, convention: str) -> np.ndarray:
    """The case's own segmentation as internal labels (for Dice), read in ``convention`` (the
    prediction's: the case's own unless the model's label set needed another)."""
    from tumorseg.data.layouts import read_nifti

    return _canonical_mask(read_nifti(case.paths["seg"]), convention)


def _canonical_mask(nifti: Any, convention: str) -> np.ndarray:
    from tumorseg.data.layouts import encode_labels

    data = nifti.data
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{nifti.path.name}: is {data.ndim}-D; a ground-truth mask is one 3-D label volume")
    try:
        return encode_labels(np.asarray(data), convention)
    except ValueError as exc:
        raise DataError(f"{nifti.path.name}: {exc}; upload the mask in the case's own convention") from None


# ---------------------------------------------------------------------------- application
def create_app(settings: ServeSettings, *, loaded_model: Any = None, planar: PlanarSlot | None = None) -> Any:
    """Build the FastAPI application (the models load when it starts, not here).

    Args:
        settings: from :meth:`ServeSettings.from_params`.
        loaded_model: an already loaded :class:`~tumorseg.registry.loading.LoadedModel` to serve
            instead of loading ``settings.model_uri`` (tests serve small in-memory networks).
        planar: the 2-D model slot to serve instead of loading ``settings.model_2d`` (``serve()``
            loads it before binding; tests pass small networks or an empty slot).

    Returns:
        The ASGI application, wrapped in :class:`~tumorseg.serving.limits.RequestLimits`.
    """
    static_dir = Path(str(resources.files("tumorseg.serving") / "static"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from tumorseg.registry.loading import load_model

        loaded = loaded_model or load_model(settings.model_uri, tracking_uri=settings.tracking_uri)
        slot = planar
        if slot is None:
            slot = await run_in_threadpool(load_planar_slot, settings.model_2d, settings.tracking_uri)
        service = Service(settings, loaded, slot)
        app.state.service = service
        log.info("serving %s", service.model_info["description"])
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="tumorseg",
        summary="Brain-tumour segmentation of BraTS-style MRI (T1, T1ce, T2, FLAIR)",
        version=_package_version(),
        lifespan=lifespan,
    )
    app.mount("/static", StaticFiles(directory=static_dir), name="static")

    def service_of(request: Request) -> Service:
        return request.app.state.service

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    # ------------------------------------------------------------------ errors -> one-line JSON
    @app.exception_handler(TumorsegError)
    async def _user_error(request: Request, exc: TumorsegError) -> JSONResponse:
        status = getattr(exc, "status_code", 422)
        return error(status, service_of(request).scrub(str(exc)))

    @app.exception_handler(PoolBusy)
    async def _busy(request: Request, exc: PoolBusy) -> JSONResponse:
        pool = service_of(request).pool
        return error(
            503,
            f"server busy: {pool.pending} predictions running or queued (serve.workers + serve.queue_size); "
            "retry shortly",
            {"Retry-After": "5"},
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        hint = (
            "; send the case's modality files or one .zip as multipart field 'files'"
            if where.startswith("files")
            else ""
        )
        return error(422, f"{where or 'request'}: {first.get('msg', 'invalid')}{hint}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "request body: not a readable multipart form; send the files as multipart/form-data field 'files'"
        return error(exc.status_code, detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    # ------------------------------------------------------------------ prediction
    async def run_prediction(
        service: Service, folder: Path, workdir: Path, output: OutputFormat, remove_workdir: bool
    ) -> Response:
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
            result_id = service.store.add(display)
            return JSONResponse(viewer_summary(result_id, display))
        return JSONResponse(summary)

    def viewer_summary(result_id: str, display: DisplayCase | PlanarDisplay) -> dict[str, Any]:
        if isinstance(display, PlanarDisplay):
            return {
                **display.summary,
                "result_id": result_id,
                "slices": display.slices(),
                "focus": display.focus(),
                "display_spacing_mm": [display.pixel_mm, display.pixel_mm],
                "segmentation_url": f"/cases/{result_id}/segmentation",
                "file_name": display.file_name,
            }
        focus = _focus_slices(display.labels)
        return {
            **display.summary,
            "dice": {k: round(v, 4) for k, v in display.dice.items()} if display.dice else None,
            "result_id": result_id,
            "slices": display.slices(),
            "focus": focus,
            "display_spacing_mm": list(display.spacing),
            "segmentation_url": f"/cases/{result_id}/segmentation",
            "file_name": display.file_name,
        }

    async def run_planar_prediction(
        service: Service,
        name: str,
        stream: Any,
        output: OutputFormat,
        pixel_size_mm: float | None,
    ) -> Response:
        if output == "nifti":
            raise UploadRejected(
                f"format: nifti is for 3-D cases; {name} is a 2-D image: ask for png (the mask), json or viewer"
            )
        service.planar.require()  # 503 before reading the upload when there is no 2-D model
        workdir = service.request_dir()
        future: Future[Any] | None = None
        try:
            path = await run_in_threadpool(service.stage_planar, name, stream, workdir)
            future = service.pool.submit(
                service.run_planar_job, path, workdir, output == "viewer", pixel_size_mm
            )
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
        planar = [name for name in names if is_planar_name(name)]
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
            return error(404, f"demo case {case_id!r}: unknown; demo cases are {state}")
        workdir = service.request_dir()
        return await run_prediction(service, demo.folder / case_id, workdir, format, remove_workdir=True)

    # ------------------------------------------------------------------ viewer
    def display_of(request: Request, result_id: str) -> DisplayCase | PlanarDisplay:
        display = service_of(request).store.get(result_id)
        if display is None:
            raise CaseNotFound(
                f"case {result_id!r}: unknown or expired (kept serve.result_ttl_s); predict it again"
            )
        return display

    @app.get("/cases/{result_id}", summary="A kept prediction")
    async def case_summary(request: Request, result_id: str) -> dict[str, Any]:
        display = display_of(request, result_id)
        return viewer_summary(result_id, display)

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

    @app.post("/cases/{result_id}/ground-truth", summary="Score a kept prediction against a mask")
    async def case_ground_truth(
        request: Request,
        result_id: str,
        file: Annotated[UploadFile, File(description="the case's ground-truth mask (.nii or .nii.gz)")],
    ) -> dict[str, Any]:
        """Dice per train region (WT, TC, ET for glioma) against a mask in the case's geometry and label convention."""
        service = service_of(request)
        display = display_of(request, result_id)
        if isinstance(display, PlanarDisplay):
            raise UploadRejected(
                f"case {result_id!r} is a 2-D image: upload its Figshare .mat to /predict instead; "
                "the tumorMask it holds is scored automatically"
            )
        name = safe_file_name(file.filename, "file")
        if not is_nifti_name(name):
            raise UploadRejected(
                f"{name}: not a NIfTI file (.nii, .nii.gz); upload the case's segmentation mask"
            )
        workdir = service.request_dir()
        try:
            dice = await run_in_threadpool(_score_mask, service, display, file.file, name, workdir)
        finally:
            remove_tree(workdir)
        return {"result_id": result_id, "dice": dice}

    # ------------------------------------------------------------------ health and page
    @app.get("/health", summary="Liveness and the served model")
    async def health(request: Request) -> dict[str, Any]:
        service = service_of(request)
        return {
            "status": "ok",
            "model": service.model_info,
            "model_2d": service.planar.info(),
            "pending": service.pool.pending,
            "workers": service.pool.workers,
            "uptime_s": round(time.time() - service.started, 1),
        }

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(static_dir / "index.html", media_type="text/html")

    return RequestLimits(
        app, max_body_bytes=settings.serve.max_upload_bytes, timeout_s=settings.serve.request_timeout_s
    )


def _score_mask(
    service: Service, display: DisplayCase, stream: Any, name: str, workdir: Path
) -> dict[str, float]:
    from tumorseg.data.layouts import read_nifti

    budget = ByteBudget(service.limits.max_uncompressed_bytes)
    path = copy_inflated(stream, workdir, name, budget)
    canonical = _canonical_mask(read_nifti(path), display.label_convention)
    _check_same_shape(canonical.shape, display.source_shape, name)
    return {k: round(v, 4) for k, v in display.set_reference(canonical).items()}


def _focus_slices(labels: np.ndarray) -> dict[str, int]:
    """Per plane, the slice with the most tumour (the middle slice when there is none)."""
    tumour = labels > 0
    focus: dict[str, int] = {}
    for plane, axis in (("sagittal", 0), ("coronal", 1), ("axial", 2)):
        others = tuple(a for a in range(3) if a != axis)
        counts = tumour.sum(axis=others)
        focus[plane] = int(np.argmax(counts)) if counts.any() else labels.shape[axis] // 2
    return focus


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tumorseg")
    except PackageNotFoundError:
        return "0+unknown"


def serve(settings: ServeSettings, *, host: str | None = None, port: int | None = None) -> None:
    """Run the service with uvicorn until interrupted (``tumorseg serve``).

    The model is loaded here, before the server binds its port, so a wrong ``--model`` is the CLI's
    one-line error (exit 2) rather than a failed ASGI start-up; the app's lifespan then builds the
    predictor around it once. The 2-D model (``serve.model_2d``) is optional: when it cannot be
    loaded one warning is logged and the service starts for 3-D cases.

    Raises:
        DataError: the model cannot be loaded (no such file, alias or store).
    """
    import uvicorn

    from tumorseg.registry.loading import load_model, prepare_mlflow

    prepare_mlflow()
    os.environ.setdefault("MPLBACKEND", "Agg")
    loaded = load_model(settings.model_uri, tracking_uri=settings.tracking_uri)
    planar = load_planar_slot(settings.model_2d, settings.tracking_uri)
    uvicorn.run(
        create_app(settings, loaded_model=loaded, planar=planar),
        host=host or settings.serve.host,
        port=port or settings.serve.port,
        log_level="info",
        timeout_graceful_shutdown=10,
    )
