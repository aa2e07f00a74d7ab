"""The state behind the HTTP service: loaded models (the 2-D one optional, the DICOM brain extractor
loaded at the first study), bounded pool, viewer store, private temp folder; :meth:`Service.run_job`
predicts an upload of either dimensionality, or a DICOM study, on a pool thread."""

from __future__ import annotations

import logging
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorseg import yamlio
from tumorseg.data.readers import IMAGE, input_dims
from tumorseg.errors import DataError, TumorsegError, first_line
from tumorseg.params import Params, as_params
from tumorseg.serving.config import ServeConfig
from tumorseg.serving.dicom_study import BrainSlot, predict_study
from tumorseg.serving.limits import InferencePool
from tumorseg.serving.uploads import (
    ByteBudget,
    UploadLimits,
    UploadRejected,
    check_image_file,
    copy_inflated,
    copy_plain,
    is_dicom_study,
    remove_tree,
    too_many_pixels,
)
from tumorseg.serving.viewer import (
    DisplayCase,
    PlanarDisplay,
    ResultStore,
    build_display_case,
    build_planar_display,
    label_set_info,
    planar_scores,
    window_uint8,
)

if TYPE_CHECKING:
    from starlette.requests import Request

log = logging.getLogger("tumorseg.serving.app")  # one logger name for the whole service

# The demo cases: each with a tumour, none reoriented.
DEMO_SYNTH = {"seed": 7, "tumour_free_fraction": 0.0, "reoriented_fraction": 0.0}


