"""``serve:`` section of params.yaml: the HTTP service (``tumorseg serve``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tumorseg.config import Section


class ServeConfig(Section):
    """``serve:`` where the service listens, which model it loads, and the limits that keep it safe.

    Attributes:
        model: model to load at start-up (MLflow URI, MLflow model folder or ``best.ckpt``); null
            keeps ``predict.model``.
        model_2d: optional 2-D model (URI, 2-D package, MLflow folder or ``train --dims 2`` ``best.ckpt``):
            when it cannot be loaded the service starts for 3-D cases and answers 2-D uploads 503.
        max_uncompressed_mb: most bytes one request may expand to on disk (zip members and
            ``.nii.gz`` inflated together): the zip-bomb and gzip-bomb cap.
        max_dicom_files: entries of an uploaded DICOM study zip (one file per slice: a study with
            localisers, diffusion and four 1 mm volumes holds about a thousand); ``max_members`` caps
            a NIfTI case zip.
        max_model_voxels: largest case on the model's grid, after resampling (absurd voxel sizes in
            a header would otherwise ask for gigabytes).
        max_image_pixels: largest 2-D image, checked from its header before decoding (a few-kB PNG
            can declare 10^9 pixels).
        request_timeout_s: wall time for one request (upload, queue and prediction); HTTP 504 beyond.
        workers: cases segmented at once; queue_size: requests waiting for a worker (503 beyond).
        result_ttl_s, max_results: how long and how many predictions the viewer keeps (LRU).
        demo_cases: synthetic cases generated at start-up for the viewer's demo list (0: none).
        tokens_file: bearer tokens (``tumorseg token create NAME``), salted hashes only, mode 0600.
            With none, the service answers without authentication and refuses to bind anything but
            loopback unless ``--insecure``.
        audit_log: one JSON line per request to a route that takes or returns patient data (null:
            none), rotated at ``audit_max_mb`` with ``audit_backups`` old files kept.
        auth_max_failures: failed authentications per client address and minute before 429.
        shadow: a second model (``models:/tumorseg@challenger``) that segments ``shadow_fraction`` of
            the 3-D requests after their answer is sent, at idle CPU priority, never changing the
            answer; its agreement with the served model goes to the MLflow experiment
            ``shadow_experiment``. ``shadow_queue``: requests waiting for it (more are skipped).
            ``shadow_priority``: ``idle`` (Linux SCHED_IDLE: only CPU nothing else wants), ``low``
            (nice 19: a small share even on a busy machine) or ``normal``.
    """

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model: str | None = None
    model_2d: str | None = "models:/tumorseg-2d@champion"
    max_upload_mb: float = Field(512.0, gt=0.0)
    max_files: int = Field(6, ge=1)
    max_members: int = Field(32, ge=1)
    max_dicom_files: int = Field(4000, ge=1)
    max_uncompressed_mb: float = Field(1024.0, gt=0.0)
    max_model_voxels: int = Field(32_000_000, ge=1)
    max_image_pixels: int = Field(25_000_000, ge=1)
    request_timeout_s: float = Field(300.0, gt=0.0)
    workers: int = Field(1, ge=1)
    queue_size: int = Field(8, ge=0)
    result_ttl_s: float = Field(1800.0, gt=0.0)
    max_results: int = Field(4, ge=1)
    demo_cases: int = Field(2, ge=0)
    demo_spacing_mm: float = Field(2.0, gt=0.2, le=4.0)
    tokens_file: str = ".tumorseg/tokens.json"
    audit_log: str | None = "logs/audit.jsonl"
    audit_max_mb: float = Field(10.0, gt=0.0)
    audit_backups: int = Field(5, ge=1)
    auth_max_failures: int = Field(10, ge=1)
    shadow: str | None = None
    shadow_fraction: float = Field(1.0, ge=0.0, le=1.0)
    shadow_queue: int = Field(4, ge=1)
    shadow_experiment: str = Field("tumorseg-shadow", min_length=1)
    shadow_priority: Literal["idle", "low", "normal"] = "idle"

    @model_validator(mode="after")
    def _upload_fits(self) -> ServeConfig:
        if self.max_upload_mb > self.max_uncompressed_mb:
            raise ValueError("max_upload_mb must not exceed max_uncompressed_mb (files are stored inflated)")
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_uncompressed_bytes(self) -> int:
        return int(self.max_uncompressed_mb * 1024 * 1024)
