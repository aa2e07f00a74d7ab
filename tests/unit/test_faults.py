"""The write points the crash-consistency tests kill stages at, and the registry lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from polling import wait_until
from tumorseg import faults, tracking
from tumorseg.data.manifest import atomic_write_text

WRITE_TWO = """
import sys
from tumorseg.data.manifest import atomic_write_text
atomic_write_text(sys.argv[1] + "/a.txt", "new a")
atomic_write_text(sys.argv[1] + "/b.txt", "new b")
"""


def test_without_the_environment_a_write_point_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(faults.LOG_ENV, raising=False)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_every_point_is_logged_and_the_nth_pauses_before_its_rename(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old a")
    log = tmp_path / "points.log"
    env = {**os.environ, faults.LOG_ENV: str(log)}
    subprocess.run([sys.executable, "-c", WRITE_TWO, str(out)], env=env, check=True)
    lines = [line.split(maxsplit=3) for line in log.read_text().splitlines()]
    assert [(kind, name) for kind, _, _, name in lines] == [
        ("WRITE", str(out / "a.txt")),
        ("WRITE", str(out / "b.txt")),
    ]

    (out / "a.txt").write_text("old a")
    (out / "b.txt").unlink()
    log.unlink()
    paused = subprocess.Popen([sys.executable, "-c", WRITE_TWO, str(out)], env={**env, faults.PAUSE_ENV: "2"})
    try:
        wait_until(lambda: log.is_file() and faults.PAUSED in log.read_text(), "the pause", 60)
        assert paused.poll() is None  # paused, not finished
        assert (out / "a.txt").read_text() == "new a" and not (out / "b.txt").exists()
    finally:
        paused.kill()
        paused.wait(timeout=30)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["a.txt"]


def test_the_registry_lock_sits_with_the_store_and_a_killed_holder_releases_it(tmp_path: Path) -> None:
    db = tmp_path / "mlruns" / "mlflow.db"
    assert tracking.registry_lock_path(f"sqlite:///{db}") == db.parent / ".mlflow.db.registry.lock"
    assert tracking.registry_lock_path(f"file://{tmp_path}") == tmp_path / ".registry.lock"
    remote = tracking.registry_lock_path("http://mlflow.example:5000")
    assert remote.parent.name == "tumorseg-locks" and remote != tracking.registry_lock_path(
        "http://other:5000"
    )

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom tumorseg.tracking import registry_lock\n"
            "with registry_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n",
            f"sqlite:///{db}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    from tumorseg.errors import DataError

    with (
        pytest.raises(DataError, match="held the model registry"),
        tracking.registry_lock(f"sqlite:///{db}", wait_s=0.5),
    ):
        pass
    holder.kill()  # SIGKILL: the OS releases its lock
    holder.wait(timeout=30)
    with tracking.registry_lock(f"sqlite:///{db}", wait_s=10):
        pass
