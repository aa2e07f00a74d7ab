"""``serve:`` section of params.yaml: the HTTP service (``tumorseg serve``)."""

from __future__ import annotations

from pydantic import Field, model_validator

from tumorseg.config import Section


class ServeConfig(Section):
    """``serve:`` where the service listens, which model it loads, and the limits that keep it safe.

    Attributes:
        host: interface to bind; ``0.0.0.0`` in a container.
        port: TCP port.
        model: model to load at start-up (MLflow URI, MLflow model folder or ``best.ckpt``); null
            keeps ``predict.model``.
        model_2d: 2-D model loaded at start-up too (``models:/`` or ``runs:/`` URI, a 2-D package or
            MLflow model folder, or a ``train-2d`` ``best.ckpt``); optional: when it cannot be loaded
            the service starts for 3-D cases and answers 2-D uploads with 503; null: no 2-D model.
        max_upload_mb: largest request body accepted (HTTP 413 beyond it).
        max_files: most files in one ``POST /predict`` form.
        max_members: most entries in an uploaded ``.zip``.
        max_uncompressed_mb: most bytes one request may expand to on disk (zip members and
            ``.nii.gz`` inflated together): the zip-bomb and gzip-bomb cap.
        max_model_voxels: largest case on the model's grid (voxels after resampling to the training
            spacing); a header with absurd voxel sizes would otherwise ask for gigabytes.
        max_image_pixels: largest 2-D image (height x width), checked from the file's header before
            its pixels are decoded: the decompression-bomb cap (a few-kB PNG can declare 10^9 pixels).
        request_timeout_s: wall time for one request (upload, queue and prediction); HTTP 504 beyond.
        workers: cases segmented at the same time (each holds one case and the network's activations).
        queue_size: requests allowed to wait for a worker; more get HTTP 503 with ``Retry-After``.
        result_ttl_s: how long the viewer can fetch slices of a prediction.
        max_results: predictions kept for the viewer (least recently used dropped first).
        demo_cases: synthetic cases generated at start-up for the viewer's demo list (0: none).
        demo_spacing_mm: voxel size of the demo cases (2 mm: 120 x 120 x 78, fast).
    """

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model: str | None = None
    model_2d: str | None = "models:/tumorseg-2d@champion"
    max_upload_mb: float = Field(512.0, gt=0.0)
    max_files: int = Field(6, ge=1)
    max_members: int = Field(32, ge=1)
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
