"""Fixtures of the model and training tests; the dataset builders live in :mod:`tiny_data`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tiny_data import REPO_ROOT, write_tiny_dataset

from tumorseg.config import read_params


@pytest.fixture(scope="session")
def real_params() -> dict[str, Any]:
    """The project's params.yaml, which every test overrides rather than replaces."""
    return read_params(REPO_ROOT / "params.yaml")


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """A tiny preprocessed dataset + split under ``tmp_path``; returns ``tmp_path``."""
    write_tiny_dataset(tmp_path)
    return tmp_path
