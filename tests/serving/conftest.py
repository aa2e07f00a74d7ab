"""Fixtures for the HTTP service: apps on small models and a generated case (helpers: serving_support.py).

2-D models come from serving_support.py too: the untrained ``PlanarOracle`` and a tiny random 2-D
package built with tests/planar_fixtures.py's ``tiny_params``.

Cases are the project's synthetic data at 2 mm (``synthesize_dataset``, 120 x 120 x 78) and the
tiny phantoms of tests/fixtures_nifti.py for the layout and junk-input variants.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from serving_support import oracle_model, predict_tests, serve_params

from tumorseg.config import SynthConfig
from tumorseg.registry.loading import LoadedModel
from tumorseg.serving.app import ServeSettings, create_app
from tumorseg.serving.service import PlanarSlot


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``make_client(loaded_model=None, model_uri=None, planar=None, **serve)`` -> a started TestClient.

    Without ``model_uri`` the app serves ``loaded_model`` (default: the oracle); with it, the app
    loads the model itself at start-up. ``planar`` is the 2-D model slot to serve; without it the app
    loads ``serve.model_2d`` at start-up (in the test's empty MLflow store: none, so 2-D uploads get
    503). ``serve`` overrides keys of the ``serve`` section.
    """
    from fastapi.testclient import TestClient

    clients: list[Any] = []

    def build(
        *,
        loaded_model: LoadedModel | None = None,
        model_uri: str | None = None,
        planar: PlanarSlot | None = None,
        **serve: Any,
    ) -> Any:
        settings = ServeSettings.from_params(serve_params(tmp_path, **serve), model_uri=model_uri or "oracle")
        if loaded_model is None and model_uri is None:
            loaded_model = oracle_model()
        client = TestClient(
            create_app(settings, loaded_model=loaded_model, planar=planar), raise_server_exceptions=False
        )
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(scope="session")
def synth_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated BraTS 2021 case folder at 2 mm (120 x 120 x 78) with its segmentation."""
    from tumorseg.data.synth import synthesize_dataset

    out = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(cases=1, spacing_mm=2.0, tumour_free_fraction=0.0, reoriented_fraction=0.0, seed=3)
    (case_id,) = synthesize_dataset(out, cfg)
    return out / case_id


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny U-Net checkpoint (4 mm) in the format ``tumorseg train`` writes."""
    root = tmp_path_factory.mktemp("ckpt")
    return predict_tests.write_checkpoint(root / "best.ckpt", predict_tests.tiny_params(root))
