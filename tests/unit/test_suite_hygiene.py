"""pyproject.toml keeps the suite honest: every test has a time limit, and the declared Python is the one
the code needs and the suite runs on."""

from __future__ import annotations

import platform
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_test_has_a_time_limit(pyproject: dict[str, Any], pytestconfig: pytest.Config) -> None:
    ini = pyproject["tool"]["pytest"]["ini_options"]
    # generous: the slowest tests take a few minutes; longer ones carry @pytest.mark.timeout
    assert float(ini["timeout"]) >= 300
    assert ini["timeout_method"] in {"signal", "thread"}
    assert any(
        dep.startswith("pytest-timeout") for dep in pyproject["project"]["optional-dependencies"]["dev"]
    )
    # getini raises for an option no plugin declared: pytest-timeout is loaded and reads the setting
    assert float(pytestconfig.getini("timeout")) == float(ini["timeout"])


def test_requires_python_is_what_the_code_needs_and_the_suite_runs_on(pyproject: dict[str, Any]) -> None:
    supported = SpecifierSet(pyproject["project"]["requires-python"])
    # datetime.UTC (pipelines/schedule.py) and tomllib (this file) are Python 3.11+
    assert "3.10.99" not in supported and "3.11.0" in supported
    assert platform.python_version() in supported
    (oldest,) = [spec.version for spec in supported if spec.operator == ">="]
    major, minor = oldest.split(".")[:2]
    assert pyproject["tool"]["ruff"]["target-version"] == f"py{major}{minor}"
