"""The state behind the HTTP service, and the work its pool threads do.

:class:`Service` holds one application's loaded models, bounded inference pool, viewer result store
and private temp folder. The 3-D and 2-D prediction jobs and :func:`score_mask` run on pool or
threadpool threads, never on the event loop; routes reach the service through
``request.app.state.service``.
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorseg.errors import DataError
from tumorseg.serving.config import ServeConfig
from tumorseg.serving.limits import InferencePool
from tumorseg.serving.planar import PlanarSlot, check_planar_file, predict_planar_file, stage_planar_upload
from tumorseg.serving.uploads import ByteBudget, UploadLimits, UploadRejected, copy_inflated, remove_tree
from tumorseg.serving.viewer import (
    DisplayCase,
    ResultStore,
    build_display_case,
    build_planar_display,
    label_set_info,
)

if TYPE_CHECKING:
    from starlette.requests import Request

log = logging.getLogger("tumorseg.serving.app")  # one logger name for the whole service

DEMO_SEED = 7


@dataclass(frozen=True)
class ServeSettings:
    """Everything the application needs, resolved from params.yaml by the CLI (or built by tests);
    ``model_2d`` None: no 2-D model."""

    serve: ServeConfig
    predict: Any
    model_uri: str
    tracking_uri: str
    model_2d: str | None = None

    @classmethod
    def from_params(
        cls, params: dict[str, Any], *, model_uri: str | None = None, source: str = "params.yaml"
    ) -> ServeSettings:
        """The model is ``model_uri``, else ``serve.model``, else ``predict.model``; the tracking store
        is resolved as ``tumorseg predict`` resolves it."""
        from tumorseg.config import section
        from tumorseg.models.predictor import PredictConfig
        from tumorseg.tracking import params_tracking_uri

        serve: ServeConfig = section("serve", params, source=source)
        predict: PredictConfig = section("predict", params, source=source)
        return cls(
            serve=serve,
            predict=predict,
            model_uri=model_uri or serve.model or predict.model,
            tracking_uri=params_tracking_uri(params, source=source),
            model_2d=serve.model_2d or None,
        )


def describe_model(loaded: Any) -> dict[str, Any]:
    """Name, version, alias, origin and label set (what the viewer draws) of a ``LoadedModel``."""
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
    """``registered_model_meta`` of a model folder downloaded from the registry, if any."""
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
        """Segment the one case in ``folder`` (written under ``workdir``); runs on a pool thread.

        Returns:
            ``summary`` (JSON-ready), ``segmentation`` (the ``.nii.gz`` bytes), ``file_name`` and,
            with ``keep``, ``display`` (a :class:`DisplayCase` for the viewer).

        Raises:
            DataError: not exactly one case, a missing or unreadable modality, an absurd grid.
        """
        from tumorseg.models.predictor import read_volumes, reference_header, write_prediction

        case = _one_case(folder)
        shape, spacing = _header_grid(case)
        self._check_grid(case.case_id, shape, spacing)
        volumes = None
        if keep:  # the viewer shows the modalities: read them whole
            volumes, read_s = read_volumes(case)
            prediction = self.predictor.predict_volumes(volumes)
            prediction.seconds = {"read": read_s, **prediction.seconds}
        else:  # each file read and resampled in its own thread, no full-resolution float image
            prediction = self.predictor.predict_case(case)
        written = write_prediction(prediction, workdir / "prediction", reference_header(case))
        segmentation = written[0].read_bytes()
        # The input's convention, or the one of the model's label set (a post-treatment model on a
        # 2023 GLI folder writes 2024 GLI codes); a ground truth of the case is read in it too.
        convention = prediction.label_convention
        summary = self._summary(case, prediction, spacing)
        reference = None
        if case.has_seg:
            from tumorseg.data.layouts import read_nifti
            from tumorseg.serving.viewer import dice_per_region

            reference = _canonical_mask(read_nifti(case.paths["seg"]), convention)
            _check_same_shape(reference.shape, prediction.canonical.shape, case.paths["seg"].name)
            dice = dice_per_region(prediction.canonical, reference, self.predictor.label_set)
            summary["dice"] = {k: round(v, 4) for k, v in dice.items()}
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

    def _summary(self, case: Any, prediction: Any, spacing: tuple[float, ...]) -> dict[str, Any]:
        """The JSON answer of a 3-D prediction (before any Dice)."""
        return {
            "kind": "3d",
            "case_id": case.case_id,
            "layout": case.layout,
            "label_convention": prediction.label_convention,
            "shape": [int(n) for n in prediction.labels.shape],
            "spacing_mm": [round(float(s), 4) for s in spacing],
            "volumes_ml": {region: round(value, 3) for region, value in prediction.volumes_ml.items()},
            "seconds": {step: round(value, 3) for step, value in prediction.seconds.items()},
            "model": self.model_info,
        }

    def _check_grid(self, case_id: str, shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
        """Refuse, from the header alone, a case whose grid would be absurdly large on the model's grid."""
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
        """The pool's 2-D job: :func:`~tumorseg.serving.planar.predict_planar_file`'s result with the
        model in the summary (and with ``keep`` a ``PlanarDisplay``); always removes ``workdir``."""
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


def service_of(request: Request) -> Service:
    """The :class:`Service` of the application serving ``request`` (set by the app's lifespan)."""
    return request.app.state.service


def _one_case(folder: Path) -> Any:
    """The one case an upload's folder holds, planned as ``tumorseg predict`` plans a dataset, else
    :class:`UploadRejected`."""
    from tumorseg.models.predictor import plan_cases

    cases = plan_cases(folder)
    if len(cases) != 1:
        raise UploadRejected(
            f"the upload holds {len(cases)} cases ({', '.join(c.case_id for c in cases[:3])}...); "
            "upload one case per request"
        )
    return cases[0]


def _header_grid(case: Any) -> tuple[tuple[int, ...], tuple[float, float, float]]:
    """Shape and voxel sizes (mm) of a case's reference file, from its header alone (nothing inflated)."""
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


def score_mask(
    service: Service, display: DisplayCase, stream: Any, name: str, workdir: Path
) -> dict[str, float]:
    """Dice per region of a kept 3-D prediction against an uploaded mask (copied under the byte budget,
    read in the case's convention, checked against its shape); runs on a threadpool thread."""
    from tumorseg.data.layouts import read_nifti

    budget = ByteBudget(service.limits.max_uncompressed_bytes)
    path = copy_inflated(stream, workdir, name, budget)
    canonical = _canonical_mask(read_nifti(path), display.label_convention)
    _check_same_shape(canonical.shape, display.source_shape, name)
    return {k: round(v, 4) for k, v in display.set_reference(canonical).items()}