@dataclass(frozen=True)
class ServeSettings:
    """Everything the application needs, resolved from params.yaml by the CLI (or built by tests);
    ``model_2d`` None: no 2-D model."""

    serve: ServeConfig
    predict: Any
    model_uri: str
    tracking_uri: str
    model_2d: str | None = None
    monitor: Any = None
    """``monitor:`` (:class:`~tumorseg.monitoring.config.MonitorConfig`; None: its defaults)."""
    dicom: Any = None
    """``dicom:`` (:class:`~tumorseg.dicom.config.DicomConfig`; None: its defaults): how a DICOM study
    is imported, and the brain-extraction model."""

    @classmethod
    def from_params(
        cls, params: Params | dict[str, Any], *, model_uri: str | None = None, source: str = "params.yaml"
    ) -> ServeSettings:
        """The model is ``model_uri``, else ``serve.model``, else ``predict.model``; the tracking store
        is resolved as ``tumorseg predict`` resolves it."""
        params = as_params(params, source)
        from tumorseg.tracking import params_tracking_uri

        serve: ServeConfig = params.serve
        return cls(
            serve=serve,
            predict=params.predict,
            model_uri=model_uri or serve.model or params.predict.model,
            tracking_uri=params_tracking_uri(params, source=source),
            model_2d=serve.model_2d or None,
            monitor=params.monitor,
            dicom=params.dicom,
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
        data = yamlio.safe_load(meta.read_text()) if meta.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------- the optional 2-D model
class PlanarModelMissing(TumorsegError):
    """A 2-D upload while no 2-D model is loaded (HTTP 503)."""

    status_code = 503


@dataclass(frozen=True)
class PlanarSlot:
    """The 2-D model (a ``PlanarModel``) asked for as ``uri`` (None: disabled), or the one-line
    ``error`` saying why it could not be loaded."""

    uri: str | None
    model: Any = None
    error: str | None = None

    def require(self) -> Any:
        """The model, or :class:`PlanarModelMissing` with what to do."""
        if self.model is None:
            if not self.uri:
                why = "serve.model_2d is null"
            else:  # load errors usually name the URI already
                why = self.error if self.error and self.uri in self.error else f"{self.uri}: {self.error}"
            raise PlanarModelMissing(
                f"no 2-D model is available ({why}); restart `tumorseg serve` with --model-2d <a 2-D "
                "model folder, a 2-D best.ckpt or models:/tumorseg-2d@champion>, or set "
                "serve.model_2d in params.yaml"
            )
        return self.model

    def info(self) -> dict[str, Any]:
        """What ``/health`` reports: name, version, alias, uri, detector, or the load error."""
        if self.model is None:
            return {"available": False, "uri": self.uri, "error": self.error or "serve.model_2d is null"}
        from tumorseg.registry.loading import MODELS_URI

        uri = str(self.uri)
        match = MODELS_URI.match(uri)
        version = re.search(r"\(version (\d+)\)", self.model.description or "")
        if match:
            name, alias = match["name"], match["alias"]
            number = match["version"] or (version.group(1) if version else None)
        else:
            name, alias, number = Path(uri.rstrip("/")).name or uri, None, None
        return {
            "available": True,
            "name": str(name),
            "version": number,
            "alias": alias,
            "uri": uri,
            "description": self.model.description,
            "detector": _detector(self.model),
            "input_size": int(self.model.preprocess.size),
        }


def _detector(model: Any) -> dict[str, Any]:
    return {"method": model.detector.method, "threshold": model.detector.threshold}


def load_planar_slot(uri: str | None, tracking_uri: str) -> PlanarSlot:
    """Load the 2-D model ``uri`` names; on any failure log one warning and return an empty slot (the
    optional 2-D model may never stop the 3-D service from starting)."""
    if not uri:
        return PlanarSlot(None)
    from tumorseg.registry.loading import load_planar_model

    try:
        model = load_planar_model(uri, tracking_uri=tracking_uri)
    except Exception as exc:
        message = first_line(exc, 10_000)
        if not isinstance(exc, TumorsegError):
            message = f"{type(exc).__name__}: {message}"
        log.warning("no 2-D model: %s; 2-D uploads get 503 (set serve.model_2d or --model-2d)", message)
        return PlanarSlot(uri, error=message)
    log.info("serving 2-D %s", model.description or uri)
    return PlanarSlot(uri, model)


# ---------------------------------------------------------------------------- service state
@dataclass
class DemoCases:
    """Synthetic 3-D cases for the viewer, generated in a background thread at start-up."""

    folder: Path
    count: int
    spacing_mm: float
    ready: threading.Event = field(default_factory=threading.Event)
    case_ids: list[str] = field(default_factory=list)
    error: str | None = None

    def start(self, thread_name: str) -> None:
        """Generate the cases in a daemon thread (none to make: ready at once)."""
        if self.count:
            threading.Thread(target=self.generate, name=thread_name, daemon=True).start()
        else:
            self.ready.set()

    def generate(self) -> None:
        try:
            self.case_ids = self.write()
        except Exception as exc:  # the demo list is optional: the service runs without it
            log.exception("demo cases could not be generated")
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ready.set()

    def write(self) -> list[str]:
        """Write the cases into ``folder``; their ids."""
        from tumorseg.config import SynthConfig
        from tumorseg.data.synth import synthesize_dataset

        cfg = SynthConfig(cases=self.count, spacing_mm=self.spacing_mm, **DEMO_SYNTH)
        return synthesize_dataset(self.folder, cfg)

    def path(self, case_id: str) -> Path:
        """What ``POST /predict`` would be given for the case: its folder."""
        return self.folder / case_id

    def reference(self, case_id: str) -> np.ndarray | None:
        """A ground truth the case's files do not hold (3-D cases hold theirs)."""
        return None


@dataclass
class PlanarDemoCases(DemoCases):
    """Synthetic 2-D images for the viewer (:mod:`tumorseg.data.planar_synth` slices): ``count`` Figshare
    v7.3 ``.mat`` files (``figshare-1``...: their tumorMask inside) and ``count`` 8-bit PNG images
    (``image-<n>``: their masks kept here), each scored when predicted."""

    files: dict[str, str] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)

    def write(self) -> list[str]:
        from tumorseg.config import SynthPlanarConfig
        from tumorseg.data.planar_synth import figshare_patient_slices

        spacing = min(max(self.spacing_mm, 1.0), 4.0)  # synth_2d.spacing_mm's range
        cfg = SynthPlanarConfig(seed=DEMO_SYNTH["seed"], spacing_mm=spacing, slices_per_patient=1)
        self.folder.mkdir(parents=True, exist_ok=True)
        files: dict[str, str] = {}
        for patient in range(1, 2 * self.count + 1):
            item = figshare_patient_slices(patient, cfg)[0]
            write = self._write_mat if patient <= self.count else self._write_png
            case_id, name = write(patient, item)
            files[case_id] = name
        self.files = files
        return list(files)

    def _write_mat(self, patient: int, item: dict[str, Any]) -> tuple[str, str]:
        """A Figshare slice as ``<patient>.mat``: ``(case id, file name)``."""
        from tumorseg.data.planar_synth import tumour_border, write_figshare_mat

        name = f"{patient}.mat"
        mask = item["mask"]
        write_figshare_mat(
            self.folder / name, item["image"], mask, item["label"], item["pid"], tumour_border(mask)
        )
        return f"figshare-{patient}", name

    def _write_png(self, patient: int, item: dict[str, Any]) -> tuple[str, str]:
        """A Figshare slice windowed to 8-bit as ``image-<patient>.png``, its mask kept."""
        from PIL import Image

        case_id = f"image-{patient}"
        Image.fromarray(window_uint8(item["image"].astype(np.float32))).save(self.folder / f"{case_id}.png")
        self.masks[case_id] = item["mask"]
        return case_id, f"{case_id}.png"

    def path(self, case_id: str) -> Path:
        return self.folder / self.files[case_id]

    def reference(self, case_id: str) -> np.ndarray | None:
        return self.masks.get(case_id)


