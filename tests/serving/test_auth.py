"""Bearer tokens on every route that takes or returns patient data, and the audit trail."""

from __future__ import annotations

import json
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serving_support import case_files, fx, serve_params

from tumorseg.cli import main
from tumorseg.serving.auth import TokenStore

CLOSED = [
    ("post", "/predict"),
    ("get", "/demo"),
    ("post", "/demo/BraTS2021_00001"),
    ("get", "/cases/abc"),
    ("get", "/cases/abc/slice?plane=axial&index=0&modality=t1ce"),
    ("get", "/cases/abc/segmentation"),
    ("post", "/cases/abc/ground-truth"),
]
"""Every route that takes or returns patient data (results kept for the viewer included)."""


@pytest.fixture(scope="module")
def small_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.write_brats_case(tmp_path_factory.mktemp("cases"), "BraTS2021_00001", seed=2)


@pytest.fixture
def tokens(tmp_path: Path) -> dict[str, str]:
    store = TokenStore(tmp_path / "tokens.json")  # serve_params points serve.tokens_file here
    return {"alice": store.create("alice"), "bob": store.create("bob")}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _audit(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def test_tokens_are_stored_as_salted_hashes_in_a_private_file(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "t" / "tokens.json")
    token = store.create("alice")
    text = store.path.read_text()
    secret = token.rsplit("_", 1)[1]
    assert secret not in text and token not in text
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.check(f"Bearer {token}".encode()) == ("alice", None)
    again = store.create("carol")
    assert again != token and [e.name for e in store.entries()] == ["alice", "carol"]
    with pytest.raises(Exception, match="exists"):
        store.create("alice")
    store.revoke("alice")
    assert store.check(f"Bearer {token}".encode())[0] is None
    with pytest.raises(Exception, match="no token named 'alice'"):
        store.revoke("alice")


def test_every_patient_data_route_refuses_missing_wrong_revoked_and_malformed_tokens(
    make_client, tokens: dict[str, str], tmp_path: Path
) -> None:
    client = make_client(auth_max_failures=1000)
    TokenStore(tmp_path / "tokens.json").revoke("bob")
    wrong = tokens["alice"][:-4] + ("AAAA" if not tokens["alice"].endswith("AAAA") else "BBBB")
    attempts = {
        "missing": {},
        "wrong": _bearer(wrong),
        "revoked": _bearer(tokens["bob"]),
        "malformed": {"Authorization": "Bearer not-a-token"},
        "basic": {"Authorization": f"Basic {tokens['alice']}"},
    }
    for method, route in CLOSED:
        for what, headers in attempts.items():
            response = getattr(client, method)(route, headers=headers)
            assert response.status_code == 401, (method, route, what, response.status_code)
            assert set(response.json()) == {"error"} and "\n" not in response.json()["error"]
            assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/health").status_code == 200  # liveness stays open
    assert client.get("/").status_code == 200  # the page itself holds no patient data
    assert client.get("/demo", headers=_bearer(tokens["alice"])).status_code == 200
    lines = _audit(tmp_path)
    assert len(lines) == len(CLOSED) * len(attempts) + 1  # one line per request to a closed route
    assert all(
        tokens["alice"] not in json.dumps(line) and tokens["bob"] not in json.dumps(line) for line in lines
    )
    assert lines[-1]["token"] == "alice" and lines[-1]["status"] == 200


def test_repeated_failures_from_one_address_are_rate_limited(
    make_client, tokens: dict[str, str], tmp_path: Path
) -> None:
    client = make_client(auth_max_failures=3)
    wrong = _bearer("tsg_000000000000_" + "A" * 43)
    for _ in range(3):
        assert client.get("/demo", headers=wrong).status_code == 401
    limited = client.get("/demo", headers=wrong)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    assert "too many failed authentications" in limited.json()["error"]
    assert (
        client.get("/demo", headers=_bearer(tokens["alice"])).status_code == 200
    )  # a valid token still works


def test_revoking_the_last_token_or_losing_the_file_closes_the_routes_not_opens_them(
    make_client, tokens: dict[str, str], tmp_path: Path
) -> None:
    client = make_client()
    store = TokenStore(tmp_path / "tokens.json")
    assert client.get("/demo", headers=_bearer(tokens["alice"])).status_code == 200
    store.revoke("alice")
    store.revoke("bob")
    refused = client.get("/demo")
    assert refused.status_code == 401 and "holds none" in refused.json()["error"]
    (tmp_path / "tokens.json").unlink()
    assert client.get("/demo").status_code == 401
    (tmp_path / "tokens.json").write_text("{not json")
    broken = client.get("/demo", headers=_bearer(tokens["alice"]))
    assert broken.status_code == 503 and "not a tumorseg tokens file" in broken.json()["error"]
    assert client.get("/health").status_code == 200


def test_an_authenticated_prediction_is_audited_with_hashes_volumes_and_model_never_the_token(
    make_client, tokens: dict[str, str], small_case: Path, tmp_path: Path
) -> None:
    import hashlib

    client = make_client()
    files = case_files(small_case)
    with ThreadPoolExecutor(max_workers=4) as clients:  # four clients at once: one whole line each
        futures = [
            clients.submit(client.post, "/predict?format=json", files=files, headers=_bearer(tokens["alice"]))
            for _ in range(4)
        ]
        responses = [f.result(timeout=120) for f in futures]
    assert [r.status_code for r in responses] == [200] * 4
    lines = _audit(tmp_path)
    assert len(lines) == 4
    expected = sorted(hashlib.sha256(content).hexdigest() for _, (_, content, _) in files)
    for line in lines:
        assert line["token"] == "alice" and line["route"] == "/predict" and line["status"] == 200
        assert sorted(f["sha256"] for f in line["files"]) == expected
        assert line["volumes_ml"] == responses[0].json()["volumes_ml"]
        assert set(line["model"]) == {"name", "version", "alias"}
        assert line["duration_s"] >= 0 and line["client"]
    text = (tmp_path / "audit.jsonl").read_text()
    assert tokens["alice"] not in text and tokens["alice"].rsplit("_", 1)[1] not in text


def test_the_audit_log_rotates_by_size(make_client, tokens: dict[str, str], tmp_path: Path) -> None:
    client = make_client(audit_max_mb=0.001, audit_backups=2)  # about 1 kB per file
    for _ in range(20):
        client.get("/demo", headers=_bearer(tokens["alice"]))
    kept = sorted(p.name for p in tmp_path.glob("audit.jsonl*"))
    assert kept == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(json.loads(line) for p in tmp_path.glob("audit.jsonl*") for line in p.read_text().splitlines())


def test_token_commands_and_serving_beyond_loopback_without_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(serve_params(tmp_path)))
    p = ["--params", str(params)]
    assert main(["serve", *p, "--host", "0.0.0.0"]) == 2  # refused before any model loads
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tumorseg token create" in err and "--insecure" in err

    assert main(["token", "create", "ward-3", *p]) == 0
    token = capsys.readouterr().out.strip()
    assert TokenStore(tmp_path / "tokens.json").check(f"Bearer {token}".encode()) == ("ward-3", None)
    assert main(["token", "list", *p]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("ward-3\t") and token not in listed
    assert main(["token", "create", "ward-3", *p]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["token", "revoke", "ward-3", *p]) == 0
    assert main(["token", "revoke", "ward-3", *p]) == 2
    assert "no token named" in capsys.readouterr().err


def test_four_clients_at_once_on_a_real_server_give_four_whole_audit_lines(
    tokens: dict[str, str], small_case: Path, tmp_path: Path
) -> None:
    """uvicorn in a thread, four httpx clients posting at the same time (a barrier releases them)."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn
    from serving_support import oracle_model

    from tumorseg.serving.app import ServeSettings, create_app

    settings = ServeSettings.from_params(serve_params(tmp_path, workers=2), model_uri="oracle")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, loaded_model=oracle_model()),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        barrier = threading.Barrier(4)
        files = case_files(small_case)

        def one_client(i: int) -> int:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                token = tokens["alice" if i % 2 else "bob"]
                barrier.wait()
                return client.post("/predict?format=json", files=files, headers=_bearer(token)).status_code

        with ThreadPoolExecutor(max_workers=4) as pool:
            codes = list(pool.map(one_client, range(4)))
    finally:
        server.should_exit = True
        thread.join(timeout=15)
    assert codes == [200] * 4
    lines = _audit(tmp_path)  # every line parses: none interleaved
    assert sorted(line["token"] for line in lines) == ["alice", "alice", "bob", "bob"]
    assert all(line["status"] == 200 and line["client"] == "127.0.0.1" for line in lines)
    text = (tmp_path / "audit.jsonl").read_text()
    assert not any(token in text for token in tokens.values())
