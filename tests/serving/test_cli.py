"""``tumorseg serve``: settings from params.yaml and the command line, and the ``serve`` section's checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from serving_support import serve_params, write_tiny_planar_package

from tumorseg.cli import main
from tumorseg.config import section
from tumorseg.errors import ConfigError
from tumorseg.serving.app import ServeSettings


def test_model_precedence_is_option_then_serve_model_then_predict_model(tmp_path: Path) -> None:
    params = serve_params(tmp_path)
    assert (
        ServeSettings.from_params(params).model_uri
        == params["predict"]["model"]
        == "models:/tumorseg@champion"
    )
    params["serve"]["model"] = "models:/tumorseg@edge"
    assert ServeSettings.from_params(params).model_uri == "models:/tumorseg@edge"
    assert ServeSettings.from_params(params, model_uri="best.ckpt").model_uri == "best.ckpt"
    settings = ServeSettings.from_params(params)
    assert settings.tracking_uri == f"sqlite:///{(tmp_path / 'mlruns').resolve()}/mlflow.db"


def test_serve_section_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"params.yaml: serve.port: "):
        section("serve", serve_params(tmp_path, port=0))
    with pytest.raises(ConfigError, match="max_upload_mb must not exceed max_uncompressed_mb"):
        section("serve", serve_params(tmp_path, max_upload_mb=10, max_uncompressed_mb=5))
    with pytest.raises(ConfigError, match="serve.unknown"):
        section("serve", serve_params(tmp_path, unknown=1))


def test_serve_command_binds_the_configured_host_and_port_with_the_loaded_model(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn
    from fastapi.testclient import TestClient

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(serve_params(tmp_path)))
    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.update(app=app, **kwargs))
    rc = main(["serve", "--params", str(params_file), "--model", str(tiny_checkpoint), "--port", "8123"])
    assert rc == 0
    assert (calls["host"], calls["port"]) == ("127.0.0.1", 8123)
    with TestClient(calls["app"]) as client:
        assert client.get("/health").json()["model"]["uri"] == str(tiny_checkpoint)


def test_serve_loads_the_2d_model_of_model_2d_and_starts_without_one(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import uvicorn
    from fastapi.testclient import TestClient

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(serve_params(tmp_path)))
    package = write_tiny_planar_package(tmp_path / "planar")
    calls: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.update(app=app, **kwargs))
    argv = ["serve", "--params", str(params_file), "--model", str(tiny_checkpoint)]
    assert main([*argv, "--model-2d", str(package)]) == 0
    with TestClient(calls["app"]) as client:
        health = client.get("/health").json()
    assert health["model"]["uri"] == str(tiny_checkpoint)
    assert health["model_2d"]["available"] and health["model_2d"]["uri"] == str(package)

    # a 2-D model that cannot be loaded: one warning, and the service starts for 3-D
    caplog.clear()
    assert main([*argv, "--model-2d", str(tmp_path / "no-such-2d")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "no-such-2d" in warnings[0], warnings
    with TestClient(calls["app"]) as client:
        health = client.get("/health").json()
    assert health["model"]["uri"] == str(tiny_checkpoint) and health["model_2d"]["available"] is False
    assert ServeSettings.from_params(serve_params(tmp_path)).model_2d == "models:/tumorseg-2d@champion"
    assert ServeSettings.from_params(serve_params(tmp_path, model_2d=None)).model_2d is None


def test_a_missing_model_is_a_one_line_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(serve_params(tmp_path)))
    rc = main(["serve", "--params", str(params_file), "--model", str(tmp_path / "nope.ckpt")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tumorseg serve: error: ") and "nope.ckpt: no such checkpoint" in err
    assert "\n" not in err
    rc = main(["serve", "--params", str(params_file)])  # the champion of an empty store
    assert rc == 2
    assert "run `dvc repro`" in capsys.readouterr().err