class Service:
    """The loaded models, the pool, the result store and the private temp folder of one app."""

    def __init__(self, settings: ServeSettings, loaded: Any, planar: PlanarSlot | None = None) -> None:
        from tumorseg.models.predictor import SegmentationPredictor

        self.settings = settings
        self.loaded = loaded
        self.planar = planar or PlanarSlot(None)
        self.model_info = describe_model(loaded)
        self.predictor = SegmentationPredictor(loaded.trained, settings.predict)
        serve = settings.serve
        self.pool = InferencePool(serve.workers, serve.queue_size)
        self.store = ResultStore(serve.max_results, serve.result_ttl_s)
        self.limits = UploadLimits(
            serve.max_files,
            serve.max_members,
            serve.max_uncompressed_bytes,
            serve.max_image_pixels,
            serve.max_dicom_files,
        )
        if settings.dicom is None:
            from tumorseg.dicom.config import DicomConfig

            self.dicom = DicomConfig()
        else:
            self.dicom = settings.dicom
        self.brain = BrainSlot(self.dicom.brain.model, settings.tracking_uri)
        self.started = time.time()
        self.drift = _drift_monitor(settings, loaded)
        self.planar_drift: Any = None  # made from the 2-D model's profile at its first image
        self.planar_drift_lock = threading.Lock()
        self.root = Path(tempfile.mkdtemp(prefix="tumorseg-serve-"))  # mode 0700: private to this user
        self.demo = DemoCases(self.root / "demo", serve.demo_cases, serve.demo_spacing_mm)
        self.demo_2d = PlanarDemoCases(self.root / "demo_2d", serve.demo_cases, serve.demo_spacing_mm)
        self.shadow = None
        if serve.shadow:
            from tumorseg.serving.shadow import ShadowRunner

            try:
                self.shadow = ShadowRunner(settings, self.model_info, self.predictor.label_set, self.root)
            except BaseException:
                remove_tree(self.root)  # the app never starts, so close() never runs
                raise
        self.demo.start("tumorseg-demo")
        self.demo_2d.start("tumorseg-demo-2d")

    def request_dir(self) -> Path:
        """A new private folder for one request's files."""
        return Path(tempfile.mkdtemp(prefix="req-", dir=self.root))

    def scrub(self, message: str) -> str:
        """Drop the server's temp folders from a message (clients need the file name, not our layout)."""
        return re.sub(re.escape(str(self.root)) + r"/(?:[^/\s]+/)+", "", message)

    def close(self) -> None:
        """Finish the running jobs, then remove the temp folder (after the demo writer is done with it)."""
        self.pool.shutdown()
        if self.shadow is not None:
            self.shadow.close()
        for demo in (self.demo, self.demo_2d):
            demo.ready.wait(timeout=60)
        remove_tree(self.root)

    # ------------------------------------------------------------------ prediction (pool thread)
    def run_job(
        self,
        source: Path,
        workdir: Path,
        keep: bool,
        pixel_size_mm: float | None = None,
        reference: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """The pool's job: predict a staged case folder, DICOM study or 2-D image, then always remove
        ``workdir``. Returns ``summary`` (JSON), ``segmentation`` (``.nii.gz``, DICOM-SEG or mask PNG bytes)
        with its ``file_name``, ``format``, ``media_type`` and ``headers``, a DICOM study's other answers in
        ``files`` (format -> bytes, file name, media type), and with ``keep`` the viewer's ``display``;
        ``reference``: a 2-D image's ground truth its file does not hold (a demo PNG's)."""
        try:
            if is_dicom_study(source):
                return predict_study(self, source, workdir, keep)
            if input_dims(source) == IMAGE:
                return self.predict_image(source, keep, pixel_size_mm, reference)
            return self.predict_folder(source, workdir, keep)
        finally:
            remove_tree(workdir)

    def predict_folder(self, folder: Path, workdir: Path, keep: bool) -> dict[str, Any]:
        """:meth:`run_job` for the one case in ``folder`` (written under ``workdir``); DataError for not
        exactly one case, a missing or unreadable modality, or an absurd grid."""
        return self.predict_volume(folder, workdir, keep)[0]

    def predict_volume(self, folder: Path, workdir: Path, keep: bool) -> tuple[dict[str, Any], Any]:
        """:meth:`predict_folder`'s result and the ``CasePrediction`` it came from."""
        from tumorseg.models.predictor import read_volumes, reference_header, write_prediction
        from tumorseg.monitoring.drift import component_threshold, decoded_features, volume_features

        case = _one_case(folder)
        shape, spacing = _header_grid(case)
        self._check_grid(case.case_id, shape, spacing)
        volumes = None
        if keep:  # the viewer shows the modalities: read them whole
            volumes, read_s = read_volumes(case)
            check = self._check_drift(case.case_id, partial(volume_features, case.case_id, volumes))
            min_confidence = component_threshold(check)
            prediction = self.predictor.predict_volumes(volumes, min_confidence=min_confidence)
            prediction.seconds = {"read": read_s, **prediction.seconds}
        else:  # each file read and reoriented in its own thread, then resampled
            decoded, seconds = self.predictor.decode(case)
            check = self._check_drift(case.case_id, partial(decoded_features, case.case_id, decoded))
            min_confidence = component_threshold(check)
            preprocessed, seconds = self.predictor.preprocess(decoded, seconds)
            del decoded  # read_case's full-resolution image, on its path, goes before inference
            prediction = self.predictor.predict_preprocessed(
                preprocessed, seconds, min_confidence=min_confidence
            )
            del preprocessed
        drift = check.summary() if check is not None else None
        written = write_prediction(prediction, workdir / "prediction", reference_header(case))
        summary = self._summary(case, prediction, spacing)
        summary["drift"] = drift
        if self.predictor.min_confidence > 0:
            summary["component_confidence"] = {
                "threshold": round(self.predictor.min_confidence, 6),
                "applied": min_confidence is None,
            }
        reference = self._score_reference(case, prediction, summary)
        volumes_ml = ",".join(f"{k}={v}" for k, v in summary["volumes_ml"].items())
        result: dict[str, Any] = {
            "summary": summary,
            "segmentation": written[0].read_bytes(),
            "file_name": written[0].name,
            "format": "nifti",
            "media_type": "application/gzip",
            "headers": {"X-Tumorseg-Volumes-Ml": volumes_ml},
        }
        if summary["drift"] and summary["drift"]["flagged"]:
            result["headers"]["X-Tumorseg-Drift"] = str(len(summary["drift"]["outside"]))
        if self.shadow is not None and self.shadow.wanted():
            # queued now; the worker is stopped until this request's answer has been sent
            served_s = sum(prediction.seconds.values())
            job = self.shadow.hand_over(folder, workdir, case.case_id, prediction.canonical, served_s)
            job.min_confidence = min_confidence  # the candidate post-processes the case as served
            self.shadow.submit(job)
        if keep:
            display = build_display_case(
                case.case_id,
                volumes.image,
                prediction.canonical,
                volumes.affine,
                prediction.label_convention,
                summary,
                result["segmentation"],
                self.predictor.label_set,
            )
            if reference is not None:
                display.set_reference(reference)
            result["display"] = display
        return result, prediction

    def _check_drift(self, case_id: str, features: Callable[[], Any]) -> Any:
        """The :class:`~tumorseg.monitoring.drift.DriftCheck` of a case's ``features()`` (of its modalities
        as read for the prediction) against the served model's training profile (None: no profile,
        monitoring off, or the check failed)."""
        if self.drift is None:
            return None
        from tumorseg.monitoring.drift import try_check

        check = try_check(self.drift, features, case_id)
        if check is None:
            return None
        if check.flagged:
            log.warning("drift: %s outside the training profile: %s", case_id, "; ".join(check.outside))
        return check

    def _planar_monitor(self, model: Any) -> None:
        """``self.planar_drift`` for the 2-D ``model``'s profile (None: no profile, or monitoring off)."""
        profile = getattr(model, "drift_profile", None)
        if self.planar_drift is not None and self.planar_drift.profile is profile:
            return
        from tumorseg.monitoring.config import MonitorConfig
        from tumorseg.monitoring.drift import DriftMonitor

        cfg = self.settings.monitor or MonitorConfig()
        self.planar_drift = (
            DriftMonitor.from_params(profile, cfg) if profile is not None and cfg.enabled else None
        )

    def _check_planar_drift(self, model: Any, read: Any) -> dict[str, Any] | None:
        """A 2-D image against the 2-D model's training profile (None: no profile, or monitoring off)."""
        with self.planar_drift_lock:  # pool threads: one monitor, so /health counts every image
            self._planar_monitor(model)
        if self.planar_drift is None:
            return None
        from tumorseg.monitoring.drift import planar_features, try_check

        features = lambda: planar_features(read.case_id, read.image, read.fmt)  # noqa: E731
        check = try_check(self.planar_drift, features, read.case_id)
        if check is None:
            return None
        if check.flagged:
            log.warning("drift: %s outside the training profile: %s", read.case_id, "; ".join(check.outside))
        return check.summary()

    def _score_reference(self, case: Any, prediction: Any, summary: dict[str, Any]) -> np.ndarray | None:
        """The case's own ground truth (internal codes; None without one), its Dice added to ``summary``.
        Read in the prediction's convention (a post-treatment model on 2023 GLI input writes 2024 GLI)."""
        if not case.has_seg:
            return None
        from tumorseg.serving.viewer import dice_per_region

        seg = case.paths["seg"]
        reference = _read_mask(seg, prediction.label_convention, prediction.canonical.shape, seg.name)
        dice = dice_per_region(prediction.canonical, reference, self.predictor.label_set)
        summary["dice"] = {k: round(v, 4) for k, v in dice.items()}
        return reference

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

    def predict_image(
        self, path: Path, keep: bool, pixel_size_mm: float | None, reference: np.ndarray | None = None
    ) -> dict[str, Any]:
        """:meth:`run_job` for one 2-D image, scored against its ``tumorMask`` (else ``reference``) when
        there is one. ``pixel_size_mm`` comes from the client: Figshare ``cjdata`` stores none, and a
        PNG's or JPEG's DPI is a printing resolution, not the scanner's."""
        from tumorseg.data.planar import read_planar
        from tumorseg.models.predictor import mask_png_bytes, predict_planar

        model = self.planar.require()
        max_pixels = self.settings.serve.max_image_pixels
        start = time.perf_counter()
        read = read_planar(path)
        if read.image.size > max_pixels:  # checked again on the decoded array
            raise too_many_pixels(path.name, read.image.shape, max_pixels)
        read_s = time.perf_counter() - start
        prediction = predict_planar(read.image, model, case_id=read.case_id)
        predict_s = time.perf_counter() - start - read_s
        area_px = int(np.count_nonzero(prediction.mask))
        summary: dict[str, Any] = {
            "kind": "2d",
            "case_id": prediction.case_id,
            "source": read.source,
            "file_format": read.fmt,
            "shape": [int(n) for n in read.image.shape],
            "probability": round(prediction.probability, 6),
            "label": "yes" if prediction.label else "no",
            "tumour_type": prediction.tumour_type,
            "type_probabilities": {k: round(v, 6) for k, v in prediction.type_probabilities.items()},
            "detector": _detector(model),
            "tumour_area_px": area_px,
            "pixel_size_mm": pixel_size_mm,
            "tumour_area_mm2": None if pixel_size_mm is None else round(area_px * pixel_size_mm**2, 3),
            "seconds": {"read": round(read_s, 3), "predict": round(predict_s, 3)},
        }
        summary["drift"] = self._check_planar_drift(model, read)
        truth = read.mask if read.mask is not None else reference
        if truth is not None:
            summary.update(planar_scores(prediction.mask, truth))
        summary["model"] = self.planar.info()
        headers = {
            "X-Tumorseg-Probability": str(summary["probability"]),
            "X-Tumorseg-Label": summary["label"],
            "X-Tumorseg-Area-Px": str(area_px),
        }
        if prediction.tumour_type:
            headers["X-Tumorseg-Tumour-Type"] = prediction.tumour_type
        result: dict[str, Any] = {
            "summary": summary,
            "segmentation": mask_png_bytes(prediction.mask),
            "file_name": f"{prediction.case_id}_mask.png",
            "format": "png",
            "media_type": "image/png",
            "headers": headers,
        }
        if keep:
            result["display"] = build_planar_display(result, read.image, prediction.mask, truth)
        return result


def _drift_monitor(settings: ServeSettings, loaded: Any) -> Any:
    """A :class:`~tumorseg.monitoring.drift.DriftMonitor` of the served model's profile, or None."""
    from tumorseg.monitoring.config import MonitorConfig
    from tumorseg.monitoring.drift import DriftMonitor

    cfg = settings.monitor or MonitorConfig()
    profile = getattr(loaded, "drift_profile", None)
    if not cfg.enabled or profile is None:
        log.info(
            "drift: not checked (%s)",
            "monitor.enabled is false" if not cfg.enabled else "the model has no profile",
        )
        return None
    return DriftMonitor.from_params(profile, cfg)


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


def _read_labels(path: Path, convention: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mask in internal codes, affine)`` of one 3-D label volume in ``convention``."""
    from tumorseg.data.layouts import encode_labels, read_nifti

    nifti = read_nifti(path)
    data = nifti.data
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{nifti.path.name}: is {data.ndim}-D; a ground-truth mask is one 3-D label volume")
    try:
        return encode_labels(np.asarray(data), convention), nifti.affine
    except ValueError as exc:
        raise DataError(f"{nifti.path.name}: {exc}; upload the mask in the case's own convention") from None


def _read_mask(path: Path, convention: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A ground-truth mask in internal codes: one 3-D volume in ``convention`` on the ``shape`` grid."""
    mask, _ = _read_labels(path, convention)
    if tuple(mask.shape) != tuple(shape):
        raise DataError(
            f"{name}: ground truth shape {tuple(mask.shape)} differs from the image shape {tuple(shape)}; "
            "upload the mask of this case"
        )
    return mask


def _read_dicom_case_mask(path: Path, display: DisplayCase, name: str) -> np.ndarray:
    """A DICOM study's ground truth, on the imported case's grid or on the T1ce series' own (then
    brought onto the case: per label one-hot, linear, the largest share wins), in internal codes.
    Which grid is told by the file's size, position and orientation, not its size alone."""
    from tumorseg.dicom.outputs import resample_labels
    from tumorseg.dicom.prepare import Geometry

    mask, affine = _read_labels(path, display.label_convention)
    given = Geometry.from_ras_affine(affine, mask.shape)
    case, t1ce = display.case_grid, display.t1ce_grid

    def on(grid: Any) -> bool:
        return tuple(mask.shape) == tuple(grid.size) and bool(
            np.allclose(given.index_to_lps(), grid.index_to_lps(), atol=0.05)
        )

    if on(case):
        return mask
    if on(t1ce):
        on_case = resample_labels(mask, t1ce, case)  # (slice, row, column) of the case grid
        return np.ascontiguousarray(on_case.transpose(2, 1, 0))
    if tuple(mask.shape) in (tuple(t1ce.size), tuple(case.size)):
        raise DataError(
            f"{name}: ground truth has the size of the T1ce series' grid or the imported case's but not "
            "its position or orientation; save it with that grid's geometry (as the _t1ce.nii.gz this "
            "study's prediction gave, or the case's segmentation)"
        )
    raise DataError(
        f"{name}: ground truth shape {tuple(mask.shape)} is neither the T1ce series' grid "
        f"{tuple(t1ce.size)} nor the imported case's {tuple(case.size)}; upload the mask of this study"
    )


def score_mask(
    service: Service, display: DisplayCase, stream: Any, name: str, workdir: Path
) -> tuple[np.ndarray, dict[str, float]]:
    """An uploaded mask for a kept 3-D prediction (copied under the byte budget, read in the case's
    convention, checked against its shape), as the viewer keeps it, and the Dice per region against it;
    runs on a threadpool thread and stores nothing (the route keeps it when the request still stands)."""
    path = copy_inflated(stream, workdir, name, ByteBudget(service.limits.max_uncompressed_bytes))
    if display.t1ce_grid is not None:
        canonical = _read_dicom_case_mask(path, display, name)
    else:
        canonical = _read_mask(path, display.label_convention, display.source_shape, name)
    reference, dice = display.score_reference(canonical)
    return reference, {k: round(v, 4) for k, v in dice.items()}


def score_planar_mask(
    service: Service, display: PlanarDisplay, stream: Any, name: str, workdir: Path
) -> tuple[np.ndarray, dict[str, Any]]:
    """An uploaded mask image or Figshare ``.mat`` for a kept 2-D prediction (copied under the byte
    budget, headers checked against the pixel cap, at the image's own size), as the viewer keeps it,
    and the prediction's :func:`~tumorseg.serving.viewer.planar_scores` against it; runs on a threadpool
    thread and stores nothing (the route keeps it when the request still stands)."""
    budget = ByteBudget(service.limits.max_uncompressed_bytes)
    path = workdir / name
    copy_plain(stream, path, budget, name)
    check_image_file(path, service.limits.max_image_pixels, budget)
    mask = _read_planar_mask(path)
    if mask.size > service.limits.max_image_pixels:  # checked again on the decoded array
        raise too_many_pixels(name, mask.shape, service.limits.max_image_pixels)
    if mask.shape != display.labels.shape:
        raise DataError(
            f"{name}: ground truth shape {'x'.join(map(str, mask.shape))} differs from the image shape "
            f"{'x'.join(map(str, display.labels.shape))}; upload this image's mask at its own size "
            "(the size of the mask PNG /predict answers)"
        )
    return display.score_reference(mask)


def _read_planar_mask(path: Path) -> np.ndarray:
    """A 2-D ground truth as bool ``(H, W)``: a Figshare ``.mat``'s ``cjdata.tumorMask``, or an image whose
    tumour is nonzero (0/1, 16-bit, float) or, 8-bit with values above 1, above 127 (0/255, as the mask
    PNG ``/predict`` answers); an RGB(A) image is tumour where any colour channel is."""
    from tumorseg.data.planar import MAT_SUFFIX, load_planar_raw, read_planar

    if path.suffix.lower() == MAT_SUFFIX:
        mask = read_planar(path).mask
        if mask is None:
            raise DataError(
                f"{path.name}: cjdata holds no tumorMask; upload a Figshare slice with its mask, or the mask as .png"
            )
        return mask > 0
    pixels = load_planar_raw(path).image
    if pixels.ndim == 3:  # colour channels without alpha
        pixels = pixels[..., : 3 if pixels.shape[-1] >= 3 else 1].max(axis=-1)
    threshold = 127 if pixels.dtype == np.uint8 and pixels.max() > 1 else 0
    return pixels > threshold
