"""Simultaneous requests: a bounded pool, a bounded queue (503 beyond it), and the request timeout.

The network waits on a gate the test opens, so "four requests at once" really overlap, whatever
the machine's speed.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serving_support import GatedNetwork, case_files, fx, leftover_request_dirs, oracle_model, service_of

from polling import wait_until


@pytest.fixture(scope="module")
def small_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.write_brats_case(tmp_path_factory.mktemp("cases"), "BraTS2021_00001", seed=2)


def gated_service(make_client, **options: object) -> tuple[threading.Event, GatedNetwork, object, object]:
    """A client whose oracle network blocks every forward pass until the returned gate is set.

    Returns:
        ``(gate, network, client, service)``: the network counts how many passes run at once.
    """
    gate = threading.Event()
    network = GatedNetwork(oracle_model().trained.network, gate)
    client = make_client(loaded_model=oracle_model(network), **options)
    return gate, network, client, service_of(client)


def test_several_simultaneous_requests_run_at_most_workers_at_a_time(make_client, small_case: Path) -> None:
    gate, network, client, service = gated_service(make_client, workers=2, queue_size=4)
    with ThreadPoolExecutor(max_workers=5) as clients:
        futures = [
            clients.submit(client.post, "/predict?format=json", files=case_files(small_case))
            for _ in range(5)
        ]
        wait_until(lambda: service.pool.pending == 5, "all five requests are in the pool")
        wait_until(lambda: network.active == 2, "exactly the two workers are inside a forward pass")
        assert network.max_active == 2  # three jobs still wait, held back by the pool, not the gate
        gate.set()
        responses = [future.result(timeout=60) for future in futures]
    assert [r.status_code for r in responses] == [200] * 5
    assert network.max_active == 2  # two workers, never more
    assert len({r.json()["volumes_ml"]["WT"] for r in responses}) == 1
    assert service.pool.pending == 0
    assert leftover_request_dirs(client) == []


def test_requests_beyond_the_queue_get_503_with_retry_after(make_client, small_case: Path) -> None:
    gate, network, client, service = gated_service(make_client, workers=1, queue_size=1)
    with ThreadPoolExecutor(max_workers=2) as clients:
        held = [clients.submit(client.post, "/predict", files=case_files(small_case)) for _ in range(2)]
        wait_until(lambda: service.pool.pending == 2, "both requests are in the pool")
        refused = client.post("/predict", files=case_files(small_case))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "5"
        assert "server busy" in refused.json()["error"]
        assert client.get("/health").json()["pending"] == 2  # health still answers while busy
        gate.set()
        assert [f.result(timeout=60).status_code for f in held] == [200, 200]
    assert leftover_request_dirs(client) == []


def test_a_request_over_the_time_limit_gets_504_and_its_files_are_removed(
    make_client, small_case: Path
) -> None:
    gate, network, client, service = gated_service(
        make_client, workers=1, queue_size=2, request_timeout_s=3.0
    )
    with ThreadPoolExecutor(max_workers=2) as clients:
        running = clients.submit(client.post, "/predict", files=case_files(small_case))
        wait_until(lambda: network.active == 1, "the first request is inside a forward pass")
        queued = clients.submit(client.post, "/predict", files=case_files(small_case))
        first, second = running.result(timeout=30), queued.result(timeout=30)
    for response in (first, second):
        assert response.status_code == 504
        assert "serve.request_timeout_s" in response.json()["error"]
    # the queued job was cancelled before it started; the running one finishes and cleans up
    gate.set()
    wait_until(lambda: service.pool.pending == 0, "the running job finished")
    wait_until(lambda: leftover_request_dirs(client) == [], "every request folder was removed", timeout_s=10)
    assert network.max_active == 1


@pytest.mark.parametrize("step", ["hash_uploads", "stage_upload"])
def test_a_request_timed_out_while_a_thread_reads_its_upload_leaves_no_files(
    make_client, small_case: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """The timeout cancels the request while a threadpool thread still hashes (audit log) or writes its
    upload: the request's folder is removed all the same, once that thread is done."""
    from tumorseg.serving import predict_routes

    release, finished = threading.Event(), threading.Event()
    real = getattr(predict_routes, step)

    def held(*args: object) -> object:
        release.wait(30)  # held until the 504 has been sent
        try:
            return real(*args)
        finally:
            finished.set()

    monkeypatch.setattr(predict_routes, step, held)
    client = make_client(request_timeout_s=3.0)  # the held step outlasts it; parsing the upload does not
    response = client.post("/predict", files=case_files(small_case))
    assert response.status_code == 504
    release.set()
    wait_until(finished.is_set, f"{step} returned")
    wait_until(lambda: leftover_request_dirs(client) == [], "the request's folder was removed", timeout_s=5)
    assert service_of(client).pool.pending == 0  # it never reached the pool


def test_a_ground_truth_timed_out_while_it_is_scored_leaves_the_case_as_it_was(
    make_client, small_case: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client got 504, so the viewer must not show that mask or its Dice afterwards, although the
    scoring thread finishes later; its upload is removed too."""
    from tumorseg.serving import viewer, viewer_routes

    release, finished = threading.Event(), threading.Event()
    real, real_score = viewer.to_ras, viewer_routes.score_mask

    def held(*args: object) -> object:  # the mask was read; the thread has only to score it
        release.wait(30)  # held until the 504 has been sent
        return real(*args)

    def scoring(*args: object) -> object:  # the whole scoring thread, whatever it stores on the way
        try:
            return real_score(*args)
        finally:
            finished.set()

    client = make_client(request_timeout_s=5.0)  # a prediction of the small case takes far less
    shown = client.post("/predict?format=viewer", files=case_files(small_case))
    assert shown.status_code == 200, shown.text
    monkeypatch.setattr(viewer, "to_ras", held)
    monkeypatch.setattr(viewer_routes, "score_mask", scoring)
    result_id = shown.json()["result_id"]
    seg = small_case / "BraTS2021_00001_seg.nii.gz"
    mask = {"file": (seg.name, seg.read_bytes(), "application/gzip")}
    response = client.post(f"/cases/{result_id}/ground-truth", files=mask)
    assert response.status_code == 504
    release.set()
    wait_until(finished.is_set, "the scoring thread returned")
    wait_until(lambda: leftover_request_dirs(client) == [], "the uploaded mask was removed", timeout_s=5)
    assert client.get(f"/cases/{result_id}").json()["dice"] is None
    piece = client.get(f"/cases/{result_id}/slice", params={"plane": "axial", "index": 0}).json()
    assert "reference" not in piece
    monkeypatch.setattr(viewer, "to_ras", real)  # the same upload, in time, is kept
    scored = client.post(f"/cases/{result_id}/ground-truth", files=mask)
    assert (
        scored.status_code == 200
        and client.get(f"/cases/{result_id}").json()["dice"] == scored.json()["dice"]
    )
