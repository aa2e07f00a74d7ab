"""tumorseg: brain-tumour segmentation from raw MRI to a deployable, tracked model."""

from __future__ import annotations

__version__ = "0.1.0"
